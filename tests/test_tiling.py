"""Tiled decoding (ldm/tiling.py): the tiles cover every pixel once blended, a local decoder gives
exactly the whole decode, the real decoder sees tiles no larger than asked and stays close."""
import torch

from ldm import Pipeline
from ldm.tiling import decode_tiled, starts
from tiny_models import random_model, tiny_sd1


def test_tile_origins_cover_the_side_and_end_flush():
    assert starts(64, 64, 48) == [0] and starts(10, 64, 48) == [0]
    assert starts(200, 64, 48) == [0, 48, 96, 136]              # the last tile ends at 200


def test_a_local_decoder_is_decoded_exactly_in_tiles():
    def decode(z):                                               # each latent cell -> its own 4×4 pixels
        return torch.tanh(z[:, :3]).repeat_interleave(4, 2).repeat_interleave(4, 3)
    z = torch.randn(2, 4, 150, 97)
    assert torch.allclose(decode_tiled(decode, z, 4, tile=64, overlap=16), decode(z), atol=1e-6)


def test_pipeline_tiles_large_latents_and_stays_close_to_a_whole_decode():
    pipe = Pipeline(random_model(tiny_sd1()))
    sizes = []
    decode = pipe.model.decode_first_stage
    pipe.model.decode_first_stage = lambda z: sizes.append(tuple(z.shape[2:])) or decode(z)
    z = torch.randn(1, 4, 136, 130, generator=torch.Generator().manual_seed(0))
    tiled = pipe.decode_latents(z)                               # 136·130 > 128²: tiles, automatically
    assert len(sizes) > 1 and max(max(s) for s in sizes) <= 64
    sizes.clear()
    whole = pipe.decode_latents(z, tiled=False)
    assert sizes == [(136, 130)] and tiled.shape == whole.shape == (1, 3, 272, 260)
    # the mid-block attention sees one tile at a time: close, not equal (as diffusers' VAE tiling)
    assert (tiled - whole).abs().mean() < 0.05 * whole.abs().mean()
    sizes.clear()
    pipe.decode_latents(torch.randn(1, 4, 16, 16))
    assert sizes == [(16, 16)]                                   # small latents: one whole decode
