"""Fast gzip for ``.nii.gz`` and ``.mgz``: python-isal's igzip (ISA-L) when installed, else zlib.

Measured on float32 convolution output (a 2 core VM, 30 MiB):

===============  ===========  ===========
compressor        MB/s          size ratio
===============  ===========  ===========
zlib level 6      6            0.69   (nibabel's default)
zlib level 1      45           0.71
zlib-ng level 1   113          0.94
isal level 1      340          0.71
===============  ===========  ===========

Decompression: zlib 200 MB/s, isal 350 MB/s. ISA-L level 1 compresses as well
as zlib level 6 at about fifty times its speed, so it is the default.

Writing (:class:`MemberWriter`): the uncompressed stream is cut every
:data:`MEMBER_BYTES` bytes -- fixed offsets of the whole stream, header included,
never where a slab ends -- and each piece becomes an independent gzip member,
compressed on a small thread pool (ISA-L and zlib release the GIL) while the
caller computes the next slab. The members are written in order by the caller's
thread. A file is thus the same bytes whatever the slabs and the worker count,
and a concatenation of gzip members is one valid gzip file (RFC 1952 section 2.2):
Python's :mod:`gzip`, ISA-L's igzip, nibabel, zlib's ``gzread`` (FSL, ITK,
FreeSurfer) and ``gunzip`` read it whole. Restarting the deflate window every
MiB changes the size by less than 0.05 % (ISA-L level 1, float32 output).
"""

from __future__ import annotations

import collections
import os
import sys
import zlib

from .. import threads

try:  # pragma: no branch - python-isal is a declared dependency, zlib is the safety net
    from isal import igzip as _igzip
    from isal import isal_zlib as _zlib_mod

    HAVE_ISAL = True
except ImportError:  # pragma: no cover
    import gzip as _igzip

    _zlib_mod = zlib
    HAVE_ISAL = False

#: ``--compress-level`` range and default (ISA-L levels; zlib's 1, 1, 6, 9 stand in without it).
LEVELS = (0, 1, 2, 3)
DEFAULT_LEVEL = 1
_ZLIB_LEVELS = {0: 1, 1: 1, 2: 6, 3: 9}

#: Uncompressed bytes per gzip member. Fixed: the file's bytes must not depend on the slabs.
#: 1 MiB (python-isal's threaded writer uses the same block) keeps the members in flight
#: within the slab planner's fixed allowance for gzip buffers.
MEMBER_BYTES = 1 << 20
#: Upper bound of compression threads (more would only add members in flight).
MAX_WORKERS = 8
#: Members handed to the pool and not yet written: one per worker plus this many queued,
#: so no worker waits for the caller to copy the next member.
IN_FLIGHT_EXTRA = 2
#: Name prefix of the compression threads.
THREAD_PREFIX = "convt3d-gzip"


def check_level(level):
    """``level`` as an int in :data:`LEVELS` (``None``: the default)."""
    level = DEFAULT_LEVEL if level is None else int(level)
    if level not in LEVELS:
        raise ValueError(f"compress level must be one of {LEVELS}, got {level}")
    return level


def compressor(level=DEFAULT_LEVEL):
    """A ``compressobj`` producing a single-member gzip stream (header and trailer included)."""
    level = check_level(level)
    if HAVE_ISAL:
        return _zlib_mod.compressobj(level, _zlib_mod.DEFLATED, 31)
    return zlib.compressobj(_ZLIB_LEVELS[level], zlib.DEFLATED, 31)


def compress_member(data, level=DEFAULT_LEVEL):
    """``data`` as one complete gzip member (header with mtime 0, deflate data, CRC and size).

    The same bytes every time for the same data and level; safe to call from any
    thread (the compression runs without the GIL).
    """
    level = check_level(level)
    if HAVE_ISAL:
        return _zlib_mod.compress(data, level, 31)
    return zlib.compress(data, _ZLIB_LEVELS[level], 31)


def worker_count():
    """Compression threads for a writer: as many as the computation may use (the run's thread
    setting, so ``--threads`` and ``batch --jobs`` apply), at most :data:`MAX_WORKERS`."""
    return max(1, min(MAX_WORKERS, threads.current()))


def buffer_bytes(workers=None, member_bytes=None):
    """Most memory a :class:`MemberWriter` holds: the member being filled, and each member in
    flight with its compressed form (ISA-L level 0 may expand incompressible data by a
    quarter: 5/4 of a member is allowed for it)."""
    workers = worker_count() if workers is None else max(1, int(workers))
    member = int(member_bytes or MEMBER_BYTES)
    return member + (workers + IN_FLIGHT_EXTRA) * (member + member * 5 // 4)


class MemberWriter:
    """A gzip stream handed to ``sink`` as independent members, compressed in parallel.

    :meth:`write` takes any bytes-like data and returns once the caller may reuse
    it (the data is copied into a member buffer). Full members go to the thread
    pool; at most ``workers + IN_FLIGHT_EXTRA`` are compressing or waiting to be
    written at any time, so the memory held is bounded whatever the slabs
    (:func:`buffer_bytes`).
    Compressed members go to ``sink`` in order, in the calling thread
    (:meth:`write` collects those that are done; it blocks on the oldest only when
    the bound is reached). :meth:`close` writes the last (partial) member, waits for
    all, and stops the threads; :meth:`abort` drops everything and stops the threads.
    Threads start with the first full member: a stream shorter than one member is
    compressed in the caller's thread.

    Parameters
    ----------
    sink : callable
        Called with each compressed member (bytes), in order, in the caller's thread:
        e.g. a binary file's ``write``. The caller flushes and closes the file.
    level : int, optional
        ``--compress-level`` (0-3).
    workers : int, optional
        Compression threads (default :func:`worker_count`).
    member_bytes : int, optional
        Uncompressed bytes per member (default :data:`MEMBER_BYTES`).
    """

    def __init__(self, sink, level=None, workers=None, member_bytes=None):
        self.sink = sink
        self.level = check_level(level)
        self.workers = max(1, int(workers)) if workers is not None else worker_count()
        self.member_bytes = int(member_bytes or MEMBER_BYTES)
        self.in_flight = self.workers + IN_FLIGHT_EXTRA
        self.pool = None
        self.pending = collections.deque()
        self.buffer = bytearray(self.member_bytes)
        self.filled = 0
        self.members = 0  # written so far
        self.closed = False

    def write(self, data):
        if self.closed:
            raise ValueError("write to a closed gzip stream")
        view = memoryview(data).cast("B")
        size = self.member_bytes
        while len(view):
            take = min(size - self.filled, len(view))
            self.buffer[self.filled:self.filled + take] = view[:take]
            self.filled += take
            view = view[take:]
            if self.filled == size:
                full, self.buffer, self.filled = self.buffer, bytearray(size), 0
                self._submit(full)

    def _submit(self, piece):
        if self.pool is None:
            # Imported when first needed (about 20 ms, most of it the logging module).
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix=THREAD_PREFIX)
        while self.pending and (len(self.pending) >= self.in_flight or self.pending[0].done()):
            self._collect()
        self.pending.append(self.pool.submit(compress_member, piece, self.level))

    def _collect(self):
        self.sink(self.pending.popleft().result())
        self.members += 1

    def close(self):
        """Write the last member and everything still in flight; stop the threads."""
        if self.closed:
            return
        try:
            if self.filled or not self.members and not self.pending:
                last = memoryview(self.buffer)[:self.filled]
                if self.pool is None:
                    self.sink(compress_member(last, self.level))
                    self.members += 1
                else:
                    self._submit(last)
            while self.pending:
                self._collect()
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self.buffer = None
        self._stop(cancel=False)

    def abort(self):
        """Drop the data in flight and stop the threads (idempotent; never raises for them)."""
        self.closed = True
        self.buffer = None
        for future in self.pending:
            future.cancel()
        self.pending.clear()
        self._stop(cancel=True)

    def _stop(self, cancel):
        pool, self.pool = self.pool, None
        if pool is not None:
            # Waits for the members being compressed (milliseconds each): no thread outlives the writer.
            pool.shutdown(wait=True, cancel_futures=cancel)


def open_read(path):
    """A binary reader of a gzip file (ISA-L's igzip when available); checks each member's CRC
    at its end and reads every member of a multi-member file."""
    return _igzip.open(path, "rb")


#: Bytes decompressed per call when skipping, copying or draining a stream.
READ_PIECE = 16 << 20


def skip(stream, count):
    """Read past ``count`` bytes of a decompressing ``stream``.

    Raises
    ------
    EOFError
        The stream ends first.
    """
    while count > 0:
        got = len(stream.read(min(count, READ_PIECE)))
        if not got:
            raise EOFError(f"the stream ends {count} bytes before the data it was asked to skip to")
        count -= got


def fill(stream, view):
    """Decompress into the byte buffer ``view`` until it is full or the stream ends.

    Returns
    -------
    int
        Bytes filled; fewer than ``len(view)`` means the stream ended.
    """
    view = memoryview(view).cast("B")
    done = 0
    while done < len(view):
        got = stream.readinto(view[done:done + READ_PIECE])
        if not got:
            break
        done += got
    return done


def copy(stream, file, count):
    """Copy ``count`` decompressed bytes into ``file``; return how many there were."""
    done = 0
    while done < count:
        piece = stream.read(min(READ_PIECE, count - done))
        if not piece:
            break
        file.write(piece)
        done += len(piece)
    return done


def drain(stream):
    """Read ``stream`` to its end: gzip checks its CRC there only, and corrupt data must not pass."""
    while stream.read(READ_PIECE):
        pass
