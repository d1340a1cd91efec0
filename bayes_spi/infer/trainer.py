"""Stochastic variational inference, one mini-batch at a time, with exact resume.

The trainer streams batches from an :class:`~bayes_spi.dataio.h5.SPIDataset` (memory does not grow
with the data set), takes one ``TraceEnum_ELBO`` step per batch (the guide's pose hypotheses are
enumerated exactly), writes ``metrics.csv`` and an atomic checkpoint every ``checkpoint_every``
steps, and resumes a killed run from its last checkpoint with the same data order, pixel subsets and
random numbers.

Schedules (functions of the step ``t`` out of ``T``): learning rate ``lr -> lr_final`` geometric;
coarse-to-fine radius ``r(t)`` from ``radius_start`` to 1 over ``radius_ramp * T``; hypothesis-weight
floor from ``weight_floor`` to 0 over ``floor_decay * T``.

Example (see ``bayes_spi.cli.fit`` for the command line)::

    trainer = Trainer(SPIDataset("data.h5"), FitConfig(epochs=2), "run/")
    trainer.fit()
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyro
import numpy as np
import torch
from pyro.infer import TraceEnum_ELBO

from bayes_spi.atomic import atomic_path
from bayes_spi.config.commands import flag
from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.infer.build import build_model_and_guide
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.elbo_terms import site_terms
from bayes_spi.infer import distributed
from bayes_spi.infer.rundir import FORMAT_VERSION_KEY, RunDir
from bayes_spi.guides.amortized import PosePosterior
from bayes_spi.models.spi import MAX_PLATE_NESTING, SPIBatch

__all__ = ["Trainer", "TrainState", "resolve_device", "atomic_torch_save", "METRIC_FIELDS"]

#: learning rate of a measured background's scale, relative to ``FitConfig.lr``
BACKGROUND_LR_FACTOR: float = 20.0

log = logging.getLogger("bayes_spi")

#: ``metrics.csv`` columns. The ELBO terms (per image: the batch's terms over ``n_total``) come from the model and
#: guide traces at one draw (:func:`bayes_spi.infer.elbo_terms.site_terms`) and sum to that draw's ELBO:
#: ``loglik - kl_pose - kl_scale - kl_hypothesis - kl_amplitude - kl_class - kl_latent - kl_other +
#: log_intensity_prior`` (``kl_amplitude`` times the field's ``kl_weight``, as in the objective; a global term's
#: per-image share is its value over ``n_total``; terms a model does not have are 0; ``kl_other``: sites of a
#: custom model not named here). ``elbo_per_image`` is the mean of the steps' ELBOs since the last row.
METRIC_FIELDS = [
    "step", "epoch", "images_seen", "elbo_per_image", "loglik_per_image", "kl_pose", "kl_scale",
    "kl_hypothesis", "effective_poses", "radius", "lr", "images_per_s", "elapsed_s",
    "kl_amplitude", "kl_class", "kl_latent", "kl_other", "log_intensity_prior",
]
#: the trace sites behind the ``kl_*`` columns
_KL_SITES = ("pose", "scale", "hypothesis", "amplitude", "class", "latent")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` to ``path.tmp`` then ``os.replace``: a reader never sees a half-written file."""
    from bayes_spi.torchfile import save_torch_file  # tensors and plain values only (read with weights_only)

    save_torch_file(obj, path)


@dataclass
class TrainState:
    """Where a fit is: enough, with the module/optimizer/RNG states, to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    images_seen: int = 0
    elapsed_s: float = 0.0
    elbo_acc: float = 0.0  # running sum of per-image ELBOs since the last metrics row
    n_acc: int = 0
    planned_steps: int = 0  # > 0: the schedule's length set by --max-minutes from measured throughput
    planned_emc_end: int = -1  # >= 0: where the EMC warm start ended (fixed once it has)
    planned_phases: int = 0  # bit 1: planned during the EMC warm start, bit 2: during SVI
    polished: int = 0  # exact EMC iterations done at the end (config.polish_iterations)


class Trainer:
    """SVI on one data set into one run directory.

    Args:
        dataset: the patterns (validated on open).
        config: all settings.
        run_dir: where ``checkpoint.pt``, ``metrics.csv`` and the final outputs go.
        progress: show a progress bar (images, images/s, ELBO, ETA).
        model, guide: pre-built modules (e.g. a custom model from Python); default from ``config``.
    """

    def __init__(
        self,
        dataset: SPIDataset,
        config: FitConfig,
        run_dir: str | os.PathLike,
        progress: bool = True,
        model: torch.nn.Module | None = None,
        guide: torch.nn.Module | None = None,
    ) -> None:
        self.dataset = dataset
        self.config = config
        self.run_dir = Path(run_dir)
        self.dist = distributed.current()  # one process: LOCAL, every hook below a no-op
        self.progress = progress and self.dist.is_main
        self.device = self.dist.device_for(resolve_device(config.device))
        if (model is None) != (guide is None):
            raise ValueError("expected both a model and a guide, or neither")
        if model is None:
            pyro.set_rng_seed(config.seed)
            from bayes_spi.infer.build import build_background

            model, guide = build_model_and_guide(
                dataset.geometry, config, self.device,
                background=build_background(config, dataset.geometry, dataset.n_patterns))
        self.model, self.guide = model.to(self.device), guide.to(self.device)
        q = self.model.q
        self._qnorm = q.norm(dim=-1)
        self._q_max = float(self._qnorm.max())
        self._good = torch.as_tensor(dataset.mask.reshape(-1), device=self.device)
        self._set_data_size(dataset.n_patterns)  # n_total, batches_per_epoch, data_steps
        self.state = TrainState()
        self.pixel_gen = torch.Generator(device="cpu").manual_seed(config.seed + 1)
        self.params = [p for m in (self.model, self.guide) for p in m.parameters() if p.requires_grad]
        # a measured background's scale (bayes_spi.models.background): one number (or one a pattern, seen once an
        # epoch) that must move by tens of percent within a short fit: its own group at BACKGROUND_LR_FACTOR x lr
        bg_ids = {id(p) for p in getattr(self.model, "background", None).parameters()} \
            if getattr(self.model, "background", None) is not None else set()
        groups = [{"params": [p for p in self.params if id(p) not in bg_ids]}]
        if bg_ids:
            groups.append({"params": [p for p in self.params if id(p) in bg_ids],
                           "lr": config.lr * BACKGROUND_LR_FACTOR})
        self.optim = torch.optim.Adam(groups, lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optim, lambda t: self.lr(t) / config.lr)
        self.elbo = TraceEnum_ELBO(max_plate_nesting=MAX_PLATE_NESTING)
        # a held-out probe set for the truth-free verdict (bayes_spi.infer.verdict): 1/32 of the patterns (2 to 256),
        # evenly spread over the file, never trained on, so that its information gain cannot come from the field
        # fitting the noise of the patterns it was trained on ("Einstein from noise"); its most probable poses
        # are recorded at every checkpoint
        n_hold = min(max(2, self.n_total // 32), 256, max(self.n_total - 1, 1))
        self.holdout = np.unique(np.linspace(0, self.n_total - 1, n_hold).round().astype(np.int64))
        probe = dataset.read(self.holdout[:128])
        self.probe_images = torch.as_tensor(probe, device=self.device)
        # fixed (comparable between checkpoints), drawn in proportion to the data's mean counts: on a large detector
        # with few photons a uniform 1,024 pixels hold too few photons to place a pattern (BENCHMARKS.md, issue 11)
        good_idx = torch.nonzero(self._good).squeeze(-1)
        u = torch.rand(good_idx.numel(), generator=torch.Generator().manual_seed(config.seed + 3), dtype=torch.float64)
        keys = self.pixel_photons()[good_idx.cpu()].log() - torch.log(-torch.log(u.clamp(min=1e-300)))
        pick = torch.topk(keys, min(1024, good_idx.numel())).indices
        self.probe_pixels = good_idx[pick.to(good_idx.device)].sort().values
        self.probe_last: torch.Tensor | None = None
        self.probe_previous: torch.Tensor | None = None
        self._probe_step: tuple[int, int] = (-1, -1)  # (step, exact EMC iterations done) of the last record
        self.probe_previous_step: tuple[int, int] = (-1, -1)  # the same of the record before it
        self.batch_log_scale: float | None = None  # see recentre_level
        self._emc = None
        self.emc_terms: dict[str, float] = {}
        self._share, self._n_global = 1.0, 0  # this rank's share of the step's batch, the batch's size

    def _set_data_size(self, n: int) -> None:
        """``N`` (the ELBO's plate size) and the schedule's data batches from ``n`` patterns."""
        c = self.config
        self.n_total = int(n)
        self.batches_per_epoch = math.ceil(self.n_total / c.batch_size)
        self.data_steps = self.batches_per_epoch * (1 if c.online else c.epochs)
        if c.max_images is not None:
            self.data_steps = min(self.data_steps, math.ceil(c.max_images / c.batch_size))

    @property
    def following(self) -> bool:
        """The data file is still being written (``fit --follow``, :mod:`bayes_spi.dataio.follow`)."""
        return bool(getattr(self.dataset, "following", False))

    def _sync_data_size(self) -> None:
        """A followed file grows: ``N`` and the schedule follow the patterns that have arrived (with
        ``max_images`` the schedule's length stays fixed); the EMC warm start, once over, stays over."""
        n = self.dataset.n_patterns
        if n == self.n_total:
            return
        st = self.state
        if st.planned_emc_end < 0 and not self.in_emc(st.step):
            st.planned_emc_end = self.emc_end
        self._set_data_size(n)

    # ---------------------------------------------------------------- schedules
    @property
    def total_steps(self) -> int:
        """Data batches in the schedule: all epochs (or ``max_images``), or fewer when ``max_minutes`` sized it."""
        planned = self.state.planned_steps
        return min(planned, self.data_steps) if planned > 0 else self.data_steps

    #: SVI images/s relative to the EMC warm start's, assumed until SVI's own rate is measured
    SVI_RATE_GUESS = 1.0 / 6.0

    def plan_for_budget(self, emc: bool, rate_batches_per_s: float) -> None:
        """Size the schedule so that it completes within ``max_minutes`` at the measured rate.

        Called once in each phase (after a few steps): the schedules (radius, learning rate, weight floor,
        EMC hand-over) then run to their end inside the budget instead of being cut off by it, whatever the
        machine's speed; the result is recorded in the checkpoint (an exact resume keeps it).
        """
        st, c = self.state, self.config
        rate_batches_per_s = self.dist.broadcast_float(rate_batches_per_s)  # every rank plans alike
        if c.max_minutes is None or not rate_batches_per_s > 0:
            return
        remaining = max(60.0 * c.max_minutes - st.elapsed_s, 0.0)
        f = c.emc_fraction
        if emc:
            r_e, r_s = rate_batches_per_s, rate_batches_per_s * self.SVI_RATE_GUESS
            t_new = (remaining + st.step / r_e) / (f / r_e + (1 - f) / r_s) if f > 0 else st.step + remaining * r_s
        else:
            t_new = st.step + remaining * rate_batches_per_s
        t_new = max(int(t_new), st.step + 1)
        if t_new < self.data_steps:
            if st.planned_emc_end < 0 and not emc:
                st.planned_emc_end = self.emc_end
            st.planned_steps = t_new
            log.info("%s %.1f: schedule sized to %d of %d batches (%d images) from the measured %.1f "
                     "images/s%s", flag("max_minutes"), c.max_minutes, t_new, self.data_steps, t_new * c.batch_size,
                     rate_batches_per_s * c.batch_size, " (EMC warm start; SVI rate assumed 1/6 of it)" if emc else "")
        st.planned_phases |= 1 if emc else 2

    def radius(self, step: int) -> float:
        c = self.config
        ramp = c.radius_ramp * self.total_steps
        if ramp <= 0 or step >= ramp:
            return 1.0
        return c.radius_start + (1.0 - c.radius_start) * step / ramp

    def weight_floor(self, step: int) -> float:
        c = self.config
        decay = c.floor_decay * self.total_steps
        if decay <= 0 or step >= decay:
            return 0.0
        return c.weight_floor * (1.0 - step / decay)

    def lr(self, step: int) -> float:
        c = self.config
        return c.lr * (c.lr_final / c.lr) ** (step / max(self.total_steps, 1))

    def select_pixels(self, step: int, m: int | None = None, by_photons: bool = False) -> tuple[torch.Tensor, int]:
        """Good pixels with ``|q| <= r(step) q_max``, a random subset of ``m`` (default ``pixels_per_pattern``), one
        subset for the whole batch (``by_photons``: drawn with probability ~ :meth:`pixel_photons`); returns the subset ``(M,)`` and the number of eligible pixels it was drawn from
        (the ``pixels`` plate's size: the likelihood is scaled by ``n_eligible / M``)."""
        eligible = torch.nonzero(self._good & (self._qnorm <= self.radius(step) * self._q_max + 1e-12)).squeeze(-1)
        m = self.config.pixels_per_pattern if m is None else m
        if m == 0 or m >= eligible.numel():
            return eligible, int(eligible.numel())
        if by_photons:  # without replacement, probability ~ mean count (Gumbel top-k)
            u = torch.rand(eligible.numel(), generator=self.pixel_gen, dtype=torch.float64).clamp(min=1e-300)
            keys = self.pixel_photons()[eligible.cpu()].log() - torch.log(-torch.log(u))
            pick = torch.topk(keys, m).indices.to(eligible.device)
        else:
            pick = torch.randperm(eligible.numel(), generator=self.pixel_gen)[:m].to(eligible.device)
        return eligible[pick], int(eligible.numel())

    def pixel_photons(self, n_images: int = 1024) -> torch.Tensor:
        """Sampling weights of the pixels ``(P,)`` (CPU, float64): the mean count of each good pixel over the first
        ``n_images`` patterns plus a tenth of the average good pixel's (0 off the mask); computed once."""
        if getattr(self, "_pixel_photons", None) is None:
            _, counts = next(iter(self.dataset.iter_batches(n_images, shuffle=False)))
            mean = torch.as_tensor(counts.reshape(counts.shape[0], -1).mean(0), dtype=torch.float64)
            good = self._good.cpu()
            avg = float(mean[good].mean()) if bool(good.any()) else 0.0
            self._pixel_photons = torch.where(good, mean + 0.1 * avg + 1e-12, torch.zeros_like(mean))
        return self._pixel_photons

    @torch.no_grad()
    def initialise_offset(self, n_images: int = 1024) -> None:
        """Start the field at the data's mean level: ``log_offset = log(mean count / mean pixel factor)``;
        a field with a radial profile (:class:`~bayes_spi.models.fields.SirenField`) starts at the data's
        spherically averaged intensity (shell means of counts / pixel factor over ``n_images`` patterns).

        Without it the fluence scales absorb the overall level early and their KL dominates the ELBO.
        """
        _, counts = next(iter(self.dataset.iter_batches(n_images, shuffle=False)))
        good = self._good.cpu().numpy()
        flat = counts.reshape(counts.shape[0], -1)[:, good]
        bg = self.model.background_rate(torch.nonzero(self._good).squeeze(-1)) \
            if getattr(self.model, "background", None) is not None else None
        if bg is not None:  # the field starts at the signal's level: the measured background taken off
            flat = np.maximum(flat - bg.detach().cpu().double().numpy()[None], 0.0)
        mean_count = float(flat.mean())
        factor = self.model.log_pixel_factor[self._good].exp()
        self.model.field.log_offset.fill_(math.log(max(mean_count, 1e-6) / float(factor.mean())))
        if hasattr(self.model.field, "set_radial_profile"):
            from bayes_spi.analysis.sampling import radial_profile

            qn = self._qnorm[self._good].cpu().double().numpy()
            per_pixel = flat.mean(axis=0) / factor.cpu().double().numpy()
            n_shells = max(8, int(math.sqrt(int(good.sum()))))
            qc, prof = radial_profile(qn, per_pixel, n_shells)
            floor = max(float(prof[prof > 0].min()) if np.any(prof > 0) else 1e-12, 1e-30) * 0.5
            self.model.field.set_radial_profile(torch.as_tensor(qc), torch.as_tensor(np.log(np.maximum(prof, floor))))

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return RunDir(self.run_dir).path("checkpoint")

    @torch.no_grad()
    def probe_poses(self) -> torch.Tensor:
        """Most probable pose ``(n_probe, 3, 3)`` of each probe pattern under the current guide."""
        with self.guide.evaluating():
            post = self.guide.posterior(self.probe_images, self.probe_pixels)
        rows = torch.arange(post.weights.shape[0], device=post.weights.device)
        return post.rotations[rows, post.weights.argmax(-1)].detach().cpu()

    def _record_probe(self) -> None:
        # keyed on the step *and* the exact EMC iterations: the polish changes the field without a step, and
        # the verdict's stability check must compare the last two polished states, not the poses before the
        # polish with those after it (the polish moves them: that is its job)
        if (self.state.step, self.state.polished) == self._probe_step:
            return
        self.probe_previous = self.probe_last
        self.probe_previous_step = self._probe_step
        self.probe_last = self.probe_poses()
        self._probe_step = (self.state.step, self.state.polished)

    def save_checkpoint(self) -> None:
        self._record_probe()
        rank_rng = self.dist.gather_objects(torch.get_rng_state())  # every rank's stream (a collective)
        if not self.dist.is_main:
            return
        atomic_torch_save(
            {
                FORMAT_VERSION_KEY: RunDir.format_version("checkpoint"),
                "state": self.state.__dict__,
                "config": self.config.to_dict(),
                "model": self.model.state_dict(),
                "guide": self.guide.state_dict(),
                "optim": self.optim.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "pixel_rng": self.pixel_gen.get_state(),
                # the search's field cache is refreshed every search_every steps: keep it for an exact resume
                "search_cache": self.guide.search.cache if self.guide.search is not None else None,
                "batch_log_scale": self.batch_log_scale,
                "probe": {"last": self.probe_last, "previous": self.probe_previous, "step": list(self._probe_step),
                          "previous_step": list(self.probe_previous_step)},
                "world_size": self.dist.world_size,
                "rank_rng": rank_rng,
                # what `bayes-spi export` / `report` need to read a running fit from its checkpoint
                "geometry": self.dataset.geometry.to_dict(),
                "mask": self.dataset.mask,
            },
            self.checkpoint_path,
        )

    def load_checkpoint(self) -> None:
        # weights_only: no code in the file runs; its format version checked
        ck = RunDir(self.run_dir).read_torch("checkpoint", self.checkpoint_path, map_location=self.device,
                                             what="a bayes-spi checkpoint")
        self.state = TrainState(**ck["state"])
        self.model.load_state_dict(ck["model"])
        self.guide.load_state_dict(ck["guide"])
        self.optim.load_state_dict(ck["optim"])
        self.scheduler.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["torch_rng"])
        if ck["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["cuda_rng"])
        self.pixel_gen.set_state(ck["pixel_rng"])
        if self.guide.search is not None and ck.get("search_cache") is not None:
            self.guide.search.cache = ck["search_cache"].to(self.device)
        self.batch_log_scale = ck.get("batch_log_scale")
        probe = ck.get("probe") or {}
        self.probe_last, self.probe_previous = probe.get("last"), probe.get("previous")
        key = probe.get("step", -1)
        self._probe_step = (int(key), 0) if isinstance(key, int) else (int(key[0]), int(key[1]))
        prev_key = probe.get("previous_step", [-1, -1])
        self.probe_previous_step = (int(prev_key[0]), int(prev_key[1]))
        if self.dist.active:
            rank_rng = ck.get("rank_rng")
            if rank_rng is not None and int(ck.get("world_size", 1)) == self.dist.world_size:
                torch.set_rng_state(rank_rng[self.dist.rank])
            else:  # another number of processes: fresh per-rank streams, reproducible from the step
                self.dist.seed_rank(self.config.seed + 7919 * self.state.step)
        if self.dist.is_main:
            self._truncate_metrics(self.state.step)
        log.info("resumed from %s at step %d (%d images seen)", self.checkpoint_path, self.state.step,
                 self.state.images_seen)

    # ---------------------------------------------------------------- metrics
    @property
    def metrics_path(self) -> Path:
        return RunDir(self.run_dir).path("metrics")

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric rows written after the checkpoint (they will be written again)."""
        if not self.metrics_path.exists():
            return
        rows = []
        with open(self.metrics_path, newline="") as fh:
            reader = csv.DictReader(fh)
            for r in reader:
                # a row cut short by a kill mid-write has missing or unparsable fields: drop it (the fields of
                # the file's own header: a file written before a column was added keeps its rows, NaN there)
                if any(r.get(k) in (None, "") for k in reader.fieldnames or METRIC_FIELDS):
                    continue
                try:
                    if int(r["step"]) <= step:
                        rows.append(r)
                except ValueError:
                    continue
        with atomic_path(self.metrics_path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=METRIC_FIELDS, restval="nan", extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def _write_metrics(self, row: dict[str, float]) -> None:
        if not self.dist.is_main:
            return
        new = not self.metrics_path.exists()
        with open(self.metrics_path, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)

    def elbo_terms(self, batch: SPIBatch) -> dict[str, float]:
        """Per-image ELBO terms for one batch (see :data:`METRIC_FIELDS`): each site's term from the model and guide
        traces, enumerated sites summed exactly, the continuous ones at one draw; they sum to that draw's ELBO.

        Runs on a forked random stream, so how often metrics are logged does not change the fit.
        """
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(self.config.seed + 7919 * self.state.step)
            terms = self._elbo_terms(batch)
        return self.dist.weighted_mean_dict(batch.images.shape[0], terms)

    def _elbo_terms(self, batch: SPIBatch) -> dict[str, float]:
        terms = {name: float(v.detach()) / self.n_total for name, v in
                 site_terms(self.model, self.guide, batch, self.n_total, max_plate_nesting=MAX_PLATE_NESTING).items()}
        out = {"loglik_per_image": terms.pop("counts"), "log_intensity_prior": terms.pop("intensity_prior", 0.0)}
        for name in _KL_SITES:
            out[f"kl_{name}"] = -terms.pop(name) if name in terms else 0.0
        out["kl_other"] = -sum(terms.values()) if terms else 0.0
        w = self.guide.last_posterior.weights  # (B, K): the hypothesis weights of this trace's guide call
        out["effective_poses"] = float((-(w * w.clamp(min=1e-30).log()).sum(-1)).exp().mean())
        return out

    # ---------------------------------------------------------------- outputs
    def save_outputs(self, grid: int = 65, verdict: "object | None" = None) -> dict[str, Path]:
        """Write ``model.pt``, ``intensity.mrc``/``.h5`` (``grid``^3 voxels up to the detector's ``q_max``)
        and ``posterior.h5`` into the run directory (see :mod:`bayes_spi.infer.outputs`); a variational field
        also gets ``intensity_sd.mrc``/``.h5``, the posterior standard deviation of ``I(q)``."""
        from bayes_spi import __version__
        from bayes_spi.infer.outputs import field_on_grid, write_intensity, write_posterior

        self.guide.weight_floor = 0.0
        model_path = RunDir(self.run_dir).path("model")
        atomic_torch_save(
            {FORMAT_VERSION_KEY: RunDir.format_version("model"), "version": __version__, "config": self.config.to_dict(),
             "geometry": self.dataset.geometry.to_dict(),
             "mask": self.dataset.mask, "model": self.model.state_dict(), "guide": self.guide.state_dict(),
             "state": self.state.__dict__},
            model_path,
        )
        vol, dq = field_on_grid(self.model.field, grid, self._q_max)
        mrc, h5 = write_intensity(vol, dq, self.run_dir)
        extra: dict[str, Path] = {}
        if hasattr(self.model.field, "intensity_moments"):  # variational field: the posterior sd of I(q) too
            from bayes_spi.models.variational_field import moments_on_grid

            _, sd, _ = moments_on_grid(self.model.field, grid, self._q_max)
            extra["intensity_sd_mrc"], extra["intensity_sd_h5"] = write_intensity(sd, dq, self.run_dir,
                                                                                  stem="intensity_sd")
        if self.guide.search is not None:
            self.guide.search.refresh()  # search against the final field
        attrs = {}
        if verdict is not None:  # the per-pattern posteriors of a failed fit must say so
            attrs = {"fit_verdict": verdict.status, "fit_verdict_reasons": "; ".join(verdict.reasons) or "none"}
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.dataset.n_patterns, unit="pattern", desc=RunDir.name("posterior"), dynamic_ncols=True)

        def shown(done: int, total: int) -> None:
            if bar is not None:
                bar.update(done - bar.n)

        try:
            post = write_posterior(self.guide, self.dataset, RunDir(self.run_dir).path("posterior"), device=self.device,
                                   attrs=attrs, progress=shown)
        finally:
            if bar is not None:
                bar.close()
        return {"model": model_path, "intensity_mrc": mrc, "intensity_h5": h5, **extra, "posterior": post}

    # ---------------------------------------------------------------- loop
    def _batches(self):
        """Batches from the current position to the end (across epochs), as ``(epoch, b, idx, counts)``."""
        c = self.config
        epochs = 1 if c.online else c.epochs
        for epoch in range(self.state.epoch, epochs):
            start = self.state.batch_in_epoch if epoch == self.state.epoch else 0
            # the held-out probe patterns are never trained on; under DDP each rank reads its slice of each batch
            it = self.dist.batches(self.dataset, c.batch_size, shuffle=not c.online, seed=c.seed, start=start,
                                   epoch=epoch, exclude=self.holdout)
            if hasattr(self.dataset, "follow_batches"):  # --follow: in file order, as the patterns arrive
                it = ((idx[~np.isin(idx, self.holdout)], counts[~np.isin(idx, self.holdout)])
                      for idx, counts in self.dataset.follow_batches(c.batch_size, start=start))
            for b, (idx, counts) in enumerate(it, start=start):
                if len(idx):
                    yield epoch, b, idx, counts

    # ---------------------------------------------------------------- EMC warm start
    @property
    def emc_end(self) -> int:
        """The data batch at which the EMC warm start hands over to SVI with the amortized guide."""
        if self.state.planned_emc_end >= 0:
            return self.state.planned_emc_end
        return int(round(self.config.emc_fraction * self.total_steps))

    def in_emc(self, step: int) -> bool:
        return step < self.emc_end

    @property
    def emc(self) -> "GridMarginal":
        """The grid marginal likelihood (built on first use, on the search's grid when there is one)."""
        if self._emc is None:
            from bayes_spi.infer.emc import GridMarginal
            from bayes_spi.guides.search import orientation_grid
            from bayes_spi.so3 import super_fibonacci_rotmat

            search, c = self.guide.search, self.config
            rots = (search.rotations if search is not None else super_fibonacci_rotmat(c.search_rotations)
                    if c.symmetry == "C1" else orientation_grid(c.search_rotations, symmetry=c.symmetry))
            self._emc = GridMarginal(self.model, rots.to(self.device), cache_grid=self.config.cache_grid)
        return self._emc

    def emc_step(self, batch: SPIBatch) -> float:
        """One EMC warm-start step: ascend the grid marginal likelihood (:mod:`bayes_spi.infer.emc`).

        Returns minus the log marginal likelihood per image (the objective of this stage)."""
        self.optim.zero_grad(set_to_none=True)
        beta = self.config.emc_beta
        if self.config.emc_subset_posterior:  # the posterior given the pixels read (see TrainConfig)
            beta = beta / max(float(batch.pixel_weight), 1.0)
        post = self.emc(batch.images, batch.pixels, batch.pixel_weight, beta)
        loss = -post.log_marginal.mean()
        # under DDP: means over the union batch (every rank the same values)
        value, eff, level = self._reduce_step(batch, float(loss.detach()), float(post.effective_orientations.mean()),
                                              float(post.log_scale.mean()))
        if not math.isfinite(value):
            return value
        self._optimizer_step(loss)
        self.emc_terms = {"loglik_per_image": -value, "kl_pose": math.log(post.weights.shape[-1]) - math.log(eff),
                          "kl_scale": 0.0, "kl_hypothesis": 0.0, "effective_poses": eff, "kl_amplitude": 0.0,
                          "kl_class": 0.0, "kl_latent": 0.0, "kl_other": 0.0, "log_intensity_prior": 0.0}
        # the level between scales and field, as recentre_level does in SVI (the cache is rebuilt every step)
        self._shift_level(level)
        return value

    def _optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward, clip the gradient norm, one Adam step, one learning-rate schedule step."""
        loss.backward()
        self.dist.average_gradients(self.params, self._share)  # DDP: the union batch's gradient on every rank
        torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_norm)
        self.optim.step()
        self.scheduler.step()

    def _reduce_step(self, batch: SPIBatch, *values: float) -> list[float]:
        """Per-image means of this step's ``values`` over the union batch (one process: as they are); records
        this rank's share of the batch for :meth:`_optimizer_step` and the batch's size."""
        n_local = int(batch.images.shape[0])
        self._n_global, means = self.dist.weighted_mean(n_local, values)
        self._share = n_local / max(self._n_global, 1)
        return means

    @torch.no_grad()
    def _shift_level(self, level_log_scale: float) -> float:
        """Add ``level_log_scale`` minus the prior's mean ``log s`` to the field's ``log_offset``; returns the
        shift (0 if not finite)."""
        shift = level_log_scale - self._prior_log_scale()
        if not math.isfinite(shift):
            return 0.0
        self.model.field.log_offset.add_(shift)
        return shift

    @torch.no_grad()
    def _prior_log_scale(self) -> float:
        """Mean of ``log s`` under the scale prior (Monte Carlo with a fixed seed, computed once)."""
        if not hasattr(self, "_prior_log_s"):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                draws = self.model.scale_prior(4096).sample().to(torch.float64)
            self._prior_log_s = float(draws.clamp(min=1e-30).log().mean())
        return self._prior_log_s

    @torch.no_grad()
    def recentre_level(self) -> float:
        """Move the overall level between the fluence scales and the field (``s I`` is all the likelihood sees).

        The guide's scale location is the search's profile (maximum-likelihood) scale against the field, so
        nothing else keeps the field's level where the scale prior expects the scales: shift ``log I`` (the
        field's ``log_offset`` and the search cache together) by the batch mean of the profile ``log s``
        minus the prior's mean ``log s``. The likelihood is unchanged; the scales' KL is minimised.
        Returns the shift applied (0 without a search).
        """
        search = self.guide.search
        level, self.batch_log_scale = self.batch_log_scale, None
        if search is None or level is None or search.cache is None:
            return 0.0
        shift = self._shift_level(level)
        search.cache = search.cache + shift
        return shift

    def step(self, batch: SPIBatch) -> float:
        """One SVI step on ``batch``: returns the negative ELBO per image (hypotheses enumerated exactly)."""
        self.optim.zero_grad(set_to_none=True)
        self.dist.prime_guide(self.guide, batch.images)  # DDP: first-batch statistics from the union batch
        search = self.guide.search
        if search is not None and (self.state.step % self.config.search_every == 0 or search.cache is None
                                   or self.state.step == self.emc_end):
            self.recentre_level()
            search.refresh()
        loss = self.elbo.differentiable_loss(self.model, self.guide, batch, self.n_total) / self.n_total
        search = self.guide.search
        level = None
        if search is not None and search.last_log_scale is not None:  # this batch's mean profile log scale
            level = float(search.last_log_scale.mean())
        value, level_mean = self._reduce_step(batch, float(loss.detach()), 0.0 if level is None else level)
        if level is not None:
            self.batch_log_scale = level_mean
        if self.config.distill_weight > 0 and self.guide.n_search > 0:
            loss = loss + self.config.distill_weight * self.distill_loss(self.guide.last_posterior, self._group)
        if not math.isfinite(value):
            return value
        self._optimizer_step(loss)
        return value

    @property
    def _group(self) -> torch.Tensor | None:
        """The fit's point-group rotations ``(K, 3, 3)`` on the device (``None`` for ``C1``)."""
        from bayes_spi.symmetry import point_group

        g = point_group(self.config.symmetry)
        return None if g.is_trivial else torch.as_tensor(g.rotations, dtype=self.model.q.dtype, device=self.device)

    @staticmethod
    def distill_loss(post: PosePosterior, group: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over patterns of ``min_h ||R_h - R_best||_F^2`` over the encoder's hypotheses ``R_h``, with
        ``R_best`` the most probable hypothesis (detached): the amortization target. With a point group
        ``(K, 3, 3)`` the target is the nearest of ``g R_best`` (poses are defined modulo ``R ~ g R``)."""
        rows = torch.arange(post.weights.shape[0], device=post.weights.device)
        best = post.rotations[rows, post.weights.argmax(-1)].detach()  # (B, 3, 3)
        enc = post.rotations[:, : post.n_encoder]  # (B, 2H, 3, 3)
        if group is None:
            d = (enc - best[:, None]).pow(2).sum((-2, -1))  # (B, 2H)
        else:
            targets = torch.einsum("gij,bjk->bgik", group.to(best.dtype), best)  # (B, K, 3, 3)
            d = (enc[:, :, None] - targets[:, None]).pow(2).sum((-2, -1)).min(-1).values  # (B, 2H)
        return d.min(-1).values.mean()

    def fit(self, resume: bool = False, on_step: Callable[[TrainState], None] | None = None) -> TrainState:
        """Run SVI to the end (or continue from ``checkpoint.pt`` with ``resume``); returns the final state."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        pyro.clear_param_store()
        if resume:
            self.load_checkpoint()
        else:
            pyro.set_rng_seed(self.config.seed)
            if self.dist.is_main and self.metrics_path.exists():
                self.metrics_path.unlink()
            self.initialise_offset()
            self.dist.broadcast_modules([self.model, self.guide])  # DDP: rank 0's initial weights everywhere
            self.dist.seed_rank(self.config.seed)
        c = self.config
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps * c.batch_size, initial=self.state.images_seen, unit="img",
                       dynamic_ncols=True, smoothing=0.05)
        t_last, n_last = time.perf_counter(), self.state.images_seen
        t_start = time.perf_counter() - self.state.elapsed_s
        self.model.train()
        self.guide.train()
        batches = self._batches()
        phase_mark: tuple[bool, float, int] | None = None  # (emc, time, step) at the start of this phase here
        for epoch, b, idx, counts in batches:
            st = self.state
            if hasattr(self.dataset, "following"):  # --follow: the file has grown
                self._sync_data_size()
                if bar is not None:
                    bar.total = self.total_steps * c.batch_size
            if st.step >= self.total_steps:
                break
            group = [(epoch, b, idx, counts)]
            emc = self.in_emc(st.step)
            if emc:  # one warm-start step takes emc_batches data batches (its cost is mostly per step)
                want = min(c.emc_batches, self.emc_end - st.step, self.total_steps - st.step)
                while len(group) < want:
                    more = next(batches, None)
                    if more is None:
                        break
                    group.append(more)
            epoch, b = group[-1][0], group[-1][1]
            idx = np.concatenate([g[2] for g in group])
            counts = np.concatenate([g[3] for g in group])
            n_batches = len(group)
            pixels, n_eligible = self.select_pixels(st.step, c.emc_pixels if emc else None,
                                                    by_photons=emc and c.emc_pixel_sampling == "photons")
            batch = SPIBatch(torch.as_tensor(counts, device=self.device), torch.as_tensor(idx, device=self.device),
                             pixels.to(self.device), n_eligible)
            self.guide.weight_floor = self.weight_floor(st.step)
            loss = self.emc_step(batch) if emc else self.step(batch)
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"ELBO is {loss} at step {st.step} (epoch {epoch}, batch {b}); last good checkpoint: "
                    f"{self.checkpoint_path}. Try a smaller {flag('lr')} or a larger {flag('batch_size')}."
                )
            st.elbo_acc += -loss
            st.n_acc += 1
            prev = st.step
            st.step += n_batches
            for _ in range(n_batches - 1):  # the scheduler follows the data batches consumed
                self.scheduler.step()
            n_images = self._n_global if self.dist.active else len(idx)  # all ranks' patterns of this step
            st.images_seen += n_images
            st.epoch, st.batch_in_epoch = epoch, b + 1
            if st.batch_in_epoch >= self.batches_per_epoch and not self.following:
                st.epoch, st.batch_in_epoch = epoch + 1, 0
            st.elapsed_s = time.perf_counter() - t_start
            if c.max_minutes is not None and self.dist.active:  # the budget's clock is rank 0's
                st.elapsed_s = self.dist.broadcast_float(st.elapsed_s)
            if c.max_minutes is not None:
                if phase_mark is None or phase_mark[0] != emc:
                    phase_mark = (emc, time.perf_counter(), st.step)
                elif not st.planned_phases & (1 if emc else 2) and st.step - phase_mark[2] >= 6 * n_batches:
                    self.plan_for_budget(emc, (st.step - phase_mark[2]) / max(time.perf_counter() - phase_mark[1], 1e-9))
                    if bar is not None:
                        bar.total = self.total_steps * c.batch_size
            if bar is not None:
                bar.update(n_images)
            if st.step // c.log_every != prev // c.log_every or st.step == self.total_steps:
                now = time.perf_counter()
                rate = (st.images_seen - n_last) / max(now - t_last, 1e-9)
                t_last, n_last = now, st.images_seen
                row = {"step": st.step, "epoch": epoch, "images_seen": st.images_seen,
                       "elbo_per_image": st.elbo_acc / max(st.n_acc, 1), "radius": self.radius(st.step - 1),
                       "lr": self.lr(st.step), "images_per_s": rate, "elapsed_s": st.elapsed_s}
                if emc:
                    row.update(self.emc_terms)
                else:
                    row.update(self.elbo_terms(batch))
                self._write_metrics(row)
                st.elbo_acc, st.n_acc = 0.0, 0
                if bar is not None:
                    bar.set_postfix(elbo=f"{row['elbo_per_image']:.4g}", img_s=f"{rate:.0f}", r=f"{row['radius']:.2f}")
                extra = (f" [EMC warm start: {self.emc_terms['effective_poses']:.0f} effective orientations "
                         "per pattern]") if emc else ""
                log.info("step %d/%d images %d elbo/img %.5g loglik/img %.5g img/s %.1f%s", st.step,
                         self.total_steps, st.images_seen, row["elbo_per_image"], row["loglik_per_image"], rate,
                         extra)
            if st.step // c.checkpoint_every != prev // c.checkpoint_every:
                self.save_checkpoint()
            if on_step is not None:
                on_step(st)
            if c.max_minutes is not None and st.elapsed_s > 1.5 * 60.0 * c.max_minutes:
                # a safety stop only: the schedule was sized to end inside the budget (plan_for_budget)
                log.warning("time budget of %.1f min exceeded by half at step %d of %d: stopping (the fit is "
                            "unconverged)", c.max_minutes, st.step, self.total_steps)
                break
        if bar is not None:
            bar.close()
        if hasattr(self.dataset, "following"):  # the followed file's final size (the stream has ended)
            self._sync_data_size()
            log.info("followed %s to its end (%s): %d patterns", self.dataset.path,
                     getattr(self.dataset, "end_reason", "") or "stopped", self.n_total)
        self.save_checkpoint()
        self.polish(on_step)
        self.model.eval()
        self.guide.eval()
        return self.state

    def polish(self, on_step: Callable[[TrainState], None] | None = None) -> None:
        """The final exact EMC iterations (:mod:`bayes_spi.infer.polish`), ``config.polish_iterations`` of them,
        each checkpointed (a resumed run continues where it stopped; ``on_step`` is called after each).
        Skipped for a field without voxels."""
        from bayes_spi.infer.polish import REFINE_SPREAD, EMCPolish, polish_beta_schedule
        from bayes_spi.config.fields import FIELDS, names_text
        from bayes_spi.models.fields import SirenVoxelField, VoxelField

        c, st = self.config, self.state
        if st.polished >= c.polish_iterations or st.step < self.total_steps:
            return
        field = self.model.field
        if not isinstance(field, (SirenVoxelField, VoxelField)):
            log.info("exact EMC iterations skipped: the %s field has no voxels (field %s has)", c.field,
                     names_text(name for name, kind in FIELDS.items() if kind.voxels))
            return
        n_vox = field.n_voxel if isinstance(field, SirenVoxelField) else field.n
        self.model.eval()
        betas = polish_beta_schedule(c.polish_beta, c.polish_iterations, c.polish_refined)
        pol = EMCPolish(self.model, self.emc.rotations, cache_grid=n_vox,
                        batch_size=max(c.batch_size, 128), exclude=self.holdout, max_patterns=c.polish_patterns)
        pol.pseudo_photons = c.polish_prior
        pixels = torch.nonzero(self._good.reshape(-1)).squeeze(-1)
        while st.polished < c.polish_iterations:
            t0 = time.perf_counter()
            bar = None
            if self.progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=min(self.dataset.n_patterns, c.polish_patterns or self.dataset.n_patterns),
                           unit="pattern", dynamic_ncols=True,
                           desc=f"EMC iteration {st.polished + 1}/{c.polish_iterations}")
            # the last polish_refined iterations merge concentrated posteriors at their refined modes; the tempering
            # follows the schedule (validated there: every beta in (0, 1])
            pol.refine_spread = REFINE_SPREAD if st.polished >= c.polish_iterations - c.polish_refined else 0.0
            pol.beta = betas[st.polished]
            try:
                stats = pol.iterate(self.dataset, pixels, progress=(lambda n, tot: bar.update(n)) if bar else None,
                                    dist=self.dist)
            finally:
                if bar is not None:
                    bar.close()
            st.polished += 1
            st.elapsed_s += time.perf_counter() - t0
            log.info("exact EMC iteration %d/%d (beta %.3g): log marginal/pattern %.6g, orientation entropy %.2f "
                     "nats, best weight %.2f, voxels reached %.0f%%, RMS change of log I %.3g, merged at refined modes "
                     "%.0f%% (%.0f s)", st.polished, c.polish_iterations, pol.beta, stats.mean_loglik, stats.mean_entropy,
                     stats.mean_max_weight, 100 * stats.filled, stats.change, 100 * stats.refined,
                     time.perf_counter() - t0)
            if self.guide.search is not None:
                self.guide.search.refresh()
            self.save_checkpoint()
            if on_step is not None:
                on_step(st)
