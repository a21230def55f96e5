"""The diffusion prior of unCLIP (Ramesh et al. 2022, §2.1; Karlo's, as diffusers'
`StableUnCLIPPipeline` runs it): the prompt's CLIP text embedding and hidden states condition a
transformer that denoises a CLIP image embedding, predicting it directly ("sample"), sampled by
DDPM with classifier-free guidance against the encoding of "" (with its attention mask), then
un-normalised by the stored clip_mean/clip_std."""
from __future__ import annotations

import torch
from diffusers import PriorTransformer
from torch import nn
from transformers import CLIPTextModelWithProjection

from . import text
from .schedule import alphas_cumprod

PRIOR_STEPS, PRIOR_GUIDANCE_SCALE = 25, 4.0        # diffusers' StableUnCLIPPipeline defaults


def prior_transformer(p) -> PriorTransformer:
    return PriorTransformer(num_attention_heads=p.num_attention_heads, attention_head_dim=p.attention_head_dim,
                            num_layers=p.num_layers, embedding_dim=p.embedding_dim, num_embeddings=p.num_embeddings,
                            additional_embeddings=p.additional_embeddings)


class DiffusionPrior(nn.Module):
    """`transformer` (diffusers' PriorTransformer) and `text_encoder` (CLIPTextModelWithProjection)."""

    def __init__(self, cfg):
        super().__init__()
        self.config, self.text_cfg, self.schedule = cfg.prior, cfg.prior_text_encoder, cfg.prior_schedule
        self.transformer = prior_transformer(cfg.prior)
        self.text_encoder = CLIPTextModelWithProjection(text.hf_config_of(self.text_cfg))
        self.tokenizer = text.Tokenizer(self.text_cfg.max_length, self.text_cfg.pad_with)

    def encode(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text embeds (B, D), hidden states (B, L, D), attention mask (B, L) bool: start, words, end)."""
        ids = self.tokenizer(prompts)                                                   # (B, L)
        L = ids.shape[1]
        lengths = torch.tensor([min(len(self.tokenizer.encode(p)) + 2, L) for p in prompts])
        mask = torch.arange(L)[None] < lengths[:, None]
        out = self.text_encoder(ids.to(device))
        return out.text_embeds, out.last_hidden_state, mask.to(device)

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
