"""Session-wide tiny checkpoints, written once by HF transformers and loaded through `load`."""

from pathlib import Path

import numpy as np
import pytest

from fixtures import tiny_checkpoints as tiny


def generated_ids(pair, prompt, **options) -> list[int]:
    """Every token id `generate` streams for `prompt`."""
    from gemma_mtp_mlx import generate

    return [t for chunk in generate(pair, prompt, **options) for t in chunk.token_ids]


def assert_close(ours: np.ndarray, ref: np.ndarray, tol: float = 1e-4):
    """fp32 parity: max error within `tol` of the reference's scale (max(1, max|ref|)). These
    fixtures have O(10) logits and states, so this is ~1e-3 absolute; a wrong mask, position or
    weight moves values by whole units."""
    err = np.abs(ours - ref).max() / max(1.0, np.abs(ref).max())
    assert err < tol, f"relative error {err:.2e}"


@pytest.fixture(scope="session", autouse=True)
def private_cache_for_the_session(tmp_path_factory):
    """The same for what outlives a test: session and module fixtures, a server's decoder that
    writes when it goes idle between tests."""
    patch = pytest.MonkeyPatch()
    patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache-session")))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch) -> Path:
    """No test reads or writes the user's cache folder (the costs a pair learned persist there,
    engine/stored_costs.py): each test gets an empty one of its own."""
    folder = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    """targets: "e2b" | "moe" | "dense"; drafters: "<shape>-assistant" (dense head) and
    "<shape>-centroids" (centroid head)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for shape in tiny.SHAPES:
        out[shape] = tiny.make_target(root / shape, shape)
        out[f"{shape}-assistant"] = tiny.make_assistant(
            root / f"{shape}-assistant", out[shape], centroids=False
        )
        out[f"{shape}-centroids"] = tiny.make_assistant(
            root / f"{shape}-centroids", out[shape], centroids=True, hub_style_config=True
        )
    return out


@pytest.fixture(scope="session")
def pairs(ckpt):
    """Loaded (target, drafter) pairs keyed by (shape, centroids)."""
    from gemma_mtp_mlx import load

    return {
        (shape, centroids): load(
            str(ckpt[shape]), str(ckpt[f"{shape}-{'centroids' if centroids else 'assistant'}"])
        )
        for shape in tiny.SHAPES
        for centroids in (False, True)
    }


def make_echo_drafter(pair, noise: float = 0.0, seed: int = 0) -> None:
    """Turn a (hidden = target hidden) assistant into one that proposes the target's previous
    argmax again (its layers pass the target's hidden state through to a copy of the target's
    head), plus `noise` on that head. Random drafters almost never agree with a random target;
    this one agrees whenever the target repeats itself, which gives rounds with every
    acceptance length, so rollback is exercised at every depth."""
    import mlx.core as mx

    drafter, target = pair.drafter, pair.target
    h = target.args.hidden_size
    eye = mx.eye(h)
    drafter.pre_projection.weight = mx.concatenate([mx.zeros((h, h)), eye], axis=1)
    drafter.post_projection.weight = eye
    for layer in drafter.model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
        layer.layer_scalar = mx.ones((1,))
    drafter.model.norm.weight = mx.ones((h,))
    table = target.model.embed_tokens.weight
    jitter = mx.random.normal(table.shape, key=mx.random.key(seed)) * mx.abs(table).mean()
    drafter.model.embed_tokens.weight = table + noise * jitter
    if drafter.args.use_ordered_embeddings:
        head = drafter.masked_embedding
        clusters = head.token_ordering.reshape(head.num_centroids, -1)
        head.centroids.weight = drafter.model.embed_tokens.weight[clusters].mean(axis=1) * 4


@pytest.fixture(scope="session")
def echo_pairs(tmp_path_factory, ckpt):
    """Pairs keyed by (shape, centroids) whose drafters agree with the target often."""
    from gemma_mtp_mlx import load

    root = tmp_path_factory.mktemp("echo")
    out = {}
    for shape in tiny.SHAPES:
        for centroids in (False, True):
            folder = tiny.make_assistant(
                root / f"{shape}-{centroids}", ckpt[shape], centroids=centroids, hidden_size=64
            )
            pair = load(str(ckpt[shape]), str(folder))
            make_echo_drafter(pair)
            out[(shape, centroids)] = pair
    return out


@pytest.fixture(scope="session")
def published(tmp_path_factory) -> dict[str, Path]:
    """Tiny E4B- and E2B-shaped pairs as the hub has them: Google's multimodal original
    ("e4b-original") and mlx-vlm conversions ("e4b-plain", "e4b-4bit", "e4b-8bit",
    "e4b-mixed_4_8", "e2b-4bit"; assistants "e4b-assistant", "e2b-assistant" in bf16)."""
    from fixtures import mlx_vlm_checkpoints as mlx_vlm

    root = tmp_path_factory.mktemp("published")
    out, jobs = {}, []
    for shape, variants in (("e4b", ("plain", "4bit", "8bit", "mixed_4_8")), ("e2b", ("4bit",))):
        text = tiny.make_target(root / f"{shape}-text", shape)
        out[f"{shape}-original"] = mlx_vlm.make_multimodal_target(root / f"{shape}-original", text)
        assistant = tiny.make_assistant(
            root / f"{shape}-assistant-hf", text, centroids=True, hub_style_config=True
        )
        mlx_vlm.add_tokenizer(assistant, text)
        for variant in variants:
            out[f"{shape}-{variant}"] = root / f"{shape}-{variant}"
            jobs.append((out[f"{shape}-original"], out[f"{shape}-{variant}"],
                         mlx_vlm.CONVERSIONS[variant]))
        out[f"{shape}-assistant"] = root / f"{shape}-assistant"
        jobs.append((assistant, out[f"{shape}-assistant"], mlx_vlm.CONVERSIONS["assistant"]))
    mlx_vlm.convert(jobs)
    return out


@pytest.fixture(scope="session")
def seeing(ckpt, tmp_path_factory) -> dict[str, Path]:
    """Tiny multimodal targets around the `ckpt` text targets (so `ckpt["<shape>-assistant"]`
    drafts for them): "e2b" (per-layer embeddings, KV sharing; a tower with clipped linears and
    standardisation; causal over images) and "dense" (`use_bidirectional_attention: "vision"`)."""
    from fixtures import mlx_vlm_checkpoints as mlx_vlm

    root = tmp_path_factory.mktemp("seeing")
    return {
        "e2b": mlx_vlm.make_multimodal_target(
            root / "e2b", ckpt["e2b"], use_clipped_linears=True, standardize=True
        ),
        "dense": mlx_vlm.make_multimodal_target(root / "dense", ckpt["dense"], bidirectional=True),
    }


def picture(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A random RGB picture's file."""
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


# The alias rows the tiny published checkpoints stand in for, in the test hub cache.
CACHED_REPOS = {
    "mlx-community/gemma-4-e4b-it-4bit": "e4b-4bit",
    "mlx-community/gemma-4-e4b-it-8bit": "e4b-8bit",
    "google/gemma-4-E4B-it": "e4b-original",
    "mlx-community/gemma-4-E4B-it-assistant-bf16": "e4b-assistant",
    "mlx-community/gemma-4-e2b-it-4bit": "e2b-4bit",
    "mlx-community/gemma-4-E2B-it-assistant-bf16": "e2b-assistant",
    "someone/gemma-4-e4b-it-mixed_4_8": "e4b-mixed_4_8",
}


def make_hub_cache(root: Path, published: dict[str, Path], repos: dict[str, str]) -> Path:
    """A hub cache holding, for each repo, what `gemma-chat` would have downloaded."""
    from huggingface_hub.utils import filter_repo_objects

    from fixtures.hub_cache import add_to_cache
    from gemma_mtp_mlx.hub import TEXT_MODEL_FILES

    for repo, name in repos.items():
        folder = published[name]
        files = list(filter_repo_objects(
            [p.name for p in folder.iterdir()], allow_patterns=TEXT_MODEL_FILES
        ))
        add_to_cache(root, repo, folder, files=files)
    return root


@pytest.fixture(scope="session")
def hub_cache(published, tmp_path_factory) -> Path:
    return make_hub_cache(tmp_path_factory.mktemp("hub"), published, CACHED_REPOS)


@pytest.fixture
def offline_env(hub_cache, tmp_path) -> dict[str, str]:
    """Environment for a `gemma-chat` run offline on the test hub cache."""
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub_cache),
        "GEMMA_CHAT_STATE_DIR": str(tmp_path / "state"),
    }


class Clock:
    """A controlled clock: the engine's own work takes `tick` per reading, the reader's time
    between chunks is what the test adds to `now`."""

    def __init__(self, tick: float = 0.001):
        self.now, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """The decoder reads this clock instead of the machine's (time passes only as tests say);
    tracing a compiled step takes none of it unless a test says so."""
    from gemma_mtp_mlx.engine import decode, steps

    c = Clock()
    monkeypatch.setattr(decode, "clock", c)
    monkeypatch.setattr(steps, "clock", lambda: c.now)
    return c
