"""The fit workflow: from a data file to a complete run directory (what ``bayes-spi fit`` does).

:func:`run_fit` owns the policy of a run directory: a new run refuses a directory that holds one (unless
``force``), ``resume`` continues from ``checkpoint.pt`` with the settings of ``config.yaml`` (only
:data:`RESUME_OVERRIDABLE` ones may change) and the run's own output grid; one fit at a time holds the
run's lock. It validates everything before it writes, then writes ``config.yaml`` and ``run.log``, trains,
writes the verdict, the outputs, the evaluation against the truth (``evaluation.json``, ``fsc.json``) and the
report. :func:`run_halfsets` makes two such runs on a random split and their FSC.

Every failure is a :class:`~bayes_spi.workflows.errors.WorkflowError` with one line for the user; the last
good checkpoint is kept.

Example::

    from bayes_spi.workflows.fit import run_fit
    result = run_fit("data.h5", "run1", {"epochs": 2, "batch_size": 32})
    result["verdict"].status, result["outputs"]["report"]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bayes_spi.atomic import os_error_message
from bayes_spi.config.commands import flag
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.rundir import FRESH_START_FILES, RunDir
from bayes_spi.workflows.checks import check_device, check_writable_dir
from bayes_spi.workflows.errors import WorkflowError

__all__ = ["RUN_FILES", "RESUME_OVERRIDABLE", "CHECKPOINT_ENTRIES", "Echo", "given_settings", "run_fit",
           "run_halfsets"]

log = logging.getLogger("bayes_spi")

#: files of a run directory that ``force`` removes before a fresh start (named by :class:`RunDir`)
RUN_FILES: tuple[str, ...] = FRESH_START_FILES

#: settings that do not change the computation: taken from the caller even with ``resume``
RESUME_OVERRIDABLE: tuple[str, ...] = ("device", "checkpoint_every", "max_minutes")

#: entries a checkpoint.pt must hold to be resumed from
CHECKPOINT_ENTRIES = ("state", "config", "model", "guide", "optim", "scheduler", "torch_rng", "pixel_rng")

#: where a workflow's messages for the user go: ``echo(text, err)`` (``err``: a warning, for stderr)
Echo = Callable[[str, bool], None]


def _print(text: str, err: bool = False) -> None:
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def given_settings(config: FitConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings a caller chose: a mapping as it is; a :class:`FitConfig` as its fields that differ from
    the defaults (the others may then be set from the data, see :func:`bayes_spi.infer.autoset.data_settings`).

    Raises:
        WorkflowError: a mapping names a setting :class:`FitConfig` does not have.

    Example:
        >>> given_settings(FitConfig(batch_size=16))
        {'batch_size': 16}
    """
    if config is None:
        return {}
    if isinstance(config, FitConfig):
        default = FitConfig().to_dict()
        return {k: v for k, v in config.to_dict().items() if v != default.get(k)}
    given = dict(config)
    known = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = sorted(str(k) for k in set(given) - known)
    if unknown:
        raise WorkflowError(f"settings {', '.join(unknown)}: expected FitConfig fields, got unknown names",
                            kind="parameter")
    return given


def _grid_of(volume: Path, default: int = 65) -> int:
    """The cube size of a run's ``intensity.h5`` (runs from before ``config.yaml`` recorded ``outputs.grid``)."""
    from bayes_spi.dataio.h5open import open_h5

    try:
        with open_h5(volume, "the run's intensity volume (HDF5)") as f:
            n = int(f["intensity"].shape[0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return default
    return n if n >= 3 and n % 2 == 1 else default


def _check_checkpoint(path: Path) -> None:
    """Read ``checkpoint.pt`` safely (weights only: no code in it runs) and check its entries, before anything
    is written."""
    from bayes_spi.infer.rundir import RunFormatError
    from bayes_spi.torchfile import TorchFileError

    try:
        ck = RunDir(path.parent).read_torch("checkpoint", path, what="a bayes-spi checkpoint")
    except (FileNotFoundError, TorchFileError, RunFormatError) as exc:
        raise WorkflowError(str(exc)) from None
    missing = [k for k in CHECKPOINT_ENTRIES if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise WorkflowError(f"{os.fspath(path)}: expected a bayes-spi checkpoint with entries "
                            f"{', '.join(CHECKPOINT_ENTRIES)}, got {missing} missing")


def _existing_run(run_dir: Path) -> bool:
    return RunDir(run_dir).holds_fit()


def _open_dataset(path: Path, source: Any = None) -> Any:
    """Open DATA: a bayes-spi file, or a foreign one read with ``source`` (a SourceOptions, its dict, or None)."""
    from bayes_spi.config.sources import SourceOptions
    from bayes_spi.dataio.h5 import DataFormatError
    from bayes_spi.dataio.sources import open_dataset, split_dataset_path

    try:
        options = source if isinstance(source, SourceOptions) else SourceOptions.from_dict(source)
        return open_dataset(path, **options.open_kwargs())
    except FileNotFoundError as exc:
        if split_dataset_path(path)[0].is_file():  # a file the source names (a detector, a geometry file)
            raise WorkflowError(str(exc)) from None
        raise WorkflowError(f"data file {os.fspath(path)!r} not found (expected a bayes-spi HDF5 file, "
                            "e.g. from `bayes-spi simulate`, or a source of `bayes-spi convert`)") from None
    except (DataFormatError, ValueError) as exc:
        raise WorkflowError(str(exc)) from None


def _open_followed(path: Path, timeout: float, batch_size: int, say: Echo) -> Any:
    """Open a file that is still being written (``--follow``), once it holds a first batch."""
    from bayes_spi.dataio.follow import open_following
    from bayes_spi.dataio.h5 import DataFormatError

    def waiting(consumed: int, available: int, idle_s: float, timeout_s: float) -> None:
        msg = (f"waiting for patterns: {consumed} fitted, {available} in {path.name} (the writer is still writing); "
               f"stopping after {timeout_s:.0f} s without new ones ({idle_s:.0f} s so far)")
        log.info("%s", msg)
        say(msg, True)

    if not timeout > 0:
        raise WorkflowError(f"expected a positive number of seconds, got {timeout}", kind="parameter",
                            setting="follow_timeout")
    try:
        return open_following(path, timeout=timeout, min_patterns=max(2, batch_size), on_wait=waiting)
    except FileNotFoundError:
        raise WorkflowError(f"data file {os.fspath(path)!r} not found (waited {timeout:g} s for the writer to "
                            "create it)") from None
    except DataFormatError as exc:
        raise WorkflowError(f"{exc} (a file followed with {flag('follow')} must be written in HDF5 SWMR mode, "
                            "e.g. by H5Writer(swmr=True))") from None


def _absolute_files(config: FitConfig) -> None:
    """Record the ``mask`` and ``background_file`` paths absolute (a resumed run may start elsewhere)."""
    from bayes_spi.dataio.masks import split_spec

    for name in ("mask", "background_file"):
        spec = getattr(config, name)
        if spec:
            file, inner = split_spec(spec)
            setattr(config, name, os.path.abspath(file) + (f":{inner}" if inner else ""))


def _with_mask(dataset: Any, config: FitConfig) -> Any:
    """``dataset`` seen through ``config.mask`` (combined with its own mask; :mod:`bayes_spi.dataio.masks`)."""
    from bayes_spi.dataio.h5 import DataFormatError
    from bayes_spi.dataio.masks import MaskedDataset, read_mask

    try:
        extra = read_mask(config.mask, dataset.shape, config.mask_bin)
        masked = MaskedDataset(dataset, extra, source=f"mask {config.mask}")
    except (FileNotFoundError, DataFormatError, ValueError) as exc:
        dataset.close()
        raise WorkflowError(str(exc), kind="parameter", setting="mask") from None
    n_good, n_file = int(masked.mask.sum()), int(dataset.mask.sum())
    log.info("mask %s (binned by %d) combined with the data's own mask: %d of %d good pixels (the file's own: %d)",
             config.mask, config.mask_bin, n_good, masked.mask.size, n_file)
    return masked


def _check_background(dataset: Any, config: FitConfig) -> None:
    """Read ``config.background_file`` once (shape, values) before anything is written; log what it adds."""
    from bayes_spi.dataio.h5 import DataFormatError
    from bayes_spi.dataio.masks import read_pixel_map

    try:
        bg = read_pixel_map(config.background_file, dataset.shape, config.mask_bin)
    except (FileNotFoundError, DataFormatError, ValueError) as exc:
        dataset.close()
        raise WorkflowError(str(exc), kind="parameter", setting="background") from None
    log.info("background %s: %.4g photons per pattern on the good pixels (scale %s, fitted)", config.background_file,
             float(bg[dataset.mask].sum()), config.background_scale)


def _check_values(dataset: Any, progress: bool, dist: Any = None) -> None:
    """Read every pattern once so bad values (negative, NaN) fail before anything is written (under DDP each
    rank reads its share of the blocks; a rank that fails stops them all)."""
    from bayes_spi.dataio.h5 import DataFormatError

    step = max(dataset.chunk_patterns, 1) * 8
    it = dataset.iter_batches(step, shuffle=False)
    if dist is not None and dist.active:
        it = (dataset.read(idx) for b, idx in enumerate(dataset.batch_indices(step, shuffle=False))
              if dist.owns_block(b))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=math.ceil(dataset.n_patterns / step), unit="block", desc="checking data",
                  leave=False, dynamic_ncols=True)
    try:
        for _ in it:
            pass
    except DataFormatError as exc:
        raise WorkflowError(str(exc)) from None


def _build_config(given: dict[str, Any]) -> FitConfig:
    try:
        return FitConfig(**given)
    except ValueError as exc:
        raise WorkflowError(str(exc), kind="parameter") from None


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
    data: str | os.PathLike[str] | None,
    run_dir: str | os.PathLike[str],
    config: FitConfig | Mapping[str, Any] | None = None,
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
    echo: Echo | None = None,
    source: Any = None,
    follow: bool = False,
    follow_timeout: float = 60.0,
) -> dict[str, Any]:
    """Fit ``data`` into the run directory ``run_dir`` (new, continued with ``resume``, or afresh with ``force``).

    Args:
        data: the data file (``None`` with ``resume``: the path recorded in ``config.yaml``).
        run_dir: the run directory.
        config: the settings chosen by the caller, a mapping of :class:`FitConfig` fields or a
            :class:`FitConfig` (see :func:`given_settings`); the others take their defaults or values from
            the data, or with ``resume`` the run's settings (only :data:`RESUME_OVERRIDABLE` ones are then
            honoured).
        resume: continue the run from its ``checkpoint.pt``.
        force: start afresh even if ``run_dir`` holds a run (its files :data:`RUN_FILES` are removed).
        grid: odd size of the output intensity cube (``None``: 65 for a new run, the run's own with ``resume``).
        truth: evaluate against the data file's truth (if it holds one) and write ``evaluation.json``.
        progress: show progress bars.
        check_data: read every pattern once before training, to catch bad values early.
        argv: the command line recorded in ``config.yaml`` (default ``sys.argv``).
        subset: fit only these patterns (global indices; e.g. one half-set), re-indexed 0..n-1 in the
            run's outputs (``posterior.h5`` rows follow the sorted indices); no truth evaluation then.
        subset_name: a label for the subset in logs.
        echo: where messages for the user go before the run's log exists (default: stdout, stderr for warnings).
        source: how to read a foreign ``data`` file (a :class:`~bayes_spi.config.sources.SourceOptions` or its
            dict: Dragonfly detector, geometry file, photon energy); recorded in ``config.yaml``, and with
            ``resume`` taken from there when not given.
        follow: ``data`` is still being written (HDF5 SWMR, :mod:`bayes_spi.dataio.follow`): fit the patterns as
            they arrive until the writer marks the file complete or none arrived for ``follow_timeout`` seconds
            (needs the ``online`` setting; one process).

    Returns:
        ``{"run_dir", "state", "images_per_s", "final_elbo", "evaluation" (dict or None), "outputs", "verdict"}``.

    Raises:
        WorkflowError: a bad input or combination of inputs (before anything is written), a run that is
            locked by another fit, or a failure while fitting or writing (the last good checkpoint is kept).
    """
    import pyro

    from bayes_spi.dataio.h5 import DataFormatError
    from bayes_spi.infer.rundir import (RunLockedError, close_logging, live_lock_owner, locked_message,
                                        read_config, read_run_info, setup_logging, write_config)

    say = echo if echo is not None else _print
    given = given_settings(config)
    if resume and force:
        raise WorkflowError(f"give either {flag('resume')} or {flag('force')}, not both", kind="usage")
    if grid is not None and (grid < 3 or grid % 2 == 0):
        raise WorkflowError(f"expected an odd integer >= 3, got {grid}", kind="parameter", setting="grid")
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise WorkflowError(f"run directory {os.fspath(run_dir)!r}: expected a directory, got a file")
    check_writable_dir(run_dir, "the run")
    from bayes_spi.infer import distributed

    main = distributed.env_rank() == 0  # under torchrun only rank 0 touches the run directory
    owner = live_lock_owner(run_dir) if main else None
    if owner is not None:  # refuse at once; the lock itself is taken below, before anything is written
        raise WorkflowError(locked_message(run_dir, *owner))

    # ---- everything below up to "touch the run directory" only reads
    info: dict[str, Any] = {}
    if resume:
        if not run.has("checkpoint"):
            raise WorkflowError(f"run directory {os.fspath(run_dir)!r}: expected {run.name('checkpoint')} to resume "
                                f"from, got none (start a new run without {flag('resume')})")
        try:
            info = read_run_info(run_dir)
            fit_config = read_config(run_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise WorkflowError(str(exc)) from None
        _check_checkpoint(run.path("checkpoint"))
        if grid is None:  # the run's output grid, as it was started
            outputs_info = info.get("outputs") if isinstance(info.get("outputs"), dict) else {}
            recorded_grid = outputs_info.get("grid")
            grid = recorded_grid if isinstance(recorded_grid, int) else _grid_of(run.path("intensity"))
        if data is None:
            recorded = info.get("data", {}).get("path") if isinstance(info.get("data"), dict) else None
            if not recorded:
                raise WorkflowError(f"DATA is needed: the run's {run.name('config')} records no data path",
                                    kind="usage")
            data = Path(recorded)
        if source is None and isinstance(info.get("data"), dict):
            source = info["data"].get("source")
        ignored = sorted(k for k, v in given.items()
                         if k not in RESUME_OVERRIDABLE and v != getattr(fit_config, k))
        overrides = {k: v for k, v in given.items() if k in RESUME_OVERRIDABLE}
        if overrides:
            fit_config = FitConfig.from_dict({**fit_config.to_dict(), **overrides})
    else:
        if data is None:
            raise WorkflowError(f"missing argument DATA (the data file; only {flag('resume')} may omit it)",
                                kind="usage")
        if _existing_run(run_dir) and not force:
            raise WorkflowError(
                f"run directory {os.fspath(run_dir)!r} already holds a run ({run.name('checkpoint')} or "
                f"{run.name('model')}): "
                f"expected a new or empty directory; continue it with {flag('resume')} or overwrite it with "
                f"{flag('force')}")
        fit_config = _build_config(given)
        _absolute_files(fit_config)
        ignored = []
    if grid is None:
        grid = 65
    check_device(fit_config.device)
    if follow and not fit_config.online:
        raise WorkflowError(f"{flag('follow')} streams a file as it is written, once: expected {flag('online')}",
                            kind="usage")
    if follow and subset is not None:
        raise WorkflowError(f"{flag('follow')}: expected the whole file, got a subset ({subset_name})", kind="usage")
    if follow and source:
        raise WorkflowError(f"{flag('follow')} reads a bayes-spi HDF5 file written in SWMR mode: expected no foreign "
                            "source options", kind="usage")
    try:  # torchrun: join the process group (gloo on CPU, nccl on CUDA); one process: LOCAL
        dist = distributed.setup_from_env(fit_config.device)
    except (ValueError, RuntimeError) as exc:
        raise WorkflowError(f"torch.distributed: {exc}") from None
    sampling = None
    if follow and dist.active:
        raise WorkflowError(f"{flag('follow')} runs in one process: expected no torchrun, got {dist.world_size} "
                            "processes", kind="usage")

    dataset = _open_followed(Path(data), follow_timeout, fit_config.batch_size, say) if follow else \
        _open_dataset(Path(data), source)
    if fit_config.mask:
        dataset = _with_mask(dataset, fit_config)
    if fit_config.background_file:
        _check_background(dataset, fit_config)
    if subset is not None:
        from bayes_spi.dataio.subset import SPISubset

        try:
            dataset = SPISubset(dataset, subset, subset_name)
        except ValueError as exc:
            dataset.close()
            raise WorkflowError(f"{os.fspath(data)}: {subset_name}: {exc}") from None
        truth = False
    lock = run.lock()
    try:
        if dataset.n_patterns < 2:
            raise WorkflowError(
                f"{os.fspath(data)}: field /data/counts: expected at least 2 patterns (one is held out to judge the "
                f"fit), got {dataset.n_patterns}")
        if resume:
            rec = info.get("data", {}) if isinstance(info.get("data"), dict) else {}
            for key, found in (("n_patterns", dataset.n_patterns), ("shape", list(dataset.shape))):
                if key in rec and rec[key] != found and not (follow and key == "n_patterns"):
                    raise WorkflowError(
                        f"{os.fspath(data)}: {key}: expected {rec[key]} (the data this run was started on, "
                        f"{rec.get('path', '?')}), got {found}")
        if check_data and not follow:  # a followed file's values are checked as they are read
            _check_values(dataset, progress and main, dist)
        if not resume:
            from bayes_spi.infer.autoset import data_settings

            try:
                fit_config, sampling = data_settings(dataset, fit_config, given)
            except ValueError as exc:
                raise WorkflowError(f"{os.fspath(data)}: {exc}") from None
            fit_config = dist.broadcast_object(fit_config)  # DDP: rank 0's data-derived settings everywhere
            if main:
                say(sampling.summary(), sampling.undersampled)

        from bayes_spi.infer.trainer import Trainer, resolve_device

        try:
            device = resolve_device(fit_config.device)
        except RuntimeError as exc:
            raise WorkflowError(str(exc), kind="parameter", setting="device") from None

        if not main:  # DDP rank > 0: rank 0 writes the run directory; warnings go to stderr
            return _follower_fit(dataset, fit_config, run_dir, resume, dist)
        # ---- touch the run directory (first take its lock: one fit at a time)
        try:
            lock.acquire()
        except RunLockedError as exc:
            raise WorkflowError(str(exc)) from None
        if force and not resume:
            for path in run.fresh_start_paths():
                path.unlink(missing_ok=True)
            if run.has("report_dir"):
                import shutil

                shutil.rmtree(run.path("report_dir"))
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir)
        args = list(sys.argv if argv is None else argv)
        if resume:
            log.info("resume: %s", " ".join(args))
            rec_path = info.get("data", {}).get("path") if isinstance(info.get("data"), dict) else None
            if rec_path and Path(rec_path) != Path(data).resolve():
                log.warning("%s: data file %s differs from the one the run started on (%s)", flag("resume"), data,
                            rec_path)
            if ignored:
                log.warning("%s: ignoring %s (settings come from %s)", flag("resume"),
                            ", ".join(flag(k) for k in ignored), run.path("config"))
        else:
            data_info = {"n_patterns": dataset.n_patterns, "shape": list(dataset.shape),
                         "has_truth": bool(dataset.has_truth)}
            if source:  # a foreign data file: how to reopen it (resume, report)
                from bayes_spi.config.sources import SourceOptions

                opts = source if isinstance(source, SourceOptions) else SourceOptions.from_dict(source)
                data_info["source"] = opts.to_dict()
            if subset is not None:  # posterior.h5 row j is pattern members[j] of the file
                data_info["subset"] = subset_name
                data_info["subset_of_n_patterns"] = int(dataset.parent.n_patterns)
            write_config(run_dir, fit_config, data, args, device=str(device), data_info=data_info,
                         outputs={"grid": grid})
            log.info("new run: %s", " ".join(args))
            if sampling is not None:
                run.write_json("sampling", sampling.to_dict(), allow_nan=False)
                for line in sampling.summary().splitlines():
                    (log.warning if line.startswith("WARNING") else log.info)("sampling: %s", line)
        log.info("data %s: %d patterns of %dx%d; device %s", data, dataset.n_patterns, *dataset.shape, device)
        if dist.active:
            log.info("data-parallel: %d processes (torch.distributed, %s), each reads 1/%d of every batch of %d",
                     dist.world_size, dist.backend, dist.world_size, fit_config.batch_size)
        dist.barrier()  # the run directory is set up: the other ranks may start

        pyro.set_rng_seed(fit_config.seed)  # the initial weights depend on the seed (Trainer builds them)
        try:
            trainer_cls = Trainer
            if fit_config.heterogeneous:  # per-pattern structure latents / classes (bayes_spi.infer.heterogeneous)
                from bayes_spi.infer.heterogeneous import HeterogeneousTrainer

                trainer_cls = HeterogeneousTrainer
            trainer = trainer_cls(dataset, fit_config, run_dir, progress=progress)
        except (ValueError, FileNotFoundError) as exc:
            raise WorkflowError(f"building the model: {exc}") from None
        first: list[tuple[int, float]] = []

        def _on_step(st: Any) -> None:
            if not first:
                first.append((st.images_seen, time.perf_counter()))

        try:
            state = trainer.fit(resume=resume, on_step=_on_step)
        except DataFormatError as exc:
            log.error("%s", exc)
            raise WorkflowError(f"{exc} (the last checkpoint is kept: {trainer.checkpoint_path})") from None
        except FloatingPointError as exc:
            log.error("%s", exc)
            raise WorkflowError(str(exc)) from None
        except KeyboardInterrupt:
            log.warning("interrupted at step %d; continue with: bayes-spi fit %s -o %s %s",
                        trainer.state.step, data, run_dir, flag("resume"))
            raise
        trainer.dist = distributed.LOCAL  # training is over: rank 0 alone writes the outputs (no collectives)
        # images/s of this session, from the end of its first step (excludes start-up)
        rate = float("nan")
        if first and state.images_seen > first[0][0]:
            rate = (state.images_seen - first[0][0]) / max(time.perf_counter() - first[0][1], 1e-9)
        log.info("training done: step %d, %d images, %.1f images/s", state.step, state.images_seen, rate)
        from bayes_spi.infer.verdict import assess_fit

        verdict = assess_fit(trainer)
        run.write_json("verdict", _json_safe(verdict.to_dict()), allow_nan=False)
        for line in verdict.summary().splitlines():
            (log.info if verdict.status == "converged" else log.warning)("verdict: %s", line)
        outputs = trainer.save_outputs(grid=grid, verdict=verdict)
        log.info("wrote %s", ", ".join(p.name for p in outputs.values()))
        last = _last_metrics(trainer.metrics_path)
        final_elbo = float(last["elbo_per_image"]) if last.get("elbo_per_image") else float("nan")

        evaluation = None
        if truth and dataset.has_truth:
            from bayes_spi.infer.evaluate import (evaluate_run_full, evaluation_document, write_evaluation,
                                                  write_fsc_json)

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
                write_evaluation(run_dir, evaluation_document(evaluation, verdict.status))
                log.info("evaluation: %s", json.dumps(evaluation))
        from bayes_spi.report.page import write_report

        outputs["report"] = write_report(run_dir, dataset.path if evaluation is not None else None)
        log.info("wrote %s", outputs["report"].name)
    except OSError as exc:  # a full disk, an unwritable file: one line, the last good checkpoint kept
        msg = os_error_message(exc)
        ck = run.path("checkpoint")
        if ck.is_file():
            msg += f" (the last good checkpoint is kept: {os.fspath(ck)}; continue with {flag('resume')})"
        log.error("%s", msg)
        raise WorkflowError(msg) from None
    finally:
        dataset.close()
        close_logging()
        lock.release()
    return {"run_dir": run_dir, "state": state, "images_per_s": rate, "final_elbo": final_elbo,
            "evaluation": evaluation, "outputs": outputs, "verdict": verdict}


def _follower_fit(dataset: Any, fit_config: FitConfig, run_dir: Path, resume: bool, dist: Any) -> dict[str, Any]:
    """A DDP rank > 0: wait for rank 0 to set up the run directory, train its shards in step with the others
    (rank 0 writes the checkpoints and metrics), and return; the outputs are rank 0's."""
    import pyro

    from bayes_spi.dataio.h5 import DataFormatError
    from bayes_spi.infer.trainer import Trainer

    dist.barrier()
    pyro.set_rng_seed(fit_config.seed)
    try:
        trainer = Trainer(dataset, fit_config, run_dir, progress=False)
    except (ValueError, FileNotFoundError) as exc:
        raise WorkflowError(f"building the model (rank {dist.rank}): {exc}") from None
    try:
        state = trainer.fit(resume=resume)
    except (DataFormatError, FloatingPointError) as exc:
        raise WorkflowError(f"rank {dist.rank}: {exc}") from None
    finally:
        dataset.close()
    return {"run_dir": run_dir, "state": state, "images_per_s": float("nan"), "final_elbo": float("nan"),
            "evaluation": None, "outputs": {}, "verdict": None, "rank": dist.rank}


def run_halfsets(
    data: str | os.PathLike[str] | None,
    run_dir: str | os.PathLike[str],
    config: FitConfig | Mapping[str, Any] | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    grid: int | None = None,
    progress: bool = True,
    check_data: bool = True,
    argv: list[str] | None = None,
    echo: Echo | None = None,
    on_half: Callable[[dict[str, Any]], None] | None = None,
    source: Any = None,
) -> dict[str, Any]:
    """Two fits on a random split of the patterns, then their FSC (see :mod:`bayes_spi.infer.halfsets`).

    ``run_dir/half1`` and ``run_dir/half2`` are :func:`run_fit` run directories; the split (drawn from the
    ``seed`` setting) is kept in ``run_dir/halfsets.h5``, the FSC in ``run_dir/halfsets.json`` and
    ``run_dir/fsc.json``. The arguments are those of :func:`run_fit`; ``on_half`` is called with each half's
    :func:`run_fit` result as it finishes.

    Returns:
        ``{"halves": [run_fit results], "summary": path of halfsets.json, "curve": FSCCurve}``.

    Raises:
        WorkflowError: as :func:`run_fit`, or the FSC of the two halves could not be computed.
    """
    from bayes_spi.dataio.h5 import DataFormatError
    from bayes_spi.infer.evaluate import write_fsc_json
    from bayes_spi.infer.halfsets import HALVES, halfset_fsc, read_split, write_halfset_summary, write_split

    from bayes_spi.infer.distributed import env_world_size

    if env_world_size() > 1:
        raise WorkflowError(f"{flag('half_sets')} runs in one process: expected no torchrun, got WORLD_SIZE="
                            f"{env_world_size()} (fit each half with torchrun on its own instead)", kind="usage")
    say = echo if echo is not None else _print
    given = given_settings(config)
    run_dir = Path(run_dir)
    if resume:
        try:
            h1, h2, attrs = read_split(run_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise WorkflowError(str(exc)) from None
        if data is None:
            from bayes_spi.infer.rundir import read_run_info

            try:
                data = Path(read_run_info(run_dir / HALVES[0])["data"]["path"])
            except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
                raise WorkflowError(f"DATA is needed: no data path recorded in {run_dir / HALVES[0]} ({exc})",
                                    kind="usage") from None
    else:
        if data is None:
            raise WorkflowError(f"missing argument DATA (the data file; only {flag('resume')} may omit it)",
                                kind="usage")
        if RunDir(run_dir).path("halfsets").exists() and not force:
            raise WorkflowError(f"run directory {os.fspath(run_dir)!r} already holds a half-set run: expected "
                                f"a new directory; continue it with {flag('resume')} or overwrite it with "
                                f"{flag('force')}")
        ds = _open_dataset(Path(data), source)
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
        say(f"half-set {name}: {len(members)} patterns -> {os.fspath(run_dir / name)}", False)
        half_resume = resume and RunDir(run_dir).sub(name).has("checkpoint")
        results.append(run_fit(data, run_dir / name, given, resume=half_resume, force=force and not half_resume,
                               grid=grid, truth=False, progress=progress, check_data=check_data, argv=argv,
                               subset=members, subset_name=name, echo=echo, source=source))
        if on_half is not None:
            on_half(results[-1])
    try:
        curve, info = halfset_fsc(run_dir / HALVES[0], run_dir / HALVES[1], grid=grid)
    except (FileNotFoundError, ValueError, DataFormatError) as exc:
        raise WorkflowError(f"half-set FSC: {exc}") from None
    summary = write_halfset_summary(run_dir, curve, info, attrs)
    for name in HALVES:  # each half's report shows the half-set FSC too
        write_fsc_json(run_dir / name, {"halfset": curve})
    say("half-set FSC after aligning half2 onto half1 (sqrt I as in the papers; speckle: shell means removed):",
        False)
    for label, c in (("sqrt I", curve), ("speckle", info.get("speckle"))):
        for t in (0.5, 0.143):
            if c is None:
                continue
            bound = "" if c.crosses(t) else " (not crossed: a bound at the last shell)"
            say(f"  {label:>7} resolution at {t}: {c.resolution_nm(t):.3f} nm{bound}", False)
    verdict = _halfset_verdict(run_dir, info, say)
    say(f"wrote {os.fspath(summary)}, {os.fspath(RunDir(run_dir).path('fsc'))}, {os.fspath(RunDir(run_dir).path('halfsets'))}, "
        f"{os.fspath(RunDir(run_dir).path('verdict'))}", False)
    return {"halves": results, "summary": summary, "curve": curve, "verdict": verdict}


def _halfset_verdict(run_dir: Path, info: dict[str, Any], say: Echo) -> Any:
    """Each half's verdict and their agreement -> ``RUN/verdict.json`` (see :mod:`bayes_spi.infer.halfset_verdict`)."""
    from bayes_spi.infer.halfset_verdict import assess_halfsets
    from bayes_spi.infer.halfsets import HALVES
    from bayes_spi.infer.verdict import read_verdict

    halves = []
    for name in HALVES:
        try:
            halves.append(read_verdict(run_dir / name))
        except ValueError:
            halves.append(None)
    verdict = assess_halfsets(halves, info.get("speckle"), float(info["q_max_inv_A"]))
    RunDir(run_dir).write_json("verdict", _json_safe(verdict.to_dict()), allow_nan=False)
    head = {"converged": "HALF-SETS AGREE", "unconverged": "HALF-SETS NOT CONVERGED",
            "failed": "HALF-SET VALIDATION FAILED"}[verdict.status]
    say(f"{head}: half1 {verdict.checks['halves'][0]}, half2 {verdict.checks['halves'][1]}; speckle FSC over the "
        f"inner shells {verdict.checks['inner_speckle_fsc']:.3f} (needs >= {verdict.checks['min_inner_speckle_fsc']})",
        verdict.status != "converged")
    for r in verdict.reasons:
        say(f"  - {r}", verdict.status != "converged")
    return verdict
