"""Fit the Bayesian SPI model to a data file by stochastic variational inference.

DATA is a bayes-spi HDF5 file (see `bayes-spi simulate`); it is validated before anything is written
(every pattern is read once; --no-check-data skips the value scan). RUN (-o) is the run directory:
config.yaml (every setting, versions, the command line), run.log, checkpoint.pt (atomic, every
--checkpoint-every steps), metrics.csv, and at the end model.pt, intensity.mrc / intensity.h5 (the 3D
intensity on a --grid cube up to the detector's q_max; MRC voxel size in 1/A; a variational field also
writes intensity_sd.mrc/.h5), posterior.h5 (per-image pose and fluence posteriors), report.html with
report/*.png and the overview report.png, and, when the data file holds the truth, evaluation.json and
fsc.json (orientation errors, fluence correlation, intensity and density FSC).

A RUN that already holds a checkpoint or model is never overwritten: continue it with --resume (the
settings then come from RUN/config.yaml and training options given on the command line are ignored with
a warning; DATA may be omitted; --grid defaults to the run's own) or start afresh with --force. One fit at a
time runs on a RUN: RUN/fit.lock holds its pid while it runs, a second fit on the same RUN is refused at once,
and the lock of a process that has died is taken over. Options not given take the defaults shown.

Priors and the likelihood are chosen by SPEC: NAME, or NAME:KEY=VALUE;KEY=VALUE... (":" also separates
parameters, so no shell quoting is needed; vectors are comma-separated), all recorded in config.yaml:

\b
  --pose-prior       uniform | preferred:axis=0,0,1:kappa=2
  --scale-prior      lognormal:sigma=0.5 | pr772 | empirical:file=totals.npy:bins=100:smoothing=auto
  --likelihood       poisson[:background=0] | poisson-gaussian:sigma=0.3[:background=0]
  --intensity-prior  none | wilson[:weight=1:sigma=learned|composition:structure=2CEX:diameter_A=72]

preferred: the beam direction R e_z (molecule frame) is von Mises-Fisher about axis with concentration
kappa, the in-plane angle uniform. pr772: the packaged PR772 photon-count distribution; empirical: the
same from a file of per-image photon totals (.npy (N,), .npz 'values', .csv column 'value') or a
histogram (.npy (2, J) centres and weights, .npz 'edges'+'counts' or 'centres'+'counts', .csv columns
'edge'/'centre' and 'count'), normalised to mean 1 and smoothed in log s. poisson-gaussian: Poisson
photons plus Gaussian read-out noise of sigma photons, clipped at 0 and rounded.

Example: bayes-spi fit data.h5 -o run1 --epochs 2 --batch-size 32

Example with priors: bayes-spi fit data.h5 -o run2 --pose-prior preferred:axis=0,0,1:kappa=2 --scale-prior pr772
--likelihood poisson-gaussian:sigma=0.3
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any

import click

from bayes_spi.atomic import write_json

__all__ = ["command", "TRAINING_OPTIONS", "RESUME_OVERRIDABLE", "RUN_FILES", "run_fit", "run_halfsets"]

log = logging.getLogger("bayes_spi")

#: files of a run directory that ``--force`` removes before a fresh start
RUN_FILES: tuple[str, ...] = (
    "checkpoint.pt", "checkpoint.pt.tmp", "metrics.csv", "metrics.csv.tmp", "model.pt", "model.pt.tmp",
    "intensity.mrc", "intensity.h5", "intensity_sd.mrc", "intensity_sd.h5", "posterior.h5", "evaluation.json",
    "fsc.json", "sampling.json", "verdict.json", "density.mrc", "density.json", "posterior.nc", "coverage.json", "report.png", "report.html",
    "config.yaml", "run.log",
)

#: FitConfig fields exposed as options (option name = field name with "-" for "_")
TRAINING_OPTIONS: tuple[str, ...] = (
    "online", "epochs", "batch_size", "max_images", "max_minutes", "field", "field_width", "field_depth", "field_w0",
    "n_heads", "n_search", "search_rotations", "weight_floor", "auto_settings", "emc_fraction", "emc_beta", "lr", "lr_final", "pixels_per_pattern", "radius_start", "radius_ramp", "scale_prior_sigma",
    "pose_prior", "scale_prior", "likelihood", "intensity_prior", "seed", "device", "checkpoint_every", "log_every",
)

#: settings that do not change the computation: taken from the command line even with ``--resume``
RESUME_OVERRIDABLE: tuple[str, ...] = ("device", "checkpoint_every", "max_minutes")

_HELP = {
    "online": "Stream the file once, each pattern seen once (--epochs ignored); --offline: shuffled epochs.",
    "epochs": "Passes over the data (offline).",
    "batch_size": "Patterns per SVI step.",
    "max_images": "Stop after this many patterns.",
    "max_minutes": "Training-time budget: the schedule (curriculum, learning rate, EMC hand-over) is sized from the "
                   "throughput measured in the first steps of each stage so that it completes in time; a 1.5x "
                   "overrun stops cleanly and the verdict says unconverged (honoured with --resume).",
    "field": "Intensity field: siren, fouriernet, voxel, or variational (a posterior over |F| on a grid with a "
             "Wilson prior; writes intensity_sd.mrc).",
    "variational_grid": "Grid size (odd) of the variational field's amplitudes.",
    "variational_kl_weight": "Weight of the variational field's KL to the Wilson prior (1: the plain ELBO).",
    "field_width": "Hidden width of the neural field.",
    "field_depth": "Hidden layers of the neural field.",
    "field_w0": "First-layer SIREN frequency.",
    "n_heads": "Pose proposals per pattern (2 x n_heads hypotheses with their Rz(pi) partners).",
    "n_search": "Hypotheses per pattern from the exhaustive orientation-grid search (the EMC E-step's top rotations).",
    "search_rotations": "Rotations in the search grid (default: from the particle size, see --auto-settings).",
    "weight_floor": "Initial hypothesis-weight floor (uniform mixture weight), decayed to 0.",
    "auto_settings": "Derive --field-w0 and --search-rotations from the data (particle size from the mean pattern) "
                     "unless given; the estimate, the speckle oversampling and the values used go to sampling.json.",
    "emc_fraction": "Fraction of the data batches in the EMC warm start (the field fitted to each pattern's exact "
                    "marginal likelihood over the whole orientation grid) before SVI with the amortized guide; 0: off.",
    "emc_beta": "Tempering (<= 1) of the EMC warm start's orientation posterior (deterministic annealing).",
    "lr": "Initial Adam learning rate.",
    "lr_final": "Final learning rate (geometric decay).",
    "pixels_per_pattern": "Pixels per pattern in the likelihood per step (0 = all eligible).",
    "radius_start": "Coarse-to-fine: start radius as a fraction of q_max.",
    "radius_ramp": "Fraction of the steps over which the radius widens to 1.",
    "scale_prior_sigma": "Sigma of the LogNormal fluence-scale prior.",
    "seed": "Random seed (initial weights, data order, pixel subsets, samples).",
    "device": "auto (CUDA when present), cpu, cuda, cuda:N.",
    "checkpoint_every": "Steps between atomic checkpoints.",
    "log_every": "Steps between metrics.csv rows / log lines.",
}


def _config_defaults() -> dict[str, Any]:
    from bayes_spi.infer.config import FitConfig

    return FitConfig().to_dict()


def _training_option(name: str, type_: Any) -> Any:
    default = _config_defaults()[name]
    shown = {"max_images": "all", "max_minutes": "none"}.get(name, "none") if default is None else default
    return click.option(f"--{name.replace('_', '-')}", name, type=type_, default=None,
                        help=f"{_HELP[name]} [default: {shown}]")


_SPEC_HELP = {
    "pose_prior": "Pose prior SPEC: uniform, or preferred:axis=X,Y,Z:kappa=K. [default: uniform]",
    "scale_prior": "Fluence-scale prior SPEC: lognormal:sigma=S, pr772, or empirical:file=F[:bins=N:smoothing=H]. "
                   "[default: lognormal, sigma from --scale-prior-sigma]",
    "likelihood": "Likelihood SPEC: poisson[:background=B] or poisson-gaussian:sigma=S[:background=B]. "
                  "[default: poisson]",
    "intensity_prior": "Intensity prior SPEC: none, or wilson[:KEY=VALUE...]. [default: none]",
}


def _check_spec(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any] | None:
    """Parse and check a prior/likelihood SPEC; priors from files are built here so errors come first."""
    if value is None:
        return None
    from bayes_spi.config.specs import FLAGS, normalize_spec

    kind = str(param.name)
    flag = FLAGS[kind]

    def bad(exc: Exception) -> click.BadParameter:
        msg = str(exc)
        msg = msg[len(flag):].lstrip(": ") if msg.startswith(flag) else msg
        return click.BadParameter(msg, ctx=ctx, param=param)

    try:
        spec = normalize_spec(kind, value)
    except ValueError as exc:
        raise bad(exc) from None
    try:
        if kind == "scale_prior" and spec["name"] != "lognormal":
            from bayes_spi.models.priors import make_scale_prior

            make_scale_prior(spec)
        elif kind == "intensity_prior" and spec["name"] != "none":
            from bayes_spi.infer.build import build_intensity_prior

            build_intensity_prior(spec, q_max=0.1)
    except (ValueError, FileNotFoundError) as exc:
        raise bad(exc) from None
    return spec


def _spec_option(kind: str) -> Any:
    return click.option("--" + kind.replace("_", "-"), kind, default=None, metavar="SPEC", callback=_check_spec,
                        help=_SPEC_HELP[kind])


def _grid_of(volume: Path, default: int = 65) -> int:
    """The cube size of a run's ``intensity.h5`` (runs from before ``config.yaml`` recorded ``outputs.grid``)."""
    import h5py

    try:
        with h5py.File(volume, "r") as f:
            n = int(f["intensity"].shape[0])
    except (OSError, KeyError, IndexError, TypeError):
        return default
    return n if n >= 3 and n % 2 == 1 else default


#: entries a checkpoint.pt must hold to be resumed from
CHECKPOINT_ENTRIES = ("state", "config", "model", "guide", "optim", "scheduler", "torch_rng", "pixel_rng")


def _check_checkpoint(path: Path) -> None:
    """Read ``checkpoint.pt`` safely (weights only: no code in it runs) and check its entries, before anything
    is written."""
    from bayes_spi.torchfile import TorchFileError, load_torch_file

    try:
        ck = load_torch_file(path, what="a bayes-spi checkpoint")
    except (FileNotFoundError, TorchFileError) as exc:
        raise click.ClickException(str(exc)) from None
    missing = [k for k in CHECKPOINT_ENTRIES if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise click.ClickException(f"{os.fspath(path)}: expected a bayes-spi checkpoint with entries "
                                   f"{', '.join(CHECKPOINT_ENTRIES)}, got {missing} missing")


def _existing_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in ("checkpoint.pt", "model.pt"))


def _open_dataset(path: Path) -> Any:
    from bayes_spi.dataio.h5 import DataFormatError, SPIDataset

    try:
        return SPIDataset(path)
    except FileNotFoundError:
        raise click.ClickException(f"data file {os.fspath(path)!r} not found (expected a bayes-spi HDF5 file, "
                                   "e.g. from `bayes-spi simulate`)") from None
    except DataFormatError as exc:
        raise click.ClickException(str(exc)) from None


def _check_values(dataset: Any, progress: bool) -> None:
    """Read every pattern once so bad values (negative, NaN) fail before anything is written."""
    from bayes_spi.dataio.h5 import DataFormatError

    step = max(dataset.chunk_patterns, 1) * 8
    it = dataset.iter_batches(step, shuffle=False)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=math.ceil(dataset.n_patterns / step), unit="block", desc="checking data",
                  leave=False, dynamic_ncols=True)
    try:
        for _ in it:
            pass
    except DataFormatError as exc:
        raise click.ClickException(str(exc)) from None


def _build_config(given: dict[str, Any]) -> Any:
    from bayes_spi.infer.config import FitConfig

    try:
        return FitConfig(**given)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _json_safe(obj: Any) -> Any:
    """Non-finite floats -> ``None`` (strict JSON), recursively."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _last_metrics(path: Path) -> dict[str, str]:
    import csv

    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return rows[-1] if rows else {}


def run_fit(
    data: Path | None,
    run_dir: Path,
    given: dict[str, Any],
    *,
    resume: bool = False,
    force: bool = False,
    grid: int | None = None,
    truth: bool = True,
    progress: bool = True,
    check_data: bool = True,
    argv: list[str] | None = None,
    subset: Any = None,
    subset_name: str = "subset",
) -> dict[str, Any]:
    """The body of ``bayes-spi fit`` (also used by ``bayes-spi demo``); raises ``click.ClickException``.

    Args:
        data: the data file (``None`` with ``resume``: the path recorded in ``config.yaml``).
        run_dir: the run directory.
        given: FitConfig settings given explicitly (others take the defaults, or with ``resume`` the
            run's settings; only :data:`RESUME_OVERRIDABLE` ones are then honoured).
        resume, force, grid, truth, progress, check_data: as the command-line options (``grid=None``: 65
            for a new run, the run's recorded grid with ``resume``).
        argv: the command line recorded in ``config.yaml`` (default ``sys.argv``).
        subset: fit only these patterns (global indices; e.g. one half-set), re-indexed 0..n-1 in the
            run's outputs (``posterior.h5`` rows follow the sorted indices); no truth evaluation then.
        subset_name: a label for the subset in logs.

    Returns:
        ``{"run_dir", "state", "images_per_s", "final_elbo", "evaluation" (dict or None), "outputs"}``.
    """
    import pyro

    from bayes_spi.cli.common import check_device, check_writable_dir, os_error_message
    from bayes_spi.dataio.h5 import DataFormatError
    from bayes_spi.infer.rundir import (RunLock, RunLockedError, close_logging, live_lock_owner, locked_message,
                                        read_config, read_run_info, setup_logging, write_config)

    if resume and force:
        raise click.UsageError("give either --resume or --force, not both")
    if grid is not None and (grid < 3 or grid % 2 == 0):
        raise click.BadParameter(f"expected an odd integer >= 3, got {grid}", param_hint="--grid")
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise click.ClickException(f"run directory {os.fspath(run_dir)!r}: expected a directory, got a file")
    check_writable_dir(run_dir, "the run")
    owner = live_lock_owner(run_dir)
    if owner is not None:  # refuse at once; the lock itself is taken below, before anything is written
        raise click.ClickException(locked_message(run_dir, *owner))

    # ---- everything below up to "touch the run directory" only reads
    info: dict[str, Any] = {}
    if resume:
        if not (run_dir / "checkpoint.pt").is_file():
            raise click.ClickException(f"run directory {os.fspath(run_dir)!r}: expected checkpoint.pt to resume "
                                       "from, got none (start a new run without --resume)")
        try:
            info = read_run_info(run_dir)
            config = read_config(run_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        _check_checkpoint(run_dir / "checkpoint.pt")
        if grid is None:  # the run's output grid, as it was started
            outputs_info = info.get("outputs") if isinstance(info.get("outputs"), dict) else {}
            recorded_grid = outputs_info.get("grid")
            grid = recorded_grid if isinstance(recorded_grid, int) else _grid_of(run_dir / "intensity.h5")
        if data is None:
            recorded = info.get("data", {}).get("path") if isinstance(info.get("data"), dict) else None
            if not recorded:
                raise click.UsageError("DATA is needed: the run's config.yaml records no data path")
            data = Path(recorded)
        ignored = sorted(k for k, v in given.items() if k not in RESUME_OVERRIDABLE and v != getattr(config, k))
        overrides = {k: v for k, v in given.items() if k in RESUME_OVERRIDABLE}
        if overrides:
            from bayes_spi.infer.config import FitConfig

            config = FitConfig.from_dict({**config.to_dict(), **overrides})
    else:
        if data is None:
            raise click.UsageError("missing argument DATA (the data file; only --resume may omit it)")
        if _existing_run(run_dir) and not force:
            raise click.ClickException(
                f"run directory {os.fspath(run_dir)!r} already holds a run (checkpoint.pt or model.pt): "
                "expected a new or empty directory; continue it with --resume or overwrite it with --force")
        config = _build_config(given)
        ignored = []
    if grid is None:
        grid = 65
    check_device(config.device)
    sampling = None

    dataset = _open_dataset(Path(data))
    if subset is not None:
        from bayes_spi.dataio.subset import SPISubset

        try:
            dataset = SPISubset(dataset, subset, subset_name)
        except ValueError as exc:
            dataset.close()
            raise click.ClickException(f"{os.fspath(data)}: {subset_name}: {exc}") from None
        truth = False
    lock = RunLock(run_dir)
    try:
        if dataset.n_patterns < 2:
            raise click.ClickException(
                f"{os.fspath(data)}: field /data/counts: expected at least 2 patterns (one is held out to judge the "
                f"fit), got {dataset.n_patterns}")
        if resume:
            rec = info.get("data", {}) if isinstance(info.get("data"), dict) else {}
            for key, found in (("n_patterns", dataset.n_patterns), ("shape", list(dataset.shape))):
                if key in rec and rec[key] != found:
                    raise click.ClickException(
                        f"{os.fspath(data)}: {key}: expected {rec[key]} (the data this run was started on, "
                        f"{rec.get('path', '?')}), got {found}")
        if check_data:
            _check_values(dataset, progress)
        if not resume:
            from bayes_spi.infer.autoset import data_settings

            try:
                config, sampling = data_settings(dataset, config, given)
            except ValueError as exc:
                raise click.ClickException(f"{os.fspath(data)}: {exc}") from None
            click.echo(sampling.summary(), err=sampling.undersampled)

        from bayes_spi.infer.trainer import Trainer, resolve_device

        try:
            device = resolve_device(config.device)
        except RuntimeError as exc:
            raise click.BadParameter(str(exc), param_hint="--device") from None

        # ---- touch the run directory (first take its lock: one fit at a time)
        try:
            lock.acquire()
        except RunLockedError as exc:
            raise click.ClickException(str(exc)) from None
        if force and not resume:
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
            if (run_dir / "report").is_dir():
                import shutil

                shutil.rmtree(run_dir / "report")
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir)
        args = list(sys.argv if argv is None else argv)
        if resume:
            log.info("resume: %s", " ".join(args))
            rec_path = info.get("data", {}).get("path") if isinstance(info.get("data"), dict) else None
            if rec_path and Path(rec_path) != Path(data).resolve():
                log.warning("--resume: data file %s differs from the one the run started on (%s)", data, rec_path)
            if ignored:
                log.warning("--resume: ignoring %s (settings come from %s)",
                            ", ".join("--" + k.replace("_", "-") for k in ignored), run_dir / "config.yaml")
        else:
            data_info = {"n_patterns": dataset.n_patterns, "shape": list(dataset.shape),
                         "has_truth": bool(dataset.has_truth)}
            if subset is not None:  # posterior.h5 row j is pattern members[j] of the file
                data_info["subset"] = subset_name
                data_info["subset_of_n_patterns"] = int(dataset.parent.n_patterns)
            write_config(run_dir, config, data, args, device=str(device), data_info=data_info,
                         outputs={"grid": grid})
            log.info("new run: %s", " ".join(args))
            if sampling is not None:
                write_json(run_dir / "sampling.json", sampling.to_dict(), allow_nan=False)
                for line in sampling.summary().splitlines():
                    (log.warning if line.startswith("WARNING") else log.info)("sampling: %s", line)
        log.info("data %s: %d patterns of %dx%d; device %s", data, dataset.n_patterns, *dataset.shape, device)

        pyro.set_rng_seed(config.seed)  # the initial weights depend on the seed (Trainer builds them)
        try:
            trainer = Trainer(dataset, config, run_dir, progress=progress)
        except (ValueError, FileNotFoundError) as exc:
            raise click.ClickException(f"building the model: {exc}") from None
        first: list[tuple[int, float]] = []

        def _on_step(st: Any) -> None:
            if not first:
                first.append((st.images_seen, time.perf_counter()))

        try:
            state = trainer.fit(resume=resume, on_step=_on_step)
        except DataFormatError as exc:
            log.error("%s", exc)
            raise click.ClickException(f"{exc} (the last checkpoint is kept: {trainer.checkpoint_path})") from None
        except FloatingPointError as exc:
            log.error("%s", exc)
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            log.warning("interrupted at step %d; continue with: bayes-spi fit %s -o %s --resume",
                        trainer.state.step, data, run_dir)
            raise
        # images/s of this session, from the end of its first step (excludes start-up)
        rate = float("nan")
        if first and state.images_seen > first[0][0]:
            rate = (state.images_seen - first[0][0]) / max(time.perf_counter() - first[0][1], 1e-9)
        log.info("training done: step %d, %d images, %.1f images/s", state.step, state.images_seen, rate)
        from bayes_spi.infer.verdict import assess_fit

        verdict = assess_fit(trainer)
        write_json(run_dir / "verdict.json", _json_safe(verdict.to_dict()), allow_nan=False)
        for line in verdict.summary().splitlines():
            (log.info if verdict.status == "converged" else log.warning)("verdict: %s", line)
        outputs = trainer.save_outputs(grid=grid, verdict=verdict)
        log.info("wrote %s", ", ".join(p.name for p in outputs.values()))
        last = _last_metrics(trainer.metrics_path)
        final_elbo = float(last["elbo_per_image"]) if last.get("elbo_per_image") else float("nan")

        evaluation = None
        if truth and dataset.has_truth:
            from bayes_spi.infer.evaluate import evaluate_run_full, write_fsc_json

            try:
                full = evaluate_run_full(run_dir, dataset.path)
            except (DataFormatError, ValueError) as exc:
                log.warning("evaluation against the truth skipped: %s", exc)
            else:
                evaluation = full.scalars
                for note in full.notes:
                    log.info("evaluation: %s", note)
                write_fsc_json(run_dir, full.curves, corner_res_nm=evaluation["corner_res_nm"])
                # strict JSON: a metric that could not be computed (e.g. no truth intensity) is null
                write_json(run_dir / "evaluation.json", {**{k: (v if math.isfinite(v) else None)
                                                            for k, v in evaluation.items()},
                                                         "verdict": verdict.status}, allow_nan=False)
                log.info("evaluation: %s", json.dumps(evaluation))
        from bayes_spi.infer.report import write_report

        outputs["report"] = write_report(run_dir, dataset.path if evaluation is not None else None)
        log.info("wrote %s", outputs["report"].name)
    except OSError as exc:  # a full disk, an unwritable file: one line, the last good checkpoint kept
        msg = os_error_message(exc)
        ck = run_dir / "checkpoint.pt"
        if ck.is_file():
            msg += f" (the last good checkpoint is kept: {os.fspath(ck)}; continue with --resume)"
        log.error("%s", msg)
        raise click.ClickException(msg) from None
    finally:
        dataset.close()
        close_logging()
        lock.release()
    return {"run_dir": run_dir, "state": state, "images_per_s": rate, "final_elbo": final_elbo,
            "evaluation": evaluation, "outputs": outputs, "verdict": verdict}


def run_halfsets(data: Path | None, run_dir: Path, given: dict[str, Any], *, resume: bool = False,
                 force: bool = False, grid: int | None = None, progress: bool = True, check_data: bool = True,
                 argv: list[str] | None = None) -> dict[str, Any]:
    """``bayes-spi fit --half-sets``: two fits on a random split, then their FSC (see
    :mod:`bayes_spi.infer.halfsets`). Returns ``{"halves": [run_fit results], "summary": path, "curve": FSCCurve}``."""
    from bayes_spi.dataio.h5 import DataFormatError
    from bayes_spi.infer.evaluate import write_fsc_json
    from bayes_spi.infer.halfsets import HALVES, halfset_fsc, read_split, write_halfset_summary, write_split

    run_dir = Path(run_dir)
    if resume:
        try:
            h1, h2, attrs = read_split(run_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        if data is None:
            from bayes_spi.infer.rundir import read_run_info

            try:
                data = Path(read_run_info(run_dir / HALVES[0])["data"]["path"])
            except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
                raise click.UsageError(f"DATA is needed: no data path recorded in {run_dir / HALVES[0]} ({exc})")
    else:
        if data is None:
            raise click.UsageError("missing argument DATA (the data file; only --resume may omit it)")
        if (run_dir / "halfsets.h5").exists() and not force:
            raise click.ClickException(f"run directory {os.fspath(run_dir)!r} already holds a half-set run: expected "
                                       "a new directory; continue it with --resume or overwrite it with --force")
        ds = _open_dataset(Path(data))
        n_patterns = ds.n_patterns
        ds.close()
        run_dir.mkdir(parents=True, exist_ok=True)
        seed = int(given.get("seed", 0))
        h1, h2 = write_split(run_dir, n_patterns, seed)
        attrs = {"seed": seed, "n_patterns": n_patterns}
    if grid is None and resume:  # the grid the half-set run was started with
        from bayes_spi.infer.rundir import read_run_info

        try:
            recorded = (read_run_info(run_dir / HALVES[0]).get("outputs") or {}).get("grid")
        except (FileNotFoundError, ValueError, AttributeError):
            recorded = None
        grid = recorded if isinstance(recorded, int) else None
    if grid is None:
        grid = 65
    results = []
    for name, members in zip(HALVES, (h1, h2)):
        click.echo(f"half-set {name}: {len(members)} patterns -> {os.fspath(run_dir / name)}")
        half_resume = resume and (run_dir / name / "checkpoint.pt").is_file()
        results.append(run_fit(data, run_dir / name, given, resume=half_resume, force=force and not half_resume,
                               grid=grid, truth=False, progress=progress, check_data=check_data, argv=argv,
                               subset=members, subset_name=name))
        print_summary(results[-1])
    try:
        curve, info = halfset_fsc(run_dir / HALVES[0], run_dir / HALVES[1], grid=grid)
    except (FileNotFoundError, ValueError, DataFormatError) as exc:
        raise click.ClickException(f"half-set FSC: {exc}") from None
    summary = write_halfset_summary(run_dir, curve, info, attrs)
    for name in HALVES:  # each half's report shows the half-set FSC too
        write_fsc_json(run_dir / name, {"halfset": curve})
    click.echo("half-set FSC after aligning half2 onto half1 (sqrt I as in the papers; speckle: shell means removed):")
    for label, c in (("sqrt I", curve), ("speckle", info.get("speckle"))):
        for t in (0.5, 0.143):
            if c is None:
                continue
            bound = "" if c.crosses(t) else " (not crossed: a bound at the last shell)"
            click.echo(f"  {label:>7} resolution at {t}: {c.resolution_nm(t):.3f} nm{bound}")
    click.echo(f"wrote {os.fspath(summary)}, {os.fspath(run_dir / 'fsc.json')}, {os.fspath(run_dir / 'halfsets.h5')}")
    return {"halves": results, "summary": summary, "curve": curve}


def print_summary(result: dict[str, Any]) -> None:
    """The end-of-fit summary: outputs, speed, final ELBO, evaluation table."""
    from bayes_spi.infer.evaluate import format_evaluation

    st = result["state"]
    click.echo(f"run directory: {result['run_dir']}")
    click.echo("  outputs: " + ", ".join(p.name for p in result["outputs"].values())
               + ", metrics.csv, config.yaml, run.log" + (", evaluation.json" if result["evaluation"] else ""))
    rate = result["images_per_s"]
    rate_text = f"{rate:.1f} images/s" if math.isfinite(rate) else "no new steps"
    click.echo(f"  steps {st.step}, images seen {st.images_seen}, {rate_text}")
    click.echo(f"  final ELBO per image: {result['final_elbo']:.6g}")
    verdict = result.get("verdict")
    if verdict is not None:
        click.echo(verdict.summary(), err=verdict.status != "converged")
    if result["evaluation"] is not None:
        click.echo("evaluation against the truth:")
        click.echo(format_evaluation(result["evaluation"]))


class _RecordingCommand(click.Command):
    """Keeps the raw arguments in ``ctx.meta`` so ``config.yaml`` records the exact command line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["bayes_spi.argv"] = ["bayes-spi", self.name or "fit", *args]
        return super().parse_args(ctx, args)


@click.command(name="fit", help=__doc__, cls=_RecordingCommand)
@click.argument("data", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory.")
@click.option("--online/--offline", "online", default=None, help=_HELP["online"] + " [default: offline]")
@_training_option("epochs", click.IntRange(min=1))
@_training_option("batch_size", click.IntRange(min=1))
@_training_option("max_images", click.IntRange(min=1))
@_training_option("max_minutes", click.FloatRange(min=0, min_open=True))
@_training_option("field", click.Choice(["siren", "fouriernet", "voxel", "variational"]))
@_training_option("variational_grid", click.IntRange(min=5))
@_training_option("variational_kl_weight", click.FloatRange(min=0))
@_training_option("field_width", click.IntRange(min=1))
@_training_option("field_depth", click.IntRange(min=1))
@_training_option("field_w0", float)
@_training_option("n_heads", click.IntRange(min=1))
@_training_option("n_search", click.IntRange(min=0))
@_training_option("search_rotations", click.IntRange(min=1))
@_training_option("weight_floor", click.FloatRange(min=0, max=1, max_open=True))
@_training_option("emc_fraction", click.FloatRange(min=0, max=1))
@_training_option("emc_beta", click.FloatRange(min=0, max=1, min_open=True))
@click.option("--auto-settings/--no-auto-settings", "auto_settings", default=None,
              help=_HELP["auto_settings"] + " [default: on]")
@_training_option("lr", float)
@_training_option("lr_final", float)
@_training_option("pixels_per_pattern", click.IntRange(min=0))
@_training_option("radius_start", float)
@_training_option("radius_ramp", float)
@_training_option("scale_prior_sigma", float)
@_spec_option("pose_prior")
@_spec_option("scale_prior")
@_spec_option("likelihood")
@_spec_option("intensity_prior")
@_training_option("seed", int)
@_training_option("device", str)
@_training_option("checkpoint_every", click.IntRange(min=1))
@_training_option("log_every", click.IntRange(min=1))
@click.option("--grid", type=int, default=None,
              help="Odd size of the output intensity cube. [default: 65; with --resume the run's own]")
@click.option("--resume", is_flag=True, help="Continue the run in RUN from its checkpoint.")
@click.option("--force", is_flag=True, help="Start afresh even if RUN holds a run (its outputs are removed).")
@click.option("--truth/--no-truth", default=True, show_default=True,
              help="Evaluate against the data file's truth (if any) and write evaluation.json.")
@click.option("--check-data/--no-check-data", default=True, show_default=True,
              help="Read every pattern once before training to catch bad values early.")
@click.option("--half-sets", is_flag=True,
              help="Validation without truth: fit two independent models on a random split of the patterns "
                   "(RUN/half1, RUN/half2; the split, drawn from --seed, is kept in RUN/halfsets.h5) and report "
                   "their FSC (RUN/halfsets.json, RUN/fsc.json).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def command(data: Path | None, run_dir: Path, grid: int | None, resume: bool, force: bool, truth: bool,
            check_data: bool, half_sets: bool, progress: bool, **options: Any) -> None:
    given = {k: v for k, v in options.items() if v is not None}
    from bayes_spi.infer.config import FitConfig

    known = {f.name for f in dc_fields(FitConfig)}
    unknown = sorted(set(given) - known)
    if unknown:  # an option without a FitConfig field: a programming error, reported plainly
        raise click.ClickException(f"options {unknown} have no FitConfig setting")
    argv = click.get_current_context().meta.get("bayes_spi.argv")
    if half_sets:
        run_halfsets(data, run_dir, given, resume=resume, force=force, grid=grid, progress=progress,
                     check_data=check_data, argv=argv)
        return
    result = run_fit(data, run_dir, given, resume=resume, force=force, grid=grid, truth=truth,
                     progress=progress, check_data=check_data, argv=argv)
    print_summary(result)
