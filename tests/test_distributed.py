"""Data-parallel fitting on torch.distributed (gloo, 2 CPU processes): one step's gradients on two processes,
each with its half of a batch, equal one process's gradients on the union batch; the exact EMC iterations'
sums over two ranks equal one process's; a 2-process fit through the command line (each rank with the
environment ``torchrun`` gives it) writes one run directory and resumes after being killed."""

from __future__ import annotations

import csv
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pyro
import pytest
import torch
import torch.multiprocessing as mp

from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.infer import distributed
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.distributed import shard_slice
from bayes_spi.models.spi import SPIBatch

N_PATTERNS = 96
CONFIG = dict(batch_size=24, field="hybrid", voxel_grid=9, field_width=16, n_heads=1, pixels_per_pattern=64,
              search_rotations=256, cache_grid=17, emc_pixels=128, clip_norm=1e12, device="cpu", seed=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fixed_randn(*size: Any, dtype: torch.dtype | None = None, device: Any = None, **_: Any) -> torch.Tensor:
    """``torch.randn`` with every draw 0.3: the reparameterised samples become a deterministic function of the
    parameters, the same for a pattern whichever process holds it."""
    shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
    return torch.full(shape, 0.3, dtype=dtype or torch.get_default_dtype(), device=device)


@contextmanager
def _fixed_noise():
    fake_std = lambda shape, dtype, device: _fixed_randn(shape, dtype=dtype, device=device)  # noqa: E731
    with mock.patch("torch.randn", _fixed_randn), mock.patch("torch.distributions.normal._standard_normal", fake_std):
        yield


def _trainer(data: str, run_dir: str):
    from bayes_spi.infer.trainer import Trainer

    pyro.clear_param_store()
    pyro.set_rng_seed(CONFIG["seed"])
    trainer = Trainer(SPIDataset(data), FitConfig(**CONFIG), run_dir, progress=False)
    trainer.initialise_offset()
    trainer.dist.broadcast_modules([trainer.model, trainer.guide])
    return trainer


def _first_batch(trainer) -> np.ndarray:
    """The first global batch of epoch 0 (shuffled), the held-out probe patterns removed."""
    idx = next(iter(trainer.dataset.batch_indices(trainer.config.batch_size, shuffle=True, seed=trainer.config.seed)))
    return idx[~np.isin(idx, trainer.holdout)]


def _one_step_gradients(trainer, idx: np.ndarray, emc: bool) -> dict[str, Any]:
    """Gradients (after the cross-rank reduction) and loss of one step on ``idx``; the parameters are restored."""
    grads: dict[str, torch.Tensor] = {}
    names = {id(p): n for m, tag in ((trainer.model, "model"), (trainer.guide, "guide"))
             for n, p in ((f"{tag}.{k}", v) for k, v in m.named_parameters())}
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def record() -> None:
        for p in trainer.params:
            if p.grad is not None:
                grads[names[id(p)]] = p.grad.detach().clone()

    pixels, n_eligible = trainer.select_pixels(0, trainer.config.emc_pixels if emc else None)
    batch = SPIBatch(torch.as_tensor(trainer.dataset.read(idx)), torch.as_tensor(idx), pixels, n_eligible)
    with _fixed_noise(), mock.patch.object(trainer.optim, "step", record):
        loss = trainer.emc_step(batch) if emc else trainer.step(batch)
    trainer.model.load_state_dict(state)  # the level shift of the step undone: the next stage starts alike
    return {"grads": grads, "loss": loss, "log_offset": float(trainer.model.field.log_offset.detach()),
            "level": trainer.batch_log_scale}


def _polish(trainer, dist: Any = None) -> dict[str, Any]:
    from bayes_spi.infer.polish import EMCPolish

    field = trainer.model.field
    pol = EMCPolish(trainer.model, trainer.emc.rotations, cache_grid=field.n_voxel, batch_size=16,
                    exclude=trainer.holdout)
    pixels = torch.nonzero(trainer._good).squeeze(-1)
    stats = pol.iterate(trainer.dataset, pixels, dist=dist)
    return {"stats": stats.to_dict(), "residual": field.residual.detach().clone()}


def _worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    dist = distributed.setup_from_env("cpu")
    try:
        trainer = _trainer(data, os.path.join(out, f"run{rank}"))
        idx = _first_batch(trainer)
        mine = idx[shard_slice(len(idx), rank, world)]
        result = {"svi": _one_step_gradients(trainer, mine, emc=False),
                  "emc": _one_step_gradients(trainer, mine, emc=True),
                  "n_local": len(mine), "polish": _polish(trainer, dist)}
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def runs(simulated, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two gloo ranks (forked) and one process, on the same data, settings and first batch."""
    data = str(simulated(N_PATTERNS, truth_grid=17, chunk=32))
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(2, _free_port(), data, str(out)), nprocs=2, start_method="fork")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # one thread, as each rank: float32 sums in another blocking order moved a nearly empty voxel's log I of the
    # one-process merge by > 1e-4 against the ranks' (with two threads, `make test`'s default)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = _trainer(data, str(out / "single"))
        idx = _first_batch(trainer)
        single = {"svi": _one_step_gradients(trainer, idx, emc=False),
                  "emc": _one_step_gradients(trainer, idx, emc=True), "polish": _polish(trainer)}
    finally:
        torch.set_num_threads(threads)
    return {"ranks": ranks, "single": single, "n": len(idx)}


@pytest.mark.parametrize("stage", ["svi", "emc"])
def test_two_processes_give_the_union_batch_gradient(runs: dict[str, Any], stage: str) -> None:
    r0, r1, one = runs["ranks"][0][stage], runs["ranks"][1][stage], runs["single"][stage]
    assert runs["ranks"][0]["n_local"] + runs["ranks"][1]["n_local"] == runs["n"]
    assert runs["ranks"][0]["n_local"] > 0 and runs["ranks"][1]["n_local"] > 0
    assert set(r0["grads"]) == set(one["grads"]) and len(one["grads"]) > 3
    # float32 sums in another order: compare against the scale of the whole gradient (a parameter whose exact
    # gradient is 0, e.g. the level under the EMC stage's profiled scale, holds only rounding noise)
    flat_a = torch.cat([r0["grads"][n].double().reshape(-1) for n in sorted(one["grads"])])
    flat_g = torch.cat([one["grads"][n].double().reshape(-1) for n in sorted(one["grads"])])
    assert float((flat_a - flat_g).norm() / flat_g.norm()) < 1e-5
    scale = float(flat_g.abs().max())
    for name, g in one["grads"].items():
        a, b = r0["grads"][name], r1["grads"][name]
        assert torch.equal(a, b), name  # every rank holds the same reduced gradient
        assert torch.allclose(a.double(), g.double(), rtol=1e-4, atol=1e-6 * scale), (
            name, float((a - g).abs().max()), scale)
    # a rank's own half-batch gradient is not the union's: the test can fail
    assert r0["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert r1["loss"] == r0["loss"]
    assert r0["log_offset"] == pytest.approx(one["log_offset"], abs=1e-5)
    if stage == "svi":  # the union batch's mean profile log scale (the next step's level shift)
        assert r0["level"] == pytest.approx(one["level"], abs=1e-5) and r1["level"] == r0["level"]


def test_polish_sums_over_two_ranks_equal_one_process(runs: dict[str, Any]) -> None:
    p0, p1, one = runs["ranks"][0]["polish"], runs["ranks"][1]["polish"], runs["single"]["polish"]
    assert torch.equal(p0["residual"], p1["residual"])
    assert torch.allclose(p0["residual"], one["residual"], rtol=1e-4, atol=1e-4)
    assert float((one["residual"] - runs["ranks"][0]["polish"]["residual"]).abs().max()) < 1e-3
    for key in ("mean_loglik", "mean_entropy", "mean_max_weight", "filled", "change"):
        assert p0["stats"][key] == pytest.approx(one["stats"][key], rel=1e-5, abs=1e-6), key


def test_local_slices_cover_the_batch_once() -> None:
    for n in (2, 5, 24, 97):
        for world in (1, 2, 3, 8):
            if n < world:
                continue
            parts = [np.arange(n)[shard_slice(n, r, world)] for r in range(world)]
            assert np.array_equal(np.concatenate(parts), np.arange(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


# ---------------------------------------------------------------------------------------------- the CLI
TINY = ["--batch-size", "16", "--epochs", "2", "--field-width", "16", "--n-heads", "1", "--pixels-per-pattern",
        "64", "--grid", "9", "--no-progress", "--no-truth", "--polish-iterations", "1", "--search-rotations", "512",
        "--log-every", "1", "--checkpoint-every", "2", "--device", "cpu"]


def _cli_rank(rank: int, world: int, port: int, args: list[str]) -> None:
    """One rank of a fit through the command line, with the environment torchrun would give it."""
    from bayes_spi.cli.main import cli

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    cli.main(args=args, prog_name="bayes-spi", standalone_mode=False)


def test_two_process_fit_writes_one_run_and_resumes_after_a_kill(simulated, tmp_path: Path, capfd) -> None:
    data = simulated(N_PATTERNS, truth_grid=17, chunk=32)
    run = tmp_path / "run"
    # first leg: two ranks forked from this process (no start-up), killed at their first checkpoint
    ctx = mp.start_processes(_cli_rank, args=(2, _free_port(), ["fit", str(data), "-o", str(run), *TINY]),
                             nprocs=2, start_method="fork", join=False)
    deadline = time.monotonic() + 120
    try:
        while not (run / "checkpoint.pt").exists():
            if not all(p.is_alive() for p in ctx.processes):
                pytest.fail("fit ended before its first checkpoint")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint.pt after 120 s")
            time.sleep(0.01)
    finally:
        for p in ctx.processes:
            p.kill()
            p.join()
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert not (run / "model.pt").exists(), "the run finished before it was killed: the test proves nothing"
    assert ck["world_size"] == 2 and len(ck["rank_rng"]) == 2
    assert not torch.equal(ck["rank_rng"][0], ck["rank_rng"][1])  # each rank its own stream
    step_at_kill = ck["state"]["step"]
    assert 2 <= step_at_kill < 12

    # second leg: continue the run (rank 0 takes over the dead rank 0's lock)
    capfd.readouterr()
    mp.start_processes(_cli_rank, args=(2, _free_port(), ["fit", str(data), "-o", str(run), "--resume",
                                                         "--no-progress", "--no-truth"]),
                       nprocs=2, start_method="fork")
    out = capfd.readouterr().out
    assert out.count("run directory:") == 1, out  # rank 0 alone reports
    files = sorted(p.name for p in run.iterdir())
    assert not [f for f in files if "rank" in f or f.endswith(".tmp")], files
    final = torch.load(run / "model.pt", weights_only=True)
    assert final["state"]["step"] == 12 and final["state"]["polished"] == 1
    # every pattern but the held-out probe, twice, counted over both ranks
    n_hold = min(max(2, N_PATTERNS // 32), 256)
    assert final["state"]["images_seen"] == 2 * (N_PATTERNS - n_hold)
    with open(run / "metrics.csv", newline="") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh)]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # no row lost or written twice across the kill
    log = (run / "run.log").read_text()
    assert "resumed from" in log and "data-parallel: 2 processes (torch.distributed, gloo)" in log


def test_half_sets_refuse_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bayes_spi.workflows.errors import WorkflowError
    from bayes_spi.workflows.fit import run_halfsets

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(WorkflowError, match="--half-sets runs in one process: expected no torchrun"):
        run_halfsets(tmp_path / "data.h5", tmp_path / "run", {})
    assert not (tmp_path / "run").exists()
