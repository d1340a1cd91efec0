#!/usr/bin/env python
"""Convert a Dragonfly (EMC) simulated data set into the bayes-spi HDF5 format.

Inputs (all produced by Dragonfly's own simulator, see benchmarks/peer/README.md):

* ``config.ini``          Dragonfly config; ``[parameters]`` gives detd [mm], lambda [A], detsize, pixsize [mm],
                          polarization. Relative paths in it are resolved against the config's folder.
* photons file (``.emc``) Dragonfly sparse photon format: int32 header[256] (header[0] = num_data,
                          header[1] = num_pix), int32 ones[num_data], int32 multi[num_data], then all
                          place_ones, all place_multi, all count_multi (int32, concatenated frame by frame).
* detector file           HDF5 (``qx, qy, qz, corr, mask`` datasets of length num_pix, scalar datasets ``detd``
                          and ``ewald_rad``; note: datasets, not attributes) or the ASCII ``.dat`` variant
                          (header ``num_pix detd ewald_rad``, then ``qx qy qz corr mask`` per pixel).
* intensity file          ``make_intensities`` output: raw float64 cube ``size^3`` (C order, index
                          ``[x][y][z]``, centre voxel ``size // 2``), |F|^2 in electrons^2 *before* make_data's
                          rescaling to the requested mean photon count.

The photons and the detector are read by bayes-spi's own readers (``bayes_spi.dataio.emc``,
``bayes_spi.dataio.dragonfly_detector``, as ``bayes-spi convert`` does); this script adds what ``convert`` cannot
know: the truth intensity cube and ``photons_per_unit_intensity`` of the simulation.

Geometry mapping (verified numerically at conversion time, ``--q-tol``)
---------------------------------------------------------------------
Dragonfly's ``make_detector.py`` builds ``(x, y) = mgrid[0:dets_x, 0:dets_y]`` and flattens it in C order,
so Dragonfly pixel ``t = x * dets_y + y`` with ``x`` the *slow* index, centre ``detc = (dets - 1) / 2``
(the same pixel-centre convention as bayes-spi). Its ``q = qscaling * (k_out_hat - z_hat)``
(``qz < 0`` for scattered pixels, beam along +z, exactly bayes-spi's ``q = k_out - k_in``) in *voxel units*
with ``qscaling = 1 / (lambda * q_sep)``, ``q_sep = 2 sin(atan(p / D) / 2) / lambda`` [1/A].

* Axis mapping: Dragonfly ``x`` (slow detector index) -> bayes-spi ``ix`` / lab ``x``; Dragonfly ``y`` (fast
  index) -> bayes-spi ``iy`` / lab ``y``; ``z`` -> ``z``. A frame is therefore
  ``counts[iy, ix] = dragonfly_frame.reshape(dets_x, dets_y).T``; no sign flips.
* Units: ``q_bayes [1/A] = voxel * q_dragonfly`` with ``voxel = q_sep``; the ratio is verified per pixel
  (all three components) to ``--q-tol`` relative error. NOTE: Dragonfly's stored ``ewald_rad`` (= D/p
  = 416.67 for the 200 mm detector) is the small-angle value of ``qscaling``; the exact ratio is used.
* Intensity cube: Dragonfly's volume index ``[x][y][z]`` samples ``I(q_dragonfly = (i - size//2))``, i.e. the
  bayes-spi ``/truth/intensity`` convention ``axis_order = "x,y,z"``, ``centre_index = n // 2`` with
  ``voxel_size_inv_A = q_sep``. (``make_intensities`` nominally uses a slightly different voxel,
  ``2 q_max / size``; what matters for the data is how ``make_data`` *samples* the cube, which is in detector
  voxel units, so the effective truth voxel is ``q_sep``: the simulated particle is that cube, i.e. the PDB
  structure scaled by a factor ``size * half_p_res * q_sep`` ~ 1.0 +- a few %).
* Polarization: Dragonfly ``polarization = x`` is ``1 - x^2 / norm^2`` with Dragonfly ``x`` = bayes-spi lab
  ``x``, so it maps to bayes-spi ``"x"`` (``y`` -> ``"y"``, ``none`` -> ``"unpolarized"``).
* ``corr`` = ``(D/p) / norm^3 * P`` = small-pixel solid angle [sr] x polarization; Dragonfly divides it by its
  mean over *all* pixels when loading. Expected photons in pixel t of frame d (no jitter):
  ``rescale * I(R_d q_t) * corr_t / mean(corr)``. bayes-spi's ``photons_per_unit_intensity`` is estimated here
  as ``mean photons per frame / E_R[sum_good Omega P I(R q)]`` (exact pixel Omega of bayes-spi, trilinear
  slices at ``--n-rot`` random rotations; Dragonfly's rescale is not written to disk).

Mask convention
---------------
Dragonfly ``mask``: 0 = good (orientation + merge), 1 = merged but not used for orientation determination
(here: the pixels outside the inscribed circle, i.e. the corners), 2 = bad (beam stop; make_data puts no
photons there). bayes-spi ``/geometry/mask``: 1 = good. Default: good = Dragonfly mask < 2 (the corners carry
valid simulated photons); ``--exclude-corners`` makes only Dragonfly mask 0 good.

Truth orientations: Dragonfly's make_data draws orientations internally and does not write them, so no
``/truth/quaternions`` (and no ``/truth/scales``) are written. ``/truth/intensity`` and
``/truth`` attrs ``photons_per_unit_intensity`` are written.

Usage (bayes-spi venv)::

    /work/main/.venv/bin/python benchmarks/peer/dragonfly_to_h5.py --config /work/peer/runs/tmv190/config.ini \
        --out /work/peer/h5/tmv190_20k.h5
"""

from __future__ import annotations

import argparse
import configparser
import json
import math
import os
import sys
import time

import h5py
import numpy as np

from bayes_spi.dataio.dragonfly_detector import ewald_radius, read_dragonfly_detector
from bayes_spi.dataio.h5 import H5Writer, SPIDataset
from bayes_spi.dataio.sources import EmcSource
from bayes_spi.geometry import HC_EV_A

POL_MAP = {"x": "x", "y": "y", "none": "unpolarized"}


# ----------------------------------------------------------------------------- Dragonfly config
def read_config(path: str) -> tuple[configparser.ConfigParser, str]:
    cfg = configparser.ConfigParser()
    if not cfg.read(path):
        raise FileNotFoundError(path)
    return cfg, os.path.dirname(os.path.abspath(path))


def cfg_filename(cfg: configparser.ConfigParser, section: str, key: str) -> str:
    """Resolve Dragonfly's ``section:::key`` links."""
    val = cfg.get(section, key).strip()
    while ":::" in val:
        sec, k = val.split(":::")
        val = cfg.get(sec, k).strip()
    return val


# ----------------------------------------------------------------------------- helpers
def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], 1)


def mean_slice_sum(intens: np.ndarray, qvox: np.ndarray, weight: np.ndarray, n_rot: int, seed: int = 0) -> float:
    """E_R[ sum_t weight_t * I(R q_t) ] with trilinear interpolation (q in voxel units, centre size//2)."""
    from scipy.ndimage import map_coordinates

    c = intens.shape[0] // 2
    tot = 0.0
    for rot in random_rotations(n_rot, np.random.default_rng(seed)):
        coords = (qvox @ rot.T).T + c
        tot += float(np.sum(weight * map_coordinates(intens, coords, order=1, mode="constant", cval=0.0)))
    return tot / n_rot


def open_source(cfg: configparser.ConfigParser, photons_f: str, det_f: str, exclude_corners: bool) -> EmcSource:
    """The photons as a data set through bayes-spi's readers (bayes_spi.dataio.emc / dragonfly_detector), with the
    config's wavelength and physical pixel size; checks the config's detsize against the recovered layout."""
    p = cfg["parameters"]
    lam = float(p["lambda"])
    pix_mm = float(p["pixsize"])
    sizes = p["detsize"].split()
    dets_x = int(sizes[0])
    dets_y = int(sizes[1]) if len(sizes) > 1 else dets_x
    src = EmcSource(photons_f, det_f, photon_energy_ev=HC_EV_A / lam, keep_mask_1=not exclude_corners,
                    pixel_size_m=pix_mm * 1e-3)
    if src.shape != (dets_y, dets_x):
        raise ValueError(f"detsize {dets_x}x{dets_y} != recovered layout (n_y, n_x) = {src.shape}")
    pol = POL_MAP[p.get("polarization", "x").strip().lower()]
    if src.geometry.kind != "grid" or src.geometry.beam.polarization != pol:
        raise ValueError(f"expected a flat grid with polarization {pol!r}, got kind {src.geometry.kind!r}")
    return src


def check_q(src: EmcSource, cfg: configparser.ConfigParser) -> tuple[float, float, np.ndarray]:
    """Return (voxel_size_inv_A, max relative error vs the config's D, p, lambda, Dragonfly q as (n_y, n_x, 3))."""
    geom = src.geometry
    p = cfg["parameters"]
    det = read_dragonfly_detector(src.detector_path)
    voxel = 1.0 / (ewald_radius(det) * geom.wavelength_A)  # Dragonfly q_sep
    qd = det.q_voxel[src.layout.index]
    # independent: make_detector's q_sep from the config
    pix, detd, lam = float(p["pixsize"]), float(p["detd"]), float(p["lambda"])
    q_sep = 2.0 * math.sin(0.5 * math.atan(pix / detd)) / lam * (detd / det.ewald_rad / pix)
    qb = geom.q_vectors()
    err = np.linalg.norm(qb - q_sep * qd, axis=-1) / np.maximum(np.linalg.norm(qb, axis=-1), 1e-300)
    return voxel, float(err.max()), qd


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="Dragonfly config.ini of the simulation")
    ap.add_argument("--photons", help="override .emc photons file (default: [make_data] out_photons_file)")
    ap.add_argument("--detector", help="override detector file (default: [make_detector] out_detector_file)")
    ap.add_argument("--intensity", help="override intensity cube (default: [make_intensities] out_intensity_file)")
    ap.add_argument("--out", required=True, help="output bayes-spi HDF5 file")
    ap.add_argument("--chunk", type=int, default=1000, help="frames per conversion chunk")
    ap.add_argument("--max-frames", type=int, default=None, help="convert only the first N frames")
    ap.add_argument("--exclude-corners", action="store_true", help="mark Dragonfly mask==1 pixels bad too")
    ap.add_argument("--q-tol", type=float, default=1e-9, help="max relative q mismatch allowed")
    ap.add_argument("--n-rot", type=int, default=500, help="rotations for photons_per_unit_intensity estimate")
    args = ap.parse_args(argv)

    t0 = time.time()
    cfg, base = read_config(args.config)
    rel = lambda f: f if os.path.isabs(f) else os.path.join(base, f)  # noqa: E731
    photons_f = rel(args.photons or cfg_filename(cfg, "make_data", "out_photons_file"))
    det_f = rel(args.detector or cfg_filename(cfg, "make_detector", "out_detector_file"))
    intens_f = rel(args.intensity or cfg_filename(cfg, "make_intensities", "out_intensity_file"))

    src = open_source(cfg, photons_f, det_f, args.exclude_corners)
    geom = src.geometry
    voxel, q_err, qd = check_q(src, cfg)
    if q_err > args.q_tol:
        raise ValueError(f"q mismatch: max relative error {q_err:.3e} > tol {args.q_tol:.1e}")
    print(f"q check: bayes q = {voxel:.9g} 1/A x Dragonfly q (axes x<-slow, y<-fast, z); max rel err {q_err:.2e}")

    raw = np.fromfile(intens_f, dtype="<f8")
    size = round(raw.size ** (1 / 3))
    if size ** 3 != raw.size or size % 2 == 0:
        raise ValueError(f"{intens_f}: {raw.size} values is not an odd cube")
    intens = raw.reshape(size, size, size)
    qmax_vox = float(np.linalg.norm(qd[geom.good_pixels()], axis=-1).max())
    if qmax_vox > size // 2 - 1:
        print(f"WARNING: detector q_max {qmax_vox:.2f} voxels exceeds the truth cube half size {size // 2}")

    n = src.n_patterns if args.max_frames is None else min(args.max_frames, src.n_patterns)
    good = geom.good_pixels()
    n_y, n_x = geom.shape
    tot_photons = 0
    tot_masked = 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sim_attrs = {
        "source": "Dragonfly (github.com/duaneloh/Dragonfly) make_densities/make_intensities/make_detector/make_data",
        "dragonfly_config": open(args.config).read(),
        "photons_file": photons_f,
        "detector_file": det_f,
        "intensity_file": intens_f,
        "n_patterns": int(n),
        "converter": "benchmarks/peer/dragonfly_to_h5.py",
        "corners_excluded": bool(args.exclude_corners),
        "q_check_max_rel_err": q_err,
        "note": "no truth orientations (Dragonfly make_data does not write them); no fluence jitter",
    }
    with H5Writer(args.out, geom, with_truth=False, chunk_patterns=64, expected_patterns=n,
                  simulation_attrs=sim_attrs) as w:
        for s in range(0, n, args.chunk):
            e = min(n, s + args.chunk)
            frames = src.layout.image(src.emc.read_pixels(np.arange(s, e)))  # (B, n_y, n_x), all pixels
            tot_masked += int(frames[:, ~good].sum())
            frames[:, ~good] = 0
            tot_photons += int(frames.sum())
            w.append(frames)
        mean_photons = tot_photons / n
        weight = (geom.solid_angle() * geom.polarization_factor())[good]
        e_sum = mean_slice_sum(intens, qd[good], weight, args.n_rot)
        ppui = mean_photons / e_sum
        w.write_truth_intensity(intens, voxel)
        w.set_truth_attrs({"photons_per_unit_intensity": ppui})
        w.set_simulation_attrs({"mean_photons_per_frame": mean_photons,
                                "photons_per_unit_intensity_method": f"mean photons / E_R[sum Omega P I], {args.n_rot} rot"})
    summary = {
        "out": os.path.abspath(args.out),
        "n_patterns": n,
        "n_y_n_x": [n_y, n_x],
        "distance_m": geom.detector.distance_m,
        "pixel_size_m": geom.detector.pixel_size_m,
        "wavelength_A": geom.wavelength_A,
        "photon_energy_ev": geom.beam.photon_energy_ev,
        "q_max_corner_inv_A": geom.q_max,
        "q_edge_centre_inv_A": float(geom.q_magnitudes()[n_y // 2, -1]),
        "voxel_size_inv_A": voxel,
        "truth_cube": size,
        "good_pixels": int(good.sum()),
        "mean_photons_per_frame": mean_photons,
        "photons_dropped_at_masked_pixels": tot_masked,
        "photons_per_unit_intensity": ppui,
        "q_check_max_rel_err": q_err,
        "seconds": round(time.time() - t0, 1),
    }
    src.close()
    with SPIDataset(args.out) as ds:  # validate what we wrote
        summary["reader_ok"] = ds.n_patterns == n and ds.shape == (n_y, n_x)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
