"""open_h5: every way opening a user's HDF5 file fails gives one DataFormatError naming the file; the readers
that take a user's HDF5 file go through it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from bayes_spi.dataio.h5 import DataFormatError
from bayes_spi.dataio.h5open import H5FileMissingError, open_h5


def _good(tmp_path: Path) -> Path:
    path = tmp_path / "good.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(2000, dtype=np.float64)
    return path


def test_a_good_file_opens_read_only(tmp_path: Path) -> None:
    with open_h5(_good(tmp_path), rdcc_nbytes=1 << 20) as f:
        assert f.mode == "r" and f["x"][7] == 7.0


def test_missing_file_and_broken_link(tmp_path: Path) -> None:
    """Missing: a DataFormatError that is also a FileNotFoundError (callers catching either still do)."""
    with pytest.raises(DataFormatError, match=r"nothere\.h5: field /: expected a CXI \(HDF5\) file, got no file "
                       r"there \(not found\)") as info:
        open_h5(tmp_path / "nothere.h5", "a CXI (HDF5) file")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, H5FileMissingError)
    assert info.value.errno == errno.ENOENT and info.value.filename == os.fspath(tmp_path / "nothere.h5")
    link = tmp_path / "link.h5"
    link.symlink_to(tmp_path / "gone.h5")
    with pytest.raises(FileNotFoundError, match=r"link\.h5: field /: expected an HDF5 file, got a broken symbolic "
                       "link"):
        open_h5(link)


def test_directory_and_link_loop(tmp_path: Path) -> None:
    (tmp_path / "dir.h5").mkdir()
    with pytest.raises(DataFormatError, match=r"dir\.h5: field /: expected a mask file, got a directory$") as info:
        open_h5(tmp_path / "dir.h5", "a mask file")
    assert not isinstance(info.value, FileNotFoundError)
    loop = tmp_path / "loop.h5"
    loop.symlink_to(loop)
    with pytest.raises(DataFormatError, match=r"loop\.h5: field /: expected an HDF5 file, got a symbolic link loop"):
        open_h5(loop)


def test_not_hdf5_empty_and_truncated(tmp_path: Path) -> None:
    text = tmp_path / "notes.h5"
    text.write_text("not an HDF5 file\n" * 10)
    with pytest.raises(DataFormatError, match=r"notes\.h5: field /: expected an HDF5 file, got an unreadable file "
                       r"\(not HDF5: no HDF5 signature\)"):
        open_h5(text)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(DataFormatError, match=r"empty\.h5: field /: expected an HDF5 file, got an empty file"):
        open_h5(empty)
    good = _good(tmp_path)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[:1024])  # the signature survives, the rest is gone
    assert h5py.is_hdf5(cut)
    with pytest.raises(DataFormatError, match=r"cut\.h5: field /: expected an HDF5 file, got an unreadable file "
                       r"\(damaged or truncated HDF5"):
        open_h5(cut)


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the user may not read (chmod 000, or h5py's PermissionError where the user is root and chmod
    does not stop it)."""
    path = _good(tmp_path)
    if os.geteuid() != 0:
        path.chmod(0)
    else:
        def refuse(*args: object, **kwargs: object) -> None:
            raise PermissionError(errno.EACCES, "Unable to synchronously open file (file open failed)")

        monkeypatch.setattr(h5py, "File", refuse)
    with pytest.raises(DataFormatError, match=r"good\.h5: field /: expected an HDF5 file, got an unreadable file "
                       r"\(permission denied for this user\)"):
        open_h5(path)


def test_readers_of_user_files_give_its_message(tmp_path: Path) -> None:
    """The data-file, CXI, Dragonfly-photons, mask and intensity readers all say what open_h5 says."""
    from bayes_spi.dataio.cxi import open_cxi
    from bayes_spi.dataio.emc import EmcH5File
    from bayes_spi.dataio.h5 import SPIDataset
    from bayes_spi.dataio.masks import read_mask
    from bayes_spi.infer.volumes import read_intensity

    bad = tmp_path / "bad.h5"
    bad.write_text("x" * 100)
    for read, what in ((SPIDataset, "a bayes-spi HDF5 data file"), (open_cxi, r"a CXI \(HDF5\) file"),
                       (EmcH5File, "a Dragonfly HDF5 photons file"),
                       (read_intensity, "an MRC or HDF5 intensity volume"),
                       (lambda p: read_mask(p, (4, 4)), r"a mask file \(HDF5\)")):
        with pytest.raises(DataFormatError, match=rf"bad\.h5: field /: expected {what}, got an unreadable file \(not HDF5"):
            read(bad)
    with pytest.raises(FileNotFoundError, match=r"none\.cxi: field /: expected a CXI \(HDF5\) file, got no file"):
        open_cxi(tmp_path / "none.cxi")
