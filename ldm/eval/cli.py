"""`ldm eval`: prompt-adherence accuracy of a folder of images.

DIR holds images plus a metadata.jsonl with `file_name` and `text` per line (the imagefolder
format written by `ldm.data.scenes`). Prints per-category accuracy and overall; --json saves it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from ldm.eval.adherence import evaluate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", metavar="DIR",
                        help="folder with images and metadata.jsonl (file_name, text)")
    parser.add_argument("--json", metavar="PATH", help="write the results (with per-image rows)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images")
    parser.add_argument("--failures", action="store_true", help="also list the failed prompts")


def load_imagefolder(folder, limit: int | None = None) -> tuple[list[Image.Image], list[str]]:
    """Images and prompts listed in `folder/metadata.jsonl`."""
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise ValueError(f"{meta} not found (expected lines with file_name and text)")
    images, prompts = [], []
    with open(meta) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "file_name" not in row or "text" not in row:
                raise ValueError(f"{meta}:{n}: needs 'file_name' and 'text'")
            with Image.open(folder / row["file_name"]) as img:
                images.append(img.convert("RGB"))
            prompts.append(row["text"])
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise ValueError(f"{meta} lists no images")
    return images, prompts


def format_table(result: dict) -> str:
    """Plain-text table: one row per category, then overall."""
    lines = [f"{'category':<12} {'n':>5} {'accuracy':>9}"]
    for cat, row in result["categories"].items():
        lines.append(f"{cat:<12} {row['n']:>5} {row['accuracy']:>9.3f}")
    lines.append(f"{'overall':<12} {result['n']:>5} {result['overall']:>9.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "images", None):
        raise ValueError("ldm eval needs --images DIR")
    images, prompts = load_imagefolder(args.images, getattr(args, "limit", None))
    result = evaluate(images, prompts)
    print(format_table(result))
    if getattr(args, "failures", False):
        for r in result["results"]:
            if not r["correct"]:
                print(f"FAIL [{r['category']}] {r['prompt']!r}: {r['reason']}")
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ldm eval", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
