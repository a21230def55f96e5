"""The original single-file SD 1.x/2.x layout: its state dict <-> our module's (identical but for the
CLIP text encoder, whose transformers-5 module has no `text_model.` level), and the config inferred
from its tensor shapes."""
from __future__ import annotations

import re

from .. import text
from ..config import AutoencoderConfig, LDMConfig, ScheduleConfig, TextEncoderConfig, UNetConfig
from .keys import IGNORED, TEXT, UNET, VAE, split


def _map_text(sd: dict, fn) -> dict:
    rest = {k: v for k, v in sd.items() if not k.startswith(TEXT)}
    return {**rest, **{TEXT + k: v for k, v in fn(split(sd, TEXT)).items()}}


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


# What an original file's shapes can't tell, the attention heads, is known for the SD families whose
# widths identify them, and assumed for no other model (a guess would load and draw something else).
TEXT_HEADS = {("clip", 768): 12, ("openclip", 1024): 16}  # SD1: CLIP ViT-L/14; SD2: OpenCLIP ViT-H/14
UNET_HEADS = {768: {"num_heads": 8, "num_head_channels": -1},     # SD1 (by context_dim)
              1024: {"num_heads": -1, "num_head_channels": 64}}   # SD2


def _text_family(sd: dict) -> tuple[str, int]:
    """(kind, width) of an original checkpoint's text encoder."""
    t = split(sd, TEXT)
    if "model.token_embedding.weight" in t:  # OpenCLIP ViT-H style tower (SD2)
        return "openclip", int(t["model.token_embedding.weight"].shape[1])
    if "transformer.text_model.embeddings.token_embedding.weight" not in t:
        raise ValueError("no text encoder weights (cond_stage_model.transformer.* or "
                         "cond_stage_model.model.*) in this checkpoint")
    return "clip", int(t["transformer.text_model.embeddings.token_embedding.weight"].shape[1])


def _text_config_from_original(sd: dict, num_heads: int) -> TextEncoderConfig:
    t = split(sd, TEXT)
    if _text_family(sd)[0] == "openclip":
        vocab, width = t["model.token_embedding.weight"].shape
        return TextEncoderConfig(
            kind="openclip", vocab_size=int(vocab), hidden_size=int(width),
            num_layers=_count(t, r"model\.transformer\.resblocks\.(\d+)\."), num_heads=num_heads,
            intermediate_size=int(t["model.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            max_length=int(t["model.positional_embedding"].shape[0]), hidden_act="gelu",
            layer="penultimate", pad_with="zero",
            projection_dim=int(t["model.text_projection"].shape[1]) if "model.text_projection" in t else int(width))
    prefix = "transformer.text_model."
    vocab, width = t[prefix + "embeddings.token_embedding.weight"].shape
    return TextEncoderConfig(
        kind="clip", vocab_size=int(vocab), hidden_size=int(width),
        num_layers=_count(t, r"transformer\.text_model\.encoder\.layers\.(\d+)\."), num_heads=num_heads,
        intermediate_size=int(t[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
        max_length=int(t[prefix + "embeddings.position_embedding.weight"].shape[0]),
        projection_dim=int(width))


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def infer_unet_config(sd: dict, heads: dict) -> UNetConfig:
    u = split(sd, UNET)
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
    ch0 = int(u["input_blocks.1.0.out_layers.3.weight"].shape[0])
    return UNetConfig(
        in_channels=int(cin), out_channels=int(u["out.2.weight"].shape[0]), model_channels=int(mc),
        channel_mult=mult, num_res_blocks=nrb, attention_resolutions=attn,
        transformer_depth=_count(u, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        context_dim=_context_dim(sd),
        use_linear_in_transformer=u["middle_block.1.proj_in.weight"].dim() == 2,
        num_classes=int(u["label_emb.weight"].shape[0]) if "label_emb.weight" in u else None,
        use_scale_shift_norm=int(u["input_blocks.1.0.emb_layers.1.weight"].shape[0]) == 2 * ch0,
        norm_groups=heads.get("norm_groups", 32),
        num_heads=heads.get("num_heads", 8), num_head_channels=heads.get("num_head_channels", -1))


def infer_vae_config(sd: dict, scale_factor: float, norm_groups: int = 32) -> AutoencoderConfig:
    v = split(sd, VAE)
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


def _context_dim(sd: dict) -> int:
    u = split(sd, UNET)
    to_k = next((v for k, v in u.items() if k.endswith("attn2.to_k.weight")), None)
    if to_k is None:
        raise ValueError("no UNet cross-attention weights (model.diffusion_model.*attn2.to_k.weight) in this checkpoint")
    return int(to_k.shape[1])


def infer_config(sd: dict, prediction_type: str | None = None, **overrides) -> LDMConfig:
    """Config of an original SD checkpoint from its tensor shapes. What shapes can't tell is an
    override: prediction_type ("v_prediction" for SD2.x-768), and, for a model that is not SD1 or
    SD2 (TEXT_HEADS, UNET_HEADS), num_heads / num_head_channels (UNet) and text_num_heads."""
    kind, width = _text_family(sd)
    context_dim = _context_dim(sd)
    text_heads = overrides.pop("text_num_heads", None) or TEXT_HEADS.get((kind, width))
    heads = {k: overrides.pop(k) for k in ("num_heads", "num_head_channels") if k in overrides}
    heads = dict(heads or UNET_HEADS.get(context_dim, {}))
    unknown = ([] if heads else [f"the UNet's attention heads (its context_dim is {context_dim}: SD1's 768 has "
                                 f"num_heads=8, SD2's 1024 num_head_channels=64)"]) + \
              ([] if text_heads else [f"the text encoder's heads (a {kind} encoder of width {width}: SD1's CLIP "
                                      f"ViT-L (768) has 12, SD2's OpenCLIP ViT-H (1024) 16)"])
    if unknown:
        raise ValueError(f"the tensor shapes don't tell {' nor '.join(unknown)}, and this is not a SD1 or SD2 "
                         f"checkpoint. Pass the model's config: config= an LDMConfig, an ldm .yaml/.json config "
                         f"file or the model's diffusers folder (ldm generate/convert --config PATH)")
    heads["norm_groups"] = overrides.pop("norm_groups", 32)
    text_cfg = _text_config_from_original(sd, text_heads)
    unet = infer_unet_config(sd, heads)
    vae = infer_vae_config(sd, overrides.pop("scale_factor", 0.18215), heads["norm_groups"])
    pt = prediction_type or "epsilon"
    size = overrides.pop("sample_size", 768 if pt == "v_prediction" and kind == "openclip" else 512)
    if overrides:
        raise TypeError(f"unknown override(s) {sorted(overrides)}")
    return LDMConfig(unet=unet, autoencoder=vae, text_encoder=text_cfg,
                     schedule=ScheduleConfig(prediction_type=pt), sample_size=size)
