"""Checkpoint formats: bit-exact round trips, strict loading with clear errors, config inference
from shapes, and a key/shape manifest of full-size SD1.5 / SD2.1 built on the meta device."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm import LatentDiffusion, Pipeline
from ldm.formats import files
from ldm.formats.diffusers_configs import unet_config_to_diffusers, vae_config_to_diffusers
from ldm.formats.diffusers_scheduler import schedule_from_diffusers, schedule_to_diffusers
from ldm.formats.original import infer_config, to_original
from ldm.cli import main as cli
from ldm.presets import sd15, sd21

DATA = Path(__file__).parent / "data"


def _state(pipe):
    return {k: v for k, v in pipe.model.state_dict().items()}


# diffusers' SD2 text_encoder is a CLIPTextModel without OpenCLIP's unused last layer,
# text_projection and logit_scale: those (and only those) don't survive a diffusers folder.
NOT_IN_DIFFUSERS = ("cond_stage_model.model.transformer.resblocks.2.", "cond_stage_model.model.text_projection",
                    "cond_stage_model.model.logit_scale")


def _assert_same(a: dict, b: dict, skip=()):
    assert a.keys() == b.keys()
    for k in a:
        if not k.startswith(skip):
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fmt", ["ldm", "original", "diffusers"])
def test_round_trip_is_bit_exact(saved, family, fmt):
    s = saved[family]
    pipe = Pipeline.from_pretrained(s[fmt], config=s["cfg"] if fmt == "original" else None)
    _assert_same(_state(pipe), _state(s["pipe"]), NOT_IN_DIFFUSERS if fmt == "diffusers" else ())
    if fmt == "ldm":
        assert pipe.config == s["cfg"]  # the file alone rebuilds the model


def test_original_config_inferred_from_shapes(saved, family):
    s = saved[family]
    raw, _ = files.read_safetensors(s["original"])
    heads = dict(num_heads=2) if family == "sd1" else dict(num_heads=-1, num_head_channels=16)
    inferred = infer_config(raw, s["cfg"].schedule.prediction_type, sample_size=32, text_num_heads=2,
                                       **heads)
    want = s["cfg"]
    assert inferred.unet == want.unet and inferred.autoencoder == want.autoencoder
    assert inferred.text_encoder == want.text_encoder


@pytest.mark.parametrize("to", ["ldm", "original", "diffusers"])
def test_cli_convert_between_all_formats(saved, tmp_path, to):
    s = saved["sd2"]
    for src in ("ldm", "diffusers"):
        dst = tmp_path / (f"{src}-out" + ("" if to == "diffusers" else ".safetensors"))
        assert cli(["convert", str(s[src]), str(dst), "--to", to]) == 0
        back = Pipeline.from_pretrained(dst, config=s["cfg"] if to == "original" else None)
        lossy = src == "diffusers" or to == "diffusers"
        _assert_same(_state(back), _state(s["pipe"]), NOT_IN_DIFFUSERS if lossy else ())


@pytest.mark.parametrize("name,make", [("sd15", sd15), ("sd21", sd21)])
def test_full_size_key_manifest(name, make):
    """Key drift at real SD sizes, without weights: our original-layout keys and shapes."""
    with torch.device("meta"):
        model = LatentDiffusion(make())
    got = {k: list(v.shape) for k, v in to_original(model.state_dict(), make()).items()}
    want = json.loads((DATA / f"{name}_keys.json").read_text())
    assert got == want
    meta = {k: torch.empty(v, device="meta") for k, v in want.items()}
    inferred = infer_config(meta, make().schedule.prediction_type)
    assert inferred.unet == make().unet and inferred.autoencoder == make().autoencoder
    assert inferred.text_encoder == make().text_encoder


@pytest.mark.parametrize("name,make", [("sd15", sd15), ("sd21", sd21)])
def test_manifest_is_what_diffusers_converts(name, make):
    """diffusers' own original->diffusers converters map the manifest exactly onto its models."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    cfg = make()
    meta = {k: torch.empty(v, device="meta") for k, v in json.loads((DATA / f"{name}_keys.json").read_text()).items()}
    ucfg = unet_config_to_diffusers(cfg.unet, cfg.latent_size)
    vcfg = vae_config_to_diffusers(cfg.autoencoder, cfg.sample_size)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(ucfg)
        vae = AutoencoderKL.from_config(vcfg)
    conv_u = convert_ldm_unet_checkpoint(meta, ucfg)
    conv_v = convert_ldm_vae_checkpoint(meta, vcfg)
    assert {k: tuple(v.shape) for k, v in conv_u.items()} == {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert set(conv_v) == set(vae.state_dict())


# -- strictness and bad files --------------------------------------------------------------------

def _corrupt(saved, tmp_path, edit):
    raw, meta = files.read_safetensors(saved["sd1"]["ldm"])
    edit(raw)
    path = tmp_path / "bad.safetensors"
    save_file(raw, str(path), metadata=meta)
    return path


def test_missing_key_is_named(saved, tmp_path):
    path = _corrupt(saved, tmp_path, lambda sd: sd.pop("model.diffusion_model.out.2.weight"))
    with pytest.raises(ValueError, match=r"1 missing \[model\.diffusion_model\.out\.2\.weight\]"):
        Pipeline.from_pretrained(path)


def test_unexpected_and_mismatched_keys_are_named(saved, tmp_path):
    def edit(sd):
        sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
        sd["first_stage_model.quant_conv.bias"] = torch.zeros(3)
    path = _corrupt(saved, tmp_path, edit)
    with pytest.raises(ValueError, match=r"unexpected \[model\.diffusion_model\.extra\.weight\].*"
                                         r"mismatched \[first_stage_model\.quant_conv\.bias: \(3,\) vs \(8,\)\]"):
        Pipeline.from_pretrained(path)


def test_config_that_does_not_fit_is_an_error(saved):
    s = saved["sd1"]
    wrong = replace(s["cfg"], unet=replace(s["cfg"].unet, model_channels=64))
    with pytest.raises(ValueError, match="does not fit the model config"):
        Pipeline.from_pretrained(s["original"], config=wrong)


def test_truncated_file_is_a_clear_error(saved, tmp_path):
    data = Path(saved["sd1"]["ldm"]).read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Pipeline.from_pretrained(path)
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Pipeline.from_pretrained(path)


def test_invalid_config_metadata_is_a_clear_error(saved, tmp_path):
    raw, meta = files.read_safetensors(saved["sd1"]["ldm"])
    cfg = json.loads(meta["ldm_config"])
    cfg["unet"]["model_chanels"] = 32
    path = tmp_path / "typo.safetensors"
    save_file(raw, str(path), metadata={**meta, "ldm_config": json.dumps(cfg)})
    with pytest.raises(ValueError, match="model_chanels"):
        Pipeline.from_pretrained(path)


def test_pickle_refused_unless_opted_in(saved, tmp_path):
    raw, _ = files.read_safetensors(saved["sd1"]["original"])
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": raw, "global_step": 7}, path)
    with pytest.raises(ValueError, match="pickle"):
        Pipeline.from_pretrained(path, config=saved["sd1"]["cfg"])
    pipe = Pipeline.from_pretrained(path, config=saved["sd1"]["cfg"], allow_pickle=True)
    _assert_same(_state(pipe), _state(saved["sd1"]["pipe"]))


def test_ema_weights_extracted_on_request(saved, tmp_path):
    raw, _ = files.read_safetensors(saved["sd1"]["original"])
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1
           for k, v in raw.items() if k.startswith("model.diffusion_model.")}
    path = tmp_path / "ema.safetensors"
    save_file({**raw, **ema}, str(path))
    cfg = saved["sd1"]["cfg"]
    plain = Pipeline.from_pretrained(path, config=cfg)
    with_ema = Pipeline.from_pretrained(path, config=cfg, use_ema=True)
    k = "out.2.bias"
    assert torch.equal(with_ema.unet.state_dict()[k], plain.unet.state_dict()[k] + 1)


def test_save_is_atomic(saved, tmp_path, monkeypatch):
    """A failure mid-write leaves the previous file intact and no temporary file behind."""
    path = tmp_path / "m.safetensors"
    saved["sd1"]["pipe"].save_pretrained(path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(files, "save_file", boom)
    with pytest.raises(OSError):
        saved["sd2"]["pipe"].save_pretrained(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_zero_terminal_snr_survives_diffusers_scheduler_configs():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from ldm.config import ScheduleConfig
    from ldm.schedule import alphas_cumprod
    cfg = ScheduleConfig(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    sched = DDIMScheduler.from_config(schedule_to_diffusers(cfg))
    assert sched.config.rescale_betas_zero_snr and sched.alphas_cumprod[-1].item() < 1e-9
    assert torch.allclose(sched.alphas_cumprod, alphas_cumprod(cfg).float(), rtol=1e-5, atol=1e-10)
    # a diffusers folder's scheduler_config.json, whatever scheduler class wrote it
    other = DPMSolverMultistepScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                        rescale_betas_zero_snr=True, beta_schedule="scaled_linear",
                                        beta_start=0.00085, beta_end=0.012, steps_offset=1)
    read, sampler = schedule_from_diffusers(dict(other.config))
    assert sampler == "ddim" and alphas_cumprod(read).equal   # a bare config names no class(alphas_cumprod(cfg))
    assert (read.prediction_type, read.timestep_spacing, read.rescale_betas_zero_snr) == (
        "v_prediction", "trailing", True)
    assert not schedule_from_diffusers({})[0].rescale_betas_zero_snr
