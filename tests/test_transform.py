"""Structures, form factors and the molecular transform (NUFFT vs direct sum, closed forms)."""

from __future__ import annotations

from pathlib import Path

import gemmi
import numpy as np
import pytest

from bayes_spi.sim.structure import Structure, atomic_number, form_factor, load_structure
from bayes_spi.sim.transform import intensity_on_grid, molecular_transform, molecular_transform_direct

PDB_2CEX = Path(__file__).resolve().parents[1] / "bayes_spi" / "resources" / "2CEX.pdb"  # packaged


@pytest.fixture(scope="module")
def cex() -> Structure:
    return load_structure("2CEX")


def test_builtin_structure_is_centred_without_waters(cex: Structure) -> None:
    st = gemmi.read_structure(str(PDB_2CEX))
    n_water = sum(1 for ch in st[0] for res in ch if res.name == "HOH" for _ in res)
    n_all = sum(1 for ch in st[0] for res in ch for _ in res)
    assert cex.n_atoms == n_all - n_water
    assert n_water > 0 and set(cex.elements) >= {"C", "N", "O", "S"}
    with_water = load_structure(PDB_2CEX, keep_waters=True)
    assert with_water.n_atoms == n_all
    z_weighted = sum(
        (atomic_number(el) * cex.occupancies[el][:, None] * cex.positions[el]).sum(axis=0) for el in cex.elements
    )
    np.testing.assert_allclose(z_weighted / cex.n_electrons, 0.0, atol=1e-9)
    assert 20 < cex.radius() < 60


def test_bad_structure_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere.pdb"):
        load_structure(tmp_path / "nothere.pdb")
    junk = tmp_path / "junk.pdb"
    junk.write_text("this is not a structure\n")
    with pytest.raises(ValueError, match="junk.pdb"):
        load_structure(junk)


def test_form_factor_matches_gemmi_and_z_at_zero() -> None:
    q = np.array([0.0, 0.1, 0.5, 1.3])
    for el in ("C", "N", "O", "S", "Zn"):
        coef = gemmi.Element(el).it92
        expected = [coef.calculate_sf((qq / 2) ** 2) for qq in q]
        np.testing.assert_allclose(form_factor(el, q), expected, rtol=1e-5)
        assert form_factor(el, np.zeros(1))[0] == pytest.approx(atomic_number(el), abs=0.02)
        assert np.all(np.diff(form_factor(el, q)) < 0)


def test_nufft_matches_direct_sum(cex: Structure) -> None:
    rng = np.random.default_rng(1)
    q = rng.uniform(-0.15, 0.15, size=(400, 3))
    fast = molecular_transform(cex, q)
    slow = molecular_transform_direct(cex, q)
    assert np.linalg.norm(fast - slow) / np.linalg.norm(slow) < 1e-6
    assert np.max(np.abs(fast - slow)) / np.max(np.abs(slow)) < 1e-6


def test_friedel_and_forward_scattering(cex: Structure) -> None:
    rng = np.random.default_rng(2)
    q = rng.normal(scale=0.05, size=(200, 3))
    f_plus = molecular_transform(cex, q)
    f_minus = molecular_transform(cex, -q)
    np.testing.assert_allclose(f_minus, np.conj(f_plus), rtol=1e-7, atol=1e-6 * np.abs(f_plus).max())
    f0 = molecular_transform(cex, np.zeros((1, 3)))[0]
    assert abs(f0.imag) < 1e-6 * abs(f0)
    assert f0.real == pytest.approx(cex.n_electrons, rel=1e-3)
    assert f0.real == pytest.approx(sum(form_factor(el, np.zeros(1))[0] * cex.occupancies[el].sum()
                                        for el in cex.elements), rel=1e-8)


def test_two_atom_closed_form() -> None:
    """Two C atoms at +-d/2: F(q) = 2 f_C(|q|) cos(pi q.d); a lone atom at r0: f exp(2 pi i q.r0)."""
    d = np.array([3.0, -1.0, 2.0])
    pair = Structure.from_arrays(["C", "C"], np.stack([d / 2, -d / 2]))
    rng = np.random.default_rng(3)
    q = rng.uniform(-0.4, 0.4, size=(100, 3))
    expected = 2 * form_factor("C", np.linalg.norm(q, axis=1)) * np.cos(np.pi * q @ d)
    np.testing.assert_allclose(molecular_transform(pair, q), expected, atol=1e-8)
    r0 = np.array([[4.0, 5.0, -7.0]])
    lone = Structure.from_arrays(["O"], r0, centre=False)
    expected_lone = form_factor("O", np.linalg.norm(q, axis=1)) * np.exp(2j * np.pi * q @ r0[0])
    np.testing.assert_allclose(molecular_transform(lone, q), expected_lone, atol=1e-8)
    # shape (..., 3) -> (...)
    assert molecular_transform(pair, q.reshape(10, 10, 3)).shape == (10, 10)
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 3\)"):
        molecular_transform(pair, np.zeros((4, 2)))


def test_intensity_grid_axes_and_symmetry() -> None:
    # asymmetric 3-atom molecule: distinguishes the axes
    mol = Structure.from_arrays(["C", "O", "S"], np.array([[0.0, 0, 0], [7.0, 0, 0], [0, 3.0, 11.0]]))
    n, q_max = 9, 0.2
    grid, dq = intensity_on_grid(mol, n, q_max)
    assert grid.shape == (n, n, n) and dq == pytest.approx(q_max / 4)
    c = n // 2
    np.testing.assert_array_equal(grid, grid[::-1, ::-1, ::-1])
    assert grid[c, c, c] == pytest.approx(abs(molecular_transform_direct(mol, np.zeros(3))) ** 2, rel=1e-9)
    for (ix, iy, iz) in [(c + 1, c, c), (c, c + 2, c), (c, c, c - 3), (0, 8, 5)]:
        q = np.array([ix - c, iy - c, iz - c]) * dq
        assert grid[ix, iy, iz] == pytest.approx(abs(molecular_transform_direct(mol, q)) ** 2, rel=1e-7)
    assert not np.isclose(grid[c + 2, c, c], grid[c, c + 2, c])
    with pytest.raises(ValueError, match="odd"):
        intensity_on_grid(mol, 8, q_max)
