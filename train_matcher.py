"""Train the noised image–text matcher (`ldm/matcher.py`) of a latent diffusion model on captioned
scenes (`python -m ldm.data.scenes` imagefolders) and write the model with the matcher attached.

    python train_matcher.py --model weights/ldm-default.safetensors --data data/scenes64b data/scenes64d \
        --out-dir out/matcher --steps 6000 --scale 20
    -> out/matcher/model.safetensors: the model (unchanged) + its matcher, guiding at --scale by default

The model's autoencoder, text tokens and noise schedule are the matcher's inputs; nothing of the model
is trained. Each step draws latents at random t, with per latent its caption (or a fresh one of its
scene), hard negatives (`ldm.data.matching`) and another scene's caption, and trains match /
no-match (BCE) plus the auxiliary cell labels. A crash loses at most --save-every steps: rerun with
--resume.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ldm import checkpoint
from ldm import train_state as ts
from ldm.config import MatcherConfig
from ldm.data.grounding import scenes_by_path
from ldm.data.images import build_latent_cache, scan_folder
from ldm.data.matching import CELL_CLASSES, cell_labels, negative_captions, scene_from_dict
from ldm.data.scenes import caption
from ldm.diffusion import LatentDiffusion
from ldm.pipeline import Pipeline
from ldm.schedule import alphas_cumprod, q_sample


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the latent diffusion model (.safetensors) to guide")
    p.add_argument("--data", nargs="+", required=True, help="scene imagefolders (metadata.jsonl with scenes)")
    p.add_argument("--out-dir", required=True, help="checkpoints, latent cache and model.safetensors")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=64, help="latents per step, each with 1 + --negatives captions")
    p.add_argument("--negatives", type=int, default=3, help="per latent: n-1 hard negatives and one other caption")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--pairing-share", type=float, default=0.8,
                   help="chance that a two-object scene's hard negative exchanges colours, shapes or the relation")
    p.add_argument("--two-object-share", type=float, default=0.7,
                   help="share of each batch drawn from two-object scenes (where binding can be wrong)")
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the cell-label loss")
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--guide-from-t", type=int, default=500, help="matcher guidance at t ≥ this")
    p.add_argument("--scale", type=float, default=0.0, help="the written model's default_matcher_scale")
    p.add_argument("--holdout", type=int, default=512, help="scenes kept out for the validation line")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from out-dir/state.pt")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "negatives", "save_every", "text_layers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    for name in ("pairing_share", "two_object_share"):
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.negatives < 2:
        raise ValueError("--negatives must be ≥ 2: at least one hard negative and one other caption")
    return args


def load_scenes(folders: list[str], load_res: int):
    """(items, scenes) of every image in `folders` that has a scene record; an error if none has."""
    items, scenes = [], []
    for folder in folders:
        by_path = scenes_by_path(folder)
        for item in scan_folder(folder, load_res).items:
            if (scene := by_path.get(item.path.resolve())) is None:
                raise ValueError(f"{item.path} has no scene record: the matcher's negatives are edits of "
                                 f"scenes, so train it on `python -m ldm.data.scenes` imagefolders")
            items.append(item)
            scenes.append(scene_from_dict(scene))
    return items, scenes


class Batches:
    """Captions and targets for a list of scene indices: per latent [positive, hard negatives..., other]."""

    def __init__(self, texts, scenes, negatives: int, tokenize, pairing_share: float):
        self.texts, self.scenes, self.k, self.tokenize = texts, scenes, negatives, tokenize
        self.pairing_share = pairing_share

    def captions(self, idx: list[int], pool: list[int], rng: random.Random) -> torch.Tensor:
        out = []
        for i in idx:
            positive = self.texts[i] if rng.random() < 0.5 else caption(self.scenes[i], rng)
            other = rng.choice(pool)
            while other == i:
                other = rng.choice(pool)
            out += [positive, *negative_captions(self.scenes[i], self.k - 1, rng, self.pairing_share), self.texts[other]]
        return self.tokenize(out)                                                  # (B·(k+1), L)


def step_loss(model, aux, z, t, tokens, labels, null, ac, k: int, generator=None):
    """(match BCE, cell-label CE, logits (B, k+1)) for clean latents z (B, C, h, w) noised to t;
    ac: the model's ᾱ (alphas_cumprod)."""
    matcher = model.matcher
    x = q_sample(z, t, torch.randn(z.shape, generator=generator).to(z), ac)
    with torch.no_grad():                                                        # the UNet stays frozen
        features = matcher.unet_features(model.unet, x, t, null)
    image = matcher.image_features(features)                                     # (B, P, W)
    text, pad = matcher.text_features(tokens)
    logits = matcher.score(image.repeat_interleave(k + 1, 0), text, pad).view(-1, k + 1)
    target = torch.zeros_like(logits)
    target[:, 0] = 1
    weight = torch.full_like(logits, 0.5 / k)
    weight[:, 0] = 0.5                                   # positives and negatives weigh the same
    match = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / len(z)
    cells = aux(image)                                                           # (B, P, Cc + Cs)
    colour, shape = cells.split(CELL_CLASSES, -1)
    cell = F.cross_entropy(colour.flatten(0, 1), labels[:, 0].flatten()) + \
        F.cross_entropy(shape.flatten(0, 1), labels[:, 1].flatten())
    return match, cell, logits


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out_dir)
    base_cfg, sd = checkpoint.load(args.model)
    dtype = next(v.dtype for k, v in sd.items() if k.startswith(checkpoint.UNET))  # written back as read
    cfg = replace(base_cfg, matcher=MatcherConfig(args.text_layers, guide_from_t=args.guide_from_t),
                  default_matcher_scale=args.scale)
    model = LatentDiffusion(cfg)                       # the same model with a fresh matcher attached
    model.load_state_dict({**sd, **{f"matcher.{k}": v for k, v in model.matcher.state_dict().items()}},
                          strict=True)
    model.requires_grad_(False).eval()
    matcher = model.matcher.requires_grad_(True).train()
    grid = cfg.latent_size // 2
    aux = nn.Linear(cfg.text_encoder.hidden_size, sum(CELL_CLASSES))  # training only: not in the model file

    # -- data: latents (cached), captions, scenes ---------------------------------------------------
    load_res = cfg.sample_size // cfg.autoencoder.pixel_scale
    items, scenes = load_scenes(args.data, load_res)
    cache = ts.latent_cache_path(out, items, load_res, False, model.first_stage_model)
    if not cache.is_file():
        print(f"encoding {len(items)} images to {cache}")
        build_latent_cache(items, lambda x: model.encode_first_stage(x, sample=False, resample=False),
                           cache, load_res, random_flip=False, batch_size=256)
    latents = torch.from_numpy(np.load(cache))[:, 0].float()     # (N, C, h, w)
    if latents.isnan().any():
        raise ValueError(f"some images could not be decoded while caching ({cache}); remove them")
    labels = torch.stack([cell_labels(s, grid) for s in scenes])                  # (N, 2, grid, grid)
    rng = random.Random(args.seed)
    order = list(range(len(items)))
    random.Random(args.seed).shuffle(order)
    held, train = order[:args.holdout], order[args.holdout:]
    if len(train) < args.batch_size:
        raise ValueError(f"{len(train)} training scenes after --holdout {args.holdout}: fewer than "
                         f"--batch-size {args.batch_size}")
    batches = Batches([i.caption for i in items], scenes, args.negatives, model.cond_stage_model.tokenize,
                      args.pairing_share)
    two = [i for i in train if len(scenes[i].objects) == 2]
    n_two = min(round(args.batch_size * args.two_object_share), len(two))
    with torch.no_grad():
        null = model.cond_stage_model.encode([""])                               # (1, L, D)
    ac = alphas_cumprod(cfg.schedule)

    # -- optimiser, resume --------------------------------------------------------------------------
    params = list(matcher.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    state_path, start = out / "state.pt", 0
    if args.resume:
        if not state_path.is_file():
            raise ValueError(f"--resume: no {state_path}; start without --resume")
        state = torch.load(state_path, weights_only=False)
        matcher.load_state_dict(state["matcher"])
        aux.load_state_dict(state["aux"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]

    def save(step: int) -> None:
        state = dict(matcher=matcher.state_dict(), aux=aux.state_dict(), opt=opt.state_dict(),
                     sched=sched.state_dict(), rng=rng.getstate(), torch_rng=torch.get_rng_state(), step=step)
        checkpoint.atomic_write(state_path, lambda tmp: torch.save(state, tmp))

    val_tokens = batches.captions(held, train, random.Random(1))

    @torch.no_grad()
    def validate() -> str:
        matcher.eval()
        line = []
        for t in (900, 700, 400):
            _, _, lg = step_loss(model, aux, latents[held], torch.full((len(held),), t), val_tokens,
                                 labels[held], null, ac, args.negatives, torch.Generator().manual_seed(t))
            beats = (lg[:, :1] > lg[:, 1:-1]).float().mean().item()
            line.append(f"t={t}: positive > hard negative {beats:.2f}")
        matcher.train()
        return ", ".join(line)

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="matcher")
    t0 = time.time()
    for step in bar:
        idx = rng.sample(two, n_two) + rng.sample(train, args.batch_size - n_two)
        t = torch.randint(0, cfg.schedule.num_train_timesteps, (args.batch_size,))
        match, cell, _ = step_loss(model, aux, latents[idx], t, batches.captions(idx, train, rng),
                                   labels[idx], null, ac, args.negatives)
        loss = match + args.aux_weight * cell
        if not torch.isfinite(loss):
            raise ValueError(f"loss is {loss.item()} at step {step + 1}: lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(match=f"{match.item():.3f}", cells=f"{cell.item():.3f}")
        done = step + 1
        if done % args.save_every == 0 or done == args.steps:
            save(done)
            tqdm.write(f"step {done} ({time.time() - t0:.0f} s): {validate()}")
    Pipeline(model).save_pretrained(out / "model.safetensors", dtype=dtype)
    print(f"wrote {out / 'model.safetensors'}")


if __name__ == "__main__":
    ts.run_cli(main)
