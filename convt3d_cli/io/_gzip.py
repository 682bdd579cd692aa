"""Fast gzip for ``.nii.gz``: python-isal's igzip (ISA-L) when installed, else zlib.

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
as zlib level 6 at about fifty times its speed, so it is the default. The
streams are ordinary single-member gzip files that every reader accepts.
"""

from __future__ import annotations

import zlib

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


def compressor(level=DEFAULT_LEVEL):
    """A ``compressobj`` producing a gzip stream (header and trailer included)."""
    level = DEFAULT_LEVEL if level is None else int(level)
    if level not in LEVELS:
        raise ValueError(f"compress level must be one of {LEVELS}, got {level}")
    if HAVE_ISAL:
        return _zlib_mod.compressobj(level, _zlib_mod.DEFLATED, 31)
    return zlib.compressobj(_ZLIB_LEVELS[level], zlib.DEFLATED, 31)


def open_read(path):
    """A binary reader of a gzip file (ISA-L's igzip when available); checks the CRC at its end."""
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
