"""Shared pytest fixtures: Pyro's state for every test, and small simulated data files made once a session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``simulated(n_patterns, truth_grid, chunk=256, **settings) -> Path``: a small simulated data file (2CEX on
    reference-32, artifacts FPB, 1e4 photons, seed 3 unless ``settings`` say otherwise), simulated once per
    session for each set of arguments and shared by every test that asks for it: read it, never change it."""
    from bayes_spi.sim.simulate import simulate

    made: dict[tuple[Any, ...], Path] = {}

    def make(n_patterns: int, truth_grid: int, chunk: int = 256, **settings: Any) -> Path:
        kwargs = {"artifacts": "FPB", "mean_photons": 1e4, "seed": 3, **settings}
        key = (n_patterns, truth_grid, chunk, *sorted(kwargs.items()))
        if key not in made:
            path = tmp_path_factory.mktemp("data") / "tiny.h5"
            simulate("2CEX", "reference-32", n_patterns, path, truth_grid=truth_grid, chunk=chunk, progress=False,
                     **kwargs)
            made[key] = path
        return made[key]

    return make
