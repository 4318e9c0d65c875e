"""gemma-chat: Gemma 4 with lossless MTP speculative decoding in MLX."""

__version__ = "0.1.0"

__all__ = ["Pair", "__version__", "generate", "load"]


def __getattr__(name: str):
    # Imported on first use, so that `gemma-chat` can pick the BLAS before MLX is loaded and
    # `import gemma_mtp_mlx.<light module>` stays light.
    if name == "generate":
        from .engine.generate import generate

        return generate
    if name in ("Pair", "load"):
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'gemma_mtp_mlx' has no attribute {name!r}")
