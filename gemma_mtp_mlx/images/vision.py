"""What a loaded pair needs to take pictures: how its checkpoint marks them, the processor's
geometry and soft-token budget, and the vision tower, read from the checkpoint on the first
picture only (a chat without pictures never reads those weights), if it fits in the memory
limit the pair was loaded under.

`pair.vision` is a `Vision` for a checkpoint that carries a vision tower and None otherwise;
`vision_of(pair)` says in one line why a pair takes no pictures.
"""

import threading
from pathlib import Path

import mlx.core as mx

from ..errors import GemmaChatError
from ..models.multimodal import ImageTokens
from .files import ImageBytes
from .processor import Geometry, PreparedImage, check_budget, prepare, processor_budget


class Vision:
    def __init__(self, folder: Path, config: dict, budget: int | None = None, *, limit=None):
        self.folder = folder
        self.limit = limit  # memory.Limit the tower must fit in beside the loaded model
        self.marks = ImageTokens.from_config(config)
        self.geometry = Geometry.from_checkpoint(config, folder, budget)
        self._encoder = None
        self._lock = threading.Lock()  # the server's request threads and its decoding thread

    @property
    def budget(self) -> int:
        return self.geometry.budget

    def set_budget(self, budget: int | None) -> None:
        """`--image-tokens`; None: the checkpoint's processor config."""
        found = check_budget(budget) if budget else processor_budget(self.folder)
        g = self.geometry
        self.geometry = Geometry(g.patch_size, g.pooling_kernel_size, found)

    def prepare(self, image: ImageBytes) -> PreparedImage:
        return prepare(image, self.geometry)

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def encoder(self):
        """The vision tower and embedder, loaded (and evaluated) on first use."""
        with self._lock:
            if self._encoder is None:
                from ..loading import load_image_encoder

                self._encoder = load_image_encoder(self.folder, self.limit)
            return self._encoder

    def encode(self, image: PreparedImage) -> mx.array:
        """The picture's soft tokens in the text model's space, [n, hidden] (lazy)."""
        patches, positions = image.patches()
        return self.encoder()(mx.array(patches), mx.array(positions), image.grid)


def vision_of(pair) -> Vision:
    """`pair.vision`, or one line saying that this model takes no pictures."""
    vision = getattr(pair, "vision", None)
    if vision is None:
        raise GemmaChatError(f"{pair.name} has no vision tower: it cannot read images")
    return vision
