"""Export a run's intensity field on any cubic grid (MRC for ChimeraX, and HDF5).

The grid is an odd cube of ``n`` voxels per side centred on ``q = 0``. Its spacing is either chosen so the
grid reaches the detector's ``q_max`` (the default), or set from a real-space voxel size ``a`` (A): the
density that phasing this grid gives then has voxels of ``a`` A, i.e. ``dq = 1 / (n a)`` and the grid reaches
about the Nyquist frequency ``1 / (2 a)``. Beyond the detector's ``q_max`` the field is an extrapolation;
``q_max`` is reported so users (and ``bayes-spi phase``) can treat it as unmeasured.

When the field is variational (it has ``intensity_moments``), the posterior standard deviation of
``I(q)`` is written beside the mean as ``STEM_sd.mrc``/``.h5``.

Example::

    paths = export_run("run1", grid=129)   # run1/intensity_g129.mrc/.h5; run1/intensity.* are kept
"""

from __future__ import annotations

import os
from pathlib import Path

from bayes_spi.config.commands import flag
from bayes_spi.infer.evaluate import load_field
from bayes_spi.infer.load import model_path_of
from bayes_spi.infer.outputs import field_on_grid, write_intensity

__all__ = ["grid_spacing", "export_paths", "export_run"]


def grid_spacing(n: int, q_max: float, voxel_A: float | None = None) -> float:
    """Reciprocal grid spacing ``dq`` (1/A): ``q_max / (n // 2)``, or ``1 / (n voxel_A)`` given a real-space voxel."""
    if n < 3 or n % 2 == 0:
        raise ValueError(f"expected an odd grid size n >= 3, got {n}")
    if voxel_A is None:
        return float(q_max) / (n // 2)
    if not voxel_A > 0:
        raise ValueError(f"expected a positive real-space voxel size (A), got {voxel_A}")
    return 1.0 / (n * float(voxel_A))


def export_paths(out_dir: str | os.PathLike[str], stem: str) -> list[Path]:
    """The files :func:`export_run` may write: ``STEM.mrc``, ``STEM.h5`` and, for a variational field, ``STEM_sd.*``."""
    out = Path(out_dir)
    return [out / f"{s}{ext}" for s in (stem, f"{stem}_sd") for ext in (".mrc", ".h5")]


def export_run(run: str | os.PathLike[str], grid: int = 65, voxel_A: float | None = None,
               out_dir: str | os.PathLike[str] | None = None, stem: str | None = None,
               overwrite: bool = False) -> dict[str, object]:
    """Write ``STEM.mrc``/``STEM.h5`` (and ``STEM_sd.*`` for a variational field) into ``out_dir`` (default the run).

    The default ``stem`` is ``intensity`` in another directory and ``intensity_gGRID`` in the run directory,
    so that the run's own ``intensity.mrc``/``.h5`` (read by ``bayes-spi phase`` and ``report``) are kept.

    Raises:
        FileNotFoundError: no ``model.pt``.
        FileExistsError: a file to be written exists and ``overwrite`` is False (names the files).
        ValueError: a bad model file or grid.

    Returns:
        ``{"intensity_mrc", "intensity_h5", ["intensity_sd_mrc", "intensity_sd_h5"], "grid", "dq_inv_A",
        "voxel_A", "grid_q_max_inv_A", "detector_q_max_inv_A"}``.
    """
    path = model_path_of(run)
    out = Path(out_dir) if out_dir is not None else path.parent
    if stem is None:
        in_run = out.resolve() == path.parent.resolve()
        stem = f"intensity_g{grid}" if in_run else "intensity"
    existing = [p for p in export_paths(out, stem) if os.path.lexists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(os.fspath(p) for p in existing)}: already exists: expected new files "
                              "(the run's own intensity.mrc/.h5 are read by `bayes-spi phase` and `report`); give "
                              f"another {flag('stem')} or -o, or {flag('force')} to overwrite")
    field, q_max = load_field(path)
    dq = grid_spacing(grid, q_max, voxel_A)
    grid_max = (grid // 2) * dq
    out.mkdir(parents=True, exist_ok=True)
    vol, _ = field_on_grid(field, grid, grid_max)
    mrc, h5 = write_intensity(vol, dq, out, stem=stem)
    result: dict[str, object] = {"intensity_mrc": mrc, "intensity_h5": h5}
    if hasattr(field, "intensity_moments"):
        from bayes_spi.models.variational_field import moments_on_grid

        _, sd, _ = moments_on_grid(field, grid, grid_max)
        result["intensity_sd_mrc"], result["intensity_sd_h5"] = write_intensity(sd, dq, out, stem=f"{stem}_sd")
    result.update({"grid": grid, "dq_inv_A": dq, "voxel_A": 1.0 / (grid * dq), "grid_q_max_inv_A": grid_max,
                   "detector_q_max_inv_A": q_max})
    return result
