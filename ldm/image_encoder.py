"""The CLIP image encoder of the DALL·E 2 family: CLIP's preprocessing (written once, equal to
transformers' `CLIPImageProcessor`) and the vision tower with its projection, images -> (B, D)
embeddings. In the model it is `embedder` (SD 2.1-unclip's name); its weights are transformers'
`CLIPVisionModelWithProjection`, and original files hold open_clip's `visual` layout, converted here."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

# torchvision and transformers are imported where used: every Pipeline imports this module, and
# their imports cost seconds of start-up that only models with an image tower should pay.

from .image_config import ImageEncoderConfig


def as_rgb_images(images, what: str = "image") -> list[Image.Image]:
    """A PIL image or a list of them, each RGB and non-empty; else a ValueError/TypeError saying what to pass."""
    items = [images] if isinstance(images, Image.Image) else images
    if not isinstance(items, (list, tuple)) or not all(isinstance(im, Image.Image) for im in items):
        raise TypeError(f"{what} must be a PIL image or a list of PIL images, got {type(images).__name__}")
    if not items:
        raise ValueError(f"{what} is an empty list: give at least one image")
    for im in items:
        if im.mode != "RGB":
            raise ValueError(f"{what} is a {im.mode} image; give an RGB one (image.convert('RGB'))")
        if im.width == 0 or im.height == 0:
            raise ValueError(f"{what} is empty ({im.width}×{im.height}): give a picture")
    return list(items)


def clip_preprocess(images: list[Image.Image], cfg: ImageEncoderConfig) -> torch.Tensor:
    """RGB PIL images -> pixel values (B, 3, S, S), S = image_size: the shortest side resized to S
    (bicubic, antialiased, on the uint8 image), the centre S×S crop, then (x/255 − mean)/std. The
    steps and their order are transformers' CLIPImageProcessor's (its torchvision backend)."""
    import torchvision.transforms.v2.functional as tvF
    size, out = cfg.image_size, []
    mean = torch.tensor(cfg.image_mean) * 255                    # rescale and normalise fused, as it does
    std = torch.tensor(cfg.image_std) * 255
    for im in images:
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)   # (3, H, W) uint8
        h, w = x.shape[1:]
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        x = tvF.resize(x, [size, new_long] if h <= w else [new_long, size],
                       interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        top, left = int((x.shape[1] - size) / 2.0), int((x.shape[2] - size) / 2.0)
        x = x[:, top:top + size, left:left + size]
        out.append(tvF.normalize(x.float(), mean.tolist(), std.tolist()))
    return torch.stack(out)


def hf_vision_config(cfg: ImageEncoderConfig):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                            num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                            image_size=cfg.image_size, patch_size=cfg.patch_size,
                            projection_dim=cfg.projection_dim, hidden_act=cfg.hidden_act)


def config_from_hf(d: dict, image_mean=None, image_std=None) -> ImageEncoderConfig:
    """ImageEncoderConfig of a transformers CLIPVisionConfig dict (a diffusers image_encoder/config.json)."""
    extra = {k: tuple(v) for k, v in (("image_mean", image_mean), ("image_std", image_std)) if v is not None}
    return ImageEncoderConfig(hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
                              num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
                              image_size=d["image_size"], patch_size=d["patch_size"],
                              projection_dim=d["projection_dim"], hidden_act=d.get("hidden_act", "quick_gelu"),
                              **extra)


class ImageEncoder(nn.Module):
    """CLIP vision tower + projection: preprocessed pixels (B, 3, S, S) -> image embeddings (B, D)."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.config = cfg
        from transformers import CLIPVisionModelWithProjection
        self.clip = CLIPVisionModelWithProjection(hf_vision_config(cfg))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip(pixel_values=pixels.to(self.clip.dtype)).image_embeds

    @torch.no_grad()
    def embed(self, images, device=None) -> torch.Tensor:
        """PIL image(s) -> (B, D) embeddings, CLIP's preprocessing included."""
        pixels = clip_preprocess(as_rgb_images(images), self.config)
        return self(pixels.to(device or self.clip.device))


def tower_shapes(cfg: ImageEncoderConfig) -> dict[str, tuple[int, ...]]:
    """ImageEncoder's state-dict names and shapes, from the config alone (no transformers import)."""
    h, p, inter = cfg.hidden_size, cfg.patch_size, cfg.intermediate_size
    vm = "clip.vision_model."
    shapes = {vm + "embeddings.class_embedding": (h,), vm + "embeddings.patch_embedding.weight": (h, 3, p, p),
              vm + "embeddings.position_embedding.weight": ((cfg.image_size // p) ** 2 + 1, h)}
    norm = lambda name: {f"{name}.weight": (h,), f"{name}.bias": (h,)}             # noqa: E731
    shapes.update({vm + k: v for k, v in norm("pre_layrnorm").items()})
    for i in range(cfg.num_layers):
        pre = f"{vm}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes.update({f"{pre}self_attn.{proj}.weight": (h, h), f"{pre}self_attn.{proj}.bias": (h,)})
        shapes.update({pre + k: v for k, v in norm("layer_norm1").items()})
        shapes.update({f"{pre}mlp.fc1.weight": (inter, h), f"{pre}mlp.fc1.bias": (inter,),
                       f"{pre}mlp.fc2.weight": (h, inter), f"{pre}mlp.fc2.bias": (h,)})
        shapes.update({pre + k: v for k, v in norm("layer_norm2").items()})
    shapes.update({vm + k: v for k, v in norm("post_layernorm").items()})
    shapes["clip.visual_projection.weight"] = (cfg.projection_dim, h)
    return shapes


class LazyImageEncoder(nn.Module):
    """An ImageEncoder's weights, held under its names until `build()`: a text-to-image model that
    also draws variations (ldm/unclip.py ImageAdapter) keeps its image tower this way, so a plain
    text-to-image run never imports transformers' CLIP (~3 s of start-up). state_dict, load_state_dict
    and .to() see the same keys and tensors as the built tower's."""

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.config = cfg
        self.tensors = {k: torch.zeros(shape) for k, shape in tower_shapes(cfg).items()}

    def build(self) -> ImageEncoder:
        tower = ImageEncoder(self.config).train(self.training)
        tower.load_state_dict(self.tensors, strict=True, assign=True)
        return tower

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination.update({prefix + k: v for k, v in self.tensors.items()})

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for k in self.tensors:
            if prefix + k in state_dict:
                self.tensors[k] = state_dict[prefix + k]
            else:
                missing_keys.append(prefix + k)
        unexpected_keys += [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in self.tensors]

    def _apply(self, fn, recurse=True):
        self.tensors = {k: fn(v) for k, v in self.tensors.items()}
        return self


def built_image_encoder(model: nn.Module) -> ImageEncoder:
    """model.embedder, built first if it is still a LazyImageEncoder."""
    if isinstance(model.embedder, LazyImageEncoder):
        model.embedder = model.embedder.build()
    return model.embedder


# --- open_clip's `visual` layout (SD 2.1-unclip's embedder.model.visual.*) <-> transformers' ------------

_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
          "attn.out_proj": "self_attn.out_proj"}
_TOP = {"conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
        "positional_embedding": "embeddings.position_embedding.weight"}


def openclip_visual_to_hf(sd: dict) -> dict:
    """open_clip VisionTransformer keys -> CLIPVisionModelWithProjection keys (q/k/v split, proj transposed)."""
    out = {}
    for k, v in sd.items():
        if k == "proj":
            out["visual_projection.weight"] = v.t()
        elif k in _TOP:
            out["vision_model." + _TOP[k]] = v
        elif k.startswith(("ln_pre.", "ln_post.")):
            name = "pre_layrnorm" if k.startswith("ln_pre.") else "post_layernorm"
            out[f"vision_model.{name}.{k.split('.')[-1]}"] = v
        elif k.startswith("transformer.resblocks."):
            i, rest = k[len("transformer.resblocks."):].split(".", 1)
            pre = f"vision_model.encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]                                   # weight | bias
                for name, part in zip("qkv", v.chunk(3)):
                    out[f"{pre}self_attn.{name}_proj.{kind}"] = part
            else:
                mod, kind = rest.rsplit(".", 1)
                if mod not in _LAYER:
                    raise ValueError(f"open_clip visual key {k!r} is not a CLIP ViT's")
                out[f"{pre}{_LAYER[mod]}.{kind}"] = v
        else:
            raise ValueError(f"open_clip visual key {k!r} is not a CLIP ViT's (attention pooling, "
                             f"patch dropout or a ConvNeXt tower are not supported)")
    return out


def hf_to_openclip_visual(sd: dict) -> dict:
    """The inverse of openclip_visual_to_hf."""
    top = {"vision_model." + v: k for k, v in _TOP.items()}
    layer = {v: k for k, v in _LAYER.items()}
    out, qkv = {}, {}
    for k, v in sd.items():
        if k == "visual_projection.weight":
            out["proj"] = v.t()
        elif k in top:
            out[top[k]] = v
        elif k.startswith(("vision_model.pre_layrnorm.", "vision_model.post_layernorm.")):
            out[("ln_pre." if "pre_" in k else "ln_post.") + k.split(".")[-1]] = v
        else:
            i, rest = k[len("vision_model.encoder.layers."):].split(".", 1)
            mod, kind = rest.rsplit(".", 1)
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((i, kind), {})[mod[-6]] = v
            else:
                out[f"transformer.resblocks.{i}.{layer[mod]}.{kind}"] = v
    for (i, kind), parts in qkv.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    return out
