"""gemma-chat: Gemma 4 with lossless MTP speculative decoding in MLX."""

__version__ = "0.1.0"
