"""The class posterior of a fitted heterogeneous model: coarse grid, fine grid and the refined (off-grid) posterior.

On the saved fields of a finished (or checkpointed) heterogeneous run, side by side in one process, over the same
patterns of the data file (its ``/truth/class``, or ``/truth/latent`` for a continuum):

- ``grid_<G>``: :func:`bayes_spi.posterior.latent.grid_class_posteriors` (the exact sum over ``G`` grid orientations
  and the latent's quadrature points, the fluence profiled out, all good pixels); for one class with a latent, the
  same sum's ``E[z | y]`` over the latent's quadrature points (:func:`grid_latent_mean`);
- ``refined``: :func:`bayes_spi.posterior.class_refine.refined_class_posteriors` on the coarse grid of the fit
  (``--n-modes`` best rotations per class and latent point refined, Laplace evidence, the rest of SO(3) from the
  grid), with ``--n-modes`` / ``--n-iter`` variants;
- ``local_grid_<s>`` (``--local-grid s``): the alternative, the same seeds' grid cells integrated on ``s^3`` rotations
  each (midpoint rule), no refinement;
- ``oracle_*`` (``--oracle 2CEX,2CEX@hinge=25``): the same coarse grid and refiner on the *true* states' intensities.

Prints, per method: class accuracy (best label permutation) or |Spearman| of E[z | y] with the true latent, the
mean max class probability, wall time, this process's CPU time (one thread: robust to other jobs' load) and
patterns/s.

Usage: python benchmarks/bench_class_refine.py RUN DATA.h5 [--grids 4096 32768] [--n-modes 3] [--n-iter 4]
       [--patterns 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.infer.load import load_trained
from bayes_spi.posterior.class_refine import refined_class_posteriors
from bayes_spi.posterior.latent import grid_class_posteriors
from bayes_spi.sim.ensemble import read_truth_labels

__all__ = ["grid_latent_mean", "local_grid_class_posteriors", "main", "oracle_refined", "score"]


def score(probs: np.ndarray, z_mean: np.ndarray | None, true_class: np.ndarray | None,
          true_latent: np.ndarray | None) -> dict[str, float]:
    """Accuracy (best of the two labellings for two classes) and/or |Spearman| of ``z_mean[:, 0]``."""
    out: dict[str, float] = {"mean_max_prob": float(probs.max(1).mean())}
    if true_class is not None and probs.shape[1] > 1:
        acc = float((probs.argmax(1) == true_class).mean())
        out["class_accuracy"] = max(acc, 1.0 - acc) if probs.shape[1] == 2 else acc
    if true_latent is not None and z_mean is not None and z_mean.shape[1]:
        out["abs_spearman_z"] = abs(float(spearmanr(z_mean[:, 0], true_latent[:, 0]).statistic))
    return out


def grid_latent_mean(model: torch.nn.Module, data: SPIDataset, n_rotations: int, cache_grid: int, latent_per_dim: int,
                     indices: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """``E[z | y]`` ``(N, d)`` over the latent's quadrature points by the exact sum over a grid of ``n_rotations``
    (the class and pose summed out; :class:`~bayes_spi.infer.class_emc.ClassGridMarginal`, as
    :func:`grid_class_posteriors` sums it, all good pixels)."""
    from bayes_spi.guides.search import orientation_grid
    from bayes_spi.infer.class_emc import ClassGridMarginal

    emc = ClassGridMarginal(model, orientation_grid(n_rotations).to(model.q.dtype), cache_grid=cache_grid,
                            latent_per_dim=latent_per_dim)
    pixels = torch.nonzero(torch.as_tensor(data.mask.reshape(-1))).squeeze(-1)
    with torch.no_grad():
        caches = emc.caches()
        emc.caches = lambda: caches  # type: ignore[method-assign]
        out = []
        for s in range(0, len(indices), batch_size):
            images = torch.as_tensor(data.read(indices[s:s + batch_size]), dtype=model.q.dtype)
            w = emc(images, pixels).responsibilities.sum((1, 3))  # (B, L)
            out.append((w.double() @ emc.nodes.double()).numpy())
    return np.concatenate(out)


def local_grid_class_posteriors(model: torch.nn.Module, data: SPIDataset, indices: np.ndarray, per_axis: int,
                                 batch_size: int = 64, **kwargs: object) -> np.ndarray:
    """The alternative to the Laplace refinement, for comparison: the same coarse pass and seeds
    (:class:`~bayes_spi.posterior.class_refine.ClassModeRefiner`), then each seed's grid cell (a cube of side one
    grid spacing in the rotation-vector coordinates around the seed, the cell's volume) integrated by the midpoint
    rule on ``per_axis^3`` rotations, the other cells by the coarse grid; ``p(c | y)`` ``(N, C)`` (no latent)."""
    from bayes_spi.guides.class_search import class_grid_loglik
    from bayes_spi.posterior.class_refine import ClassModeRefiner
    from bayes_spi.posterior.local import profile_loglik
    from bayes_spi.so3 import rotvec_to_rotmat
    from bayes_spi.trilinear import sample_cube

    ref = ClassModeRefiner(model, **kwargs)  # type: ignore[arg-type]
    h = ref.spacing / per_axis
    ax = (torch.arange(per_axis, dtype=model.q.dtype) + 0.5) * h - ref.spacing / 2
    offsets = rotvec_to_rotmat(torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3))  # (P, 3, 3)
    pixels = torch.nonzero(torch.as_tensor(data.mask.reshape(-1))).squeeze(-1)
    q, log_w = model.q[pixels], model.log_pixel_factor[pixels]
    prior = ref._log_prior()[:, 0]  # (C,)
    out = []
    with torch.no_grad():
        for s in range(0, len(indices), batch_size):
            y = torch.as_tensor(data.read(indices[s:s + batch_size])).reshape(-1, data.mask.size)[:, pixels].to(q.dtype)
            ll, _ = class_grid_loglik(ref.caches, ref.rotations, q, log_w, y, ref.q_max)  # (B, C, 1, G)
            ev = []
            for c in range(ll.shape[1]):
                llg = ll[:, c, 0].double()
                top = ref._seeds(llg)  # (B, K)
                R = ref.rotations[top][:, :, None] @ offsets  # (B, K, P, 3, 3)
                x = torch.einsum("bkpij,mj->bkpmi", R, q)
                lam = sample_cube(ref.caches[c, 0][None, None], x, ref.q_max) + log_w  # (B, K, P, M)
                cells = profile_loglik(lam, y[:, None, None, :]).double()  # (B, K, P)
                local = torch.logsumexp(cells.reshape(len(y), -1), -1) + 3 * math.log(h)
                rest = llg.clone()
                rest[torch.arange(len(y))[:, None], top] = -math.inf
                ev.append(torch.logaddexp(local, torch.logsumexp(rest, -1) + ref.log_cell))
            out.append(torch.softmax(torch.stack(ev, 1) + prior[None], -1).numpy())
    return np.concatenate(out)


def oracle_refined(model: torch.nn.Module, data: SPIDataset, structures: list[str], indices: np.ndarray,
                   cache_grid: int, n_rotations: int, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The *true* model's class posterior ``(N, C)`` on the coarse grid and refined: each state's exact intensity
    ``|F(q)|^2`` (:func:`bayes_spi.sim.transform.molecular_transform`) in place of the fitted fields' cubes
    (``cache_grid^3`` over the detector's ``q_max``, as the oracle of ``bench_hetero.py``), uniform class prior, the
    same refiner (3 seeds, 4 steps). Returns ``(grid, refined)``."""
    from bayes_spi.guides.class_search import class_grid_loglik
    from bayes_spi.guides.search import cube_points
    from bayes_spi.posterior.class_refine import ClassModeRefiner
    from bayes_spi.sim.hinge import load_ensemble_member
    from bayes_spi.sim.transform import molecular_transform

    ref = ClassModeRefiner(model, n_rotations=n_rotations, cache_grid=cache_grid)
    pts = cube_points(cache_grid, ref.q_max).double().numpy()
    cubes = [np.log(np.abs(molecular_transform(load_ensemble_member(name), pts)) ** 2 + 1e-30) for name in structures]
    ref.caches = torch.as_tensor(np.stack(cubes), dtype=model.q.dtype).reshape(len(cubes), 1, *(cache_grid,) * 3)
    ref._log_prior = lambda: torch.zeros(len(cubes), 1, dtype=torch.float64)  # type: ignore[method-assign]
    pixels = torch.nonzero(torch.as_tensor(data.mask.reshape(-1))).squeeze(-1)
    q, log_w = model.q[pixels], model.log_pixel_factor[pixels]
    grid, refined = [], []
    with torch.no_grad():
        for s in range(0, len(indices), batch_size):
            y = torch.as_tensor(data.read(indices[s:s + batch_size])).reshape(-1, data.mask.size)[:, pixels].to(q.dtype)
            ll, _ = class_grid_loglik(ref.caches, ref.rotations, q, log_w, y, ref.q_max)
            grid.append(torch.softmax(torch.logsumexp(ll[:, :, 0].double(), -1), -1).numpy())
            refined.append(ref(y, pixels).class_probs.numpy())
    return np.concatenate(grid), np.concatenate(refined)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run directory (model.pt or checkpoint.pt)")
    ap.add_argument("data", type=Path)
    ap.add_argument("--grids", type=int, nargs="*", default=[4096, 32768], help="grid_class_posteriors orientations")
    ap.add_argument("--n-modes", type=int, nargs="+", default=[3], help="refined: best grid rotations per class")
    ap.add_argument("--n-iter", type=int, nargs="+", default=[4], help="refined: Gauss-Newton steps")
    ap.add_argument("--local-grid", type=int, nargs="*", default=[],
                    help="also the local-grid alternative with this many points per axis per seed cell (no latent)")
    ap.add_argument("--latent-nodes", type=int, default=None,
                    help="latent quadrature points per dimension at scoring (default: the fit's latent_nodes)")
    ap.add_argument("--oracle", default="", help="comma-separated true states (e.g. 2CEX,2CEX@hinge=25): also the true "
                    "model's class posterior, coarse grid and refined")
    ap.add_argument("--oracle-patterns", type=int, default=500)
    ap.add_argument("--patterns", type=int, default=0, help="the first N patterns (0: all)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    trained = load_trained(args.run)
    model, config = trained.model, trained.config
    if args.latent_nodes is not None:
        config.latent_nodes = args.latent_nodes
    true_latent, true_class = read_truth_labels(args.data)
    rows: dict[str, dict[str, float]] = {}
    with SPIDataset(args.data) as data:
        n = data.n_patterns if not args.patterns else min(args.patterns, data.n_patterns)
        idx = np.arange(n)
        tc = None if true_class is None else true_class[:n]
        tl = None if true_latent is None else true_latent[:n]
        for n_modes in args.n_modes:
            for n_iter in args.n_iter:
                t0, c0 = time.perf_counter(), time.process_time()
                post = refined_class_posteriors(model, data, indices=idx, n_rotations=config.search_rotations,
                                                cache_grid=config.cache_grid, latent_per_dim=config.latent_nodes,
                                                n_modes=n_modes, n_iter=n_iter, grid=config.search_grid,
                                                seed=config.seed + 12345, symmetry=config.symmetry)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
                row = score(post.class_probs, post.z_mean, tc, tl)
                row.update({"seconds": dt, "cpu_s": cpu, "patterns_per_s": n / dt, "median_mode_share": float(np.median(post.mode_share))})
                rows[f"refined_{config.search_rotations}_k{n_modes}_it{n_iter}"] = row
                print(f"refined (grid {config.search_rotations}, {n_modes} modes, {n_iter} it.)", json.dumps(row),
                      flush=True)
        for per_axis in args.local_grid:
            t0, c0 = time.perf_counter(), time.process_time()
            probs = local_grid_class_posteriors(model, data, idx, per_axis, n_rotations=config.search_rotations,
                                                cache_grid=config.cache_grid, latent_per_dim=config.latent_nodes,
                                                n_modes=args.n_modes[0], grid=config.search_grid,
                                                seed=config.seed + 12345, symmetry=config.symmetry)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            row = score(probs, None, tc, tl)
            row.update({"seconds": dt, "cpu_s": cpu, "patterns_per_s": n / dt})
            rows[f"local_grid_{per_axis}_k{args.n_modes[0]}"] = row
            print(f"local grid {per_axis}^3 per seed ({args.n_modes[0]} seeds)", json.dumps(row), flush=True)
        if args.oracle:
            m = min(n, args.oracle_patterns)
            t0, c0 = time.perf_counter(), time.process_time()
            g_probs, r_probs = oracle_refined(model, data, args.oracle.split(","), idx[:m], config.cache_grid,
                                              config.search_rotations)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            for name, p in ((f"oracle_grid_{config.search_rotations}", g_probs), ("oracle_refined_k3", r_probs)):
                row = score(p, None, None if tc is None else tc[:m], None)
                row.update({"patterns": m, "seconds_both": dt, "cpu_s_both": cpu})
                rows[name] = row
                print(name, json.dumps(row), flush=True)
        for g in args.grids:
            t0, c0 = time.perf_counter(), time.process_time()
            if config.n_classes > 1:
                probs = grid_class_posteriors(model, data, n_rotations=g, cache_grid=config.cache_grid,
                                              latent_per_dim=config.latent_nodes, indices=idx)
                z = None
            else:  # one class: E[z | y] over the latent's points instead
                probs = np.ones((n, 1))
                z = grid_latent_mean(model, data, g, config.cache_grid, config.latent_nodes, idx)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            row = score(probs, z, tc, tl)
            row.update({"seconds": dt, "cpu_s": cpu, "patterns_per_s": n / dt})
            rows[f"grid_{g}"] = row
            print(f"grid {g}", json.dumps(row), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"run": str(args.run), "data": str(args.data), "patterns": n, **rows},
                                        indent=1))


if __name__ == "__main__":
    main()
