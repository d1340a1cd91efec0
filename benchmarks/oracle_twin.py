"""How often can the data tell a pose from its Rz(pi) twin at all? The Bayes floor of the wrong-mode fraction.

For a Friedel-symmetric intensity, the slice at ``R @ Rz(pi)`` differs from the slice at ``R`` only through
the Ewald sphere's curvature (the sign of each pixel's ``q_z``), so at low resolution and few photons a
pattern carries little evidence about which of the two it is. This script measures that evidence with the
*true* intensity (the exact molecular transform, no fit): for ``--n`` uniform poses it draws Poisson counts
at ``R`` (fluence jitter off, the simulator's beam stop), and computes the log-likelihood ratio

    LLR_i = log p(y_i | I, R_i) - log p(y_i | I, R_i Rz(pi))

with the fluence scale profiled out for each hypothesis (``--refine``: at the best pose found by a local
random search within ~8 degrees of each hypothesis, so that a nearby twin pose cannot do better). Two floors follow:

* ``argmax floor``: the fraction with ``LLR <= 0`` - the wrong-mode fraction of an estimator that knows the
  intensity exactly and picks the better of the two;
* ``posterior floor``: the mean of ``sigmoid(-LLR)`` - the posterior mass on the twin that an exact
  posterior (equal prior) must keep; any calibrated posterior's point estimate is wrong this often.

A fitted model can only do worse (its intensity is an estimate). Example::

    python benchmarks/oracle_twin.py --structure 2CEX --detector 32 --photons 1e3 --n 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

__all__ = ["twin_llr"]


def _profiled_loglik(y: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Poisson log-likelihood with the fluence scale at its maximum (``s = sum y / sum lam``), ``(B,)``."""
    s = y.sum(1, keepdims=True) / np.maximum(lam.sum(1, keepdims=True), 1e-300)
    rate = np.maximum(s * lam, 1e-300)
    return (y * np.log(rate) - rate).sum(1)


def _refine(sim, mol, q, w, c, y: np.ndarray, R0: np.ndarray, rng: np.random.Generator,
            radii_deg=(8.0, 4.0, 2.0, 1.0, 0.5), tries: int = 24) -> np.ndarray:
    """Best profiled log-likelihood over poses near ``R0`` (per pattern random local search), ``(B,)``."""
    from scipy.spatial.transform import Rotation

    best_R = R0.copy()
    best = _profiled_loglik(y, sim.expected_photons(mol, q, w, best_R, c))
    for r in radii_deg:
        for _ in range(tries):
            d = Rotation.from_rotvec(rng.normal(size=(len(R0), 3)) * np.deg2rad(r) / np.sqrt(3)).as_matrix()
            cand = best_R @ d
            ll = _profiled_loglik(y, sim.expected_photons(mol, q, w, cand, c))
            better = ll > best
            best = np.where(better, ll, best)
            best_R[better] = cand[better]
    return best


def twin_llr(structure: str, detector: str, photons: float, n: int, seed: int = 0,
             beamstop_radius: float = 2.0, refine: bool = False) -> dict[str, float]:
    """Log-likelihood ratios true pose vs Rz(pi) twin under the true intensity; summary floors."""
    from bayes_spi.geometry import get_preset
    import importlib

    sim = importlib.import_module("bayes_spi.sim.simulate")
    from bayes_spi.sim.structure import load_structure

    geom = get_preset(f"reference-{detector}")
    good = sim.beamstop_mask(geom, beamstop_radius)
    if geom.detector.mask is not None:
        good &= geom.detector.mask
    geom = geom.with_mask(good)
    mol = load_structure(structure)
    rng = np.random.default_rng(seed)
    q = geom.q_vectors()[good]
    w = sim.pixel_weights(geom)[good]
    c = sim.calibrate_fluence(mol, geom, photons, rng) * sim.CLASSICAL_ELECTRON_RADIUS_A ** 2
    R = sim.quaternions_to_rotations(sim.random_quaternions(n, rng))
    rz = np.diag([-1.0, -1.0, 1.0])
    llr = np.empty(n)
    tot = np.empty(n)
    qz_rms = float(np.sqrt(np.mean(q[:, 2] ** 2)))
    for a in range(0, n, 256):
        Rb = R[a:a + 256]
        lam = sim.expected_photons(mol, q, w, Rb, c)
        lam_t = sim.expected_photons(mol, q, w, Rb @ rz, c)
        y = rng.poisson(lam).astype(np.float64)
        if refine:  # the best pose near each hypothesis, not the exact one
            llr[a:a + len(Rb)] = (_refine(sim, mol, q, w, c, y, Rb, rng)
                                  - _refine(sim, mol, q, w, c, y, Rb @ rz, rng))
        else:
            llr[a:a + len(Rb)] = _profiled_loglik(y, lam) - _profiled_loglik(y, lam_t)
        tot[a:a + len(Rb)] = y.sum(1)
    post_twin = 1.0 / (1.0 + np.exp(np.clip(llr, -700, 700)))
    return {
        "structure": structure, "detector": int(detector), "photons": float(photons), "n": int(n), "refined": bool(refine),
        "mean_photons_measured": float(tot.mean()),
        "qz_rms_over_q_rms": qz_rms / float(np.sqrt(np.mean((q ** 2).sum(1)))),
        "argmax_floor": float(np.mean(llr <= 0)),
        "posterior_floor": float(post_twin.mean()),
        "median_llr": float(np.median(llr)),
        "frac_llr_below_2": float(np.mean(llr < 2.0)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--structure", default="2CEX")
    p.add_argument("--detector", default="32", choices=["32", "64", "128"])
    p.add_argument("--photons", type=float, default=1e3)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine", action="store_true", help="local pose search around both hypotheses")
    a = p.parse_args(argv)
    t = time.perf_counter()
    out = twin_llr(a.structure, a.detector, a.photons, a.n, a.seed, refine=a.refine)
    out["seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
