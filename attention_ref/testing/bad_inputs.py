"""The catalogue of bad inputs (SPEC.md rule 12) and the check that an implementation rejects them.

Each entry is a call that the front door must refuse, the exception type it must raise, and words
its message must contain (the argument and the shapes involved).

PYTEST_DONT_REWRITE: pytest rewrites the asserts of a plugin's distribution (the ``pytest11``
entry point makes this package one); this module's assertion messages are reported as written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..plan import AttentionOptions
from ..validation import validate_attention_args, validate_vjp_args
from .runner import CheckerError

if TYPE_CHECKING:
    from .implementation import Implementation


def _array(*shape: int, dtype: str = "float32") -> np.ndarray:
    return np.ones(shape, dtype=dtype)


@dataclass(frozen=True)
class BadInput:
    name: str
    error: type[Exception]
    mentions: tuple[str, ...]
    q: Any = field(default_factory=lambda: _array(3, 8))
    k: Any = field(default_factory=lambda: _array(5, 8))
    v: Any = field(default_factory=lambda: _array(5, 4))
    kwargs: dict[str, Any] = field(default_factory=dict)


BAD_INPUTS: tuple[BadInput, ...] = (
    BadInput("q of rank 1", ValueError, ("q", "rank", "(4,)"), _array(4), _array(4), _array(4)),
    BadInput("ranks differ", ValueError, ("rank", "(2, 3, 4)", "(3, 4)"),
             _array(2, 3, 4), _array(3, 4), _array(3, 4)),
    BadInput("batch dims differ", ValueError, ("batch dims", "(2, 1, 3, 4)", "(3, 1, 5, 4)"),
             _array(2, 1, 3, 4), _array(3, 1, 5, 4), _array(3, 1, 5, 4)),
    BadInput("k and v heads differ", ValueError, ("Hkv", "(2, 5, 8)", "(1, 5, 8)"),
             _array(4, 3, 8), _array(2, 5, 8), _array(1, 5, 8)),
    BadInput("query heads not a multiple of kv heads", ValueError, ("Hq=3", "Hkv=2", "(3, 3, 8)"),
             _array(3, 3, 8), _array(2, 5, 8), _array(2, 5, 8)),
    BadInput("no kv heads", ValueError, ("at least one head", "(0, 5, 8)"),
             _array(2, 3, 8), _array(0, 5, 8), _array(0, 5, 8)),
    BadInput("k and v key counts differ", ValueError, ("keys S", "(5, 8)", "(6, 4)"),
             _array(3, 8), _array(5, 8), _array(6, 4)),
    BadInput("q and k head dims differ", ValueError, ("head dim E", "(3, 8)", "(5, 7)"),
             _array(3, 8), _array(5, 7), _array(5, 7)),
    BadInput("empty head dim", ValueError, ("head dim E", "(3, 0)"), _array(3, 0), _array(5, 0), _array(5, 4)),
    BadInput("integer q", TypeError, ("q", "int32"), _array(3, 8, dtype="int32"), _array(5, 8, dtype="int32"),
             _array(5, 4, dtype="int32")),
    BadInput("dtypes differ", TypeError, ("q float32", "k float64", "v float32"), k=_array(5, 8, dtype="float64")),
    BadInput("float mask", TypeError, ("mask", "float32", "bias"), kwargs=dict(mask=_array(3, 5))),
    BadInput("mask not broadcastable", ValueError, ("mask", "(4, 5)", "(3, 5)"),
             kwargs=dict(mask=np.ones((4, 5), dtype=bool))),
    BadInput("boolean bias", TypeError, ("bias", "bool", "mask"), kwargs=dict(bias=np.ones((3, 5), dtype=bool))),
    BadInput("bias not broadcastable", ValueError, ("bias", "(2, 3, 5)", "(3, 5)"), kwargs=dict(bias=_array(2, 3, 5))),
    BadInput("zero softcap", ValueError, ("softcap", "0.0"), kwargs=dict(softcap=0.0)),
    BadInput("negative softcap", ValueError, ("softcap", "-1.0"), kwargs=dict(softcap=-1.0)),
    BadInput("NaN softcap", ValueError, ("softcap", "nan"), kwargs=dict(softcap=float("nan"))),
    BadInput("string scale", TypeError, ("scale", "'0.5'"), kwargs=dict(scale="0.5")),
    BadInput("bool scale", TypeError, ("scale", "True"), kwargs=dict(scale=True)),
    BadInput("infinite scale", ValueError, ("scale", "inf"), kwargs=dict(scale=float("inf"))),
    BadInput("unknown alignment", ValueError, ("alignment", "'lower_right'"), kwargs=dict(alignment="lower_right")),
    BadInput("non-bool causal", TypeError, ("causal", "1"), kwargs=dict(causal=1)),
    BadInput("non-bool return_weights", TypeError, ("return_weights", "'yes'"), kwargs=dict(return_weights="yes")),
    BadInput("half-precision compute dtype", ValueError, ("compute_dtype", "'float16'"),
             kwargs=dict(compute_dtype="float16")),
    BadInput("float64 computed in float32", ValueError, ("compute_dtype='float32'", "float64"),
             _array(3, 8, dtype="float64"), _array(5, 8, dtype="float64"), _array(5, 4, dtype="float64"),
             kwargs=dict(compute_dtype="float32")),
    BadInput("q not an array", TypeError, ("q", "list"), q=[[1.0] * 8] * 3),
    BadInput("k not an array", TypeError, ("k", "list"), k=[[1.0] * 8] * 5),
    BadInput("mask not an array", TypeError, ("mask", "list"), kwargs=dict(mask=[[True] * 5] * 3)),
    BadInput("integer bias", TypeError, ("bias", "int32"), kwargs=dict(bias=np.ones((3, 5), dtype="int32"))),
    BadInput("float64 bias with float32 compute", TypeError, ("bias is float64", "float32"),
             kwargs=dict(bias=_array(3, 5, dtype="float64"))),
    BadInput("string softcap", TypeError, ("softcap", "'1'"), kwargs=dict(softcap="1")),
    BadInput("NaN scale", ValueError, ("scale", "nan"), kwargs=dict(scale=float("nan"))),
    BadInput("huge integer scale", ValueError, ("scale", "must be finite"), kwargs=dict(scale=10**400)),
    BadInput("scale overflowing float32", ValueError, ("scale=1e+300", "float32"), kwargs=dict(scale=1e300)),
    BadInput("softcap underflowing float32", ValueError, ("softcap=1e-300", "float32"), kwargs=dict(softcap=1e-300)),
    BadInput("non-bool return_lse", TypeError, ("return_lse", "1"), kwargs=dict(return_lse=1)),
    BadInput("framework-prefixed compute dtype string", ValueError, ("compute_dtype", "'torch.float64'"),
             kwargs=dict(compute_dtype="torch.float64")),
    BadInput("window not a pair", TypeError, ("window", "3"), kwargs=dict(window=3)),
    BadInput("negative window side", ValueError, ("window left", "-1", "None"), kwargs=dict(window=(-1, 0))),
    BadInput("float window side", TypeError, ("window right", "1.5"), kwargs=dict(window=(2, 1.5))),
    BadInput("dropout without a mask", ValueError, ("dropout_p=0.1", "dropout_mask", "dropout_mask(shape, p, seed)"),
             kwargs=dict(dropout_p=0.1)),
    BadInput("string dropout_p", TypeError, ("dropout_p", "'0.1'"), kwargs=dict(dropout_p="0.1")),
    BadInput("dropout_p of 1", ValueError, ("dropout_p", "[0, 1)", "1.0"),
             kwargs=dict(dropout_p=1.0, dropout_mask=np.ones((3, 5), dtype=bool))),
    BadInput("float dropout mask", TypeError, ("dropout_mask", "float32", "True = keep"),
             kwargs=dict(dropout_p=0.5, dropout_mask=_array(3, 5))),
    BadInput("dropout mask not broadcastable", ValueError, ("dropout_mask", "(4, 5)", "(3, 5)"),
             kwargs=dict(dropout_p=0.5, dropout_mask=np.ones((4, 5), dtype=bool))),
    BadInput("zero block_q", ValueError, ("block_q", "positive int", "0"), kwargs=dict(block_q=0)),
    BadInput("float block_k", TypeError, ("block_k", "positive int", "1.5"), kwargs=dict(block_k=1.5)),
    BadInput("bool block_q", TypeError, ("block_q", "True"), kwargs=dict(block_q=True)),
    BadInput("non-bool dense", TypeError, ("dense", "1"), kwargs=dict(dense=1)),
    BadInput("a tile with dense", ValueError, ("block_k", "dense=True"), kwargs=dict(block_k=2, dense=True)),
    BadInput("a tile with the weights", ValueError, ("block_q", "return_weights=True"),
             kwargs=dict(block_q=2, return_weights=True)),
)

#: Bad cotangents of ``attention_vjp`` (q (3, 8), k (5, 8), v (5, 4): out (3, 4)).
BAD_D_OUT: tuple[tuple[str, Any, type[Exception], tuple[str, ...]], ...] = (
    ("d_out of the wrong shape", _array(3, 8), ValueError, ("d_out", "(3, 4)", "(3, 8)")),
    ("d_out of another dtype", _array(3, 4, dtype="float64"), TypeError, ("d_out", "float32", "float64")),
    ("d_out not an array", [[1.0] * 4] * 3, TypeError, ("d_out", "list")),
)


def _raised(call: Callable[[], Any]) -> BaseException | None:
    """The exception ``call()`` raises, or None."""
    try:
        call()
    except Exception as error:  # the error is the result
        return error
    return None


def front_door_error(bad: BadInput) -> BaseException | None:
    """What the shared front door raises for this input (NumPy arrays, no backend)."""
    flags = {name: value for name, value in bad.kwargs.items() if name in _CALL_FLAGS}
    options = {name: value for name, value in bad.kwargs.items() if name not in _CALL_FLAGS}
    return _raised(lambda: validate_attention_args(bad.q, bad.k, bad.v, AttentionOptions(**options), **flags))


#: The keywords of ``attention`` that are not options (``AttentionOptions``).
_CALL_FLAGS = ("return_weights", "return_lse", "compute_dtype", "block_q", "block_k", "dense")


def check_bad_inputs(impl: Implementation, *, vjp: bool = True) -> None:
    """Every catalogued bad input raises, through ``impl``, the catalogued type with the front door's
    message, which names the argument and shapes; with ``vjp``, so does every bad cotangent of
    ``impl.attention_vjp``."""
    __tracebackhide__ = True
    for bad in BAD_INPUTS:
        _check_bad_input(impl, bad)
    if vjp:
        for name, d_out, error_type, mentions in BAD_D_OUT:
            _check_bad_cotangent(impl, name, d_out, error_type, mentions)


def _converter(impl: Implementation) -> Callable[[Any], Any]:
    """NumPy arrays to ``impl``'s arrays; anything else unchanged."""
    return lambda x: impl.asarray(x) if isinstance(x, np.ndarray) else x


def _check_bad_input(impl: Implementation, bad: BadInput) -> None:
    __tracebackhide__ = True
    convert = _converter(impl)
    kwargs = {name: convert(value) for name, value in bad.kwargs.items()}
    error = _raised(lambda: impl.attention(convert(bad.q), convert(bad.k), convert(bad.v), **kwargs))
    expected = front_door_error(bad)
    if type(expected) is not bad.error:
        raise CheckerError(f"{bad.name}: the front door raises {expected!r}, the catalogue says {bad.error.__name__}")
    assert type(error) is bad.error, f"{bad.name}: raised {error!r}, expected {bad.error.__name__} ({expected!r})"
    assert str(error) == str(expected), f"{bad.name}: message {str(error)!r} differs from {str(expected)!r}"
    missing = [word for word in bad.mentions if word not in str(error)]
    assert not missing, f"{bad.name}: message {str(error)!r} does not mention {missing}"


def _check_bad_cotangent(impl: Implementation, name: str, d_out: Any, error_type: type[Exception],
                         mentions: tuple[str, ...]) -> None:
    __tracebackhide__ = True
    q, k, v = (impl.asarray(_array(*shape)) for shape in ((3, 8), (5, 8), (5, 4)))
    converted = _converter(impl)(d_out)
    error = _raised(lambda: impl.attention_vjp(q, k, v, converted))
    expected = _raised(lambda: validate_vjp_args(_array(3, 8), _array(5, 8), _array(5, 4), d_out))
    if type(expected) is not error_type:
        raise CheckerError(f"{name}: the front door raises {expected!r}, the catalogue says {error_type.__name__}")
    assert type(error) is error_type, f"{name}: raised {error!r}, expected {error_type.__name__} ({expected!r})"
    assert str(error) == str(expected), f"{name}: message {str(error)!r} differs from {str(expected)!r}"
    missing = [word for word in mentions if word not in str(error)]
    assert not missing, f"{name}: message {str(error)!r} does not mention {missing}"
