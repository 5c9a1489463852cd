"""Backends by name: aliases, errors, registration and entry points."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np
import pytest

import attention_ref as ar
from attention_ref import registry
from attention_ref.backends.numpy import NumpyBackend
from attention_ref.result import AttentionOutput
from attention_ref.testing import AttentionCase, assert_attention_close, call


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    for name in list(registry._registered):
        registry._registered.pop(name)
        registry._instances.pop(name, None)


def test_aliases_give_the_same_backend() -> None:
    assert ar.get_backend("np") is ar.get_backend("numpy")
    assert ar.get_backend("numpy").name == "numpy"


def test_aliases_for_installed_frameworks(backend: object) -> None:
    alias = {"numpy": "np", "torch": "pytorch", "jax": "jax"}[backend.name]
    assert ar.get_backend(alias) is backend
    assert backend.name in ar.available_backends()


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'tensorflow'; known backends: numpy, jax, torch"):
        ar.get_backend("tensorflow")


def test_missing_framework_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jax" else real_find_spec(name, *a))
    monkeypatch.delitem(registry._instances, "jax", raising=False)
    with pytest.raises(ar.BackendNotAvailableError, match=r"pip install 'attention_ref\[jax\]'") as info:
        ar.get_backend("jax")
    assert isinstance(info.value, ImportError)
    assert "jax" not in ar.available_backends()


class ShiftedNumpy(NumpyBackend):
    """A registered third-party backend (here: the NumPy one under another name)."""

    name = "shifted"


def test_register_backend() -> None:
    ar.register_backend("shifted", ShiftedNumpy)
    backend = ar.get_backend("shifted")
    assert isinstance(backend, ShiftedNumpy) and "shifted" in ar.known_backends()
    q = np.ones((2, 3))
    np.testing.assert_array_equal(ar.attention(q, q, q, backend="shifted"), q)


def test_a_backend_is_a_backend() -> None:
    """Backends subclass attention_ref.Backend: anything else is refused with a TypeError saying so."""
    ar.register_backend("not_a_backend", object)  # type: ignore[arg-type]
    try:
        with pytest.raises(TypeError, match="not an attention_ref.Backend"):
            ar.get_backend("not_a_backend")
    finally:
        registry._registered.pop("not_a_backend")
    q = np.ones((2, 3))
    with pytest.raises(TypeError, match="backend must be a name, an attention_ref.Backend or None"):
        ar.attention(q, q, q, backend=object())  # type: ignore[call-overload]


def test_builtin_names_cannot_be_replaced() -> None:
    with pytest.raises(ValueError, match="built-in"):
        ar.register_backend("numpy", ShiftedNumpy)


def test_entry_point_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    entry_point = importlib.metadata.EntryPoint(
        name="from_entry_point", value="tests.test_registry:ShiftedNumpy", group=registry.ENTRY_POINT_GROUP)
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [entry_point] if kw.get("group") == registry.ENTRY_POINT_GROUP else real(**kw))
    assert "from_entry_point" in ar.known_backends()
    assert "from_entry_point" in ar.available_backends()
    assert isinstance(ar.get_backend("from_entry_point"), ShiftedNumpy)
    registry._instances.pop("from_entry_point")


def test_attention_infers_the_backend(backend: object) -> None:
    case = AttentionCase(np.eye(3, 4), np.eye(3, 4), np.eye(3, 4), causal=True)
    q = backend.asarray(case.q)
    out = ar.attention(q, q, q, causal=True)
    assert type(out) is type(q)
    others = call(backend, case, return_weights=True, return_lse=True)
    assert_attention_close(AttentionOutput(backend.to_numpy(out), others.weights, others.lse), case, calibrated=False)


def test_attention_needs_an_array() -> None:
    with pytest.raises(TypeError, match="q must be an array"):
        ar.attention([[1.0]], [[1.0]], [[1.0]])
