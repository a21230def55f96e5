"""Configs: strict loading (typos fail), overrides typed against the dataclass, presets."""
import pytest

from ldm.config import LDMConfig, apply_overrides, from_dict, load_yaml, save_yaml, sd15, sd21, tiny
from ldm.train_config import TrainConfig


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
