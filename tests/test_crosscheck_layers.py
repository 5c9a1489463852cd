"""The crosscheck's framework layers: each layer target is checked with ``check_layer`` in a worker
and gets its own matrix, a row per layer property; a property name of either kind selects."""

from __future__ import annotations

from attention_ref.testing.crosscheck import crosscheck
from attention_ref.testing.layer_targets import LayerTarget
from attention_ref.testing.report import Status

from .conftest import import_or_skip


def test_layer_targets_get_their_own_matrix() -> None:
    import_or_skip("torch")
    report = crosscheck(only=("torch nn.MultiheadAttention", "torch MHA is_causal hint", "torch.sdpa[MATH]"),
                        properties=("layer_matches_reference", "matches_float64_oracle"), max_examples=40, workers=1)
    names = [target.name for target, _, _ in report.results]
    assert sorted(names) == ["torch MHA is_causal hint", "torch nn.MultiheadAttention", "torch.sdpa[MATH]"]
    text = report.render()
    assert "1 framework kernels against SPEC.md" in text and "2 framework layers against SPEC.md" in text
    by_name = {target.name: (target, result) for target, result, _ in report.results}
    mha, mha_report = by_name["torch nn.MultiheadAttention"]
    assert isinstance(mha, LayerTarget)
    statuses = {o.name: o.status for o in mha_report.outcomes}
    # torch's head-averaged weights are its declared convention, verified: "differs", never hidden.
    assert statuses["layer_matches_reference"] in (Status.PASS, Status.CONVENTION_DIFFERS), str(mha_report)
    assert all(s == Status.NOT_RUN for name, s in statuses.items() if name != "layer_matches_reference")
    # The is_causal hint replaces the mask: a FAIL with the shrunk call, never an ERROR.
    hint = {o.name: o.status for o in by_name["torch MHA is_causal hint"][1].outcomes}
    assert hint["layer_matches_reference"] == Status.FAIL
    assert {o.name: o.status for o in by_name["torch.sdpa[MATH]"][1].outcomes}["matches_float64_oracle"] == Status.PASS
