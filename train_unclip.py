"""Make the default model a Stable unCLIP model (DALL·E 2's decoder and prior) with the shape world's
CLIP (`python -m ldm.shapes.clip`): variations of a picture and text -> prior -> image, offline.

    python train_unclip.py --set part=decoder                     # out/unclip_decoder/decoder.safetensors
    python train_unclip.py --set part=prior --set decoder=out/unclip_decoder/decoder.safetensors
    (fields: UnclipTrainConfig below; --set key=value or --key=value; --resume continues a run)

decoder: the default model's UNet learns to read the CLIP image embedding of the picture it denoises,
noise-augmented to a random level and given as the UNet's class vector (Stable unCLIP's
`class_embed_type: projection`, a new MLP whose last layer starts at zero, so training starts from
the text-to-image model exactly). The caption is dropped to "" half the time (DALL·E 2 §2.1: the
decoder must draw from the embedding alone for variations), the embedding to the null all-zero
vector 10% of the time. The text encoder stays frozen.
prior: Karlo's PriorTransformer learns p(image embedding | caption) by DDPM with "sample"
prediction on the normalised embedding; its text encoder is the default model's own (the hidden
states the decoder reads) with a learned projection; the caption is dropped to "" 10% of the time
(the prior's CFG). The export is the whole unCLIP model (decoder + prior) in one ldm file.
Data: `n_scenes` rendered shape-world scenes, encoded once (latent moments, CLIP image embedding,
caption; cached in out_dir). Accelerate and the crash-safe checkpoints of ldm/training/run.py."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldm import checkpoint
from ldm.config import ScheduleConfig, apply_overrides, from_dict, read_yaml, require
from ldm.diffusion import LatentDiffusion
from ldm.image_config import ImageEncoderConfig, PriorConfig
from ldm.pipeline import default_model_path
from ldm.schedule import alphas_cumprod, diffusion_loss, q_sample
from ldm.training.config import RunConfig, parse_cli
from ldm.training.ema import EMA
from ldm.training.optim import adamw, lr_schedule
from ldm.training.run import run_cli, start

KINDS = ("single", "colour", "position", "counting", "two_objects", "two_objects")
EMBEDDING_NOISE = ScheduleConfig(beta_schedule="squaredcos_cap_v2")            # SD 2.1-unclip's image_noising_scheduler
PRIOR_SCHEDULE = ScheduleConfig(beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=True,
                                clip_sample_range=5.0)                           # Karlo's prior_scheduler


@dataclass(frozen=True)
class UnclipTrainConfig(RunConfig):
    part: str = "decoder"            # "decoder" | "prior"
    model: str = ""                  # decoder: the text-to-image model to extend ("" = the default model)
    clip: str = "out/shape_clip/clip.safetensors"   # decoder: the CLIP whose image tower is the embedder
    decoder: str = ""                # prior: the decoder file the prior is added to
    model_preset: str = ""
    out_dir: str = "out/unclip"
    n_scenes: int = 20000
    scene_seed: int = 21             # another draw than the default model's training scenes
    kinds: tuple[str, ...] = KINDS
    max_steps: int = 2000
    batch_size: int = 32
    log_every: int = 25
    checkpoint_every: int = 250
    text_drop: float = 0.5           # decoder: P(caption -> ""); prior: its CFG drop (set 0.1)
    embedding_drop: float = 0.1      # decoder: P(class vector -> 0), the null of its CFG
    noise_augment: float = 0.5       # decoder: P(the embedding is noised, to a level ~ U{0, T-1})
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    prior: PriorConfig = field(default_factory=lambda: PriorConfig(
        num_attention_heads=4, attention_head_dim=32, num_layers=6, embedding_dim=64, num_embeddings=32))

    def __post_init__(self):
        super().__post_init__()
        require(self, "part", lambda v: v in ("decoder", "prior"), "'decoder' or 'prior'", "")
        require(self, "n_scenes", lambda v: v >= 1, ">= 1", "")
        for name in ("text_drop", "embedding_drop", "noise_augment"):
            require(self, name, lambda v: 0 <= v <= 1, "a probability in [0, 1]", "")


# -- data ------------------------------------------------------------------------------------------

def scene_data(model: LatentDiffusion, n: int, seed: int, kinds, batch: int = 64) -> dict:
    """n scenes rendered at the autoencoder network's size: latent moments (N, 2C, h, w), CLIP image
    embeddings (N, D) from the model's embedder, captions."""
    from tqdm import tqdm
    from PIL import Image
    from ldm.shapes.scenes import caption, random_scene, render
    cfg = model.config
    size = cfg.latent_size * cfg.autoencoder.downsample_factor // cfg.autoencoder.pixel_scale
    rng = random.Random(seed)
    moments, embeds, captions = [], [], []
    for i in tqdm(range(0, n, batch), desc="encoding scenes", unit="batch"):
        scenes = [random_scene(rng, kinds) for _ in range(min(batch, n - i))]
        captions += [caption(s, rng) for s in scenes]
        pixels = [np.asarray(render(s, size), dtype=np.uint8) for s in scenes]
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            posterior = model.first_stage_model.encode(x, resample=False)
            embeds.append(model.embedder.embed([Image.fromarray(p) for p in pixels]))
        moments.append(torch.cat([posterior.mean, posterior.logvar], 1))
    return {"moments": torch.cat(moments), "embeds": torch.cat(embeds).float(), "captions": captions}


def cached_scene_data(cfg: UnclipTrainConfig, model: LatentDiffusion, say) -> dict:
    path = Path(cfg.out_dir) / f"scenes-{cfg.n_scenes}-{cfg.scene_seed}-{'-'.join(cfg.kinds)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    say(f"rendering and encoding {cfg.n_scenes} scenes into {path}")
    data = scene_data(model, cfg.n_scenes, cfg.scene_seed, cfg.kinds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    return data


class Rows(torch.utils.data.Dataset):
    def __init__(self, data: dict):
        self.data = data

    def __len__(self):
        return len(self.data["captions"])

    def __getitem__(self, i):
        return self.data["moments"][i], self.data["embeds"][i], self.data["captions"][i]


def collate(rows):
    moments, embeds, captions = zip(*rows)
    return {"moments": torch.stack(moments), "embeds": torch.stack(embeds), "captions": list(captions), "skipped": 0}


def dropped(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


# -- the decoder -----------------------------------------------------------------------------------

def unclip_decoder(base_path: str, clip_path: str) -> LatentDiffusion:
    """The text-to-image model at `base_path` with an image embedder (the CLIP's image tower), a noise
    augmentor and a zero-output class-vector MLP: at start it draws exactly as the base model."""
    from ldm.shapes.clip import IMAGE, load as load_clip
    base_cfg, sd = checkpoint.load(base_path or default_model_path())
    cfg = replace(base_cfg, image_embedding="unclip", image_encoder=IMAGE, embedding_noise_schedule=EMBEDDING_NOISE,
                  unet=replace(base_cfg.unet, adm_in_channels=2 * IMAGE.projection_dim), layout_planner=None)
    model = LatentDiffusion(cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    new = [k for k in missing if not k.startswith(("model.diffusion_model.label_emb.", "embedder.", "noise_augmentor."))]
    if new or unexpected:
        raise ValueError(f"{base_path}: not the text-to-image model expected (missing {new[:3]}, unexpected {unexpected[:3]})")
    model.embedder.load_state_dict(load_clip(clip_path).image.state_dict())
    nn.init.zeros_(model.unet.label_emb[0][2].weight)
    nn.init.zeros_(model.unet.label_emb[0][2].bias)
    return model


def class_vectors(model: LatentDiffusion, embeds: torch.Tensor, cfg: UnclipTrainConfig, ac: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """(B, 2D): each embedding noised to a random level (or none), with its level's embedding; some
    rows the null all-zero vector."""
    B = len(embeds)
    levels = torch.randint(0, len(ac), (B,), generator=generator)
    levels = torch.where(torch.rand(B, generator=generator) < cfg.noise_augment, levels, 0)
    vectors = model.noise_augmentor(embeds, levels, torch.randn(embeds.shape, generator=generator), ac)
    return vectors * (torch.rand(B, 1, generator=generator) >= cfg.embedding_drop)


# -- the prior -------------------------------------------------------------------------------------

def with_prior(model: LatentDiffusion, prior_cfg: PriorConfig) -> LatentDiffusion:
    """The unCLIP decoder plus a prior whose text encoder is the decoder's own (projection identity)."""
    from ldm.prior import DiffusionPrior
    cfg = replace(model.config, prior=prior_cfg, prior_text_encoder=model.config.text_encoder,
                  prior_schedule=PRIOR_SCHEDULE)
    model.config = cfg
    model.prior = DiffusionPrior(cfg)
    tower = {k.replace("transformer.", "text_model.", 1): v for k, v in model.cond_stage_model.state_dict().items()}
    tower["text_projection.weight"] = torch.eye(prior_cfg.embedding_dim, cfg.text_encoder.hidden_size)
    model.prior.text_encoder.load_state_dict(tower)
    return model


def main(argv=None) -> None:
    args, overrides = parse_cli(argv, __doc__)
    cfg = from_dict(UnclipTrainConfig, read_yaml(args.config) if args.config else {})
    cfg = apply_overrides(cfg, [o.lstrip("-") for o in overrides])
    if cfg.part == "prior" and not cfg.decoder:
        raise ValueError("part=prior adds a prior to a decoder: pass --set decoder=PATH (from part=decoder)")
    if cfg.part == "decoder":
        model = unclip_decoder(cfg.model, cfg.clip)
    else:
        model_cfg, sd = checkpoint.load(cfg.decoder)
        model = LatentDiffusion(model_cfg)
        model.load_state_dict({k: v.float() for k, v in sd.items()})
    model.eval().requires_grad_(False)
    export = "decoder.safetensors" if cfg.part == "decoder" else "unclip.safetensors"
    run = start(cfg, f"train_unclip_{cfg.part}", cfg.n_scenes, args.resume, export)
    accelerator, device = run.accelerator, run.accelerator.device
    data = cached_scene_data(cfg, model, run.say)
    mean, std = data["embeds"].mean(0, keepdim=True), data["embeds"].std(0, keepdim=True)

    if cfg.part == "decoder":
        model.noise_augmentor.data_mean.copy_(mean)
        model.noise_augmentor.data_std.copy_(std)
        trained = model.unet.requires_grad_(True).train()
    else:
        model = with_prior(model, cfg.prior)
        prior = model.prior
        prior.transformer.clip_mean.data.copy_(mean)
        prior.transformer.clip_std.data.copy_(std)
        prior.transformer.clip_mean.requires_grad_(False)
        prior.transformer.clip_std.requires_grad_(False)
        prior.text_encoder.requires_grad_(False)
        prior.text_encoder.text_projection.requires_grad_(True)
        trained = prior.train()
    torch.manual_seed(cfg.seed)
    run.say(f"training the {cfg.part}: {sum(p.numel() for p in trained.parameters() if p.requires_grad) / 1e6:.2f}M "
            f"parameters on {len(data['captions'])} scenes")
    optimizer = adamw([p for p in trained.parameters() if p.requires_grad], cfg.optim)
    scheduler = lr_schedule(optimizer, cfg.optim, cfg.max_steps)
    loader = torch.utils.data.DataLoader(Rows(data), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collate)
    trained, optimizer, loader = accelerator.prepare(trained, optimizer, loader)
    raw = accelerator.unwrap_model(trained)
    ema = EMA(raw, cfg.ema_decay)
    run.resume(args.resume, scheduler, ema, model=raw)
    generator = torch.Generator().manual_seed(cfg.seed + run.step)        # a resumed run draws afresh
    ac = alphas_cumprod(model.config.schedule).float().to(device)
    ac_embed = alphas_cumprod(EMBEDDING_NOISE if cfg.part == "decoder" else PRIOR_SCHEDULE).float()
    scale, channels = model.config.autoencoder.scale_factor, model.config.autoencoder.embed_dim
    batches = run.start_loop(loader)
    while run.step < cfg.max_steps:
        batch = next(batches)
        captions = dropped(batch["captions"], cfg.text_drop, generator)
        if cfg.part == "decoder":
            with torch.no_grad():
                context = model.cond_stage_model(model.cond_stage_model.tokenize(captions).to(device))
                vectors = class_vectors(model, batch["embeds"], cfg, ac_embed, generator)
            m, logvar = batch["moments"].split(channels, dim=1)
            z0 = (m + (0.5 * logvar).exp() * torch.randn(m.shape, generator=generator)) * scale
            noise, t = torch.randn(z0.shape, generator=generator), torch.randint(0, len(ac), (len(z0),), generator=generator)
            pred = trained(q_sample(z0, t, noise, ac), t, context, y=vectors)
            loss = diffusion_loss(pred, z0, noise, t, ac, model.config.schedule.prediction_type, cfg.snr_gamma)
        else:
            embeds, hidden, mask = prior.encode(captions, device)
            x0 = (batch["embeds"] - mean) / std
            t = torch.randint(0, len(ac_embed), (len(x0),), generator=generator)
            x_t = q_sample(x0, t, torch.randn(x0.shape, generator=generator), ac_embed)
            pred = raw.transformer(x_t, timestep=t, proj_embedding=embeds, encoder_hidden_states=hidden,
                                   attention_mask=mask).predicted_image_embedding
            loss = torch.nn.functional.mse_loss(pred, x0)
        run.train_step(loss, trained, optimizer, scheduler, ema)
    weights = {**run.final_weights(trained, model=raw), **ema.shadow}
    if run.main_process:
        raw.load_state_dict(weights, strict=False)
        checkpoint.save(model.state_dict(), model.config, run.export)
        run.exported(note=json.dumps({"part": cfg.part}))


if __name__ == "__main__":
    run_cli(main)
