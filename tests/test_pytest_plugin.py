"""The pytest plugin (attention_ref.pytest_plugin): the attention_kernel marker in a user's own suite.

The acceptance test installs attention_ref as a user does (``pip install .``, non-editable, into a fresh
venv that sees this venv's other packages but not its editable attention_ref) and runs plain
``pytest`` on a user's test file; the other tests run pytest in-process (``pytester``) or, where
global Hypothesis state or ``sys.modules`` is the subject, in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sysconfig
import textwrap
import time
import venv
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from attention_ref.testing import PROPERTIES
from attention_ref.testing.strategies import Features

from .zoo import BUGS_BY_NAME

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]

#: The README's test file, as a user writes it: its causal NumPy kernel and the marker (fewer examples
#: here); ``{offset}`` 1 plants the causal off-by-one (each query sees one future key), 0 is the README's.
README_TEST = re.search(r"```python\n(# test_my_attention\.py.*?)```", (REPO / "README.md").read_text(),
                        flags=re.DOTALL).group(1)
USER_TEST = (README_TEST.replace("max_examples=50", "max_examples={examples}")
             .replace("np.tri(*logits.shape[-2:], 0,", "np.tri(*logits.shape[-2:], {offset},"))
assert "{examples}" in USER_TEST and "{offset}" in USER_TEST, "the README's test file changed: update these"
#: The kernel alone (the test file without its marked test).
KERNEL = USER_TEST.split("\n\n@pytest.mark")[0]

#: A kernel without the row max subtracted (NaN for huge logits), whose failure is a bare ``assert`` of
#: attention_ref's: pytest rewrites those in a non-editable install, and the failure text must not carry
#: the rewrite's explanation (`` +  where ...`` with array reprs).
OVERFLOW_TEST = '''
import numpy as np
import pytest


def attention(q, k, v, scale=None):
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    weights = np.exp(q.astype(np.float64) @ k.swapaxes(-1, -2) * scale)
    return (weights / weights.sum(-1, keepdims=True) @ v).astype(q.dtype)


@pytest.mark.attention_kernel(framework="numpy", supports=["scale"], max_examples=30, seed=0,
                              properties=["huge_logits_stay_finite"])
def test_attention():
    return attention
'''

#: What the user's marker declares: the items must be the properties that apply to it.
APPLICABLE = [prop.name for prop in PROPERTIES if prop.applies_to(Features(frozenset({"causal"}), ("float32",)))]


#: pytest rewrites the asserts of every module of a plugin's distribution (in a non-editable install):
#: the modules that assert are marked PYTEST_DONT_REWRITE, so that the checker's findings read as written.
NOT_REWRITTEN_TEST = """
import sys


def test_attention_ref_asserts_are_not_rewritten():
    import attention_ref.testing  # noqa: F401 (every module that asserts)
    import attention_ref.backends.numpy_blocked  # noqa: F401
    rewritten = sorted(name for name, module in list(sys.modules.items())
                       if name.startswith("attention_ref") and "@py_builtins" in vars(module)
                       and _asserts(module))
    assert not rewritten, rewritten


def _asserts(module):
    import ast
    with open(module.__file__) as source:
        return any(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(source.read())))
"""


def _junit(path: Path) -> dict[str, str]:
    """item name -> "passed", "failure", "error" or "skipped", from a JUnit XML file."""
    outcomes = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name", "")] = kinds[0] if kinds else "passed"
    return outcomes


def _user_venv(root: Path) -> tuple[Path, float]:
    """A fresh venv under ``root`` with attention_ref installed from a copy of this checkout by
    ``pip install --no-deps --no-build-isolation`` (non-editable); this venv's other packages are
    visible through a .pth file (a folder of links to them, without attention_ref's own entries).
    Returns its python and the seconds the install took."""
    env_dir, deps, source = root / "venv", root / "deps", root / "source"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    deps.mkdir()
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if entry.name.startswith(("attention_ref", "__editable__")) or entry.suffix == ".pth":
            continue
        (deps / entry.name).symlink_to(entry)
    (purelib / "dependencies.pth").write_text(f"{deps}\n")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    start = time.perf_counter()
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    str(source)], check=True, capture_output=True, text=True, cwd=root)
    return python, time.perf_counter() - start


def _user_pytest(python: Path, where: Path, *args: str) -> tuple[dict[str, str], str]:
    junit = where / f"junit{len(list(where.glob('junit*.xml')))}.xml"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST_", "PYTHONPATH"))}
    run = subprocess.run([python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", f"--junitxml={junit}",
                          *args], cwd=where, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode in (0, 1), run.stdout + run.stderr
    return _junit(junit), run.stdout


def test_user_suite_installed_with_pip(tmp_path: Path) -> None:
    """pip install . in a fresh venv; plain pytest on a user's test file: one item per applicable
    property, all passing for a correct kernel, also under xdist; the causal off-by-one fails the
    properties check() finds failing with the same seed, among them the one the zoo says catches it,
    each with its shrunk case."""
    python, install_seconds = _user_venv(tmp_path)
    print(f"pip install of attention_ref into the fresh venv: {install_seconds:.1f} s")
    where = subprocess.run([python, "-c", "import attention_ref; print(attention_ref.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "venv"), where
    correct, buggy, overflow = tmp_path / "correct", tmp_path / "buggy", tmp_path / "overflow"
    for folder, offset in ((correct, 0), (buggy, 1)):
        folder.mkdir()
        (folder / "test_my_kernel.py").write_text(USER_TEST.format(offset=offset, examples=10))
    ids = [f"test_attention[{name}]" for name in APPLICABLE]

    plain, _ = _user_pytest(python, correct, "--hypothesis-seed=1")
    assert plain == dict.fromkeys(ids, "passed")
    distributed, output = _user_pytest(python, correct, "--hypothesis-seed=1", "-n", "2")
    assert distributed == dict.fromkeys(ids, "passed"), output
    assert "bringing up nodes" in output  # xdist ran them

    found, output = _user_pytest(python, buggy, "--hypothesis-seed=1")
    reference = subprocess.run([python, "-c", KERNEL.format(offset=1) + textwrap.dedent('''
        import json
        from attention_ref.testing import check
        report = check(attention, framework="numpy", supports=["causal"], max_examples=10, seed=1)
        print(json.dumps([o.name for o in report.outcomes if o.status == "FAIL"]))''')],
        capture_output=True, text=True, check=True, cwd=buggy)
    failing = json.loads(reference.stdout)
    assert BUGS_BY_NAME["causal_one_key_too_many"].catches in failing
    assert found == {f"test_attention[{name}]": "failure" if name in failing else "passed" for name in APPLICABLE}
    distributed_bug, output = _user_pytest(python, buggy, "--hypothesis-seed=1", "-n", "2")
    assert distributed_bug == found, output  # the same draws in every xdist worker (testing/draws.py)
    for name in failing:
        section = output.split(f"test_attention[{name}] _")[1].split("\n_")[0]
        assert f"{name}: FAIL" in section and "case: AttentionCase(" in section, section
        assert "pytest_plugin.py" not in section

    overflow.mkdir()
    (overflow / "test_overflow.py").write_text(OVERFLOW_TEST)
    (overflow / "test_not_rewritten.py").write_text(NOT_REWRITTEN_TEST)
    found, output = _user_pytest(python, overflow, "-W", "ignore::RuntimeWarning")
    assert found == {"test_attention[huge_logits_stay_finite]": "failure",
                     "test_attention_ref_asserts_are_not_rewritten": "passed"}, output
    assert "huge logits: out has 1 NaN/inf values at" in output, output
    assert "where" not in output and "\nassert " not in output, output


def _user_file(pytester: pytest.Pytester, offset: int, marker: str = 'framework="numpy", supports=["causal"], '
               'max_examples=5', name: str = "test_attention") -> None:
    pytester.makepyfile(**{name: KERNEL.format(offset=offset) + textwrap.dedent(f'''

        @pytest.mark.attention_kernel({marker})
        def test_attention():
            return attention
        ''')})


def test_k_selects_properties(pytester: pytest.Pytester) -> None:
    _user_file(pytester, 0)
    recorder = pytester.inline_run("-k", "causal and not explicit", "-p", "no:cacheprovider")
    passed = [report.nodeid.split("::")[1] for report in recorder.getreports("pytest_runtest_logreport")
              if report.when == "call" and report.passed]
    expected = [f"test_attention[{name}]" for name in APPLICABLE if "causal" in name and "explicit" not in name]
    assert expected and passed == expected
    recorder.assertoutcome(passed=len(expected))


def test_error_is_not_a_failure(pytester: pytest.Pytester) -> None:
    """A kernel that raises is an error at setup (the check could not run); a wrong kernel fails at
    call with the shrunk case and the worst element, without the plugin's traceback."""
    pytester.makepyfile(test_kernels=KERNEL.format(offset=1) + textwrap.dedent('''

        def broken(q, k, v, causal=False):
            raise TypeError("no causal here")


        @pytest.mark.attention_kernel("numpy", supports=["causal"], max_examples=20, seed=0,
                                      properties=["causal_ignores_future_keys"])
        def test_broken():
            return broken


        @pytest.mark.attention_kernel("numpy", supports=["causal"], max_examples=20, seed=0,
                                      properties=["causal_ignores_future_keys"])
        def test_off_by_one():
            return attention
        '''))
    recorder = pytester.inline_run("-p", "no:cacheprovider")
    reports = {(report.nodeid.split("::")[1], report.when): report
               for report in recorder.getreports("pytest_runtest_logreport")}
    error = reports["test_broken[causal_ignores_future_keys]", "setup"]
    assert error.failed and "KernelError: broken raised TypeError: no causal here" in error.longreprtext
    assert "the check could not run" in error.longreprtext
    assert ("test_broken[causal_ignores_future_keys]", "call") not in reports  # an error, not a failure
    assert reports["test_off_by_one[causal_ignores_future_keys]", "setup"].passed
    failure = reports["test_off_by_one[causal_ignores_future_keys]", "call"]
    assert failure.failed
    assert "causal_ignores_future_keys: FAIL" in failure.longreprtext and "worst at" in failure.longreprtext
    assert "case: AttentionCase(" in failure.longreprtext and "pytest_plugin.py" not in failure.longreprtext


def test_unknown_marker_option_is_a_collection_error(pytester: pytest.Pytester) -> None:
    _user_file(pytester, 0, 'framework="numpy", tile=3')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*attention_kernel got unknown options [[]'tile'[]]*"])


def test_no_applicable_property_is_a_collection_error(pytester: pytest.Pytester) -> None:
    """Naming only properties the declared features cannot run would collect nothing: an error, not a
    silently empty test."""
    _user_file(pytester, 0, 'framework="numpy", supports=["causal"], properties=["softcap_bounds_weight_ratios"]')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no property applies to the declared features among the properties named*"])


SPY = '''
import functools
import json

import attention_ref.testing
from hypothesis import settings

settings.register_profile("user.tiny", max_examples=3)
_check = attention_ref.testing.check


@functools.wraps(_check)
def spy(kernel, **options):
    print("CHECK", json.dumps({key: options.get(key) for key in ("seed", "max_examples", "properties")}))
    return _check(kernel, **options)


attention_ref.testing.check = spy
'''


def test_hypothesis_seed_and_profile_are_passed(pytester: pytest.Pytester) -> None:
    """--hypothesis-seed is check()'s seed; the loaded profile's max_examples applies where the marker
    gives none (a subprocess: both options change Hypothesis' global state)."""
    pytester.makeconftest(SPY)
    _user_file(pytester, 0, 'framework="numpy", supports=["causal"], max_examples=4', name="test_given")
    _user_file(pytester, 0, 'framework="numpy", supports=["causal"]', name="test_profile")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", "-k", "matches_float64_oracle",
                                           "--hypothesis-seed=12345", "--hypothesis-profile=user.tiny")
    result.assert_outcomes(passed=2)
    calls = [json.loads(line.split("CHECK ", 1)[1]) for line in result.outlines if "CHECK {" in line]
    assert calls == [{"seed": 12345, "max_examples": 4, "properties": ["matches_float64_oracle"]},
                     {"seed": 12345, "max_examples": 3, "properties": ["matches_float64_oracle"]}]


def test_inert_without_the_marker(pytester: pytest.Pytester) -> None:
    """In a suite that does not use the marker the plugin is loaded, registers its marker, and imports
    neither attention_ref.testing nor hypothesis nor a framework."""
    pytester.makepyfile(test_plain='''
        import sys


        def test_plain(pytestconfig):
            assert pytestconfig.pluginmanager.has_plugin("attention_ref")
            assert any(line.startswith("attention_kernel(") for line in pytestconfig.getini("markers"))
            heavy = ("attention_ref.testing", "hypothesis", "torch", "jax")
            assert [name for name in heavy if name in sys.modules] == []
        ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=1)


def test_picture_path_is_shown(pytester: pytest.Pytester) -> None:
    """With --attention-plot, a FAIL's text and JUnit properties name the PNG check() wrote."""
    pytest.importorskip("matplotlib")
    _user_file(pytester, 1, 'framework="numpy", supports=["causal"], max_examples=20, seed=0, '
                            'properties=["causal_ignores_future_keys"]')
    recorder = pytester.inline_run("-p", "no:cacheprovider", "--attention-plot", "plots")
    [failure] = [report for report in recorder.getreports("pytest_runtest_logreport") if report.failed]
    assert failure.when == "call"
    [line] = [line for line in failure.longreprtext.splitlines() if line.startswith("picture: ")]
    picture = Path(line.removeprefix("picture: "))
    assert picture.is_relative_to(pytester.path / "plots" / "test_attention.test_attention_causal_ignores_future_keys_")
    assert picture.read_bytes().startswith(b"\x89PNG")
    assert ("picture", str(picture)) in failure.user_properties


def test_convention_differs_passes_with_its_evidence(pytester: pytest.Pytester) -> None:
    """A declared fully-masked convention (NaN rows) passes, the evidence in the item's report section
    and its JUnit properties."""
    pytester.makepyfile(test_nan_rows='''
        import numpy as np
        import pytest


        def attention(q, k, v, mask=None):
            logits = q.astype(np.float64) @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
            if mask is not None:
                logits = np.where(mask, logits, -np.inf)
            with np.errstate(invalid="ignore"):  # fully masked rows: NaN, as declared
                weights = np.exp(logits - logits.max(-1, keepdims=True, initial=-np.inf))
                return (weights / weights.sum(-1, keepdims=True) @ v).astype(q.dtype)


        @pytest.mark.attention_kernel(framework="numpy", supports=["mask"], fully_masked="nan", max_examples=30,
                                      seed=0, properties=["fully_excluded_rows_are_zero"])
        def test_attention():
            return attention
        ''')
    recorder = pytester.inline_run("-p", "no:cacheprovider")
    [call] = [report for report in recorder.getreports("pytest_runtest_logreport") if report.when == "call"]
    assert call.passed
    assert ("attention_ref_status", "convention differs") in call.user_properties
    [(title, section)] = [(title, text) for title, text in call.sections if "attention_ref" in title]
    assert "fully_excluded_rows_are_zero: convention differs" in section and "out is NaN" in section


def test_readme_shows_the_items_of_its_test_file() -> None:
    """The README's ``pytest -v`` listing is the items its test file gets: one per applicable property."""
    shown = re.findall(r"test_attention\[(\w+)\] PASSED", (REPO / "README.md").read_text())
    assert shown == APPLICABLE
