"""Fluence: incident photons per area, and the per-pattern fluence jitter ``gamma_i`` (mean 1).

Jitter specifications (strings, as on the command line):

* ``"none"``: ``gamma = 1``.
* ``"lognormal:SIGMA"``: ``gamma = exp(SIGMA z - SIGMA^2/2)``, ``z ~ N(0, 1)`` (mean exactly 1).
* ``"pr772"``: sampled from the packaged PR772 per-image photon-count histogram (bin centres normalised to
  their weighted mean, uniform within a bin), mean 1, relative spread 0.32x - 2.6x.
"""

from __future__ import annotations

import math
from importlib import resources

import numpy as np

__all__ = [
    "CLASSICAL_ELECTRON_RADIUS_A",
    "fluence_from_pulse",
    "pr772_histogram",
    "parse_jitter",
    "sample_jitter",
]

#: classical electron radius r_e in Angstrom
CLASSICAL_ELECTRON_RADIUS_A: float = 2.8179403262e-5


def fluence_from_pulse(photons_per_pulse: float, beam_radius_nm: float) -> float:
    """Fluence in photons/A^2 of a flat-top beam: ``N / (pi r^2)`` with ``r`` in nm converted to A."""
    if not photons_per_pulse > 0 or not math.isfinite(photons_per_pulse):
        raise ValueError(f"photons_per_pulse: expected a positive number, got {photons_per_pulse!r}")
    if not beam_radius_nm > 0 or not math.isfinite(beam_radius_nm):
        raise ValueError(f"beam_radius_nm: expected a positive number, got {beam_radius_nm!r}")
    radius_a = beam_radius_nm * 10.0
    return float(photons_per_pulse) / (math.pi * radius_a**2)


def pr772_histogram() -> tuple[np.ndarray, np.ndarray]:
    """Packaged PR772 histogram: ``(relative bin centres (100,), probabilities (100,))``, weighted mean 1."""
    ref = resources.files("bayes_spi.resources").joinpath("pr772_photons_per_image.npy")
    with ref.open("rb") as handle:
        table = np.load(handle)
    centres = np.asarray(table[0], dtype=np.float64)
    probs = np.clip(np.asarray(table[1], dtype=np.float64), 0.0, None)
    probs = probs / probs.sum()
    mean = float((centres * probs).sum())
    return centres / mean, probs


def parse_jitter(spec: str) -> tuple[str, float]:
    """Parse a jitter spec into ``(kind, sigma)`` with kind in ``none``, ``lognormal``, ``pr772``.

    Raises:
        ValueError: unknown spec (message lists the accepted forms).
    """
    text = spec.strip().lower()
    if text in ("none", ""):
        return "none", 0.0
    if text == "pr772":
        return "pr772", 0.0
    if text.startswith("lognormal:"):
        try:
            sigma = float(text.split(":", 1)[1])
        except ValueError:
            sigma = -1.0
        if sigma >= 0 and math.isfinite(sigma):
            return "lognormal", sigma
    raise ValueError(f"fluence jitter: expected 'none', 'pr772' or 'lognormal:SIGMA' (SIGMA >= 0), got {spec!r}")


def sample_jitter(spec: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` fluence scales ``gamma`` ``(n,)`` (mean 1) for the spec (see module docstring)."""
    kind, sigma = parse_jitter(spec)
    if kind == "none":
        return np.ones(n)
    if kind == "lognormal":
        return np.exp(sigma * rng.standard_normal(n) - 0.5 * sigma**2)
    centres, probs = pr772_histogram()
    width = float(np.median(np.diff(centres)))
    bins = rng.choice(len(centres), size=n, p=probs)
    return np.clip(centres[bins] + width * (rng.random(n) - 0.5), 1e-6, None)
