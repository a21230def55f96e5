"""The config.json files of a diffusers folder's unet/, vae/ and text_encoder/ <-> our part configs.
Every key is honoured, accepted at the one value ldm computes, or refused with a message naming it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import text
from ..config import AutoencoderConfig, TextEncoderConfig, UNetConfig
from .files import read_json


# Every key of a folder's unet/, vae/ and text_encoder/config.json is honoured (read into our
# config), accepted only at the one value ldm computes (any other value is refused), or metadata that
# changes nothing the model computes. Any other key is refused: a dropped key would load and draw
# something else. Keys starting with "_" are metadata: neither diffusers nor transformers passes
# them to a model.
@dataclass(frozen=True)
class ConfigKeys:
    honoured: frozenset
    fixed: dict           # key -> the value ldm computes (diffusers' default); a tuple: equivalent values
    metadata: frozenset = frozenset()


UNET_KEYS = ConfigKeys(  # diffusers' UNet2DConditionModel.__init__
    honoured=frozenset({
        "sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
        "layers_per_block", "norm_num_groups", "cross_attention_dim", "transformer_layers_per_block",
        "attention_head_dim", "use_linear_projection", "num_class_embeds", "resnet_time_scale_shift",
        # SD2.1 sets it. Only diffusers' classic AttnProcessor reads it (QKᵀ and softmax in float32);
        # its default AttnProcessor2_0 ignores it, and like ldm/attention.py calls
        # F.scaled_dot_product_attention, whose fused kernels accumulate both in float32 anyway. In
        # float32 it changes nothing. So both values are what ldm computes.
        "upcast_attention", "only_cross_attention",
        "class_embed_type", "projection_class_embeddings_input_dim"}),  # unCLIP: "projection" of the noised embedding
    fixed={"center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
           "mid_block_type": "UNetMidBlock2DCrossAttn", "mid_block_only_cross_attention": (None, False),
           "downsample_padding": 1,
           "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_eps": 1e-5,
           "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
           "num_attention_heads": None, "dual_cross_attention": False,
           "addition_embed_type": None, "addition_time_embed_dim": None, "addition_embed_type_num_heads": 64,
           "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
           "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
           "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
           "attention_type": "default",
           "class_embeddings_concat": False, "cross_attention_norm": None})

VAE_KEYS = ConfigKeys(  # diffusers' AutoencoderKL.__init__
    honoured=frozenset({"in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                        "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor"}),
    # force_upcast (True in every SD VAE): diffusers decodes in float32 under a float16 pipeline; ldm
    # decodes in the pipeline's dtype, which is the same in float32
    fixed={"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
           "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
           "mid_block_add_attention": True},
    metadata=frozenset({"sample_size"}))  # the tile size of diffusers' tiled decoding; ldm doesn't tile

# transformers' PretrainedConfig fields (token ids, generation defaults, output switches, labels, and
# those of transformers 4): none changes what an encoder computes from token ids
_HF_GENERIC = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
    "pad_token_id", "sep_token_id", "decoder_start_token_id", "output_attentions", "output_hidden_states",
    "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "id2label", "label2id",
    "problem_type", "torchscript", "use_bfloat16", "tf_legacy_loss", "tie_word_embeddings", "tie_encoder_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "finetuning_task", "tokenizer_class", "prefix",
    "task_specific_params", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "initializer_factor", "initializer_range"})

CLIP_TEXT_KEYS = ConfigKeys(  # transformers' CLIPTextConfig
    honoured=frozenset({"model_type", "vocab_size", "hidden_size", "intermediate_size", "projection_dim",
                        "num_hidden_layers", "num_attention_heads", "max_position_embeddings", "hidden_act"}),
    fixed={"layer_norm_eps": 1e-5, "attention_dropout": 0.0, "dropout": 0.0, "pruned_heads": {}},
    metadata=_HF_GENERIC)

T5_TEXT_KEYS = ConfigKeys(  # transformers' T5Config, of which T5EncoderModel builds the encoder
    honoured=frozenset({"model_type", "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                        "feed_forward_proj"}),
    fixed={"relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
           "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0, "pruned_heads": {}},
    # the decoder's, the classifier's, and what T5Config derives from feed_forward_proj
    metadata=_HF_GENERIC | {"num_decoder_layers", "use_cache", "scale_decoder_outputs", "classifier_dropout",
                            "is_gated_act", "dense_act_fn", "n_positions", "output_past"})

_REQUIRED = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _same(value, fixed) -> bool:
    """`value` is `fixed`, or a per-block list of it (only_cross_attention: [false, false, ...])."""
    return value == fixed or (isinstance(value, list) and bool(value) and all(v == fixed for v in value))


class ConfigFile:
    """One config.json of a diffusers folder, read so that a missing or invalid key is a ValueError
    naming the file and the key."""

    def __init__(self, d: dict, where: str):
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        self.d, self.where = d, where

    def invalid(self, key: str, expected: str) -> ValueError:
        return ValueError(f"{self.where}: {key}={self.d.get(key)!r} is invalid: expected {expected}")

    def get(self, key: str, default=_REQUIRED):
        if self.d.get(key) is None:  # absent or null: diffusers' default
            if default is _REQUIRED:
                raise ValueError(f"{self.where}: missing required key {key!r}")
            return default
        return self.d[key]

    def integer(self, key: str, default=_REQUIRED) -> int | None:
        v = self.get(key, default)
        if v is not None and (not _is_int(v) or v < 1):
            raise self.invalid(key, "an integer >= 1")
        return v

    def uniform(self, key: str, default=_REQUIRED) -> int:
        """An integer >= 1, or a per-block list of one such integer: ldm has one for all blocks."""
        v = self.get(key, default)
        vs = v if isinstance(v, list) else [v]
        if not vs or not all(_is_int(x) and x >= 1 for x in vs) or len(set(vs)) != 1:
            raise self.invalid(key, "an integer >= 1, or a list of one such integer for every block")
        return vs[0]

    def ints(self, key: str) -> list[int]:
        v = self.get(key)
        if not isinstance(v, list) or not v or not all(_is_int(x) and x >= 1 for x in v):
            raise self.invalid(key, "a non-empty list of integers >= 1")
        return v

    def choice(self, key: str, allowed: tuple, default=_REQUIRED):
        v = self.get(key, default)
        if not any(v == a and type(v) is type(a) for a in allowed):
            raise self.invalid(key, "one of " + ", ".join(map(repr, allowed)))
        return v

    def positive(self, key: str, default: float) -> float:
        v = self.get(key, default)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf"):
            raise self.invalid(key, "a finite number > 0")
        return float(v)

    def check_keys(self, keys: ConfigKeys, class_name: str | None = None) -> None:
        if class_name is not None and self.d.get("_class_name", class_name) != class_name:
            raise ValueError(f"{self.where}: _class_name={self.d['_class_name']!r}: ldm reads a {class_name} here")
        for k, v in self.d.items():
            if k.startswith("_") or k in keys.honoured or k in keys.metadata:
                continue
            if k not in keys.fixed:
                raise ValueError(f"{self.where}: {k}={v!r} is a setting ldm does not implement (nor know to "
                                 f"be metadata): refusing to load a model that would compute something else")
            ok = keys.fixed[k] if isinstance(keys.fixed[k], tuple) else (keys.fixed[k],)
            if not any(_same(v, o) for o in ok):
                raise ValueError(f"{self.where}: {k}={v!r} is not supported: ldm implements only {k}={ok[0]!r}")

    def build(self, make, *args, **kwargs):
        """make(...) (a config), its own validation errors named with this file."""
        try:
            return make(*args, **kwargs)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self.where}: {e}") from e


def unet_config_from_diffusers(d: dict, vae_factor: int, where: str = "unet config") -> tuple[UNetConfig, int]:
    """(UNetConfig, sample size in pixels) of a diffusers unet/config.json."""
    c = ConfigFile(d, where)
    c.check_keys(UNET_KEYS, "UNet2DConditionModel")
    boc = c.ints("block_out_channels")
    mc, n = boc[0], len(boc)
    if any(b % mc for b in boc):
        raise c.invalid("block_out_channels", "multiples of its first entry")
    downs = c.get("down_block_types")
    if not isinstance(downs, list) or len(downs) != n or \
            not all(t in ("CrossAttnDownBlock2D", "DownBlock2D") for t in downs):
        raise c.invalid("down_block_types", f"{n} (one per block_out_channels) of CrossAttnDownBlock2D, DownBlock2D")
    attn = [t == "CrossAttnDownBlock2D" for t in downs]
    ups = [("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in reversed(attn)]
    if c.get("up_block_types", ups) != ups:
        raise c.invalid("up_block_types", f"{ups}, the mirror of down_block_types")
    heads = c.get("attention_head_dim")  # diffusers' misnomer: the number of heads, for all blocks or per block
    per_block = heads if isinstance(heads, list) else [heads] * n
    used = [i for i in range(n) if attn[i]] + [n - 1]  # the blocks with attention, and the mid-block
    if len(per_block) != n or not all(_is_int(h) and h >= 1 for h in per_block) or any(boc[i] % per_block[i] for i in used):
        raise c.invalid("attention_head_dim", f"an integer >= 1 or a list of {n}, dividing block_out_channels")
    if isinstance(heads, list) and len({boc[i] // per_block[i] for i in used}) == 1:  # SD2: one head width
        head_kw = {"num_heads": -1, "num_head_channels": boc[-1] // per_block[-1]}
    elif len({per_block[i] for i in used}) == 1:                                       # SD1: one head count
        head_kw = {"num_heads": per_block[-1], "num_head_channels": -1}
    else:
        raise c.invalid("attention_head_dim", "one head count for every block, or one head width (channels / heads)")
    c.choice("upcast_attention", (False, True), False)  # what ldm computes either way: see UNET_KEYS
    only = c.get("only_cross_attention", False)  # per block (the x4 upscaler) or for all blocks
    only = [only] * n if isinstance(only, bool) else only
    if not isinstance(only, list) or len(only) != n or not all(isinstance(v, bool) for v in only):
        raise c.invalid("only_cross_attention", f"true, false or a list of {n} of them (one per block)")
    projection = c.choice("class_embed_type", (None, "projection"), None) == "projection"
    cfg = c.build(
        UNetConfig, in_channels=c.integer("in_channels"), out_channels=c.integer("out_channels"), model_channels=mc,
        channel_mult=tuple(b // mc for b in boc), num_res_blocks=c.uniform("layers_per_block"),
        attention_resolutions=tuple(2 ** i for i in reversed(range(n)) if attn[i]),
        transformer_depth=c.uniform("transformer_layers_per_block", 1),
        context_dim=c.uniform("cross_attention_dim"),
        use_linear_in_transformer=c.choice("use_linear_projection", (False, True), False),
        num_classes=c.integer("num_class_embeds", None),
        adm_in_channels=c.integer("projection_class_embeddings_input_dim") if projection else None,
        disable_self_attentions=tuple(only) if any(only) else None,
        use_scale_shift_norm=c.choice("resnet_time_scale_shift", ("default", "scale_shift"), "default") == "scale_shift",
        norm_groups=c.integer("norm_num_groups", 32), **head_kw)
    return cfg, c.integer("sample_size", 64) * vae_factor


def unet_config_to_diffusers(cfg: UNetConfig, latent_size: int) -> dict:
    if cfg.disable_middle_self_attn:
        raise ValueError("diffusers' UNetMidBlock2DCrossAttn always self-attends (disable_middle_self_attn is "
                         "set): this UNet can't be exported to diffusers; save as 'ldm' or 'original'")
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
        "class_embed_type": "projection" if cfg.adm_in_channels else None,
        "projection_class_embeddings_input_dim": cfg.adm_in_channels, "only_cross_attention": list(cfg.disable_self_attentions or ()) or False,
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
    }


def vae_config_from_diffusers(d: dict, where: str = "vae config") -> AutoencoderConfig:
    c = ConfigFile(d, where)
    c.check_keys(VAE_KEYS, "AutoencoderKL")
    boc = c.ints("block_out_channels")
    if any(b % boc[0] for b in boc):
        raise c.invalid("block_out_channels", "multiples of its first entry")
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if c.get(key, [block] * len(boc)) != [block] * len(boc):
            raise c.invalid(key, f"{[block] * len(boc)}, one per block_out_channels")
    latent = c.integer("latent_channels")
    return c.build(
        AutoencoderConfig, in_channels=c.integer("in_channels", 3), out_ch=c.integer("out_channels", 3), ch=boc[0],
        ch_mult=tuple(b // boc[0] for b in boc), num_res_blocks=c.uniform("layers_per_block"),
        z_channels=latent, embed_dim=latent, norm_groups=c.integer("norm_num_groups", 32),
        scale_factor=c.positive("scaling_factor", 0.18215))


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


# SD-compat: how a CLIP tokenizer pads prompts; SD1 folders pad with the end token, SD2 with "!" (id 0)
_PAD_TOKENS = {"<|endoftext|>": "eos", "!": "zero"}


def _tokenizer_pad_token(folder: Path) -> str | None:
    """The pad token of the folder's tokenizer/, None without one."""
    files = [folder / "tokenizer" / name for name in ("tokenizer_config.json", "special_tokens_map.json")]
    if not any(f.is_file() for f in files):
        return None
    pad = next((p for f in files if f.is_file() and (p := read_json(f).get("pad_token"))), "<|endoftext|>")
    return pad.get("content") if isinstance(pad, dict) else pad  # AddedToken as a dict in older files


def text_config_from_diffusers(folder: Path) -> TextEncoderConfig:
    """SD1 folders hold OpenAI CLIP (quick_gelu); SD2 folders OpenCLIP converted to a
    CLIPTextModel (gelu, one layer fewer), which we load back as the OpenCLIP tower."""
    path = folder / "text_encoder" / "config.json"
    c = ConfigFile(read_json(path), str(path))
    pad_token = _tokenizer_pad_token(folder)
    if c.choice("model_type", ("clip_text_model", "t5"), "clip_text_model") == "t5":
        c.check_keys(T5_TEXT_KEYS)
        for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            c.integer(key)
        # T5 tokenises with its own tokenizer; pad_with only round-trips
        return c.build(text.text_config_from_hf, c.d, "t5", "last", "zero" if pad_token == "!" else "eos")
    c.check_keys(CLIP_TEXT_KEYS)
    for key, default in (("vocab_size", _REQUIRED), ("hidden_size", _REQUIRED), ("intermediate_size", _REQUIRED),
                         ("num_hidden_layers", _REQUIRED), ("num_attention_heads", _REQUIRED),
                         ("max_position_embeddings", 77), ("projection_dim", 512)):
        c.integer(key, default)
    if c.d["hidden_size"] % c.d["num_attention_heads"]:
        raise c.invalid("num_attention_heads", f"a divisor of hidden_size={c.d['hidden_size']}")
    act = c.choice("hidden_act", ("quick_gelu", "gelu"), "quick_gelu")
    if pad_token is not None:
        if pad_token not in _PAD_TOKENS:
            raise ValueError(f"{folder / 'tokenizer'}: pad_token {pad_token!r}: ldm's CLIP tokenizer pads with "
                             f"'<|endoftext|>' (SD1) or '!' (SD2)")
        pad_with = _PAD_TOKENS[pad_token]
    elif c.d.get("pad_token_id") in (0, text.EOS_ID):  # set on purpose: transformers' default is 1
        pad_with = "zero" if c.d["pad_token_id"] == 0 else "eos"
    else:  # no tokenizer/: as the encoder implies, OpenCLIP converted (SD2) pads with 0, OpenAI CLIP (SD1) with the end token
        pad_with = "zero" if act == "gelu" else "eos"
    kind, layer = ("openclip", "penultimate") if act == "gelu" else ("clip", "last")
    return c.build(text.text_config_from_hf, c.d, kind, layer, pad_with)
