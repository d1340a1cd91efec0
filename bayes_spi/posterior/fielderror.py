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

Every probe (in neither half) is then refined from its posterior mean pose on ``A``'s cube and on ``B``'s
(Gauss-Newton, all good pixels, the fluence profiled: :func:`bayes_spi.posterior.local.refine_on_cache`). Both
refinements fit the same photons, so the pattern's own noise moves both modes alike and cancels in their
difference ``d_i = log(R_iA^T R_iB)``; what is left is the pose error of two independent half fields. For field
errors that fall as ``1/N`` in variance, one half field's pose error has the per-axis variance ``E|d|^2 / 6``
and the whole data's field half of it::

    sigma_field^2 = E|d|^2 / 12          (rad^2 per tangent axis)

which :meth:`bayes_spi.posterior.mixture.MixturePosterior.inflated` adds to every hypothesis' tangent covariance
(``L L^T + sigma_field^2 I``): a pattern whose photons pin its pose to 0.3 deg cannot claim better than the
field allows. The estimate sees the merge's noise, not a bias both halves share (a wrong hand, a field stuck
in a wrong basin): that part only the verdict can flag.

Example::

    est = estimate_field_pose_error(cube_a, cube_b, q, log_w, probe_counts, probe_rotations, q_max)
    post = post.inflated(est.sigma_rad ** 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bayes_spi.posterior.local import refine_on_cache
from bayes_spi.so3 import rotmat_to_rotvec
from bayes_spi.trilinear import splat_cube

__all__ = ["PSEUDO_PHOTONS", "FieldPoseError", "HalfMerge", "estimate_field_pose_error", "split_halves"]

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
        sigma_rad: ``sigma_field`` of the module doc (rad per tangent axis, the whole data's field).
        disagreement_rad: ``(P,)`` per probe, the angle between its modes on the two half cubes.
        rotations_a, rotations_b: ``(P, 3, 3)`` the modes.
        n_probes: ``P``.
    """

    sigma_rad: float
    disagreement_rad: Tensor
    rotations_a: Tensor
    rotations_b: Tensor
    n_probes: int

    @property
    def sigma_deg(self) -> float:
        return math.degrees(self.sigma_rad)

    def to_dict(self) -> dict[str, float]:
        d = self.disagreement_rad.double()
        return {"field_pose_sigma_deg": self.sigma_deg, "half_disagreement_median_deg": math.degrees(float(d.median())),
                "half_disagreement_rms_deg": math.degrees(float(d.pow(2).mean().sqrt())), "n_probes": self.n_probes}


def estimate_field_pose_error(cube_a: Tensor, cube_b: Tensor, q: Tensor, log_w: Tensor, counts: Tensor,
                              rotations: Tensor, q_max: float, n_iter: int = 6, max_step_deg: float = 4.0,
                              trim: float = 0.95) -> FieldPoseError:
    """``sigma_field`` of the module doc from the probes' modes on two half cubes.

    Args:
        cube_a, cube_b: ``(1, 1, n, n, n)`` the halves' ``log I`` (:meth:`HalfMerge.log_cube`).
        q: ``(M, 3)`` good pixels' ``q``; log_w: ``(M,)`` their log pixel factors; counts: ``(P, M)`` the probes.
        rotations: ``(P, 3, 3)`` the probes' posterior mean poses (the start of both refinements).
        q_max: the cubes' half-width.
        n_iter, max_step_deg: the Gauss-Newton refinement's (:func:`refine_on_cache`).
        trim: the mean square disagreement is taken over this fraction of the probes with the smallest (a probe
            whose two modes fell in different basins, e.g. the Rz(pi) twin, is a multimodal posterior, which the
            mixture already carries, not a spread).

    Returns:
        :class:`FieldPoseError`.
    """
    if counts.dim() != 2 or rotations.shape != (counts.shape[0], 3, 3) or counts.shape[0] < 2:
        raise ValueError(f"expected counts (P, M) with P >= 2 and rotations (P, 3, 3), got shapes "
                         f"{tuple(counts.shape)} and {tuple(rotations.shape)}")
    if not 0 < trim <= 1:
        raise ValueError(f"expected 0 < trim <= 1, got {trim}")
    R0 = rotations.to(q.dtype)[:, None]
    modes = [refine_on_cache(c.to(q.dtype), R0, q, log_w, counts.to(q.dtype), q_max, n_iter=n_iter,
                             max_step_deg=max_step_deg).rotations[:, 0] for c in (cube_a, cube_b)]
    d = rotmat_to_rotvec(modes[0].transpose(-1, -2) @ modes[1]).double()  # (P, 3)
    sq = d.pow(2).sum(-1)
    keep = max(2, int(math.ceil(trim * sq.numel())))
    ms = float(sq.sort().values[:keep].mean())
    return FieldPoseError(math.sqrt(ms / 12.0), sq.sqrt(), modes[0], modes[1], int(sq.numel()))
