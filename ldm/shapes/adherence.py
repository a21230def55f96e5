"""Prompt adherence of images, per GenEval-style category (single, colour, position, counting,
two_objects). A prompt passes when everything it specifies holds in the detections: colour and
shape of each object, size and position if named, exact count for counting prompts (at least the
count otherwise), the relation between two objects, and the background colour if named.
"""
from __future__ import annotations

from dataclasses import replace

from ldm.shapes.detect import Detection, detect
from ldm.shapes.prompts import CATEGORIES, ObjectSpec, PromptSpec, parse

RELATION_MARGIN = 0.1  # minimum centre offset (fraction of the image) along the relation's axis


def _matches(det: Detection, obj: ObjectSpec) -> bool:
    return (det.shape == obj.shape and (obj.colour is None or det.colour == obj.colour)
            and (obj.size is None or det.size == obj.size))


def in_region(det: Detection, position: str) -> bool:
    """Box centre inside the named third of the image (centre: middle third on both axes)."""
    lo, hi = 1 / 3, 2 / 3
    return {"left": det.cx < lo, "right": det.cx > hi, "top": det.cy < lo, "bottom": det.cy > hi,
            "centre": lo <= det.cx <= hi and lo <= det.cy <= hi}[position]


def relation_holds(a: Detection, b: Detection, relation: str) -> bool:
    """`a` is `relation` `b`: offset beyond the margin and dominant along the relation's axis."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # from a to b
    along, across = {"left_of": (dx, dy), "right_of": (-dx, dy),
                     "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along > RELATION_MARGIN and along > abs(across)


def _check_object(dets: list[Detection], obj: ObjectSpec, exact: bool) -> str | None:
    """None if the object is satisfied, else the reason it is not."""
    found = [d for d in dets if _matches(d, obj)]
    if exact and len(found) != obj.count or len(found) < obj.count:
        return f"found {len(found)} x {obj.colour or ''} {obj.shape}, wanted {obj.count}"
    if obj.position is not None:
        placed = [d for d in found if in_region(d, obj.position)]
        if len(placed) < obj.count or exact and len(placed) != len(found):
            return f"{obj.colour or ''} {obj.shape} not at {obj.position}"
    return None


def _swapped(spec: PromptSpec, dets: list[Detection]) -> str | None:
    """The binding failure of two-object prompts, named: both shapes drawn, each in the other's colour."""
    if len(spec.objects) != 2:
        return None
    a, b = spec.objects
    if None in (a.colour, b.colour) or a.colour == b.colour or a.shape == b.shape:
        return None
    crossed = (replace(a, colour=b.colour, size=None), replace(b, colour=a.colour, size=None))
    if all(any(_matches(d, o) for d in dets) for o in crossed):
        return f"colours swapped: {b.colour} {a.shape} and {a.colour} {b.shape}"
    return None


def check(spec: PromptSpec, dets: list[Detection], background: str) -> tuple[bool, str]:
    """(passed, reason) for a parsed prompt against detections and the named background."""
    exact = spec.category == "counting"
    for obj in spec.objects:
        reason = _check_object(dets, obj, exact)
        if reason:
            return False, _swapped(spec, dets) or reason
    if spec.relation is not None:
        a_all = [d for d in dets if _matches(d, spec.objects[0])]
        b_all = [d for d in dets if _matches(d, spec.objects[1])]
        if not any(relation_holds(a, b, spec.relation) for a in a_all for b in b_all if a is not b):
            return False, f"relation {spec.relation} does not hold"
    if spec.background is not None and background != spec.background:
        return False, f"background is {background}, wanted {spec.background}"
    return True, "ok"


def score(image, prompt: str) -> dict:
    """Evaluate one (image, prompt) pair: category, correct (bool), reason, detections."""
    spec = parse(prompt)
    dets, background = detect(image)
    ok, reason = check(spec, dets, background)
    found = [f"{d.size} {d.colour} {d.shape or '?'} @({d.cx:.2f},{d.cy:.2f})" for d in dets]
    return {"prompt": prompt, "category": spec.category, "correct": ok, "reason": reason,
            "detections": found, "background": background}


def aggregate(results: list[dict]) -> dict:
    """Per-category accuracy and count, and overall = mean over the categories present."""
    cats = {}
    for c in CATEGORIES:
        rs = [r for r in results if r["category"] == c]
        if rs:
            cats[c] = {"accuracy": sum(r["correct"] for r in rs) / len(rs), "n": len(rs)}
    overall = sum(v["accuracy"] for v in cats.values()) / len(cats) if cats else 0.0
    return {"categories": cats, "overall": overall, "n": len(results), "results": results}


def evaluate(images: list, prompts: list[str]) -> dict:
    """Score images (PIL or HxWx3 uint8 arrays) against their prompts; see `aggregate`."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if not prompts:
        raise ValueError("nothing to evaluate")
    return aggregate([score(img, p) for img, p in zip(images, prompts)])


def load_prompts(path) -> list[str]:
    """Prompts of a text file, one per line; blank lines and '#' comments are skipped."""
    with open(path) as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]
