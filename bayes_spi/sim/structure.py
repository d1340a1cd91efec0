"""Atomic structures for simulation: loading (gemmi) and per-element X-ray form factors (IT92).

A :class:`Structure` holds atom positions grouped by element, in Angstrom, centred at the molecule's
*centre of electron mass* (positions weighted by atomic number ``Z`` times occupancy), so the centre of
the electron density sits at the origin. Loading keeps every atom of the first model, including
hydrogens present in the file (absent hydrogens are not added), and drops waters (``HOH``/``WAT``/``DOD``)
unless ``keep_waters=True``. Occupancies are kept as per-atom weights; B-factors are ignored (a static,
cold molecule: the molecular transform is the plain sum over atoms).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import gemmi
import numpy as np

__all__ = ["BUILTIN_STRUCTURES", "Structure", "load_structure", "form_factor", "atomic_number"]

#: built-in structure names -> packaged file in ``bayes_spi.resources``
BUILTIN_STRUCTURES: dict[str, str] = {"2CEX": "2CEX.pdb", "1EI7": "1EI7.pdb"}

_WATERS = frozenset({"HOH", "WAT", "DOD", "H2O"})


@dataclass(frozen=True)
class Structure:
    """Atoms grouped by element.

    Attributes:
        positions: element symbol -> ``(N_e, 3)`` float64 positions in Angstrom (centred, see module doc).
        occupancies: element symbol -> ``(N_e,)`` float64 weights (occupancy, 1 for full).
        name: a label (file stem or built-in name).
    """

    positions: dict[str, np.ndarray]
    occupancies: dict[str, np.ndarray]
    name: str = ""

    @property
    def elements(self) -> list[str]:
        """Element symbols, sorted."""
        return sorted(self.positions)

    @property
    def n_atoms(self) -> int:
        """Total number of atoms."""
        return int(sum(len(p) for p in self.positions.values()))

    @property
    def n_electrons(self) -> float:
        """``sum_j occ_j Z_j``: the forward-scattering amplitude ``F(0)`` up to the IT92 fit error."""
        return float(sum(atomic_number(el) * occ.sum() for el, occ in self.occupancies.items()))

    def radius(self) -> float:
        """Largest distance of an atom from the origin, Angstrom."""
        return float(max(np.linalg.norm(p, axis=1).max() for p in self.positions.values() if len(p)))

    @classmethod
    def from_arrays(
        cls,
        elements: list[str] | np.ndarray,
        positions: np.ndarray,
        occupancies: np.ndarray | None = None,
        name: str = "",
        centre: bool = True,
    ) -> Structure:
        """Build from flat arrays: ``elements`` ``(N,)`` symbols, ``positions`` ``(N, 3)`` Angstrom.

        Raises:
            ValueError: inconsistent shapes, unknown element or empty structure.
        """
        pos = np.asarray(positions, dtype=np.float64)
        els = [str(e) for e in elements]
        if pos.ndim != 2 or pos.shape[1] != 3 or pos.shape[0] != len(els):
            raise ValueError(f"positions: expected shape ({len(els)}, 3), got {pos.shape}")
        if not els:
            raise ValueError("structure: expected at least one atom, got none")
        occ = np.ones(len(els)) if occupancies is None else np.asarray(occupancies, dtype=np.float64)
        if occ.shape != (len(els),):
            raise ValueError(f"occupancies: expected shape ({len(els)},), got {occ.shape}")
        z = np.array([atomic_number(e) for e in els], dtype=np.float64) * occ
        if centre:
            pos = pos - (z[:, None] * pos).sum(axis=0) / z.sum()
        symbols = np.array([_normalise_symbol(e) for e in els])
        by_pos: dict[str, np.ndarray] = {}
        by_occ: dict[str, np.ndarray] = {}
        for el in sorted(set(symbols.tolist())):
            sel = symbols == el
            by_pos[el] = np.ascontiguousarray(pos[sel])
            by_occ[el] = occ[sel].copy()
        return cls(by_pos, by_occ, name)


def _normalise_symbol(symbol: str) -> str:
    el = gemmi.Element(symbol)
    if el.atomic_number == 0:
        raise ValueError(f"element: expected a chemical element symbol, got {symbol!r}")
    return el.name


def atomic_number(symbol: str) -> int:
    """Atomic number ``Z`` of an element symbol."""
    return int(gemmi.Element(symbol).atomic_number)


def form_factor(symbol: str, q: np.ndarray) -> np.ndarray:
    """IT92 X-ray atomic form factor ``f(|q|)`` in electrons.

    Args:
        symbol: element symbol.
        q: ``|q|`` in 1/A (no 2*pi, ``|q| = 2 sin(theta)/lambda``), any shape.

    Returns:
        ``f`` with the shape of ``q``: ``sum_i a_i exp(-b_i s^2) + c`` with ``s = sin(theta)/lambda = |q|/2``.
    """
    el = gemmi.Element(symbol)
    coefs = el.it92.get_coefs()
    if el.atomic_number == 0 or not any(coefs):
        raise ValueError(f"element: expected an element with IT92 coefficients, got {symbol!r}")
    a, b, c = np.asarray(coefs[0:4]), np.asarray(coefs[4:8]), float(coefs[8])
    s2 = (np.asarray(q, dtype=np.float64) / 2.0) ** 2
    out = np.full(s2.shape, c)
    for ai, bi in zip(a, b):
        out += ai * np.exp(-bi * s2)
    return out


def _resolve(path_or_name: str | os.PathLike[str]) -> tuple[str, str]:
    """Return (file path, label); built-in names map to packaged files."""
    text = os.fspath(path_or_name)
    if text.upper() in BUILTIN_STRUCTURES and not Path(text).exists():
        ref = resources.files("bayes_spi.resources").joinpath(BUILTIN_STRUCTURES[text.upper()])
        with resources.as_file(ref) as real:
            return str(real), text.upper()
    return text, Path(text).stem


def load_structure(path_or_name: str | os.PathLike[str], *, keep_waters: bool = False) -> Structure:
    """Load a PDB / mmCIF file (or a built-in name such as ``"2CEX"``) into a centred :class:`Structure`.

    Raises:
        FileNotFoundError: the file does not exist (message names it and the built-in names).
        ValueError: the file cannot be parsed or holds no atoms (message names the file).
    """
    path, label = _resolve(path_or_name)
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"structure file {path!r} not found (built-in structures: {sorted(BUILTIN_STRUCTURES)})"
        )
    try:
        st = gemmi.read_structure(path)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ValueError(f"structure file {path!r}: expected a readable PDB or mmCIF file, got error: {exc}") from exc
    if len(st) == 0:
        raise ValueError(f"structure file {path!r}: expected at least one model with atoms, got none")
    elements: list[str] = []
    coords: list[tuple[float, float, float]] = []
    occs: list[float] = []
    for chain in st[0]:
        for residue in chain:
            if not keep_waters and residue.name in _WATERS:
                continue
            for atom in residue:
                if atom.element.atomic_number == 0:
                    continue
                elements.append(atom.element.name)
                coords.append((atom.pos.x, atom.pos.y, atom.pos.z))
                occs.append(float(atom.occ))
    if not elements:
        raise ValueError(f"structure file {path!r}: expected atoms, got none")
    return Structure.from_arrays(elements, np.array(coords), np.array(occs), name=label)
