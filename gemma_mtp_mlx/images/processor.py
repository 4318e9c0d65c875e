"""Gemma 4's image processor in NumPy and Pillow, as transformers' `Gemma4ImageProcessorPil`
does it: an aspect-preserving bicubic resize to at most `budget` soft tokens (both sides
multiples of patch x pooling), pixels scaled to [0, 1], cut into patches row by row. No
mean/std normalisation: the vision tower maps [0, 1] to [-1, 1] itself.

The budget (`--image-tokens`) is one of BUDGETS; the default is what the checkpoint's processor
config says, else transformers' 280.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GemmaChatError
from .files import ImageBytes, decode

BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_BUDGET = 280


@dataclass(frozen=True)
class Geometry:
    patch_size: int
    pooling_kernel_size: int
    budget: int = DEFAULT_BUDGET  # soft tokens per image at most

    @classmethod
    def from_checkpoint(cls, config: dict, folder: Path | None, budget: int | None = None) -> "Geometry":
        vision = config["vision_config"]
        return cls(
            vision.get("patch_size", 16),
            vision.get("pooling_kernel_size", 3),
            check_budget(budget) if budget else processor_budget(folder),
        )

    @property
    def side(self) -> int:
        """Both sides of a resized image are multiples of this many pixels."""
        return self.patch_size * self.pooling_kernel_size


def check_budget(budget: int) -> int:
    if budget not in BUDGETS:
        raise GemmaChatError(
            f"--image-tokens {budget}: one of {', '.join(map(str, BUDGETS))}"
        )
    return budget


def processor_budget(folder: Path | None) -> int:
    """`max_soft_tokens` from the checkpoint's processor config, where it has one."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        file = folder / name if folder else None
        if file is None or not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        inner = data.get("image_processor")
        found = (inner if isinstance(inner, dict) else data).get("max_soft_tokens")
        if found in BUDGETS:
            return found
    return DEFAULT_BUDGET


def fitted_size(height: int, width: int, g: Geometry) -> tuple[int, int]:
    """The resized (height, width): the largest with at most budget x pooling^2 patches and
    sides multiples of patch x pooling; a side that would round to nothing gets one multiple,
    the other side as many as the aspect ratio asks, within the budget."""
    max_patches = g.budget * g.pooling_kernel_size**2
    factor = math.sqrt(max_patches * g.patch_size**2 / (height * width))
    side = g.side
    h = int(math.floor(factor * height / side)) * side
    w = int(math.floor(factor * width / side)) * side
    longest = g.budget * side
    if h == 0:
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * side, longest), side
    return h, w


def soft_tokens(height: int, width: int, g: Geometry) -> int:
    h, w = fitted_size(height, width, g)
    return (h // g.patch_size) * (w // g.patch_size) // g.pooling_kernel_size**2


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """A picture resized for the vision tower: what a prompt holds until its prefill."""

    name: str
    digest: str  # SHA-256 of the file's bytes
    pixels: np.ndarray  # uint8 [height, width, 3], resized
    geometry: Geometry

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per column and per row."""
        p = self.geometry.patch_size
        return self.pixels.shape[0] // p, self.pixels.shape[1] // p

    @property
    def tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols // self.geometry.pooling_kernel_size**2

    def patches(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 patches [rows x cols, p x p x 3] in [0, 1] and their (x, y) [rows x cols, 2],
        row by row."""
        p = self.geometry.patch_size
        rows, cols = self.grid
        scaled = (self.pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
        patches = scaled.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4)
        x, y = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
        positions = np.stack([x, y], axis=-1).reshape(-1, 2).astype(np.int32)
        return patches.reshape(rows * cols, -1), positions


def prepare(image: ImageBytes, g: Geometry) -> PreparedImage:
    """Decode and resize `image` (bicubic, as transformers' Pillow backend)."""
    from PIL import Image

    picture = decode(image)
    height, width = picture.height, picture.width
    h, w = fitted_size(height, width, g)
    if (h, w) != (height, width):
        picture = picture.resize((w, h), resample=Image.Resampling.BICUBIC, reducing_gap=None)
    return PreparedImage(image.name, image.digest, np.asarray(picture, dtype=np.uint8), g)
