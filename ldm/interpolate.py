"""Walks between two drawings (DALL·E 2 §3.2's interpolations): frame s ∈ [0, 1] starts from the
slerp of the two seeds' noises and is conditioned on the interpolated conditions: CLIP image
embeddings slerped, text contexts lerped. Everything each end draws from its generator (the unCLIP
embedding noise, then the start noise) is drawn as the plain call draws it, so the first and last
frames are the plain calls' images bit for bit; a frame's sampler goes on from the nearer end's
generator. The `ldm interpolate` command is ldm/interpolate_cli.py."""
from __future__ import annotations

import torch

from .request import check_request
from .unclip import Condition, embedding_condition

OPTIONS = ("negative_prompt", "steps", "guidance_scale", "height", "width", "sampler", "eta", "karras",
           "guidance_rescale", "regions", "regions_from_t", "noise_level", "prompt_syntax")


def slerp(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """Spherical interpolation row by row (over all but the first dim); a at s = 0 and b at s = 1 exactly."""
    if s == 0 or s == 1:
        return (a if s == 0 else b).clone()
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-12)
    theta = cos.clamp(-1, 1).acos()[:, None]                                    # (B, 1)
    far = theta.squeeze(1) > 1e-4                                               # else: lerp (parallel rows)
    sin = theta.sin().clamp_min(1e-12)
    out = torch.where(far[:, None], ((1 - s) * theta).sin() / sin * fa + (s * theta).sin() / sin * fb,
                      (1 - s) * fa + s * fb)
    return out.reshape(a.shape).to(a.dtype)


def lerp(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return (a if s == 0 else b if s == 1 else (1 - s) * a + s * b).clone()


def _end(pipe, prompt, image, seed: int, kw: dict):
    """One end: (request, generator state after its draws, start noise, Condition), drawn as __call__ draws."""
    req = check_request(pipe, prompt, kw.get("negative_prompt"), kw.get("steps"), kw.get("guidance_scale"),
                        kw.get("height"), kw.get("width"), seed, None, kw.get("sampler"), kw.get("eta", 0.0),
                        kw.get("karras"), 1, "pil", kw.get("guidance_rescale", 0.0), kw.get("regions", "auto"),
                        kw.get("regions_from_t"), (), image, None, None, kw.get("noise_level"), None,
                        kw.get("prompt_syntax", "plain"))
    generator = torch.Generator("cpu").manual_seed(req.seed)
    emb = embedding_condition(pipe, req, generator)
    noise = torch.randn(req.latent_shape, generator=generator, dtype=torch.float32)
    cond = Condition(context=emb.context if emb else None, vector=emb.vector if emb else None)
    if pipe.config.text_encoder is not None:          # the prompt's context and its null, as denoiser encodes them
        syntax = req.prompt_syntax
        null = pipe.encode_prompt(req.negatives, syntax) if req.guidance_scale != 1 else None
        cond = Condition(context=pipe.encode_prompt(req.prompts, syntax), vector=cond.vector, null_context=null)
    return req, generator.get_state(), noise, cond


def _mix(a: Condition, b: Condition, s: float) -> Condition:
    """Text contexts lerped, CLIP embeddings slerped (unCLIP: the embedding half of the vector; its
    noise-level half is the same at both ends)."""
    def part(x, y, fn):
        return None if x is None else fn(x, y, s)
    vector = None
    if a.vector is not None:
        d = a.vector.shape[1] // 2
        vector = torch.cat([slerp(a.vector[:, :d], b.vector[:, :d], s), lerp(a.vector[:, d:], b.vector[:, d:], s)], 1)
    context_fn = lerp if a.null_context is not None or a.vector is not None else slerp
    return Condition(context=part(a.context, b.context, context_fn), vector=vector,
                     null_context=part(a.null_context, b.null_context, lerp))


@torch.no_grad()
def interpolate(pipe, prompts=None, seeds=(0, 1), frames: int = 8, images=None, **kwargs) -> list:
    """`frames` PIL images from (prompts[0] or images[0], seeds[0]) to (prompts[1] or images[1], seeds[1]).
    kwargs: the drawing settings of Pipeline.__call__ (OPTIONS), the same for every frame."""
    unknown = sorted(set(kwargs) - set(OPTIONS))
    if unknown:
        raise TypeError(f"interpolate() takes no {', '.join(unknown)}; settings: {', '.join(OPTIONS)}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"frames must be an integer >= 2 (the two ends included), got {frames!r}")
    if not isinstance(seeds, (list, tuple)) or len(seeds) != 2:
        raise ValueError(f"seeds must be two seeds (one per end), got {seeds!r}")
    ends = [None, None]
    for name, value in (("prompts", prompts), ("images", images)):
        if value is not None and (not isinstance(value, (list, tuple)) or len(value) != 2):
            raise ValueError(f"{name} must be a list of two (one per end), got {value!r}")
    if images is None and prompts is None:
        raise ValueError("pass prompts=[a, b] (or images=[a, b] for an image-variation / unCLIP model)")
    pairs = [((prompts or (None, None))[i], (images or (None, None))[i]) for i in range(2)]
    ends = [_end(pipe, p, im, seed, kwargs) for (p, im), seed in zip(pairs, seeds)]   # checks both before work
    out = []
    for k in range(frames):
        s = k / (frames - 1)
        req, state, _, _ = ends[0] if s <= 0.5 else ends[1]
        generator = torch.Generator("cpu")
        generator.set_state(state)
        noise = slerp(ends[0][2], ends[1][2], s)
        out += pipe._draw(req, generator, noise, condition=_mix(ends[0][3], ends[1][3], s))
    return out
