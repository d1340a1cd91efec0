"""Analysis of reconstructions: Fourier shell correlation, volume alignment, phase retrieval.

* :mod:`bayes_spi.analysis.fsc`: shell correlations of intensities (on ``sqrt(I)``) and densities,
  resolution at 0.5 / 0.143.
* :mod:`bayes_spi.analysis.align`: rotation of intensities, rotation + translation + hand of densities.
* :mod:`bayes_spi.analysis.phasing`: ER + HIO + shrink-wrap phase retrieval with several random starts.
"""

from bayes_spi.analysis.align import (
    align_density,
    align_intensity_rotation,
    centre_of_mass,
    fourier_shift,
    intensity_features,
    rotate_volume,
)
from bayes_spi.analysis.fsc import (
    FSCCurve,
    centred_fft,
    density_fsc,
    intensity_fsc,
    radial_index,
    resolution_at,
    shell_correlation,
)
from bayes_spi.analysis.phasing import PhasingResult, fourier_error, measured_sphere, phase_retrieval

__all__ = [
    "FSCCurve",
    "PhasingResult",
    "align_density",
    "align_intensity_rotation",
    "centre_of_mass",
    "centred_fft",
    "density_fsc",
    "fourier_error",
    "fourier_shift",
    "intensity_features",
    "intensity_fsc",
    "measured_sphere",
    "phase_retrieval",
    "radial_index",
    "resolution_at",
    "rotate_volume",
    "shell_correlation",
]
