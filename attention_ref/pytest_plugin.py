"""The attention_ref pytest plugin (being built: issue 12)."""

from __future__ import annotations

from typing import Any


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "attention_kernel(framework, supports=(), **check_options): check the "
                                       "kernel the test function returns, one test item per property")
