"""The run report: every figure of :mod:`bayes_spi.report.figures` into ``RUN/report/`` and one HTML page
``RUN/report.html`` that shows them (referenced relatively), a table of key numbers (training,
``evaluation.json``, ``fsc.json``, posterior spread) and the run's ``config.yaml``; plus the one-page
overview ``RUN/report.png``.

A figure whose inputs are missing is left out and the page says what is missing and which command makes
it; a malformed input is reported on the page (and logged) without stopping the other figures. A figure
left out now has its old PNG removed, so ``RUN/report/`` always matches the page.

Example::

    html = write_report("run1", truth_path="data.h5")   # run1/report.html, run1/report/*.png, run1/report.png
"""

from __future__ import annotations

import datetime as _dt
import html
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bayes_spi import __version__
from bayes_spi.atomic import atomic_path
from bayes_spi.infer.rundir import RunDir
from bayes_spi.report.figures import (
    FigureFunction,
    density_figure,
    elbo_figure,
    errors_figure,
    fsc_figure,
    fsc_resolution_text,
    orientations_figure,
    overview_figure,
    patterns_figure,
    slices_figure,
    speed_figure,
    spread_figure,
)
from bayes_spi.report import rundata as _rundata
from bayes_spi.report.rundata import FSC_KINDS, SOURCES, RunData

__all__ = ["FigureSpec", "FIGURES", "REPORT_DIR", "ReportResult", "build_report", "write_report", "missing_inputs",
           "patterns_used_text"]

log = logging.getLogger("bayes_spi")

#: folder of the PNGs inside the run directory
REPORT_DIR = RunDir.name("report_dir")


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the page: file ``{name}.png``, its section title and caption, the function that makes
    it, the inputs it needs (keys of :data:`SOURCES`) and optional inputs that add to it (with what they add)."""

    name: str
    title: str
    caption: str
    func: FigureFunction
    needs: tuple[str, ...]
    optional: tuple[tuple[str, str], ...] = ()


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("elbo", "Training objective",
               "ELBO per image and its terms against images seen (log-likelihood; KL of pose, scale, hypothesis "
               "per image), with the coarse-to-fine radius and the learning rate that explain its steps.",
               elbo_figure, ("metrics",)),
    FigureSpec("speed", "Training speed", "Images per second per log interval, and images seen against wall time.",
               speed_figure, ("metrics",)),
    FigureSpec("slices", "3D intensity: central slices",
               "Central slices of log10 I of the reconstruction (intensity.h5); with the truth, the true intensity "
               "sampled at G x beside it (I_est(x) = I_true(G x), G the global alignment of the poses) and "
               "scaled by one factor (intensities are defined up to the fluence scale).",
               slices_figure, ("intensity",), (("truth_intensity", "the true intensity beside the reconstruction"),)),
    FigureSpec("patterns", "Input patterns and the model's prediction",
               "Evenly spaced patterns of the data file; the model's expected counts s Omega P I(R q) at the "
               "pattern's most probable pose and posterior-mean fluence scale; Pearson residuals "
               "(a good fit has chi2/pixel near 1).",
               patterns_figure, ("posterior", "model", "data"), (("truth", "each pattern's orientation error"),)),
    FigureSpec("fsc", "Resolution: Fourier shell correlation",
               "FSC against q (resolution on the top axis), thresholds 0.5 and 0.143 and the resolutions where "
               "each curve crosses them; the detector-corner resolution for reference.",
               fsc_figure, ("fsc",)),
    FigureSpec("orientations", "Coverage of orientations",
               "Density of the molecule-frame viewing directions R e_z relative to uniform, on a Hammer "
               "equal-area map (every cell the same solid angle): gaps or strong peaks show orientations the "
               "data (or the inference) covers poorly.",
               orientations_figure, ("posterior",), (("truth", "the true viewing directions for comparison"),)),
    FigureSpec("spread", "Posterior angular spread",
               "Radii of the 50% and 90% credible cones of each pattern's pose, and the posterior weight of the "
               "most probable pose hypothesis.",
               spread_figure, ("posterior",), (("posterior_nc", "cone radii from the posterior draws"),)),
    FigureSpec("errors", "Orientation errors against the truth",
               "Geodesic error of each inferred pose after the best global rotation, raw and modulo the "
               "Rz(pi) twin; error against the 90% cone radius (about 90% of the points should lie below the "
               "diagonal for a calibrated posterior).",
               errors_figure, ("posterior", "truth")),
    FigureSpec("density", "Phased electron density",
               "Projections and central sections of the real-space density from phase retrieval (density.mrc).",
               density_figure, ("density",)),
)


@dataclass
class ReportResult:
    """What :func:`build_report` made: the page, the overview, each figure's path (None: not made) and the
    problems (figure name -> message) shown on the page."""

    html: Path
    overview: Path | None
    figures: dict[str, Path | None] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)


def _available(run: RunData, key: str) -> bool:
    """Whether input ``key`` of :data:`SOURCES` is there (a malformed one counts as absent here; the figure
    that reads it reports the problem)."""
    if key not in SOURCES:
        raise ValueError(f"expected an input name in {sorted(SOURCES)}, got {key!r}")
    try:
        return _present(run, key)
    except (ValueError, OSError):
        return False


def _present(run: RunData, key: str) -> bool:
    if key == "intensity" and run.live_checkpoint is not None:  # a running fit: from its latest checkpoint
        return True
    if key in ("metrics", "intensity", "posterior", "model", "fsc", "density", "posterior_nc"):
        return run.files.has(key)
    if key == "data":
        return run.data_path is not None
    if key == "truth":
        return run.truth_path is not None
    if key == "truth_intensity":
        return run.truth_path is not None and run.truth is not None and run.truth["intensity"] is not None
    return False


def missing_inputs(run: RunData, spec: FigureSpec) -> list[str]:
    """The inputs of ``spec`` that ``run`` lacks, each as ``"WHAT (HINT)"``."""
    return [f"{SOURCES[k].what} ({SOURCES[k].hint})" for k in spec.needs if not _available(run, k)]


# ------------------------------------------------------------------------------------------------ numbers
_EVAL_LABELS: dict[str, tuple[str, str]] = {
    "median_pose_error_deg": ("median orientation error", "deg"),
    "mean_pose_error_deg": ("mean orientation error", "deg"),
    "median_pose_error_mod_rotz_deg": ("median orientation error mod Rz(pi)", "deg"),
    "mean_pose_error_mod_rotz_deg": ("mean orientation error mod Rz(pi)", "deg"),
    "wrong_mode_fraction": ("wrong Rz(pi) mode fraction", ""),
    "fluence_corr": ("fluence-scale correlation", ""),
    "intensity_corr": ("intensity correlation", ""),
    "log_intensity_corr": ("log-intensity correlation", ""),
    "intensity_fsc_res_nm_0.5": ("intensity FSC resolution at 0.5", "nm"),
    "intensity_fsc_res_nm_0.143": ("intensity FSC resolution at 0.143", "nm"),
    "density_fsc_res_nm_0.5": ("density FSC resolution at 0.5", "nm"),
    "density_fsc_res_nm_0.143": ("density FSC resolution at 0.143", "nm"),
    "corner_res_nm": ("detector-corner resolution", "nm"),
    "n_patterns": ("patterns evaluated", ""),
}


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if not np.isfinite(v):
            return "n/a"
        if v.is_integer() and abs(v) >= 1000:
            text = f"{int(v):,}"
        elif unit == "nm":
            text = f"{v:.2f}"
        else:
            text = f"{v:.4g}"
    else:
        text = str(v)
    return f"{text} {unit}".rstrip()


def patterns_used_text(run: RunData) -> str | None:
    """``"M of N"`` (with the stride when it is above 1): the patterns behind the figures and statistics; None
    without a readable ``posterior.h5``."""
    if not _available(run, "posterior"):
        return None
    try:
        n_all, n_used, step = run.n_patterns, run.n_used, run.stride
    except (ValueError, OSError):
        return None
    if n_all is None or n_used is None:
        return None
    if step == 1:
        return f"{n_used:,} of {n_all:,} (all)"
    return f"{n_used:,} of {n_all:,} (one pattern in {step}, an even stride)"


def _key_numbers(run: RunData) -> list[tuple[str, list[tuple[str, str]]]]:
    """Sections of (label, value) rows for the table."""
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    rows: list[tuple[str, str]] = [("run directory", os.fspath(run.run_dir.resolve()))]
    cfg = run.config if run.config_text is not None else None
    if isinstance(cfg, dict):
        data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
        if data.get("path"):
            rows.append(("data file", str(data["path"])))
        if data.get("n_patterns") is not None:
            rows.append(("patterns in the data", _fmt(float(data["n_patterns"]))))
        for k in ("created", "device", "bayes_spi_version"):
            if cfg.get(k) is not None:
                rows.append((k.replace("_", " "), str(cfg[k])))
    if run.truth_path is not None:
        rows.append(("truth file", os.fspath(run.truth_path)))
    used = patterns_used_text(run)
    if used is not None:
        rows.append(("patterns in the figures and statistics", used))
    sections.append(("Run", rows))
    v = run.verdict
    if v is not None:
        rows = [("status", {"converged": "CONVERGED", "unconverged": "NOT CONVERGED (run longer)",
                            "failed": "FAILED: not trustworthy"}[v["status"]])]
        rows += [("reason", str(r)) for r in v.get("reasons", [])]
        checks = v.get("checks", {}) if isinstance(v.get("checks"), dict) else {}
        for key, label, unit in (("gain_per_photon", "information gain over the radial average", "nats/photon"),
                                 ("pose_change_deg", "probe-pose change since the previous checkpoint", "deg"),
                                 ("elbo_rel_change", "ELBO trend per tenth of the images (relative)", ""),
                                 ("effective_hypotheses", "effective hypotheses per pattern", "")):
            if isinstance(checks.get(key), (int, float)):
                rows.append((label, _fmt(float(checks[key]), unit)))
        from bayes_spi.infer.verdict import describe_q, information_limit_note

        q_info = checks.get("information_q")
        if isinstance(q_info, (int, float)):
            rows.append(("held-out photons predicted better than by the radial average out to",
                         describe_q(q_info) if q_info > 0 else "no shell"))

        note = information_limit_note(checks)
        if note:
            rows.append(("information limit", note))
        sections.append(("Verdict without truth (verdict.json)", rows))
    m = run.metrics
    if m is not None:
        rows = []
        last = {k: v[-1] for k, v in m.items()}
        for key, label, unit in (("step", "steps", ""), ("images_seen", "images seen", ""),
                                 ("elbo_per_image", "final ELBO per image", "nats"),
                                 ("loglik_per_image", "final log-likelihood per image", "nats")):
            if key in last:
                rows.append((label, _fmt(float(last[key]), unit)))
        if "images_per_s" in m and np.isfinite(m["images_per_s"]).any():
            rows.append(("median speed", _fmt(float(np.nanmedian(m["images_per_s"])), "images/s")))
        if "elapsed_s" in last and np.isfinite(last["elapsed_s"]):
            rows.append(("training time", _fmt(float(last["elapsed_s"]) / 60.0, "min")))
        sections.append(("Training (metrics.csv)", rows))
    ev = run.evaluation
    fsc = run.fsc
    if ev:
        keys = [k for k in _EVAL_LABELS if k in ev] + [k for k in ev if k not in _EVAL_LABELS]
        if fsc is not None:  # the resolutions are shown (with whether the curve crossed) from fsc.json below
            keys = [k for k in keys if "_fsc_res_nm_" not in k and k != "corner_res_nm"]
        sections.append(("Evaluation against the truth (evaluation.json)",
                         [(_EVAL_LABELS.get(k, (k, ""))[0], _fmt(ev[k], _EVAL_LABELS.get(k, (k, ""))[1]))
                          for k in keys]))
    if fsc is not None:
        rows = []
        for kind, label in FSC_KINDS.items():
            if kind in fsc:
                for thr in ("0.5", "0.143"):
                    rows.append((f"{label}: resolution at FSC {thr}", fsc_resolution_text(fsc[kind], thr)))
        if fsc.get("corner_res_nm") is not None:
            rows.append(("detector-corner resolution", _fmt(fsc["corner_res_nm"], "nm")))
        sections.append(("Resolution (fsc.json)", rows))
    rows = []
    cones = run.cones if _available(run, "posterior") else None
    if cones is not None:
        rows.append(("median 50% cone radius", _fmt(float(np.nanmedian(cones["r50"])), "deg")))
        rows.append(("median 90% cone radius", _fmt(float(np.nanmedian(cones["r90"])), "deg")))
        rows.append(("cone radii from", cones["source"]))
    post = run.posterior if _available(run, "posterior") else None
    if post is not None and "best_weight" in post:
        rows.append(("mean weight of the most probable hypothesis", _fmt(float(post["best_weight"].mean()))))
    al = run.alignment
    if al is not None and not ev:
        rows.append(("median orientation error mod Rz(pi)", _fmt(float(np.median(al["errors_mod_rotz_pi_deg"])),
                                                                "deg")))
    cal = run.calibration if cones is not None else None
    if cal is not None:
        inside = float(np.mean(cal["errors_deg"] <= cal["r90_deg"]))
        rows.append(("true pose within the 90% cone (mod Rz(pi))",
                     f"{inside:.1%} of {len(cal['errors_deg']):,} patterns (nominal 90%)"))
    if rows:
        sections.append(("Posterior", rows))
    return sections


# ------------------------------------------------------------------------------------------------ page
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1400px; margin: 1.5em auto;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; font-size: 0.92em; }
td, th { padding: 0.2em 0.8em; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.v { font-family: monospace; }
img { max-width: 100%; border: 1px solid #eee; }
p.caption { color: #444; font-size: 0.93em; max-width: 70em; }
p.missing { background: #fff6e0; border-left: 4px solid #f0a000; padding: 0.4em 0.8em; }
p.problem { background: #fde8e8; border-left: 4px solid #d03030; padding: 0.4em 0.8em; }
p.note { color: #666; font-size: 0.88em; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
nav a { margin-right: 1em; }
div.tables { display: flex; flex-wrap: wrap; gap: 0 2em; align-items: flex-start; }
"""


def _page(run: RunData, result: ReportResult) -> str:
    e = html.escape
    now = _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>bayes-spi report: {e(run.run_dir.resolve().name)}</title>", f"<style>{_CSS}</style>",
             "</head><body>", f"<h1>bayes-spi run report: {e(run.run_dir.resolve().name)}</h1>",
             f"<p class=\"note\">generated {e(now)} by bayes-spi {e(__version__)}"
             + (" &middot; one-page overview: <a href=\"report.png\">report.png</a>" if result.overview else "")
             + "</p>"]
    parts.append("<nav>" + "".join(f"<a href=\"#{s.name}\">{e(s.title)}</a>" for s in FIGURES)
                 + "<a href=\"#config\">Configuration</a></nav>")
    parts.append("<h2 id=\"numbers\">Key numbers</h2>")
    if patterns_used_text(run) is not None and run.stride > 1:
        parts.append(f"<p class=\"note\">The figures and statistics of this page use {run.n_used:,} of "
                     f"{run.n_patterns:,} patterns (one in {run.stride}: above "
                     f"{_rundata.MAX_REPORT_PATTERNS:,} patterns the report reads an even stride, the same patterns "
                     f"of every file); {e(RunDir.name('evaluation'))} covers all of them.</p>")
    try:
        sections = _key_numbers(run)
    except (ValueError, OSError) as exc:
        sections = []
        parts.append(f"<p class=\"problem\">could not collect the key numbers: {e(str(exc))}</p>")
    parts.append("<div class=\"tables\">")
    for title, rows in sections:
        parts.append(f"<table><tr><th colspan=\"2\">{e(title)}</th></tr>")
        parts.extend(f"<tr><td>{e(k)}</td><td class=\"v\">{e(v)}</td></tr>" for k, v in rows)
        parts.append("</table>")
    parts.append("</div>")
    for spec in FIGURES:
        parts.append(f"<h2 id=\"{spec.name}\">{e(spec.title)}</h2>")
        path = result.figures.get(spec.name)
        if path is not None:
            rel = f"{REPORT_DIR}/{path.name}"
            parts.append(f"<a href=\"{e(rel)}\"><img src=\"{e(rel)}\" alt=\"{e(spec.title)}\"></a>")
            parts.append(f"<p class=\"caption\">{e(spec.caption)}</p>")
            absent = [(SOURCES[k], adds) for k, adds in spec.optional if not _available(run, k)]
            for src, adds in absent:
                parts.append(f"<p class=\"note\">Not shown: {e(adds)}; needs {e(src.what)} ({e(src.hint)}).</p>")
        elif spec.name in result.problems:
            parts.append(f"<p class=\"problem\">Not made: {e(result.problems[spec.name])}</p>")
        else:
            missing = missing_inputs(run, spec)
            what = "; ".join(missing) if missing else "its inputs hold nothing to plot"
            parts.append(f"<p class=\"missing\">Not made: missing {e(what)}.</p>")
            parts.append(f"<p class=\"caption\">{e(spec.caption)}</p>")
    parts.append("<h2 id=\"config\">Configuration (config.yaml)</h2>")
    if run.config_text is not None:
        parts.append(f"<details open><summary>config.yaml</summary><pre>{e(run.config_text)}</pre></details>")
    else:
        parts.append(f"<p class=\"missing\">Not found: config.yaml ({e(SOURCES['metrics'].hint)}).</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build_report(run_dir: str | os.PathLike[str], truth_path: str | os.PathLike[str] | None = None,
                 data_path: str | os.PathLike[str] | None = None, *, n_patterns: int = 6,
                 max_align: int = 5000, overview: bool = True) -> ReportResult:
    """Make every figure that its inputs allow, the overview ``report.png`` and ``report.html``.

    Args:
        run_dir: the run directory.
        truth_path: a simulated data file with ``/truth``: adds the truth comparisons.
        data_path: the data file of the input patterns (default: ``truth_path``, else config.yaml's).
        n_patterns: patterns shown in ``patterns.png``.
        max_align: patterns used to fit the global alignment to the truth.
        overview: also write ``report.png``.

    Raises:
        FileNotFoundError: ``run_dir`` (or a given file) does not exist.
    """
    run = RunData(run_dir, truth_path=truth_path, data_path=data_path, max_align=max_align)
    out_dir = run.files.path("report_dir")
    out_dir.mkdir(exist_ok=True)
    result = ReportResult(html=run.files.path("report"), overview=None)
    for spec in FIGURES:
        path: Path | None = None
        try:
            if spec.name == "patterns":
                path = patterns_figure(run, out_dir, n=n_patterns)
            else:
                path = spec.func(run, out_dir)
        except (ValueError, OSError) as exc:
            result.problems[spec.name] = str(exc)
            log.warning("report: %s.png not made: %s", spec.name, exc)
        result.figures[spec.name] = path
        if path is None:
            (out_dir / f"{spec.name}.png").unlink(missing_ok=True)
    if overview:
        try:
            result.overview = overview_figure(run, run.files.path("overview"))
        except (ValueError, OSError) as exc:
            log.warning("report: %s not made: %s", RunDir.name("overview"), exc)
    text = _page(run, result)
    with atomic_path(result.html) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return result


def write_report(run_dir: str | os.PathLike[str], truth_path: str | os.PathLike[str] | None = None,
                 data_path: str | os.PathLike[str] | None = None, **kwargs: Any) -> Path:
    """Write the run report (see the module doc) and return the path of ``report.html``.

    Example::

        write_report("run1", truth_path="data.h5")
    """
    return build_report(run_dir, truth_path, data_path, **kwargs).html
