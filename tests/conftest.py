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


# ----------------------------------------------------------------------------------------------
# The small study and its uninterrupted sweep, shared by the reliability tests.
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    """A persistent compilation cache for the session's `python -m pfq.train` subprocesses."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="session")
def volume_cache(tmp_path_factory):
    """PFQ_CACHE for the session's runs (preprocessed volumes)."""
    return tmp_path_factory.mktemp("pfq_cache")


@pytest.fixture(scope="session")
def small_study(tmp_path_factory):
    from studykit import write_study

    return write_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="session")
def small_reference(small_study, jax_cache, volume_cache, tmp_path_factory):
    """The workdir of an uninterrupted `studykit.SMALL_SWEEP` run on `small_study`."""
    from studykit import run_train

    workdir = tmp_path_factory.mktemp("reference")
    proc = run_train(workdir, small_study, jax_cache=jax_cache, pfq_cache=volume_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir
