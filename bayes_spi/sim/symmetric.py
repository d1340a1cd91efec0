"""A point-group-symmetric particle from any structure: ``|G|`` copies of a subunit under the group's rotations.

Capsid-like test particles for ``--symmetry``: the structure (or the part of it within ``subunit_radius`` of
its centre, a compact fragment) is moved to a point ``p`` at ``shell_radius`` from the origin and copied by
every rotation ``g`` of the group (:func:`bayes_spi.symmetry.point_group`, standard orientation): atoms at
``g (x + p)``. The subunit keeps one orientation in the shell frame, so the assembly's symmetry is exactly
``G`` (as a capsid's asymmetric units are related by its BIOMT operators). ``p``'s direction is the one of a
Fibonacci sphere of directions whose nearest group image is farthest (the copies are as far apart as the
group allows). The molecular transform of the result satisfies ``F(g q) = F(q)`` for every ``g``, so the
simulated intensity is ``G``-invariant.

Example:
    >>> from bayes_spi.sim.structure import load_structure
    >>> shell = symmetric_assembly(load_structure("2CEX"), "I", shell_radius=30.0, subunit_radius=8.0)
    >>> shell.n_atoms % 60
    0
"""

from __future__ import annotations

import math

import numpy as np

from bayes_spi.sim.structure import Structure
from bayes_spi.symmetry import point_group

__all__ = ["symmetric_assembly", "subunit_direction"]


def subunit_direction(symmetry: str, n_candidates: int = 2000) -> np.ndarray:
    """Unit vector ``(3,)``: the direction whose nearest image under the group (other than itself) is farthest."""
    group = point_group(symmetry)
    k = np.arange(n_candidates) + 0.5
    z = 1.0 - 2.0 * k / n_candidates
    phi = math.pi * (1.0 + math.sqrt(5.0)) * k
    d = np.stack([np.sqrt(1 - z**2) * np.cos(phi), np.sqrt(1 - z**2) * np.sin(phi), z], axis=1)
    if group.is_trivial:
        return np.array([0.0, 0.0, 1.0])
    images = np.einsum("gij,nj->ngi", group.rotations[1:], d)  # (n, K-1, 3)
    nearest = np.linalg.norm(images - d[:, None], axis=-1).min(-1)
    return d[int(nearest.argmax())]


def symmetric_assembly(structure: Structure, symmetry: str, shell_radius: float,
                       subunit_radius: float | None = None, name: str | None = None) -> Structure:
    """``|G|`` copies of ``structure`` (cropped to ``subunit_radius`` A around its centre) on a shell.

    Args:
        structure: the subunit (centred, as :func:`~bayes_spi.sim.structure.load_structure` returns it).
        symmetry: the point group (``C1``, ``Cn``, ``Dn``, ``T``, ``O``, ``I``).
        shell_radius: distance of the subunit's centre from the origin (A).
        subunit_radius: keep only the atoms within this distance of the subunit's centre (A; ``None``: all).
        name: label of the result (default ``"<name>_<G>"``).

    Raises:
        ValueError: a negative radius, or a crop that keeps no atom.
    """
    if not (math.isfinite(shell_radius) and shell_radius >= 0):
        raise ValueError(f"shell_radius: expected a finite number >= 0 (A), got {shell_radius!r}")
    if subunit_radius is not None and not (math.isfinite(subunit_radius) and subunit_radius > 0):
        raise ValueError(f"subunit_radius: expected a positive number (A), got {subunit_radius!r}")
    group = point_group(symmetry)
    p = subunit_direction(group.name) * float(shell_radius)
    elements: list[str] = []
    positions: list[np.ndarray] = []
    occupancies: list[np.ndarray] = []
    for el in structure.elements:
        x, occ = structure.positions[el], structure.occupancies[el]
        if subunit_radius is not None:
            keep = np.linalg.norm(x, axis=1) <= subunit_radius
            x, occ = x[keep], occ[keep]
        if len(x) == 0:
            continue
        copies = np.einsum("gij,nj->gni", group.rotations, x + p).reshape(-1, 3)
        positions.append(copies)
        occupancies.append(np.tile(occ, group.order))
        elements += [el] * len(copies)
    if not elements:
        raise ValueError(f"subunit_radius: expected at least one atom within {subunit_radius} A of the centre of "
                         f"{structure.name or 'the structure'}, got none")
    label = name if name is not None else f"{structure.name or 'subunit'}_{group.name}"
    # centre=False: the group's centre is the origin (the assembly's centre of mass is there by symmetry)
    return Structure.from_arrays(elements, np.concatenate(positions), np.concatenate(occupancies), name=label,
                                 centre=False)
