"""Regional prompts: each box of the image guided by its own prompt while the layout forms.

A `Region` is a prompt and a box. At the steps that decide where things go (t ≥ from_t), the
conditional output inside each box is the box prompt's, outside every box the whole prompt's;
classifier-free guidance then runs as usual on that composite. Later steps use the whole prompt
everywhere, so the parts join into one picture. This is the layout stage of LLM-grounded diffusion
(Lian et al. 2023), done as MultiDiffusion's masked averaging (Bar-Tal et al. 2023) of the network's
outputs: one batched forward of at most 2B + R rows (B images, R regions) per step while regions
apply, the null rows added by CFG as for any prompt (ldm/guidance.py).

Why: a small text encoder (and CLIP's, in SD) blurs which colour goes with which shape in
"a red circle left of a blue square"; a box prompt names one object, so there is nothing to bind.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .guidance import Branch, Rows


@dataclass(frozen=True)
class Region:
    """`prompt` drawn in `box` = (left, top, right, bottom), fractions of the image's width/height."""
    prompt: str
    box: tuple[float, float, float, float]

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"a region's prompt must be a non-empty string, got {self.prompt!r}")
        box = self.box
        if not isinstance(box, (tuple, list)) or len(box) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
            raise ValueError(f"a region's box must be 4 numbers (left, top, right, bottom), got {box!r}")
        left, top, right, bottom = box
        if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
            raise ValueError(f"a region's box (left, top, right, bottom) must satisfy 0 ≤ left < right ≤ 1 "
                             f"and 0 ≤ top < bottom ≤ 1 (fractions of the image), got {tuple(box)}")
        object.__setattr__(self, "box", tuple(float(v) for v in box))


def as_regions(items) -> list[Region]:
    """Regions from Region objects or (prompt, box) pairs; TypeError for anything else."""
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"regions must be a list of Region or (prompt, box) pairs, got {type(items).__name__}")
    out = []
    for item in items:
        if isinstance(item, Region):
            out.append(item)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            out.append(Region(*item))
        else:
            raise TypeError(f"a region must be a Region or a (prompt, box) pair, got {item!r}")
    return out


def box_mask(box: tuple[float, float, float, float], h: int, w: int) -> torch.Tensor:
    """(1, h, w) mask of a box on an h×w latent grid; at least one cell, so a thin box still counts."""
    left, top, right, bottom = box
    x0, y0 = min(int(round(left * w)), w - 1), min(int(round(top * h)), h - 1)
    x1, y1 = max(int(round(right * w)), x0 + 1), max(int(round(bottom * h)), y0 + 1)
    m = torch.zeros(1, h, w)
    m[:, y0:y1, x0:x1] = 1
    return m


def paste_weights(owner: torch.Tensor, masks: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (R, 1, h, w), rest (B, 1, h, w)) for `paste`: each region's mask divided by how many
    regions cover each cell (overlaps average), and the share of each image no region covers."""
    cover = masks.new_zeros((batch,) + masks.shape[1:]).index_add_(0, owner, masks)  # (B, 1, h, w)
    return masks / cover[owner].clamp(min=1), 1 - cover.clamp(max=1)


def paste(out_cond: torch.Tensor | None, out_regions: torch.Tensor, owner: torch.Tensor,
          weights: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """rest · out_cond + each image's regions' outputs pasted by `weights`; out_cond None when no
    image has any rest (the boxes tile them)."""
    pasted = out_regions.new_zeros(rest.shape[:1] + out_regions.shape[1:])
    pasted.index_add_(0, owner, weights * out_regions)                                 # (B, C, h, w)
    return pasted if out_cond is None else rest * out_cond + pasted


def compose(out_cond: torch.Tensor, out_regions: torch.Tensor, owner: torch.Tensor,
            masks: torch.Tensor) -> torch.Tensor:
    """Each image's output with its regions' outputs pasted into their masks. out_cond (B, C, h, w),
    out_regions (R, C, h, w), owner (R,) image index of each region, masks (R, 1, h, w). Where regions
    overlap they are averaged; where none is, the whole prompt's output stays."""
    return paste(out_cond, out_regions, owner, *paste_weights(owner, masks.to(out_cond), len(out_cond)))


def regional_rows(context: torch.Tensor, region_context: torch.Tensor, owner: torch.Tensor,
                  masks: torch.Tensor) -> Branch:
    """The conditional rows of a regional step: the prompt's rows (B) then one row per region (R),
    their outputs pasted into the boxes (`compose`); CFG (`classifier_free`) stacks the null rows
    under them in the same call. Boxes that tile every image (as the planner's halves do) drop the
    prompt's rows, whose output would be masked out everywhere."""
    b, r = context.shape[0], region_context.shape[0]
    weights, rest = paste_weights(owner, masks.float(), b)       # the boxes don't move: once, not per step
    whole = not bool(rest.any())
    all_context = region_context if whole else torch.cat([context, region_context])   # (≤ B + R, L, D)

    def branch(x: torch.Tensor, t: torch.Tensor) -> Rows:
        def read(out: torch.Tensor) -> torch.Tensor:
            out_cond, out_regions = (None, out) if whole else out.split([b, r])
            return paste(out_cond, out_regions, owner, weights.to(out), rest.to(out))
        if whole:
            return Rows(x[owner], t[owner], all_context, read)
        return Rows(torch.cat([x, x[owner]]), torch.cat([t, t[owner]]), all_context, read)
    return branch
