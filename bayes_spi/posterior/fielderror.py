r"""The pose error a fitted field adds, measured without a truth: poses refined on two independent half merges.

The refined posterior (:mod:`bayes_spi.posterior.refine`) is conditional on the trained field: its Laplace spread
is what the pattern's photons allow *given* that field. Where the field is wrong the modes move, and the true pose
lies further from the posterior mean than the spread says (the 269 A 10-mer on 128x128 at 1e3 photons: refined
poses 2.5 deg from the truth against a Laplace width of 0.47 deg; BENCHMARKS.md). The default temperatures
(calibrated where the field was good) cannot see that, and calibrating needs a truth.

Here the data measure it, as the gold-standard FSC measures a map's noise. The patterns (except a set of
*probes*) are split into two halves ``A`` and ``B``; each half is merged at its posterior poses and fluence scales
into its own ``log I`` cube (the exact M-step of EMC for point poses, Friedel mates merged, each voxel shrunk
towards its shell's mean by ``PSEUDO_PHOTONS`` photons so that an empty voxel reads the shell's mean and not
``log 0``)::

    I_X(v) = (sum_{i in X, k} T_v(R_i q_k) y_ik + c I_shell(v)) / (sum_{i in X, k} T_v(R_i q_k) s_i w_k + c)

Every probe (in neither half) is then refined from its posterior mean pose on ``A``'s cube, on ``B``'s, and on
the fitted field's own cube of the same size ``F`` (Gauss-Newton, all good pixels, the fluence profiled:
:func:`bayes_spi.posterior.local.refine_on_cache`). All refinements fit the same photons, so the pattern's own
noise moves the modes alike and cancels in their differences ``d_XY = log(R_X^T R_Y)``; what is left is the pose
error of the fields. Two figures, per tangent axis (mean squares over the probes, the 5% largest dropped: a
probe whose modes fell in different basins is a multimodal posterior, which the mixture carries, not a spread):

    sigma_noise^2 = E|d_AB|^2 / 12                 (two independent half fields; the whole data's field has half
                                                    the variance of one half's)
    sigma_field^2 = (E|d_FA|^2 + E|d_FB|^2) / 6    (the fitted field against a field merged from half the data)

``sigma_noise`` is the field's noise as the gold-standard FSC measures a map's. ``sigma_field`` is the fitted
field's whole pose error, noise and bias, where a merge of the data is unbiased and the field's noise is the
average of the halves' (``e_F = b + (n_A + n_B) / 2``, ``e_A = n_A``: ``E|e_F - e_A|^2 = |b|^2 + E|n_A|^2 / 2``, the
same as ``E|e_F|^2``). It is what the export adds to every hypothesis' tangent covariance
(:meth:`bayes_spi.posterior.mixture.MixturePosterior.inflated`, ``L L^T + sigma_field^2 I``): a pattern whose
photons pin its pose to 0.3 deg cannot claim better than its field allows. Neither figure sees an error that the
merges share with the field (the merges use the field's poses; a field in a wrong basin, the wrong hand): that
part only the verdict can flag (BENCHMARKS.md measures how much of the truth's scatter each figure explains).

Example::

    est = estimate_field_pose_error(cube_a, cube_b, q, log_w, probe_counts, probe_rotations, q_max, cube_f=cube_f)
    post = post.inflated(est.sigma_rad ** 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bayes_spi.posterior.local import refine_on_cache
from bayes_spi.so3 import rotmat_to_rotvec
from bayes_spi.trilinear import splat_cube

__all__ = ["MERGE_PATTERNS", "PROBES", "PSEUDO_PHOTONS", "FieldPoseError", "HalfMerge", "estimate_field_pose_error",
           "measure_field_pose_error", "split_halves"]

#: patterns (the file's first) whose posteriors are merged into the two halves by :func:`measure_field_pose_error`
MERGE_PATTERNS = 4096
#: of which this many are the probes
PROBES = 512

#: photons' worth of the shell mean each merged voxel is shrunk towards (an empty voxel reads its shell's mean)
PSEUDO_PHOTONS = 0.5


class HalfMerge:
    """Running M-step sums of one half: ``sum T_v(R q) y`` and ``sum T_v(R q) s w`` on an ``n^3`` cube.

    Args:
        n: voxels per side; q_max: the cube's half-width (1/A).
        q: ``(M, 3)`` the good pixels' ``q``; log_w: ``(M,)`` their log pixel factors (solid angle x polarization).
    """

    def __init__(self, n: int, q_max: float, q: Tensor, log_w: Tensor) -> None:
        if q.dim() != 2 or q.shape[-1] != 3 or log_w.shape != q.shape[:1]:
            raise ValueError(f"expected q (M, 3) and log_w (M,), got shapes {tuple(q.shape)} and {tuple(log_w.shape)}")
        if n < 3 or q_max <= 0:
            raise ValueError(f"expected n >= 3 and q_max > 0, got {n} and {q_max}")
        self.n, self.q_max = int(n), float(q_max)
        self.q = q.double()
        self.w = log_w.double().exp()
        self.sums = torch.zeros((n, n, n, 2), dtype=torch.float64)
        self.n_patterns = 0

    def add(self, counts: Tensor, rotations: Tensor, log_scale: Tensor, chunk: int = 64) -> None:
        """Merge patterns ``counts (P, M)`` at poses ``rotations (P, 3, 3)`` and ``log_scale (P,)`` (and at their
        Friedel mates ``-R q``)."""
        if counts.dim() != 2 or counts.shape[1] != self.q.shape[0] or rotations.shape != (counts.shape[0], 3, 3) \
                or log_scale.shape != counts.shape[:1]:
            raise ValueError(f"expected counts (P, {self.q.shape[0]}), rotations (P, 3, 3), log_scale (P,), got shapes "
                             f"{tuple(counts.shape)}, {tuple(rotations.shape)}, {tuple(log_scale.shape)}")
        for j in range(0, counts.shape[0], chunk):
            R = rotations[j:j + chunk].double()
            x = torch.einsum("pij,mj->pmi", R, self.q).reshape(-1, 3)
            exposure = log_scale[j:j + chunk].double().exp()[:, None] * self.w[None]
            vals = torch.stack([counts[j:j + chunk].double().reshape(-1), exposure.reshape(-1)], -1)
            for sign in (1.0, -1.0):
                self.sums += splat_cube(sign * x, vals, self.n, self.q_max)
        self.n_patterns += int(counts.shape[0])

    def log_cube(self, pseudo_photons: float = PSEUDO_PHOTONS, shells: int = 0) -> Tensor:
        """``log I`` ``(1, 1, n, n, n)`` of the module doc: each voxel shrunk towards its ``|q|`` shell's merged
        mean by ``pseudo_photons`` (``shells`` radial bins, default ``n // 2``); voxels no pixel reached read their
        shell's mean."""
        num, den = self.sums[..., 0], self.sums[..., 1]
        n = self.n
        ax = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
        r = torch.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)
        nb = shells or n // 2
        b = (r * nb).long().clamp(max=nb + 1)
        s_num = torch.zeros(nb + 2, dtype=torch.float64).index_add_(0, b.reshape(-1), num.reshape(-1))
        s_den = torch.zeros(nb + 2, dtype=torch.float64).index_add_(0, b.reshape(-1), den.reshape(-1))
        reached = s_den > 0
        if not bool(reached.any()) or float(s_num.sum()) <= 0:
            raise ValueError("expected merged photons in the cube, got none (no pattern added, or all counts zero)")
        shell = torch.where(reached, s_num / s_den.clamp(min=1e-300), torch.zeros_like(s_num))
        floor = float(shell[shell > 0].min())
        shell = shell.clamp(min=floor)
        # shells no pixel reaches (the corners) read the outermost reached one
        last = int(torch.nonzero(reached).max())
        shell[last + 1:] = shell[last]
        mean = shell[b]
        c = float(pseudo_photons)
        out = torch.log((num + c) / (den + c / mean))
        return out.float()[None, None]


def split_halves(n_patterns: int, n_probes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices ``(probes, A, B)`` of ``range(n_patterns)``: ``n_probes`` probes, the rest split in two random halves."""
    if not 0 < n_probes < n_patterns - 1:
        raise ValueError(f"expected 0 < n_probes < n_patterns - 1, got {n_probes} probes of {n_patterns} patterns")
    perm = np.random.default_rng(seed).permutation(n_patterns)
    probes = np.sort(perm[:n_probes])
    rest = perm[n_probes:]
    return probes, np.sort(rest[0::2]), np.sort(rest[1::2])


@dataclass
class FieldPoseError:
    """What :func:`estimate_field_pose_error` measured.

    Attributes:
        sigma_rad: ``sigma_field`` of the module doc (rad per tangent axis) when the fitted field's cube was given,
            else ``sigma_noise``: what the export adds.
        noise_sigma_rad: ``sigma_noise`` (rad per tangent axis).
        disagreement_rad: ``(P,)`` per probe, the angle between its modes on the two half cubes.
        rotations_a, rotations_b: ``(P, 3, 3)`` the modes on the half cubes; rotations_f: on the field's (or
            ``None``).
        n_probes: ``P``.
        probes: ``(P,)`` the probes' pattern indices (:func:`measure_field_pose_error`; else ``None``).
        start_rotations: ``(P, 3, 3)`` the probes' posterior poses, where the refinements started.
        laplace_sigma_rad: ``(P,)`` the probes' posterior pose spreads (rms per tangent axis of the most probable
            hypothesis, before any temperature; :func:`measure_field_pose_error`; else ``None``).
    """

    sigma_rad: float
    noise_sigma_rad: float
    disagreement_rad: Tensor
    rotations_a: Tensor
    rotations_b: Tensor
    rotations_f: Tensor | None
    n_probes: int
    probes: np.ndarray | None = None
    start_rotations: Tensor | None = None
    laplace_sigma_rad: Tensor | None = None

    @property
    def sigma_deg(self) -> float:
        return math.degrees(self.sigma_rad)

    def to_dict(self) -> dict[str, float]:
        d = self.disagreement_rad.double()
        return {"field_pose_sigma_deg": self.sigma_deg, "field_noise_sigma_deg": math.degrees(self.noise_sigma_rad),
                "half_disagreement_median_deg": math.degrees(float(d.median())), "n_probes": self.n_probes}


def _trimmed_mean_square(A: Tensor, B: Tensor, trim: float) -> tuple[float, Tensor]:
    """Mean of ``|log(A^T B)|^2`` over the ``trim`` fraction of smallest, and the per-pair angles ``(P,)``."""
    sq = rotmat_to_rotvec(A.transpose(-1, -2) @ B).double().pow(2).sum(-1)
    keep = max(2, int(math.ceil(trim * sq.numel())))
    return float(sq.sort().values[:keep].mean()), sq.sqrt()


def estimate_field_pose_error(cube_a: Tensor, cube_b: Tensor, q: Tensor, log_w: Tensor, counts: Tensor,
                              rotations: Tensor, q_max: float, cube_f: Tensor | None = None, n_iter: int = 6,
                              max_step_deg: float = 4.0, trim: float = 0.95) -> FieldPoseError:
    """``sigma_noise`` and (with ``cube_f``) ``sigma_field`` of the module doc from the probes' modes.

    Args:
        cube_a, cube_b: ``(1, 1, n, n, n)`` the halves' ``log I`` (:meth:`HalfMerge.log_cube`).
        q: ``(M, 3)`` good pixels' ``q``; log_w: ``(M,)`` their log pixel factors; counts: ``(P, M)`` the probes.
        rotations: ``(P, 3, 3)`` the probes' posterior mean poses (the start of every refinement).
        q_max: the cubes' half-width.
        cube_f: ``(1, 1, n, n, n)`` the fitted field's ``log I`` on the same grid (``None``: ``sigma_noise`` only).
        n_iter, max_step_deg: the Gauss-Newton refinement's (:func:`refine_on_cache`).
        trim: the mean squares are taken over this fraction of the probes with the smallest differences.

    Returns:
        :class:`FieldPoseError`.
    """
    if counts.dim() != 2 or rotations.shape != (counts.shape[0], 3, 3) or counts.shape[0] < 2:
        raise ValueError(f"expected counts (P, M) with P >= 2 and rotations (P, 3, 3), got shapes "
                         f"{tuple(counts.shape)} and {tuple(rotations.shape)}")
    if not 0 < trim <= 1:
        raise ValueError(f"expected 0 < trim <= 1, got {trim}")
    R0 = rotations.to(q.dtype)[:, None]
    cubes = [cube_a, cube_b] + ([] if cube_f is None else [cube_f])
    modes = [refine_on_cache(c.to(q.dtype), R0, q, log_w, counts.to(q.dtype), q_max, n_iter=n_iter,
                             max_step_deg=max_step_deg).rotations[:, 0] for c in cubes]
    ab, angles = _trimmed_mean_square(modes[0], modes[1], trim)
    noise = math.sqrt(ab / 12.0)
    sigma = noise
    if cube_f is not None:
        fa, _ = _trimmed_mean_square(modes[2], modes[0], trim)
        fb, _ = _trimmed_mean_square(modes[2], modes[1], trim)
        sigma = math.sqrt((fa + fb) / 6.0)
    return FieldPoseError(sigma, noise, angles, modes[0], modes[1], modes[2] if cube_f is not None else None,
                          int(angles.numel()), start_rotations=rotations)


def measure_field_pose_error(trained: Any, dataset: Any, settings: Any = None, n_patterns: int = MERGE_PATTERNS,
                             n_probes: int = PROBES, seed: int = 0, grid: int | None = None,
                             progress: Callable[[int], None] | None = None) -> FieldPoseError:
    """:func:`estimate_field_pose_error` for a fitted run: the export's refined posterior of the file's first
    ``n_patterns`` patterns (``settings``: a :class:`~bayes_spi.posterior.netcdf.ExportSettings`, its pattern range
    ignored), ``n_probes`` of them held out, the rest merged in two halves at their most probable hypothesis (pose
    and log fluence scale) on a cube of ``grid`` voxels per side (default: the fit's search cube, the one its EMC
    merges into).

    Args:
        trained: a :class:`bayes_spi.infer.load.Trained`; dataset: the data (:class:`~bayes_spi.dataio.h5.SPIDataset`).
        progress: called with the number of patterns after each batch of the first pass.

    Raises:
        ValueError: fewer than ``n_probes + 4`` patterns, or a heterogeneous fit (one field per class or latent: not
            supported, the halves would mix structures).
    """
    from bayes_spi.posterior.netcdf import ExportSettings, guide_batches

    guide, model = trained.guide, trained.model
    if hasattr(guide, "latent_posterior"):
        raise ValueError("expected a fit with one structure, got a heterogeneous fit (a latent or class posterior)")
    n = min(int(n_patterns), int(dataset.n_patterns))
    n_probes = min(int(n_probes), max(1, n // 8))
    if n < 16:
        raise ValueError(f"{dataset.path}: expected at least 16 patterns to measure the field's pose error, got {n}")
    settings = replace(settings or ExportSettings(), first_pattern=0, max_patterns=n, refine=True,
                       field_pose_sigma_deg=0.0)
    R, log_s = torch.zeros(n, 3, 3, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    sigma = torch.zeros(n, dtype=torch.float64)
    for idx, _, post in guide_batches(trained, dataset, settings):
        k = post.weights.argmax(-1)
        b = torch.arange(k.numel())
        R[idx] = post.rotations[b, k].double().cpu()
        log_s[idx] = post.log_scale_loc[b, k].double().cpu()
        sigma[idx] = (post.pose_tril[b, k].double().pow(2).sum((-1, -2)) / 3).sqrt().cpu()
        if progress is not None:
            progress(len(idx))
    good = torch.nonzero(guide.mask.reshape(-1).cpu() & torch.as_tensor(dataset.mask.reshape(-1))).squeeze(-1)
    q = model.q[good.to(model.q.device)].double().cpu()
    log_w = model.log_pixel_factor[good.to(model.q.device)].double().cpu()
    if grid is None:
        search = getattr(guide, "search", None)
        grid = int(search.cache_grid) if search is not None else int(getattr(trained.config, "cache_grid", 41))
    probes, half_a, half_b = split_halves(n, n_probes, seed=seed)
    cubes = []
    for half in (half_a, half_b):
        merge = HalfMerge(grid, model.q_max, q, log_w)
        for j in range(0, len(half), 256):
            sel = half[j:j + 256]
            y = torch.as_tensor(dataset.read(sel)).reshape(len(sel), -1)[:, good]
            merge.add(y, R[sel], log_s[sel])
        cubes.append(merge.log_cube())
    y_p = torch.as_tensor(dataset.read(probes)).reshape(len(probes), -1)[:, good].double()
    from bayes_spi.posterior.netcdf import export_log_cube

    cube_f = export_log_cube(model.field, grid, model.q_max).cpu()
    est = estimate_field_pose_error(cubes[0], cubes[1], q, log_w, y_p, R[probes], model.q_max, cube_f=cube_f)
    return replace(est, probes=probes, laplace_sigma_rad=sigma[probes])
