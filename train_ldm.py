"""Train a latent diffusion model (the UNet; the text encoder τθ too when trainable) on a folder of
captioned images, from scratch or fine-tuning anything Pipeline.from_pretrained loads.

    python train_ldm.py --config configs/train_tiny.yaml --set data.path=DATA
    python train_ldm.py --config configs/train_sd15_finetune.yaml --init sd15.safetensors --data.path=DATA
    accelerate launch --num_processes 2 train_ldm.py --config ... --resume
    (overrides: --set optim.lr=1e-4 or --optim.lr=1e-4; fields in ldm/train_config.py TrainConfig)

Shape: config -> data check -> models -> accelerator.prepare -> one loop. The export is one
self-describing .safetensors (EMA weights when enabled) that Pipeline.from_pretrained loads."""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_seed
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ldm import checkpoint
from ldm import train_state as ts
from ldm.autoencoder import DiagonalGaussian
from ldm.data.images import (CachedLatentDataset, ImageCaptionDataset, build_latent_cache, caption_collate,
                             scan_folder, split_holdout)
from ldm.data.grounding import GroundedDataset, scenes_by_path
from ldm.diffusion import LatentDiffusion
from ldm.formats.keys import TEXT, UNET, VAE
from ldm.ema import EMA
from ldm.grounding import grounding_loss, recording_cross_attention
from ldm.pipeline import Pipeline
from ldm.schedule import alphas_cumprod, diffusion_loss, q_sample, training_noise
from ldm.train_config import TrainConfig, load_train_config, parse_cli

EXPORT_PREFIX = {"unet": UNET, "text_encoder": TEXT}


class Denoiser(nn.Module):
    """What is trained, as one module for DDP/FSDP/DeepSpeed: the UNet, and τθ when trainable."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, z_t, t, tokens, context=None):
        if self.text_encoder is not None:
            context = self.text_encoder(tokens)  # (B, L, D), trained jointly (LDM eq. 3)
        return self.unet(z_t, t, context)        # (B, C, h, w): ε, v or x0 per prediction_type


def check_config(cfg: TrainConfig, resolution: int) -> None:
    """Raise ValueError for combinations of settings that cannot train, before anything is built
    (single values are checked as the config is built: ldm/train_config.py)."""
    m, f = cfg.model, cfg.model.autoencoder.downsample_factor
    if m.unet.in_channels != m.autoencoder.embed_dim or m.unet.context_dim != m.text_encoder.hidden_size:
        raise ValueError(f"the UNet takes {m.unet.in_channels} latent channels and context width "
                         f"{m.unet.context_dim}, but the autoencoder gives {m.autoencoder.embed_dim} and the "
                         f"text encoder {m.text_encoder.hidden_size}")
    if resolution % f:
        raise ValueError(f"data.resolution={resolution} must be a multiple of the autoencoder's factor {f}")
    if cfg.data.cache_latents and not cfg.data.center_crop:
        raise ValueError("random crops cannot be cached: set data.center_crop=true or data.cache_latents=false")
    if cfg.grounded and (cfg.data.random_flip or not cfg.data.center_crop
                                                  or m.text_encoder.kind == "t5"):
        raise ValueError("the grounding loss needs data.random_flip=false and data.center_crop=true (its masks "
                         "are not flipped or cropped) and a CLIP-BPE text encoder (kind clip or openclip), got "
                         f"kind {m.text_encoder.kind!r}")


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


def main(argv=None) -> None:
    args, overrides = parse_cli(argv, __doc__, extra=("vae",))
    # read once: for the config check, then for the weights
    read_init = functools.lru_cache(maxsize=1)(functools.partial(checkpoint.load, allow_pickle=args.allow_pickle))
    cfg = load_train_config(TrainConfig, args.config, overrides, args.init, lambda p: read_init(p)[0])
    vae_cfg, vae_sd = ts.load_autoencoder(cfg.vae, args.allow_pickle) if cfg.vae else (None, None)
    if vae_cfg is not None:
        cfg = replace(cfg, model=replace(cfg.model, autoencoder=vae_cfg))
    resolution = cfg.data.resolution or cfg.model.sample_size
    check_config(cfg, resolution)
    load_res = resolution // cfg.model.autoencoder.pixel_scale  # images load at the autoencoder network's size
    text_trainable = cfg.model.text_encoder.trainable
    report = scan_folder(cfg.data.path, load_res, cfg.data.caption_column,
                         "optional" if cfg.data.allow_uncaptioned else "required")
    items = report.items[:cfg.data.limit] if cfg.data.limit else report.items
    train_items, _ = split_holdout(items, cfg.data.holdout, cfg.seed)
    if cfg.grounded:
        scenes = scenes_by_path(cfg.data.path)
        scenes = [scenes.get(item.path.resolve()) for item in train_items]
        if not any(scenes):
            raise ValueError(f"the grounding loss needs scene records in {cfg.data.path}/metadata.jsonl (as "
                             "`python -m ldm.shapes.scenes` writes them); set grounding=0 for this data")

    accelerator = ts.make_accelerator(cfg)
    main_process, device = accelerator.is_main_process, accelerator.device
    out, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    log_path, export = out / "log.jsonl", Path(cfg.export or out / "model.safetensors")
    say = tqdm.write if main_process else (lambda msg: None)
    per_step = cfg.batch_size * cfg.optim.grad_accum * accelerator.num_processes
    ts.check_run(cfg, len(train_items), accelerator.num_processes, ckpt_dir, args.resume)
    for warning in report.warnings(load_res):
        say(f"warning: {warning}")

    # -- model: frozen autoencoder, text encoder frozen or trained, UNet trained ---------------------
    set_seed(cfg.seed)  # identical initial weights on every process
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
    model.first_stage_model.requires_grad_(False).eval()
    model.cond_stage_model.requires_grad_(text_trainable).train(text_trainable)
    model.unet.train()
    model.to(device=device, dtype=torch.float32)  # fp16 init files (most SD releases) train in fp32 + autocast
    denoiser = Denoiser(model.unet, model.cond_stage_model if text_trainable else None)
    n_params = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    say(f"training {n_params / 1e6:.1f}M parameters on {len(train_items)} images at {resolution} px, "
        f"{accelerator.num_processes} process(es), {per_step} images per step")

    # -- data -------------------------------------------------------------------------------------
    if cfg.data.cache_latents:
        cache = ts.latent_cache_path(out, train_items, load_res, cfg.data.random_flip, model.first_stage_model)
        if main_process and not cache.is_file():
            say(f"caching latents of {len(train_items)} images in {cache}")

            def encode_moments(x):                                                 # (B, 2C, h, w)
                posterior = model.first_stage_model.encode(x.to(device), resample=False)
                return torch.cat([posterior.mean, posterior.logvar], dim=1)
            build_latent_cache(train_items, encode_moments, cache, load_res, cfg.data.random_flip, cfg.batch_size)
        accelerator.wait_for_everyone()
        dataset = CachedLatentDataset(train_items, cache, cfg.seed)
        if dataset.unreadable:
            say(f"warning: {dataset.unreadable} image(s) could not be decoded and are left out")
    else:
        dataset = ImageCaptionDataset(train_items, load_res, cfg.data.center_crop, cfg.data.random_flip, cfg.seed)
    if cfg.grounded:
        latent_size = resolution // cfg.model.autoencoder.downsample_factor  # the factor counts pixel_scale
        dataset = GroundedDataset(dataset, scenes, model.cond_stage_model.tokenizer, latent_size)
    collate = functools.partial(caption_collate, tokenize=model.cond_stage_model.tokenize, cond_drop=cfg.cond_drop)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                        num_workers=cfg.data.num_workers,
                        generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global RNG untouched

    # -- optimiser, Accelerate, EMA, resume --------------------------------------------------------
    o = cfg.optim
    optimizer = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=o.lr,
                                  betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    # stepped by hand once per optimizer step (a prepared scheduler steps once per process)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, ts.lr_factor(o, cfg.max_steps))
    denoiser, optimizer, loader = accelerator.prepare(denoiser, optimizer, loader)
    raw = accelerator.unwrap_model(denoiser)
    accelerator.register_for_checkpointing(lr_scheduler)
    ema = EMA(raw, cfg.ema_decay) if cfg.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    set_seed(cfg.seed, device_specific=True)  # different noise and timesteps on each process
    step, position, skipped = ts.resume_or_start(accelerator, args.resume, ckpt_dir, log_path, say)
    if accelerator.log_with:
        accelerator.init_trackers("train_ldm")
    ts.write_test_hash("start", model.state_dict(), accelerator.process_index)

    # -- the loop ---------------------------------------------------------------------------------
    ac = alphas_cumprod(cfg.model.schedule).to(device)                        # (T,) float64
    T, pt = cfg.model.schedule.num_train_timesteps, cfg.model.schedule.prediction_type
    scale = cfg.model.autoencoder.scale_factor
    data = ts.batches(accelerator, loader, position)
    pbar = tqdm(total=cfg.max_steps, initial=step, disable=not main_process, desc="train_ldm", dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), step
    while step < cfg.max_steps:
        losses, losses_g = [], []
        for _ in range(o.grad_accum):
            batch = next(data)
            position += 1
            skipped += int(batch["skipped"])
            with accelerator.accumulate(denoiser):
                with torch.no_grad(), accelerator.autocast():  # the frozen parts
                    if "moments" in batch:
                        z0 = DiagonalGaussian(batch["moments"]).sample() * scale         # (B, C, h, w)
                    else:
                        z0 = model.encode_first_stage(batch["x"], resample=False)      # (B, C, h, w)
                    context = None if text_trainable else model.cond_stage_model(batch["tokens"])  # (B, L, D)
                z0 = z0.float()
                noise = training_noise(z0, cfg.noise_offset)
                t = torch.randint(0, T, (z0.shape[0],), device=device)
                z_t = q_sample(z0, t, noise, ac)                                       # DDPM eq. (4)
                with recording_cross_attention(model.unet) if cfg.grounded else contextlib.nullcontext([]) as maps:
                    pred = denoiser(z_t, t, batch["tokens"], context)
                loss = diffusion_loss(pred, z0, noise, t, ac, pt, cfg.snr_gamma)
                if cfg.grounded:
                    if batch["masks"].shape[-2:] != z0.shape[-2:]:
                        raise RuntimeError(f"grounding masks {tuple(batch['masks'].shape[-2:])} do not match "
                                           f"the latents {tuple(z0.shape[-2:])}")
                    token_loss, pixel_loss = grounding_loss(maps, batch["masks"], batch["groups"])
                    loss = loss + cfg.grounding * token_loss + cfg.grounding_pixel * pixel_loss
                    losses_g.append(torch.stack([token_loss, pixel_loss]).detach())
                accelerator.backward(loss)
                if accelerator.sync_gradients and o.grad_clip > 0:
                    accelerator.clip_grad_norm_(denoiser.parameters(), o.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        lr_scheduler.step()
        step += 1
        if ema is not None:
            ema.update(raw)
        pbar.update(1)

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            loss_mean = accelerator.reduce(torch.stack(losses).mean(), "mean").item()
            n_skipped = int(accelerator.reduce(torch.tensor(skipped, device=device), "sum"))
            now = time.perf_counter()
            record = {"step": step, "loss": loss_mean, "lr": lr_scheduler.get_last_lr()[0],
                      "images_per_s": (step - step_last) * per_step / (now - t_last), "skipped_images": n_skipped}
            t_last, step_last = now, step
            if losses_g:
                record["grounding_token"], record["grounding_pixel"] = (
                    accelerator.reduce(torch.stack(losses_g).mean(0), "mean").tolist())
            if main_process:
                ts.append_jsonl(log_path, record)
                pbar.set_postfix(loss=f"{loss_mean:.4f}", img_s=f"{record['images_per_s']:.2f}")
            accelerator.log(record, step=step)
        if cfg.sample_every and step % cfg.sample_every == 0 and main_process:
            (out / "samples").mkdir(parents=True, exist_ok=True)
            with ema.swapped_in(raw) if ema is not None else contextlib.nullcontext():
                sample_grid(model, cfg, resolution, device).save(out / "samples" / f"step-{step:08d}.png")
            model.unet.train()
            model.cond_stage_model.train(text_trainable)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            ts.save_checkpoint(accelerator, ckpt_dir, step, {"position": position, "skipped": skipped,
                                                             "config": asdict(cfg)}, cfg.keep_checkpoints)
    pbar.close()

    # -- export: one self-describing .safetensors, EMA weights when enabled --------------------------
    accelerator.wait_for_everyone()
    trained = accelerator.get_state_dict(denoiser)  # every process: FSDP/DeepSpeed gather here
    ts.write_test_hash("end", model.state_dict(), accelerator.process_index)
    if main_process:
        if ema is not None:
            trained = {**trained, **ema.shadow}
        sd = model.state_dict()
        sd.update({EXPORT_PREFIX[k.split(".", 1)[0]] + k.split(".", 1)[1]: v for k, v in trained.items()})
        checkpoint.save(sd, cfg.model, export)
        ts.append_jsonl(log_path, {"step": step, "exported": str(export), "peak_rss_mb": ts.peak_rss_mb()})
        say(f"exported {export} (peak RSS {ts.peak_rss_mb():.0f} MiB)")
    accelerator.end_training()


if __name__ == "__main__":
    ts.run_cli(main)
