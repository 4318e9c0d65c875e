"""Images into the text model: the vision tower, the embedder that projects its soft tokens to
the text model's width, and where those go in a prompt (spec §7).

`ImageEncoder` holds `vision_tower` and `embed_vision` under the names mlx-vlm's conversions
use; `sanitize` maps Google's originals (`model.vision_tower.*`, `model.embed_vision.*`) onto
them and leaves out everything else (text, audio). It is its own module, apart from the text
`Model`, so a chat that never shows a picture never reads these weights.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .vision import VisionArgs, VisionModel, rms_norm_f32

_PREFIXES = ("vision_tower.", "embed_vision.")
# transformers' rotary tables are computed, never loaded.
_DROPPED = ("rotary_emb",)
_CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")


@dataclass
class ImageTokens:
    """The token ids a checkpoint marks images with, from its config.json: an image is
    begin-of-image, n soft tokens, end-of-image (as transformers' processor expands it)."""

    image: int
    begin: int
    end: int
    pad: int  # what the per-layer embeddings read at soft-token positions

    @classmethod
    def from_config(cls, config: dict) -> "ImageTokens":
        text = config.get("text_config") or {}
        pad = text.get("pad_token_id", config.get("pad_token_id"))
        return cls(
            image=config["image_token_id"],
            begin=config["boi_token_id"],
            end=config["eoi_token_id"],
            pad=0 if pad is None else pad,
        )


def has_vision(config: dict) -> bool:
    """A config whose checkpoint carries a vision tower and says how images are marked."""
    return isinstance(config.get("vision_config"), dict) and all(
        isinstance(config.get(k), int) for k in ("image_token_id", "boi_token_id", "eoi_token_id")
    )


class MultimodalEmbedder(nn.Module):
    """RMS norm without a scale, then a projection to the text model's hidden size."""

    def __init__(self, dims: int, text_dims: int, eps: float):
        super().__init__()
        self.embedding_projection = nn.Linear(dims, text_dims, bias=False)
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(rms_norm_f32(x, None, self.eps))


class ImageEncoder(nn.Module):
    def __init__(self, args: VisionArgs, text_hidden_size: int):
        super().__init__()
        self.args = args
        self.vision_tower = VisionModel(args)
        self.embed_vision = MultimodalEmbedder(args.hidden_size, text_hidden_size, args.rms_norm_eps)

    @classmethod
    def from_config(cls, config: dict) -> "ImageEncoder":
        text = config.get("text_config") or config
        return cls(VisionArgs.from_config(config["vision_config"]), text["hidden_size"])

    def __call__(self, patches: mx.array, positions: mx.array, grid: tuple[int, int]) -> mx.array:
        """One image's soft tokens in the text model's space, [n, text hidden]."""
        return self.embed_vision(self.vision_tower(patches, positions, grid))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The tower's and the embedder's weights, from either layout; nothing else (clip
        bounds only where the config clips)."""
        out = {}
        for key, value in weights.items():
            key = key.removeprefix("model.")
            if not key.startswith(_PREFIXES) or any(s in key for s in _DROPPED):
                continue
            if key.endswith(_CLIP_BOUNDS) and not self.args.use_clipped_linears:
                continue
            out[key] = value
        return out
