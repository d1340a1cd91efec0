"""CrystFEL detector geometry files (``.geom``): the common subset used for AGIPD at European XFEL.

:func:`read_crystfel_geom` parses the file into a per-pixel :class:`~bayes_spi.geometry.Geometry` (kind
``"positions"``: exact solid angle and polarization per pixel) laid out like the data it describes.

What is read
------------
* ``key = value`` lines; ``;`` starts a comment. ``name/key = value`` sets a key of panel ``name``; a key
  without a panel name sets a global value, and a global panel key (``res``, ``clen``, ``coffset``,
  ``adu_per_eV``, ``dimN``, ...) is the default of every panel that appears after it (as in CrystFEL).
* Panels: ``min_fs, max_fs, min_ss, max_ss`` (inclusive, data-array coordinates), ``corner_x, corner_y`` (the
  outer corner of the panel's first pixel, in pixels), ``fs, ss`` (``"+0.0012x -1.0000y [+0.001z]"``: the lab
  step of one pixel along fast / slow scan, in pixels), ``res`` (pixels per metre), ``clen`` (metres), ``coffset``
  (metres, added to ``clen``), ``no_index`` (1: the panel's pixels are masked), ``dimN`` (``%`` frame, ``ss``,
  ``fs``, or a number: the index of the panel along that data dimension, e.g. AGIPD's module number). Pixel
  ``(fs, ss)`` of a panel has its centre at ``x = (corner_x + (fs - min_fs + 1/2) fs_x + (ss - min_ss + 1/2) ss_x)
  / res``, the same for ``y``, and ``z = clen + coffset + ((fs - min_fs + 1/2) fs_z + (ss - min_ss + 1/2) ss_z) / res``;
  the lab frame is CrystFEL's (z along the beam, y up, x horizontal), which is bayes-spi's.
* Globals: ``photon_energy`` (eV), ``clen``, ``data`` (the frames' dataset), ``mask``, ``mask_file``,
  ``mask_good``, ``mask_bad`` (the pixel flags: a pixel is good when all ``mask_good`` bits and no ``mask_bad``
  bit are set), ``adu_per_eV`` / ``adu_per_photon``. A ``clen`` or ``photon_energy`` that names a dataset
  (per-frame values) must be given to :func:`read_crystfel_geom` instead (``clen_m``, ``photon_energy_ev``).
* Bad regions ``badNAME/...``: ``min_x, max_x, min_y, max_y`` (lab pixel units: a pixel whose centre lies inside
  is masked) or ``min_fs, max_fs, min_ss, max_ss`` with ``panel`` (data-array coordinates of that panel).
* Ignored: ``rigid_group*``, ``max_adu`` and other keys that do not change the pixel positions or the mask.

Layout
------
The pixels keep the data's layout: the geometry's ``(n_y, n_x)`` array is one frame of the data with any
per-panel dimension (AGIPD's module number, ``dim1``) stacked along the slow-scan rows, i.e. row
``= module * (rows per module) + ss``, column ``= fs`` (AGIPD 1M: 16 modules of 512 x 128 -> ``(8192, 128)``, the
layout CrystFEL and EXtra-geom call the 2D data layout). :meth:`CrystFELGeometry.frame_to_pixels` turns frames
of the data ``(B, *data_shape)`` into ``(B, n_y, n_x)``. Pixels that no panel covers are masked.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from bayes_spi.config.commands import flag
from bayes_spi.dataio.h5 import DataFormatError
from bayes_spi.geometry import Geometry

__all__ = ["CrystFELPanel", "CrystFELGeometry", "read_crystfel_geom", "parse_vector"]

#: panel keys that may be given globally as defaults for the panels that follow
_PANEL_DEFAULTS = ("res", "clen", "coffset", "adu_per_eV", "adu_per_photon", "no_index", "max_adu", "data", "mask",
                   "mask_file", "mask_good", "mask_bad", "photon_energy")

_VECTOR_TERM = re.compile(r"([+-]?)\s*(\d*\.?\d*(?:[eE][+-]?\d+)?)\s*([xyz])")


def parse_vector(text: str) -> tuple[float, float, float]:
    """CrystFEL direction ``"+0.0012x -1.0000y [+0.1z]"`` -> ``(x, y, z)`` (in pixels).

    Raises:
        ValueError: text that is not a sum of ``<number>x|y|z`` terms.
    """
    out = {"x": 0.0, "y": 0.0, "z": 0.0}
    rest = text.replace(" ", "")
    pos = 0
    for match in _VECTOR_TERM.finditer(rest):
        if match.start() != pos:
            break
        sign, number, axis = match.groups()
        value = float(number) if number not in ("", ".") else 1.0
        out[axis] += -value if sign == "-" else value
        pos = match.end()
    if pos != len(rest) or not rest:
        raise ValueError(f"expected a vector like '+1.0x -0.5y', got {text!r}")
    return out["x"], out["y"], out["z"]


@dataclass(frozen=True)
class CrystFELPanel:
    """One panel of a ``.geom`` file (units as in the file: pixels, metres).

    Attributes:
        name: panel name.
        min_fs, max_fs, min_ss, max_ss: inclusive data-array region.
        corner_x, corner_y: outer corner of the first pixel (pixels).
        fs, ss: lab steps of one pixel (pixels), ``(x, y, z)``.
        res: pixels per metre.
        clen: camera length (m); coffset: offset added to it (m).
        module: the panel's index along the extra data dimension (e.g. AGIPD module), or None.
        no_index: True if the panel is excluded.
    """

    name: str
    min_fs: int
    max_fs: int
    min_ss: int
    max_ss: int
    corner_x: float
    corner_y: float
    fs: tuple[float, float, float]
    ss: tuple[float, float, float]
    res: float
    clen: float
    coffset: float
    module: int | None = None
    no_index: bool = False

    @property
    def n_fs(self) -> int:
        """Columns of the panel."""
        return self.max_fs - self.min_fs + 1

    @property
    def n_ss(self) -> int:
        """Rows of the panel."""
        return self.max_ss - self.min_ss + 1

    def positions_m(self) -> np.ndarray:
        """Pixel centres ``(n_ss, n_fs, 3)`` in metres (see the module docstring)."""
        f = np.arange(self.n_fs, dtype=np.float64)[None, :, None] + 0.5
        s = np.arange(self.n_ss, dtype=np.float64)[:, None, None] + 0.5
        fs, ss = np.asarray(self.fs), np.asarray(self.ss)
        pix = f * fs + s * ss + np.array([self.corner_x, self.corner_y, 0.0])
        pos = pix / self.res
        pos[..., 2] += self.clen + self.coffset
        return pos


@dataclass(frozen=True)
class CrystFELGeometry:
    """A parsed ``.geom`` file.

    Attributes:
        geometry: per-pixel geometry (kind ``"positions"``) in the layout of the module docstring, with the
            mask of ``no_index`` panels, bad regions, uncovered pixels and (if read) the mask file.
        panels: the panels in file order.
        data_shape: shape of one frame of the data (``(modules, ss, fs)`` or ``(ss, fs)``).
        rows_per_module: rows of one module in the layout (``data_shape[-2]``).
        data_path: the ``data`` dataset named by the file (or None).
        mask_path, mask_file: the flags dataset and its file named by the file (or None).
        mask_good, mask_bad: the flag bits of a good pixel / a bad pixel.
        adu_per_ev, adu_per_photon: detector gain from the file (or None).
        path: the ``.geom`` file.
    """

    geometry: Geometry
    panels: tuple[CrystFELPanel, ...]
    data_shape: tuple[int, ...]
    rows_per_module: int
    data_path: str | None = None
    mask_path: str | None = None
    mask_file: str | None = None
    mask_good: int = 0
    mask_bad: int = 0
    adu_per_ev: float | None = None
    adu_per_photon: float | None = None
    path: Path = field(default=Path("."))

    def frame_to_pixels(self, frames: np.ndarray) -> np.ndarray:
        """Frames ``(B, *data_shape)`` (or one frame ``data_shape``) -> ``(B, n_y, n_x)`` in the geometry's layout.

        Raises:
            ValueError: frames of another shape.
        """
        arr = np.asarray(frames)
        if arr.shape == self.data_shape:
            arr = arr[None]
        if arr.shape[1:] != self.data_shape:
            raise ValueError(f"frames: expected shape (B, {', '.join(map(str, self.data_shape))}), got {arr.shape}")
        return arr.reshape(arr.shape[0], *self.geometry.shape)

    def mask_from_flags(self, flags: np.ndarray) -> np.ndarray:
        """Good pixels ``(n_y, n_x)`` from CrystFEL pixel flags of one frame's shape: good when all ``mask_good``
        bits and no ``mask_bad`` bit are set.

        Raises:
            ValueError: flags of another shape or not integers.
        """
        arr = np.asarray(flags)
        if arr.shape != self.data_shape or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"mask flags: expected integers of shape {self.data_shape}, got {arr.dtype} {arr.shape}")
        arr = arr.astype(np.int64)
        good = ((arr & self.mask_good) == self.mask_good) & ((arr & self.mask_bad) == 0)
        return good.reshape(self.geometry.shape)


def _number(path: Path, key: str, value: str, kind: type = float) -> Any:
    try:
        if kind is int:
            return int(value, 0)
        return float(value)
    except ValueError:
        raise DataFormatError(path, key, "an integer" if kind is int else "a number", repr(value)) from None


def _parse_lines(path: Path) -> tuple[dict[str, str], dict[str, dict[str, str]], dict[str, dict[str, str]], list[str]]:
    """``(globals, panels (name -> keys, with the defaults in force when each panel appeared), bad regions, order)``."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DataFormatError(path, "/", "a CrystFEL geometry text file", "binary content") from None
    globals_: dict[str, str] = {}
    panels: dict[str, dict[str, str]] = {}
    bad: dict[str, dict[str, str]] = {}
    order: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(";", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise DataFormatError(path, f"line {number}", "'key = value'", repr(raw.strip()))
        key, value = (part.strip() for part in line.split("=", 1))
        if "/" not in key:
            globals_[key] = value
            continue
        owner, sub = (part.strip() for part in key.split("/", 1))
        if owner.startswith("bad"):
            bad.setdefault(owner, {})[sub] = value
        elif owner.startswith("rigid_group"):
            continue
        else:
            if owner not in panels:
                defaults = {k: v for k, v in globals_.items() if k in _PANEL_DEFAULTS or re.fullmatch(r"dim\d+", k)}
                panels[owner] = dict(defaults)
                order.append(owner)
            panels[owner][sub] = value
    return globals_, panels, bad, order


def _panel(path: Path, name: str, keys: dict[str, str], clen_m: float | None) -> CrystFELPanel:
    def need(key: str) -> str:
        if key not in keys:
            raise DataFormatError(path, f"{name}/{key}", "a value (in the panel or globally before it)", "missing")
        return keys[key]

    ints = {k: _number(path, f"{name}/{k}", need(k), int) for k in ("min_fs", "max_fs", "min_ss", "max_ss")}
    if ints["max_fs"] < ints["min_fs"] or ints["max_ss"] < ints["min_ss"] or min(ints.values()) < 0:
        raise DataFormatError(path, f"{name}/min_fs..max_ss", "0 <= min <= max", repr(ints))
    vectors = {}
    for key in ("fs", "ss"):
        try:
            vectors[key] = parse_vector(need(key))
        except ValueError as exc:
            raise DataFormatError(path, f"{name}/{key}", "a vector like '+1.0x -0.5y'", repr(keys[key])) from exc
    res = _number(path, f"{name}/res", need("res"))
    if not (math.isfinite(res) and res > 0):
        raise DataFormatError(path, f"{name}/res", "a positive number of pixels per metre", repr(keys["res"]))
    if clen_m is not None:
        clen = float(clen_m)
    else:
        raw = need("clen")
        try:
            clen = float(raw)
        except ValueError:
            raise DataFormatError(path, f"{name}/clen", f"a camera length in metres (or give clen_m / {flag('clen')})",
                                  f"{raw!r} (a per-frame dataset)") from None
    module = None
    for key, value in keys.items():
        if re.fullmatch(r"dim\d+", key) and value not in ("%", "ss", "fs"):
            module = _number(path, f"{name}/{key}", value, int)
    no_index = keys.get("no_index", "0").strip().lower() in ("1", "true", "yes")
    return CrystFELPanel(name=name, corner_x=_number(path, f"{name}/corner_x", need("corner_x")),
                         corner_y=_number(path, f"{name}/corner_y", need("corner_y")), fs=vectors["fs"],
                         ss=vectors["ss"], res=res, clen=clen,
                         coffset=_number(path, f"{name}/coffset", keys.get("coffset", "0")), module=module,
                         no_index=no_index, **ints)


def read_crystfel_geom(path: str | os.PathLike[str], *, photon_energy_ev: float | None = None,
                       clen_m: float | None = None, polarization: str = "x",
                       data_file: str | os.PathLike[str] | None = None) -> CrystFELGeometry:
    """Parse a CrystFEL ``.geom`` file (see the module docstring).

    Args:
        path: the ``.geom`` file.
        photon_energy_ev: photon energy (required if the file's ``photon_energy`` is missing or a dataset).
        clen_m: camera length in metres, replacing every ``clen`` of the file (required if it names a dataset).
        polarization: see :class:`~bayes_spi.geometry.Beam` (default ``"x"``, horizontal).
        data_file: HDF5 file holding the ``mask`` dataset if the ``.geom`` names no ``mask_file``.

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: a malformed or missing field (names the file and the field).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CrystFEL geometry file {os.fspath(path)!r} not found")
    globals_, panel_keys, bad_keys, order = _parse_lines(path)
    if not order:
        raise DataFormatError(path, "panels", "at least one panel (name/min_fs = ...)", "none")
    panels = tuple(_panel(path, name, panel_keys[name], clen_m) for name in order)
    if photon_energy_ev is None:
        raw = globals_.get("photon_energy")
        if raw is None:
            raise DataFormatError(path, "photon_energy", "a photon energy in eV (or give photon_energy_ev)", "missing")
        try:
            photon_energy_ev = float(raw.split()[0])
        except (ValueError, IndexError):
            raise DataFormatError(path, "photon_energy", "a photon energy in eV (or give photon_energy_ev)",
                                  f"{raw!r} (a per-frame dataset)") from None
    modules = [p.module for p in panels]
    if any(m is None for m in modules) and any(m is not None for m in modules):
        raise DataFormatError(path, "dimN", "a module index for every panel or for none", "a mix")
    n_x = max(p.max_fs for p in panels) + 1
    rows = max(p.max_ss for p in panels) + 1
    if modules[0] is not None:
        n_modules = max(int(m) for m in modules) + 1  # type: ignore[arg-type]
        data_shape: tuple[int, ...] = (n_modules, rows, n_x)
    else:
        n_modules = 1
        data_shape = (rows, n_x)
    n_y = n_modules * rows
    pos = np.zeros((n_y, n_x, 3))
    fs_m = np.zeros((n_y, n_x, 3))
    ss_m = np.zeros((n_y, n_x, 3))
    covered = np.zeros((n_y, n_x), dtype=bool)
    good = np.zeros((n_y, n_x), dtype=bool)
    where: dict[str, tuple[slice, slice]] = {}
    for panel in panels:
        r0 = (panel.module or 0) * rows + panel.min_ss
        region = (slice(r0, r0 + panel.n_ss), slice(panel.min_fs, panel.max_fs + 1))
        if covered[region].any():
            raise DataFormatError(path, f"{panel.name}/min_fs..max_ss", "panels that do not overlap",
                                  "pixels shared with an earlier panel")
        where[panel.name] = region
        pos[region] = panel.positions_m()
        fs_m[region] = np.asarray(panel.fs) / panel.res
        ss_m[region] = np.asarray(panel.ss) / panel.res
        covered[region] = True
        good[region] = not panel.no_index
    if not covered.all():  # pixels of no panel: masked, given the first panel's first pixel to stay well defined
        first = where[panels[0].name]
        pos[~covered] = pos[first[0].start, first[1].start]
        fs_m[~covered] = fs_m[first[0].start, first[1].start]
        ss_m[~covered] = ss_m[first[0].start, first[1].start]
    _apply_bad_regions(path, bad_keys, panels, where, pos, good)
    mask_good = _number(path, "mask_good", globals_.get("mask_good", "0"), int)
    mask_bad = _number(path, "mask_bad", globals_.get("mask_bad", "0"), int)
    adu_ev = globals_.get("adu_per_eV")
    adu_ph = globals_.get("adu_per_photon")
    try:
        geometry = Geometry.from_positions(pos, photon_energy_ev=photon_energy_ev, polarization=polarization,
                                           mask=good, fs_m=fs_m, ss_m=ss_m, name=f"crystfel:{path.name}")
    except ValueError as exc:
        raise DataFormatError(path, "panels", "a valid detector geometry", str(exc)) from None
    out = CrystFELGeometry(
        geometry=geometry, panels=panels, data_shape=data_shape, rows_per_module=rows,
        data_path=globals_.get("data"), mask_path=globals_.get("mask"), mask_file=globals_.get("mask_file"),
        mask_good=mask_good, mask_bad=mask_bad,
        adu_per_ev=None if adu_ev is None else _number(path, "adu_per_eV", adu_ev),
        adu_per_photon=None if adu_ph is None else _number(path, "adu_per_photon", adu_ph), path=path,
    )
    flags_file = out.mask_file if out.mask_file is not None else (None if data_file is None else os.fspath(data_file))
    if out.mask_path is not None and flags_file is not None:
        flags_path = Path(flags_file) if Path(flags_file).is_absolute() else path.parent / flags_file
        flags = _read_flags(flags_path, out.mask_path, data_shape)
        out = CrystFELGeometry(**{**out.__dict__, "geometry": geometry.with_mask(good & out.mask_from_flags(flags))})
    if not out.geometry.good_pixels().any():
        raise DataFormatError(path, "mask", "at least one good pixel", "every pixel masked")
    return out


def _read_flags(path: Path, dataset: str, shape: tuple[int, ...]) -> np.ndarray:
    from bayes_spi.dataio.h5open import open_h5

    with open_h5(path, "the mask file (HDF5) named by the CrystFEL geometry") as f:
        obj = f.get(dataset)
        if not isinstance(obj, h5py.Dataset):
            raise DataFormatError(path, dataset, f"a mask dataset of shape {shape}",
                                  "missing" if obj is None else type(obj).__name__)
        arr = np.asarray(obj[()])
    if arr.shape != shape or not np.issubdtype(arr.dtype, np.integer):
        raise DataFormatError(path, dataset, f"integer flags of shape {shape}", f"{arr.dtype} {arr.shape}")
    return arr


def _apply_bad_regions(path: Path, bad_keys: dict[str, dict[str, str]], panels: tuple[CrystFELPanel, ...],
                       where: dict[str, tuple[slice, slice]], pos: np.ndarray, good: np.ndarray) -> None:
    res_of = {p.name: p for p in panels}
    for name, keys in bad_keys.items():
        if {"min_x", "max_x", "min_y", "max_y"} <= keys.keys():
            lo_x, hi_x, lo_y, hi_y = (_number(path, f"{name}/{k}", keys[k]) for k in ("min_x", "max_x", "min_y", "max_y"))
            for panel in panels:  # lab pixel units of each panel's own res
                region = where[panel.name]
                x = pos[region][..., 0] * panel.res
                y = pos[region][..., 1] * panel.res
                inside = (x >= lo_x) & (x <= hi_x) & (y >= lo_y) & (y <= hi_y)
                good[region] &= ~inside
        elif {"min_fs", "max_fs", "min_ss", "max_ss"} <= keys.keys():
            panel_name = keys.get("panel")
            if panel_name is None or panel_name not in res_of:
                raise DataFormatError(path, f"{name}/panel", f"one of the panels {sorted(res_of)}", repr(panel_name))
            panel = res_of[panel_name]
            lo_f, hi_f, lo_s, hi_s = (_number(path, f"{name}/{k}", keys[k], int)
                                      for k in ("min_fs", "max_fs", "min_ss", "max_ss"))
            f0, f1 = max(lo_f, panel.min_fs), min(hi_f, panel.max_fs)
            s0, s1 = max(lo_s, panel.min_ss), min(hi_s, panel.max_ss)
            if f0 <= f1 and s0 <= s1:
                base = where[panel.name][0].start - panel.min_ss  # layout row of the panel's ss = 0
                good[base + s0 : base + s1 + 1, f0 : f1 + 1] = False
        else:
            raise DataFormatError(path, f"{name}/...", "min_x, max_x, min_y, max_y or min_fs, max_fs, min_ss, "
                                  "max_ss with panel", f"keys {sorted(keys)}")
