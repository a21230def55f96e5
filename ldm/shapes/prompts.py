"""Prompt vocabulary and parser for the shape-scene world.

`parse(prompt)` turns a caption or a simple user prompt ("a red circle on the left", "two blue
stars", "a pink heart above a green ring") into a `PromptSpec`: objects (shape, colour, count, size,
position), an optional relation between two objects and an optional background colour.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (255, 128, 0), "yellow": (250, 225, 40),
    "green": (40, 170, 50), "cyan": (0, 200, 220), "blue": (30, 70, 230),
    "purple": (130, 50, 180), "pink": (255, 80, 170), "brown": (160, 95, 35),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light grey": (200, 200, 200), "dark grey": (50, 50, 50),
    "beige": (235, 215, 170), "navy": (20, 30, 80),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
RELATIONS = ("left_of", "right_of", "above", "below")
CATEGORIES = ("single", "colour", "position", "counting", "two_objects")
INVERSE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}

_PHRASES = [  # (regex, replacement) applied in order on the lower-cased prompt
    (r"\bof (?:the|this) (?:image|picture|canvas|frame|scene|drawing)\b", ""),
    (r"\bgray\b", "grey"), (r"\bcolou?red\b", "colour"), (r"\bcent(?:er|re)\b", "centre"),
    (r"\bnavy blue\b|\bdark navy\b", "navy"), (r"\blight grey\b", "light_grey"),
    (r"\bdark grey\b", "dark_grey"),
    (r"\b(?:to|on) the left(?: hand)?(?: side)? of\b|\bleft of\b", " rel_left_of "),
    (r"\b(?:to|on) the right(?: hand)?(?: side)? of\b|\bright of\b", " rel_right_of "),
    (r"\bon top of\b|\babove\b|\bover\b", " rel_above "),
    (r"\bunderneath\b|\bbeneath\b|\bbelow\b|\bunder\b", " rel_below "),
    (r"\bbackdrop\b", "background"), (r"\ba pair of\b", "two"),
]
_COUNTS = {"a": 1, "an": 1, "one": 1, "single": 1, "1": 1, "two": 2, "2": 2, "three": 3, "3": 3,
           "four": 4, "4": 4, "five": 5, "5": 5}
SHAPE_WORDS = {s: s for s in SHAPES} | {
    "circles": "circle", "disc": "circle", "discs": "circle", "disk": "circle", "disks": "circle",
    "squares": "square", "triangles": "triangle", "diamonds": "diamond", "rhombus": "diamond",
    "stars": "star", "crosses": "cross", "plus": "cross", "rings": "ring", "donut": "ring",
    "doughnut": "ring", "donuts": "ring", "hearts": "heart"}
COLOUR_WORDS = {c: c for c in COLOURS} | {"violet": "purple", "turquoise": "cyan"}
_BG_WORDS = {"light_grey": "light grey", "dark_grey": "dark grey", "beige": "beige",
             "navy": "navy"}
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large",
               "big": "large", "huge": "large"}
_POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "upper": "top",
                   "bottom": "bottom", "lower": "bottom", "centre": "centre", "middle": "centre",
                   "central": "centre"}


@dataclass(frozen=True)
class ObjectSpec:
    """One kind of object in a prompt: `count` instances of a (colour) shape."""
    shape: str
    colour: str | None = None
    count: int = 1
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt. With `relation`, objects[0] stands in that relation to objects[1]."""
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    background: str | None = None

    @property
    def category(self) -> str:
        """Evaluation category, from the prompt's structure (GenEval-like)."""
        if len(self.objects) >= 2:
            return "two_objects"
        obj = self.objects[0]
        if obj.count >= 2:
            return "counting"
        if obj.position is not None:
            return "position"
        return "colour" if self.background is not None else "single"

    def canonical(self) -> "PromptSpec":
        """Equivalent spec with relation in {left_of, above} and unrelated objects sorted."""
        objs, rel = self.objects, self.relation
        if rel in ("right_of", "below"):
            objs, rel = (objs[1], objs[0]) + objs[2:], INVERSE[rel]
        elif rel is None:
            objs = tuple(sorted(objs, key=lambda o: (o.shape, o.colour or "", o.count)))
        return replace(self, objects=objs, relation=rel)


def _tokens(prompt: str) -> list[str]:
    text = prompt.lower()
    for pattern, repl in _PHRASES:
        text = re.sub(pattern, repl, text)
    return re.findall(r"[a-z_0-9]+|,|\.|;", text)


def _is_prefix_colour(tokens: list[str], i: int) -> bool:
    """A colour at i that is followed (after size words) by a shape qualifies that shape."""
    j = i + 1
    while j < len(tokens) and (tokens[j] in _SIZE_WORDS or tokens[j] in ("and", "shaped")):
        j += 1
    return j < len(tokens) and tokens[j] in SHAPE_WORDS


def _background(tokens: list[str]) -> tuple[str | None, set[int]]:
    """Background colour named next to 'background' and the token indices it used."""
    for i, tok in enumerate(tokens):
        if tok != "background":
            continue
        near = [j for j in (i - 1, i - 2, i + 2, i + 3) if 0 <= j < len(tokens)]
        for j in near:
            word = tokens[j]
            if word in _BG_WORDS:
                return _BG_WORDS[word], {i, j}
            if word in COLOUR_WORDS or word in ("white", "black", "grey"):
                raise ValueError(f"unsupported background colour {word!r}; "
                                 f"use one of {sorted(BACKGROUNDS)}")
        return None, {i}
    for i, tok in enumerate(tokens):
        if tok in ("light_grey", "dark_grey", "beige", "navy"):
            return _BG_WORDS[tok], {i}
    return None, set()


def parse(prompt: str) -> PromptSpec:
    """Parse a prompt; raises ValueError when no shape or an inconsistent structure is found."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")
    tokens = _tokens(prompt)
    background, used = _background(tokens)
    objects: list[dict] = []
    pending: dict = {}
    pending_pos: str | None = None
    separated = False  # a separator was seen since the last object
    relation: tuple[int, str] | None = None  # (index of the subject object, relation)
    for i, tok in enumerate(tokens):
        if i in used:
            pending = {}
        elif tok in ("a", "an"):
            pending.setdefault("count", 1)
        elif tok in _COUNTS:
            pending["count"] = _COUNTS[tok]
        elif tok in _SIZE_WORDS:
            pending["size"] = _SIZE_WORDS[tok]
        elif tok in COLOUR_WORDS:
            if _is_prefix_colour(tokens, i) or not objects or objects[-1].get("colour"):
                pending["colour"] = COLOUR_WORDS[tok]
            else:
                objects[-1]["colour"] = COLOUR_WORDS[tok]
        elif tok in SHAPE_WORDS:
            obj = {"shape": SHAPE_WORDS[tok], "count": 1} | pending
            if pending_pos is not None:
                obj["position"], pending_pos = pending_pos, None
            objects.append(obj)
            pending, separated = {}, False
        elif tok in _POSITION_WORDS:
            pos = _POSITION_WORDS[tok]
            more_shapes = any(t in SHAPE_WORDS for t in tokens[i + 1:])
            if objects and (not separated or not more_shapes):
                if objects[-1].get("position") not in (None, pos):
                    raise ValueError(f"two positions for one object in {prompt!r}")
                objects[-1]["position"] = pos
            else:
                pending_pos = pos
        elif tok.startswith("rel_"):
            if not objects or relation is not None:
                raise ValueError(f"cannot attach the relation in {prompt!r}")
            relation = (len(objects) - 1, tok[4:])
        elif tok in ("and", ",", ";", ".", "with", "while"):
            separated = True
    if not objects:
        raise ValueError(f"no known shape in {prompt!r}; shapes: {', '.join(SHAPES)}")
    specs = tuple(ObjectSpec(**o) for o in objects)
    rel = None
    if relation is not None:
        if len(specs) != 2 or relation[0] != 0:
            raise ValueError(f"a relation needs exactly two objects, one on each side: {prompt!r}")
        rel = relation[1]
    return PromptSpec(specs, rel, background)
