"""Issue 18 through the real CLI: broken configs, options checked before any weight is read, the
OpenBLAS preload on Linux, the packaging metadata."""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gemma_mtp_mlx import blas
from gemma_mtp_mlx.cli import app
from gemma_mtp_mlx.models.rollback import max_draft_tokens
from tests.test_chat import build_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory)


def one_error_line(*args: str, env: dict | None = None) -> str:
    r = CliRunner().invoke(app, list(args), env=env)
    assert r.exit_code == 1, r.output
    assert r.stdout == "" and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: ")
    return line


def folder_with_config(tiny: Path, tmp_path: Path, config) -> Path:
    folder = shutil.copytree(tiny, tmp_path / "model", ignore=shutil.ignore_patterns("assistant"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_config_that_is_not_an_object(tiny, tmp_path):
    folder = folder_with_config(tiny, tmp_path, [1, 2, 3])
    line = one_error_line("-m", str(folder), "-p", "hi")
    assert line == f"error: {folder}/config.json is not a model config: a JSON object expected, found list"


def test_a_config_with_only_a_model_type(tiny, tmp_path):
    folder = folder_with_config(tiny, tmp_path, {"model_type": "gemma4"})
    line = one_error_line("-m", str(folder), "-p", "hi")
    assert line == (
        f"error: {folder}/config.json lacks hidden_size, num_hidden_layers, num_attention_heads, "
        "intermediate_size: not a complete Gemma 4 config"
    )


def test_weights_that_miss_parameters_are_summed_up(tiny, tmp_path):
    config = json.loads((tiny / "config.json").read_text())
    config["num_hidden_layers"] += 2
    config["layer_types"] += ["sliding_attention", "full_attention"]
    folder = folder_with_config(tiny, tmp_path, config)
    line = one_error_line("-m", str(folder), "-p", "hi")
    head = f"error: weights in {folder} do not fit its config.json: "
    assert line.startswith(head)
    assert re.fullmatch(r"Missing \d+ parameters: ([\w.]+, ){2}[\w.]+ and \d+ more", line[len(head):])


@pytest.fixture
def broken_weights(tiny, tmp_path) -> Path:
    """A model whose weights cannot be read: an option error reported instead proves that the
    options were checked before loading started."""
    folder = shutil.copytree(tiny, tmp_path / "broken", ignore=shutil.ignore_patterns("assistant"))
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    assert "cannot read" in one_error_line("-m", str(folder), "-p", "hi")
    return folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("-k", "1000"), f"error: --draft-tokens 1000: at most {max_draft_tokens()} (the sliding caches' rollback room)"),
        (("--quantize", "3"), "error: --quantize takes 4 or 8 (bits), not 3"),
        (("--max-memory", "12X"), "error: --max-memory 12X: expected a size such as 12G, 800M or 60%"),
        (("--precision", "8bit"), "error: --precision picks among the published weights of an alias"),
    ],
)
def test_options_are_checked_before_loading(broken_weights, args, message):
    assert one_error_line("-m", str(broken_weights), *args, "-p", "hi").startswith(message)


def test_the_draft_ceiling_itself_runs(tiny):
    r = CliRunner().invoke(app, ["-m", str(tiny), "-k", str(max_draft_tokens()), "-p", "hi", "-n", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["stats"]["generated_tokens"] == 4


# -- OpenBLAS ------------------------------------------------------------------------------------
def test_reexec_decision(tmp_path):
    library = tmp_path / "libopenblas.so.0"
    library.write_bytes(b"")
    argv = ["/venv/bin/gemma-chat", "--prompt", "hi"]
    plan = blas.reexec_plan({"LD_PRELOAD": "/x/other.so"}, "linux", argv, "/venv/bin/python", [library])
    assert plan == (
        ["/venv/bin/python", "--prompt", "hi"],
        {"LD_PRELOAD": f"{library}:/x/other.so", blas.MARKER: "1"},
    )
    assert blas.reexec_plan({}, "linux", argv, "/p", [library])[1] == {"LD_PRELOAD": str(library), blas.MARKER: "1"}
    assert blas.reexec_plan({blas.MARKER: "1"}, "linux", argv, "/p", [library]) is None  # no loop
    assert blas.reexec_plan({}, "darwin", argv, "/p", [library]) is None
    assert blas.reexec_plan({}, "linux", argv, "/p", [tmp_path / "missing.so"]) is None
    assert blas.reexec_plan({"LD_PRELOAD": str(library)}, "linux", argv, "/p", [library]) is None


def run_entry_point(*args: str, env: dict) -> subprocess.CompletedProcess:
    """The installed `gemma-chat` entry point (gemma_mtp_mlx.launch:main) in a fresh process."""
    code = "import sys; from gemma_mtp_mlx.launch import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.MARKER)}
    return env | extra


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or blas.openblas_library() is None,
    reason="Debian's OpenBLAS (libopenblas0-pthread) is not installed",
)
def test_gemma_chat_preloads_openblas_by_itself_and_leaves_a_core_to_the_host(tmp_path):
    env = clean_env(HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    env = {k: v for k, v in env.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    r = run_entry_point("doctor", env=env)
    assert r.returncode == 0, r.stderr  # and it ended: no re-exec loop
    cores = blas.usable_cores()
    shown = r"OpenBLAS \(preloaded by gemma-chat, (\d+) threads? of (\d+) cores\)"
    threads, of = map(int, re.search(shown, r.stdout).groups())
    assert of == cores and threads == max(1, cores - 1)
    # The user's own setting stands (all cores: OpenBLAS caps it there).
    r = run_entry_point("doctor", env=env | {"OPENBLAS_NUM_THREADS": str(cores)})
    assert re.search(shown, r.stdout).groups() == (str(cores), str(cores)), r.stdout


def test_blas_threads_leave_one_core_to_the_host_unless_the_user_chose():
    assert blas.host_core_threads({}, 2) == 1
    assert blas.host_core_threads({}, 10) == 9
    assert blas.host_core_threads({}, 1) is None  # nothing to spare: OpenBLAS's own choice
    assert blas.host_core_threads({"OPENBLAS_NUM_THREADS": "4"}, 10) is None
    assert blas.host_core_threads({"OMP_NUM_THREADS": "4"}, 10) is None


def test_linux_without_openblas_says_how_to_get_it_once(tmp_path, monkeypatch):
    monkeypatch.setattr(blas, "OPENBLAS_PATHS", (tmp_path / "no-such-libopenblas.so.0",))
    env = {"GEMMA_CHAT_STATE_DIR": str(tmp_path / "state")}
    args = ["-m", "demo", "-p", "To be", "-n", "3", "--json"]
    first = CliRunner().invoke(app, args, env=env)
    assert first.exit_code == 0, first.output
    hint = f"note: {blas.HINT}"
    if sys.platform.startswith("linux"):
        assert first.stderr.strip().splitlines() == [hint]
    assert json.loads(first.stdout)["stats"]["generated_tokens"] == 3
    again = CliRunner().invoke(app, args, env=env)
    assert again.exit_code == 0 and hint not in again.stderr
    if sys.platform.startswith("linux") and not blas.openblas_loaded():
        doctor = CliRunner().invoke(app, ["doctor"])
        assert "libopenblas0-pthread" in doctor.stdout


def test_licence_metadata_is_the_current_form():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert "setuptools>=77" in project["build-system"]["requires"]
    test_extra = " ".join(project["project"]["optional-dependencies"]["test"])
    runtime = " ".join(project["project"]["dependencies"])
    assert "mlx-vlm" in test_extra and "mlx-vlm" not in runtime
