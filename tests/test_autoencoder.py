"""The autoencoder's own contract: shapes, the posterior, and the fixed pixel_scale resampling."""
from dataclasses import replace

import pytest
import torch

from ldm import Pipeline
from tiny_models import random_model, tiny_sd1


def test_posterior_and_shapes():
    vae = random_model(tiny_sd1()).first_stage_model
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    post = vae.encode(x)
    assert post.mean.shape == post.logvar.shape == (2, 4, 16, 16)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(post.sample(g1), post.sample(g2)) and not torch.equal(post.sample(), post.mean)
    assert post.kl().shape == (2,) and (post.kl() >= 0).all()
    assert vae.decode(post.mean).shape == (2, 3, 32, 32)


def test_pixel_scale_wraps_the_network_in_fixed_resampling(tmp_path):
    base = tiny_sd1()
    cfg = replace(base, autoencoder=replace(base.autoencoder, pixel_scale=4), sample_size=128)
    assert cfg.autoencoder.downsample_factor == 8 and cfg.latent_size == 16
    pipe = Pipeline(random_model(cfg))
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    z = pipe.encode_image(x, sample=False)
    assert z.shape == (1, 4, 16, 16)
    # the learned encoder sees the image resampled ×1/4
    inner = pipe.model.first_stage_model.encoder(
        torch.nn.functional.interpolate(x, scale_factor=0.25, mode="bicubic", antialias=True))
    assert torch.allclose(z, pipe.model.first_stage_model.quant_conv(inner)[:, :4] * cfg.autoencoder.scale_factor)
    assert pipe.decode_latents(z).shape == (1, 3, 128, 128)
    assert pipe("a", steps=2, seed=0)[0].size == (128, 128)
    pipe.save_pretrained(tmp_path / "m.safetensors")
    assert Pipeline.from_pretrained(tmp_path / "m.safetensors").config == cfg
    with pytest.raises(ValueError, match="pixel_scale"):
        pipe.save_pretrained(tmp_path / "o.safetensors", "original")
    with pytest.raises(ValueError, match="pixel_scale"):
        pipe.save_pretrained(tmp_path / "d", "diffusers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # nothing half-written
