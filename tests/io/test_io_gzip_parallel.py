""".nii.gz and .mgz written as independent gzip members compressed on a thread pool.

The stream is cut every ``_gzip.MEMBER_BYTES`` uncompressed bytes (a fixed offset
of the whole stream, never a slab boundary), so streamed and whole runs write the
same bytes; every gzip reader (Python's gzip, nibabel, convt3d's own) reads all the
members; a failure anywhere removes the temporary file and ends the threads.
``MEMBER_BYTES`` is made tiny here so that volumes of a few kilobytes already span
many members, and the tests fail if the stream goes back to one member.
"""

import gzip
import json
import math
import threading
import zlib

import nibabel as nib
import numpy as np
import pytest
from helpers import invoke_in

from convt3d_cli import io, slabs
from convt3d_cli.engine import PreparedLayer
from convt3d_cli.errors import OutputError
from convt3d_cli.geometry import LayerParams
from convt3d_cli.io import _gzip
from convt3d_cli.io.nifti import NiftiWriter

MEMBER = 4096
AFFINE = np.array([[1.5, 0.0, 0.0, -10.0],
                   [0.0, 2.0, 0.0, 20.0],
                   [0.0, 0.0, 2.5, -30.0],
                   [0.0, 0.0, 0.0, 1.0]])
LAYERS = {
    "one channel": ("--kernel", "linear", "--stride", "2"),
    "two channels": ("--weights", "w2.npz", "--stride", "2,3,1", "--padding", "1,0,1"),
}


@pytest.fixture
def small_members(monkeypatch):
    monkeypatch.setattr(_gzip, "MEMBER_BYTES", MEMBER)


@pytest.fixture
def tiny_budget(monkeypatch):
    """No fixed allowances: --max-memory of a few KiB then cuts these volumes into many slabs."""
    monkeypatch.setattr(slabs, "FIXED_BYTES", 0)
    monkeypatch.setattr(PreparedLayer, "scratch_bytes", lambda layer, window=None: 0)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(9, 10, 11)).astype(np.float32)
    nib.save(nib.Nifti1Image(x, AFFINE), tmp_path / "vol.nii")
    w2 = rng.normal(size=(1, 2, 3, 2, 3)).astype(np.float32)
    np.savez(tmp_path / "w2.npz", weight=w2, bias=np.array([0.25, -1.0], np.float32))
    return tmp_path


def _gzip_threads():
    return [t for t in threading.enumerate() if t.name.startswith(_gzip.THREAD_PREFIX)]


def _members(raw):
    """The decompressed length of each gzip member of ``raw`` (checks each member's CRC)."""
    sizes = []
    while raw:
        stream = zlib.decompressobj(31)
        sizes.append(len(stream.decompress(raw)))
        assert stream.eof, "a truncated member"
        raw = stream.unused_data
    return sizes


def _run(folder, *args):
    result = invoke_in(folder, "run", *args, "-q", "--json", "--overwrite")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def _no_temporaries(folder):
    return not [p for p in folder.iterdir() if ".convt3d" in p.name]


# --------------------------------------------------------------------------- the member writer

@pytest.mark.parametrize("workers", [1, 2, 3])
def test_members_are_cut_at_fixed_offsets_whatever_the_writes(workers):
    rng = np.random.default_rng(0)
    data = np.cumsum(rng.normal(size=20_000)).astype(np.float32).tobytes()  # 80 000 bytes
    expected = b"".join(_gzip.compress_member(data[i:i + MEMBER]) for i in range(0, len(data), MEMBER))
    for cuts in ([], [1, 2, 4095, 4096, 4097, 50_000], sorted(rng.integers(0, len(data), 40).tolist())):
        out = []
        writer = _gzip.MemberWriter(out.append, workers=workers, member_bytes=MEMBER)
        for a, b in zip([0] + cuts, cuts + [len(data)]):
            writer.write(memoryview(data)[a:b])
            assert len(writer.pending) <= writer.in_flight == workers + _gzip.IN_FLIGHT_EXTRA
        writer.close()
        raw = b"".join(out)
        assert raw == expected
        assert _members(raw) == [MEMBER] * (len(data) // MEMBER) + [len(data) % MEMBER]
        assert gzip.decompress(raw) == data
    assert not _gzip_threads()


def test_members_are_compressed_on_the_pool(monkeypatch):
    """Full members go to the named worker threads; a short stream stays in the caller's thread."""
    seen = []
    real = _gzip.compress_member

    def spy(data, level=_gzip.DEFAULT_LEVEL):
        seen.append(threading.current_thread().name)
        return real(data, level)

    monkeypatch.setattr(_gzip, "compress_member", spy)
    out = []
    writer = _gzip.MemberWriter(out.append, workers=2, member_bytes=MEMBER)
    writer.write(bytes(10 * MEMBER + 5))
    writer.close()
    assert len(seen) == 11 and all(name.startswith(_gzip.THREAD_PREFIX) for name in seen)
    assert not _gzip_threads()
    seen.clear()
    writer = _gzip.MemberWriter(out.append, workers=2, member_bytes=MEMBER)
    writer.write(b"short")
    writer.close()
    assert seen == [threading.current_thread().name]


@pytest.mark.parametrize("level", _gzip.LEVELS)
def test_each_level_reaches_the_compressor(level):
    data = np.arange(30_000, dtype=np.int16).tobytes()
    out = []
    writer = _gzip.MemberWriter(out.append, level=level, workers=2, member_bytes=MEMBER)
    writer.write(data)
    writer.close()
    raw = b"".join(out)
    assert gzip.decompress(raw) == data
    assert raw == b"".join(_gzip.compress_member(data[i:i + MEMBER], level)
                           for i in range(0, len(data), MEMBER))
    with pytest.raises(ValueError, match="compress level"):
        _gzip.MemberWriter(out.append, level=4)


def test_an_empty_stream_is_one_empty_member():
    out = []
    writer = _gzip.MemberWriter(out.append)
    writer.close()
    assert gzip.decompress(b"".join(out)) == b"" and len(out) == 1


# --------------------------------------------------------------------------- files

@pytest.mark.parametrize("suffix,plain", [(".nii.gz", ".nii"), (".mgz", ".mgh")])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_streamed_equals_whole_and_every_reader_reads_it(folder, tiny_budget, small_members, suffix,
                                                          plain, layer):
    whole = _run(folder, "vol.nii", "whole" + suffix, *LAYERS[layer])
    assert whole["slabs"] == 1
    counts = set()
    for budget in ("12K", "20K", "40K"):
        streamed = _run(folder, "vol.nii", "streamed" + suffix, *LAYERS[layer], "--max-memory", budget)
        counts.add(streamed["slabs"])
        assert (folder / ("streamed" + suffix)).read_bytes() == (folder / ("whole" + suffix)).read_bytes()
    assert len(counts) == 3 and min(counts) > 1, counts
    _run(folder, "vol.nii", "plain" + plain, *LAYERS[layer])
    raw = (folder / ("whole" + suffix)).read_bytes()
    plain_bytes = (folder / ("plain" + plain)).read_bytes()
    # Many members, every one MEMBER bytes but the last, together the uncompressed file.
    sizes = _members(raw)
    assert len(sizes) == math.ceil(len(plain_bytes) / MEMBER) > 2
    assert sizes[:-1] == [MEMBER] * (len(sizes) - 1)
    assert gzip.decompress(raw) == plain_bytes
    with gzip.open(folder / ("whole" + suffix)) as handle:
        assert handle.read() == plain_bytes
    with _gzip.open_read(str(folder / ("whole" + suffix))) as handle:
        assert handle.read() == plain_bytes
    np.testing.assert_array_equal(np.asanyarray(nib.load(folder / ("whole" + suffix)).dataobj),
                                  np.asanyarray(nib.load(folder / ("plain" + plain)).dataobj))
    assert _no_temporaries(folder) and not _gzip_threads()


@pytest.mark.parametrize("layer", list(LAYERS))
def test_own_output_reads_back_as_an_input(folder, tiny_budget, small_members, layer):
    """convt3d reads its multi-member files: whole, plane by plane (one channel) and spooled."""
    _run(folder, "vol.nii", "mid.nii.gz", *LAYERS[layer])
    _run(folder, "vol.nii", "mid.nii", *LAYERS[layer])
    assert len(_members((folder / "mid.nii.gz").read_bytes())) > 2
    np.testing.assert_array_equal(io.read_volume(str(folder / "mid.nii.gz")).data,
                                  io.read_volume(str(folder / "mid.nii")).data)
    for budget in (None, "40K"):
        extra = () if budget is None else ("--max-memory", budget)
        _run(folder, "mid.nii.gz", "again_gz.nii", "--kernel", "nearest", "--stride", "2", *extra)
        _run(folder, "mid.nii", "again.nii", "--kernel", "nearest", "--stride", "2", *extra)
        assert (folder / "again_gz.nii").read_bytes() == (folder / "again.nii").read_bytes()
    _run(folder, "vol.nii", "mid.mgz", *LAYERS[layer])
    _run(folder, "mid.mgz", "again_mgz.nii", "--kernel", "nearest", "--stride", "2")
    assert len(_members((folder / "mid.mgz").read_bytes())) > 2


def test_write_volume_equals_slabs_of_any_size(tmp_path, small_members):
    """io.write_volume (one slab) and a writer fed slabs of uneven sizes give the same bytes."""
    rng = np.random.default_rng(3)
    data = rng.normal(size=(1, 1, 20, 21, 22)).astype(np.float32)
    params = LayerParams.create(1)
    for suffix in (".nii.gz", ".mgz"):
        io.write_volume(str(tmp_path / ("whole" + suffix)), data, like=None, params=params, formula=[])
        for cuts in ([3], [1, 2, 9, 10, 21], list(range(1, 22))):
            with io.open_writer(str(tmp_path / ("slabs" + suffix)), data.shape, like=None, params=params,
                                formula=[], overwrite=True) as writer:
                block = np.ascontiguousarray(data.transpose(0, 1, 4, 3, 2))
                for a, b in zip([0] + cuts, cuts + [writer.axis_length]):
                    writer.write_slab(a, b, np.ascontiguousarray(block[:, :, a:b]))
            assert (tmp_path / ("slabs" + suffix)).read_bytes() == (tmp_path / ("whole" + suffix)).read_bytes()
        assert len(_members((tmp_path / ("whole" + suffix)).read_bytes())) > 8
    assert not _gzip_threads()


# --------------------------------------------------------------------------- failures

def _writer(tmp_path, name="out.nii.gz", shape=(1, 1, 20, 21, 22)):
    return io.open_writer(str(tmp_path / name), shape, like=None, params=LayerParams.create(1), formula=[])


def _slabs(writer, stop):
    block = np.ones(writer.slab_shape[:2] + (1,) + writer.slab_shape[3:], np.float32)
    for z in range(stop):
        writer.write_slab(z, z + 1, block)


@pytest.mark.parametrize("error", [RuntimeError("the engine failed"), KeyboardInterrupt()])
@pytest.mark.parametrize("name", ["out.nii.gz", "out.mgz"])
def test_failure_mid_stream_removes_the_file_and_ends_the_threads(tmp_path, small_members, error, name):
    with pytest.raises(type(error)), _writer(tmp_path, name) as writer:
        _slabs(writer, 12)
        assert writer.gzip.pool is not None and _gzip_threads()  # the pool is running
        raise error
    assert list(tmp_path.iterdir()) == []
    assert not _gzip_threads()


def test_a_failing_compression_thread_fails_the_run_cleanly(tmp_path, small_members, monkeypatch):
    calls = []
    real = _gzip.compress_member

    def failing(data, level=_gzip.DEFAULT_LEVEL):
        calls.append(1)
        if len(calls) == 4:
            raise MemoryError("no memory for the member")
        return real(data, level)

    monkeypatch.setattr(_gzip, "compress_member", failing)
    with pytest.raises(MemoryError), _writer(tmp_path) as writer:
        _slabs(writer, writer.axis_length)
    assert list(tmp_path.iterdir()) == []
    assert not _gzip_threads()


@pytest.mark.parametrize("stage", ["slabs", "commit"])
def test_a_full_disk_while_members_are_in_flight(tmp_path, small_members, monkeypatch, stage):
    written = []

    def full(self, member):
        if stage == "slabs" or len(written) >= 8:  # 10 members: the last ones go at commit
            raise OSError(28, "No space left on device")
        written.append(member)
        self.file.write(member)

    monkeypatch.setattr(NiftiWriter, "_deflate", full)
    with pytest.raises(OutputError, match="No space left on device"), _writer(tmp_path) as writer:
        _slabs(writer, writer.axis_length)
    assert list(tmp_path.iterdir()) == []
    assert not _gzip_threads()


def test_a_run_interrupted_mid_stream_leaves_nothing(folder, tiny_budget, small_members, monkeypatch):
    """A run whose engine fails on a later slab: no output, no temporary, no thread left."""
    real = PreparedLayer.run_slab
    count = []

    def failing(self, *args, **kwargs):
        count.append(1)
        if len(count) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PreparedLayer, "run_slab", failing)
    result = invoke_in(folder, "run", "vol.nii", "out.nii.gz", *LAYERS["one channel"], "--max-memory", "12K",
                       "-q")
    assert result.exit_code != 0
    assert not (folder / "out.nii.gz").exists() and _no_temporaries(folder)
    assert not _gzip_threads()
