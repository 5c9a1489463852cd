"""What ``attention-ref check`` accepts as a kernel, and how each kind is called.

``load_target("MODULE:NAME")`` imports the module with the current directory first on ``sys.path``
(as ``python -m`` has it) and returns the object; ``as_kernel(target, framework)`` turns it into the
function the checker calls, ``kernel(q, k, v, **keywords)`` (q, k, v positional, so their names are
the kernel's own):

* a function (any callable that is not one of the kinds below): called as it is;
* a class: instantiated with no arguments, then taken as the instance (so ``mymod:Attention`` and
  ``mymod:attention = Attention()`` are the same target);
* a torch ``nn.Module`` (framework torch): called in eval mode, as ``module.eval()`` would put it
  (dropout layers off, batch norms on running statistics); the training flag of each submodule is
  restored after every call, so the module given is left as it was;
* a flax ``nnx.Module`` (framework jax): called through ``nnx.view(module, deterministic=True,
  use_running_average=True)``, the eval mode of ``module.eval()`` without changing the module given;
* a flax ``linen.Module`` without parameters (framework jax): ``module.apply({}, q, k, v, **keywords)``
  (a linen module has no eval mode: its determinism is its own argument);
* a keras ``Layer`` (framework: its keras backend, torch or jax): called as it is; keras runs a
  layer in inference mode (``training=False``) unless told otherwise.

Anything else (a number, an array, a module, a class whose instances are not callable) is a
:class:`TargetError`. Frameworks are looked up in ``sys.modules``, never imported: an object can
only be a torch module if torch is already imported.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

#: What a target may be, as error messages list it.
TARGET_KINDS = ("a function", "a torch nn.Module (instance or class)", "a flax nnx or linen Module",
                "a keras Layer")


class TargetError(TypeError):
    """The target cannot be loaded, or is not a kernel the checker can call (a usage error: the command
    line prints it without a traceback)."""


@dataclass(frozen=True)
class Kernel:
    """A target made callable as ``fn(q, k, v, **keywords)``, with the name reports give it and its kind."""

    fn: Callable[..., Any]
    name: str
    kind: str


@contextlib.contextmanager
def current_directory_on_path() -> Iterator[None]:
    """The current directory first on ``sys.path`` (as ``python -m`` puts it) for the duration; the
    previous ``sys.path`` is restored after."""
    saved = list(sys.path)
    cwd = os.getcwd()
    if not sys.path or sys.path[0] not in (cwd, ""):
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module written since the last import is found
    try:
        yield
    finally:
        sys.path[:] = saved


def load_target(spec: str) -> Any:
    """The object named by ``"MODULE:NAME"`` (``NAME`` may be dotted: ``mymod:layers.attention``),
    imported with the current directory first on ``sys.path``. TargetError for a malformed spec, a
    module that cannot be imported or a missing name."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise TargetError(f"expected MODULE:NAME (e.g. mymod:attention), got {spec!r}")
    with current_directory_on_path():
        try:
            value: object = importlib.import_module(module_name)
        except ImportError as error:
            raise TargetError(f"cannot import {module_name!r} (the current directory {os.getcwd()} is searched "
                              f"first): {type(error).__name__}: {error}") from error
        except Exception as error:  # the module itself raised while being imported
            raise TargetError(f"importing {module_name!r} raised {type(error).__name__}: {error}") from error
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise TargetError(f"{spec}: {type(value).__name__} {getattr(value, '__name__', value)!r} has no "
                              f"attribute {part!r}") from None
    return value


def _loaded(name: str) -> Any:
    return sys.modules.get(name)


def _torch_module_type() -> type | None:
    torch = _loaded("torch")
    return None if torch is None else torch.nn.Module


def _keras_layer_type() -> type | None:
    keras = _loaded("keras")
    return None if keras is None else getattr(keras, "Layer", None)


def _flax_module_type(api: str) -> type | None:
    flax = _loaded(f"flax.{api}")
    return None if flax is None else flax.Module


def _is_instance(target: Any, module_type: type) -> bool:  # no narrowing: target stays Any
    return isinstance(target, module_type)


def _require(framework: str, wanted: str, what: str) -> None:
    if framework != wanted:
        raise TargetError(f"{what} is a {wanted} kernel: check it with framework {wanted!r} (--framework {wanted}), "
                          f"not {framework!r}")


def _torch_eval(module: Any) -> Callable[..., Any]:
    def kernel(*args: Any, **keywords: Any) -> Any:
        modules = list(module.modules())
        training = [m.training for m in modules]
        module.eval()
        try:
            return module(*args, **keywords)
        finally:
            for m, flag in zip(modules, training, strict=True):
                m.training = flag

    return kernel


def _nnx_eval(module: Any) -> Callable[..., Any]:
    from flax import nnx

    if hasattr(nnx, "view"):
        view = nnx.view(module, deterministic=True, use_running_average=True, raise_if_not_found=False)
    else:  # flax before nnx.view: a clone in eval mode
        view = nnx.clone(module)
        view.eval()
    return view


def _linen_apply(module: Any) -> Callable[..., Any]:
    def kernel(*args: Any, **keywords: Any) -> Any:
        return module.apply({}, *args, **keywords)

    return kernel


def as_kernel(target: Any, framework: str, name: str | None = None) -> Kernel:
    """``target`` as the function the checker calls (see the module docstring); TargetError when it is
    none of the kinds the checker takes, cannot be instantiated, or belongs to another framework."""
    label = name or getattr(target, "__name__", None)
    if isinstance(target, type):
        try:
            instance = target()
        except Exception as error:
            raise TargetError(f"{label} is a class, and the checker instantiates a class with no arguments: "
                              f"{target.__name__}() raised {type(error).__name__}: {error}") from error
        kernel = as_kernel(instance, framework, label)
        if kernel.kind == "function":  # an instance of a plain class with __call__
            return Kernel(kernel.fn, kernel.name, "instance of a callable class")
        return Kernel(kernel.fn, kernel.name, f"{kernel.kind} class, instantiated with no arguments")
    label = label or f"{type(target).__name__} instance"
    kinds: list[tuple[str, type | None, str | None, Callable[[Any], Callable[..., Any]] | None]] = [
        ("keras Layer", _keras_layer_type(), None, None),  # before torch: a torch-backend Layer is an nn.Module
        ("torch nn.Module", _torch_module_type(), "torch", _torch_eval),
        ("flax nnx Module", _flax_module_type("nnx"), "jax", _nnx_eval),
        ("flax linen Module", _flax_module_type("linen"), "jax", _linen_apply)]
    for kind, module_type, wanted, call in kinds:
        if module_type is None or not _is_instance(target, module_type):
            continue
        if wanted is None:  # keras: the framework is its backend's
            wanted = sys.modules["keras"].backend.backend()
        _require(framework, wanted, f"{label} (a {kind})")
        return Kernel(target if call is None else call(target), label, kind)
    if isinstance(target, type(sys)):
        raise TargetError(f"{label} is a module; name the kernel in it as MODULE:NAME")
    if not callable(target):
        raise TargetError(f"{label} is a {type(target).__name__!r} object, not a kernel: the checker takes "
                          f"{', '.join(TARGET_KINDS[:-1])} or {TARGET_KINDS[-1]}")
    return Kernel(target, label, "function")
