"""Heterogeneity benchmark: cube vs sphere (classes) and a cube-to-sphere continuum (latent), ~1e3 photons.

Data (bayes_spi.sim.ensemble): uniform gold superellipsoids |x|^p+|y|^p+|z|^p <= a^p of equal volume (that of a
sphere of radius 30 A, so F(0) is the same for every shape), reference-32 detector (field of view 172.5 A:
oversampling ~2.9 of the 60 A particle), uniform poses, lognormal(0.3) fluence jitter, Poisson, beam stop.

1. classes: p in {2 (sphere), 20 (cube)}, equal fractions -> class accuracy (best label permutation).
2. continuum: p log-uniform in [2, 20] (32 levels) -> |Spearman| of the posterior-mean z with p.

Model: HeterogeneousSPIModel + LatentGuide (SIREN field, FiLM by z, one field per class), trained by the
Trainer (SVI, TraceEnum_ELBO; no EMC warm start, search or polish: those use one homogeneous field).

Baseline (rotation-invariant, no model): per pattern the fluence-normalised radial profile (counts per |q|
shell / total) and the ring angular power spectrum (|FFT over the azimuth|^2 of harmonics 1..8 on 6 rings,
relative to harmonic 0), log-transformed and standardised; PCA; classes by a two-component Gaussian mixture
(full covariances, EM) on the first 3 PCs; continuum by PC1 (and, optimistically, the best of PCs 1-3 chosen
with the truth). The same on the radial profile alone ("baseline_radial").

Usage: python benchmarks/bench_hetero.py [--n 2000] [--minutes 4] [--out /tmp/bench_hetero]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from scipy.stats import spearmanr

from bayes_spi.dataio.h5 import SPIDataset
from bayes_spi.guides.amortized import count_hypotheses
from bayes_spi.guides.latent import LatentGuide
from bayes_spi.infer.build import detector_tensors
from bayes_spi.infer.config import FitConfig
from bayes_spi.infer.heterogeneous import HeterogeneousTrainer, gaussian_mixture_labels
from bayes_spi.models.fields import SirenField
from bayes_spi.models.heterogeneous import HeterogeneousSPIModel
from bayes_spi.models.spi import detector_q_max
from bayes_spi.posterior.latent import latent_posteriors
from bayes_spi.sim.ensemble import read_truth_labels, simulate_ensemble

__all__ = ["baseline_features", "class_accuracy", "fit_heterogeneous", "main"]


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
                      epochs: int = 20) -> tuple[HeterogeneousSPIModel, LatentGuide, float, int]:
    """Train the heterogeneous model on ``path`` for at most ``minutes``; returns model, guide, seconds, images."""
    data = SPIDataset(path)
    config = FitConfig(epochs=epochs, batch_size=32, field="siren", n_heads=2, n_search=0, emc_fraction=0.0,
                       polish_iterations=0, auto_settings=False, max_minutes=minutes, seed=seed, device="cpu",
                       log_every=50, checkpoint_every=100000, encoder_features=128, encoder_channels=16,
                       weight_floor=0.4, floor_decay=0.6, radius_start=0.5)
    pyro.set_rng_seed(seed)
    q, factor, mask = detector_tensors(data.geometry)
    field = SirenField(q_max=detector_q_max(q.float()), width=config.field_width, depth=config.field_depth,
                       w0=config.field_w0)
    model = HeterogeneousSPIModel(field, q, factor, n_hypotheses=count_hypotheses(config.n_heads),
                                  latent_dim=latent_dim, n_classes=n_classes)
    guide = LatentGuide(mask, latent_dim=latent_dim, n_classes=n_classes, n_heads=config.n_heads,
                        features=config.encoder_features, channels=config.encoder_channels,
                        latent_scorer=model.class_hypothesis_logpost)
    trainer = HeterogeneousTrainer(data, config, run, progress=False, model=model, guide=guide)
    t0 = time.perf_counter()
    state = trainer.fit()
    return model, guide, time.perf_counter() - t0, state.images_seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget per fit")
    ap.add_argument("--photons", type=float, default=1e3)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_hetero"))
    ap.add_argument("--skip-fit", action="store_true", help="baseline only")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    for name, spec, classes, latent in (("classes", "shapes:p=2,20;radius=30", 2, 1),
                                        ("continuum", "shapes:p=2..20;radius=30;levels=32", 1, 1)):
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
        row["baseline_s"] = time.perf_counter() - t0
        if not args.skip_fit:
            model, guide, seconds, seen = fit_heterogeneous(path, args.out / f"run_{name}", latent, classes,
                                                            args.minutes)
            with SPIDataset(path) as data:
                post = latent_posteriors(guide, data)
            row.update({"fit_s": seconds, "images_seen": seen, "images_per_s": seen / seconds})
            if true_class is not None:
                row["model_class_accuracy"] = class_accuracy(post.map_class, true_class)
            row["model_abs_spearman_z"] = abs(float(spearmanr(post.z_mean[:, 0], true_latent[:, 0]).statistic))
            row["model_mean_z_sd"] = float(post.z_sd.mean())
        results[name] = row
        print(name, json.dumps(row, indent=1), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
