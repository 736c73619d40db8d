"""Shared pytest hooks: `@pytest.mark.slow` tests run only with PFQ_SLOW=1."""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PFQ_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set PFQ_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
