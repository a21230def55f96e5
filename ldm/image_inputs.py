"""Images and masks users pass in (img2img, inpainting), as the tensors the pipeline needs, checked
before any work. Conventions are diffusers' (`VaeImageProcessor`): PIL RGB in [0, 255] -> [-1, 1];
tensors are already in [-1, 1]; a mask is white where to repaint, binarised at 0.5."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .checks import as_size


def _pil_to_tensor(image: Image.Image, what: str) -> torch.Tensor:
    if image.mode != "RGB":
        raise ValueError(f"{what} is a {image.mode} image; give an RGB one (image.convert('RGB'))")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)


def as_images(image, n_prompts: int, factor: int, what: str = "image") -> torch.Tensor:
    """(B, 3, H, W) float32 in [-1, 1], B = 1 or n_prompts, from a PIL image, a list of them (one
    per prompt) or a tensor (B, 3, H, W) / (3, H, W) in [-1, 1]. H, W: multiples of `factor`."""
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        if not image or not all(isinstance(i, Image.Image) for i in image):
            raise TypeError(f"{what} must be a PIL image, a list of PIL images or a tensor (B, 3, H, W)")
        if len({i.size for i in image}) > 1:
            raise ValueError(f"the {what}s have different sizes {sorted({i.size for i in image})}: give "
                             f"images of one size")
        x = torch.stack([_pil_to_tensor(i, what) for i in image]) * 2 - 1
    elif isinstance(image, torch.Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"a tensor {what} must have shape (B, 3, H, W), got {tuple(image.shape)}")
        x = x.detach().float().cpu()
        if not torch.isfinite(x).all() or x.min() < -1.001 or x.max() > 1.001:
            raise ValueError(f"a tensor {what} must hold values in [-1, 1] (diffusers' convention), "
                             f"got [{x.min().item():.3g}, {x.max().item():.3g}]")
    else:
        raise TypeError(f"{what} must be a PIL image, a list of PIL images or a tensor (B, 3, H, W), "
                        f"got {type(image).__name__}")
    if len(x) not in (1, n_prompts):
        raise ValueError(f"{len(x)} {what}s for {n_prompts} prompts: give one {what}, or one per prompt")
    as_size(x.shape[2], f"the {what}'s height", factor)
    as_size(x.shape[3], f"the {what}'s width", factor)
    return x


def as_masks(mask, images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) of 0/1 (1 = repaint) at the images' size, from a PIL image (any mode, read as
    grey), a list of them, or a tensor (B, 1, H, W) / (1, H, W) / (H, W) in [0, 1]."""
    if isinstance(mask, Image.Image):
        mask = [mask]
    if isinstance(mask, (list, tuple)):
        if not mask or not all(isinstance(m, Image.Image) for m in mask):
            raise TypeError("mask_image must be a PIL image, a list of PIL images or a tensor (B, 1, H, W)")
        m = torch.stack([torch.from_numpy(np.asarray(i.convert("L"), dtype=np.float32) / 255.0)[None]
                         for i in mask])
    elif isinstance(mask, torch.Tensor):
        m = mask.detach().float().cpu()
        m = m[None, None] if m.ndim == 2 else m[None] if m.ndim == 3 else m
        if m.ndim != 4 or m.shape[1] != 1 or not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
            raise ValueError(f"a tensor mask_image must have shape (B, 1, H, W) and values in [0, 1], "
                             f"got shape {tuple(mask.shape)}")
    else:
        raise TypeError(f"mask_image must be a PIL image, a list of PIL images or a tensor, "
                        f"got {type(mask).__name__}")
    if m.shape[2:] != images.shape[2:]:
        raise ValueError(f"mask_image is {m.shape[3]}×{m.shape[2]} but the image is "
                         f"{images.shape[3]}×{images.shape[2]}: give a mask of the image's size")
    if len(m) not in (1, len(images)) and len(images) != 1:
        raise ValueError(f"{len(m)} masks for {len(images)} images: give one mask, or one per image")
    return (m >= 0.5).float()                            # diffusers' binarize: white = repaint
