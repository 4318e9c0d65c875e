"""Names -> checkpoints: aliases, hub downloads, config, weights, quantisation, pairing checks.

`load(model, drafter="auto")` accepts an alias from `aliases.ALIASES`, a hub repo id or a
local folder, for the target and for the drafter. Only safetensors are read and no code from a
checkpoint is ever executed.
"""

import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .aliases import ALIASES, DEMO, DEMO_PATH
from .errors import GemmaChatError
from .models.assistant import Assistant, AssistantArgs, pairing_problems
from .models.gemma4 import Model, ModelArgs, canonical_key
from .models.moe import fused_module_path

TARGET_TYPES = {"gemma4", "gemma4_text"}
ASSISTANT_TYPES = {"gemma4_assistant"}
_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


@dataclass
class Pair:
    target: Model
    drafter: Assistant | None
    tokenizer: object  # mlx_lm TokenizerWrapper
    target_path: Path
    drafter_path: Path | None = None

    @property
    def name(self) -> str:
        return self.target_path.name


def load(model: str, drafter: str | None = "auto", *, quantize: int | None = None) -> Pair:
    """Load a target (and its drafter) by alias, hub repo id or local folder.

    `drafter="auto"` takes the alias's assistant, or an `assistant/` folder (or a sibling
    `<name>-assistant` folder) next to a local target; None loads no drafter.
    """
    target_path = resolve(model)
    target = load_target(target_path, quantize=quantize)
    tokenizer = load_tokenizer(target_path)
    drafter_path = _drafter_path(model, target_path, drafter)
    assistant = load_drafter(drafter_path, target) if drafter_path else None
    return Pair(target, assistant, tokenizer, target_path, drafter_path)


# -- names -> folders --------------------------------------------------------------------------
def resolve(name: str) -> Path:
    """A local folder as is; an alias or a repo id through the Hugging Face cache. A bare alias
    (`demo`, `e4b`) means the alias even where the working folder happens to hold a folder of
    that name that is not a model; `./demo` always means the folder."""
    path = Path(name).expanduser()
    alias = name.lower() in ALIASES or name.lower() == DEMO
    explicit = name.startswith((".", "/", "~"))
    if path.is_dir() and (not alias or explicit or (path / "config.json").is_file()):
        return path
    if name.lower() == DEMO:
        if not (DEMO_PATH / "config.json").is_file():
            raise GemmaChatError("the demo pair is not in this installation of gemma-chat")
        return DEMO_PATH
    repo = ALIASES[name.lower()].target if name.lower() in ALIASES else name
    if name.startswith((".", "/", "~")) or repo.count("/") != 1:
        known = ", ".join([*ALIASES, DEMO])
        raise GemmaChatError(
            f"unknown model '{name}': not a folder, not an alias ({known}), not a hub repo id"
        )
    return download(repo)


def download(repo: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo, allow_patterns=_FILES, tqdm_class=_progress_class()))
    except GatedRepoError:
        raise GemmaChatError(
            f"{repo} is gated: accept its licence on huggingface.co and run `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise GemmaChatError(f"{repo} was not found on the Hugging Face hub") from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "offline mode (HF_HUB_OFFLINE) is on" if offline else "the hub could not be reached"
        raise GemmaChatError(f"{repo} is not in the local cache and {why}") from None
    except OSError as e:
        raise GemmaChatError(f"could not download {repo}: {e}") from None


def _progress_class():
    """A Rich progress bar for downloads when stderr is a terminal; hub defaults otherwise."""
    if not sys.stderr.isatty():
        return None
    from tqdm import TqdmExperimentalWarning
    from tqdm.rich import tqdm

    warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)
    return tqdm


def _drafter_path(model: str, target_path: Path, drafter: str | None) -> Path | None:
    if drafter is None:
        return None
    if drafter != "auto":
        return resolve(drafter)
    if model.lower() in ALIASES:
        return resolve(ALIASES[model.lower()].assistant)
    for candidate in (target_path / "assistant", target_path.with_name(target_path.name + "-assistant")):
        if (candidate / "config.json").is_file():
            return candidate
    if "/" in model and not Path(model).expanduser().exists():
        try:
            return download(model + "-assistant")
        except GemmaChatError:
            return None
    return None


# -- folders -> models -------------------------------------------------------------------------
def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise GemmaChatError(f"{path} has no config.json: not a model folder")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GemmaChatError(f"{file} is not valid JSON ({e})") from None


def read_weights(path: Path) -> dict[str, mx.array]:
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


def _apply_weights(model: nn.Module, weights: dict, config: dict, path: Path, quantize: int | None):
    quant = config.get("quantization") or config.get("quantization_config")
    if quant and "bits" in quant:
        # Quantised MLX checkpoints: a module is quantised iff the checkpoint has its scales;
        # per-module overrides (e.g. an 8-bit router) are keyed by the checkpoint's module path,
        # mlx-lm's split expert names mapped onto our fused `experts.gate_up_proj`.
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
            return hasattr(m, "to_quantized") and f"{p}.scales" in weights

        nn.quantize(
            model,
            group_size=quant.get("group_size", 64),
            bits=quant["bits"],
            mode=quant.get("mode", "affine"),
            class_predicate=predicate,
        )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise GemmaChatError(f"weights in {path} do not fit its config.json: {e}") from None
    if quantize:
        if quant:
            raise GemmaChatError(f"{path} is already quantised; drop --quantize")
        if quantize not in (4, 8):
            raise GemmaChatError("quantize must be 4 or 8 bits")
        nn.quantize(model, group_size=64, bits=quantize, class_predicate=model.quant_predicate)
    mx.eval(model.parameters())


def load_target(path: Path, *, quantize: int | None = None) -> Model:
    config = read_config(path)
    kind = config.get("model_type")
    if kind in ASSISTANT_TYPES:
        raise GemmaChatError(f"{path} is an MTP assistant, not a target model (use it as --drafter)")
    if kind not in TARGET_TYPES:
        raise GemmaChatError(f"{path} is a '{kind}' model, not Gemma 4 (model_type gemma4)")
    model = Model(ModelArgs.from_config(config))
    weights = model.sanitize(read_weights(path))
    _apply_weights(model, weights, config, path, quantize)
    return model


def load_drafter(path: Path, target: Model) -> Assistant:
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
    _apply_weights(drafter, drafter.sanitize(read_weights(path)), config, path, None)
    return drafter


def load_tokenizer(path: Path):
    from mlx_lm.tokenizer_utils import load as load_wrapper

    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise GemmaChatError(f"{path} has no tokenizer (tokenizer.json)")
    eos = _eos_ids(path)
    try:
        return load_wrapper(path, eos_token_ids=eos)
    except Exception as e:  # tokenizers raise assorted types for a broken file
        raise GemmaChatError(f"cannot load the tokenizer in {path}: {e}") from None


def _eos_ids(path: Path) -> list[int] | None:
    """End-of-sequence ids: generation_config.json wins over config.json (as in HF)."""
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.is_file():
            try:
                data = json.loads(file.read_text())
            except json.JSONDecodeError:
                continue
            eos = data.get("eos_token_id") or (data.get("text_config") or {}).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return None
