"""All settings of a fit, in one dataclass that is written to ``config.yaml``.

Priors and the likelihood are *specs*: plain dicts ``{"name": ..., parameters...}`` (or their
command-line strings, e.g. ``"preferred:axis=0,0,1;kappa=2"``), checked and completed with their
defaults by :func:`bayes_spi.config.specs.normalize_spec` and turned into objects by
:func:`bayes_spi.infer.build.build_model_and_guide`.

Example:
    >>> cfg = FitConfig(batch_size=16, epochs=2)
    >>> FitConfig.from_dict(cfg.to_dict()) == cfg
    True
    >>> FitConfig(pose_prior="preferred:kappa=2").pose_prior
    {'name': 'preferred', 'axis': [0.0, 0.0, 1.0], 'kappa': 2.0}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field as dc_field
from typing import Any

from bayes_spi.config.fields import FIELD_NAMES, FIELDS, names_text
from bayes_spi.config.specs import normalize_spec, parse_spec
from bayes_spi.models.latent import LATENT_RULES
from bayes_spi.infer.polish import MERGE_PSEUDO_PHOTONS

__all__ = ["CLASS_POSTERIORS", "FitConfig"]

_DEFAULT_SCALE_SIGMA = 0.5
_DEFAULT_BACKGROUND = 0.0
#: the class posteriors a heterogeneous fit can export (``FitConfig.class_posterior``)
CLASS_POSTERIORS = ("refined", "guide")


@dataclass
class FitConfig:
    """Settings of ``bayes-spi fit``; defaults suit a 32x32 detector and ~1e4 photons per pattern.

    Data:
        online: stream the file once in order, each pattern seen once (``epochs`` is ignored).
        epochs: passes over the data (offline; the order is reshuffled every epoch).
        batch_size: patterns per SVI step.
        max_images: stop after this many patterns (``None``: all epochs).
        max_minutes: a training-time budget: the trainer sizes the schedule from the throughput it
        measures (:meth:`~bayes_spi.infer.trainer.Trainer.plan_for_budget`) so that it completes in time;
        a 1.5x overrun is a clean safety stop (checkpoint, outputs, an unconverged verdict).
        mask: an extra mask file combined (logical AND of the good pixels) with the data file's own mask:
        ``FILE.byt[:ROWSxCOLUMNS]`` (pnCCD/Dragonfly, one byte a pixel, 0 = good), ``FILE.npy`` or
        ``FILE.h5:/dataset`` (True/1 = good); see :mod:`bayes_spi.dataio.masks`. ``""``: none.
        mask_bin: the data's binning (``N x N``) relative to the detector the ``mask`` and ``background_file``
        were written for (1: the same pixels); a binned pixel is good only if all its pixels are.
        background_file: a measured mean background per pixel (photons per pixel per pattern; ``.npy`` or
        ``FILE.h5:/dataset``), an additive rate ``b B_k`` in the likelihood with a fitted scale ``b``
        (:mod:`bayes_spi.models.background`); ``""``: none. background_scale: ``global`` (one ``b``) or
        ``per-pattern``.
    Model:
        field: a kind of the registry :data:`bayes_spi.config.fields.FIELDS`: ``siren``, ``fouriernet``,
            ``voxel``, ``hybrid`` (SIREN plus a voxel residual on ``voxel_grid``) or ``variational``;
            ``field_width``/``field_depth``/
        ``field_w0`` its size and first-layer frequency; ``voxel_grid`` the grid size of the voxel field.
        ``variational``: a posterior over the amplitudes ``|F|`` on a ``variational_grid``^3 grid (LogNormal,
        location and scale from a SIREN) with a Wilson prior (``variational_prior``: ``{"sigma": "learned" |
        "composition", "structure", "n_basis", "centric"}``), initial relative scale
        ``variational_scale_init`` and KL weight ``variational_kl_weight`` (1: the plain ELBO); see
        :mod:`bayes_spi.models.variational_field`. It is itself the Wilson model of the intensity, so it
        takes no ``intensity_prior``.
        pose_prior: pose prior spec (``uniform``; ``preferred`` with ``axis``, ``kappa``).
        scale_prior: fluence-scale prior spec (``lognormal`` with ``sigma``; ``pr772``; ``empirical`` with
        ``file``, ``bins``, ``smoothing``); ``None``: ``lognormal`` with ``scale_prior_sigma``.
        likelihood: likelihood spec (``poisson``; ``poisson-gaussian`` with ``sigma``; both with
        ``background``); ``None``: ``poisson`` with ``background``.
        intensity_prior: intensity prior spec (``none``; ``wilson`` with its parameters).
        symmetry: the particle's point group, ``C1`` (none), ``Cn``, ``Dn``, ``T``, ``O`` or ``I`` in the standard
        orientations of :mod:`bayes_spi.symmetry`: the field is invariant under it by construction, the
        orientation grid covers the pose fundamental zone only (``search_rotations`` rotations there: a
        ``|G|^(1/3)`` times finer spacing at the same cost) and pose errors are taken modulo the group.
        scale_prior_sigma, background: the older settings (config.yaml files written before the specs
        existed still load): kept equal to the lognormal spec's ``sigma`` and the likelihood spec's
        ``background``; when one of a pair is left at its default the other wins, two different
        non-default values are an error.
        See :mod:`bayes_spi.config.specs` for every name and parameter.
    Heterogeneity (:mod:`bayes_spi.models.heterogeneous`):
        latent_dim: per-pattern continuous structure latent ``z_i ~ latent_prior`` of this dimension, the field
        FiLM-conditioned on it (0: the homogeneous model). n_classes: discrete classes ``c_i ~ class_prior``, one
        field each, enumerated exactly (1: none). latent_prior: ``normal[:scale=S]`` or ``studentt:df=D``;
        class_prior: ``uniform`` or ``learned``. With either on, the orientation search is class-aware (``n_search``
        proposals per class, :mod:`bayes_spi.guides.class_search`), the EMC warm start sums over classes and
        latent points (:mod:`bayes_spi.infer.class_emc`), and the exact EMC polish (one homogeneous field) is off:
        ``polish_iterations`` is set to 0. latent_nodes: quadrature points per latent dimension at which the
        search and the EMC warm start evaluate the class fields (``latent_nodes ** latent_dim`` caches per class).
        latent_rule: their rule (:func:`bayes_spi.guides.class_search.latent_nodes`): ``hermite`` (Gauss-Hermite)
        or ``equal`` (equal-probability bins, each point at its bin's mean, equal weights).
        latent_start: with a continuous latent, the first fraction of the EMC warm start during which each
        pattern's latent point weights are pulled towards a start latent from its ring anisotropy (a data start,
        :mod:`bayes_spi.infer.latent_start`); 0: off. latent_anneal: with a continuous latent, the first fraction
        of the EMC warm start over which the latent points' posterior is tempered (deterministic annealing,
        :class:`~bayes_spi.infer.class_emc.ClassGridMarginal`), its exponent rising geometrically from
        ``latent_anneal_beta`` to 1; 0: off. class_posterior: the class posterior a fit with
        ``n_classes > 1`` exports (``latent_posterior.h5``, the per-class volumes' members, the latent figure):
        ``refined`` (the default: each class's best grid poses refined off the grid, Laplace evidence,
        :mod:`bayes_spi.posterior.class_refine`; the coarse grid blurs speckles a few degrees wide) or ``guide``
        (the amortized guide's ``q(c_i)``).
    Guide:
        n_heads: pose proposals per pattern (``2 * n_heads`` hypotheses with their Rz(pi) partners).
        encoder_features, encoder_channels, transform: the CNN encoder.
        n_search, search_rotations, search_every: proposals per pattern from an exhaustive search over a
        fixed grid of ``search_rotations`` rotations (field cache refreshed every ``search_every`` steps);
        0 turns the search off.
        search_grid: ``fibonacci`` (quasi-uniform Super-Fibonacci spiral, default) or ``random``.
        auto_settings: derive ``field_w0``, ``field_width``, ``search_rotations``, ``cache_grid``, the field kind
        and its ``voxel_grid``, ``polish_iterations`` and ``polish_beta`` from the data (particle size estimated
        from the mean pattern, :mod:`bayes_spi.analysis.sampling`) unless they are given explicitly; done by
        :func:`bayes_spi.infer.autoset.data_settings` before a fit starts, the values used are recorded.
        cache_grid: odd voxels per side of the field cache read by the search and the EMC warm start
        (from the particle size with ``auto_settings``: about two voxels per speckle).
        emc_fraction: fraction of the data batches trained by the EMC warm start (:mod:`bayes_spi.infer.emc`:
        the field is fitted to the exact marginal likelihood over the whole orientation grid, EMC's
        E-step, before the amortized guide takes over); 0 turns it off. ``emc_batches`` data batches form
        one warm-start step (its cost is mostly per step), ``emc_pixels`` pixels per pattern enter it
        (0 = all eligible), ``emc_beta`` (<= 1) tempers its posterior (deterministic annealing).
        ``emc_subset_posterior``: the warm start's orientation posterior is the posterior given the pixels the
        step reads (its tempering divided by the subsample's weight ``n_eligible / M``), not the subsample's
        log-likelihood scaled up to the whole pattern, which sharpens the posterior by that factor while its
        noise grows with it (on a 128x128 detector ~16x: one effective orientation per pattern from the first
        step). The objective is then the subsample's log marginal, scaled.
        ``emc_pixel_sampling``: ``uniform`` draws the warm start's ``emc_pixels`` at random among the eligible
        pixels; ``photons`` draws them with probability proportional to the data's mean count per pixel (plus a
        tenth of the average pixel's), without replacement: at 0.06 photons per pixel (128x128, 1e3 photons) a
        uniform 1,024 of 16,372 pixels hold 6% of a pattern's photons and cannot place it even on the true
        intensity, a photon-weighted 1,024 hold ~75% (BENCHMARKS.md, issue 11, seventh session).
        polish_iterations: exact EMC iterations at the end of the fit (E-step over every pattern and the whole
        orientation grid, exact M-step into the field's voxels: :mod:`bayes_spi.infer.polish`); needs a field
        with voxels (``hybrid`` or ``voxel``), skipped otherwise. ``polish_patterns``: patterns merged per
        iteration (the first of the file; 0 = all), so that its cost does not grow with the data set.
        ``polish_refined``: the last ``polish_refined`` of those iterations merge every pattern whose orientation
        posterior is concentrated (on at most 2 grid rotations) at its likelihood's refined modes instead of
        the nearest grid rotations (:meth:`~bayes_spi.infer.polish.EMCPolish.iterate`; ~1/4 of the grid
        spacing blurs the outer shells otherwise); 0 = never. ``polish_beta``: tempering of the first exact
        iteration, rising geometrically over the grid iterations, the refined ones at 1
        (:func:`~bayes_spi.infer.polish.polish_beta_schedule`; 1 = every iteration untempered).
        ``polish_prior``: the exact M-step's Gamma prior, in photons a voxel at the field's intensity before the
        merge (``(photons + P) / (exposure + P / I_before)``; 0 = the plain average, EMC's merge;
        :data:`~bayes_spi.infer.polish.MERGE_PSEUDO_PHOTONS`).
        distill_weight: weight of the amortization loss that pulls the encoder's closest proposal to the
        most probable hypothesis (teaches the encoder what the search found).
        weight_floor: initial hypothesis-weight floor, decayed linearly to 0 over ``floor_decay``
        of the steps.
    Optimisation:
        lr, lr_final: Adam learning rate, decayed geometrically from ``lr`` to ``lr_final``.
        clip_norm: gradient clipping.
        pixels_per_pattern: pixels in the likelihood per step (a random subset, scaled to stay unbiased;
        0 = all eligible pixels).
        radius_start, radius_ramp: coarse-to-fine: only pixels with ``|q| <= r q_max`` enter the
        likelihood, ``r`` widening from ``radius_start`` to 1 over the first ``radius_ramp`` of the steps.
    Run:
        seed, device (``auto``: CUDA when present), log_every, checkpoint_every (steps).
    """

    online: bool = False
    epochs: int = 1
    batch_size: int = 32
    max_images: int | None = None
    max_minutes: float | None = None
    mask: str = ""
    mask_bin: int = 1
    background_file: str = ""
    background_scale: str = "global"

    field: str = "siren"
    field_width: int = 64
    field_depth: int = 3
    field_w0: float = 10.0
    voxel_grid: int = 33
    variational_grid: int = 33
    variational_prior: dict[str, Any] = dc_field(default_factory=lambda: {"sigma": "learned"})
    variational_scale_init: float = 0.1
    variational_kl_weight: float = 1.0
    scale_prior_sigma: float = _DEFAULT_SCALE_SIGMA
    background: float = _DEFAULT_BACKGROUND
    pose_prior: dict[str, Any] | str = dc_field(default_factory=lambda: {"name": "uniform"})
    scale_prior: dict[str, Any] | str | None = None
    likelihood: dict[str, Any] | str | None = None
    intensity_prior: dict[str, Any] | str = dc_field(default_factory=lambda: {"name": "none"})
    symmetry: str = "C1"

    latent_dim: int = 0
    n_classes: int = 1
    latent_prior: str = "normal"
    class_prior: str = "uniform"
    latent_nodes: int = 3
    latent_rule: str = "hermite"
    latent_start: float = 0.0
    latent_anneal: float = 0.0
    latent_anneal_beta: float = 0.05
    class_posterior: str = "refined"

    n_heads: int = 4
    encoder_features: int = 256
    encoder_channels: int = 32
    transform: str = "log1p"
    n_search: int = 2
    search_rotations: int = 4096
    search_every: int = 5
    search_grid: str = "fibonacci"
    auto_settings: bool = True
    cache_grid: int = 41
    emc_fraction: float = 0.75
    emc_batches: int = 4
    emc_pixels: int = 1024
    emc_beta: float = 1.0
    emc_subset_posterior: bool = True
    emc_pixel_sampling: str = "photons"
    polish_iterations: int = 3
    polish_patterns: int = 50000
    polish_refined: int = 2
    polish_beta: float = 1.0
    polish_prior: float = MERGE_PSEUDO_PHOTONS
    distill_weight: float = 100.0
    weight_floor: float = 0.4
    floor_decay: float = 0.6

    lr: float = 5e-3
    lr_final: float = 1e-4
    clip_norm: float = 10.0
    pixels_per_pattern: int = 256
    radius_start: float = 0.4
    radius_ramp: float = 0.6

    seed: int = 0
    device: str = "auto"
    log_every: int = 20
    checkpoint_every: int = 200

    extra: dict[str, Any] = dc_field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, "batch_size", ">= 1", self.batch_size),
            (self.epochs >= 1, "epochs", ">= 1", self.epochs),
            (self.max_images is None or self.max_images >= 1, "max_images", ">= 1 or None", self.max_images),
            (self.max_minutes is None or self.max_minutes > 0, "max_minutes", "> 0 or None", self.max_minutes),
            (self.n_search >= 0 and self.search_rotations >= max(self.n_search, 1), "n_search/search_rotations",
             "n_search >= 0 and search_rotations >= n_search", (self.n_search, self.search_rotations)),
            (self.distill_weight >= 0, "distill_weight", ">= 0", self.distill_weight),
            (self.cache_grid >= 3 and self.cache_grid % 2 == 1, "cache_grid", "an odd integer >= 3", self.cache_grid),
            (0 <= self.emc_fraction <= 1, "emc_fraction", "in [0, 1]", self.emc_fraction),
            (self.emc_batches >= 1 and self.emc_pixels >= 0, "emc_batches/emc_pixels", ">= 1 / >= 0",
             (self.emc_batches, self.emc_pixels)),
            (0 < self.emc_beta <= 1, "emc_beta", "in (0, 1]", self.emc_beta),
            (self.emc_pixel_sampling in ("uniform", "photons"), "emc_pixel_sampling", "'uniform' or 'photons'",
             self.emc_pixel_sampling),
            (self.polish_iterations >= 0, "polish_iterations", ">= 0", self.polish_iterations),
            (self.polish_patterns >= 0, "polish_patterns", ">= 0", self.polish_patterns),
            (self.polish_refined >= 0, "polish_refined", ">= 0", self.polish_refined),
            (0 < self.polish_beta <= 1, "polish_beta", "in (0, 1]", self.polish_beta),
            (self.polish_prior >= 0, "polish_prior", ">= 0", self.polish_prior),
            (self.search_grid in ("fibonacci", "random"), "search_grid", "fibonacci or random", self.search_grid),
            (self.n_heads >= 1, "n_heads", ">= 1", self.n_heads),
            (self.mask_bin >= 1, "mask_bin", ">= 1", self.mask_bin),
            (self.background_scale in ("global", "per-pattern"), "background_scale", "global or per-pattern",
             self.background_scale),
            (self.lr > 0 and self.lr_final > 0, "lr/lr_final", "> 0", (self.lr, self.lr_final)),
            (0 < self.radius_start <= 1, "radius_start", "in (0, 1]", self.radius_start),
            (0 <= self.radius_ramp <= 1, "radius_ramp", "in [0, 1]", self.radius_ramp),
            (0 <= self.weight_floor < 1, "weight_floor", "in [0, 1)", self.weight_floor),
            (self.pixels_per_pattern >= 0, "pixels_per_pattern", ">= 0", self.pixels_per_pattern),
            (self.field in FIELDS, "field", names_text(FIELD_NAMES), self.field),
            (self.variational_grid >= 5 and self.variational_grid % 2 == 1, "variational_grid", "an odd integer >= 5",
             self.variational_grid),
            (self.variational_scale_init > 0 and self.variational_kl_weight >= 0,
             "variational_scale_init/variational_kl_weight", "> 0 and >= 0",
             (self.variational_scale_init, self.variational_kl_weight)),
            (self.scale_prior_sigma > 0, "scale_prior_sigma", "> 0", self.scale_prior_sigma),
            (self.log_every >= 1 and self.checkpoint_every >= 1, "log_every/checkpoint_every", ">= 1",
             (self.log_every, self.checkpoint_every)),
        ]
        checks += [(self.latent_dim >= 0, "latent_dim", ">= 0", self.latent_dim),
                   (self.latent_nodes >= 1, "latent_nodes", ">= 1", self.latent_nodes),
                   (self.latent_rule in LATENT_RULES, "latent_rule", " or ".join(LATENT_RULES), self.latent_rule),
                   (0 <= self.latent_start <= 1, "latent_start", "in [0, 1]", self.latent_start),
                   (0 <= self.latent_anneal <= 1, "latent_anneal", "in [0, 1]", self.latent_anneal),
                   (0 < self.latent_anneal_beta <= 1, "latent_anneal_beta", "in (0, 1]", self.latent_anneal_beta),
                   (self.n_classes >= 1, "n_classes", ">= 1", self.n_classes),
                   (self.class_posterior in CLASS_POSTERIORS, "class_posterior", " or ".join(CLASS_POSTERIORS),
                    self.class_posterior)]
        for ok, name, expected, got in checks:
            if not ok:
                raise ValueError(f"fit setting {name}: expected {expected}, got {got!r}")
        if self.heterogeneous:
            if not FIELDS[self.field].latent:
                raise ValueError(f"fit setting field: expected {names_text(n for n, k in FIELDS.items() if k.latent)} "
                                 "with latent_dim > 0 or "
                                 f"n_classes > 1 (a SIREN to condition), got {self.field!r}")
            self.polish_iterations = 0
        self._normalize_specs()
        self._check_symmetry()
        if FIELDS[self.field].variational and self.intensity_prior.get("name") != "none":
            raise ValueError(f"fit setting intensity_prior: expected none with field {self.field} (the variational "
                             f"field carries its own Wilson prior), got {self.intensity_prior.get('name')!r}")

    def _check_symmetry(self) -> None:
        """Canonical spelling of ``symmetry``; the variational field takes only the mirror-generated groups."""
        from bayes_spi.symmetry import parse_symmetry, point_group

        try:
            self.symmetry = parse_symmetry(self.symmetry)
        except ValueError as exc:
            raise ValueError(f"fit setting {exc}") from None
        if FIELDS[self.field].variational and point_group(self.symmetry).fold_cosets().shape[0] != 1:
            raise ValueError(f"fit setting symmetry: expected C1, I, O or Dn with n even with field {self.field}, "
                             f"got {self.symmetry!r}")

    @property
    def heterogeneous(self) -> bool:
        """A per-pattern structure latent or class is on (``latent_dim > 0`` or ``n_classes > 1``)."""
        return self.latent_dim > 0 or self.n_classes > 1

    def _normalize_specs(self) -> None:
        """Check the prior/likelihood specs, fill in defaults, keep the older scalar settings in step."""
        self.pose_prior = normalize_spec("pose_prior", self.pose_prior)
        self.intensity_prior = normalize_spec("intensity_prior", self.intensity_prior)

        scale = self.scale_prior
        if scale is None:
            scale = {"name": "lognormal", "sigma": self.scale_prior_sigma}
        scale = normalize_spec("scale_prior", parse_spec(scale) if isinstance(scale, str) else scale)
        if scale["name"] == "lognormal":
            scale["sigma"], self.scale_prior_sigma = self._reconcile(
                "scale_prior_sigma", self.scale_prior_sigma, _DEFAULT_SCALE_SIGMA, "scale_prior sigma", scale["sigma"])
        elif self.scale_prior_sigma != _DEFAULT_SCALE_SIGMA:
            raise ValueError(f"fit setting scale_prior_sigma: applies to the lognormal scale prior only, got "
                             f"{self.scale_prior_sigma!r} with scale_prior {scale['name']!r}")
        self.scale_prior = scale

        lik = self.likelihood
        if lik is None:
            lik = {"name": "poisson", "background": self.background}
        lik = normalize_spec("likelihood", parse_spec(lik) if isinstance(lik, str) else lik)
        lik["background"], self.background = self._reconcile(
            "background", self.background, _DEFAULT_BACKGROUND, "likelihood background", lik["background"])
        self.likelihood = lik

    @staticmethod
    def _reconcile(name: str, old: float, default: float, spec_name: str, new: float) -> tuple[float, float]:
        """One value for an older scalar setting and its spec parameter: the non-default one wins."""
        if old == new or old == default:
            return new, new
        if new == default:
            return old, old
        raise ValueError(f"fit setting {name}: expected the same value as the {spec_name}, got {old!r} and {new!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FitConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown fit settings {unknown}: expected a subset of {sorted(names)}")
        return cls(**d)
