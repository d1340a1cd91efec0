"""Simulation: structures, molecular transforms, fluence and simulated SPI data sets."""

from bayes_spi.sim.fluence import CLASSICAL_ELECTRON_RADIUS_A, fluence_from_pulse, sample_jitter
from bayes_spi.sim.simulate import (
    SimulationSummary,
    beamstop_mask,
    calibrate_fluence,
    expected_photons,
    load_mask_file,
    random_quaternions,
    simulate,
    simulate_to_h5,
)
from bayes_spi.sim.structure import Structure, form_factor, load_structure
from bayes_spi.sim.transform import (
    density_on_grid,
    intensity_on_grid,
    molecular_transform,
    molecular_transform_direct,
)

__all__ = [
    "CLASSICAL_ELECTRON_RADIUS_A",
    "SimulationSummary",
    "Structure",
    "beamstop_mask",
    "calibrate_fluence",
    "density_on_grid",
    "expected_photons",
    "fluence_from_pulse",
    "form_factor",
    "intensity_on_grid",
    "load_mask_file",
    "load_structure",
    "molecular_transform",
    "molecular_transform_direct",
    "random_quaternions",
    "sample_jitter",
    "simulate",
    "simulate_to_h5",
]
