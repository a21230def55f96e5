"""The definition of done for the core networks: our UNet, autoencoder and text encoder compute
what diffusers / transformers compute on the same random weights, loaded from either side."""
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from ldm import Pipeline
from ldm.text import Tokenizer

from tiny_models import rel_err

TOL = 1e-5


def _unet_inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    return x, ctx


def _assert_unet_equal(ours, theirs, cfg):
    x, ctx = _unet_inputs(cfg)
    for t in (0, 1, 421, 999):
        tt = torch.tensor([t, max(t - 7, 0)])
        with torch.no_grad():
            a = ours(x, tt, ctx)
            b = theirs(x, tt, encoder_hidden_states=ctx).sample
        assert b.abs().mean() > 1e-3  # weights are random: no trivial zero output
        assert rel_err(a, b) < TOL, (t, rel_err(a, b))


def _assert_vae_equal(ours, theirs):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        pa, pb = ours.encode(x), theirs.encode(x).latent_dist
        assert rel_err(pa.mean, pb.mean) < TOL and rel_err(pa.logvar, pb.logvar) < TOL
        z = pa.mean
        assert rel_err(ours.decode(z), theirs.decode(z).sample) < TOL


def test_unet_matches_diffusers(saved, family):
    s = saved[family]
    theirs = UNet2DConditionModel.from_pretrained(s["diffusers"] / "unet").eval()
    ours = Pipeline.from_pretrained(s["diffusers"]).unet
    _assert_unet_equal(ours, theirs, s["cfg"])


def test_vae_matches_diffusers(saved, family):
    s = saved[family]
    theirs = AutoencoderKL.from_pretrained(s["diffusers"] / "vae").eval()
    _assert_vae_equal(Pipeline.from_pretrained(s["diffusers"]).vae, theirs)


def test_text_encoder_matches_transformers(saved, family):
    s = saved[family]
    theirs = CLIPTextModel.from_pretrained(s["diffusers"] / "text_encoder").eval()
    pipe = Pipeline.from_pretrained(s["diffusers"])
    prompts = ["a red circle to the left of a blue square", ""]
    tokens = pipe.text_encoder.tokenize(prompts)
    with torch.no_grad():
        a = pipe.encode_prompt(prompts)
        b = theirs(tokens).last_hidden_state
    assert rel_err(a, b) < TOL


def test_tokenizer_ids_match_saved_folder(saved, family):
    from transformers import CLIPTokenizer
    s = saved[family]
    ref = CLIPTokenizer.from_pretrained(s["diffusers"] / "tokenizer")
    prompts = ["a photo of an astronaut riding a horse", "", "word " * 100]
    ids = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    pad = "eos" if family == "sd1" else "zero"
    with pytest.warns(UserWarning, match="dropped"):
        assert torch.equal(Tokenizer(pad_with=pad)(prompts), ids)


def test_diffusers_single_file_reads_our_original_file(saved, family):
    """diffusers' own single-file loader (with the config folder, offline) reads what we write."""
    s = saved[family]
    ref = StableDiffusionPipeline.from_single_file(str(s["original"]), config=str(s["diffusers"]),
                                                   safety_checker=None, local_files_only=True)
    _assert_unet_equal(s["model"].unet, ref.unet.eval(), s["cfg"])
    _assert_vae_equal(s["model"].first_stage_model, ref.vae.eval())
    prompts = ["two green stars"]
    with torch.no_grad():
        a = s["pipe"].encode_prompt(prompts)
        b = ref.text_encoder(s["pipe"].text_encoder.tokenize(prompts)).last_hidden_state
    assert rel_err(a, b) < TOL


def test_diffusers_made_models_load_into_ldm(tmp_path):
    """The other direction: models built and saved by diffusers/transformers load into ldm."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTokenizer

    from ldm.text import save_hf_tokenizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=2, vocab_size=49408, projection_dim=32))
    with torch.no_grad():
        for m in (unet, vae, text):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    save_hf_tokenizer(tmp_path / "tok")
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, scheduler=scheduler,
                            tokenizer=CLIPTokenizer.from_pretrained(tmp_path / "tok"), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(tmp_path / "sd")
    pipe = Pipeline.from_pretrained(tmp_path / "sd")
    _assert_unet_equal(pipe.unet, unet.eval(), pipe.config)
    _assert_vae_equal(pipe.vae, vae.eval())
    tokens = pipe.text_encoder.tokenize(["a blue ring"])
    with torch.no_grad():
        assert rel_err(pipe.text_encoder(tokens), text(tokens).last_hidden_state) < TOL


@pytest.mark.slow
def test_full_sd15_size_parity():
    """The real SD1.5 architecture (859M-parameter UNet) on random weights: UNet, VAE, text."""
    from ldm.presets import sd15
    from ldm.interop import to_diffusers
    from tiny_models import random_model
    pipe = Pipeline(random_model(sd15()))
    ref = to_diffusers(pipe)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        a = pipe.unet(x, torch.tensor([321]), ctx)
        b = ref.unet(x, torch.tensor([321]), encoder_hidden_states=ctx).sample
        assert rel_err(a, b) < TOL
        z = torch.randn(1, 4, 16, 16, generator=g)
        assert rel_err(pipe.vae.decode(z), ref.vae.decode(z).sample) < TOL
        tokens = pipe.text_encoder.tokenize(["a photograph of an astronaut riding a horse"])
        assert rel_err(pipe.text_encoder(tokens), ref.text_encoder(tokens).last_hidden_state) < TOL


def test_class_conditional_scale_shift_unet_matches_diffusers():
    """The seeds' other conditioning path: a class label added to the time embedding, injected
    channel-wise as AdaGN scale/shift (diffusers: num_class_embeds, resnet_time_scale_shift)."""
    from dataclasses import replace

    from ldm.formats.diffusers_configs import unet_config_to_diffusers
    from ldm.formats.diffusers_keys import unet_to_diffusers
    from ldm.formats.keys import UNET, split
    from tiny_models import random_model, tiny_sd1
    base = tiny_sd1()
    cfg = replace(base, unet=replace(base.unet, num_classes=5, use_scale_shift_norm=True))
    model = random_model(cfg)
    theirs = UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg.unet, 16)).eval()
    theirs.load_state_dict(unet_to_diffusers(split(model.state_dict(), UNET), cfg.unet))
    x, ctx = _unet_inputs(cfg)
    y = torch.tensor([1, 4])
    with torch.no_grad():
        a = model.unet(x, torch.tensor([10, 900]), ctx, y)
        b = theirs(x, torch.tensor([10, 900]), encoder_hidden_states=ctx, class_labels=y).sample
        other = model.unet(x, torch.tensor([10, 900]), ctx, torch.tensor([2, 2]))
    assert rel_err(a, b) < TOL
    assert rel_err(a, other) > 1e-3      # the label changes the output
    with pytest.raises(ValueError, match="class-conditional"):
        model.unet(x, torch.tensor([10, 900]), ctx)
