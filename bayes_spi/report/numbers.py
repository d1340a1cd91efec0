r"""The numbers behind the report's figures, as small pure functions (numpy float64; tested on their own).

- Viewing directions: with the pose convention (pixel ``k`` samples ``I(R q_k)``) the beam axis ``e_z`` of the
  lab is the molecule-frame direction ``d = R @ e_z`` (the third column of ``R``), :func:`viewing_directions`;
  :func:`lon_lat` gives its longitude/latitude; it is unchanged by the ``Rz(pi)`` ambiguity
  (``R Rz(pi) e_z = R e_z``).
- :func:`hammer_xy`: the Hammer (Hammer-Aitoff) equal-area projection of the unit sphere, area scale 1
  (the image of the whole sphere is the ellipse ``x^2/8 + y^2/2 <= 1`` of area ``4 pi``).
- :func:`equal_area_histogram`: counts of directions in cells of equal solid angle (uniform in longitude and
  in ``sin(latitude)``), and the density relative to a uniform distribution (1 = uniform coverage).
- :func:`cone_radius_deg`: the angular radius of the credible cone of a LieNormal pose posterior
  ``R = R0 exp([eps])``, ``eps ~ N(0, diag sigma^2)``, approximated as isotropic with the rms sigma: the
  geodesic angle is then ``sigma chi_3`` and the ``p`` cone radius is ``sigma sqrt(chi2_3.ppf(p))``.
- :func:`geodesic_deg`, :func:`pose_errors`: per-pattern orientation errors after one global alignment
  ``G`` (``R_true ~= G R_est``), raw and modulo ``Rz(pi)``; :func:`histogram_counts` bins them.
- :func:`sample_aligned`: a truth volume sampled at ``G x`` (so it lines up with the reconstruction, for which
  ``I_est(x) = I_true(G x)``).
- :func:`resolution_crossing`: ``q`` where an FSC curve first drops below a threshold (linear interpolation).
- :func:`predicted_counts`: the trained model's expected photon counts of a pattern for a pose and a scale.

Example:
    >>> import numpy as np
    >>> d = viewing_directions(np.eye(3)[None])
    >>> lon, lat = lon_lat(d)
    >>> float(np.degrees(lat[0]))
    90.0
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage, stats

from bayes_spi.so3 import geodesic_angle_numpy, rotz_pi_numpy

__all__ = [
    "viewing_directions",
    "lon_lat",
    "hammer_xy",
    "equal_area_histogram",
    "cone_radius_deg",
    "geodesic_deg",
    "pose_errors",
    "histogram_counts",
    "sample_aligned",
    "resolution_crossing",
    "robust_limits",
    "predicted_counts",
]

_ROTZ_PI = rotz_pi_numpy()


def _rotmats(R: Any, name: str = "R") -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 3 or R.shape[1:] != (3, 3):
        raise ValueError(f"expected {name} of shape (N, 3, 3), got shape {R.shape}")
    return R


def viewing_directions(R: Any) -> np.ndarray:
    """Molecule-frame beam directions ``d_i = R_i @ e_z``: ``R (N, 3, 3)`` -> ``(N, 3)`` unit vectors.

    Example:
        >>> viewing_directions(np.eye(3)[None]).tolist()
        [[0.0, 0.0, 1.0]]
    """
    return _rotmats(R)[:, :, 2].copy()


def lon_lat(d: Any) -> tuple[np.ndarray, np.ndarray]:
    """Longitude ``atan2(y, x)`` in ``(-pi, pi]`` and latitude ``asin(z)`` in ``[-pi/2, pi/2]`` (radians)
    of directions ``d (N, 3)`` (normalised first).

    Example:
        >>> lon, lat = lon_lat(np.array([[0.0, 1.0, 0.0]]))
        >>> float(np.degrees(lon[0])), float(lat[0])
        (90.0, 0.0)
    """
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] != 3:
        raise ValueError(f"expected directions of shape (N, 3), got shape {d.shape}")
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    return np.arctan2(d[:, 1], d[:, 0]), np.arcsin(np.clip(d[:, 2], -1.0, 1.0))


def hammer_xy(lon: Any, lat: Any) -> tuple[np.ndarray, np.ndarray]:
    r"""Hammer equal-area projection of the unit sphere (radians in, any equal shapes):

    ``x = 2 sqrt(2) cos(lat) sin(lon/2) / w``, ``y = sqrt(2) sin(lat) / w``, ``w = sqrt(1 + cos(lat) cos(lon/2))``.
    Areas are preserved with factor 1: a region of solid angle ``Omega`` maps to a region of area ``Omega``.

    Example:
        >>> x, y = hammer_xy(np.pi, 0.0)
        >>> round(float(x), 6), round(float(y), 6)
        (2.828427, 0.0)
    """
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    w = np.sqrt(1.0 + np.cos(lat) * np.cos(lon / 2.0))
    return 2.0 * math.sqrt(2.0) * np.cos(lat) * np.sin(lon / 2.0) / w, math.sqrt(2.0) * np.sin(lat) / w


def equal_area_histogram(lon: Any, lat: Any, n_lon: int = 36, n_lat: int = 18
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts of directions in ``n_lat x n_lon`` cells of equal solid angle ``4 pi / (n_lat n_lon)``.

    Cells are uniform in longitude on ``[-pi, pi]`` and in ``sin(lat)`` on ``[-1, 1]``.

    Returns:
        ``counts (n_lat, n_lon)`` int, ``density (n_lat, n_lon)`` = counts / (expected count under a uniform
        distribution of the same total; 1 = uniform), ``lon_edges (n_lon + 1,)`` and ``lat_edges (n_lat + 1,)``
        in radians.

    Example:
        >>> c, dens, le, be = equal_area_histogram(np.zeros(4), np.full(4, 1.5), n_lon=4, n_lat=2)
        >>> c.tolist()
        [[0, 0, 0, 0], [0, 0, 4, 0]]
    """
    if n_lon < 1 or n_lat < 1:
        raise ValueError(f"expected n_lon, n_lat >= 1, got {n_lon}, {n_lat}")
    lon = np.asarray(lon, dtype=np.float64).ravel()
    lat = np.asarray(lat, dtype=np.float64).ravel()
    if lon.shape != lat.shape:
        raise ValueError(f"expected lon and lat of equal shape, got {lon.shape} and {lat.shape}")
    lon_edges = np.linspace(-np.pi, np.pi, n_lon + 1)
    sin_edges = np.linspace(-1.0, 1.0, n_lat + 1)
    i_lon = np.clip(np.floor((lon + np.pi) / (2 * np.pi) * n_lon).astype(np.int64), 0, n_lon - 1)
    i_lat = np.clip(np.floor((np.sin(lat) + 1.0) / 2.0 * n_lat).astype(np.int64), 0, n_lat - 1)
    counts = np.zeros((n_lat, n_lon), dtype=np.int64)
    np.add.at(counts, (i_lat, i_lon), 1)
    expected = max(lon.size, 1) / (n_lat * n_lon)
    return counts, counts / expected, lon_edges, np.arcsin(sin_edges)


def cone_radius_deg(sigma_rad: Any, level: float) -> np.ndarray:
    """Approximate ``level`` credible-cone radius (deg) of LieNormal poses with tangent sigmas ``(N, 3)`` rad.

    Isotropic approximation with the rms sigma ``s = sqrt(mean_j sigma_j^2)``: the geodesic angle to the centre
    is ``s chi_3``, so the radius is ``s sqrt(chi2_3.ppf(level))`` (exact for isotropic sigmas well below pi).

    Example:
        >>> round(float(cone_radius_deg(np.full((1, 3), np.radians(1.0)), 0.5)[0]), 4)
        1.5382
    """
    s = np.asarray(sigma_rad, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != 3:
        raise ValueError(f"expected sigma_rad of shape (N, 3), got shape {s.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"expected a level in (0, 1), got {level}")
    rms = np.sqrt(np.mean(s**2, axis=1))
    return np.degrees(rms * math.sqrt(stats.chi2.ppf(level, 3)))


def geodesic_deg(A: Any, B: Any) -> np.ndarray:
    """Geodesic angle between ``A_i`` and ``B_i`` ``(N, 3, 3)`` in degrees ``(N,)`` (stable near 0 and 180)."""
    A, B = _rotmats(A, "A"), _rotmats(B, "B")
    return np.degrees(geodesic_angle_numpy(A, B))


def pose_errors(R_est: Any, R_true: Any, max_align: int = 5000, seed: int = 0, symmetry: str | None = None
                ) -> dict[str, Any]:
    """Per-pattern orientation errors after the best global alignment (``R_true ~= G R_est``).

    ``G`` (raw) and ``G_mod_rotz_pi`` come from :func:`bayes_spi.metrics.orientation_error_summary` on at most
    ``max_align`` randomly chosen patterns (the alignment is the slow part); the errors are then computed for
    every pattern with those ``G``: raw ``angle(G R_est_i, R_true_i)`` and modulo ``Rz(pi)``
    ``min(angle(G' R_est_i, R_true_i), angle(G' R_est_i Rz(pi), R_true_i))``.

    Args:
        R_est, R_true: ``(N, 3, 3)`` rotations.
        max_align: patterns used to fit ``G``.
        seed: seed of the subset choice.
        symmetry: the fit's point group (:mod:`bayes_spi.symmetry`): every error is taken modulo it
            (``min_g angle(G R_est_i [Rz(pi)], g R_true_i)``).

    Returns:
        ``{"errors_deg" (N,), "errors_mod_rotz_pi_deg" (N,), "flipped" (N,) bool, "G" (3, 3),
        "G_mod_rotz_pi" (3, 3), "n_aligned" int}``.

    Example:
        >>> from scipy.spatial.transform import Rotation
        >>> R = Rotation.random(10, random_state=0).as_matrix()
        >>> float(pose_errors(R, R)["errors_deg"].max()) < 1e-5
        True
    """
    from bayes_spi.metrics import orientation_error_summary

    R_est, R_true = _rotmats(R_est, "R_est"), _rotmats(R_true, "R_true")
    if R_est.shape != R_true.shape:
        raise ValueError(f"expected R_true of shape {R_est.shape}, got shape {R_true.shape}")
    n = len(R_est)
    sub = np.arange(n)
    if n > max_align:
        sub = np.sort(np.random.default_rng(seed).choice(n, size=max_align, replace=False))
    from bayes_spi.symmetry import point_group

    group = point_group(symmetry)
    rots = None if group.is_trivial else group.rotations
    summ = orientation_error_summary(R_est[sub], R_true[sub], group=rots)
    G, G_mod = summ["G"], summ["G_mod_rotz_pi"]
    if rots is None:
        raw = geodesic_deg(G @ R_est, R_true)
        e0 = geodesic_deg(G_mod @ R_est, R_true)
        e1 = geodesic_deg(G_mod @ R_est @ _ROTZ_PI, R_true)
    else:  # modulo the group: min_g angle(G R_est, g R_true) = min_g angle(g^T G R_est, R_true)
        raw = group.pose_distance_deg(G @ R_est, R_true)[0]
        e0 = group.pose_distance_deg(G_mod @ R_est, R_true)[0]
        e1 = group.pose_distance_deg(G_mod @ R_est @ _ROTZ_PI, R_true)[0]
    flipped = e1 < e0
    return {"errors_deg": raw, "errors_mod_rotz_pi_deg": np.where(flipped, e1, e0), "flipped": flipped,
            "G": G, "G_mod_rotz_pi": G_mod, "n_aligned": int(len(sub))}


def histogram_counts(values: Any, bins: Any) -> np.ndarray:
    """Counts of finite ``values`` in ``bins`` (edges, as ``np.histogram``; the last bin is closed).

    Example:
        >>> histogram_counts([1.0, 2.5, 9.0, np.nan], [0, 2, 4, 10]).tolist()
        [1, 1, 1]
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    return np.histogram(v[np.isfinite(v)], bins=np.asarray(bins, dtype=np.float64))[0]


def sample_aligned(volume: Any, voxel: float, G: Any, points: Any, order: int = 1) -> np.ndarray:
    """``volume(G @ x)`` at ``points x (..., 3)`` (1/A): a centred cube ``(n, n, n)`` indexed ``[ix, iy, iz]``
    with voxel ``i`` at ``(i - n//2) * voxel``, interpolated (``order`` 1: trilinear); NaN outside the cube.

    With ``I_est(x) = I_true(G x)`` this puts the truth on the reconstruction's coordinates.

    Example:
        >>> v = np.zeros((3, 3, 3)); v[2, 1, 1] = 1.0
        >>> float(sample_aligned(v, 0.1, np.eye(3), np.array([[0.1, 0.0, 0.0]]))[0])
        1.0
    """
    vol = np.asarray(volume, dtype=np.float64)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"expected a cubic volume (n, n, n), got shape {vol.shape}")
    if not voxel > 0:
        raise ValueError(f"expected a positive voxel size, got {voxel}")
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape[-1] != 3:
        raise ValueError(f"expected points of shape (..., 3), got shape {pts.shape}")
    G = np.asarray(G, dtype=np.float64)
    c = vol.shape[0] // 2
    idx = (pts.reshape(-1, 3) @ G.T) / voxel + c
    out = ndimage.map_coordinates(vol, idx.T, order=order, mode="constant", cval=np.nan)
    inside = np.all((idx >= -1e-9) & (idx <= vol.shape[0] - 1 + 1e-9), axis=1)
    out[~inside] = np.nan
    return out.reshape(pts.shape[:-1])


def resolution_crossing(q: Any, fsc: Any, threshold: float) -> float | None:
    """First ``q`` (same units as ``q``) where ``fsc`` drops below ``threshold``, linearly interpolated
    between shells; ``None`` if it never does (non-finite values are skipped).

    Example:
        >>> round(resolution_crossing([0.0, 0.1, 0.2], [1.0, 0.6, 0.4], 0.5), 6)
        0.15
    """
    q = np.asarray(q, dtype=np.float64).ravel()
    f = np.asarray(fsc, dtype=np.float64).ravel()
    if q.shape != f.shape:
        raise ValueError(f"expected q and fsc of equal length, got {q.size} and {f.size}")
    ok = np.isfinite(q) & np.isfinite(f)
    q, f = q[ok], f[ok]
    below = np.nonzero(f < threshold)[0]
    if below.size == 0:
        return None
    j = int(below[0])
    if j == 0:
        return float(q[0])
    f0, f1 = f[j - 1], f[j]
    t = (f0 - threshold) / (f0 - f1)
    return float(q[j - 1] + t * (q[j] - q[j - 1]))


def robust_limits(values: Any, lo: float = 1.0, hi: float = 99.9) -> tuple[float, float]:
    """Percentile colour limits of the finite ``values`` (``(0, 1)`` when there are none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    a, b = np.percentile(v, [lo, hi])
    if not b > a:
        b = a + 1.0
    return float(a), float(b)


def predicted_counts(model: Any, R: Any, scale: Any, shape: tuple[int, int]) -> np.ndarray:
    """Expected photon counts of the trained model at every pixel, ``(B, n_y, n_x)`` float64.

    ``exp(model.log_rate(R, log s, all pixels)) + background``, i.e. ``s * Omega_k * P_k * I(R q_k) + b``
    (``b`` the likelihood's background, 0 by default), plus a measured background map ``b B_k`` at its fitted
    (global, or per-pattern geometric-mean) scale if the model has one. Masked pixels are included (the caller greys them out).

    Args:
        model: a :class:`bayes_spi.models.spi.SPIModel` (e.g. ``load_trained(run).model``).
        R: poses ``(B, 3, 3)``.
        scale: fluence scales ``(B,)`` (e.g. the posterior mean).
        shape: the detector shape ``(n_y, n_x)``.

    Example::

        lam = predicted_counts(trained.model, R[:4], scale_mean[:4], trained.geometry.shape)
    """
    import torch

    R = _rotmats(R)
    s = np.asarray(scale, dtype=np.float64).ravel()
    if s.shape != (len(R),) or np.any(~(s > 0)):
        raise ValueError(f"expected {len(R)} positive scales, got shape {s.shape}")
    n_pix = int(shape[0]) * int(shape[1])
    if model.q.shape[0] != n_pix:
        raise ValueError(f"expected a detector of {n_pix} pixels {tuple(shape)}, the model has {model.q.shape[0]}")
    dev = model.q.device
    with torch.no_grad():
        log_rate = model.log_rate(torch.as_tensor(R, dtype=torch.float32, device=dev),
                                  torch.as_tensor(np.log(s), dtype=torch.float32, device=dev),
                                  torch.arange(n_pix, device=dev))
    lam = log_rate.double().exp().cpu().numpy()
    lam = lam + float(getattr(model.likelihood, "background", 0.0))
    if getattr(model, "background", None) is not None:  # a measured background map, at its fitted scale
        with torch.no_grad():
            lam = lam + model.background_rate(torch.arange(n_pix, device=dev)).double().cpu().numpy()[None]
    return lam.reshape(len(R), int(shape[0]), int(shape[1]))
