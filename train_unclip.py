"""Give the default model DALL·E 2's image conditioning with the shape world's CLIP (`python -m
ldm.shapes.clip`): its own variations (part=variations: what ships), or a Stable unCLIP decoder and
prior (part=decoder, part=prior: tried, measured weaker; docs/default_model.md).

    python train_unclip.py --set part=decoder                     # out/unclip_decoder/decoder.safetensors
    python train_unclip.py --set part=prior --set decoder=out/unclip_decoder/decoder.safetensors
    python train_unclip.py --set part=prior --set out_dir=out/prior     # the default model's prior file
    python train_unclip.py --set part=variations --set out_dir=out/variations   # the default model + variations
    (fields: UnclipTrainConfig below; --set key=value or --key=value; --resume continues a run)

decoder: the default model's UNet learns to read the CLIP image embedding of the picture it denoises,
noise-augmented to a random level and given as the UNet's class vector (Stable unCLIP's
`class_embed_type: projection`, a new MLP whose last layer starts at zero, so training starts from
the text-to-image model exactly). The caption is dropped to "" half the time (DALL·E 2 §2.1: the
decoder must draw from the embedding alone for variations), the embedding to the null all-zero
vector 10% of the time. The text encoder stays frozen.
prior: Karlo's PriorTransformer learns p(image embedding | caption) by DDPM with "sample"
prediction on the normalised embedding; its text encoder is the model's own (the hidden states the
decoder reads) with a learned projection; the caption is dropped to "" `text_drop` of the time (the
prior's CFG; set 0.1). For an unCLIP decoder (decoder=) the export is the whole unCLIP model
(decoder + prior) in one ldm file; for a text model that draws variations (model=, default: the
default model) it is a prior file beside it (ldm/prior.py `attach`, `pipe(prompt, use_prior=True)`),
which shares the model's text encoder rather than copying it.
variations (what ships: the default model's own variations): the text-to-image model stays whole and
frozen; an image adapter (ldm/unclip.py ImageAdapter: an MLP, as DALL·E 2's decoder projects the
CLIP embedding into extra context tokens) learns to map the CLIP image embedding of each scene to
the text encoder's context of its canonical caption (`fit_steps` of regression, a few CPU-minutes;
no checkpoints needed), so the UNet reads a picture as it reads its caption. Its null context is
the text encoder's "", which the UNet already knows. (Training it further end to end by the
diffusion loss through the frozen UNet lowered the loss but drew fewer of the source's objects: the
loss rewards hedging toward the null context; docs/default_model.md.)
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
from ldm.image_encoder import built_image_encoder
from ldm.image_config import ImageAdapterConfig, PriorConfig
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
    part: str = "decoder"            # "decoder" | "prior" | "variations"
    model: str = ""                  # decoder / variations / prior: the text-to-image model ("" = the default model)
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
    adapter_hidden: int = 1024       # variations: the image adapter's MLP width
    fit_steps: int = 4000            # variations: regression steps (batch 256) onto the captions' contexts
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    prior: PriorConfig = field(default_factory=lambda: PriorConfig(
        num_attention_heads=4, attention_head_dim=32, num_layers=6, embedding_dim=64, num_embeddings=32))

    def __post_init__(self):
        super().__post_init__()
        require(self, "part", lambda v: v in ("decoder", "prior", "variations"), "'decoder', 'prior' or 'variations'", "")
        require(self, "n_scenes", lambda v: v >= 1, ">= 1", "")
        for name in ("text_drop", "embedding_drop", "noise_augment"):
            require(self, name, lambda v: 0 <= v <= 1, "a probability in [0, 1]", "")


# -- data ------------------------------------------------------------------------------------------

def scene_batches(n: int, seed: int, kinds, batch: int = 64):
    """The n scenes of a seed, in batches, with their captions: (scenes, captions) per batch."""
    from ldm.shapes.scenes import caption, random_scene
    rng = random.Random(seed)
    for i in range(0, n, batch):
        scenes = [random_scene(rng, kinds) for _ in range(min(batch, n - i))]
        yield scenes, [caption(s, rng) for s in scenes]


def canonical_captions(n: int, seed: int, kinds) -> list[str]:
    """One phrasing per scene, drawn with the same fixed seed for every scene: similar scenes get
    similar captions, a target a regression from the image can reach."""
    from ldm.shapes.scenes import caption
    return [caption(s, random.Random(0)) for scenes, _ in scene_batches(n, seed, kinds) for s in scenes]


def scene_data(model: LatentDiffusion, n: int, seed: int, kinds, batch: int = 64) -> dict:
    """n scenes rendered at the autoencoder network's size: latent moments (N, 2C, h, w), CLIP image
    embeddings (N, D) from the model's embedder, captions."""
    from tqdm import tqdm
    from PIL import Image
    from ldm.shapes.scenes import render
    cfg = model.config
    size = cfg.latent_size * cfg.autoencoder.downsample_factor // cfg.autoencoder.pixel_scale
    moments, embeds, captions = [], [], []
    for scenes, caps in tqdm(scene_batches(n, seed, kinds, batch), total=-(-n // batch), desc="encoding scenes",
                             unit="batch"):
        captions += caps
        pixels = [np.asarray(render(s, size), dtype=np.uint8) for s in scenes]
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            posterior = model.first_stage_model.encode(x, resample=False)
            embeds.append(built_image_encoder(model).embed([Image.fromarray(p) for p in pixels]))
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
                  unet=replace(base_cfg.unet, adm_in_channels=2 * IMAGE.projection_dim), layout_planner=None,
                  image_adapter=None)
    model = LatentDiffusion(cfg)
    sd = {k: v for k, v in sd.items() if not k.startswith("image_adapter.")}   # (the base's own variations)
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


# -- variations: the image adapter -------------------------------------------------------------------

def variation_model(base_path: str, clip_path: str, hidden: int) -> LatentDiffusion:
    """The text-to-image model at `base_path`, whole, plus the CLIP's image tower as its embedder and
    an image adapter to as many context tokens as the text encoder gives (its null: the text
    encoder's "")."""
    from ldm.shapes.clip import IMAGE, load as load_clip
    base_cfg, sd = checkpoint.load(base_path or default_model_path())
    cfg = replace(base_cfg, image_embedding="context", image_encoder=IMAGE,
                  image_adapter=ImageAdapterConfig(tokens=base_cfg.text_encoder.max_length, hidden=hidden))
    model = LatentDiffusion(cfg)
    sd = {k: v for k, v in sd.items() if not k.startswith(("embedder.", "image_adapter."))}   # replaced if there
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    new = [k for k in missing if not k.startswith(("embedder.", "image_adapter."))]
    if new or unexpected:
        raise ValueError(f"{base_path}: not the text-to-image model expected (missing {new[:3]}, unexpected {unexpected[:3]})")
    model.embedder.load_state_dict(load_clip(clip_path).image.state_dict())
    with torch.no_grad():
        model.image_adapter.null_context.copy_(model.cond_stage_model(model.cond_stage_model.tokenize([""]))[0])
    return model


def fit_to_captions(adapter: nn.Module, embeds: torch.Tensor, contexts: torch.Tensor, steps: int,
                    generator: torch.Generator, batch: int = 256) -> float:
    """Warm start: the adapter regresses `contexts` (N, L, C) from `embeds` (N, D) with inputs and targets
    standardised (folded into its first and last layers afterwards). Returns the final loss (1 = the
    mean context's)."""
    first, last = adapter.proj[0], adapter.proj[-1]
    x_mean, x_std = embeds.mean(0), embeds.std(0).clamp_min(1e-6)
    y = contexts.flatten(1)
    y_mean, y_std = y.mean(0), y.std(0).clamp_min(1e-3)
    x, y = (embeds - x_mean) / x_std, (y - y_mean) / y_std
    opt = torch.optim.AdamW(adapter.proj.parameters(), 1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps)
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=generator)
        loss = (adapter.proj(x[i]) - y[i]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():   # proj(x) = last(...first((e - m) / s)...) * ys + ym, as plain layers
        first.bias -= first.weight @ (x_mean / x_std)
        first.weight /= x_std
        last.weight *= y_std[:, None]
        last.bias.mul_(y_std).add_(y_mean)
    return loss.item()


def train_variations(cfg: UnclipTrainConfig) -> None:
    """part=variations: the adapter fitted, the whole model written (atomically) to out_dir/model.safetensors
    in the base model's dtype."""
    import sys
    model = variation_model(cfg.model, cfg.clip, cfg.adapter_hidden).eval().requires_grad_(False)
    data = cached_scene_data(cfg, model, lambda m: print(m, file=sys.stderr))
    canonical = canonical_captions(cfg.n_scenes, cfg.scene_seed, cfg.kinds)
    text = model.cond_stage_model
    with torch.no_grad():
        contexts = torch.cat([text(text.tokenize(canonical[i:i + 500])) for i in range(0, len(canonical), 500)])
    torch.manual_seed(cfg.seed)
    loss = fit_to_captions(model.image_adapter.requires_grad_(True), data["embeds"], contexts, cfg.fit_steps,
                           torch.Generator().manual_seed(cfg.seed))
    _, base = checkpoint.load(cfg.model or default_model_path())
    dtype = next(iter(base.values())).dtype
    path = Path(cfg.out_dir) / "model.safetensors"
    checkpoint.save({k: v.detach().to(dtype) for k, v in model.state_dict().items()}, model.config, path)
    print(f"adapter fitted to {len(canonical)} scenes' canonical captions (loss {loss:.3f}; 1 = the mean "
          f"context's): {path}", file=sys.stderr)


# -- the prior -------------------------------------------------------------------------------------

def with_prior(model: LatentDiffusion, prior_cfg: PriorConfig) -> LatentDiffusion:
    """The unCLIP decoder plus a prior whose text encoder is the decoder's own (projection identity)."""
    from ldm.prior import DiffusionPrior
    cfg = replace(model.config, prior=prior_cfg, prior_text_encoder=model.config.text_encoder,
                  prior_schedule=PRIOR_SCHEDULE)
    model.config = cfg
    model.prior = DiffusionPrior.of_model(cfg)
    tower = {k.replace("transformer.", "text_model.", 1): v for k, v in model.cond_stage_model.state_dict().items()}
    tower["text_projection.weight"] = torch.eye(prior_cfg.embedding_dim, cfg.text_encoder.hidden_size)
    model.prior.text_encoder.load_state_dict(tower)
    return model


def main(argv=None) -> None:
    args, overrides = parse_cli(argv, __doc__)
    cfg = from_dict(UnclipTrainConfig, read_yaml(args.config) if args.config else {})
    cfg = apply_overrides(cfg, [o.lstrip("-") for o in overrides])
    if cfg.part == "decoder":
        model = unclip_decoder(cfg.model, cfg.clip)
    elif cfg.part == "variations":
        return train_variations(cfg)
    else:                       # the prior of an unCLIP decoder, or of a text model with an image adapter
        model_cfg, sd = checkpoint.load(cfg.decoder or cfg.model or default_model_path())
        model = LatentDiffusion(model_cfg)
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        if model_cfg.image_embedding not in ("unclip", "context") or model_cfg.text_encoder is None:
            raise ValueError("part=prior needs a Stable unCLIP decoder (--set decoder=PATH, from part=decoder) or a "
                             "text-to-image model that draws variations (--set model=PATH; default: the default model)")
    model.eval().requires_grad_(False)
    beside = cfg.part == "prior" and model.config.image_embedding == "context"     # a prior file beside the model
    export = {"decoder": "decoder.safetensors", "prior": "prior.safetensors" if beside else "unclip.safetensors"}
    run = start(cfg, f"train_unclip_{cfg.part}", cfg.n_scenes, args.resume, export[cfg.part])
    accelerator, device = run.accelerator, run.accelerator.device
    data = cached_scene_data(cfg, model, run.say)
    mean, std = data["embeds"].mean(0, keepdim=True), data["embeds"].std(0, keepdim=True)

    if cfg.part == "decoder":
        model.noise_augmentor.data_mean.copy_(mean)
        model.noise_augmentor.data_std.copy_(std)
        trained = model.unet.requires_grad_(True).train()
    else:
        if beside:
            from ldm.prior import DiffusionPrior
            prior = DiffusionPrior(cfg.prior, PRIOR_SCHEDULE, model.config.text_encoder,
                                   shared_text=model.cond_stage_model)
        else:
            prior = with_prior(model, cfg.prior).prior
            prior.text_encoder.requires_grad_(False)
            prior.text_encoder.text_projection.requires_grad_(True)
        prior.transformer.clip_mean.data.copy_(mean)
        prior.transformer.clip_std.data.copy_(std)
        prior.transformer.clip_mean.requires_grad_(False)
        prior.transformer.clip_std.requires_grad_(False)
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
        if beside:
            from ldm.prior import save as save_prior
            save_prior(raw, run.export)
        else:
            checkpoint.save(model.state_dict(), model.config, run.export)
        run.exported(note=json.dumps({"part": cfg.part}))


if __name__ == "__main__":
    run_cli(main)
