"""The benchmark scripts run (CPU smoke runs of what bench/README.md runs on real sizes and GPUs).
They measure nothing here: a benchmark is not a timed test."""
import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_its_runs_on_the_cpu(capsys):
    rows = load("gpu_its").main(["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--steps", "3",
                                 "--size", "64", "--runs", "1"])
    assert set(rows) == {"ldm", "diffusers"} and all(v > 0 for v in rows.values())
    assert "| ldm / diffusers |" in capsys.readouterr().out


def test_scaling_table_has_a_row_per_cell(capsys):
    rows = load("scaling").main(["--preset", "tiny", "--sizes", "64", "--batches", "1", "2", "--steps", "2"])
    assert [(r[0], r[1], r[2]) for r in rows] == [(64, 1, 2), (64, 2, 2)]
    assert all(r[3] > 0 and r[4] > 0 for r in rows)
    assert capsys.readouterr().out.count("| 64² |") == 2
