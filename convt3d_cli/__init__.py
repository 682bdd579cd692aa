"""convt3d: upsample 3-D volumes with an exact, fast ConvTranspose3d.

The engine (with Numba) and the geometry helpers (with NumPy) are imported on
first use so that ``convt3d --help`` starts instantly.
"""

from .errors import (Convt3dError, FileFormatError, KeyNotFoundError, MemoryLimitError,
                     OutputError, ParameterError, ShapeError)

__version__ = "0.1.0"

__all__ = [
    "conv_transpose3d", "ConvTranspose3d", "output_shape", "Convt3dError", "ParameterError",
    "ShapeError", "FileFormatError", "KeyNotFoundError", "OutputError", "MemoryLimitError",
    "__version__",
]


def __getattr__(name):
    if name in ("conv_transpose3d", "ConvTranspose3d"):
        from . import engine
        return getattr(engine, name)
    if name == "output_shape":
        from .geometry import output_shape
        return output_shape
    raise AttributeError(f"module 'convt3d_cli' has no attribute {name!r}")
