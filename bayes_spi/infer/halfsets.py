"""Half-set validation: two independent fits on a random split of the patterns, and their FSC.

The standard resolution estimate for experimental data (no truth): split the patterns at random into two
halves, reconstruct each independently, align the two intensities (each fit has its own arbitrary global
orientation) and compute the FSC of ``sqrt I`` in shells of ``|q|``. Because each half holds half the data,
the 0.143 threshold on the half-set FSC is the usual estimate of the full data's 0.5-FSC resolution
(Rosenthal & Henderson 2003); both crossings are reported.

Layout written by ``bayes-spi fit --half-sets -o RUN``::

    RUN/halfsets.json   the split seed, the sizes, the alignment rotation, the resolutions
    RUN/halfsets.h5     /half1, /half2: the sorted pattern indices of each half (reproduces the split)
    RUN/half1/, RUN/half2/   two complete runs (config, checkpoints, model, volumes, report)
    RUN/fsc.json        entry "halfset" (the curve and its resolutions; read by the report)

Example::

    curve, info = halfset_fsc("RUN/half1", "RUN/half2")
    print(curve.resolution_nm(0.143))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bayes_spi import __version__
from bayes_spi.atomic import atomic_path
from bayes_spi.config.commands import flag
from bayes_spi.dataio.subset import random_halves
from bayes_spi.infer.evaluate import load_field
from bayes_spi.infer.outputs import field_on_grid
from bayes_spi.infer.rundir import FORMAT_VERSION_KEY, RunDir

__all__ = ["HALVES", "halfset_fsc", "read_split", "write_halfset_summary", "write_split"]

#: sub-directory names of the two half-set runs
HALVES: tuple[str, str] = ("half1", "half2")


def write_split(run_dir: str | os.PathLike[str], n_patterns: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw the random split (:func:`random_halves`) and record it in ``RUN/halfsets.h5`` (atomically)."""
    h1, h2 = random_halves(n_patterns, seed)
    path = RunDir(run_dir).path("halfsets")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("half1", data=h1, compression="gzip")
            f.create_dataset("half2", data=h2, compression="gzip")
            f.attrs.update({FORMAT_VERSION_KEY: RunDir.format_version("halfsets"), "seed": int(seed), "n_patterns": int(n_patterns), "software_version": __version__,
                            "method": "numpy.random.default_rng(seed).permutation(n); first n//2 -> half1"})
    return h1, h2


def read_split(run_dir: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The recorded split: ``(half1, half2, attrs)``."""
    path = RunDir(run_dir).path("halfsets")
    if not path.is_file():
        raise FileNotFoundError(f"{os.fspath(path)}: not found (expected the half-set split of a {flag('half_sets')} run)")
    with RunDir(run_dir).open_h5("halfsets", f"the half-set split of a {flag('half_sets')} run (HDF5)") as f:
        for name in HALVES:
            if name not in f:
                raise ValueError(f"{os.fspath(path)}: field /{name}: expected the pattern indices, got missing")
        return np.asarray(f["half1"][()]), np.asarray(f["half2"][()]), dict(f.attrs)


def halfset_fsc(run_a: str | os.PathLike[str], run_b: str | os.PathLike[str], grid: int = 65,
                n_rotations: int | None = None) -> tuple[Any, dict[str, Any]]:
    """FSC of two independently fitted intensities after aligning ``b`` onto ``a``.

    Both fields are sampled on a ``grid``^3 cube up to the detector's ``q_max``; the rotation that maps
    ``b`` onto ``a`` is found on those volumes (:func:`bayes_spi.analysis.align.align_intensity_rotation`),
    then ``b`` is re-sampled exactly (the field itself, not an interpolated volume) in ``a``'s frame. Shells
    run up to ``q_max`` inside the measured sphere.

    Returns:
        ``(FSCCurve, {"rotation": (3, 3) list, "grid": n, "dq_inv_A": dq, "q_max_inv_A": q_max,
        "speckle": FSCCurve})``: the papers' sqrt(I) FSC and the speckle FSC (shell means removed).
    """
    from bayes_spi.analysis.align import align_intensity_rotation
    from bayes_spi.analysis.fsc import ball_mask, intensity_fsc

    field_a, q_max = load_field(RunDir(run_a).path("model"))
    field_b, _ = load_field(RunDir(run_b).path("model"))
    I_a, dq = field_on_grid(field_a, grid, q_max)
    I_b, _ = field_on_grid(field_b, grid, q_max)
    kwargs = {} if n_rotations is None else {"n_rotations": n_rotations}
    R = np.asarray(align_intensity_rotation(I_a, I_b, **kwargs), dtype=np.float64)
    # align_intensity_rotation: rotate_volume(I_b, R)(x) = I_b(R^T x) ~ I_a(x), so sample field b at R^T q
    I_b_aligned, _ = field_on_grid(field_b, grid, q_max, rotation=R.T)
    sphere = ball_mask(grid, dq, q_max)
    q_last = dq * np.floor(q_max / dq)
    curve = intensity_fsc(I_a, I_b_aligned, dq, q_max=q_last, mask=sphere)
    speckle = intensity_fsc(I_a, I_b_aligned, dq, q_max=q_last, mask=sphere, speckle=True)
    return curve, {"rotation": R.tolist(), "grid": grid, "dq_inv_A": dq, "q_max_inv_A": q_max, "speckle": speckle}


def write_halfset_summary(run_dir: str | os.PathLike[str], curve: Any, info: dict[str, Any],
                          split_attrs: dict[str, Any]) -> Path:
    """``RUN/halfsets.json`` and the ``halfset`` entry of ``RUN/fsc.json``."""
    from bayes_spi.infer.evaluate import write_fsc_json

    run_dir = Path(run_dir)
    info = dict(info)
    speckle = info.pop("speckle", None)
    write_fsc_json(run_dir, {"halfset": curve, **({"halfset_speckle": speckle} if speckle is not None else {})})
    summary = {
        "software_version": __version__,
        "seed": int(split_attrs.get("seed", -1)),
        "n_patterns": int(split_attrs.get("n_patterns", -1)),
        "halves": list(HALVES),
        "halfset_fsc_res_nm_0.5": curve.resolution_nm(0.5),
        "halfset_fsc_res_nm_0.143": curve.resolution_nm(0.143),
        "crosses_0.5": bool(curve.crosses(0.5)),
        "crosses_0.143": bool(curve.crosses(0.143)),
        **({"halfset_speckle_fsc_res_nm_0.5": speckle.resolution_nm(0.5),
            "halfset_speckle_fsc_res_nm_0.143": speckle.resolution_nm(0.143)} if speckle is not None else {}),
        **info,
    }
    return RunDir(run_dir).write_json("halfsets_summary", summary)
