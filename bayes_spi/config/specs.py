"""Prior and likelihood *specs*: a name plus parameters, as plain YAML-friendly dicts.

A spec selects a built-in prior or likelihood by name, e.g.
``{"name": "preferred", "axis": [0.0, 0.0, 1.0], "kappa": 2.0}``. On the command line it is written
``NAME`` or ``NAME:KEY=VALUE;KEY=VALUE...`` (``:`` may also separate parameters, so no shell quoting
is needed; vectors are comma-separated)::

    --pose-prior uniform
    --pose-prior preferred:axis=0,0,1:kappa=2          (same as 'preferred:axis=0,0,1;kappa=2')
    --scale-prior lognormal:sigma=0.5
    --scale-prior pr772                                (packaged PR772 photon-count histogram)
    --scale-prior empirical:file=counts.npy:bins=100:smoothing=0.05
    --likelihood poisson:background=0.01
    --likelihood poisson-gaussian:sigma=0.3
    --intensity-prior none | wilson[:KEY=VALUE...]

:func:`normalize_spec` checks a spec against :data:`SCHEMAS` (known names and parameters, types and
ranges), fills in defaults and returns the canonical dict stored in ``FitConfig`` and ``config.yaml``.
This module imports neither torch nor numpy (it is used by the CLI's option parsing).

Example:
    >>> normalize_spec("pose_prior", parse_spec("preferred:axis=0,0,2;kappa=2"))
    {'name': 'preferred', 'axis': [0.0, 0.0, 1.0], 'kappa': 2.0}
    >>> format_spec({'name': 'lognormal', 'sigma': 0.5})
    'lognormal:sigma=0.5'
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "SPEC_KINDS",
    "FLAGS",
    "REQUIRED",
    "Param",
    "SCHEMAS",
    "parse_spec",
    "format_spec",
    "normalize_spec",
    "spec_help",
]

#: the kinds of spec, i.e. the ``FitConfig`` fields that hold one
SPEC_KINDS: tuple[str, ...] = ("pose_prior", "scale_prior", "likelihood", "intensity_prior")

#: the command-line flag of each kind (used in error messages)
FLAGS: dict[str, str] = {kind: "--" + kind.replace("_", "-") for kind in SPEC_KINDS}

_LABELS = {"pose_prior": "pose prior", "scale_prior": "scale prior", "likelihood": "likelihood",
           "intensity_prior": "intensity prior"}


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: marks a parameter without a default
REQUIRED: Any = _Required()


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError
    x = float(value)
    if not math.isfinite(x):
        raise ValueError
    return x


def _positive(value: Any) -> float:
    x = _number(value)
    if x <= 0:
        raise ValueError
    return x


def _nonnegative(value: Any) -> float:
    x = _number(value)
    if x < 0:
        raise ValueError
    return x


def _optional_positive(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "auto", "")):
        return None
    return _positive(value)


def _int_at_least_2(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    x = float(value)
    if x != int(x) or x < 2:
        raise ValueError
    return int(x)


def _unit_vector(value: Any) -> list[float]:
    if isinstance(value, str):
        value = [v for v in re.split(r"[,\s]+", value.strip().strip("[]()")) if v]
    v = [_number(x) for x in value]
    if len(v) != 3:
        raise ValueError
    norm = math.sqrt(sum(x * x for x in v))
    if norm == 0:
        raise ValueError
    return [x / norm for x in v]


def _path(value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError
    return os.path.abspath(os.fspath(value))


@dataclass(frozen=True)
class Param:
    """One parameter of a spec: converter (raises ``ValueError`` on a bad value), default, help."""

    convert: Callable[[Any], Any]
    expected: str
    default: Any = REQUIRED
    help: str = ""


#: kind -> name -> parameter -> :class:`Param`; ``None`` instead of a parameter dict: any parameters
#: (plain scalars, strings or lists), passed on unchecked
SCHEMAS: dict[str, dict[str, dict[str, Param] | None]] = {
    "pose_prior": {
        "uniform": {},
        "preferred": {
            "axis": Param(_unit_vector, "3 comma-separated numbers, not all 0", [0.0, 0.0, 1.0],
                          "preferred beam direction R e_z in the molecule frame (normalised)"),
            "kappa": Param(_nonnegative, "a number >= 0", REQUIRED, "von Mises-Fisher concentration (0 = uniform)"),
        },
    },
    "scale_prior": {
        "lognormal": {"sigma": Param(_positive, "a number > 0", 0.5, "log-normal sigma (mean fixed to 1)")},
        "pr772": {"smoothing": Param(_optional_positive, "a number > 0 or 'auto'", None,
                                     "Gaussian kernel width in log s (auto: Silverman's rule)")},
        "empirical": {
            "file": Param(_path, "a file path", REQUIRED, ".npy/.npz/.csv photon totals or histogram"),
            "bins": Param(_int_at_least_2, "an integer >= 2", 100, "log-spaced bins for per-image totals"),
            "smoothing": Param(_optional_positive, "a number > 0 or 'auto'", None,
                               "Gaussian kernel width in log s (auto: Silverman's rule)"),
        },
    },
    "likelihood": {
        "poisson": {"background": Param(_nonnegative, "a number >= 0", 0.0, "background photons per pixel")},
        "poisson-gaussian": {
            "sigma": Param(_nonnegative, "a number >= 0", REQUIRED, "Gaussian read-out noise (photons)"),
            "background": Param(_nonnegative, "a number >= 0", 0.0, "background photons per pixel"),
        },
    },
    "intensity_prior": {"none": {}, "wilson": None},
}

_SPLIT = re.compile(r"[;:](?=\s*[A-Za-z_][\w-]*\s*=)")


def _scalar(text: str) -> Any:
    t = text.strip()
    low = t.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if "," in t:
        return [_scalar(p) for p in t.strip("[]()").split(",") if p.strip()]
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def parse_spec(text: str) -> dict[str, Any]:
    """``NAME[:KEY=VALUE[;KEY=VALUE...]]`` -> ``{"name": NAME, KEY: VALUE, ...}`` (values: numbers, lists, strings).

    Parameters are separated by ``;`` or ``:`` (a separator counts only before ``KEY=``, so
    ``file=C:/data/x.npy`` stays whole). Nothing is checked beyond the syntax; see :func:`normalize_spec`.

    Raises:
        ValueError: empty name, a parameter without ``=``, or a repeated parameter.

    Example:
        >>> parse_spec("poisson-gaussian:sigma=0.3")
        {'name': 'poisson-gaussian', 'sigma': 0.3}
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a spec string NAME[:KEY=VALUE;...], got {type(text).__name__}")
    name, sep, rest = text.strip().partition(":")
    name = name.strip().lower()
    if not name:
        raise ValueError(f"expected NAME[:KEY=VALUE;...], got {text!r}")
    spec: dict[str, Any] = {"name": name}
    if sep and rest.strip():
        for part in _SPLIT.split(rest):
            part = part.strip()
            if not part:
                continue
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ValueError(f"expected KEY=VALUE parameters after '{name}:', got {part!r}")
            if key in spec:
                raise ValueError(f"parameter {key!r} given twice in {text!r}")
            spec[key] = _scalar(value)
    return spec


def _fmt_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt_value(x) for x in v)
    return "none" if v is None else str(v)


def format_spec(spec: dict[str, Any]) -> str:
    """The command-line form of a spec (inverse of :func:`parse_spec` for scalars and vectors)."""

    params = [f"{k}={_fmt_value(v)}" for k, v in spec.items() if k != "name"]
    return str(spec["name"]) + (":" + ";".join(params) if params else "")


def _plain_value(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain_value(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def normalize_spec(kind: str, spec: str | dict[str, Any]) -> dict[str, Any]:
    """Check a spec (string or dict) of ``kind`` and return its canonical dict, defaults filled in.

    Args:
        kind: one of :data:`SPEC_KINDS`.
        spec: ``"NAME:KEY=VALUE;..."`` or ``{"name": NAME, KEY: VALUE, ...}``.

    Raises:
        ValueError: unknown name (the message lists the known ones), unknown or missing parameter,
            or a bad value (the message names the flag, the parameter and what was expected).
    """
    if kind not in SCHEMAS:
        raise ValueError(f"expected a spec kind in {list(SCHEMAS)}, got {kind!r}")
    flag, label = FLAGS[kind], _LABELS[kind]
    if isinstance(spec, str):
        try:
            spec = parse_spec(spec)
        except ValueError as exc:
            raise ValueError(f"{flag}: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"{flag}: expected a spec NAME[:KEY=VALUE;...] or a mapping with a 'name', got {spec!r}")
    name = spec["name"].strip().lower()
    known = SCHEMAS[kind]
    if name not in known:
        raise ValueError(f"{flag}: unknown {label} {name!r}: expected one of {', '.join(known)}")
    schema = known[name]
    given = {k: v for k, v in spec.items() if k != "name"}
    if schema is None:  # passed on to another module unchecked: only plain values
        bad = [k for k, v in given.items() if not isinstance(k, str) or not _plain_value(v)]
        if bad:
            raise ValueError(f"{flag} {name}: parameters {bad}: expected numbers, strings or lists of them")
        return {"name": name, **given}
    unknown = sorted(set(given) - set(schema))
    if unknown:
        expected = ", ".join(schema) if schema else "no parameters"
        raise ValueError(f"{flag} {name}: unknown parameter(s) {', '.join(map(str, unknown))}: expected {expected}")
    out: dict[str, Any] = {"name": name}
    for key, param in schema.items():
        if key not in given:
            if param.default is REQUIRED:
                raise ValueError(f"{flag} {name}: missing parameter {key} ({param.expected}; e.g. "
                                 f"{flag} {name}:{key}=...)")
            out[key] = list(param.default) if isinstance(param.default, list) else param.default
            continue
        try:
            out[key] = param.convert(given[key])
        except (TypeError, ValueError):
            raise ValueError(f"{flag} {name}: {key}: expected {param.expected}, got {given[key]!r}") from None
    return out


def _help_default(default: Any) -> str:
    if default is REQUIRED:
        return "..."
    return "auto" if default is None else _fmt_value(default)


def spec_help(kind: str) -> str:
    """One line per known name of ``kind`` with its parameters (for ``--help``)."""
    parts = []
    for name, schema in SCHEMAS[kind].items():
        if schema is None:
            parts.append(f"{name}[:KEY=VALUE...]")
        elif not schema:
            parts.append(name)
        else:
            params = ";".join(f"{k}={_help_default(p.default)}"
                              for k, p in schema.items())
            parts.append(f"{name}:{params}")
    return ", ".join(parts)
