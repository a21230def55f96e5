"""Tokenizer (CLIP BPE, offline) and text encoders τθ: CLIP (transformers), OpenCLIP (open_clip), T5.

Each encoder has `.tokenize(list[str]) -> LongTensor[B, L]`, `forward(tokens) -> [B, L, D]` and
`.encode(list[str])`. Parameter names follow original SD files (`cond_stage_model.transformer.*`,
`cond_stage_model.model.*`); the key maps to diffusers' `text_encoder` layout live here too.
"""
from __future__ import annotations

import functools
import json
import math
import unicodedata
import warnings
from pathlib import Path

import regex
import torch
from torch import nn

from .bpe import clip_bpe
from .clip_text import CLIPTextTransformer
from .config import TextEncoderConfig

BOS_ID, EOS_ID = 49406, 49407
PAD_IDS = {"eos": EOS_ID, "zero": 0}        # SD1 / transformers pad with 49407; SD2 / open_clip with 0 ("!")
_SPECIAL = {"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}
# transformers' CLIPTokenizer pre-tokenizer split: open_clip's pattern with transformers' special names
_WORD_RE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def _warn_truncated(prompts: list[str], lengths: list[int], max_length: int) -> None:
    """One warning per call naming every prompt longer than `max_length` tokens."""
    long = [(i, n) for i, n in enumerate(lengths) if n > max_length]
    if long:
        parts = "; ".join(f"prompt {i} ({prompts[i][:40]!r}...) dropped {n - max_length} of {n} tokens"
                          for i, n in long)
        warnings.warn(f"prompts are truncated to {max_length} tokens: {parts}", stacklevel=3)


class Tokenizer:
    """CLIP BPE tokenizer: `[start] + bpe(text) + [end]`, truncated and padded to `max_length`.

    Text is cleaned as transformers' CLIPTokenizer does (NFC, lower case; what diffusers' SD pipelines
    use), not as open_clip does (which also runs ftfy and HTML-unescaping); on plain text both agree.
    Differs from a transformers SD2 folder (pad_token "!") on "!": that folder splits "!" out as the
    pad token (id 0) while we, like open_clip and SD2's training, give "!</w>" (id 256).
    """

    def __init__(self, max_length: int = 77, pad_with: str = "eos"):
        if pad_with not in PAD_IDS:
            raise ValueError(f"pad_with must be one of {sorted(PAD_IDS)}, got {pad_with!r}")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for start and end tokens, got {max_length}")
        self.max_length, self.pad_with, self.pad_id = max_length, pad_with, PAD_IDS[pad_with]

    def words(self, text: str) -> list[tuple[str, list[int]]]:
        """(word, its BPE ids) for each word of `text` as the tokenizer splits it, in order."""
        bpe = clip_bpe()
        return [(word, [_SPECIAL[word]] if word in _SPECIAL else bpe.encode(word))
                for word in _WORD_RE.findall(unicodedata.normalize("NFC", text).lower())]

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without start/end tokens."""
        return [i for _, ids in self.words(text) for i in ids]

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError(f"Tokenizer takes a list of strings; wrap the prompt: [{prompts!r}]")
        ids = [[BOS_ID] + self.encode(p) + [EOS_ID] for p in prompts]
        _warn_truncated(prompts, [len(x) for x in ids], self.max_length)
        out = torch.full((len(ids), self.max_length), self.pad_id, dtype=torch.long)  # (B, L)
        for i, x in enumerate(ids):
            x = x[:self.max_length - 1] + [EOS_ID] if len(x) > self.max_length else x
            out[i, :len(x)] = torch.tensor(x)
        return out


def save_hf_tokenizer(directory: str | Path, pad_with: str = "eos", max_length: int = 77) -> None:
    """Write a transformers/diffusers `tokenizer/` folder (vocab.json, merges.txt, configs) built from
    open_clip's BPE file. SD2 folders (pad_with="zero") use pad_token "!" (id 0)."""
    if pad_with not in PAD_IDS:
        raise ValueError(f"pad_with must be one of {sorted(PAD_IDS)}, got {pad_with!r}")
    bpe, directory = clip_bpe(), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(tok, tok): i for tok, i in bpe.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(bpe.ranks.items(), key=lambda kv: kv[1])]
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>" if pad_with == "eos" else "!"}
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
              "do_lower_case": True, "add_prefix_space": False, "errors": "replace"}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


# ---------------------------------------------------------------------------------------------
# Configs: ours <-> transformers


def _hf_num_layers(cfg: TextEncoderConfig) -> int:
    # SD-compat: diffusers' SD2 text_encoder is the OpenCLIP tower minus its last (unused) layer
    return cfg.num_layers - 1 if cfg.kind == "openclip" and cfg.layer == "penultimate" else cfg.num_layers


def hf_config_of(cfg: TextEncoderConfig):
    """transformers config of the diffusers `text_encoder` for `cfg` (T5Config for kind "t5")."""
    from transformers import CLIPTextConfig, T5Config
    if cfg.kind == "t5":
        # dropout off: conditioning is deterministic whether or not the module is in train mode
        return T5Config(vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, d_ff=cfg.intermediate_size,
                        num_layers=cfg.num_layers, num_heads=cfg.num_heads, d_kv=cfg.d_kv,
                        feed_forward_proj=cfg.hidden_act, dropout_rate=0.0, use_cache=False)
    return CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                          intermediate_size=cfg.intermediate_size, projection_dim=cfg.projection_dim,
                          num_hidden_layers=_hf_num_layers(cfg), num_attention_heads=cfg.num_heads,
                          max_position_embeddings=cfg.max_length, hidden_act=cfg.hidden_act)


def text_config_from_hf(hf_config: dict, kind: str = "clip", layer: str = "last",
                        pad_with: str = "eos", max_length: int | None = None) -> TextEncoderConfig:
    """Inverse of `hf_config_of`: a TextEncoderConfig from a diffusers `text_encoder/config.json` dict."""
    h, model_type = hf_config, hf_config.get("model_type", "")
    if (kind == "t5") != (model_type == "t5"):
        raise ValueError(f"kind {kind!r} does not fit a text_encoder config of model_type {model_type!r}")
    if kind == "t5":
        return TextEncoderConfig(kind=kind, vocab_size=h["vocab_size"], hidden_size=h["d_model"],
                                 num_layers=h["num_layers"], num_heads=h["num_heads"],
                                 intermediate_size=h["d_ff"], d_kv=h["d_kv"],
                                 hidden_act=h.get("feed_forward_proj", "relu"), layer=layer,
                                 pad_with=pad_with, max_length=max_length or 77)
    extra = 1 if kind == "openclip" and layer == "penultimate" else 0
    return TextEncoderConfig(kind=kind, vocab_size=h["vocab_size"], hidden_size=h["hidden_size"],
                             num_layers=h["num_hidden_layers"] + extra, num_heads=h["num_attention_heads"],
                             intermediate_size=h["intermediate_size"],
                             max_length=max_length or h.get("max_position_embeddings", 77),
                             hidden_act=h.get("hidden_act", "quick_gelu"), layer=layer,
                             pad_with=pad_with, projection_dim=h.get("projection_dim", 512))


# ---------------------------------------------------------------------------------------------
# Encoders


class _TextEncoder(nn.Module):
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Token ids then hidden states: (B, L, D)."""
        device = next(self.parameters()).device
        return self(self.tokenize(prompts).to(device))


class CLIPTextEncoder(_TextEncoder):
    """CLIP's text transformer as `transformer` (SD1's FrozenCLIPEmbedder; diffusers-SD2), with
    transformers' CLIPTextModel names and numbers (ldm/clip_text.py)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer = cfg.layer
        self.tokenizer = Tokenizer(cfg.max_length, cfg.pad_with)
        self.transformer = CLIPTextTransformer(cfg.vocab_size, cfg.hidden_size, _hf_num_layers(cfg), cfg.num_heads,
                                               cfg.intermediate_size, cfg.max_length, cfg.hidden_act)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # (B, L, D) after the final LN; SD2: the penultimate layer's, then the final LN
        return self.transformer(tokens, skip_last=0 if self.layer == "last" else 1)


def _openclip_text_tower(cfg: TextEncoderConfig):
    from open_clip.transformer import QuickGELU, TextTransformer
    acts = {"gelu": nn.GELU, "quick_gelu": QuickGELU}
    if cfg.hidden_act not in acts:
        raise ValueError(f"openclip hidden_act must be one of {sorted(acts)}, got {cfg.hidden_act!r}")
    tower = TextTransformer(context_length=cfg.max_length, vocab_size=cfg.vocab_size, width=cfg.hidden_size,
                            heads=cfg.num_heads, layers=cfg.num_layers,
                            mlp_ratio=cfg.intermediate_size / cfg.hidden_size, output_dim=cfg.projection_dim,
                            act_layer=acts[cfg.hidden_act])
    if tower.transformer.resblocks[0].mlp.c_fc.out_features != cfg.intermediate_size:
        raise ValueError(f"open_clip cannot build intermediate_size={cfg.intermediate_size} from "
                         f"hidden_size={cfg.hidden_size}; use a multiple of hidden_size")
    # SD-compat: original SD2 files carry CLIP's logit_scale as cond_stage_model.model.logit_scale
    tower.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    return tower


class OpenCLIPTextEncoder(_TextEncoder):
    """open_clip text tower as `model` (SD2's FrozenOpenCLIPEmbedder, visual tower dropped)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer = cfg.layer
        self.tokenizer = Tokenizer(cfg.max_length, cfg.pad_with)
        self.model = _openclip_text_tower(cfg)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = self.model.context_length  # open_clip's causal mask is built for this length only
        if tokens.shape[1] != length:
            raise ValueError(f"OpenCLIP tokens must be (B, {length}), got {tuple(tokens.shape)}")
        last = len(self.model.transformer.resblocks) - (2 if self.layer == "penultimate" else 1)
        out = self.model.forward_intermediates(tokens, indices=[last], stop_early=True, output_fmt="NLC",
                                               normalize_intermediates=True, intermediates_only=True)
        return out["text_intermediates"][0]  # (B, L, D): blocks 0..last, then ln_final


class T5TextEncoder(_TextEncoder):
    """transformers T5EncoderModel as `transformer`; its tokenizer is read from `tokenizer_dir`."""

    def __init__(self, cfg: TextEncoderConfig, tokenizer_dir: str | Path | None = None):
        from transformers import T5EncoderModel
        super().__init__()
        self.max_length = cfg.max_length
        self.transformer = T5EncoderModel(hf_config_of(cfg))
        self.tokenizer = None if tokenizer_dir is None else _load_t5_tokenizer(tokenizer_dir)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("this T5 encoder has no tokenizer: provide tokenizer files (tokenizer.json or "
                             "spiece.model) via build_text_encoder(cfg, tokenizer_dir=...); forward(tokens) "
                             "works without them")
        if isinstance(prompts, str):
            raise TypeError(f"tokenize takes a list of strings; wrap the prompt: [{prompts!r}]")
        _warn_truncated(prompts, [len(x) for x in self.tokenizer(prompts).input_ids], self.max_length)
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids  # (B, L), ends with </s>, pads with 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids=tokens).last_hidden_state  # (B, L, D)


def _load_t5_tokenizer(directory: str | Path):
    from transformers import T5TokenizerFast
    directory = Path(directory)
    # transformers silently builds an empty-vocabulary tokenizer from a folder without these files
    if not any((directory / name).is_file() for name in ("tokenizer.json", "spiece.model")):
        raise ValueError(f"no T5 tokenizer files (tokenizer.json or spiece.model) in {directory}; "
                         "provide tokenizer files")
    return T5TokenizerFast.from_pretrained(str(directory))


def build_text_encoder(cfg: TextEncoderConfig, tokenizer_dir: str | Path | None = None) -> nn.Module:
    """A text encoder with random weights; `tokenizer_dir` (kind "t5" only) holds its tokenizer files."""
    if cfg.layer not in ("last", "penultimate") or (cfg.kind == "t5" and cfg.layer != "last"):
        raise ValueError(f"layer must be 'last' or 'penultimate' ('last' for t5), got {cfg.layer!r}")
    if cfg.kind == "t5":
        return T5TextEncoder(cfg, tokenizer_dir)
    if tokenizer_dir is not None:
        raise ValueError(f"kind {cfg.kind!r} has a built-in tokenizer; tokenizer_dir is for kind 't5' only")
    if cfg.kind == "clip":
        return CLIPTextEncoder(cfg)
    if cfg.kind == "openclip":
        return OpenCLIPTextEncoder(cfg)
    raise ValueError(f"text encoder kind must be 'clip', 'openclip' or 't5', got {cfg.kind!r}")


# ---------------------------------------------------------------------------------------------
# State-dict key maps. "ours" keys are relative to `cond_stage_model.` (CLIPTextEncoder.state_dict()).


def _swap_prefix(sd: dict, old: str, new: str) -> dict:
    bad = [k for k in sd if not k.startswith(old)]
    if bad:
        raise ValueError(f"expected keys starting with {old!r}, got {bad[:3]}")
    return {new + k[len(old):]: v for k, v in sd.items()}


def _drop_position_ids(sd: dict) -> dict:
    # SD-compat: older files (transformers < 4.31) saved the position_ids buffer; it is arange(L)
    return {k: v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}


def clip_original_to_ours(sd: dict) -> dict:
    """`transformer.text_model.X` (original SD1 `cond_stage_model.*`) -> `transformer.X`."""
    return _swap_prefix(_drop_position_ids(sd), "transformer.text_model.", "transformer.")


def clip_ours_to_original(sd: dict) -> dict:
    return _swap_prefix(sd, "transformer.", "transformer.text_model.")


def clip_diffusers_to_ours(sd: dict) -> dict:
    """diffusers `text_encoder/model.safetensors` (`text_model.X`, or `X` as transformers 5's
    state_dict has it) -> `transformer.X`."""
    sd = {k.removeprefix("text_model."): v for k, v in _drop_position_ids(sd).items()}
    return _swap_prefix(sd, "", "transformer.")


def clip_ours_to_diffusers(sd: dict) -> dict:
    """-> `text_model.X`, the layout of SD diffusers folders (transformers 4 and 5 both read it)."""
    return _swap_prefix(sd, "transformer.", "text_model.")


_OC_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
           "positional_embedding": "embeddings.position_embedding.weight",
           "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_OC_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
_QKV = ("q_proj", "k_proj", "v_proj")


def _count_layers(sd: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def openclip_to_hf_clip(state_dict: dict, num_hidden_layers: int | None = None,
                        prefix: str = "model.") -> dict:
    """OpenCLIP text tower (keys `prefix + token_embedding.weight`, ...) -> CLIPTextModel state dict.

    `num_hidden_layers` defaults to the tower's layers - 1: diffusers' SD2 text_encoder, whose
    last_hidden_state is SD2's penultimate layer + ln_final. text_projection/logit_scale are dropped."""
    sd = _swap_prefix(state_dict, prefix, "")
    layers = _count_layers(sd, "transformer.resblocks.")
    n = layers - 1 if num_hidden_layers is None else num_hidden_layers
    if not 0 < n <= layers:
        raise ValueError(f"num_hidden_layers must be in 1..{layers} for a {layers}-layer tower, got {n}")
    out, used = {hf: sd[oc] for oc, hf in _OC_TOP.items()}, set(_OC_TOP)
    for i in range(n):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for name, part in zip(_QKV, sd[f"{src}attn.in_proj_{kind}"].chunk(3)):  # (3D, D) -> 3 x (D, D)
                out[f"{dst}self_attn.{name}.{kind}"] = part.clone()
            out.update({f"{dst}{hf}.{kind}": sd[f"{src}{oc}.{kind}"] for oc, hf in _OC_LAYER.items()})
    used |= {k for k in sd if k.startswith("transformer.resblocks.")} | {"text_projection", "logit_scale"}
    if set(sd) - used:
        raise ValueError(f"unexpected OpenCLIP keys {sorted(set(sd) - used)[:5]}")
    return out


def hf_clip_to_openclip(state_dict: dict, num_layers: int | None = None, projection_dim: int | None = None,
                        prefix: str = "model.") -> dict:
    """CLIPTextModel state dict (optionally `text_model.`-prefixed) -> OpenCLIP text tower keys.

    `num_layers` defaults to the HF layers + 1 (SD2). text_projection comes from `text_projection.weight`
    if present, else zeros of (D, projection_dim or D); logit_scale is open_clip's init value."""
    sd = {k.removeprefix("text_model."): v for k, v in _drop_position_ids(state_dict).items()}
    n = _count_layers(sd, "encoder.layers.")
    layers = n + 1 if num_layers is None else num_layers
    if layers not in (n, n + 1):
        raise ValueError(f"num_layers must be {n} or {n + 1} for a {n}-layer CLIPTextModel, got {layers}")
    out = {oc: sd.pop(hf) for oc, hf in _OC_TOP.items()}
    for i in range(n):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd.pop(f"{src}self_attn.{name}.{kind}") for name in _QKV]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)  # 3 x (D, D) -> (3D, D)
            out.update({f"{dst}{oc}.{kind}": sd.pop(f"{src}{hf}.{kind}") for oc, hf in _OC_LAYER.items()})
    if layers == n + 1:
        # SD-compat: diffusers' SD2 text_encoder lacks the last resblock (SD2 reads the penultimate
        # layer). We write it as zeros: with zero LN weights both residual branches add 0, so it is
        # an identity and layer="last" equals "penultimate". diffusers' from_single_file skips it.
        last = f"transformer.resblocks.{n - 1}."
        out.update({f"transformer.resblocks.{n}." + k[len(last):]: torch.zeros_like(v)
                    for k, v in list(out.items()) if k.startswith(last)})
    width = out["token_embedding.weight"].shape[1]
    proj = sd.pop("text_projection.weight", None)  # CLIPTextModelWithProjection: Linear (P, D)
    out["text_projection"] = proj.T.contiguous() if proj is not None else \
        out["token_embedding.weight"].new_zeros(width, projection_dim or width)  # (D, P)
    out["logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=out["text_projection"].dtype)
    if sd:
        raise ValueError(f"unexpected CLIPTextModel keys {sorted(sd)[:5]}")
    return {prefix + k: v for k, v in out.items()}
