"""ballad: BALLAD long-tailed recognition with CLIP, phase B on cached features.

The package is a library; the `ballad` command lives in the separate `cli` package. Submodules are
imported on use so that importing `ballad_cache` stays cheap (torch and open_clip load on demand).
"""

__version__ = "0.1.0"

from .errors import BalladError  # noqa: E402

__all__ = ["BalladError", "__version__"]
