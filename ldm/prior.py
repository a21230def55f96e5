"""The diffusion prior of unCLIP (Ramesh et al. 2022, §2.1; Karlo's, as diffusers'
`StableUnCLIPPipeline` runs it): the prompt's CLIP text embedding and hidden states condition a
transformer that denoises a CLIP image embedding, predicting it directly ("sample"), sampled by
DDPM with classifier-free guidance against the encoding of "" (with its attention mask), then
un-normalised by the stored clip_mean/clip_std."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import PriorTransformer
from torch import nn

from . import text
from .config import ScheduleConfig, TextEncoderConfig, from_dict
from .image_config import PriorConfig
from .schedule import alphas_cumprod

PRIOR_STEPS, PRIOR_GUIDANCE_SCALE = 25, 4.0        # diffusers' StableUnCLIPPipeline defaults


def prior_transformer(p) -> PriorTransformer:
    return PriorTransformer(num_attention_heads=p.num_attention_heads, attention_head_dim=p.attention_head_dim,
                            num_layers=p.num_layers, embedding_dim=p.embedding_dim, num_embeddings=p.num_embeddings,
                            additional_embeddings=p.additional_embeddings)


class DiffusionPrior(nn.Module):
    """`transformer` (diffusers' PriorTransformer) and its text encoder: a CLIPTextModelWithProjection of
    its own (`text_encoder`, Karlo's), or, with `shared_text`, the decoder's own text encoder read
    through a learned `text_projection` of its pooled (end-token) state (the default model's prior:
    ldm.pipeline.DEFAULT_PRIOR, a file beside the model, `attach`)."""

    def __init__(self, prior: PriorConfig, schedule: ScheduleConfig, text_cfg: TextEncoderConfig,
                 shared_text: nn.Module | None = None):
        super().__init__()
        self.config, self.text_cfg, self.schedule = prior, text_cfg, schedule
        self.transformer = prior_transformer(prior)
        self.tokenizer = text.Tokenizer(text_cfg.max_length, text_cfg.pad_with)
        if shared_text is None:
            from transformers import CLIPTextModelWithProjection
            self.text_encoder = CLIPTextModelWithProjection(text.hf_config_of(text_cfg))
        else:
            if text_cfg.hidden_size != prior.embedding_dim or text_cfg.max_length != prior.num_embeddings:
                raise ValueError(f"a prior on the decoder's text encoder needs embedding_dim = its hidden_size "
                                 f"({text_cfg.hidden_size}) and num_embeddings = its max_length ({text_cfg.max_length})")
            self.shared_text = [shared_text]           # a list: not a submodule, so not in this state dict
            self.text_projection = nn.Linear(text_cfg.hidden_size, prior.embedding_dim, bias=False)

    @classmethod
    def of_model(cls, cfg) -> "DiffusionPrior":
        """The prior of an LDMConfig with prior / prior_text_encoder / prior_schedule (Stable unCLIP)."""
        return cls(cfg.prior, cfg.prior_schedule, cfg.prior_text_encoder)

    def encode(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text embeds (B, D), hidden states (B, L, D), attention mask (B, L) bool: start, words, end)."""
        ids = self.tokenizer(prompts).to(device)                                        # (B, L)
        L = ids.shape[1]
        lengths = torch.tensor([min(len(self.tokenizer.encode(p)) + 2, L) for p in prompts])
        mask = (torch.arange(L)[None] < lengths[:, None]).to(device)
        if not hasattr(self, "shared_text"):
            out = self.text_encoder(ids)
            return out.text_embeds, out.last_hidden_state, mask
        hidden = self.shared_text[0](ids).to(self.text_projection.weight.dtype)        # (B, L, D)
        pooled = hidden[torch.arange(len(ids), device=ids.device), lengths.to(ids.device) - 1]   # the end token
        return self.text_projection(pooled), hidden, mask

    def _ddpm_step(self, x0: torch.Tensor, x: torch.Tensor, t: int, prev: int, ac: torch.Tensor, generator):
        """DDPMScheduler.step for prediction_type "sample": x0 clipped, the posterior mean, then (t > 0)
        β̃ noise drawn from the generator."""
        s = self.schedule
        if s.clip_sample:
            x0 = x0.clamp(-s.clip_sample_range, s.clip_sample_range)
        a_t, a_prev = ac[t], ac[prev] if prev >= 0 else torch.tensor(1.0)
        alpha, beta_t = a_t / a_prev, 1 - a_t / a_prev
        mean = (a_prev ** 0.5 * beta_t / (1 - a_t)) * x0 + (alpha ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        if t == 0:
            return mean
        noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        var = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
        if s.variance_type == "fixed_large":
            var = beta_t
        return mean + var ** 0.5 * noise

    @torch.no_grad()
    def sample(self, prompts: list[str], steps: int, guidance_scale: float, generator: torch.Generator,
               device) -> torch.Tensor:
        """One image embedding (B, D) per prompt. Draws: the initial embedding, then one noise per step with t > 0."""
        embeds, hidden, mask = self.encode(prompts, device)
        guided = guidance_scale > 1
        if guided:
            e0, h0, m0 = self.encode([""], device)
            n = len(prompts)
            embeds, hidden = torch.cat([e0.expand(n, -1), embeds]), torch.cat([h0.expand(n, -1, -1), hidden])
            mask = torch.cat([m0.expand(n, -1), mask])
        dtype = self.transformer.dtype
        x = torch.randn((len(prompts), self.config.embedding_dim), generator=generator, device=generator.device,
                        dtype=dtype).to(device)
        T, ac = self.schedule.num_train_timesteps, alphas_cumprod(self.schedule).float()
        ratio = T // steps                                 # "leading" spacing, as DDPMScheduler.set_timesteps
        ts = [int(i * ratio) + self.schedule.steps_offset for i in reversed(range(steps))]
        for t in ts:
            x_in = torch.cat([x, x]) if guided else x
            out = self.transformer(x_in, timestep=t, proj_embedding=embeds.to(dtype),
                                   encoder_hidden_states=hidden.to(dtype), attention_mask=mask).predicted_image_embedding
            if guided:
                uncond, cond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            x = self._ddpm_step(out, x, t, t - ratio, ac, generator)
        return self.transformer.post_process_latents(x)


# -- a prior beside a text-to-image model with an image adapter (the default model's) ----------------

def save(prior: DiffusionPrior, path, state_dict: dict | None = None) -> Path:
    """A shared-text prior as one safetensors file: its transformer, text projection and clip_mean/std,
    with its configs (and the text encoder's it reads, checked by `attach`) in the metadata."""
    from .formats.files import write_safetensors
    sd = {k: v.detach().contiguous().cpu() for k, v in (state_dict or prior.state_dict()).items()}
    meta = {"prior": asdict(prior.config), "schedule": asdict(prior.schedule), "text_encoder": asdict(prior.text_cfg)}
    write_safetensors(sd, path, {"ldm_prior_config": json.dumps(meta)})
    return Path(path)


def load(path, text_encoder: nn.Module, text_cfg: TextEncoderConfig) -> DiffusionPrior:
    """The prior file at `path` on `text_encoder` (the decoder's, whose config must be the one it was trained on)."""
    from .formats.files import read_tagged
    tensors, raw = read_tagged(path, "ldm_prior_config", "prior",
                               "train one with `python train_unclip.py --set part=prior`")
    if from_dict(TextEncoderConfig, raw["text_encoder"]) != text_cfg:
        raise ValueError(f"{path}: this prior reads another text encoder than the model's: it was trained for "
                         f"another model")
    prior = DiffusionPrior(from_dict(PriorConfig, raw["prior"]), from_dict(ScheduleConfig, raw["schedule"]),
                           text_cfg, shared_text=text_encoder)
    prior.load_state_dict(tensors, strict=True)
    return prior.eval().requires_grad_(False)


def check_takes_a_prior(cfg) -> None:
    """A prior file attaches only to a text-to-image model with an image adapter."""
    if cfg.image_embedding != "context" or cfg.image_adapter is None or cfg.text_encoder is None:
        raise ValueError("a prior attaches to a text-to-image model with an image adapter (one that draws "
                         "variations, as the default model); a Stable unCLIP model carries its prior inside")


def attach(pipe, prior: DiffusionPrior | str | Path) -> DiffusionPrior:
    """Give a text-to-image model that draws variations (an image adapter) a prior, for
    `pipe(prompt, use_prior=True)`: text -> prior -> CLIP image embedding -> adapter -> context."""
    cfg = pipe.config
    check_takes_a_prior(cfg)
    if not isinstance(prior, DiffusionPrior):
        prior = load(prior, pipe.model.cond_stage_model, cfg.text_encoder)
    if prior.config.embedding_dim != cfg.image_encoder.projection_dim:
        raise ValueError(f"the prior draws {prior.config.embedding_dim}-d embeddings, the model's adapter reads "
                         f"{cfg.image_encoder.projection_dim}-d ones: it was trained for another model")
    pipe.prior = prior.to(pipe.device).eval().requires_grad_(False)
    return pipe.prior
