"""The optimiser and learning-rate schedule every training script uses: AdamW with the OptimConfig's
settings, and a LambdaLR stepped by hand once per optimizer step (a scheduler given to
`accelerator.prepare` would step once per process)."""
from __future__ import annotations

import math

import torch


def adamw(params, optim, lr: float = 0.0) -> torch.optim.AdamW:
    """AdamW over `params` with optim's betas, weight decay and eps; lr: optim.lr unless given."""
    return torch.optim.AdamW(params, lr=lr or optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay,
                             eps=optim.eps)


def lr_factor(optim, max_steps: int):
    """LambdaLR factor at optimizer step s: linear warm-up over optim.warmup_steps, then constant
    or a cosine decay to 0 at max_steps (optim.lr_schedule)."""
    def factor(s: int) -> float:
        if s < optim.warmup_steps:
            return (s + 1) / optim.warmup_steps
        if optim.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (s - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def lr_schedule(optimizer, optim, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim, max_steps))
