"""Edge sharpness of the default model's 512-px decode, bicubic ×8 (before) vs its learned upsampler
(after): N ground-truth scenes rendered at 512 px (ldm/shapes, a seed namespace no training used) go
through the autoencoder (encode, posterior mean, decode) and are compared with the render.

    python bench/upsampler_sharpness.py [--model weights/ldm-default.safetensors] [--n 50]

edge_ratio: mean Sobel gradient magnitude on object-border pixels (within 2 px of the render's own
object masks) relative to the render's (1.0 = as sharp as the ground truth); psnr: whole image (dB,
peak-to-peak 2); border_psnr: on those border pixels only. The reference row is the best a bicubic ×8
can do: the render's own 64-px antialiased downsample (what the encoder sees), resampled ×8."""
import argparse
import time

import torch
import torch.nn.functional as F

from ldm import checkpoint
from ldm.autoencoder import AutoencoderKL
from ldm.formats.keys import VAE, split
from ldm.training.upsampler import as_float, decoder_input, render_set, sharpness


def load_autoencoder(path) -> AutoencoderKL:
    cfg, sd = checkpoint.load(path)
    ae = AutoencoderKL(cfg.autoencoder)
    checkpoint.load_into(ae, {k: v.float() for k, v in split(sd, VAE).items()}, str(path))
    return ae.eval()


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="weights/ldm-default.safetensors")
    p.add_argument("--n", type=int, default=50, help="scenes")
    p.add_argument("--namespace", default="upsampler-bench")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    ae = load_autoencoder(a.model)
    k = ae.config.pixel_scale
    t0 = time.perf_counter()
    truth_u8, bands = render_set(a.namespace, a.n, 64 * k, masks=True)
    truth = as_float(truth_u8)
    low = decoder_input(ae, truth_u8)                                       # (N, 3, 64, 64)
    rows = {"reference: 64-px render, bicubic ×8": F.interpolate(
                F.interpolate(truth, scale_factor=1 / k, mode="bicubic", antialias=True, align_corners=False),
                scale_factor=k, mode="bicubic", align_corners=False),
            "before: decode, bicubic ×8": F.interpolate(low, scale_factor=k, mode="bicubic", align_corners=False)}
    if hasattr(ae, "upsampler"):
        c = ae.config
        t = time.perf_counter()
        rows[f"after: decode, learned ×8 ({c.upsampler_channels} ch, {c.upsampler_blocks} blocks)"] = \
            torch.cat([ae.upsampler(low[i:i + 8]) for i in range(0, a.n, 8)])
        ms = (time.perf_counter() - t) / a.n * 1000
    else:
        ms = None
    print(f"{a.n} scenes at {64 * k} px ({a.namespace}), {a.model}; "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"{'':<48} {'edge_ratio':>10} {'psnr':>7} {'border_psnr':>12}")
    for name, images in rows.items():
        s = sharpness(images, truth, bands)
        print(f"{name:<48} {s['edge_ratio']:>10.3f} {s['psnr']:>7.2f} {s['border_psnr']:>12.2f}")
    if ms is None:
        print("(this model has no upsampler: autoencoder.upsampler_channels is 0)")
    else:
        print(f"upsampler: {ms:.1f} ms per image on this CPU")


if __name__ == "__main__":
    main()
