"""The half-set verdict: agreement of two independent fits, from their speckle FSC, and the halves' statuses."""

from __future__ import annotations

import numpy as np
import pytest

from bayes_spi.analysis.fsc import FSCCurve, intensity_fsc
from bayes_spi.infer.halfset_verdict import MIN_INNER_SPECKLE_FSC, assess_halfsets, inner_speckle_fsc


def _speckle_volume(rng: np.random.Generator, n: int = 33) -> tuple[np.ndarray, float]:
    """A positive random intensity with speckles on a centred cube: ``(n, n, n)`` and the voxel size."""
    x = rng.standard_normal((n, n, n))
    k = np.fft.fftfreq(n)
    kk = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    smooth = np.real(np.fft.ifftn(np.fft.fftn(x) * np.exp(-(kk / 0.12) ** 2)))
    return np.exp(2.0 * smooth / smooth.std()), 0.01


def _verdict(status: str) -> dict:
    return {"status": status, "reasons": [] if status == "converged" else [f"it was {status}"],
            "checks": {"gain_per_photon": 0.2, "probe_ambiguous_fraction": 0.1}}


def test_inner_mean_is_voxel_weighted_over_inner_shells() -> None:
    c = FSCCurve(q=[0.0, 0.1, 0.2, 0.3, 0.4], fsc=[1.0, 0.9, np.nan, 0.3, -0.2], n_voxels=[1, 6, 20, 40, 70])
    # q_max 0.6 -> inner shells 0 < q <= 0.3: 0.1 (w 6) and 0.3 (w 40); the NaN shell is skipped
    assert inner_speckle_fsc(c, 0.6) == pytest.approx((0.9 * 6 + 0.3 * 40) / 46)
    assert np.isnan(inner_speckle_fsc(c, 0.15, fraction=0.5))
    with pytest.raises(ValueError, match="expected q_max > 0"):
        inner_speckle_fsc(c, -1.0)


def test_same_structure_agrees_and_different_structures_fail() -> None:
    """Two noisy copies of one speckled intensity agree; two independent speckle patterns do not."""
    rng = np.random.default_rng(0)
    truth, dq = _speckle_volume(rng)
    q_max = dq * 16
    noisy = [truth * rng.gamma(50.0, 1 / 50.0, truth.shape) for _ in range(2)]
    same = intensity_fsc(noisy[0], noisy[1], dq, q_max=q_max, speckle=True)
    other, _ = _speckle_volume(rng)
    different = intensity_fsc(truth, other, dq, q_max=q_max, speckle=True)
    good = assess_halfsets([_verdict("converged"), _verdict("converged")], same, q_max)
    bad = assess_halfsets([_verdict("converged"), _verdict("converged")], different, q_max)
    assert good.status == "converged" and good.reasons == []
    assert good.checks["inner_speckle_fsc"] > 0.8
    assert bad.status == "failed" and bad.checks["inner_speckle_fsc"] < 0.2
    assert any("disagree" in r for r in bad.reasons)
    assert good.checks["gain_per_photon"] == pytest.approx(0.2)


@pytest.mark.parametrize("pair, expected", [
    (("converged", "unconverged"), "unconverged"),
    (("failed", "converged"), "failed"),
    (("unconverged", "unconverged"), "unconverged"),
])
def test_worst_half_status_counts(pair: tuple[str, str], expected: str) -> None:
    agree = FSCCurve(q=[0.0, 0.1, 0.2], fsc=[1.0, 0.95, 0.9], n_voxels=[1, 6, 20])
    v = assess_halfsets([_verdict(s) for s in pair], agree, 0.4)
    assert v.status == expected
    assert v.checks["inner_speckle_fsc"] >= MIN_INNER_SPECKLE_FSC
    assert all(r.startswith("half") for r in v.reasons) and len(v.reasons) == sum(s != "converged" for s in pair)


def test_missing_half_verdict_and_bad_input() -> None:
    agree = FSCCurve(q=[0.0, 0.1], fsc=[1.0, 0.95], n_voxels=[1, 6])
    v = assess_halfsets([None, _verdict("converged")], agree, 0.4)
    assert v.status == "unconverged" and "half1: no verdict" in v.reasons[0]
    with pytest.raises(ValueError, match="expected the verdicts of 2 halves"):
        assess_halfsets([_verdict("converged")], agree, 0.4)
    with pytest.raises(ValueError, match="expected a status"):
        assess_halfsets([{"status": "great"}, None], agree, 0.4)
