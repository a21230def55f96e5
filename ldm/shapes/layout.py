"""Layout planners: prompt -> regions (`ldm.regions.Region`), the first stage of LLM-grounded
diffusion (Lian et al. 2023) with a grammar parser in the LLM's place.

Registered as the "scenes" planner (pyproject's `ldm.layout_planners` entry points, read by
`ldm.planners`). A model names its planner in `LDMConfig.layout_planner`; the pipeline plans each prompt with it
unless the caller gives regions or turns them off. A prompt the planner has no layout for (one
kind of object, or text it can't parse) is drawn as it is.
"""
from __future__ import annotations

from ..regions import Region

HALVES = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0),
          "top": (0.0, 0.0, 1.0, 0.5), "bottom": (0.0, 0.5, 1.0, 1.0)}
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_SIDES = {"left_of": ("left", "right"), "right_of": ("right", "left"), "above": ("top", "bottom"),
          "below": ("bottom", "top")}
_NUMBER = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}


def _phrase(obj, side: str, background: str | None) -> str:
    """One object of a scene prompt as its own caption, in the training captions' words."""
    from .scenes import shape_noun
    words = [_NUMBER.get(obj.count, str(obj.count)), obj.size, obj.colour, shape_noun(obj.shape, obj.count),
             _WHERE[side]]
    text = " ".join(w for w in words if w)
    return text + (f" on a {background} background" if background else "")


def plan_scene(prompt: str) -> list[Region]:
    """Shape-scene prompts (`ldm.shapes.scenes`) with two kinds of object: one half of the image each,
    the halves chosen by the relation ("above" -> top and bottom), by the objects' own positions,
    or else the first object on the left. Other prompts: no regions."""
    from .prompts import parse  # the scene grammar's parser, shared with the evaluator
    try:
        spec = parse(prompt)
    except ValueError:
        return []
    if len(spec.objects) != 2:
        return []
    named = tuple(o.position for o in spec.objects)
    if spec.relation is not None:
        sides = _SIDES[spec.relation]
    elif all(p in HALVES for p in named) and named[0] != named[1]:
        sides = named
    else:
        sides = ("left", "right")
    return [Region(_phrase(o, side, spec.background), HALVES[side]) for o, side in zip(spec.objects, sides)]

