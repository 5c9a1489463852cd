"""Pictures of a failure's case (attention_ref.testing.pictures): the implied weights of a kernel that
returns only out are its weights, the data drawn for planted bugs of the zoo shows each bug, and the
pictures and the crosscheck matrix are written as PNG files."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pytest

from attention_ref.registry import get_backend
from attention_ref.testing.cases import AttentionCase
from attention_ref.testing.check import KernelImplementation
from attention_ref.testing.implementation import Subject
from attention_ref.testing.runner import get_property, run_property
from attention_ref.testing.strategies import Features

from .conftest import import_or_skip

pytest.importorskip("matplotlib")  # the optional plot extra

from attention_ref.testing.pictures import (
    failure_picture,
    implied_weights,
    kernel_weights,
    matrix_picture,
    picture_data,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def numpy_kernel(q: Any, k: Any, v: Any, **keywords: Any) -> Any:
    """A correct kernel that returns only out (whatever return flags it is given)."""
    keywords = {name: value for name, value in keywords.items() if not name.startswith("return_")}
    return get_backend("numpy").attention(q, k, v, **keywords)


def square_value_kernel(q: Any, k: Any, v: Any, **keywords: Any) -> Any:
    """A correct out-only kernel that refuses Ev != E, as some fused kernels do."""
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(f"Ev must equal E, got {v.shape[-1]} and {q.shape[-1]}")
    return numpy_kernel(q, k, v, **keywords)


def random_case(q_heads: int, kv_heads: int, queries: int, keys: int, head_dim: int = 4, value_dim: int = 4,
                seed: int = 0, **options: Any) -> AttentionCase:
    rng = np.random.default_rng(seed)
    shapes = ((2, q_heads, queries, head_dim), (2, kv_heads, keys, head_dim), (2, kv_heads, keys, value_dim))
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in shapes)
    return AttentionCase(q, k, v, **options)


def identity_bounds(case: AttentionCase) -> np.ndarray:
    """The float32 bound on each implied weight: the bound on out of the case whose v is the identity
    columns that weight is read from (out of that case is those columns of the weights)."""
    bound = np.zeros(case.logits_shape)
    width = case.value_dim
    for start in range(0, case.kv_len, width):
        columns = min(width, case.kv_len - start)
        v = np.zeros(case.v.shape, np.float32)
        v[..., np.arange(start, start + columns), np.arange(columns)] = 1
        out_bound = np.broadcast_to(case.replace(v=v).bounds(calibrated=True).out, (*case.logits_shape[:-1], width))
        bound[..., start:start + columns] = out_bound[..., :columns]
    return bound


IMPLIED_CASES = {
    "causal, Ev < E, S not a multiple of Ev": (numpy_kernel, random_case(2, 2, 5, 7, value_dim=3, causal=True)),
    "Ev == E required": (square_value_kernel, random_case(2, 2, 6, 9, causal=True)),
    "gqa, bottom_right window": (numpy_kernel, random_case(4, 2, 3, 8, value_dim=2, causal=True,
                                                           alignment="bottom_right", window=(3, 0))),
    "dropout": (numpy_kernel, random_case(2, 1, 4, 6, dropout_p=0.5,
                                          dropout_mask=np.random.default_rng(1).random((2, 2, 4, 6)) < 0.5)),
}


@pytest.mark.parametrize("name", list(IMPLIED_CASES))
def test_implied_weights_of_a_correct_kernel_are_the_oracle_weights(name: str) -> None:
    fn, case = IMPLIED_CASES[name]
    features = Features(frozenset({"causal", "bottom_right", "window", "gqa", "value_dim", "dropout"}), ("float32",))
    impl = KernelImplementation(fn, framework="numpy", features=features)
    weights, implied = kernel_weights(impl, case)
    assert implied
    expected = np.asarray(case.oracle().weights) * case.dropout_multiplier()
    error = np.abs(weights - expected)
    bound = identity_bounds(case)
    assert (error <= bound).all(), f"worst {error.max()} over bound {bound.flat[np.argmax(error - bound)]}"
    assert (weights[~np.broadcast_to(case.allowed(), case.logits_shape)] == 0).all()
    np.testing.assert_array_equal(implied_weights(impl, case), weights)


def test_returned_weights_are_used_when_the_kernel_returns_them() -> None:
    case = random_case(2, 2, 3, 5, causal=True)
    weights, implied = kernel_weights(get_backend("numpy"), case)
    assert not implied
    np.testing.assert_allclose(weights, case.oracle().weights, atol=1e-6)


# ---- the zoo's bugs ------------------------------------------------------------------------------------


def zoo_implementation(name: str) -> tuple[KernelImplementation, Features, Any]:
    import_or_skip("torch")
    from .zoo import BUGS_BY_NAME

    bug = BUGS_BY_NAME[name]
    features = Features(frozenset(bug.supports), ("float32",))
    return KernelImplementation(bug.kernel, framework="torch", features=features, name=name), features, bug


def shrunk_error(name: str) -> tuple[KernelImplementation, BaseException]:
    """The bug's property run with Hypothesis as ``check`` runs it (seed 0, shrunk), and its error."""
    from hypothesis import HealthCheck, Phase
    from hypothesis import settings as Settings

    impl, features, bug = zoo_implementation(name)
    settings = Settings(max_examples=100, deadline=None, database=None,
                        phases=[phase for phase in Phase if phase != Phase.explain],
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    with pytest.raises(Exception) as caught:
        run_property(get_property(bug.catches), impl, settings, seed=0, features=features, calibrated=True)
    return impl, caught.value


def error_on(name: str, example: Any) -> tuple[KernelImplementation, BaseException]:
    """The bug's property checked on one example of our choosing, and its assertion."""
    impl, features, bug = zoo_implementation(name)
    with pytest.raises(AssertionError) as caught:
        get_property(bug.catches).check(Subject(impl, features, True), example)
    return impl, caught.value


def assert_png(path: pathlib.Path | None) -> None:
    from matplotlib.image import imread

    assert path is not None and path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = imread(path).shape[:2]
    assert 200 <= height <= 2000 and 400 <= width <= 2500, (height, width)
    assert path.stat().st_size < 300_000


@pytest.mark.parametrize("name", ["causal_one_key_too_many", "bottom_right_as_top_left", "gqa_tile_order"])
def test_failure_picture_of_a_shrunk_failure(name: str, tmp_path: pathlib.Path) -> None:
    impl, error = shrunk_error(name)
    path = failure_picture(impl, error, tmp_path / "pictures" / f"{name}.png", title=name)
    assert path == tmp_path / "pictures" / f"{name}.png"
    assert_png(path)


def test_no_picture_without_a_case(tmp_path: pathlib.Path) -> None:
    impl = KernelImplementation(numpy_kernel, framework="numpy", features=Features(frozenset(), ("float32",)))
    for error in (AssertionError("no case here"), ValueError("nor here"), ExceptionGroup("both", [KeyError("x")])):
        assert failure_picture(impl, error, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_causal_off_by_one_shows_one_extra_key_next_to_the_diagonal() -> None:
    case = random_case(1, 1, 8, 8, causal=True)
    impl, error = error_on("causal_one_key_too_many", (case, 3))
    data = picture_data(impl, error)
    assert data is not None and data.implied
    i, j = np.indices((8, 8))
    np.testing.assert_array_equal(data.allowed, j <= i)
    extra_key = j == i + 1
    # Outside the causal pattern, the kernel gives weight exactly to the one future key of each row.
    np.testing.assert_array_equal((data.difference != 0) & ~data.allowed, extra_key)
    assert (data.difference[extra_key] > 0).all() and (data.reference[extra_key] == 0).all()
    assert data.worst is not None and extra_key[data.worst]


def test_wrong_alignment_shows_the_top_left_triangle() -> None:
    case = random_case(1, 1, 4, 10, causal=True, alignment="bottom_right")
    impl, error = error_on("bottom_right_as_top_left", case)
    data = picture_data(impl, error)
    assert data is not None
    i, j = np.indices((4, 10))
    np.testing.assert_array_equal(data.allowed, j <= i + 6)
    np.testing.assert_array_equal(data.kernel != 0, j <= i)  # the kernel attends top-left
    assert data.worst_row is not None


def test_gqa_tile_order_shows_which_kv_head_each_query_head_uses() -> None:
    case = random_case(4, 2, 5, 5)
    impl, error = error_on("gqa_tile_order", case)
    data = picture_data(impl, error)
    assert data is not None
    np.testing.assert_array_equal(data.closest_kv_heads, [0, 1, 0, 1])  # h % Hkv, not h // 2
    assert data.index[-1] in (1, 2)  # a query head the bug changes
    assert (data.head_errors[[1, 2]] > 1).all() and (data.head_errors[[0, 3]] <= 1).all()


# ---- the crosscheck matrix ------------------------------------------------------------------------------


def test_matrix_picture(tmp_path: pathlib.Path) -> None:
    rows = ["matches_float64_oracle", "causal_equals_explicit_mask", "fully_excluded_rows_are_zero"]
    columns = ["torch.sdpa", "jax.nn.dot_product_attention"]
    cells = [["pass", "FAIL"], ["n/a", "ERROR"], ["differs [1,2]", "-"]]
    assert_png(matrix_picture(rows, columns, cells, tmp_path / "matrix.png", title="crosscheck"))
    with pytest.raises(ValueError, match="unknown matrix cell"):
        matrix_picture(rows, columns, [["pass", "maybe"], *cells[1:]], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="rows of"):
        matrix_picture(rows, columns, cells[:2], tmp_path / "bad.png")


def test_nan_cells_are_black_and_labelled_never_white() -> None:
    """White means a weight of exactly 0: a NaN or infinite weight or difference is a black cell with its
    value written in it, and the colour scales ignore it."""
    from matplotlib.figure import Figure

    from attention_ref.testing import pictures

    values = np.array([[0.0, np.nan], [np.inf, 0.25]])
    ax = Figure().add_subplot()
    pictures._mark_non_finite(ax, values)
    pictures._label_cells(ax, values, 1.0)
    black = [p for p in ax.patches if p.get_facecolor()[:3] == (0.0, 0.0, 0.0)]
    assert sorted((p.get_x() + 0.5, p.get_y() + 0.5) for p in black) == [(0.0, 1.0), (1.0, 0.0)]
    assert {t.get_text() for t in ax.texts} == {"0", "NaN", "+inf", "0.25"}
    assert pictures._finite_max(values) == 0.25
