"""Data input/output: the bayes-spi HDF5 format (:mod:`bayes_spi.dataio.h5`)."""

from bayes_spi.dataio.h5 import (
    FORMAT_NAME,
    FORMAT_VERSION,
    QUATERNION_CONVENTION,
    DataFormatError,
    H5Writer,
    SPIDataset,
    quaternions_to_rotations,
    write_simulation,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "QUATERNION_CONVENTION",
    "DataFormatError",
    "H5Writer",
    "SPIDataset",
    "quaternions_to_rotations",
    "write_simulation",
]
