"""Render the Homebrew formula for gemma-chat from requirements.lock.

    python scripts/homebrew/generate_formula.py [--repo OWNER/NAME] [--sdist PATH]

1. Reads the exact pins in requirements.lock (one `name==version` a line).
2. Asks PyPI's JSON API (https://pypi.org/pypi/NAME/VERSION/json, falling back to the project
   document https://pypi.org/pypi/NAME/json) for each pin's sdist url and sha256; the url is
   written in its canonical files.pythonhosted.org form. --verify downloads every file and checks
   its sha256.
3. Builds gemma-chat's own sdist into dist/ (or hashes the one given with --sdist) and points the
   formula's url at the GitHub release asset of that name: upload exactly that file to the
   release `v<version>`, or the sha256 will not match.
4. Writes scripts/homebrew/gemma-chat.rb with one `resource` block per pin, sorted by name.

Without network it stops with one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
OUTPUT = Path(__file__).resolve().parent / "gemma-chat.rb"
PYPI = "https://pypi.org/pypi"
FILES = "https://files.pythonhosted.org/packages"
DEFAULT_REPO = "OWNER/gemma-chat"  # placeholder until the project has a public home
TIMEOUT_S = 30


class Pin(NamedTuple):
    name: str
    version: str


class Resource(NamedTuple):
    name: str
    url: str
    sha256: str


class GenerateError(Exception):
    """A one-line reason to stop."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> list[Pin]:
    pins = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match is None:
            raise GenerateError(f"{path.name}: not an exact pin: {line!r}")
        pins.append(Pin(canonical(match[1]), match[2]))
    return pins


def project_version(root: Path = ROOT) -> str:
    text = (root / "gemma_mtp_mlx" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if match is None:
        raise GenerateError("gemma_mtp_mlx/__init__.py has no __version__")
    return match[1]


def _get_json(url: str) -> dict | None:
    """The document at `url`; None on 404; GenerateError when PyPI cannot be reached."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise GenerateError(f"PyPI answered {error.code} for {url}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise GenerateError(f"cannot reach PyPI ({PYPI}): {reason}") from None


def file_url(entry: dict, document_url: str) -> str:
    """The canonical files.pythonhosted.org url of a release file.

    PyPI stores files under their blake2b-256 digest; mirrors may hand out relative or rewritten
    urls, so the url is rebuilt from the digest (or the digest-shaped tail of the given url).
    """
    digest = entry.get("digests", {}).get("blake2b_256", "")
    filename = entry.get("filename") or entry["url"].rsplit("/", 1)[-1]
    if re.fullmatch(r"[0-9a-f]{64}", digest):
        return f"{FILES}/{digest[:2]}/{digest[2:4]}/{digest[4:]}/{filename}"
    tail = re.search(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{60}/[^/]+$", entry["url"])
    if tail:
        return f"{FILES}/{tail[0]}"
    return urllib.parse.urljoin(document_url, entry["url"])


def pick_file(pin: Pin, files: list[dict], document_url: str) -> Resource:
    """The sdist (Homebrew builds from source); a pure-Python wheel only when there is none."""
    live = [f for f in files if not f.get("yanked")]
    sdists = [f for f in live if f.get("packagetype") == "sdist"]
    wheels = [f for f in live if f.get("filename", "").endswith("-py3-none-any.whl")]
    for chosen in (sdists or wheels)[:1]:
        return Resource(pin.name, file_url(chosen, document_url), chosen["digests"]["sha256"])
    raise GenerateError(f"{pin.name}=={pin.version} has no sdist or pure-Python wheel on PyPI")


def lookup(pin: Pin) -> Resource:
    release_url = f"{PYPI}/{pin.name}/{pin.version}/json"
    release = _get_json(release_url)
    if release is not None:
        return pick_file(pin, release.get("urls", []), release_url)
    project_url = f"{PYPI}/{pin.name}/json"
    project = _get_json(project_url)
    files = (project or {}).get("releases", {}).get(pin.version)
    if not files:
        raise GenerateError(f"{pin.name}=={pin.version} is not on PyPI")
    return pick_file(pin, files, project_url)


def verify(resource: Resource) -> None:
    """Download one resource and check its sha256 (what `brew fetch` will do)."""
    try:
        with urllib.request.urlopen(resource.url, timeout=TIMEOUT_S) as response:
            digest = hashlib.sha256(response.read()).hexdigest()
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise GenerateError(f"cannot download {resource.url}: {error}") from None
    if digest != resource.sha256:
        raise GenerateError(f"{resource.url}: sha256 {digest}, PyPI says {resource.sha256}")


def lookup_all(pins: list[Pin], check: bool = False) -> list[Resource]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        resources = list(pool.map(lookup, pins))
        if check:
            list(pool.map(verify, resources))
    return sorted(resources, key=lambda r: r.name)


def build_sdist(root: Path = ROOT) -> Path:
    """gemma-chat's sdist, built with setuptools from the working tree into dist/."""
    out = root / "dist"
    out.mkdir(exist_ok=True)
    script = (
        "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    )
    with tempfile.TemporaryFile("w+") as log:
        done = subprocess.run(
            [sys.executable, "-c", script, str(out)],
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        if done.returncode != 0:
            log.seek(0)
            last = (log.read().strip().splitlines() or ["no output"])[-1]
            raise GenerateError(f"building the sdist failed: {last}")
    return out / done.stdout.strip().splitlines()[-1]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def render(
    version: str, repo: str, sdist_name: str, sdist_sha256: str, resources: list[Resource]
) -> str:
    blocks = "\n".join(
        f'  resource "{r.name}" do\n    url "{r.url}"\n    sha256 "{r.sha256}"\n  end\n'
        for r in sorted(resources, key=lambda r: r.name)
    )
    return FORMULA.format(
        homepage=f"https://github.com/{repo}",
        url=f"https://github.com/{repo}/releases/download/v{version}/{sdist_name}",
        sha256=sdist_sha256,
        resources=blocks,
    )


FORMULA = """\
# Generated by scripts/homebrew/generate_formula.py from requirements.lock: edit those, not this.
class GemmaChat < Formula
  include Language::Python::Virtualenv

  desc "Terminal chat for Gemma 4 with lossless MTP speculative decoding in MLX"
  homepage "{homepage}"
  url "{url}"
  sha256 "{sha256}"
  license "Apache-2.0"

  depends_on "pkgconf" => :build
  depends_on "rust" => :build
  depends_on arch: :arm64
  depends_on "libyaml"
  depends_on :macos
  depends_on macos: :sonoma
  depends_on "mlx"
  depends_on "numpy"
  depends_on "pillow"
  depends_on "protobuf"
  # Must be the Python the `mlx` formula is built for (its `def python3`): the venv imports mlx
  # from that formula's site-packages. Change it together with the mlx formula.
  depends_on "python@3.14"
  depends_on "sentencepiece"

  pypi_packages exclude_packages: %w[certifi mlx mlx-metal numpy pillow]

{resources}
  def install
    virtualenv_install_with_resources
  end

  def caveats
    <<~EOS
      On first use `gemma-chat` downloads Gemma 4 and its MTP drafter to the Hugging Face cache:
      E4B at 4-bit (mlx-community/gemma-4-e4b-it-4bit, roughly 5 GB; up to 6.1 GiB of memory)
      where it fits, as on 16 GB Macs, else E2B at 4-bit (up to 3.3 GiB). It says which model
      and the download size before it starts; Ctrl-C and a rerun resume the download.
        gemma-chat models     every size and precision, what is cached, what fits this Mac
        gemma-chat --model demo   the built-in demo pair, offline
    EOS
  end

  test do
    ENV["HF_HUB_OFFLINE"] = "1"
    ENV["HF_HOME"] = testpath/"huggingface"
    assert_match version.to_s, shell_output("#{{bin}}/gemma-chat --version")

    # The demo pair ships inside the package: no download, no network.
    output = shell_output("#{{bin}}/gemma-chat --model demo --prompt Hello --max-tokens 8 --ignore-eos --json")
    result = JSON.parse(output)
    assert_equal 8, result["stats"]["generated_tokens"]
    assert_kind_of String, result["text"]
  end
end
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", type=Path, default=LOCK)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--repo", default=DEFAULT_REPO, help="GitHub OWNER/NAME of the releases")
    parser.add_argument("--sdist", type=Path, help="hash this sdist instead of building one")
    parser.add_argument(
        "--verify", action="store_true", help="download each resource, check sha256"
    )
    args = parser.parse_args(argv)
    try:
        pins = read_lock(args.lock)
        version = project_version()
        resources = lookup_all(pins, check=args.verify)
        sdist = args.sdist or build_sdist()
        if not sdist.is_file():
            raise GenerateError(f"no sdist at {sdist}")
        text = render(version, args.repo, sdist.name, sha256_of(sdist), resources)
    except GenerateError as error:
        print(f"generate_formula: {error}", file=sys.stderr)
        return 1
    args.output.write_text(text)
    print(f"wrote {args.output} ({len(resources)} resources, sdist {sdist.name})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
