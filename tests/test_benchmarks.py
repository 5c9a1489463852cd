"""The benchmarks' own runs at tiny sizes (benchmarks/speed.py, the Python part of benchmarks/gpu.sh) and
the ``--device`` options of ``attention-ref verify``, ``crosscheck`` and this suite."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import attention_ref as ar
from attention_ref.cli import main
from attention_ref.testing import get_property, run_property
from attention_ref.testing.verify import DeviceBackend, DeviceNotAvailableError, on_device

from .conftest import import_or_skip

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


def _cuda_seen() -> bool:
    torch = import_or_skip("torch")
    jax = import_or_skip("jax")
    return bool(torch.cuda.is_available()) or any(d.platform == "gpu" for d in jax.devices())


# ---- benchmarks/speed.py -------------------------------------------------------------------------------


def test_speed_quick_writes_every_backend_against_sdpa(tmp_path: Path) -> None:
    import_or_skip("torch")
    import_or_skip("jax")
    path = tmp_path / "speed.json"
    done = _run("-m", "benchmarks.speed", "--quick", "--rounds", "2", "--cases", "grad4k-f64", "--markdown",
                "--json", str(path))
    assert done.returncode == 0, done.stderr
    evidence = json.loads(path.read_text())
    assert evidence["quick"] and evidence["rounds"] == 2
    records = evidence["records"]
    assert [(r["case"], r["backend"]) for r in records] == [("grad4k-f64", b) for b in ("numpy", "torch", "jax")]
    for r in records:
        assert r["error"] is None, r
        assert len(r["times_s"]) == len(r["sdpa_times_s"]) == 2 and min(r["times_s"] + r["sdpa_times_s"]) > 0
        assert r["ratio_to_sdpa"] > 0 and r["peak_extra_mib"] >= 0 and r["sdpa_peak_extra_mib"] >= 0
        assert r["shape"] == [1, 8, 8, 64, 64, 64] and r["dtype"] == "float64"  # lengths 4096 / 64
        assert r["grad"] and r["forward_time_s"] > 0 and r["grad_over_forward"] > 0 and r["sdpa_grad_over_forward"] > 0
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("| case | backend | time | ratio to SDPA | peak extra MiB | SDPA time | SDPA MiB |")
    assert len(lines) == 2 + len(records)


def test_speed_opt_in_case_measures_each_implementation_once(tmp_path: Path) -> None:
    import_or_skip("torch")
    path = tmp_path / "speed.json"
    done = _run("-m", "benchmarks.speed", "--quick", "--case", "head131k", "--backends", "numpy", "--json", str(path))
    assert done.returncode == 0, done.stderr
    (record,) = json.loads(path.read_text())["records"]
    assert record["case"] == "head131k" and record["dtype"] == "float64" and record["shape"][3:5] == [2048, 2048]
    assert record["error"] is None and record["rounds"] == 1
    assert record["time_s"] > 0 and record["sdpa_time_s"] > 0 and record["peak_extra_mib"] >= 0


# ---- benchmarks/gpu_evidence.py and gpu.sh ---------------------------------------------------------------


def test_gpu_evidence_dry_run_on_the_cpu(tmp_path: Path) -> None:
    import_or_skip("torch")
    import_or_skip("jax")
    done = _run("-m", "benchmarks.gpu_evidence", "--device", "cpu", "--dry-run", "--lengths", "4096", "--dtypes",
                "float32", "--rounds", "2", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    evidence = json.loads((tmp_path / "speed.json").read_text())
    assert evidence["dry_run"] and evidence["device"] == "cpu"
    assert set(evidence["environment"]) == {"torch", "jax"}
    records = {r["implementation"]: r for r in evidence["records"]}
    assert set(records) == {"ours torch", "sdpa cudnn_attention", "sdpa flash_attention", "sdpa efficient_attention",
                            "sdpa math", "ours jax", "jax.nn xla", "jax.nn cudnn"}
    for name in ("ours torch", "sdpa flash_attention", "sdpa math", "ours jax", "jax.nn xla"):
        r = records[name]
        assert r["error"] is None and len(r["times_s"]) == 2 and r["time_s"] > 0 and r["ratio_to_reference"] > 0, r
        assert r["shape"] == [1, 8, 64, 128] and r["peak_extra_mib"] is None  # no device statistics on the CPU
    for name in ("sdpa cudnn_attention", "sdpa efficient_attention", "jax.nn cudnn"):  # none of them on the CPU
        assert records[name]["error"] and records[name]["time_s"] is None
    table = (tmp_path / "speed.md").read_text().splitlines()
    assert table[0].startswith("| case | implementation |") and len(table) == 2 + len(records)


def test_gpu_script_is_valid_bash_and_has_a_help() -> None:
    script = str(ROOT / "benchmarks" / "gpu.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    done = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--dry-run" in done.stdout
    done = subprocess.run(["bash", script, "--no-such-option"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument" in done.stderr


# ---- --device ---------------------------------------------------------------------------------------------


def test_verify_on_the_cpu_device(capsys: pytest.CaptureFixture[str]) -> None:
    import_or_skip("torch")
    import_or_skip("jax")
    assert main(["verify", "--device", "cpu", "--backend", "torch", "--backend", "jax", "--max-examples", "2",
                 "--seed", "0", "--property", "matches_float64_oracle"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["property", "rules", "torch[cpu]", "jax[cpu]"]
    assert lines[-1].startswith("2 passed, 0 failed, 0 errors")


def test_verify_on_cuda_without_a_gpu_says_why() -> None:
    if _cuda_seen():
        pytest.skip("a GPU is present: verify --device cuda runs there (benchmarks/gpu.sh)")
    with pytest.raises(SystemExit) as stopped:
        main(["verify", "--device", "cuda", "--max-examples", "1"])
    message = str(stopped.value.code)
    assert message.startswith("attention-ref verify: device 'cuda' is not available to ")
    assert "torch.cuda.is_available() is False" in message and "jax" in message and "numpy" not in message


def test_verify_time_limit_and_progress() -> None:
    from attention_ref.testing import verify

    lines: list[str] = []
    report = verify(["numpy"], max_examples=1, seed=0, properties=["matches_float64_oracle"], progress=lines.append)
    assert report.passed and len(lines) == 1 and lines[0].startswith("numpy matches_float64_oracle: pass (")
    report = verify(["numpy"], max_examples=1, time_limit=0, progress=lines.append)
    assert len(lines) == 1 and all(o.status == "not run" for o in report.outcomes["numpy"])


def test_crosscheck_on_cuda_without_a_gpu_says_why() -> None:
    if _cuda_seen():
        pytest.skip("a GPU is present: crosscheck --device cuda runs there (benchmarks/gpu.sh)")
    with pytest.raises(SystemExit) as stopped:
        main(["crosscheck", "--device", "cuda", "--max-examples", "1"])
    assert str(stopped.value.code).startswith("attention-ref crosscheck: no CUDA device: ")


def test_numpy_has_no_device_but_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["verify", "--device", "cuda", "--backend", "numpy"])
    assert "numpy backend (numpy arrays): only torch and jax arrays can be placed on a device" in str(
        stopped.value.code)
    with pytest.raises(DeviceNotAvailableError):
        on_device("numpy", "gpu")
    assert on_device("numpy", "cpu") is ar.get_backend("numpy")
    with pytest.raises(SystemExit):
        main(["verify", "--device", "tpu"])
    assert "device must be one of cpu, cuda, gpu" in capsys.readouterr().err


def test_a_device_backend_places_its_arrays_and_runs_the_properties() -> None:
    """With jax's default device set, ``on_device(jax, "cpu")`` places explicitly: the wrapper is a
    Backend that the front door, ``ar.attention`` and the properties accept."""
    jax = import_or_skip("jax")
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        impl = on_device("jax", "cpu")
        assert isinstance(impl, DeviceBackend) and impl.name == "jax" and impl.framework == "jax"
        assert impl.default_blocks == ar.get_backend("jax").default_blocks
        data = np.arange(12.0).reshape(3, 4) / 10
        x = impl.asarray(data)
        assert x.dtype == np.float64 and x.devices() == {cpu}
        plain = ar.get_backend("jax")
        np.testing.assert_array_equal(impl.to_numpy(ar.attention(x, x, x, backend=impl)),
                                      plain.to_numpy(plain.attention(*[plain.asarray(data)] * 3)))
        from hypothesis import settings

        for name in ("matches_float64_oracle", "gradients_match_float64_oracle"):
            run_property(get_property(name), impl, settings(max_examples=2, deadline=None, database=None), seed=0)


def test_pytest_device_option() -> None:
    import_or_skip("torch")
    if not _cuda_seen():
        done = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", "cuda", "tests/test_registry.py")
        assert done.returncode == 4 and "--device cuda: device 'cuda' is not available to " in done.stderr, done
    done = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", "cpu", "-k",
                "aliases_for_installed_frameworks", "tests/test_registry.py")
    assert done.returncode == 0 and re.search(r"^3 passed", done.stdout, re.MULTILINE), done.stdout + done.stderr
