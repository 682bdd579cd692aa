"""Hostile and odd array files: a disk that fills while writing, ``.npy`` headers of every version.

A full disk (or the file-size limit, ``ulimit -f``) met while an output is being
written ends in one ``Error:`` line and exit code 1, never a crash, whatever the
output format. HDF5 was the one that crashed (SIGSEGV after its error line): a
failed HDF5 flush leaves objects that cannot be closed again without using freed
memory, so the HDF5 writer lets HDF5 lay the file out only, at the start, and
writes the voxels itself.

``.npy`` files of format versions 1.0, 2.0 and 3.0 are read with public NumPy
functions only (3.0 is parsed here, with ``ast.literal_eval``), alone or as npz
members; headers that are too long, not a dict literal, a function call, or that
describe no possible array are refused with one :class:`FileFormatError`,
quickly and without allocating.
"""

import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

from convt3d_cli import io as cio
from convt3d_cli.errors import FileFormatError
from convt3d_cli.io.npy import MAX_HEADER_BYTES, npy_header, read_npy_header

# ------------------------------------------------------------------ a disk that fills up

LIMIT = 256 << 10  # bytes the output folder (tmpfs) or file (ulimit -f) may take
SUFFIXES = (".h5", ".nii", ".nii.gz", ".npz", ".npy")


def _mount_tmpfs(folder):
    """A tmpfs of LIMIT bytes on ``folder``; the reason it cannot be had, or None."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a size-limited tmpfs needs root on Linux"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LIMIT}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}"
    return None


def _limit_file_size():
    """In the child, before exec: files may not grow beyond LIMIT (writes fail with EFBIG)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal (kept across exec)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@pytest.fixture(params=["tmpfs", "ulimit"])
def small_disk(request, tmp_path):
    """``(output folder, preexec_fn)``: a folder on a full-size tmpfs, or a file-size limit."""
    folder = tmp_path / "out"
    folder.mkdir()
    if request.param == "tmpfs":
        why = _mount_tmpfs(folder)
        if why:
            pytest.skip(why)
        yield folder, None
        subprocess.run(["umount", str(folder)], check=True)
        return
    try:
        import resource
    except ImportError:
        pytest.skip("no resource module: the file-size limit cannot be set")
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    if hard != resource.RLIM_INFINITY and hard < LIMIT:
        pytest.skip(f"the hard file-size limit ({hard} bytes) is below {LIMIT}")
    yield folder, _limit_file_size


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_full_disk_while_writing_is_one_error_line(tmp_path, small_disk, suffix):
    """Exit 1, one ``Error:`` line, no traceback, no crash, nothing left in the output folder.

    The output's voxels take exactly LIMIT bytes, so the checks made before computing
    (free space, file-size limit) let it through, and the container's own bytes
    (header, zip records, HDF5 structure) do not fit: the write itself fails. A
    gzip-compressed NIfTI is not checked in advance; its input is made large enough
    that even compressed it cannot fit.
    """
    folder, preexec = small_disk
    rng = np.random.default_rng(7)
    # nearest, stride 2: 8 float32 output voxels per input voxel.
    shape = (64, 64, 64) if suffix == ".nii.gz" else (16, 16, LIMIT // (32 * 16 * 16))
    source = tmp_path / "in.npy"
    np.save(source, rng.random(shape, dtype=np.float32))
    output = folder / f"out{suffix}"
    proc = subprocess.run(
        [sys.executable, "-m", "convt3d_cli", "run", str(source), str(output), "--kernel", "nearest",
         "--stride", "2"], capture_output=True, text=True, timeout=600, preexec_fn=preexec)
    report = f"exit {proc.returncode}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 1, report  # a crash is a negative code (-11: SIGSEGV)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, report
    for noise in ("Traceback", "Exception ignored", "HDF5-DIAG", "Fatal Python error"):
        assert noise not in proc.stderr, report
    assert not output.exists()
    assert os.listdir(folder) == [], os.listdir(folder)  # no .out.convt3d-*.tmp* either


# The HDF5 writer lays the file out with HDF5, then writes the chunks itself: every chunk
# shape chunk_shape makes (rows of an H-split plane, several planes, several channels or
# volumes in a chunk, padded edge chunks), slabs of any size.
WRITER_SHAPES = [(1, 1, 7, 41, 9), (1, 1, 9, 5, 3), (1, 5, 2, 2, 3), (3, 4, 2, 2, 3), (5, 2, 1, 2, 3),
                 (2, 1, 5, 6, 7)]


@pytest.mark.parametrize("out_shape", WRITER_SHAPES, ids=str)
def test_hdf5_writer_fills_every_chunk_layout(tmp_path, monkeypatch, out_shape):
    import h5py

    from convt3d_cli.io import hdf5

    chunk_shape = hdf5.chunk_shape
    monkeypatch.setattr(hdf5, "chunk_shape", lambda shape, itemsize: chunk_shape(shape, itemsize, 200))
    data = np.random.default_rng(5).random(out_shape).astype(np.float32)
    path = tmp_path / "out.h5"
    writer = hdf5.Hdf5Writer(str(path), out_shape, np.float32, False, None, "/a/b", {"formula": ["x", "y"]})
    with writer:
        start = 0
        for size in [1, 3, 2] * out_shape[2]:
            stop = min(start + size, out_shape[2])
            writer.write_slab(start, stop, np.ascontiguousarray(data[:, :, start:stop]))
            start = stop
            if start == out_shape[2]:
                break
    with h5py.File(path, "r") as handle:
        dataset = handle["/a/b"]
        assert dataset.chunks == chunk_shape(dataset.shape, 4, 200)
        assert np.array_equal(dataset[()].reshape(out_shape), data)
        assert [v.decode() if isinstance(v, bytes) else v for v in dataset.attrs["formula"]] == ["x", "y"]


def test_chunk_offsets_without_chunk_iter(tmp_path):
    """Where HDF5 has no chunk_iter (before 1.14), each chunk is looked up: the same offsets."""
    import h5py

    from convt3d_cli.io.hdf5 import chunk_offsets

    class Lookups:  # the dataset id without chunk_iter
        def __init__(self, dsid):
            self.rank = dsid.rank
            self.get_chunk_info_by_coord = dsid.get_chunk_info_by_coord

    create = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    create.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    with h5py.File(tmp_path / "a.h5", "w") as handle:
        dataset = handle.create_dataset("v", shape=(5, 7, 6), dtype="f4", chunks=(2, 3, 6), dcpl=create)
        grid, chunks = (1, 1, 3, 3, 1), (1, 1, 2, 3, 6)
        looked_up = chunk_offsets(Lookups(dataset.id), grid, chunks)
        assert looked_up.shape == grid and len(set(looked_up.ravel().tolist())) == 9
        if hasattr(dataset.id, "chunk_iter"):
            assert np.array_equal(chunk_offsets(dataset.id, grid, chunks), looked_up)


# ------------------------------------------------------------------ .npy headers by hand

MAGIC = b"\x93NUMPY"


def header_bytes(text, version=(3, 0), length=None, encoding=None):
    """Magic, version, header length (uint16 for 1.0, uint32 after) and ``text`` padded to 64 bytes."""
    size = "<H" if version == (1, 0) else "<I"
    raw = text.encode(encoding or ("utf8" if version >= (3, 0) else "latin1"))
    raw += b" " * (-(len(MAGIC) + 2 + struct.calcsize(size) + len(raw) + 1) % 64) + b"\n"
    return MAGIC + bytes(version) + struct.pack(size, len(raw) if length is None else length) + raw


def dict_text(descr="'<f4'", fortran="False", shape="(2, 3, 4)"):
    return f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}"


def npy_bytes(array, version):
    """``array`` as an .npy file whose header of ``version`` is built by hand."""
    fortran = array.flags.f_contiguous and not array.flags.c_contiguous
    text = dict_text(repr(np.lib.format.dtype_to_descr(array.dtype)), repr(fortran), repr(array.shape))
    return header_bytes(text, version) + array.tobytes(order="F" if fortran else "C")


def npz_with(member_bytes, name="volume.npy"):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, member_bytes)
    return buffer.getvalue()


VERSIONS = [(1, 0), (2, 0), (3, 0)]
ARRAYS = {
    "f4": np.arange(2 * 3 * 4, dtype="<f4").reshape(2, 3, 4),
    "big-endian f8": np.linspace(-1, 1, 60, dtype=">f8").reshape(3, 4, 5),
    "i2 fortran": np.asfortranarray(np.arange(2 * 5 * 3 * 4, dtype="<i2").reshape(2, 5, 3, 4)),
    "u1 5-D": np.arange(60, dtype="u1").reshape(1, 2, 2, 3, 5),
}


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"v{v[0]}.{v[1]}")
@pytest.mark.parametrize("name", ARRAYS)
def test_npy_versions_read(tmp_path, version, name):
    array = ARRAYS[name]
    path = tmp_path / "a.npy"
    path.write_bytes(npy_bytes(array, version))
    assert np.array_equal(np.load(path), array)  # the hand-built file is a valid one
    volume = cio.read_volume(str(path))
    assert np.array_equal(volume.data.reshape(array.shape), array)
    assert cio.describe(str(path))["npy_version"] == f"{version[0]}.{version[1]}"


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"v{v[0]}.{v[1]}")
def test_npz_members_of_every_version(tmp_path, version):
    array = ARRAYS["big-endian f8"]
    path = tmp_path / "a.npz"
    path.write_bytes(npz_with(npy_bytes(array, version)))
    for spec in (str(path), f"{path}:volume"):
        assert np.array_equal(cio.read_volume(spec).data.reshape(array.shape), array)


def test_utf8_header_of_version_3():
    """np.save writes 3.0 only for non-Latin-1 field names: such a header reads (and is refused later)."""
    buffer = io.BytesIO()
    with pytest.warns(UserWarning, match="3.0"):
        np.save(buffer, np.zeros(3, dtype=[("\u03c3", "<f4")]))
    buffer.seek(0)
    shape, fortran, dtype, version = read_npy_header(buffer)
    assert (shape, fortran, dtype.names, version) == ((3,), False, ("\u03c3",), (3, 0))


class _HeaderWritten(Exception):
    pass


class _HeaderOnly(io.BytesIO):
    """Keeps the first write (np.save writes the whole header at once), then stops np.save."""

    def write(self, data):
        if self.tell():
            raise _HeaderWritten
        return super().write(data)


def test_npy_header_is_what_np_save_writes():
    cases = [((3, 4, 5), "<f4"), ((1, 2, 3, 4, 5), "<f8"), ((7,), "<i2"), ((0, 3, 3), "<f4"),
             ((2, 9, 1), ">f8"), ((2 ** 30, 3, 2 ** 20), "<f8"), ((10 ** 18, 2), "<f4")]
    for shape, dtype in cases:
        # A broadcast view: any shape, no memory; only the header is kept.
        view = np.broadcast_to(np.zeros((), dtype=dtype), shape)
        out = _HeaderOnly()
        try:
            np.save(out, view)
        except _HeaderWritten:
            pass
        expected = out.getvalue()
        assert npy_header(shape, dtype) == expected, (shape, dtype)
        assert len(expected) % 64 == 0 and expected[6:8] == b"\x01\x00"


def test_npy_header_too_long_for_1_0_is_2_0():
    """A header over 65535 bytes takes version 2.0, as np.save chooses (no array has so many axes)."""
    shape = (1,) * 30000
    head = npy_header(shape, "<f4")
    assert head[6:8] == b"\x02\x00" and len(head) % 64 == 0
    reference = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        reference, {"descr": "<f4", "fortran_order": False, "shape": shape})
    assert head == reference.getvalue()
    # What np.save itself calls, where it can be reached (np.save cannot make an array with
    # so many axes).
    private = (getattr(np.lib.format, "_write_array_header", None)
               or getattr(getattr(np.lib, "_format_impl", None), "_write_array_header", None))
    if private is not None:
        same = io.BytesIO()
        with pytest.warns(UserWarning, match="2.0"):
            private(same, {"descr": "<f4", "fortran_order": False, "shape": shape}, None)
        assert head == same.getvalue()


# ------------------------------------------------------------------ hostile headers

SENTINEL = "PWNED-by-npy-header"

HOSTILE = {
    "not a dict": "[1, 2, 3]",
    "not a literal": dict_text(shape="(2, 3"),
    "a set": "{'descr', 'fortran_order', 'shape'}",
    "import call": dict_text(shape="__import__('os').getpid()"),
    "file-creating call": dict_text(shape=f"__import__('pathlib').Path('{SENTINEL}').touch()"),
    "lambda": dict_text(descr="(lambda: '<f4')()"),
    "name": dict_text(descr="float32"),
    "extra key": "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}",
    "missing key": "{'descr': '<f4', 'shape': (2,)}",
    "negative shape": dict_text(shape="(-1, 3, 3)"),
    "float shape": dict_text(shape="(2.5, 3, 3)"),
    "text shape": dict_text(shape="('2', 3, 3)"),
    "bool shape": dict_text(shape="(True, 3, 3)"),
    "list shape": dict_text(shape="[2, 3, 3]"),
    "int shape": dict_text(shape="6"),
    "fortran not bool": dict_text(fortran="1"),
    "unknown descr": dict_text(descr="'<q9'"),
    "descr not text": dict_text(descr="42"),
    "descr junk list": dict_text(descr="['x']"),
    "size overflows int64": dict_text(descr="'<f8'", shape=f"({2 ** 31}, {2 ** 31}, {2 ** 31})"),
    "axis overflows int64": dict_text(shape=f"({2 ** 64}, 1, 1)"),
    "huge axis times empty": dict_text(shape=f"({2 ** 70}, 0, 3)"),
    "deep nesting": dict_text(shape="(" * 3000 + ")" * 3000),
}


def _refused_quickly(path, *specs):
    """Every spec raises FileFormatError with under 16 MiB allocated (an unbounded parse would not)."""
    for spec in specs or (str(path),):
        for call in (cio.read_volume, cio.probe_volume, cio.describe):
            with pytest.raises(FileFormatError):
                call(spec)  # once unmeasured: modules load on first use
            tracemalloc.start()
            try:
                with pytest.raises(FileFormatError):
                    call(spec)
            finally:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            assert peak < 16 << 20, (spec, peak)


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"v{v[0]}.{v[1]}")
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_headers_are_refused(tmp_path, monkeypatch, version, case):
    monkeypatch.chdir(tmp_path)
    head = header_bytes(HOSTILE[case], version)
    if len(head) > MAX_HEADER_BYTES:
        pytest.skip("longer than any header read")
    path = tmp_path / "a.npy"
    path.write_bytes(head + bytes(4096))
    archive = tmp_path / "a.npz"
    archive.write_bytes(npz_with(head + bytes(4096)))
    _refused_quickly(path)
    _refused_quickly(archive, str(archive), f"{archive}:volume")
    assert not (tmp_path / SENTINEL).exists()


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: f"v{v[0]}.{v[1]}")
@pytest.mark.parametrize("length", [MAX_HEADER_BYTES + 1, 65535, 2 ** 32 - 1])
def test_huge_header_length_is_refused_before_reading(tmp_path, version, length):
    if version == (1, 0) and length > 65535:
        pytest.skip("a 1.0 header length is 16 bits")
    head = header_bytes(dict_text(), version, length=length)
    path = tmp_path / "a.npy"
    path.write_bytes(head + bytes(96))
    archive = tmp_path / "a.npz"
    archive.write_bytes(npz_with(head + bytes(96)))
    _refused_quickly(path)
    _refused_quickly(archive)
    with pytest.raises(FileFormatError, match="bytes long"):
        cio.probe_volume(str(path))


@pytest.mark.parametrize("raw", [
    MAGIC[:4],  # ends inside the magic
    MAGIC + b"\x03\x00\x40",  # inside the length
    MAGIC + b"\x03\x00" + struct.pack("<I", 128) + b"{'descr': '<f4'",  # inside the header
    MAGIC + b"\x04\x00" + struct.pack("<I", 54) + b" " * 53 + b"\n",  # unknown version
    MAGIC + b"\x01\x01" + struct.pack("<H", 118) + b" " * 117 + b"\n",
    header_bytes(dict_text(), (3, 0), encoding="latin1").replace(b"'<f4'", b"'<f\xe9'"),  # not UTF-8
], ids=["magic", "length", "header", "version 4.0", "version 1.1", "not utf-8"])
def test_broken_npy_starts_are_refused(tmp_path, raw):
    path = tmp_path / "a.npy"
    path.write_bytes(raw)
    _refused_quickly(path)


def test_a_valid_header_of_a_too_short_file_is_refused(tmp_path):
    path = tmp_path / "a.npy"
    path.write_bytes(header_bytes(dict_text(shape="(200, 300, 400)"), (3, 0)) + bytes(100))
    with pytest.raises(FileFormatError, match="truncated"):
        cio.read_volume(str(path))
