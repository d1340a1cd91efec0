"""The run directory: :class:`RunDir` (its file names, its lock, what it holds), ``config.yaml`` (every
setting, versions, the command line) and ``run.log``.

A run directory written by ``bayes-spi fit`` holds::

    config.yaml      settings (FitConfig), data file, versions, command line, device, date
    run.log          INFO log with timestamps (also WARNING+ on stderr)
    checkpoint.pt    latest atomic checkpoint (resume with ``--resume``)
    metrics.csv      metric history, one row per log interval
    model.pt, intensity.mrc, intensity.h5, posterior.h5, evaluation.json   final outputs
    fit.lock         while a ``fit`` runs: the owner's pid and host (an advisory lock, see :class:`RunLock`)

and, from later steps, ``verdict.json``, ``sampling.json``, ``fsc.json``, ``reference.json``,
``density.mrc``/``.json``, ``posterior.nc``, ``coverage.json``, ``report.html``, ``report/`` and
``report.png``. :data:`RUN_FILE_NAMES` names them all; ask :class:`RunDir` for a path instead of
spelling a name.

Format versions: every file a run writes that other commands read back carries the version of its layout
(:data:`RUN_FORMAT_VERSIONS`): the top-level ``format_version`` of ``config.yaml`` and of the JSON files, the
``format_version`` entry of ``model.pt`` and ``checkpoint.pt``, the root attribute ``format_version`` of
``posterior.h5``. A file without one was written before formats were versioned and reads as version 1. Read
them through :meth:`RunDir.read_json`, :meth:`RunDir.read_torch`, :meth:`RunDir.read_info` and
:meth:`RunDir.open_h5`, which refuse a version this bayes-spi cannot read (:class:`RunFormatError`:
``"RUN/model.pt: field format_version: run made by a newer bayes-spi: model.pt format 3, this version reads 1"``),
and write them with :meth:`RunDir.write_json` / :meth:`RunDir.stamp`. ``metrics.csv`` has no version: a
line in it would break plain CSV readers; its readers check its columns by name.

Example:
    >>> import tempfile
    >>> from bayes_spi.infer.config import FitConfig
    >>> d = tempfile.mkdtemp()
    >>> _ = write_config(d, FitConfig(epochs=3), "data.h5", ["bayes-spi", "fit", "data.h5"])
    >>> read_config(d).epochs
    3
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from bayes_spi.atomic import atomic_path
from bayes_spi.infer.config import FitConfig

__all__ = [
    "RUN_FILE_NAMES",
    "RUN_FORMAT_VERSIONS",
    "FORMAT_VERSION_KEY",
    "RunFormatError",
    "check_format_version",
    "RUN_MARKERS",
    "FRESH_START_FILES",
    "RunDir",
    "CONFIG_NAME",
    "LOG_NAME",
    "write_config",
    "read_config",
    "read_run_info",
    "setup_logging",
    "close_logging",
    "LOCK_NAME",
    "RunLockedError",
    "RunLock",
    "live_lock_owner",
    "locked_message",
]

#: key -> file name (a folder for ``report_dir``) inside a run directory; the one place these names are spelled
RUN_FILE_NAMES: dict[str, str] = {
    "config": "config.yaml",            # settings, versions, command line (write_config)
    "log": "run.log",                   # the INFO log (setup_logging)
    "metrics": "metrics.csv",           # metric history, one row per log interval
    "checkpoint": "checkpoint.pt",      # latest atomic checkpoint (resume)
    "model": "model.pt",                # the trained model (load_trained)
    "intensity_mrc": "intensity.mrc",   # the reconstructed intensity, MRC
    "intensity": "intensity.h5",        # the reconstructed intensity, HDF5 (phase, report)
    "intensity_sd_mrc": "intensity_sd.mrc",  # its posterior sd (a variational field), MRC
    "intensity_sd": "intensity_sd.h5",  # its posterior sd, HDF5
    "posterior": "posterior.h5",        # per-image pose and fluence posteriors
    "posterior_nc": "posterior.nc",     # posterior draws (bayes-spi posterior)
    "coverage": "coverage.json",        # coverage of posterior.nc against the truth
    "evaluation": "evaluation.json",    # numbers against the truth and the verdict
    "verdict": "verdict.json",          # the truth-free verdict of the fit
    "sampling": "sampling.json",        # the sampling estimate of the fit's settings
    "fsc": "fsc.json",                  # FSC curves
    "reference": "reference.json",      # comparison with a reference volume (bayes-spi evaluate)
    "density": "density.mrc",           # the phased density
    "density_json": "density.json",     # the phasing record
    "report": "report.html",            # the report page
    "report_dir": "report",             # the report's figures (a folder)
    "overview": "report.png",           # the one-page overview
    "lock": "fit.lock",                 # the advisory lock of a running fit (RunLock)
    "halfsets": "halfsets.h5",          # the half-set split (fit --half-sets)
    "halfsets_summary": "halfsets.json",  # the half-set FSC summary
}

#: key -> ``(the format version this bayes-spi writes, the oldest version it still reads)`` of every run file that
#: other commands read back; a file without a version field is version 1 (written before versions were recorded)
RUN_FORMAT_VERSIONS: dict[str, tuple[int, int]] = {
    "config": (1, 1),
    "checkpoint": (1, 1),
    "model": (1, 1),
    "posterior": (1, 1),
    "evaluation": (1, 1),
    "verdict": (1, 1),
    "sampling": (1, 1),
    "fsc": (1, 1),
    "reference": (1, 1),
    "coverage": (1, 1),
    "density_json": (1, 1),
    "halfsets": (1, 1),
    "halfsets_summary": (1, 1),
}

#: the field (JSON/YAML key, torch-file entry, HDF5 root attribute) that holds a run file's format version
FORMAT_VERSION_KEY = "format_version"

#: keys of the files that make a directory a run (any one of them): see :meth:`RunDir.is_run`
RUN_MARKERS: tuple[str, ...] = ("config", "log", "model", "metrics", "checkpoint")

#: file names a forced fresh start removes (with the folder ``report/``), partial ``.tmp`` files included
FRESH_START_FILES: tuple[str, ...] = tuple(
    name
    for key in ("checkpoint", "metrics", "model", "intensity_mrc", "intensity", "intensity_sd_mrc", "intensity_sd",
                "posterior", "evaluation", "fsc", "sampling", "verdict", "density", "density_json", "posterior_nc",
                "coverage", "overview", "report", "config", "log")
    for name in ((RUN_FILE_NAMES[key], RUN_FILE_NAMES[key] + ".tmp") if key in ("checkpoint", "metrics", "model")
                 else (RUN_FILE_NAMES[key],))
)

CONFIG_NAME = RUN_FILE_NAMES["config"]
LOG_NAME = RUN_FILE_NAMES["log"]
LOCK_NAME = RUN_FILE_NAMES["lock"]
_HANDLER_TAG = "_bayes_spi_run_handler"


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


class RunFormatError(ValueError):
    """A run file's format version is one this bayes-spi cannot read (or is not a version at all); the message
    names the file, the field ``format_version``, the version found and the versions this bayes-spi reads."""


def _versions(key: str) -> tuple[int, int]:
    try:
        return RUN_FORMAT_VERSIONS[key]
    except KeyError:
        raise KeyError(f"run file {key!r}: expected one of the versioned run files {', '.join(RUN_FORMAT_VERSIONS)}, "
                       "got one without a format version") from None


def check_format_version(key: str, found: Any, path: str | os.PathLike[str]) -> int:
    """The format version ``found`` in the run file ``key`` at ``path`` (``None``: written before versions,
    version 1), checked against what this bayes-spi reads.

    Raises:
        RunFormatError: a version newer than this bayes-spi writes ("run made by a newer bayes-spi: ..."), older
            than it still reads, or not a positive integer (names the file, the field and the versions read).

    Example:
        >>> check_format_version("model", None, "run/model.pt"), check_format_version("model", 1, "run/model.pt")
        (1, 1)
        >>> try:
        ...     check_format_version("model", 3, "run/model.pt")
        ... except RunFormatError as exc:
        ...     print(exc)
        run/model.pt: field format_version: run made by a newer bayes-spi: model.pt format 3, this version reads 1 (update bayes-spi to read it)
    """
    current, oldest = _versions(key)
    name = RUN_FILE_NAMES[key]
    reads = f"{oldest}" if oldest == current else f"{oldest}-{current}"
    where = f"{os.fspath(path)}: field {FORMAT_VERSION_KEY}"
    if found is None:
        version = 1
    else:
        if getattr(found, "ndim", None) == 0 and hasattr(found, "item"):
            found = found.item()  # an HDF5 attribute (numpy scalar) or a 0-d tensor
        if isinstance(found, bool) or not isinstance(found, int) or found < 1:
            raise RunFormatError(f"{where}: expected a format version (an integer; this version reads {name} format "
                                 f"{reads}), got {found!r}")
        version = int(found)
    if version > current:
        raise RunFormatError(f"{where}: run made by a newer bayes-spi: {name} format {version}, this version reads "
                             f"{reads} (update bayes-spi to read it)")
    if version < oldest:
        raise RunFormatError(f"{where}: run made by an older bayes-spi: {name} format {version}, this version reads "
                             f"{reads} (rerun it, or read it with the bayes-spi that made it)")
    return version


def write_config(
    run_dir: str | os.PathLike[str],
    config: FitConfig,
    data_path: str | os.PathLike[str],
    argv: Sequence[str] | None = None,
    device: str | None = None,
    data_info: dict[str, Any] | None = None,
    outputs: dict[str, Any] | None = None,
) -> Path:
    """Write ``run_dir/config.yaml`` atomically and return its path.

    Args:
        run_dir: the run directory (created if missing).
        config: all fit settings (stored under ``settings``; read back with :func:`read_config`).
        data_path: the data file (stored as an absolute path).
        argv: the full command line (default ``sys.argv``).
        device: the resolved device (e.g. ``cpu``, ``cuda:0``); default ``config.device``.
        data_info: extra facts about the data (e.g. ``n_patterns``, ``shape``) stored under ``data``.
        outputs: settings of the outputs (e.g. ``grid``) stored under ``outputs``; ``--resume`` keeps them.
    """
    import pyro
    import torch

    from bayes_spi import __version__

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [str(a) for a in (sys.argv if argv is None else argv)]
    data: dict[str, Any] = {"path": os.fspath(Path(data_path).resolve())}
    if data_info:
        data.update({k: _plain(v) for k, v in data_info.items()})
    doc = {
        FORMAT_VERSION_KEY: RUN_FORMAT_VERSIONS["config"][0],
        "bayes_spi_version": __version__,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(args),
        "argv": args,
        "cwd": os.getcwd(),
        "device": str(device if device is not None else config.device),
        "data": data,
        "versions": {
            "bayes_spi": __version__,
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "pyro": str(pyro.__version__),
        },
        "host": platform.node(),
        "settings": _plain(config.to_dict()),
    }
    if outputs:
        doc["outputs"] = _plain(outputs)
    path = run_dir / CONFIG_NAME
    text = "# bayes-spi run configuration (settings: FitConfig; see bayes_spi/infer/config.py)\n"
    text += yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    _atomic_write_text(path, text)
    return path


def _plain(value: Any) -> Any:
    """Numpy scalars/arrays, tuples and paths -> plain YAML-safe Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)  # str subclasses (e.g. torch's TorchVersion) -> str
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def read_run_info(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The whole ``config.yaml`` of a run as a dict.

    Raises:
        FileNotFoundError: no ``config.yaml`` in ``run_dir``.
        ValueError: the file is not a YAML mapping with a ``settings`` mapping (names the file).
    """
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{os.fspath(path)}: not found (expected the run's {CONFIG_NAME})")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{os.fspath(path)}: expected valid YAML, got a parse error ({exc})") from None
    if isinstance(doc, dict):
        check_format_version("config", doc.get(FORMAT_VERSION_KEY), path)
    if not isinstance(doc, dict) or not isinstance(doc.get("settings"), dict):
        raise ValueError(f"{os.fspath(path)}: field settings: expected a mapping of fit settings, got "
                         f"{type(doc.get('settings') if isinstance(doc, dict) else doc).__name__}")
    return doc


def read_config(run_dir: str | os.PathLike[str]) -> FitConfig:
    """The :class:`FitConfig` stored in ``run_dir/config.yaml``.

    Raises:
        FileNotFoundError: no ``config.yaml``.
        ValueError: malformed file or settings (the message names the file and the setting).
    """
    doc = read_run_info(run_dir)
    try:
        return FitConfig.from_dict(doc["settings"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{os.fspath(Path(run_dir) / CONFIG_NAME)}: {exc}") from None


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (robust to redirection)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it; always use sys.stderr
        pass


def close_logging(logger_name: str = "bayes_spi") -> None:
    """Remove and close the handlers that :func:`setup_logging` added to ``logger_name``."""
    logger = logging.getLogger(logger_name)
    for handler in list(logger.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            logger.removeHandler(handler)
            handler.close()


def setup_logging(run_dir: str | os.PathLike[str], level: int = logging.INFO) -> logging.Logger:
    """Logger ``bayes_spi``: ``level`` and above to ``run_dir/run.log`` (appended, timestamps),
    WARNING and above to stderr. Calling it again replaces the handlers it added before."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    close_logging()
    logger = logging.getLogger("bayes_spi")
    logger.setLevel(level)
    logger.propagate = False
    file_handler = logging.FileHandler(run_dir / LOG_NAME, mode="a", encoding="utf-8")
    file_handler.setLevel(level)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%Y-%m-%d %H:%M:%S"))
    err_handler = _StderrHandler()
    err_handler.setLevel(logging.WARNING)
    err_handler.setFormatter(logging.Formatter("bayes-spi %(levelname)s: %(message)s"))
    for handler in (file_handler, err_handler):
        setattr(handler, _HANDLER_TAG, True)
        logger.addHandler(handler)
    return logger


# ---------------------------------------------------------------------------------------------- the lock
class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited but not been reaped (Linux ``/proc/PID/stat`` state ``Z``): a dead owner.

    An orphaned rank of a killed ``torchrun`` can stay a zombie in a container without an init that reaps
    it; its lock must count as stale. Elsewhere (no ``/proc``) a process that answers signal 0 is alive.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    # the command name is in parentheses and may itself hold spaces or ')': the state follows the last ')'
    rest = stat[stat.rfind(")") + 1:].split()
    return bool(rest) and rest[0] == "Z"


def _read_lock(path: Path) -> tuple[int, str] | None:
    """``(pid, host)`` from a lock file, ``None`` when it is missing or unreadable (then treated as stale)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError, IsADirectoryError):
        return None
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    try:
        return int(fields.get("pid", "")), fields.get("host", "")
    except ValueError:
        return None


def live_lock_owner(run_dir: str | os.PathLike[str]) -> tuple[int, str] | None:
    """``(pid, host)`` of the live process that holds ``run_dir``'s lock, or ``None`` (no lock, or a stale one:
    its pid is dead on this host). A lock from another host is taken as live (its pid cannot be checked)."""
    owner = _read_lock(Path(run_dir) / LOCK_NAME)
    if owner is None:
        return None
    pid, host = owner
    if host and host != platform.node():
        return owner
    return owner if _pid_alive(pid) else None


def locked_message(run_dir: str | os.PathLike[str], pid: int, host: str) -> str:
    """The error for a run directory whose lock is held by the live process ``pid`` on ``host``."""
    run_dir = Path(run_dir)
    return (f"run directory {os.fspath(run_dir)!r} is in use by another bayes-spi fit (pid {pid}"
            f"{' on ' + host if host and host != platform.node() else ''}; lock file "
            f"{os.fspath(run_dir / LOCK_NAME)}): expected no other process on it; wait for that fit to end or give "
            "another -o (remove the lock file only if that process is gone)")


class RunLock:
    """An advisory lock on a run directory: ``RUN/fit.lock`` holds the owner's pid and host.

    :meth:`acquire` creates it atomically (``O_CREAT | O_EXCL``); a lock whose pid is dead on this host is
    stale and taken over; a live one raises :class:`RunLockedError` at once. :meth:`release` removes it.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with RunLock(d):
        ...     live_lock_owner(d)[0] == os.getpid()
        True
        >>> live_lock_owner(d) is None
        True
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = f"pid={os.getpid()}\nhost={platform.node()}\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = live_lock_owner(self.run_dir)
                if owner is not None:
                    raise RunLockedError(locked_message(self.run_dir, *owner)) from None
                # stale (its process is gone): take it over; a racing taker loses at O_EXCL above
                stale = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
                try:
                    os.replace(self.path, stale)
                    stale.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            self.held = True
            return self
        raise RunLockedError(f"run directory {os.fspath(self.run_dir)!r}: could not take the lock file "
                             f"{os.fspath(self.path)} (another process keeps replacing it)")

    def release(self) -> None:
        if not self.held:
            return
        owner = _read_lock(self.path)
        if owner is not None and owner[0] == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------- RunDir
class RunDir:
    """A run directory: the names of its files, its lock and what it holds.

    Every module that reads or writes a run's files asks a :class:`RunDir` for their paths (keys of
    :data:`RUN_FILE_NAMES`) instead of spelling the names.

    Args:
        root: the run directory (it need not exist yet).

    Example:
        >>> import tempfile
        >>> run = RunDir(tempfile.mkdtemp())
        >>> run.path("model").name, run.has("model"), run.is_run()
        ('model.pt', False, False)
        >>> _ = run.path("metrics").write_text("step\\n")
        >>> run.has("metrics"), run.is_run(), run.holds_fit()
        (True, True, False)
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    def __repr__(self) -> str:
        return f"RunDir({os.fspath(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    @staticmethod
    def name(key: str) -> str:
        """The file name of ``key`` (e.g. ``"posterior"`` -> ``"posterior.h5"``).

        Raises:
            KeyError: ``key`` is not a run file (the message lists the known keys).
        """
        try:
            return RUN_FILE_NAMES[key]
        except KeyError:
            raise KeyError(f"run file {key!r}: expected one of {', '.join(RUN_FILE_NAMES)}, got an unknown "
                           "name") from None

    def path(self, key: str) -> Path:
        """The path of the run file ``key`` (whether or not it exists).

        Raises:
            KeyError: ``key`` is not a run file.
        """
        return self.root / self.name(key)

    def has(self, key: str) -> bool:
        """Whether the run holds the file ``key`` (for ``report_dir``: the folder)."""
        p = self.path(key)
        return p.is_dir() if key == "report_dir" else p.is_file()

    def is_run(self) -> bool:
        """Whether this is a run directory: it holds any of :data:`RUN_MARKERS` (config, log, model, metrics,
        checkpoint)."""
        return self.root.is_dir() and any(self.has(key) for key in RUN_MARKERS)

    def holds_fit(self) -> bool:
        """Whether a fit has started here (a ``checkpoint.pt`` or ``model.pt`` exists): a new run refuses it."""
        return any(self.path(key).exists() for key in ("checkpoint", "model"))

    def sub(self, name: str) -> "RunDir":
        """The run directory ``name`` inside this one (e.g. the half-sets ``half1``, ``half2``)."""
        return RunDir(self.root / name)

    @staticmethod
    def marker_names() -> tuple[str, ...]:
        """The file names of :data:`RUN_MARKERS`, in order (for messages).

        Example:
            >>> RunDir.marker_names()[:2]
            ('config.yaml', 'run.log')
        """
        return tuple(RunDir.name(key) for key in RUN_MARKERS)

    def fresh_start_paths(self) -> list[Path]:
        """The files a forced fresh start removes (:data:`FRESH_START_FILES`); the folder is ``path("report_dir")``."""
        return [self.root / name for name in FRESH_START_FILES]

    def lock(self) -> RunLock:
        """The run's advisory lock (not yet taken: use ``with`` or :meth:`RunLock.acquire`)."""
        return RunLock(self.root)

    def live_lock_owner(self) -> tuple[int, str] | None:
        """``(pid, host)`` of the live process holding the run's lock, or ``None``."""
        return live_lock_owner(self.root)

    def read_info(self) -> dict[str, Any]:
        """The whole ``config.yaml`` (see :func:`read_run_info`)."""
        return read_run_info(self.root)

    def read_config(self) -> FitConfig:
        """The :class:`FitConfig` of ``config.yaml`` (see :func:`read_config`)."""
        return read_config(self.root)

    # ------------------------------------------------------------------ versioned readers and writers
    @staticmethod
    def format_version(key: str) -> int:
        """The format version of the run file ``key`` that this bayes-spi writes."""
        return _versions(key)[0]

    @staticmethod
    def stamp(key: str, doc: dict[str, Any]) -> dict[str, Any]:
        """``doc`` with the format version of ``key`` first (what a writer of that file stores).

        Example:
            >>> RunDir.stamp("verdict", {"status": "converged"})
            {'format_version': 1, 'status': 'converged'}
        """
        return {FORMAT_VERSION_KEY: _versions(key)[0], **{k: v for k, v in doc.items() if k != FORMAT_VERSION_KEY}}

    def write_json(self, key: str, doc: dict[str, Any], *, indent: int = 2, allow_nan: bool = True) -> Path:
        """Write the run's JSON file ``key`` atomically with its format version (:meth:`stamp`); return its path."""
        from bayes_spi.atomic import write_json

        return write_json(self.path(key), self.stamp(key, doc), indent=indent, allow_nan=allow_nan)

    def read_json(self, key: str, required: bool = False) -> dict[str, Any] | None:
        """The run's JSON file ``key`` as a dict without its ``format_version`` (checked), or ``None`` when the run
        has no such file (``required=False``).

        Raises:
            FileNotFoundError: no such file and ``required``.
            RunFormatError: a format version this bayes-spi cannot read.
            ValueError: not JSON, or not a JSON object (names the file).

        Example:
            >>> import tempfile
            >>> run = RunDir(tempfile.mkdtemp())
            >>> _ = run.write_json("verdict", {"status": "converged"})
            >>> run.read_json("verdict"), run.read_json("sampling")
            ({'status': 'converged'}, None)
        """
        import json

        p = self.path(key)
        if not p.is_file():
            if required:
                raise FileNotFoundError(f"{os.fspath(p)}: not found (expected the run's {p.name})")
            return None
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{os.fspath(p)}: expected JSON, got a parse error ({exc})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{os.fspath(p)}: expected a JSON object, got {type(doc).__name__}")
        check_format_version(key, doc.pop(FORMAT_VERSION_KEY, None), p)
        return doc

    def read_torch(self, key: str, path: str | os.PathLike[str] | None = None, map_location: Any = "cpu",
                   what: str | None = None) -> Any:
        """The run's torch file ``key`` (``"model"`` or ``"checkpoint"``; ``path`` to read another file of that
        kind), read with ``weights_only=True`` (:func:`bayes_spi.torchfile.load_torch_file`, no code in it runs),
        its ``format_version`` entry checked (and kept).

        Raises:
            FileNotFoundError: no such file.
            TorchFileError: empty, truncated, foreign or holding objects other than tensors (a ``ValueError``).
            RunFormatError: a format version this bayes-spi cannot read.
        """
        from bayes_spi.torchfile import load_torch_file

        p = Path(path) if path is not None else self.path(key)
        obj = load_torch_file(p, map_location=map_location,
                              what=what or f"a bayes-spi {'model file' if key == 'model' else key} ({self.name(key)})")
        if isinstance(obj, dict):
            check_format_version(key, obj.get(FORMAT_VERSION_KEY), p)
        return obj

    def open_h5(self, key: str, what: str | None = None) -> Any:
        """The run's HDF5 file ``key`` (e.g. ``"posterior"``) open for reading (:func:`bayes_spi.dataio.h5open.
        open_h5`), its root attribute ``format_version`` checked; the caller closes it (``with``).

        Raises:
            DataFormatError: missing (also a ``FileNotFoundError``), not HDF5, damaged, unreadable.
            RunFormatError: a format version this bayes-spi cannot read.
        """
        from bayes_spi.dataio.h5open import open_h5

        p = self.path(key)
        f = open_h5(p, what or f"the run's {p.name} (HDF5)")
        try:
            check_format_version(key, f.attrs.get(FORMAT_VERSION_KEY), p)
        except Exception:
            f.close()
            raise
        return f
