"""A noise-aware classifier p_φ(y | z_t, t) on a model's latents, for classifier guidance (Dhariwal &
Nichol 2021, §4): trained on noised latents at every t, so its gradient ∇_{z_t} log p_φ(y | z_t) means
something from the first step on.

The label y is a *grid of cells* (G × G): per cell, which shape is in it (0 = empty) and its colour.
For the default model's shape world (ldm/shapes: objects on a 3 × 3 grid) this one label covers
what prompts name: colour–shape binding, counts (how many cells hold the object), positions (which
cells) and relations (cells relative to each other). A prompt names a *set* of grids (any cells
that satisfy it), so `prompt_log_prob` takes, at each step, the satisfying grid the classifier
finds most likely now (a small constrained assignment, no gradient) and returns its log p_φ — the
gradient of which guides the sampler (`classifier_guidance` in ldm/guidance.py).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import timestep_embedding

EMPTY = 0


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int = 4          # latent channels
    channels: int = 32            # width at the latent resolution (×2 after one downsampling)
    grid: int = 3                 # cells per side
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart")
    colours: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "brown")


class _Block(nn.Module):
    """GroupNorm–SiLU–conv ×2 with the time embedding added between, and a residual path."""

    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class NoisyClassifier(nn.Module):
    """(z_t (B, C, h, w), t (B,)) -> (shape logits (B, 1 + S, G, G), colour logits (B, K, G, G))."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        c = config.channels
        self.time = nn.Sequential(nn.Linear(c, 2 * c), nn.SiLU(), nn.Linear(2 * c, 2 * c))
        self.conv_in = nn.Conv2d(config.in_channels, c, 3, padding=1)
        self.blocks = nn.ModuleList([_Block(c, c, 2 * c), _Block(c, c, 2 * c), _Block(c, 2 * c, 2 * c),
                                     _Block(2 * c, 2 * c, 2 * c), _Block(2 * c, 2 * c, 2 * c)])
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.GroupNorm(8, 2 * c), nn.SiLU(),
                                  nn.Conv2d(2 * c, 1 + len(config.shapes) + len(config.colours), 1))

    def forward(self, z: torch.Tensor, t: torch.Tensor):
        emb = self.time(timestep_embedding(t, self.config.channels))               # (B, 2c)
        h = self.conv_in(z)                                                          # (B, c, h, w)
        h = self.blocks[1](self.blocks[0](h, emb), emb)
        h = self.down(h)                                                             # (B, c, h/2, w/2)
        for block in self.blocks[2:]:
            h = block(h, emb)
        out = self.head(F.adaptive_avg_pool2d(h, self.config.grid))                  # (B, 1+S+K, G, G)
        return out.split([1 + len(self.config.shapes), len(self.config.colours)], dim=1)

    def guidance(self, pipe, prompts: list[str], scale: float):
        """What `pipe(prompts, classifier_scale=scale)` adds to its guidance (see `prompt_guidance`)."""
        return prompt_guidance(pipe, prompts, scale)


def loss(classifier: NoisyClassifier, z_t, t, labels) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of every cell's shape (empty included) and of the colour of occupied cells.
    labels (B, 2, G, G) long: [shape index (0 = empty, 1..S), colour index]."""
    shape_logits, colour_logits = classifier(z_t, t)
    shape, colour = labels[:, 0], labels[:, 1]
    l_shape = F.cross_entropy(shape_logits, shape)
    l_colour = F.cross_entropy(colour_logits, colour.masked_fill(shape == EMPTY, -100), ignore_index=-100)
    with torch.no_grad():
        acc = (shape_logits.argmax(1) == shape).float().mean()
    return l_shape + l_colour, {"loss_shape": float(l_shape.detach()), "loss_colour": float(l_colour.detach()),
                                "cell_accuracy": float(acc)}


# -- saving and loading: one .safetensors with the config in its metadata --------------------------

def save(classifier: NoisyClassifier, path, state_dict: dict | None = None) -> Path:
    from ..formats.files import write_safetensors
    sd = {k: v.detach().contiguous().cpu() for k, v in (state_dict or classifier.state_dict()).items()}
    write_safetensors(sd, path, {"ldm_classifier_config": json.dumps(asdict(classifier.config))})
    return Path(path)


def load(path, device="cpu") -> NoisyClassifier:
    from ..formats.files import read_tagged
    tensors, raw = read_tagged(path, "ldm_classifier_config", "classifier",
                               "train one with train_classifier.py")
    config = ClassifierConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    classifier = NoisyClassifier(config)
    classifier.load_state_dict(tensors, strict=True)
    return classifier.to(device).eval().requires_grad_(False)


# -- the shape world: grids of scenes and of prompts ------------------------------------------------

def cell_of(x: float, y: float, grid: int = 3) -> tuple[int, int]:
    """(column, row) of a normalised centre."""
    return min(int(x * grid), grid - 1), min(int(y * grid), grid - 1)


def scene_labels(scene, config: ClassifierConfig = ClassifierConfig()) -> torch.Tensor:
    """(2, G, G) long labels of a `ldm.shapes.scenes.Scene`: each instance's centre marks its cell."""
    labels = torch.zeros(2, config.grid, config.grid, dtype=torch.long)
    for obj in scene.objects:
        for x, y in obj.centres:
            col, row = cell_of(x, y, config.grid)
            labels[0, row, col] = 1 + config.shapes.index(obj.shape)
            labels[1, row, col] = config.colours.index(obj.colour)
    return labels


_BAND = {"left": lambda c, r, g: c == 0, "right": lambda c, r, g: c == g - 1, "top": lambda c, r, g: r == 0,
         "bottom": lambda c, r, g: r == g - 1, "centre": lambda c, r, g: c == r == g // 2}
_ALONG = {"left_of": (1, 0), "right_of": (-1, 0), "above": (0, 1), "below": (0, -1)}


def _relation(a: tuple[int, int], b: tuple[int, int], relation: str) -> bool:
    """a (col, row) stands in `relation` to b on the grid: offset along the axis dominates (as the evaluator)."""
    ux, uy = _ALONG[relation]                      # where b lies from a
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = dx * ux + dy * uy, (dy if ux else dx)
    return along > 0 and along > abs(across)


@dataclass(frozen=True)
class PromptTarget:
    """What a prompt asks of the grid: instances (shape index, colour index or None, position or None),
    `owner` (which named object each instance is), and an optional relation between objects 0 and 1."""
    items: tuple[tuple[int, int | None, str | None], ...]
    owner: tuple[int, ...]
    relation: str | None


def prompt_target(prompt: str, config: ClassifierConfig = ClassifierConfig()) -> PromptTarget | None:
    """The grid constraints of a shape-world prompt; None for prompts the grammar can't read or that
    don't fit the grid (then the prompt is not guided)."""
    from .prompts import parse
    try:
        spec = parse(prompt)
    except ValueError:
        return None
    items, owner = [], []
    for k, obj in enumerate(spec.objects):
        if obj.shape not in config.shapes or (obj.colour is not None and obj.colour not in config.colours):
            return None
        colour = None if obj.colour is None else config.colours.index(obj.colour)
        items += [(1 + config.shapes.index(obj.shape), colour, obj.position)] * obj.count
        owner += [k] * obj.count
    if not items or len(items) > config.grid ** 2:
        return None
    return PromptTarget(tuple(items), tuple(owner), spec.relation)


def _assignments(target: PromptTarget, grid: int) -> torch.Tensor:
    """(A, n) cell indices (row·G + col) of every injective placement of the items that satisfies their
    positions and the relation; identical items in increasing cell order only (no repeats)."""
    cells = [(c, r) for r in range(grid) for c in range(grid)]
    rows = []
    for perm in itertools.permutations(range(len(cells)), len(target.items)):
        if any(target.items[i] == target.items[i + 1] and perm[i] > perm[i + 1] for i in range(len(perm) - 1)):
            continue
        if any(pos is not None and not _BAND[pos](*cells[p], grid) for (_, _, pos), p in zip(target.items, perm)):
            continue
        if target.relation is not None:
            a = [cells[p] for p, o in zip(perm, target.owner) if o == 0]
            b = [cells[p] for p, o in zip(perm, target.owner) if o == 1]
            if not any(_relation(x, y, target.relation) for x in a for y in b):
                continue
        rows.append(perm)
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), len(target.items))


_CACHE: dict = {}


def prompt_log_prob(classifier: NoisyClassifier, targets: list[PromptTarget | None]):
    """score_fn(z_t, t) -> (B,) log p_φ(grid | z_t, t) of the most likely grid satisfying each image's
    prompt (0 for an unguided prompt): every named instance in its cell, every other cell empty."""
    g = classifier.config.grid
    plans = []
    for target in targets:
        if target is not None and (target, g) not in _CACHE:
            _CACHE[(target, g)] = _assignments(target, g)
        plans.append(None if target is None else _CACHE[(target, g)])

    def score(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape_logits, colour_logits = classifier(z, t)
        log_shape = shape_logits.float().log_softmax(1).flatten(2)          # (B, 1+S, G²)
        log_colour = colour_logits.float().log_softmax(1).flatten(2)        # (B, K, G²)
        out = []
        for b, (target, plan) in enumerate(zip(targets, plans)):
            if target is None or not len(plan):
                out.append(log_shape[b].sum() * 0)
                continue
            empty = log_shape[b, EMPTY]                                       # (G²,)
            gain = torch.stack([log_shape[b, s] + (log_colour[b, c] if c is not None else 0) - empty
                                for s, c, _ in target.items], dim=1)          # (G², n): item i in cell
            totals = gain.gather(0, plan).sum(1)                              # (A,) per placement
            best = plan[int(totals.detach().argmax())]
            out.append(empty.sum() + gain[best, torch.arange(len(best))].sum())
        return torch.stack(out)
    return score


# -- guiding a pipeline -----------------------------------------------------------------------------

def attach(pipe, classifier: NoisyClassifier | str | Path) -> NoisyClassifier:
    """Give `pipe` a noisy classifier (a module or a file from train_classifier.py) for
    `pipe(prompt, classifier_scale=s)`, which calls its `guidance`; it must read the pipeline's latents."""
    if not isinstance(classifier, NoisyClassifier):
        classifier = load(classifier)
    if classifier.config.in_channels != pipe.config.unet.in_channels:
        raise ValueError(f"the classifier reads {classifier.config.in_channels} latent channels, the model's "
                         f"UNet {pipe.config.unet.in_channels}: it was trained for another model")
    pipe.classifier = classifier.to(pipe.device).eval().requires_grad_(False)
    return pipe.classifier


# Guide only the steps with t below this: above it the shape-world classifier gets under 7% of whole
# grids right (docs/guidance_families.md), so its gradient there is mostly its own mistakes. Measured
# on the default model at CFG 1, all 250 eval prompts: docs/guidance_families.md.
GUIDE_BELOW_T = 600


def prompt_guidance(pipe, prompts: list[str], scale: float, below_t: float = GUIDE_BELOW_T):
    """The wrapper model_fn -> model_fn for `pipe.guidance`: classifier guidance by
    ∇_{z_t} log p_φ(grid of prompt i | z_t) for image i (Dhariwal & Nichol, Alg. 2), at the steps
    with t < below_t (the model's own output at the others)."""
    from ..guidance import classifier_guidance, gradient_of, only_from
    from ..schedule import alphas_cumprod
    classifier = pipe.classifier
    score = prompt_log_prob(classifier, [prompt_target(p, classifier.config) for p in prompts])
    ac = alphas_cumprod(pipe.config.schedule)
    return lambda model_fn: only_from(below_t, model_fn, classifier_guidance(model_fn, gradient_of(score), ac, scale))
