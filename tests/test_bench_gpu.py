"""benchmarks/bench_gpu.py on the CPU with its tiny architectures: the rows, the table and the JSON it writes.

The GPU numbers themselves come from running the script on a GPU (BENCHMARKS.md); this checks that the one command
works end to end and that its fields mean what the table says."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_gpu", None)


TINY = ["--tiny", "--device", "cpu", "--dtype", "float32", "--repeats", "1", "--attention", "sdpa", "--compile", "off"]


def test_tiny_cpu_run(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rows = bench.main([*TINY, "--only", "ResShift-4", "default-EDSR", "--json", str(out)])
    printed = capsys.readouterr().out

    # 128->512 and tiled 512->2048 at the tiny sizes: 16->64 and 32->128, both pipelines, nothing skipped
    assert [(r["name"], r["size"], r["tiled"]) for r in rows] == [
        ("ResShift-4", "16->64", False),
        ("default-EDSR", "16->64", False),
        ("ResShift-4", "32->128", True),
        ("default-EDSR", "32->128", True),
    ]
    for row in rows:
        assert row["wall_ms"] > 0 and row["network_ms"] > 0
        assert row["network_ms"] <= row["wall_ms"]
        assert 0 <= row["overhead_fraction"] < 1
        assert row["overhead_ms"] == pytest.approx(row["wall_ms"] - row["network_ms"], rel=1e-6, abs=1e-6)
        assert row["peak_gib"] is None  # CPU: no CUDA memory statistics
        assert row["compile_s"] is None and row["attention"] == "sdpa"
    assert rows[0]["steps"] == 4 and rows[1]["steps"] is None  # the regression default has no steps

    assert printed.splitlines()[0].startswith("## CPU")
    table = printed[printed.index("| case |") :].splitlines()
    assert len(table) == 2 + len(rows)
    assert table[2].startswith("| ResShift-4 | 16->64 | 4 |") and table[3].startswith("| default-EDSR | 16->64 |")
    assert table[2].split("|")[7].strip() == "n/a"  # the peak memory column

    saved = json.loads(out.read_text())
    assert saved["device"].startswith("CPU") and saved["dtype"] == "float32"
    assert saved["rows"] == json.loads(json.dumps(rows))


def test_budget_and_missing_xformers_skip_cleanly(bench, capsys):
    # a zero budget skips every case with a note; xformers, absent here, is skipped rather than failing
    args = ["--tiny", "--device", "cpu", "--dtype", "float32", "--repeats", "1", "--compile", "off", "--skip-tiled"]
    rows = bench.main([*args, "--only", "ResShift-4", "--budget-s", "0"])
    printed = capsys.readouterr().out
    assert [r["name"] for r in rows] == ["ResShift-4"] * len(rows) and rows
    assert all("skipped" in r for r in rows)
    assert "budget" in rows[0]["skipped"] and "skipped ResShift-4" in printed


def test_case_selection(bench):
    names = [c.name for c in bench.select(["stablesr", "PASD-20"])]
    assert names == ["StableSR-200", "StableSR-50", "PASD-20"]
    assert len(bench.select(None)) == len(bench.CASES) == 11
    with pytest.raises(SystemExit, match="unknown case"):
        bench.select(["ESRGAN"])
    # the variants (xformers, compiled) run on the variant cases only, the tiled rows last
    args = bench.parse_args(["--only", "ResShift", "--variant-cases", "ResShift-4"])
    jobs = [(c.name, tiled, attention, compiled) for c, tiled, attention, compiled in bench.plan(args)]
    assert jobs == [
        ("ResShift-4", False, "sdpa", False),
        ("ResShift-15", False, "sdpa", False),
        ("ResShift-4", False, "xformers", False),
        ("ResShift-4", False, "sdpa", True),
        ("ResShift-4", True, "sdpa", False),
    ]
