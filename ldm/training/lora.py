"""LoRA training (Hu et al. 2021): low-rank matrices beside chosen Linear/Conv2d layers of a frozen
model, held in their own module whose state dict *is* the file kohya's sd-scripts writes:
`lora_unet_<diffusers module path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
`lora_te_<text_model path with _>...`, which A1111, diffusers' load_lora_weights and ldm load.
The base weights are never touched: each layer adds scale · up(down(x)) to its module's output
through a forward hook (kohya's forward replacement), so the hooked model is exactly the model
being trained, and `remove()` gives the base model back."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..formats.diffusers_keys import _rename, _unet_prefixes
from ..formats.files import write_safetensors


class LoraLayer(nn.Module):
    """down (rank × in, or a rank-channel conv of the base's kernel) then up (out × rank, 1×1)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d) and base.groups == 1 and base.dilation == (1, 1):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise ValueError(f"LoRA targets Linear and plain Conv2d layers, not {type(base).__name__}: "
                             f"name those inside it (e.g. to_q, not attn1)")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # kohya / PEFT: the LoRA starts as a no-op
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))  # in the file: scale = alpha / rank
        self.rank = rank

    def forward(self, x):
        return self.lora_up(self.lora_down(x)) * (self.alpha / self.rank)


def _add_lora(layer: LoraLayer):
    def hook(module, args, out):
        return out + layer(args[0])
    return hook


def _matches(path: str, targets) -> bool:
    """PEFT's rule: a target names a module by its path or a suffix of it at a `.` boundary."""
    return any(path == t or path.endswith("." + t) for t in targets)


def kohya_names(model, unet_targets, text_targets) -> dict[str, nn.Module]:
    """{kohya name: module} of the UNet's and the text encoder's modules the targets name; a
    ValueError for a target that names nothing or a text encoder kohya's names cannot address."""
    out, prefixes = {}, _unet_prefixes(model.config.unet)
    for path, module in model.unet.named_modules():
        if path and _matches(path, unet_targets):
            out["lora_unet_" + (_rename(path, prefixes) or path).replace(".", "_")] = module
    n_unet = len(out)
    if text_targets:
        if model.config.text_encoder.kind != "clip":
            raise ValueError(f"text-encoder LoRA training needs a CLIP (transformers) text encoder; this model's "
                             f"is {model.config.text_encoder.kind!r} (fused q/k/v): set lora_text_targets=[]")
        for path, module in model.cond_stage_model.named_modules():
            if path.startswith("transformer.") and _matches(path, text_targets):
                # SD-compat: `transformer` is CLIPTextModel's text_model, whose path kohya names
                out["lora_te_text_model_" + path[len("transformer."):].replace(".", "_")] = module
    for part, targets, found in (("UNet", unet_targets, n_unet), ("text encoder", text_targets, len(out) - n_unet)):
        if targets and not found:
            raise ValueError(f"the LoRA targets {list(targets)} name no module of the {part} (targets are module "
                             f"names or path suffixes, e.g. to_q, attn2.to_k, q_proj)")
    return out


class LoraNetwork(nn.Module):
    """The LoRA layers of one model, registered under their kohya names (state_dict() is a kohya
    file) and hooked into the model's modules until `remove()`."""

    def __init__(self, model, rank: int, alpha: float, unet_targets=("to_q", "to_k", "to_v", "to_out.0"),
                 text_targets=()):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self._handles = []
        for name, module in kohya_names(model, unet_targets, text_targets).items():
            layer = LoraLayer(module, rank, alpha)
            w = next(module.parameters())
            self.add_module(name, layer.to(w.device, w.dtype))
            self._handles.append(module.register_forward_hook(_add_lora(layer)))

    def remove(self) -> None:
        """Unhook every layer: the model computes its base function again."""
        for h in self._handles:
            h.remove()
        self._handles = []


def save_lora(sd: dict[str, torch.Tensor], path, rank: int, alpha: float, base: str = "") -> None:
    """A LoraNetwork's state dict (or EMA weights in its names) as a kohya .safetensors, written
    atomically; the ss_* metadata is what sd-scripts writes and A1111 shows."""
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
            "ss_sd_model_name": base, "ss_training_comment": "ldm train_ldm.py --lora-rank"}
    write_safetensors({k: v.float() for k, v in sd.items()}, path, meta)
