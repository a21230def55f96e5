"""Autoencoder training losses after CompVis `LPIPSWithDiscriminator` (taming-transformers): L1
reconstruction (+ optional LPIPS), KL to N(0, I), and a PatchGAN discriminator with hinge loss whose
generator term is weighted adaptively by gradient norms at the decoder's last layer (Esser et al.
2021, eq. 7). Also the reconstruction PSNR used for held-out evaluation."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class NLayerDiscriminator(nn.Sequential):
    """PatchGAN (pix2pix, Isola et al. 2017): one real/fake logit per ~70×70 patch for n_layers=3."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        layers = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        super().__init__(*layers)
        for m in self.modules():  # taming `weights_init`
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """‖∇_L nll‖ / (‖∇_L g_loss‖ + 1e-4), clamped to [0, 1e4], L the decoder's last weight: the GAN
    term pulls as hard as the reconstruction term wherever it is switched on."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


REC_LOSSES = ("l1", "mse")


def check_rec_loss(name: str) -> None:
    if name not in REC_LOSSES:
        raise ValueError(f"rec_loss must be one of {REC_LOSSES}, got {name!r}")


def vae_loss(x: torch.Tensor, x_rec: torch.Tensor, posterior, kl_weight: float,
             perceptual=None, perceptual_weight: float = 0.0, rec_loss: str = "l1") -> tuple[torch.Tensor, torch.Tensor]:
    """(nll, kl): per-pixel L1 or squared error (+ LPIPS) summed over pixels and KL summed over
    latents, both averaged over the batch, as in LDM (so kl_weight=1e-6 means what it means there)."""
    check_rec_loss(rec_loss)
    diff = x - x_rec
    rec = diff.abs() if rec_loss == "l1" else diff.square()               # (B, 3, H, W)
    if perceptual is not None and perceptual_weight > 0:
        rec = rec + perceptual_weight * perceptual(x.contiguous(), x_rec.contiguous())  # (B, 1, 1, 1)
    nll = rec.sum() / x.shape[0]
    kl = posterior.kl().sum() / x.shape[0]
    return nll, kl_weight * kl


def psnr(x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (the same as for [0, 1] images) -> (B,)."""
    mse = ((x.float() - x_rec.float().clamp(-1, 1)) ** 2).mean(dim=(1, 2, 3)) / 4.0
    return -10.0 * torch.log10(mse.clamp(min=1e-10))


def load_lpips(path: str) -> nn.Module:
    """LPIPS-VGG from local files only: the `lpips` package, its linear-layer weights at `path`, and
    torchvision's VGG16 weights already in the torch hub cache (nothing is downloaded)."""
    try:
        import lpips
    except ImportError as e:
        raise ValueError("perceptual_weight > 0 needs the `lpips` package (pip install lpips); "
                         "or set perceptual_weight=0") from e
    if not path or not Path(path).is_file():
        raise ValueError(f"perceptual_weight > 0 needs LPIPS weights on disk: set lpips_path to the "
                         f"vgg.pth of the lpips package (got {path!r}), or set perceptual_weight=0")
    vgg = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    if not vgg.is_file():
        raise ValueError(f"perceptual_weight > 0 needs torchvision's VGG16 weights at {vgg} "
                         f"(no download is attempted); or set perceptual_weight=0")
    model = lpips.LPIPS(net="vgg", model_path=path, verbose=False)
    return model.eval().requires_grad_(False)
