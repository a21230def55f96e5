"""The original single-file SD 1.x/2.x layout: its state dict <-> our module's (identical but for the
CLIP text encoder, whose transformers-5 module has no `text_model.` level), and the config inferred
from its tensor shapes."""
from __future__ import annotations

import re
from dataclasses import replace

from .. import text
from ..config import AutoencoderConfig, LDMConfig, ScheduleConfig, TextEncoderConfig, UNetConfig
from ..presets import x4_upscaler
from . import unclip_parts
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
    out = unclip_parts.from_original({k: v for k, v in sd.items() if not any(p.match(k) for p in IGNORED)})
    return _map_text(out, text.clip_original_to_ours) if _clip_text(cfg) else out


def to_original(sd: dict, cfg: LDMConfig) -> dict:
    sd = unclip_parts.to_original(sd)
    return _map_text(sd, text.clip_ours_to_original) if _clip_text(cfg) else sd


def _clip_text(cfg: LDMConfig) -> bool:
    return cfg.text_encoder is not None and cfg.text_encoder.kind == "clip"


# What an original file's shapes can't tell -- the attention heads, and whether attn1 attends to the
# text where a transformer is as wide as the context -- is known for the SD families whose widths
# identify them, and assumed for no other model (a guess would load and draw something else).
TEXT_HEADS = {("clip", 768): 12, ("openclip", 1024): 16}  # SD1: CLIP ViT-L/14; SD2: OpenCLIP ViT-H/14
_SELF = {"disable_self_attentions": None, "disable_middle_self_attn": False}  # SD1 and SD2 self-attend
UNET_HEADS = {768: {"num_heads": 8, "num_head_channels": -1, **_SELF},     # SD1 (by context_dim)
              1024: {"num_heads": -1, "num_head_channels": 64, **_SELF}}   # SD2
UNET_ARCH = ("in_channels", "model_channels", "channel_mult", "attention_resolutions", "context_dim", "num_classes")


def _upscaler_family(unet: dict) -> tuple[dict, dict]:
    """(UNet settings, LDMConfig settings) an upscaler's original file doesn't hold (the latents and the
    low-res image in, noise_level as class label: SD's x4 upscaler is the one such model), from x4_upscaler();
    its heads and attn1 flags only for a UNet of the x4's widths."""
    x4 = x4_upscaler()
    same = all(unet[k] == getattr(x4.unet, k) for k in UNET_ARCH)
    heads = {k: getattr(x4.unet, k) for k in ("num_heads", "num_head_channels", *_SELF)} if same else {}
    rest = {k: getattr(x4, k) for k in ("schedule", "sample_size", "low_res_schedule", "max_noise_level",
                                        "default_steps", "default_guidance_scale")}
    return heads, {**rest, "scale_factor": x4.autoencoder.scale_factor}


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


def _reads_text(u: dict, block: str, context_dim: int) -> bool | None:
    """Whether attn1 of the transformers at `block` attends to the context (disable_self_attn): its to_k
    takes the context's width, not the block's; None where the two are the same."""
    inner, width = u[f"{block}.transformer_blocks.0.attn1.to_k.weight"].shape
    return None if inner == context_dim else int(width) == context_dim


def _attn1_flags(u: dict, blocks: dict, levels: int, context_dim: int, known: dict) -> dict:
    """disable_self_attentions and disable_middle_self_attn from the shapes; what they can't tell, and the
    levels without attention, from `known` (the overrides or the family's), else a ValueError."""
    found = {i: _reads_text(u, b, context_dim) for i, b in blocks.items()}
    mid = _reads_text(u, "middle_block.1", context_dim)
    given = known.get("disable_self_attentions", ())
    if "disable_self_attentions" in known and given is None:
        given = (False,) * levels
    if len(given or ()) == levels:
        found = {i: given[i] if found.get(i) is None else found[i] for i in range(levels)}
    mid = known.get("disable_middle_self_attn") if mid is None else mid
    unknown = [f"level {i}" for i, v in found.items() if v is None] + (["the middle block"] if mid is None else [])
    if unknown:
        raise ValueError(f"the tensor shapes don't tell whether the transformers of {' and '.join(unknown)} attend to "
                         f"themselves or to the text first (they are as wide as the context, {context_dim}): pass "
                         f"disable_self_attentions / disable_middle_self_attn, or the model's config (ldm "
                         f"generate/convert --config PATH)")
    attn = sorted(found)  # a level without attention takes the next attention level's flag (the x4's level 0: True)
    flags = tuple(found[i] if i in found else found[next((j for j in attn if j > i), attn[-1])]
                  for i in range(levels)) if attn else ()
    return {"disable_self_attentions": flags if any(flags) else None, "disable_middle_self_attn": mid}


def _unet_shapes(sd: dict) -> tuple[dict, dict]:
    """(the UNetConfig fields the shapes tell, {level: its first transformer's key prefix})."""
    u = split(sd, UNET)
    if "input_blocks.0.0.weight" not in u:
        raise ValueError("no UNet weights (model.diffusion_model.*) in this checkpoint")
    mc, cin = u["input_blocks.0.0.weight"].shape[:2]
    downs = sorted(int(m.group(1)) for k in u if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight", k)))
    n_out = _count(u, r"output_blocks\.(\d+)\.")
    nrb = downs[0] - 1 if downs else n_out - 1
    levels = n_out // (nrb + 1)
    blocks = {i: f"input_blocks.{1 + i * (nrb + 1)}.1" for i in range(levels)
              if f"input_blocks.{1 + i * (nrb + 1)}.1.norm.weight" in u}
    ch0 = int(u["input_blocks.1.0.out_layers.3.weight"].shape[0])
    return dict(
        in_channels=int(cin), out_channels=int(u["out.2.weight"].shape[0]), model_channels=int(mc),
        channel_mult=tuple(int(u[f"input_blocks.{1 + i * (nrb + 1)}.0.out_layers.3.weight"].shape[0]) // mc
                           for i in range(levels)),
        num_res_blocks=nrb, attention_resolutions=tuple(2 ** i for i in reversed(sorted(blocks))),
        transformer_depth=_count(u, r"middle_block\.1\.transformer_blocks\.(\d+)\."), context_dim=_context_dim(sd),
        use_linear_in_transformer=u["middle_block.1.proj_in.weight"].dim() == 2,
        num_classes=int(u["label_emb.weight"].shape[0]) if "label_emb.weight" in u else None,
        adm_in_channels=int(u["label_emb.0.0.weight"].shape[1]) if "label_emb.0.0.weight" in u else None,
        use_scale_shift_norm=int(u["input_blocks.1.0.emb_layers.1.weight"].shape[0]) == 2 * ch0), blocks


def infer_unet_config(sd: dict, heads: dict) -> UNetConfig:
    """The UNet's config from the shapes; heads: num_heads, num_head_channels, norm_groups and what
    _attn1_flags can't tell."""
    shapes, blocks = _unet_shapes(sd)
    flags = _attn1_flags(split(sd, UNET), blocks, len(shapes["channel_mult"]), shapes["context_dim"], heads)
    return UNetConfig(**shapes, **flags, norm_groups=heads.get("norm_groups", 32),
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
    override: prediction_type ("v_prediction" for SD2.x-768), and, for a model that is not SD1, SD2 or
    the x4 upscaler (TEXT_HEADS, UNET_HEADS, _upscaler_family), num_heads / num_head_channels (UNet),
    text_num_heads, and disable_self_attentions / disable_middle_self_attn where the shapes can't tell."""
    kind, width = _text_family(sd)
    shapes, _ = _unet_shapes(sd)
    context_dim = shapes["context_dim"]
    upscaler = shapes["num_classes"] is not None and shapes["in_channels"] == shapes["out_channels"] + 3  # + RGB
    family, rest = _upscaler_family(shapes) if upscaler else (UNET_HEADS.get(context_dim, {}), {})
    text_heads = overrides.pop("text_num_heads", None) or TEXT_HEADS.get((kind, width))
    head_keys = ("num_heads", "num_head_channels")
    heads = ({k: overrides.pop(k) for k in head_keys if k in overrides} or
             {k: family[k] for k in head_keys if k in family})
    heads.update({k: overrides.pop(k, family.get(k)) for k in _SELF if k in overrides or k in family})
    unknown = ([] if set(head_keys) & set(heads) else
               [f"the UNet's attention heads (its context_dim is {context_dim}: SD1's 768 has num_heads=8, SD2's "
                f"1024 num_head_channels=64, the x4 upscaler's num_heads=8)"]) + \
              ([] if text_heads else [f"the text encoder's heads (a {kind} encoder of width {width}: SD1's CLIP "
                                      f"ViT-L (768) has 12, SD2's OpenCLIP ViT-H (1024) 16)"])
    if unknown:
        raise ValueError(f"the tensor shapes don't tell {' nor '.join(unknown)}, and this is not a SD1, SD2 or x4 "
                         f"upscaler checkpoint. Pass the model's config: config= an LDMConfig, an ldm .yaml/.json "
                         f"config file or the model's diffusers folder (ldm generate/convert --config PATH)")
    heads["norm_groups"] = overrides.pop("norm_groups", 32)
    text_cfg = _text_config_from_original(sd, text_heads)
    unet = infer_unet_config(sd, heads)
    vae = infer_vae_config(sd, overrides.pop("scale_factor", rest.pop("scale_factor", 0.18215)), heads["norm_groups"])
    schedule = rest.pop("schedule", ScheduleConfig())
    pt = prediction_type or schedule.prediction_type
    rest["sample_size"] = overrides.pop("sample_size", rest.get("sample_size", 768 if pt == "v_prediction" and
                                                                 kind == "openclip" else 512))
    if overrides:
        raise TypeError(f"unknown override(s) {sorted(overrides)}")
    embedding = unclip_parts.infer_original(sd)           # SD 2.1-unclip: its image tower and noise augmentation
    embedding.pop("adm_in_channels", None)                # the UNet's shapes told it
    return LDMConfig(unet=unet, autoencoder=vae, text_encoder=text_cfg, schedule=replace(schedule, prediction_type=pt),
                     **rest, **embedding)
