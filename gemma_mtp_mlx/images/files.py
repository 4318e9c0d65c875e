"""Pictures as gemma-chat takes them in: a file, bytes, or a `data:` URL, checked and decoded
with Pillow before any weights move. PNG, JPEG, WebP and GIF (its first frame), turned upright
by their EXIF orientation, transparency composited on white (as transformers does).

Every failure is one `GemmaChatError` line naming the picture: missing, unreadable, too large
(bytes or pixels), not one of those formats, or truncated.
"""

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from ..errors import GemmaChatError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
MAX_BYTES = 20 * 2**20  # as OpenAI's API allows per image
MAX_PIXELS = 64_000_000  # a 64-megapixel photo decodes to 192 MB of RGB


@dataclass(frozen=True)
class ImageBytes:
    """A picture's file as read: its bytes, what to call it in messages, its SHA-256."""

    data: bytes
    name: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def read_image_file(path: str | Path) -> ImageBytes:
    file = Path(path).expanduser()
    name = str(path)
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise GemmaChatError(f"no image at {name}") from None
    except OSError as e:
        raise GemmaChatError(f"cannot read the image {name}: {e.strerror}") from None
    if file.is_dir():
        raise GemmaChatError(f"{name} is a folder, not an image")
    if size > MAX_BYTES:
        raise GemmaChatError(f"the image {name} is {_mib(size)}; at most {_mib(MAX_BYTES)}")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise GemmaChatError(f"cannot read the image {name}: {e.strerror}") from None
    return ImageBytes(data, name)


def image_from_data_url(url: str, name: str = "the image") -> ImageBytes:
    """`data:image/png;base64,...` (any image type; the bytes say what it is)."""
    head, comma, payload = url.partition(",")
    if not (head.startswith("data:") and comma and head.endswith(";base64")):
        raise GemmaChatError(f"{name}: expected a data:image/...;base64, URL")
    if len(payload) > MAX_BYTES * 4 // 3 + 4:
        raise GemmaChatError(f"{name} is over {_mib(MAX_BYTES)}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise GemmaChatError(f"{name}: the data: URL is not valid base64") from None
    return ImageBytes(data, name)


def data_url(image: ImageBytes) -> str:
    """The picture as a `data:` URL (what `--endpoint` sends a server)."""
    from PIL import Image

    kind = Image.open(io.BytesIO(image.data), formats=FORMATS).format.lower()
    return f"data:image/{kind};base64," + base64.b64encode(image.data).decode("ascii")


def decode(image: ImageBytes):
    """The picture as an upright RGB Pillow image, decoded completely (a truncated file fails
    here)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = image.name
    if len(image.data) > MAX_BYTES:
        raise GemmaChatError(f"the image {name} is {_mib(len(image.data))}; at most {_mib(MAX_BYTES)}")
    if not image.data:
        raise GemmaChatError(f"the image {name} is empty")
    try:
        picture = Image.open(io.BytesIO(image.data), formats=FORMATS)
    except UnidentifiedImageError:
        raise GemmaChatError(f"{name} is not a PNG, JPEG, WebP or GIF image") from None
    width, height = picture.size
    if width * height > MAX_PIXELS:
        raise GemmaChatError(
            f"the image {name} is {width}x{height} pixels; at most {MAX_PIXELS // 10**6} megapixels"
        )
    try:
        picture.seek(0)  # a GIF's first frame
        picture.load()
        picture = ImageOps.exif_transpose(picture)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise GemmaChatError(f"cannot decode the image {name} ({_reason(e)})") from None
    return _rgb(picture)


def _rgb(picture):
    from PIL import Image

    if "A" in picture.getbands() or picture.info.get("transparency") is not None:
        rgba = picture.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return picture.convert("RGB")


def _reason(error: Exception) -> str:
    text = str(error).strip()
    if "truncated" in text or "end of file" in text.lower():
        return "the file is truncated"
    return text or type(error).__name__


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
