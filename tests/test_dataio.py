"""HDF5 format: round trip, validation errors, streaming batches."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from bayes_spi.dataio import DataFormatError, H5Writer, SPIDataset, quaternions_to_rotations, write_simulation
from bayes_spi.geometry import get_preset

GEOM = get_preset("reference-32")


def _make(path: Path, n: int = 10, chunk: int = 64, truth: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(n, 32, 32)).astype(np.int32)
    mask = np.ones((32, 32), dtype=bool)
    mask[14:18, 14:18] = False
    counts[:, ~mask] = 0
    quats = rng.normal(size=(n, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    scales = rng.uniform(0.5, 1.5, n)
    grid = rng.random((5, 5, 5))
    geom = GEOM.with_mask(mask)
    with H5Writer(path, geom, with_truth=truth, chunk_patterns=chunk, expected_patterns=n, simulation_attrs={"seed": 3}) as w:
        for start in range(0, n, 7):
            if truth:
                w.append(counts[start : start + 7], quats[start : start + 7], scales[start : start + 7])
            else:
                w.append(counts[start : start + 7])
        if truth:
            w.write_truth_intensity(grid, 0.01)
            w.set_truth_attrs({"photons_per_unit_intensity": 0.5})
    return {"counts": counts, "mask": mask, "quats": quats, "scales": scales, "grid": grid}


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "d.h5"
    ref = _make(path, n=20)
    assert not (tmp_path / "d.h5.tmp").exists()
    with SPIDataset(path) as ds:
        assert ds.n_patterns == 20 and len(ds) == 20 and ds.shape == (32, 32)
        assert ds.has_truth
        np.testing.assert_array_equal(ds.mask, ref["mask"])
        assert ds.geometry == GEOM.with_mask(ref["mask"])
        out = ds.read([5, 0, 19])
        assert out.dtype == np.float32 and out.shape == (3, 32, 32)
        np.testing.assert_array_equal(out, ref["counts"][[5, 0, 19]])
        np.testing.assert_array_equal(ds.read(slice(2, 4)), ref["counts"][2:4])
        np.testing.assert_array_equal(ds.read(7)[0], ref["counts"][7])
        np.testing.assert_allclose(ds.truth_quaternions(), ref["quats"])
        np.testing.assert_allclose(ds.truth_scales(), ref["scales"])
        rot = ds.truth_rotations()
        np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-12)
        np.testing.assert_allclose(np.linalg.det(rot), 1.0)
        grid, voxel = ds.truth_intensity()
        np.testing.assert_allclose(grid, ref["grid"].astype(np.float32))
        assert voxel == 0.01 and ds.photons_per_unit_intensity == 0.5 and ds.attrs["seed"] == 3
    with h5py.File(path) as f:
        assert f.attrs["format"] == "bayes-spi" and f.attrs["format_version"] == 1
        assert f["data/counts"].dtype == np.int32 and f["data/counts"].chunks == (20, 32, 32)
        assert f["geometry/mask"].dtype == np.uint8


def test_quaternion_convention() -> None:
    """(w, x, y, z) = (cos 45, 0, 0, sin 45) is +90 degrees about z: maps x to y."""
    rot = quaternions_to_rotations(np.array([[np.cos(np.pi / 4), 0, 0, np.sin(np.pi / 4)]]))[0]
    np.testing.assert_allclose(rot @ [1.0, 0, 0], [0, 1.0, 0], atol=1e-15)


def test_write_simulation_without_truth(tmp_path: Path) -> None:
    path = write_simulation(tmp_path / "plain.h5", np.ones((3, 32, 32), dtype=np.int64), GEOM)
    with SPIDataset(path) as ds:
        assert not ds.has_truth and ds.mask.all()
        with pytest.raises(DataFormatError, match="/truth/quaternions"):
            ds.truth_quaternions()


def test_writer_abort_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.h5"
    with pytest.raises(RuntimeError):
        with H5Writer(path, GEOM) as w:
            w.append(np.zeros((2, 32, 32), dtype=np.int32))
            raise RuntimeError("interrupted")
    assert not path.exists() and not (tmp_path / "x.h5.tmp").exists()
    with pytest.raises(ValueError, match="expected finite non-negative integers"):
        with H5Writer(path, GEOM) as w:
            w.append(-np.ones((2, 32, 32)))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.h5"):
        SPIDataset(tmp_path / "absent.h5")


def _corrupt(path: Path, action: str) -> None:
    with h5py.File(path, "a") as f:
        if action == "missing-counts":
            del f["data/counts"]
        elif action == "mask-shape":
            del f["geometry/mask"]
            f["geometry/mask"] = np.ones((31, 32), dtype=np.uint8)
        elif action == "format":
            f.attrs["format"] = "something-else"
        elif action == "geometry-attr":
            del f["geometry"].attrs["distance_m"]
        elif action == "negative-geometry":
            f["geometry"].attrs["pixel_size_m"] = -1.0
        elif action == "counts-2d":
            del f["data/counts"]
            f["data/counts"] = np.zeros((32, 32), dtype=np.int32)
        elif action == "truth-shape":
            del f["truth/scales"]
            f["truth/scales"] = np.ones(3)


@pytest.mark.parametrize(
    "action, field",
    [
        ("missing-counts", "/data/counts"),
        ("mask-shape", "/geometry/mask"),
        ("format", "format"),
        ("geometry-attr", "distance_m"),
        ("negative-geometry", "pixel_size_m"),
        ("counts-2d", "/data/counts"),
        ("truth-shape", "/truth/scales"),
    ],
)
def test_structural_errors_name_file_and_field(tmp_path: Path, action: str, field: str) -> None:
    path = tmp_path / f"bad_{action}.h5"
    _make(path)
    _corrupt(path, action)
    with pytest.raises(DataFormatError) as info:
        SPIDataset(path)
    assert path.name in str(info.value) and field in str(info.value)
    assert "expected" in str(info.value)


def test_negative_counts_and_nan_float_counts(tmp_path: Path) -> None:
    path = tmp_path / "neg.h5"
    _make(path)
    with h5py.File(path, "a") as f:
        f["data/counts"][4, 0, 0] = -3
    with SPIDataset(path) as ds:
        ds.read([0, 1, 2, 3])  # fine
        with pytest.raises(DataFormatError, match=r"neg\.h5.*/data/counts.*pattern index 4"):
            ds.read([2, 4])
    fpath = tmp_path / "float.h5"
    _make(fpath)
    with h5py.File(fpath, "a") as f:
        counts = f["data/counts"][()].astype(np.float32)
        del f["data/counts"]
        counts[6, 1, 2] = np.nan
        counts[2, 15, 15] = np.nan  # masked pixel: never data, never validated
        f["data/counts"] = counts
    with SPIDataset(fpath) as ds:
        assert ds.read([2])[0, 15, 15] == 0.0
        with pytest.raises(DataFormatError, match=r"float\.h5.*/data/counts.*pattern index 6"):
            ds.read([6])


def test_masked_pixels_read_as_zero(tmp_path: Path) -> None:
    path = tmp_path / "m.h5"
    ref = _make(path)
    with h5py.File(path, "a") as f:
        f["data/counts"][:, 15, 15] = 99
    with SPIDataset(path) as ds:
        out = ds.read(np.arange(10))
        assert np.all(out[:, ~ref["mask"]] == 0)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("n, chunk, batch", [(103, 8, 10), (64, 64, 7), (5, 2, 16)])
def test_iter_batches_covers_each_index_once(tmp_path: Path, shuffle: bool, n: int, chunk: int, batch: int) -> None:
    path = tmp_path / "b.h5"
    ref = _make(path, n=n, chunk=chunk, truth=False)
    with SPIDataset(path) as ds:
        batches = list(ds.iter_batches(batch, shuffle=shuffle, seed=1, epoch=0, buffer_chunks=2))
        idx = np.concatenate([b[0] for b in batches])
        assert np.array_equal(np.sort(idx), np.arange(n))
        assert all(len(b[0]) == batch for b in batches[:-1]) and 1 <= len(batches[-1][0]) <= batch
        for indices, data in batches:
            assert indices.dtype == np.int64 and data.dtype == np.float32
            np.testing.assert_array_equal(data, ref["counts"][indices])
        if not shuffle:
            np.testing.assert_array_equal(idx, np.arange(n))
        elif n > 50:
            assert not np.array_equal(idx, np.arange(n))
            again = np.concatenate([b[0] for b in ds.iter_batches(batch, shuffle=True, seed=1, buffer_chunks=2)])
            np.testing.assert_array_equal(idx, again)
            other = np.concatenate([b[0] for b in ds.iter_batches(batch, shuffle=True, seed=1, epoch=1,
                                                                  buffer_chunks=2)])
            assert not np.array_equal(idx, other)
        # exact resume: skipping the first 3 batches gives the tail of the same sequence
        resumed = list(ds.iter_batches(batch, shuffle=shuffle, seed=1, start=3, buffer_chunks=2))
        assert len(resumed) == max(len(batches) - 3, 0)
        for (i_full, _), (i_res, d_res) in zip(batches[3:], resumed):
            np.testing.assert_array_equal(i_full, i_res)
            np.testing.assert_array_equal(d_res, ref["counts"][i_res])
