"""A prompt with pictures in it: token ids in which each image is begin-of-image, its soft
tokens and end-of-image (as transformers' processor expands the chat template's image token),
plus the pictures and where their soft tokens are.

`ImagePrompt` is a list of token ids like any prompt, so everything that passes prompts along
passes it unchanged; adding ids before or after it (a chat's next turn) keeps the pictures. The engine's
context reads `spans`, `images` and `encode` when it prefills.
"""

from collections.abc import Callable

from ..errors import GemmaChatError
from ..models.multimodal import ImageTokens
from .processor import PreparedImage

MAX_IMAGES = 8  # per message


class ImagePrompt(list):
    def __init__(
        self,
        ids,
        images: list[PreparedImage],
        spans: list[int],
        marks: ImageTokens,
        encode: Callable[[PreparedImage], object],
    ):
        super().__init__(ids)
        self.images = list(images)
        self.spans = list(spans)  # where each image's soft tokens start; image i has images[i].tokens
        self.marks = marks
        self.encode = encode  # PreparedImage -> its soft tokens in the text model's space

    def __add__(self, other):
        ids = list.__add__(self, list(other))
        if isinstance(other, ImagePrompt):
            shift = len(self)
            return ImagePrompt(
                ids, self.images + other.images, self.spans + [s + shift for s in other.spans],
                self.marks, self.encode,
            )
        return ImagePrompt(ids, self.images, self.spans, self.marks, self.encode)

    def __radd__(self, other):
        return ImagePrompt(list(other), [], [], self.marks, self.encode) + self

    def blocks(self) -> list[tuple[int, int, str]]:
        """(start, length, digest) of each image's soft tokens."""
        return [(s, im.tokens, im.digest) for s, im in zip(self.spans, self.images)]


def expand_images(
    ids: list[int], images: list[PreparedImage], marks: ImageTokens, encode
) -> list[int]:
    """`ids` with each image token the chat template wrote replaced by begin-of-image, the
    picture's soft tokens and end-of-image, in order; plain `ids` when there are no pictures."""
    if not images:
        return list(ids)
    at = [i for i, t in enumerate(ids) if t == marks.image]
    if len(at) != len(images):
        if len(at) < len(images):
            raise GemmaChatError("this model's chat template has no place for images")
        raise GemmaChatError("the text holds the image token <|image|>; remove it")
    out, spans, done = [], [], 0
    for i, image in zip(at, images):
        out += ids[done:i]
        out.append(marks.begin)
        spans.append(len(out))
        out += [marks.image] * image.tokens
        out.append(marks.end)
        done = i + 1
    out += ids[done:]
    return ImagePrompt(out, images, spans, marks, encode)


def images_of(prompt) -> list[tuple[int, int, str]]:
    """(start, length, digest) of the pictures in a prompt (none in a plain list of ids)."""
    return prompt.blocks() if isinstance(prompt, ImagePrompt) else []
