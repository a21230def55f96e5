"""docs/binding_probe.py's third probe: does the prompt or the starting noise decide where each colour
goes? Checked with stand-in pipelines that render the scenes: one whose layout follows the words,
one that cannot tell which colour was named first."""
import importlib.util
import re
from pathlib import Path

import pytest

from ldm.shapes.scenes import COLOURS, render, scene_from_prompt

spec = importlib.util.spec_from_file_location("binding_probe", Path(__file__).parents[1] / "docs" / "binding_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_exchange_swaps_two_words_once_each():
    assert probe.exchange("A red circle left of a blue square.", "red", "blue") == "A blue circle left of a red square."
    assert probe.exchange("a red circle, a blue square", "circle", "square") == "a red square, a blue circle"
    assert probe.exchange("a red circle and a red square", "red", "blue") is None   # "red" twice, "blue" never


class FollowsThePrompt:
    """Renders each prompt's scene; the seed fixes the layout cells, the words fix what goes where."""

    def __call__(self, prompts, seed):
        return [render(scene_from_prompt(p, seed=f"{seed}:{i}"), 128) for i, p in enumerate(prompts)]


class FollowsTheNoise(FollowsThePrompt):
    """Blind to which colour is named first: it draws the prompt with its colours in sorted order."""

    def __call__(self, prompts, seed):
        def canonical(p):
            found = [w for w in re.findall(r"[a-z]+", p) if w in COLOURS]
            return probe.exchange(p, *found) if len(found) == 2 and found != sorted(found) else p
        return super().__call__([canonical(p) for p in prompts], seed)


@pytest.mark.parametrize("pipe, decides", [(FollowsThePrompt(), "prompt decides"), (FollowsTheNoise(), "noise decides")])
def test_seed_or_text_tells_who_places_the_colours(pipe, decides):
    counts = probe.seed_or_text(pipe, 12, "colour")
    assert counts[decides] >= 9 and sum(counts.values()) >= 10, counts
