"""Training targets of the noised matcher (`ldm/matcher.py`) from scene records.

- Hard negative captions: the same scene with one thing a prompt names changed (a colour, a shape,
  which colour goes with which shape, the relation, a size, a count or a position), captioned by the
  dataset's own captioner (`scenes.caption`): fluent captions that are false of the image.
- Cell labels: which colour and shape cover each cell of a coarse grid, an auxiliary dense target
  that teaches the image tower what is where far sooner than the match/no-match bit alone.
"""
from __future__ import annotations

import random
from dataclasses import replace

import torch

from ldm.data.scenes import EXTENT, Scene, SceneObject, caption
from ldm.eval.prompts import COLOURS, INVERSE, POSITIONS, SHAPES, parse


def scene_from_dict(d: dict) -> Scene:
    """The `scene` column of a metadata.jsonl row -> Scene."""
    objects = tuple(SceneObject(o["shape"], o["colour"], o["size"], o["count"], o["position"],
                                tuple(tuple(c) for c in o.get("centres", ()))) for o in d["objects"])
    return Scene(objects, d["background"], d.get("relation"), d.get("kind", "single"))


PAIRING = ("colours", "shapes", "relation")  # the edits that bind words to objects


def perturbations(scene: Scene) -> list[tuple[str, Scene]]:
    """(edit, scene) for every single edit that makes each caption of `scene` false of its image."""
    objs, out = scene.objects, []

    def with_object(i: int, **change) -> Scene:
        return replace(scene, objects=objs[:i] + (replace(objs[i], **change),) + objs[i + 1:])

    if len(objs) == 2:
        a, b = objs
        # without a relation, exchanging the colours of two circles changes only their sizes
        if a.colour != b.colour and (a.shape != b.shape or scene.relation is not None):
            out.append(("colours", replace(scene, objects=(replace(a, colour=b.colour), replace(b, colour=a.colour)))))
        if a.shape != b.shape and (a.colour != b.colour or scene.relation is not None):
            out.append(("shapes", replace(scene, objects=(replace(a, shape=b.shape), replace(b, shape=a.shape)))))
        if scene.relation is not None:
            out.append(("relation", replace(scene, relation=INVERSE[scene.relation])))
    taken_colours = {o.colour for o in objs}
    taken_pairs = {(o.colour, o.shape) for o in objs}
    for i, o in enumerate(objs):
        out += [("colour", with_object(i, colour=c)) for c in COLOURS if c not in taken_colours]
        out += [("shape", with_object(i, shape=s)) for s in SHAPES
                if s != o.shape and (o.colour, s) not in taken_pairs]
        out.append(("size", with_object(i, size="small" if o.size == "large" else "large")))
        if o.count > 1:
            out += [("count", with_object(i, count=n)) for n in (1, 2, 3) if n != o.count]
        if o.position is not None:
            out += [("position", with_object(i, position=p)) for p in POSITIONS
                    if p != o.position and (o.count == 1 or p != "centre")]
    return out


def negative_captions(scene: Scene, n: int, rng: random.Random, pairing_share: float = 0.5) -> list[str]:
    """n captions of single-edit scenes. The pairing edits (at most 3) would drown among the 16 or
    more recolourings and reshapings, so they are drawn with probability `pairing_share` when any exist."""
    edits = perturbations(scene)
    pairing = [e for e in edits if e[0] in PAIRING]
    out = []
    while len(out) < n:
        name, edited = rng.choice(pairing if pairing and rng.random() < pairing_share else edits)
        text = _caption_naming_size(edited, scene, rng) if name == "size" else caption(edited, rng)
        if text is not None:
            out.append(text)
    return out


def _caption_naming_size(edited: Scene, scene: Scene, rng: random.Random, tries: int = 10) -> str | None:
    """A caption of `edited` that names the size it changed (captions name sizes 40% of the time;
    one that doesn't is true of the original image too)."""
    (obj,) = [e for e, o in zip(edited.objects, scene.objects) if e.size != o.size]
    for _ in range(tries):
        text = caption(edited, rng)
        if any((o.colour, o.shape, o.size) == (obj.colour, obj.shape, obj.size) for o in parse(text).objects):
            return text
    return None


CELL_CLASSES = (len(COLOURS) + 1, len(SHAPES) + 1)  # the last class of each: no object


def cell_labels(scene: Scene, grid: int) -> torch.Tensor:
    """(2, grid, grid) long: the colour and the shape index whose bounding box covers each cell's
    centre (later objects on top), or len(COLOURS) / len(SHAPES) where none does."""
    colours, shapes = list(COLOURS), list(SHAPES)
    labels = torch.tensor([len(colours), len(shapes)]).view(2, 1, 1).repeat(1, grid, grid)
    centre = (torch.arange(grid) + 0.5) / grid
    for obj in scene.objects:
        half = EXTENT[obj.size] / 2
        for x, y in obj.centres:
            inside = ((centre[None, :] - x).abs() < half) & ((centre[:, None] - y).abs() < half)  # (row, col)
            labels[0][inside], labels[1][inside] = colours.index(obj.colour), shapes.index(obj.shape)
    return labels
