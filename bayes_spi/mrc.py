"""MRC files of cubes: one reader and one writer, with the package's axis order and centring.

Arrays are indexed ``[ix, iy, iz]``; MRC stores ``[z, y, x]``. The writer puts the centre voxel ``n // 2``
at the origin (``origin = -(n // 2) * voxel``) and one ASCII label; the voxel size is in the unit of the
volume (1/A for an intensity, A for a density). Writes are atomic (:func:`bayes_spi.atomic.atomic_path`).

Example:
    >>> import os, tempfile
    >>> import numpy as np
    >>> path = os.path.join(tempfile.mkdtemp(), "v.mrc")
    >>> _ = write_mrc(path, np.arange(27.0).reshape(3, 3, 3), 0.5, "a test cube")
    >>> labels = []
    >>> data, voxel = read_mrc(path, labels)
    >>> float(data[2, 1, 0]), voxel, labels
    (21.0, 0.5, ['a test cube'])
"""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np

from bayes_spi.atomic import atomic_path

__all__ = ["read_mrc", "write_mrc"]


def read_mrc(path: str | os.PathLike[str], labels: list[str] | None = None) -> tuple[np.ndarray, float]:
    """Data ``[x, y, z]`` float64 and the voxel size of an MRC file; its header labels are appended to ``labels``.

    Raises:
        ValueError: not a readable MRC volume, or not one positive voxel size for x, y and z (names the file).
    """
    p = Path(path)
    try:
        with mrcfile.open(p, permissive=True) as mrc:
            if mrc.data is None:
                raise ValueError(f"{os.fspath(p)}: field data: expected a 3D volume, got none")
            data = np.asarray(mrc.data, dtype=np.float64).transpose(2, 1, 0)  # [z,y,x] -> [x,y,z]
            vs = mrc.voxel_size
            sizes = {float(vs.x), float(vs.y), float(vs.z)}
            if labels is not None:
                n_labels = max(0, min(int(mrc.header.nlabl), 10))
                labels.extend(bytes(mrc.header.label[i]).decode("ascii", "replace").strip("\x00 ")
                              for i in range(n_labels))
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError) and os.fspath(p) in str(exc):
            raise
        raise ValueError(f"{os.fspath(p)}: expected an MRC volume, got an unreadable file ({exc})") from None
    if len(sizes) != 1 or not sizes.pop() > 0:
        raise ValueError(f"{os.fspath(p)}: field voxel_size: expected one positive size for x, y, z, got "
                         f"({vs.x}, {vs.y}, {vs.z})")
    return data, float(vs.x)


def write_mrc(path: str | os.PathLike[str], volume: np.ndarray, voxel: float, label: str) -> Path:
    """Write a cube ``volume (n, n, n)`` indexed ``[ix, iy, iz]`` as float32 MRC, atomically.

    Args:
        path: the file; replaced only when the write succeeded.
        volume: the cube (any real dtype; stored as float32).
        voxel: the voxel size (1/A or A), also the unit of the origin ``-(n // 2) * voxel``.
        label: the header label (ASCII, at most 80 characters are kept).

    Returns:
        ``Path(path)``.
    """
    p = Path(path)
    n = volume.shape[0]
    with atomic_path(p) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(volume.transpose(2, 1, 0)).astype(np.float32))
            mrc.voxel_size = voxel
            origin = -(n // 2) * voxel
            mrc.header.origin = (origin, origin, origin)
            mrc.header.label[0] = label[:80].encode("ascii", "replace")
            mrc.header.nlabl = 1
    return p
