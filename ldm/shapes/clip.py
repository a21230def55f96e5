"""A small CLIP of the shape world (Radford et al. 2021): a ViT image tower (ldm's `ImageEncoder`,
so its image embeddings can condition a variation / unCLIP decoder of the default model) and a
CLIP text tower, trained contrastively on freshly rendered captioned scenes, on the CPU.
Usage: python -m ldm.shapes.clip out/shape_clip --steps 600 --batch 128
       [--init out/shape_clip/clip.safetensors] (continue an earlier run on new scenes)
Writes OUT/clip.safetensors (both towers; the configs in its metadata) and OUT/log.jsonl, and
prints the held-out retrieval accuracy (image -> its caption among `--eval-batch` captions)."""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTextModelWithProjection

from ldm import text
from ldm.config import TextEncoderConfig
from ldm.formats.files import write_safetensors
from ldm.image_config import ImageEncoderConfig
from ldm.image_encoder import ImageEncoder, clip_preprocess
from ldm.shapes.prompts import parse
from ldm.shapes.scenes import KINDS, caption, held_out, random_scene, render

IMAGE = ImageEncoderConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, image_size=64,
                           patch_size=8, projection_dim=64, hidden_act="quick_gelu")
TEXT = TextEncoderConfig(hidden_size=128, num_layers=3, num_heads=4, intermediate_size=512, max_length=32,
                         projection_dim=64)


def batch(n: int, seed: int, held: bool = False) -> tuple[torch.Tensor, list[str]]:
    """n scenes rendered at 64 px: (pixels (n, 3, 64, 64) normalised as CLIP, captions); `held`: the
    held-out colour-shape pairs allowed (evaluation), else excluded (training)."""
    allow = None if held else (lambda c, s: not held_out(c, s))
    images, captions = [], []
    for i in range(n):
        rng = random.Random(f"clip:{seed}:{i}")
        scene = random_scene(rng, KINDS, allow)
        captions.append(caption(scene, rng))
        images.append(np.asarray(render(scene, IMAGE.image_size), dtype=np.float32) / 255)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    mean, std = torch.tensor(IMAGE.image_mean)[:, None, None], torch.tensor(IMAGE.image_std)[:, None, None]
    return (x - mean) / std, captions


class ShapeCLIP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image = ImageEncoder(IMAGE)
        self.text = CLIPTextModelWithProjection(text.hf_config_of(TEXT))
        self.tokenizer = text.Tokenizer(TEXT.max_length, TEXT.pad_with)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_text(self, captions: list[str]) -> torch.Tensor:
        return self.text(self.tokenizer(captions)).text_embeds

    # open_clip's interface, so ldm.metrics.clip_score and ldm.semantic_guidance take it as any CLIP
    visual = property(lambda self: self.image.config)          # .image_size

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image(pixels)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text(ids).text_embeds

    def preprocess(self, image) -> torch.Tensor:
        """PIL image -> (3, S, S): CLIP's resize, centre crop and normalisation."""
        return clip_preprocess([image], self.image.config)[0]

    def loss(self, pixels: torch.Tensor, captions: list[str]) -> torch.Tensor:
        """Symmetric InfoNCE over the batch (CLIP's eq. in its Figure 3)."""
        i = F.normalize(self.image(pixels), dim=-1)
        t = F.normalize(self.embed_text(captions), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * i @ t.T      # (B, B)
        labels = torch.arange(len(i))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def load(path) -> ShapeCLIP:
    """A CLIP written by main() (OUT/clip.safetensors), in eval mode, no gradients."""
    from safetensors.torch import load_file
    sd = load_file(str(path))
    model = ShapeCLIP()
    model.image.load_state_dict({k.removeprefix("image."): v for k, v in sd.items() if k.startswith("image.")})
    model.text.load_state_dict({k.removeprefix("text."): v for k, v in sd.items() if k.startswith("text.")})
    model.logit_scale.data.copy_(sd["logit_scale"])
    return model.eval().requires_grad_(False)


@torch.no_grad()
def retrieval(model: ShapeCLIP, pixels: torch.Tensor, captions: list[str]) -> dict:
    """Top-1 accuracy of image -> caption and caption -> image among the batch (chance 1/B)."""
    model.eval()
    i = F.normalize(model.image(pixels), dim=-1)
    t = F.normalize(model.embed_text(captions), dim=-1)
    sim = i @ t.T
    labels = torch.arange(len(i))
    model.train()
    same = [_content(captions[j]) == _content(captions[k]) for k, j in enumerate(sim.argmax(1).tolist())]
    return {"image_to_text": (sim.argmax(1) == labels).float().mean().item(),
            "text_to_image": (sim.argmax(0) == labels).float().mean().item(), "chance": 1 / len(i),
            "same_content": sum(same) / len(same)}   # the caption found says what the image's own says


def _content(caption_text: str):
    """What a caption states (objects, counts, colours, relation, background), phrasing aside."""
    try:
        return repr(parse(caption_text))
    except ValueError:
        return caption_text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm.shapes.clip", description=__doc__)
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--init", help="continue from this CLIP (OUT/clip.safetensors of an earlier run) on new scenes")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = (load(args.init).requires_grad_(True) if args.init else ShapeCLIP()).train()
    first = 0 if not args.init else 1_000_000          # a continued run draws other scenes than the first run
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    warmup = min(100, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    held = batch(args.eval_batch, seed=-1, held=True)                   # fresh scenes, held-out pairs allowed
    start = time.time()
    with open(out / "log.jsonl", "w") as log:
        for step in range(1, args.steps + 1):
            loss = model.loss(*batch(args.batch, seed=first + step))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % args.eval_every == 0 or step == args.steps:
                row = {"step": step, "loss": loss.item(), "minutes": (time.time() - start) / 60,
                       **retrieval(model, *held)}
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(json.dumps(row), flush=True)
    save(model, out / "clip.safetensors")
    return 0


def save(model: ShapeCLIP, path) -> None:
    sd = {**{"image." + k: v for k, v in model.image.state_dict().items()},
          **{"text." + k: v for k, v in model.text.state_dict().items()}, "logit_scale": model.logit_scale.data}
    write_safetensors(sd, path, {"image_config": json.dumps(asdict(IMAGE)), "text_config": json.dumps(asdict(TEXT))})


if __name__ == "__main__":
    raise SystemExit(main())
