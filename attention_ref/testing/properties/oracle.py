"""Agreement with the float64 oracle: the property every rule's cases go through (registered first).

rule 10: accuracy: out, weights and lse match the float64 oracle within the tolerance rule
(``attention_ref.tolerance``), on cases drawn with every feature and every dtype, so across
rule 1: layout (rank 2, batch dims, empty shapes), rule 2: grouped-query attention,
rule 3: scale, rule 4: softcap, rule 5: bias, rule 6: mask and rule 7: causal and sliding windows.
"""

from __future__ import annotations

from ..assertions import assert_matches_oracle
from ..cases import AttentionCase
from ..implementation import Subject
from ..runner import attention_property


@attention_property("matches_float64_oracle", (1, 2, 3, 4, 5, 6, 7, 10), cases={})
def matches_float64_oracle(subject: Subject, case: AttentionCase) -> None:
    """out, weights and lse match the float64 oracle within the tolerance rule (every feature, every dtype)."""
    assert_matches_oracle(subject, case)
