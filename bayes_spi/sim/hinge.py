"""A second conformation of a structure by a rigid-body hinge motion: one half swung open like a clamshell.

For a two-state mixture from one structure (issue 12: "one structure with a hinge motion"). The molecule's
principal axes (of the electron-weighted positions, centred at the centre of electron mass) are ``e1`` (the
longest extent), ``e2`` and ``e3`` (the shortest), as a right-handed frame. The atoms beyond the plane
``x . e1 = 0`` form the moving half; the hinge axis is parallel to ``e2`` and lies in that plane at the
lowest ``x . e3`` of the molecule (its edge), and the moving half turns about it by ``angle`` so that its
far side moves away from the fixed half: the cleft between them opens as a wedge (no atom moves into the
fixed half, so no clash is made), as a periplasmic binding protein's two domains open about their hinge
(SiaP, the built-in ``2CEX``, opens by about 25-30 degrees without its ligand). The split is geometric (a
plane through the centre), not the sequence's domain boundary: at the ~1 nm resolution of the reference
detectors the difference does not show. The result is recentred at its centre of electron mass.

Ensemble specs name it ``NAME@hinge=DEG`` (``structures:2CEX,2CEX@hinge=25``: the structure and its
hinge-moved copy, :func:`load_ensemble_member`).

Example:
    >>> import numpy as np
    >>> from bayes_spi.sim.structure import Structure
    >>> mol = Structure.from_arrays(["C"] * 4, np.array([[-2.0, 0, 0], [2.0, 0, 0], [4.0, 0, 1], [-4.0, 0, -1]]))
    >>> moved = hinge_structure(mol, 0.0)
    >>> bool(np.allclose(moved.positions["C"], mol.positions["C"]))
    True
"""

from __future__ import annotations

import math
import os

import numpy as np

from bayes_spi.sim.structure import Structure, atomic_number, load_structure

__all__ = ["HINGE_TAG", "hinge_frame", "hinge_structure", "load_ensemble_member"]

#: the suffix of an ensemble member name that asks for a hinge-moved copy: ``2CEX@hinge=25``
HINGE_TAG = "@hinge="


def _flat(mol: Structure) -> tuple[list[str], np.ndarray, np.ndarray]:
    els: list[str] = []
    pos, occ = [], []
    for el in mol.elements:
        els += [el] * len(mol.positions[el])
        pos.append(mol.positions[el])
        occ.append(mol.occupancies[el])
    return els, np.concatenate(pos), np.concatenate(occ)


def hinge_frame(mol: Structure) -> np.ndarray:
    """The molecule's principal axes ``(3, 3)``, rows ``e1, e2, e3`` (longest extent first, right-handed) of the
    electron-weighted positions (``Z`` times occupancy)."""
    els, pos, occ = _flat(mol)
    w = np.array([atomic_number(e) for e in els], dtype=np.float64) * occ
    centred = pos - (w[:, None] * pos).sum(0) / w.sum()
    cov = (w[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0) / w.sum()
    _, vecs = np.linalg.eigh(cov)  # ascending eigenvalues
    e1, e3 = vecs[:, 2], vecs[:, 0]
    return np.stack([e1, np.cross(e3, e1), e3])


def hinge_structure(mol: Structure, angle_deg: float) -> Structure:
    """``mol`` with its half beyond ``x . e1 = 0`` turned by ``angle_deg`` about the hinge (module doc).

    Raises:
        ValueError: ``angle_deg`` is not a finite number in ``[0, 90]``.
    """
    if not (math.isfinite(angle_deg) and 0.0 <= angle_deg <= 90.0):
        raise ValueError(f"hinge angle: expected degrees in [0, 90], got {angle_deg!r}")
    els, pos, occ = _flat(mol)
    e1, e2, e3 = hinge_frame(mol)
    w = np.array([atomic_number(e) for e in els], dtype=np.float64) * occ
    centred = pos - (w[:, None] * pos).sum(0) / w.sum()
    moving = centred @ e1 > 0.0
    pivot = e3 * float((centred @ e3).min())  # the hinge axis: parallel to e2 through this point
    t = math.radians(angle_deg)
    # Rodrigues about e2: e3 -> e3 cos t + e1 sin t (e2 x e3 = e1), so the far side (large x . e3) moves along +e1
    k = np.array([[0.0, -e2[2], e2[1]], [e2[2], 0.0, -e2[0]], [-e2[1], e2[0], 0.0]])
    rot = np.eye(3) + math.sin(t) * k + (1.0 - math.cos(t)) * (k @ k)
    out = centred.copy()
    out[moving] = (centred[moving] - pivot) @ rot.T + pivot
    return Structure.from_arrays(els, out, occ, name=f"{mol.name}{HINGE_TAG}{angle_deg:g}")


def load_ensemble_member(name: str | os.PathLike[str]) -> Structure:
    """A structure of an ensemble: a built-in name or a file (:func:`~bayes_spi.sim.structure.load_structure`),
    optionally with ``@hinge=DEG`` for its hinge-moved copy (:func:`hinge_structure`).

    Raises:
        ValueError: a hinge angle that is not a number in ``[0, 90]`` (the message names the member).
    """
    text = os.fspath(name)
    base, tag, angle = text.partition(HINGE_TAG)
    if not tag:
        return load_structure(text)
    try:
        deg = float(angle)
    except ValueError:
        raise ValueError(f"ensemble structure {text!r}: expected NAME{HINGE_TAG}DEG with DEG a number of degrees, "
                         f"got {angle!r}") from None
    if not (math.isfinite(deg) and 0.0 <= deg <= 90.0):
        raise ValueError(f"ensemble structure {text!r}: expected a hinge angle in [0, 90] degrees, got {deg:g}")
    return hinge_structure(load_structure(base), deg)
