"""Checkpoint I/O for three formats, all loaded strictly:
- "ldm": one .safetensors in original SD key layout whose metadata holds the full config (JSON);
- "original": a single-file SD 1.x/2.x checkpoint; the config is inferred from tensor shapes;
- "diffusers": a folder with model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.
In memory the model is always `LatentDiffusion`, whose state dict is the original layout."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import convert, text
from .scheduler_config import schedule_from_diffusers, schedule_to_diffusers
from .config import AutoencoderConfig, LDMConfig, ScheduleConfig, TextEncoderConfig, UNetConfig, load_yaml

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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> None:
    """`write(tmp)` to a temporary file beside `path`, then rename it over `path`: a crash never
    leaves a half-written file, and an existing one stays intact until the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or the file system can't."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _clean_after_killed_save(path: Path) -> None:
    """Remove what a killed `atomic_write_dir(path)` left beside `path`: its temporary folder, or
    the previous folder it had moved aside, which it first puts back if `path` is missing (the
    kill fell between the two renames)."""
    stale = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-\w+")
    for p in sorted(path.parent.iterdir()):
        if m := stale.fullmatch(p.name):
            if m[1] == "old" and not path.exists():
                os.replace(p, path)
            else:
                shutil.rmtree(p, ignore_errors=True)


def atomic_write_dir(path: str | Path, write) -> None:
    """`write(tmp)` into a temporary folder beside `path` (`.NAME.tmp-XXXX`), then put it in place
    of `path`: a crash at any point leaves at `path` either the complete previous folder or the
    complete new one, never a mix. The next save of `path` cleans up after a killed one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_after_killed_save(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it owner-only
        if not path.exists():
            os.replace(tmp, path)
        elif not _exchange(tmp, path):  # the old folder is then at `tmp`, removed below
            # no atomic swap here: for an instant `path` is missing; a save after a kill then puts it back
            aside = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
            os.replace(path, aside)
            os.replace(tmp, path)
            shutil.rmtree(aside)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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


# What an original file's shapes can't tell, the attention heads, is known for the SD families whose
# widths identify them, and assumed for no other model (a guess would load and draw something else).
TEXT_HEADS = {("clip", 768): 12, ("openclip", 1024): 16}  # SD1: CLIP ViT-L/14; SD2: OpenCLIP ViT-H/14
UNET_HEADS = {768: {"num_heads": 8, "num_head_channels": -1},     # SD1 (by context_dim)
              1024: {"num_heads": -1, "num_head_channels": 64}}   # SD2


def _text_family(sd: dict) -> tuple[str, int]:
    """(kind, width) of an original checkpoint's text encoder."""
    t = _split(sd, TEXT)
    if "model.token_embedding.weight" in t:  # OpenCLIP ViT-H style tower (SD2)
        return "openclip", int(t["model.token_embedding.weight"].shape[1])
    if "transformer.text_model.embeddings.token_embedding.weight" not in t:
        raise ValueError("no text encoder weights (cond_stage_model.transformer.* or "
                         "cond_stage_model.model.*) in this checkpoint")
    return "clip", int(t["transformer.text_model.embeddings.token_embedding.weight"].shape[1])


def _text_config_from_original(sd: dict, num_heads: int) -> TextEncoderConfig:
    t = _split(sd, TEXT)
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


def _context_dim(sd: dict) -> int:
    u = _split(sd, UNET)
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
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


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
        "upcast_attention"}),
    fixed={"center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
           "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
           "mid_block_only_cross_attention": (None, False), "downsample_padding": 1,
           "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_eps": 1e-5,
           "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
           "num_attention_heads": None, "dual_cross_attention": False, "class_embed_type": None,
           "addition_embed_type": None, "addition_time_embed_dim": None, "addition_embed_type_num_heads": 64,
           "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
           "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
           "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
           "projection_class_embeddings_input_dim": None, "attention_type": "default",
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
    cfg = c.build(
        UNetConfig, in_channels=c.integer("in_channels"), out_channels=c.integer("out_channels"), model_channels=mc,
        channel_mult=tuple(b // mc for b in boc), num_res_blocks=c.uniform("layers_per_block"),
        attention_resolutions=tuple(2 ** i for i in reversed(range(n)) if attn[i]),
        transformer_depth=c.uniform("transformer_layers_per_block", 1),
        context_dim=c.uniform("cross_attention_dim"),
        use_linear_in_transformer=c.choice("use_linear_projection", (False, True), False),
        num_classes=c.integer("num_class_embeds", None),
        use_scale_shift_norm=c.choice("resnet_time_scale_shift", ("default", "scale_shift"), "default") == "scale_shift",
        norm_groups=c.integer("norm_num_groups", 32), **head_kw)
    return cfg, c.integer("sample_size", 64) * vae_factor


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
    pad = next((p for f in files if f.is_file() and (p := _json(f).get("pad_token"))), "<|endoftext|>")
    return pad.get("content") if isinstance(pad, dict) else pad  # AddedToken as a dict in older files


def _text_config_from_diffusers(folder: Path) -> TextEncoderConfig:
    """SD1 folders hold OpenAI CLIP (quick_gelu); SD2 folders OpenCLIP converted to a
    CLIPTextModel (gelu, one layer fewer), which we load back as the OpenCLIP tower."""
    path = folder / "text_encoder" / "config.json"
    c = ConfigFile(_json(path), str(path))
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


def diffusers_config(folder: Path) -> LDMConfig:
    """The config of a diffusers folder, from its config files alone (no weights are read)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{folder} is not a diffusers model folder (no model_index.json)")
    index = _json(folder / "model_index.json")
    for part in ("unet", "vae", "text_encoder"):
        if part not in index:
            raise ValueError(f"{folder}/model_index.json names no {part}: not a SD 1.x/2.x pipeline")
    vae_path, unet_path = folder / "vae" / "config.json", folder / "unet" / "config.json"
    vae_cfg = vae_config_from_diffusers(_json(vae_path), str(vae_path))
    unet_cfg, size = unet_config_from_diffusers(_json(unet_path), vae_cfg.downsample_factor, str(unet_path))
    text_cfg = _text_config_from_diffusers(folder)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched, sampler = (schedule_from_diffusers(_json(sched_path), str(sched_path)) if sched_path.is_file()
                      else (ScheduleConfig(), "ddim"))
    return LDMConfig(unet=unet_cfg, autoencoder=vae_cfg, text_encoder=text_cfg, schedule=sched, sample_size=size,
                     default_sampler=sampler)


def load_diffusers(folder: Path, allow_pickle: bool = False) -> tuple[LDMConfig, dict]:
    cfg = diffusers_config(folder)
    sd = {UNET + k: v for k, v in convert.unet_from_diffusers(
        _read_folder_weights(folder / "unet", allow_pickle), cfg.unet).items()}
    sd.update({VAE + k: v for k, v in convert.vae_from_diffusers(
        _read_folder_weights(folder / "vae", allow_pickle), cfg.autoencoder).items()})
    sd.update({TEXT + k: v for k, v in _text_from_diffusers(
        _read_folder_weights(folder / "text_encoder", allow_pickle), cfg.text_encoder).items()})
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
    scheduler = schedule_to_diffusers(cfg.schedule, cfg.default_sampler)
    # the save replaces the whole folder: never one that isn't a model (a typo'd home directory)
    if folder.exists() and not (folder / "model_index.json").is_file() and \
            not (folder.is_dir() and not any(folder.iterdir())):
        raise ValueError(f"{folder} exists and is not a diffusers model folder (no model_index.json): not "
                         f"replacing it; save to a new or empty folder")

    def write(tmp: Path) -> None:
        for name, (weights, config) in parts.items():
            write_safetensors(weights, tmp / name / "diffusion_pytorch_model.safetensors")
            _write_json(config, tmp / name / "config.json")
        write_safetensors(te_sd, tmp / "text_encoder" / "model.safetensors", {"format": "pt"})
        _write_json(te_config, tmp / "text_encoder" / "config.json")
        _write_json({**scheduler, **version}, tmp / "scheduler" / "scheduler_config.json")
        text.save_hf_tokenizer(tmp / "tokenizer", cfg.text_encoder.pad_with, cfg.text_encoder.max_length)
        _write_json({"_class_name": "StableDiffusionPipeline", **version,
                     "feature_extractor": [None, None], "safety_checker": [None, None],
                     "image_encoder": [None, None], "requires_safety_checker": False,
                     "scheduler": ["diffusers", scheduler["_class_name"]],
                     "text_encoder": ["transformers", te_config["architectures"][0]],
                     "tokenizer": ["transformers", "CLIPTokenizer"],
                     "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
                    tmp / "model_index.json")

    atomic_write_dir(folder, write)


# ---------------------------------------------------------------------------------------------
# Entry points


def resolve_config(config: LDMConfig | str | Path | None) -> LDMConfig | None:
    """The `config=` of `load`: an LDMConfig; an ldm config file, .yaml (`ldm.config.save_yaml`) or
    .json (`LDMConfig.to_json`); or a diffusers folder whose config files describe the model, as
    diffusers' `from_single_file(path, config=folder)` reads it (its weights are not read)."""
    if config is None or isinstance(config, LDMConfig):
        return config
    if not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be an LDMConfig, a .yaml/.json config file or a diffusers folder, "
                        f"got {type(config).__name__}")
    path = Path(config)
    if path.is_dir():
        return diffusers_config(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config at {path}")
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"{path}: a config is a .yaml or .json ldm config file or a diffusers folder")
    try:
        if path.suffix == ".json":
            return LDMConfig.from_json(path.read_text())
        return load_yaml(LDMConfig, path)
    except (ValueError, TypeError) as e:                 # YAML syntax errors included (read_yaml)
        raise ValueError(f"{path} is not a valid ldm config: {e}") from e


def load(path: str | Path, config: LDMConfig | str | Path | None = None, *, prediction_type: str | None = None,
         use_ema: bool = False, allow_pickle: bool = False) -> tuple[LDMConfig, dict]:
    """(config, state dict in our module's keys) of any supported checkpoint. `config` (see
    `resolve_config`) overrides the file's own, and is needed for an original file that is not SD1/SD2."""
    config = resolve_config(config)
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
        elif config is not None:
            cfg = config
        else:
            try:
                cfg = infer_config(raw, prediction_type)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from e
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
    """Strict load: every key present with its shape, nothing extra; else one clear error.

    The tensors become the model's parameters (assign=True: no second copy of the model in memory),
    each copied first into fresh, contiguous memory, replacing its entry in `sd` so the source can be
    freed as we go. The copy is what makes a model compute the same numbers whatever file it came
    from: a tensor read from a .safetensors file lies at whatever address alignment the file's
    header length gives it (the ldm format's header holds the config), and CPU matmul kernels pick
    their vectorised path by alignment, so batch-1 linears (the time embedding) summed in another
    order gave outputs ~2e-6 apart for bit-identical weights. Views left by the key conversions
    (transposes, chunks, [:, :, None, None]) get ordinary strides the same way."""
    convert.assert_shapes_match(sd, model.state_dict(), f"checkpoint {source}")
    for k in list(sd):
        sd[k] = sd[k].clone(memory_format=torch.contiguous_format)
    model.load_state_dict(sd, strict=True, assign=True)
