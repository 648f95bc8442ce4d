"""Shared fixtures: real servers started once per session on free ports (see tests/fixtures/)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

pytest_plugins = ["tests.fixtures.triton", "tests.fixtures.mesh", "tests.fixtures.cache", "tests.fixtures.limiter"]

# What the operator's tools read from the environment or the default state folder (llmesh/paths.py): a mesh the
# operator runs on this machine (its client certificate, its Redis password) must not reach the tools the tests
# start. A clean-clone run failed on it: `llmesh quota` presented a running mesh's certificate to a test's
# plaintext limiter.
_OPERATOR_ENV = ("LLMESH_MTLS_DIR", "LLMESH_REDIS_PASSWORD", "LLMESH_REDIS_PASSWORD_FILE")


_STATE_DIR = tempfile.mkdtemp(prefix="llmesh-test-state-")


def pytest_configure(config: pytest.Config) -> None:
    for name in _OPERATOR_ENV:
        os.environ.pop(name, None)
    os.environ["LLMESH_STATE_DIR"] = _STATE_DIR


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_STATE_DIR, ignore_errors=True)
