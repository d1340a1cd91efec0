r"""Evaluation metrics against known truth: orientations, fluences, intensities.

All functions take numpy arrays or torch tensors (converted with ``.detach().cpu()``) and compute
in **numpy float64**; they return numpy arrays / Python floats.

Pose convention
---------------
Pattern ``i``'s pixel ``k`` samples the molecule-frame intensity at ``R_i @ q_k`` (rotations act on
column vectors). If the reconstruction equals the truth rotated, ``I_est(x) = I_true(G x)``, then
``I_est(R_est_i q) = I_true(R_true_i q)`` for ``R_est_i = G^T R_true_i``: one global **left** factor,
i.e. ``R_true_i = G @ R_est_i``. :func:`align_rotations` returns this ``G`` (orthogonal Procrustes on
``sum_i R_est_i R_true_i^T``).

A mirror (inversion) of the molecule changes its diffraction intensity only by a rotation (Friedel's
law, ``I(-q) = I(q)``), so poses need only SO(3) alignment, never an improper one. A genuine
per-image two-fold ambiguity remains: the patterns at ``R`` and at ``R @ Rz(pi)`` (180 degrees about
the beam axis ``z``) differ only through the Ewald-sphere curvature; errors can be reported modulo it
(``modulo_rotz_pi=True``), together with how often the flipped mode was chosen.

Example:
    >>> import numpy as np
    >>> from scipy.spatial.transform import Rotation
    >>> R_true = Rotation.random(50, random_state=0).as_matrix()
    >>> G = Rotation.from_rotvec([0.3, 0.0, 0.0]).as_matrix()
    >>> R_est = G.T @ R_true
    >>> G_hat, err, flipped = align_rotations(R_est, R_true)
    >>> bool(np.allclose(G_hat, G, atol=1e-8)), float(err.max()) < 1e-5
    (True, True)
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import numpy as np
from scipy import stats

from bayes_spi.so3 import geodesic_angle_numpy, rotz_pi_numpy

__all__ = [
    "align_rotations",
    "errors_after_alignment",
    "orientation_error_summary",
    "fluence_correlation",
    "intensity_correlation",
]

_ROTZ_PI = rotz_pi_numpy()


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _check_rotmats(R: np.ndarray, name: str) -> None:
    if R.ndim != 3 or R.shape[1:] != (3, 3):
        raise ValueError(f"expected {name} of shape (N, 3, 3), got shape {R.shape}")


def _angles_deg(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Geodesic angle between A_i and B_i in degrees, (N,), stable near 0 and 180."""
    return np.degrees(geodesic_angle_numpy(A, B))


def _procrustes(R_est: np.ndarray, R_true: np.ndarray) -> np.ndarray:
    """G in SO(3) maximising sum_i tr(R_true_i^T G R_est_i), i.e. tr(G M), M = sum R_est R_true^T."""
    M = np.einsum("nij,nkj->ik", R_est, R_true)
    U, _, Vt = np.linalg.svd(M)
    V = Vt.T
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(V @ U.T)) or 1.0])
    return V @ D @ U.T


def _errors(G: np.ndarray, est: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image the smallest geodesic angle (deg) between ``G @ est[i, e]`` and ``true[i, t]`` over ``(e, t)``,
    and those ``e`` and ``t`` (the first on ties). ``est (N, E, 3, 3)``, ``true (N, T, 3, 3)``."""
    tr = np.einsum("ntik,neik->net", true, np.einsum("ij,nejk->neik", G, est))  # tr(true^T G est)
    flat = tr.reshape(len(tr), -1).argmax(-1)
    e, t = np.divmod(flat, true.shape[1])
    rows = np.arange(len(tr))
    return _angles_deg(G @ est[rows, e], true[rows, t]), e, t


def errors_after_alignment(G: Any, R_est: Any, R_true: Any, modulo_rotz_pi: bool = False,
                           group: Any = None) -> tuple[np.ndarray, np.ndarray]:
    r"""Per-image errors for a given global rotation ``G`` (as :func:`align_rotations` computes them for its ``G``).

    Each image is independent, so the patterns may be taken in chunks: the errors of a chunk equal those of the
    same rows computed all at once (what :func:`bayes_spi.infer.evaluate.evaluate_run_full` streams).

    Args:
        G: ``(3, 3)`` global rotation (``R_true_i ~= G @ R_est_i``).
        R_est, R_true: ``(B, 3, 3)`` rotations.
        modulo_rotz_pi: image ``i`` may be matched by ``R_est_i @ Rz(pi)``.
        group: ``(K, 3, 3)`` point-group rotations (see :func:`align_rotations`) or ``None``.

    Returns:
        ``errors_deg`` ``(B,)`` and ``flipped`` ``(B,)`` bool (whether ``Rz(pi)`` gave the smaller error).

    Example:
        >>> from scipy.spatial.transform import Rotation
        >>> R = Rotation.random(5, random_state=0).as_matrix()
        >>> err, flipped = errors_after_alignment(np.eye(3), R, R)
        >>> float(err.max()) < 1e-5, bool(flipped.any())
        (True, False)
    """
    G = _to_numpy(G)
    R_est = _to_numpy(R_est)
    R_true = _to_numpy(R_true)
    _check_rotmats(R_est, "R_est")
    if R_true.shape != R_est.shape or G.shape != (3, 3):
        raise ValueError(f"expected G (3, 3) and R_true of shape {R_est.shape}, got {G.shape} and {R_true.shape}")
    est = np.stack([R_est, R_est @ _ROTZ_PI], axis=1) if modulo_rotz_pi else R_est[:, None]
    if group is not None:
        group = _to_numpy(group)
        _check_rotmats(group, "group")
    true = R_true[:, None] if group is None else np.einsum("gij,njk->ngik", group, R_true)
    err, e, _ = _errors(G, est, true)
    return err, e == 1


def align_rotations(
    R_est: Any,
    R_true: Any,
    modulo_rotz_pi: bool = False,
    n_starts: int = 8,
    max_iter: int = 30,
    seed: int = 0,
    group: Any = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Best global left rotation ``G`` with ``R_true_i ~= G @ R_est_i`` (optionally ``@ Rz(pi)``, and modulo a
    point group: ``g_i @ R_true_i ~= G @ R_est_i`` with a per-image ``g_i`` of ``group``).

    Robust: starting from several candidate ``G`` (the full-set Procrustes solution and, for
    ``n_starts`` single images ``j``, ``R_true_j R_est_j^T`` and with ``modulo_rotz_pi`` also
    ``R_true_j (R_est_j Rz(pi))^T``), it alternates (i) per-image flip choice (when
    ``modulo_rotz_pi``), (ii) inlier selection ``error <= 2 * median`` and (iii) Procrustes on the
    inliers, until the inliers stop changing; the candidate with the smallest median error wins.

    Args:
        R_est: estimated rotations, shape ``(N, 3, 3)``.
        R_true: true rotations, shape ``(N, 3, 3)``.
        modulo_rotz_pi: if True, image ``i`` may be matched by ``R_est_i @ Rz(pi)`` instead, chosen
            jointly with ``G``.
        group: ``(K, 3, 3)`` rotations of the particle's point group in the truth's frame (identity first; e.g.
            :attr:`bayes_spi.symmetry.PointGroup.rotations` for a particle simulated in the standard orientation),
            or ``None``. A true pose is then defined only modulo ``R ~ g R`` and the errors are
            ``min_g angle(G R_est_i [Rz(pi)], g R_true_i)`` (composed with the ``Rz(pi)`` twin). This also holds
            for a fit with the same ``--symmetry`` (its poses are defined modulo the same group, and ``G``
            normalises it) and for a fit without it (its field then has the group in some rotated frame).
        n_starts: number of single-image seeds for the candidate ``G``.
        max_iter: maximum alternations per candidate.
        seed: seed for picking the single-image seeds.

    Returns:
        ``G`` ``(3, 3)``; ``errors_deg`` ``(N,)``, the geodesic angle between ``G R_est_i [Rz(pi)]``
        and ``R_true_i`` in degrees; ``flipped`` ``(N,)`` bool, whether ``Rz(pi)`` was applied
        (all False unless ``modulo_rotz_pi``).

    Example:
        >>> import numpy as np
        >>> from scipy.spatial.transform import Rotation
        >>> R = Rotation.random(20, random_state=1).as_matrix()
        >>> G, err, flipped = align_rotations(R @ np.diag([-1.0, -1.0, 1.0]), R, modulo_rotz_pi=True)
        >>> float(err.max()) < 1e-5, bool(flipped.all())
        (True, True)
    """
    R_est = _to_numpy(R_est)
    R_true = _to_numpy(R_true)
    _check_rotmats(R_est, "R_est")
    _check_rotmats(R_true, "R_true")
    if R_est.shape != R_true.shape:
        raise ValueError(f"expected R_true of shape {R_est.shape}, got shape {R_true.shape}")
    n = R_est.shape[0]
    if n == 0:
        raise ValueError("expected at least one rotation, got shape (0, 3, 3)")
    R_flip = R_est @ _ROTZ_PI if modulo_rotz_pi else None
    if group is not None:
        group = _to_numpy(group)
        _check_rotmats(group, "group")
    est = np.stack([R_est, R_flip], axis=1) if modulo_rotz_pi else R_est[:, None]
    true = R_true[:, None] if group is None else np.einsum("gij,njk->ngik", group, R_true)
    rows = np.arange(n)

    rng = np.random.default_rng(seed)
    seeds = rng.choice(n, size=min(n_starts, n), replace=False)
    candidates = [_procrustes(R_est, R_true)]
    for j in seeds:
        candidates.append(R_true[j] @ R_est[j].T)
        if modulo_rotz_pi:
            candidates.append(R_true[j] @ R_flip[j].T)

    best: tuple[float, np.ndarray, np.ndarray, np.ndarray] = (np.inf, candidates[0], np.empty(0), np.empty(0))
    for G in candidates:
        inliers = None
        for _ in range(max_iter):
            err, e, t = _errors(G, est, true)
            new_inliers = err <= 2.0 * np.median(err)
            if inliers is not None and np.array_equal(new_inliers, inliers):
                break
            inliers = new_inliers
            G = _procrustes(est[rows, e][inliers], true[rows, t][inliers])
        err, e, t = _errors(G, est, true)
        score = float(np.median(err))
        if score < best[0] or best[2].size == 0:
            best = (score, G, err, e == 1)
    return best[1], best[2], best[3]


def orientation_error_summary(R_est: Any, R_true: Any, **align_kwargs: Any) -> dict[str, Any]:
    r"""Orientation errors after the best global alignment, raw and modulo ``Rz(pi)``.

    Args:
        R_est: estimated rotations, shape ``(N, 3, 3)``.
        R_true: true rotations, shape ``(N, 3, 3)``.
        **align_kwargs: passed to :func:`align_rotations` (``n_starts``, ``max_iter``, ``seed``, ``group``: with a
            point group every error, "raw" included, is taken modulo it).

    Returns:
        A dict with ``median_error_deg``, ``mean_error_deg`` (raw SO(3) alignment),
        ``median_error_mod_rotz_pi_deg``, ``mean_error_mod_rotz_pi_deg`` (each image may use its
        ``Rz(pi)`` twin), ``wrong_mode_fraction`` (fraction of images where the twin was closer,
        outliers included), floats; and arrays ``errors_deg`` ``(N,)``, ``errors_mod_rotz_pi_deg``
        ``(N,)``, ``flipped`` ``(N,)`` bool, ``G`` ``(3, 3)``, ``G_mod_rotz_pi`` ``(3, 3)``.

    Example:
        >>> from scipy.spatial.transform import Rotation
        >>> R = Rotation.random(30, random_state=2).as_matrix()
        >>> s = orientation_error_summary(R, R)
        >>> s["median_error_deg"] < 1e-5, s["wrong_mode_fraction"]
        (True, 0.0)
    """
    G, err, _ = align_rotations(R_est, R_true, modulo_rotz_pi=False, **align_kwargs)
    G_mod, err_mod, flipped = align_rotations(R_est, R_true, modulo_rotz_pi=True, **align_kwargs)
    return {
        "median_error_deg": float(np.median(err)),
        "mean_error_deg": float(np.mean(err)),
        "median_error_mod_rotz_pi_deg": float(np.median(err_mod)),
        "mean_error_mod_rotz_pi_deg": float(np.mean(err_mod)),
        "wrong_mode_fraction": float(np.mean(flipped)),
        "errors_deg": err,
        "errors_mod_rotz_pi_deg": err_mod,
        "flipped": flipped,
        "G": G,
        "G_mod_rotz_pi": G_mod,
    }


def fluence_correlation(s_est: Any, s_true: Any, method: Literal["pearson", "spearman"] = "pearson") -> float:
    r"""Correlation of per-image fluence scales (defined up to one global factor).

    Args:
        s_est: estimated scales, shape ``(N,)``.
        s_true: true scales, shape ``(N,)``.
        method: ``"pearson"`` (default; invariant to the global factor) or ``"spearman"`` (ranks).

    Returns:
        The correlation coefficient.

    Example:
        >>> round(fluence_correlation([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]), 6)
        1.0
    """
    a = _to_numpy(s_est).ravel()
    b = _to_numpy(s_true).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"expected two arrays of equal shape (N,), N >= 2, got shapes {a.shape} and {b.shape}")
    if method == "pearson":
        return float(stats.pearsonr(a, b)[0])
    if method == "spearman":
        return float(stats.spearmanr(a, b)[0])
    raise ValueError(f"expected method 'pearson' or 'spearman', got {method!r}")


_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda x: x,
    "sqrt": lambda x: np.sqrt(np.clip(x, 0.0, None)),
    "log1p": lambda x: np.log1p(np.clip(x, 0.0, None)),
    "log": lambda x: np.log(np.clip(x, np.finfo(np.float64).tiny, None)),
}


def intensity_correlation(
    I_est: Any,
    I_true: Any,
    mask: Any | None = None,
    transform: Literal["none", "sqrt", "log1p", "log"] | Callable[[np.ndarray], np.ndarray] = "none",
) -> float:
    r"""Pearson correlation of two intensity volumes on the same grid.

    Args:
        I_est: estimated volume, any shape, e.g. ``(D, D, D)``.
        I_true: true volume, same shape.
        mask: optional boolean array, same shape; only ``True`` voxels are used.
        transform: applied to both volumes first: ``"none"``, ``"sqrt"`` (amplitudes), ``"log1p"``,
            ``"log"`` (values clipped at the smallest positive float), or a callable.

    Returns:
        The Pearson correlation coefficient.

    Example:
        >>> import numpy as np
        >>> I = np.random.default_rng(0).random((4, 4, 4))
        >>> round(intensity_correlation(3 * I, I, transform="none"), 6)
        1.0
    """
    a = _to_numpy(I_est)
    b = _to_numpy(I_true)
    if a.shape != b.shape:
        raise ValueError(f"expected I_true of shape {a.shape}, got shape {b.shape}")
    if mask is not None:
        m = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask, dtype=bool)
        if m.shape != a.shape:
            raise ValueError(f"expected mask of shape {a.shape}, got shape {m.shape}")
        a, b = a[m], b[m]
    f = _TRANSFORMS.get(transform) if isinstance(transform, str) else transform
    if f is None:
        raise ValueError(f"expected transform in {sorted(_TRANSFORMS)} or a callable, got {transform!r}")
    a, b = f(a).ravel(), f(b).ravel()
    if a.size < 2:
        raise ValueError(f"expected at least 2 voxels, got {a.size}")
    return float(stats.pearsonr(a, b)[0])
