"""The committed Homebrew formula and its generator. No network."""

import importlib.util
import re
import shutil
import subprocess
import urllib.error
from pathlib import Path

import pytest

import gemma_mtp_mlx

ROOT = Path(__file__).resolve().parents[1]
FORMULA = ROOT / "scripts" / "homebrew" / "gemma-chat.rb"
LOCK = ROOT / "requirements.lock"


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "generate_formula", ROOT / "scripts" / "homebrew" / "generate_formula.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = load_generator()


def resources(text: str) -> dict[str, tuple[str, str]]:
    blocks = re.findall(
        r'resource "([^"]+)" do\n\s+url "([^"]+)"\n\s+sha256 "([^"]+)"\n\s+end', text
    )
    return {name: (url, sha) for name, url, sha in blocks}


def test_formula_has_the_required_pieces():
    text = FORMULA.read_text()
    for piece in (
        "class GemmaChat < Formula",
        "include Language::Python::Virtualenv",
        'license "Apache-2.0"',
        "depends_on arch: :arm64",
        "depends_on :macos",
        "depends_on macos: :sonoma",
        'depends_on "mlx"',
        'depends_on "numpy"',
        'depends_on "pillow"',
        "virtualenv_install_with_resources",
        'ENV["HF_HUB_OFFLINE"] = "1"',
        "--version",
        "--model demo",
    ):
        assert piece in text, piece
    assert re.search(r'depends_on "python@3\.\d+"', text)
    assert re.search(r"^  test do\n.*?^  end\n", text, re.S | re.M)
    assert re.search(r'^  sha256 "[0-9a-f]{64}"$', text, re.M)
    version = gemma_mtp_mlx.__version__
    assert f"/releases/download/v{version}/gemma_chat-{version}.tar.gz" in text


def test_every_lock_entry_is_a_resource():
    pins = generate.read_lock(LOCK)
    found = resources(FORMULA.read_text())
    assert len(pins) > 20
    assert sorted(found) == sorted(pin.name for pin in pins)
    assert list(found) == sorted(found)
    for pin in pins:
        url, sha = found[pin.name]
        assert url.startswith("https://files.pythonhosted.org/packages/"), url
        assert f"-{pin.version}." in url, (pin, url)
        assert re.fullmatch(r"[0-9a-f]{64}", sha)
    for homebrew_formula in ("mlx", "mlx-metal", "numpy", "pillow", "certifi"):
        assert homebrew_formula not in found
    assert {"mlx-lm", "huggingface-hub", "typer", "rich", "prompt-toolkit", "transformers"} <= set(
        found
    )


def test_generator_renders_sorted_resources():
    rendered = generate.render(
        "9.9.9",
        "someone/gemma-chat",
        "gemma_chat-9.9.9.tar.gz",
        "a" * 64,
        [
            generate.Resource("zeta", "https://x/zeta-1.tar.gz", "b" * 64),
            generate.Resource("alpha", "https://x/alpha-2.tar.gz", "c" * 64),
        ],
    )
    assert list(resources(rendered)) == ["alpha", "zeta"]
    assert (
        'url "https://github.com/someone/gemma-chat/releases/download/v9.9.9/gemma_chat-9.9.9.tar.gz"'
        in rendered
    )
    assert "#{bin}/gemma-chat --version" in rendered


def test_generator_reads_pins_and_canonical_urls(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# header\nPyYAML==6.0.4  # native\n    # via x\ntyping_extensions==4.16.0\n")
    assert generate.read_lock(lock) == [("pyyaml", "6.0.4"), ("typing-extensions", "4.16.0")]
    lock.write_text("rich>=13\n")
    with pytest.raises(generate.GenerateError):
        generate.read_lock(lock)
    digest = "d654cfe61301667036ec958cb99bd3efefba235e65cdeb9c84d24a8293ba1d90"
    entry = {
        "url": "../../packages/x.tar.gz",
        "filename": "mdurl-0.1.2.tar.gz",
        "digests": {"blake2b_256": digest, "sha256": "0" * 64},
    }
    assert generate.file_url(entry, "https://pypi.org/pypi/mdurl/json") == (
        f"https://files.pythonhosted.org/packages/d6/54/{digest[4:]}/mdurl-0.1.2.tar.gz"
    )


def test_generator_without_network_says_one_line(monkeypatch, capsys, tmp_path):
    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(generate.urllib.request, "urlopen", unreachable)
    code = generate.main(
        ["--output", str(tmp_path / "out.rb"), "--sdist", str(tmp_path / "x.tar.gz")]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "cannot reach PyPI" in err
    assert not (tmp_path / "out.rb").exists()


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby is not installed")
def test_formula_is_valid_ruby():
    done = subprocess.run(["ruby", "-c", str(FORMULA)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_caveats_and_readme_describe_the_default_download():
    """What a new user reads before the first run matches what the first run does."""
    from gemma_mtp_mlx.aliases import DEFAULT_CHOICES, DEFAULT_PRECISION, checkpoint
    from gemma_mtp_mlx.catalog import estimate_of
    from gemma_mtp_mlx.memory import format_bytes

    first, fallback = (checkpoint(a, DEFAULT_PRECISION) for a in DEFAULT_CHOICES)
    rendered = generate.render("9.9.9", "someone/gemma-chat", "x.tar.gz", "a" * 64, [])
    caveats = re.search(r"^  def caveats\n.*?^  end\n", FORMULA.read_text(), re.S | re.M).group(0)
    assert caveats in rendered
    readme_head = (ROOT / "README.md").read_text()[:1500]
    for text in (caveats, readme_head):
        text = " ".join(text.split())
        assert first.target in text and "gemma-chat models" in text
        assert f"up to {format_bytes(estimate_of(first).total)}" in text
        assert f"up to {format_bytes(estimate_of(fallback).total)}" in text
