"""LoRA files as the community has them (made here with peft/diffusers on our saved diffusers folder,
and converted to kohya's names): the same images as diffusers' load_lora_weights at the same scale,
stacking, exact unloading, bad files refused before any change, the CLI's --lora and <lora:NAME:w>."""
import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from ldm import Pipeline
from ldm.cli import main as cli

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2",
                "time_emb_proj"]                                     # conv1/conv2: 3×3 conv LoRA
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RANK, ALPHA, TE_RANK, TE_ALPHA = 4, 8, 2, 3
# both sides in float32 from the same weights; the LoRA delta is computed in a different order
# (diffusers: PEFT's side path, here merged), which leaves ~1e-6 in pixels (measured); 1/255 as briefed
PIXEL_TOL = 1 / 255
UNET_CONFIG = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=UNET_TARGETS)
TE_CONFIG = LoraConfig(r=TE_RANK, lora_alpha=TE_ALPHA, target_modules=TE_TARGETS)


def _peft_lora(folder, seed: int):
    """A diffusers/PEFT LoRA (UNet + text encoder) on the model in `folder`, with random A and B:
    (unet state dict, text encoder state dict) in PEFT's names."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    inject_adapter_in_model(UNET_CONFIG, pipe.unet)
    inject_adapter_in_model(TE_CONFIG, pipe.text_encoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in (pipe.unet, pipe.text_encoder):
            for name, p in part.named_parameters():
                if "lora_" in name:                                 # B is zero-initialised: randomise both
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)


def _to_kohya(unet: dict, te: dict) -> dict:
    """PEFT names -> kohya/A1111's (`lora_unet_<diffusers path with _>.lora_down.weight`, `.alpha`)."""
    out = {}
    for prefix, sd, alpha in (("lora_unet_", unet, ALPHA), ("lora_te_text_model_", te, TE_ALPHA)):
        for k, v in sd.items():
            module, ab = k.rsplit(".", 2)[0], k.split(".")[-2]
            name = prefix + module.removeprefix("text_model.").replace(".", "_")
            out[f"{name}.{'lora_down' if ab == 'lora_A' else 'lora_up'}.weight"] = v.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


@pytest.fixture(scope="module")
def files(saved, tmp_path_factory):
    """Per family: "peft" (diffusers' save_lora_weights, alpha in its metadata), "kohya" (the same
    LoRA in kohya's names with .alpha tensors) and "other" (another LoRA, kohya)."""
    out = {}
    for family in ("sd1", "sd2"):
        root = tmp_path_factory.mktemp(f"lora-{family}")
        folder = saved[family]["diffusers"]
        unet, te = _peft_lora(folder, seed=1)
        StableDiffusionPipeline.save_lora_weights(
            root / "peft", unet_lora_layers=unet, text_encoder_lora_layers=te,
            unet_lora_adapter_metadata=UNET_CONFIG.to_dict(), text_encoder_lora_adapter_metadata=TE_CONFIG.to_dict())
        kohya = _to_kohya(unet, te)
        assert kohya["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (RANK, 32, 3, 3)  # conv LoRA
        save_file(kohya, root / "kohya.safetensors")
        save_file(_to_kohya(*_peft_lora(folder, seed=2)), root / "other.safetensors")
        out[family] = dict(peft=root / "peft" / "pytorch_lora_weights.safetensors",
                           kohya=root / "kohya.safetensors", other=root / "other.safetensors", root=root)
    return out


@pytest.fixture(scope="module")
def reference(saved):
    out = {}
    for family in ("sd1", "sd2"):
        ref = StableDiffusionPipeline.from_pretrained(saved[family]["diffusers"], safety_checker=None)
        ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
        ref.set_progress_bar_config(disable=True)
        out[family] = ref
    return out


GEN = dict(prompt=["a red circle", "two green stars"], guidance_scale=5.0, height=32, width=32)


def _theirs(ref, loras: list[tuple], steps=4):
    """diffusers' images with `loras` [(file, scale)] as adapters (load_lora_weights + set_adapters)."""
    names = []
    for i, (path, _) in enumerate(loras):
        ref.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    try:
        ref.set_adapters(names, adapter_weights=[s for _, s in loras])
        return ref(**GEN, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                   output_type="np").images
    finally:
        ref.unload_lora_weights()


def _ours(pipe, steps=4, output_type="np"):
    return pipe(**GEN, steps=steps, seed=0, sampler="ddim", output_type=output_type)


@pytest.mark.parametrize("kind", ["kohya", "peft"])
def test_same_images_as_diffusers(saved, files, reference, family, kind):
    path, scale = files[family][kind], 0.7
    theirs = _theirs(reference[family], [(path, scale)])
    pipe = Pipeline.from_pretrained(saved[family]["diffusers"])
    base, context = _ours(pipe), pipe.encode_prompt(["a red circle"])
    assert pipe.load_lora(path, scale=scale) == path.stem
    assert (pipe.encode_prompt(["a red circle"]) - context).abs().max() > 1e-3   # the text encoder's part too
    ours = _ours(pipe)
    err = np.abs(ours - theirs).max()
    print(f"{family} {kind}: max |ours - diffusers| = {err:.2e}, LoRA's own effect {np.abs(ours - base).max():.2e}")
    assert np.abs(ours - base).max() > 0.02                  # the LoRA does change the picture
    assert err <= PIXEL_TOL


def test_two_loras_are_the_sum(saved, files, reference, family):
    f = files[family]
    pipe = Pipeline.from_pretrained(saved[family]["diffusers"])
    base = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    pipe.load_lora(f["kohya"], 0.5)
    one = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    pipe.unload_lora()
    pipe.load_lora(f["other"], -0.8)
    other = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    pipe.load_lora(f["kohya"], 0.5)
    assert set(pipe.loras) == {"kohya", "other"}
    both = pipe.model.state_dict()
    for k in base:
        torch.testing.assert_close(both[k], one[k] + other[k] - base[k], rtol=0, atol=1e-6)
    theirs = _theirs(reference[family], [(f["kohya"], 0.5), (f["other"], -0.8)])
    err = np.abs(_ours(pipe) - theirs).max()
    print(f"{family} two LoRAs: max |ours - diffusers| = {err:.2e}")
    assert err <= PIXEL_TOL


def test_unload_restores_base_bit_for_bit(saved, files, family):
    f = files[family]
    pipe = Pipeline.from_pretrained(saved[family]["diffusers"])
    base = _ours(pipe, output_type="latent")
    weights = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    a = pipe.load_lora(f["kohya"], 0.9)
    pipe.load_lora(f["peft"], 0.3, name="second")
    first = _ours(pipe, output_type="latent")
    pipe.unload_lora("second")
    pipe.unload_lora(a)
    assert pipe.loras == {}
    assert all(torch.equal(v, weights[k]) for k, v in pipe.model.state_dict().items())
    assert torch.equal(_ours(pipe, output_type="latent"), base)
    pipe.load_lora(f["kohya"], 0.9)
    pipe.load_lora(f["peft"], 0.3, name="second")
    assert torch.equal(_ours(pipe, output_type="latent"), first)   # load → unload → load: the same
    pipe.unload_lora()
    assert torch.equal(_ours(pipe, output_type="latent"), base)


def test_older_names_give_the_same_weights(saved, files, tmp_path):
    """kohya files with the original module names (input_blocks_1_1_...) and the older diffusers
    naming (`.lora.down.weight`, attention processors' `to_q_lora`) address the same modules."""
    from safetensors.torch import load_file
    from ldm.formats.diffusers_keys import _unet_prefixes
    cfg = saved["sd1"]["cfg"]
    theirs_to_ours = {v: k for k, v in _unet_prefixes(cfg.unet).items()}
    kohya = load_file(files["sd1"]["kohya"])
    original = {}
    for k, v in kohya.items():
        name, rest = k.split(".", 1)
        if name.startswith("lora_unet_"):
            for theirs in sorted(theirs_to_ours, key=len, reverse=True):
                if name.startswith("lora_unet_" + theirs.replace(".", "_") + "_"):
                    name = name.replace(theirs.replace(".", "_"), theirs_to_ours[theirs].replace(".", "_"), 1)
                    break
        original[f"{name}.{rest}"] = v
    assert any(k.startswith("lora_unet_input_blocks_3_1_") for k in original)
    old = {}
    for k, v in load_file(files["sd1"]["peft"]).items():
        module, ab = k.rsplit(".", 2)[0], k.split(".")[-2]
        part = "down" if ab == "lora_A" else "up"
        if module.endswith(("attn1.to_q", "attn2.to_k")):          # the attention processors' naming
            head, last = module.rsplit(".", 1)
            old[f"{head}.processor.{last}_lora.{part}.weight"] = v
        else:
            old[f"{module}.lora.{part}.weight"] = v
        old[f"{module}.alpha"] = torch.tensor(float(ALPHA if module.startswith("unet.") else TE_ALPHA))
    weights = []
    for i, sd in enumerate([None, original, old]):
        pipe = Pipeline.from_pretrained(saved["sd1"]["ldm"])
        pipe.load_lora(files["sd1"]["kohya"] if sd is None else _bad(tmp_path, sd, f"v{i}"), 0.6)
        weights.append(pipe.model.state_dict())
    for w in weights[1:]:
        assert all(torch.equal(w[k], v) for k, v in weights[0].items())


def test_records_name_scale_hash(saved, files):
    import hashlib
    pipe = Pipeline.from_pretrained(saved["sd1"]["ldm"])
    path = files["sd1"]["kohya"]
    assert pipe.load_lora(path, 0.8, name="style") == "style"
    data = path.read_bytes()                      # A1111's hash: sha256 of the bytes after the header
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    assert pipe.loras == {"style": (str(path), 0.8, addnet)}
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora(path, 0.5, name="style")
    with pytest.raises(ValueError, match="no LoRA named 'nope'"):
        pipe.unload_lora("nope")


# -- bad input: a clear error, and the weights untouched ---------------------------------------------
def _bad(tmp_path, tensors: dict, name="bad"):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


def _kohya_sd(files, family="sd1"):
    from safetensors.torch import load_file
    return load_file(files[family]["kohya"])


@pytest.mark.parametrize("case,match", [
    ("unmatched", r"match nothing in this model: lora_unet_down_blocks_7_attentions_0_proj_in"),
    ("sdxl", r"another architecture \(SDXL"),
    ("shapes", r"another architecture \(shapes that don't fit"),
    ("truncated", r"not a readable \.safetensors file"),
    ("scale", r"finite"),
    ("not_lora", r"not LoRA keys of a known format"),
    ("loha", r"LoHa"),
])
def test_bad_input_refused_before_any_change(saved, files, tmp_path, case, match):
    pipe = Pipeline.from_pretrained(saved["sd1"]["ldm"])
    pipe.load_lora(files["sd1"]["other"], 0.4)               # a loaded LoRA stays as it was too
    before = {k: v.clone() for k, v in pipe.model.state_dict().items()}
    good = _kohya_sd(files)
    scale = 1.0
    if case == "unmatched":
        path = _bad(tmp_path, {**good, "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 64),
                               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(64, 4)})
    elif case == "sdxl":
        path = _bad(tmp_path, {k.replace("lora_te_", "lora_te1_"): v for k, v in good.items()})
    elif case == "shapes":                                     # a LoRA made for a wider context
        path = _bad(tmp_path, {k: (torch.zeros(v.shape[0], v.shape[1] * 2) if k.endswith("attn2_to_k.lora_down.weight")
                                   else v) for k, v in good.items()})
    elif case == "truncated":
        data = files["sd1"]["kohya"].read_bytes()
        path = tmp_path / "truncated.safetensors"
        path.write_bytes(data[: len(data) // 2])
    elif case == "scale":
        path, scale = files["sd1"]["kohya"], math.nan
    elif case == "not_lora":
        path = _bad(tmp_path, {"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)})
    else:
        path = _bad(tmp_path, {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match=match):
        pipe.load_lora(path, scale)
    after = pipe.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert list(pipe.loras) == ["other"]


# -- the CLI ---------------------------------------------------------------------------------------
def test_cli_lora_flag_and_prompt_tag(saved, files, tmp_path):
    model, f = saved["sd1"]["ldm"], files["sd1"]
    common = ["--model", str(model), "--steps", "3", "--seed", "5", "--sampler", "euler", "-q"]
    ref_pipe = Pipeline.from_pretrained(model)
    ref_pipe.load_lora(f["kohya"], 0.8)
    ref_pipe.load_lora(f["other"])
    ref = np.asarray(ref_pipe("a red circle", steps=3, seed=5, sampler="euler")[0])

    out = tmp_path / "flag.png"
    assert cli(["generate", "a red circle", "-o", str(out), "--lora", f"{f['kohya']}:0.8",
                "--lora", str(f["other"]), *common]) == 0
    img = Image.open(out)
    assert np.array_equal(np.asarray(img), ref)
    h = {n: v[2] for n, v in ref_pipe.loras.items()}
    assert f'Lora hashes: "kohya: {h["kohya"]}, other: {h["other"]}"' in img.text["parameters"]
    assert json.loads(img.text["loras"]) == [
        {"name": "kohya", "path": str(f["kohya"]), "scale": 0.8, "hash": h["kohya"]},
        {"name": "other", "path": str(f["other"]), "scale": 1.0, "hash": h["other"]}]

    out2 = tmp_path / "tag.png"
    assert cli(["generate", "a red <lora:kohya:0.8>circle<lora:other>", "-o", str(out2),
                "--lora-dir", str(f["root"]), *common]) == 0
    img2 = Image.open(out2)
    assert np.array_equal(np.asarray(img2), ref)           # the tags are out of the encoded prompt
    assert img2.text["parameters"].startswith("a red <lora:kohya:0.8>circle<lora:other>\n")
    assert f'Lora hashes: "kohya: {h["kohya"]}, other: {h["other"]}"' in img2.text["parameters"]


@pytest.mark.parametrize("args,match", [
    (["a <lora:kohya:0.5> cat"], "--lora-dir"),
    (["a <lora:missing:0.5> cat", "--lora-dir", "{root}"], "missing.safetensors"),
    (["a cat", "--lora", "{root}/nothere.safetensors:0.5"], "nothere.safetensors"),
    (["a cat", "--lora", "{root}/kohya.safetensors:nan"], "finite"),
])
def test_cli_bad_lora_exits_2_before_the_model_loads(files, tmp_path, capsys, args, match):
    root = str(files["sd1"]["root"])
    args = [a.replace("{root}", root) for a in args]
    rc = cli(["generate", *args, "-o", str(tmp_path / "x.png"), "--model", str(tmp_path / "no-model.safetensors")])
    assert rc == 2
    err = capsys.readouterr().err
    assert match in err and "no-model" not in err           # refused before the model was looked at
