"""bayes-spi: Bayesian 3D reconstruction from XFEL single-particle-imaging diffraction patterns."""

__all__ = ["__version__"]

__version__ = "0.1.0"
