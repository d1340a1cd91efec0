"""Shared pytest fixtures."""

import pyro
import pytest


@pytest.fixture(autouse=True)
def _pyro_state():
    """Validation on, empty param store and a fixed seed for every test."""
    pyro.enable_validation(True)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
