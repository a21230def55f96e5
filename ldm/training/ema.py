"""Exponential moving average of a module's trainable parameters, as CompVis `LitEma`: the decay is
warmed up with the update count, min(decay, (1 + n) / (10 + n)), so early averages are not stuck at
the initial weights. `state_dict`/`load_state_dict` let Accelerate checkpoint it."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.num_updates = decay, 0
        # fp32 shadow: a bf16/fp16 average would stop moving once updates fall below its precision
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, p in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for name, p in module.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])

    @contextmanager
    def swapped_in(self, module: nn.Module):
        """Run with the EMA weights in `module`, then put the trained weights back."""
        saved = {n: p.detach().clone() for n, p in module.named_parameters() if n in self.shadow}
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, p in module.named_parameters():
                    if name in saved:
                        p.copy_(saved[name])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model: {len(missing)} differing names, "
                             f"e.g. {sorted(missing)[:3]}")
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.shadow = {k: v.float().to(self.shadow[k].device) for k, v in state["shadow"].items()}
