"""The DALL·E 2 family's parts in the three formats. Diffusers folders: `image_encoder/` and
`feature_extractor/` (image variations, unCLIP img2img), `image_normalizer/` and
`image_noising_scheduler/` (Stable unCLIP), `prior/`, `prior_text_encoder/`, `prior_tokenizer/` and
`prior_scheduler/` (StableUnCLIPPipeline). Original single files (SD 2.1-unclip): `embedder.model.visual.*`
(open_clip's layout) and `noise_augmentor.*`. Our module's keys: `embedder.clip.*`,
`noise_augmentor.data_mean/std`, `prior.transformer.*`, `prior.text_encoder.*`."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from .. import text
from ..config import ScheduleConfig
from ..image_config import ImageEncoderConfig, PriorConfig
from ..image_encoder import config_from_hf, hf_to_openclip_visual, hf_vision_config, openclip_visual_to_hf
from .diffusers_scheduler import schedule_from_diffusers, schedule_to_diffusers
from .files import read_json
from .keys import split

EMBEDDER, AUGMENTOR, PRIOR = "embedder.clip.", "noise_augmentor.", "prior."
VISUAL = "embedder.model.visual."           # SD 2.1-unclip's open_clip image tower
VARIATION, UNCLIP_IMG2IMG, UNCLIP = ("StableDiffusionImageVariationPipeline", "StableUnCLIPImg2ImgPipeline",
                                     "StableUnCLIPPipeline")
# SD 2.1-unclip's noise augmentation (its yaml's noise_schedule_config); diffusers' image_noising_scheduler
UNCLIP_NOISE = ScheduleConfig(beta_schedule="squaredcos_cap_v2", steps_offset=0)
# the image towers of SD 2.1-unclip's two files, by width: (heads, activation); the shapes tell the rest.
# -l: OpenAI's CLIP ViT-L/14 (quick_gelu); -h: OpenCLIP ViT-H/14 (gelu)
TOWERS = {1024: (16, "quick_gelu"), 1280: (16, "gelu")}
_PRIOR_FIXED = {"dropout": 0.0, "time_embed_act_fn": "silu", "norm_in_type": None, "embedding_proj_norm_type": None,
                "encoder_hid_proj_type": "linear", "added_emb_type": "prd", "time_embed_dim": None,
                "embedding_proj_dim": None, "clip_embed_dim": None}


def pipeline_class(cfg) -> str | None:
    """The diffusers pipeline of a model with image embeddings (None without)."""
    if cfg.image_embedding is None:
        return None
    return VARIATION if cfg.image_embedding == "context" else UNCLIP if cfg.prior is not None else UNCLIP_IMG2IMG


# --- original single files ----------------------------------------------------------------------

def from_original(sd: dict) -> dict:
    """embedder.model.visual.* -> embedder.clip.*; the rest of open_clip's model (its text tower) and the
    noise augmentor's schedule buffers (recomputed from embedding_noise_schedule) dropped. SD's
    CLIPEmbeddingNoiseAugmentation keeps data_mean/std out of the file (non-persistent buffers, loaded
    from its yaml's clip_stats_path, which the -h/-l inference yamls don't set): absent, they are
    0 and 1, as that code and ComfyUI use them."""
    out = {k: v for k, v in sd.items() if not k.startswith(("embedder.", AUGMENTOR))}
    out.update({EMBEDDER + k: v for k, v in openclip_visual_to_hf(split(sd, VISUAL)).items()})
    stats = {k: v for k, v in sd.items() if k in (AUGMENTOR + "data_mean", AUGMENTOR + "data_std")}
    first = sd.get("model.diffusion_model.label_emb.0.0.weight")
    if not stats and first is not None and any(k.startswith(AUGMENTOR) for k in sd):
        dim = first.shape[1] // 2
        stats = {AUGMENTOR + "data_mean": torch.zeros(1, dim), AUGMENTOR + "data_std": torch.ones(1, dim)}
    return {**out, **stats}


def to_original(sd: dict) -> dict:
    out = {k: v for k, v in sd.items() if not k.startswith(EMBEDDER)}
    return {**out, **{VISUAL + k: v for k, v in hf_to_openclip_visual(split(sd, EMBEDDER)).items()}}


def infer_original(sd: dict) -> dict:
    """The LDMConfig fields of an original unCLIP file (label_emb an MLP, an open_clip image tower), from
    its shapes; {} for any other file."""
    first = sd.get("model.diffusion_model.label_emb.0.0.weight")
    if first is None or VISUAL + "conv1.weight" not in sd:
        return {}
    v = split(sd, VISUAL)
    width, _, patch, _ = v["conv1.weight"].shape
    grid = int(round((v["positional_embedding"].shape[0] - 1) ** 0.5))
    layers = len({k.split(".")[2] for k in v if k.startswith("transformer.resblocks.")})
    if int(width) not in TOWERS:
        raise ValueError(f"{VISUAL}*: an image tower of width {int(width)} is neither ViT-L/14 (1024) nor ViT-H/14 "
                         f"(1280), whose heads ldm knows: pass the model's config (a diffusers folder)")
    heads, act = TOWERS[int(width)]
    enc = ImageEncoderConfig(hidden_size=int(width), num_layers=layers, num_heads=heads,
                             intermediate_size=int(v["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                             image_size=grid * int(patch), patch_size=int(patch),
                             projection_dim=int(v["proj"].shape[1]), hidden_act=act)
    return dict(image_embedding="unclip", image_encoder=enc, embedding_noise_schedule=UNCLIP_NOISE,
                adm_in_channels=int(first.shape[1]))


# --- diffusers folders --------------------------------------------------------------------------

def _schedule(folder: Path, name: str) -> ScheduleConfig:
    path = folder / name / "scheduler_config.json"
    d = dict(read_json(path))
    if d.get("variance_type") == "fixed_small_log":   # exp(½ log β̃) = √β̃: the prior's, the same numbers
        d["variance_type"] = "fixed_small"
    return schedule_from_diffusers(d, str(path))[0]


def _image_encoder(folder: Path) -> ImageEncoderConfig:
    d = read_json(folder / "image_encoder" / "config.json")
    fe_path = folder / "feature_extractor" / "preprocessor_config.json"
    fe = read_json(fe_path) if fe_path.is_file() else {}
    cfg = config_from_hf(d, fe.get("image_mean"), fe.get("image_std"))
    sizes = {s.get("shortest_edge", s.get("height")) if isinstance(s, dict) else s
             for s in (fe.get("size"), fe.get("crop_size")) if s is not None}
    if sizes - {cfg.image_size}:
        raise ValueError(f"{fe_path}: size/crop_size {sorted(sizes)}: ldm preprocesses at the encoder's image_size "
                         f"({cfg.image_size})")
    return cfg


def _pad_with(tokenizer: Path) -> str:
    """How the prior's tokenizer pads: Karlo's (OpenAI CLIP's) with the end token; "!" (id 0) as SD2's."""
    path = tokenizer / "tokenizer_config.json"
    pad = read_json(path).get("pad_token", "<|endoftext|>") if path.is_file() else "<|endoftext|>"
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if pad not in ("<|endoftext|>", "!"):
        raise ValueError(f"{path}: pad_token {pad!r}: ldm's CLIP tokenizer pads with '<|endoftext|>' or '!'")
    return "eos" if pad == "<|endoftext|>" else "zero"


def diffusers_fields(folder: Path, index: dict) -> dict:
    """LDMConfig fields of a variation / unCLIP folder ({} for any other pipeline)."""
    cls = index.get("_class_name")
    if cls not in (VARIATION, UNCLIP_IMG2IMG, UNCLIP):
        return {}
    out = dict(image_embedding="context" if cls == VARIATION else "unclip")
    if (folder / "image_encoder" / "config.json").is_file():
        out["image_encoder"] = _image_encoder(folder)
    if cls == VARIATION:
        return {**out, "text_encoder": None}
    out["embedding_noise_schedule"] = _schedule(folder, "image_noising_scheduler")
    if cls == UNCLIP:
        p = read_json(folder / "prior" / "config.json")
        odd = {k: p[k] for k, v in _PRIOR_FIXED.items() if p.get(k, v) != v}
        if odd:
            raise ValueError(f"{folder}/prior/config.json: {odd} is not Karlo's unCLIP prior, which ldm implements")
        out["prior"] = PriorConfig(**{k: p[k] for k in ("num_attention_heads", "attention_head_dim", "num_layers",
                                                        "embedding_dim", "num_embeddings", "additional_embeddings")})
        te = read_json(folder / "prior_text_encoder" / "config.json")
        out["prior_text_encoder"] = text.text_config_from_hf(te, "clip", "last", _pad_with(folder / "prior_tokenizer"))
        prior_schedule = out["prior_schedule"] = _schedule(folder, "prior_scheduler")
        if prior_schedule.prediction_type != "sample" or prior_schedule.timestep_spacing not in (None, "leading") \
                or prior_schedule.rescale_betas_zero_snr:
            raise ValueError(f"{folder}/prior_scheduler: ldm's prior sampler is Karlo's DDPM (prediction_type "
                             f"'sample', 'leading' timesteps, no zero-SNR rescale), got {prior_schedule}")
    return out


def load_diffusers(folder: Path, cfg, read) -> dict:
    """Our keys of the parts' weights; read(subfolder) -> its state dict."""
    sd = {}
    if cfg.image_encoder is not None:
        sd.update({EMBEDDER + k: v for k, v in read(folder / "image_encoder").items()})
    if cfg.image_embedding == "unclip":
        norm = read(folder / "image_normalizer")
        sd.update({AUGMENTOR + "data_mean": norm["mean"], AUGMENTOR + "data_std": norm["std"]})
    if cfg.prior is not None:
        sd.update({PRIOR + "transformer." + k: v for k, v in read(folder / "prior").items()})
        sd.update({PRIOR + "text_encoder." + k: v for k, v in read(folder / "prior_text_encoder").items()})
    return sd


def diffusers_parts(sd: dict, cfg, version: dict) -> tuple[dict, dict, dict]:
    """(weights: {subfolder: (state dict, config, file name)}, scheduler configs, model_index entries)."""
    parts, schedulers, index = {}, {}, {}
    if cfg.image_encoder is not None:
        enc = cfg.image_encoder
        hf = {**hf_vision_config(enc).to_dict(), "architectures": ["CLIPVisionModelWithProjection"]}
        parts["image_encoder"] = (split(sd, EMBEDDER), hf, "model.safetensors")
        fe = {"crop_size": {"height": enc.image_size, "width": enc.image_size}, "do_center_crop": True,
              "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
              "image_mean": list(enc.image_mean), "image_std": list(enc.image_std), "resample": 3,
              "rescale_factor": 1 / 255, "size": {"shortest_edge": enc.image_size},
              "image_processor_type": "CLIPImageProcessor"}
        parts["feature_extractor"] = (None, fe, "preprocessor_config.json")
        index.update(image_encoder=["transformers", "CLIPVisionModelWithProjection"],
                     feature_extractor=["transformers", "CLIPImageProcessor"])
    if cfg.image_embedding == "unclip":
        norm = {"mean": sd[AUGMENTOR + "data_mean"], "std": sd[AUGMENTOR + "data_std"]}
        parts["image_normalizer"] = (norm, {"_class_name": "StableUnCLIPImageNormalizer", **version,
                                            "embedding_dim": cfg.unet.adm_in_channels // 2},
                                     "diffusion_pytorch_model.safetensors")
        schedulers["image_noising_scheduler"] = schedule_to_diffusers(cfg.embedding_noise_schedule, "ddpm")
        index.update(image_normalizer=["stable_diffusion", "StableUnCLIPImageNormalizer"],
                     image_noising_scheduler=["diffusers", "DDPMScheduler"])
    if cfg.prior is not None:
        prior = {"_class_name": "PriorTransformer", **version, **_PRIOR_FIXED, **asdict(cfg.prior)}
        parts["prior"] = (split(sd, PRIOR + "transformer."), prior, "diffusion_pytorch_model.safetensors")
        te = {**text.hf_config_of(cfg.prior_text_encoder).to_dict(), "architectures": ["CLIPTextModelWithProjection"]}
        parts["prior_text_encoder"] = (split(sd, PRIOR + "text_encoder."), te, "model.safetensors")
        schedulers["prior_scheduler"] = schedule_to_diffusers(cfg.prior_schedule, "ddpm")
        index.update(prior=["diffusers", "PriorTransformer"], prior_scheduler=["diffusers", "DDPMScheduler"],
                     prior_text_encoder=["transformers", "CLIPTextModelWithProjection"],
                     prior_tokenizer=["transformers", "CLIPTokenizer"])
    return parts, schedulers, index
