"""Train the KL autoencoder (LDM's first stage) on a folder of images.

    python train_vae.py --config configs/train_vae_tiny.yaml --set data.path=DATA
    accelerate launch --num_processes 2 train_vae.py --config ... --resume
    (overrides: --set optim.lr=1e-4 or --optim.lr=1e-4; fields in ldm/training/config.py VAETrainConfig)

Loss: L1 + kl_weight·KL (+ LPIPS) + an adaptively weighted PatchGAN hinge loss from disc_start on
(ldm/training/vae_losses.py). Reports reconstruction PSNR on the held-out split. Exports
first_stage_model.* weights with their AutoencoderConfig, ready for `train_ldm.py --vae`. The steps
every training script shares are ldm/training/run.py's."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.data import DataLoader

from ldm.autoencoder import AutoencoderKL
from ldm.training.config import VAETrainConfig, config_from_cli
from ldm.training.data import ImageCaptionDataset, caption_collate, train_loader, training_images
from ldm.training.optim import adamw, lr_schedule
from ldm.training.run import run_cli, start
from ldm.training.state import append_jsonl
from ldm.training.vae_export import load_autoencoder, save_autoencoder
from ldm.training.vae_losses import (NLayerDiscriminator, adaptive_weight, check_rec_loss, hinge_d_loss, load_lpips,
                                     psnr, vae_loss)


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
    args, cfg, read_init = config_from_cli(VAETrainConfig, argv, __doc__, load_autoencoder)
    resolution, f = cfg.data.resolution, cfg.model.downsample_factor
    if resolution <= 0 or resolution % f:
        raise ValueError(f"data.resolution must be a positive multiple of the autoencoder's factor {f}, "
                         f"got {resolution}")
    check_rec_loss(cfg.rec_loss)
    # the learned network works at 1/pixel_scale of the image size: the loader resamples the images
    # once, instead of the model resampling every batch there and back
    resolution //= cfg.model.pixel_scale
    report, train_items, val_items = training_images(cfg.data, resolution, cfg.seed, captions="ignore")
    perceptual = load_lpips(cfg.lpips_path) if cfg.perceptual_weight > 0 else None
    warnings = report.warnings(resolution)
    if not val_items:
        warnings.append("data.holdout is 0: no held-out PSNR will be reported")
    run = start(cfg, "train_vae", len(train_items), args.resume, "vae.safetensors", warnings)
    accelerator, device = run.accelerator, run.accelerator.device

    # -- models ----------------------------------------------------------------------------------
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
    loader = train_loader(dataset, cfg)
    val_loader = DataLoader(ImageCaptionDataset(val_items, resolution, seed=cfg.seed, resize=resize), batch_size=cfg.batch_size,
                            collate_fn=caption_collate, generator=torch.Generator().manual_seed(cfg.seed))
    o = cfg.optim
    opt_ae = adamw(ae.parameters(), o)
    lr_scheduler = lr_schedule(opt_ae, o, cfg.max_steps)
    if disc is not None:
        opt_disc = adamw(disc.parameters(), o, lr=cfg.disc_lr)
        ae, disc, opt_ae, opt_disc, loader, val_loader = accelerator.prepare(
            ae, disc, opt_ae, opt_disc, loader, val_loader)
        raw_disc = accelerator.unwrap_model(disc)
    else:
        ae, opt_ae, loader, val_loader = accelerator.prepare(ae, opt_ae, loader, val_loader)
    raw_ae = accelerator.unwrap_model(ae)
    last_layer = raw_ae.decoder.conv_out.weight
    run.resume(args.resume, lr_scheduler, model=raw_ae)
    if run.step == 0 and val_items:
        score = evaluate(accelerator, raw_ae, val_loader)
        run.say(f"held-out PSNR before training: {score:.2f} dB")
        if run.main_process:
            append_jsonl(run.log_path, {"step": 0, "psnr": score})

    # -- the loop ---------------------------------------------------------------------------------
    models = (ae, disc) if disc is not None else (ae,)
    data = run.start_loop(loader)
    while run.step < cfg.max_steps:
        gan_on = disc is not None and run.step >= cfg.disc_start
        parts = []
        for _ in range(o.grad_accum):
            batch = next(data)
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
        run.step_done(lr_scheduler)

        if run.log_due():
            means = accelerator.reduce(torch.stack(parts).mean(0), "mean").tolist()
            record = run.log_record(dict(zip(("loss", "nll", "kl", "g_loss", "d_loss", "d_weight"), means)),
                                    lr_scheduler)
            if val_items and ((cfg.eval_every and run.step % cfg.eval_every == 0) or run.step == cfg.max_steps):
                record["psnr"] = evaluate(accelerator, raw_ae, val_loader)
            run.write_log(record, loss=f"{record['loss']:.1f}",
                          **({"psnr": f"{record['psnr']:.2f}"} if "psnr" in record else {}))
        run.checkpoint_if_due()

    # -- export: first_stage_model.* and the AutoencoderConfig (with a fitted scale_factor) ---------
    sd = run.final_weights(ae, model=raw_ae)
    if run.main_process:
        vae_cfg = cfg.model
        if cfg.fit_scale_factor:
            vae_cfg = replace(vae_cfg, scale_factor=fit_scale_factor(raw_ae, dataset, cfg.seed))
        save_autoencoder(sd, vae_cfg, run.export)
        run.exported(f"scale_factor {vae_cfg.scale_factor:.5f}, ", scale_factor=vae_cfg.scale_factor)
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
