"""`gemma-chat doctor`: the report, the memory arithmetic, the cache scan. Offline and fast."""

import re

import mlx.core as mx
import pytest
from huggingface_hub import constants
from rich.console import Console

from gemma_mtp_mlx import doctor
from gemma_mtp_mlx.aliases import ALIASES

GiB = 2**30
VERDICT = r"(fits|tight|does not fit)"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty HF_HOME; the hub cache folder inside it does not exist yet."""
    home = tmp_path / "hf"
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    return home / "hub"


def report() -> tuple[int, str]:
    console = Console(record=True, width=120)
    code = doctor.run(console)
    return code, console.export_text()


def cache_repo(hub_dir, repo_id: str, revision: str = "0123456789abcdef" * 2 + "01234567"):
    repo = hub_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "gemma4"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def gemma4_aliases() -> list[str]:
    return [name for name, alias in ALIASES.items() if doctor.arch_for(alias.target)]


def fit_rows(text: str, alias: str) -> list[str]:
    return re.findall(rf"^ +{alias} +(?:bf16|4-bit) .*$", text, re.M)


def test_report_on_an_empty_cache(hub):
    code, text = report()
    assert code == 0
    assert "Traceback" not in text
    assert re.search(rf"^ mlx +{re.escape(mx.__version__)}\b", text, re.M)
    assert re.search(r"^ device +(Metal GPU|CPU)", text, re.M)
    assert re.search(r"^ (unified )?memory +\d+\.\d GiB", text, re.M)
    assert str(hub) in text
    assert re.search(r"^ free disk +\d", text, re.M)
    assert {"e2b", "e4b", "26b", "31b"} <= set(gemma4_aliases())
    for name in gemma4_aliases():
        rows = fit_rows(text, name)
        assert len(rows) == 2, (name, rows)
        for row in rows:
            assert re.search(rf"GiB +{VERDICT} *$", row), row
    assert "cached (" not in text


def test_cached_target_is_reported(hub):
    cache_repo(hub, "google/gemma-4-E2B-it")
    cache_repo(hub, "mlx-community/gemma-4-e4b-it-4bit")
    cache_repo(hub, "someone/unrelated-model")

    cached = doctor.cached_models(hub)
    assert "google/gemma-4-e2b-it" in cached
    assert doctor.other_gemma4_repos(cached) == ["mlx-community/gemma-4-e4b-it-4bit"]

    code, text = report()
    assert code == 0
    assert re.search(r"google/gemma-4-E2B-it +cached \(\d", text)
    assert re.search(r"google/gemma-4-E2B-it-assistant +not cached", text)
    assert re.search(r"google/gemma-4-E4B-it +not cached", text)
    assert "also cached: mlx-community/gemma-4-e4b-it-4bit (" in text
    assert "unrelated" not in text


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert doctor.hf_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert doctor.hf_cache_dir() == tmp_path / "elsewhere"
    assert doctor.cached_models(tmp_path / "missing") == {}


def test_failing_probes_print_unknown(hub, monkeypatch):
    def broken(*args):
        raise RuntimeError("probe failed")

    for probe in ("total_memory_bytes", "chip", "device_description", "cached_models"):
        monkeypatch.setattr(doctor, probe, broken)
    code, text = report()
    assert code == 0
    assert re.search(r"^ chip +unknown", text, re.M)
    assert re.search(r"^ device +unknown", text, re.M)
    assert re.search(r"^ (unified )?memory +unknown", text, re.M)
    assert "cache scan: unknown" in text
    for name in gemma4_aliases():
        rows = fit_rows(text, name)
        assert len(rows) == 2 and all(row.rstrip().endswith("unknown") for row in rows)


def test_fit_verdicts_in_16_gib():
    e2b, e31b = doctor.ARCHS["E2B"], doctor.ARCHS["31B"]
    assert doctor.verdict(doctor.estimate(e31b, 16).total, 16 * GiB) == "does not fit"
    assert doctor.verdict(doctor.estimate(e2b, 4).total, 16 * GiB) == "fits"
    assert doctor.verdict(doctor.estimate(e2b, 16).total, 16 * GiB) == "fits"
    assert doctor.verdict(doctor.estimate(e31b, 4).total, 16 * GiB) == "does not fit"
    assert doctor.verdict(doctor.estimate(e31b, 4).total, 24 * GiB) == "tight"
    assert doctor.verdict(74, 100) == "fits"
    assert doctor.verdict(90, 100) == "tight"
    assert doctor.verdict(91, 100) == "does not fit"
    assert doctor.verdict(1, None) == "unknown"


def test_parameter_counts_match_the_model_cards():
    params = {name: doctor.target_params(arch) for name, arch in doctor.ARCHS.items()}
    assert params["26B-A4B"] == pytest.approx(25.2e9, rel=0.01)
    assert params["31B"] == pytest.approx(30.7e9, rel=0.01)
    # E2B / E4B model cards (5.1 B / 8 B) include vision and audio towers the loader drops;
    # "2.3 B effective" is the text decoder without the per-layer embedding table.
    e2b = doctor.ARCHS["E2B"]
    ple_table = 262144 * 35 * 256
    assert params["E2B"] - ple_table == pytest.approx(2.3e9, rel=0.02)
    assert params["E4B"] == pytest.approx(7.46e9, rel=0.01)
    assert doctor.drafter_params(doctor.ARCHS["E4B"]) == pytest.approx(78.5e6, rel=0.01)
    assert doctor.drafter_params(e2b) == pytest.approx(78e6, rel=0.01)
    assert e2b.layer_types().count("full") == 7
    assert doctor.ARCHS["31B"].layer_types()[-1] == "full"


def test_kv_cache_bytes_by_hand():
    # E2B: 15 layers store KV (20 of 35 share); full at 4, 9, 14 with 1 KV head of 512;
    # 12 sliding with 1 head of 256 keeping 512 + 64 tokens. K and V, bf16.
    e2b = 3 * 2 * 8192 * 1 * 512 * 2 + 12 * 2 * 576 * 1 * 256 * 2
    assert doctor.kv_cache_bytes(doctor.ARCHS["E2B"]) == e2b == 57_409_536
    # 31B: no sharing; 10 full layers, 4 KV heads of 512 (k_eq_v: still K and V arrays);
    # 50 sliding, 16 heads of 256 keeping 1024 + 64 tokens.
    e31b = 10 * 2 * 8192 * 4 * 512 * 2 + 50 * 2 * 1088 * 16 * 256 * 2
    assert doctor.kv_cache_bytes(doctor.ARCHS["31B"]) == e31b
    # A short context caps the sliding layers too.
    short = 3 * 2 * 100 * 1 * 512 * 2 + 12 * 2 * 100 * 1 * 256 * 2
    assert doctor.kv_cache_bytes(doctor.ARCHS["E2B"], 100) == short


def test_weight_bytes_and_repo_names():
    assert doctor.weight_bytes(1000, 16) == 2000
    assert doctor.weight_bytes(64_000, 4) == 36_000  # 4 bits + bf16 scale and bias per 64
    assert doctor.arch_for("mlx-community/gemma-4-e2b-it-4bit").name == "E2B"
    assert doctor.arch_for("google/gemma-4-26B-A4B-it-assistant").name == "26B-A4B"
    assert doctor.arch_for("google/gemma-4-31B-it").name == "31B"
    assert doctor.arch_for("google/gemma-3-4b-it") is None
