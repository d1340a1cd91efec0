"""The report's figures: one function per PNG, each ``(run: RunData, out_dir) -> Path | None``.

A function returns ``None`` (and writes nothing) when the inputs it needs are missing; it raises
``ValueError`` when an input is malformed. Figures use matplotlib's object API (``Figure`` + Agg canvas, no
pyplot state) and are written atomically. The numbers they show come from :mod:`bayes_spi.report.numbers`.

=================== =====================================================================================
``elbo.png``        ELBO per image and its terms (log-likelihood, KL of pose, scale, hypothesis...), radius, lr
``speed.png``       images/s against images seen, images seen against wall time
``slices.png``      central slices of ``log10 I`` and, with the truth, the truth aligned by ``G`` beside them
``patterns.png``    input patterns, the model's expected counts at the inferred poses, Pearson residuals
``fsc.png``         FSC curves from ``fsc.json`` with the 0.5 / 0.143 thresholds and resolutions
``orientations.png`` coverage of viewing directions (Hammer equal-area map), inferred and true
``spread.png``      histograms of the 50% / 90% credible-cone radii and of the chosen hypothesis' weight
``errors.png``      orientation errors against the truth; error against the 90% cone radius
``density.png``     projections and central sections of the phased density (``density.mrc``)
``report.png``      (in the run directory) a one-page overview: ELBO, speed, errors, intensity slices
=================== =====================================================================================

Example::

    rd = RunData("run1", truth_path="data.h5")
    elbo_figure(rd, Path("run1/report"))
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from bayes_spi.atomic import atomic_path
from bayes_spi.grid import centred_index
from bayes_spi.report.numbers import (
    equal_area_histogram,
    hammer_xy,
    histogram_counts,
    lon_lat,
    predicted_counts,
    resolution_crossing,
    robust_limits,
    sample_aligned,
    viewing_directions,
)
from bayes_spi.report.rundata import FSC_KINDS, RunData

__all__ = [
    "FigureFunction",
    "elbo_figure",
    "speed_figure",
    "slices_figure",
    "patterns_figure",
    "pattern_indices",
    "fsc_figure",
    "fsc_resolutions",
    "fsc_resolution_text",
    "orientations_figure",
    "direction_cells",
    "spread_figure",
    "errors_figure",
    "density_figure",
    "overview_figure",
    "OVERVIEW_FIGSIZE",
    "OVERVIEW_DPI",
    "overview_size_px",
]

FigureFunction = Callable[[RunData, Path], "Path | None"]

_DPI = 100

#: the one-page overview (``RUN/report.png``): figure size in inches (width, height) and resolution
OVERVIEW_FIGSIZE: tuple[float, float] = (14, 8.5)
OVERVIEW_DPI = 90


def overview_size_px() -> tuple[int, int]:
    """``(height, width)`` in pixels of the overview PNG (figure size x dpi), as an image array's shape.

    Example:
        >>> overview_size_px() == (round(OVERVIEW_FIGSIZE[1] * OVERVIEW_DPI), round(OVERVIEW_FIGSIZE[0] * OVERVIEW_DPI))
        True
    """
    width, height = OVERVIEW_FIGSIZE
    return round(height * OVERVIEW_DPI), round(width * OVERVIEW_DPI)
_GREY = "#bdbdbd"
_MAX_SCATTER = 5000


def _save(fig: Figure, path: Path, dpi: int = _DPI) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def _adjust(fig: Figure, left: float = 0.8, right: float = 0.3, bottom: float = 0.6, top: float = 0.6,
            wspace: float = 0.3, hspace: float = 0.3) -> None:
    """Fixed margins in inches (no layout engine: constrained layout doubles the drawing time)."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h,
                        wspace=wspace, hspace=hspace)


def _cmap(name: str) -> mcolors.Colormap:
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad=_GREY)


def _log10_pos(a: np.ndarray) -> np.ndarray:
    """``log10 a`` where ``a > 0``, NaN elsewhere."""
    a = np.asarray(a, dtype=np.float64)
    out = np.full(a.shape, np.nan)
    pos = a > 0
    out[pos] = np.log10(a[pos])
    return out


def _ax_images_seen(ax: Any) -> None:
    ax.set_xlabel("images seen")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    ax.grid(alpha=0.3)


def _epoch_lines(ax: Any, m: dict[str, np.ndarray]) -> None:
    if "epoch" not in m or len(m["epoch"]) < 2:
        return
    ep = m["epoch"]
    for j in np.nonzero(np.diff(ep) > 0)[0]:
        ax.axvline(m["images_seen"][j + 1], color="0.6", lw=0.6, ls=":")


# ---------------------------------------------------------------------------------------------- ELBO
def elbo_figure(run: RunData, out_dir: Path) -> Path | None:
    """``elbo.png``: ELBO per image and the log-terms (nats/image), the KL terms, the radius and lr."""
    m = run.metrics
    if m is None:
        return None
    x = m["images_seen"]
    log_terms = [c for c in m if c.startswith("log") and np.isfinite(m[c]).any()]
    kl_terms = [c for c in m if c.startswith("kl_") and np.isfinite(m[c]).any()]
    sched = [c for c in ("radius", "lr") if c in m and np.isfinite(m[c]).any()]
    n_pan = 1 + bool(kl_terms) + bool(sched)
    fig = Figure(figsize=(5.2 * n_pan, 4.2))
    axes = np.atleast_1d(fig.subplots(1, n_pan))
    _adjust(fig, left=1.0, right=0.85 if sched else 0.3, wspace=0.4)
    ax = axes[0]
    series = [("elbo_per_image", "ELBO")] + [(c, c.replace("_per_image", "")) for c in log_terms]
    lows, highs = [], []
    for col, label in series:
        y = m[col]
        ax.plot(x, y, lw=1.2, label=label)
        late = y[len(y) // 10:]  # limits from after the initial transient (the first values are far below)
        fin = late[np.isfinite(late)]
        if fin.size:
            lows.append(fin.min())
            highs.append(fin.max())
    if lows:
        lo, hi = min(lows), max(highs)
        pad = 0.08 * max(hi - lo, 1e-9)
        ax.set_ylim(lo - pad, hi + pad)
    _epoch_lines(ax, m)
    _ax_images_seen(ax)
    ax.set_ylabel("nats per image")
    ax.set_title("ELBO and log-likelihood per image")
    ax.legend(fontsize=8)
    k = 1
    if kl_terms:
        ax = axes[k]
        k += 1
        for col in kl_terms:
            ax.plot(x, m[col], lw=1.2, label=col)
        vals = np.concatenate([m[c][np.isfinite(m[c])] for c in kl_terms])
        if vals.size and np.all(vals > 0) and vals.max() / vals.min() > 30:
            ax.set_yscale("log")
        _epoch_lines(ax, m)
        _ax_images_seen(ax)
        ax.set_ylabel("nats per image")
        ax.set_title("KL terms per image")
        ax.legend(fontsize=8)
    if sched:
        ax = axes[k]
        if "radius" in sched:
            ax.plot(x, m["radius"], color="tab:purple", lw=1.2, label="radius")
            ax.set_ylabel("likelihood radius (fraction of q_max)", color="tab:purple")
            ax.set_ylim(0, 1.05)
        if "lr" in sched:
            ax2 = ax.twinx() if "radius" in sched else ax
            ax2.plot(x, m["lr"], color="tab:olive", lw=1.2, label="learning rate")
            if np.all(m["lr"][np.isfinite(m["lr"])] > 0):
                ax2.set_yscale("log")
            ax2.set_ylabel("learning rate", color="tab:olive")
        _ax_images_seen(ax)
        ax.set_title("schedules: coarse-to-fine radius, learning rate")
    epochs = "epoch" in m and bool(np.any(np.diff(m["epoch"]) > 0))
    fig.suptitle("training objective (dotted lines: epoch boundaries)" if epochs else "training objective")
    return _save(fig, out_dir / "elbo.png")


# ---------------------------------------------------------------------------------------------- speed
def speed_figure(run: RunData, out_dir: Path) -> Path | None:
    """``speed.png``: images/s against images seen (and its median); images seen against elapsed time."""
    m = run.metrics
    if m is None or "images_per_s" not in m:
        return None
    x, v = m["images_seen"], m["images_per_s"]
    has_t = "elapsed_s" in m and np.isfinite(m["elapsed_s"]).any()
    fig = Figure(figsize=(11 if has_t else 5.5, 4.0))
    axes = np.atleast_1d(fig.subplots(1, 2 if has_t else 1))
    _adjust(fig, top=0.4, wspace=0.25)
    ax = axes[0]
    ax.plot(x, v, lw=1.0, color="tab:green", label="per log interval")
    fin = v[np.isfinite(v)]
    if fin.size:
        med = float(np.median(fin))
        ax.axhline(med, color="k", ls="--", lw=1, label=f"median {med:.1f} images/s")
        ax.set_ylim(0, max(fin.max(), med) * 1.1)
    _ax_images_seen(ax)
    ax.set_ylabel("images / s")
    ax.set_title("training speed")
    ax.legend(fontsize=8)
    if has_t:
        ax = axes[1]
        t = m["elapsed_s"] / 60.0
        ax.plot(t, x, lw=1.2, color="tab:blue")
        ax.set_xlabel("elapsed training time (min)")
        ax.set_ylabel("images seen")
        ax.grid(alpha=0.3)
        ok = np.isfinite(t)
        if ok.any():
            ax.set_title(f"{int(np.nanmax(x)):,} images in {float(np.nanmax(t)):.1f} min")
    return _save(fig, out_dir / "speed.png")


# ---------------------------------------------------------------------------------------------- slices
_PLANES = (("q_z = 0", ("q_x", "q_y"), 2), ("q_y = 0", ("q_x", "q_z"), 1), ("q_x = 0", ("q_y", "q_z"), 0))


def _plane_points(n: int, dq: float, normal_axis: int) -> np.ndarray:
    """Points ``(n, n, 3)`` of a central plane, indexed ``[i_first, i_second]`` of the two in-plane axes."""
    ax = centred_index(n) * dq
    a, b = np.meshgrid(ax, ax, indexing="ij")
    pts = np.zeros((n, n, 3))
    inplane = [k for k in range(3) if k != normal_axis]
    pts[..., inplane[0]] = a
    pts[..., inplane[1]] = b
    return pts


def _central_slices(run: RunData) -> tuple[list[np.ndarray], list[np.ndarray] | None, float, str]:
    """Reconstruction slices (log10), truth slices (log10, aligned and scaled) or None, dq, truth note."""
    vol, dq = run.intensity  # type: ignore[misc]
    n = vol.shape[0]
    c = n // 2
    est = [vol[:, :, c], vol[:, c, :], vol[c, :, :]]
    truth = run.truth
    if truth is None or truth["intensity"] is None:
        return [_log10_pos(s) for s in est], None, dq, ""
    al = run.alignment
    G = np.eye(3) if al is None else al["G_mod_rotz_pi"]
    tru = [sample_aligned(truth["intensity"], truth["voxel"], G, _plane_points(n, dq, k)) for _, _, k in _PLANES]
    # one global factor (intensities are defined up to the fluence scale): median log ratio inside q_max
    ax = (np.arange(n) - c) * dq
    inside = (ax[:, None] ** 2 + ax[None, :] ** 2) <= (c * dq) ** 2
    ratios = []
    for e, t in zip(est, tru):
        ok = inside & (e > 0) & (t > 0) & np.isfinite(t)
        ratios.append(np.log10(e[ok]) - np.log10(t[ok]))
    r = np.concatenate(ratios) if ratios else np.empty(0)
    shift = float(np.median(r)) if r.size else 0.0
    note = ("aligned by G (mod Rz(pi))" if al is not None else "not aligned (no poses)") + \
        f", scaled x 10^{shift:.2f}"
    return [_log10_pos(s) for s in est], [_log10_pos(t) + shift for t in tru], dq, note


def slices_figure(run: RunData, out_dir: Path) -> Path | None:
    """``slices.png``: central slices of ``log10 I`` (reconstruction; truth aligned and scaled beside it)."""
    if run.intensity is None:
        return None
    est, tru, dq, note = _central_slices(run)
    n = est[0].shape[0]
    c = n // 2
    rows = [("reconstruction", est)] + ([("truth", tru)] if tru is not None else [])
    vmin, vmax = robust_limits(np.concatenate([s.ravel() for s in est]), 1.0, 99.9)
    half = (c + 0.5) * dq
    extent = [-half, half, -half, half]
    cmap = _cmap("magma")
    fig = Figure(figsize=(13.5, 4.1 * len(rows) + 0.7))
    axes = np.atleast_2d(fig.subplots(len(rows), 3))
    _adjust(fig, right=0.9, top=0.95 if len(rows) > 1 else 0.75, wspace=0.3, hspace=0.35)
    im = None
    for r, (label, sl) in enumerate(rows):
        for k, (name, (xl, yl), _) in enumerate(_PLANES):
            ax = axes[r, k]
            im = ax.imshow(sl[k].T, origin="lower", extent=extent, vmin=vmin, vmax=vmax, cmap=cmap,
                           interpolation="nearest")
            ax.add_patch(_circle(c * dq))
            ax.set_xlabel(f"{xl} (1/A)")
            ax.set_ylabel(f"{yl} (1/A)")
            ax.set_title(f"{label}: {name}")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85, fraction=0.03, pad=0.02,
                 label="log10 I (reconstruction units)")
    title = "central slices of the 3D intensity (dashed circle: detector q_max; outside it the field extrapolates)"
    if tru is not None:
        title += f"\ntruth {note}"
    fig.suptitle(title)
    return _save(fig, out_dir / "slices.png")


def _circle(radius: float) -> Any:
    from matplotlib.patches import Circle

    return Circle((0.0, 0.0), radius, fill=False, ls="--", lw=0.8, color="cyan", alpha=0.8)


# ---------------------------------------------------------------------------------------------- patterns
def pattern_indices(n_total: int, n: int) -> np.ndarray:
    """``n`` pattern indices spread evenly over ``[0, n_total)`` (all of them when ``n >= n_total``).

    Example:
        >>> pattern_indices(100, 3).tolist()
        [0, 50, 99]
    """
    if n_total <= 0 or n <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.round(np.linspace(0, n_total - 1, min(n, n_total))).astype(np.int64))


def patterns_figure(run: RunData, out_dir: Path, n: int = 6) -> Path | None:
    """``patterns.png``: ``n`` input patterns, the model's expected counts at their inferred pose and mean
    scale (``posterior.h5``), and the Pearson residuals ``(y - lambda) / sqrt(lambda)``; masked pixels grey."""
    from bayes_spi.dataio.h5 import quaternions_to_rotations
    from bayes_spi.infer.load import load_trained

    post = run.posterior
    if post is None or not run.files.has("model") or run.data_path is None:
        return None
    pos = pattern_indices(len(post["R"]), n)  # rows of the (possibly strided) arrays of RunData
    idx = post["index"][pos]  # pattern numbers in the data file
    read = run.read_patterns(idx)
    if read is None:
        return None
    counts, mask = read
    trained = load_trained(run.run_dir)
    if tuple(trained.geometry.shape) != counts.shape[1:]:
        raise ValueError(f"{os.fspath(run.data_path)}: field /data/counts: expected patterns of shape "
                         f"{tuple(trained.geometry.shape)} (the model's detector), got {counts.shape[1:]}")
    R = quaternions_to_rotations(post["quaternion"][pos])
    scale = post.get("scale_mean", np.ones(len(post["R"])))[pos]
    lam = predicted_counts(trained.model, R, scale, counts.shape[1:])
    good = mask & trained.geometry.good_pixels()
    data = np.where(good, np.log10(1.0 + counts), np.nan)
    model = np.where(good, np.log10(1.0 + lam), np.nan)
    resid = np.where(good, (counts - lam) / np.sqrt(np.maximum(lam, 1e-12)), np.nan)
    if not trained.geometry.is_grid:  # a per-pixel detector (panels, gaps) is drawn assembled in (q_x, q_y)
        from bayes_spi.guides.encoder import assemble_sums

        q = trained.geometry.q_vectors()
        (sum_y, hits), (sum_lam, _) = assemble_sums(counts, good, q), assemble_sums(lam, good, q)
        cells = np.broadcast_to(hits > 0, sum_y.shape)
        data = np.where(cells, np.log10(1.0 + sum_y / np.maximum(hits, 1)), np.nan)
        model = np.where(cells, np.log10(1.0 + sum_lam / np.maximum(hits, 1)), np.nan)
        resid = np.where(cells, (sum_y - sum_lam) / np.sqrt(np.maximum(sum_lam, 1e-12)), np.nan)
    errors = None if run.alignment is None else run.alignment["errors_mod_rotz_pi_deg"][pos]
    k = len(idx)
    fig = Figure(figsize=(2.3 * k + 1.9, 7.8))
    axes = np.atleast_2d(fig.subplots(3, k, squeeze=False))
    _adjust(fig, left=0.35, right=0.75, bottom=0.15, top=0.95, wspace=0.06, hspace=0.25)
    vmax = float(np.nanmax(np.concatenate([data.ravel(), model.ravel()]))) if np.isfinite(data).any() else 1.0
    rlim = max(3.0, float(np.nanpercentile(np.abs(resid), 99))) if np.isfinite(resid).any() else 3.0
    ny, nx = data.shape[1:]
    ims = [None, None, None]
    for j, i in enumerate(idx):
        chi2 = float(np.nanmean(resid[j] ** 2))
        title = f"#{i}  s={scale[j]:.2f}"
        if "best_weight" in post:
            title += f"  w={post['best_weight'][pos[j]]:.2f}"
        if errors is not None:
            title += f"\nerror {errors[j]:.1f} deg"
        for r, (img, cmap, lim) in enumerate([(data[j], "viridis", (0.0, vmax)), (model[j], "viridis", (0.0, vmax)),
                                               (resid[j], "RdBu_r", (-rlim, rlim))]):
            ax = axes[r, j]
            ims[r] = ax.imshow(img, origin="lower", cmap=_cmap(cmap), vmin=lim[0], vmax=lim[1],
                               interpolation="nearest", extent=[-0.5, nx - 0.5, -0.5, ny - 0.5])
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(title, fontsize=9)
        axes[2, j].set_title(f"chi2/pixel {chi2:.2f}", fontsize=9)
    axes[0, 0].set_ylabel("data")
    axes[1, 0].set_ylabel("model (inferred pose)")
    axes[2, 0].set_ylabel("Pearson residual")
    fig.colorbar(ims[0], ax=axes[:2].ravel().tolist(), shrink=0.8, fraction=0.04, pad=0.02,
                 label="log10(1 + photons)")
    fig.colorbar(ims[2], ax=axes[2].ravel().tolist(), shrink=0.8, fraction=0.04, pad=0.02,
                 label="(y - lambda) / sqrt(lambda)")
    fig.suptitle(f"input patterns and the model's expected counts at the inferred pose and mean fluence scale "
                 f"({int(good.sum())} good pixels, masked grey)")
    return _save(fig, out_dir / "patterns.png")


# ---------------------------------------------------------------------------------------------- FSC
def fsc_resolutions(curve: dict[str, Any]) -> dict[str, float | None]:
    """Resolutions (nm) at 0.5 and 0.143 of a validated ``fsc.json`` curve (see ``RunData.fsc``): the file's
    values, or computed with :func:`resolution_crossing` when the file does not give them; ``None`` when the
    curve never drops below the threshold (the file says ``null`` or ``crosses_*: false``).

    Example:
        >>> round(fsc_resolutions({"q": np.array([0.0, 0.1, 0.3]), "fsc": np.array([1.0, 1.0, 0.0])})["0.5"], 6)
        0.5
    """
    out: dict[str, float | None] = {}
    for thr in ("0.5", "0.143"):
        if curve.get(f"crosses_{thr}") is False:
            out[thr] = None
        elif curve.get(f"given_{thr}"):
            out[thr] = curve[f"res_nm_{thr}"]
        else:
            qc = resolution_crossing(curve["q"], curve["fsc"], float(thr))
            out[thr] = None if qc is None or qc <= 0 else 0.1 / qc
    return out


def fsc_resolution_text(curve: dict[str, Any], threshold: str) -> str:
    """``"1.43 nm"``, or ``"not reached (< 0.85 nm)"`` when the curve stays above ``threshold`` ("0.5"/"0.143")
    up to its last shell (whose resolution is then a bound)."""
    res = fsc_resolutions(curve)[threshold]
    if res is not None:
        return f"{res:.2f} nm"
    q = curve["q"][np.isfinite(curve["q"]) & (curve["q"] > 0)]
    return f"not reached (< {0.1 / float(q.max()):.2f} nm)" if q.size else "not reached"


def fsc_figure(run: RunData, out_dir: Path) -> Path | None:
    """``fsc.png``: FSC curves against ``q`` (1/A; resolution in nm on the top axis) with the 0.5 and 0.143
    thresholds, the resolutions at which each curve crosses them, and the detector-corner resolution."""
    fsc = run.fsc
    if fsc is None or not any(k in fsc for k in FSC_KINDS):
        return None
    fig = Figure(figsize=(8.5, 5.4))
    ax = fig.subplots()
    _adjust(fig, left=0.7, right=0.5, top=0.85)
    colours = {"intensity": "tab:blue", "speckle": "tab:purple", "density": "tab:orange", "halfset": "tab:green",
               "halfset_speckle": "tab:olive"}
    q_hi = 0.0
    y_lo = 0.0
    for kind, label in FSC_KINDS.items():
        if kind not in fsc:
            continue
        cv = fsc[kind]
        res = fsc_resolutions(cv)
        col = colours[kind]
        ax.plot(cv["q"], cv["fsc"], "-o", ms=2.5, lw=1.4, color=col,
                label=f"{label}: 0.5 -> {fsc_resolution_text(cv, '0.5')}, "
                      f"0.143 -> {fsc_resolution_text(cv, '0.143')}")
        for thr, ls in (("0.5", "--"), ("0.143", ":")):
            if res[thr] is not None and res[thr] > 0:
                qc = 0.1 / res[thr]
                ax.axvline(qc, color=col, ls=ls, lw=0.9, alpha=0.8)
                ax.plot([qc], [float(thr)], marker="o", mfc="white", mec=col, ms=6)
        q_hi = max(q_hi, float(np.nanmax(cv["q"])))
        y_lo = min(y_lo, float(np.nanmin(cv["fsc"])))
    for thr in (0.5, 0.143):
        ax.axhline(thr, color="k", lw=0.8, ls="--" if thr == 0.5 else ":")
        ax.annotate(f"{thr:g}", (1.0, thr), xycoords=("axes fraction", "data"), xytext=(3, 0),
                    textcoords="offset points", ha="left", va="center", fontsize=8)
    corner = fsc.get("corner_res_nm")
    if corner is not None and corner > 0:
        ax.axvline(0.1 / corner, color="0.3", lw=1.2, ls="-.", label=f"detector corner ({corner:.2f} nm)")
        q_hi = max(q_hi, 0.1 / corner)
    q_pos = [float(np.min(fsc[k]["q"][fsc[k]["q"] > 0])) for k in FSC_KINDS if k in fsc and np.any(fsc[k]["q"] > 0)]
    q_hi = q_hi if q_hi > 0 else 1.0
    q_lo = 0.5 * min(q_pos) if q_pos else 0.01 * q_hi
    ax.set_xlim(q_lo, q_hi * 1.03)
    ax.set_ylim(min(-0.05, y_lo - 0.05), 1.05)
    ax.set_xlabel("q (1/A)")
    ax.set_ylabel("FSC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")

    def q_to_nm(q: np.ndarray) -> np.ndarray:  # its own inverse; q <= 0 maps far out (never shown)
        q = np.asarray(q, dtype=np.float64)
        return 0.1 / np.maximum(q, 1e-9)

    from matplotlib.ticker import FixedLocator

    top = ax.secondary_xaxis("top", functions=(q_to_nm, q_to_nm))
    nice = np.array([100, 50, 30, 20, 15, 10, 8, 6, 5, 4, 3, 2.5, 2, 1.5, 1.2, 1, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    r_hi, r_lo = 0.1 / q_lo, 0.1 / (q_hi * 1.03)
    kept: list[float] = []
    for r in nice[(nice <= r_hi) & (nice >= r_lo)][::-1]:  # from high q down: keep ticks >= 7% of the axis apart
        if not kept or 0.1 / kept[-1] - 0.1 / r >= 0.07 * (q_hi * 1.03 - q_lo):
            kept.append(float(r))
    top.xaxis.set_major_locator(FixedLocator(kept))
    top.set_xlabel("resolution (nm)")
    ax.set_title("Fourier shell correlation (dashed: 0.5, dotted: 0.143; circles: crossings)")
    return _save(fig, out_dir / "fsc.png")


# ---------------------------------------------------------------------------------------------- orientations
def _hammer_axes(ax: Any) -> None:
    """Outline and graticule of the Hammer map (meridians every 60 deg, parallels every 30 deg)."""
    t = np.linspace(-np.pi / 2, np.pi / 2, 181)
    for lon0 in (-np.pi, np.pi):
        x, y = hammer_xy(np.full_like(t, lon0 * (1 - 1e-9)), t)
        ax.plot(x, y, color="k", lw=1.0)
    for lon0 in np.radians(np.arange(-120, 180, 60)):
        x, y = hammer_xy(np.full_like(t, lon0), t)
        ax.plot(x, y, color="w", lw=0.5, alpha=0.7)
    lo = np.linspace(-np.pi, np.pi, 361)
    for lat0 in np.radians(np.arange(-60, 90, 30)):
        x, y = hammer_xy(lo, np.full_like(lo, lat0))
        ax.plot(x, y, color="w", lw=0.5, alpha=0.7)
        xl, yl = hammer_xy(-np.pi * 0.999, lat0)
        ax.text(float(xl) - 0.08, float(yl), f"{np.degrees(lat0):+.0f}" if lat0 else "0", fontsize=7, ha="right",
                va="center")
    for lon0 in np.radians(np.arange(-120, 180, 60)):
        x, y = hammer_xy(lon0, 0.0)
        ax.text(float(x), float(y) - 0.12, f"{np.degrees(lon0):.0f}", fontsize=7, ha="center", va="top", color="w")
    ax.set_aspect("equal")
    ax.set_xlim(-2.95, 2.95)
    ax.set_ylim(-1.5, 1.5)
    ax.axis("off")


def direction_cells(n_directions: int) -> tuple[int, int]:
    """``(n_lon, n_lat)`` of the coverage map: about 30 expected directions per cell, 6 to 24 latitude bands.

    Example:
        >>> direction_cells(16000)
        (32, 16)
    """
    n_lat = int(np.clip(round(math.sqrt(max(n_directions, 1) / 60.0)), 6, 24))
    return 2 * n_lat, n_lat


def _direction_map(ax: Any, d: np.ndarray, title: str, vmax: float) -> Any:
    lon, lat = lon_lat(d)
    _, dens, le, be = equal_area_histogram(lon, lat, *direction_cells(len(d)))
    LON, LAT = np.meshgrid(le, be)
    X, Y = hammer_xy(LON, LAT)
    im = ax.pcolormesh(X, Y, dens, cmap="viridis", vmin=0.0, vmax=vmax, shading="flat")
    _hammer_axes(ax)
    ax.set_title(title, fontsize=10)
    return im


def orientations_figure(run: RunData, out_dir: Path) -> Path | None:
    """``orientations.png``: density of molecule-frame viewing directions ``R e_z`` relative to uniform on a
    Hammer equal-area map (cells of equal solid angle), inferred poses and, with the truth, the true poses in
    the reconstruction's frame (``G^T R_true e_z``)."""
    post = run.posterior
    if post is None:
        return None
    d_est = viewing_directions(post["R"])
    n_all = run.n_patterns or len(d_est)
    shown = f"{len(d_est):,} of {n_all:,} patterns, an even stride" if len(d_est) < n_all else \
        f"{len(d_est):,} patterns"
    panels = [(d_est, f"inferred poses ({shown})")]
    al = run.alignment
    if al is not None:
        G = al["G_mod_rotz_pi"]
        panels.append((viewing_directions(G.T @ run.truth["R"]), "true poses, in the reconstruction's frame"))
    fig = Figure(figsize=(6.4 * len(panels) + 1.0, 3.9))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    _adjust(fig, left=0.35, right=0.8, bottom=0.1, top=0.55, wspace=0.05)
    dens_max = []
    for d, _ in panels:
        lon, lat = lon_lat(d)
        dens_max.append(float(np.percentile(equal_area_histogram(lon, lat, *direction_cells(len(d)))[1], 99)))
    vmax = max(2.0, *dens_max)
    im = None
    for ax, (d, title) in zip(axes, panels):
        im = _direction_map(ax, d, title, vmax)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.85, fraction=0.03, pad=0.02,
                 label="patterns per solid angle / uniform")
    fig.suptitle("coverage of viewing directions (molecule-frame beam axis R e_z; lon/lat in deg)")
    return _save(fig, out_dir / "orientations.png")


# ---------------------------------------------------------------------------------------------- spread
def _spread_bins(values: list[np.ndarray]) -> tuple[np.ndarray, bool]:
    v = np.concatenate([a[np.isfinite(a) & (a > 0)] for a in values])
    if v.size == 0:
        return np.linspace(0, 1, 11), False
    lo, hi = float(np.percentile(v, 0.1)), float(v.max())
    if hi / max(lo, 1e-12) > 20:
        return np.geomspace(max(lo, 1e-3), hi * 1.01, 60), True
    return np.linspace(0, hi * 1.02, 60), False


def spread_figure(run: RunData, out_dir: Path) -> Path | None:
    """``spread.png``: histograms of the 50% and 90% credible-cone radii (deg) and, when present, of the
    posterior weight of the most probable pose hypothesis."""
    cones = run.cones
    post = run.posterior
    if cones is None:
        return None
    has_w = post is not None and "best_weight" in post
    fig = Figure(figsize=(11 if has_w else 6, 4.2))
    axes = np.atleast_1d(fig.subplots(1, 2 if has_w else 1))
    _adjust(fig, top=0.6, wspace=0.25)
    ax = axes[0]
    bins, logx = _spread_bins([cones["r50"], cones["r90"]])
    for key, label, col in (("r50", "50% cone", "tab:blue"), ("r90", "90% cone", "tab:red")):
        r = cones[key]
        ax.hist(r[np.isfinite(r)], bins=bins, alpha=0.55, color=col,
                label=f"{label} (median {np.nanmedian(r):.2f} deg)")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel("credible-cone radius (deg)")
    ax.set_ylabel("patterns")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(f"posterior angular spread\n(from {cones['label']})", fontsize=10)
    if has_w:
        ax = axes[1]
        w = post["best_weight"]
        ax.hist(w, bins=np.linspace(0, 1, 51), color="tab:purple", alpha=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("posterior weight of the most probable pose hypothesis")
        ax.set_ylabel("patterns")
        ax.grid(alpha=0.3)
        ax.set_title(f"hypothesis weights (mean {w.mean():.2f}; < 0.9 for {np.mean(w < 0.9):.1%})", fontsize=9)
    return _save(fig, out_dir / "spread.png")


# ---------------------------------------------------------------------------------------------- errors
ERROR_BINS = np.linspace(0.0, 180.0, 91)


def errors_figure(run: RunData, out_dir: Path) -> Path | None:
    """``errors.png`` (needs the truth): histograms of the orientation error after global alignment, raw and
    modulo ``Rz(pi)`` (2-degree bins), and the error against the 90% cone radius (a calibration check)."""
    al = run.alignment
    if al is None:
        return None
    cal = run.calibration
    fig = Figure(figsize=(12.5 if cal is not None else 6.5, 4.4))
    axes = np.atleast_1d(fig.subplots(1, 2 if cal is not None else 1))
    _adjust(fig, top=0.4, wspace=0.25)
    ax = axes[0]
    centres = 0.5 * (ERROR_BINS[1:] + ERROR_BINS[:-1])
    width = ERROR_BINS[1] - ERROR_BINS[0]
    for key, label, col in (("errors_deg", "raw", "tab:blue"), ("errors_mod_rotz_pi_deg", "mod Rz(pi)", "tab:orange")):
        e = al[key]
        counts = histogram_counts(e, ERROR_BINS)
        ax.bar(centres, counts, width=width, alpha=0.55, color=col,
               label=f"{label}: median {np.median(e):.2f} deg, mean {np.mean(e):.2f} deg")
    ax.set_yscale("log")
    ax.set_xlim(0, 180)
    ax.set_xlabel("orientation error after global alignment (deg)")
    ax.set_ylabel("patterns")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    sub = f" (G from {al['n_aligned']:,} patterns)" if al["n_aligned"] < len(al["errors_deg"]) else ""
    ax.set_title(f"pose errors vs truth; wrong Rz(pi) mode {np.mean(al['flipped']):.1%}{sub}", fontsize=10)
    if cal is not None:
        ax = axes[1]
        e, r90 = cal["errors_deg"], cal["r90_deg"]
        inside = float(np.mean(e <= r90))
        pick = np.arange(len(e))
        if len(e) > _MAX_SCATTER:
            pick = np.sort(np.random.default_rng(0).choice(len(e), _MAX_SCATTER, replace=False))
        ee = np.maximum(e[pick], 1e-2)
        shown = f" ({len(pick):,} of {len(e):,} shown)" if len(pick) < len(e) else f" ({len(e):,})"
        ax.scatter(r90[pick], ee, s=4, alpha=0.35, color="tab:orange", rasterized=True, label="patterns" + shown)
        lo = max(1e-2, min(float(np.nanmin(r90[pick])), float(np.min(ee))) * 0.8)
        hi = min(max(float(np.nanmax(r90[pick])), float(np.max(ee))) * 1.2, 200.0)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="error = 90% cone radius")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("90% credible-cone radius (deg)")
        ax.set_ylabel(f"error of the {cal['centre']}, mod Rz(pi) (deg)")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
        ax.set_title(f"calibration: {inside:.1%} of patterns within their 90% cone (nominal 90%)", fontsize=10)
    return _save(fig, out_dir / "errors.png")


# ---------------------------------------------------------------------------------------------- density
def _support_limits(rho: np.ndarray, voxel: float, frac: float = 0.03) -> list[tuple[float, float]]:
    """Per axis, the nm range around the voxels above ``frac`` of the peak |density| (padded; centred box)."""
    a = np.abs(rho)
    peak = float(a.max()) if a.size else 0.0
    out = []
    for k, n in enumerate(rho.shape):
        half = (n // 2 + 0.5) * voxel / 10.0
        if peak <= 0:
            out.append((-half, half))
            continue
        prof = a.max(axis=tuple(i for i in range(3) if i != k))
        idx = np.nonzero(prof >= frac * peak)[0]
        ext = float(max(abs(idx[0] - n // 2), abs(idx[-1] - n // 2))) * voxel / 10.0
        r = min(half, 1.25 * ext + 2 * voxel / 10.0)
        out.append((-r, r))
    r = max(hi for _, hi in out)  # the same range on every axis: equal scales in all panels
    return [(-r, r)] * 3


def density_figure(run: RunData, out_dir: Path) -> Path | None:
    """``density.png``: projections (sums along z, y, x) and central sections of ``density.mrc``, axes in nm."""
    dens = run.density
    if dens is None:
        return None
    rho, voxel = dens
    shape = rho.shape
    ext = [(np.array([-0.5, s - 0.5]) - s // 2) * voxel / 10.0 for s in shape]
    names = ("x", "y", "z")
    lims = _support_limits(rho, voxel)
    fig = Figure(figsize=(13.5, 8.2))
    axes = fig.subplots(2, 3)
    _adjust(fig, right=0.45, top=0.6, wspace=0.5, hspace=0.3)
    cmap = _cmap("magma")
    for k, normal in enumerate((2, 1, 0)):
        a, b = [i for i in range(3) if i != normal]
        proj = rho.sum(axis=normal)
        sec = np.take(rho, shape[normal] // 2, axis=normal)
        for r, (img, what) in enumerate(((proj, f"projection along {names[normal]}"),
                                         (sec, f"central section {names[normal]} = 0"))):
            ax = axes[r, k]
            lo, hi = robust_limits(img, 0.5, 99.9)
            im = ax.imshow(img.T, origin="lower", cmap=cmap, vmin=min(lo, 0.0) if r == 0 else lo, vmax=hi,
                           extent=[*ext[a], *ext[b]], interpolation="nearest")
            ax.set_xlim(*lims[a])
            ax.set_ylim(*lims[b])
            ax.set_xlabel(f"{names[a]} (nm)")
            ax.set_ylabel(f"{names[b]} (nm)")
            ax.set_title(what)
            fig.colorbar(im, ax=ax, shrink=0.8, label="projected density (arb.)" if r == 0 else "density (arb.)")
    fig.suptitle(f"phased electron density (density.mrc: {shape[0]}x{shape[1]}x{shape[2]} voxels of "
                 f"{voxel:.2f} A)")
    return _save(fig, out_dir / "density.png")


# ---------------------------------------------------------------------------------------------- overview
def overview_figure(run: RunData, out_path: Path) -> Path | None:
    """``report.png`` (one page, 2 x 3 panels, 1260 x 765 px): ELBO, speed, pose errors (or the posterior
    spread without truth), and the three central slices of ``log10 I``."""
    m = run.metrics
    if m is None or run.intensity is None:
        return None
    fig = Figure(figsize=OVERVIEW_FIGSIZE)
    axes = fig.subplots(2, 3)
    fig.subplots_adjust(left=0.06, right=0.9, top=0.9, bottom=0.07, wspace=0.3, hspace=0.35)
    x = m["images_seen"]
    ax = axes[0, 0]
    y = m["elbo_per_image"]
    ax.plot(x, y, lw=1)
    fin = y[np.isfinite(y)]
    if fin.size:
        lo = np.percentile(fin, 5)
        ax.set_ylim(lo - 0.1 * abs(lo), fin.max() + 0.05 * abs(lo))
    _ax_images_seen(ax)
    ax.set_ylabel("ELBO per image (nats)")
    ax.set_title("ELBO")
    ax = axes[0, 1]
    if "images_per_s" in m:
        ax.plot(x, m["images_per_s"], lw=1, color="tab:green")
    _ax_images_seen(ax)
    ax.set_ylabel("images / s")
    ax.set_title("training speed")
    ax = axes[0, 2]
    al = run.alignment
    if al is not None:
        for key, label in (("errors_deg", "raw"), ("errors_mod_rotz_pi_deg", "mod Rz(pi)")):
            ax.hist(al[key], bins=ERROR_BINS, alpha=0.6, label=f"{label} (median {np.median(al[key]):.1f})")
        ax.set_yscale("log")
        ax.set_xlabel("orientation error after global alignment (deg)")
        ax.set_ylabel("patterns")
        ax.legend(fontsize=8)
        ax.set_title("pose errors")
    elif run.cones is not None:
        r = run.cones["r90"]
        ax.hist(r[np.isfinite(r)], bins=50, color="tab:red", alpha=0.7)
        ax.set_xlabel("90% credible-cone radius (deg)")
        ax.set_ylabel("patterns")
        ax.set_title("posterior angular spread (no truth given)")
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, "no truth given", ha="center", va="center")
    vol, dq = run.intensity
    c = vol.shape[0] // 2
    half = (c + 0.5) * dq
    logv = [_log10_pos(s) for s in (vol[:, :, c], vol[:, c, :], vol[c, :, :])]
    vmin, vmax = robust_limits(np.concatenate([s.ravel() for s in logv]), 1.0, 99.9)
    im = None
    for ax, (name, (xl, yl), _), sl in zip(axes[1], _PLANES, logv):
        im = ax.imshow(sl.T, origin="lower", extent=[-half, half, -half, half], vmin=vmin, vmax=vmax,
                       cmap=_cmap("magma"), interpolation="nearest")
        ax.set_title(f"log10 I, central slice {name}")
        ax.set_xlabel(f"{xl} (1/A)")
        ax.set_ylabel(f"{yl} (1/A)")
    cax = fig.add_axes((0.92, 0.1, 0.012, 0.3))
    fig.colorbar(im, cax=cax, label="log10 I")
    fig.suptitle(f"bayes-spi run {os.fspath(run.run_dir)}  (details: report.html)")
    return _save(fig, out_path, dpi=OVERVIEW_DPI)
