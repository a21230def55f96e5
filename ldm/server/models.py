"""The checkpoints `ldm serve` offers (A1111's /sd-models): the --model it starts with and what
--models-dir holds (.safetensors files and diffusers folders), under A1111's titles
`NAME [HASH]`, found by any of the names A1111 accepts for `sd_model_checkpoint`."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def short_hash(path: Path) -> str:
    """`ldm generate`'s model hash (sha256[:10]), computed once per file."""
    from ..outputs import model_hash
    return model_hash(path)


@dataclass(frozen=True)
class Entry:
    path: Path

    @property
    def hash(self) -> str:
        return short_hash(self.path)

    @property
    def title(self) -> str:
        return f"{self.path.name} [{self.hash}]"

    def names(self) -> set[str]:
        """What A1111 takes as this checkpoint's name (its checkpoint_aliases)."""
        return {self.title, self.path.name, self.path.stem, self.hash, str(self.path)}

    def item(self) -> dict:
        return dict(title=self.title, model_name=self.path.stem, hash=self.hash, sha256=None,
                    filename=str(self.path), config=None)


def scan(model: Path, models_dir: Path | None) -> list[Entry]:
    """The start model first, then the folder's checkpoints in name order."""
    found = [Entry(model.resolve())]
    if models_dir is not None:
        for p in sorted(models_dir.iterdir()):
            if p.suffix == ".safetensors" or (p / "model_index.json").is_file():
                if p.resolve() != found[0].path:
                    found.append(Entry(p.resolve()))
    return found


def find(entries: list[Entry], name: str) -> Entry:
    """The checkpoint named `name`; ValueError listing the titles otherwise."""
    for e in entries:
        if name in e.names():
            return e
    titles = ", ".join(e.title for e in entries)
    raise ValueError(f"no checkpoint named {name!r}; these are served: {titles}")
