"""The vision tower, the multimodal embedder and prompts with pictures give transformers'
numbers: soft tokens, and the logits of every position with one and with two pictures
(including the bidirectional mask over a picture's soft tokens on sliding layers, and a
picture that a chunked prefill would cut); mlx-vlm's 4-bit conversion loads and gives mlx-vlm's
logits."""

import io

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from fixtures import mlx_vlm_checkpoints as mlx_vlm
from gemma_mtp_mlx import load
from gemma_mtp_mlx.engine import context as context_module
from gemma_mtp_mlx.engine.context import Context, chunk_end
from gemma_mtp_mlx.images.files import ImageBytes
from gemma_mtp_mlx.images.prompt import ImagePrompt, expand_images
from tests.conftest import assert_close, picture

BUDGET = 70  # soft tokens at most: 8 x 8 pixels make one with the tiny towers' 4 x 4 patches
SIZES = [(40, 24), (20, 50)]  # 60 and 65 soft tokens


@pytest.fixture(scope="module")
def seen(seeing):
    """Loaded pairs (no drafter) keyed like `seeing`, at the test budget."""
    out = {}
    for name, folder in seeing.items():
        pair = load(str(folder), drafter=None)
        pair.vision.set_budget(BUDGET)
        out[name] = pair
    return out


def files(n: int = 2) -> list[ImageBytes]:
    return [ImageBytes(picture(w, h, seed=i), f"{w}x{h}.png") for i, (w, h) in enumerate(SIZES[:n])]


def pil(image: ImageBytes) -> Image.Image:
    return Image.open(io.BytesIO(image.data))


def image_prompt(pair, images: list[ImageBytes], text: str = "What is in the picture?") -> ImagePrompt:
    vision = pair.vision
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    ids = pair.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True,
        enable_thinking=False,
    )
    return expand_images(list(ids), [vision.prepare(i) for i in images], vision.marks, vision.encode)


def all_logits(pair, prompt) -> np.ndarray:
    """Every position's logits, the prompt in one forward through the prefill's own inputs."""
    ctx = Context(pair.target)
    ids, cache, extra = ctx.model_inputs(prompt, 0, len(prompt), {})
    return np.array(pair.target(ids, cache, **extra)[0])


@pytest.mark.parametrize("name", ["e2b", "dense"])
def test_soft_tokens_match_transformers(seeing, seen, name):
    images = files()
    ref = mlx_vlm.reference_image_features(seeing[name], [pil(i) for i in images], BUDGET)
    for image, expected in zip(images, ref):
        ours = np.array(seen[name].vision.encode(seen[name].vision.prepare(image)))
        assert ours.shape == expected.shape == (seen[name].vision.prepare(image).tokens, 64)
        assert_close(ours, expected)


@pytest.mark.parametrize("name", ["e2b", "dense"])
@pytest.mark.parametrize("n", [1, 2])
def test_logits_with_pictures_match_transformers(seeing, seen, name, n):
    images = files(n)
    prompt = image_prompt(seen[name], images)
    ref = mlx_vlm.reference_multimodal_logits(seeing[name], prompt, [pil(i) for i in images], BUDGET)
    assert_close(all_logits(seen[name], prompt), ref)


@pytest.mark.parametrize("chunk", [128, 12, 5])
def test_a_picture_the_chunks_would_cut_keeps_its_both_ways_attention(seeing, seen, chunk, monkeypatch):
    """With PREFILL_CHUNK 128 the second picture (soft tokens 75..139) straddles the first
    boundary; with 12 and 5 both do. Every chunk ends outside a picture, and the prefill gives
    transformers' last logits, which the causal mask alone would not."""
    monkeypatch.setattr(context_module, "PREFILL_CHUNK", chunk)
    pair, images = seen["dense"], files()
    prompt = image_prompt(pair, images)
    ref = mlx_vlm.reference_multimodal_logits(seeing["dense"], prompt, [pil(i) for i in images], BUDGET)
    i, ends = 0, []
    while i < len(prompt):
        i = chunk_end(i, len(prompt), prompt.blocks())
        ends.append(i)
    assert all(not s < e < s + n for e in ends for s, n, _ in prompt.blocks())
    assert len(ends) >= 2
    logits, _, ran = Context(pair.target).prefill(prompt)
    assert ran == len(prompt)
    assert_close(np.array(logits[0, 0]), ref[-1])
    monkeypatch.setattr(pair.target.args, "use_bidirectional_attention", None)
    causal, _, _ = Context(pair.target).prefill(prompt)
    assert np.abs(np.array(causal[0, 0]) - ref[-1]).max() > 0.1


def test_mlx_vlm_4bit_conversion_sees_as_mlx_vlm_does(published):
    """mlx-vlm keeps the tower unquantised: its soft tokens are transformers' (on Google's
    original), and the logits with a picture are mlx-vlm's own on the same files."""
    from mlx_vlm.utils import load_model

    pair = load(str(published["e2b-4bit"]), drafter=None)
    assert pair.vision.budget == 280  # the processor_config.json mlx-vlm writes
    pair.vision.set_budget(BUDGET)
    image = files(1)[0]
    ref = mlx_vlm.reference_image_features(published["e2b-original"], [pil(image)], BUDGET)[0]
    prepared = pair.vision.prepare(image)
    assert_close(np.array(pair.vision.encode(prepared)), ref)
    prompt = image_prompt(pair, [image])
    patches, positions = prepared.patches()
    theirs = load_model(published["e2b-4bit"])(
        mx.array([list(prompt)]), pixel_values=mx.array(patches)[None],
        image_position_ids=mx.array(positions)[None],
    ).logits
    np.testing.assert_allclose(all_logits(pair, prompt), np.array(theirs[0]), atol=1e-3, rtol=0)


def test_pictures_expand_as_transformers_processor_expands_them(seen):
    """transformers' processor replaces each image token of the rendered text by
    begin-of-image, n soft tokens, end-of-image, then tokenizes."""
    pair = seen["e2b"]
    images = files()
    prompt = image_prompt(pair, images, text="Compare them.")
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}]
    text = pair.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False,
        enable_thinking=False,
    )
    pieces = text.split("<|image|>")
    counts = [pair.vision.prepare(i).tokens for i in images]
    expanded = pieces[0] + "".join(
        f"<|image>{'<|image|>' * n}<image|>" + rest for n, rest in zip(counts, pieces[1:])
    )
    assert list(prompt) == pair.tokenizer.encode(expanded, add_special_tokens=False)
    assert [n for _, n, _ in prompt.blocks()] == counts == [60, 65]


def test_the_cache_knows_which_picture_it_holds(seen):
    """The next prompt reuses what the context holds up to a picture that differs, even one
    with the same token count; after the same picture, only the new turn is prefilled."""
    pair = seen["dense"]
    first, same_size = files(1)[0], ImageBytes(picture(40, 24, seed=7), "other.png")
    ctx = Context(pair.target, slack=128)  # the rings roll back over the whole prompt
    prompt = image_prompt(pair, [first])
    ctx.prefill(prompt)
    longer = prompt + [40, 77, 301]
    assert ctx.prefill(longer)[2] == 3
    other = image_prompt(pair, [same_size]) + [40, 77, 301]
    assert list(other) == list(longer)
    start = other.blocks()[0][0]
    logits, _, ran = ctx.prefill(other)
    assert ran == len(other) - start
    fresh, _, _ = Context(pair.target).prefill(other)
    np.testing.assert_allclose(np.array(logits), np.array(fresh), atol=1e-5)


def test_text_chats_never_read_the_tower_and_text_checkpoints_refuse_pictures(seeing, ckpt):
    from gemma_mtp_mlx import generate
    from gemma_mtp_mlx.errors import GemmaChatError

    pair = load(str(seeing["e2b"]), drafter=None)
    list(generate(pair, "Hello there", max_tokens=3))
    assert not pair.vision.loaded
    text_only = load(str(ckpt["e2b"]), drafter=None)
    assert text_only.vision is None
    message = [{"role": "user", "content": [{"type": "image", "path": "x.png"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(GemmaChatError, match="has no vision tower: it cannot read images"):
        list(generate(text_only, message, max_tokens=3))


@pytest.mark.parametrize("name", ["e2b", "dense"])
def test_mtp_after_the_picture_is_plain_decoding(seeing, ckpt, name, tmp_path, clock):
    """The drafter reads the target's K/V over the pictures like any other positions: greedy
    tokens with MTP are the plain ones, with drafts accepted (an echo drafter). The controlled
    clock keeps the policy's measurements, and so where this answer drafts, the same on every
    machine."""
    from fixtures import tiny_checkpoints as tiny
    from gemma_mtp_mlx import generate
    from tests.conftest import generated_ids, make_echo_drafter

    drafter = tiny.make_assistant(tmp_path / "assistant", ckpt[name], centroids=False, hidden_size=64)
    pair = load(str(seeing[name]), str(drafter))
    pair.vision.set_budget(BUDGET)
    make_echo_drafter(pair)
    paths = []
    for image in files():
        paths.append(tmp_path / image.name)
        paths[-1].write_bytes(image.data)
    message = [{"role": "user", "content": [
        {"type": "text", "text": "Which is larger?"},  # pictures go first whatever the order
        *({"type": "image", "path": str(p)} for p in paths),
    ]}]
    plain = generated_ids(pair, message, max_tokens=40, mtp=False)
    # A first answer measures this pair's plain step after its first rounds, right where this
    # answer's repeated tokens (the echo drafter's hits) are; the second drafts throughout.
    generated_ids(pair, message, max_tokens=40, draft_tokens=3)
    chunks = list(generate(pair, message, max_tokens=40, draft_tokens=3))
    assert [t for c in chunks for t in c.token_ids] == plain
    assert chunks[-1].stats.accepted > 0 and chunks[-1].stats.prompt_tokens == 168
    if name == "dense":  # a batch: the row with the pictures decodes beside a text row
        from gemma_mtp_mlx.engine.batch import generate_batch

        text = generated_ids(pair, "Which is larger?", max_tokens=40, mtp=False)
        rows = dict(generate_batch(pair, [message, "Which is larger?"], max_tokens=40, draft_tokens=3))
        assert [rows[0].token_ids, rows[1].token_ids] == [plain, text]


def test_the_tower_loads_only_where_it_fits(seeing):
    from gemma_mtp_mlx import memory
    from gemma_mtp_mlx.errors import GemmaChatError

    pair = load(str(seeing["e2b"]), drafter=None)
    pair.vision.limit = memory.Limit(mx.get_active_memory() + 100, "a test")
    image = pair.vision.prepare(files(1)[0])
    with pytest.raises(GemmaChatError, match=r"^the vision tower needs .+ more, over the .+ limit \(a test\) with the model loaded$"):
        pair.vision.encode(image)
    assert not pair.vision.loaded


def test_a_quantised_tower_loads_as_stored(published, tmp_path):
    """A conversion that quantises the tower (scales beside its linears, their bits and group
    in the config's per-module entries) loads those modules quantised; its soft tokens stay
    within 8-bit rounding of the unquantised tower's."""
    import json
    import shutil

    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from gemma_mtp_mlx.models.multimodal import ImageEncoder

    folder = shutil.copytree(published["e2b-4bit"], tmp_path / "quantised-tower")
    config = json.loads((folder / "config.json").read_text())
    weights = dict(mx.load(str(folder / "model.safetensors")))
    encoder = ImageEncoder.from_config(config)
    encoder.load_weights(list(encoder.sanitize(weights).items()))
    quantised = []

    def pick(path, module):
        if isinstance(module, nn.Linear) and module.weight.shape[-1] % 32 == 0:
            quantised.append(path)
            return True
        return False

    nn.quantize(encoder, group_size=32, bits=8, class_predicate=pick)
    text = {k: v for k, v in weights.items() if not k.startswith(("vision_tower.", "embed_vision."))}
    mx.save_safetensors(str(folder / "model.safetensors"), text | dict(tree_flatten(encoder.parameters())))
    config["quantization"].update({p: {"group_size": 32, "bits": 8} for p in quantised})
    (folder / "config.json").write_text(json.dumps(config))

    image = files(1)[0]
    pair, plain = load(str(folder), drafter=None), load(str(published["e2b-4bit"]), drafter=None)
    for p in (pair, plain):
        p.vision.set_budget(BUDGET)
    ours = np.array(pair.vision.encode(pair.vision.prepare(image)))
    assert isinstance(pair.vision.encoder().vision_tower.encoder.layers[0].mlp.down_proj.linear, nn.QuantizedLinear)
    assert len(quantised) == 2 * 7 + 1  # every encoder linear and the embedder; not the patch input (48)
    ref = np.array(plain.vision.encode(plain.vision.prepare(image)))
    assert 0 < np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()
