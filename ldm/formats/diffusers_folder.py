"""A diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/): its
config, and its weights read into and written from our module's state dict."""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from .. import text
from ..config import AutoencoderConfig, LDMConfig, ScheduleConfig, TextEncoderConfig
from ..presets import x4_upscaler
from . import diffusers_keys, unclip_parts
from .diffusers_configs import (text_config_from_diffusers, unet_config_from_diffusers, unet_config_to_diffusers,
                                vae_config_from_diffusers, vae_config_to_diffusers)
from .diffusers_scheduler import schedule_from_diffusers, schedule_to_diffusers
from .files import atomic_write_dir, read_json, read_safetensors, read_state_dict, write_json, write_safetensors
from .keys import TEXT, UNET, VAE, split


def text_from_diffusers(sd: dict, cfg: TextEncoderConfig) -> dict:
    if cfg.kind == "clip":
        return text.clip_diffusers_to_ours(sd)
    if cfg.kind == "openclip":
        return text.hf_clip_to_openclip(sd, cfg.num_layers, cfg.projection_dim)
    return {"transformer." + k: v for k, v in sd.items()}


def text_to_diffusers(sd: dict, cfg: TextEncoderConfig) -> tuple[dict, dict]:
    if cfg.kind == "clip":
        out, arch = text.clip_ours_to_diffusers(sd), "CLIPTextModel"
    elif cfg.kind == "openclip":
        out, arch = text.openclip_to_hf_clip(sd), "CLIPTextModel"
        out = {"text_model." + k: v for k, v in out.items()}
    else:
        out, arch = split(sd, "transformer."), "T5EncoderModel"
    hf = text.hf_config_of(cfg).to_dict()
    hf["architectures"] = [arch]
    return out, hf


def _read_folder_weights(folder: Path, allow_pickle: bool) -> dict:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return read_safetensors(folder / name)[0]
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name, allow_pickle)[0]
    raise FileNotFoundError(f"no weights (*.safetensors) in {folder}")


def diffusers_config(folder: Path) -> LDMConfig:
    """The config of a diffusers folder, from its config files alone (no weights are read)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{folder} is not a diffusers model folder (no model_index.json)")
    index = read_json(folder / "model_index.json")
    extra = unclip_parts.diffusers_fields(folder, index)     # variations / unCLIP: their parts' fields
    for part in ("unet", "vae") if "text_encoder" in extra else ("unet", "vae", "text_encoder"):
        if part not in index:
            raise ValueError(f"{folder}/model_index.json names no {part}: not a SD 1.x/2.x pipeline")
    vae_path, unet_path = folder / "vae" / "config.json", folder / "unet" / "config.json"
    vae_cfg = vae_config_from_diffusers(read_json(vae_path), str(vae_path))
    unet_cfg, size = unet_config_from_diffusers(read_json(unet_path), vae_cfg.downsample_factor, str(unet_path))
    text_cfg = extra.pop("text_encoder") if "text_encoder" in extra else text_config_from_diffusers(folder)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched, sampler = (schedule_from_diffusers(read_json(sched_path), str(sched_path)) if sched_path.is_file()
                      else (ScheduleConfig(), "ddim"))
    parts = _upscaler_config(folder, index, vae_cfg)
    try:
        return LDMConfig(unet=unet_cfg, text_encoder=text_cfg, schedule=sched, sample_size=size,
                         default_sampler=sampler, **parts, **extra)
    except ValueError as e:
        raise ValueError(f"{folder}: {e}") from e


def _upscaler_config(folder: Path, index: dict, vae: AutoencoderConfig) -> dict:
    """The autoencoder, and for a StableDiffusionUpscalePipeline folder its low_res_schedule and max_noise_level."""
    if "low_res_scheduler" not in index:
        if index.get("_class_name") == UPSCALE:
            raise ValueError(f"{folder}/model_index.json: a {UPSCALE} names no low_res_scheduler")
        return {"autoencoder": vae}
    path = folder / "low_res_scheduler" / "scheduler_config.json"
    level = index.get("max_noise_level", 350)  # the pipeline's default
    if not isinstance(level, int) or isinstance(level, bool):
        raise ValueError(f"{folder}/model_index.json: max_noise_level={level!r} is invalid: expected an integer")
    scale = x4_upscaler().autoencoder.scale_factor  # diffusers' upscale pipeline sets it, absent or not
    if read_json(folder / "vae" / "config.json").get("scaling_factor", scale) != scale:
        warnings.warn(f"{folder}/vae/config.json: scaling_factor={vae.scale_factor}: {UPSCALE} uses {scale} "
                      f"whatever the file says, and so does ldm")
    return {"autoencoder": replace(vae, scale_factor=scale), "max_noise_level": level,
            "low_res_schedule": schedule_from_diffusers(read_json(path), str(path))[0]}


UPSCALE = "StableDiffusionUpscalePipeline"
# the diffusers pipeline of each kind of model (LDMConfig.image_conditioning)
PIPELINES = {None: "StableDiffusionPipeline", "inpaint": "StableDiffusionInpaintPipeline", "upscale": UPSCALE}


def _model_index(cfg: LDMConfig, scheduler: str, text_encoder: str | None, version: dict,
                 embedding_index: dict) -> dict:
    """model_index.json: the pipeline class of the model's kind and its components."""
    kind = cfg.image_conditioning
    out = {"_class_name": unclip_parts.pipeline_class(cfg) or PIPELINES[kind], **version, "feature_extractor": [None, None],
           "safety_checker": [None, None], "scheduler": ["diffusers", scheduler],
           "text_encoder": ["transformers", text_encoder], "tokenizer": ["transformers", "CLIPTokenizer"],
           "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if kind == "upscale":
        return {**out, "low_res_scheduler": ["diffusers", "DDPMScheduler"], "max_noise_level": cfg.max_noise_level,
                "watermarker": [None, None]}
    out = {**out, "image_encoder": [None, None], "requires_safety_checker": False, **embedding_index}
    if cfg.text_encoder is None:          # an image-variation model: the image embedding alone
        del out["text_encoder"], out["tokenizer"]
    if cfg.image_embedding == "unclip":   # diffusers' unCLIP pipelines take no safety checker
        out = {k: v for k, v in out.items() if v not in ([None, None], False)}
    return out


def load_diffusers(folder: Path, allow_pickle: bool = False) -> tuple[LDMConfig, dict]:
    cfg = diffusers_config(folder)
    sd = {UNET + k: v for k, v in diffusers_keys.unet_from_diffusers(
        _read_folder_weights(folder / "unet", allow_pickle), cfg.unet).items()}
    sd.update({VAE + k: v for k, v in diffusers_keys.vae_from_diffusers(
        _read_folder_weights(folder / "vae", allow_pickle), cfg.autoencoder).items()})
    if cfg.text_encoder is not None:
        sd.update({TEXT + k: v for k, v in text_from_diffusers(
            _read_folder_weights(folder / "text_encoder", allow_pickle), cfg.text_encoder).items()})
    sd.update(unclip_parts.load_diffusers(folder, cfg, lambda f: _read_folder_weights(f, allow_pickle)))
    return cfg, sd


def save_diffusers(sd: dict, cfg: LDMConfig, folder: Path) -> None:
    import diffusers
    folder, version = Path(folder), {"_diffusers_version": diffusers.__version__}
    # every conversion before any write: a model diffusers can't express leaves no half-written folder
    te_sd, te_config = (text_to_diffusers(split(sd, TEXT), cfg.text_encoder) if cfg.text_encoder is not None
                        else (None, {"architectures": [None]}))
    embedding_parts, embedding_schedulers, embedding_index = unclip_parts.diffusers_parts(sd, cfg, version)
    parts = {"unet": (diffusers_keys.unet_to_diffusers(split(sd, UNET), cfg.unet),
                      {**unet_config_to_diffusers(cfg.unet, cfg.latent_size), **version}),
             "vae": (diffusers_keys.vae_to_diffusers(split(sd, VAE), cfg.autoencoder),
                     {**vae_config_to_diffusers(cfg.autoencoder, cfg.sample_size), **version})}
    scheduler = schedule_to_diffusers(cfg.schedule, cfg.default_sampler)
    index = _model_index(cfg, scheduler["_class_name"], te_config["architectures"][0], version, embedding_index)
    configs = {"scheduler": scheduler, **embedding_schedulers}
    if cfg.low_res_schedule is not None:
        configs["low_res_scheduler"] = schedule_to_diffusers(cfg.low_res_schedule, "ddpm")
    # the save replaces the whole folder: never one that isn't a model (a typo'd home directory)
    if folder.exists() and not (folder / "model_index.json").is_file() and \
            not (folder.is_dir() and not any(folder.iterdir())):
        raise ValueError(f"{folder} exists and is not a diffusers model folder (no model_index.json): not "
                         f"replacing it; save to a new or empty folder")

    def write(tmp: Path) -> None:
        for name, (weights, config) in parts.items():
            write_safetensors(weights, tmp / name / "diffusion_pytorch_model.safetensors")
            write_json(config, tmp / name / "config.json")
        for name, (weights, config, file) in embedding_parts.items():   # image encoder, normaliser, prior
            if weights is not None:
                write_safetensors(weights, tmp / name / file, {"format": "pt"})
            write_json(config, tmp / name / ("config.json" if weights is not None else file))
        if cfg.prior_text_encoder is not None:
            text.save_hf_tokenizer(tmp / "prior_tokenizer", cfg.prior_text_encoder.pad_with,
                                   cfg.prior_text_encoder.max_length)
        for name, config in configs.items():
            write_json({**config, **version}, tmp / name / "scheduler_config.json")
        if cfg.text_encoder is not None:
            write_safetensors(te_sd, tmp / "text_encoder" / "model.safetensors", {"format": "pt"})
            write_json(te_config, tmp / "text_encoder" / "config.json")
            text.save_hf_tokenizer(tmp / "tokenizer", cfg.text_encoder.pad_with, cfg.text_encoder.max_length)
        write_json(index, tmp / "model_index.json")

    atomic_write_dir(folder, write)
