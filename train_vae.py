"""Train the KL autoencoder (LDM's first stage) on a folder of images.

    python train_vae.py --config configs/train_vae_tiny.yaml --set data.path=DATA
    accelerate launch --num_processes 2 train_vae.py --config ... --resume
    (overrides: --set optim.lr=1e-4 or --optim.lr=1e-4; fields in ldm/train_config.py VAETrainConfig)

Loss: L1 + kl_weight·KL (+ LPIPS) + an adaptively weighted PatchGAN hinge loss from disc_start on
(ldm/losses.py). Reports reconstruction PSNR on the held-out split. Exports first_stage_model.*
weights with their AutoencoderConfig, ready for `train_ldm.py --vae`."""
from __future__ import annotations

import functools
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ldm import train_state as ts
from ldm.autoencoder import AutoencoderKL
from ldm.data.images import ImageCaptionDataset, caption_collate, scan_folder, split_holdout
from ldm.losses import (NLayerDiscriminator, adaptive_weight, check_rec_loss, hinge_d_loss, load_lpips, psnr,
                        vae_loss)
from ldm.train_config import VAETrainConfig, load_train_config, parse_cli


@torch.no_grad()
def evaluate(accelerator, ae: AutoencoderKL, loader) -> float:
    """Mean PSNR (dB) of posterior-mean reconstructions over the held-out loader, all processes."""
    ae.eval()
    scores = []
    for batch in loader:
        with accelerator.autocast():
            x_rec = ae.decode(ae.encode(batch["x"], False).mean, False)        # (B, 3, H/k, W/k)
        scores.append(accelerator.gather_for_metrics(psnr(batch["x"], x_rec)))
    ae.train()
    return torch.cat(scores).mean().item()


@torch.no_grad()
def fit_scale_factor(ae: AutoencoderKL, dataset, seed: int, n: int = 32) -> float:
    """1 / std(z) over up to n training images, so scaled latents have unit variance (LDM §4.3.2)."""
    device = next(ae.parameters()).device
    x = torch.stack([dataset[i]["x"] for i in range(min(n, len(dataset)))]).to(device)
    z = ae.encode(x, False).sample(torch.Generator(device).manual_seed(seed))
    return float(1.0 / z.float().flatten().std())


def main(argv=None) -> None:
    args, overrides = parse_cli(argv, __doc__)
    # read once: for the config check, then for the weights
    read_init = functools.lru_cache(maxsize=1)(functools.partial(ts.load_autoencoder, allow_pickle=args.allow_pickle))
    cfg = load_train_config(VAETrainConfig, args.config, overrides, args.init, lambda p: read_init(p)[0])
    resolution, f = cfg.data.resolution, cfg.model.downsample_factor
    if resolution <= 0 or resolution % f:
        raise ValueError(f"data.resolution must be a positive multiple of the autoencoder's factor {f}, "
                         f"got {resolution}")
    check_rec_loss(cfg.rec_loss)
    # the learned network works at 1/pixel_scale of the image size: the loader resamples the images
    # once, instead of the model resampling every batch there and back
    resolution //= cfg.model.pixel_scale
    report = scan_folder(cfg.data.path, resolution, captions="ignore")
    items = report.items[:cfg.data.limit] if cfg.data.limit else report.items
    train_items, val_items = split_holdout(items, cfg.data.holdout, cfg.seed)
    perceptual = load_lpips(cfg.lpips_path) if cfg.perceptual_weight > 0 else None

    accelerator = ts.make_accelerator(cfg)
    main_process, device = accelerator.is_main_process, accelerator.device
    out, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
    log_path, export = out / "log.jsonl", Path(cfg.export or out / "vae.safetensors")
    say = tqdm.write if main_process else (lambda msg: None)
    per_step = cfg.batch_size * cfg.optim.grad_accum * accelerator.num_processes
    ts.check_run(cfg, len(train_items), accelerator.num_processes, ckpt_dir, args.resume)
    for warning in report.warnings(resolution):
        say(f"warning: {warning}")
    if not val_items:
        say("warning: data.holdout is 0: no held-out PSNR will be reported")

    # -- models ----------------------------------------------------------------------------------
    set_seed(cfg.seed)  # identical initial weights on every process
    ae = AutoencoderKL(cfg.model)
    if cfg.init:
        try:
            ae.load_state_dict(read_init(cfg.init)[1], strict=True)
        except RuntimeError as e:
            raise ValueError(f"--init {cfg.init} does not fit the autoencoder config: {e}") from e
    else:
        # A fresh posterior starts at std 1 (logvar 0): unit noise that drowns the small initial latents,
        # so the decoder first learns the blurry dataset mean. Starting at cfg.init_logvar (tiny noise)
        # lets reconstruction train from step 1; the KL term is then free to widen it.
        with torch.no_grad():
            ae.quant_conv.bias[cfg.model.embed_dim:].fill_(cfg.init_logvar)
    disc = NLayerDiscriminator(cfg.model.out_ch, n_layers=cfg.disc_layers) if cfg.disc_weight > 0 else None
    if perceptual is not None:
        perceptual.to(device)

    # -- data, optimisers, Accelerate, resume -----------------------------------------------------
    resize = cfg.data.resize // cfg.model.pixel_scale
    dataset = ImageCaptionDataset(train_items, resolution, cfg.data.center_crop, cfg.data.random_flip, cfg.seed,
                                  resize)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=caption_collate,
                        num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(ImageCaptionDataset(val_items, resolution, seed=cfg.seed, resize=resize), batch_size=cfg.batch_size,
                            collate_fn=caption_collate, generator=torch.Generator().manual_seed(cfg.seed))
    o = cfg.optim
    opt_ae = torch.optim.AdamW(ae.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(  # stepped by hand once per optimizer step
        opt_ae, ts.lr_factor(o, cfg.max_steps))
    if disc is not None:
        opt_disc = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr or o.lr, betas=tuple(o.betas),
                                     weight_decay=o.weight_decay, eps=o.eps)
        ae, disc, opt_ae, opt_disc, loader, val_loader = accelerator.prepare(
            ae, disc, opt_ae, opt_disc, loader, val_loader)
        raw_disc = accelerator.unwrap_model(disc)
    else:
        ae, opt_ae, loader, val_loader = accelerator.prepare(ae, opt_ae, loader, val_loader)
    raw_ae = accelerator.unwrap_model(ae)
    last_layer = raw_ae.decoder.conv_out.weight
    accelerator.register_for_checkpointing(lr_scheduler)
    set_seed(cfg.seed, device_specific=True)  # different posterior samples on each process
    step, position, skipped = ts.resume_or_start(accelerator, args.resume, ckpt_dir, log_path, say)
    if accelerator.log_with:
        accelerator.init_trackers("train_vae")
    ts.write_test_hash("start", raw_ae.state_dict(), accelerator.process_index)
    if step == 0 and val_items:
        score = evaluate(accelerator, raw_ae, val_loader)
        say(f"held-out PSNR before training: {score:.2f} dB")
        if main_process:
            ts.append_jsonl(log_path, {"step": 0, "psnr": score})

    # -- the loop ---------------------------------------------------------------------------------
    models = (ae, disc) if disc is not None else (ae,)
    data = ts.batches(accelerator, loader, position)
    pbar = tqdm(total=cfg.max_steps, initial=step, disable=not main_process, desc="train_vae", dynamic_ncols=True)
    t_last, step_last = time.perf_counter(), step
    while step < cfg.max_steps:
        gan_on = disc is not None and step >= cfg.disc_start
        parts = []
        for _ in range(o.grad_accum):
            batch = next(data)
            position += 1
            skipped += int(batch["skipped"])
            with accelerator.accumulate(*models):
                x = batch["x"]                                                        # (B, 3, H, W)
                x_rec, posterior = ae(x, resample=False)
                with accelerator.autocast():
                    nll, kl = vae_loss(x, x_rec, posterior, cfg.kl_weight, perceptual, cfg.perceptual_weight,
                                         cfg.rec_loss)
                    loss, zero = nll + kl, torch.zeros((), device=device)
                    g_loss = d_loss = d_weight = zero
                    if gan_on:
                        # generator term through a frozen copy of D's weights: it trains the decoder only
                        frozen = {n: p.detach() for n, p in raw_disc.named_parameters()}
                        g_loss = -torch.func.functional_call(raw_disc, frozen, (x_rec,)).mean()
                        d_weight = adaptive_weight(nll, g_loss, last_layer) * cfg.disc_weight
                        loss = loss + d_weight * g_loss
                        logits_real, logits_fake = disc(torch.cat([x, x_rec.detach()])).chunk(2)  # (B, 1, h', w') each
                        d_loss = hinge_d_loss(logits_real, logits_fake)
                accelerator.backward(loss + d_loss)  # disjoint graphs: loss -> autoencoder, d_loss -> D
                if accelerator.sync_gradients and o.grad_clip > 0:
                    accelerator.clip_grad_norm_(ae.parameters(), o.grad_clip)
                    if gan_on:
                        accelerator.clip_grad_norm_(disc.parameters(), o.grad_clip)
                opt_ae.step()
                opt_ae.zero_grad(set_to_none=True)
                if gan_on:
                    opt_disc.step()
                    opt_disc.zero_grad(set_to_none=True)
            parts.append(torch.stack([loss, nll, kl, g_loss, d_loss, d_weight]).detach().float())
        lr_scheduler.step()
        step += 1
        pbar.update(1)

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            means = accelerator.reduce(torch.stack(parts).mean(0), "mean").tolist()
            n_skipped = int(accelerator.reduce(torch.tensor(skipped, device=device), "sum"))
            now = time.perf_counter()
            record = dict(zip(("loss", "nll", "kl", "g_loss", "d_loss", "d_weight"), means))
            record = {"step": step, **record, "lr": lr_scheduler.get_last_lr()[0],
                      "images_per_s": (step - step_last) * per_step / (now - t_last), "skipped_images": n_skipped}
            t_last, step_last = now, step
            if val_items and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
                record["psnr"] = evaluate(accelerator, raw_ae, val_loader)
            if main_process:
                ts.append_jsonl(log_path, record)
                pbar.set_postfix(loss=f"{record['loss']:.1f}", img_s=f"{record['images_per_s']:.1f}",
                                 **({"psnr": f"{record['psnr']:.2f}"} if "psnr" in record else {}))
            accelerator.log(record, step=step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            ts.save_checkpoint(accelerator, ckpt_dir, step, {"position": position, "skipped": skipped,
                                                             "config": asdict(cfg)}, cfg.keep_checkpoints)
    pbar.close()

    # -- export: first_stage_model.* and the AutoencoderConfig (with a fitted scale_factor) ---------
    accelerator.wait_for_everyone()
    sd = accelerator.get_state_dict(ae)
    ts.write_test_hash("end", raw_ae.state_dict(), accelerator.process_index)
    if main_process:
        vae_cfg = cfg.model
        if cfg.fit_scale_factor:
            vae_cfg = replace(vae_cfg, scale_factor=fit_scale_factor(raw_ae, dataset, cfg.seed))
        ts.save_autoencoder(sd, vae_cfg, export)
        ts.append_jsonl(log_path, {"step": step, "exported": str(export), "scale_factor": vae_cfg.scale_factor,
                                   "peak_rss_mb": ts.peak_rss_mb()})
        say(f"exported {export} (scale_factor {vae_cfg.scale_factor:.5f}, peak RSS {ts.peak_rss_mb():.0f} MiB)")
    accelerator.end_training()


if __name__ == "__main__":
    ts.run_cli(main)
