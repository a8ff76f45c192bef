"""Fixtures shared with the compute tests."""

from tests.compute.conftest import store_dir  # noqa: F401 - the same private layer store
