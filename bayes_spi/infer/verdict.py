"""Did the fit work? A verdict that needs no truth, printed at the end of every fit.

A fit that failed must say so, loudly, on data with no ground truth. :func:`assess_fit` combines checks
that use only the data and the run itself:

- **schedule**: the learning-rate and coarse-to-fine schedules ran to their end (a fit stopped early by
  ``--max-minutes`` or ``--max-images`` before the radius reached the detector edge is *unconverged*);
- **plateau**: the ELBO per image (after the radius reached 1, in the last stage) has stopped rising: a
  linear trend over the last 30% of the images gains less than 0.5% per tenth of the images, or is not
  significant (t < 3) against the scatter of the mini-batch estimates;
- **spikes**: no ELBO drop of more than 5 robust standard deviations after the curriculum (the signature
  of the collapses seen on Dragonfly data);
- **stability**: the most probable poses of a fixed probe set of patterns barely moved between the last
  two checkpoints (median angle, allowing the Rz(pi) twin); after the exact EMC iterations these are the last
  two iterations (each is checkpointed), not the poses before and after the polish, which it is meant to move;
- **information gain**: the fitted 3D model must explain the probe patterns better than the best
  orientation-free model, the spherically averaged intensity ``I(|q|)`` of the same patterns (both
  with each pattern's maximum-likelihood fluence scale). The gain is reported in nats per photon; a
  model that learned no 3D structure (a collapsed field, random poses) gains ~0 or less;
- **information limit** (:func:`shell_gains`): the same comparison per ``|q|`` shell (8 shells to the detector's
  corner; each pixel at the pattern's best grid pose found on the *other* half of its pixels, so the pose does
  not fit the shell's own noise); the limit is the outer edge of the first run of shells, from
  the centre out, where the model predicts the held-out photons significantly better. Inside the detector's inscribed
  circle that is a caveat printed with any status (:func:`information_limit_note`): the volume beyond it is
  noise. Measured on the 141 A 4-mer at 64x64: 0.25 of ``q_max`` at 1e2 photons (speckle correlation with the
  truth 0.82 inside 0.4 of the range, 0.30 over all of it), 0.625 at 1e3 (0.75) and 0.75 at 1e4 (0.90), i.e. to
  the inscribed circle (``Geometry.q_inscribed``, 0.73 of the corner's ``|q|``); the corners, sampled by few
  pixels, are noise in every fit;
- **pose spread**: each held-out pattern's pose posterior over the search grid (likelihood weights against the
  fitted field) spreads over ``exp(H)`` grid orientations; a few (a pose, its Rz(pi) twin, the mates of a
  nearly symmetric particle) is a determined pose, honestly multimodal; more than :data:`MAX_POSE_SPREAD` for
  more than half of the patterns means the data do not determine the poses (*unconverged*);
- **rotation-invariant agreement** (:mod:`bayes_spi.analysis.invariants`): the fitted intensity, at uniformly
  random poses, must reproduce the angular correlations between detector rings measured from the counts,
  which no pose assignment can change; a self-consistent wrong structure (decisive, stable poses of a nearly
  symmetric particle in a wrong frame) fails it (*failed* below :data:`MIN_INVARIANT_AGREEMENT`);
- **hypothesis weights**: the mean effective number of hypotheses ``exp(H(w))`` (reported; a broad
  posterior is honest at low photon counts and is not by itself a failure).

Statuses: ``converged`` (all checks pass), ``unconverged`` (schedule incomplete or ELBO still rising:
run longer, or poses not determined), ``failed`` (no information gain, unstable poses, spikes, or no
rotation-invariant agreement).

The probe patterns are held out of training (:class:`~bayes_spi.infer.trainer.Trainer` keeps 1/32 of the
data, 2 to 256 patterns, for this), so a field fitted to noise cannot earn information on them. Limits:
"converged" means the fit finished, is stable and learned 3D structure that predicts unseen patterns; it
does not mean the structure is right. The rotation-invariant check catches the one self-consistent wrong
solution measured (a near-octahedral 6-mer, BENCHMARKS.md), by a modest margin; two independent fits that
agree (``bayes-spi fit --half-sets``) remain the stronger truth-free test. The verdict goes to stdout/stderr,
``run.log``, ``verdict.json``, ``evaluation.json`` and the report.

Example::

    v = assess_fit(trainer)
    print(v.summary())
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bayes_spi.config.commands import flag
from bayes_spi.so3 import geodesic_angle, rotz_pi

__all__ = ["Verdict", "assess_fit", "invariant_check", "pose_decisiveness", "probe_grid_loglik", "read_verdict", "elbo_checks", "information_gain", "describe_q", "information_limit_note", "shell_gains", "pose_change_deg", "STATUSES"]

STATUSES = ("converged", "unconverged", "failed")

#: shells of :func:`shell_gains` (equal width in ``|q|`` over the probe pixels)
INFO_SHELLS = 8
#: a model must beat the radial average by at least this many nats per photon
MIN_GAIN_PER_PHOTON = 0.01
#: median change of the probe poses between the last two checkpoints, degrees
MAX_POSE_CHANGE_DEG = 10.0
#: a spike must also drop the ELBO per image by this fraction of its magnitude
SPIKE_REL = 0.02
#: relative ELBO improvement over the last tenth of the images that still counts as "rising"
PLATEAU_TOL = 0.005


@dataclass
class Verdict:
    """The outcome of :func:`assess_fit`.

    Attributes:
        status: ``converged``, ``unconverged`` or ``failed``.
        reasons: why it is not ``converged`` (empty when it is).
        checks: every measured number (``None`` where a check could not run).
    """

    status: str
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        c = self.checks
        parts = []
        if c.get("gain_per_photon") is not None:
            parts.append(f"information gain over the radial average {c['gain_per_photon']:.3f} nats/photon")
        if c.get("pose_change_deg") is not None:
            parts.append(f"probe poses moved {c['pose_change_deg']:.1f} deg since the previous checkpoint")
        if c.get("elbo_rel_change") is not None:
            parts.append(f"ELBO trend {100 * c['elbo_rel_change']:+.2f}% per tenth of the images")
        if c.get("invariant_agreement") is not None:
            parts.append(f"rotation-invariant agreement with the data {c['invariant_agreement']:.2f}")
        if c.get("probe_pose_spread") is not None:
            parts.append(f"pose posterior spread {c['probe_pose_spread']:.1f} grid orientations (median)")
        if c.get("effective_hypotheses") is not None:
            parts.append(f"effective hypotheses per pattern {c['effective_hypotheses']:.1f}")
        if c.get("information_q") is not None:
            q_info = float(c["information_q"])
            parts.append("held-out photons predicted better than by the radial average out to "
                         + (describe_q(q_info) if q_info > 0 else "no shell"))
        head = {"converged": "FIT CONVERGED", "unconverged": "FIT NOT CONVERGED",
                "failed": "FIT FAILED"}[self.status]
        text = f"{head}: " + "; ".join(parts)
        for r in self.reasons:
            text += f"\n  - {r}"
        limit = information_limit_note(c)
        if limit:
            text += f"\n  ! {limit}"
        if self.status == "failed":
            text += "\n  The reconstruction is not trustworthy; see BENCHMARKS.md (robustness) for what to change."
        return text


def describe_q(q: float) -> str:
    """``|q| = ... 1/A (d = ... nm)`` for ``q > 0`` in 1/A (``d = 1 / q``), as the verdict and the report print it.

    Example:
        >>> describe_q(0.04)
        '|q| = 0.0400 1/A (d = 2.50 nm)'
    """
    return f"|q| = {q:.4f} 1/A (d = {0.1 / q:.2f} nm)"


def information_limit_note(checks: dict[str, Any]) -> str | None:
    """The caveat a verdict prints when the field predicts held-out photons no better than their radial average
    inside the detector's inscribed circle (:func:`shell_gains`; ``checks``: ``information_q``, ``inscribed_q``):
    the volume beyond that ``|q|`` is not supported by the data, whatever the status. ``None`` without a caveat."""
    q_info, q_in = checks.get("information_q"), checks.get("inscribed_q")
    if q_info is None or q_in is None or q_info >= q_in:
        return None
    where = describe_q(q_info) if q_info > 0 else "the innermost shell"
    return (f"the data support the intensity only out to {where}, {100 * q_info / q_in:.0f}% of the detector's "
            f"inscribed circle (d = {0.1 / q_in:.2f} nm): beyond it the field predicts held-out photons no better "
            f"than their radial average, so treat those shells as noise (too few photons for this resolution); "
            f"`{flag('half_sets')}` measures the resolution")


def read_verdict(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's ``verdict.json`` as a dict without its format version (``None`` when the run has none), read
    through :meth:`~bayes_spi.infer.rundir.RunDir.read_json`.

    Raises:
        ValueError: the file is not a JSON object, or a :class:`~bayes_spi.infer.rundir.RunFormatError`.
    """
    from bayes_spi.infer.rundir import RunDir

    return RunDir(run_dir).read_json("verdict")


def _read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            try:
                rows.append({k: float(v) for k, v in r.items() if v not in (None, "")})
            except ValueError:
                continue
    return rows


def elbo_checks(rows: list[dict[str, float]], after_step: int = 0) -> dict[str, Any]:
    """ELBO plateau and spikes from ``metrics.csv`` rows: only rows at radius 1 and after ``after_step`` count
    (the EMC warm start's objective, the log marginal likelihood, is not the ELBO of the stage after it).

    Returns ``{"elbo_rel_change", "elbo_spikes", "rows_at_full_radius"}`` (``None`` where too few rows).
    """
    full = [r for r in rows if r.get("radius", 1.0) >= 0.999 and r.get("step", math.inf) > after_step
            and math.isfinite(r.get("elbo_per_image", math.nan))]
    out: dict[str, Any] = {"rows_at_full_radius": len(full), "elbo_rel_change": None, "elbo_trend_t": None,
                           "elbo_spikes": None}
    if len(full) < 6:
        return out
    img = np.array([r["images_seen"] for r in full])
    elbo = np.array([r["elbo_per_image"] for r in full])
    span = img[-1] - img[0]
    # the trend over the last 30% of the images: change per tenth of the images, relative, and its t statistic
    # (the rows are noisy mini-batch estimates; a difference of two tenths' means would flag noise)
    sel = img >= img[-1] - 0.3 * span
    if sel.sum() >= 4 and np.ptp(img[sel]) > 0:
        x, yv = img[sel].astype(np.float64), elbo[sel].astype(np.float64)
        xc = x - x.mean()
        slope = float((xc * (yv - yv.mean())).sum() / (xc**2).sum())
        resid = yv - yv.mean() - slope * xc
        se = float(np.sqrt((resid**2).sum() / max(len(x) - 2, 1) / (xc**2).sum()))
        out["elbo_rel_change"] = slope * 0.1 * span / max(abs(float(yv.mean())), 1e-12)
        out["elbo_trend_t"] = slope / se if se > 0 else float("inf")
    d = np.diff(elbo)
    mad = float(np.median(np.abs(d - np.median(d)))) * 1.4826
    # a spike: a drop beyond 5 robust standard deviations of the row-to-row changes and beyond 2% of the ELBO
    drop = np.median(d) - d
    out["elbo_spikes"] = int(np.sum((drop > 5 * mad) & (drop > SPIKE_REL * abs(float(np.median(elbo))))))
    return out


#: a held-out pattern whose pose posterior spreads over more than this many grid orientations (``exp`` of its
#: entropy on the search grid) is ambiguous; a pose and its Rz(pi) twin, each over a couple of grid points, is ~4
MAX_POSE_SPREAD = 8.0
#: above this fraction of ambiguous held-out patterns the fit is unconverged (the poses are not determined)
MAX_AMBIGUOUS = 0.5
#: below this rotation-invariant agreement (:func:`bayes_spi.analysis.invariants.invariant_agreement`) the fit failed
MIN_INVARIANT_AGREEMENT = 0.88
#: patterns read for the rotation-invariant check (streamed from the start of the data)
INVARIANT_PATTERNS = 16384


def pose_change_deg(R_a: torch.Tensor, R_b: torch.Tensor) -> float:
    """Median angle (degrees) between two pose sets ``(N, 3, 3)``, each pose allowed its Rz(pi) twin."""
    flip = rotz_pi(dtype=R_b.dtype, device=R_b.device)
    a = torch.minimum(geodesic_angle(R_a, R_b), geodesic_angle(R_a, R_b @ flip))
    return float(torch.rad2deg(a.median()))


@torch.no_grad()
def information_gain(model: Any, guide: Any, images: torch.Tensor, good: torch.Tensor,
                     ll_grid: torch.Tensor | None = None, held_out_pose: bool = True) -> dict[str, float]:
    """Log-likelihood per photon of the fitted model minus that of the radial-average model.

    With an orientation search on the guide, the model's side is the marginal likelihood over the search's
    whole grid (uniform pose prior: ``log (1/G) sum_g p(y | R_g)``), a Bayes factor against the radial model
    that pays for the orientation freedom; otherwise the likelihood at the guide's most probable pose.

    Args:
        model, guide: the fitted :class:`~bayes_spi.models.spi.SPIModel` and its guide.
        images: ``(B, n_y, n_x)`` probe patterns.
        good: ``(n_y * n_x,)`` bool good pixels.
        ll_grid: ``(B, G)`` the search's grid log-likelihoods of ``images`` (:func:`probe_grid_loglik`), when the
            caller has them; computed here (after a cache refresh) otherwise.
        held_out_pose: the per-shell gains (:func:`shell_gains`) with each pixel at the pose found on the other half
            of the pattern's pixels (the verdict's rule); ``False``: at the guide's most probable pose on all pixels
            (biased: the pose fits the shell's own noise; kept for comparison, ``benchmarks/bench_info_limit.py``).
    Returns:
        ``{"gain_per_photon", "loglik_model", "loglik_radial", "effective_hypotheses", "probe_mean_best_weight"}``
        (log-likelihoods per pattern, Poisson, each pattern's fluence scale at its maximum-likelihood value; the
        guide's mean weight of its most probable hypothesis) and the :func:`shell_gains` entries.
    """
    pixels = torch.nonzero(good).squeeze(-1)
    y = images.reshape(images.shape[0], -1)[:, pixels].to(torch.float64)
    n_tot = y.sum(-1)
    if hasattr(guide, "evaluating"):  # the posterior as a user reads it: eval mode, no training weight floor
        with guide.evaluating():
            post = guide.posterior(images, pixels)
    else:
        post = guide.posterior(images, pixels)
    rows = torch.arange(images.shape[0], device=images.device)
    best = post.rotations[rows, post.weights.argmax(-1)]  # (B, 3, 3)
    log_lam = model.log_rate(best, torch.zeros(images.shape[0], device=images.device), pixels).to(torch.float64)

    def profile_ll(log_lam: torch.Tensor) -> torch.Tensor:
        log_s = n_tot.clamp(min=1e-12).log() - torch.logsumexp(log_lam, -1)
        lam_log = log_lam + log_s[:, None]
        return (y * lam_log - lam_log.exp() - torch.lgamma(y + 1)).sum(-1)

    ll_model = profile_ll(log_lam)
    # radial model: shell means of counts / pixel factor over these patterns, shells one pixel wide
    qn = model.q[pixels].norm(dim=-1).to(torch.float64)
    factor = model.log_pixel_factor[pixels].to(torch.float64).exp()
    n_shells = max(8, int(math.sqrt(int(good.sum()))))
    shell = (qn / (qn.max() * (1 + 1e-9)) * n_shells).long()
    per_pix = (y / n_tot.clamp(min=1.0)[:, None]).sum(0) / factor
    sums = torch.zeros(n_shells, dtype=torch.float64, device=y.device).index_add_(0, shell, per_pix)
    cnt = torch.zeros(n_shells, dtype=torch.float64, device=y.device).index_add_(0, shell, torch.ones_like(per_pix))
    radial = (sums / cnt.clamp(min=1)).clamp(min=1e-12)[shell]
    ll_radial = profile_ll((radial * factor).log()[None].expand_as(y))
    if ll_grid is None:
        ll_grid = probe_grid_loglik(guide, images, good)
    shell_rates = _held_out_pose_log_rate(model, guide, images, pixels, log_lam) if held_out_pose else log_lam
    shells = shell_gains(y, shell_rates, (radial * factor).log(), qn, float(qn.max()))
    if ll_grid is not None:
        # a fair comparison: the 3D model's marginal likelihood over the whole orientation grid (log mean_g), not
        # its best orientation, whose maximum over G candidates alone gains ~log G nats over any fixed model
        ll_grid = ll_grid.to(torch.float64)
        rad_log_lam = (radial * factor).log()[None].expand_as(y)
        ll_rad_nc = (y * rad_log_lam).sum(-1) - n_tot * torch.logsumexp(rad_log_lam, -1)
        ll_model = torch.logsumexp(ll_grid, -1) - math.log(ll_grid.shape[-1]) - ll_rad_nc + ll_radial
    photons = float(n_tot.sum())
    w = post.weights.clamp(min=1e-30)
    ent = float((-(w * w.log()).sum(-1)).exp().mean())
    return {"gain_per_photon": float((ll_model - ll_radial).sum()) / max(photons, 1.0),
            "loglik_model": float(ll_model.mean()), "loglik_radial": float(ll_radial.mean()),
            "effective_hypotheses": ent, "probe_mean_best_weight": float(post.weights.max(-1).values.mean()),
            **shells}


def _held_out_pose_log_rate(model: Any, guide: Any, images: torch.Tensor, pixels: torch.Tensor,
                            fallback: torch.Tensor) -> torch.Tensor:
    """Log rates ``(B, M)`` on ``pixels`` with each pixel's pose chosen *without* it: the pixels split in two
    fixed random halves, each half's rates at the best grid rotation of the other half (the guide's orientation
    search, its cache already on the final field). A pose picked on all pixels fits their noise too (the best of
    G rotations): at 1e2 photons that alone makes noise shells look informative. ``fallback`` ``(B, M)`` (the
    guide's most probable pose on all pixels) without a homogeneous search."""
    search = getattr(guide, "search", None)
    rotations = getattr(search, "rotations", None)
    if search is None or rotations is None or len(pixels) < 4:
        return fallback
    halves = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(0)).to(pixels.device)
    halves = (halves[: len(pixels) // 2], halves[len(pixels) // 2:])
    out = torch.empty_like(fallback)
    for pick, score in (halves, halves[::-1]):
        ll = search.grid_loglik(images, pixels[pick])
        if ll.dim() != 2 or ll.shape[-1] != rotations.shape[0]:
            return fallback  # a class-aware search: (B, C, L, G)
        R = rotations.to(ll.device)[ll.argmax(-1)]  # (B, 3, 3)
        out[:, score] = model.log_rate(R, torch.zeros(images.shape[0], device=images.device),
                                       pixels[score]).to(out.dtype)
    return out


def shell_gains(y: torch.Tensor, log_lam: torch.Tensor, log_radial: torch.Tensor, qn: torch.Tensor, q_max: float,
                n_shells: int = INFO_SHELLS) -> dict[str, Any]:
    """Where the fitted model predicts held-out photons better than their radial average: per ``|q|`` shell.

    Each pattern's fluence is profiled over all its pixels, once for the model at its most probable pose and once
    for the radial model; the per-pixel log-likelihood difference ``y (log lam - log r) - (lam - r)`` (the
    ``log y!`` terms cancel) is summed per pattern within each of ``n_shells`` equal-width shells of ``[0, q_max]``.
    A shell is *informative* when its mean per-pattern gain is more than two standard errors above zero. The
    information limit is the outer edge of the first run of informative shells from the centre out (shells
    before it are skipped: the central speckle is nearly isotropic, so the radial average predicts it as well;
    shells without pixels, e.g. behind a beam stop, neither break nor extend the run).

    Args:
        y: ``(B, M)`` counts; log_lam: ``(B, M)`` the model's log rates up to a per-pattern constant;
        log_radial: ``(M,)`` the radial model's log rates up to a constant; qn: ``(M,)`` ``|q|`` (1/A);
        q_max: the outer edge of the last shell (1/A).

    Returns:
        ``{"shell_q_edges" (S + 1,), "shell_gain_per_photon" (S,), "shell_informative" (S,), "information_q",
        "information_fraction"}`` (lists and floats; ``information_q`` is 0 when no shell is informative).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> qn = torch.linspace(0.001, 0.1, 50)
        >>> lam = 5 + 4 * torch.cos(300 * qn)  # speckle everywhere ...
        >>> y = torch.poisson(lam.expand(200, 50))
        >>> model = torch.where(qn < 0.05, lam, 5 + 4 * torch.cos(300 * qn + 2))  # ... right only inside 0.05
        >>> out = shell_gains(y, model.log().expand(200, 50), torch.full((50,), 5.0).log(), qn, 0.1, n_shells=4)
        >>> out["shell_informative"], out["information_q"]
        ([True, True, False, False], 0.05)
    """
    y = y.to(torch.float64)
    n_tot = y.sum(-1)

    def rates(log_rate: torch.Tensor) -> torch.Tensor:
        log_rate = log_rate.to(torch.float64).expand_as(y)
        return log_rate + (n_tot.clamp(min=1e-12).log() - torch.logsumexp(log_rate, -1))[:, None]

    lm, lr = rates(log_lam), rates(log_radial[None])
    per_pix = y * (lm - lr) - (lm.exp() - lr.exp())  # (B, M)
    shell = (qn.to(torch.float64) / q_max * n_shells).long().clamp(0, n_shells - 1).to(y.device)
    gain = torch.zeros(y.shape[0], n_shells, dtype=torch.float64, device=y.device).index_add_(1, shell, per_pix)
    photons = torch.zeros_like(gain).index_add_(1, shell, y)
    has = torch.zeros(n_shells, dtype=torch.bool, device=y.device)
    has[shell] = True
    n_b = y.shape[0]
    mean = gain.mean(0)
    se = gain.std(0) / math.sqrt(n_b) if n_b > 1 else torch.full_like(mean, float("inf"))
    informative = (mean - 2 * se > 0) & has
    edges = [q_max * k / n_shells for k in range(n_shells + 1)]
    limit, started = 0.0, False
    for k in range(n_shells):
        if not bool(has[k]):
            continue
        if not bool(informative[k]):
            if started:
                break
            continue  # the central speckle is nearly isotropic: nothing to gain there yet
        started, limit = True, edges[k + 1]
    per_photon = (gain.sum(0) / photons.sum(0).clamp(min=1.0)).tolist()
    return {"shell_q_edges": edges, "shell_gain_per_photon": [float(v) for v in per_photon],
            "shell_informative": [bool(v) for v in informative.tolist()],
            "information_q": float(limit), "information_fraction": float(limit / q_max)}


@torch.no_grad()
def probe_grid_loglik(guide: Any, images: torch.Tensor, good: torch.Tensor) -> torch.Tensor | None:
    """The profile log-likelihood ``(B, G)`` of ``images (B, n_y, n_x)`` at every rotation of the guide's
    orientation search on the ``good`` pixels, after refreshing its cache on the final field (``None`` without a
    search): what :func:`information_gain` and :func:`pose_decisiveness` both read."""
    search = getattr(guide, "search", None)
    if search is None:
        return None
    search.refresh()
    return search.grid_loglik(images, torch.nonzero(good.reshape(-1)).squeeze(-1))


@torch.no_grad()
def pose_decisiveness(model: Any, guide: Any, images: torch.Tensor, good: torch.Tensor,
                      ll_grid: torch.Tensor | None = None) -> dict[str, float]:
    """How far the data determine the poses of ``images (B, n_y, n_x)``: the spread of each pattern's pose
    posterior over the orientation search's grid (likelihood weights against the fitted field, uniform prior),
    as an effective number of grid orientations ``exp(H)``.

    A pattern whose pose is pinned up to a few discrete modes (its Rz(pi) twin, the mates of a nearly symmetric
    particle) spreads over a handful of orientations; one the data do not pin spreads over tens or hundreds.
    Returns ``probe_pose_spread`` (the median ``exp(H)``) and ``probe_ambiguous_fraction`` (the fraction above
    :data:`MAX_POSE_SPREAD`). Empty without a search. ``ll_grid``: the grid log-likelihoods ``(B, G)`` when the
    caller has them (:func:`probe_grid_loglik`). ``model`` is kept for the callers' signature."""
    if ll_grid is None:
        ll_grid = probe_grid_loglik(guide, images, good)
    if ll_grid is None:
        return {}
    p = torch.softmax(ll_grid.to(torch.float64), -1)
    spread = (-(p * p.clamp(min=1e-300).log()).sum(-1)).exp()  # (B,)
    return {"probe_pose_spread": float(spread.median()),
            "probe_ambiguous_fraction": float((spread > MAX_POSE_SPREAD).double().mean())}


def invariant_check(trainer: Any) -> dict[str, Any]:
    """The rotation-invariant posterior predictive check (:func:`bayes_spi.analysis.invariants.invariant_agreement`)
    of a trainer's model on the first :data:`INVARIANT_PATTERNS` patterns of its data, streamed. Empty for a model
    it does not apply to (non-uniform pose prior, a heterogeneous model, no data)."""
    from bayes_spi.analysis.invariants import invariant_agreement
    from bayes_spi.models.priors import UniformPosePrior

    from bayes_spi.models.heterogeneous import HeterogeneousSPIModel

    model, dataset = trainer.model, getattr(trainer, "dataset", None)
    if (dataset is None or not hasattr(model, "total_log_rate") or isinstance(model, HeterogeneousSPIModel)
            or not isinstance(getattr(model, "pose_prior", None), UniformPosePrior)):
        return {}
    n = min(int(dataset.n_patterns), INVARIANT_PATTERNS)

    def batches() -> Any:
        seen = 0
        for _, counts in dataset.iter_batches(512, shuffle=False):
            if seen >= n:
                return
            counts = torch.as_tensor(counts[: n - seen])
            seen += counts.shape[0]
            yield counts

    pixels = torch.nonzero(trainer._good.reshape(-1)).squeeze(-1)
    return invariant_agreement(model, pixels, batches(), n_rotations=1024)


def assess_fit(trainer: Any) -> Verdict:
    """The verdict of a finished (or stopped) fit run by a :class:`~bayes_spi.infer.trainer.Trainer`."""
    checks: dict[str, Any] = {}
    reasons_fail: list[str] = []
    reasons_unc: list[str] = []
    st = trainer.state
    checks["steps"] = int(st.step)
    checks["total_steps"] = int(trainer.total_steps)
    checks["schedule_complete"] = bool(st.step >= trainer.total_steps)
    if not checks["schedule_complete"]:
        reasons_unc.append(f"the schedule stopped at step {st.step} of {trainer.total_steps} (radius "
                           f"{trainer.radius(max(st.step - 1, 0)):.2f} of the detector edge): run longer")
    emc_end = int(getattr(trainer, "emc_end", 0))
    last_stage_start = emc_end if emc_end < st.step else 0
    checks.update(elbo_checks(_read_metrics(trainer.metrics_path), after_step=last_stage_start))
    if (checks["elbo_rel_change"] is not None and checks["elbo_rel_change"] > PLATEAU_TOL
            and (checks["elbo_trend_t"] or 0.0) > 3.0):
        reasons_unc.append(f"the ELBO was still rising ({100 * checks['elbo_rel_change']:+.2f}% per tenth of the images, "
                           f"t = {checks['elbo_trend_t']:.1f}): run longer")
    if checks["elbo_spikes"]:
        reasons_fail.append(f"{checks['elbo_spikes']} ELBO spike(s) after the curriculum (an optimisation collapse)")
    probe = getattr(trainer, "probe_images", None)
    checks["pose_change_deg"] = None
    if probe is not None:
        prev = getattr(trainer, "probe_previous", None)
        cur = trainer.probe_poses()
        # the last two records straddle the start of the exact EMC iterations (a single one was run): the polish
        # is meant to move the poses, so their change says nothing about stability
        prev_key = getattr(trainer, "probe_previous_step", (-1, -1))
        last_key = getattr(trainer, "_probe_step", (-1, -1))
        straddle = prev_key[1] == 0 and last_key[1] >= 1
        checks["pose_change_skipped"] = bool(prev is not None and straddle)
        if prev is not None and not straddle:
            checks["pose_change_deg"] = pose_change_deg(prev, cur)
            if checks["pose_change_deg"] > MAX_POSE_CHANGE_DEG:
                reasons_fail.append(f"the most probable poses of the probe patterns moved {checks['pose_change_deg']:.0f} "
                                    f"deg (median) since the previous checkpoint (> {MAX_POSE_CHANGE_DEG:.0f}): "
                                    "the pose posteriors are not stable")
        # one grid pass over the probe patterns serves the information gain and the pose spread
        ll_grid = probe_grid_loglik(trainer.guide, probe, trainer._good)
        gain = information_gain(trainer.model, trainer.guide, probe, trainer._good, ll_grid=ll_grid)
        checks.update(gain)
        if gain["gain_per_photon"] < MIN_GAIN_PER_PHOTON:
            reasons_fail.append(f"the 3D model explains the patterns no better than their radial average "
                                f"({gain['gain_per_photon']:.4f} nats/photon < {MIN_GAIN_PER_PHOTON}): no 3D structure "
                                "was learned (collapsed field or random poses)")
        geometry = getattr(getattr(trainer, "dataset", None), "geometry", None)
        checks["inscribed_q"] = None if geometry is None else float(geometry.q_inscribed)
        dec = pose_decisiveness(trainer.model, trainer.guide, probe, trainer._good, ll_grid=ll_grid)
        checks.update(dec)
        if dec and dec["probe_ambiguous_fraction"] > MAX_AMBIGUOUS:
            reasons_unc.append(f"the poses are not determined: {100 * dec['probe_ambiguous_fraction']:.0f}% of the "
                               f"held-out patterns spread their pose posterior over more than {MAX_POSE_SPREAD:.0f} "
                               f"grid orientations (> {100 * MAX_AMBIGUOUS:.0f}%; median spread "
                               f"{dec['probe_pose_spread']:.1f}; 1-3 on fits that found the truth, 22 on a 1e2-photon fit "
                               "that did not): too few photons for this particle, or a wrong structure")
    inv = invariant_check(trainer)
    checks.update(inv)
    if inv.get("invariant_agreement") is not None and inv["invariant_agreement"] < MIN_INVARIANT_AGREEMENT:
        reasons_fail.append(f"the fitted intensity does not reproduce the data's rotation-invariant angular "
                            f"correlations (agreement {inv['invariant_agreement']:.2f} < {MIN_INVARIANT_AGREEMENT}; "
                            "0.92-0.99 on fits that found the truth, 0.82-0.84 on a self-consistent wrong one): "
                            f"a wrong or incomplete structure; try `{flag('half_sets')}`, `{flag('symmetry')}` or more patterns")
    status = "failed" if reasons_fail else ("unconverged" if reasons_unc else "converged")
    return Verdict(status, reasons_fail + reasons_unc, checks)
