"""Options for reading a foreign data source (Dragonfly ``.emc``, CXI, a NumPy/HDF5 stack) directly.

``bayes-spi convert``, ``fit`` and ``posterior`` take them; a fit records them in ``config.yaml`` (under
``data: source:``) so that ``--resume`` and ``report`` reopen the data the same way. They are passed to
:func:`bayes_spi.dataio.sources.open_dataset` by :meth:`SourceOptions.open_kwargs`.

Example:
    >>> opts = SourceOptions(photon_energy_ev=6199.2)
    >>> SourceOptions.from_dict(opts.to_dict()) == opts
    True
    >>> SourceOptions(wavelength_A=2.0).open_kwargs()["photon_energy_ev"]
    6199.2099
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["SourceOptions", "SOURCE_OPTION_HELP", "HC_EV_A"]

#: h*c in eV * Angstrom (as bayes_spi.geometry.HC_EV_A; this layer imports nothing from the package)
HC_EV_A: float = 12398.4198

#: option -> help text (the command line's words)
SOURCE_OPTION_HELP: dict[str, str] = {
    "detector": "Dragonfly detector file (HDF5 or ASCII .dat) for .emc data.",
    "geometry": "Geometry file (YAML/JSON: photon_energy_ev, distance_m, pixel_size_m, beam_center_px, mask, "
                "pixel_positions_m, polarization) for a .npy or FILE.h5:/dataset stack of counts, or a CrystFEL "
                ".geom for a stack (N, *its data shape) or a CXI file.",
    "photon_energy_ev": "Photon energy in eV (Dragonfly detector files hold no wavelength; overrides a geometry "
                        "file's).",
    "wavelength_A": "Wavelength in A (instead of --photon-energy).",
    "shape": "Image shape N_Y N_X of a Dragonfly pixel list whose layout is not recovered from its positions "
             "(pixel t = ix * N_Y + iy).",
    "keep_mask_1": "Dragonfly mask value 1 (merge only; the corners of make_detector) counts as good "
                   "(default) or bad; 2 is always bad.",
    "pixel_size_m": "Nominal pixel size (m) for a flat Dragonfly grid (its file holds only detd = D/p).",
}


@dataclass(frozen=True)
class SourceOptions:
    """How to read a foreign data source (every field optional; see :data:`SOURCE_OPTION_HELP`).

    Attributes:
        detector: Dragonfly detector file.
        geometry: generic geometry file (YAML/JSON).
        photon_energy_ev: photon energy (eV).
        wavelength_A: wavelength (A), the alternative to ``photon_energy_ev``.
        shape: ``(n_y, n_x)`` of a Dragonfly pixel list.
        keep_mask_1: Dragonfly mask 1 is good.
        pixel_size_m: nominal pixel size of a flat Dragonfly grid.
    """

    detector: str | None = None
    geometry: str | None = None
    photon_energy_ev: float | None = None
    wavelength_A: float | None = None
    shape: tuple[int, int] | None = None
    keep_mask_1: bool = True
    pixel_size_m: float | None = None

    def __post_init__(self) -> None:
        for name in ("photon_energy_ev", "wavelength_A", "pixel_size_m"):
            value = getattr(self, name)
            if value is not None:
                value = float(value)
                if not math.isfinite(value) or value <= 0:
                    raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
                object.__setattr__(self, name, value)
        if self.photon_energy_ev is not None and self.wavelength_A is not None:
            raise ValueError("give either the photon energy or the wavelength, not both")
        for name in ("detector", "geometry"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        if self.shape is not None:
            shape = tuple(int(v) for v in self.shape)
            if len(shape) != 2 or min(shape) < 1:
                raise ValueError(f"shape: expected two positive integers (n_y, n_x), got {self.shape!r}")
            object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "keep_mask_1", bool(self.keep_mask_1))

    @property
    def given(self) -> bool:
        """Any option differs from its default."""
        return bool(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The options that differ from the defaults (file names made absolute), YAML-safe."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default:
                continue
            if f.name in ("detector", "geometry"):
                value = os.path.abspath(value)
            elif f.name == "shape":
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SourceOptions:
        """Inverse of :meth:`to_dict` (unknown keys raise ``ValueError``)."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"source options: expected keys among {sorted(known)}, got {unknown}")
        if data.get("shape") is not None:
            data["shape"] = tuple(data["shape"])
        return cls(**data)

    def open_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`bayes_spi.dataio.sources.open_dataset` (only the options given)."""
        energy = self.photon_energy_ev
        if self.wavelength_A is not None:
            energy = HC_EV_A / self.wavelength_A
        kwargs: dict[str, Any] = {"detector": self.detector, "geometry": self.geometry, "photon_energy_ev": energy,
                                  "shape": self.shape, "pixel_size_m": self.pixel_size_m}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if not self.keep_mask_1:
            kwargs["keep_mask_1"] = False
        return kwargs
