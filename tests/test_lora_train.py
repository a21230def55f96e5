"""LoRA training (train_ldm.py --lora-rank) on tiny random-weight models: the exported kohya file loads
in ldm and in diffusers (load_lora_weights) with the same images, equals the training-time model, only
the LoRA trains (checkpoints hold it alone), an interrupted run resumes to the same bits, bad settings
are refused before training."""
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

from ldm import Pipeline
from ldm.training import hooks
from ldm.training.lora import LoraNetwork, save_lora
from ldm.training.state import list_checkpoints, state_hash

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import train_ldm  # noqa: E402
from test_train import base_args, losses, run_in_process  # noqa: E402

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
GEN = dict(prompt=["a red circle", "two green stars"], guidance_scale=5.0, height=32, width=32)


def _randomise(network: LoraNetwork, seed: int = 3) -> None:
    """Both matrices random (training starts with up = 0, which would make any parity trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _ours(pipe, output_type="np"):
    return pipe(**GEN, steps=4, seed=0, sampler="ddim", output_type=output_type)


# text-encoder LoRA training is for CLIP text encoders (SD1); SD2's OpenCLIP is refused (test_bad_settings)
@pytest.mark.parametrize("family,text", [("sd1", True), ("sd1", False), ("sd2", False)])
def test_export_loads_in_ldm_and_diffusers_with_the_same_images(saved, family, tmp_path, text):
    pipe = Pipeline.from_pretrained(saved[family]["ldm"])
    base = _ours(pipe)
    network = LoraNetwork(pipe.model, 4, 2.0, text_targets=TEXT_TARGETS if text else ())
    _randomise(network)
    trained = _ours(pipe)                                   # the training-time model: LoRA in its side path
    path = tmp_path / "style.safetensors"
    save_lora(network.state_dict(), path, 4, 2.0, "tiny")
    network.remove()
    assert np.array_equal(_ours(pipe), base), "remove() gives the base model back"

    keys = set(load_file(path))
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in keys) == text
    assert len(keys) == 3 * 4 * 2 * 4 + text * 3 * 4 * 2       # 4 projections × 2 attentions × 4 blocks (+ 2 CLIP layers)
    with safe_open(path, "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4" and f.metadata()["ss_network_alpha"] == "2"

    pipe.load_lora(path, scale=1.0)
    ours = _ours(pipe)
    ref = StableDiffusionPipeline.from_pretrained(saved[family]["diffusers"], safety_checker=None)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path))
    theirs = ref(**GEN, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    effect, vs_trained, vs_diffusers = (np.abs(ours - x).max() for x in (base, trained, theirs))
    print(f"{family} text={text}: LoRA effect {effect:.3f}, |merged - side path| {vs_trained:.1e}, "
          f"|ldm - diffusers| {vs_diffusers:.1e}")
    assert effect > 0.05
    assert vs_trained <= 1e-4                                # merged (float32) vs the side path: round-off
    assert vs_diffusers <= 1 / 255


def test_side_path_equals_merged(saved, tmp_path):
    """load_lora(merge=False): the weights untouched, x·W + s·(x·A)·B beside them, the same pictures as
    merged within round-off, on every kind of layer (attention, 3×3 and 1×1 convs, time embedding,
    feed-forward, CLIP); several LoRAs mix merged and unmerged; unloading gives the base back."""
    pipe = Pipeline.from_pretrained(saved["sd1"]["ldm"])
    weights = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    base = _ours(pipe, "latent")
    network = LoraNetwork(pipe.model, 4, 2.0, ("to_q", "to_out.0", "proj_in", "in_layers.2", "emb_layers.1",
                                                "ff.net.2"), TEXT_TARGETS)
    _randomise(network)
    trained = _ours(pipe, "latent")
    path = tmp_path / "every.safetensors"
    save_lora(network.state_dict(), path, 4, 2.0)
    network.remove()
    assert any(".lora_down." in k and v.dim() == 4 and v.shape[2] == 3 for k, v in load_file(path).items())

    pipe.load_lora(path, 0.7, merge=False)
    assert all(torch.equal(v, weights[k]) for k, v in pipe.model.state_dict().items())
    side = _ours(pipe, "latent")
    pipe.unload_lora()
    pipe.load_lora(path, 0.7)
    merged = _ours(pipe, "latent")
    pipe.unload_lora()
    pipe.load_lora(path, 1.0, merge=False)
    assert (_ours(pipe, "latent") - trained).abs().max() <= 1e-5 * trained.abs().max()
    pipe.load_lora(path, -0.3, name="merged")                  # 1.0 beside + (-0.3) merged = 0.7
    mixed = _ours(pipe, "latent")
    pipe.unload_lora()
    assert torch.equal(_ours(pipe, "latent"), base)
    assert all(torch.equal(v, weights[k]) for k, v in pipe.model.state_dict().items())
    tol = 1e-5 * merged.abs().max()
    print(f"side path vs merged: {(side - merged).abs().max():.1e}, LoRA effect {(side - base).abs().max():.2f}")
    assert (side - base).abs().max() > 0.1
    assert (side - merged).abs().max() <= tol and (mixed - merged).abs().max() <= tol

    # OpenCLIP (SD2) runs its q/k/v and out_proj inside nn.MultiheadAttention: only merging reaches them
    sd2 = Pipeline.from_pretrained(saved["sd2"]["ldm"])
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    fused = tmp_path / "fused.safetensors"
    save_lora({f"{name}.lora_down.weight": torch.ones(2, 32), f"{name}.lora_up.weight": torch.ones(32, 2),
               f"{name}.alpha": torch.tensor(2.0)}, fused, 2, 2.0)
    with pytest.raises(ValueError, match="merge=False cannot add a side path .* load this LoRA merged"):
        sd2.load_lora(fused, merge=False)
    assert sd2.loras == {}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 captioned 32×32 images: red or blue circles on white, the LoRA's target style."""
    root = tmp_path_factory.mktemp("lora-data")
    rows = []
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("blue", (30, 60, 220))] * 2):
        im = Image.new("RGB", (32, 32), (255, 255, 255))
        ImageDraw.Draw(im).ellipse((6 + i, 6, 24 + i, 24), fill=rgb)
        im.save(root / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"a {name} circle"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def lora_args(data, out, init, **overrides):
    """configs/train_lora_tiny.yaml (rank 8, alpha 8) with rank 4 from the --lora-rank flag."""
    sets = {"lora_text_targets": list(TEXT_TARGETS), "optim.lr": 1e-2, "cond_drop": 0.25, "use_ema": True,
            "ema_decay": 0.5, "data.random_flip": True, **overrides}
    return base_args(data, out, "configs/train_lora_tiny.yaml", **sets) + ["--init", str(init), "--lora-rank", "4"]


class Crash(Exception):
    pass


def test_trains_only_the_lora_and_resumes_to_the_same_bits(saved, data, tmp_path, monkeypatch):
    init = saved["sd1"]["ldm"]
    args = dict(max_steps=6, checkpoint_every=3)
    seen = []
    monkeypatch.setattr(hooks, "weights", lambda tag, sd, rank: seen.append((tag, {k: v.clone() for k, v in sd.items()})))
    run_in_process(train_ldm, lora_args(data, tmp_path / "a", init, **args), monkeypatch)
    curve = losses(tmp_path / "a")
    assert sorted(curve) == list(range(1, 7)) and all(math.isfinite(v) for v in curve.values())
    (_, start), (_, end) = seen
    assert set(start) == set(end) and all(k.startswith("lora_") for k in start)   # the hooks see the LoRA only
    assert not any(torch.equal(start[k], end[k]) for k in start if k.endswith("lora_up.weight"))

    ckpt = list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    held = load_file(ckpt / "model.safetensors")
    assert all(k.startswith("lora.lora_") for k in held) and len(held) == len(start)   # no base weights
    export = load_file(tmp_path / "a" / "lora.safetensors")
    assert set(export) == set(start)

    # the export is the training-time model (EMA weights): load_lora == the network hooked into the base
    pipe = Pipeline.from_pretrained(init)
    base = _ours(pipe, "latent")
    assert export["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.alpha"].item() == 8.0
    assert export["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape[0] == 4
    network = LoraNetwork(pipe.model, 4, 8.0, text_targets=TEXT_TARGETS)
    network.load_state_dict(export)
    side = _ours(pipe, "latent")
    network.remove()
    pipe.load_lora(tmp_path / "a" / "lora.safetensors")
    merged = _ours(pipe, "latent")
    assert (side - base).abs().max() > 1e-2, "6 steps at lr 1e-2 change the picture"
    assert (merged - side).abs().max() <= 1e-4 * side.abs().max()
    pipe.unload_lora()
    assert torch.equal(_ours(pipe, "latent"), base)

    # crash after step 5, resume from the step-3 checkpoint: the same LoRA, bit for bit
    def crash(step, folder):
        if step == 6:
            raise Crash
    monkeypatch.setattr(hooks, "checkpoint_written", crash)
    with pytest.raises(Crash):
        run_in_process(train_ldm, lora_args(data, tmp_path / "b", init, **args), monkeypatch)
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-00000003"]
    monkeypatch.setattr(hooks, "checkpoint_written", lambda step, folder: None)
    run_in_process(train_ldm, lora_args(data, tmp_path / "b", init, **args) + ["--resume"], monkeypatch)
    assert losses(tmp_path / "b") == pytest.approx(curve, rel=1e-6)
    assert state_hash(load_file(tmp_path / "b" / "lora.safetensors")) == state_hash(export)


@pytest.mark.parametrize("overrides,message", [
    ({"lora_rank": -1}, "lora_rank must be >= 0"),
    ({"lora_alpha": -1.0}, "lora_alpha must be a finite number >= 0"),
    ({"lora_unet_targets": ["to_qq"]}, "the LoRA targets ['to_qq'] name no module of the UNet"),
    ({"lora_unet_targets": ["norm"]}, "LoRA targets Linear and plain Conv2d layers"),
    ({"lora_unet_targets": [], "lora_text_targets": []}, "lora_rank > 0 needs modules to train"),
    ({"model_preset": "tiny", "no_init": True}, "pass it with --init PATH"),
    ({"sd2": True}, "needs a CLIP (transformers) text encoder"),
])
def test_bad_settings_are_refused_before_training(saved, data, tmp_path, monkeypatch, overrides, message):
    overrides = dict(overrides)
    init = saved["sd2" if overrides.pop("sd2", False) else "sd1"]["ldm"]
    no_init = overrides.pop("no_init", False)
    argv = lora_args(data, tmp_path / "run", init, max_steps=2, **overrides)
    if no_init:
        argv = argv[:argv.index("--init")] + argv[argv.index("--init") + 2:]
    monkeypatch.setattr(hooks, "weights", lambda *a: pytest.fail("training started"))
    with pytest.raises(ValueError, match=re.escape(message)):
        run_in_process(train_ldm, argv, monkeypatch)
    assert not list((tmp_path / "run").glob("*.safetensors"))
