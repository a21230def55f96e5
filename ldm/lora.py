"""LoRA files as users have them, merged into our weights (CompVis names) and taken out again exactly.

Formats read (.safetensors):
- kohya / A1111: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`, `lora_te_<module>...`;
  <module> is the diffusers module path with `_` (sd-scripts names modules as diffusers does), or the
  original (`input_blocks_1_1_...`) path some tools write; conv LoRA (k×k down, 1×1 up) included.
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<module>...`, alpha
  from the file's `lora_adapter_metadata` (diffusers' save_lora_weights) or `.alpha` tensors, else the
  rank; the older diffusers `<module>.lora.down.weight` / `.up.weight` (and `processor.to_q_lora.*`).
Scale of a module = multiplier · alpha / rank. W += scale · up @ down, computed in float32 from the
base weights kept aside on first touch, so unloading restores them bit for bit and any set of loaded
LoRAs is always base + Σ (never an accumulation of rounding). Or, with merge=False, unmerged as a side
path: a forward hook adds scale · up(down(x)) to the module's output (the weights untouched; the
form LoRAs train in, ldm/training/lora.py)."""
from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .formats.diffusers_keys import _unet_prefixes, _rename
from .formats.files import read_state_dict, sha256_of
from .formats.keys import TEXT, UNET

_OTHER_ARCH = (("lora_te1_", "lora_te2_", "text_encoder_2.", "te1.", "te2."), "SDXL (two text encoders)")
_UNSUPPORTED = {r"\.hada_w1": "LoHa", r"\.lokr_w1": "LoKr", r"\.dora_scale$": "DoRA",
                r"lora_magnitude_vector": "DoRA", r"\.diff(_b)?$": "full-weight diff", r"\.(ia3_l|weight_ia3)": "IA³",
                r"\.oft_(blocks|diag)": "OFT"}
# OpenCLIP (SD2) text tower names of the HF CLIPTextModel modules LoRA files address
_OC_LAYER = {"mlp_fc1": "mlp.c_fc", "mlp_fc2": "mlp.c_proj", "self_attn_out_proj": "attn.out_proj"}
_QKV = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj")


@dataclass
class Module:
    """One LoRA'd module of a file: its name (part, `_`-joined path), the two matrices and alpha."""
    part: str                      # "unet" or "te"
    path: str                      # module path with "_" (e.g. down_blocks_0_attentions_0_proj_in)
    source: str                    # the file's key stem, for messages
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


@dataclass
class LoraFile:
    path: Path
    modules: list[Module]
    sha256: str


@dataclass
class Patch:
    key: str                       # our parameter name
    rows: slice | None             # rows of a fused weight (OpenCLIP's q/k/v in_proj)
    up: torch.Tensor
    down: torch.Tensor
    scale: float                   # multiplier · alpha / rank

    def delta(self, shape: torch.Size) -> torch.Tensor:
        d = self.up.float().flatten(1) @ self.down.float().flatten(1)      # (out, in·kh·kw)
        return (self.scale * d).reshape(shape)

    def side_path(self, module: nn.Module):
        """A forward hook adding scale · up(down(x)) to `module`'s output, in its dtype and device."""
        w = module.weight
        up, down = (t.to(w.device, w.dtype) for t in (self.up, self.down))
        if isinstance(module, nn.Conv2d):
            down, up = down.reshape(down.shape[0], *w.shape[1:]), up.reshape(*up.shape[:2], 1, 1)
            def lora(x):                                                    # (B, out, H', W')
                return F.conv2d(F.conv2d(x, down, None, module.stride, module.padding, module.dilation), up)
        else:
            down, up = down.flatten(1), up.flatten(1)
            def lora(x):                                                    # (..., out)
                return F.linear(F.linear(x, down), up)
        return lambda m, args, out: out + self.scale * lora(args[0])


def _first(xs: list[str], n: int = 3) -> str:
    return ", ".join(xs[:n]) + (f" (+{len(xs) - n} more)" if len(xs) > n else "")


def _peft_alphas(meta: dict) -> dict[str, float]:
    """{"unet": α, "te": α} from diffusers' `lora_adapter_metadata` (keys "unet.lora_alpha", ...)."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        m = json.loads(raw)
    except ValueError:
        return {}
    out = {}
    for prefix, part in (("unet", "unet"), ("text_encoder", "te")):
        if m.get(f"{prefix}.alpha_pattern") or m.get(f"{prefix}.rank_pattern"):
            raise ValueError(f"LoRA with per-module alpha_pattern/rank_pattern ({prefix}) is not supported")
        if m.get(f"{prefix}.lora_alpha") is not None:
            out[part] = float(m[f"{prefix}.lora_alpha"])
    return out


_KOHYA = re.compile(r"^(lora_unet_|lora_te_)(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^(?:(unet|text_encoder)\.)?(.+?)(?:\.(lora_A|lora_B)(?:\.default)?\.weight"
                   r"|[._]lora(?:_linear_layer)?\.(down|up)\.weight|\.(alpha))$")


def parse(sd: dict, meta: dict, where: str) -> list[Module]:
    """The LoRA'd modules of a state dict, in either format; ValueError for anything else."""
    keys = list(sd)
    if not keys:
        raise ValueError(f"{where} holds no tensors: not a LoRA file")
    other = [k for k in keys if k.startswith(_OTHER_ARCH[0])]
    if other:
        raise ValueError(f"{where}: this LoRA is for another architecture ({_OTHER_ARCH[1]}: keys "
                         f"{_first(other)}); this model has one text encoder (SD1/SD2)")
    for mark, kind in _UNSUPPORTED.items():
        if any(re.search(mark, k) for k in keys):
            raise ValueError(f"{where} is a {kind} file (LyCORIS/other adapter keys): only plain LoRA "
                             f"(down/up or lora_A/lora_B matrices) is supported")
    alphas = _peft_alphas(meta)
    mods: dict[tuple[str, str], Module] = {}
    unknown = []
    for k in keys:
        if m := _KOHYA.match(k):
            part, path, what = ("unet" if m[1] == "lora_unet_" else "te"), m[2], m[3]
        elif m := _PEFT.match(k.removeprefix("base_model.model.")):
            part = "te" if m[1] == "text_encoder" else "unet"
            what = ("lora_down.weight" if (m[3] == "lora_A" or m[4] == "down") else
                    "lora_up.weight" if (m[3] == "lora_B" or m[4] == "up") else "alpha")
            path = re.sub(r"\.processor\.(to_q|to_k|to_v|to_out)$",
                          lambda g: "." + g[1] + (".0" if g[1] == "to_out" else ""), m[2])
            path = path.replace(".", "_")
        else:
            unknown.append(k)
            continue
        if part == "te":
            path = path.removeprefix("text_model_")
        mod = mods.setdefault((part, path), Module(part, path, k.rsplit(".", 2)[0]))
        v = sd[k]
        if what == "alpha":
            mod.alpha = float(v.float().item()) if v.numel() == 1 else math.nan
        elif what == "lora_down.weight":
            mod.down = v
        else:
            mod.up = v
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} keys are not LoRA keys of a known format "
                         f"(kohya lora_unet_/lora_te_ ... lora_down/lora_up/alpha, or diffusers/PEFT "
                         f"unet./text_encoder. ... lora_A/lora_B): {_first(unknown)}")
    for mod in mods.values():
        if mod.down is None or mod.up is None:
            raise ValueError(f"{where}: {mod.source} has no {'lora_down/lora_A' if mod.down is None else 'lora_up/lora_B'} "
                             f"matrix (truncated or not a LoRA file)")
        if mod.down.dim() not in (2, 4) or mod.up.dim() != mod.down.dim() or mod.up.shape[1] != mod.down.shape[0]:
            raise ValueError(f"{where}: {mod.source}: down {tuple(mod.down.shape)} and up "
                             f"{tuple(mod.up.shape)} are not a LoRA pair")
        if mod.up.dim() == 4 and tuple(mod.up.shape[2:]) != (1, 1):
            raise ValueError(f"{where}: {mod.source}: a conv LoRA's up matrix must be 1×1, got {tuple(mod.up.shape)}")
        if mod.alpha is None:
            mod.alpha = alphas.get(mod.part)
        if mod.alpha is not None and not math.isfinite(mod.alpha):
            raise ValueError(f"{where}: {mod.source}.alpha is not a finite number")
        if not (torch.isfinite(mod.down).all() and torch.isfinite(mod.up).all()):
            raise ValueError(f"{where}: {mod.source} holds NaN or inf values (a corrupt file?)")
    return list(mods.values())


def read(path: str | Path) -> LoraFile:
    """Read and parse a LoRA file (no model needed): errors for unreadable files and other formats."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are read as .safetensors (convert a .pt/.ckpt LoRA first)")
    sd, meta = read_state_dict(path)
    return LoraFile(path, parse(sd, meta, str(path)), sha256_of(path, after_header=True))


def targets(model) -> dict[tuple[str, str], tuple[str, slice | None]]:
    """(part, module path with `_`) -> (our parameter, rows) for every weight a LoRA may address:
    the UNet by its diffusers path and by its original path, the text encoder by transformers'
    CLIPTextModel path (without `text_model.`), mapped onto OpenCLIP's names for SD2."""
    out = {}
    prefixes = _unet_prefixes(model.config.unet)
    for name, p in model.unet.named_parameters():
        if not name.endswith(".weight") or p.dim() < 2:
            continue
        module = name[:-len(".weight")]
        ours = (UNET + name, None)
        out[("unet", module.replace(".", "_"))] = ours
        if (theirs := _rename(module, prefixes)) is not None:
            out[("unet", theirs.replace(".", "_"))] = ours
    te = getattr(model, "cond_stage_model", None) or torch.nn.Module()      # image-variation models: none
    for name, p in te.named_parameters():
        if p.dim() < 2:
            continue
        if name.startswith("transformer.") and name.endswith(".weight"):          # CLIPTextModel
            out[("te", name[len("transformer."):-len(".weight")].replace(".", "_"))] = (TEXT + name, None)
        elif m := re.fullmatch(r"model\.transformer\.resblocks\.(\d+)\.(.+)", name):   # OpenCLIP
            i, rest = m[1], m[2]
            if rest == "attn.in_proj_weight":
                d = p.shape[1]
                for j, q in enumerate(_QKV):
                    out[("te", f"encoder_layers_{i}_{q}")] = (TEXT + name, slice(j * d, (j + 1) * d))
            for hf, oc in _OC_LAYER.items():
                if rest == oc + ".weight":
                    out[("te", f"encoder_layers_{i}_{hf}")] = (TEXT + name, None)
    return out


def patches(model, lora: LoraFile, scale: float) -> list[Patch]:
    """The file's modules placed on our parameters, every shape checked; nothing is changed."""
    table, params = targets(model), dict(model.named_parameters())
    unmatched = [m.source for m in lora.modules if (m.part, m.path) not in table]
    if unmatched:
        raise ValueError(f"{lora.path}: {len(unmatched)} of {len(lora.modules)} LoRA modules match nothing "
                         f"in this model: {_first(unmatched)}. Is it a LoRA for another model family?")
    out, bad = [], []
    for m in lora.modules:
        key, rows = table[(m.part, m.path)]
        w = params[key]
        shape = w[rows].shape if rows is not None else w.shape
        rank = m.down.shape[0]
        fits = (m.up.shape[0] == shape[0] and m.down[0].numel() == math.prod(shape[1:])
                and (w.dim() == m.down.dim() or m.down[0].numel() == m.down.shape[1]))
        if not fits:
            bad.append(f"{m.source}: up {tuple(m.up.shape)} · down {tuple(m.down.shape)} vs {tuple(shape)}")
            continue
        alpha = m.alpha if m.alpha is not None else rank
        out.append(Patch(key, rows, m.up, m.down, float(scale) * alpha / rank))
    if bad:
        raise ValueError(f"{lora.path}: this LoRA is for another architecture (shapes that don't fit "
                         f"this model: {_first(bad, 2)})")
    return out


@dataclass
class Loaded:
    path: Path
    scale: float
    sha256: str
    patches: list[Patch]
    hooks: list = field(default_factory=list)  # merge=False: the side paths' hook handles


def _side_modules(model, ps: list[Patch], where) -> list[nn.Module]:
    """The Linear/Conv2d module of each patch, or a ValueError for weights no module call reads
    (OpenCLIP's fused q/k/v and out_proj are used by nn.MultiheadAttention directly)."""
    out, bad = [], []
    for p in ps:
        fused = p.rows is not None or ".attn.out_proj." in p.key
        module = None if fused else model.get_submodule(p.key.removesuffix(".weight"))
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            bad.append(p.key)
        out.append(module)
    if bad:
        raise ValueError(f"{where}: merge=False cannot add a side path to {_first(bad, 2)} (a fused "
                         f"attention weight): load this LoRA merged (merge=True)")
    return out


@dataclass
class LoraSet:
    """The LoRAs merged into one model, and the base weights they touched (kept as they were)."""
    loaded: dict[str, Loaded] = field(default_factory=dict)
    base: dict[str, torch.Tensor] = field(default_factory=dict)

    def load(self, model, path: str | Path, scale: float = 1.0, name: str | None = None, merge: bool = True) -> str:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
        path = Path(path)
        name = path.stem if name is None else str(name)
        if name in self.loaded:
            raise ValueError(f"a LoRA named {name!r} is already loaded; unload_lora({name!r}) first "
                             f"or pass another name")
        lora = read(path)
        ps = patches(model, lora, scale)
        if not merge:
            modules = _side_modules(model, ps, path)
            hooks = [m.register_forward_hook(p.side_path(m)) for p, m in zip(ps, modules)]
            self.loaded[name] = Loaded(path, float(scale), lora.sha256, ps, hooks)
            return name
        self.loaded[name] = Loaded(path, float(scale), lora.sha256, ps)
        self._apply(model, {p.key for p in ps})
        return name

    def unload(self, model, name: str | None = None) -> None:
        if name is not None and name not in self.loaded:
            raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {sorted(self.loaded) or 'none'})")
        gone = list(self.loaded) if name is None else [name]
        keys = {p.key for n in gone if not self.loaded[n].hooks for p in self.loaded[n].patches}
        for n in gone:
            for h in self.loaded.pop(n).hooks:
                h.remove()
        self._apply(model, keys)

    @torch.no_grad()
    def _apply(self, model, keys: set[str]) -> None:
        """Set each parameter in `keys` to its base weight + Σ of the loaded LoRAs' deltas (float32,
        then the model's dtype); a parameter no LoRA touches any more gets its base weight back."""
        params = dict(model.named_parameters())
        for key in sorted(keys):
            w = params[key]
            if key not in self.base:
                self.base[key] = w.detach().clone()
            base = self.base[key]
            mine = [p for lo in self.loaded.values() if not lo.hooks for p in lo.patches if p.key == key]
            if not mine:
                w.copy_(self.base.pop(key))
                continue
            new = base.to(w.device, torch.float32)       # a copy unless base already is float32 there
            new = new.clone() if new.data_ptr() == base.data_ptr() else new
            for p in mine:
                view = new[p.rows] if p.rows is not None else new
                view += p.delta(view.shape).to(w.device)
            w.copy_(new.to(w.dtype))

    def records(self) -> dict[str, tuple[str, float, str]]:
        return {n: (str(lo.path), lo.scale, lo.sha256[:12]) for n, lo in self.loaded.items()}
