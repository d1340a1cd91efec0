r"""Proper point groups ``C1, Cn, Dn, T, O, I``: rotation sets, pose fundamental zones, and the ``q``-space fold.

Standard orientations (all rotations act on column vectors, as everywhere in the package):

- ``Cn``: the ``n``-fold axis along ``z``.
- ``Dn``: the ``n``-fold axis along ``z``, a 2-fold axis along ``x`` (the others in the ``xy`` plane at
  multiples of ``pi / n`` from ``x``).
- ``T`` (12): 2-fold axes along ``x``, ``y``, ``z``; 3-fold axes along ``(+-1, +-1, +-1)``.
- ``O`` (24): 4-fold axes along ``x``, ``y``, ``z``; 3-fold axes along ``(+-1, +-1, +-1)``; 2-fold axes along
  ``(1, +-1, 0)`` and its permutations.
- ``I`` (60): 2-fold axes along ``x``, ``y``, ``z`` (the common "222" setting of cryo-EM and crystallography);
  5-fold axes along ``(0, +-1, +-phi)`` and its cyclic permutations (``phi`` the golden ratio: the 5-fold
  axis nearest ``z`` lies in the ``yz`` plane, ``atan(1 / phi) = 31.7`` degrees from ``z``); 3-fold axes along
  ``(+-1, +-1, +-1)`` and ``(0, +-1/phi, +-phi)`` with its cyclic permutations. This is RELION's/Heymann's
  ``I2`` setting rotated 90 degrees about ``z`` (``I1`` has the 5-fold axes in the ``yz`` plane: this one).

**Intensity symmetry.** A molecule with point group ``G`` has ``I(g q) = I(q)`` for ``g`` in ``G``, and
Friedel's law adds ``-1``: the intensity is invariant under the Laue group ``L = G x {1, -1}``. Its mirror
planes are perpendicular to ``G``'s 2-fold axes (``-g`` for a 2-fold ``g`` is that mirror); they generate a
reflection group ``W`` (``I``: all of ``L``, the Coxeter group ``H3``; ``O``: ``B3``; ``Dn`` with ``n``
even: ``I2(n) x A1``). :class:`QFold` maps ``q`` into ``W``'s closed fundamental chamber by successive
reflections (continuous, piecewise linear: a field evaluated on the folded ``q`` is continuous, with a kink
across the mirrors unless its normal derivative vanishes there, as a symmetric intensity's does) and
returns it for each right-coset representative ``c`` of ``W`` in ``L`` (one for ``I``, ``O``, even ``Dn``; 3
for ``T``; 2 for odd ``Dn``; ``n`` for ``Cn``): a field averaged over those images is exactly ``L``-invariant,
continuous, and costs ``[L : W]`` evaluations.

**Pose symmetry.** Pixel ``q_k`` of a pattern with pose ``R`` samples ``I(R q_k) = I(g R q_k)``: poses are
defined modulo left multiplication, ``R ~ g R``. The pose fundamental zone is the set of ``R`` that are
the smallest rotation of their coset ``{g R}`` (the Voronoi cell of the identity among ``G``'s quaternions,
the usual crystallographic zone); :meth:`PointGroup.canonical_pose` maps any ``R`` to it.

Example:
    >>> g = point_group("I")
    >>> g.order, g.axis_counts()
    (60, {2: 15, 3: 10, 5: 6})
    >>> point_group("D3").axis_counts()
    {2: 3, 3: 1}
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["SYMMETRY_NAMES", "PointGroup", "QFold", "point_group", "parse_symmetry", "axis_angle_matrix"]

#: the accepted spellings (``n`` a positive integer)
SYMMETRY_NAMES = "C1, Cn, Dn (n >= 2), T, O or I"

_PHI = (1.0 + math.sqrt(5.0)) / 2.0


def axis_angle_matrix(axis: np.ndarray | list[float], angle: float) -> np.ndarray:
    """Rotation matrix ``(3, 3)`` by ``angle`` (rad) about ``axis`` (normalised here), Rodrigues' formula."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * (K @ K)


def _close(generators: list[np.ndarray], max_order: int = 200) -> np.ndarray:
    """All products of the generators (a finite matrix group), ``(K, 3, 3)``, identity first."""
    elems = [np.eye(3)]
    keys = {tuple(np.round(np.eye(3), 6).ravel().tolist())}
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for a in frontier:
            for g in generators:
                m = g @ a
                k = tuple((np.round(m, 6) + 0.0).ravel().tolist())
                if k not in keys:
                    keys.add(k)
                    elems.append(m)
                    new.append(m)
        frontier = new
        if len(elems) > max_order:
            raise ValueError(f"generators do not close into a finite group of order <= {max_order}")
    return np.stack(elems)


def _rot_angle(R: np.ndarray) -> np.ndarray:
    """Rotation angles ``(...)`` in rad of ``R (..., 3, 3)``."""
    return np.arccos(np.clip((np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0))


def _rot_axis(R: np.ndarray) -> np.ndarray:
    """Unit axis ``(3,)`` of a non-identity rotation (sign arbitrary for 180 degrees)."""
    w, v = np.linalg.eig(R)
    k = int(np.argmin(np.abs(w - 1.0)))
    a = np.real(v[:, k])
    return a / np.linalg.norm(a)


def _rotmat_to_quat(R: np.ndarray) -> np.ndarray:
    """Scalar-first unit quaternions ``(..., 4)`` of ``R (..., 3, 3)`` (numpy, ``w >= 0``)."""
    from scipy.spatial.transform import Rotation

    shape = R.shape[:-2]
    xyzw = Rotation.from_matrix(R.reshape(-1, 3, 3)).as_quat()
    q = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    q = np.where(q[:, :1] < 0, -q, q)
    return q.reshape(*shape, 4)


class PointGroup:
    """A proper point group in its standard orientation (module docstring).

    Attributes:
        name: ``"C1"``, ``"C4"``, ``"D2"``, ``"T"``, ``"O"``, ``"I"``.
        rotations: ``(K, 3, 3)`` float64, identity first.
        quaternions: ``(K, 4)`` float64 scalar-first, ``w >= 0``.
    """

    def __init__(self, name: str, rotations: np.ndarray) -> None:
        self.name = name
        self.rotations = np.ascontiguousarray(rotations, dtype=np.float64)
        self.quaternions = _rotmat_to_quat(self.rotations)

    def __repr__(self) -> str:
        return f"PointGroup({self.name!r}, order={self.order})"

    @property
    def order(self) -> int:
        """``|G|``."""
        return int(self.rotations.shape[0])

    @property
    def is_trivial(self) -> bool:
        return self.order == 1

    def axes(self) -> list[tuple[np.ndarray, int]]:
        """Rotation axes ``[(unit axis (3,), order)]``, one entry per axis line (``a`` and ``-a`` once)."""
        out: list[tuple[np.ndarray, int]] = []
        counts: list[int] = []
        for R in self.rotations[1:]:
            a = _rot_axis(R)
            for i, (b, _) in enumerate(out):
                if abs(abs(float(a @ b)) - 1.0) < 1e-6:
                    counts[i] += 1
                    break
            else:
                out.append((a, 0))
                counts.append(1)
        return [(a, c + 1) for (a, _), c in zip(out, counts)]

    def axis_counts(self) -> dict[int, int]:
        """``{axis order: number of axes}``, e.g. ``{2: 15, 3: 10, 5: 6}`` for ``I``."""
        out: dict[int, int] = {}
        for _, n in self.axes():
            out[n] = out.get(n, 0) + 1
        return dict(sorted(out.items()))

    # ------------------------------------------------------------------ poses modulo the group
    def pose_overlaps(self, R: np.ndarray) -> np.ndarray:
        """``|cos(angle(g R) / 2)|`` for every ``g``: ``R (..., 3, 3)`` -> ``(..., K)``."""
        qR = _rotmat_to_quat(np.asarray(R, dtype=np.float64))
        # w of q_g * q_R = w_g w_R - v_g . v_R = <conj(q_g), q_R>
        qc = self.quaternions * np.array([1.0, -1.0, -1.0, -1.0])
        return np.abs(qR @ qc.T)

    def canonical_pose(self, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The representative of ``R``'s coset ``{g R}`` in the fundamental zone (its smallest rotation).

        ``R (..., 3, 3)`` -> ``(g R (..., 3, 3), index of g (...))``.
        """
        R = np.asarray(R, dtype=np.float64)
        idx = self.pose_overlaps(R).argmax(-1)
        return np.einsum("...ij,...jk->...ik", self.rotations[idx], R), idx

    def in_fundamental_zone(self, R: np.ndarray, tol: float = 1e-9) -> np.ndarray:
        """Whether ``R (..., 3, 3)`` is the smallest rotation of its coset ``{g R}`` (bool ``(...)``).

        The zones of ``R``'s coset partition SO(3): exactly one ``g R`` is inside (up to the measure-zero
        boundary, where ``tol`` admits all tied ones)."""
        ov = self.pose_overlaps(R)
        return ov[..., 0] >= ov.max(-1) - tol

    def pose_distance_deg(self, A: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Geodesic angle (deg) between ``A`` and ``B`` modulo the group: ``min_g angle(g A, B)``.

        ``A, B (..., 3, 3)`` (broadcast) -> ``(angles (...), index of the best g (...))``."""
        A, B = np.broadcast_arrays(np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64))
        # trace(B^T g A) for every g
        tr = np.einsum("...ji,gjk,...ki->...g", B, self.rotations, A)
        idx = tr.argmax(-1)
        c = np.clip((np.take_along_axis(tr, idx[..., None], -1)[..., 0] - 1.0) / 2.0, -1.0, 1.0)
        return np.degrees(np.arccos(c)), idx

    def fundamental_zone_grid(self, n_full: int, seed: int = 12345) -> np.ndarray:
        """The rotations of a quasi-uniform grid of ``n_full`` on SO(3) (a Super-Fibonacci spiral, rotated as a
        whole by ``seed``) that lie in the fundamental zone: about ``n_full / |G|`` rotations ``(M, 3, 3)`` with
        the spacing of the full grid (float64)."""
        from bayes_spi.so3 import random_rotmat, super_fibonacci_rotmat

        gen = torch.Generator().manual_seed(seed)
        full = (random_rotmat(1, generator=gen, dtype=torch.float64)[0]
                @ super_fibonacci_rotmat(n_full, dtype=torch.float64)).numpy()
        if self.is_trivial:
            return full
        step = max(1, 2_000_000 // self.order)  # bounded memory for the (chunk, |G|) overlaps
        keep = np.concatenate([self.in_fundamental_zone(full[i:i + step], tol=0.0) for i in range(0, n_full, step)])
        return full[keep]

    # ------------------------------------------------------------------ the Laue group acting on q
    def laue(self) -> np.ndarray:
        """``G x {1, -1}``: ``(2K, 3, 3)`` (proper elements first)."""
        return np.concatenate([self.rotations, -self.rotations])

    def mirror_normals(self) -> np.ndarray:
        """Unit normals ``(m, 3)`` of the Laue group's mirror planes (``G``'s 2-fold axes), oriented so that
        :data:`_CHAMBER_POINT` is on their positive side."""
        normals = [a for R in self.rotations[1:] if abs(_rot_angle(R) - math.pi) < 1e-6 for a in [_rot_axis(R)]]
        out = []
        for a in normals:
            if not any(abs(abs(float(a @ b)) - 1.0) < 1e-6 for b in out):
                out.append(a if a @ _CHAMBER_POINT > 0 else -a)
        return np.array(out).reshape(-1, 3)

    def reflection_group(self) -> np.ndarray:
        """``W``: the group generated by the Laue group's mirrors, ``(|W|, 3, 3)``."""
        n = self.mirror_normals()
        if len(n) == 0:
            return np.eye(3)[None]
        return _close([np.eye(3) - 2.0 * np.outer(a, a) for a in n])

    def fold_cosets(self) -> np.ndarray:
        """The matrices ``c`` whose folded images :class:`QFold` averages over, ``(C, 3, 3)``.

        Right-coset representatives of ``W`` in ``L`` (``L = U W c``); when ``W`` is trivial (odd ``Cn``,
        ``C1``) the rotations of ``G`` alone (the fields are already even in ``q``)."""
        W = self.reflection_group()
        if W.shape[0] == 1:
            return self.rotations.copy()
        L = self.laue()
        reps: list[np.ndarray] = []
        covered: list[np.ndarray] = []
        for c in L:
            if any(np.abs(c - x).max() < 1e-6 for x in covered):
                continue
            reps.append(c)
            covered.extend(list(W @ c))
        return np.stack(reps)


#: a generic direction (on no mirror of any supported group): it fixes the fundamental chamber
_CHAMBER_POINT = np.array([0.123, 0.257, 0.958]) / np.linalg.norm([0.123, 0.257, 0.958])

_NAME = re.compile(r"^\s*([CcDd])\s*(\d+)\s*$|^\s*([TtOoIi])\s*$")


def parse_symmetry(name: str | None) -> str:
    """The canonical spelling of a symmetry name (``"c1"`` -> ``"C1"``, ``None``/``""`` -> ``"C1"``).

    Raises:
        ValueError: not one of :data:`SYMMETRY_NAMES`.
    """
    if name is None or (isinstance(name, str) and not name.strip()):
        return "C1"
    if not isinstance(name, str):
        raise ValueError(f"symmetry: expected {SYMMETRY_NAMES}, got {name!r}")
    m = _NAME.match(name)
    if not m:
        raise ValueError(f"symmetry: expected {SYMMETRY_NAMES}, got {name!r}")
    if m.group(3):
        return m.group(3).upper()
    kind, n = m.group(1).upper(), int(m.group(2))
    if n < 1 or (kind == "D" and n < 2) or n > 100:
        raise ValueError(f"symmetry: expected {SYMMETRY_NAMES} with n <= 100, got {name!r}")
    return f"{kind}{n}"


@lru_cache(maxsize=32)
def point_group(name: str | None) -> PointGroup:
    """The :class:`PointGroup` named ``name`` (see :func:`parse_symmetry`), in its standard orientation."""
    key = parse_symmetry(name)
    rz = lambda a: axis_angle_matrix([0, 0, 1], a)  # noqa: E731
    if key[0] == "C":
        n = int(key[1:])
        rots = np.stack([rz(2 * math.pi * k / n) for k in range(n)])
    elif key[0] == "D":
        n = int(key[1:])
        rots = _close([rz(2 * math.pi / n), axis_angle_matrix([1, 0, 0], math.pi)])
    elif key == "T":
        rots = _close([rz(math.pi), axis_angle_matrix([1, 0, 0], math.pi), axis_angle_matrix([1, 1, 1], 2 * math.pi / 3)])
    elif key == "O":
        rots = _close([rz(math.pi / 2), axis_angle_matrix([1, 0, 0], math.pi / 2),
                       axis_angle_matrix([1, 1, 1], 2 * math.pi / 3)])
    else:  # I
        rots = _close([rz(math.pi), axis_angle_matrix([1, 0, 0], math.pi), axis_angle_matrix([1, 1, 1], 2 * math.pi / 3),
                       axis_angle_matrix([0, 1, _PHI], 2 * math.pi / 5)])
    rots = np.where(np.abs(rots) < 1e-15, 0.0, rots)
    return PointGroup(key, rots)


class QFold(nn.Module):
    r"""The ``q``-space images a symmetric field is averaged over (module docstring).

    ``forward(q (..., 3)) -> (C, ..., 3)``: for each coset matrix ``c`` of :meth:`PointGroup.fold_cosets`,
    ``c q`` folded into the reflection group's chamber. For every ``l`` in the Laue group the set of images of
    ``l q`` equals that of ``q`` (permuted), so any ``f`` averaged over them is exactly invariant; the fold is
    continuous and differentiable almost everywhere. Buffers are non-persistent (the group is rebuilt from
    the run's config, never read from a state dict).

    Args:
        group: the point group.
    """

    def __init__(self, group: PointGroup) -> None:
        super().__init__()
        self.group = group
        normals = group.mirror_normals()
        self.register_buffer("normals", torch.as_tensor(normals, dtype=torch.float64), persistent=False)
        self.register_buffer("cosets", torch.as_tensor(group.fold_cosets(), dtype=torch.float64), persistent=False)
        # the longest element of W has as many reflections as W has mirrors: a bound on the folding steps
        self.max_steps = int(normals.shape[0]) + 2

    @property
    def n_images(self) -> int:
        """``C``: field evaluations per ``q``."""
        return int(self.cosets.shape[0])

    def fold(self, q: Tensor) -> Tensor:
        """``q (..., 3)`` folded into the closed chamber of the mirrors (``q`` itself without mirrors)."""
        if self.normals.shape[0] == 0:
            return q
        n = self.normals.to(q.dtype)
        x = q
        for _ in range(self.max_steps):
            d = x @ n.T  # (..., m)
            dmin, j = d.min(-1)
            if not bool((dmin < 0).any()):
                break
            # reflect across the most violated mirror (each step strictly shortens the Weyl-group word)
            x = x - 2.0 * torch.clamp(dmin, max=0.0)[..., None] * n[j]
        return x

    def forward(self, q: Tensor) -> Tensor:
        c = self.cosets.to(q.dtype)
        if c.shape[0] == 1 and bool((c[0] == torch.eye(3, dtype=q.dtype, device=q.device)).all()):
            return self.fold(q)[None]
        return self.fold(torch.einsum("cij,...j->c...i", c, q))
