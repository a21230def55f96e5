"""Tokenizer ids vs transformers / open_clip, and text encoders vs their reference implementations
(random tiny weights, fp32)."""
import warnings
from dataclasses import replace

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from ldm.config import TextEncoderConfig
from ldm.text import (Tokenizer, build_text_encoder, clip_diffusers_to_ours, clip_original_to_ours,
                      clip_ours_to_diffusers, clip_ours_to_original, hf_clip_to_openclip, hf_config_of,
                      openclip_to_hf_clip, save_hf_tokenizer, text_config_from_hf)

PLAIN = ["a photo of a cat", "An astronaut riding a horse on Mars, 4k, highly detailed.",
         "", "it's  two\tdogs' toys; 3.5 x 12 = 42?", "café naïve Zoë, ça va"]
LONG = "a red circle " * 30          # 90 BPE tokens + start/end
CLIP_CFG = TextEncoderConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=37,
                             projection_dim=32)
OC_CFG = TextEncoderConfig(kind="openclip", hidden_size=64, num_layers=3, num_heads=4, intermediate_size=256,
                           hidden_act="gelu", layer="penultimate", pad_with="zero", projection_dim=32)
T5_CFG = TextEncoderConfig(kind="t5", vocab_size=32, hidden_size=32, num_layers=2, num_heads=2,
                           intermediate_size=48, d_kv=8, hidden_act="gated-gelu", max_length=8)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def built(cfg, seed=0, **kw):
    torch.manual_seed(seed)
    return build_text_encoder(cfg, **kw).eval()


@pytest.fixture(scope="module")
def hf_tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    save_hf_tokenizer(root / "sd1", pad_with="eos")
    save_hf_tokenizer(root / "sd2", pad_with="zero")
    return {p: CLIPTokenizer.from_pretrained(str(root / d)) for p, d in (("eos", "sd1"), ("zero", "sd2"))}


def hf_ids(tok, prompts):
    return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize("pad_with", ["eos", "zero"])
def test_tokenizer_matches_transformers(hf_tokenizers, pad_with):
    tok = hf_tokenizers[pad_with]
    assert tok.pad_token_id == {"eos": 49407, "zero": 0}[pad_with]
    with warnings.catch_warnings(record=True):
        prompts = PLAIN + [LONG]
        assert torch.equal(Tokenizer(pad_with=pad_with)(prompts), hf_ids(tok, prompts))


def test_tokenizer_matches_open_clip_on_plain_text():
    with warnings.catch_warnings(record=True):
        ours = Tokenizer(pad_with="zero")(PLAIN + [LONG])
    assert torch.equal(ours, open_clip.tokenize(PLAIN + [LONG]))


def test_tokenizer_padding_and_empty_prompt():
    eos, zero = Tokenizer(pad_with="eos")([""]), Tokenizer(pad_with="zero")([""])
    assert eos.shape == zero.shape == (1, 77) and eos.dtype == torch.long
    assert eos[0, :2].tolist() == zero[0, :2].tolist() == [49406, 49407]
    assert (eos[0, 2:] == 49407).all() and (zero[0, 2:] == 0).all()


def test_tokenizer_follows_transformers_cleaning(hf_tokenizers):
    # transformers neither unescapes HTML nor runs ftfy; open_clip does both
    text = ["salt &amp; pepper"]
    ours = Tokenizer()(text)
    assert torch.equal(ours, hf_ids(hf_tokenizers["eos"], text))
    assert not torch.equal(ours, open_clip.tokenize(text))


def test_exclamation_mark_follows_open_clip_not_sd2_folder(hf_tokenizers):
    # an SD2 folder (pad_token "!") splits "!" out as the pad token; SD2 was trained with open_clip's ids
    text = ["wow!"]
    ours = Tokenizer(pad_with="zero")(text)
    assert torch.equal(ours, open_clip.tokenize(text))
    assert ours[0, 2].item() == 256 and hf_ids(hf_tokenizers["zero"], text)[0, 2].item() == 0


def test_truncation_keeps_end_token_and_warns_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = Tokenizer()([LONG, "a cat", LONG + "blue"])
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "prompt 0" in message and "dropped 15 of 92 tokens" in message
    assert "prompt 2" in message and "dropped 16 of 93 tokens" in message and "prompt 1" not in message
    assert ids[0, -1].item() == 49407 and ids[0, 0].item() == 49406
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Tokenizer()(["a cat"])


def test_tokenizer_rejects_bad_arguments():
    with pytest.raises(TypeError, match="list of strings"):
        Tokenizer()("a cat")
    with pytest.raises(ValueError, match="pad_with"):
        Tokenizer(pad_with="one")


# ---------------------------------------------------------------------------------------------
# CLIP (transformers)


def tiny_clip_reference(state_dict, layers=2, act="quick_gelu"):
    ref = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                       intermediate_size=37, projection_dim=32, hidden_act=act)).eval()
    ref.load_state_dict(state_dict, strict=layers == 2)
    return ref


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_encoder_matches_clip_text_model_bit_for_bit(act):
    """ldm/clip_text.py is ours (transformers' import is slow): the same numbers, not just close ones."""
    enc = built(replace(CLIP_CFG, hidden_act=act))
    tokens = enc.tokenize(PLAIN)
    weights = {k.removeprefix("transformer."): v for k, v in enc.state_dict().items()}
    with torch.no_grad():
        ref = tiny_clip_reference(weights, act=act)
        assert torch.equal(enc(tokens), ref(input_ids=tokens).last_hidden_state)
        close(enc.encode(PLAIN), enc(tokens))
        penultimate = build_text_encoder(replace(CLIP_CFG, layer="penultimate", hidden_act=act))
        penultimate.load_state_dict(enc.state_dict())
        # penultimate + final LN == a 1-layer CLIPTextModel with the same first layer
        ref = tiny_clip_reference(weights, layers=1, act=act)
        assert torch.equal(penultimate(tokens), ref(input_ids=tokens).last_hidden_state)
    assert enc(tokens).shape == (len(PLAIN), 77, 32)


def test_clip_key_maps_round_trip_and_load_in_transformers(tmp_path):
    enc = built(CLIP_CFG)
    ours = enc.state_dict()
    assert set(ours) == {"transformer." + k for k in CLIPTextModel(hf_config_of(CLIP_CFG)).state_dict()}
    original = clip_ours_to_original(ours)
    assert "transformer.text_model.encoder.layers.1.mlp.fc2.weight" in original
    original["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]  # older files
    assert clip_original_to_ours(original).keys() == ours.keys()
    diffusers = clip_ours_to_diffusers(ours)
    assert clip_diffusers_to_ours(diffusers).keys() == ours.keys()
    hf_config_of(CLIP_CFG).save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in diffusers.items()}, tmp_path / "model.safetensors")
    loaded = CLIPTextModel.from_pretrained(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k.removeprefix("transformer.")], v) for k, v in ours.items())
    with pytest.raises(ValueError, match="transformer.text_model."):
        clip_original_to_ours({"model.token_embedding.weight": torch.zeros(1)})


@pytest.mark.parametrize("cfg", [CLIP_CFG, OC_CFG, T5_CFG])
def test_hf_config_round_trip(cfg):
    hf = hf_config_of(cfg)
    assert text_config_from_hf(hf.to_dict(), cfg.kind, cfg.layer, cfg.pad_with, cfg.max_length) == cfg
    if cfg.kind == "openclip":
        assert hf.num_hidden_layers == cfg.num_layers - 1 and hf.hidden_act == "gelu"


# ---------------------------------------------------------------------------------------------
# OpenCLIP


def open_clip_reference(encoder):
    """open_clip's own CLIP (tiny visual tower) with the encoder's text weights."""
    ref = open_clip.CLIP(embed_dim=32, vision_cfg=dict(layers=1, width=32, patch_size=16, image_size=32,
                                                       head_width=16),
                         text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=4, layers=3))
    missing, unexpected = ref.load_state_dict(
        {k.removeprefix("model."): v for k, v in encoder.state_dict().items()}, strict=False)
    assert unexpected == [] and missing and all(k.startswith("visual.") for k in missing)
    return ref.eval()


def test_openclip_encoder_matches_open_clip():
    enc = built(OC_CFG)
    keys = enc.state_dict().keys()
    assert {"model.token_embedding.weight", "model.positional_embedding", "model.ln_final.weight",
            "model.text_projection", "model.logit_scale", "model.transformer.resblocks.2.attn.in_proj_weight",
            "model.transformer.resblocks.2.mlp.c_proj.bias"} <= keys
    assert not any(k.startswith("model.visual") or k.endswith("attn_mask") for k in keys)
    ref, tokens = open_clip_reference(enc), enc.tokenize(PLAIN)
    with torch.no_grad():
        # SD2 FrozenOpenCLIPEmbedder: every resblock but the last, with the causal mask, then ln_final
        x = ref.token_embedding(tokens) + ref.positional_embedding
        for block in ref.transformer.resblocks[:-1]:
            x = block(x, attn_mask=ref.attn_mask)
        close(enc(tokens), ref.ln_final(x))
        last = build_text_encoder(replace(OC_CFG, layer="last"))
        last.load_state_dict(enc.state_dict())
        hidden = last(tokens)  # pooled at the end token and projected == open_clip's encode_text
        pooled = hidden[torch.arange(len(tokens)), tokens.argmax(-1)] @ last.model.text_projection
        close(pooled, ref.encode_text(tokens))


def test_openclip_to_hf_clip_matches_penultimate_and_diffusers():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    enc = built(OC_CFG)
    hf = CLIPTextModel(hf_config_of(OC_CFG)).eval()
    hf.load_state_dict(openclip_to_hf_clip(enc.state_dict()))  # strict: all keys, no extras
    tokens = enc.tokenize(PLAIN)
    with torch.no_grad():
        close(hf(input_ids=tokens).last_hidden_state, enc(tokens))
    # diffusers' from_single_file reads our SD2 keys to the same CLIPTextModel weights
    original = {"cond_stage_model." + k: v for k, v in enc.state_dict().items()}
    theirs = convert_open_clip_checkpoint(hf, original)
    theirs = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    assert all(torch.equal(theirs[k], v) for k, v in hf.state_dict().items())


def test_hf_clip_to_openclip_round_trip_is_exact():
    torch.manual_seed(1)
    hf_sd = CLIPTextModel(hf_config_of(OC_CFG)).state_dict()
    enc = build_text_encoder(OC_CFG).eval()
    enc.load_state_dict(hf_clip_to_openclip(hf_sd, projection_dim=32))  # strict
    back = openclip_to_hf_clip(enc.state_dict())
    assert back.keys() == hf_sd.keys() and all(torch.equal(back[k], v) for k, v in hf_sd.items())
    # the zero last resblock is an identity, so layer "last" == "penultimate"
    last = build_text_encoder(replace(OC_CFG, layer="last")).eval()
    last.load_state_dict(enc.state_dict())
    tokens = enc.tokenize(["a cat"])
    with torch.no_grad():
        assert torch.equal(last(tokens), enc(tokens))
    with pytest.raises(ValueError, match="num_layers"):
        hf_clip_to_openclip(hf_sd, num_layers=5)


# ---------------------------------------------------------------------------------------------
# T5


@pytest.fixture(scope="module")
def t5_tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("t5tok")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in "a red blue cat circle on the".split()]
    T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(str(directory))
    return directory


def test_t5_encoder_matches_t5_encoder_model(t5_tokenizer_dir):
    enc = built(T5_CFG, tokenizer_dir=t5_tokenizer_dir)
    ref = T5EncoderModel(T5Config(vocab_size=32, d_model=32, d_ff=48, num_layers=2, num_heads=2, d_kv=8,
                                  feed_forward_proj="gated-gelu")).eval()
    ref.load_state_dict({k.removeprefix("transformer."): v for k, v in enc.state_dict().items()})
    tokens = enc.tokenize(["a red cat", "a blue circle on the cat"])
    assert tokens.tolist() == [[4, 5, 7, 1, 0, 0, 0, 0], [4, 6, 8, 9, 10, 7, 1, 0]]
    with torch.no_grad():
        close(enc(tokens), ref(input_ids=tokens).last_hidden_state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert enc.tokenize(["a red cat " * 3])[0, -1].item() == 1
    assert len(caught) == 1 and "dropped 2 of 10 tokens" in str(caught[0].message)


def test_t5_without_tokenizer_files(tmp_path):
    enc = built(T5_CFG)
    assert enc(torch.tensor([[4, 5, 1, 0]])).shape == (1, 4, 32)
    with pytest.raises(ValueError, match="tokenizer files"):
        enc.tokenize(["a cat"])
    with pytest.raises(ValueError, match="tokenizer files"):
        build_text_encoder(T5_CFG, tokenizer_dir=tmp_path)


def test_build_rejects_unknown_kind_and_layer():
    with pytest.raises(ValueError, match="kind"):
        build_text_encoder(TextEncoderConfig(kind="bert"))
    with pytest.raises(ValueError, match="layer"):
        build_text_encoder(TextEncoderConfig(layer="first"))
