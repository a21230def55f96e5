"""train_ldm.py / train_vae.py end to end on tiny models and a 32 px Pillow-drawn dataset: overfitting,
fine-tuning from an init file, export -> Pipeline, 2 processes, SIGKILL + resume, VAE PSNR, bad input.
Single-process runs call the scripts' main() in-process (no import cost) and replace the test hooks
(ldm.training.hooks) with monkeypatch; kills and multi-process runs use subprocesses, which run a
small script that installs the hooks and then the training script (`hooked`)."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from ldm import checkpoint
from ldm.presets import tiny
from ldm.diffusion import LatentDiffusion
from ldm.pipeline import Pipeline
from ldm.training import hooks
from ldm.training.run import run_cli
from ldm.training.state import list_checkpoints, state_hash
from ldm.training.vae_export import load_autoencoder

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train_ldm  # noqa: E402
import train_vae  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """8 captioned 40×40 images of coloured circles and squares (metadata.jsonl)."""
    root = tmp_path_factory.mktemp("shapes")
    rows = []
    for i, (colour, shape) in enumerate((c, s) for c in COLOURS for s in ("circle", "square")):
        im = Image.new("RGB", (40, 40), (240, 240, 240))
        (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)((8, 8, 32, 32),
                                                                                          fill=COLOURS[colour])
        im.save(root / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"a {colour} {shape}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def base_args(data, out, config="configs/train_tiny.yaml", **overrides):
    """--config and --set arguments; the tiny configs sample and evaluate only every 50+ steps."""
    sets = {"data.path": data, "out_dir": out, "batch_size": 2, "log_every": 1, "checkpoint_every": 0, **overrides}
    return ["--config", config] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def run_in_process(script, argv, monkeypatch):
    """script.main(argv) from the repo root, with fresh Accelerate singletons."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    monkeypatch.chdir(REPO)
    script.main(argv)


def hooked(tmp_path, script: str, hook_source: str) -> Path:
    """A script that runs `hook_source` (which replaces functions of ldm.training.hooks) and then the
    training script `script` as its command line would: a subprocess's way to the hooks."""
    wrapper = tmp_path / f"hooked_{script}"
    wrapper.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nfrom ldm.training import hooks\n"
                       f"{textwrap.dedent(hook_source)}\nimport {Path(script).stem} as script\n"
                       f"from ldm.training.run import run_cli\nrun_cli(script.main)\n")
    return wrapper


def hash_files_hook(folder) -> str:
    """hook_source for `hooked`: each process writes `{tag}-rank{i}.txt` holding the weights' state_hash."""
    return f"""
        from pathlib import Path
        from ldm.training.state import state_hash
        def weights(tag, sd, rank):
            Path({str(folder)!r}).mkdir(parents=True, exist_ok=True)
            (Path({str(folder)!r}) / f"{{tag}}-rank{{rank}}.txt").write_text(state_hash(sd))
        hooks.weights = weights
    """


def losses(out) -> dict[int, float]:
    log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in log if "loss" in r}


def test_overfits_a_fixed_batch(data, tmp_path, monkeypatch):
    # the same 2 images every step, no condition dropout: ε-loss falls from ≈1 (zero-initialised output)
    argv = base_args(data, tmp_path, **{"data.limit": 2, "batch_size": 2, "cond_drop": 0.0, "max_steps": 40,
                                        "optim.lr": 2e-3, "optim.warmup_steps": 0})
    run_in_process(train_ldm, argv, monkeypatch)
    curve = losses(tmp_path)
    assert len(curve) == 40 and all(math.isfinite(v) for v in curve.values())
    first, late = curve[1], sorted(curve[s] for s in range(31, 41))[5]  # median of the last 10
    assert first > 0.8 and late < first / 5, f"loss {first:.3f} -> median {late:.3f}"


def test_finetune_starts_from_init_and_export_generates(data, tmp_path, monkeypatch):
    torch.manual_seed(1)
    init_model = LatentDiffusion(tiny())
    with torch.no_grad():
        init_model.unet.out[2].weight.normal_(0, 0.01)  # a non-trivial UNet, not the zero-initialised one
    init = tmp_path / "init.safetensors"
    checkpoint.save(init_model.state_dict(), tiny(), init)
    seen = []
    monkeypatch.setattr(hooks, "weights", lambda tag, sd, rank: seen.append((tag, rank, state_hash(sd))))
    run_in_process(train_ldm, base_args(data, tmp_path / "run", max_steps=3, use_ema=True, ema_decay=0.5)
                   + ["--init", str(init)], monkeypatch)
    (_, _, start), (_, _, end) = seen
    assert [call[:2] for call in seen] == [("start", 0), ("end", 0)]
    assert start == state_hash(checkpoint.load(init)[1]), "the first step must start from the init file's weights"
    assert end != start

    export = tmp_path / "run" / "model.safetensors"
    pipe = Pipeline.from_pretrained(export)
    assert pipe.config == checkpoint.load(init)[0]
    assert not torch.equal(pipe.unet.out[2].weight, init_model.unet.out[2].weight)
    image = pipe(["a red circle"], steps=2, guidance_scale=3.0, seed=0)[0]
    assert image.size == (32, 32)
    assert 0 < np.asarray(image, dtype=np.float32).std() < 128


def test_finetune_from_an_fp16_file_trains_fp32_weights_under_bf16_autocast(data, tmp_path, monkeypatch):
    # most released SD files are fp16; loading them as-is left fp16 parameters that autocast's LayerNorm rejects
    init = tmp_path / "init.safetensors"
    checkpoint.save({k: v.half() for k, v in LatentDiffusion(tiny()).state_dict().items()}, tiny(), init)
    run_in_process(train_ldm, base_args(data, tmp_path / "run", max_steps=2, mixed_precision="bf16")
                   + ["--init", str(init)], monkeypatch)
    export = load_file(tmp_path / "run" / "model.safetensors")
    assert {v.dtype for v in export.values()} == {torch.float32}
    assert all(math.isfinite(v) for v in losses(tmp_path / "run").values())


def test_config_that_does_not_fit_init_fails_before_training(data, tmp_path):
    init = tmp_path / "init.safetensors"
    checkpoint.save(LatentDiffusion(tiny()).state_dict(), tiny(), init)
    argv = base_args(data, tmp_path / "run", max_steps=2) + ["--init", str(init), "--model.unet.model_channels=64"]
    r = subprocess.run([sys.executable, "train_ldm.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "does not fit the --init checkpoint" in r.stderr and "model.unet.model_channels: config 64" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "log.jsonl").exists()


def test_bad_dataset_fails_before_training(data, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        run_in_process(train_ldm, base_args(tmp_path / "missing", tmp_path / "run"), monkeypatch)
    bare = tmp_path / "bare"
    bare.mkdir()
    Image.new("RGB", (16, 16)).save(bare / "a.png")
    with pytest.raises(ValueError, match="1 of 1 images .* have no caption: a.png"):
        run_in_process(train_ldm, base_args(bare, tmp_path / "run"), monkeypatch)
    with pytest.raises(ValueError, match="data.resolution must be a positive multiple"):
        run_in_process(train_vae, ["--config", "configs/train_vae_tiny.yaml", "--set", f"data.path={data}",
                                   "--set", "data.resolution=31"], monkeypatch)
    with pytest.raises(ValueError, match="perceptual_weight > 0 needs"):  # LPIPS weights are not on disk here
        run_in_process(train_vae, base_args(data, tmp_path / "run", "configs/train_vae_tiny.yaml",
                                            perceptual_weight=0.5), monkeypatch)
    with pytest.raises(ValueError, match="rec_loss must be one of"):
        run_in_process(train_vae, base_args(data, tmp_path / "run", "configs/train_vae_tiny.yaml",
                                            rec_loss="huber"), monkeypatch)
    with pytest.raises(ValueError, match="noise_offset must be >= 0"):
        run_in_process(train_ldm, base_args(data, tmp_path / "run", noise_offset=-0.1), monkeypatch)
    with pytest.raises(ValueError, match="snr_gamma must be >= 0"):
        run_in_process(train_ldm, base_args(data, tmp_path / "run", snr_gamma=-1.0), monkeypatch)
    assert not (tmp_path / "run").exists()


def truncated_dataset(root):
    """Two captioned PNGs whose headers read but whose pixel data is cut off."""
    root.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (200, 40, 40)).save(root / f"img{i}.png")
        (root / f"img{i}.png").write_bytes((root / f"img{i}.png").read_bytes()[:60])
        (root / f"img{i}.txt").write_text("a red square")
    return root


@pytest.mark.parametrize("script,case,message", [
    (train_ldm, "max_steps=0", "max_steps must be >= 1 (optimizer steps to train), got 0"),
    (train_vae, "max_steps=0", "max_steps must be >= 1 (optimizer steps to train), got 0"),
    (train_ldm, "optim.lr=-1", "optim.lr must be a finite number > 0, got -1.0"),
    (train_ldm, "max_steps=abc", "max_steps: expected int, got 'abc'"),
    (train_ldm, "yaml", "bad.yaml, line 4 column 9: invalid YAML: mapping values are not allowed here"),
    (train_ldm, "undecodable", "none of the 2 images in {tmp}/broken can be decoded: img0.png, img1.png"),
])
def test_bad_input_exits_2_with_one_line_before_any_work(data, tmp_path, monkeypatch, capsys, script, case, message):
    """As run from the shell (run_cli): exit code 2, one `error:` line naming the problem, no
    traceback, nothing written."""
    argv = base_args(data, tmp_path / "run", "configs/train_tiny.yaml" if script is train_ldm
                     else "configs/train_vae_tiny.yaml", max_steps=2)
    if case == "yaml":
        (tmp_path / "bad.yaml").write_text("max_steps: 2\noptim:\n  lr: 1.0e-4\n   betas: [0.9, 0.99]\n")
        argv += ["--config", str(tmp_path / "bad.yaml")]
    elif case == "undecodable":
        argv += ["--set", f"data.path={truncated_dataset(tmp_path / 'broken')}"]
    else:
        argv += ["--set", case]
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", [script.__file__, *argv])
    with pytest.raises(SystemExit) as exited:
        run_cli(script.main)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(tmp=tmp_path) in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", ["train_ldm.py", "train_vae.py"])
def test_two_processes_hold_identical_weights(data, tmp_path, script):
    # `accelerate launch --cpu` always starts one process; torchrun-style CPU processes (gloo) need
    # --multi_gpu with ACCELERATE_USE_CPU=1
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    args = base_args(data, tmp_path / "run", max_steps=4, checkpoint_every=2)
    if script == "train_vae.py":  # with the discriminator on from step 2 and a held-out PSNR
        args = base_args(data, tmp_path / "run", "configs/train_vae_tiny.yaml", max_steps=4, checkpoint_every=2,
                         disc_start=2, **{"data.holdout": 2})
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + os.getpid() % 1000),
           hooked(tmp_path, script, hash_files_hook(tmp_path / "hashes")), *args]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    hashes = {p.name: p.read_text() for p in (tmp_path / "hashes").iterdir()}
    assert set(hashes) == {"start-rank0.txt", "start-rank1.txt", "end-rank0.txt", "end-rank1.txt"}
    assert hashes["end-rank0.txt"] == hashes["end-rank1.txt"] != hashes["start-rank0.txt"]
    curve = losses(tmp_path / "run")
    assert sorted(curve) == [1, 2, 3, 4] and all(math.isfinite(v) for v in curve.values())
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == len(set(log)) == 5 + (script == "train_vae.py")  # one writer: (psnr,) 4 steps, export
    export = "model.safetensors" if script == "train_ldm.py" else "vae.safetensors"
    assert sorted(p.name for p in (tmp_path / "run").glob("*.safetensors")) == [export]
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors"} <= {p.name for p in ckpt.iterdir()}


def test_sigkill_during_checkpoint_write_then_resume(data, tmp_path, monkeypatch):
    # 8 images, batch 2: 4 batches per epoch, so the step-6 checkpoint resumes mid-epoch
    args = dict(max_steps=12, checkpoint_every=3, keep_checkpoints=2, cond_drop=0.3, snr_gamma=5.0, noise_offset=0.1,
                **{"data.random_flip": True, "optim.lr_schedule": "cosine"})
    run_in_process(train_ldm, base_args(data, tmp_path / "a", **args), monkeypatch)
    reference = losses(tmp_path / "a")

    out = tmp_path / "b"
    pause = hooked(tmp_path, "train_ldm.py", """
        import time
        def checkpoint_written(step, folder):  # sleeps half-way through writing step 9
            if step == 9:
                time.sleep(120)
        hooks.checkpoint_written = checkpoint_written
    """)
    with open(tmp_path / "b.log", "w") as log:
        proc = subprocess.Popen([sys.executable, pause, *base_args(data, out, **args)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
    partial = out / "checkpoints" / ".tmp-step-00000009"
    deadline = time.time() + 120
    while not (partial / "random_states_0.pkl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "b.log").read_text()[-2000:]
    assert partial.is_dir() and not (partial / "meta.json").exists()
    good = list_checkpoints(out / "checkpoints")
    assert [p.name for p in good] == ["step-00000003", "step-00000006"]
    assert json.loads((good[-1] / "meta.json").read_text())["step"] == 6
    weights = load_file(good[-1] / "model.safetensors")  # the last good checkpoint loads
    assert len(weights) > 10 and all(torch.isfinite(v).all() for v in weights.values())
    assert set(losses(out)) == set(range(1, 10)), "killed after step 9 was logged"

    run_in_process(train_ldm, base_args(data, out, **args) + ["--resume"], monkeypatch)
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, 13)), "steps continue from 7, without gaps or repeats"
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    # the strict check: same data order, flips, dropped captions, noise and optimizer state -> same bits
    assert state_hash(checkpoint.load(out / "model.safetensors")[1]) == \
        state_hash(checkpoint.load(tmp_path / "a" / "model.safetensors")[1])
    assert not partial.exists(), "the half-written checkpoint is cleaned up on resume"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000009", "step-00000012"]


def test_vae_improves_heldout_psnr_and_feeds_train_ldm(data, tmp_path, monkeypatch):
    vae_args = base_args(data, tmp_path / "vae", "configs/train_vae_tiny.yaml", max_steps=40, log_every=5,
                         eval_every=0, checkpoint_every=20, disc_start=30, **{"data.holdout": 2})
    run_in_process(train_vae, vae_args, monkeypatch)
    log = [json.loads(line) for line in (tmp_path / "vae" / "log.jsonl").read_text().splitlines()]
    psnr = [r["psnr"] for r in log if "psnr" in r]
    assert len(psnr) == 2 and psnr[1] > psnr[0] + 3, f"held-out PSNR {psnr[0]:.2f} -> {psnr[1]:.2f} dB"
    assert any(r.get("d_loss", 0) > 0 for r in log if r["step"] > 30), "the discriminator switched on"
    vae_cfg, vae_sd = load_autoencoder(tmp_path / "vae" / "vae.safetensors")
    assert vae_cfg.ch == tiny().autoencoder.ch and vae_cfg.scale_factor != tiny().autoencoder.scale_factor

    # train_ldm --vae, with latents cached (both flips) instead of encoded every step
    run_in_process(train_ldm, base_args(data, tmp_path / "ldm", max_steps=2, **{
        "data.cache_latents": True, "data.random_flip": True}) + ["--vae", str(tmp_path / "vae" / "vae.safetensors")],
        monkeypatch)
    caches = list((tmp_path / "ldm" / "latents").glob("*.npy"))
    assert len(caches) == 1 and np.load(caches[0]).shape == (8, 2, 8, 16, 16)
    cfg, sd = checkpoint.load(tmp_path / "ldm" / "model.safetensors")
    assert cfg.autoencoder == vae_cfg
    assert all(torch.equal(sd["first_stage_model." + k], v) for k, v in vae_sd.items()), "the autoencoder stays frozen"


def test_pixel_scale_trains_the_network_at_its_own_size(data, tmp_path, monkeypatch):
    """With autoencoder.pixel_scale=k both scripts load images at resolution/k (the learned network's
    input), and the exported model still maps full-size images <-> latents."""
    run_in_process(train_vae, base_args(data, tmp_path / "vae", "configs/train_vae_tiny.yaml", max_steps=4,
                                        eval_every=0, rec_loss="mse", init_logvar=-4.0,
                                        **{"model.pixel_scale": 2, "data.resolution": 64, "data.holdout": 2}),
                   monkeypatch)
    log = [json.loads(line) for line in (tmp_path / "vae" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["psnr"]) for r in log if "psnr" in r)
    vae_cfg, vae_sd = load_autoencoder(tmp_path / "vae" / "vae.safetensors")
    assert vae_cfg.pixel_scale == 2 and vae_cfg.downsample_factor == 4
    # a fresh posterior starts narrow (init_logvar), not at std 1; 4 steps at lr 1e-3 barely move it
    assert abs(vae_sd["quant_conv.bias"][vae_cfg.embed_dim:].mean() + 4.0) < 0.1

    run_in_process(train_ldm, base_args(data, tmp_path / "ldm", max_steps=2, **{
        "data.cache_latents": True, "data.resolution": 64}) + ["--vae", str(tmp_path / "vae" / "vae.safetensors")],
        monkeypatch)
    cache, = (tmp_path / "ldm" / "latents").glob("*.npy")
    assert np.load(cache).shape == (8, 1, 8, 16, 16)  # 40 px images loaded at 32 px, f=2 network
    pipe = Pipeline.from_pretrained(tmp_path / "ldm" / "model.safetensors")
    assert pipe("a red circle", steps=2, seed=0, height=64, width=64)[0].size == (64, 64)
