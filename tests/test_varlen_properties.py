"""Rule 20's properties can fail: each FAILs on a NumPy backend with a planted varlen bug (per-segment
causal aligned top-left where bottom-right is asked, attention across a segment boundary, tokens beyond
``cu_seqlens_q[-1]`` written, gradients aligned top-left), and the drawn cases print and record as
plain values."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings

import attention_ref as ar
from attention_ref.result import AttentionOutput
from attention_ref.testing import run_property
from attention_ref.testing.report import Status, failure_outcome
from attention_ref.testing.runner import get_property
from attention_ref.testing.strategies import ALL_FEATURES
from attention_ref.testing.varlen_strategies import VarlenCase, varlen_cases
from attention_ref.varlen import varlen_mask


class PlantedVarlenBug:
    """The NumPy backend with one bug planted in ``varlen_attention`` or ``varlen_attention_vjp``."""

    def __init__(self, bug: str) -> None:
        self.bug = bug
        self.backend: Any = ar.get_backend("numpy")
        self.name = f"numpy with {bug}"
        self.attention = self.backend.attention
        self.attention_vjp = self.backend.attention_vjp
        self.asarray = self.backend.asarray
        self.to_numpy = self.backend.to_numpy

    def _bad_mask(self, q: np.ndarray, k: np.ndarray, cu_q: np.ndarray, cu_k: np.ndarray,
                  keywords: dict[str, Any]) -> np.ndarray:
        mask = varlen_mask(cu_q, cu_k, total_q=q.shape[0], total_k=k.shape[0], causal=keywords.get("causal", False),
                           alignment=keywords.get("alignment", "top_left"), window=keywords.get("window"),
                           seqused_k=keywords.get("seqused_k"))
        if self.bug == "attends_across_segments" and k.shape[0]:
            mask[: cu_q[-1], 0] = True  # every query also sees the first key token, whatever its segment
        if self.bug == "writes_tokens_beyond":
            mask[cu_q[-1]:, :] = True  # tokens in no segment attend every key
        return mask

    def varlen_attention(self, q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, **keywords: Any) -> Any:
        if self.bug == "bottom_right_as_top_left":
            return self.backend.varlen_attention(q, k, v, cu_q, cu_k, **{**keywords, "alignment": "top_left"})
        if self.bug in ("attends_across_segments", "writes_tokens_beyond"):
            mask = self._bad_mask(q, k, np.asarray(cu_q), np.asarray(cu_k), keywords)
            result = self.backend.attention(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), mask=mask,
                                            scale=keywords.get("scale"), softcap=keywords.get("softcap"),
                                            return_lse=True)
            return AttentionOutput(result.out.swapaxes(0, 1), None, result.lse)
        return self.backend.varlen_attention(q, k, v, cu_q, cu_k, **keywords)

    def varlen_attention_vjp(self, q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, d_out: Any, **keywords: Any) -> Any:
        if self.bug == "gradients_top_left":
            keywords = {**keywords, "alignment": "top_left"}
        return self.backend.varlen_attention_vjp(q, k, v, cu_q, cu_k, d_out, **keywords)


#: (bug, property that must FAIL on it).
CAUGHT = [
    ("bottom_right_as_top_left", "varlen_equals_each_segments_attention"),
    ("bottom_right_as_top_left", "varlen_equals_dense_with_varlen_mask"),
    ("writes_tokens_beyond", "varlen_equals_each_segments_attention"),
    ("attends_across_segments", "varlen_equals_each_segments_attention"),
    ("attends_across_segments", "segments_are_independent"),
    ("gradients_top_left", "varlen_gradients_match_each_segment"),
]


@pytest.mark.usefixtures("without_shrinking")
@pytest.mark.parametrize(("bug", "name"), CAUGHT, ids=[f"{bug}-{name}" for bug, name in CAUGHT])
def test_planted_varlen_bug_fails_the_property(bug: str, name: str) -> None:
    prop = get_property(name)
    with pytest.raises(BaseException) as caught:
        run_property(prop, PlantedVarlenBug(bug))
    assert failure_outcome(prop.name, prop.rules, caught.value).status is Status.FAIL, caught.value


def test_the_unplanted_wrapper_passes() -> None:
    """The wrapper itself plants nothing: every rule 20 property passes on it without a bug."""
    for name in ("varlen_equals_each_segments_attention", "segments_are_independent"):
        run_property(get_property(name), PlantedVarlenBug("none"))


@settings(max_examples=25, deadline=None)
@given(varlen_cases(ALL_FEATURES))
def test_varlen_cases_are_valid_and_record_as_plain_values(case: VarlenCase) -> None:
    cu_q, cu_k = case.cu_seqlens_q, case.cu_seqlens_k
    assert cu_q[0] == 0 and cu_k[0] == 0 and np.all(np.diff(cu_q) >= 0) and np.all(np.diff(cu_k) >= 0)
    assert cu_q[-1] <= case.q.shape[0] and cu_k[-1] <= case.k.shape[0] and cu_q.size == cu_k.size
    assert case.q.shape[1] % case.k.shape[1] == 0 and case.k.shape[:2] == case.v.shape[:2]
    record = json.loads(json.dumps(case.record()))
    assert record["kind"] == "varlen" and record["cu_seqlens_q"] == cu_q.tolist()
    assert record["repr"].startswith("VarlenCase(") and f"cu_seqlens_k={cu_k.tolist()!r}" in record["repr"]
    packed = case.packed()
    for b in range(case.num_segments):  # the packed mask's block of a segment is the segment's own pattern
        rows, keys = case.query_rows(b), case.key_rows(b)
        assert np.array_equal(packed.mask[rows, keys], case.segment(b).allowed()[0])


def test_cases_reach_the_corners() -> None:
    """Zero-length segments, tokens in no segment, seqused_k, GQA, E != Ev and bottom-right causal are all
    drawn, within the examples the property suite gives rule 20 (tests/test_properties.py)."""
    from .test_properties import VARLEN_EXAMPLES

    seen: set[str] = set()

    @settings(max_examples=VARLEN_EXAMPLES, deadline=None, derandomize=True)
    @given(varlen_cases(ALL_FEATURES))
    def draw(case: VarlenCase) -> None:
        lengths = np.diff(case.cu_seqlens_q)
        seen.update(name for name, hit in (
            ("no_segments", case.num_segments == 0), ("zero_length", bool((lengths == 0).any())),
            ("beyond", case.q.shape[0] > case.cu_seqlens_q[-1]), ("seqused_k", case.seqused_k is not None),
            ("gqa", case.q.shape[1] > case.k.shape[1]), ("value_dim", case.v.shape[-1] != case.q.shape[-1]),
            ("bottom_right_causal", case.causal and case.alignment == "bottom_right")) if hit)

    draw()
    assert seen == {"no_segments", "zero_length", "beyond", "seqused_k", "gqa", "value_dim", "bottom_right_causal"}
