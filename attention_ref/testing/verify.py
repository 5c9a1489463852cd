"""``attention-ref verify``: run every conformance property against every installed backend, on the
CPU or on a device (``device="cuda"``: our torch and jax backends with their arrays on the GPU)."""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings

from ..backends.base import Backend
from ..layers.params import MHAParams
from ..layers.plan import LayerPlan
from ..plan import AttentionPlan
from ..registry import available_backends, get_backend
from .check import failure_picture_maker
from .outcomes import outcome_of
from .progress import Progress, as_progress
from .report import PropertyOutcome, Status, failure_sections, render_table, rules_text, summary_line
from .report_files import Suite
from .runner import PROPERTIES, check_property_names, check_rule_numbers, run_property, selects

#: Device names ``verify`` and ``on_device`` accept, each optionally with ``:N`` (the N-th such device).
DEVICES = ("cpu", "cuda", "gpu")
#: The frameworks whose arrays can be placed on a device other than the CPU.
DEVICE_FRAMEWORKS = ("torch", "jax")


class DeviceNotAvailableError(ValueError):
    """The device named cannot hold the arrays of a backend's framework (no such device, or a
    framework that runs on the CPU only)."""


def parse_device(device: str) -> tuple[str, int]:
    """``"cuda:1"`` -> ``("cuda", 1)``; "gpu" is "cuda"; ValueError for a name not in ``DEVICES``."""
    match = re.fullmatch(r"(cpu|cuda|gpu)(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (optionally with :N), got {device!r}")
    kind = "cuda" if match[1] == "gpu" else match[1]
    return kind, int(match[2] or 0)


def _converter(backend: Backend, device: str) -> Callable[[np.ndarray], Any] | None:
    """A function from NumPy arrays to arrays of ``backend``'s framework on ``device`` (same dtype),
    None when ``backend.asarray`` already makes them there; DeviceNotAvailableError when the device is
    absent or the framework cannot use it."""
    kind, index = parse_device(device)
    if backend.framework == "torch":
        import torch

        if kind == "cpu":
            return None  # Backend.asarray makes CPU tensors
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise DeviceNotAvailableError(
                f"device {device!r} is not available to torch {torch.__version__}: "
                + (f"it sees {count} CUDA device(s)" if count else "torch.cuda.is_available() is False"))
        target = torch.device("cuda", index)
        return lambda x: backend.asarray(x).to(target)
    if backend.framework == "jax":
        import jax

        platform = "gpu" if kind == "cuda" else "cpu"
        try:
            devices = jax.devices(platform)
        except RuntimeError as error:  # jax has no such platform
            raise DeviceNotAvailableError(f"device {device!r} is not available to jax {jax.__version__}: "
                                          f"{str(error).splitlines()[0]}") from None
        if index >= len(devices):
            raise DeviceNotAvailableError(f"device {device!r} is not available to jax {jax.__version__}: "
                                          f"it sees {len(devices)} {platform} device(s)")
        if index == 0 and jax.default_backend() == platform and jax.config.jax_default_device is None:
            return None  # Backend.asarray puts arrays on jax's default device

        def convert(x: np.ndarray) -> Any:
            with jax.enable_x64(True) if x.dtype == np.float64 else contextlib.nullcontext():
                return jax.device_put(np.asarray(x), devices[index])

        return convert
    if kind == "cpu":
        return None
    raise DeviceNotAvailableError(f"device {device!r} is not available to the {backend.name} backend "
                                  f"({backend.framework} arrays): only {' and '.join(DEVICE_FRAMEWORKS)} arrays "
                                  "can be placed on a device")


class DeviceBackend(Backend):
    """``backend`` with its arrays on ``device``: ``asarray`` places every array it makes there, and
    the calls are ``backend``'s own (front door, ``default_blocks``, arithmetic), which run where
    their inputs are. Made by ``on_device``."""

    def __init__(self, backend: Backend, device: str, convert: Callable[[np.ndarray], Any]) -> None:
        self.backend, self.device, self._convert = backend, device, convert
        self.name, self.framework, self.default_blocks = backend.name, backend.framework, backend.default_blocks

    def _attention(self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any,
                   dropout_mask: Any) -> tuple[Any, Any, Any]:
        return self.backend._attention(plan, q, k, v, mask, bias, dropout_mask)

    def _attention_vjp(self, plan: AttentionPlan, q: Any, k: Any, v: Any, mask: Any, bias: Any, dropout_mask: Any,
                       d_out: Any) -> tuple[Any, Any, Any, Any]:
        return self.backend._attention_vjp(plan, q, k, v, mask, bias, dropout_mask, d_out)

    def _multi_head_attention(self, plan: LayerPlan, query: Any, key: Any, value: Any, params: MHAParams, mask: Any,
                              key_padding_mask: Any, bias: Any, dropout_mask: Any) -> tuple[Any, Any, Any]:
        return self.backend._multi_head_attention(plan, query, key, value, params, mask, key_padding_mask, bias,
                                                  dropout_mask)

    def _multi_head_attention_vjp(
        self, plan: LayerPlan, query: Any, key: Any, value: Any, params: MHAParams, mask: Any, key_padding_mask: Any,
        bias: Any, dropout_mask: Any, d_out: Any,
    ) -> tuple[Any, Any, Any, MHAParams, Any]:
        return self.backend._multi_head_attention_vjp(plan, query, key, value, params, mask, key_padding_mask, bias,
                                                      dropout_mask, d_out)

    def asarray(self, x: np.ndarray) -> Any:
        """The NumPy array as an array of the backend's framework on ``device`` (same dtype)."""
        return self._convert(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        return self.backend.to_numpy(x)

    def __repr__(self) -> str:
        return f"<attention_ref backend {self.name!r} on {self.device!r}>"


def on_device(backend: Backend | str, device: str | None) -> Backend:
    """``backend`` (or the backend of that name) with the arrays its ``asarray`` makes on ``device``:
    "cpu", "cuda" or "gpu" (the same), optionally with ``:N``; None or a device where the backend's
    arrays are already made gives the backend itself, else a ``DeviceBackend``.

    Raises ValueError for a device name not in ``DEVICES`` and DeviceNotAvailableError (a ValueError)
    when the device is absent or the backend's framework cannot place arrays there (numpy: CPU only).
    """
    impl = get_backend(backend) if isinstance(backend, str) else backend
    if device is None:
        return impl
    convert = _converter(impl, device)
    return impl if convert is None else DeviceBackend(impl, device, convert)


@dataclass
class VerifyReport:
    """Per backend, an outcome for every property of ``PROPERTIES`` (in their order); ``device`` is
    where the backends' arrays were (None: where each backend makes them)."""

    backends: list[str]
    outcomes: dict[str, list[PropertyOutcome]] = field(default_factory=dict)
    seconds: float = 0.0
    device: str | None = None
    seed: int | None = None
    max_examples: int | None = None

    def suites(self) -> list[Suite]:
        """A suite per backend (``report_files``), named as the table's columns."""
        return [Suite(name if self.device is None else f"{name}[{self.device}]", self.outcomes[name],
                      seconds=sum(o.seconds for o in self.outcomes[name])) for name in self.backends]

    def document(self) -> dict[str, Any]:
        """The JSON document of this report (``report_files.report_document``)."""
        from .report_files import report_document

        return report_document("verify", self.suites(), seed=self.seed, max_examples=self.max_examples,
                               seconds=self.seconds, device=self.device, summary=self.summary())

    @property
    def passed(self) -> bool:
        """No property failed or errored on any backend."""
        return all(o.status.ok for outcomes in self.outcomes.values() for o in outcomes)

    def summary(self) -> str:
        return summary_line(o.status for outcomes in self.outcomes.values() for o in outcomes)

    def render(self) -> str:
        columns = [self.outcomes[name] for name in self.backends]
        titles = [name if self.device is None else f"{name}[{self.device}]" for name in self.backends]
        rows = [(first.name, rules_text(first.rules), *(column[i].status for column in columns))
                for i, first in enumerate(columns[0])] if columns else []
        lines = render_table(("property", "rules", *titles), rows, min_width=4)
        lines += failure_sections((f" on {title}", o) for name, title in zip(self.backends, titles, strict=True)
                                  for o in self.outcomes[name])
        return "\n".join([*lines, "", f"{self.summary()} ({self.seconds:.1f} s)"])

    __str__ = render


def verify(
    backends: Sequence[str] | None = None,
    *,
    max_examples: int = 50,
    seed: int | None = None,
    properties: Sequence[str] | None = None,
    device: str | None = None,
    time_limit: float | None = None,
    progress: Progress | Callable[[str], None] | None = None,
    rules: Sequence[int] | None = None,
    plot_dir: str | Path | None = None,
) -> VerifyReport:
    """Run every property of ``attention_ref.testing.PROPERTIES`` on each backend (default: all
    installed; with a ``device`` other than the CPU, the installed ones of ``DEVICE_FRAMEWORKS``) with
    ``max_examples`` Hypothesis examples each; ``properties`` names the ones to run (default: all;
    the others are reported "not run"). ``device`` ("cpu", "cuda", "gpu", optionally ``:N``) places
    the backends' arrays there (``on_device``); DeviceNotAvailableError, before any property runs,
    when it cannot. A property not started within ``time_limit`` seconds of the start is "not run"
    too. ``rules`` keeps the properties that prove one of these SPEC.md rules. ``progress`` receives
    the run's events (a ``Progress``, or a callable given a line as each property ends). ``plot_dir``:
    a PNG of every FAIL's shrunk case is written there (as ``check`` does)."""
    check_property_names(properties)
    check_rule_numbers(rules)
    shown = as_progress(progress)
    if backends:
        names = list(backends)
    else:
        names = available_backends()
        if device is not None and parse_device(device)[0] != "cpu":
            names = [name for name in names if get_backend(name).framework in DEVICE_FRAMEWORKS]
    impls, unavailable = {}, []
    for name in names:
        try:
            impls[name] = on_device(name, device)
        except DeviceNotAvailableError as error:
            unavailable.append(str(error))
    if unavailable:
        raise DeviceNotAvailableError("; ".join(unavailable))
    run_settings = settings(max_examples=max_examples, deadline=None, database=None, print_blob=True,
                            suppress_health_check=[HealthCheck.too_slow])
    report = VerifyReport(names, device=device, seed=seed, max_examples=max_examples)
    start = time.perf_counter()
    shown.plan(len(impls) * sum(selects(p.name, p.rules, properties, rules) for p in PROPERTIES))
    for backend_name, impl in impls.items():
        outcomes = report.outcomes.setdefault(backend_name, [])
        title = backend_name if device is None else f"{backend_name}[{device}]"
        for prop in PROPERTIES:
            if not selects(prop.name, prop.rules, properties, rules) or (
                    time_limit is not None and time.perf_counter() - start > time_limit):
                outcomes.append(PropertyOutcome(prop.name, prop.rules, Status.NOT_RUN))
                continue
            outcomes.append(outcome_of(
                prop.name, prop.rules,
                functools.partial(run_property, prop, impl, run_settings, seed=seed, on_example=shown.example),
                target=title, progress=shown,
                picture=None if plot_dir is None else failure_picture_maker(impl, plot_dir, prop.name)))
    report.seconds = time.perf_counter() - start
    return report
