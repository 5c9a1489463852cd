"""Pictures of a failure's shrunk case and of the crosscheck's matrix (PNG, matplotlib: the ``plot`` extra).

``picture_data(impl, error)`` computes what a failure's picture shows, for the ``(*B, Hq)`` slice of
the case holding the worst element: the kernel's weights ``(L, S)`` (returned, or *implied*: recovered
from out alone by linearity in v), the reference's (the float64 oracle's), their difference, the keys
each query may attend (rule 8: mask, causal, window) and the worst element. ``failure_picture`` draws
it; ``matrix_picture`` draws the crosscheck's pass/FAIL/ERROR/differs/n/a matrix.

Shape letters: B batch, H heads (Hq query, Hkv kv), L queries, S keys, E q/k head dim, Ev value head dim.

matplotlib is imported inside the drawing functions (``import attention_ref`` never needs it); each
picture is its own ``matplotlib.figure.Figure`` on the Agg canvas, so no pyplot state is shared
between calls. Errors while drawing are raised to the caller (who reports them).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .assertions import ElementMismatch
from .cases import AttentionCase, call
from .implementation import Implementation
from .report import failing_case, first_failure

#: Largest side (L or S) drawn with cell borders and every index as a tick label.
SMALL_SIDE = 16
#: Largest side whose cells carry their value as text.
LABELLED_SIDE = 8


@dataclass(frozen=True)
class PictureData:
    """What a failure's picture shows, for the slice ``index`` (the ``(*B, Hq)`` index) of ``case``.

    ``kernel`` and ``reference`` are float64 ``(L, S)`` weights and ``difference`` is
    ``kernel - reference``; ``implied`` says the kernel's weights were recovered from its out (v
    replaced by columns of the identity) because it returned none; ``dropout_scaled`` says both include
    the dropout scaling ``keep / (1 - p)`` (implied weights of a case with a dropout mask).
    ``allowed`` is ``(L, S)`` bool, True where query i may attend key j. ``worst`` is the ``(query,
    key)`` element marked (the mismatch's worst element when the property compared weights, else the
    largest difference; None when the weights do not differ) and ``worst_row`` the query of the worst
    element of an out comparison (else None). ``head_errors`` is ``(Hq,)``, for the slice's batch
    element: each query head's largest out error over its bound, and ``closest_kv_heads`` ``(Hq,)``
    int the kv head whose reference weights the kernel's weights of that query head are closest to
    (the rule-2 kv head is ``h // (Hq / Hkv)``). ``mismatch`` is the failed comparison (None when the
    failure was not one)."""

    case: AttentionCase
    index: tuple[int, ...]
    kernel: np.ndarray
    reference: np.ndarray
    difference: np.ndarray
    allowed: np.ndarray
    worst: tuple[int, int] | None
    worst_row: int | None
    implied: bool
    dropout_scaled: bool
    head_errors: np.ndarray
    closest_kv_heads: np.ndarray
    mismatch: ElementMismatch | None


# ---- the kernel's weights --------------------------------------------------------------------------------


def implied_weights(impl: Implementation, case: AttentionCase) -> np.ndarray:
    """The kernel's weights ``(*B, Hq, L, S)`` (float64) recovered from its out alone: out is linear
    in v (``out = P @ v``, P the weights times the dropout multiplier when the case has a dropout
    mask), so with v replaced by columns ``c Ev .. c Ev + Ev - 1`` of the ``S x S`` identity (each kv
    head; zero columns past S) out gives those columns of P. The calls keep the case's v shape, so a
    kernel that needs ``Ev == E`` works."""
    width = case.value_dim
    if width == 0:
        raise ValueError("no implied weights for a case with Ev = 0 (no value columns to read them from)")
    weights = np.zeros(case.logits_shape, dtype=np.float64)
    keys = case.kv_len
    dtype = case.v.dtype
    for start in range(0, keys, width):
        columns = min(width, keys - start)
        identity = np.zeros(case.v.shape, dtype=dtype)
        for e in range(columns):
            identity[..., start + e, e] = 1
        out = np.asarray(call(impl, case.replace(v=identity)).out, dtype=np.float64)
        weights[..., start:start + columns] = out[..., :columns]
    return weights


def kernel_weights(impl: Implementation, case: AttentionCase) -> tuple[np.ndarray, bool]:
    """``(weights, implied)``: the weights the kernel returns with ``return_weights=True``, or, when
    that raises or returns none, its implied weights (``implied_weights``) and True."""
    try:
        returned = call(impl, case, return_weights=True).weights
    except Exception:  # a kernel without weights may refuse the flag: its out still tells its weights
        returned = None
    if returned is not None:
        return np.asarray(returned, dtype=np.float64), False
    return implied_weights(impl, case), True


# ---- the data drawn ---------------------------------------------------------------------------------------


def _calibrated(impl: Implementation) -> bool:
    from .check import KernelImplementation

    return isinstance(impl, KernelImplementation)


def picture_data(impl: Implementation, error: BaseException) -> PictureData | None:
    """What ``failure_picture`` draws for the failure ``error`` (possibly a Hypothesis exception
    group) of a property run against ``impl``; None when there is no ``AttentionCase`` to draw (a
    layer case, a property without a case) or the case has no query or no key."""
    failure = first_failure(error)
    case = failing_case(failure)
    if not isinstance(case, AttentionCase) or case.q_len == 0 or case.kv_len == 0:
        return None
    mismatch = failure if isinstance(failure, ElementMismatch) else None
    oracle = case.oracle()
    weights, implied = kernel_weights(impl, case)
    reference = np.asarray(oracle.weights, dtype=np.float64)
    dropout_scaled = implied and case.dropout_mask is not None
    if dropout_scaled:
        reference = reference * case.dropout_multiplier()
    difference = weights - reference
    out = np.asarray(call(impl, case).out, dtype=np.float64)
    bound = np.broadcast_to(np.asarray(case.bounds(calibrated=_calibrated(impl)).out, dtype=np.float64), out.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        out_error = np.abs(out - oracle.out)
        ratio = np.where(out_error == 0, 0.0, out_error / np.where(bound > 0, bound, np.inf))
    ratio = np.nan_to_num(ratio, nan=np.inf, posinf=np.inf)
    lead = case.logits_shape[:-2]
    index: tuple[int, ...]
    if mismatch is not None and mismatch.actual.shape[:-2] == lead:
        index = tuple(mismatch.worst[:-2])
    elif np.abs(difference).max() > 0:
        index = tuple(int(i) for i in np.unravel_index(np.argmax(np.abs(difference).reshape(*lead, -1).max(-1)),
                                                       lead))
    else:
        index = tuple(int(i) for i in np.unravel_index(np.argmax(ratio.reshape(*lead, -1).max(-1)), lead))
    diff = difference[index]
    worst: tuple[int, int] | None = None
    worst_row: int | None = None
    compared = "" if mismatch is None else mismatch.what.rsplit(" ", 1)[-1]  # "causal rows: out" -> "out"
    if compared == "weights" and mismatch is not None and mismatch.actual.shape == case.logits_shape:
        worst = (mismatch.worst[-2], mismatch.worst[-1])
    elif np.abs(diff).max() > 0:  # an excluded key given weight first: the rule broken, not its consequence
        excluded = ~np.asarray(np.broadcast_to(case.allowed(), case.logits_shape)[index])
        ranked = np.where(excluded & (diff != 0), np.inf, np.abs(diff))
        worst = tuple(int(i) for i in np.unravel_index(np.argmax(ranked), diff.shape))  # type: ignore[assignment]
    if compared == "out" and mismatch is not None and mismatch.actual.shape == out.shape:
        worst_row = mismatch.worst[-2]
    batch = index[:-1] if case.has_head_axis else index
    head_errors = ratio[batch].reshape(case.num_q_heads, -1).max(-1) if case.has_head_axis else ratio.max(keepdims=True)
    return PictureData(case, index, weights[index], reference[index], diff,
                       np.asarray(np.broadcast_to(case.allowed(), case.logits_shape)[index]), worst, worst_row,
                       implied, dropout_scaled, np.asarray(head_errors, dtype=np.float64).reshape(-1),
                       _closest_kv_heads(case, weights, batch, dropout_scaled), mismatch)


def _closest_kv_heads(case: AttentionCase, weights: np.ndarray, batch: tuple[int, ...],
                      dropout_scaled: bool) -> np.ndarray:
    """``(Hq,)``: for each query head of the batch element ``batch``, the kv head g whose reference
    weights (every query head attending kv head g) are closest (largest difference) to ``weights``."""
    if not case.has_head_axis:
        return np.zeros(1, dtype=np.int64)
    distances = []
    for g in range(case.num_kv_heads):
        k, v = (np.repeat(x[..., g:g + 1, :, :], case.num_kv_heads, axis=-3) for x in (case.k, case.v))
        other = case.replace(k=k, v=v)
        reference = np.asarray(other.oracle().weights, dtype=np.float64)
        if dropout_scaled:
            reference = reference * other.dropout_multiplier()
        distances.append(np.abs(weights[batch] - reference[batch]).reshape(case.num_q_heads, -1).max(-1))
    return np.argmin(np.stack(distances), axis=0)


# ---- drawing ------------------------------------------------------------------------------------------------


def _options_text(case: AttentionCase) -> str:
    parts = []
    for key, value in case.scalar_keywords().items():
        if key in ("alignment",) and not (case.causal or case.window is not None):
            continue
        if value is None or value is False or (key == "dropout_p" and not value):
            continue
        parts.append(key if value is True else f"{key}={value}")
    parts += [name for name in ("mask", "bias", "dropout_mask") if getattr(case, name) is not None]
    return ", ".join(parts) or "no options"


def _worst_text(mismatch: ElementMismatch | None) -> str:
    if mismatch is None:
        return ""
    w = mismatch.worst_element()
    bound = "exactly" if w["bound"] is None else f"within {w['bound']:.3g}"
    return (f"worst: {w['array']}{tuple(w['index'])} got {w['got']:.6g}, expected {w['expected']:.6g} {bound} "
            f"({w['wrong']} of {w['size']} wrong)")


def _title(data: PictureData, title: str) -> str:
    case = data.case
    shape = (f"q {case.q.shape}, k {case.k.shape}, v {case.v.shape}, {case.dtype}; {_options_text(case)}")
    lines = [title, shape + _slice_text(data), _worst_text(data.mismatch)]
    return "\n".join(line for line in lines if line)


def _slice_text(data: PictureData) -> str:
    case = data.case
    if not case.has_head_axis:
        return ""
    *batch, head = data.index
    group = case.num_q_heads // case.num_kv_heads
    where = f"batch {tuple(batch)}, " if batch else ""
    return f"; drawn: {where}q head {head} (kv head {head // group})"


def _axes_ticks(ax: Any, rows: int, columns: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    for axis, size in ((ax.xaxis, columns), (ax.yaxis, rows)):
        if size <= SMALL_SIDE:
            axis.set_ticks(range(size))
        else:
            axis.set_major_locator(MaxNLocator(integer=True))
    if max(rows, columns) <= SMALL_SIDE:
        ax.set_xticks(np.arange(-0.5, columns), minor=True)
        ax.set_yticks(np.arange(-0.5, rows), minor=True)
        ax.grid(which="minor", color="white", linewidth=1.0)
        ax.tick_params(which="minor", length=0)


def _excluded_overlay(ax: Any, allowed: np.ndarray) -> None:
    """Hatch the excluded keys (one rectangle per run of a row) and outline the allowed region."""
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle

    rows, columns = allowed.shape
    for i in range(rows):
        j = 0
        while j < columns:
            if allowed[i, j]:
                j += 1
                continue
            start = j
            while j < columns and not allowed[i, j]:
                j += 1
            ax.add_patch(Rectangle((start - 0.5, i - 0.5), j - start, 1, fill=False, hatch="//", edgecolor="0.35",
                                   linewidth=0))
    padded = np.pad(allowed, 1, constant_values=False)
    segments = []
    vertical = padded[1:-1, 1:] != padded[1:-1, :-1]  # (L, S + 1): a border left of column j
    for i, j in zip(*np.nonzero(vertical), strict=True):
        segments.append([(j - 0.5, i - 0.5), (j - 0.5, i + 0.5)])
    horizontal = padded[1:, 1:-1] != padded[:-1, 1:-1]  # (L + 1, S): a border above row i
    for i, j in zip(*np.nonzero(horizontal), strict=True):
        segments.append([(j - 0.5, i - 0.5), (j + 0.5, i - 0.5)])
    if segments:
        large = max(rows, columns) > SMALL_SIDE
        ax.add_collection(LineCollection(segments, colors="0.2" if large else "black",
                                         linewidths=0.4 if large else 1.5))


def _finite_max(values: np.ndarray) -> float:
    """The largest finite value (0 when there is none)."""
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else 0.0


def _mark_non_finite(ax: Any, values: np.ndarray) -> None:
    """Every NaN or infinite cell filled black (never white, which means a weight of exactly 0),
    labelled NaN, inf or -inf where cells are labelled."""
    from matplotlib.patches import Rectangle

    for i, j in np.argwhere(~np.isfinite(values)):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="black", edgecolor="none"))


def _label_cells(ax: Any, values: np.ndarray, colour_limit: float) -> None:
    rows, columns = values.shape
    if max(rows, columns) > LABELLED_SIDE:
        return
    for i in range(rows):
        for j in range(columns):
            value = values[i, j]
            if not np.isfinite(value):
                ax.text(j, i, "NaN" if np.isnan(value) else f"{value:+}", ha="center", va="center", fontsize=7,
                        color="white", fontweight="bold")
                continue
            text = "0" if value == 0 else f"{value:.2f}" if abs(value) >= 0.005 else "~0"
            dark = abs(value) > 0.6 * colour_limit
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")


def _layout(rows: int, columns: int, heads: int) -> tuple[bool, tuple[float, float]]:
    """(stacked, figure size): panels one above the other for wide cases, side by side otherwise."""
    stacked = columns >= 3 * rows and columns > SMALL_SIDE
    if stacked:
        panel_h = min(3.0, max(0.9, 8.0 * rows / columns))
        return True, (10.0, 3 * panel_h + 2.6 + (1.6 if heads > 1 else 0))
    side = 3.6
    panel_h = min(side, max(1.4, side * rows / columns))
    return False, (3 * side + (2.6 if heads > 1 else 0) + 1.2, panel_h + 2.4)


def failure_picture(impl: Implementation, error: BaseException, path: str | pathlib.Path, *,
                    title: str = "") -> pathlib.Path | None:
    """Write a PNG of the failure ``error`` of a property (named in ``title``) run against ``impl``
    to ``path``: the kernel's weights (returned or implied) beside the reference's, and their
    difference centred at 0 with the excluded keys hatched, the allowed region outlined and the worst
    element marked (a box; for an out comparison, the worst query row bracketed), for the ``(*B,
    Hq)`` slice holding the worst element; with several query heads, each head's out error over its
    bound. Returns the path, or None (nothing written) when ``picture_data`` has nothing to draw."""
    data = picture_data(impl, error)
    if data is None:
        return None
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize, SymLogNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    rows, columns = data.kernel.shape
    heads = data.head_errors.size
    stacked, size = _layout(rows, columns, heads)
    figure = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    if stacked:
        grid = figure.add_gridspec(4 if heads > 1 else 3, 1, height_ratios=[1, 1, 1, 0.8][:4 if heads > 1 else 3])
        places = [grid[0, 0], grid[1, 0], grid[2, 0]]
        head_place = grid[3, 0] if heads > 1 else None
    else:
        grid = figure.add_gridspec(1, 4 if heads > 1 else 3, width_ratios=[1, 1, 1, 0.7][:4 if heads > 1 else 3])
        places = [grid[0, 0], grid[0, 1], grid[0, 2]]
        head_place = grid[0, 3] if heads > 1 else None
    aspect: Literal["equal", "auto"] = "equal" if not stacked and 0.25 <= rows / columns <= 4 else "auto"
    top = max(_finite_max(data.kernel), _finite_max(data.reference), 1e-12)
    kind = "implied weights\n(from its out, v = identity columns)" if data.implied else "returned weights"
    scaled = "\n(times dropout keep / (1 - p))" if data.dropout_scaled else ""
    panels = [(f"kernel: {kind}{scaled}", data.kernel), (f"reference: float64 oracle weights{scaled}", data.reference)]
    bar_style: dict[str, Any] = dict(fraction=0.03, pad=0.01, aspect=8) if stacked else dict(shrink=0.8)
    colours = colormaps["viridis"].with_extremes(bad="white")  # weight exactly 0: white
    for place, (name, values) in zip(places[:2], panels, strict=True):
        ax = figure.add_subplot(place)
        image = ax.imshow(np.ma.masked_equal(values, 0.0), cmap=colours, vmin=0.0, vmax=top, aspect=aspect,
                          interpolation="nearest")
        _excluded_overlay(ax, data.allowed)
        _mark_non_finite(ax, values)
        _label_cells(ax, values, top)
        _axes_ticks(ax, rows, columns)
        ax.set_title(name + "\nwhite: weight exactly 0" + ("; black: NaN or inf" if not np.isfinite(values).all()
                                                             else ""), fontsize=9)
        figure.colorbar(image, ax=ax, **bar_style)
    ax = figure.add_subplot(places[2])
    limit = max(_finite_max(np.abs(data.difference)), 1e-12)
    # Large cases: a symmetric log scale, so that small differences far from the largest still show.
    norm = (SymLogNorm(limit * 1e-3, vmin=-limit, vmax=limit) if max(rows, columns) > SMALL_SIDE
            else Normalize(-limit, limit))
    image = ax.imshow(data.difference, cmap="RdBu_r", norm=norm, aspect=aspect, interpolation="nearest")
    _excluded_overlay(ax, data.allowed)
    _mark_non_finite(ax, data.difference)
    _label_cells(ax, data.difference, limit)
    _axes_ticks(ax, rows, columns)
    marks = []
    if data.worst is not None:
        i, j = data.worst
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="magenta", linewidth=2.5))
        marks.append(f"box: ({i}, {j}) {data.difference[i, j]:+.3g}")
    if data.worst_row is not None:
        ax.add_patch(Rectangle((-0.5, data.worst_row - 0.5), columns, 1, fill=False, edgecolor="orange",
                               linewidth=2.0, linestyle="--"))
        marks.append(f"dashed: worst out row {data.worst_row}")
    scale = " (symlog)" if max(rows, columns) > SMALL_SIDE else ""
    ax.set_title(f"kernel - reference{scale} (red +, blue -)\nhatched: excluded keys; outlined: allowed"
                 + ("\n" + "; ".join(marks) if marks else ""), fontsize=9)
    bar = figure.colorbar(image, ax=ax, format="%.2g", **bar_style)
    if isinstance(norm, SymLogNorm):
        bar.set_ticks([-limit, -limit * 1e-2, 0.0, limit * 1e-2, limit])
        bar.ax.tick_params(labelsize=7)
    if head_place is not None:
        _head_panel(figure.add_subplot(head_place), data, stacked)
    figure.suptitle(_title(data, title), fontsize=10)
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png")
    return target


def _head_panel(ax: Any, data: PictureData, stacked: bool) -> None:
    """Each query head's largest out error over its bound (log scale; 1 is the bound)."""
    case = data.case
    group = case.num_q_heads // case.num_kv_heads
    errors = np.clip(data.head_errors, 1e-3, 1e12)
    head = data.index[-1]
    colours = ["crimson" if e > 1 else "seagreen" for e in data.head_errors]
    labels = [f"q{h} (kv{h // group})" + (f"\nacts as kv{c}" if c != h // group else "")
              for h, c in enumerate(data.closest_kv_heads)]
    if stacked:
        ax.bar(range(errors.size), errors, color=colours)
        ax.set_xticks(range(errors.size), labels, fontsize=7, rotation=90 if errors.size > 8 else 0)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_ylabel("out error / bound")
    else:
        ax.barh(range(errors.size), errors, color=colours)
        ax.set_yticks(range(errors.size), labels, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("out error / bound")
    ax.set_title(f"out error / bound\nper q head (its kv head)\ndrawn: q{head}", fontsize=9)


# ---- the crosscheck's matrix ---------------------------------------------------------------------------------

#: The colour of each kind of matrix cell.
CELL_COLOURS = {"pass": "#7bc47f", "FAIL": "#e0524d", "ERROR": "#f0a030", "differs": "#8fb4e3",
                "n/a": "#dddddd", "-": "#ffffff"}
CELL_LEGEND = {"pass": "pass", "FAIL": "FAIL", "ERROR": "ERROR (could not run)",
               "differs": "differs (declared convention, verified)", "n/a": "n/a (feature missing)",
               "-": "- (not run)"}


def cell_kind(text: str) -> str:
    """The kind of a matrix cell (a key of ``CELL_COLOURS``) from its text: ``differs [1,2]`` is
    "differs"; anything unknown raises ValueError."""
    kind = "differs" if text.startswith("differs") else text
    if kind not in CELL_COLOURS:
        raise ValueError(f"unknown matrix cell {text!r}; expected one of {', '.join(CELL_COLOURS)}")
    return kind


def matrix_picture(rows: Sequence[str], columns: Sequence[str], cells: Sequence[Sequence[str]],
                   path: str | pathlib.Path, *, title: str = "") -> pathlib.Path:
    """Write a PNG of the crosscheck's matrix to ``path``: ``rows`` the property names, ``columns``
    the target names, ``cells[i][j]`` the cell as the crosscheck prints it (``pass``, ``FAIL``,
    ``ERROR``, ``n/a``, ``-`` or ``differs [n,...]``), coloured by kind with a legend. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if len(cells) != len(rows) or any(len(row) != len(columns) for row in cells):
        raise ValueError(f"cells must be {len(rows)} rows of {len(columns)} cells")
    kinds = [[cell_kind(text) for text in row] for row in cells]
    colours = np.array([[to_rgb(CELL_COLOURS[kind]) for kind in row] for row in kinds]).reshape(
        len(rows), len(columns), 3)
    name_width = max((len(name) for name in rows), default=4)
    width = 1.0 + 0.075 * name_width + 1.1 * max(len(columns), 1)
    height = 1.8 + 0.24 * max(len(rows), 1) + 0.012 * max((len(c) for c in columns), default=0) * 8
    figure = Figure(figsize=(max(width, 6.0), height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    if rows and columns:
        ax.imshow(colours, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(columns)), list(columns), rotation=35, ha="left", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
    ax.xaxis.tick_top()
    ax.set_xticks(np.arange(-0.5, len(columns)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    for i, row in enumerate(cells):
        for j, text in enumerate(row):
            ax.text(j, i, text, ha="center", va="center", fontsize=7,
                    fontweight="bold" if kinds[i][j] in ("FAIL", "ERROR") else "normal")
    present = [kind for kind in CELL_COLOURS if any(kind in row for row in kinds)] or list(CELL_COLOURS)
    ax.legend(handles=[Patch(facecolor=CELL_COLOURS[k], edgecolor="0.5", label=CELL_LEGEND[k]) for k in present],
              loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=min(len(present), 3), fontsize=8, frameon=False)
    if title:
        figure.suptitle(title, fontsize=10)
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, format="png")
    return target


__all__ = ["PictureData", "cell_kind", "failure_picture", "implied_weights", "kernel_weights", "matrix_picture",
           "picture_data"]
