"""Checkpoint I/O for three formats, all loaded strictly:
- "ldm": one .safetensors in original SD key layout whose metadata holds the full config (JSON);
- "original": a single-file SD 1.x/2.x checkpoint; the config is inferred from tensor shapes;
- "diffusers": a folder with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.
In memory the model is always `LatentDiffusion`, whose state dict is the original layout."""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import convert, text
from .scheduler_config import schedule_from_diffusers, schedule_to_diffusers
from .config import AutoencoderConfig, LDMConfig, ScheduleConfig, TextEncoderConfig, UNetConfig

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Keys an original checkpoint may carry that the model does not own, and why.
IGNORED = (
    re.compile(r"^(betas|alphas_cumprod.*|sqrt_.*|log_one_minus.*|posterior_.*|lvlb_weights|logvar)$"),  # schedule buffers, recomputed
    re.compile(r"^model_ema\."),                          # EMA copy (extracted with use_ema=True)
    re.compile(r"^first_stage_model\.loss\."),            # VAE training losses (LPIPS, discriminator)
    re.compile(r"^cond_stage_model\..*position_ids$"),    # old transformers buffer
    re.compile(r"^cond_stage_model\.model\.visual\."),  # OpenCLIP image tower (SD2 deletes it)
)


# ---------------------------------------------------------------------------------------------
# Reading and writing tensors


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a .safetensors file; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable .safetensors file (truncated or corrupt?): {e}. "
                         f"Re-download or re-export it.") from e


def read_state_dict(path: str | Path, allow_pickle: bool = False) -> tuple[dict, dict]:
    """(state_dict, metadata) of a .safetensors file, or of a pickle file when allowed."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ValueError(f"{path} is a pickle file, which can run arbitrary code when loaded. "
                             f"Convert it to .safetensors, or opt in with allow_pickle=True "
                             f"(--allow-pickle): it is then read with torch.load(weights_only=True).")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"could not read {path} with torch.load(weights_only=True): {e}") from e
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict):
            raise ValueError(f"{path} holds no state dict")
        return sd, {}
    return read_safetensors(path)


def atomic_write(path: str | Path, write) -> None:
    """`write(tmp)` to a temporary file beside `path`, then rename it over `path`: a crash never
    leaves a half-written file, and an existing one stays intact until the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _write_json(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "diffusers"
        raise ValueError(f"{path} is a folder without model_index.json: not a diffusers model folder")
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if path.suffix == ".safetensors":
        _, meta = _metadata(path)
        return "ldm" if "ldm_config" in meta else "original"
    if path.suffix in PICKLE_SUFFIXES:
        return "original"
    raise ValueError(f"{path}: expected a .safetensors file, a diffusers folder, or (with "
                     f"allow_pickle) a .ckpt file")


def _metadata(path: Path) -> tuple[list[str], dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable .safetensors file (truncated or corrupt?): {e}") from e


# ---------------------------------------------------------------------------------------------
# Original layout <-> our module's state dict: identical but for the CLIP text encoder, whose
# transformers-5 module has no `text_model.` level


def _split(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _map_text(sd: dict, fn) -> dict:
    rest = {k: v for k, v in sd.items() if not k.startswith(TEXT)}
    return {**rest, **{TEXT + k: v for k, v in fn(_split(sd, TEXT)).items()}}


def from_original(sd: dict, cfg: LDMConfig, use_ema: bool = False) -> dict:
    """An original checkpoint's state dict -> our module's keys (IGNORED keys dropped)."""
    if use_ema:
        ema = {k[len("model_ema."):]: v for k, v in sd.items() if k.startswith("model_ema.")}
        if not ema:
            raise ValueError("use_ema=True but the checkpoint has no model_ema.* weights")
        # SD-compat: CompVis LitEma names are the UNet key without "model." and without dots
        flat = {k[len("model."):].replace(".", ""): k for k in sd if k.startswith(UNET)}
        sd = {**sd, **{flat[k]: v for k, v in ema.items() if k in flat}}
    out = {k: v for k, v in sd.items() if not any(p.match(k) for p in IGNORED)}
    return _map_text(out, text.clip_original_to_ours) if cfg.text_encoder.kind == "clip" else out


def to_original(sd: dict, cfg: LDMConfig) -> dict:
    return _map_text(sd, text.clip_ours_to_original) if cfg.text_encoder.kind == "clip" else sd


def _text_config_from_original(sd: dict) -> TextEncoderConfig:
    t = _split(sd, TEXT)
    if "model.token_embedding.weight" in t:  # OpenCLIP ViT-H style tower (SD2)
        vocab, width = t["model.token_embedding.weight"].shape
        return TextEncoderConfig(
            kind="openclip", vocab_size=int(vocab), hidden_size=int(width),
            num_layers=_count(t, r"model\.transformer\.resblocks\.(\d+)\."), num_heads=int(width) // 64,
            intermediate_size=int(t["model.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            max_length=int(t["model.positional_embedding"].shape[0]), hidden_act="gelu",
            layer="penultimate", pad_with="zero",
            projection_dim=int(t["model.text_projection"].shape[1]) if "model.text_projection" in t else int(width))
    prefix = "transformer.text_model."
    if prefix + "embeddings.token_embedding.weight" not in t:
        raise ValueError("no text encoder weights (cond_stage_model.transformer.* or "
                         "cond_stage_model.model.*) in this checkpoint")
    vocab, width = t[prefix + "embeddings.token_embedding.weight"].shape
    return TextEncoderConfig(
        kind="clip", vocab_size=int(vocab), hidden_size=int(width),
        num_layers=_count(t, r"transformer\.text_model\.encoder\.layers\.(\d+)\."), num_heads=int(width) // 64,
        intermediate_size=int(t[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
        max_length=int(t[prefix + "embeddings.position_embedding.weight"].shape[0]),
        projection_dim=int(width))


def _text_config_from_diffusers(folder: Path) -> TextEncoderConfig:
    """SD1 folders hold OpenAI CLIP (quick_gelu); SD2 folders OpenCLIP converted to a
    CLIPTextModel (gelu, one layer fewer), which we load back as the OpenCLIP tower."""
    hf = _json(folder / "text_encoder" / "config.json")
    tok = folder / "tokenizer" / "tokenizer_config.json"
    pad_with = "zero" if tok.is_file() and json.loads(tok.read_text()).get("pad_token") == "!" else "eos"
    if hf.get("model_type") == "t5":
        return text.text_config_from_hf(hf, "t5", "last", pad_with)
    if hf.get("hidden_act") == "gelu":
        return text.text_config_from_hf(hf, "openclip", "penultimate", pad_with)
    return text.text_config_from_hf(hf, "clip", "last", pad_with)


def _text_from_diffusers(sd: dict, cfg: TextEncoderConfig) -> dict:
    if cfg.kind == "clip":
        return text.clip_diffusers_to_ours(sd)
    if cfg.kind == "openclip":
        return text.hf_clip_to_openclip(sd, cfg.num_layers, cfg.projection_dim)
    return {"transformer." + k: v for k, v in sd.items()}


def _text_to_diffusers(sd: dict, cfg: TextEncoderConfig) -> tuple[dict, dict]:
    if cfg.bidirectional:  # transformers' CLIPTextModel would load it with the causal mask: other pictures
        raise ValueError("diffusers' CLIPTextModel can't express a bidirectional text encoder: save as 'ldm'")
    if cfg.kind == "clip":
        out, arch = text.clip_ours_to_diffusers(sd), "CLIPTextModel"
    elif cfg.kind == "openclip":
        out, arch = text.openclip_to_hf_clip(sd), "CLIPTextModel"
        out = {"text_model." + k: v for k, v in out.items()}
    else:
        out, arch = _split(sd, "transformer."), "T5EncoderModel"
    hf = text.hf_config_of(cfg).to_dict()
    hf["architectures"] = [arch]
    return out, hf


# ---------------------------------------------------------------------------------------------
# Inferring a config from an original checkpoint's shapes


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def infer_unet_config(sd: dict, heads: dict) -> UNetConfig:
    u = _split(sd, UNET)
    if "input_blocks.0.0.weight" not in u:
        raise ValueError("no UNet weights (model.diffusion_model.*) in this checkpoint")
    mc, cin = u["input_blocks.0.0.weight"].shape[:2]
    downs = sorted(int(m.group(1)) for k in u if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight", k)))
    n_out = _count(u, r"output_blocks\.(\d+)\.")
    nrb = downs[0] - 1 if downs else n_out - 1
    levels = n_out // (nrb + 1)
    mult = tuple(int(u[f"input_blocks.{1 + i * (nrb + 1)}.0.out_layers.3.weight"].shape[0]) // mc
                 for i in range(levels))
    attn = tuple(2 ** i for i in reversed(range(levels)) if f"input_blocks.{1 + i * (nrb + 1)}.1.norm.weight" in u)
    to_k = next(v for k, v in u.items() if k.endswith("attn2.to_k.weight"))
    ch0 = int(u["input_blocks.1.0.out_layers.3.weight"].shape[0])
    return UNetConfig(
        in_channels=int(cin), out_channels=int(u["out.2.weight"].shape[0]), model_channels=int(mc),
        channel_mult=mult, num_res_blocks=nrb, attention_resolutions=attn,
        transformer_depth=_count(u, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        context_dim=int(to_k.shape[1]),
        use_linear_in_transformer=u["middle_block.1.proj_in.weight"].dim() == 2,
        num_classes=int(u["label_emb.weight"].shape[0]) if "label_emb.weight" in u else None,
        use_scale_shift_norm=int(u["input_blocks.1.0.emb_layers.1.weight"].shape[0]) == 2 * ch0,
        norm_groups=heads.get("norm_groups", 32),
        num_heads=heads.get("num_heads", 8), num_head_channels=heads.get("num_head_channels", -1))


def infer_vae_config(sd: dict, scale_factor: float, norm_groups: int = 32) -> AutoencoderConfig:
    v = _split(sd, VAE)
    if "encoder.conv_in.weight" not in v:
        raise ValueError("no autoencoder weights (first_stage_model.*) in this checkpoint")
    ch, cin = v["encoder.conv_in.weight"].shape[:2]
    levels = _count(v, r"encoder\.down\.(\d+)\.")
    return AutoencoderConfig(
        in_channels=int(cin), out_ch=int(v["decoder.conv_out.weight"].shape[0]), ch=int(ch),
        ch_mult=tuple(int(v[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in range(levels)),
        num_res_blocks=_count(v, r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=int(v["decoder.conv_in.weight"].shape[1]),
        embed_dim=int(v["post_quant_conv.weight"].shape[1]), norm_groups=norm_groups,
        scale_factor=scale_factor)


def infer_config(sd: dict, prediction_type: str | None = None, **overrides) -> LDMConfig:
    """Config of an original SD checkpoint from its tensor shapes. What shapes can't tell is an
    override: prediction_type ("v_prediction" for SD2.x-768), num_heads / num_head_channels."""
    text_cfg = _text_config_from_original(sd)
    sd2 = text_cfg.kind == "openclip"
    heads = {k: overrides.pop(k) for k in ("num_heads", "num_head_channels", "norm_groups") if k in overrides}
    if sd2 and not heads:
        heads = {"num_heads": -1, "num_head_channels": 64}
    unet = infer_unet_config(sd, heads)
    vae = infer_vae_config(sd, overrides.pop("scale_factor", 0.18215), heads.get("norm_groups", 32))
    pt = prediction_type or "epsilon"
    size = overrides.pop("sample_size", 768 if pt == "v_prediction" and sd2 else 512)
    if overrides:
        raise TypeError(f"unknown override(s) {sorted(overrides)}")
    return LDMConfig(unet=unet, autoencoder=vae, text_encoder=text_cfg,
                     schedule=ScheduleConfig(prediction_type=pt), sample_size=size)


# ---------------------------------------------------------------------------------------------
# diffusers folder


def _read_folder_weights(folder: Path, allow_pickle: bool) -> dict:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return read_safetensors(folder / name)[0]
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name, allow_pickle)[0]
    raise FileNotFoundError(f"no weights (*.safetensors) in {folder}")


def _json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    return json.loads(path.read_text())


def unet_config_from_diffusers(d: dict, vae_factor: int) -> tuple[UNetConfig, int]:
    for key in ("addition_embed_type", "class_embed_type", "encoder_hid_dim"):
        if d.get(key):
            raise ValueError(f"diffusers UNet with {key}={d[key]!r} is not a SD 1.x/2.x UNet")
    boc = d["block_out_channels"]
    mc = boc[0]
    heads = d.get("num_attention_heads") or d["attention_head_dim"]  # diffusers: head_dim means heads
    depth = d.get("transformer_layers_per_block", 1)
    if isinstance(depth, list):
        depth = depth[0]
    if isinstance(heads, int):
        head_kw = {"num_heads": heads, "num_head_channels": -1}
    else:
        head_kw = {"num_heads": -1, "num_head_channels": boc[0] // heads[0]}
    cfg = UNetConfig(
        in_channels=d["in_channels"], out_channels=d["out_channels"], model_channels=mc,
        channel_mult=tuple(c // mc for c in boc), num_res_blocks=d["layers_per_block"],
        attention_resolutions=tuple(2 ** i for i, t in reversed(list(enumerate(d["down_block_types"])))
                                    if "CrossAttn" in t),
        transformer_depth=depth, context_dim=d["cross_attention_dim"],
        use_linear_in_transformer=bool(d.get("use_linear_projection", False)),
        num_classes=d.get("num_class_embeds"),
        use_scale_shift_norm=d.get("resnet_time_scale_shift", "default") == "scale_shift",
        norm_groups=d.get("norm_num_groups", 32), **head_kw)
    return cfg, d.get("sample_size", 64) * vae_factor


def unet_config_to_diffusers(cfg: UNetConfig, latent_size: int) -> dict:
    n = len(cfg.channel_mult)
    boc = [cfg.model_channels * m for m in cfg.channel_mult]
    has_attn = [2 ** i in cfg.attention_resolutions for i in range(n)]
    heads = cfg.num_heads if cfg.num_head_channels <= 0 else [c // cfg.num_head_channels for c in boc]
    return {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": heads,
        "block_out_channels": boc, "center_input_sample": False,
        "cross_attention_dim": cfg.context_dim, "downsample_padding": 1, "flip_sin_to_cos": True,
        "freq_shift": 0, "in_channels": cfg.in_channels, "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": cfg.norm_groups,
        "out_channels": cfg.out_channels, "sample_size": latent_size,
        "down_block_types": [("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in has_attn],
        "up_block_types": [("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in reversed(has_attn)],
        "use_linear_projection": cfg.use_linear_in_transformer,
        "transformer_layers_per_block": cfg.transformer_depth, "num_class_embeds": cfg.num_classes,
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
    }


def vae_config_from_diffusers(d: dict) -> AutoencoderConfig:
    boc = d["block_out_channels"]
    return AutoencoderConfig(
        in_channels=d.get("in_channels", 3), out_ch=d.get("out_channels", 3), ch=boc[0],
        ch_mult=tuple(c // boc[0] for c in boc), num_res_blocks=d["layers_per_block"],
        z_channels=d["latent_channels"], embed_dim=d["latent_channels"],
        norm_groups=d.get("norm_num_groups", 32), scale_factor=d.get("scaling_factor", 0.18215))


def vae_config_to_diffusers(cfg: AutoencoderConfig, sample_size: int) -> dict:
    if cfg.attn_resolutions or cfg.embed_dim != cfg.z_channels or cfg.pixel_scale != 1:
        raise ValueError("diffusers' AutoencoderKL has no attention outside the mid-block, no "
                         "pixel_scale and needs embed_dim == z_channels; this autoencoder can't be exported")
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "act_fn": "silu",
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_ch, "latent_channels": cfg.z_channels,
        "layers_per_block": cfg.num_res_blocks, "norm_num_groups": cfg.norm_groups,
        "sample_size": sample_size, "scaling_factor": cfg.scale_factor,
    }


def load_diffusers(folder: Path, allow_pickle: bool = False) -> tuple[LDMConfig, dict]:
    index = _json(folder / "model_index.json")
    for part in ("unet", "vae", "text_encoder"):
        if part not in index:
            raise ValueError(f"{folder}/model_index.json names no {part}: not a SD 1.x/2.x pipeline")
    vae_cfg = vae_config_from_diffusers(_json(folder / "vae" / "config.json"))
    unet_cfg, size = unet_config_from_diffusers(_json(folder / "unet" / "config.json"), vae_cfg.downsample_factor)
    text_cfg = _text_config_from_diffusers(folder)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = schedule_from_diffusers(_json(sched_path)) if sched_path.is_file() else ScheduleConfig()
    cfg = LDMConfig(unet=unet_cfg, autoencoder=vae_cfg, text_encoder=text_cfg, schedule=sched, sample_size=size)
    sd = {UNET + k: v for k, v in convert.unet_from_diffusers(
        _read_folder_weights(folder / "unet", allow_pickle), unet_cfg).items()}
    sd.update({VAE + k: v for k, v in convert.vae_from_diffusers(
        _read_folder_weights(folder / "vae", allow_pickle), vae_cfg).items()})
    sd.update({TEXT + k: v for k, v in _text_from_diffusers(
        _read_folder_weights(folder / "text_encoder", allow_pickle), text_cfg).items()})
    return cfg, sd


def save_diffusers(sd: dict, cfg: LDMConfig, folder: Path) -> None:
    import diffusers
    folder, version = Path(folder), {"_diffusers_version": diffusers.__version__}
    # every conversion before any write: a model diffusers can't express leaves no half-written folder
    te_sd, te_config = _text_to_diffusers(_split(sd, TEXT), cfg.text_encoder)
    parts = {"unet": (convert.unet_to_diffusers(_split(sd, UNET), cfg.unet),
                      {**unet_config_to_diffusers(cfg.unet, cfg.latent_size), **version}),
             "vae": (convert.vae_to_diffusers(_split(sd, VAE), cfg.autoencoder),
                     {**vae_config_to_diffusers(cfg.autoencoder, cfg.sample_size), **version})}
    for name, (weights, config) in parts.items():
        write_safetensors(weights, folder / name / "diffusion_pytorch_model.safetensors")
        _write_json(config, folder / name / "config.json")
    write_safetensors(te_sd, folder / "text_encoder" / "model.safetensors", {"format": "pt"})
    _write_json(te_config, folder / "text_encoder" / "config.json")
    _write_json({**schedule_to_diffusers(cfg.schedule), **version}, folder / "scheduler" / "scheduler_config.json")
    text.save_hf_tokenizer(folder / "tokenizer", cfg.text_encoder.pad_with, cfg.text_encoder.max_length)
    _write_json({"_class_name": "StableDiffusionPipeline", **version,
                 "feature_extractor": [None, None], "safety_checker": [None, None],
                 "image_encoder": [None, None], "requires_safety_checker": False,
                 "scheduler": ["diffusers", "DDIMScheduler"],
                 "text_encoder": ["transformers", te_config["architectures"][0]],
                 "tokenizer": ["transformers", "CLIPTokenizer"],
                 "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
                folder / "model_index.json")


# ---------------------------------------------------------------------------------------------
# Entry points


def load(path: str | Path, config: LDMConfig | None = None, *, prediction_type: str | None = None,
         use_ema: bool = False, allow_pickle: bool = False) -> tuple[LDMConfig, dict]:
    """(config, state dict in our module's keys) of any supported checkpoint."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "diffusers":
        cfg, sd = load_diffusers(path, allow_pickle)
    else:
        raw, meta = read_state_dict(path, allow_pickle)
        if fmt == "ldm":
            try:
                cfg = LDMConfig.from_json(meta["ldm_config"])
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{path}: the config in its metadata is invalid: {e}") from e
        else:
            cfg = config or infer_config(raw, prediction_type)
        sd = from_original(raw, cfg, use_ema)
    if config is not None:
        cfg = config
    if prediction_type is not None:
        cfg = replace(cfg, schedule=replace(cfg.schedule, prediction_type=prediction_type))
    return cfg, sd


def save(sd: dict, cfg: LDMConfig, path: str | Path, fmt: str = "ldm",
         dtype: torch.dtype | None = None) -> None:
    """Write `sd` (our module's keys) as "ldm" (default), "original" or "diffusers"."""
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    if fmt in ("original", "diffusers") and cfg.matcher is not None:
        raise ValueError(f"the {fmt} layout has no place for the matcher (ldm/matcher.py): save as 'ldm'")
    if fmt == "diffusers":
        return save_diffusers(sd, cfg, Path(path))
    if fmt not in ("ldm", "original"):
        raise ValueError(f"unknown format {fmt!r}: use 'ldm', 'original' or 'diffusers'")
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"{path}: single-file checkpoints are written as .safetensors")
    if fmt == "original" and cfg.autoencoder.pixel_scale != 1:
        raise ValueError("the original layout can't express autoencoder.pixel_scale: save as 'ldm'")
    if fmt == "original" and cfg.text_encoder.bidirectional:
        raise ValueError("the original layout can't express a bidirectional text encoder: save as 'ldm'")
    meta = {"format": "pt"}
    if fmt == "ldm":
        meta["ldm_config"] = cfg.to_json()
    write_safetensors(to_original(sd, cfg), path, meta)


def load_into(model: torch.nn.Module, sd: dict, source: str) -> None:
    """Strict load: every key present with its shape, nothing extra; else one clear error."""
    convert.assert_shapes_match(sd, model.state_dict(), f"checkpoint {source}")
    model.load_state_dict(sd, strict=True, assign=True)
