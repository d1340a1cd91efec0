r"""Phase retrieval: electron density from a 3D intensity (error reduction, HIO, shrink-wrap).

Grid conventions: the intensity is a centred odd cube ``(n, n, n)`` (voxel ``i`` at
``q = (i - n//2) dq``, 1/A); the density lives on the real-space cube with voxel ``voxel_A = 1 / (n dq)``
and the same centring. The density is in electrons per voxel when the intensity is in electrons^2 (the
normalisation of :func:`bayes_spi.sim.transform.density_on_grid`): ``|FFT(rho)| = sqrt(I)`` with the
unnormalised forward FFT.

Algorithm (per random start; Fienup 1982, Marchesini et al. 2003):

* Measured amplitudes ``A = sqrt(max(I, 0))`` of the Friedel-symmetrised intensity; voxels outside
  ``measured_mask`` (default: the sphere ``|q| <= n//2 dq``; the cube corners are unmeasured) keep the
  current transform (they are free).
* Initial support: the autocorrelation ``|ifft(I)|`` (unmeasured voxels zero-filled) thresholded at
  ``autocorr_threshold`` of its maximum (the autocorrelation support is twice the object, a safe start).
  Initial density: the inverse transform of ``A`` with uniform random phases.
* Fourier projection ``P_M``: ``G -> A G / |G|`` on measured voxels. Real-space constraint ``S``: inside
  the support and ``rho >= 0``.
* HIO: ``rho' = P_M rho`` where it satisfies ``S``, else ``rho - beta P_M rho``; ER: ``rho' = P_M rho`` on
  ``S``, else 0. The main loop repeats ``hio_er_pattern = (n_hio, n_er)`` blocks for ``n_iter`` iterations.
* Shrink-wrap every ``shrinkwrap_every`` iterations: blur the current estimate (``P_M rho`` restricted to
  ``S``) with a Gaussian whose sigma (voxels) goes geometrically from ``shrinkwrap_sigma[0]`` to
  ``shrinkwrap_sigma[1]`` over the main loop, and keep the voxels above ``threshold`` times its maximum.
* ``n_er_final`` ER iterations with the final support; the Fourier error of the final density,
  ``sum_M (|F| - A)^2 / sum_M A^2``, ranks the starts (see :func:`fourier_error`).

Friedel symmetry: the FFTs are real-to-complex (the density is real), so the transform is Hermitian by
construction. The result's hand and position are arbitrary (twin and translation ambiguities): compare
with a reference via :func:`bayes_spi.analysis.align.align_density`.

Example:
    >>> import numpy as np
    >>> x = np.arange(25) - 12
    >>> X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    >>> rho = np.exp(-((X - 2) ** 2 + Y**2 + Z**2) / 4) + 0.5 * np.exp(-((X + 2) ** 2 + (Y - 2) ** 2 + Z**2) / 3)
    >>> I = np.abs(np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(rho)))) ** 2
    >>> res = phase_retrieval(I, dq=0.01, n_starts=2, n_iter=100, n_er_final=20)
    >>> res.density.shape, res.errors.shape, bool(res.errors.min() < 0.05)
    ((25, 25, 25), (2,), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.fft as sfft
from tqdm import tqdm

from bayes_spi.analysis.align import centre_of_mass
from bayes_spi.grid import centred_index

__all__ = ["PhasingResult", "phase_retrieval", "fourier_error", "measured_sphere"]


@dataclass(frozen=True)
class PhasingResult:
    """Outcome of :func:`phase_retrieval`.

    Attributes:
        density: ``(n, n, n)`` float64 best density (electrons per voxel), its centre of mass rolled (by
            whole voxels, periodically) to the centre voxel ``n//2``.
        voxel_A: real-space voxel size, Angstrom (``1 / (n dq)``).
        support: ``(n, n, n)`` bool final support of the best start (rolled like ``density``).
        errors: ``(n_starts,)`` final Fourier error of each start.
        best: index of the best start.
        error_history: per start, ``(n_iter + n_er_final,)`` Fourier error of the iterate entering each
            Fourier projection.
        support_sizes: per start, the support size (voxels) after each shrink-wrap update (first entry:
            the initial autocorrelation support).
    """

    density: np.ndarray
    voxel_A: float
    support: np.ndarray
    errors: np.ndarray
    best: int
    error_history: list[np.ndarray] = field(default_factory=list)
    support_sizes: list[np.ndarray] = field(default_factory=list)


def measured_sphere(n: int) -> np.ndarray:
    """Default measured region: ``(n, n, n)`` bool, voxels with ``|i - n//2| <= n//2`` (the inscribed ball)."""
    axis = centred_index(n)
    r2 = axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2
    return r2 <= (n // 2) ** 2 + 1e-9


def _check_cube(arr: np.ndarray, name: str) -> int:
    if arr.ndim != 3 or len(set(arr.shape)) != 1 or arr.shape[0] % 2 == 0:
        raise ValueError(f"{name}: expected an odd cube (n, n, n), got shape {arr.shape}")
    return int(arr.shape[0])


def _amplitudes(intensity: np.ndarray) -> np.ndarray:
    arr = np.clip(np.asarray(intensity, dtype=np.float64), 0.0, None)
    arr = 0.5 * (arr + arr[::-1, ::-1, ::-1])
    return np.sqrt(arr)


def _mask_or_default(measured_mask: np.ndarray | None, n: int) -> np.ndarray:
    if measured_mask is None:
        return measured_sphere(n)
    mask = np.asarray(measured_mask)
    if mask.shape != (n, n, n) or mask.dtype != np.bool_:
        raise ValueError(f"measured_mask: expected a bool array of shape {(n, n, n)}, got {mask.dtype} {mask.shape}")
    # Friedel: a voxel is measured if it or its mate is
    return mask | mask[::-1, ::-1, ::-1]


def fourier_error(density: np.ndarray, intensity: np.ndarray, measured_mask: np.ndarray | None = None) -> float:
    """``sum_M (|F| - A)^2 / sum_M A^2`` with ``F = FFT(density)``, ``A = sqrt(max(I_sym, 0))``.

    Args:
        density: ``(n, n, n)`` real density (any centring: ``|F|`` ignores translations).
        intensity: ``(n, n, n)`` centred intensity; symmetrised and clipped as in :func:`phase_retrieval`.
        measured_mask: ``(n, n, n)`` bool in the centred reciprocal grid (default :func:`measured_sphere`).

    Returns:
        The relative Fourier error (``sum I`` over measured voxels in the denominator).
    """
    rho = np.asarray(density, dtype=np.float64)
    n = _check_cube(rho, "density")
    if np.shape(intensity) != rho.shape:
        raise ValueError(f"intensity: expected shape {rho.shape} (as density), got {np.shape(intensity)}")
    amp = _amplitudes(intensity)
    mask = _mask_or_default(measured_mask, n)
    mod = np.abs(np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(rho))))
    den = float(np.sum(amp[mask] ** 2))
    return float(np.sum((mod[mask] - amp[mask]) ** 2) / den) if den > 0 else math.nan


def _gaussian_ft(n: int, sigma: float) -> np.ndarray:
    """rfft-layout transfer function of a unit-sum periodic Gaussian of ``sigma`` voxels."""
    k = np.fft.fftfreq(n)
    kr = np.fft.rfftfreq(n)
    g = np.exp(-2.0 * np.pi**2 * sigma**2 * k**2)
    gr = np.exp(-2.0 * np.pi**2 * sigma**2 * kr**2)
    return (g[:, None, None] * g[None, :, None] * gr[None, None, :]).astype(np.float32)


def phase_retrieval(
    intensity: np.ndarray,
    dq: float,
    *,
    n_starts: int = 8,
    n_iter: int = 300,
    n_er_final: int = 50,
    beta: float = 0.9,
    hio_er_pattern: tuple[int, int] = (40, 10),
    shrinkwrap_every: int = 20,
    shrinkwrap_sigma: tuple[float, float] = (3.0, 1.0),
    threshold: float = 0.1,
    autocorr_threshold: float = 0.04,
    seed: int = 0,
    measured_mask: np.ndarray | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> PhasingResult:
    """Electron density from a 3D intensity by ER + HIO + shrink-wrap with several random starts.

    See the module docstring for the algorithm. Float32 FFTs (``scipy.fft`` real transforms) are used for
    the iterations, float64 for the reported errors. On the 65^3 truth grid of 2CEX the defaults take
    about 17 s on 2 idle CPU cores (8 starts x 350 iterations; ~30 s on a busy machine), and reach a
    density FSC > 0.94 against the true band-limited density up to Nyquist.

    Args:
        intensity: ``(n, n, n)`` centred odd cube (``q = (i - n//2) dq``); negative values are clipped to 0,
            the cube is Friedel-symmetrised.
        dq: reciprocal voxel size, 1/A (gives ``voxel_A = 1 / (n dq)``).
        n_starts: random starts; the best by final Fourier error is returned.
        n_iter: main-loop iterations (HIO/ER blocks with shrink-wrap).
        n_er_final: final ER iterations with a fixed support.
        beta: HIO feedback parameter.
        hio_er_pattern: ``(n_hio, n_er)`` iterations per block of the main loop.
        shrinkwrap_every: iterations between support updates (0: keep the initial support).
        shrinkwrap_sigma: ``(start, end)`` Gaussian blur sigma in voxels.
        threshold: support threshold, fraction of the blurred density's maximum.
        autocorr_threshold: fraction of the autocorrelation maximum for the initial support.
        seed: seed of the random phases.
        measured_mask: ``(n, n, n)`` bool of measured voxels in the centred grid (default: the ball
            ``|q| <= n//2 dq``); other voxels are unconstrained.
        workers: FFT threads (``scipy.fft`` ``workers``; default all cores).
        progress: show a progress bar over the starts.

    Returns:
        :class:`PhasingResult`.

    Raises:
        ValueError: bad shapes or settings, or an intensity that is zero everywhere.
    """
    amp_c = _amplitudes(intensity)
    n = _check_cube(amp_c, "intensity")
    if not np.isfinite(dq) or dq <= 0:
        raise ValueError(f"dq: expected a positive number, got {dq!r}")
    if not np.all(np.isfinite(amp_c)):
        raise ValueError("intensity: expected finite values, got NaN or infinity")
    for name, value, low in (("n_starts", n_starts, 1), ("n_iter", n_iter, 0), ("n_er_final", n_er_final, 0),
                             ("shrinkwrap_every", shrinkwrap_every, 0)):
        if isinstance(value, bool) or int(value) != value or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    n_hio, n_er = (int(v) for v in hio_er_pattern)
    if n_hio < 0 or n_er < 0 or n_hio + n_er == 0:
        raise ValueError(f"hio_er_pattern: expected two non-negative integers, not both 0, got {hio_er_pattern!r}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold: expected a value in (0, 1), got {threshold!r}")
    if not 0 < autocorr_threshold < 1:
        raise ValueError(f"autocorr_threshold: expected a value in (0, 1), got {autocorr_threshold!r}")
    sig0, sig1 = (float(v) for v in shrinkwrap_sigma)
    if sig0 <= 0 or sig1 <= 0:
        raise ValueError(f"shrinkwrap_sigma: expected two positive numbers, got {shrinkwrap_sigma!r}")
    mask_c = _mask_or_default(measured_mask, n)
    total = float(np.sum(amp_c[mask_c] ** 2))
    if total <= 0:
        raise ValueError("intensity: expected positive values on the measured voxels, got none")
    nw = -1 if workers is None else int(workers)
    half = n // 2 + 1
    # unshifted (FFT origin at index 0) rfft layout
    # unmeasured voxels are zero-filled for the start (autocorrelation, random phases) and free afterwards,
    # so their input values never matter
    amp = np.fft.ifftshift(np.where(mask_c, amp_c, 0.0))[..., :half].astype(np.float32)
    meas = np.fft.ifftshift(mask_c)[..., :half]
    free = ~meas
    # initial support from the autocorrelation |ifft(I)| (origin at index 0 in the unshifted layout)
    autocorr = np.abs(sfft.irfftn(amp.astype(np.float64) ** 2, s=(n, n, n), workers=nw))
    support0 = autocorr > autocorr_threshold * autocorr.max()
    # shrink-wrap schedule
    n_updates = n_iter // shrinkwrap_every if shrinkwrap_every else 0
    sigmas = sig0 * (sig1 / sig0) ** (np.arange(n_updates) / max(n_updates - 1, 1))
    blur_ft = [_gaussian_ft(n, s) for s in sigmas]
    block = n_hio + n_er
    rng = np.random.default_rng(seed)
    weights = np.ones((n, n, half), dtype=np.float32)  # rfft plane multiplicity for Parseval sums
    weights[..., 1:] = 2.0
    meas_w = (weights * meas).astype(np.float32)
    norm = float(np.sum(meas_w * amp.astype(np.float64) ** 2))

    def project(rho: np.ndarray) -> tuple[np.ndarray, float]:
        G = sfft.rfftn(rho, workers=nw)
        mod = np.abs(G)
        err = float(np.sum(meas_w * (mod - amp) ** 2)) / norm
        scale = np.where(mod > 0, amp / np.where(mod > 0, mod, 1.0), 0.0).astype(np.float32)
        G_new = np.where(free, G, G * scale) if free.any() else G * scale
        zero_phase = meas & (mod == 0)
        if zero_phase.any():
            G_new = np.where(zero_phase, amp, G_new)
        return sfft.irfftn(G_new, s=(n, n, n), workers=nw).astype(np.float32), err

    errors = np.empty(int(n_starts))
    histories: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    densities: list[np.ndarray] = []
    supports: list[np.ndarray] = []
    for start in tqdm(range(int(n_starts)), disable=not progress, desc="phasing", unit="start"):
        phases = np.exp(2j * np.pi * rng.random(amp.shape)).astype(np.complex64)
        rho = sfft.irfftn(amp * phases, s=(n, n, n), workers=nw).astype(np.float32)
        support = support0.copy()
        history = np.empty(n_iter + n_er_final)
        size_log = [int(support.sum())]
        update = 0
        for it in range(n_iter + n_er_final):
            proj, history[it] = project(rho)
            ok = support & (proj >= 0)
            use_hio = it < n_iter and (it % block) < n_hio
            if use_hio:
                rho = np.where(ok, proj, rho - np.float32(beta) * proj)
            else:
                rho = np.where(ok, proj, np.float32(0.0))
            if it < n_iter and shrinkwrap_every and (it + 1) % shrinkwrap_every == 0 and update < n_updates:
                estimate = np.where(ok, proj, np.float32(0.0))
                blurred = sfft.irfftn(sfft.rfftn(estimate, workers=nw) * blur_ft[update], s=(n, n, n), workers=nw)
                update += 1
                top = float(blurred.max())
                if top > 0:
                    support = blurred > threshold * top
                    size_log.append(int(support.sum()))
                    if not use_hio:
                        rho = np.where(support, rho, np.float32(0.0))
        # final density: the last ER output (support + positivity), error recomputed in float64
        final = rho.astype(np.float64)
        if n_iter + n_er_final == 0 or (n_er_final == 0 and (n_iter - 1) % block < n_hio):
            final = np.where(support & (final >= 0), final, 0.0)
        G = sfft.rfftn(final, workers=nw)
        errors[start] = float(np.sum(meas_w * (np.abs(G) - amp.astype(np.float64)) ** 2)) / norm
        histories.append(history)
        sizes.append(np.asarray(size_log))
        densities.append(final)
        supports.append(support)
    best = int(np.argmin(errors))
    rho_best = np.fft.fftshift(densities[best])
    sup_best = np.fft.fftshift(supports[best])
    roll = tuple(int(v) for v in -np.round(centre_of_mass(rho_best)).astype(int))
    rho_best = np.roll(rho_best, roll, axis=(0, 1, 2))
    sup_best = np.roll(sup_best, roll, axis=(0, 1, 2))
    return PhasingResult(
        density=np.ascontiguousarray(rho_best),
        voxel_A=1.0 / (n * float(dq)),
        support=np.ascontiguousarray(sup_best),
        errors=errors,
        best=best,
        error_history=histories,
        support_sizes=sizes,
    )
