"""The attention_ref pytest plugin: check a kernel inside your own test suite, one test item per property.

Loaded by pytest wherever attention_ref is installed (the ``pytest11`` entry point), and inert unless
used: it registers the marker and the ``--attention-plot`` option, and imports nothing beyond pytest
until a test carrying the marker is collected (then ``attention_ref.testing``, hence hypothesis).

Usage: a test function that returns the kernel (it may take fixtures and be parametrized) with the
marker ::

    @pytest.mark.attention_kernel(framework="numpy", supports=["causal"], max_examples=20)
    def test_my_kernel():
        return my_kernel

``attention_kernel(framework, supports=(), dtypes=("float32",), **options)``: ``framework`` (the first
positional argument or a keyword) and every other keyword are those of
``attention_ref.testing.check`` (layout, fully_masked, returns, mask_polarity, out_dtype, backward,
device, few_shapes, name, max_examples, seed); ``properties=[...]`` restricts the items to those
properties. An unknown keyword, feature or property is a collection error.

Items: the function becomes one item per property of ``attention_ref.testing.PROPERTIES`` that applies
to the declared features (registry order, the same on every xdist worker), with the property's name
as its id: ``test_my_kernel[causal_ignores_future_keys]`` (with the user's own parameters after it,
``[causal_ignores_future_keys-float32]``). Properties that do not apply (they need an undeclared
feature) are not collected: the item list is what the kernel is held to.

Running an item: during setup the function is called with its fixtures and the kernel it returns is
checked, ``check(kernel, ..., properties=[that property])``. The outcome decides the item:

* pass, and "convention differs" (its evidence is in the item's ``attention_ref`` report section,
  shown with ``-rP``, and in its JUnit properties) pass;
* FAIL fails the item in its call phase with the report's detail (the shrunk case, the worst element
  and its bound, and the picture path when one was made) as the failure text, without a traceback;
* ERROR (the check could not run: the kernel raised on an input within its declared features, broke
  the calling convention, or the checker broke; also ``check`` refusing the marker's options or the
  function raising) is an error at setup, :class:`AttentionCheckError`, so that pytest and CI count
  it among errors, not failures: the kernel was not found wrong.

Hypothesis: ``--hypothesis-profile`` (Hypothesis' own option) applies: the examples are
``max_examples`` of the marker, else the loaded profile's ``settings.default.max_examples``; the
profile's other settings (derandomize, verbosity...) apply except those ``check`` sets (deadline,
database, phases, health checks). ``--hypothesis-seed`` becomes ``check``'s ``seed`` (an integer; any
other string is hashed to one) unless the marker gives ``seed``.

Pictures: ``--attention-plot DIR`` (or the ini option ``attention_plot``, relative to the ini file)
passes ``plot_dir=DIR/<module>.<item name>`` to ``check`` (the item's name holds its parameters, so
that no two items write the same file); the picture path of an outcome is shown with the failure and
recorded as the JUnit property ``picture``.

JUnit: every item records ``attention_ref_status`` (pass, FAIL, ERROR, convention differs) among its
properties. pytest rewrites the asserts of every module of a plugin's distribution, so in a pytest
session the messages of attention_ref's bare asserts carry pytest's explanation (`` +  where ...``);
the failure text leaves it out.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _pytest.outcomes import Failed

if TYPE_CHECKING:
    from collections.abc import Generator

    from .testing.report import PropertyOutcome

MARKER = "attention_kernel"
#: The parameter of the generated items (the property's name); ``item.callspec.params[PARAMETER]``.
PARAMETER = "attention_property"
#: ``check`` keywords the marker may not give: the kernel is what the function returns, the plot
#: directory comes from ``--attention-plot``, each item checks one property (``properties`` of the
#: marker selects the items), and pytest reports the progress.
_NOT_MARKER_OPTIONS = frozenset({"fn", "plot_dir", "progress", "rules", "fail_fast"})
_OUTCOME = pytest.StashKey["PropertyOutcome"]()


class AttentionCheckError(Failed):
    """The check of one property could not run (its outcome is ERROR, or ``check`` or the test function
    raised): an error of the test at setup, not a failure, shown without a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(message, pytrace=False)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("attention_ref")
    group.addoption("--attention-plot", dest="attention_plot", metavar="DIR", default=None,
                    help="attention_kernel tests: write a picture of each counterexample under DIR "
                         "(needs matplotlib and a check() that makes pictures)")
    parser.addini("attention_plot", "attention_kernel tests: the directory of the counterexample pictures",
                  default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(framework, supports=(), **check_options): check the kernel the "
                                       "test function returns, one test item per applicable property")


def _options(marker: pytest.Mark, where: str) -> dict[str, Any]:
    """The marker's keywords as ``check`` keywords (``framework`` included); a collection error for a
    bad marker."""
    from .testing import check

    if len(marker.args) > 1:
        pytest.fail(f"{where}: @pytest.mark.{MARKER} takes framework as its only positional argument", pytrace=False)
    options = dict(marker.kwargs)
    if marker.args:
        if "framework" in options:
            pytest.fail(f"{where}: framework given twice to @pytest.mark.{MARKER}", pytrace=False)
        options["framework"] = marker.args[0]
    if "framework" not in options:
        pytest.fail(f"{where}: @pytest.mark.{MARKER} needs framework=", pytrace=False)
    allowed = set(inspect.signature(check).parameters) - _NOT_MARKER_OPTIONS
    unknown = sorted(set(options) - allowed)
    if unknown:
        pytest.fail(f"{where}: @pytest.mark.{MARKER} got unknown options {unknown}; check() takes "
                    f"{', '.join(sorted(allowed))}", pytrace=False)
    return options


def applicable_properties(options: dict[str, Any]) -> list[str]:
    """The names of the properties that apply to the features the ``check`` keywords declare (as
    ``check`` computes them), in registry order, restricted to ``options["properties"]`` when given."""
    from .testing import PROPERTIES
    from .testing.check import kernel_features
    from .testing.runner import check_property_names

    features = kernel_features(tuple(options.get("supports", ())), tuple(options.get("dtypes", ("float32",))),
                               returns=options.get("returns"), few_shapes=bool(options.get("few_shapes", False)))
    selected = options.get("properties")
    check_property_names(selected)
    return [prop.name for prop in PROPERTIES
            if (selected is None or prop.name in selected) and prop.applies_to(features)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker(MARKER)
    if marker is None:
        return
    where = metafunc.definition.nodeid
    if PARAMETER in metafunc.fixturenames:
        pytest.fail(f"{where}: {PARAMETER} is the parameter of @pytest.mark.{MARKER}'s items", pytrace=False)
    options = _options(marker, where)
    try:
        names = applicable_properties(options)
    except ValueError as error:
        pytest.fail(f"{where}: @pytest.mark.{MARKER}: {error}", pytrace=False)
    if not names:
        pytest.fail(f"{where}: @pytest.mark.{MARKER}: no property applies to the declared features"
                    + (" among the properties named" if options.get("properties") is not None else ""),
                    pytrace=False)
    metafunc.fixturenames.append(PARAMETER)  # a direct parameter of its own, not one of the function's
    metafunc.parametrize(PARAMETER, names, ids=names)


def _is_ours(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return (callspec is not None and PARAMETER in callspec.params
            and item.get_closest_marker(MARKER) is not None)


def _seed(config: pytest.Config) -> int | None:
    """``--hypothesis-seed`` as an integer (a non-integer string hashed to one), None when not given."""
    value = config.getoption("hypothesis_seed", default=None)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return int.from_bytes(hashlib.sha256(str(value).encode()).digest()[:8], "big")


def _plot_dir(item: pytest.Function) -> Path | None:
    """``DIR/<module>.<item name>`` (absolute; DIR of the command line relative to the invocation
    directory, of the ini file relative to the ini file's directory, else the rootdir), None without
    the option. The item's name holds its parameters, so that parametrized items (and xdist workers)
    never write the same picture."""
    config = item.config
    given = config.getoption("attention_plot", default=None)
    if given:
        base = config.invocation_params.dir / given
    elif config.getini("attention_plot"):
        base = (config.inipath.parent if config.inipath is not None else config.rootpath) / str(
            config.getini("attention_plot"))
    else:
        return None
    return base.resolve() / re.sub(r"[^\w.-]", "_", f"{item.path.stem}.{item.name}")


def _run(item: pytest.Function) -> PropertyOutcome:
    """Call the test function for its kernel and check the item's property."""
    from hypothesis import settings

    from .testing import check

    name = str(item.callspec.params[PARAMETER])
    options = _options(item.get_closest_marker(MARKER), item.nodeid)  # type: ignore[arg-type]
    options.pop("properties", None)
    options.setdefault("max_examples", settings().max_examples)  # the loaded profile's
    seed = _seed(item.config)
    if "seed" not in options and seed is not None:
        options["seed"] = seed
    plot_dir = _plot_dir(item)
    if plot_dir is not None:
        options["plot_dir"] = str(plot_dir)
    wanted = [p.name for p in inspect.signature(item.obj).parameters.values()
              if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    try:
        kernel = item.obj(**{arg: item.funcargs[arg] for arg in wanted if arg in item.funcargs})
    except Exception as error:
        raise AttentionCheckError(f"{item.originalname} raised {type(error).__name__}: {error} (it should return "
                                  f"the kernel to check)") from error
    if kernel is None:
        raise AttentionCheckError(f"{item.originalname} returned None: a @pytest.mark.{MARKER} test returns the "
                                  f"kernel to check")
    try:
        report = check(kernel, properties=[name], **options)
    except Exception as error:  # check() refused the options or broke: nothing was found about the kernel
        raise AttentionCheckError(f"attention_ref check() raised {type(error).__name__}: {error}") from error
    return next(outcome for outcome in report.outcomes if outcome.name == name)


def _without_rewrite_explanation(detail: str) -> str:
    """``detail`` without pytest's explanation of a rewritten ``assert`` (a line ``assert ...`` and the
    indented lines after it, e.g. `` +  where ...`` with array reprs). pytest rewrites the asserts of every
    module of a plugin's distribution, attention_ref's properties included, so that in a pytest session
    their messages carry it; the report's message is the text before it."""
    lines: list[str] = []
    explaining = False
    for line in detail.splitlines():
        if line.startswith("assert "):
            explaining = True
        elif explaining and not line.startswith(" "):
            explaining = False
        if not explaining:
            lines.append(line)
    return "\n".join(lines)


def _text(outcome: PropertyOutcome) -> str:
    from .testing.report import rules_text

    lines = [f"{outcome.name}: {outcome.status} (SPEC.md rules {rules_text(outcome.rules)})",
             _without_rewrite_explanation(outcome.detail)]
    if outcome.picture:
        lines.append(f"picture: {outcome.picture}")
    return "\n".join(line for line in lines if line)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    result = yield  # the fixtures first: the test function may use them
    if not (_is_ours(item) and isinstance(item, pytest.Function)):
        return result
    from .testing.report import Status

    outcome = _run(item)
    item.stash[_OUTCOME] = outcome
    item.user_properties.append(("attention_ref_status", str(outcome.status)))
    if outcome.picture:
        item.user_properties.append(("picture", outcome.picture))
    if outcome.status is Status.ERROR:
        raise AttentionCheckError(f"the check could not run (an error, not a finding about the kernel)\n"
                                  f"{_text(outcome)}")
    if outcome.status is Status.CONVENTION_DIFFERS:
        item.add_report_section("call", "attention_ref", _text(outcome))
        item.user_properties.append(("evidence", outcome.detail))
    if not outcome.status.counted:  # n/a or not run: cannot happen for a collected property
        pytest.skip(f"{outcome.status}: {outcome.name}")
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """The call phase of an item: its outcome (checked at setup) as a pass or a failure."""
    if not _is_ours(pyfuncitem):
        return None
    from .testing.report import Status

    outcome = pyfuncitem.stash[_OUTCOME]
    if outcome.status is Status.FAIL:
        pytest.fail(_text(outcome), pytrace=False)
    return True
