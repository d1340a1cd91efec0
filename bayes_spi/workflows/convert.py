"""Convert a foreign data source into the bayes-spi HDF5 format (``bayes-spi convert``).

Sources are those of :func:`bayes_spi.dataio.sources.open_dataset`: Dragonfly ``.emc`` files (several form one
data set) with their detector file, a CXI file, or a NumPy/HDF5 stack of counts with a geometry file. The
output is written chunked and compressed (:class:`~bayes_spi.dataio.h5.H5Writer`) block by block, so memory
does not grow with the number of patterns; it goes to ``OUT.tmp`` and is renamed to ``OUT`` only when
complete (an interrupted conversion leaves ``OUT`` untouched); an existing ``OUT`` is replaced only with
``force``. Masked pixels are stored as 0; the provenance (source files, detector/geometry file, options) goes
to the ``/simulation`` attributes with ``source_kind`` set.

Example:
    >>> from bayes_spi.config.sources import SourceOptions
    >>> run_convert(["a.emc", "b.emc"], "data.h5",  # doctest: +SKIP
    ...             SourceOptions(detector="det.h5", photon_energy_ev=6199.2))
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bayes_spi.config.commands import flag
from bayes_spi.config.sources import SourceOptions
from bayes_spi.workflows.errors import WorkflowError

__all__ = ["run_convert", "open_source"]

Echo = Callable[..., None]


def open_source(sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
                options: SourceOptions | None = None) -> Any:
    """Open one source (several paths only for Dragonfly photon files) with ``options``.

    Raises:
        WorkflowError: a missing or malformed file, a missing or unused option (one line naming the file).
    """
    from bayes_spi.dataio.h5 import DataFormatError
    from bayes_spi.dataio.sources import open_dataset, source_kind

    options = options or SourceOptions()
    paths = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not paths:
        raise WorkflowError("expected at least one source file, got none", kind="usage")
    try:
        if len(paths) > 1:
            kinds = {source_kind(p) for p in paths}
            if kinds != {"emc"}:
                raise WorkflowError(f"several sources are only for Dragonfly photon files (.emc), got kinds "
                                    f"{sorted(kinds)}", kind="usage")
            return open_dataset(paths, **options.open_kwargs())
        return open_dataset(paths[0], **options.open_kwargs())
    except FileNotFoundError as exc:
        raise WorkflowError(str(exc).strip("'\"")) from None
    except (DataFormatError, ValueError) as exc:
        raise WorkflowError(str(exc)) from None


def _print(text: str, err: bool = False) -> None:
    import sys

    print(text, file=sys.stderr if err else sys.stdout)


def run_convert(
    sources: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: SourceOptions | None = None,
    *,
    force: bool = False,
    chunk_patterns: int = 64,
    max_patterns: int | None = None,
    progress: bool = True,
    argv: Sequence[str] | None = None,
    echo: Echo | None = None,
) -> dict[str, Any]:
    """Write ``sources`` to ``out`` in the bayes-spi format, streaming.

    Args:
        sources: the source file(s) (see the module docstring).
        out: the output ``.h5``.
        options: how to read the source (detector, geometry file, photon energy, ...).
        force: replace an existing ``out``.
        chunk_patterns: HDF5 chunk length along N of ``/data/counts``.
        max_patterns: convert only the first patterns.
        progress: show a progress bar.
        argv: the command line recorded in the provenance.
        echo: where messages go.

    Returns:
        ``{"out", "n_patterns", "shape", "geometry_kind", "good_pixels", "photons", "mean_photons",
        "max_count", "seconds"}``.

    Raises:
        WorkflowError: a bad source or option, an existing output without ``force``, a failed write.
    """
    from bayes_spi.atomic import WriteError
    from bayes_spi.dataio.h5 import DataFormatError, H5Writer, SPIDataset

    say = echo if echo is not None else _print
    options = options or SourceOptions()
    out = Path(out)
    if chunk_patterns < 1:
        raise WorkflowError(f"expected a positive chunk length, got {chunk_patterns}", kind="parameter",
                            setting="chunk")
    if max_patterns is not None and max_patterns < 1:
        raise WorkflowError(f"expected a positive number of patterns, got {max_patterns}", kind="parameter",
                            setting="max_patterns")
    paths = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    for p in paths:
        if Path(str(p).split(":/")[0]).resolve() == out.resolve():
            raise WorkflowError(f"output {os.fspath(out)!r}: expected a file other than the source, got the source",
                                kind="usage")
    if out.exists() and not force:
        raise WorkflowError(f"output file {os.fspath(out)!r} exists: expected a new file (replace it with {flag('force')})",
                            kind="usage")
    if out.exists() and out.is_dir():
        raise WorkflowError(f"output {os.fspath(out)!r}: expected a file, got a directory", kind="usage")
    if not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    source = open_source(paths, options)
    try:
        n = source.n_patterns if max_patterns is None else min(int(max_patterns), source.n_patterns)
        if n < 1:
            raise WorkflowError(f"{os.fspath(source.path)}: expected at least one pattern, got none")
        geometry = source.geometry
        kind = getattr(geometry, "kind", "grid")
        say(f"{source.kind} source {os.fspath(source.path)}: {n} patterns of {source.shape[0]}x{source.shape[1]}, "
            f"{int(source.mask.sum())} good pixels, geometry kind {kind}")
        attrs: dict[str, Any] = {**source.attrs, "converter": "bayes-spi convert",
                                 "source_options": str(options.to_dict()), "n_patterns": n}
        if argv is not None:
            import shlex

            attrs["command"] = shlex.join([str(a) for a in argv])
        block = max(int(chunk_patterns), 1) * 8
        photons = 0
        max_count = 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, unit="pattern", desc="converting", dynamic_ncols=True, leave=False)
        try:
            with H5Writer(out, geometry, chunk_patterns=chunk_patterns, expected_patterns=n,
                          simulation_attrs=attrs) as writer:
                for first in range(0, n, block):
                    counts = source.read(np.arange(first, min(first + block, n)))
                    ints = counts.astype(np.int64)
                    if ints.size and ints.max() > np.iinfo(np.int32).max:
                        raise WorkflowError(f"{os.fspath(source.path)}: counts: expected values below 2^31, got "
                                            f"{int(ints.max())}")
                    photons += int(ints.sum())
                    max_count = max(max_count, int(ints.max()) if ints.size else 0)
                    writer.append(ints.astype(np.int32))
                    if bar is not None:
                        bar.update(len(counts))
        finally:
            if bar is not None:
                bar.close()
    except DataFormatError as exc:
        raise WorkflowError(str(exc)) from None
    except WriteError as exc:
        raise WorkflowError(str(exc)) from None
    finally:
        source.close()
    with SPIDataset(out) as check:  # what was written reads back
        if check.n_patterns != n or check.shape != source.shape:
            raise WorkflowError(f"{os.fspath(out)}: expected {n} patterns of {source.shape}, read back "
                                f"{check.n_patterns} of {check.shape}")
    seconds = time.perf_counter() - t0
    result = {"out": out, "n_patterns": n, "shape": tuple(source.shape), "geometry_kind": kind,
              "good_pixels": int(source.mask.sum()), "photons": photons, "mean_photons": photons / n,
              "max_count": max_count, "seconds": seconds,
              "patterns_per_s": n / seconds if seconds > 0 else math.inf}
    return result
