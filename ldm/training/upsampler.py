"""Train the autoencoder's learned ×pixel_scale upsampler (autoencoder.Upsampler) into a model.

    python -m ldm.training.upsampler --config configs/train_upsampler_default.yaml [--resume]
    (overrides: --set max_steps=300 or --lr=1e-3; fields: UpsamplerTrainConfig below)

The model (`init`, e.g. weights/ldm-default.safetensors, pixel_scale 8) stays frozen; only the new
upsampler trains. Data: scenes of ldm/shapes rendered at the model's size (512 px) as ground truth,
paired with what the upsampler sees at inference: the learned decoder's output (64 px) for the
encoded ground truth (posterior mean). Loss: L1 + grad_weight · L1 of the finite differences, on
the 512-px output. The pool of pairs is built from the seed (no files); each step's batch is drawn
from (seed, step), so a resumed run trains exactly what an uninterrupted one would.

out_dir holds log.jsonl (loss; held-out PSNR and border sharpness every eval_every steps),
checkpoint.pt (upsampler, optimizer, step; written atomically every checkpoint_every steps) and the
export: the whole model with the upsampler added (config: upsampler_channels/blocks), written
atomically, in the init file's dtype. The edge-sharpness measure (`sharpness`) is shared with
bench/upsampler_sharpness.py and tests/test_upsampler.py."""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .. import checkpoint
from ..autoencoder import AutoencoderKL, Upsampler
from ..config import apply_overrides, from_dict, read_yaml, require
from ..formats.files import atomic_write
from ..formats.keys import VAE
from ..shapes.scenes import draw_object, random_scene, render
from .state import append_jsonl, trim_jsonl


@dataclass(frozen=True)
class UpsamplerTrainConfig:
    init: str = "weights/ldm-default.safetensors"  # the model (ours, pixel_scale > 1) that gets the upsampler
    out_dir: str = "out/upsampler"
    export: str = ""                 # the model with its upsampler; "": out_dir/model.safetensors
    seed: int = 0
    channels: int = 64               # -> autoencoder.upsampler_channels
    blocks: int = 3                  # -> autoencoder.upsampler_blocks
    scenes: int = 600                # training pool: scenes rendered at the model's sample_size
    val_scenes: int = 32             # held-out scenes (another seed namespace) for PSNR and sharpness
    thin_share: float = 0.0          # share of the training scenes drawn with stars and crosses only (the thin
                                     # points a sharp ×8 rounds off first; the evaluator then reads circles)
    keep_upsampler: bool = False     # init has an upsampler: train it on (a fine-tune) instead of a fresh one
    max_steps: int = 300
    batch_size: int = 16
    crop: int = 24                   # each sample: a random crop of this many decoder pixels (the loss's), with
                                     # the upsampler's reach around it as context; 0: whole images
    crop_tries: int = 4              # each crop: the one of this many random positions with the most edge in
                                     # the decoder's output (a crop of empty background teaches little)
    lr: float = 3e-3                 # Adam; linear warm-up, then cosine to 0 at max_steps
    warmup_steps: int = 20
    grad_weight: float = 1.0         # weight of the L1 on horizontal/vertical differences (the edges)
    log_every: int = 20
    eval_every: int = 100            # held-out PSNR and sharpness (also at the start and the end)
    checkpoint_every: int = 50       # 0: none

    def __post_init__(self):
        for name, low in (("channels", 1), ("blocks", 0), ("crop", 0), ("crop_tries", 1), ("scenes", 1), ("val_scenes", 1), ("max_steps", 1),
                          ("batch_size", 1), ("warmup_steps", 0), ("log_every", 1), ("eval_every", 1),
                          ("checkpoint_every", 0), ("seed", 0)):
            require(self, name, lambda v, low=low: v >= low, f">= {low}", "")
        require(self, "lr", lambda v: 0 < v < float("inf"), "a finite number > 0", "")
        require(self, "grad_weight", lambda v: 0 <= v < float("inf"), "a finite number >= 0", "")
        require(self, "thin_share", lambda v: 0 <= v <= 1, "a share in [0, 1]", "")


# ---------------------------------------------------------------------------------------------
# Scenes, pairs and the edge-sharpness measure


THIN = ("star", "cross")


def scene(namespace: str, i: int, thin: bool = False):
    """Scene i of a seed namespace (every kind, every colour and shape: the autoencoder is not
    text-conditioned); thin: its objects all stars or crosses."""
    return random_scene(random.Random(f"{namespace}:{i}"), allow=(lambda c, s: s in THIN) if thin else None)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1


def object_mask(sc, size: int) -> torch.Tensor:
    """(size, size) bool: the scene's object pixels (a ring's hole excluded), drawn at 4× as render does."""
    big = 4 * size
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    for obj in sc.objects:
        draw_object(draw, obj, big, 255, 0)
    return torch.from_numpy(np.array(img.resize((size, size), Image.LANCZOS)) >= 128)


def border_band(mask: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Pixels within `radius` of an object border: dilated mask minus eroded mask."""
    m = mask.float()[None, None]
    k = 2 * radius + 1
    dilated = F.max_pool2d(m, k, 1, radius)
    eroded = -F.max_pool2d(-m, k, 1, radius)
    return (dilated > eroded)[0, 0]


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W): the Sobel gradient magnitude, averaged over channels."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype)
    w = torch.stack([kx, kx.t()])[:, None]                                        # (2, 1, 3, 3)
    b, c, h, wd = x.shape
    g = F.conv2d(F.pad(x.reshape(b * c, 1, h, wd), (1, 1, 1, 1), mode="replicate"), w)
    return g.pow(2).sum(1).sqrt().reshape(b, c, h, wd).mean(1)


@torch.no_grad()
def sharpness(images: torch.Tensor, truth: torch.Tensor, bands: torch.Tensor) -> dict:
    """Edge sharpness and fidelity of `images` against the ground-truth renders `truth` (both
    (N, 3, H, W) in [-1, 1]) on object-border `bands` (N, H, W): `edge_ratio`, the mean Sobel
    magnitude on the borders relative to the truth's (1 = as sharp; all images pooled); `psnr` (dB,
    peak-to-peak 2) over whole images and `border_psnr` on the borders only."""
    images = images.float().clamp(-1, 1)
    g_img, g_true = sobel_magnitude(images), sobel_magnitude(truth)
    err = (images - truth).pow(2)
    mse = err.mean(dim=(1, 2, 3))
    border = err.mean(1)[bands].mean()
    return {"edge_ratio": float(g_img[bands].sum() / g_true[bands].sum()),
            "psnr": float((10 * torch.log10(4 / mse.clamp_min(1e-12))).mean()),
            "border_psnr": float(10 * torch.log10(4 / border.clamp_min(1e-12)))}


@torch.no_grad()
def decoder_input(ae: AutoencoderKL, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """What the upsampler sees for images x (N, 3, H, W; uint8, or float in [-1, 1]): the learned
    decoder's output (N, 3, H/k, W/k) for the posterior mean of their encoding (the image resampled
    ×1/k as encode does)."""
    def f(u):
        return as_float(u) if u.dtype == torch.uint8 else u
    return torch.cat([ae.decode(ae.encode(f(x[i:i + batch])).mean, resample=False) for i in range(0, len(x), batch)])


def render_set(namespace: str, n: int, size: int, masks: bool = False, thin: int = 0):
    """(truth (n, 3, size, size) uint8, bands (n, size, size) bool or None) of scenes 0..n-1 of a
    namespace, the first `thin` of them with stars and crosses only."""
    truth = torch.empty(n, 3, size, size, dtype=torch.uint8)
    bands = torch.empty(n, size, size, dtype=torch.bool) if masks else None
    for i in range(n):
        sc = scene(namespace, i, thin=i < thin)
        truth[i] = torch.from_numpy(np.array(render(sc, size))).permute(2, 0, 1)
        if masks:
            bands[i] = border_band(object_mask(sc, size))
    return truth, bands


def edge_integral(x: torch.Tensor) -> torch.Tensor:
    """(N, H+1, W+1) summed-area table of the images' edge strength (|horizontal| + |vertical| difference,
    all channels): the edge inside rows y0:y1, columns x0:x1 is S[y1,x1] - S[y0,x1] - S[y1,x0] + S[y0,x0]."""
    e = F.pad(x.diff(dim=3).abs(), (0, 1)).sum(1) + F.pad(x.diff(dim=2).abs(), (0, 0, 0, 1)).sum(1)
    return F.pad(e.double().cumsum(1).cumsum(2), (1, 0, 1, 0))


def as_float(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# Training


def loss_fn(out: torch.Tensor, target: torch.Tensor, grad_weight: float) -> torch.Tensor:
    loss = (out - target).abs().mean()
    if grad_weight:
        for dim in (2, 3):
            loss = loss + grad_weight * (out.diff(dim=dim) - target.diff(dim=dim)).abs().mean()
    return loss


def lr_at(cfg: UpsamplerTrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def load_config(argv=None) -> tuple[argparse.Namespace, UpsamplerTrainConfig]:
    p = argparse.ArgumentParser(prog="python -m ldm.training.upsampler", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="training YAML, e.g. configs/train_upsampler_default.yaml")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint.pt")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args, rest = p.parse_known_args(argv)
    for item in rest:
        if not (item.startswith("--") and "=" in item):
            p.error(f"unrecognised argument {item!r}: overrides look like --lr=1e-3")
        args.overrides.append(item[2:])
    raw = {}
    if args.config:
        if not Path(args.config).is_file():
            raise FileNotFoundError(f"no training config at {args.config}")
        raw = read_yaml(args.config)
    try:
        cfg = apply_overrides(from_dict(UpsamplerTrainConfig, raw), args.overrides)
    except TypeError as e:
        raise ValueError(str(e)) from None
    return args, cfg


def evaluate(up: Upsampler, val: dict) -> dict:
    up.eval()
    with torch.no_grad():
        out = torch.cat([up(val["low"][i:i + 8]) for i in range(0, len(val["low"]), 8)])
    up.train()
    return sharpness(out, as_float(val["truth"]), val["bands"])


def main(argv=None) -> None:
    args, cfg = load_config(argv)
    if cfg.batch_size > cfg.scenes:
        raise ValueError(f"batch_size must be <= scenes ({cfg.scenes}), got {cfg.batch_size}")
    out_dir, t_start = Path(cfg.out_dir), time.perf_counter()
    export = Path(cfg.export or out_dir / "model.safetensors")
    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "log.jsonl"
    if ckpt_path.is_file() and not args.resume:
        raise ValueError(f"{ckpt_path} is an earlier run's checkpoint: pass --resume to continue it, or choose "
                         f"another out_dir")
    model_cfg, sd = checkpoint.load(cfg.init)
    ae_cfg = model_cfg.autoencoder
    if ae_cfg.pixel_scale == 1:
        raise ValueError(f"{cfg.init}: autoencoder.pixel_scale is 1, there is no ×pixel_scale to learn")
    keep = {}
    if ae_cfg.upsampler_channels:  # (the shipped default model) a fresh one is trained in its place, or it goes on
        if cfg.keep_upsampler and (ae_cfg.upsampler_channels, ae_cfg.upsampler_blocks) != (cfg.channels, cfg.blocks):
            raise ValueError(f"keep_upsampler: {cfg.init}'s upsampler has {ae_cfg.upsampler_channels} channels and "
                             f"{ae_cfg.upsampler_blocks} blocks; set channels and blocks to those")
        print(f"{cfg.init} has an upsampler already: " + ("training it on" if cfg.keep_upsampler else
                                                           "training a new one in its place"), file=sys.stderr)
        keep = {k[len(VAE):]: v.float() for k, v in sd.items() if k.startswith(VAE + "upsampler.")}
        sd = {k: v for k, v in sd.items() if not k.startswith(VAE + "upsampler.")}
    elif cfg.keep_upsampler:
        raise ValueError(f"keep_upsampler: {cfg.init} has no upsampler to train on")
    new_ae_cfg = replace(ae_cfg, upsampler_channels=cfg.channels, upsampler_blocks=cfg.blocks)
    dtype = next(v.dtype for k, v in sd.items() if k.startswith(VAE))
    torch.manual_seed(cfg.seed)
    ae = AutoencoderKL(new_ae_cfg)
    frozen = {k[len(VAE):]: v.float() for k, v in sd.items() if k.startswith(VAE)}
    fresh = {"upsampler." + k: v for k, v in ae.upsampler.state_dict().items()}
    ae.load_state_dict({**frozen, **fresh, **(keep if cfg.keep_upsampler else {})})
    ae.requires_grad_(False).eval()
    up = ae.upsampler.requires_grad_(True).train()
    opt = torch.optim.Adam(up.parameters(), lr=cfg.lr)
    step = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=True)
        if state["config"] != asdict(cfg):
            raise ValueError(f"{ckpt_path} was written by a run with another config; resume with the same one")
        up.load_state_dict(state["upsampler"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        trim_jsonl(log_path, step)
        print(f"resumed at step {step}", file=sys.stderr)
    elif log_path.exists():
        log_path.unlink()

    # -- data: pairs (decoder output, ground truth), built from the seed ----------------------------
    size = model_cfg.sample_size
    if cfg.crop and cfg.crop + 2 * (cfg.blocks + 3) > size // ae_cfg.pixel_scale:
        raise ValueError(f"crop {cfg.crop} plus the upsampler's reach ({cfg.blocks + 3}) on each side exceeds the "
                         f"decoder's {size // ae_cfg.pixel_scale} pixels: lower crop (0: whole images)")
    t0 = time.perf_counter()
    truth, _ = render_set(f"upsampler-train:{cfg.seed}", cfg.scenes, size, thin=round(cfg.thin_share * cfg.scenes))
    low = decoder_input(ae, truth)
    val_truth, val_bands = render_set(f"upsampler-val:{cfg.seed}", cfg.val_scenes, size, masks=True)
    val = {"truth": val_truth, "bands": val_bands, "low": decoder_input(ae, val_truth)}
    print(f"{cfg.scenes} training and {cfg.val_scenes} held-out scenes at {size} px in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if step == 0:
        with torch.no_grad():
            bicubic = F.interpolate(val["low"], scale_factor=ae_cfg.pixel_scale, mode="bicubic", align_corners=False)
        append_jsonl(log_path, {"step": 0, "bicubic": sharpness(bicubic, as_float(val_truth), val_bands),
                                "val": evaluate(up, val)})

    def save_checkpoint():
        state = {"upsampler": up.state_dict(), "optimizer": opt.state_dict(), "step": step, "config": asdict(cfg)}
        atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))

    edge_sum = edge_integral(low)
    clock, losses = time.perf_counter(), []
    while step < cfg.max_steps:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randperm(cfg.scenes, generator=g)[:cfg.batch_size]
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        inputs, targets, m = low[idx], truth[idx], 0
        if cfg.crop:
            m, k = cfg.blocks + 3, ae_cfg.pixel_scale      # the upsampler's reach: convolutions, then 5×5 neighbours
            side = cfg.crop + 2 * m
            ys, xs = torch.randint(0, low.shape[-1] - side + 1, (2, cfg.batch_size, cfg.crop_tries), generator=g)
            y0, x0, y1, x1 = ys + m, xs + m, ys + m + cfg.crop, xs + m + cfg.crop   # the loss's window
            rows = idx[:, None].expand_as(ys)
            score = edge_sum[rows, y1, x1] - edge_sum[rows, y0, x1] - edge_sum[rows, y1, x0] + edge_sum[rows, y0, x0]
            best = score.argmax(1, keepdim=True)
            ys, xs = ys.gather(1, best)[:, 0].tolist(), xs.gather(1, best)[:, 0].tolist()
            inputs = torch.stack([inputs[b, :, y:y + side, x:x + side] for b, (y, x) in enumerate(zip(ys, xs))])
            targets = torch.stack([targets[b, :, (y + m) * k:(y + m + cfg.crop) * k, (x + m) * k:(x + m + cfg.crop) * k]
                                   for b, (y, x) in enumerate(zip(ys, xs))])
        out = up(inputs)
        if m:
            out = out[:, :, m * k:-m * k, m * k:-m * k]
        loss = loss_fn(out, as_float(targets), cfg.grad_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            now = time.perf_counter()
            record = {"step": step, "loss": sum(losses) / len(losses), "lr": lr_at(cfg, step - 1),
                      "s_per_step": (now - clock) / len(losses)}
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                record["val"] = evaluate(up, val)
            append_jsonl(log_path, record)
            print(record, file=sys.stderr)
            clock, losses = time.perf_counter(), []
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.max_steps):
            save_checkpoint()

    # -- export: the whole model, the upsampler added, in the init file's dtype ----------------------
    sd.update({VAE + "upsampler." + k: v.detach().to(dtype) for k, v in up.state_dict().items()})
    new_cfg = replace(model_cfg, autoencoder=new_ae_cfg)
    checkpoint.save(sd, new_cfg, export)  # atomic (formats.files.write_safetensors)
    append_jsonl(log_path, {"step": step, "exported": str(export),
                            "params": sum(p.numel() for p in up.parameters()),
                            "wall_s": time.perf_counter() - t_start})
    print(f"exported {export}", file=sys.stderr)


if __name__ == "__main__":
    from .run import run_cli
    run_cli(lambda: main())
