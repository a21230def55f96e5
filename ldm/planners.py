"""Layout planners by name. A model's config may name one (`LDMConfig.layout_planner`): a function
prompt -> list of `ldm.regions.Region`. Packages provide planners through the `ldm.layout_planners`
entry-point group (the shape world's "scenes" is declared in pyproject.toml), so the core resolves a
name without importing the package that implements it."""
from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import Callable

GROUP = "ldm.layout_planners"


@cache
def planner(name: str) -> Callable:
    """The planner registered as `name`; ValueError naming the known ones."""
    found = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in found:
        known = ", ".join(sorted(found)) or "none (reinstall ldm: pip install -e .)"
        raise ValueError(f"unknown layout planner {name!r}; known: {known}")
    return found[name].load()
