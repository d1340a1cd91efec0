"""Run-directory helpers: ``config.yaml`` (every setting, versions, the command line) and ``run.log``.

A run directory written by ``bayes-spi fit`` holds::

    config.yaml      settings (FitConfig), data file, versions, command line, device, date
    run.log          INFO log with timestamps (also WARNING+ on stderr)
    checkpoint.pt    latest atomic checkpoint (resume with ``--resume``)
    metrics.csv      metric history, one row per log interval
    model.pt, intensity.mrc, intensity.h5, posterior.h5, evaluation.json   final outputs

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
    "CONFIG_NAME",
    "LOG_NAME",
    "write_config",
    "read_config",
    "read_run_info",
    "setup_logging",
    "close_logging",
]

CONFIG_NAME = "config.yaml"
LOG_NAME = "run.log"
_HANDLER_TAG = "_bayes_spi_run_handler"


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_config(
    run_dir: str | os.PathLike[str],
    config: FitConfig,
    data_path: str | os.PathLike[str],
    argv: Sequence[str] | None = None,
    device: str | None = None,
    data_info: dict[str, Any] | None = None,
) -> Path:
    """Write ``run_dir/config.yaml`` atomically and return its path.

    Args:
        run_dir: the run directory (created if missing).
        config: all fit settings (stored under ``settings``; read back with :func:`read_config`).
        data_path: the data file (stored as an absolute path).
        argv: the full command line (default ``sys.argv``).
        device: the resolved device (e.g. ``cpu``, ``cuda:0``); default ``config.device``.
        data_info: extra facts about the data (e.g. ``n_patterns``, ``shape``) stored under ``data``.
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
