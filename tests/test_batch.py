"""`ldm generate --prompts-file`: images named by prompt index and seed, one metadata.jsonl,
resumable, and under `accelerate launch --num_processes 2` each process draws only its share
and the images equal one process's."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from ldm import Pipeline
from ldm.cli import main as cli
from tiny_models import random_model, tiny_sd1

REPO = Path(__file__).resolve().parents[1]
PROMPTS = "a red circle\n\na blue square\na green star\n  a pink heart  \na yellow triangle\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    model, prompts = root / "tiny.safetensors", root / "prompts.txt"
    Pipeline(random_model(tiny_sd1())).save_pretrained(model)
    prompts.write_text(PROMPTS)
    return model, prompts


def batch(setup, out, *flags) -> int:
    model, prompts = setup
    return cli(["generate", "--prompts-file", str(prompts), "-o", str(out), "--model", str(model), "--steps", "2",
                "--sampler", "euler_ancestral", "-q", *flags])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_names_seeds_metadata_and_resume(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert batch(setup, out, "--seed", "10", "-n", "2") == 0
    names = [f"{i:05d}-{10 + 2 * i + k}.png" for i in range(5) for k in range(2)]
    assert sorted(p.name for p in out.glob("*.png")) == names
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == names and rows[6]["text"] == "a pink heart" and rows[6]["seed"] == 16
    assert Image.open(out / names[6]).text["seed"] == "16"
    # image 00003-16 is what `ldm generate "a pink heart" --seed 16` draws
    single = tmp_path / "single.png"
    assert cli(["generate", "a pink heart", "--seed", "16", "-o", str(single), "--model", str(setup[0]),
                "--steps", "2", "--sampler", "euler_ancestral", "-q"]) == 0
    assert np.array_equal(pixels(out / names[6]), pixels(single))
    # resume: only the missing image is drawn again, the others are left as they are
    capsys.readouterr()
    (out / names[3]).unlink()
    before = {n: (out / n).stat().st_mtime_ns for n in names if n != names[3]}
    assert batch(setup, out, "--seed", "10", "-n", "2") == 0
    assert capsys.readouterr().out.split() == [str(out / names[3])]
    assert all((out / n).stat().st_mtime_ns == t for n, t in before.items())
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 10


@pytest.mark.parametrize("flags, message", [
    (["-o", "x.png"], "-o is a folder"),
    (["extra prompt"], "not both"),
    (["--steps", "0"], "--steps must be an integer"),
])
def test_bad_input_is_refused_before_any_work(setup, tmp_path, capsys, flags, message):
    model, prompts = setup
    argv = ["generate", "--prompts-file", str(prompts), "-o", str(tmp_path / "out"), "--model", str(model), "-q"]
    assert cli(argv + flags) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert cli(["generate", "--prompts-file", str(tmp_path / "empty.txt"), "-o", str(tmp_path / "o")]) == 2
    assert "has no prompts" in capsys.readouterr().err


def test_two_processes_split_the_prompts_and_equal_one_process(setup, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # each launched process's count (OMP_NUM_THREADS=1): it can move a pixel
    try:
        assert batch(setup, one) == 0
    finally:
        torch.set_num_threads(threads)
    model, prompts = setup
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + os.getpid() % 1000), "-m", "ldm.cli", "generate",
           "--prompts-file", str(prompts), "-o", str(two), "--model", str(model), "--steps", "2",
           "--sampler", "euler_ancestral", "-q"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    written = re.findall(re.escape(str(two)) + r"/\d{5}-\d+\.png", r.stdout)      # the paths each process printed
    assert sorted(written) == sorted(str(two / p.name) for p in one.glob("*.png")), r.stdout   # each drawn once
    for path in one.glob("*.png"):
        assert np.array_equal(pixels(path), pixels(two / path.name)), path.name
    assert (one / "metadata.jsonl").read_text() == (two / "metadata.jsonl").read_text()
