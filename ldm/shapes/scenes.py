"""Procedurally rendered captioned shape scenes (a tiny, fully controlled text-to-image world).

A `Scene` (shapes, colours, sizes, counts, positions, relation, background) is sampled from a
seed, rendered with Pillow at a 4x supersample and captioned in varied phrasings. Scenes lie on a
3x3 grid of cells, so objects never overlap and position words are unambiguous.
Usage: python -m ldm.shapes.scenes OUT --n 20000 --size 64 --seed 0
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

from ldm.shapes.prompts import BACKGROUNDS, COLOURS, INVERSE, SHAPES, parse

KINDS = ("single", "colour", "position", "counting", "two_objects")
EXTENT = {"small": 0.19, "large": 0.27}  # bounding-box side as a fraction of the image side
HELD_OUT = (("red", "star"), ("orange", "ring"), ("yellow", "heart"), ("green", "triangle"),
            ("cyan", "cross"), ("blue", "diamond"), ("purple", "circle"), ("pink", "square"),
            ("brown", "ring"))
_BANDS = {"left": [(0, 1), (0, 0), (0, 2)], "right": [(2, 1), (2, 0), (2, 2)],
          "top": [(1, 0), (0, 0), (2, 0)], "bottom": [(1, 2), (0, 2), (2, 2)], "centre": [(1, 1)]}
_ALL_CELLS = [(c, r) for r in range(3) for c in range(3)]


def held_out(colour: str, shape: str) -> bool:
    """True for (colour, shape) combinations kept out of training and used by the eval prompts."""
    return (colour, shape) in HELD_OUT


@dataclass(frozen=True)
class SceneObject:
    """`count` identical shapes; `centres` are normalised (x, y) bounding-box centres."""
    shape: str
    colour: str
    size: str = "large"
    count: int = 1
    position: str | None = None
    centres: tuple[tuple[float, float], ...] = ()


@dataclass(frozen=True)
class Scene:
    """A renderable scene. With `relation`, objects[0] stands in that relation to objects[1]."""
    objects: tuple[SceneObject, ...]
    background: str
    relation: str | None = None
    kind: str = "single"


# ---------------------------------------------------------------- layout
def _cell_centre(cell, size: str, rng: random.Random) -> tuple[float, float]:
    jitter = max(0.0, (1 / 3 - EXTENT[size]) / 2 - 0.025)
    return tuple(round((k + 0.5) / 3 + rng.uniform(-jitter, jitter), 4) for k in cell)


def _cells_for(obj: SceneObject, free: list, rng: random.Random) -> list:
    if obj.position is None:
        cells = [c for c in free]
        rng.shuffle(cells)
        return cells[:obj.count]
    band = [c for c in _BANDS[obj.position] if c in free]
    if obj.count > 1:
        band = rng.sample(band, len(band))
    return band[:obj.count]


def _relation_cells(objects, rel: str, rng: random.Random):
    allowed = [_BANDS[o.position] if o.position else _ALL_CELLS for o in objects]
    pairs = [(a, b) for a in allowed[0] for b in allowed[1]
             if (rel == "left_of" and a[1] == b[1] and a[0] < b[0])
             or (rel == "right_of" and a[1] == b[1] and a[0] > b[0])
             or (rel == "above" and a[0] == b[0] and a[1] < b[1])
             or (rel == "below" and a[0] == b[0] and a[1] > b[1])]
    if not pairs:
        raise ValueError(f"positions {[o.position for o in objects]} contradict relation {rel}")
    return rng.choice(pairs)


def layout(objects, relation: str | None, rng: random.Random) -> tuple[SceneObject, ...]:
    """Assign instance centres on the 3x3 grid; raises ValueError when the objects do not fit."""
    objects = tuple(objects)
    if relation is not None:
        if len(objects) != 2 or any(o.count != 1 for o in objects):
            raise ValueError("a relation needs exactly two single objects")
        cells = _relation_cells(objects, relation, rng)
        return tuple(replace(o, centres=(_cell_centre(c, o.size, rng),))
                     for o, c in zip(objects, cells))
    if len(objects) == 1 and objects[0].count == 1 and objects[0].position is None:
        margin = EXTENT[objects[0].size] / 2 + 0.03
        xy = tuple(round(rng.uniform(margin, 1 - margin), 4) for _ in range(2))
        return (replace(objects[0], centres=(xy,)),)
    free, out = list(_ALL_CELLS), []
    for obj in objects:
        cells = _cells_for(obj, free, rng)
        if len(cells) < obj.count:
            where = obj.position or "any free cell"
            raise ValueError(f"cannot place {obj.count} {obj.shape}(s) at {where}")
        free = [c for c in free if c not in cells]
        out.append(replace(obj, centres=tuple(_cell_centre(c, obj.size, rng) for c in cells)))
    return tuple(out)


# ---------------------------------------------------------------- sampling
def _random_object(rng: random.Random, allow) -> SceneObject:
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if allow(colour, shape):
            return SceneObject(shape, colour, rng.choice(("small", "large")))


def random_scene(rng: random.Random, kinds=KINDS, allow=None) -> Scene:
    """Sample a scene of one of `kinds`; `allow(colour, shape)` filters object combinations."""
    allow = allow or (lambda colour, shape: True)
    kind = rng.choice(tuple(kinds))
    if kind not in KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")
    obj = _random_object(rng, allow)
    relation = None
    if kind == "position":
        obj = replace(obj, position=rng.choice(tuple(_BANDS)))
    elif kind == "counting":
        pos = rng.choice(("left", "right", "top", "bottom")) if rng.random() < 0.3 else None
        obj = replace(obj, count=rng.choice((2, 3)), position=pos)
    objects = (obj,)
    if kind == "two_objects":
        other = _random_object(rng, allow)
        while (other.colour, other.shape) == (obj.colour, obj.shape):
            other = _random_object(rng, allow)
        objects = (obj, other)
        relation = rng.choice(tuple(INVERSE)) if rng.random() < 0.6 else None
    return Scene(layout(objects, relation, rng), rng.choice(list(BACKGROUNDS)), relation, kind)


def scene_from_prompt(prompt: str, seed: int | str | None = None) -> Scene:
    """The ground-truth scene of a prompt; unspecified attributes are drawn from `seed`."""
    spec = parse(prompt)
    rng = random.Random(f"{prompt}|{seed}")
    objects = tuple(SceneObject(o.shape, o.colour or rng.choice(list(COLOURS)),
                                o.size or rng.choice(("small", "large")), o.count, o.position)
                    for o in spec.objects)
    background = spec.background or rng.choice(list(BACKGROUNDS))
    return Scene(layout(objects, spec.relation, rng), background, spec.relation, spec.category)


# ---------------------------------------------------------------- rendering
def _polygon(shape: str, cx: float, cy: float, s: float) -> list[tuple[float, float]]:
    h = s / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "cross":
        t = s / 6
        pts = [(t, h), (t, t), (h, t), (h, -t), (t, -t), (t, -h)]
        pts += [(-x, -y) for x, y in pts]
        return [(cx + x, cy + y) for x, y in pts]
    if shape == "star":
        r_out = s / (2 * math.sin(math.radians(72)))
        top = cy - s * 0.951 / 2  # star height is 0.951 of its width
        pts = []
        for k in range(10):
            r = r_out if k % 2 == 0 else 0.42 * r_out
            a = math.radians(-90 + 36 * k)
            pts.append((cx + r * math.cos(a), top + r_out + r * math.sin(a)))
        return pts
    if shape == "heart":
        ts = [2 * math.pi * k / 96 for k in range(96)]
        pts = [(16 * math.sin(t) ** 3,
                -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
               for t in ts]
        ys = [y for _, y in pts]
        scale, mid = s / 32.0, (max(ys) + min(ys)) / 2
        return [(cx + x * scale, cy + (y - mid) * scale) for x, y in pts]
    raise ValueError(f"unknown shape {shape!r}")


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour, cx, cy, s, bg) -> None:
    box = [cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2]
    if shape in ("circle", "ring"):
        draw.ellipse(box, fill=colour)
        if shape == "ring":
            q = s / 4
            draw.ellipse([cx - q, cy - q, cx + q, cy + q], fill=bg)
    else:
        draw.polygon(_polygon(shape, cx, cy, s), fill=colour)


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, big: int, fill, bg) -> None:
    """Every instance of `obj` on a `big`-pixel canvas, in `fill` (a ring's hole in `bg`)."""
    for cx, cy in obj.centres:
        _draw(draw, obj.shape, fill, cx * big, cy * big, EXTENT[obj.size] * big, bg)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Render `scene` as a `size` x `size` RGB image (drawn at 4x, downsampled with LANCZOS)."""
    if not isinstance(size, numbers.Integral) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    size = int(size)
    big = 4 * size
    bg = BACKGROUNDS[scene.background]
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        draw_object(draw, obj, big, COLOURS[obj.colour], bg)
    return img.resize((size, size), Image.LANCZOS)


# ---------------------------------------------------------------- captions
_NUMBER = {2: "two", 3: "three"}
_SIZE_SYN = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
_POS = {"left": ("on the left", "on the left side", "to the left", "at the left"),
        "right": ("on the right", "on the right side", "to the right", "at the right"),
        "top": ("at the top", "near the top", "in the upper part", "at the top of the image"),
        "bottom": ("at the bottom", "near the bottom", "in the lower part",
                   "at the bottom of the picture"),
        "centre": ("in the centre", "in the center", "in the middle", "at the center")}
_REL = {"left_of": ("to the left of", "left of", "on the left side of"),
        "right_of": ("to the right of", "right of", "on the right side of"),
        "above": ("above", "over"), "below": ("below", "under", "beneath", "underneath")}
_BG = {"light grey": ("light grey", "light gray"), "dark grey": ("dark grey", "dark gray"),
       "beige": ("beige",), "navy": ("navy", "dark navy", "navy blue")}
_PREFIX = ("", "", "", "a picture of ", "an image of ", "a drawing of ", "a render of ")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shape_noun(shape: str, count: int) -> str:
    """The shape's name, plural for a count above 1 ("crosses")."""
    return shape if count == 1 else shape + ("es" if shape == "cross" else "s")


def _noun_phrase(obj: SceneObject, rng: random.Random, colour_after: bool = False) -> str:
    size = rng.choice(_SIZE_SYN[obj.size]) + " " if rng.random() < 0.4 else ""
    noun = shape_noun(obj.shape, obj.count)
    if colour_after:
        head = f"{size}{noun}"
        tail = rng.choice((" that is ", " coloured ", " colored ", " in ")) + obj.colour
    else:
        head, tail = f"{size}{obj.colour} {noun}", ""
    if obj.count > 1:
        return f"{_NUMBER[obj.count]} {head}{tail}"
    det = rng.choice((_article(head), _article(head), _article(head), "one", "a single", ""))
    return f"{det} {head}{tail}".lstrip()


def _background_phrase(scene: Scene, rng: random.Random) -> str:
    name = rng.choice(_BG[scene.background])
    return rng.choice((" on a {} background", " against a {} background", ", {} background",
                       " with a {} background", " on a {} backdrop")).format(name)


def caption(scene: Scene, rng: random.Random) -> str:
    """A natural-language caption of `scene`; phrasing varies with `rng`."""
    objs, lead = scene.objects, ""
    prefix = rng.choice(_PREFIX + ("there is ",))
    if prefix == "there is " and objs[0].count > 1:
        prefix = "there are "
    if scene.relation is not None:
        a, b, rel = objs[0], objs[1], scene.relation
        if rng.random() < 0.5:
            a, b, rel = b, a, INVERSE[rel]
        verb = " is" if not prefix and rng.random() < 0.3 else ""
        text = f"{_noun_phrase(a, rng)}{verb} {rng.choice(_REL[rel])} {_noun_phrase(b, rng)}"
    elif len(objs) == 2:
        text = _noun_phrase(objs[0], rng) + rng.choice((" and ", " and ", " with ")) \
            + _noun_phrase(objs[1], rng)
    else:
        obj = objs[0]
        text = _noun_phrase(obj, rng, colour_after=obj.count == 1 and rng.random() < 0.2)
        if obj.position is not None:
            pos = rng.choice(_POS[obj.position])
            if rng.random() < 0.2:
                lead, prefix = pos + ", ", prefix if prefix.startswith("there") else ""
            else:
                text = f"{text} {pos}"
    if scene.kind == "colour" or (scene.kind != "single" and rng.random() < 0.25):
        text += _background_phrase(scene, rng)
    text = lead + prefix + text
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + ("." if rng.random() < 0.3 else "")


# ---------------------------------------------------------------- datasets
def _has_held_out(scene: Scene) -> bool:
    return any(held_out(o.colour, o.shape) for o in scene.objects)


def write_imagefolder(out_dir, n: int, size: int = 64, seed: int = 0, kinds=None,
                      exclude_held_out: bool = True) -> Path:
    """Write n rendered scenes plus `metadata.jsonl` (file_name, text, scene) to `out_dir`."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    allow = (lambda c, s: not held_out(c, s)) if exclude_held_out else None
    eval_texts = {p.lower() for p in eval_prompts()}  # the eval prompts themselves are never trained on
    width = max(5, len(str(n)))
    with open(out / "metadata.jsonl", "w") as meta:
        for i in range(n):
            rng = random.Random(f"scenes:{seed}:{i}")
            scene = random_scene(rng, kinds or KINDS, allow)
            text = caption(scene, rng)
            if text.lower() in eval_texts:
                continue
            name = f"{i + 1:0{width}d}.png"
            render(scene, size).save(out / name)
            record = {"file_name": name, "text": text, "scene": asdict(scene)}
            meta.write(json.dumps(record) + "\n")
    return out


def eval_prompts(seed: int = 2024, per_category: int = 50) -> list[str]:
    """The fixed evaluation prompts: every prompt names at least one held-out combination."""
    rng, prompts = random.Random(f"eval-prompts:{seed}"), []
    for k, kind in enumerate(KINDS):
        chosen: list[str] = []
        while len(chosen) < per_category:
            scene = random_scene(rng, (kind,))
            colour, shape = HELD_OUT[(len(chosen) + k) % len(HELD_OUT)]
            objs = list(scene.objects)
            objs[0] = replace(objs[0], colour=colour, shape=shape)
            if len(objs) > 1 and (objs[1].colour, objs[1].shape) == (colour, shape):
                continue
            text = caption(replace(scene, objects=tuple(objs)), rng)
            if text not in chosen and text not in prompts:
                chosen.append(text)
        prompts += chosen
    return prompts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm.shapes.scenes", description=__doc__)
    p.add_argument("out", nargs="?", help="output imagefolder")
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=None,
                   help="scene kinds to draw from, uniformly; repeat a kind to draw it more often")
    p.add_argument("--include-held-out", action="store_true")
    p.add_argument("--eval-prompts", metavar="PATH", help="write the fixed eval prompt list")
    args = p.parse_args(argv)
    if args.eval_prompts:
        Path(args.eval_prompts).write_text(eval_prompts_file())
    if args.out:
        write_imagefolder(args.out, args.n, args.size, args.seed, args.kinds,
                          not args.include_held_out)
    elif not args.eval_prompts:
        p.error("give OUT and/or --eval-prompts")
    return 0


def eval_prompts_file() -> str:
    """Text of configs/eval_prompts.txt (header comments + one prompt per line)."""
    combos = ", ".join(f"{c} {s}" for c, s in HELD_OUT)
    header = ("# Fixed eval prompts, generated once by `python -m ldm.shapes.scenes --eval-prompts "
              "configs/eval_prompts.txt` (eval_prompts(seed=2024)).\n"
              f"# Held out of training (write_imagefolder default): {combos}\n"
              "# Every prompt names at least one held-out (colour, shape); 50 per category "
              "(single, colour = object + background, position, counting, two_objects).\n")
    return header + "\n".join(eval_prompts()) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
