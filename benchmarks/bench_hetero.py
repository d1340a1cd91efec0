"""Heterogeneity benchmark: cube vs sphere (classes) and a cube-to-sphere continuum (latent), ~1e3 photons.

Data (bayes_spi.sim.ensemble): uniform gold superellipsoids |x|^p+|y|^p+|z|^p <= a^p of equal volume (that of a
sphere of radius 30 A, so F(0) is the same for every shape), reference-32 detector (field of view 172.5 A:
oversampling ~2.9 of the 60 A particle), uniform poses, lognormal(0.3) fluence jitter, Poisson, beam stop.

1. classes: p in {2 (sphere), 20 (cube)}, equal fractions -> class accuracy (best label permutation).
2. continuum: p log-uniform in [2, 20] (32 levels) -> |Spearman| of the posterior-mean z with p.
3. protein: a two-state conformational mixture, the built-in 2CEX (SiaP, 2,363 atoms) and its copy with one half
   swung open by ``--hinge`` degrees about a hinge (bayes_spi.sim.hinge), equal fractions, the exact atomic
   transform (IT92 form factors) -> class accuracy, and per class the speckle correlation and speckle FSC of the
   fitted class field (at z = 0; the model has no continuous latent here, d = 0) against the true intensity of
   its state, after rotational alignment (bayes_spi.analysis.compare.compare_to_reference), beside the same
   scores of the other state's truth (how alike the two states are at this resolution).

Model: HeterogeneousSPIModel + LatentGuide (SIREN field, FiLM by z, one field per class), trained by the
HeterogeneousTrainer, in two variants side by side (``--variants``):
- ``svi``: SVI only (TraceEnum_ELBO; no EMC warm start, no search), the first version's setting;
- ``search_emc``: the class-aware EMC warm start (exact marginal over classes x latent quadrature points x
  grid orientations, bayes_spi.infer.class_emc) for ``--emc-fraction`` of the schedule, then SVI with the
  class-aware orientation search (per-class proposals and the z centre, bayes_spi.guides.class_search).
For ``search_emc`` the grid class posterior and grid latent mean of the final fields are also scored
(``grid_*``: the search's ``p(c | y)`` and ``E[z | y]`` over its quadrature points, no encoder).

Baseline "aniso" (rotation-invariant, no model; bayes_spi.infer.latent_start, the latent's data start): per
pattern and ring the angular power of harmonics 1-12 relative to the ring's mean, the Poisson shot noise removed
(unbiased, fluence-free), 6 rings inside the inscribed circle; the first principal component of the rings' ranks
(fitted on the first 1,024 patterns) -> |Spearman| with the truth; classes by a two-component mixture on it.

Baseline (rotation-invariant, no model): per pattern the fluence-normalised radial profile (counts per |q|
shell / total) and the ring angular power spectrum (|FFT over the azimuth|^2 of harmonics 1..8 on 6 rings,
relative to harmonic 0), log-transformed and standardised; PCA; classes by a two-component Gaussian mixture
(full covariances, EM) on the first 3 PCs; continuum by PC1 (and, optimistically, the best of PCs 1-3 chosen
with the truth). The same on the radial profile alone ("baseline_radial").

Usage: python benchmarks/bench_hetero.py [--n 2000] [--minutes 4] [--out /tmp/bench_hetero]
       [--sets classes,continuum,protein] [--variants svi,search_emc] [--hinge 25]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyro
import torch
from scipy.stats import spearmanr

from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.guides.class_search import ClassOrientationSearch
from bayes_spi.guides.latent import LatentGuide
from bayes_spi.infer.build import detector_tensors
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.heterogeneous import HeterogeneousTrainer, build_heterogeneous, gaussian_mixture_labels
from bayes_spi.models.conditional_field import LatentFields
from bayes_spi.models.fields import SirenField
from bayes_spi.models.heterogeneous import HeterogeneousSPIModel
from bayes_spi.models.spi import detector_q_max
from bayes_spi.posterior.latent import latent_posteriors
from bayes_spi.sim.ensemble import read_truth_labels, simulate_ensemble

__all__ = ["anisotropy_start", "baseline_features", "class_accuracy", "class_speckle_scores", "fit_heterogeneous",
           "grid_latents", "main", "oracle_class_accuracy", "oracle_spearman"]


def baseline_features(images: np.ndarray, mask: np.ndarray, n_shells: int = 12, n_rings: int = 6,
                      harmonics: int = 8) -> np.ndarray:
    """Rotation-invariant features ``(N, F)``: normalised radial profile and ring angular power spectra."""
    n, n_y, n_x = images.shape
    iy, ix = np.meshgrid(np.arange(n_y) - (n_y - 1) / 2, np.arange(n_x) - (n_x - 1) / 2, indexing="ij")
    r, phi = np.hypot(iy, ix), np.arctan2(iy, ix)
    good = mask & (r <= (n_y - 1) / 2)
    x = images.reshape(n, -1)[:, good.reshape(-1)].astype(np.float64)
    x = x / np.maximum(x.sum(1, keepdims=True), 1.0)
    rg, pg = r[good], phi[good]
    edges = np.linspace(rg.min(), rg.max() + 1e-9, n_shells + 1)
    shell = np.digitize(rg, edges) - 1
    radial = np.stack([x[:, shell == s].mean(1) for s in range(n_shells)], 1)
    ring_edges = np.linspace(rg.min(), rg.max() + 1e-9, n_rings + 1)
    ring = np.digitize(rg, ring_edges) - 1
    spectra = []
    for k in range(n_rings):
        sel = ring == k
        basis = np.exp(-1j * np.arange(harmonics + 1)[:, None] * pg[sel][None, :])  # (H+1, P_k)
        coef = x[:, sel] @ basis.T  # (N, H+1)
        power = np.abs(coef[:, 1:]) ** 2 / np.maximum(np.abs(coef[:, :1]) ** 2, 1e-30)
        spectra.append(power)
    feats = np.log(np.concatenate([radial + 1e-6, *spectra], 1) + 1e-6)
    return (feats - feats.mean(0)) / np.maximum(feats.std(0), 1e-9)


def _pca(feats: np.ndarray, k: int) -> np.ndarray:
    u, s, _ = np.linalg.svd(feats - feats.mean(0), full_matrices=False)
    return u[:, :k] * s[:k]


def class_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Accuracy under the best relabelling of two classes."""
    acc = float((pred == truth).mean())
    return max(acc, 1.0 - acc)


def fit_heterogeneous(path: Path, run: Path, latent_dim: int, n_classes: int, minutes: float, seed: int = 0,
                      epochs: int = 20, variant: str = "svi", emc_fraction: float = 0.5, latent_nodes: int = 3,
                      latent_start: float = 0.0, search_rotations: int = 4096, latent_rule: str = "hermite",
                      latent_anneal: float = 0.0, latent_anneal_beta: float = 0.05, emc_pixels: int = 512) -> tuple[HeterogeneousSPIModel, LatentGuide, float, int]:
    """Train the heterogeneous model on ``path`` for at most ``minutes``; returns model, guide, seconds, images.

    ``variant``: ``svi`` (no EMC warm start, no search) or ``search_emc`` (class-aware EMC warm start for
    ``emc_fraction`` of the schedule, then SVI with the class-aware search, 2 proposals per class)."""
    if variant not in ("svi", "search_emc"):
        raise ValueError(f"variant: expected svi or search_emc, got {variant!r}")
    data = SPIDataset(path)
    search = variant == "search_emc"
    config = FitConfig(epochs=epochs, batch_size=32, field="siren", n_heads=1 if search else 2,
                       n_search=2 if search else 0, emc_fraction=emc_fraction if search else 0.0, emc_pixels=emc_pixels,
                       search_rotations=search_rotations, cache_grid=41, polish_iterations=0, auto_settings=False,
                       max_minutes=minutes, seed=seed, device="cpu", log_every=50, checkpoint_every=100000,
                       encoder_features=128, encoder_channels=16, weight_floor=0.4, floor_decay=0.6, radius_start=0.5,
                       latent_dim=latent_dim, n_classes=n_classes, latent_nodes=latent_nodes, latent_rule=latent_rule,
                       latent_anneal=latent_anneal if search else 0.0, latent_anneal_beta=latent_anneal_beta,
                       latent_start=latent_start if search else 0.0)
    pyro.set_rng_seed(seed)
    q, factor, mask = detector_tensors(data.geometry)
    field = SirenField(q_max=detector_q_max(q.float()), width=config.field_width, depth=config.field_depth,
                       w0=config.field_w0)
    model, guide = build_heterogeneous(field, q, factor, mask, config)
    trainer = HeterogeneousTrainer(data, config, run, progress=False, model=model, guide=guide)
    t0 = time.perf_counter()
    state = trainer.fit()
    if guide.search is not None:
        guide.search.refresh()  # against the final fields
    return model, guide, time.perf_counter() - t0, state.images_seen


def grid_latents(search: ClassOrientationSearch, data: SPIDataset, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The search's grid class posterior ``(N, C)`` and class-mixed grid latent mean ``(N, d)`` of every pattern."""
    pixels = torch.nonzero(torch.as_tensor(data.mask.reshape(-1))).squeeze(-1)
    probs, means = [], []
    for s in range(0, data.n_patterns, batch):
        images = torch.as_tensor(data.read(np.arange(s, min(s + batch, data.n_patterns))), dtype=torch.float32)
        search(images, pixels)
        p = torch.softmax(search.last_class_loglik, -1)
        probs.append(p.numpy())
        m = search.last_latent_mean
        means.append((p[..., None] * m).sum(1).numpy() if m is not None else np.zeros((len(p), 0)))
    return np.concatenate(probs), np.concatenate(means)


def _oracle_marginals(path: Path, intensities: list[Callable[[np.ndarray], np.ndarray]], n_patterns: int,
                      n_rotations: int, cache_grid: int) -> torch.Tensor:
    """Log marginal likelihood ``(n_patterns, C)`` of the first ``n_patterns`` patterns under each candidate
    intensity ``|F(q)|^2`` (a function of the cube's points ``(n^3, 3)``): the pose summed over a grid of
    ``n_rotations``, the fluence profiled out, read from ``cache_grid^3`` cubes as the search does."""
    from bayes_spi.guides.search import cube_points, grid_profile_loglik, orientation_grid

    with SPIDataset(path) as data:
        q, factor, _ = detector_tensors(data.geometry)
        good = torch.as_tensor(data.mask.reshape(-1))
        y = torch.as_tensor(data.read(np.arange(n_patterns)).reshape(n_patterns, -1)[:, good.numpy()],
                            dtype=torch.float64)
    q_max = float(q.norm(dim=-1).max())
    pts = cube_points(cache_grid, q_max).double().numpy()
    rots = orientation_grid(n_rotations).double()
    lls = []
    for intensity in intensities:
        cube = torch.as_tensor(np.log(intensity(pts) + 1e-30)).reshape(1, 1, cache_grid, cache_grid, cache_grid)
        ll, _ = grid_profile_loglik(cube, rots, q[good], factor[good].log(), y, q_max)
        lls.append(torch.logsumexp(ll, -1))
    return torch.stack(lls, 1)


def oracle_spearman(path: Path, n_patterns: int = 500, n_rotations: int = 2048, cache_grid: int = 41
                    ) -> tuple[float, float]:
    """What the data allow: the posterior mean of ``log p`` under the *true* model (the ensemble's exact
    intensities at every level of its exponent grid, uniform over the levels as simulated; the pose summed over a
    grid of ``n_rotations``, the fluence profiled out, read from ``cache_grid^3`` cubes as the search does) for
    the first ``n_patterns`` patterns; returns its |Spearman| with the true exponent and the fraction of
    patterns whose most probable level is within one level of the truth."""
    import h5py

    from bayes_spi.sim.ensemble import _ShapeBank, parse_ensemble

    with h5py.File(path, "r") as f:
        attrs = dict(f["/simulation"].attrs) if "/simulation" in f else {}
    true_latent, _ = read_truth_labels(path)
    exps = [float(x) for x in str(attrs.get("ensemble_exponents", "2,20")).split(",")]
    spec = parse_ensemble(f"shapes:p={exps[0]:g}..{exps[1]:g};radius={float(attrs.get('ensemble_radius_A', 30)):g};"
                          f"levels=32")
    levels = np.exp(np.linspace(np.log(exps[0]), np.log(exps[1]), spec.levels))
    bank = _ShapeBank(spec)
    lls = _oracle_marginals(path, [lambda pts, p=float(p): np.abs(bank.transform(p, pts)) ** 2 for p in levels],
                            n_patterns, n_rotations, cache_grid)
    post = torch.softmax(lls, 1).numpy()  # (N, levels)
    mean_logp = post @ np.log(levels)
    truth = true_latent[:n_patterns, 0]
    best = np.abs(np.log(levels[post.argmax(1)]) - np.log(truth)) <= np.diff(np.log(levels))[0] * 1.01
    return abs(float(spearmanr(mean_logp, truth).statistic)), float(best.mean())


def anisotropy_start(path: Path, n_fit: int = 1024) -> np.ndarray:
    """The latent data start's ``z0`` (bayes_spi.infer.latent_start: debiased ring angular power, inscribed circle)
    fitted on the first ``n_fit`` patterns, as the trainer does, for every pattern ``(N,)``."""
    from bayes_spi.infer.latent_start import AnisotropyScore

    with SPIDataset(path) as data:
        images = torch.as_tensor(data.read(np.arange(data.n_patterns)))
        q, _, _ = detector_tensors(data.geometry)
        good = torch.as_tensor(data.mask.reshape(-1))
        border = data.geometry.q_inscribed
    score = AnisotropyScore.fit(images[:n_fit], q, good, q_limit=border)
    return score(images).numpy()


def class_speckle_scores(fields: LatentFields, path: Path, structures: list[str], pred: np.ndarray,
                         truth: np.ndarray, n: int = 33) -> dict[str, float]:
    """Every fitted class field (at ``z = 0``) against every state's true intensity, aligned by rotation and scored
    over the detector's shell (``class<c>_vs_state<s>_*``), the state each class was matched to (``class<c>_state``:
    with two classes, the label permutation with the better accuracy), and the two truths against each other
    (aligned, as the fits: how alike the states are at this resolution)."""
    from bayes_spi.analysis.compare import compare_to_reference
    from bayes_spi.posterior.latent import intensity_at_latents
    from bayes_spi.sim.hinge import load_ensemble_member
    from bayes_spi.sim.transform import transform_on_grid

    with SPIDataset(path) as data:
        qn = data.geometry.q_magnitudes()[data.mask]
    q_max, q_min = float(qn.max()), float(qn.min())
    truths = []
    for name in structures:
        F, dq = transform_on_grid(load_ensemble_member(name), n, q_max)
        truths.append(np.abs(F) ** 2)
    out: dict[str, float] = {"resolution_limit_nm": 0.1 / q_max}
    cmp = compare_to_reference(truths[1], truths[0], dq, q_max, q_min=q_min)
    out["truth_vs_truth_speckle_corr"] = cmp.speckle_corr
    out["truth_vs_truth_speckle_fsc_res_nm_0.5"] = cmp.speckle_fsc.resolution_nm(0.5)
    if fields.n_classes == 2:
        perm = [0, 1] if float((pred == truth).mean()) >= 0.5 else [1, 0]  # fitted class c <-> state perm[c]
        out.update({f"class{c}_state": perm[c] for c in range(2)})
    for c in range(fields.n_classes):
        vol = intensity_at_latents(fields, None, n, q_max, c)[0]
        for s, ref in enumerate(truths):
            res = compare_to_reference(vol, ref, dq, q_max, q_min=q_min)
            out[f"class{c}_vs_state{s}_speckle_corr"] = res.speckle_corr
            out[f"class{c}_vs_state{s}_speckle_fsc_res_nm_0.5"] = res.speckle_fsc.resolution_nm(0.5)
            out[f"class{c}_vs_state{s}_speckle_fsc_res_nm_0.143"] = res.speckle_fsc.resolution_nm(0.143)
    return out


def oracle_class_accuracy(path: Path, structures: list[str], n_patterns: int = 500, n_rotations: int = 2048,
                          cache_grid: int = 41) -> float:
    """What the data allow for a structure mixture: the class accuracy of the *true* model's class posterior (each
    state's exact intensity, the pose summed over a grid of ``n_rotations``, the fluence profiled out, read from
    ``cache_grid^3`` cubes as the search does, equal class fractions) on the first ``n_patterns`` patterns."""
    from bayes_spi.sim.hinge import load_ensemble_member
    from bayes_spi.sim.transform import molecular_transform

    _, true_class = read_truth_labels(path)
    states = [lambda pts, name=name: np.abs(molecular_transform(load_ensemble_member(name), pts)) ** 2
              for name in structures]
    lls = _oracle_marginals(path, states, n_patterns, n_rotations, cache_grid)
    pred = lls.argmax(1).numpy()
    return float((pred == true_class[:n_patterns]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget per fit")
    ap.add_argument("--photons", type=float, default=1e3)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_hetero"))
    ap.add_argument("--sets", default="classes,continuum", help="comma-separated: classes, continuum, protein")
    ap.add_argument("--variants", default="svi,search_emc", help="comma-separated model variants: svi, search_emc")
    ap.add_argument("--emc-fraction", type=float, default=0.5, help="EMC warm-start share of search_emc's schedule")
    ap.add_argument("--latent-nodes", type=int, default=3, help="quadrature points per latent dimension")
    ap.add_argument("--latent-rule", default="hermite", choices=["equal", "hermite"],
                    help="their rule (FitConfig.latent_rule)")
    ap.add_argument("--latent-anneal", type=float, default=0.0,
                    help="search_emc: fraction of the EMC stage with the latent's posterior tempered")
    ap.add_argument("--latent-anneal-beta", type=float, default=0.05, help="the tempering's first exponent")
    ap.add_argument("--oracle", type=int, default=0,
                    help="continuum: score the true model's posterior mean exponent, protein: its class posterior, on "
                         "this many patterns (0: off)")
    ap.add_argument("--latent-start", type=float, default=0.0,
                    help="search_emc: fraction of the EMC stage with the latent's data start (FitConfig.latent_start)")
    ap.add_argument("--model-classes", type=int, default=None,
                    help="fit this many classes instead of the set's (e.g. 1: one field for a two-state mixture)")
    ap.add_argument("--search-rotations", type=int, default=4096, help="search_emc: orientations of the search/EMC grid")
    ap.add_argument("--fine-rotations", type=int, default=32768,
                    help="classes: also classify with the fitted fields on this fine orientation grid (0: off)")
    ap.add_argument("--oracle-rotations", type=int, default=2048, help="orientations of the oracle's pose grid")
    ap.add_argument("--emc-pixels", type=int, default=512, help="search_emc: pixels per pattern in an EMC step")
    ap.add_argument("--seed", type=int, default=0, help="the fit's seed (the data's is fixed: 11)")
    ap.add_argument("--tag", default="", help="suffix of the run directories and results file")
    ap.add_argument("--hinge", type=float, default=25.0, help="protein: the second state's hinge angle (degrees)")
    ap.add_argument("--skip-fit", action="store_true", help="baseline only")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    proteins = ["2CEX", f"2CEX@hinge={args.hinge:g}"]
    sets = {"classes": ("shapes:p=2,20;radius=30", 2, 1), "continuum": ("shapes:p=2..20;radius=30;levels=32", 1, 1),
            "protein": ("structures:" + ",".join(proteins), 2, 0)}
    results: dict[str, dict[str, float]] = {}
    for name in args.sets.split(","):
        if name not in sets:
            raise ValueError(f"--sets: expected names among {sorted(sets)}, got {name!r}")
        spec, classes, latent = sets[name]
        if args.model_classes is not None:
            classes = args.model_classes
        path = args.out / f"{name}.h5"
        t0 = time.perf_counter()
        summary = simulate_ensemble(spec, "reference-32", args.n, path, mean_photons=args.photons, seed=11,
                                    progress=False)
        t_sim = time.perf_counter() - t0
        true_latent, true_class = read_truth_labels(path)
        with SPIDataset(path) as data:
            images, mask = data.read(np.arange(data.n_patterns)), data.mask
        t0 = time.perf_counter()
        feats = baseline_features(images, mask)
        pcs = _pca(feats, 3)
        radial_pcs = _pca(feats[:, :12], 3)  # the radial profile alone (first 12 features)
        row: dict[str, float] = {"n": args.n, "mean_photons": summary.mean_photons, "simulate_s": t_sim}
        if true_class is not None:
            row["baseline_class_accuracy"] = class_accuracy(gaussian_mixture_labels(pcs), true_class)
            row["baseline_radial_class_accuracy"] = class_accuracy(gaussian_mixture_labels(radial_pcs), true_class)
        rho = [abs(float(spearmanr(pcs[:, j], true_latent[:, 0]).statistic)) for j in range(3)]
        row["baseline_abs_spearman_pc1"] = rho[0]
        row["baseline_abs_spearman_best_of_3_pcs"] = max(rho)  # optimistic: the PC chosen with the truth
        row["baseline_radial_abs_spearman_pc1"] = abs(float(spearmanr(radial_pcs[:, 0], true_latent[:, 0]).statistic))
        z0 = anisotropy_start(path)
        row["baseline_aniso_abs_spearman"] = abs(float(spearmanr(z0, true_latent[:, 0]).statistic))
        if true_class is not None:
            row["baseline_aniso_class_accuracy"] = class_accuracy(gaussian_mixture_labels(z0[:, None]), true_class)
        row["baseline_s"] = time.perf_counter() - t0
        if args.oracle and name == "protein":
            t0 = time.perf_counter()
            row.update({"oracle_patterns": args.oracle,
                        "oracle_rotations": args.oracle_rotations,
                        "oracle_class_accuracy": oracle_class_accuracy(path, proteins, args.oracle,
                                                                       args.oracle_rotations),
                        "oracle_s": time.perf_counter() - t0})
        if args.oracle and true_class is None:
            t0 = time.perf_counter()
            rho_o, near = oracle_spearman(path, args.oracle)
            row.update({"oracle_patterns": args.oracle, "oracle_abs_spearman": rho_o, "oracle_within_one_level": near,
                        "oracle_s": time.perf_counter() - t0})
        for variant in ([] if args.skip_fit else args.variants.split(",")):
            model, guide, seconds, seen = fit_heterogeneous(path, args.out / f"run_{name}_{variant}{args.tag}", latent, classes,
                                                            args.minutes, seed=args.seed, variant=variant,
                                                            emc_fraction=args.emc_fraction,
                                                            latent_nodes=args.latent_nodes,
                                                            latent_start=args.latent_start,
                                                            search_rotations=args.search_rotations,
                                                            latent_rule=args.latent_rule,
                                                            latent_anneal=args.latent_anneal,
                                                            latent_anneal_beta=args.latent_anneal_beta,
                                                            emc_pixels=args.emc_pixels)
            with SPIDataset(path) as data:
                post = latent_posteriors(guide, data)
                grid = grid_latents(guide.search, data) if guide.search is not None else None
            v = f"{variant}_"
            row.update({v + "fit_s": seconds, v + "images_seen": seen, v + "images_per_s": seen / seconds})
            if true_class is not None and classes > 1:
                row[v + "class_accuracy"] = class_accuracy(post.map_class, true_class)
            if true_class is not None and classes > 1 and args.fine_rotations:
                from bayes_spi.posterior.latent import grid_class_posteriors

                t0 = time.perf_counter()
                with SPIDataset(path) as data:
                    fine = grid_class_posteriors(model, data, n_rotations=args.fine_rotations)
                row[v + "fine_grid_class_accuracy"] = class_accuracy(fine.argmax(1), true_class)
                row[v + "fine_grid_s"] = time.perf_counter() - t0
            if latent:
                row[v + "abs_spearman_z"] = abs(float(spearmanr(post.z_mean[:, 0], true_latent[:, 0]).statistic))
                row[v + "mean_z_sd"] = float(post.z_sd.mean())
            if name == "protein":
                t0 = time.perf_counter()
                row.update({v + k: x for k, x in class_speckle_scores(model.field, path, proteins, post.map_class,
                                                                      true_class).items()})
                row[v + "score_s"] = time.perf_counter() - t0
            if grid is not None:
                if true_class is not None and classes > 1:
                    row[v + "grid_class_accuracy"] = class_accuracy(grid[0].argmax(1), true_class)
                if grid[1].shape[1]:
                    row[v + "grid_abs_spearman_z"] = abs(float(spearmanr(grid[1][:, 0], true_latent[:, 0]).statistic))
            print(name, variant, json.dumps({k: x for k, x in row.items() if k.startswith(v)}), flush=True)
        results[name] = row
        print(name, json.dumps(row, indent=1), flush=True)
        (args.out / f"results_{name}{args.tag}.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
