#!/usr/bin/env bash
# All GPU evidence for attention_ref in one run, under 8 minutes on one H200:
#   (a) attention-ref verify --device cuda for our torch and jax backends (every property, arrays on the GPU),
#   (b) attention-ref crosscheck --device cuda (the frameworks' CUDA kernels and layers against SPEC.md),
#   (c) speed and peak device memory of our torch and jax backends against torch SDPA (cuDNN, flash,
#       efficient, math) and jax.nn.dot_product_attention (xla, cudnn) at 4k, 16k and 128k tokens, bfloat16
#       and true float32 (python -m benchmarks.gpu_evidence).
# (a) and (b) run side by side, then (c) alone. Each part has its own time limit; a part that fails or
# runs out of time is reported and the others still run. Everything goes to OUT_DIR (at most 8 files):
# summary.md (each part's status and its closing lines, the speed table), environment.txt,
# verify-torch.txt, verify-jax.txt, crosscheck.txt, speed.json, speed.md, gpu.log (all of the above as it ran).
# Exit status 1 when a part failed (after all of them ran), else 0.
#
#   benchmarks/gpu.sh [--dry-run] [--out DIR] [--budget SECONDS]
#   DRY_RUN=1 benchmarks/gpu.sh       # every part at tiny sizes on the CPU, in well under a minute (CI)
#
# OUT_DIR: --out, else $OUT, else a new temporary directory. BUDGET (default 420 s) is shared out between the
# parts. The project runs from this work tree (PYTHONPATH), as `python -m attention_ref.cli` (the command
# `attention-ref`); a missing torch, jax, hypothesis or ml_dtypes is installed with the README's command
# (pip install ".[all]"), which on a CUDA machine keeps the CUDA builds already there. PYTHON picks the
# interpreter (default python3).
set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
OUT_DIR=${OUT:-}
BUDGET=${BUDGET:-420}
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT_DIR=$2; shift ;;
        --budget) BUDGET=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT_DIR=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PYTHON=${PYTHON:-python3}
export PYTHON PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# jax takes GPU memory as it goes (by default each process would take 75% of it at start): the parts share the GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# One jax compilation cache for the run: verify, crosscheck and the speed part compile some of the same programs.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT_DIR/.jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    VERIFY_TORCH=(--max-examples 1 --property matches_float64_oracle --property gradients_match_float64_oracle
                  --property bad_inputs_raise_the_spec_errors)
    VERIFY_JAX=("${VERIFY_TORCH[@]}")
    CROSSCHECK=(--max-examples 1 --target 'sdpa[MATH]' --target 'jax.nn' --property matches_float64_oracle)
    SPEED=(--dry-run --rounds 2 --lengths 4096 16384)
    BUDGET=100  # limits only: the dry run takes some 30-40 s on 2 busy cores
else
    DEVICE=cuda
    VERIFY_TORCH=(--max-examples 25 --seed 0)
    VERIFY_JAX=(--max-examples 5 --seed 0)  # every new shape compiles on the GPU (no buckets there)
    CROSSCHECK=(--max-examples 10 --workers 8)
    SPEED=()
fi
# Phase 1, (a) and (b) side by side: 45% of the budget; phase 2, (c): what is left of it.
PHASE1=$((BUDGET * 45 / 100))
log="$OUT_DIR/gpu.log"
summary="$OUT_DIR/summary.md"
failed="$OUT_DIR/.failed"  # a line per failed part
: >"$log"
rm -f "$failed"
echo "# GPU evidence ($( [ "$DRY_RUN" = 1 ] && echo "dry run on the CPU" || echo "device $DEVICE"), $(date -u +%FT%TZ))" >"$summary"
echo >>"$summary"
say() { echo "$*" | tee -a "$log"; }

# part NAME FILE LIMIT COMMAND...: run COMMAND with a time limit, its output in FILE (and gpu.log); one
# status line in summary.md with the command and the last line of FILE. Never stops the script (which exits 1
# at the end when a part failed).
part() {
    local name=$1 file=$2 limit=$3 status began=$SECONDS
    shift 3
    say "== $name (limit ${limit}s): $*"
    # SIGINT, not SIGTERM: Python unwinds, and the crosscheck stops its workers (they run in sessions of their own).
    if timeout --signal=INT --kill-after=20 "$limit" bash -c '"$@"' part "$@" >"$OUT_DIR/$file" 2>&1; then
        status=ok
    else
        local rc=$?
        status="FAILED (exit $rc)"
        if [ $rc -ge 124 ]; then status="FAILED (exit $rc, out of time)"; fi
        echo "$name" >>"$failed"
    fi
    status="$status in $((SECONDS - began)) s"
    cat "$OUT_DIR/$file" >>"$log"
    say "-- $name: $status"
    local last
    last=$(grep -v '^\s*$' "$OUT_DIR/$file" | tail -n 1 | cut -c1-300 || true)
    # shellcheck disable=SC2016  # the backquotes are markdown's
    printf -- '- **%s**: %s: `%s`\n  - last line: `%s`\n' "$name" "$status" "$*" "$last" >>"$summary"
}

environment() {
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" - <<'PY'
import importlib.metadata, platform
print("python", platform.python_version(), platform.machine())
for name in ("numpy", "torch", "jax", "jaxlib", "flax", "keras", "transformers", "hypothesis", "ml_dtypes"):
    try:
        print(name, importlib.metadata.version(name))
    except importlib.metadata.PackageNotFoundError:
        print(name, "not installed")
try:
    import torch
    print("torch.cuda.is_available()", torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception as error:
    print("torch:", type(error).__name__, error)
try:
    import jax
    print("jax.devices()", jax.devices())
except Exception as error:
    print("jax:", type(error).__name__, error)
PY
}

install_if_missing() {
    if "$PYTHON" -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ('numpy', 'torch', 'jax', 'hypothesis', 'ml_dtypes')))"; then
        echo "torch, jax, hypothesis and ml_dtypes are installed"
        return 0
    fi
    local command
    command=$(grep -m1 -F -- 'pip install ".[all]"' README.md)
    command=${command%% && *}  # the install, not the crosscheck the README runs after it
    echo "+ $PYTHON -m $command"
    eval "$PYTHON -m $command"
}

export -f install_if_missing environment
START=$SECONDS
part "install (README's command, if anything is missing)" install.txt 300 install_if_missing
rm -f "$OUT_DIR/install.txt"  # its lines are in gpu.log; keep OUT_DIR within 8 files
part "environment" environment.txt 60 environment

say "== phase 1: (a) and (b) side by side, ${PHASE1}s"
CLI=("$PYTHON" -m attention_ref.cli)
LIMIT=$((PHASE1 - 15))  # verify stops starting properties 15 s before its part's limit
part "(a) verify --device $DEVICE, torch backend" verify-torch.txt "$PHASE1" \
    "${CLI[@]}" verify --device "$DEVICE" --backend torch --progress lines --time-limit "$LIMIT" "${VERIFY_TORCH[@]}" &
part "(a) verify --device $DEVICE, jax backend" verify-jax.txt "$PHASE1" \
    "${CLI[@]}" verify --device "$DEVICE" --backend jax --progress lines --time-limit "$LIMIT" "${VERIFY_JAX[@]}" &
part "(b) crosscheck --device $DEVICE" crosscheck.txt "$PHASE1" \
    "${CLI[@]}" crosscheck --device "$DEVICE" --timeout "$LIMIT" "${CROSSCHECK[@]}" &
wait

say "== phase 2: (c) speed and peak device memory"
LEFT=$((BUDGET - (SECONDS - START) - 15))
[ "$LEFT" -lt 30 ] && LEFT=30
part "(c) speed and peak memory on $DEVICE" speed.txt "$((LEFT + 45))" \
    "$PYTHON" -m benchmarks.gpu_evidence --device "$DEVICE" --out "$OUT_DIR" --budget "$LEFT" "${SPEED[@]}"
rm -f "$OUT_DIR/speed.txt"  # in gpu.log; the table is speed.md

{
    echo
    echo "## speed and peak memory"
    echo
    cat "$OUT_DIR/speed.md" 2>/dev/null || echo "(no speed.md: see gpu.log)"
    echo
    echo "total $((SECONDS - START)) s"
} >>"$summary"
rm -rf "$OUT_DIR/.jax-cache"
say "== done in $((SECONDS - START)) s: $summary"
cat "$summary"
if [ -s "$failed" ]; then
    echo "gpu.sh: $(wc -l <"$failed") part(s) failed: $(paste -sd ';' "$failed")" >&2
    rm -f "$failed"
    exit 1
fi
