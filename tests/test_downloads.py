"""Downloads through huggingface_hub against a hub on 127.0.0.1 (fixtures/fake_hub.py), with the
real `gemma-chat` entry point in a subprocess: the size said before the download, only the text
model's files fetched, Ctrl-C leaving a cache the next run resumes, a refusal that fetches no
weights."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.fake_hub import FakeHub
from gemma_mtp_mlx.hub import local_size
from gemma_mtp_mlx.memory import format_bytes

ROOT = Path(__file__).resolve().parents[1]
TARGET, ASSISTANT = "mlx-community/gemma-4-e4b-it-4bit", "mlx-community/gemma-4-E4B-it-assistant-bf16"
JUNK = ("pytorch_model.bin", "model.gguf", "onnx/model.onnx", "README.md", "preprocessor_config.json")


@pytest.fixture
def repos(published, tmp_path) -> dict[str, Path]:
    """The tiny E4B pair as hub repos, with the files a text model must not download."""
    target = shutil.copytree(published["e4b-4bit"], tmp_path / "repo-target")
    for name in JUNK:
        (target / name).parent.mkdir(exist_ok=True)
        (target / name).write_bytes(b"not for the text model")
    assistant = shutil.copytree(published["e4b-assistant"], tmp_path / "repo-assistant")
    return {TARGET: target, ASSISTANT: assistant}


def env_for(hub: FakeHub, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return env | {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "cache"),
                  "HF_HUB_DISABLE_TELEMETRY": "1", "GEMMA_CHAT_STATE_DIR": str(tmp_path / "state")}


def gemma_chat(*args: str, env: dict, **kw):
    code = "import sys; from gemma_mtp_mlx.launch import main; sys.exit(main())"
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run(*args: str, env: dict) -> tuple[int, str, str]:
    proc = gemma_chat(*args, env=env)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def snapshot_files(cache: Path, repo: str) -> list[str]:
    (snapshot,) = (cache / ("models--" + repo.replace("/", "--")) / "snapshots").iterdir()
    return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())


def test_the_first_run_says_the_size_then_fetches_only_the_text_model(repos, published, tmp_path):
    with FakeHub(repos) as hub:
        env = env_for(hub, tmp_path)
        code, out, err = run("-m", "e4b", "--prompt", "Hello", "-n", "12", "-k", "2", "--json", env=env)
        assert code == 0, err
        size = local_size(published["e4b-4bit"]) + local_size(published["e4b-assistant"])
        assert err.splitlines()[0] == (
            f"downloading {TARGET} and {ASSISTANT} ({format_bytes(size)}) to {tmp_path / 'cache'}"
        )
        assert json.loads(out)["stats"]["drafted"] > 0
        fetched = [path for method, path, _ in hub.requests if method == "GET" and "/resolve/" in path]
        assert not [p for p in fetched if p.endswith((".bin", ".gguf", ".onnx", ".md"))]
        assert snapshot_files(tmp_path / "cache", TARGET) == sorted(
            p.name for p in published["e4b-4bit"].iterdir()
            if p.suffix in (".json", ".safetensors", ".jinja")
        )
        # Online, `models` reads the sizes from the hub's file metadata.
        code, out, _ = run("models", "--json", env=env)
        row = next(json.loads(x) for x in out.splitlines() if json.loads(x)["target_repo"] == TARGET)
        assert row["bytes"] == size and row["cached"] and row["default"]


def test_ctrl_c_leaves_a_cache_the_next_run_completes(repos, tmp_path):
    repo = tmp_path / "cache" / ("models--" + TARGET.replace("/", "--"))
    with FakeHub(repos, slow={"model.safetensors": 4096}) as hub:
        env = env_for(hub, tmp_path)
        proc = gemma_chat("-m", "e4b", "--prompt", "Hello", "-n", "2", env=env)

        def mid_download() -> bool:  # the weights arriving, the small files done
            done = {p.name for p in repo.glob("snapshots/*/*")}
            return {"config.json", "tokenizer.json"} <= done and any(repo.glob("blobs/*.incomplete"))

        deadline = time.monotonic() + 120
        while not mid_download():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and out == "" and "Traceback" not in err
        assert err.strip().splitlines()[-1] == (
            f"interrupted: the download of {TARGET} stopped; the files it completed stay in the "
            "cache and the same command fetches the rest"
        )
        assert not list(repo.glob("blobs/*.incomplete"))  # no orphaned partial files
        assert not list(repo.glob("snapshots/*/model.safetensors"))
        first = len(hub.requests)
        hub.slow.clear()
        code, out, err = run("-m", "e4b", "--prompt", "Hello", "-n", "2", env=env)
        assert code == 0, err
        again = {p.rsplit("/", 1)[-1] for m, p, _ in hub.requests[first:]
                 if m == "GET" and p.startswith(f"/{TARGET}/resolve/")}
        assert "model.safetensors" in again and "config.json" not in again


def test_a_refused_preflight_fetches_no_weights(repos, tmp_path):
    """A repo id that is not an alias: its config.json (a few KB) is read for the estimate, and
    nothing else."""
    with FakeHub({"someone/gemma-4-e4b-it-4bit": repos[TARGET]}) as hub:
        env = env_for(hub, tmp_path)
        code, out, err = run("-m", "someone/gemma-4-e4b-it-4bit", "--prompt", "Hello",
                             "--max-memory", "1K", env=env)
        assert code == 1 and out == ""
        (line,) = err.strip().splitlines()
        assert line.startswith("error: someone/gemma-4-e4b-it-4bit needs about ")
        fetched = {path.rsplit("/", 1)[-1] for method, path, _ in hub.requests if "/resolve/" in path}
        assert fetched == {"config.json"}


@pytest.mark.skipif(shutil.which("script") is None, reason="util-linux `script` (a pty) is missing")
def test_a_terminal_sees_a_rich_progress_bar(repos, tmp_path):
    """Under a pseudo-terminal (util-linux `script`), the download draws Rich's bar."""
    with FakeHub(repos, slow={"model.safetensors": 65536}) as hub:
        env = env_for(hub, tmp_path) | {"COLUMNS": "120"}
        code = "from gemma_mtp_mlx.launch import main; main()"
        command = f"{sys.executable} -c '{code}' -m e4b --prompt Hello -n 2"
        done = subprocess.run(["script", "-qec", command, "/dev/null"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:]
        screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", done.stdout)
        assert re.search(rf"{TARGET} ━+ [\d.]+/[\d.]+ KiB", screen), screen[:2000]
