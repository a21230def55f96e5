"""Checkpoint formats under stress: original files that shapes can't describe, the same numbers
whatever the format, a diffusers save killed midway, folders without a tokenizer, and diffusers
configs with missing, invalid or unsupported keys (never silently dropped)."""
import json
import re
import shutil
from dataclasses import replace

import pytest
import torch

from ldm import Pipeline, checkpoint
from ldm.cli import main as cli
from ldm.config import save_yaml
from ldm.presets import sd15, sd21
from ldm.formats import diffusers_folder, files
from ldm.formats.diffusers_configs import text_config_from_diffusers


def _outputs(pipe):
    """UNet (batch 1: the time-embedding linears are matrix-vector products), VAE and text encoder."""
    g = torch.Generator().manual_seed(0)
    cfg = pipe.config
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 77, cfg.unet.context_dim, generator=g)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        return {"unet": pipe.unet(x, torch.tensor([421]), ctx), "decode": pipe.vae.decode(x),
                "encode": pipe.vae.encode(img).mean, "text": pipe.encode_prompt(["a red circle", ""])}


def _assert_same_outputs(a, b):
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- 1. original files whose shapes don't tell the heads ----------------------------------------

def test_original_file_of_unknown_widths_says_what_it_needs(saved, family):
    with pytest.raises(ValueError, match=r"don't tell the UNet's attention heads .* nor the text encoder's "
                                         r"heads .*config="):
        Pipeline.from_pretrained(saved[family]["original"])


@pytest.mark.parametrize("kind", ["LDMConfig", "yaml", "json", "diffusers folder"])
def test_original_file_loads_with_config_of_each_kind(saved, family, kind, tmp_path):
    s = saved[family]
    if kind == "LDMConfig":
        config = s["cfg"]
    elif kind == "yaml":
        config = tmp_path / "model.yaml"
        save_yaml(s["cfg"], config)
    elif kind == "json":
        config = tmp_path / "model.json"
        config.write_text(s["cfg"].to_json())
    else:
        config = s["diffusers"]
    pipe = Pipeline.from_pretrained(s["original"], config=config)
    assert pipe.config.unet == s["cfg"].unet and pipe.config.text_encoder == s["cfg"].text_encoder
    _assert_same_outputs(_outputs(pipe), _outputs(s["pipe"]))


def test_cli_takes_config(saved, tmp_path, capsys):
    s = saved["sd2"]
    dst = tmp_path / "m.safetensors"
    assert cli(["convert", str(s["original"]), str(dst), "--to", "ldm"]) == 2
    assert "--config" in capsys.readouterr().err
    assert cli(["convert", str(s["original"]), str(dst), "--to", "ldm", "--config", str(s["diffusers"])]) == 0
    _assert_same_outputs(_outputs(Pipeline.from_pretrained(dst)), _outputs(s["pipe"]))
    yaml_path = tmp_path / "m.yaml"
    save_yaml(s["cfg"], yaml_path)
    assert cli(["generate", "x", "-o", str(tmp_path / "x.png"), "--model", str(s["original"]), "--steps", "1",
                "--config", str(yaml_path), "-q"]) == 0


def test_config_of_wrong_kind_is_a_clear_error(saved, tmp_path):
    s = saved["sd1"]
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        Pipeline.from_pretrained(s["original"], config=tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("unet: {model_chanels: 3}\n")
    with pytest.raises(ValueError, match="bad.yaml is not a valid ldm config.*model_chanels"):
        Pipeline.from_pretrained(s["original"], config=bad)


# -- 2. same weights, same numbers, whatever the format -----------------------------------------

@pytest.mark.parametrize("fmt", ["ldm", "original", "diffusers"])
def test_every_format_computes_bit_identical_outputs(saved, family, fmt, tmp_path):
    """Loaded from any format, and saved as ldm and loaded again: the outputs of the model itself."""
    s = saved[family]
    want = _outputs(s["pipe"])
    pipe = Pipeline.from_pretrained(s[fmt], config=s["cfg"] if fmt == "original" else None)
    _assert_same_outputs(_outputs(pipe), want)
    pipe.save_pretrained(tmp_path / "again.safetensors")
    _assert_same_outputs(_outputs(Pipeline.from_pretrained(tmp_path / "again.safetensors")), want)


# -- 3. a diffusers save replaces the whole folder or nothing -----------------------------------

def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fail_after_unet(monkeypatch):
    real = diffusers_folder.write_safetensors

    def write(tensors, path, metadata=None):
        if "unet" not in str(path):
            raise OSError("killed")
        real(tensors, path, metadata)
    monkeypatch.setattr(diffusers_folder, "write_safetensors", write)


def test_diffusers_save_failing_midway_keeps_the_old_folder(saved, tmp_path, monkeypatch):
    dst = tmp_path / "model"
    saved["sd1"]["pipe"].save_pretrained(dst, "diffusers")
    before = _snapshot(dst)
    _fail_after_unet(monkeypatch)
    with pytest.raises(OSError, match="killed"):
        saved["sd2"]["pipe"].save_pretrained(dst, "diffusers")
    assert _snapshot(dst) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_diffusers_save_replaces_an_existing_folder(saved, tmp_path, monkeypatch, exchange):
    dst = tmp_path / "model"
    saved["sd1"]["pipe"].save_pretrained(dst, "diffusers")
    (dst / "unet" / "stale.txt").write_text("from the old folder")
    if not exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    saved["sd2"]["pipe"].save_pretrained(dst, "diffusers")
    assert not (dst / "unet" / "stale.txt").exists()
    assert Pipeline.from_pretrained(dst).config.text_encoder.kind == "openclip"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_next_save_cleans_up_after_a_killed_one(saved, tmp_path, monkeypatch):
    dst = tmp_path / "model"
    saved["sd1"]["pipe"].save_pretrained(dst, "diffusers")
    (tmp_path / ".model.tmp-k1ll3d").mkdir()                  # killed while writing
    (tmp_path / ".model.tmp-k1ll3d" / "unet").mkdir()
    saved["sd2"]["pipe"].save_pretrained(dst, "diffusers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # killed between moving the old folder aside and moving the new one in: the next save puts
    # the old one back first, so even if that save fails too, `model` is a complete folder
    before = _snapshot(dst)
    dst.rename(tmp_path / ".model.old-k1ll3d")
    _fail_after_unet(monkeypatch)
    with pytest.raises(OSError, match="killed"):
        saved["sd1"]["pipe"].save_pretrained(dst, "diffusers")
    assert _snapshot(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_diffusers_save_never_replaces_a_folder_that_is_not_a_model(saved, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        saved["sd1"]["pipe"].save_pretrained(tmp_path, "diffusers")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# -- 4. a folder without tokenizer/ pads as its text encoder implies ----------------------------

def test_folder_without_tokenizer_pads_as_its_text_encoder(saved, family, tmp_path):
    s = saved[family]
    folder = tmp_path / "m"
    shutil.copytree(s["diffusers"], folder)
    shutil.rmtree(folder / "tokenizer")
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.config.text_encoder.pad_with == s["cfg"].text_encoder.pad_with  # sd2: zero, sd1: eos
    assert torch.equal(pipe.encode_prompt(["a cat"]), s["pipe"].encode_prompt(["a cat"]))


# -- 5, 6. diffusers configs: every key honoured or refused by name -----------------------------

SD15 = {
    "unet": {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
             "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
             "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
             "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
             "out_channels": 4, "sample_size": 64,
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
    "vae": {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4},
    "text_encoder": {"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
                     "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
                     "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
                     "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
                     "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
                     "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
                     "transformers_version": "4.22.0.dev0", "vocab_size": 49408},
    "tokenizer": {"pad_token": "<|endoftext|>"},
}
SD21 = {
    "unet": {**SD15["unet"], "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
             "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
             "only_cross_attention": False, "sample_size": 96, "upcast_attention": True,
             "use_linear_projection": True},
    "vae": {**SD15["vae"], "_diffusers_version": "0.10.0.dev0", "sample_size": 768},
    "text_encoder": {**SD15["text_encoder"], "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
                     "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
                     "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512,
                     "transformers_version": "4.25.0.dev0"},
    "tokenizer": {"pad_token": "!"},
}


def _config_folder(root, configs):
    """A diffusers folder of config files only (what `diffusers_config` and `load` read first)."""
    for part in ("unet", "vae", "text_encoder"):
        (root / part).mkdir(parents=True, exist_ok=True)
        (root / part / "config.json").write_text(json.dumps(configs[part]))
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(configs["tokenizer"]))
    (root / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"],
                                                       "vae": ["diffusers", "AutoencoderKL"],
                                                       "text_encoder": ["transformers", "CLIPTextModel"]}))
    return root


@pytest.mark.parametrize("configs,make", [(SD15, sd15), (SD21, sd21)], ids=["sd15", "sd21"])
def test_real_sd_configs_are_read_exactly(configs, make, tmp_path):
    cfg, want = diffusers_folder.diffusers_config(_config_folder(tmp_path, configs)), make()
    assert cfg.unet == want.unet and cfg.autoencoder == want.autoencoder and cfg.sample_size == want.sample_size
    # SD2.1's text_encoder says projection_dim 512 (a field SD never uses)
    assert cfg.text_encoder == replace(want.text_encoder, projection_dim=configs["text_encoder"]["projection_dim"])


def test_configs_as_diffusers_and_transformers_write_them_today_are_accepted(saved, family, tmp_path):
    """Every __init__ argument written out, as diffusers 0.3x/0.4x and transformers save them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig
    src = saved[family]["diffusers"]
    folder = tmp_path / "m"
    shutil.copytree(src, folder)
    for part, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(src / part))
        (folder / part / "config.json").write_text(json.dumps(dict(model.config)))
    (folder / "text_encoder" / "config.json").write_text(
        json.dumps(CLIPTextConfig.from_pretrained(src / "text_encoder").to_dict()))
    _assert_same_outputs(_outputs(Pipeline.from_pretrained(folder)), _outputs(saved[family]["pipe"]))


def test_t5_text_encoder_config_is_read_exactly(tmp_path):
    from ldm.config import TextEncoderConfig
    from ldm.text import hf_config_of
    t5 = TextEncoderConfig(kind="t5", vocab_size=32, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=37,
                           d_kv=8, hidden_act="gated-gelu")
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text(json.dumps(hf_config_of(t5).to_dict()))
    assert text_config_from_diffusers(tmp_path) == t5


MISSING = object()


def _edited_folder(saved, tmp_path, part, key, value):
    """The tiny SD1 folder (weights and all) with one config value changed, or removed (MISSING)."""
    folder = tmp_path / "m"
    shutil.copytree(saved["sd1"]["diffusers"], folder)
    path = folder / part / "config.json"
    config = json.loads(path.read_text())
    if value is MISSING:
        del config[key]
    else:
        config[key] = value
    path.write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("part,key,value", [
    ("unet", "block_out_channels", MISSING), ("vae", "latent_channels", MISSING),
    ("text_encoder", "hidden_size", MISSING), ("unet", "cross_attention_dim", MISSING),
    ("unet", "layers_per_block", -1), ("unet", "block_out_channels", [32, -64]),
    ("unet", "block_out_channels", [32, 48]), ("unet", "attention_head_dim", 0),
    ("unet", "attention_head_dim", [2]), ("unet", "in_channels", "four"), ("unet", "norm_num_groups", 0),
    ("unet", "transformer_layers_per_block", [1, 2]), ("unet", "sample_size", [16, 24]),
    ("unet", "down_block_types", ["DownBlock2D", "AttnDownBlock2D"]),
    ("unet", "up_block_types", ["UpBlock2D"] * 2), ("unet", "resnet_time_scale_shift", "ada_group"),
    ("unet", "use_linear_projection", "yes"), ("unet", "num_class_embeds", 0),
    ("vae", "scaling_factor", -0.18215), ("vae", "layers_per_block", 0),
    ("vae", "down_block_types", ["DownEncoderBlock2D"]), ("text_encoder", "num_attention_heads", 0),
    ("text_encoder", "hidden_act", "relu"), ("text_encoder", "num_attention_heads", 7),
])
def test_missing_or_invalid_config_value_is_named(saved, tmp_path, part, key, value):
    with pytest.raises(ValueError, match=rf"{part}/config\.json.*{key}"):
        checkpoint.load(_edited_folder(saved, tmp_path, part, key, value))


@pytest.mark.parametrize("part,key,value", [
    ("unet", "dual_cross_attention", True), ("unet", "class_embed_type", "timestep"),
    ("unet", "time_embedding_type", "fourier"), ("unet", "mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("unet", "attention_type", "gated"), ("unet", "cross_attention_norm", "group_norm"),
    ("unet", "conv_in_kernel", 1), ("unet", "act_fn", "gelu"), ("unet", "norm_eps", 1e-6),
    ("unet", "flip_sin_to_cos", False), ("unet", "freq_shift", 1), ("unet", "center_input_sample", True),
    ("unet", "addition_embed_type", "text_time"), ("unet", "encoder_hid_dim", 768),
    ("unet", "num_attention_heads", 8), ("unet", "resnet_out_scale_factor", 2.0),
    ("unet", "time_cond_proj_dim", 256), ("unet", "mid_block_only_cross_attention", True),
    ("unet", "_class_name", "UNet2DModel"), ("unet", "a_key_from_the_future", 1),
    ("vae", "force_upcast", False), ("vae", "use_quant_conv", False), ("vae", "use_post_quant_conv", False),
    ("vae", "mid_block_add_attention", False), ("vae", "shift_factor", 0.1159), ("vae", "act_fn", "relu"),
    ("vae", "latents_mean", [0.0, 0.0, 0.0, 0.0]), ("vae", "_class_name", "AutoencoderTiny"),
    ("text_encoder", "layer_norm_eps", 1e-6), ("text_encoder", "attention_dropout", 0.1),
    ("text_encoder", "pruned_heads", {"0": [1]}), ("text_encoder", "a_key_from_the_future", True),
])
def test_unsupported_config_key_is_refused_by_name(saved, tmp_path, part, key, value):
    with pytest.raises(ValueError, match=re.escape(f"{part}/config.json: {key}={value!r}")):
        checkpoint.load(_edited_folder(saved, tmp_path, part, key, value))


@pytest.mark.parametrize("part,key,value", [("unet", "upcast_attention", True), ("unet", "only_cross_attention",
                                                                               [False, False])])
def test_config_values_ldm_computes_are_accepted(saved, tmp_path, part, key, value):
    pipe = Pipeline.from_pretrained(_edited_folder(saved, tmp_path, part, key, value))
    _assert_same_outputs(_outputs(pipe), _outputs(saved["sd1"]["pipe"]))
