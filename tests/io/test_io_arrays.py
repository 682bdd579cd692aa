"""npy / npz / HDF5: reading, key rules, rank rules on output, safety checks."""

import os
import zipfile

import h5py
import numpy as np
import pytest

from convt3d_cli import io
from convt3d_cli.errors import (FileFormatError, KeyNotFoundError, MemoryLimitError, OutputError,
                                ShapeError)
from convt3d_cli.geometry import LayerParams, formula_lines
from convt3d_cli.io import safety

SHAPES = {3: (4, 5, 6), 4: (2, 4, 5, 6), 5: (3, 2, 4, 5, 6)}
DTYPES = [np.float32, np.float64, np.int16]


def make_array(rank, dtype, rng):
    return (rng.standard_normal(SHAPES[rank]) * 100).astype(dtype)


def store(fmt, path, array, key=None):
    """Write ``array`` with the format's own library; return the spec to read it back."""
    if fmt == "npy":
        np.save(path, array)
        return str(path)
    if fmt == "npz":
        np.savez(path, **{key or "scan": array})
        return str(path)
    with h5py.File(path, "w") as handle:
        handle.create_dataset(key or "/scan/data", data=array)
    return str(path)


def load_stored(fmt, path, key=None):
    """Read an output back with the format's own library."""
    if fmt == "npy":
        return np.load(path)
    if fmt == "npz":
        with np.load(path) as archive:
            assert list(archive.files) == [key or "volume"]
            return archive[key or "volume"]
    with h5py.File(path, "r") as handle:
        return handle[key or "/volume"][()]


SUFFIX = {"npy": ".npy", "npz": ".npz", "hdf5": ".h5"}


@pytest.mark.parametrize("fmt", ["npy", "npz", "hdf5"])
@pytest.mark.parametrize("rank", [3, 4, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_round_trip(tmp_path, rng, identity_params, fmt, rank, dtype):
    array = make_array(rank, dtype, rng)
    spec = store(fmt, tmp_path / f"in{SUFFIX[fmt]}", array)

    volume = io.read_volume(spec)
    assert volume.data.shape == (1,) * (5 - rank) + array.shape
    assert volume.data.dtype == np.dtype(dtype)
    assert volume.data.flags.c_contiguous
    np.testing.assert_array_equal(volume.data.reshape(array.shape), array)
    assert volume.source_ndim == rank
    assert volume.format == fmt
    np.testing.assert_array_equal(volume.affine, np.eye(4))
    assert volume.key == {"npy": None, "npz": "scan", "hdf5": "/scan/data"}[fmt]

    out = str(tmp_path / f"out{SUFFIX[fmt]}")
    written = io.write_volume(out, volume.data, like=volume, params=identity_params,
                              formula=formula_lines(volume.data.shape[2:], identity_params))
    assert written == out
    back = load_stored(fmt, out)
    assert back.shape == array.shape
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("fmt", ["npy", "npz", "hdf5"])
def test_dtype_option_casts_array_outputs(tmp_path, identity_params, fmt):
    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(1, 1, 2, 3, 4)
    out = str(tmp_path / f"out{SUFFIX[fmt]}")
    io.write_volume(out, data, like=None, params=identity_params, formula=[], dtype="float64")
    back = load_stored(fmt, out)
    assert back.dtype == np.float64
    np.testing.assert_array_equal(back, data[0, 0])


@pytest.mark.parametrize("source_ndim, data_shape, expected", [
    (3, (1, 1, 2, 3, 4), (2, 3, 4)),          # one channel in, one out: 3-D
    (3, (1, 5, 2, 3, 4), (5, 2, 3, 4)),       # one channel in, several out: 4-D
    (4, (1, 1, 2, 3, 4), (1, 2, 3, 4)),       # 4-D input keeps its rank
    (4, (1, 5, 2, 3, 4), (5, 2, 3, 4)),
    (5, (1, 1, 2, 3, 4), (1, 1, 2, 3, 4)),    # 5-D input keeps its rank
    (4, (3, 5, 2, 3, 4), (3, 5, 2, 3, 4)),    # a batch cannot be dropped
    (None, (1, 1, 2, 3, 4), (2, 3, 4)),       # no input: drop what is 1
    (None, (1, 5, 2, 3, 4), (5, 2, 3, 4)),
    (None, (2, 1, 2, 3, 4), (2, 1, 2, 3, 4)),
])
def test_output_rank_rules(tmp_path, identity_params, source_ndim, data_shape, expected):
    like = None
    if source_ndim is not None:
        like = io.Volume(data=np.zeros(1), affine=np.eye(4), source_ndim=source_ndim, format="npy",
                         path=str(tmp_path / "in.npy"))
    data = np.arange(np.prod(data_shape), dtype=np.float32).reshape(data_shape)
    for fmt in ("npy", "npz", "hdf5"):
        out = str(tmp_path / f"out{SUFFIX[fmt]}")
        io.write_volume(out, data, like=like, params=identity_params, formula=[], overwrite=True)
        back = load_stored(fmt, out)
        assert back.shape == expected, fmt
        np.testing.assert_array_equal(back.reshape(data_shape), data)


def test_fortran_order_and_big_endian_npy(tmp_path):
    array = np.asfortranarray(np.arange(60, dtype=">f4").reshape(3, 4, 5))
    np.save(tmp_path / "f.npy", array)
    volume = io.read_volume(str(tmp_path / "f.npy"))
    assert volume.data.flags.c_contiguous
    assert volume.data.dtype == np.dtype("float32") and volume.data.dtype.isnative
    np.testing.assert_array_equal(volume.data[0, 0], array)
    info = io.probe_volume(str(tmp_path / "f.npy"))
    assert info.byte_order == "big"
    assert info.memory_needed == 2 * info.nbytes  # a second copy is needed, and counted


def test_big_endian_hdf5(tmp_path):
    array = np.arange(60, dtype=">i2").reshape(3, 4, 5)
    with h5py.File(tmp_path / "b.h5", "w") as handle:
        handle["v"] = array
    volume = io.read_volume(str(tmp_path / "b.h5"))
    assert volume.data.dtype == np.dtype("int16") and volume.data.dtype.isnative
    np.testing.assert_array_equal(volume.data[0, 0], array)


def test_hdf5_virtual_datasets(tmp_path, rng):
    """A virtual dataset made of its own file's datasets is read; one made of another
    file is refused, even through a second virtual dataset."""
    data = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as handle:
        handle["a"], handle["b"] = data[0], data[1]
        layout = h5py.VirtualLayout(shape=data.shape, dtype="f4")
        layout[0] = h5py.VirtualSource(".", "a", shape=data.shape[1:])
        layout[1] = h5py.VirtualSource(".", "b", shape=data.shape[1:])
        handle.create_virtual_dataset("volume", layout)
    assert np.array_equal(io.read_volume(f"{path}:/volume").data[0], data)
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["a"] = data[0]
    with h5py.File(tmp_path / "w.h5", "w") as handle:
        outside = h5py.VirtualLayout(shape=data.shape[1:], dtype="f4")
        outside[...] = h5py.VirtualSource("other.h5", "a", shape=data.shape[1:])
        handle.create_virtual_dataset("inner", outside)
        chain = h5py.VirtualLayout(shape=data.shape[1:], dtype="f4")
        chain[...] = h5py.VirtualSource(".", "inner", shape=data.shape[1:])
        handle.create_virtual_dataset("volume", chain)
    for key in ("/inner", "/volume"):
        with pytest.raises(FileFormatError, match="virtual dataset made of other files"):
            io.read_volume(f"{tmp_path / 'w.h5'}:{key}")


def test_hdf5_attrs_are_returned(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as handle:
        handle["v"] = np.zeros((2, 2, 2))
        handle["v"].attrs["element_size_um"] = [1.0, 0.5, 0.5]
    volume = io.read_volume(str(tmp_path / "a.h5"))
    np.testing.assert_array_equal(volume.attrs["element_size_um"], [1.0, 0.5, 0.5])


# --------------------------------------------------------------------------- keys

def test_npz_ambiguous_lists_names_and_shapes(tmp_path):
    np.savez(tmp_path / "two.npz", first=np.zeros((2, 3, 4)), second=np.zeros((5, 6, 7), np.int16))
    with pytest.raises(FileFormatError) as err:
        io.read_volume(str(tmp_path / "two.npz"))
    message = str(err.value)
    assert "first (2, 3, 4) float64" in message and "second (5, 6, 7) int16" in message
    assert "two.npz:KEY" in message
    assert not isinstance(err.value, KeyNotFoundError)


def test_npz_conventional_name_and_key(tmp_path):
    np.savez(tmp_path / "v.npz", volume=np.ones((2, 3, 4)), mask=np.zeros((2, 3, 4)))
    assert io.read_volume(str(tmp_path / "v.npz")).key == "volume"
    assert io.read_volume(str(tmp_path / "v.npz:mask")).data.sum() == 0
    assert io.read_volume(str(tmp_path / "v.npz:mask.npy")).key == "mask"


def test_npz_only_volume_shaped_array_is_the_default(tmp_path):
    np.savez(tmp_path / "v.npz", scan=np.ones((2, 3, 4)), spacing=np.ones(3))
    assert io.read_volume(str(tmp_path / "v.npz")).key == "scan"


def test_npz_missing_key_lists_contents(tmp_path):
    np.savez(tmp_path / "v.npz", volume=np.ones((2, 3, 4)))
    with pytest.raises(KeyNotFoundError) as err:
        io.read_volume(str(tmp_path / "v.npz:nope"))
    assert "nope" in str(err.value) and "volume (2, 3, 4) float64" in str(err.value)


def test_hdf5_keys(tmp_path):
    path = tmp_path / "k.h5"
    with h5py.File(path, "w") as handle:
        handle["scan/volume"] = np.ones((2, 3, 4))
        handle["scan/mask"] = np.zeros((2, 3, 4), np.uint8)
    assert io.read_volume(str(path)).key == "/scan/volume"         # conventional name wins
    assert io.read_volume(f"{path}:/scan/mask").key == "/scan/mask"
    assert io.read_volume(f"{path}:scan/mask").key == "/scan/mask"  # leading slash optional
    with pytest.raises(KeyNotFoundError) as err:
        io.read_volume(f"{path}:/scan/other")
    assert "/scan/volume (2, 3, 4) float64" in str(err.value)
    assert "/scan/mask (2, 3, 4) uint8" in str(err.value)


def test_hdf5_ambiguous(tmp_path):
    path = tmp_path / "k.h5"
    with h5py.File(path, "w") as handle:
        handle["a"] = np.ones((2, 3, 4))
        handle["b"] = np.ones((2, 3, 4))
    with pytest.raises(FileFormatError, match=r"/a \(2, 3, 4\) float64, /b \(2, 3, 4\) float64"):
        io.read_volume(str(path))


def test_empty_npz(tmp_path):
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    with pytest.raises(FileFormatError, match="no arrays"):
        io.read_volume(str(tmp_path / "empty.npz"))


def test_key_for_npy_is_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 2, 2)))
    with pytest.raises(FileFormatError, match="single array"):
        io.read_volume(f"{tmp_path / 'a.npy'}:volume")


@pytest.mark.parametrize("shape", [(4, 5), (1, 1, 1, 2, 3, 4), (7,)])
def test_wrong_rank_is_a_shape_error(tmp_path, shape):
    np.save(tmp_path / "a.npy", np.zeros(shape))
    with pytest.raises(ShapeError, match=r"\(D,H,W\)"):
        io.read_volume(str(tmp_path / "a.npy"))


def test_empty_axis_is_a_shape_error(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 0, 3)))
    with pytest.raises(ShapeError, match="empty"):
        io.read_volume(str(tmp_path / "a.npy"))


def test_non_numeric_arrays_are_refused(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((2, 2, 2), np.complex64))
    with pytest.raises(FileFormatError, match="complex64"):
        io.read_volume(str(tmp_path / "c.npy"))


# --------------------------------------------------------------------------- pickles

class Evil:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))


def object_array(marker):
    Evil.marker = str(marker)
    array = np.empty(3, dtype=object)
    array[:] = [Evil(), Evil(), Evil()]
    return array


def test_npz_object_array_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    np.savez(tmp_path / "evil.npz", volume=object_array(marker))
    assert not marker.exists()
    with pytest.raises(FileFormatError, match="pickle") as err:
        io.read_volume(str(tmp_path / "evil.npz"))
    assert "evil.npz" in str(err.value)
    assert "pickle" in io.describe(str(tmp_path / "evil.npz"))["note"]
    with pytest.raises(FileFormatError, match="pickle"):
        io.read_weights(str(tmp_path / "evil.npz"))
    assert not marker.exists()


def test_npy_object_array_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    np.save(tmp_path / "evil.npy", object_array(marker), allow_pickle=True)
    with pytest.raises(FileFormatError, match="pickle"):
        io.read_volume(str(tmp_path / "evil.npy"))
    assert not marker.exists()


# --------------------------------------------------------------------------- damaged files

def test_truncated_npy(tmp_path):
    path = tmp_path / "cut.npy"
    np.save(path, np.zeros((20, 20, 20), np.float32))
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(FileFormatError, match="truncated") as err:
        io.probe_volume(str(path))
    assert "cut.npy" in str(err.value)
    with pytest.raises(FileFormatError, match="truncated"):
        io.read_volume(str(path))


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".h5", ".hdf5"])
def test_garbage_files(tmp_path, rng, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(rng.bytes(3000))
    with pytest.raises(FileFormatError) as err:
        io.read_volume(str(path))
    assert f"junk{suffix}" in str(err.value)
    with pytest.raises(FileFormatError):
        io.describe(str(path))


def test_truncated_hdf5(tmp_path):
    path = tmp_path / "cut.h5"
    with h5py.File(path, "w") as handle:
        handle["v"] = np.zeros((40, 40, 40), np.float32)
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(FileFormatError, match="cut.h5"):
        io.read_volume(str(path))


def test_truncated_npz(tmp_path):
    path = tmp_path / "cut.npz"
    np.savez(path, volume=np.zeros((40, 40, 40), np.float32))
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(FileFormatError, match="cut.npz"):
        io.read_volume(str(path))


def test_npz_member_shorter_than_its_header(tmp_path):
    """A hand-made archive whose member header promises more data than it holds."""
    path = tmp_path / "short.npz"
    member = io_bytes_of(np.zeros((10, 10, 10), np.float32))[:-400]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("volume.npy", member)
    with pytest.raises(FileFormatError, match="truncated") as err:
        io.probe_volume(str(path))
    assert "short.npz" in str(err.value)


def io_bytes_of(array):
    import io as bytes_io

    buffer = bytes_io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


# --------------------------------------------------------------------------- memory

def test_max_bytes(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((10, 10, 10), np.float64))
    with pytest.raises(MemoryLimitError, match="7.8 KiB") as err:
        io.read_volume(str(tmp_path / "a.npy"), max_bytes=1000)
    assert "1000 bytes" in str(err.value)
    assert io.read_volume(str(tmp_path / "a.npy"), max_bytes=8000).data.nbytes == 8000


def test_available_memory_is_checked(tmp_path, monkeypatch):
    np.save(tmp_path / "a.npy", np.zeros((10, 10, 10), np.float64))
    monkeypatch.setattr(safety, "available_memory", lambda: 4096)
    with pytest.raises(MemoryLimitError, match="only 4.0 KiB of memory is available"):
        io.read_volume(str(tmp_path / "a.npy"))


def test_huge_declared_dataset_is_refused_before_allocating(tmp_path):
    """A 4 TiB dataset that HDF5 never allocated: refused from the header, quickly."""
    if safety.available_memory() is None:
        pytest.skip("no MemAvailable on this system")
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("v", shape=(8192, 8192, 8192), dtype="f8", chunks=(1, 64, 8192))
    with pytest.raises(MemoryLimitError, match="4.0 TiB"):
        io.read_volume(str(path))
    assert io.probe_volume(str(path)).engine_shape == (1, 1, 8192, 8192, 8192)


def test_available_memory_parsing(tmp_path, monkeypatch):
    monkeypatch.setattr(safety, "address_space_available", lambda: None)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  100 kB\nMemFree:  10 kB\nMemAvailable:   2048 kB\n")
    no_cgroup = dict(cgroup_root=str(tmp_path / "none"), self_cgroup=str(tmp_path / "none"))
    assert safety.available_memory(str(meminfo), **no_cgroup) == 2048 * 1024
    meminfo.write_text("MemTotal:  100 kB\n")
    assert safety.available_memory(str(meminfo), **no_cgroup) is None
    assert safety.available_memory(str(tmp_path / "missing"), **no_cgroup) is None


def _cgroup_files(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_cgroup_memory_limits(tmp_path, monkeypatch):
    """A job's cgroup limit (v2 and v1, the tightest of its own and its parents'), less
    what it uses apart from reclaimable page cache, bounds the available memory."""
    monkeypatch.setattr(safety, "address_space_available", lambda: None)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:   20000000 kB\n")
    own = tmp_path / "own"
    own.write_text("0::/slurm/job_7/step_0\n")
    root = tmp_path / "v2"
    _cgroup_files(root / "slurm", {"memory.max": "max\n", "memory.current": "5\n"})
    _cgroup_files(root / "slurm" / "job_7", {"memory.max": "4294967296\n", "memory.current": "1073741824\n",
                                            "memory.stat": "anon 800000000\ninactive_file 73741824\n"})
    _cgroup_files(root / "slurm" / "job_7" / "step_0", {"memory.max": "max\n", "memory.current": "10\n"})
    assert safety.cgroup_available(str(root), str(own)) == 4294967296 - 1000000000
    assert safety.available_memory(str(meminfo), str(root), str(own)) == 4294967296 - 1000000000
    # No limit anywhere (or unreadable values): the machine's memory counts.
    (root / "slurm" / "job_7" / "memory.max").write_text("max\n")
    assert safety.cgroup_available(str(root), str(own)) is None
    (root / "slurm" / "job_7" / "memory.max").write_text("garbage\n")
    assert safety.available_memory(str(meminfo), str(root), str(own)) == 20000000 * 1024
    # cgroup v1 as Docker mounts it: the container's own group at the hierarchy's root,
    # /proc/self/cgroup naming the host's path; usage beyond the limit leaves nothing.
    own.write_text("12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    root = tmp_path / "v1"
    _cgroup_files(root / "memory", {"memory.limit_in_bytes": "2147483648\n", "memory.usage_in_bytes": "3000000000\n",
                                    "memory.stat": "cache 1\ntotal_inactive_file 100\n"})
    assert safety.cgroup_available(str(root), str(own)) == 0
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert safety.cgroup_available(str(root), str(own)) is None


def test_address_space_limit(tmp_path, monkeypatch):
    """``ulimit -v``: the limit less the address space the process already has."""
    import resource

    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  999 kB\nVmSize:\t  1000 kB\n")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert safety.address_space_available(str(status)) is None
    monkeypatch.setattr(resource, "getrlimit", lambda which: (8 << 20, resource.RLIM_INFINITY))
    assert safety.address_space_available(str(status)) == (8 << 20) - 1000 * 1024
    monkeypatch.setattr(resource, "getrlimit", lambda which: (512 << 10, resource.RLIM_INFINITY))
    assert safety.address_space_available(str(status)) == 0


# --------------------------------------------------------------------------- writing

def test_hdf5_output_attributes(tmp_path):
    with h5py.File(tmp_path / "in.h5", "w") as handle:
        handle["scan"] = np.zeros((4, 5, 6), np.float32)
        handle["scan"].attrs["element_size_um"] = [2.0, 1.0, 0.5]
        handle["scan"].attrs["spacing"] = [1.0, 1.0]  # wrong length: not carried over
    volume = io.read_volume(str(tmp_path / "in.h5"))
    params = LayerParams.create((4, 2, 3), stride=(2, 1, 3), padding=(1, 0, 0), output_padding=(1, 0, 2))
    formula = formula_lines((4, 5, 6), params)
    out_shape = (1, 1) + tuple(int(line.rsplit("= ", 1)[1]) for line in formula)
    out = str(tmp_path / "out.h5:/results/up")
    io.write_volume(out, np.ones(out_shape, np.float32), like=volume, params=params,
                    formula=formula, source=f"{tmp_path / 'in.h5'}:/scan")
    with h5py.File(tmp_path / "out.h5", "r") as handle:
        assert list(handle) == ["results"]
        dataset = handle["/results/up"]
        assert dataset.shape == out_shape[2:]
        assert dataset.chunks is not None and dataset.chunks[-1] == out_shape[-1]
        assert dataset.compression is None
        attrs = dataset.attrs
        np.testing.assert_array_equal(attrs["stride"], [2, 1, 3])
        np.testing.assert_array_equal(attrs["padding"], [1, 0, 0])
        np.testing.assert_array_equal(attrs["output_padding"], [1, 0, 2])
        np.testing.assert_array_equal(attrs["dilation"], [1, 1, 1])
        np.testing.assert_array_equal(attrs["kernel_size"], [4, 2, 3])
        assert attrs["stride"].dtype.kind == "i"
        assert int(attrs["groups"]) == 1
        assert [s.decode() if isinstance(s, bytes) else s for s in attrs["formula"]] == formula
        assert attrs["source"].endswith("in.h5:/scan")
        np.testing.assert_allclose(attrs["affine"], _expected_affine(params))
        np.testing.assert_allclose(attrs["element_size_um"], [1.0, 1.0, 0.5 / 3])
        assert "spacing" not in attrs


def _expected_affine(params):
    """A_out = T for an identity input: scale 1/s, shift (p - d(k-1)/2)/s (docs/behaviour.md, *Spatial metadata*)."""
    k, s, p, d = (np.array(v, float) for v in (params.kernel_size, params.stride, params.padding,
                                                params.dilation))
    expected = np.eye(4)
    expected[:3, :3] = np.diag(1 / s)
    expected[:3, 3] = (p - d * (k - 1) / 2) / s
    return expected


def test_hdf5_chunks_are_about_a_mebibyte():
    from convt3d_cli.io.hdf5 import chunk_shape

    assert chunk_shape((4, 64, 64, 64), 4) == (1, 64, 64, 64)
    assert chunk_shape((512, 512, 512), 4) == (1, 512, 512)
    assert chunk_shape((300, 300, 300), 8) == (1, 300, 300)
    chunks = chunk_shape((16, 2000, 2000), 4)
    assert chunks[-1] == 2000 and 4 * np.prod(chunks) <= 1 << 20
    assert chunk_shape((2, 3, 4), 4) == (2, 3, 4)
    assert chunk_shape((1, 1, 10 ** 7), 4) == (1, 1, 10 ** 7)  # a row is never split


def test_npz_output_member_names(tmp_path, identity_params):
    data = np.ones((1, 1, 2, 2, 2), np.float32)
    io.write_volume(str(tmp_path / "a.npz"), data, like=None, params=identity_params, formula=[])
    io.write_volume(str(tmp_path / "b.npz:result"), data, like=None, params=identity_params, formula=[])
    with np.load(tmp_path / "a.npz") as archive:
        assert archive.files == ["volume"]
    with np.load(tmp_path / "b.npz") as archive:
        assert archive.files == ["result"]
    assert io.read_volume(str(tmp_path / "b.npz")).key == "result"


def test_key_for_npy_output_is_refused(tmp_path, identity_params):
    with pytest.raises(OutputError, match="single array"):
        io.write_volume(str(tmp_path / "o.npy:v"), np.ones((1, 1, 2, 2, 2)), like=None,
                        params=identity_params, formula=[])
    assert os.listdir(tmp_path) == []


def test_write_needs_5d_data(tmp_path, identity_params):
    with pytest.raises(ShapeError, match="N, C, D, H, W"):
        io.write_volume(str(tmp_path / "o.npy"), np.ones((2, 2, 2)), like=None,
                        params=identity_params, formula=[])


def test_writing_onto_the_input_is_refused(tmp_path, identity_params):
    np.save(tmp_path / "in.npy", np.ones((2, 2, 2)))
    volume = io.read_volume(str(tmp_path / "in.npy"))
    before = (tmp_path / "in.npy").read_bytes()
    with pytest.raises(OutputError, match="input"):
        io.write_volume(str(tmp_path / "." / "in.npy"), volume.data * 2, like=volume,
                        params=identity_params, formula=[], overwrite=True)
    assert (tmp_path / "in.npy").read_bytes() == before


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_with_corrupt_data_fails_its_crc(tmp_path, rng, compressed):
    path = tmp_path / "bad.npz"
    save = np.savez_compressed if compressed else np.savez
    save(path, volume=rng.standard_normal((20, 20, 20)).astype(np.float32))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(16) if data[middle:middle + 16] != bytes(16) else b"\xff" * 16
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="bad.npz"):
        io.read_volume(str(path))
