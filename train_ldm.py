"""Train a latent diffusion model (the UNet; the text encoder τθ too when trainable) on a folder of
captioned images, from scratch or fine-tuning anything Pipeline.from_pretrained loads.

    python train_ldm.py --config configs/train_tiny.yaml --set data.path=DATA
    python train_ldm.py --config configs/train_sd15_finetune.yaml --init sd15.safetensors --data.path=DATA
    accelerate launch --num_processes 2 train_ldm.py --config ... --resume
    python train_ldm.py --config configs/train_lora_tiny.yaml --init base.safetensors --lora-rank 8 --data.path=DATA
    (overrides: --set optim.lr=1e-4 or --optim.lr=1e-4; fields in ldm/training/config.py TrainConfig)

Shape: config -> data check -> models -> accelerator.prepare -> one loop; the steps every training
script shares are ldm/training/run.py's. The export is one self-describing .safetensors (EMA
weights when enabled) that Pipeline.from_pretrained loads; with lora_rank > 0 only LoRA matrices
train (the base frozen, ldm/training/lora.py) and the export is a kohya/A1111 LoRA file."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import init_empty_weights
from PIL import Image
from torch import nn

from ldm import checkpoint
from ldm.autoencoder import DiagonalGaussian
from ldm.diffusion import LatentDiffusion
from ldm.formats.keys import TEXT, UNET, VAE
from ldm.pipeline import Pipeline
from ldm.schedule import alphas_cumprod, diffusion_loss, q_sample, training_noise
from ldm.training.config import TrainConfig, config_from_cli
from ldm.training.data import (CachedLatentDataset, ImageCaptionDataset, build_latent_cache, caption_collate,
                               latent_cache_path, train_loader, training_images)
from ldm.training.ema import EMA
from ldm.training.lora import LoraNetwork, save_lora
from ldm.training.optim import adamw, lr_schedule
from ldm.training.run import run_cli, start
from ldm.training.vae_export import load_autoencoder

EXPORT_PREFIX = {"unet": UNET, "text_encoder": TEXT}


class Denoiser(nn.Module):
    """What is trained, as one module for DDP/FSDP/DeepSpeed: the UNet, and τθ when trainable; or
    a LoRA network hooked into them, when the frozen base stays out of parameters() and
    state_dict(), so checkpoints and gradient syncs hold the LoRA only."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None, lora: LoraNetwork | None = None):
        super().__init__()
        if lora is None:
            self.unet, self.text_encoder = unet, text_encoder
        else:
            self.lora = lora
            self.__dict__.update(unet=unet, text_encoder=text_encoder)  # plain attributes: not submodules

    def forward(self, z_t, t, tokens, context=None):
        if self.text_encoder is not None:
            context = self.text_encoder(tokens)  # (B, L, D), trained jointly (LDM eq. 3) or through its LoRA
        return self.unet(z_t, t, context)        # (B, C, h, w): ε, v or x0 per prediction_type


def check_config(cfg: TrainConfig, resolution: int) -> None:
    """Raise ValueError for combinations of settings that cannot train, before anything is built
    (single values are checked as the config is built: ldm/training/config.py)."""
    m, f = cfg.model, cfg.model.autoencoder.downsample_factor
    if m.unet.in_channels != m.autoencoder.embed_dim or m.unet.context_dim != m.text_encoder.hidden_size:
        raise ValueError(f"the UNet takes {m.unet.in_channels} latent channels and context width "
                         f"{m.unet.context_dim}, but the autoencoder gives {m.autoencoder.embed_dim} and the "
                         f"text encoder {m.text_encoder.hidden_size}")
    if resolution % f:
        raise ValueError(f"data.resolution={resolution} must be a multiple of the autoencoder's factor {f}")
    if cfg.data.cache_latents and not cfg.data.center_crop:
        raise ValueError("random crops cannot be cached: set data.center_crop=true or data.cache_latents=false")
    if cfg.lora_rank and not cfg.init:
        raise ValueError("lora_rank > 0 trains a LoRA for a base model: pass it with --init PATH")


@torch.no_grad()
def sample_grid(model: LatentDiffusion, cfg: TrainConfig, resolution: int, device) -> Image.Image:
    """The fixed prompt list, one row, same seed every time so grids compare across steps."""
    images = Pipeline(model, device=device)(list(cfg.sample_prompts), steps=cfg.sample_steps,
                                            guidance_scale=cfg.sample_guidance_scale, seed=cfg.seed,
                                            height=resolution, width=resolution)
    grid = Image.new("RGB", (resolution * len(images), resolution))
    for i, im in enumerate(images):
        grid.paste(im, (i * resolution, 0))
    return grid


def load_model(cfg: TrainConfig, read_init, vae_sd: dict | None) -> LatentDiffusion:
    """The model to train: cfg.init's weights or a fresh init, its autoencoder replaced by `vae_sd`
    when given."""
    if cfg.init:
        sd = read_init(cfg.init)[1]
        if vae_sd is not None:
            sd = {k: v for k, v in sd.items() if not k.startswith(VAE)}
            sd.update({VAE + k: v for k, v in vae_sd.items()})
        with init_empty_weights(include_buffers=False):  # no random init of weights about to be replaced
            model = LatentDiffusion(cfg.model)
        checkpoint.load_into(model, sd, cfg.init)
    else:
        model = LatentDiffusion(cfg.model)
        if vae_sd is not None:
            model.first_stage_model.load_state_dict(vae_sd, strict=True)
    return model


def main(argv=None) -> None:
    args, cfg, read_init = config_from_cli(TrainConfig, argv, __doc__, checkpoint.load, extra=("vae", "lora-rank"))
    vae_cfg, vae_sd = load_autoencoder(cfg.vae, args.allow_pickle) if cfg.vae else (None, None)
    if vae_cfg is not None:
        cfg = replace(cfg, model=replace(cfg.model, autoencoder=vae_cfg))
    resolution = cfg.data.resolution or cfg.model.sample_size
    check_config(cfg, resolution)
    load_res = resolution // cfg.model.autoencoder.pixel_scale  # images load at the autoencoder network's size
    lora = cfg.lora_rank > 0
    text_trainable = cfg.model.text_encoder.trainable and not lora  # a LoRA freezes the whole base
    text_in_forward = text_trainable or bool(lora and cfg.lora_text_targets)  # τθ runs with gradients
    report, train_items, _ = training_images(cfg.data, load_res, cfg.seed,
                                             "optional" if cfg.data.allow_uncaptioned else "required")
    run = start(cfg, "train_ldm", len(train_items), args.resume, "lora.safetensors" if lora else "model.safetensors",
                report.warnings(load_res))
    accelerator, device, out = run.accelerator, run.accelerator.device, Path(cfg.out_dir)

    # -- model: frozen autoencoder, text encoder frozen or trained, UNet trained; or only a LoRA -----
    model = load_model(cfg, read_init, vae_sd)
    model.first_stage_model.requires_grad_(False).eval()
    model.cond_stage_model.requires_grad_(text_trainable).train(text_trainable)
    model.unet.requires_grad_(not lora).train(not lora)
    model.to(device=device, dtype=torch.float32)  # fp16 init files (most SD releases) train in fp32 + autocast
    network = LoraNetwork(model, cfg.lora_rank, cfg.lora_alpha or cfg.lora_rank, cfg.lora_unet_targets,
                          cfg.lora_text_targets) if lora else None
    denoiser = Denoiser(model.unet, model.cond_stage_model if text_in_forward else None, network)
    watched = network if lora else model  # the weights that train, for the test hooks
    n_params = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    run.say(f"training {n_params / 1e6:.3g}M {'LoRA ' if lora else ''}parameters on {len(train_items)} images at {resolution} px, "
            f"{accelerator.num_processes} process(es), {run.per_step} images per step")

    # -- data -------------------------------------------------------------------------------------
    if cfg.data.cache_latents:
        cache = latent_cache_path(out, train_items, load_res, cfg.data.random_flip, model.first_stage_model)
        if run.main_process and not cache.is_file():
            run.say(f"caching latents of {len(train_items)} images in {cache}")

            def encode_moments(x):                                                 # (B, 2C, h, w)
                posterior = model.first_stage_model.encode(x.to(device), resample=False)
                return torch.cat([posterior.mean, posterior.logvar], dim=1)
            build_latent_cache(train_items, encode_moments, cache, load_res, cfg.data.random_flip, cfg.batch_size)
        accelerator.wait_for_everyone()
        dataset = CachedLatentDataset(train_items, cache, cfg.seed)
        if dataset.unreadable:
            run.say(f"warning: {dataset.unreadable} image(s) could not be decoded and are left out")
    else:
        dataset = ImageCaptionDataset(train_items, load_res, cfg.data.center_crop, cfg.data.random_flip, cfg.seed)
    loader = train_loader(dataset, cfg, functools.partial(caption_collate, tokenize=model.cond_stage_model.tokenize,
                                                          cond_drop=cfg.cond_drop))

    # -- optimiser, Accelerate, EMA, resume --------------------------------------------------------
    o = cfg.optim
    optimizer = adamw([p for p in denoiser.parameters() if p.requires_grad], o)
    lr_scheduler = lr_schedule(optimizer, o, cfg.max_steps)
    denoiser, optimizer, loader = accelerator.prepare(denoiser, optimizer, loader)
    raw = accelerator.unwrap_model(denoiser)
    ema = EMA(raw, cfg.ema_decay) if cfg.use_ema else None
    run.resume(args.resume, lr_scheduler, ema, model=watched)

    # -- the loop ---------------------------------------------------------------------------------
    ac = alphas_cumprod(cfg.model.schedule).to(device)                        # (T,) float64
    T, pt = cfg.model.schedule.num_train_timesteps, cfg.model.schedule.prediction_type
    scale = cfg.model.autoencoder.scale_factor
    data = run.start_loop(loader)
    while run.step < cfg.max_steps:
        losses = []
        for _ in range(o.grad_accum):
            batch = next(data)
            with accelerator.accumulate(denoiser):
                with torch.no_grad(), accelerator.autocast():  # the frozen parts
                    if "moments" in batch:
                        z0 = DiagonalGaussian(batch["moments"]).sample() * scale         # (B, C, h, w)
                    else:
                        z0 = model.encode_first_stage(batch["x"], resample=False)      # (B, C, h, w)
                    context = None if text_in_forward else model.cond_stage_model(batch["tokens"])  # (B, L, D)
                z0 = z0.float()
                noise = training_noise(z0, cfg.noise_offset)
                t = torch.randint(0, T, (z0.shape[0],), device=device)
                z_t = q_sample(z0, t, noise, ac)                                       # DDPM eq. (4)
                pred = denoiser(z_t, t, batch["tokens"], context)
                loss = diffusion_loss(pred, z0, noise, t, ac, pt, cfg.snr_gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients and o.grad_clip > 0:
                    accelerator.clip_grad_norm_(denoiser.parameters(), o.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        run.step_done(lr_scheduler)
        if ema is not None:
            ema.update(raw)

        if run.log_due():
            loss_mean = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
            run.write_log(run.log_record({"loss": loss_mean}, lr_scheduler), loss=f"{loss_mean:.4f}")
        if cfg.sample_every and run.step % cfg.sample_every == 0 and run.main_process:
            (out / "samples").mkdir(parents=True, exist_ok=True)
            with ema.swapped_in(raw) if ema is not None else contextlib.nullcontext():
                sample_grid(model, cfg, resolution, device).save(out / "samples" / f"step-{run.step:08d}.png")
            model.unet.train(not lora)
            model.cond_stage_model.train(text_trainable)
        run.checkpoint_if_due()

    # -- export: one self-describing .safetensors, EMA weights when enabled --------------------------
    trained = run.final_weights(denoiser, model=watched)
    if run.main_process and lora:
        trained = {**trained, **ema.shadow} if ema is not None else trained
        save_lora({k.removeprefix("lora."): v for k, v in trained.items()}, run.export, cfg.lora_rank,
                  cfg.lora_alpha or cfg.lora_rank, Path(cfg.init).name)
        run.exported()
    elif run.main_process:
        if ema is not None:
            trained = {**trained, **ema.shadow}
        sd = model.state_dict()
        sd.update({EXPORT_PREFIX[k.split(".", 1)[0]] + k.split(".", 1)[1]: v for k, v in trained.items()})
        checkpoint.save(sd, cfg.model, run.export)
        run.exported()
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
