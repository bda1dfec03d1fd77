"""Every test in this folder starts an outside tool: each carries the ``tooling`` marker, so
``pytest -m 'not tooling'`` (``make unit``) leaves them out."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark this folder's tests before ``-m`` selects (a conftest's hook sees every item)."""
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.tooling)
