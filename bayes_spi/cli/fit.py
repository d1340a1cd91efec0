"""Fit the Bayesian SPI model to a data file by stochastic variational inference.

DATA is a bayes-spi HDF5 file (see `bayes-spi simulate`, `bayes-spi convert`), or a foreign file read directly
with the options of `bayes-spi convert` (Dragonfly .emc with --detector and --photon-energy, .cxi, a .npy or
FILE.h5:/dataset stack with --geometry; they are recorded for --resume); it is validated before anything is written
(every pattern is read once; --no-check-data skips the value scan). RUN (-o) is the run directory:
config.yaml (every setting, versions, the command line), run.log, checkpoint.pt (atomic, every
--checkpoint-every steps), metrics.csv, and at the end model.pt, intensity.mrc / intensity.h5 (the 3D
intensity on a --grid cube up to the detector's q_max; MRC voxel size in 1/A; a variational field also
writes intensity_sd.mrc/.h5), posterior.h5 (per-image pose and fluence posteriors), report.html with
report/*.png and the overview report.png, and, when the data file holds the truth, evaluation.json and
fsc.json (orientation errors, fluence correlation, intensity and density FSC).

A RUN that already holds a checkpoint or model is never overwritten: continue it with --resume (the
settings then come from RUN/config.yaml and training options given on the command line are ignored with
a warning; DATA may be omitted; --grid defaults to the run's own) or start afresh with --force. One fit at a
time runs on a RUN: RUN/fit.lock holds its pid while it runs, a second fit on the same RUN is refused at once,
and the lock of a process that has died is taken over. Options not given take the defaults shown.

Priors and the likelihood are chosen by SPEC: NAME, or NAME:KEY=VALUE;KEY=VALUE... (":" also separates
parameters, so no shell quoting is needed; vectors are comma-separated), all recorded in config.yaml:

\b
  --pose-prior       uniform | preferred:axis=0,0,1:kappa=2
  --scale-prior      lognormal:sigma=0.5 | pr772 | empirical:file=totals.npy:bins=100:smoothing=auto
  --likelihood       poisson[:background=0] | poisson-gaussian:sigma=0.3[:background=0]
  --intensity-prior  none | wilson[:weight=1:sigma=learned|composition:structure=2CEX:diameter_A=72]

preferred: the beam direction R e_z (molecule frame) is von Mises-Fisher about axis with concentration
kappa, the in-plane angle uniform. pr772: the packaged PR772 photon-count distribution; empirical: the
same from a file of per-image photon totals (.npy (N,), .npz 'values', .csv column 'value') or a
histogram (.npy (2, J) centres and weights, .npz 'edges'+'counts' or 'centres'+'counts', .csv columns
'edge'/'centre' and 'count'), normalised to mean 1 and smoothed in log s. poisson-gaussian: Poisson
photons plus Gaussian read-out noise of sigma photons, clipped at 0 and rounded.

Example: bayes-spi fit data.h5 -o run1 --epochs 2 --batch-size 32

Example with priors: bayes-spi fit data.h5 -o run2 --pose-prior preferred:axis=0,0,1:kappa=2 --scale-prior pr772
--likelihood poisson-gaussian:sigma=0.3
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields as dc_fields
from pathlib import Path
from typing import Any

import click

from bayes_spi.cli.convert import options_from_cli, source_options
from bayes_spi.config.fields import FIELD_NAMES, fields_help
from bayes_spi.workflows.fit import RESUME_OVERRIDABLE, RUN_FILES

__all__ = ["command", "TRAINING_OPTIONS", "RESUME_OVERRIDABLE", "RUN_FILES", "run_fit", "run_halfsets", "print_summary"]


#: FitConfig fields exposed as options (option name = field name with "-" for "_")
TRAINING_OPTIONS: tuple[str, ...] = (
    "online", "epochs", "batch_size", "max_images", "max_minutes", "field", "field_width", "field_depth", "field_w0",
    "voxel_grid", "n_heads", "n_search", "search_rotations", "weight_floor", "auto_settings", "emc_fraction", "emc_beta", "polish_iterations", "polish_patterns", "polish_refined", "polish_beta", "polish_prior", "lr", "lr_final", "pixels_per_pattern", "radius_start", "radius_ramp", "scale_prior_sigma",
    "pose_prior", "scale_prior", "likelihood", "intensity_prior", "symmetry", "seed", "device", "checkpoint_every", "log_every",
    "latent_dim", "n_classes", "latent_prior", "class_prior", "latent_nodes", "latent_rule",
    "class_posterior",
)

_HELP = {
    "online": "Stream the file once, each pattern seen once (--epochs ignored); --offline: shuffled epochs.",
    "epochs": "Passes over the data (offline).",
    "batch_size": "Patterns per SVI step.",
    "max_images": "Stop after this many patterns.",
    "max_minutes": "Training-time budget: the schedule (curriculum, learning rate, EMC hand-over) is sized from the "
                   "throughput measured in the first steps of each stage so that it completes in time; a 1.5x "
                   "overrun stops cleanly and the verdict says unconverged (honoured with --resume).",
    "field": f"Intensity field: {fields_help()}.",
    "variational_grid": "Grid size (odd) of the variational field's amplitudes.",
    "variational_kl_weight": "Weight of the variational field's KL to the Wilson prior (1: the plain ELBO).",
    "field_width": "Hidden width of the neural field.",
    "voxel_grid": "Voxels per side (odd) of the voxel field, or of the hybrid field's residual (default with "
                  "--auto-settings: one voxel per detector pixel step, at most 4.5 per speckle, up to twice as fine "
                  "where the merged photons fill at least 200 a voxel).",
    "field_depth": "Hidden layers of the neural field.",
    "field_w0": "First-layer SIREN frequency.",
    "n_heads": "Pose proposals per pattern (2 x n_heads hypotheses with their Rz(pi) partners).",
    "n_search": "Hypotheses per pattern from the exhaustive orientation-grid search (the EMC E-step's top rotations).",
    "search_rotations": "Rotations in the search grid (default: from the particle size, see --auto-settings).",
    "weight_floor": "Initial hypothesis-weight floor (uniform mixture weight), decayed to 0.",
    "auto_settings": "Derive --field-w0, --search-rotations, the field, its voxels and the exact EMC iterations "
                     "(their number and --polish-beta) from the data (particle size from the mean pattern) "
                     "unless given; the estimate, the speckle oversampling and the values used go to sampling.json.",
    "emc_fraction": "Fraction of the data batches in the EMC warm start (the field fitted to each pattern's exact "
                    "marginal likelihood over the whole orientation grid) before SVI with the amortized guide; 0: off.",
    "emc_beta": "Tempering (<= 1) of the EMC warm start's orientation posterior (deterministic annealing).",
    "polish_iterations": "Exact EMC iterations at the end (E-step over all patterns and the whole orientation grid, "
                         "exact M-step into the field's voxels); needs --field hybrid or voxel (the default with "
                         "--auto-settings), skipped otherwise.",
    "polish_patterns": "Patterns merged per exact EMC iteration (the first of the file; 0: all), so that its cost "
                       "does not grow with the data set.",
    "polish_refined": "The last N exact EMC iterations merge each pattern whose orientation posterior is "
                      "concentrated at its refined modes (local Gauss-Newton on all pixels) instead of the nearest "
                      "grid rotations: sharper outer shells, at ~10x the cost of a grid iteration; 0: never.",
    "polish_beta": "Tempering of the first exact EMC iteration, rising geometrically over the grid iterations, the "
                   "refined ones (--polish-refined) at 1 "
                   "(deterministic annealing, as Dragonfly's beta; its automatic start is ~0.1 at 1e2 photons "
                   "per pattern, ~0.04 at 1e3, ~0.01 at 1e4); "
                   "1: untempered.",
    "polish_prior": "Gamma prior of the exact EMC merge, in photons a voxel at the field's intensity before the "
                    "merge: (photons + P) / (exposure + P / I_before); keeps voxels the data barely reach near the "
                    "field; 0: the plain average (EMC's merge).",
    "lr": "Initial Adam learning rate.",
    "lr_final": "Final learning rate (geometric decay).",
    "pixels_per_pattern": "Pixels per pattern in the likelihood per step (0 = all eligible).",
    "radius_start": "Coarse-to-fine: start radius as a fraction of q_max.",
    "radius_ramp": "Fraction of the steps over which the radius widens to 1.",
    "scale_prior_sigma": "Sigma of the LogNormal fluence-scale prior.",
    "symmetry": "Point group of the particle: C1, Cn, Dn, T, O or I (standard orientations: n-fold axis along z, "
                "Dn's 2-fold along x, T/O/I with 2-fold (O: 4-fold) axes along x, y, z; README). The field is "
                "invariant under it by construction, the orientation grid covers the fundamental zone "
                "(--search-rotations there: |G|^(1/3) times finer at the same cost), pose errors are taken modulo "
                "the group.",
    "seed": "Random seed (initial weights, data order, pixel subsets, samples).",
    "device": "auto (CUDA when present), cpu, cuda, cuda:N.",
    "checkpoint_every": "Steps between atomic checkpoints.",
    "log_every": "Steps between metrics.csv rows / log lines.",
    "latent_dim": "Heterogeneous samples: a per-pattern structure latent z ~ --latent-prior of this dimension, the "
                  "field conditioned on it (FiLM); writes latent_posterior.h5 and intensity_latent.h5. 0: "
                  "homogeneous. Turns the EMC warm start, search and polish off.",
    "n_classes": "Heterogeneous samples: discrete classes (one field each, enumerated exactly); 1: none.",
    "latent_nodes": "Heterogeneous samples: quadrature points per latent dimension at which the class-aware "
                    "search and EMC warm start evaluate each class field.",
    "latent_rule": "Heterogeneous samples: the quadrature rule of those points: hermite (Gauss-Hermite) or equal "
                   "(equal-probability bins of the prior, equal weights: no point starved of patterns).",
    "latent_prior": "Prior of the structure latent: normal[:scale=S] or studentt:df=D[;scale=S].",
    "class_prior": "Prior of the classes: uniform (fixed 1/K) or learned (fractions fitted).",
    "class_posterior": "Heterogeneous samples with --classes > 1: the class posterior written to latent_posterior.h5 "
                       "(and used for the per-class volumes and the latent figure): refined (each class's best grid "
                       "poses refined off the grid, Laplace evidence) or guide (the encoder's q(c)).",
}


def _config_defaults() -> dict[str, Any]:
    from bayes_spi.infer.config import FitConfig

    return FitConfig().to_dict()


def _training_option(name: str, type_: Any) -> Any:
    default = _config_defaults()[name]
    shown = {"max_images": "all", "max_minutes": "none"}.get(name, "none") if default is None else default
    return click.option(f"--{name.replace('_', '-')}", name, type=type_, default=None,
                        help=f"{_HELP[name]} [default: {shown}]")


_SPEC_HELP = {
    "pose_prior": "Pose prior SPEC: uniform, or preferred:axis=X,Y,Z:kappa=K. [default: uniform]",
    "scale_prior": "Fluence-scale prior SPEC: lognormal:sigma=S, pr772, or empirical:file=F[:bins=N:smoothing=H]. "
                   "[default: lognormal, sigma from --scale-prior-sigma]",
    "likelihood": "Likelihood SPEC: poisson[:background=B] or poisson-gaussian:sigma=S[:background=B]. "
                  "[default: poisson]",
    "intensity_prior": "Intensity prior SPEC: none, or wilson[:KEY=VALUE...]. [default: none]",
}


def _check_spec(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any] | None:
    """Parse and check a prior/likelihood SPEC; priors from files are built here so errors come first."""
    if value is None:
        return None
    from bayes_spi.config.specs import FLAGS, normalize_spec

    kind = str(param.name)
    flag = FLAGS[kind]

    def bad(exc: Exception) -> click.BadParameter:
        msg = str(exc)
        msg = msg[len(flag):].lstrip(": ") if msg.startswith(flag) else msg
        return click.BadParameter(msg, ctx=ctx, param=param)

    try:
        spec = normalize_spec(kind, value)
    except ValueError as exc:
        raise bad(exc) from None
    try:
        if kind == "scale_prior" and spec["name"] != "lognormal":
            from bayes_spi.models.priors import make_scale_prior

            make_scale_prior(spec)
        elif kind == "intensity_prior" and spec["name"] != "none":
            from bayes_spi.infer.build import build_intensity_prior

            build_intensity_prior(spec, q_max=0.1)
    except (ValueError, FileNotFoundError) as exc:
        raise bad(exc) from None
    return spec


def _check_symmetry(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--symmetry``: its canonical spelling (``i`` -> ``I``), or a usage error naming the option."""
    if value is None:
        return None
    from bayes_spi.symmetry import parse_symmetry

    try:
        return parse_symmetry(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--symmetry") from None


def _spec_option(kind: str) -> Any:
    return click.option("--" + kind.replace("_", "-"), kind, default=None, metavar="SPEC", callback=_check_spec,
                        help=_SPEC_HELP[kind])


def _cli_errors(call: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    from bayes_spi.cli.common import click_error
    from bayes_spi.workflows.errors import WorkflowError

    try:
        return call(*args, **kwargs)
    except WorkflowError as exc:
        raise click_error(exc) from None


def _echo(text: str, err: bool = False) -> None:
    click.echo(text, err=err)


def run_fit(data: Path | None, run_dir: Path, given: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """:func:`bayes_spi.workflows.fit.run_fit` for the command line (``bayes-spi fit``, ``bayes-spi demo``):
    messages through click, a :class:`~bayes_spi.workflows.errors.WorkflowError` as click's error."""
    from bayes_spi.workflows import fit as workflow

    return _cli_errors(workflow.run_fit, data, run_dir, given, echo=_echo, **kwargs)


def run_halfsets(data: Path | None, run_dir: Path, given: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """:func:`bayes_spi.workflows.fit.run_halfsets` for ``bayes-spi fit --half-sets``, each half's summary printed."""
    from bayes_spi.workflows import fit as workflow

    return _cli_errors(workflow.run_halfsets, data, run_dir, given, echo=_echo, on_half=print_summary, **kwargs)


def print_summary(result: dict[str, Any]) -> None:
    """The end-of-fit summary: outputs, speed, final ELBO, evaluation table."""
    from bayes_spi.infer.evaluate import format_evaluation
    from bayes_spi.infer.rundir import RunDir

    st = result["state"]
    click.echo(f"run directory: {result['run_dir']}")
    click.echo("  outputs: " + ", ".join(p.name for p in result["outputs"].values())
               + "".join(f", {RunDir.name(key)}" for key in ("metrics", "config", "log"))
               + (f", {RunDir.name('evaluation')}" if result["evaluation"] else ""))
    rate = result["images_per_s"]
    rate_text = f"{rate:.1f} images/s" if math.isfinite(rate) else "no new steps"
    click.echo(f"  steps {st.step}, images seen {st.images_seen}, {rate_text}")
    click.echo(f"  final ELBO per image: {result['final_elbo']:.6g}")
    verdict = result.get("verdict")
    if verdict is not None:
        click.echo(verdict.summary(), err=verdict.status != "converged")
    if result["evaluation"] is not None:
        click.echo("evaluation against the truth:")
        click.echo(format_evaluation(result["evaluation"]))


class _RecordingCommand(click.Command):
    """Keeps the raw arguments in ``ctx.meta`` so ``config.yaml`` records the exact command line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["bayes_spi.argv"] = ["bayes-spi", self.name or "fit", *args]
        return super().parse_args(ctx, args)


@click.command(name="fit", help=__doc__, cls=_RecordingCommand)
@click.argument("data", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", "run_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory.")
@click.option("--online/--offline", "online", default=None, help=_HELP["online"] + " [default: offline]")
@_training_option("epochs", click.IntRange(min=1))
@_training_option("batch_size", click.IntRange(min=1))
@_training_option("max_images", click.IntRange(min=1))
@_training_option("max_minutes", click.FloatRange(min=0, min_open=True))
@_training_option("field", click.Choice(FIELD_NAMES))
@_training_option("variational_grid", click.IntRange(min=5))
@_training_option("variational_kl_weight", click.FloatRange(min=0))
@_training_option("field_width", click.IntRange(min=1))
@_training_option("voxel_grid", click.IntRange(min=3))
@_training_option("field_depth", click.IntRange(min=1))
@_training_option("field_w0", float)
@_training_option("n_heads", click.IntRange(min=1))
@_training_option("n_search", click.IntRange(min=0))
@_training_option("search_rotations", click.IntRange(min=1))
@_training_option("weight_floor", click.FloatRange(min=0, max=1, max_open=True))
@_training_option("emc_fraction", click.FloatRange(min=0, max=1))
@_training_option("emc_beta", click.FloatRange(min=0, max=1, min_open=True))
@_training_option("polish_iterations", click.IntRange(min=0))
@_training_option("polish_patterns", click.IntRange(min=0))
@_training_option("polish_refined", click.IntRange(min=0))
@_training_option("polish_beta", click.FloatRange(min=0, max=1, min_open=True))
@_training_option("polish_prior", click.FloatRange(min=0))
@click.option("--auto-settings/--no-auto-settings", "auto_settings", default=None,
              help=_HELP["auto_settings"] + " [default: on]")
@_training_option("lr", float)
@_training_option("lr_final", float)
@_training_option("pixels_per_pattern", click.IntRange(min=0))
@_training_option("radius_start", float)
@_training_option("radius_ramp", float)
@_training_option("scale_prior_sigma", float)
@click.option("--mask", "mask", default=None, metavar="FILE",
              help="Extra mask, combined (AND of the good pixels) with the data file's own: FILE.byt[:ROWSxCOLUMNS] "
                   "(pnCCD/Dragonfly, one byte a pixel, 0 = good, 1 and 2 masked), FILE.npy or FILE.h5:/dataset "
                   "(True/1 = good). [default: none]")
@click.option("--mask-bin", "mask_bin", type=click.IntRange(min=1), default=None,
              help="The data's binning (N x N) relative to the detector of the --mask and --background files "
                   "(leftover rows/columns cropped evenly; a binned pixel is good only if all its pixels are; "
                   "background summed). [default: 1]")
@click.option("--background", "background_file", default=None, metavar="FILE",
              help="Measured mean background per pixel (photons per pixel per pattern, e.g. the mean of non-hit "
                   "frames; FILE.npy or FILE.h5:/dataset), an additive rate b * B in the likelihood with a fitted "
                   "scale b. [default: none]")
@click.option("--background-scale", "background_scale", type=click.Choice(["global", "per-pattern"]), default=None,
              help="The background scale b: one for all patterns (global), or one per pattern. [default: global]")
@_spec_option("pose_prior")
@_spec_option("scale_prior")
@_spec_option("likelihood")
@_spec_option("intensity_prior")
@click.option("--symmetry", "symmetry", default=None, metavar="GROUP", callback=_check_symmetry,
              help=_HELP["symmetry"] + " [default: C1]")
@_training_option("latent_dim", click.IntRange(min=0))
@click.option("--classes", "n_classes", type=click.IntRange(min=1), default=None,
              help=_HELP["n_classes"] + " [default: 1]")
@_training_option("latent_prior", str)
@_training_option("class_prior", click.Choice(["uniform", "learned"]))
@_training_option("latent_nodes", click.IntRange(min=1))
@_training_option("latent_rule", click.Choice(["equal", "hermite"]))
@_training_option("class_posterior", click.Choice(["refined", "guide"]))
@_training_option("seed", int)
@_training_option("device", str)
@_training_option("checkpoint_every", click.IntRange(min=1))
@_training_option("log_every", click.IntRange(min=1))
@click.option("--grid", type=int, default=None,
              help="Odd size of the output intensity cube. [default: 65; with --resume the run's own]")
@click.option("--resume", is_flag=True, help="Continue the run in RUN from its checkpoint.")
@click.option("--force", is_flag=True, help="Start afresh even if RUN holds a run (its outputs are removed).")
@click.option("--truth/--no-truth", default=True, show_default=True,
              help="Evaluate against the data file's truth (if any) and write evaluation.json.")
@click.option("--check-data/--no-check-data", default=True, show_default=True,
              help="Read every pattern once before training to catch bad values early.")
@click.option("--half-sets", is_flag=True,
              help="Validation without truth: fit two independent models on a random split of the patterns "
                   "(RUN/half1, RUN/half2; the split, drawn from --seed, is kept in RUN/halfsets.h5) and report "
                   "their FSC (RUN/halfsets.json, RUN/fsc.json).")
@click.option("--follow", is_flag=True,
              help="Live use: DATA is still being written (HDF5 SWMR, e.g. H5Writer(swmr=True)); fit its patterns "
                   "as they arrive, waiting when caught up, until the writer marks it complete or "
                   "--follow-timeout passes without a new pattern. Needs --online; one process.")
@click.option("--follow-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="With --follow: seconds without a new pattern after which the fit stops waiting and finishes.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@source_options
def command(data: Path | None, run_dir: Path, grid: int | None, resume: bool, force: bool, truth: bool,
            check_data: bool, half_sets: bool, follow: bool, follow_timeout: float, progress: bool,
            **options: Any) -> None:
    source = options_from_cli(options)  # DATA may be a foreign file (bayes-spi convert --help)
    given = {k: v for k, v in options.items() if v is not None}
    from bayes_spi.infer.config import FitConfig

    known = {f.name for f in dc_fields(FitConfig)}
    unknown = sorted(set(given) - known)
    if unknown:  # an option without a FitConfig field: a programming error, reported plainly
        raise click.ClickException(f"options {unknown} have no FitConfig setting")
    argv = click.get_current_context().meta.get("bayes_spi.argv")
    if half_sets:
        if follow:
            raise click.UsageError("--follow fits one model on the file as it is written: expected no --half-sets")
        run_halfsets(data, run_dir, given, resume=resume, force=force, grid=grid, progress=progress,
                     check_data=check_data, argv=argv, source=source if source.given else None)
        return
    result = run_fit(data, run_dir, given, resume=resume, force=force, grid=grid, truth=truth,
                     progress=progress, check_data=check_data, argv=argv, source=source if source.given else None,
                     follow=follow, follow_timeout=follow_timeout)
    if result.get("rank", 0) == 0:  # under torchrun only rank 0 reports
        print_summary(result)
