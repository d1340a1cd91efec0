#!/usr/bin/env python
"""Which latent point explains which patterns: the latent quadrature of a fitted continuum, against the truth.

For a saved heterogeneous run with a continuous latent (``d = 1``) on an ensemble with a known per-pattern parameter
(``/truth/latent``, e.g. the superellipsoid exponent of ``bench_hetero.py``'s continuum), prints

* the run's latent points (``FitConfig.latent_nodes``, ``latent_rule``) and ``|Spearman|`` of the grid posterior
  mean ``E[z | y]`` (class and pose summed out over the fit's search grid, all good pixels) with the truth;
* per bin of the true parameter (8 bins, equal width in ``log p``): the mean posterior weight of each latent point.
  A point that no bin uses is a dead point (it lost its patterns early and was never trained again); two points
  with the same weights in every bin describe the same structure; weights that do not move monotonically with the
  truth are a latent that orders something else (e.g. pose-dependent appearance);

and with ``--oracle-levels L ...`` what ``L`` *true* structures at ``L`` levels (equal steps in ``log p`` over the
ensemble's range, uniform weights) would give on the first ``--oracle-patterns`` patterns: ``|Spearman|`` of the
posterior mean ``log p`` with the truth (the pose summed over ``--oracle-rotations``, the fluence profiled out,
read from 41^3 cubes as the search does; ``bench_hetero.oracle_spearman`` is the 32-level case). That separates
"the latent has too few points" from "the fitted fields at its points are wrong".

Example::

    python benchmarks/bench_latent_nodes.py /tmp/bench_hetero/run_continuum_search_emc /tmp/bench_hetero/continuum.h5 \\
        --oracle-levels 3 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))

__all__ = ["node_weights", "oracle_levels_spearman"]


def node_weights(run: Path, data_path: Path, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The fitted model's latent points ``(L, d)`` and every pattern's posterior weight on each ``(N, L)`` (the
    class and the pose over the fit's search grid summed out, all good pixels)."""
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.infer.class_emc import ClassGridMarginal
    from bayes_spi.infer.heterogeneous import fit_class_grid
    from bayes_spi.infer.load import load_trained

    trained = load_trained(run)
    model, config = trained.model, trained.config
    emc = ClassGridMarginal(model, fit_class_grid(trained.guide, config).to(model.q.dtype),
                            cache_grid=config.cache_grid, latent_per_dim=config.latent_nodes)
    if emc.nodes is None:
        raise ValueError(f"{run}: expected a run with a continuous latent (latent_dim >= 1), got latent_dim 0")
    out = []
    with SPIDataset(data_path) as data, torch.no_grad():
        pixels = torch.nonzero(torch.as_tensor(data.mask.reshape(-1))).squeeze(-1)
        caches = emc.caches()
        emc.caches = lambda: caches  # type: ignore[method-assign]
        for s in range(0, data.n_patterns, batch_size):
            images = torch.as_tensor(data.read(np.arange(s, min(s + batch_size, data.n_patterns))),
                                     dtype=model.q.dtype)
            out.append(emc(images, pixels).responsibilities.sum((1, 3)).double().numpy())
    return emc.nodes.double().numpy(), np.concatenate(out)


def oracle_levels_spearman(data_path: Path, n_levels: int, n_patterns: int = 500, n_rotations: int = 2048
                           ) -> tuple[float, float]:
    """``|Spearman|`` of the posterior mean ``log p`` with the true exponent under ``n_levels`` true shapes
    (equal steps in ``log p``, uniform weights) on the first ``n_patterns`` patterns, and the mean largest
    posterior weight (how sharply a pattern picks one level)."""
    import h5py

    from bench_hetero import _oracle_marginals
    from bayes_spi.sim.ensemble import _ShapeBank, parse_ensemble, read_truth_labels

    with h5py.File(data_path, "r") as f:
        attrs = dict(f["/simulation"].attrs) if "/simulation" in f else {}
    lo, hi = (float(x) for x in str(attrs.get("ensemble_exponents", "2,20")).split(","))
    radius = float(attrs.get("ensemble_radius_A", 30))
    bank = _ShapeBank(parse_ensemble(f"shapes:p={lo:g}..{hi:g};radius={radius:g};levels=32"))
    levels = np.exp(np.linspace(np.log(lo), np.log(hi), n_levels))
    lls = _oracle_marginals(data_path, [lambda pts, p=float(p): np.abs(bank.transform(p, pts)) ** 2 for p in levels],
                            n_patterns, n_rotations, 41)
    post = torch.softmax(lls, 1).numpy()
    truth = read_truth_labels(data_path)[0][:n_patterns, 0]
    return abs(float(spearmanr(post @ np.log(levels), truth).statistic)), float(post.max(1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run directory (model.pt or checkpoint.pt)")
    ap.add_argument("data", type=Path, help="the ensemble's HDF5 file (with /truth/latent)")
    ap.add_argument("--bins", type=int, default=8)
    ap.add_argument("--oracle-levels", type=int, nargs="*", default=[])
    ap.add_argument("--oracle-patterns", type=int, default=500)
    ap.add_argument("--oracle-rotations", type=int, default=2048)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from bayes_spi.sim.ensemble import read_truth_labels

    truth = read_truth_labels(args.data)[0]
    if truth is None:
        raise ValueError(f"{args.data}: expected /truth/latent, got none")
    nodes, w = node_weights(args.run, args.data)
    z_mean = w @ nodes[:, 0]
    print(f"latent points {np.round(nodes[:, 0], 3).tolist()}; |Spearman| of E[z | y] with the truth "
          f"{abs(float(spearmanr(z_mean, truth[:, 0]).statistic)):.3f}")
    lp = np.log(truth[:, 0])
    edges = np.linspace(lp.min(), lp.max() + 1e-9, args.bins + 1)
    b = np.clip(np.digitize(lp, edges) - 1, 0, args.bins - 1)
    print("| true parameter | patterns | " + " | ".join(f"z = {z:+.2f}" for z in nodes[:, 0]) + " |")
    print("|---|---|" + "---|" * len(nodes))
    for k in range(args.bins):
        sel = b == k
        if sel.any():
            print(f"| [{np.exp(edges[k]):.2f}, {np.exp(edges[k + 1]):.2f}) | {int(sel.sum())} | "
                  + " | ".join(f"{x:.2f}" for x in w[sel].mean(0)) + " |")
    for n_levels in args.oracle_levels:
        rho, sharp = oracle_levels_spearman(args.data, n_levels, args.oracle_patterns, args.oracle_rotations)
        print(f"oracle, {n_levels} true levels: |Spearman| {rho:.3f}, mean largest posterior weight {sharp:.3f}")


if __name__ == "__main__":
    main()
