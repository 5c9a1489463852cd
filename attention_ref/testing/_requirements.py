"""Imported first by ``attention_ref.testing``: without the ``verify`` extra (hypothesis, ml_dtypes),
an ImportError that says what to install, instead of a ModuleNotFoundError from deep inside."""

from __future__ import annotations

import importlib.util

for _needed in ("hypothesis", "ml_dtypes"):
    if importlib.util.find_spec(_needed) is None:
        raise ImportError(
            f"attention_ref.testing (verify, check, crosscheck) needs {_needed}, which is not installed; "
            "install it with: pip install 'attention_ref[verify]'"
        )
