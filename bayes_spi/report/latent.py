"""The latent-space figure of a heterogeneous fit: each pattern's posterior, coloured by the truth when known.

Left: the posterior mean of ``z`` (its first one or two coordinates; with ``d = 1`` against the pattern's
true latent when there is one, else against the index) with the posterior sd as error bars. Right (with
classes): ``q(c = 1)`` per pattern, split by the true class. Colour: the true latent (e.g. the shape
exponent, a colour bar) or the true class.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> from bayes_spi.posterior.latent import LatentSummary
    >>> s = LatentSummary(np.full((4, 2), 0.5), np.zeros((4, 1)), np.ones((4, 1)), np.zeros((4, 2, 1)),
    ...                   np.ones((4, 2, 1)))
    >>> latent_figure(s, pathlib.Path(tempfile.mkdtemp()) / "latent.png").name
    'latent.png'
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bayes_spi.atomic import atomic_path
from bayes_spi.posterior.latent import LatentSummary

__all__ = ["latent_figure", "latent_coordinates"]


def latent_coordinates(summary: LatentSummary, truth_latent: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray, str, str]:
    """The plotted points ``(x (N,), y (N,), x label, y label)`` of the left panel."""
    n, d = summary.z_mean.shape
    if d >= 2:
        return summary.z_mean[:, 0], summary.z_mean[:, 1], "E[z_1]", "E[z_2]"
    y = summary.z_mean[:, 0] if d == 1 else summary.class_probs[:, -1]
    label = "E[z]" if d == 1 else "q(c = last)"
    if truth_latent is not None:
        return np.asarray(truth_latent)[:, 0], y, "true latent", label
    return np.arange(n, dtype=np.float64), y, "pattern", label


def latent_figure(summary: LatentSummary, path: Path, truth_latent: np.ndarray | None = None,
                  truth_class: np.ndarray | None = None, max_points: int = 4000) -> Path:
    """Write the figure (PNG, atomically) and return ``path``; ``max_points`` evenly spaced patterns are drawn."""
    n = summary.z_mean.shape[0]
    pick = np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(np.int64))
    sub = LatentSummary(*(getattr(summary, k)[pick] for k in ("class_probs", "z_mean", "z_sd", "z_loc", "z_scale")),
                        class_source=summary.class_source)
    tl = None if truth_latent is None else np.asarray(truth_latent)[pick]
    tc = None if truth_class is None else np.asarray(truth_class)[pick]
    with_classes = sub.class_probs.shape[1] > 1
    fig = Figure(figsize=(9.0 if with_classes else 5.0, 4.0))
    ax = fig.add_subplot(1, 2 if with_classes else 1, 1)
    x, y, xl, yl = latent_coordinates(sub, tl)
    colour = tl[:, 0] if tl is not None else (tc if tc is not None else None)
    if sub.z_mean.shape[1] == 1:
        ax.errorbar(x, y, yerr=sub.z_sd[:, 0], fmt="none", ecolor="0.8", lw=0.5, zorder=1)
    sc = ax.scatter(x, y, c=colour, s=6, zorder=2, **({"cmap": "viridis"} if colour is not None else {}))
    if colour is not None:
        fig.colorbar(sc, ax=ax, label="true latent" if tl is not None else "true class")
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title("structure latent per pattern")
    if with_classes:
        ax2 = fig.add_subplot(1, 2, 2)
        groups = np.unique(tc) if tc is not None else np.array([0])
        data = [sub.class_probs[(tc == g) if tc is not None else slice(None), -1] for g in groups]
        ax2.boxplot(data)
        ax2.set_xticks(np.arange(1, len(groups) + 1),
                       [f"true class {g}" if tc is not None else "all" for g in groups])
        last = sub.class_probs.shape[1] - 1
        ax2.set_ylabel(f"p(c = {last} | y)" if sub.class_source == "refined" else f"q(c = {last})")
        ax2.set_ylim(-0.05, 1.05)
        ax2.set_title("class posterior" + (" (refined off the grid)" if sub.class_source == "refined" else " (guide)"))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path
