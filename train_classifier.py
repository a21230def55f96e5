"""Train a noise-aware classifier p_φ(grid | z_t, t) (ldm/shapes/noisy_classifier.py) on the latents of a
model's autoencoder, for classifier guidance (`pipe(prompt, classifier_scale=s)`).

    python train_classifier.py                                   # the default model, shape scenes
    python train_classifier.py --set max_steps=4000 --set n_scenes=20000 --resume
    (fields: ClassifierTrainConfig below; --set key=value or --key=value)

Data: `n_scenes` shape-world scenes (ldm/shapes/scenes.py) rendered at the autoencoder network's
size, encoded once to posterior moments (cached in out_dir), labelled per grid cell. Each step
draws a posterior sample, a timestep t ~ U{0, T−1} and noise, and trains on q(z_t | z_0) — the same
noising the sampler undoes. Accelerate and the crash-safe checkpoints of ldm/training/run.py, as
train_ldm.py; the export is one .safetensors with the classifier's config in its metadata."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldm.shapes import noisy_classifier as nc
from ldm.config import apply_overrides, from_dict, read_yaml, require
from ldm.schedule import alphas_cumprod, q_sample
from ldm.training.config import RunConfig, parse_cli
from ldm.training.optim import adamw, lr_schedule
from ldm.training.run import run_cli, start

KINDS = ("single", "colour", "position", "counting", "counting", "two_objects", "two_objects", "two_objects")


@dataclass(frozen=True)
class ClassifierTrainConfig(RunConfig):
    model: str = ""                   # the diffusion model whose latents (autoencoder, schedule): "" = default
    out_dir: str = "out/classifier"
    n_scenes: int = 20000
    scene_seed: int = 11              # another draw than the diffusion model's training scenes
    kinds: tuple[str, ...] = KINDS    # scene kinds drawn (repeats weight them)
    max_steps: int = 3000
    batch_size: int = 128
    log_every: int = 50
    checkpoint_every: int = 500
    classifier: nc.ClassifierConfig = field(default_factory=nc.ClassifierConfig)

    def __post_init__(self):
        super().__post_init__()
        require(self, "n_scenes", lambda v: v >= 1, ">= 1", "")


def scene_moments(pipe, n: int, seed: int, kinds, config: nc.ClassifierConfig, batch: int = 64):
    """(moments (N, 2C, h, w) float32, labels (N, 2, G, G)) of n scenes rendered at the autoencoder
    network's size (the posterior's mean and log-variance; a sample is drawn per step)."""
    from ldm.shapes.scenes import random_scene, render
    from tqdm import tqdm
    rng, size = random.Random(seed), pipe.config.latent_size * pipe.config.autoencoder.downsample_factor \
        // pipe.config.autoencoder.pixel_scale
    moments, labels = [], []
    vae = pipe.model.first_stage_model
    for start_ in tqdm(range(0, n, batch), desc="encoding scenes", unit="batch"):
        scenes = [random_scene(rng, kinds) for _ in range(min(batch, n - start_))]
        x = torch.stack([torch.from_numpy(np.asarray(render(s, size), dtype=np.float32)) for s in scenes])
        x = x.permute(0, 3, 1, 2) / 127.5 - 1                                       # (B, 3, H, W) in [-1, 1]
        with torch.no_grad():
            posterior = vae.encode(x, resample=False)
        moments.append(torch.cat([posterior.mean, posterior.logvar], 1))
        labels.append(torch.stack([nc.scene_labels(s, config) for s in scenes]))
    return torch.cat(moments), torch.cat(labels)


def load_data(cfg: ClassifierTrainConfig, pipe, say):
    path = Path(cfg.out_dir) / f"scenes-{cfg.n_scenes}-{cfg.scene_seed}-{'-'.join(cfg.kinds)}.pt"
    if path.is_file():
        data = torch.load(path, weights_only=True)
        return data["moments"], data["labels"]
    say(f"rendering and encoding {cfg.n_scenes} scenes into {path}")
    moments, labels = scene_moments(pipe, cfg.n_scenes, cfg.scene_seed, cfg.kinds, cfg.classifier)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"moments": moments, "labels": labels}, tmp)
    tmp.replace(path)
    return moments, labels


def collate(rows):
    moments, labels = zip(*rows)
    return {"moments": torch.stack(moments), "labels": torch.stack(labels), "skipped": 0}


def main(argv=None) -> None:
    args, overrides = parse_cli(argv, __doc__)
    cfg = from_dict(ClassifierTrainConfig, read_yaml(args.config) if args.config else {})
    cfg = apply_overrides(cfg, [o.lstrip("-") for o in overrides])
    from ldm.pipeline import Pipeline
    pipe = Pipeline.from_pretrained(cfg.model or None)
    run = start(cfg, "train_classifier", cfg.n_scenes, args.resume, "classifier.safetensors")
    accelerator, device = run.accelerator, run.accelerator.device
    moments, labels = load_data(cfg, pipe, run.say)

    torch.manual_seed(cfg.seed)
    classifier = nc.NoisyClassifier(cfg.classifier).to(device).train()
    run.say(f"training {sum(p.numel() for p in classifier.parameters()) / 1e6:.2f}M parameters on "
            f"{len(labels)} scenes, latents {tuple(moments.shape[1:])}")
    optimizer = adamw(classifier.parameters(), cfg.optim)
    scheduler = lr_schedule(optimizer, cfg.optim, cfg.max_steps)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(moments, labels), batch_size=cfg.batch_size,
                                         shuffle=True, drop_last=True, collate_fn=collate)
    classifier, optimizer, loader = accelerator.prepare(classifier, optimizer, loader)
    run.resume(args.resume, scheduler, model=classifier)
    ac = alphas_cumprod(pipe.config.schedule).to(device)
    scale, channels = pipe.config.autoencoder.scale_factor, moments.shape[1] // 2
    data = run.start_loop(loader)
    while run.step < cfg.max_steps:
        batch = next(data)
        mean, logvar = batch["moments"].split(channels, dim=1)
        z0 = (mean + (0.5 * logvar).exp() * torch.randn_like(mean)) * scale              # (B, C, h, w)
        t = torch.randint(0, len(ac), (len(z0),), device=device)
        z_t = q_sample(z0, t, torch.randn_like(z0), ac)
        with accelerator.autocast():
            value, stats = nc.loss(classifier, z_t, t, batch["labels"])
        run.train_step(value, classifier, optimizer, scheduler, **stats)
    sd = run.final_weights(classifier, model=accelerator.unwrap_model(classifier))
    if run.main_process:
        nc.save(accelerator.unwrap_model(classifier), run.export, sd)
        run.exported()


if __name__ == "__main__":
    run_cli(main)
