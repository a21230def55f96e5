"""The package's shape, as README's Layout states it: the SD core imports neither the default model's
shape world (ldm/shapes) nor the training package (ldm/training), the training package does not
know the command line, and no module imports itself back through others. Every import counts, the
lazy ones inside functions too: a lazy import hides a circle, it doesn't remove it."""
import ast
from pathlib import Path

import ldm

ROOT = Path(ldm.__file__).parent
PERIPHERY = ("ldm.shapes", "ldm.training")  # above the core: they use it, it never uses them
TOP = {"ldm.cli"}   # the command line may offer the shape world's `ldm eval`


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The ldm modules `path` imports, anywhere in the file."""
    name, out = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ldm")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("ldm"):
                # `from . import x` names modules; `from .m import f` names m
                out |= {f"{base}.{a.name}" if (ROOT.parent / f"{base}.{a.name}".replace(".", "/")).with_suffix(".py").exists()
                        or (ROOT.parent / f"{base}.{a.name}".replace(".", "/")).is_dir() else base for a in node.names}
    return {m for m in out if m != name}


GRAPH = {module_name(p): imports_of(p) for p in ROOT.rglob("*.py")}


def in_periphery(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in PERIPHERY)


def test_the_core_imports_neither_the_shape_world_nor_training():
    core = {m for m in GRAPH if not in_periphery(m) and m not in TOP}
    assert {"ldm.pipeline", "ldm.samplers", "ldm.checkpoint"} <= core
    assert {"ldm.shapes.scenes", "ldm.training.run"} <= set(GRAPH) - core
    bad = {m: sorted(i for i in GRAPH[m] if in_periphery(i)) for m in sorted(core)}
    assert {m: b for m, b in bad.items() if b} == {}


def test_training_does_not_know_the_command_line():
    training = [m for m in GRAPH if m.startswith("ldm.training")]
    assert len(training) >= 5
    assert {m: sorted(GRAPH[m] & TOP) for m in training if GRAPH[m] & TOP} == {}


def test_no_import_circles():
    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in GRAPH.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in seen and nxt in GRAPH:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None
    circles = [c for m in sorted(GRAPH) if (c := cycle_from(m))]
    assert circles == []
