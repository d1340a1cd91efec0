"""Point groups (bayes_spi/symmetry.py), symmetric fields, the EMC merge, the search grid, pose errors modulo
the group, the symmetric simulation and the --symmetry options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from bayes_spi.infer.build import build_field
from bayes_spi.infer.config import FitConfig
from bayes_spi.metrics import orientation_error_summary
from bayes_spi.symmetry import QFold, parse_symmetry, point_group

NAMES = ["C1", "C2", "C3", "C4", "D2", "D3", "D5", "D6", "T", "O", "I"]
ORDERS = {"C1": 1, "C2": 2, "C3": 3, "C4": 4, "D2": 4, "D3": 6, "D5": 10, "D6": 12, "T": 12, "O": 24, "I": 60}
AXES = {"C1": {}, "C2": {2: 1}, "C3": {3: 1}, "C4": {4: 1}, "D2": {2: 3}, "D3": {2: 3, 3: 1},
        "D5": {2: 5, 5: 1}, "D6": {2: 6, 6: 1}, "T": {2: 3, 3: 4}, "O": {2: 6, 3: 4, 4: 3},
        "I": {2: 15, 3: 10, 5: 6}}


def _index(rots: np.ndarray, R: np.ndarray) -> int:
    d = np.abs(rots - R).max(axis=(1, 2))
    return int(d.argmin()) if d.min() < 1e-9 else -1


@pytest.mark.parametrize("name", NAMES)
def test_group_is_a_group_of_the_right_order_and_axes(name: str) -> None:
    g = point_group(name)
    R = g.rotations
    assert g.order == ORDERS[name]
    assert np.allclose(R[0], np.eye(3))
    assert np.allclose(np.einsum("kji,kjl->kil", R, R), np.eye(3), atol=1e-12)  # orthogonal
    assert np.allclose(np.linalg.det(R), 1.0)
    for a in R:  # closure and inverses
        assert _index(R, a.T) >= 0
        for b in R:
            assert _index(R, a @ b) >= 0
    assert g.axis_counts() == AXES[name]
    assert np.allclose(np.einsum("ij,jk->ik", g.quaternions, g.quaternions.T)[np.diag_indices(g.order)], 1.0)


def test_standard_orientations() -> None:
    """The stated conventions: Cn/Dn n-fold along z, Dn 2-fold along x, I 2-folds on x, y, z, 5-fold at (0,1,phi)."""
    phi = (1 + math.sqrt(5)) / 2
    axes = {n: [(a, k) for a, k in point_group(n).axes()] for n in ("C4", "D3", "O", "I")}

    def has(name: str, axis: list[float], order: int) -> bool:
        u = np.asarray(axis, float) / np.linalg.norm(axis)
        return any(k == order and abs(abs(a @ u) - 1) < 1e-9 for a, k in axes[name])

    assert has("C4", [0, 0, 1], 4) and has("D3", [0, 0, 1], 3) and has("D3", [1, 0, 0], 2)
    assert all(has("O", e, 4) for e in np.eye(3)) and has("O", [1, 1, 1], 3) and has("O", [1, 1, 0], 2)
    assert all(has("I", e, 2) for e in np.eye(3)) and has("I", [0, 1, phi], 5) and has("I", [1, 1, 1], 3)


@pytest.mark.parametrize("name", ["D3", "T", "O", "I"])
def test_pose_fundamental_zone_partitions_so3(name: str) -> None:
    g = point_group(name)
    R = Rotation.random(500, random_state=1).as_matrix()
    orbit = np.einsum("gij,njk->ngik", g.rotations, R)  # (N, K, 3, 3)
    inside = g.in_fundamental_zone(orbit)  # (N, K)
    assert (inside.sum(-1) == 1).all()  # exactly one member of each coset is in the zone
    canon, idx = g.canonical_pose(R)
    assert g.in_fundamental_zone(canon).all()
    assert np.allclose(canon, orbit[np.arange(500), idx])
    assert np.allclose(g.canonical_pose(orbit[:, 7 % g.order])[0], canon, atol=1e-9)
    # the zone holds 1/|G| of SO(3): a Haar sample lands inside with that probability
    frac = g.in_fundamental_zone(Rotation.random(20000, random_state=2).as_matrix()).mean()
    assert abs(frac - 1 / g.order) < 4 * math.sqrt(1 / g.order / 20000) + 1e-3


def test_parse_symmetry_errors() -> None:
    assert parse_symmetry("i") == "I" and parse_symmetry(" d6 ") == "D6" and parse_symmetry(None) == "C1"
    for bad in ("D1", "X", "C0", "I2", "c-3"):
        with pytest.raises(ValueError, match="symmetry: expected C1, Cn, Dn"):
            parse_symmetry(bad)
    with pytest.raises(ValueError, match="fit setting symmetry"):
        FitConfig(symmetry="Q7")
    with pytest.raises(ValueError, match="field variational"):
        FitConfig(symmetry="T", field="variational")
    assert FitConfig(symmetry="o").symmetry == "O"


@pytest.mark.parametrize("name", ["C3", "C4", "D3", "T", "O", "I"])
def test_fold_images_are_permuted_by_the_laue_group(name: str) -> None:
    g = point_group(name)
    fold = QFold(g).double()
    q = torch.randn(300, 3, dtype=torch.float64)
    ref = torch.sort(fold(q).cos().sum(-1), dim=0).values
    for L in g.laue():
        img = torch.sort(fold(q @ torch.as_tensor(L).T).cos().sum(-1), dim=0).values
        assert torch.allclose(img, ref, atol=1e-12)
    assert fold.n_images == {"C3": 3, "C4": 4, "D3": 2, "T": 3, "O": 1, "I": 1}[name]


def _randomise(field: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in field.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.mark.parametrize("kind,name", [("siren", "I"), ("fouriernet", "T"), ("voxel", "O"), ("hybrid", "I"),
                                       ("hybrid", "D3"), ("siren", "C4"), ("variational", "I"), ("voxel", "D5")])
def test_field_is_exactly_invariant(kind: str, name: str) -> None:
    field = build_field(FitConfig(field=kind, symmetry=name, voxel_grid=9, variational_grid=9, field_width=16), 0.1)
    assert field.symmetry == name
    _randomise(field)  # any parameters: invariance holds by construction
    field.eval()
    q = torch.randn(400, 3, dtype=torch.float32) * 0.05
    with torch.no_grad():
        ref = field.log_intensity(q)
        spread = float(ref.std())
        assert spread > 1e-3  # not a constant field
        for R in point_group(name).rotations:
            out = field.log_intensity(q @ torch.as_tensor(R, dtype=torch.float32).T)
            assert float((out - ref).abs().max()) < 1e-5 * max(1.0, float(ref.abs().max()))
        # and it is not invariant under a rotation outside the group
        Rn = torch.as_tensor(Rotation.from_rotvec([0.3, 0.2, 0.1]).as_matrix(), dtype=torch.float32)
        assert float((field.log_intensity(q @ Rn.T) - ref).abs().max()) > 1e-3


def test_exported_volume_is_invariant() -> None:
    """On the export grid, the elements of O (and I's T subgroup) permute the voxels: the volume is exactly
    invariant; with I a rotation outside T is checked on the field."""
    from bayes_spi.infer.outputs import field_on_grid

    for name in ("O", "I"):
        field = build_field(FitConfig(field="hybrid", symmetry=name, voxel_grid=9, field_width=16), 0.1)
        _randomise(field, 3)
        vol, _ = field_on_grid(field, 15, 0.1)
        vol = np.asarray(vol)
        ok = 0
        for R in point_group(name).rotations:
            P = np.rint(R)
            if not np.allclose(P, R, atol=1e-9):
                continue  # not a permutation of the grid's axes
            idx = np.stack(np.meshgrid(*[np.arange(15) - 7] * 3, indexing="ij"), -1) @ P.T + 7
            rotated = vol[tuple(np.moveaxis(idx.astype(int), -1, 0))]
            assert np.allclose(rotated, vol, rtol=1e-5, atol=1e-6 * vol.max())
            ok += 1
        assert ok == {"O": 24, "I": 12}[name]


def test_polish_merges_the_group_images() -> None:
    """One exact EMC iteration with symmetry I keeps the hybrid field exactly invariant, fills the wedge and
    matches the ground-truth intensity of an icosahedral particle better than without the group."""
    from bayes_spi.geometry import get_preset
    from bayes_spi.infer.build import build_model_and_guide
    from bayes_spi.infer.polish import EMCPolish
    from bayes_spi.sim.simulate import expected_photons, pixel_weights
    from bayes_spi.sim.structure import load_structure
    from bayes_spi.sim.symmetric import symmetric_assembly
    from bayes_spi.sim.transform import molecular_transform

    geom = get_preset("reference-32")
    shell = symmetric_assembly(load_structure("2CEX"), "I", 30.0, 8.0)
    rng = np.random.default_rng(0)
    rots = Rotation.random(48, random_state=4).as_matrix()
    lam = expected_photons(shell, geom.q_vectors().reshape(-1, 3), pixel_weights(geom).reshape(-1), rots, 1.0)
    lam = lam / lam.sum(1, keepdims=True) * 2e4
    counts = rng.poisson(lam).astype(np.int32).reshape(len(rots), *geom.shape)

    class Data:
        mask = np.ones(geom.shape, bool)
        n_patterns = len(counts)

        def iter_batches(self, batch_size: int, shuffle: bool = False):
            for s in range(0, len(counts), batch_size):
                yield np.arange(s, min(s + batch_size, len(counts))), counts[s:s + batch_size]

    results = {}
    for name in ("C1", "I"):
        cfg = FitConfig(field="hybrid", symmetry=name, voxel_grid=17, field_width=16, n_search=0)
        model, _ = build_model_and_guide(geom, cfg)
        # the true poses as the orientation grid: the merge alone is tested
        pol = EMCPolish(model, torch.as_tensor(rots, dtype=model.q.dtype), cache_grid=17)
        stats = pol.iterate(Data())
        q = torch.randn(300, 3, dtype=model.q.dtype) * 0.3 * model.q_max
        with torch.no_grad():
            est = model.field.log_intensity(q).numpy()
        true = np.log(np.abs(molecular_transform(shell, q.numpy().astype(np.float64))) ** 2)
        results[name] = (np.corrcoef(est, true)[0, 1], stats.filled)
        if name == "I":
            with torch.no_grad():
                for R in point_group("I").rotations[::7]:
                    out = model.field.log_intensity(q @ torch.as_tensor(R, dtype=q.dtype).T).numpy()
                    assert np.abs(out - est).max() < 1e-4
    # the same 48 patterns merged 60 times over: a much better intensity from a flat start (E-step weights are
    # broad, so neither is close to the truth after one iteration)
    assert results["I"][0] > results["C1"][0] + 0.1, results
    assert results["I"][1] < 0.1 < results["C1"][1]  # only the fundamental wedge is filled


def test_orientation_grid_in_fundamental_zone() -> None:
    from bayes_spi.guides.search import orientation_grid

    g = point_group("I")
    grid = orientation_grid(100, symmetry="I").double().numpy()
    assert 80 <= len(grid) <= 120
    assert g.in_fundamental_zone(grid, tol=1e-6).all()
    # covering: every pose is, modulo the group, as close to the grid as a full grid of 6000 covers SO(3)
    R = Rotation.random(300, random_state=5).as_matrix()
    d = np.min(np.stack([g.pose_distance_deg(R, G)[0] for G in grid]), axis=0)
    full = orientation_grid(6000).double().numpy()
    d_full = np.degrees(np.arccos(np.clip((np.einsum("nij,gij->ng", R, full).max(-1) - 1) / 2, -1, 1)))
    assert np.percentile(d, 99) < 1.25 * np.percentile(d_full, 99)
    rnd = orientation_grid(50, grid="random", symmetry="O").double().numpy()
    assert len(rnd) == 50 and point_group("O").in_fundamental_zone(rnd, tol=1e-6).all()


@pytest.mark.parametrize("fit", ["C1", "I"])
def test_pose_errors_modulo_the_group(fit: str) -> None:
    """A fit without the group: R_est = A^T h_i R_true (any global A, any h_i of the truth's group per pattern);
    with it: R_est = g_i A^T R_true with A in the group (a symmetric field fixes its frame up to the group)."""
    from bayes_spi.report.numbers import pose_errors

    g = point_group("I")
    rng = np.random.default_rng(0)
    R_true = Rotation.random(200, random_state=6).as_matrix()
    noise = Rotation.from_rotvec(rng.normal(size=(200, 3)) * math.radians(2) / math.sqrt(3)).as_matrix()
    hi = g.rotations[rng.integers(0, 60, 200)]
    if fit == "C1":
        A = Rotation.from_rotvec([0.2, -0.1, 0.3]).as_matrix()
        R_est = A.T @ hi @ noise @ R_true
    else:
        A = g.rotations[17]
        R_est = hi @ A.T @ noise @ R_true
    flip = rng.random(200) < 0.2
    R_est[flip] = R_est[flip] @ np.diag([-1.0, -1.0, 1.0])
    plain = orientation_error_summary(R_est, R_true)
    sym = orientation_error_summary(R_est, R_true, group=g.rotations)
    assert plain["median_error_mod_rotz_pi_deg"] > 30
    assert sym["median_error_mod_rotz_pi_deg"] < 3.5
    assert np.array_equal(sym["flipped"], flip)
    raw = sym["errors_deg"]  # twins not forgiven (modulo I a twin is typically ~30 degrees off)
    assert np.median(raw[~flip]) < 3.5 and np.median(raw[flip]) > 10
    rep = pose_errors(R_est, R_true, symmetry="I")
    assert np.median(rep["errors_mod_rotz_pi_deg"]) < 3.5 and np.array_equal(rep["flipped"], flip)


def test_symmetric_simulation_is_invariant() -> None:
    from bayes_spi.sim.structure import load_structure
    from bayes_spi.sim.symmetric import symmetric_assembly
    from bayes_spi.sim.transform import molecular_transform

    for name in ("I", "D3"):
        shell = symmetric_assembly(load_structure("2CEX"), name, 30.0, 8.0)
        assert shell.n_atoms % point_group(name).order == 0
        q = np.random.default_rng(1).normal(size=(100, 3)) * 0.04
        I0 = np.abs(molecular_transform(shell, q)) ** 2
        for R in point_group(name).rotations:
            I1 = np.abs(molecular_transform(shell, q @ R.T)) ** 2
            assert np.abs(I1 - I0).max() < 1e-7 * I0.max()
        Rn = Rotation.from_rotvec([0.3, 0.2, 0.1]).as_matrix()
        assert np.abs(np.abs(molecular_transform(shell, q @ Rn.T)) ** 2 - I0).max() > 1e-2 * I0.max()


def test_cli_simulate_fit_evaluate_with_symmetry(tmp_path) -> None:
    """simulate --symmetry I, fit --symmetry I end to end: the setting is stored (config.yaml, model.pt), the
    reloaded field is invariant, the grid lies in the fundamental zone, evaluate takes errors modulo the group;
    bad values are refused with the option's name."""
    import yaml
    from click.testing import CliRunner

    from bayes_spi.cli.main import cli
    from bayes_spi.infer.evaluate import evaluate_run_full
    from bayes_spi.infer.load import load_trained

    data, run = tmp_path / "ico.h5", tmp_path / "run"
    res = CliRunner().invoke(cli, ["simulate", "2CEX", "-o", str(data), "--symmetry", "i", "--shell-radius", "30",
                                   "--subunit-radius", "8", "--n-patterns", "48", "--truth-grid", "17",
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["fit", str(data), "-o", str(run), "--symmetry", "I", "--batch-size", "16",
                                   "--epochs", "1", "--field-width", "16", "--n-heads", "1", "--pixels-per-pattern",
                                   "64", "--polish-iterations", "1", "--grid", "17", "--no-progress", "--no-truth"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert yaml.safe_load((run / "config.yaml").read_text())["settings"]["symmetry"] == "I"
    trained = load_trained(run)
    assert trained.config.symmetry == "I" and trained.model.field.symmetry == "I"
    grid = trained.guide.search.rotations.double().numpy()
    assert point_group("I").in_fundamental_zone(grid, tol=1e-5).all()
    assert abs(len(grid) - trained.config.search_rotations) <= 0.3 * trained.config.search_rotations
    q = trained.model.q[:200]
    with torch.no_grad():
        ref = trained.model.field.log_intensity(q)
        for R in point_group("I").rotations[::5]:
            assert torch.allclose(trained.model.field.log_intensity(q @ torch.as_tensor(R, dtype=q.dtype).T), ref,
                                  atol=1e-4)
    ev = evaluate_run_full(run, data, density=False)
    assert any("point group I" in n for n in ev.notes)
    for bad, where in ((["simulate", "2CEX", "-o", str(tmp_path / "x.h5"), "--symmetry", "Q"], "--symmetry"),
                       (["simulate", "2CEX", "-o", str(tmp_path / "x.h5"), "--symmetry", "I"], "--shell-radius"),
                       (["fit", str(data), "-o", str(tmp_path / "r2"), "--symmetry", "D1"], "--symmetry")):
        res = CliRunner().invoke(cli, bad)
        assert res.exit_code != 0 and where in res.output, res.output


def test_distill_target_modulo_the_group() -> None:
    """The amortization loss pulls the encoder towards the nearest group image of the best hypothesis."""
    from bayes_spi.guides.amortized import PosePosterior
    from bayes_spi.infer.trainer import Trainer

    g = point_group("O")
    best = torch.as_tensor(Rotation.random(4, random_state=7).as_matrix())
    enc = torch.einsum("ij,bjk->bik", torch.as_tensor(g.rotations[5]), best)  # a group image of the best
    rots = torch.stack([enc, best], dim=1)  # hypothesis 0: encoder, 1: search (the most probable)
    post = PosePosterior(rots, torch.full((4, 2, 3), 0.1), torch.tensor([[0.2, 0.8]] * 4), torch.zeros(4),
                         torch.ones(4), n_encoder=1)
    assert float(Trainer.distill_loss(post)) > 1.0
    assert float(Trainer.distill_loss(post, torch.as_tensor(g.rotations))) < 1e-12
