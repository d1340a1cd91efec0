"""Settings from the data: particle size, speckle sampling, field bandwidth and orientation-grid density.

A fit's hard settings depend on the particle, not on the detector alone (docs/DESIGN.md section 4, "What EMC
teaches"): the speckle width is ``~1/D`` for a particle of diameter ``D``, so

* the detector resolves the speckles only when the **oversampling** ``FOV / D >= 2`` (``FOV`` =
  ``D_det lambda / pixel``, :attr:`bayes_spi.geometry.Geometry.field_of_view_A`);
* the field must represent ``~ q_max D`` speckles along a radius: its first-layer frequency
  ``w0 ~ pi D q_max`` (:class:`bayes_spi.models.fields.SirenField` scales ``q`` by ``1/q_max``);
* the orientation grid must be finer than about one speckle at the edge of the measured ball:
  spacing ``~ c / (D q_edge)`` rad.

``D`` is estimated from the data alone: the mean of many patterns (divided by the per-pixel solid angle
x polarization) is the spherically averaged intensity ``I(|q|)``; its sinc transform is the
spherically averaged autocorrelation of the density ``gamma(r)``, which vanishes beyond ``D``. With a
finite ``q_max`` the edge is blurred and the beam stop removes the lowest shells (extrapolated flat),
so the radius where the apodized ``gamma`` falls to :data:`GAMMA_LEVEL` is converted to ``D`` by
the same transform applied to uniform spheres on the same ``q`` samples (a calibration computed, not
fitted to any molecule).

That profile needs the central speckle. When the beam stop or a central hole of the mask hides it (the
innermost measured ``|q|`` beyond :data:`HIDDEN_CENTRE` of the central speckle's first zero ``1.43/D``; a
real pnCCD mask binned to 32x32 does), the profile method underestimates ``D`` by 2-3x. ``D`` then comes
from the **speckle contrast** instead (flat detectors): the pattern-by-pattern intensity correlation at a
lag ``dq`` between pixels, ``C(dq) = <y(q) y(q + dq)> / (<y(q)> <y(q + dq)>) - 1`` (shot noise excluded: lags
>= 1 pixel; fluence jitter adds a constant), falls like ``|Phi(pi dq D)|^2`` with ``Phi`` the sphere's form
amplitude ``3 (sin x - x cos x) / x^3`` (the speckle of a particle of support ``D``), whatever the centre.

Example:
    >>> import numpy as np
    >>> q = np.linspace(0.002, 0.06, 60)
    >>> D = 150.0
    >>> x = np.pi * q * D
    >>> sphere = (3 * (np.sin(x) - x * np.cos(x)) / x**3) ** 2
    >>> round(diameter_from_profile(q, sphere) / D, 1)
    1.0
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "GAMMA_LEVEL",
    "SamplingReport",
    "radial_profile",
    "autocorrelation_radial",
    "diameter_from_profile",
    "sampling_report",
    "estimate_sampling",
    "grid_size_for_spacing",
    "HIDDEN_CENTRE",
    "SpeckleContrast",
    "diameter_from_contrast",
]

#: level (relative to gamma(0)) at which the apodized autocorrelation's edge is read
GAMMA_LEVEL = 0.1
#: the profile method is replaced by the speckle contrast when the innermost measured |q| exceeds this
#: fraction of the central speckle's first zero 1.43 / D
HIDDEN_CENTRE = 0.85


def radial_profile(q_norm: np.ndarray, values: np.ndarray, n_shells: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``values`` in ``n_shells`` equal-width shells of ``|q|`` over ``[0, max q]``.

    Args:
        q_norm: ``(P,)`` |q| of the good pixels (1/A).
        values: ``(P,)`` per-pixel values (e.g. mean counts / pixel factor).
    Returns:
        ``q_centres (S,)`` and ``mean (S,)`` for the non-empty shells only.
    """
    if q_norm.shape != values.shape or q_norm.ndim != 1:
        raise ValueError(f"expected q_norm and values of one shape (P,), got {q_norm.shape} and {values.shape}")
    edges = np.linspace(0.0, float(q_norm.max()) * (1 + 1e-9), n_shells + 1)
    idx = np.clip(np.digitize(q_norm, edges) - 1, 0, n_shells - 1)
    sums = np.bincount(idx, weights=values, minlength=n_shells)
    cnt = np.bincount(idx, minlength=n_shells)
    keep = cnt > 0
    centres = 0.5 * (edges[1:] + edges[:-1])
    return centres[keep], sums[keep] / cnt[keep]


def autocorrelation_radial(q: np.ndarray, intensity: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Normalised spherically averaged density autocorrelation ``gamma(r) / gamma(0)`` ``(R,)``.

    ``gamma(r) = int I(q) sinc(2 pi q r) 4 pi q^2 dq`` on a uniform grid from 0 to ``q.max()``: the
    measured shells ``q (S,)`` (increasing), the unmeasured low-``q`` shells filled with the first
    measured value, a Hann taper towards ``q_max`` against truncation ringing.
    """
    q = np.asarray(q, dtype=np.float64)
    intensity = np.asarray(intensity, dtype=np.float64)
    dq = float(np.median(np.diff(q))) if len(q) > 1 else float(q[0])
    grid = np.arange(0.0, q.max() + 0.5 * dq, dq / 2)
    prof = np.interp(grid, q, intensity, left=intensity[0], right=intensity[-1])
    taper = 0.5 * (1 + np.cos(np.pi * grid / grid.max()))
    w = prof * taper * grid**2
    arg = 2 * np.pi * np.outer(r, grid)
    sinc = np.where(arg > 1e-12, np.sin(arg) / np.where(arg > 1e-12, arg, 1.0), 1.0)
    g = sinc @ w
    return g / g[0]


def _edge(r: np.ndarray, gamma: np.ndarray, level: float) -> float:
    below = np.nonzero(gamma < level)[0]
    if len(below) == 0:
        return float(r[-1])
    i = int(below[0])
    if i == 0:
        return float(r[0])
    # linear interpolation between r[i-1] (above) and r[i] (below)
    f = (gamma[i - 1] - level) / (gamma[i - 1] - gamma[i])
    return float(r[i - 1] + f * (r[i] - r[i - 1]))


def _pair_edge(r: np.ndarray, gamma: np.ndarray, level: float) -> float:
    """Largest ``r`` where the pair-distance distribution ``p(r) = r^2 gamma(r)`` is above ``level`` of its
    maximum (before the first clear return to zero)."""
    p = r**2 * gamma
    top = int(np.argmax(p))
    return _edge(r[top:], p[top:] / p[top], level)


def _sphere_profile(q: np.ndarray, diameter: float) -> np.ndarray:
    x = np.pi * q * diameter
    x = np.where(x < 1e-6, 1e-6, x)
    return (3 * (np.sin(x) - x * np.cos(x)) / x**3) ** 2


def diameter_from_profile(q: np.ndarray, intensity: np.ndarray, level: float = GAMMA_LEVEL) -> float:
    """Particle diameter (A) from the spherically averaged intensity ``intensity (S,)`` at ``q (S,)`` (1/A).

    The radius where the apodized ``gamma`` falls to ``level`` is mapped to a diameter through uniform
    spheres sampled on the same ``q`` (a monotone calibration curve, interpolated).
    """
    q = np.asarray(q, dtype=np.float64)
    intensity = np.asarray(intensity, dtype=np.float64)
    if q.ndim != 1 or q.shape != intensity.shape or len(q) < 4:
        raise ValueError(f"expected q and intensity of one shape (S,) with S >= 4, got {q.shape}, {intensity.shape}")
    if not np.all(np.isfinite(intensity)) or np.all(intensity <= 0):
        raise ValueError("expected a finite, positive radial intensity profile")
    r_top = 2.0 / float(q.min()) if q.min() > 0 else 2.0 / float(np.median(np.diff(q)))
    r = np.linspace(0.0, r_top, 2048)
    edge = _pair_edge(r, autocorrelation_radial(q, intensity, r), level)
    diameters = np.geomspace(0.25 / q.max(), 1.5 / max(q.min(), 1e-3 * q.max()), 48)
    edges = np.array([_pair_edge(r, autocorrelation_radial(q, _sphere_profile(q, d), r), level) for d in diameters])
    # the calibration is monotone until the beam stop hides the sphere's central speckle: keep that branch
    stop = len(edges)
    for i in range(1, len(edges)):
        if edges[i] <= edges[i - 1]:
            stop = i
            break
    return float(np.interp(edge, edges[:stop], diameters[:stop]))


def diameter_from_contrast(lag_q: np.ndarray, contrast: np.ndarray, d_min: float, d_max: float) -> float:
    """Particle diameter (A) from a speckle-contrast curve: least squares of ``a |Phi(pi dq D)|^2 + c``.

    Args:
        lag_q: ``(L,)`` lags ``dq`` in 1/A (> 0).
        contrast: ``(L,)`` the contrast ``C(dq)`` (see the module docstring); NaN entries are ignored.
        d_min, d_max: the range of ``D`` searched (200 geometric steps; ``a > 0`` is required).

    Example:
        >>> dq = np.arange(1, 16) / 170.0
        >>> c = 0.8 * _sphere_profile(dq, 60.0) + 0.1
        >>> round(diameter_from_contrast(dq, c, 10.0, 170.0))
        60
    """
    lag_q = np.asarray(lag_q, dtype=np.float64)
    contrast = np.asarray(contrast, dtype=np.float64)
    if lag_q.shape != contrast.shape or lag_q.ndim != 1:
        raise ValueError(f"expected lag_q and contrast of one shape (L,), got {lag_q.shape}, {contrast.shape}")
    ok = np.isfinite(contrast) & (lag_q > 0)
    if ok.sum() < 3 or not 0 < d_min < d_max:
        raise ValueError(f"expected >= 3 finite lags and 0 < d_min < d_max, got {int(ok.sum())}, {d_min}, {d_max}")
    dq, c = lag_q[ok], contrast[ok]
    best, best_d = np.inf, float("nan")
    for d in np.geomspace(d_min, d_max, 200):
        X = np.stack([_sphere_profile(dq, d), np.ones_like(dq)], axis=1)
        coef = np.linalg.lstsq(X, c, rcond=None)[0]
        r = float(np.sum((X @ coef - c) ** 2))
        if coef[0] > 0 and r < best:
            best, best_d = r, float(d)
    return best_d


class SpeckleContrast:
    """Accumulates the speckle contrast of masked patterns on a flat ``(n_y, n_x)`` detector (FFT lags).

    ``add(counts (B, n_y, n_x))`` for each batch, then :meth:`curve` gives ``(lag_px (L,), C (L,))`` for
    lags of 1 to ``min(n_y, n_x) // 2`` pixels (radially averaged over lag directions with at least 20
    overlapping good pixel pairs).
    """

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = np.asarray(mask, dtype=np.float64)
        if self.mask.ndim != 2:
            raise ValueError(f"expected a mask (n_y, n_x), got shape {self.mask.shape}")
        self.shape = (2 * self.mask.shape[0], 2 * self.mask.shape[1])
        self.products = np.zeros(self.shape)
        self.total = np.zeros(self.mask.shape)
        self.n = 0

    def _auto(self, image: np.ndarray) -> np.ndarray:
        return np.fft.irfft2(np.abs(np.fft.rfft2(image, s=self.shape)) ** 2, s=self.shape)

    def add(self, counts: np.ndarray) -> None:
        c = np.asarray(counts, dtype=np.float64) * self.mask
        f = np.fft.rfft2(c, s=self.shape)
        self.products += np.fft.irfft2((np.abs(f) ** 2).sum(axis=0), s=self.shape)
        self.total += c.sum(axis=0)
        self.n += len(c)

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n == 0:
            raise ValueError("expected at least one pattern, got none")
        expected = self._auto(self.total / self.n) * self.n
        pairs = self._auto(self.mask)
        dy = np.fft.fftfreq(self.shape[0], 1.0 / self.shape[0])
        dx = np.fft.fftfreq(self.shape[1], 1.0 / self.shape[1])
        lag = np.hypot(dy[:, None], dx[None, :])
        ok = (pairs > 20) & (lag > 0.5) & (expected > 1e-12)
        c = np.where(ok, self.products / np.where(ok, expected, 1.0) - 1.0, np.nan)
        lags = np.arange(1, min(self.mask.shape) // 2 + 1, dtype=np.float64)
        prof = np.array([np.nanmean(c[sel]) if (sel := ok & (np.abs(lag - b) < 0.5)).any() else np.nan
                         for b in lags])
        return lags, prof


def grid_size_for_spacing(spacing_rad: float) -> int:
    """Rotations ``G`` of a quasi-uniform SO(3) grid with typical spacing ``spacing_rad``:
    ``G = 8 pi^2 / spacing^3`` (the Haar volume of SO(3) per grid point)."""
    if spacing_rad <= 0:
        raise ValueError(f"expected a positive spacing, got {spacing_rad}")
    return int(math.ceil(8 * math.pi**2 / spacing_rad**3))


@dataclass
class SamplingReport:
    """What the data and the detector allow (all lengths in A, ``q`` in 1/A, angles in degrees)."""

    diameter_A: float
    field_of_view_A: float
    oversampling: float
    q_max: float
    q_edge: float
    speckles_per_radius: float
    photons_per_pattern: float
    photons_per_pixel: float
    field_w0: float
    grid_spacing_deg: float
    grid_rotations: int
    undersampled: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        s = (f"particle diameter ~{self.diameter_A:.0f} A (from the data), field of view {self.field_of_view_A:.0f} A: "
             f"oversampling {self.oversampling:.2f}; {self.speckles_per_radius:.1f} speckles from the centre to the "
             f"detector edge; {self.photons_per_pattern:.0f} photons per pattern ({self.photons_per_pixel:.3g} "
             f"per pixel); suggested field w0 {self.field_w0:.0f}, orientation grid {self.grid_rotations} "
             f"rotations (~{self.grid_spacing_deg:.1f} deg)")
        if self.undersampled:
            s += ("\nWARNING: oversampling < 2: the detector does not resolve this particle's speckles (field of view "
                  "< 2 x particle size); move the detector back, use smaller pixels or a longer wavelength. A fit "
                  "of these data is not expected to converge to the right structure.")
        return s


def sampling_report(diameter_A: float, field_of_view_A: float, q_max: float, q_edge: float,
                    photons_per_pattern: float, n_good_pixels: int, grid_factor: float = 1.5,
                    min_rotations: int = 4096, max_rotations: int = 16384) -> SamplingReport:
    """Derived settings for a particle of ``diameter_A`` on a detector (see the module docstring).

    The orientation grid's spacing is ``grid_factor / (D q_edge)`` rad (about one and a half speckles at
    the edge of the inscribed ring of the detector; EMC's first iterations work at this spacing),
    clamped to ``[min_rotations, max_rotations]`` rotations; ``w0 = pi D q_max`` clamped to ``[10, 60]``.
    """
    if diameter_A <= 0 or field_of_view_A <= 0 or q_max <= 0 or q_edge <= 0:
        raise ValueError("expected positive diameter, field of view, q_max and q_edge")
    over = field_of_view_A / diameter_A
    spacing = grid_factor / (diameter_A * q_edge)
    g = min(max(grid_size_for_spacing(spacing), min_rotations), max_rotations)
    actual_spacing = (8 * math.pi**2 / g) ** (1 / 3)
    return SamplingReport(
        diameter_A=float(diameter_A), field_of_view_A=float(field_of_view_A), oversampling=float(over),
        q_max=float(q_max), q_edge=float(q_edge), speckles_per_radius=float(diameter_A * q_edge),
        photons_per_pattern=float(photons_per_pattern),
        photons_per_pixel=float(photons_per_pattern / max(n_good_pixels, 1)),
        field_w0=float(min(max(math.pi * diameter_A * q_max, 10.0), 60.0)),
        grid_spacing_deg=float(math.degrees(actual_spacing)), grid_rotations=int(g), undersampled=bool(over < 2.0),
    )


def estimate_sampling(dataset: Any, n_patterns: int = 2000, batch_size: int = 256) -> SamplingReport:
    """:class:`SamplingReport` of an :class:`~bayes_spi.dataio.h5.SPIDataset` from its first ``n_patterns``
    patterns (streamed), with the particle diameter estimated from their mean."""
    geom = dataset.geometry
    mask = np.asarray(dataset.mask, dtype=bool)
    total = np.zeros(mask.shape, dtype=np.float64)
    contrast = SpeckleContrast(mask) if getattr(geom, "kind", "grid") == "grid" else None
    n = 0
    for _, counts in dataset.iter_batches(batch_size, shuffle=False):
        take = min(len(counts), n_patterns - n)
        total += counts[:take].sum(axis=0)
        if contrast is not None:
            contrast.add(counts[:take])
        n += take
        if n >= n_patterns:
            break
    factor = geom.pixel_factor()
    qn = geom.q_magnitudes()[mask]
    mean = total[mask] / max(n, 1)
    # shells about one pixel wide (in q at the detector centre)
    n_shells = max(8, int(round(float(qn.max()) * geom.field_of_view_A)))
    qc, prof = radial_profile(qn, mean / factor[mask], n_shells)
    keep = prof > 0
    if keep.sum() < 4:
        raise ValueError(f"{getattr(dataset, 'path', 'data')}: too few photons in the first {n} patterns to "
                         "estimate the particle size (expected at least 4 non-empty |q| shells)")
    diameter = diameter_from_profile(qc[keep], prof[keep])
    if contrast is not None:  # a hidden central speckle: the speckle contrast instead (module docstring)
        lags, c = contrast.curve()
        fov = geom.field_of_view_A
        try:
            d_speckle = diameter_from_contrast(lags / fov, c, 0.5 * fov / max(mask.shape), fov)
        except ValueError:
            d_speckle = float("nan")
        if np.isfinite(d_speckle) and float(qn.min()) > HIDDEN_CENTRE * 1.43 / d_speckle:
            diameter = d_speckle
    q_edge = geom.q_inscribed
    return sampling_report(diameter, geom.field_of_view_A, geom.q_max, q_edge, float(mean.sum()), int(mask.sum()))
