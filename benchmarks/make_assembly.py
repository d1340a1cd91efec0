"""Build a large test particle: copies of a small protein on the vertices of an icosahedron.

No large PDB entry can be downloaded at run time, so the robustness and peer benchmarks use a
multimeric assembly of the packaged 2CEX: ``n`` copies (12: icosahedron vertices, 6: octahedron), each
rotated by a fixed random rotation so the assembly has no exact point-group symmetry, centred at
``radius`` Angstrom from the origin. The maximum extent is about ``2 radius + 55`` A.

Example::

    python benchmarks/make_assembly.py --copies 12 --radius 68 -o benchmarks/structures/2CEX_x12.pdb
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.spatial.transform import Rotation

from bayes_spi.sim.structure import load_structure

__all__ = ["assembly_positions", "write_pdb"]


def _random_centres(n: int, radius: float, rng: np.random.Generator, min_sep: float = 42.0) -> np.ndarray:
    """``n`` points in a ball of ``radius`` at least ``min_sep`` apart (rejection sampling): no symmetry."""
    pts: list[np.ndarray] = []
    while len(pts) < n:
        p = rng.uniform(-radius, radius, 3)
        if np.linalg.norm(p) <= radius and all(np.linalg.norm(p - q) >= min_sep for q in pts):
            pts.append(p)
    c = np.array(pts)
    return c - c.mean(0)


def _vertices(n: int) -> np.ndarray:
    if n == 12:
        p = (1 + 5**0.5) / 2
        v = []
        for a in (-1, 1):
            for b in (-p, p):
                v += [(0, a, b), (a, b, 0), (b, 0, a)]
        v = np.array(v, dtype=float)
    elif n == 6:
        v = np.concatenate([np.eye(3), -np.eye(3)])
    elif n == 2:
        v = np.array([[1.0, 0, 0], [-1.0, 0, 0]])
    else:
        raise ValueError(f"expected 2, 6 or 12 copies, got {n}")
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def assembly_positions(copies: int, radius: float, seed: int = 0, layout: str = "symmetric"
                       ) -> tuple[list[str], np.ndarray]:
    """Elements ``(N,)`` and positions ``(N, 3)`` (A) of ``copies`` rotated 2CEX copies.

    ``layout="symmetric"``: centres on the vertices of an icosahedron (12), octahedron (6) or a pair (2) at
    ``radius`` (nearly point-group symmetric at low resolution: orientations are then defined only up to
    that symmetry); ``"random"``: centres at random in a ball of ``radius`` (no symmetry).
    """
    s = load_structure("2CEX")
    els = [e for e in s.elements for _ in range(len(s.positions[e]))]
    pos = np.concatenate([s.positions[e] for e in s.elements])
    rng = np.random.default_rng(seed)
    centres = _vertices(copies) * radius if layout == "symmetric" else _random_centres(copies, radius, rng)
    out_e, out_p = [], []
    for v in centres:
        R = Rotation.random(random_state=rng).as_matrix()
        out_p.append(pos @ R.T + v)
        out_e += els
    return out_e, np.concatenate(out_p)


def write_pdb(path: str, elements: list[str], positions: np.ndarray) -> None:
    """Minimal PDB: one HETATM record per atom (chains A-Z cycled every 9,999 atoms)."""
    with open(path, "w") as fh:
        for i, (e, (x, y, z)) in enumerate(zip(elements, positions)):
            chain = chr(ord("A") + (i // 9999) % 26)
            fh.write(f"HETATM{(i % 99999) + 1:5d} {e:<3s}  UNK {chain}{(i % 9999) + 1:4d}    "
                     f"{x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00          {e:>2s}\n")
        fh.write("END\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=12)
    ap.add_argument("--radius", type=float, default=68.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layout", choices=["symmetric", "random"], default="symmetric")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    e, p = assembly_positions(a.copies, a.radius, a.seed, a.layout)
    write_pdb(a.output, e, p)
    ext = np.linalg.norm(p[:, None] - p[None, ::50], axis=-1).max()
    print(f"wrote {len(e)} atoms, max extent {ext:.0f} A, to {a.output}")


if __name__ == "__main__":
    main()
