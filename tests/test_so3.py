"""Tests for bayes_spi.so3 (conventions checked against SciPy)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial.transform import Rotation

from bayes_spi.so3 import (
    geodesic_angle,
    hat,
    quat_wxyz_to_rotmat,
    random_rotmat,
    rotmat_to_quat_wxyz,
    rotmat_to_rotvec,
    rotvec_to_rotmat,
    rotz_pi,
    sixd_to_rotmat,
    vee,
)


def _is_rotation(R: torch.Tensor, atol: float = 1e-5) -> bool:
    eye = torch.eye(3, dtype=R.dtype)
    return bool(
        torch.allclose(R.transpose(-1, -2) @ R, eye.expand_as(R), atol=atol)
        and torch.allclose(torch.linalg.det(R), torch.ones(R.shape[:-2], dtype=R.dtype), atol=atol)
    )


def test_quat_scalar_first_matches_scipy():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 5, 4))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    R = quat_wxyz_to_rotmat(torch.as_tensor(q))
    R_ref = Rotation.from_quat(q.reshape(-1, 4)[:, [1, 2, 3, 0]]).as_matrix().reshape(2, 5, 3, 3)
    np.testing.assert_allclose(R.numpy(), R_ref, atol=1e-12)


def test_quat_rotation_about_z_acts_on_column_vectors():
    t = 0.7
    q = torch.tensor([math.cos(t / 2), 0.0, 0.0, math.sin(t / 2)], dtype=torch.float64)
    R = quat_wxyz_to_rotmat(q)
    x = R @ torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(x, torch.tensor([math.cos(t), math.sin(t), 0.0], dtype=torch.float64))


def test_quat_round_trip_and_canonical_sign():
    R = random_rotmat((3, 7), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = rotmat_to_quat_wxyz(R)
    assert q.shape == (3, 7, 4)
    assert bool((q[..., 0] >= 0).all())
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(3, 7, dtype=torch.float64))
    torch.testing.assert_close(quat_wxyz_to_rotmat(q), R)
    torch.testing.assert_close(quat_wxyz_to_rotmat(-q), R)
    # Same quaternion as SciPy up to sign.
    q_ref = Rotation.from_matrix(R.reshape(-1, 3, 3).numpy()).as_quat()[:, [3, 0, 1, 2]]
    q_ref *= np.sign(q_ref[:, :1])
    np.testing.assert_allclose(q.reshape(-1, 4).numpy(), q_ref, atol=1e-10)


def test_quat_normalises_input():
    q = torch.tensor([2.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(quat_wxyz_to_rotmat(q), rotvec_to_rotmat(torch.tensor([0.0, 0.0, math.pi / 2], dtype=torch.float64)))


def test_rotvec_matches_scipy_and_round_trips():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(4, 3, 3))
    v *= (rng.uniform(0, math.pi, size=(4, 3, 1)) / np.linalg.norm(v, axis=-1, keepdims=True))
    R = rotvec_to_rotmat(torch.as_tensor(v))
    np.testing.assert_allclose(R.numpy(), Rotation.from_rotvec(v.reshape(-1, 3)).as_matrix().reshape(4, 3, 3, 3), atol=1e-12)
    np.testing.assert_allclose(rotmat_to_rotvec(R).numpy(), v, atol=1e-9)


def test_hat_vee():
    v = torch.randn(5, 2, 3, dtype=torch.float64)
    u = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close((hat(v) @ u.unsqueeze(-1)).squeeze(-1), torch.cross(v, u, dim=-1))
    torch.testing.assert_close(vee(hat(v)), v)
    torch.testing.assert_close(hat(v).transpose(-1, -2), -hat(v))
    # exp(hat(v)) equals the matrix exponential
    torch.testing.assert_close(rotvec_to_rotmat(v), torch.linalg.matrix_exp(hat(v)))


def test_random_rotmat_is_haar_uniform():
    g = torch.Generator().manual_seed(3)
    R = random_rotmat(20000, generator=g, dtype=torch.float64)
    assert R.shape == (20000, 3, 3)
    assert _is_rotation(R, atol=1e-10)
    t = geodesic_angle(torch.eye(3, dtype=torch.float64), R).numpy()
    # Haar angle density (1 - cos t) / pi on [0, pi]: CDF (t - sin t) / pi
    assert stats.kstest(t, lambda x: (x - np.sin(x)) / np.pi).pvalue > 1e-3
    # Axis direction is uniform: the first column is uniform on the sphere -> each coordinate U(-1, 1)
    assert stats.kstest(R[:, 2, 0].numpy(), stats.uniform(-1, 2).cdf).pvalue > 1e-3
    # reproducible
    R2 = random_rotmat(20000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(R, R2)


def test_geodesic_angle_accuracy_near_zero_and_pi():
    axis = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    axis = axis / axis.norm()
    R0 = random_rotmat(1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)[0]
    for t in [0.0, 1e-9, 1e-5, 0.3, 2.0, math.pi - 1e-5, math.pi - 1e-9, math.pi]:
        R = R0 @ rotvec_to_rotmat(axis * t)
        got = float(geodesic_angle(R0, R))
        assert abs(got - t) < 1e-8, (t, got)
    # symmetric and batched with broadcasting
    A = random_rotmat((4, 1), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    B = random_rotmat((5,), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    d = geodesic_angle(A, B)
    assert d.shape == (4, 5)
    torch.testing.assert_close(d, geodesic_angle(B, A))
    ref = Rotation.from_matrix((A.transpose(-1, -2) @ B).reshape(-1, 3, 3).numpy()).magnitude().reshape(4, 5)
    np.testing.assert_allclose(d.numpy(), ref, atol=1e-10)


def test_geodesic_angle_gradient_finite():
    v = torch.tensor([0.2, 0.1, -0.3], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda w: geodesic_angle(torch.eye(3, dtype=w.dtype), rotvec_to_rotmat(w)), (v,))
    R = torch.eye(3, dtype=torch.float64, requires_grad=True)
    geodesic_angle(torch.eye(3, dtype=torch.float64), R).backward()
    assert torch.isfinite(R.grad).all()


def test_rotz_pi():
    torch.testing.assert_close(rotz_pi(dtype=torch.float64), rotvec_to_rotmat(torch.tensor([0.0, 0.0, math.pi], dtype=torch.float64)))
    assert rotz_pi().dtype == torch.get_default_dtype()


def test_sixd_to_rotmat_columns_and_gradcheck():
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    R = sixd_to_rotmat(x)
    assert R.shape == (3, 4, 3, 3)
    assert _is_rotation(R, atol=1e-10)
    # first column = normalised x[..., :3]; second column in span(a1, a2) with positive a2 component
    torch.testing.assert_close(R[..., :, 0], x[..., :3] / x[..., :3].norm(dim=-1, keepdim=True))
    a2_perp = x[..., 3:] - (x[..., 3:] * R[..., :, 0]).sum(-1, keepdim=True) * R[..., :, 0]
    torch.testing.assert_close(R[..., :, 1], a2_perp / a2_perp.norm(dim=-1, keepdim=True))
    eye6 = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(sixd_to_rotmat(eye6), torch.eye(3))
    xg = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(sixd_to_rotmat, (xg,))


@pytest.mark.parametrize(
    "fn,arg",
    [
        (quat_wxyz_to_rotmat, torch.zeros(2, 3)),
        (rotmat_to_quat_wxyz, torch.zeros(2, 3, 4)),
        (rotvec_to_rotmat, torch.zeros(4)),
        (rotmat_to_rotvec, torch.zeros(3)),
        (hat, torch.zeros(2, 2)),
        (sixd_to_rotmat, torch.zeros(5)),
    ],
)
def test_wrong_shapes_raise(fn, arg):
    with pytest.raises(ValueError, match="expected"):
        fn(arg)
