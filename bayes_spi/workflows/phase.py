"""The phasing workflow: an electron density from a run's (or any) intensity, as MRC plus a JSON record.

What ``bayes-spi phase`` does: read the intensity (a run directory's ``intensity.h5`` or a volume file),
mark the voxels beyond ``q_max`` as unmeasured (a run: its detector's ``q_max``), run several random starts
of :func:`bayes_spi.analysis.phasing.phase_retrieval`, write the best density (``density.mrc`` for a run)
and ``STEM.json`` with the settings and the error of every start.

Example::

    from bayes_spi.workflows.phase import run_phase
    record = run_phase("run1", starts=8)        # run1/density.mrc, run1/density.json
    record["errors"][record["best"]]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bayes_spi.atomic import os_error_message
from bayes_spi.config.commands import flag
from bayes_spi.workflows.checks import check_writable_dir
from bayes_spi.workflows.errors import WorkflowError

__all__ = ["run_phase"]


def run_phase(source: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, starts: int = 8,
              iterations: int | None = None, q_max: float | None = None, seed: int = 0,
              progress: bool = False) -> dict[str, Any]:
    """Phase the intensity of ``source`` and write the best density to ``out`` (MRC) and ``out.json``.

    Args:
        source: a run directory (its ``intensity.h5``; ``q_max`` from its ``model.pt``) or an intensity file.
        out: the density MRC (default for a run: ``RUN/density.mrc``; required for a file).
        starts: random starts.
        iterations: iterations per start (``None``: the phasing module's default).
        q_max: the largest measured ``|q|`` (1/A); beyond it voxels are free.
        seed: seed of the random starts.
        progress: show a progress bar.

    Returns:
        The JSON record: ``errors`` per start, ``best``, ``voxel_A``, ``grid``, ``out``, the settings.

    Raises:
        WorkflowError: a bad input (checked before the phasing) or a failed write.
    """
    import numpy as np

    from bayes_spi import __version__
    from bayes_spi.analysis.phasing import phase_retrieval
    from bayes_spi.atomic import write_json
    from bayes_spi.infer.rundir import RunDir
    from bayes_spi.infer.volumes import read_intensity, write_density

    source = Path(source)
    if source.is_dir():
        run = RunDir(source)
        volume = run.path("intensity")
        if out is None:
            out = run.path("density")
        if q_max is None and run.has("model"):
            from bayes_spi.infer.evaluate import load_field

            try:
                q_max = load_field(run.path("model"))[1]
            except (FileNotFoundError, ValueError) as exc:
                raise WorkflowError(str(exc)) from None
    else:
        volume = source
        if out is None:
            raise WorkflowError(f"give -o/{flag('out')} for the density when SOURCE is a volume file", kind="usage")
    out = Path(out)
    if q_max is not None and not q_max > 0:
        raise WorkflowError(f"expected a positive |q| in 1/A, got {q_max}", kind="parameter", setting="q_max")
    if out.is_dir():
        raise WorkflowError(f"{os.fspath(out)}: expected an output MRC file name, got a directory")
    check_writable_dir(out.parent, "the density")  # before the phasing, not after it
    try:
        intensity, dq = read_intensity(volume)
    except (FileNotFoundError, ValueError) as exc:
        raise WorkflowError(str(exc)) from None
    n = intensity.shape[0]
    measured = None
    if q_max is not None:
        from bayes_spi.analysis.fsc import ball_mask

        measured = ball_mask(n, dq, q_max)
    kwargs = {} if iterations is None else {"n_iter": iterations}
    res = phase_retrieval(intensity, dq, n_starts=starts, seed=seed, measured_mask=measured, progress=progress,
                          **kwargs)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_density(res.density, res.voxel_A, out, label=f"bayes-spi {__version__} phased density; voxel A")
    except OSError as exc:
        raise WorkflowError(os_error_message(exc)) from None
    errors = [float(e) for e in np.asarray(res.errors)]
    record = {"software_version": __version__, "source": os.fspath(volume), "out": os.fspath(out), "grid": n,
              "dq_inv_A": dq, "voxel_A": float(res.voxel_A), "q_max_inv_A": q_max, "starts": starts,
              "seed": seed, "iterations": iterations, "errors": errors, "best": int(res.best),
              "support_voxels": int(np.asarray(res.support).sum())}
    try:
        write_json(out.with_suffix(".json"), RunDir.stamp("density_json", record))
    except OSError as exc:
        raise WorkflowError(os_error_message(exc)) from None
    return record
