"""Names -> checkpoints -> models: aliases x precision, the hub cache and downloads, the memory
preflight, config and weights, quantisation, pairing checks.

`load(model, drafter="auto", precision="4bit")` accepts an alias from `aliases.ALIASES`, a hub
repo id or a local folder, for the target and for the drafter. Nothing is downloaded before
the memory preflight has passed, only the files the text model needs are downloaded, only
safetensors are read, and no code from a checkpoint is ever executed.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import hub, memory
from .aliases import ALIASES, DEFAULT_PRECISION, DEMO, DEMO_PATH, Checkpoint, checkpoint
from .errors import DownloadInterrupted, GemmaChatError
from .models.assistant import Assistant, AssistantArgs, pairing_problems
from .models.gemma4 import Model, ModelArgs, canonical_key
from .models.moe import fused_module_path
from .models.multimodal import ImageEncoder, has_vision

TARGET_TYPES = {"gemma4", "gemma4_text"}
ASSISTANT_TYPES = {"gemma4_assistant"}
# Without these a config describes no particular model (ModelArgs would fill in defaults and
# the weights would then miss hundreds of parameters).
_TARGET_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_BITS = {"4bit": 4, "8bit": 8, "bf16": None}
# The shortest --context: a system prompt, a question and an answer's room (MIN_ANSWER_ROOM).
MIN_CONTEXT = 1024


@dataclass
class Pair:
    target: Model
    drafter: Assistant | None
    tokenizer: object  # mlx_lm TokenizerWrapper
    target_path: Path
    drafter_path: Path | None = None
    # Why the automatic drafter is missing (e.g. not in the cache, offline): plain decoding.
    drafter_note: str | None = None
    context: int | None = None  # the context sessions on this pair get (None: the model's)
    vision: object = None  # images.vision.Vision when the checkpoint carries a vision tower
    compile: bool = True  # decode with compiled steps (engine/steps.py); False: eager

    @property
    def context_limit(self) -> int:
        return self.context or self.target.args.max_position_embeddings

    @property
    def name(self) -> str:
        return self.target_path.name


def load(
    model: str, drafter: str | None = "auto", *, precision: str = DEFAULT_PRECISION,
    quantize: int | None = None, context: int | None = None, compile: bool = True,
) -> Pair:
    """Load a target (and its drafter) by alias, hub repo id or local folder.

    `precision` picks among an alias's published conversions (4bit, 8bit, bf16) and is ignored
    for repo ids and folders, which load as they are stored. `drafter="auto"` takes the
    alias's assistant, an `assistant/` folder (or a sibling `<name>-assistant` folder) next to
    a local target, or `<repo>-assistant` on the hub; None loads no drafter. `context` caps
    the tokens a conversation may hold (default: the model's whole context), and with it the
    KV cache. Refuses, before downloading anything, a pair that would not fit in 75 % of this
    machine's memory at that context. `compile=False` decodes with eager steps (the graph
    built in Python at every step) instead of compiled ones.
    """
    pair = load_plan(plan(model, drafter, precision=precision), quantize=quantize,
                     limit=memory.default_limit(), context=context)
    pair.compile = compile
    return pair


# -- names -> sources ----------------------------------------------------------------------------
@dataclass
class Source:
    """One checkpoint: a hub repo (`repo`), a folder on disk (`path`), or a repo that is
    already complete in the cache (both)."""

    repo: str | None = None
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.repo or str(self.path)


@dataclass
class Plan:
    """What `load` will read, resolved without downloading anything."""

    model: str
    target: Source
    drafter: Source | None
    row: Checkpoint | None = None  # the alias row, when `model` named one
    drafter_optional: bool = False  # an automatic drafter: missing means plain decoding


def is_alias(name: str) -> bool:
    return name.lower() in ALIASES and not Path(name).expanduser().joinpath("config.json").is_file()


def plan(model: str, drafter: str | None = "auto", *, precision: str | None = None) -> Plan:
    precision = precision or DEFAULT_PRECISION
    row = checkpoint(model, precision) if is_alias(model) else None
    target = Source(row.target, hub.cached_snapshot(row.target)) if row else source(model)
    out = Plan(model, target, None, row)
    if drafter is None:
        return out
    if drafter != "auto":
        out.drafter = source(drafter)
    elif row is not None:
        if row.assistant:
            out.drafter = Source(row.assistant, hub.cached_snapshot(row.assistant))
            out.drafter_optional = True
    elif target.repo is None:
        for candidate in (target.path / "assistant", target.path.with_name(target.path.name + "-assistant")):
            if (candidate / "config.json").is_file():
                out.drafter = Source(path=candidate)
                break
    else:
        guess = target.repo + "-assistant"
        out.drafter = Source(guess, hub.cached_snapshot(guess))
        out.drafter_optional = True
    return out


def source(name: str) -> Source:
    """A local folder as is; the demo pair; a repo id (or an alias's default precision) through
    the Hugging Face cache. A bare alias (`demo`, `e4b`) means the alias even where the working
    folder happens to hold a folder of that name that is not a model; `./demo` always means
    the folder."""
    path = Path(name).expanduser()
    alias = name.lower() in ALIASES or name.lower() == DEMO
    explicit = name.startswith((".", "/", "~"))
    if path.is_dir() and (not alias or explicit or (path / "config.json").is_file()):
        return Source(path=path)
    if name.lower() == DEMO:
        if not (DEMO_PATH / "config.json").is_file():
            raise GemmaChatError("the demo pair is not in this installation of gemma-chat")
        return Source(path=DEMO_PATH)
    repo = checkpoint(name, DEFAULT_PRECISION).target if name.lower() in ALIASES else name
    if explicit or repo.count("/") != 1:
        known = ", ".join([*ALIASES, DEMO])
        raise GemmaChatError(
            f"unknown model '{name}': not a folder, not an alias ({known}), not a hub repo id"
        )
    return Source(repo, hub.cached_snapshot(repo))


def resolve(name: str) -> Path:
    """The folder `name` names, downloaded when it is a repo not in the cache yet."""
    found = source(name)
    return found.path or hub.download(found.repo)


# -- the memory preflight --------------------------------------------------------------------------
def estimate(
    p: Plan, *, quantize: int | None = None, context: int | None = None
) -> memory.Estimate | None:
    """Memory for `p` at `context` tokens (default: the model's whole context) from what is
    known before downloading: the files where they are on disk, the config otherwise (an
    alias's from models/configs.py, a repo's config.json from the hub). None when the target's
    config cannot be had."""
    found = _lazy_estimate(p, quantize, context)
    return found[2] if found else None


def _lazy_estimate(p: Plan, quantize: int | None, context: int | None):
    """(target, drafter, estimate at `context`) on lazily built models, or None without a
    target config."""
    target = _lazy_target(p, quantize)
    if target is None:
        return None
    try:
        drafter = _lazy_drafter(p, target)
    except GemmaChatError:
        drafter = None  # one that does not pair is refused at load, with the reason
    needs = memory.estimate(target, drafter, context=check_context(target, context, p.model))
    return target, drafter, needs


def check_context(target: Model, context: int | None, name: str) -> int:
    """The context a session on `target` gets: `context` when given, which must not exceed
    the model's own."""
    most = target.args.max_position_embeddings
    if context is not None and context > most:
        raise GemmaChatError(f"--context {context:,}: {name} holds at most {most:,} tokens")
    return context or most


def preflight(
    p: Plan, limit: memory.Limit | None, *, quantize: int | None = None,
    context: int | None = None,
) -> None:
    if limit is None and context is None:
        return
    found = _lazy_estimate(p, quantize, context)
    if found is None:
        return
    target, drafter, needs = found
    if limit is None or needs.total <= limit.bytes:
        return
    from .catalog import largest_fitting

    what = f"{p.row.alias} at {p.row.precision}" if p.row else p.model
    shorter = memory.largest_context(target, drafter, limit.bytes)
    best = largest_fitting(limit)
    advice = f"the largest that fits: --model {best.alias} --precision {best.precision}" if best else "no published Gemma 4 fits"
    if shorter is not None:
        advice = f"--context {shorter:,} fits (a shorter conversation); or {advice}"
    raise GemmaChatError(
        f"{what} needs about {needs.describe()}, over the {memory.format_bytes(limit.bytes)} "
        f"limit ({limit.why}); {advice}"
    )


def _lazy_target(p: Plan, quantize: int | None) -> Model | None:
    if p.target.path is not None:
        return build_target(p.target.path, quantize=quantize)
    if p.row is not None:
        from .models.configs import TARGETS

        config = dict(TARGETS[p.row.alias])
        bits = _BITS[p.row.precision]
        if bits:
            config["quantization"] = {"group_size": 64, "bits": bits}
        return model_from_config(config, quantize=quantize)
    config = hub_config(p.target.repo)
    if config is None:
        return None
    return model_from_config(config, quantize=quantize, name=f"{p.target.repo}/config.json")


def _lazy_drafter(p: Plan, target: Model) -> Assistant | None:
    if p.drafter is None:
        return None
    if p.drafter.path is not None:
        return build_drafter(p.drafter.path, target)
    if p.row is not None:
        from .models.configs import ASSISTANTS

        return assistant_from_config(ASSISTANTS[p.row.alias])
    config = hub_config(p.drafter.repo)
    return assistant_from_config(config) if config else None


def hub_config(repo: str) -> dict | None:
    """A repo's config.json (a few KB, kept in the cache) when the hub or the cache has it."""
    from huggingface_hub import hf_hub_download

    try:
        file = hf_hub_download(repo, "config.json", cache_dir=hub.cache_dir(),
                               local_files_only=hub.offline())
        config = json.loads(Path(file).read_text())
    except Exception:  # unreachable, gated, missing, broken: no estimate, the download will say why
        return None
    return config if isinstance(config, dict) else None


# -- sources -> folders ----------------------------------------------------------------------------
def fetch(p: Plan, *, console=None) -> tuple[Path, Path | None, str | None]:
    """(target folder, drafter folder or None, why an automatic drafter is missing)."""
    missing = [s for s in (p.target, p.drafter) if s is not None and s.path is None]
    if missing and console is not None and not hub.offline():
        _announce(missing, console)
    target = p.target.path or _download(p.target.repo, console)
    if p.drafter is None:
        return target, None, None
    if p.drafter.path is not None:
        return target, p.drafter.path, None
    try:
        return target, _download(p.drafter.repo, console), None
    except GemmaChatError as e:
        if not p.drafter_optional:
            raise
        return target, None, str(e)


def _announce(sources: list[Source], console) -> None:
    sizes = [hub.download_size(s.repo) for s in sources]
    known = [s.missing for s in sizes if s is not None]
    size = memory.format_bytes(sum(known)) if len(known) == len(sizes) else "size unknown"
    names = " and ".join(s.repo for s in sources)
    console.print(f"downloading {names} ({size}) to {hub.cache_dir()}", style="dim")


def _download(repo: str, console) -> Path:
    size = hub.download_size(repo) if console is not None and console.is_terminal else None
    try:
        return hub.download(repo, console=console, expected=size.missing if size else None)
    except KeyboardInterrupt:
        raise DownloadInterrupted(
            f"interrupted: the download of {repo} stopped; the files it completed stay in the "
            "cache and the same command fetches the rest"
        ) from None


def load_plan(
    p: Plan, *, quantize: int | None = None, limit: memory.Limit | None = None, console=None,
    context: int | None = None,
) -> Pair:
    """Check memory, download what is missing, check memory again on the real files, load."""
    if quantize not in (None, 4, 8):
        raise GemmaChatError("quantize must be 4 or 8 bits")
    if quantize and p.row and _BITS[p.row.precision]:
        raise GemmaChatError(
            f"{p.row.alias} at {p.row.precision} is already quantised: drop --quantize, or "
            f"quantise the originals with --precision bf16 --quantize {quantize}"
        )
    if context is not None and context < MIN_CONTEXT:
        raise GemmaChatError(f"--context {context}: at least {MIN_CONTEXT} tokens")
    preflight(p, limit, quantize=quantize, context=context)
    target_path, drafter_path, note = fetch(p, console=console)
    resolved = Plan(p.model, Source(p.target.repo, target_path),
                    Source(p.drafter.repo, drafter_path) if drafter_path else None, p.row)
    preflight(resolved, limit, quantize=quantize, context=context)
    target = load_target(target_path, quantize=quantize)
    tokenizer = load_tokenizer(target_path)
    assistant = load_drafter(drafter_path, target) if drafter_path else None
    return Pair(target, assistant, tokenizer, target_path, drafter_path, drafter_note=note,
                context=context, vision=vision_for(target_path, limit))


def vision_for(path: Path, limit: memory.Limit | None = None):
    """What the checkpoint in `path` needs to take pictures (no weights read), or None when it
    has no vision tower. `limit`: the memory the tower must fit in beside what is loaded."""
    from .images.vision import Vision

    config = read_config(path)
    return Vision(path, config, limit=limit) if has_vision(config) else None


def load_image_encoder(path: Path, limit: memory.Limit | None = None) -> ImageEncoder:
    """The vision tower and embedder of the checkpoint in `path`, quantised as stored; refused
    in one line when its weights and what MLX holds already would exceed `limit`."""
    config = read_config(path)
    encoder = ImageEncoder.from_config(config)
    weights = encoder.sanitize(read_weights(path))
    quant = _quantization(config)
    if quant:
        # As for the text model: a module is quantised iff the checkpoint has its scales, with
        # the bits and group size of its own entry when the config gives it one.
        own = {k.removeprefix("model."): v for k, v in quant.items() if isinstance(v, dict)}
        nn.quantize(
            encoder,
            group_size=quant.get("group_size", 64),
            bits=quant["bits"],
            mode=quant.get("mode", "affine"),
            class_predicate=lambda p, m: own.get(p, f"{p}.scales" in weights),
        )
    try:
        encoder.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise GemmaChatError(f"the vision weights in {path} do not fit its config.json: {_short(e)}") from None
    needs = memory.parameter_bytes(encoder)
    if limit is not None and mx.get_active_memory() + needs > limit.bytes:
        raise GemmaChatError(
            f"the vision tower needs {memory.format_bytes(needs)} more, over the "
            f"{memory.format_bytes(limit.bytes)} limit ({limit.why}) with the model loaded"
        )
    mx.eval(every_array(encoder))
    return encoder


# -- folders -> models ---------------------------------------------------------------------------
def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise GemmaChatError(f"{path} has no config.json: not a model folder")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GemmaChatError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise GemmaChatError(
            f"{file} is not a model config: a JSON object expected, found {type(config).__name__}"
        )
    return config


def read_weights(path: Path) -> dict[str, mx.array]:
    """Every tensor in the folder's safetensors, mapped lazily (nothing is read until used)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
        hint = f" (found {', '.join(other)}: only safetensors are read)" if other else ""
        raise GemmaChatError(f"no .safetensors weights in {path}{hint}")
    weights = {}
    for file in files:
        try:
            weights.update(mx.load(str(file)))
        except Exception as e:  # MLX raises plain exceptions for truncated or corrupt files
            raise GemmaChatError(f"cannot read {file.name}: {e}") from None
    return weights


def _quantization(config: dict) -> dict | None:
    quant = config.get("quantization") or config.get("quantization_config")
    return quant if isinstance(quant, dict) and "bits" in quant else None


def quantize_as_stored(model: nn.Module, quant: dict, is_quantized) -> None:
    """Turn `model`'s layers into the quantised layers a checkpoint stores: the default bits and
    group size of `quant`, its per-module overrides (keyed by the checkpoint's module path;
    e.g. an 8-bit router; mlx-lm's split expert names mapped onto our fused
    `experts.gate_up_proj`), for the modules `is_quantized(path, module)` picks."""
    overrides = {}
    for key, value in quant.items():
        module = canonical_key(key) if isinstance(value, dict) else None
        if module is None:
            continue
        module = fused_module_path(module)
        if overrides.setdefault(module, value) != value:
            raise GemmaChatError(f"{module}: gate_proj and up_proj are quantised differently")

    def predicate(p, m):
        if p in overrides:
            return overrides[p]
        return is_quantized(p, m)

    nn.quantize(
        model,
        group_size=quant.get("group_size", 64),
        bits=quant["bits"],
        mode=quant.get("mode", "affine"),
        class_predicate=predicate,
    )


def _assign_weights(model: nn.Module, weights: dict, config: dict, path: Path, quantize: int | None):
    """Weights into `model`, as lazy arrays (the caller evaluates them, or only counts them)."""
    quant = _quantization(config)
    if quant:
        # A module of a quantised checkpoint is quantised iff the checkpoint has its scales.
        quantize_as_stored(
            model, quant, lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in weights
        )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise GemmaChatError(f"weights in {path} do not fit its config.json: {_short(e)}") from None
    if quantize:
        if quant:
            raise GemmaChatError(f"{path} is already quantised; drop --quantize")
        nn.quantize(model, group_size=64, bits=quantize, class_predicate=Model.quant_predicate)


def _short(error: ValueError) -> str:
    """mlx lists every missing parameter, one a line; one line with a few names says enough."""
    text = " ".join(str(error).split())
    head, _, names = text.partition(": ")
    listed = [n.strip(" ,.") for n in names.split(",")] if names else []
    if len(listed) <= 3:
        return text
    return f"{head}: {', '.join(listed[:3])} and {len(listed) - 3} more"


def _target_args(config: dict, file: Path | str) -> ModelArgs:
    kind = config.get("model_type")
    if kind in ASSISTANT_TYPES:
        raise GemmaChatError(f"{file} is an MTP assistant, not a target model (use it as --drafter)")
    if kind not in TARGET_TYPES:
        found = f"a '{kind}' model" if kind else "has no model_type"
        raise GemmaChatError(f"{file} {'is ' if kind else ''}{found}, not Gemma 4 (model_type gemma4)")
    text = config.get("text_config") or config
    if not isinstance(text, dict):
        raise GemmaChatError(f"{file}: text_config is not an object")
    absent = [name for name in _TARGET_FIELDS if name not in text]
    if absent:
        raise GemmaChatError(f"{file} lacks {', '.join(absent)}: not a complete Gemma 4 config")
    try:
        return ModelArgs.from_config(config)
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise GemmaChatError(f"{file}: {e}") from None


def model_from_config(config: dict, *, quantize: int | None = None, name: str = "config") -> Model:
    """A lazily built target as a checkpoint with `config` would load (bf16 unless the config
    says otherwise), for counting bytes before the files are here."""
    model = Model(_target_args(config, name))
    model.set_dtype(_config_dtype(config))
    quant = _quantization(config)
    if quant:
        quantize_as_stored(model, quant, Model.quant_predicate)
    elif quantize:
        nn.quantize(model, group_size=64, bits=quantize, class_predicate=Model.quant_predicate)
    return model


def assistant_from_config(config: dict) -> Assistant | None:
    if config.get("model_type") not in ASSISTANT_TYPES:
        return None
    drafter = Assistant(AssistantArgs.from_config(config))
    drafter.set_dtype(_config_dtype(config))
    return drafter


def _config_dtype(config: dict) -> mx.Dtype:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    name = config.get("torch_dtype") or config.get("dtype") or text.get("dtype") or "bfloat16"
    return {"float32": mx.float32, "float16": mx.float16}.get(str(name), mx.bfloat16)


def build_target(path: Path, *, quantize: int | None = None) -> Model:
    """The target in `path` with its weights assigned but not read (MLX is lazy)."""
    config = read_config(path)
    model = Model(_target_args(config, path / "config.json"))
    weights = model.sanitize(read_weights(path))
    _assign_weights(model, weights, config, path, quantize)
    return model


def load_target(path: Path, *, quantize: int | None = None) -> Model:
    model = build_target(path, quantize=quantize)
    mx.eval(every_array(model))
    return model


def every_array(module) -> list[mx.array]:
    """Every array a model holds: its parameters and private ones (RoPE frequencies are
    computed lazily at construction). Evaluating them all at load leaves nothing lazy behind:
    MLX binds a lazy array to the streams of the thread that built it, so a model with lazy
    arrays could not run in another thread (the server decodes in one of its own)."""
    arrays, seen = [], set()

    def walk(obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, mx.array):
            arrays.append(obj)
        elif isinstance(obj, dict | list | tuple):
            for value in obj.values() if isinstance(obj, dict) else obj:
                walk(value)
        if hasattr(obj, "__dict__"):  # an MLX Module is a dict with private attributes besides
            walk(vars(obj))

    walk(module)
    return arrays


def build_drafter(path: Path, target: Model) -> Assistant:
    """The drafter in `path`, checked against `target`, weights assigned but not read."""
    config = read_config(path)
    if config.get("model_type") not in ASSISTANT_TYPES:
        raise GemmaChatError(
            f"{path} is a '{config.get('model_type')}' model, not a Gemma 4 MTP assistant"
        )
    args = AssistantArgs.from_config(config)
    problems = pairing_problems(target.args, args)
    if problems:
        raise GemmaChatError(f"drafter {path.name} does not fit the target: {'; '.join(problems)}")
    drafter = Assistant(args)
    _assign_weights(drafter, drafter.sanitize(read_weights(path)), config, path, None)
    return drafter


def load_drafter(path: Path, target: Model) -> Assistant:
    drafter = build_drafter(path, target)
    mx.eval(every_array(drafter))
    return drafter


NO_TOKENIZER_LIMIT = int(1e30)  # transformers' own "no limit" (VERY_LARGE_INTEGER)


def load_tokenizer(path: Path):
    from mlx_lm.tokenizer_utils import load as load_wrapper

    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise GemmaChatError(f"{path} has no tokenizer (tokenizer.json)")
    eos = _eos_ids(path)
    try:
        tokenizer = load_wrapper(path, eos_token_ids=eos)
    except Exception as e:  # tokenizers raise assorted types for a broken file
        raise GemmaChatError(f"cannot load the tokenizer in {path}: {e}") from None
    # The context is ours to bound (--context, the model's): the tokenizer's own length has no
    # say, and transformers would warn about every text longer than it.
    tokenizer.model_max_length = NO_TOKENIZER_LIMIT
    return tokenizer


def _eos_ids(path: Path) -> list[int] | None:
    """End-of-sequence ids: generation_config.json wins over config.json (as in HF)."""
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.is_file():
            try:
                data = json.loads(file.read_text())
            except json.JSONDecodeError:
                continue
            if not isinstance(data, dict):
                continue
            eos = data.get("eos_token_id") or (data.get("text_config") or {}).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return None
