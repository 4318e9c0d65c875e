"""Pictures in: token counts and pixels equal transformers' Gemma 4 image processor at every
budget; PNG, JPEG, WebP, GIF's first frame, EXIF orientation; bad files are one line each."""

import base64
import io

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import load_image
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from gemma_mtp_mlx.errors import GemmaChatError
from gemma_mtp_mlx.images import files
from gemma_mtp_mlx.images.files import ImageBytes, image_from_data_url, read_image_file
from gemma_mtp_mlx.images.processor import BUDGETS, Geometry, prepare, soft_tokens
from tests.conftest import picture

# (width, height): landscape, portrait, square, a sliver each way, tiny, odd.
SIZES = [(640, 480), (480, 640), (224, 224), (3000, 20), (20, 3000), (1, 1), (5, 7), (1000, 563)]


@pytest.mark.parametrize("budget", BUDGETS)
def test_token_counts_and_pixels_equal_transformers(budget):
    processor = Gemma4ImageProcessorPil(max_soft_tokens=budget)
    g = Geometry(16, 3, budget)
    for i, (w, h) in enumerate(SIZES):
        data = picture(w, h, seed=i)
        ref = processor(images=Image.open(io.BytesIO(data)), return_tensors="np")
        ours = prepare(ImageBytes(data, "x"), g)
        assert ours.tokens == ref["num_soft_tokens_per_image"][0] == soft_tokens(h, w, g), (w, h)
        patches, positions = ours.patches()
        n = len(patches)
        np.testing.assert_array_equal(patches, ref["pixel_values"][0][:n])
        np.testing.assert_array_equal(positions, ref["image_position_ids"][0][:n])
        assert (ref["image_position_ids"][0][n:] == -1).all()


def saved(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def test_formats_and_orientation_read_as_transformers_reads_them(tmp_path):
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)) for _ in range(2)]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: shown turned 90 degrees clockwise
    cases = {
        "a.png": saved(frames[0], "PNG"),
        "a.jpg": saved(frames[0], "JPEG", quality=90),
        "a.webp": saved(frames[0], "WEBP", lossless=True),
        "a.gif": saved(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "turned.jpg": saved(frames[0], "JPEG", exif=exif.tobytes()),
    }
    processor = Gemma4ImageProcessorPil(max_soft_tokens=70)
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        ours = prepare(read_image_file(tmp_path / name), Geometry(16, 3, 70))
        ref = processor(images=load_image(str(tmp_path / name)), return_tensors="np")
        patches, _ = ours.patches()
        np.testing.assert_array_equal(patches, ref["pixel_values"][0][: len(patches)], err_msg=name)
    height, width = prepare(read_image_file(tmp_path / "turned.jpg"), Geometry(1, 1, 1120)).pixels.shape[:2]
    assert height > width  # upright
    gif = prepare(read_image_file(tmp_path / "a.gif"), Geometry(1, 1, 1120)).pixels
    height, width = gif.shape[:2]
    assert width > height
    first = np.asarray(frames[0].resize((width, height), Image.Resampling.BICUBIC, reducing_gap=None))
    assert np.abs(gif.astype(int) - first).mean() < 40  # the first frame (GIF's palette blurs it)


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (16, 16), (10, 20, 30, 0))
    ours = prepare(ImageBytes(saved(clear, "PNG"), "x"), Geometry(16, 1, 70))
    assert (ours.pixels == 255).all()


def test_the_budget_is_one_of_five():
    from gemma_mtp_mlx.images.processor import check_budget

    with pytest.raises(GemmaChatError, match=r"^--image-tokens 100: one of 70, 140, 280, 560, 1120$"):
        check_budget(100)


@pytest.fixture
def bad(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "MAX_PIXELS", 4000 * 4000)
    png = picture(64, 48)
    jpg = saved(Image.open(io.BytesIO(png)).convert("RGB"), "JPEG")
    paths = {
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "notes.txt": b"not a picture at all\n",
        "empty.png": b"",
        "vast.png": saved(Image.new("1", (5000, 4000)), "PNG"),
        "picture.bmp": saved(Image.open(io.BytesIO(png)), "BMP"),
    }
    for name, data in paths.items():
        (tmp_path / name).write_bytes(data)
    with open(tmp_path / "huge.png", "wb") as f:
        f.truncate(files.MAX_BYTES + 1)
    (tmp_path / "folder.png").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.png", r"^no image at .*missing\.png$"),
        ("folder.png", r"^.*folder\.png is a folder, not an image$"),
        ("notes.txt/x.png", r"^cannot read the image .*notes\.txt/x\.png: Not a directory$"),
        ("huge.png", r"^the image .*huge\.png is 20\.0 MiB; at most 20\.0 MiB$"),
        ("truncated.png", r"^cannot decode the image .*truncated\.png \(the file is truncated\)$"),
        ("truncated.jpg", r"^cannot decode the image .*truncated\.jpg \(the file is truncated\)$"),
        ("notes.txt", r"^.*notes\.txt is not a PNG, JPEG, WebP or GIF image$"),
        ("picture.bmp", r"^.*picture\.bmp is not a PNG, JPEG, WebP or GIF image$"),
        ("empty.png", r"^the image .*empty\.png is empty$"),
        ("vast.png", r"^the image .*vast\.png is 5000x4000 pixels; at most 16 megapixels$"),
    ],
)
def test_bad_pictures_are_one_line(bad, name, message):
    with pytest.raises(GemmaChatError, match=message) as e:
        prepare(read_image_file(bad / name), Geometry(16, 3, 280))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://example.com/a.png", r"expected a data:image/\.\.\.;base64, URL"),
        ("data:image/png;base64,@@@", r"the data: URL is not valid base64"),
    ],
)
def test_bad_data_urls_are_one_line(url, message):
    with pytest.raises(GemmaChatError, match=message):
        image_from_data_url(url, "image 1")


def test_a_data_url_reads_as_its_file():
    data = picture(24, 16)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert image_from_data_url(url).digest == ImageBytes(data, "x").digest
