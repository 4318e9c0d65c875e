"""`gemma-chat doctor` and the memory arithmetic it shares with the load preflight. Offline."""

import re

import mlx.core as mx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from gemma_mtp_mlx import memory
from gemma_mtp_mlx.aliases import checkpoints
from gemma_mtp_mlx.catalog import estimate_of
from gemma_mtp_mlx.cli import app
from gemma_mtp_mlx.loading import assistant_from_config, model_from_config
from gemma_mtp_mlx.models.configs import ASSISTANTS, TARGETS
from gemma_mtp_mlx.tools import doctor

GiB = 2**30
VERDICT = r"(fits|does not fit)"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache (the folder does not exist yet)."""
    for name in ("HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def report() -> tuple[int, str]:
    console = Console(record=True, width=140)
    code = doctor.run(console)
    return code, console.export_text()


def fit_rows(text: str, alias: str) -> list[str]:
    return re.findall(rf"^ +{alias} +(?:4bit|8bit|bf16) .*$", text, re.M)


def test_report_on_an_empty_cache(hub):
    code, text = report()
    assert code == 0
    assert "Traceback" not in text
    assert re.search(rf"^ mlx +{re.escape(mx.__version__)}\b", text, re.M)
    assert re.search(r"^ device +(Metal GPU|CPU)", text, re.M)
    assert re.search(r"^ (unified )?memory +\d+\.\d GiB", text, re.M)
    assert re.search(r"^ memory limit +\d+\.\d GiB \(75% of \d+\.\d GiB\)", text, re.M)
    assert re.search(r"^ blas +(OpenBLAS|MLX's reference BLAS|n/a)", text, re.M)
    assert str(hub) in text
    assert re.search(r"^ free disk +\d", text, re.M)
    for alias in ("e2b", "e4b", "26b", "31b"):
        rows = fit_rows(text, alias)
        assert len(rows) == 3, (alias, rows)
        for row in rows:
            assert re.search(rf"GiB +{VERDICT} *$", row), row
    assert "cached (" not in text


def test_the_verdicts_follow_the_limit(hub, monkeypatch):
    """The same estimate and limit as the preflight: 16 GiB of memory allows 12 GiB."""
    monkeypatch.setattr(memory, "physical_memory", lambda: 16 * GiB)
    _, text = report()
    verdict = {
        (alias, precision): word
        for alias, precision, word in re.findall(rf"^ +(\w+) +(4bit|8bit|bf16) .*? {VERDICT} *$", text, re.M)
    }
    for cp in checkpoints():
        expected = "fits" if estimate_of(cp).total <= 12 * GiB else "does not fit"
        assert verdict[(cp.alias, cp.precision)] == expected
    assert verdict[("e4b", "4bit")] == "fits" and verdict[("e4b", "bf16")] == "does not fit"
    assert verdict[("26b", "4bit")] == "does not fit"


def test_cached_target_is_reported(hub, published):
    from fixtures.hub_cache import add_to_cache

    add_to_cache(hub, "mlx-community/gemma-4-e2b-it-4bit", published["e2b-4bit"])
    add_to_cache(hub, "someone/gemma-4-e4b-it-mixed", published["e4b-mixed_4_8"])
    add_to_cache(hub, "someone/unrelated-model", published["e4b-4bit"])
    cached = doctor.cached_models(hub)
    assert "mlx-community/gemma-4-e2b-it-4bit" in cached
    assert doctor.other_gemma4_repos(cached) == ["someone/gemma-4-e4b-it-mixed"]

    code, text = report()
    assert code == 0
    assert re.search(r"mlx-community/gemma-4-e2b-it-4bit +cached \(\d", text)
    assert re.search(r"mlx-community/gemma-4-E2B-it-assistant-bf16 +not cached", text)
    assert "also cached: someone/gemma-4-e4b-it-mixed (" in text
    assert "unrelated" not in text
    # The cached (tiny) checkpoint is counted from its files, not from models/configs.py.
    (row,) = [r for r in fit_rows(text, "e2b") if " 4bit " in r]
    assert re.search(r"KiB +\d", row)


def test_failing_probes_print_unknown(hub, monkeypatch):
    def broken(*args):
        raise RuntimeError("probe failed")

    for probe in ("total_memory_bytes", "chip", "device_description", "cached_models", "default_limit"):
        monkeypatch.setattr(doctor, probe, broken)
    code, text = report()
    assert code == 0
    assert re.search(r"^ chip +unknown", text, re.M)
    assert re.search(r"^ device +unknown", text, re.M)
    assert re.search(r"^ (unified )?memory +unknown", text, re.M)
    assert "cache scan: unknown" in text
    for alias in ("e2b", "31b"):
        rows = fit_rows(text, alias)
        assert len(rows) == 3 and all(row.rstrip().endswith("unknown") for row in rows)


def test_the_cli_imports_doctor_only_for_its_subcommand(hub):
    import subprocess
    import sys

    code = "import sys, gemma_mtp_mlx.cli; print('gemma_mtp_mlx.tools.doctor' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "False\n"
    r = CliRunner().invoke(app, ["doctor"])
    assert r.exit_code == 0 and "gemma-chat doctor" in r.stdout


def parameters(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(module.parameters()))


def test_parameter_counts_match_the_model_cards():
    params = {name: parameters(model_from_config(TARGETS[name])) for name in TARGETS}
    assert params["26b"] == pytest.approx(25.2e9, rel=0.01)
    assert params["31b"] == pytest.approx(30.7e9, rel=0.01)
    # E2B / E4B model cards (5.1 B / 8 B) include vision and audio towers the loader drops;
    # "2.3 B effective" is the text decoder without the per-layer embedding table.
    assert params["e2b"] - 262144 * 35 * 256 == pytest.approx(2.3e9, rel=0.02)
    assert params["e4b"] == pytest.approx(7.46e9, rel=0.01)
    assert parameters(assistant_from_config(ASSISTANTS["e4b"])) == pytest.approx(78.5e6, rel=0.01)
    assert parameters(assistant_from_config(ASSISTANTS["e2b"])) == pytest.approx(78e6, rel=0.01)


def test_kv_cache_bytes_by_hand():
    e2b = model_from_config(TARGETS["e2b"]).args
    # E2B: 15 layers store KV (20 of 35 share); full at 4, 9, 14 with 1 KV head of 512;
    # 12 sliding with 1 head of 256 keeping 512 + 64 tokens, twice (the chat's snapshot of
    # the rings). K and V, bf16.
    by_hand = 3 * 2 * 8192 * 1 * 512 * 2 + 2 * 12 * 2 * 576 * 1 * 256 * 2
    assert memory.kv_cache_bytes(e2b, 8192, 2) == by_hand == 64_487_424
    # 31B: no sharing; 10 full layers, 4 KV heads of 512 (k_eq_v: still K and V arrays);
    # 50 sliding, 16 heads of 256 keeping 1024 + 64 tokens.
    e31b = model_from_config(TARGETS["31b"]).args
    assert memory.kv_cache_bytes(e31b, 8192, 2) == 10 * 2 * 8192 * 4 * 512 * 2 + 2 * 50 * 2 * 1088 * 16 * 256 * 2
    # A short context caps the sliding layers too.
    assert memory.kv_cache_bytes(e2b, 100, 2) == 3 * 2 * 100 * 512 * 2 + 2 * 12 * 2 * 100 * 256 * 2


def test_weight_bytes_by_precision():
    """bf16: 2 bytes a parameter; MLX affine 4-bit, group 64: 4 bits + a bf16 scale and bias per
    64 weights = 4.5 bits (the 8-bit router and the unquantisable norms add a little)."""
    n = parameters(model_from_config(TARGETS["31b"]))
    bf16 = memory.parameter_bytes(model_from_config(TARGETS["31b"]))
    four = memory.parameter_bytes(model_from_config(TARGETS["31b"], quantize=4))
    eight = memory.parameter_bytes(model_from_config(TARGETS["31b"], quantize=8))
    assert bf16 == 2 * n
    assert four == pytest.approx(n * 4.5 / 8, rel=0.01)
    assert eight == pytest.approx(n * 8.5 / 8, rel=0.01)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("12G", 12 * GiB), ("12 GB", 12 * GiB), ("12GiB", 12 * GiB), ("800M", 800 * 2**20),
     ("1.5g", int(1.5 * GiB)), ("4096", 4096)],
)
def test_max_memory_sizes(text, expected):
    assert memory.parse_size(text).bytes == expected


def test_max_memory_share_and_default(monkeypatch):
    monkeypatch.setattr(memory, "physical_memory", lambda: 16 * GiB)
    assert memory.parse_size("50%").bytes == 8 * GiB
    limit = memory.default_limit()
    if memory.metal_working_set() is None:
        assert (limit.bytes, limit.why) == (12 * GiB, "75% of 16.0 GiB")
    for bad in ("0", "-1G", "lots", "150%", "12X"):
        with pytest.raises(memory.GemmaChatError, match="--max-memory"):
            memory.parse_size(bad)
