"""Evaluate a finished run against the ground truth stored in a simulated data file.

Compares ``posterior.h5`` (per-image pose and fluence scale) and the trained intensity field in
``model.pt`` with ``/truth`` of the data file:

- orientation error after the best global rotation ``G`` (``R_true ~= G R_est``;
  :func:`bayes_spi.metrics.orientation_error_summary`), raw and modulo the per-image ``Rz(pi)``
  ambiguity, and the fraction of images in the wrong ``Rz(pi)`` mode. A mirror of the molecule changes
  the intensity only by a rotation (Friedel), so the SO(3) alignment already allows for inversion;
- Pearson correlation of the per-image fluence scales (posterior mean vs true jitter);
- Pearson correlation of ``I`` and of ``log I`` on the truth grid, inside the sphere
  ``|q| <= q_max`` of the detector (pixel centres), with the field sampled at ``G^T q``
  (``I_est(x) = I_true(G x)``, so ``I_true(q) = I_est(G^T q)``); ``G`` is the global rotation of the
  alignment modulo ``Rz(pi)`` (robust when some images sit in the other mode);
- the intensity FSC (shell correlation of ``sqrt I`` in shells of ``|q|`` up to the detector's
  ``q_max``, :func:`bayes_spi.analysis.fsc.intensity_fsc`) of that aligned intensity against the truth,
  and its resolution (nm) at 0.5 and 0.143; that definition (the papers') keeps a positive baseline
  from the shared radial fall-off, so the "speckle" FSC (each shell's mean removed first) is reported
  beside it and is the more discriminating of the two;
- the density FSC: the aligned intensity is phased (:func:`bayes_spi.analysis.phasing.phase_retrieval`,
  best of ``phase_starts`` starts) and compared with the true density (``/truth/density``; files written
  before it existed: the phased true intensity) after translation and enantiomer alignment
  (:func:`bayes_spi.analysis.align.align_density`); a user's own density map (``density=PATH``) is
  also aligned in rotation;
- ``corner_res_nm``: the detector-corner resolution, the limit of the data, for reference.

Memory is bounded in N: ``posterior.h5`` and ``/truth`` are streamed in chunks (:data:`EVAL_CHUNK`), ``G`` is
fitted on an even stride of at most :data:`MAX_ALIGN_PATTERNS` patterns, and only two float64 errors per
pattern are kept (for exact medians over all patterns).

:func:`evaluate_run_full` also returns the curves (``FSCCurve`` objects) and per-image errors;
:func:`write_fsc_json` stores curves in ``RUN/fsc.json`` (read by the report).

Example::

    d = evaluate_run("run/", "data.h5")
    print(format_evaluation(d))
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any

import numpy as np

from bayes_spi.analysis.fsc import ball_mask, intensity_fsc
from bayes_spi.config.commands import command
from bayes_spi.dataio.h5 import DataFormatError, SPIDataset, quaternions_to_rotations, read_rows
from bayes_spi.geometry import Geometry
from bayes_spi.infer.build import build_field, detector_tensors
from bayes_spi.infer.load import read_model_file, stored_geometry
from bayes_spi.infer.outputs import field_on_grid
from bayes_spi.metrics import align_rotations, errors_after_alignment, intensity_correlation
from bayes_spi.models.fields import IntensityField
from bayes_spi.models.spi import detector_q_max
from bayes_spi.symmetry import PointGroup

__all__ = ["EVALUATION_KEYS", "EVAL_CHUNK", "MAX_ALIGN_PATTERNS", "Evaluation", "evaluate_run", "evaluate_run_full",
           "evaluation_document", "format_evaluation", "load_field", "write_evaluation", "write_fsc_json"]

#: keys of :func:`evaluate_run`'s result, in display order
EVALUATION_KEYS: tuple[str, ...] = (
    "median_pose_error_deg",
    "mean_pose_error_deg",
    "median_pose_error_mod_rotz_deg",
    "mean_pose_error_mod_rotz_deg",
    "wrong_mode_fraction",
    "fluence_corr",
    "intensity_corr",
    "log_intensity_corr",
    "intensity_fsc_res_nm_0.5",
    "intensity_fsc_res_nm_0.143",
    "speckle_fsc_res_nm_0.5",
    "speckle_fsc_res_nm_0.143",
    "density_fsc_res_nm_0.5",
    "density_fsc_res_nm_0.143",
    "corner_res_nm",
    "n_patterns",
)

#: patterns per chunk streamed from ``posterior.h5`` and ``/truth`` by :func:`evaluate_run_full`
EVAL_CHUNK: int = 65_536
#: at most this many patterns (an even stride of all of them) fit the global rotation ``G`` of the evaluation
MAX_ALIGN_PATTERNS: int = 100_000


def load_field(model_path: str | os.PathLike[str], geometry: Geometry | None = None) -> tuple[IntensityField, float]:
    """Rebuild the trained intensity field from ``model.pt``; returns ``(field, q_max)`` (eval mode, CPU).

    ``q_max`` (1/A, the largest ``|q|`` of the detector's pixel centres, as in training) comes from the
    geometry stored in ``model.pt`` (or ``geometry`` if given).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file lacks ``config``/``model`` entries or the field's weights do not fit.
    """
    path, ck, config = read_model_file(model_path)
    if geometry is None:
        geometry = stored_geometry(ck, path)
    q, _, _ = detector_tensors(geometry)
    q_max = detector_q_max(q)
    field = build_field(config, q_max)
    if not isinstance(ck["model"], dict):
        raise ValueError(f"{os.fspath(path)}: field model: expected a state dict, got {type(ck['model']).__name__}")
    state = {k[len("field."):]: v for k, v in ck["model"].items() if isinstance(k, str) and k.startswith("field.")}
    if not state:
        raise ValueError(f"{os.fspath(path)}: field model: expected 'field.*' entries, got none")
    try:
        field.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{os.fspath(path)}: field model: weights do not match the config ({exc})") from None
    field.eval()
    return field, q_max


def _fit_symmetry(model_path: Path) -> PointGroup:
    """The point group the run was fitted with (``C1`` when ``model.pt`` is absent or predates the setting)."""
    from bayes_spi.symmetry import point_group

    if not Path(model_path).is_file():
        return point_group("C1")
    _, _, config = read_model_file(model_path)
    return point_group(config.symmetry)


@dataclass
class _Poses:
    """Per-pattern pose results streamed by :func:`_pose_and_fluence` (``N`` patterns)."""

    n: int
    errors_deg: np.ndarray  # (N,) raw SO(3) alignment
    errors_mod_deg: np.ndarray  # (N,) modulo Rz(pi)
    n_flipped: int
    fluence_corr: float
    G: np.ndarray  # (3, 3)
    G_mod: np.ndarray  # (3, 3)
    n_aligned: int


class _Pearson:
    """Pearson correlation of two streams, from merged co-moments (Chan, Golub & LeVeque); O(1) memory."""

    def __init__(self) -> None:
        self.n, self.ma, self.mb, self.saa, self.sbb, self.sab = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        """Add a chunk: ``a``, ``b`` ``(B,)``."""
        nb = len(a)
        if nb == 0:
            return
        ma, mb = float(np.mean(a)), float(np.mean(b))
        da, db = a - ma, b - mb
        tot = self.n + nb
        dma, dmb, w = ma - self.ma, mb - self.mb, self.n * nb / tot
        self.saa += float(da @ da) + dma * dma * w
        self.sbb += float(db @ db) + dmb * dmb * w
        self.sab += float(da @ db) + dma * dmb * w
        self.ma += dma * nb / tot
        self.mb += dmb * nb / tot
        self.n = tot

    def value(self) -> float:
        """``r`` (NaN for fewer than 2 values or a constant stream)."""
        if self.n < 2 or not self.saa > 0 or not self.sbb > 0:
            return float("nan")
        return float(np.clip(self.sab / math.sqrt(self.saa * self.sbb), -1.0, 1.0))


def _pose_and_fluence(post_path: Path, ds: SPIDataset, group: PointGroup, chunk: int) -> _Poses:
    """Orientation errors and the fluence correlation of ``posterior.h5`` against ``ds``'s ``/truth``, streamed
    in chunks of ``chunk`` patterns (see :func:`evaluate_run_full`)."""
    if isinstance(chunk, bool) or int(chunk) != chunk or chunk < 1:
        raise ValueError(f"chunk: expected a positive integer, got {chunk!r}")
    chunk = int(chunk)
    name = os.fspath(post_path)
    from bayes_spi.dataio.h5open import open_h5
    from bayes_spi.infer.rundir import FORMAT_VERSION_KEY, check_format_version

    with open_h5(post_path, "the run's per-image posterior (HDF5)") as f:
        check_format_version("posterior", f.attrs.get(FORMAT_VERSION_KEY), post_path)
        for key in ("pose_quaternion", "scale_mean"):
            if key not in f:
                raise ValueError(f"{name}: field /{key}: expected a dataset, got missing")
        qd, sd = f["pose_quaternion"], f["scale_mean"]
        ds.truth_quaternions(slice(0, 0))  # DataFormatError now if the data file has no truth
        ds.truth_scales(slice(0, 0))
        n = ds.n_patterns
        if qd.shape != (n, 4) or sd.shape != (n,) or n == 0:
            raise ValueError(f"{name}: pose_quaternion/scale_mean: expected shapes ({n}, 4)/({n},) "
                             f"(the truth file's N), got {qd.shape}/{sd.shape}")

        def est(rows: slice) -> np.ndarray:
            try:
                return quaternions_to_rotations(np.asarray(read_rows(qd, rows, chunk), dtype=np.float64))
            except ValueError as exc:
                raise ValueError(f"{name}: field /pose_quaternion: {exc}") from None

        rots = None if group.is_trivial else group.rotations
        step = max(1, math.ceil(n / MAX_ALIGN_PATTERNS))
        sub = slice(None, None, step)
        R_sub, T_sub = est(sub), ds.truth_rotations(sub)
        G, _, _ = align_rotations(R_sub, T_sub, modulo_rotz_pi=False, group=rots)
        G_mod, _, _ = align_rotations(R_sub, T_sub, modulo_rotz_pi=True, group=rots)
        n_aligned = len(R_sub)
        del R_sub, T_sub
        err, err_mod = np.empty(n), np.empty(n)
        flipped = 0
        pearson = _Pearson()
        for a in range(0, n, chunk):
            rows = slice(a, min(n, a + chunk))
            R_est, R_true = est(rows), ds.truth_rotations(rows)
            err[rows], _ = errors_after_alignment(G, R_est, R_true, False, rots)
            err_mod[rows], fl = errors_after_alignment(G_mod, R_est, R_true, True, rots)
            flipped += int(fl.sum())
            pearson.update(np.asarray(sd[rows], dtype=np.float64), ds.truth_scales(rows))
    return _Poses(n, err, err_mod, flipped, pearson.value(), G, G_mod, n_aligned)


@dataclass
class Evaluation:
    """The result of :func:`evaluate_run_full`.

    Attributes:
        scalars: the flat dict of :func:`evaluate_run` (keys :data:`EVALUATION_KEYS`).
        curves: ``{"intensity": FSCCurve, "density": FSCCurve}`` (those that could be computed).
        pose_errors_deg: ``(N,)`` per-image orientation errors after the global alignment.
        G: ``(3, 3)`` the global rotation used for the intensity (``R_true ~= G R_est``, mod Rz(pi)).
        notes: what was skipped or substituted, and why.
    """

    scalars: dict[str, float]
    curves: dict[str, Any] = dc_field(default_factory=dict)
    pose_errors_deg: np.ndarray | None = None
    G: np.ndarray | None = None
    notes: list[str] = dc_field(default_factory=list)


def evaluate_run(
    run_dir: str | os.PathLike[str],
    truth_path: str | os.PathLike[str],
    posterior_path: str | os.PathLike[str] | None = None,
    model_path: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """Compare a run's outputs with the truth of a simulated data file: the scalars of
    :func:`evaluate_run_full` (same arguments), keys :data:`EVALUATION_KEYS` (NaN where not computable)."""
    return evaluate_run_full(run_dir, truth_path, posterior_path, model_path, **kwargs).scalars


def evaluate_run_full(
    run_dir: str | os.PathLike[str],
    truth_path: str | os.PathLike[str],
    posterior_path: str | os.PathLike[str] | None = None,
    model_path: str | os.PathLike[str] | None = None,
    *,
    fsc: bool = True,
    density: bool | str | os.PathLike[str] = True,
    phase_starts: int = 4,
    seed: int = 0,
    chunk: int | None = None,
) -> Evaluation:
    """Compare a run's outputs with the truth of a simulated data file.

    Args:
        run_dir: the run directory (``posterior.h5``, ``model.pt``).
        truth_path: the data file with ``/truth`` (quaternions, scales; ``intensity`` optional: without it
            the intensity metrics are NaN).
        posterior_path, model_path: override the files inside ``run_dir``.
        fsc: compute the intensity FSC.
        density: ``True``: phase the aligned intensity and compute the density FSC; ``False``: skip; a path:
            compare that density MRC instead (aligned in rotation, translation and enantiomer).
        phase_starts, seed: phase retrieval random starts.
        chunk: patterns per chunk read from ``posterior.h5`` and ``/truth`` (default :data:`EVAL_CHUNK`).

    Memory does not hold every pattern's pose: the global rotation ``G`` is fitted on at most
    :data:`MAX_ALIGN_PATTERNS` patterns (an even stride ``[::step]`` of posterior and truth alike; all of them
    below that), then ``posterior.h5`` and ``/truth`` are streamed in chunks and every pattern's error is
    computed with that ``G``. The medians and means are exact over all ``N`` patterns: two float64 errors per
    pattern are kept (16 bytes per pattern, 16 MB per 10^6; the medians partition in place or copy one array at
    a time, so the peak stays 16 bytes per pattern); the fluence correlation is accumulated from
    streamed co-moments (Chan et al.), equal to the all-at-once Pearson ``r`` to rounding.

    Raises:
        FileNotFoundError: a file is missing.
        DataFormatError: the data file has no truth poses/scales.
        ValueError: the posterior and the truth disagree in the number of patterns.
    """
    from bayes_spi.infer.rundir import RunDir

    run = RunDir(run_dir)
    post_path = Path(posterior_path) if posterior_path is not None else run.path("posterior")
    mdl_path = Path(model_path) if model_path is not None else run.path("model")
    if not post_path.is_file():
        raise FileNotFoundError(f"{os.fspath(post_path)}: not found (expected the run's per-image posterior)")
    notes: list[str] = []
    group = _fit_symmetry(mdl_path)
    with SPIDataset(truth_path) as ds:
        poses = _pose_and_fluence(post_path, ds, group, chunk=EVAL_CHUNK if chunk is None else chunk)
        try:
            I_true, voxel = ds.truth_intensity()
        except DataFormatError:
            I_true, voxel = None, float("nan")
            notes.append("no /truth/intensity in the data file: intensity metrics skipped")
        rho_true = None
        if I_true is not None and density is not False:
            try:
                rho_true, _ = ds.truth_density()
            except (DataFormatError, AttributeError):
                notes.append("no /truth/density in the data file: the reference density is the phased true "
                             "intensity")
        geometry = ds.geometry
    n = poses.n
    if not group.is_trivial:
        notes.append(f"point group {group.name}: orientation errors are taken modulo its {group.order} rotations")
    if poses.n_aligned < n:
        notes.append(f"global rotation fitted on {poses.n_aligned:,} of {n:,} patterns (an even stride); errors of "
                     "all patterns")
    out: dict[str, float] = {k: float("nan") for k in EVALUATION_KEYS}
    mean_mod = float(np.mean(poses.errors_mod_deg))
    median_mod = float(np.median(poses.errors_mod_deg, overwrite_input=True))  # in place: no copy of N floats
    del poses.errors_mod_deg
    out.update({
        "median_pose_error_deg": float(np.median(poses.errors_deg)),
        "mean_pose_error_deg": float(np.mean(poses.errors_deg)),
        "median_pose_error_mod_rotz_deg": median_mod,
        "mean_pose_error_mod_rotz_deg": mean_mod,
        "wrong_mode_fraction": poses.n_flipped / n,
        "fluence_corr": poses.fluence_corr,
        "corner_res_nm": geometry.corner_resolution_A / 10.0,
        "n_patterns": float(n),
    })
    G = np.asarray(poses.G_mod, dtype=np.float64)
    curves: dict[str, Any] = {}
    if I_true is not None:
        field, q_max = load_field(mdl_path, geometry)
        n_grid = I_true.shape[0]
        # truth grid: q = (i - n//2) * voxel, i.e. grid_q(n, (n//2) * voxel); I_true(q) = I_est(G^T q)
        I_est, _ = field_on_grid(field, n_grid, (n_grid // 2) * voxel, rotation=G.T)
        sphere = ball_mask(n_grid, voxel, q_max)
        out["intensity_corr"] = intensity_correlation(I_est, I_true, mask=sphere, transform="none")
        out["log_intensity_corr"] = intensity_correlation(I_est, I_true, mask=sphere, transform="log")
        if fsc:
            q_last = voxel * np.floor(q_max / voxel)
            curves["intensity"] = intensity_fsc(I_est, I_true, voxel, q_max=q_last, mask=sphere)
            out["intensity_fsc_res_nm_0.5"] = curves["intensity"].resolution_nm(0.5)
            out["intensity_fsc_res_nm_0.143"] = curves["intensity"].resolution_nm(0.143)
            curves["speckle"] = intensity_fsc(I_est, I_true, voxel, q_max=q_last, mask=sphere, speckle=True)
            out["speckle_fsc_res_nm_0.5"] = curves["speckle"].resolution_nm(0.5)
            out["speckle_fsc_res_nm_0.143"] = curves["speckle"].resolution_nm(0.143)
        if density is not False:
            curves["density"] = _density_fsc(I_est, I_true, rho_true, voxel, sphere, q_max, density,
                                             phase_starts, seed, notes)
            out["density_fsc_res_nm_0.5"] = curves["density"].resolution_nm(0.5)
            out["density_fsc_res_nm_0.143"] = curves["density"].resolution_nm(0.143)
    scalars = {k: float(out[k]) for k in EVALUATION_KEYS}
    return Evaluation(scalars, curves, poses.errors_deg, G, notes)


def _density_fsc(I_est: np.ndarray, I_true: np.ndarray, rho_true: np.ndarray | None, dq: float,
                 sphere: np.ndarray, q_max: float, density: bool | str | os.PathLike[str], starts: int, seed: int,
                 notes: list[str]) -> Any:
    """Density FSC (a :class:`FSCCurve`) of the phased estimate against the true density."""
    from bayes_spi.analysis.align import align_density
    from bayes_spi.analysis.fsc import density_fsc
    from bayes_spi.analysis.phasing import phase_retrieval

    n = I_true.shape[0]
    voxel_A = 1.0 / (n * dq)
    if rho_true is None:
        rho_true = phase_retrieval(I_true, dq, n_starts=starts, seed=seed, measured_mask=sphere).density
    if density is True:
        rho_est = phase_retrieval(I_est, dq, n_starts=starts, seed=seed + 1, measured_mask=sphere).density
        rotation_search = False  # the intensity was already aligned with the poses' global rotation
    else:
        from bayes_spi.infer.volumes import read_density

        rho_est, v_est = read_density(density)
        if rho_est.shape != rho_true.shape or abs(v_est - voxel_A) > 1e-3 * voxel_A:
            raise ValueError(f"{os.fspath(density)}: expected a {n}^3 density with {voxel_A:.4g} A voxels (the truth "
                             f"grid), got {rho_est.shape[0]}^3 with {v_est:.4g} A; phase an export made with "
                             f"{command('export_grid', grid=n, voxel=voxel_A)}")
        rotation_search = True
        notes.append(f"density FSC of {os.fspath(density)} (aligned in rotation, translation and enantiomer)")
    aligned, _ = align_density(rho_true, rho_est, voxel_A, rotation_search=rotation_search)
    q_last = dq * np.floor(q_max / dq)
    return density_fsc(aligned, rho_true, voxel_A, q_max=q_last)


def evaluation_document(scalars: dict[str, Any], verdict: str | None = None) -> dict[str, Any]:
    """The content of ``RUN/evaluation.json``: the numbers (a non-finite one, a metric that could not be
    computed, as ``None``: strict JSON) and, when the run has one, its verdict's status under ``"verdict"``.

    Example:
        >>> evaluation_document({"fluence_corr": 0.9, "intensity_fsc_res_nm_0.5": float("nan")}, "converged")
        {'fluence_corr': 0.9, 'intensity_fsc_res_nm_0.5': None, 'verdict': 'converged'}
    """
    doc: dict[str, Any] = {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                           for k, v in scalars.items()}
    if verdict is not None:
        doc["verdict"] = verdict
    return doc


def write_evaluation(run_dir: str | os.PathLike[str], document: dict[str, Any]) -> Path:
    """Write an :func:`evaluation_document` as ``RUN/evaluation.json`` (atomically, strict JSON): the one writer
    of that file, for the fit and for ``bayes-spi evaluate``."""
    from bayes_spi.infer.rundir import RunDir

    return RunDir(run_dir).write_json("evaluation", document, allow_nan=False)


def write_fsc_json(run_dir: str | os.PathLike[str], curves: dict[str, Any], corner_res_nm: float | None = None) -> Path:
    """Merge curves into ``RUN/fsc.json`` (atomically): ``{name: {"q_inv_A", "fsc", "n_voxels",
    "res_nm_0.5", "res_nm_0.143"}, "corner_res_nm": ...}``; other entries already there are kept."""
    from bayes_spi.infer.rundir import RunDir, RunFormatError

    run = RunDir(run_dir)
    try:
        data: dict[str, Any] = run.read_json("fsc") or {}
    except RunFormatError:
        raise  # a newer bayes-spi's file: not ours to merge into
    except ValueError:
        data = {}
    for name, curve in curves.items():
        entry = curve.to_dict()
        for t in (0.5, 0.143):
            res = curve.resolution_nm(t)
            entry[f"res_nm_{t}"] = float(res) if math.isfinite(res) else None
            entry[f"crosses_{t}"] = bool(curve.crosses(t))
        data[name] = entry
    if corner_res_nm is not None:
        data["corner_res_nm"] = float(corner_res_nm)
    return run.write_json("fsc", data, indent=1)


_LABELS = {
    "median_pose_error_deg": ("median orientation error", "deg"),
    "mean_pose_error_deg": ("mean orientation error", "deg"),
    "median_pose_error_mod_rotz_deg": ("median error mod Rz(pi)", "deg"),
    "mean_pose_error_mod_rotz_deg": ("mean error mod Rz(pi)", "deg"),
    "wrong_mode_fraction": ("wrong Rz(pi) mode fraction", ""),
    "fluence_corr": ("fluence correlation", ""),
    "intensity_corr": ("intensity correlation", ""),
    "log_intensity_corr": ("log-intensity correlation", ""),
    "intensity_fsc_res_nm_0.5": ("intensity FSC resolution at 0.5", "nm"),
    "intensity_fsc_res_nm_0.143": ("intensity FSC resolution at 0.143", "nm"),
    "speckle_fsc_res_nm_0.5": ("speckle FSC resolution at 0.5", "nm"),
    "speckle_fsc_res_nm_0.143": ("speckle FSC resolution at 0.143", "nm"),
    "density_fsc_res_nm_0.5": ("density FSC resolution at 0.5", "nm"),
    "density_fsc_res_nm_0.143": ("density FSC resolution at 0.143", "nm"),
    "corner_res_nm": ("detector-corner resolution (limit)", "nm"),
    "n_patterns": ("patterns", ""),
}


def format_evaluation(d: dict[str, Any]) -> str:
    """A small aligned two-column table of an :func:`evaluate_run` result (unknown keys appended)."""
    keys = [k for k in EVALUATION_KEYS if k in d] + [k for k in d if k not in EVALUATION_KEYS]
    rows = []
    for k in keys:
        label, unit = _LABELS.get(k, (k, ""))
        v = d[k]
        if k == "n_patterns" and isinstance(v, (int, float)) and math.isfinite(v):
            text = f"{int(v)}"
        elif isinstance(v, (int, float)):
            text = f"{v:.4g}" if unit else f"{v:.4f}"
        else:
            text = str(v)
        rows.append((label, f"{text} {unit}".rstrip()))
    width = max((len(r[0]) for r in rows), default=0)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)


def evaluate_against_reference(run_dir: str | os.PathLike[str], reference: str | os.PathLike[str],
                               n_rotations: int = 4000) -> tuple[dict[str, float], dict[str, Any]]:
    """Compare a run's intensity with a reference volume alone (no poses needed).

    Args:
        run_dir: the run directory (its ``model.pt``), or the ``model.pt`` file.
        reference: an intensity volume (MRC with the voxel size in 1/A, HDF5 ``/intensity`` with
            ``voxel_size_inv_A``, or a data file's ``/truth/intensity``), e.g. another program's result
            or an independent simulator's truth, on a centred odd grid.
    Returns:
        ``(scalars, curves)``: ``speckle_corr`` (see :mod:`bayes_spi.analysis.compare`), the ``sqrt(I)``
        and speckle FSC resolutions (nm), ``q_min``/``q_max`` of the scored shell; curves ``reference`` and
        ``reference_speckle``.

    Raises:
        FileNotFoundError, ValueError: a missing or malformed file (named).
    """
    from bayes_spi.analysis.compare import compare_to_reference
    from bayes_spi.infer.load import model_path_of, read_model_file, stored_geometry
    from bayes_spi.infer.volumes import read_intensity

    I_ref, dq = read_intensity(reference)
    field, q_max = load_field(model_path_of(run_dir))
    path, ck, _ = read_model_file(model_path_of(run_dir))
    geom = stored_geometry(ck, path)
    qn = geom.q_magnitudes()[geom.good_pixels()]
    n = I_ref.shape[0]
    q_top = min(float(qn.max()), (n // 2) * dq)
    I_est, _ = field_on_grid(field, n, (n // 2) * dq)
    res = compare_to_reference(I_est, I_ref, dq, q_top, q_min=float(qn.min()), n_rotations=n_rotations)
    scalars = {**res.scalars(), "q_min": float(qn.min()), "q_max": q_top}
    return scalars, {"reference": res.fsc, "reference_speckle": res.speckle_fsc}
