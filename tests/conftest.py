"""Shared fixtures: real servers started once per session on free ports (see tests/fixtures/)."""

pytest_plugins = ["tests.fixtures.triton", "tests.fixtures.mesh", "tests.fixtures.cache", "tests.fixtures.limiter"]
