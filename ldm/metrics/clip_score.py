"""CLIP score (Hessel et al. 2021, with w = 100 as torchmetrics and the T2I papers report it):
the mean over pairs of 100 · max(cos(E_img(x), E_txt(y)), 0), with an open_clip model that the caller
supplies (no weights are downloaded here)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import as_int


def _check(images, prompts) -> list[str]:
    if isinstance(images, (str, bytes)) or not hasattr(images, "__len__") or not len(images):
        raise TypeError("images: give a non-empty list of PIL images")
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts: give one string per image ({len(images)} images, {len(prompts)} prompts), "
                         f"or one string for all")
    return prompts


@torch.no_grad()
def clip_scores(images, prompts, *, model, preprocess, tokenizer, batch_size: int = 32) -> torch.Tensor:
    """(N,) float32 scores 100 · max(cos, 0), one per (image, prompt) pair. `model`: an open_clip CLIP
    (encode_image, encode_text), `preprocess`: its image transform (PIL -> (3, S, S)), `tokenizer`:
    its tokenizer (list[str] -> (N, L) long)."""
    prompts = _check(images, prompts)
    as_int(batch_size, "batch_size", 1)
    param = next(model.parameters())
    out = []
    for i in range(0, len(images), batch_size):
        pixels = torch.stack([preprocess(im.convert("RGB")) for im in images[i:i + batch_size]])
        tokens = tokenizer(prompts[i:i + batch_size]).to(param.device)
        img = F.normalize(model.encode_image(pixels.to(param.device, param.dtype)).float(), dim=-1)
        txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
        out.append(100 * (img * txt).sum(-1).clamp(min=0))
    return torch.cat(out).cpu()


def clip_score(images, prompts, *, model, preprocess, tokenizer, batch_size: int = 32) -> float:
    """The mean of `clip_scores` (each pair clipped at 0 before averaging, as CLIPScore defines it;
    torchmetrics clips the mean instead, which differs only when some pairs score below 0)."""
    return float(clip_scores(images, prompts, model=model, preprocess=preprocess, tokenizer=tokenizer,
                             batch_size=batch_size).double().mean())
