"""gemma-chat: Gemma 4 with lossless MTP speculative decoding in MLX."""

__version__ = "0.1.0"

from .engine.generate import generate  # noqa: E402
from .loading import Pair, load  # noqa: E402

__all__ = ["Pair", "__version__", "generate", "load"]
