"""Shared pytest fixtures: Pyro's state for every test, and small simulated data files made once a session."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyro
import pytest

#: a hand-written AGIPD-like CrystFEL geometry (tests/test_crystfel.py computes its pixels by hand)
AGIPD_GEOM = Path(__file__).parent / "data" / "crystfel" / "agipd.geom"


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


@pytest.fixture
def write_agipd_geom(tmp_path: Path) -> Callable[..., Path]:
    """``write(text=None, flags=None) -> tmp_path/agipd.geom``: the AGIPD-like CrystFEL geometry of
    tests/data/crystfel/agipd.geom (2 modules of 2 asics of 3 x 5 pixels, frames ``(N, 2, 6, 5)``; or ``text``) and
    the mask file it names, ``tmp_path/mask.h5`` with the flags ``(2, 6, 5)`` uint16 (all good unless given)."""
    import h5py
    import numpy as np

    def write(text: str | None = None, flags: Any = None) -> Path:
        path = tmp_path / "agipd.geom"
        path.write_text(AGIPD_GEOM.read_text() if text is None else text)
        with h5py.File(tmp_path / "mask.h5", "w") as f:
            f["entry_1/instrument_1/detector_1/mask"] = np.zeros((2, 6, 5), np.uint16) if flags is None else flags
        return path

    return write


@pytest.fixture
def one_thread():
    """Small tensors: one torch thread is faster than two on a shared machine (restored afterwards).

    Modules use it for all their tests with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fit_in_background() -> Callable[..., contextlib.AbstractContextManager[subprocess.Popen]]:
    """``with fit_in_background(data, run, args, cwd) as proc:`` (see :func:`_fit_in_background`)."""
    return _fit_in_background


@contextlib.contextmanager
def _fit_in_background(data: Path, run: Path, args: list[str], cwd: Path,
                      timeout_s: float = 90.0) -> Iterator[subprocess.Popen]:
    """A ``bayes-spi fit DATA -o RUN ARGS`` in another process, yielded once ``RUN/checkpoint.pt`` exists.

    Fails the test if the fit ends before its first checkpoint or none appears within ``timeout_s``; the
    process is killed on leaving the block if it is still running (its stderr is kept in ``proc.stderr``).
    """
    proc = subprocess.Popen([sys.executable, "-m", "bayes_spi.cli.main", "fit", str(data), "-o", str(run),
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    try:
        deadline = time.monotonic() + timeout_s
        while not (run / "checkpoint.pt").exists():
            if proc.poll() is not None:
                pytest.fail(f"fit ended before its first checkpoint: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint.pt after {timeout_s:.0f} s")
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
