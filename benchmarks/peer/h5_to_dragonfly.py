#!/usr/bin/env python
"""Convert a bayes-spi data file (``.h5``) into a Dragonfly (EMC) run folder, so Dragonfly's ``emc`` can
reconstruct *our* simulations (the reverse of ``dragonfly_to_h5.py``).

Writes into ``--out`` (a folder)::

    data/photons.emc     the patterns in Dragonfly's sparse photon format (see below)
    data/det.h5          a Dragonfly HDF5 detector file (qx, qy, qz, corr, mask, detd, ewald_rad; + wavelength)
    config.ini           an ``[emc]`` section for ``emc -c config.ini -t 1 N`` (output/, logs/ created)
    conversion.json      what was converted: frames, photons, voxel size, num_div and why, q check

Photon file (Dragonfly ``src/dataset.c``; bayes-spi's reader ``bayes_spi.dataio.emc``): little-endian int32
throughout; header of 256 words ``[num_data, num_pix, 0 (sparse), 0...]``, then ``ones[num_data]``,
``multi[num_data]``, all ``place_ones``, all ``place_multi``, all ``count_multi`` frame after frame. The
patterns are streamed (``--chunk`` frames at a time; the three lists go to temporary files that are then
concatenated), so memory does not grow with the number of frames. Photons on bad pixels (bayes-spi mask 0)
are dropped and counted.

Pixel order and geometry (Dragonfly ``utils/make_detector.py``): pixel ``t = ix * n_y + iy`` (``x`` slow), i.e. a
frame is ``counts[iy, ix].T.ravel()``; positions ``(ix - (n_x - 1)/2, iy - (n_y - 1)/2) * p`` on a plane at
``D``; ``q = qscaling (k_out_hat - z_hat)`` in *voxel units* with ``qscaling = 1 / (lambda q_sep)`` and
``q_sep = 2 sin(atan(p / D) / 2) / lambda`` (the angular size of one pixel at the beam, ``ewald_rad = D / p``:
exactly what ``make_detector`` writes). bayes-spi's ``q`` (1/A, no ``2 pi``, ``k_out - k_in``) is then
``q_sep * q_dragonfly`` to rounding (checked per pixel at conversion, ``--q-tol``). ``--voxel-inv-A`` chooses
another voxel (e.g. the truth cube's, so EMC's volume lands on that grid). The EMC volume is
``2 ceil(q_max / voxel) + 3`` voxels wide.

``corr`` = bayes-spi's exact pixel solid angle x polarization (``Geometry.pixel_factor``; Dragonfly divides it
by its mean when loading, so only the shape matters). The data were simulated with the same factor, so EMC
models the mean photon count per pixel exactly as the simulator did.

Mask (Dragonfly's convention): ``2`` = bad (bayes-spi mask 0: beam stop, dead pixels; never used),
``1`` = merged but not used to find orientations (good pixels outside the inscribed circle of the detector,
as ``make_detector`` marks the corners), ``0`` = good. ``--corners orient`` makes the good corners ``0`` too.

``num_div`` (Dragonfly's orientation sampling, ``10 (5 n^3 + n)`` orientations, mean spacing about
``(8 pi^2 / N)^(1/3)`` ~ ``1.16 / n`` rad): chosen so the spacing is at most ``--spacing-speckles`` (default 2)
speckle angles at the inscribed circle, a speckle angle being ``1 / (D q_in)`` for a particle of size ``D``
(``--particle-size-A``; default: the largest atom-atom distance of the simulation's structure, else twice the
largest distance of a ``/truth/density`` voxel above 10% of the maximum from its centre of mass), capped at
``--max-num-div``; or ``--num-div``.
Dragonfly's own 190 A run (benchmarks/peer/README.md) converged with ``n = 4``, about 2.1 speckle angles.

Scaling: ``need_scaling = 1`` (per-frame fluence scale factors) when the file's simulation had fluence jitter,
``0`` otherwise (``--need-scaling`` overrides). ``beta`` is Dragonfly's automatic, empirical choice (no
``beta`` key: ``exp(-6.5 (counts 1e-5)^0.15)``, per frame with scaling), doubled every
``--beta-period`` iterations (``beta_schedule = 2.0 10`` as in Dragonfly's sample config and the TMV run).
``--radius R`` (voxels) adds Dragonfly's ``radius``: only pixels with ``|q| < R`` find orientations (all merge),
EMC's usual low-resolution start when the detector reaches many speckles (the TMV run's orientation pixels
reached ~7 speckles, ``q_in D``; a 156 A particle on the 64 px reference detector reaches ~14).

Usage (bayes-spi venv)::

    /work/main/.venv/bin/python benchmarks/peer/h5_to_dragonfly.py /work/robust/150A_1e3_64px/data.h5 \
        --out /work/peer/runs/6mer
    cd /work/peer/runs/6mer && nice -n 5 /work/peer/Dragonfly/build/emc -c config.ini -t 1 15
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bayes_spi.atomic import atomic_path, write_json
from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.geometry import Geometry

__all__ = [
    "dragonfly_pixel_order",
    "dragonfly_q_sep",
    "dragonfly_detector_arrays",
    "write_detector",
    "write_emc",
    "num_orientations",
    "orientation_spacing_rad",
    "choose_num_div",
    "structure_extent_A",
    "particle_size_from_density",
    "write_config",
    "convert",
    "main",
]

HEADER_WORDS = 256


# ----------------------------------------------------------------------------- geometry
def dragonfly_pixel_order(shape: tuple[int, int]) -> np.ndarray:
    """``(n_y * n_x,)`` flat image index (``iy * n_x + ix``) of Dragonfly pixel ``t = ix * n_y + iy``."""
    n_y, n_x = shape
    iy, ix = np.meshgrid(np.arange(n_y), np.arange(n_x), indexing="ij")  # (n_y, n_x)
    return (iy * n_x + ix).T.reshape(-1)  # t runs x slow, y fast


def dragonfly_q_sep(geom: Geometry) -> float:
    """``make_detector``'s voxel ``q_sep = 2 sin(atan(p / D) / 2) / lambda`` (1/A) of a flat grid."""
    det = geom.detector
    return 2.0 * math.sin(0.5 * math.atan(det.pixel_size_m / det.distance_m)) / geom.wavelength_A


def dragonfly_detector_arrays(geom: Geometry, voxel_inv_A: float, corners_orient: bool = False) -> dict[str, Any]:
    """The detector file's arrays in Dragonfly's pixel order.

    Returns:
        ``qx, qy, qz`` ``(num_pix,)`` in voxel units (``q / voxel_inv_A``), ``corr`` ``(num_pix,)`` (solid angle x
        polarization, sr), ``mask`` ``(num_pix,)`` uint8 (0 good, 1 merge-only corners, 2 bad), ``detd`` and
        ``ewald_rad`` (``D / p`` in pixels).
    """
    if not geom.is_grid:
        raise ValueError(f"expected a flat grid detector (kind 'grid'), got kind {geom.kind!r}")
    det = geom.detector
    order = dragonfly_pixel_order(geom.shape)
    q = geom.q_vectors().reshape(-1, 3)[order] / voxel_inv_A
    corr = geom.pixel_factor().reshape(-1)[order]
    good = geom.good_pixels().reshape(-1)[order]
    pos = geom.pixel_positions().reshape(-1, 3)[order] / det.pixel_size_m
    rad = np.hypot(pos[:, 0], pos[:, 1])
    mask = np.zeros(q.shape[0], dtype=np.uint8)
    if not corners_orient:
        mask[rad > min((det.n_x - 1) / 2.0, (det.n_y - 1) / 2.0)] = 1  # make_detector's rule
    mask[~good] = 2
    d_pix = det.distance_m / det.pixel_size_m
    return {"qx": q[:, 0], "qy": q[:, 1], "qz": q[:, 2], "corr": corr, "mask": mask, "detd": d_pix,
            "ewald_rad": d_pix}


def write_detector(path: str | os.PathLike[str], arrays: dict[str, Any], wavelength_A: float) -> None:
    """Write a Dragonfly HDF5 detector (scalars as datasets, as ``utils/py_src/detector.py`` does) atomically;
    ``wavelength`` (A) is added for bayes-spi's reader (Dragonfly ignores it)."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name in ("qx", "qy", "qz", "corr"):
                f[name] = np.asarray(arrays[name], dtype=np.float64)
            f["mask"] = np.asarray(arrays["mask"], dtype=np.uint8)
            f["detd"] = float(arrays["detd"])
            f["ewald_rad"] = float(arrays["ewald_rad"])
            f["wavelength"] = float(wavelength_A)


# ----------------------------------------------------------------------------- photons
def write_emc(path: str | os.PathLike[str], ds: SPIDataset, chunk: int = 1000, max_frames: int | None = None,
              progress: bool = True) -> dict[str, int]:
    """Stream the data set's patterns into a sparse Dragonfly ``.emc`` file (atomically).

    ``ds`` gives the geometry and the mask; the counts are read raw from ``/data/counts`` so that photons on bad
    pixels can be counted before they are dropped (``SPIDataset.read`` zeroes them).

    Returns:
        ``{"num_data", "num_pix", "photons", "photons_dropped_bad_pixels"}``.
    """
    path = Path(path)
    n = ds.n_patterns if max_frames is None else min(int(max_frames), ds.n_patterns)
    order = dragonfly_pixel_order(ds.shape)
    good = ds.mask.reshape(-1)[order]
    num_pix = order.size
    ones = np.zeros(n, dtype="<i4")
    multi = np.zeros(n, dtype="<i4")
    photons = dropped = 0
    tmpdir = Path(tempfile.mkdtemp(prefix=".emc_", dir=path.parent))
    try:
        parts = [tmpdir / name for name in ("place_ones", "place_multi", "count_multi")]
        handles = [open(p, "wb") for p in parts]  # noqa: SIM115 (closed below)
        h5 = h5py.File(ds.path, "r")
        counts = h5["data/counts"]
        try:
            t0 = time.time()
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                raw = np.asarray(counts[s:e]).reshape(e - s, -1)[:, order]
                if not np.issubdtype(raw.dtype, np.integer) and not (np.isfinite(raw).all()
                                                                     and (raw == np.round(raw)).all()):
                    raise ValueError(f"{os.fspath(ds.path)}: /data/counts: expected whole photon counts, got "
                                     f"non-integer values in frames {s}..{e - 1}")
                frames = raw.astype(np.int64)
                if frames.size and frames[:, good].min() < 0:
                    raise ValueError(f"{os.fspath(ds.path)}: /data/counts: expected photon counts >= 0, got "
                                     f"{int(frames[:, good].min())} in frames {s}..{e - 1}")
                dropped += int(frames[:, ~good].sum())
                frames[:, ~good] = 0
                photons += int(frames.sum())
                rows1, pix1 = np.nonzero(frames == 1)
                rowsm, pixm = np.nonzero(frames > 1)
                ones[s:e] = np.bincount(rows1, minlength=e - s)
                multi[s:e] = np.bincount(rowsm, minlength=e - s)
                handles[0].write(pix1.astype("<i4").tobytes())  # np.nonzero is row-major: frame after frame
                handles[1].write(pixm.astype("<i4").tobytes())
                handles[2].write(frames[rowsm, pixm].astype("<i4").tobytes())
                if progress:
                    print(f"\r  photons: {e}/{n} frames ({time.time() - t0:.0f} s)", end="", file=sys.stderr,
                          flush=True)
            if progress:
                print(file=sys.stderr)
        finally:
            h5.close()
            for h in handles:
                h.close()
        header = np.zeros(HEADER_WORDS, dtype="<i4")
        header[0], header[1] = n, num_pix
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as out:
                out.write(header.tobytes())
                out.write(ones.tobytes())
                out.write(multi.tobytes())
                for p in parts:
                    with open(p, "rb") as fh:
                        shutil.copyfileobj(fh, out, 1 << 22)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return {"num_data": int(n), "num_pix": int(num_pix), "photons": int(photons),
            "photons_dropped_bad_pixels": int(dropped)}


# ----------------------------------------------------------------------------- orientation sampling
def num_orientations(num_div: int) -> int:
    """Dragonfly's orientation count for ``num_div = n`` (600-cell refinement): ``10 (5 n^3 + n)``."""
    return 10 * (5 * num_div**3 + num_div)


def orientation_spacing_rad(num_div: int) -> float:
    """Mean spacing (rad of rotation) of ``num_div``'s sampling: ``(8 pi^2 / N)^(1/3)`` (SO(3)'s volume in the
    rotation-angle metric shared by N cells)."""
    return (8.0 * math.pi**2 / num_orientations(num_div)) ** (1.0 / 3.0)


def choose_num_div(size_A: float, q_in_inv_A: float, spacing_speckles: float = 2.0, max_num_div: int = 8) -> int:
    """Smallest ``n`` whose spacing is at most ``spacing_speckles`` speckle angles ``1 / (D q_in)``, capped."""
    if not (size_A > 0 and q_in_inv_A > 0 and spacing_speckles > 0):
        raise ValueError(f"expected positive particle size, q and spacing, got {size_A}, {q_in_inv_A}, "
                         f"{spacing_speckles}")
    target = spacing_speckles / (size_A * q_in_inv_A)
    n = 1
    while orientation_spacing_rad(n) > target and n < max_num_div:
        n += 1
    return n


def structure_extent_A(structure: str, max_atoms: int = 3000) -> float:
    """Largest atom-atom distance (A) of a structure (PDB/mmCIF path or packaged name; a subsample of
    ``max_atoms``)."""
    from bayes_spi.sim.structure import load_structure

    s = load_structure(structure)
    p = np.concatenate([s.positions[e] for e in s.elements])
    sub = p[:: max(1, len(p) // max_atoms)]
    return float(np.linalg.norm(sub[:, None] - sub[None], axis=-1).max())


def particle_size_from_density(density: np.ndarray, voxel_A: float, threshold: float = 0.1) -> float:
    """Twice the largest distance (A) from the centre of mass of the voxels above ``threshold`` x max."""
    rho = np.asarray(density, dtype=np.float64)
    sel = rho > threshold * rho.max()
    idx = np.argwhere(sel).astype(np.float64)
    w = rho[sel]
    com = (idx * w[:, None]).sum(0) / w.sum()
    return float(2.0 * np.sqrt(((idx - com) ** 2).sum(1)).max() * voxel_A + voxel_A)


# ----------------------------------------------------------------------------- config
def write_config(path: str | os.PathLike[str], num_div: int, need_scaling: int, beta_period: int,
                 fixed_seed: bool, radius: float | None = None) -> None:
    """Dragonfly ``config.ini`` with an ``[emc]`` section (paths relative to the run folder)."""
    lines = [
        "# written by benchmarks/peer/h5_to_dragonfly.py",
        "[emc]",
        "in_photons_file = data/photons.emc",
        "in_detector_file = data/det.h5",
        f"num_div = {num_div}",
        "output_folder = output/",
        "log_file = logs/EMC.log",
        f"need_scaling = {need_scaling}",
        "beta_factor = 1.0",
        f"beta_schedule = 2.0 {beta_period}",
    ]
    if fixed_seed:
        lines.append("fixed_seed = 1")
    if radius:
        lines.append(f"radius = {radius:g}")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="ascii")


def convert(data: str | os.PathLike[str], out: str | os.PathLike[str], *, voxel_inv_A: float | None = None,
            corners_orient: bool = False, num_div: int | None = None, particle_size_A: float | None = None,
            spacing_speckles: float = 2.0, max_num_div: int = 8, need_scaling: int | None = None,
            beta_period: int = 10, fixed_seed: bool = False, radius: float | None = None, chunk: int = 1000,
            max_frames: int | None = None,
            q_tol: float = 1e-9, progress: bool = True) -> dict[str, Any]:
    """bayes-spi ``data`` -> Dragonfly run folder ``out`` (see the module docstring); returns the summary."""
    t0 = time.time()
    out = Path(out)
    for sub in ("data", "output", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    with SPIDataset(data) as ds:
        geom = ds.geometry
        q_sep = dragonfly_q_sep(geom)
        voxel = float(voxel_inv_A) if voxel_inv_A else q_sep
        arrays = dragonfly_detector_arrays(geom, voxel, corners_orient)
        # independent check: make_detector's formula from the pixel positions alone
        order = dragonfly_pixel_order(geom.shape)
        pos = geom.pixel_positions().reshape(-1, 3)[order]
        norm = np.linalg.norm(pos, axis=1)
        q_md = np.stack([pos[:, 0] / norm, pos[:, 1] / norm, pos[:, 2] / norm - 1.0], 1) / (geom.wavelength_A * voxel)
        q_df = np.stack([arrays["qx"], arrays["qy"], arrays["qz"]], 1)
        q_err = float((np.linalg.norm(q_df - q_md, axis=1) / np.maximum(np.linalg.norm(q_md, axis=1), 1e-300)).max())
        if q_err > q_tol:
            raise ValueError(f"q mismatch with make_detector's formula: {q_err:.2e} > {q_tol:.0e}")
        write_detector(out / "data" / "det.h5", arrays, geom.wavelength_A)
        qn = np.sqrt(arrays["qx"] ** 2 + arrays["qy"] ** 2 + arrays["qz"] ** 2)
        q_in = float(qn[arrays["mask"] == 0].max()) * voxel
        size_how = "given"
        with h5py.File(ds.path, "r") as f:
            sim = dict(f["simulation"].attrs) if "simulation" in f else {}
            if particle_size_A is None:  # also with --num-div: the summary reports the speckle angle
                structure = str(sim.get("structure", "")).strip()
                if structure:
                    try:
                        particle_size_A, size_how = structure_extent_A(structure), f"extent of {structure}"
                    except (OSError, ValueError) as exc:
                        print(f"note: structure {structure!r} not readable ({exc}); size from /truth/density",
                              file=sys.stderr)
                if particle_size_A is None and "truth/density" in f:
                    dens = f["truth/density"]
                    particle_size_A = particle_size_from_density(dens[()], float(dens.attrs["voxel_size_A"]))
                    size_how = "from /truth/density (10% threshold)"
                if particle_size_A is None and num_div is None:
                    raise ValueError(f"{os.fspath(data)}: /truth/density: expected a density (or a readable "
                                     "simulation structure) to estimate the particle size, got none: give "
                                     "--particle-size-A or --num-div")
            if particle_size_A is None:
                size_how = "unknown"
        n_div = int(num_div) if num_div else choose_num_div(particle_size_A, q_in, spacing_speckles, max_num_div)
        jitter = str(sim.get("fluence_jitter", "")).strip().lower()
        if need_scaling is None:
            need_scaling = int(jitter not in ("", "none", "0"))
        stats = write_emc(out / "data" / "photons.emc", ds, chunk, max_frames, progress)
    write_config(out / "config.ini", n_div, need_scaling, beta_period, fixed_seed, radius)
    summary = {
        "data": os.path.abspath(data),
        "out": os.path.abspath(out),
        **stats,
        "mean_photons_per_frame": stats["photons"] / max(stats["num_data"], 1),
        "shape_n_y_n_x": list(geom.shape),
        "wavelength_A": geom.wavelength_A,
        "voxel_inv_A": voxel,
        "voxel_is_make_detector_q_sep": voxel == q_sep,
        "q_max_voxels": float(qn[arrays["mask"] < 2].max()),
        "emc_volume_size": int(2 * math.ceil(float(qn[arrays["mask"] < 2].max())) + 3),
        "q_inscribed_inv_A": q_in,
        "pixels_mask_0_1_2": [int((arrays["mask"] == k).sum()) for k in (0, 1, 2)],
        "q_check_max_rel_err": q_err,
        "particle_size_A": particle_size_A,
        "particle_size_how": size_how,
        "speckle_angle_deg": math.degrees(1.0 / (particle_size_A * q_in)) if particle_size_A else None,
        "num_div": n_div,
        "num_orientations": num_orientations(n_div),
        "orientation_spacing_deg": math.degrees(orientation_spacing_rad(n_div)),
        "need_scaling": need_scaling,
        "fluence_jitter": jitter,
        "fixed_seed": fixed_seed,
        "radius_voxels": radius,
        "radius_inv_A": radius * voxel if radius else None,
        "seconds": round(time.time() - t0, 1),
    }
    write_json(out / "conversion.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="bayes-spi .h5 -> Dragonfly run folder (photons.emc, det.h5, config.ini)")
    ap.add_argument("data", help="bayes-spi data file (.h5)")
    ap.add_argument("--out", required=True, help="run folder to write")
    ap.add_argument("--voxel-inv-A", type=float, default=None,
                    help="Dragonfly voxel (1/A) [default: make_detector's q_sep, one pixel at the beam]")
    ap.add_argument("--corners", choices=("merge", "orient"), default="merge",
                    help="good pixels outside the inscribed circle: mask 1 (merge only, make_detector) or 0")
    ap.add_argument("--num-div", type=int, default=None, help="override the orientation sampling")
    ap.add_argument("--particle-size-A", type=float, default=None, help="particle size for num_div")
    ap.add_argument("--spacing-speckles", type=float, default=2.0, help="max orientation spacing, speckle angles")
    ap.add_argument("--max-num-div", type=int, default=8)
    ap.add_argument("--need-scaling", type=int, choices=(0, 1), default=None)
    ap.add_argument("--beta-period", type=int, default=10, help="double beta every this many iterations")
    ap.add_argument("--fixed-seed", action="store_true", help="Dragonfly's fixed random start (else the clock)")
    ap.add_argument("--radius", type=float, default=None,
                    help="Dragonfly's radius (voxels): only mask-0 pixels with |q| below it find orientations")
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--max-frames", type=int, default=None)
    args = ap.parse_args(argv)
    summary = convert(args.data, args.out, voxel_inv_A=args.voxel_inv_A, corners_orient=args.corners == "orient",
                      num_div=args.num_div, particle_size_A=args.particle_size_A,
                      spacing_speckles=args.spacing_speckles, max_num_div=args.max_num_div,
                      need_scaling=args.need_scaling, beta_period=args.beta_period, fixed_seed=args.fixed_seed,
                      radius=args.radius,
                      chunk=args.chunk, max_frames=args.max_frames)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
