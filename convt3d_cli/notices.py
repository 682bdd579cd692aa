"""Warnings as one line each: what a run repaired or found odd but did not refuse.

Libraries speak in their own ways: NumPy raises ``RuntimeWarning`` (an overflow
while applying a NIfTI scaling), nibabel logs its header repairs ("pixdim[1,2,3]
should be non-zero; setting 0 dims to 1"), convt3d warns with
:class:`Convt3dWarning`. :func:`collected` turns all of them into
``Warning: ...`` lines handed to the command's echo, once per distinct text, so
``-q`` silences them like every other report line and nothing else reaches
stderr.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

#: nibabel's logger for header checks and repairs (``nibabel.imageglobals.logger``).
NIBABEL_LOGGER = "nibabel.global"
_DEVELOPER_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


class Convt3dWarning(UserWarning):
    """An input convt3d accepted with a repair, or whose values came out odd."""


@contextmanager
def collected(echo):
    """Route warnings and nibabel's messages to ``echo`` as ``Warning:`` lines.

    Parameters
    ----------
    echo : callable(str)
        Receives ``"Warning: ..."`` once per distinct message.

    Yields
    ------
    list of str
        The messages, in order (without the ``Warning:`` prefix), e.g. for a report.
    """
    seen = []

    def note(text):
        text = " ".join(str(text).split())
        if text and text not in seen:
            seen.append(text)
            echo(f"Warning: {text}")

    def show(message, category, filename, lineno, file=None, line=None):
        note(message)

    class _Route(logging.Filter):
        def filter(self, record):
            note(record.getMessage())
            return False  # handled here: no handler of nibabel's prints it again

    route = _Route()
    # A filter on the logger itself also catches the handler nibabel adds when it is
    # first imported inside this block.
    logger = logging.getLogger(NIBABEL_LOGGER)
    logger.addFilter(route)
    try:
        with warnings.catch_warnings():
            # Every time (a batch runs many files in one process), but not the warnings
            # meant for developers, which Python hides by default too.
            warnings.simplefilter("always")
            for category in _DEVELOPER_WARNINGS:
                warnings.filterwarnings("ignore", category=category)
            warnings.showwarning = show
            yield seen
    finally:
        logger.removeFilter(route)
