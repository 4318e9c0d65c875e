"""gemma-chat: Gemma 4 with lossless MTP speculative decoding in MLX."""

__version__ = "0.1.0"

__all__ = ["Pair", "__version__", "generate", "load"]


def __getattr__(name: str):
    # The engine and the loader import MLX and mlx-lm, seconds of start-up that
    # `gemma-chat --version` and `--help` should not pay: they load on first use.
    if name == "generate":
        from .engine.generate import generate

        return generate
    if name in ("load", "Pair"):
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
