"""Grounding targets for rendered scenes: for each object, the caption tokens that name it (its colour
and shape words) and where it is drawn (a soft mask at latent resolution). `train_ldm.py` uses them
for the cross-attention grounding loss (`ldm.grounding`; TokenCompose, Wang et al. 2024).

A scene is the `scene` record `python -m ldm.shapes.scenes` writes beside each caption in metadata.jsonl.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ldm.shapes.scenes import SceneObject, draw_object
from ldm.shapes.prompts import COLOUR_WORDS, SHAPE_WORDS
from ldm.text import Tokenizer

MAX_OBJECTS = 2  # the scenes hold one or two objects (a counted object is one object with n instances)
_COLOUR_AFTER = ("that", "is", "coloured", "colored", "in")  # "a circle that is red", "a circle in red"


def scenes_by_path(root: str | Path) -> dict[Path, dict]:
    """{resolved image path: scene record} from every metadata.jsonl under `root` that has scenes."""
    out = {}
    for meta in sorted(Path(root).rglob("metadata.jsonl")):
        with open(meta, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    if isinstance(row.get("scene"), dict) and "file_name" in row:
                        out[(meta.parent / row["file_name"]).resolve()] = row["scene"]
    return out


def object_masks(scene: dict, size: int) -> np.ndarray:
    """(MAX_OBJECTS, size, size) float32 coverage in [0, 1] of each object's instances (drawn at 4x)."""
    masks = np.zeros((MAX_OBJECTS, size, size), np.float32)
    big = 4 * size
    for k, obj in enumerate(scene["objects"][:MAX_OBJECTS]):
        im = Image.new("L", (big, big), 0)
        draw_object(ImageDraw.Draw(im), SceneObject(**obj), big, 255, 0)
        masks[k] = np.asarray(im.resize((size, size), Image.BOX), np.float32) / 255.0
    return masks


def _colour_of(words: list[str], j: int) -> int | None:
    """Index of the colour word bound to the shape word at j: just before it, or after "that is" etc."""
    if j > 0 and words[j - 1] in COLOUR_WORDS:
        return j - 1
    k = j + 1
    while k < len(words) and k <= j + 3 and words[k] in _COLOUR_AFTER:
        k += 1
    return k if k > j + 1 and k < len(words) and words[k] in COLOUR_WORDS else None


def token_groups(caption: str, scene: dict, tokenizer: Tokenizer) -> np.ndarray:
    """(MAX_OBJECTS, L) bool: the token positions (after the start token) of each object's colour and
    shape words in `caption`. A noun phrase is matched to the object with its (colour, shape); words
    past the tokenizer's length, or naming no object of the scene, are left out."""
    words = tokenizer.words(caption)
    names = [w for w, _ in words]
    starts = np.cumsum([1] + [len(ids) for _, ids in words])  # position 0 is the start token
    objects = [(o["colour"], o["shape"]) for o in scene["objects"][:MAX_OBJECTS]]
    groups = np.zeros((MAX_OBJECTS, tokenizer.max_length), bool)
    for j, word in enumerate(names):
        c = _colour_of(names, j) if word in SHAPE_WORDS else None
        named = (COLOUR_WORDS[names[c]], SHAPE_WORDS[word]) if c is not None else None
        if named not in objects:
            continue
        k = objects.index(named)
        for w in (c, j):
            lo, hi = starts[w], min(starts[w + 1], tokenizer.max_length - 1)  # the last slot is EOS
            groups[k, lo:hi] = True
    return groups


class GroundedDataset(Dataset):
    """Adds "masks" (MAX_OBJECTS, h, w) and "groups" (MAX_OBJECTS, L) to each sample of `dataset`
    (which must report the item it used as "item"); items without a scene get empty targets."""

    def __init__(self, dataset: Dataset, scenes: list[dict | None], tokenizer: Tokenizer, latent_size: int):
        self.dataset, self.scenes, self.tokenizer, self.size = dataset, scenes, tokenizer, latent_size

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.dataset[index])
        scene = self.scenes[sample["item"]]
        if scene is None:
            masks = np.zeros((MAX_OBJECTS, self.size, self.size), np.float32)
            groups = np.zeros((MAX_OBJECTS, self.tokenizer.max_length), bool)
        else:
            masks, groups = object_masks(scene, self.size), token_groups(sample["caption"], scene, self.tokenizer)
        sample["masks"], sample["groups"] = torch.from_numpy(masks), torch.from_numpy(groups)
        return sample
