"""Configs: strict loading (typos fail), overrides typed against the dataclass, values validated
when built, presets."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from ldm.formats.files import read_safetensors
from ldm.cli import main as cli
from ldm.config import LDMConfig, apply_overrides, from_dict, load_yaml, save_yaml
from ldm.presets import sd15, sd21, tiny
from ldm.training.config import TrainConfig
from tiny_models import FAMILIES

REPO = Path(__file__).resolve().parent.parent


def test_overrides_are_parsed_and_type_checked():
    cfg = apply_overrides(sd15(), ["unet.model_channels=64", "--unet.use_linear_in_transformer=true",
                                   "schedule.beta_end=2e-2", "unet.channel_mult=[1, 2]",
                                   "unet.num_classes=null", "text_encoder.kind=openclip"])
    assert cfg.unet.model_channels == 64 and cfg.unet.use_linear_in_transformer is True
    assert cfg.schedule.beta_end == 0.02 and cfg.unet.channel_mult == (1, 2)
    assert cfg.unet.num_classes is None and cfg.text_encoder.kind == "openclip"
    with pytest.raises(ValueError, match="unknown config key 'unet.model_chanels'"):
        apply_overrides(sd15(), ["unet.model_chanels=64"])
    with pytest.raises(TypeError, match="unet.model_channels: expected int"):
        apply_overrides(sd15(), ["unet.model_channels=wide"])


def test_empty_override_is_the_empty_string():
    assert apply_overrides(TrainConfig(), ["model_preset="]).model_preset == ""
    with pytest.raises(TypeError, match="model_preset: expected str"):
        apply_overrides(TrainConfig(), ["model_preset=null"])


def test_unknown_nested_key_names_its_path():
    d = tiny().to_dict()
    d["unet"]["heads"] = 3
    with pytest.raises(ValueError, match=r"unet\.heads"):
        from_dict(LDMConfig, d)


def test_removed_experiments_load_switched_off_and_are_refused_on(tmp_path):
    # files written before the removals (the default model's until its upsampler) name both, off
    d = tiny().to_dict()
    d["text_encoder"]["bidirectional"] = False
    assert LDMConfig.from_dict({**d, "matcher": None}) == tiny()
    (tmp_path / "c.yaml").write_text(json.dumps(d))  # JSON is YAML
    assert LDMConfig.from_dict(d) == load_yaml(LDMConfig, tmp_path / "c.yaml") == tiny()
    assert apply_overrides(tiny(), ["text_encoder.bidirectional=false"]) == tiny()
    d["text_encoder"]["bidirectional"] = True
    message = (r"text_encoder.bidirectional=True turns on a bidirectional CLIP text encoder .*an experiment since "
               r"removed from ldm \(ldm 0.1.0 at commit b2dd828 has it\); only text_encoder.bidirectional=False")
    with pytest.raises(ValueError, match=message):
        LDMConfig.from_dict(d)
    with pytest.raises(ValueError, match=message):
        apply_overrides(tiny(), ["text_encoder.bidirectional=true"])
    with pytest.raises(ValueError, match=r"matcher=\{.*noised image-text matcher.*commit 3417574 has it"):
        LDMConfig.from_dict({**tiny().to_dict(), "matcher": {"width": 64}})


@pytest.mark.parametrize("make", [sd15, sd21, tiny])
def test_yaml_and_json_round_trip(make, tmp_path):
    cfg = make()
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(LDMConfig, tmp_path / "c.yaml") == cfg
    assert LDMConfig.from_json(cfg.to_json()) == cfg


def test_presets_describe_sd():
    assert sd15().unet.heads_at(640) == (8, 80) and sd21().unet.heads_at(640) == (10, 64)
    assert sd15().latent_size == 64 and sd21().sample_size == 768
    assert sd21(v_prediction=False).schedule.prediction_type == "epsilon"


@pytest.mark.parametrize("override,message", [
    ("unet.num_res_blocks=-1", "UNetConfig.num_res_blocks must be >= 1, got -1"),
    ("unet.model_channels=0", "UNetConfig.model_channels must be >= 1, got 0"),
    ("unet.channel_mult=[]", r"UNetConfig.channel_mult must be a non-empty list of integers >= 1, got \(\)"),
    ("unet.num_heads=3", r"UNetConfig.num_heads must be a divisor of the attention widths \[64\].*got 3"),
    ("unet.num_head_channels=24", r"UNetConfig.num_head_channels must be -1 .*or a divisor of .*\[64\], got 24"),
    ("unet.norm_groups=24", r"UNetConfig.norm_groups must be a divisor of every width >= it among \[32, 64, 96, 128\]"),
    ("autoencoder.norm_groups=24", r"AutoencoderConfig.norm_groups must be a divisor of every width >= it among"),
    ("autoencoder.ch_mult=[1, 0]", "AutoencoderConfig.ch_mult must be a non-empty list"),
    ("autoencoder.scale_factor=0", "AutoencoderConfig.scale_factor must be a finite number > 0, got 0.0"),
    ("text_encoder.num_heads=3", "TextEncoderConfig.num_heads must be a divisor of hidden_size=32, got 3"),
    ("text_encoder.num_layers=0", "TextEncoderConfig.num_layers must be >= 1, got 0"),
    ("text_encoder.kind=bert", "TextEncoderConfig.kind must be one of clip, openclip, t5, got 'bert'"),
    ("sample_size=0", "LDMConfig.sample_size must be a positive multiple of the autoencoder's downsampling factor 2"),
    ("sample_size=33", "LDMConfig.sample_size must be a positive multiple .* factor 2, got 33"),
    ("default_steps=0", "LDMConfig.default_steps must be >= 1, got 0"),
    ("default_guidance_scale=-1", r"LDMConfig.default_guidance_scale must be a finite number >= 0 .*got -1.0"),
])
def test_nonsensical_values_fail_when_the_config_is_built(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(tiny(), [override])


def test_values_are_checked_in_files_and_valid_presets_pass():
    d = tiny().to_dict()
    d["unet"]["num_res_blocks"] = -1
    with pytest.raises(ValueError, match="UNetConfig.num_res_blocks must be >= 1, got -1"):
        LDMConfig.from_dict(d)
    # every shipped config still validates: the presets, the test families, the default model
    for make in (sd15, sd21, lambda: sd21(v_prediction=False), tiny, *FAMILIES.values()):
        make()
    _, meta = read_safetensors(REPO / "weights" / "ldm-default.safetensors")
    assert LDMConfig.from_json(meta["ldm_config"]).autoencoder.downsample_factor == 32  # pixel_scale 8
    load_yaml(LDMConfig, REPO / "configs" / "default_model.yaml")
    # SD2: a fixed head width, num_heads unused (-1)
    assert sd21().unet.num_heads == -1 and sd21().unet.heads_at(1280) == (20, 64)
    with pytest.raises(ValueError, match="UNetConfig.num_heads must be a divisor"):
        replace(sd21().unet, num_head_channels=-1)


def test_convert_refuses_a_nonsensical_setting_and_writes_nothing(saved, tmp_path, capsys):
    dst = tmp_path / "out.safetensors"
    assert cli(["convert", str(saved["sd1"]["ldm"]), str(dst), "--to", "ldm", "--set", "default_steps=0"]) == 2
    assert "default_steps must be >= 1, got 0" in capsys.readouterr().err
    assert cli(["convert", str(saved["sd1"]["ldm"]), str(dst), "--to", "ldm", "--set", "default_sampler=foo"]) == 2
    assert "default_sampler must be one of ddpm, ddim, pndm" in capsys.readouterr().err
    assert not dst.exists()
