"""Image-caption folders for training. Captions come from a Hugging Face imagefolder
`metadata.jsonl`/`metadata.csv` (`file_name` + a caption column) or from sidecar `name.txt` files.
`scan_folder` decodes every image and reports bad input before training: files that do not decode
are skipped with a warning that counts and names them, and a folder where none decodes is an error.
An image that fails to decode later (changed since) is replaced by the next one and counted.
Per-sample randomness (crop, flip, caption dropout) is seeded by (seed, epoch, index), so a resumed
run draws exactly what the interrupted one would have."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .state import state_hash

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str | None


@dataclass
class FolderReport:
    items: list[Item]                                      # readable images, sorted by path
    unreadable: list[str] = field(default_factory=list)    # skipped: the file does not decode
    small: list[str] = field(default_factory=list)         # shorter side < resolution: upscaled
    uncaptioned: list[str] = field(default_factory=list)   # trained with "" (when allowed)
    missing_files: list[str] = field(default_factory=list) # metadata rows naming no file

    def warnings(self, resolution: int) -> list[str]:
        out = []
        if self.small:
            out.append(f"{len(self.small)} image(s) are smaller than {resolution} px and will be "
                       f"upscaled: {_names(self.small)}")
        if self.unreadable:
            out.append(f"{len(self.unreadable)} unreadable image file(s) will be skipped: {_names(self.unreadable)}")
        if self.uncaptioned:
            out.append(f"{len(self.uncaptioned)} image(s) have no caption and train with the empty "
                       f"caption: {_names(self.uncaptioned)}")
        if self.missing_files:
            out.append(f"{len(self.missing_files)} metadata row(s) name missing files: {_names(self.missing_files)}")
        return out


def _names(names: list[str], n: int = 10) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _read_metadata(root: Path, column: str) -> tuple[dict[Path, str], list[str]]:
    """{image path: caption} from every metadata.jsonl / metadata.csv under root (HF imagefolder:
    `file_name` is relative to the metadata file's folder), and the rows naming missing files."""
    captions, missing = {}, []
    for meta in sorted(root.rglob("metadata.jsonl")) + sorted(root.rglob("metadata.csv")):
        if meta.suffix == ".jsonl":
            rows = []
            for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{meta} line {n} is not valid JSON: {e}") from e
        else:
            with open(meta, newline="", encoding="utf-8") as f:
                rows = list(enumerate(csv.DictReader(f), 2))
        for n, row in rows:
            if not isinstance(row, dict) or "file_name" not in row:
                raise ValueError(f"{meta} line {n} has no 'file_name' (HF imagefolder format: "
                                 f'{{"file_name": "a.png", "{column}": "a caption"}})')
            if column not in row:
                others = sorted(k for k in row if k != "file_name")
                raise ValueError(f"{meta} line {n} has no caption column {column!r} (it has: "
                                 f"{', '.join(others) or 'nothing else'}); set data.caption_column")
            path = (meta.parent / row["file_name"]).resolve()
            if path.is_file():
                captions[path] = "" if row[column] is None else str(row[column])
            else:
                missing.append(f"{meta.name}:{n}:{row['file_name']}")
    return captions, missing


def scan_folder(root: str | Path, resolution: int, caption_column: str = "text",
                captions: str = "required") -> FolderReport:
    """Find images and their captions and check them; raise ValueError on what stops training.
    captions: "required" (captionless images are an error), "optional" (they get ""), "ignore".
    Every image is decoded in full, as training will (a header can be fine and the data cut off).
    Files that fail are skipped, as a scraped folder's few broken files should not stop a run, but
    named in `warnings()` (count and first names); if none decodes, a ValueError names the folder,
    the first bad files and the first one's error."""
    root = Path(root)
    if not str(root) or not root.is_dir():
        raise ValueError(f"dataset folder {str(root)!r} does not exist: set data.path to a folder of "
                         f"images (with metadata.jsonl or name.txt captions)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise ValueError(f"dataset folder {root} holds no images ({', '.join(IMAGE_EXTS)})")
    meta, missing = _read_metadata(root, caption_column) if captions != "ignore" else ({}, [])
    report, first_error = FolderReport(items=[], missing_files=missing), ""
    for path in files:
        rel = str(path.relative_to(root))
        try:
            with Image.open(path) as im:
                w, h = im.size
                im.draft("RGB", (max(resolution, 1),) * 2)  # JPEG: decode at a reduced scale, still all data
                im.load()
        except DECODE_ERRORS as e:
            report.unreadable.append(rel)
            first_error = first_error or f"{rel}: {e}"
            continue
        if min(w, h) < resolution:
            report.small.append(f"{rel} ({w}×{h})")
        caption = meta.get(path.resolve())
        sidecar = path.with_suffix(".txt")
        if caption is None and sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8").strip()
        if caption is None and captions != "ignore":
            report.uncaptioned.append(rel)
        report.items.append(Item(path, caption))
    if captions == "required" and report.uncaptioned:
        raise ValueError(
            f"{len(report.uncaptioned)} of {len(files)} images in {root} have no caption: "
            f"{_names(report.uncaptioned)}. Give each a line in metadata.jsonl "
            f'({{"file_name": ..., "{caption_column}": ...}}) or a sidecar .txt file, '
            f"or set data.allow_uncaptioned=true to train them with the empty caption.")
    if not report.items:
        raise ValueError(f"none of the {len(files)} images in {root} can be decoded: {_names(report.unreadable)} "
                         f"(first error: {first_error})")
    return report


def training_images(data, resolution: int, seed: int, captions: str) -> tuple[FolderReport, list, list]:
    """(report, train items, held-out items) of the folder a DataConfig names: scanned at `resolution`,
    cut to data.limit, split by data.holdout."""
    report = scan_folder(data.path, resolution, data.caption_column, captions)
    items = report.items[:data.limit] if data.limit else report.items
    return (report, *split_holdout(items, data.holdout, seed))


def split_holdout(items: list, holdout: float, seed: int = 0) -> tuple[list, list]:
    """(train, held_out): `holdout` is a fraction (< 1) or a count (≥ 1); the choice depends only on
    the seed and the sorted file list."""
    n = len(items)
    k = int(round(holdout * n)) if holdout < 1 else int(holdout)
    if k == 0:
        return list(items), []
    if k >= n:
        raise ValueError(f"data.holdout={holdout} keeps {k} of {n} images out of training: none would be left")
    order = random.Random(f"holdout-{seed}").sample(range(n), n)
    held = set(order[:k])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def load_image(path: Path, resolution: int, center_crop: bool, flip: bool, rng: random.Random,
               resize: int = 0) -> torch.Tensor:
    """Resize the shorter side to `resize` (0: `resolution`), crop a square of `resolution`, maybe
    flip -> (3, R, R) in [-1, 1]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    w, h = im.size
    side = max(resize, resolution)
    s = side / min(w, h)
    if (w, h) != (round(w * s), round(h * s)):
        im = im.resize((max(side, round(w * s)), max(side, round(h * s))), Image.Resampling.BICUBIC)
    w, h = im.size
    left = (w - resolution) // 2 if center_crop else rng.randint(0, w - resolution)
    top = (h - resolution) // 2 if center_crop else rng.randint(0, h - resolution)
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)  # (3, R, R)
    return x / 127.5 - 1.0


class ImageCaptionDataset(Dataset):
    """{"x": (3, R, R), "caption": str, "seed": int, "skipped": int} per item."""

    def __init__(self, items: list[Item], resolution: int, center_crop: bool = True,
                 random_flip: bool = False, seed: int = 0, resize: int = 0):
        self.items, self.resolution, self.resize = items, resolution, resize
        self.center_crop, self.random_flip, self.seed, self.epoch = center_crop, random_flip, seed, 0

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:  # called by Accelerate's DataLoaderShard.set_epoch
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        seed = hash((self.seed, self.epoch, index))
        rng = random.Random(seed)
        for skipped in range(len(self.items)):
            item = self.items[(index + skipped) % len(self.items)]
            try:
                x = load_image(item.path, self.resolution, self.center_crop, self.random_flip, rng, self.resize)
            except DECODE_ERRORS as e:
                # a corrupt file must not end an epoch: take the next image, count the skip
                log.warning("skipping unreadable image %s: %s", item.path, e)
                continue
            return {"x": x, "caption": item.caption or "", "seed": seed, "skipped": skipped}
        raise RuntimeError(f"no image of the dataset can be decoded (tried {len(self.items)})")


def caption_collate(samples: list[dict], tokenize=None, cond_drop: float = 0.0) -> dict:
    """Stack a batch; with probability cond_drop a caption becomes "" (the null condition ∅), so one
    model learns ε(x, y) and ε(x, ∅) for classifier-free guidance (Ho & Salimans 2022)."""
    rng = random.Random(f"cond-drop-{samples[0]['seed']}")  # seeded by the batch: resumable
    captions = []
    for s in samples:
        caption = s["caption"]
        if rng.random() < cond_drop:
            caption = ""
        captions.append(caption)
    key = "moments" if "moments" in samples[0] else "x"
    batch = {key: torch.stack([s[key] for s in samples]), "captions": captions,
             "skipped": torch.tensor(sum(s["skipped"] for s in samples))}
    if tokenize is not None:
        batch["tokens"] = tokenize(captions)  # (B, L)
    return batch


def train_loader(dataset: Dataset, cfg, collate=caption_collate) -> DataLoader:
    """Shuffled batches of cfg.batch_size, the order fixed by cfg.seed (the global RNG stays untouched)."""
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                      num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(cfg.seed))


# ---------------------------------------------------------------------------------------------
# Cached latents: the posterior moments of each image (and of its mirror image with random_flip)


def latent_cache_path(folder: str | Path, items, load_res: int, random_flip: bool, autoencoder) -> Path:
    """folder/latents/<hash>.npy: a new autoencoder, resolution, flip setting or image file gets a
    new cache."""
    fingerprint = [load_res, random_flip, state_hash(autoencoder.state_dict())]
    fingerprint += [(str(i.path), i.path.stat().st_mtime_ns) for i in items]
    return Path(folder) / "latents" / f"{hashlib.sha256(repr(fingerprint).encode()).hexdigest()[:16]}.npy"


class CachedLatentDataset(Dataset):
    """{"moments": (2C, h, w) mean and logvar, "caption", "seed", "skipped": 0} from a cache file;
    images that failed to decode while caching (NaN rows) are left out and counted in `unreadable`."""

    def __init__(self, items: list[Item], cache_path: str | Path, seed: int = 0):
        self.seed, self.epoch = seed, 0
        self.moments = np.load(cache_path, mmap_mode="r")  # (N, F, 2C, h, w) float16, F = 1 or 2 flips
        if len(self.moments) != len(items):
            raise ValueError(f"latent cache {cache_path} holds {len(self.moments)} images, the dataset {len(items)}")
        self.rows = [i for i in range(len(items)) if not np.isnan(self.moments[i, 0, 0, 0, 0])]
        self.items, self.unreadable = items, len(items) - len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        seed = hash((self.seed, self.epoch, index))
        row, flip = self.rows[index], random.Random(seed).randrange(self.moments.shape[1])
        m = torch.from_numpy(np.array(self.moments[row, flip], dtype=np.float32))
        return {"moments": m, "caption": self.items[row].caption or "", "seed": seed, "skipped": 0}


@torch.no_grad()
def build_latent_cache(items: list[Item], encode, path: str | Path, resolution: int, random_flip: bool,
                       batch_size: int = 8, progress=None) -> Path:
    """Encode every image (center crop; also mirrored with random_flip) with `encode(x) -> moments
    (B, 2C, h, w)` and write them atomically to `path` (.npy). Images that fail to decode get NaN
    rows, which CachedLatentDataset leaves out."""
    path = Path(path)
    flips = (False, True) if random_flip else (False,)
    out = None
    tmp = path.with_name(f".{path.name}.tmp.npy")
    path.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        for f, flip in enumerate(flips):
            xs, bad = [], []
            for j, item in enumerate(chunk):
                try:
                    x = load_image(item.path, resolution, True, False, random.Random(0))
                except DECODE_ERRORS as e:
                    log.warning("latent cache: skipping unreadable image %s: %s", item.path, e)
                    bad.append(j)
                    x = torch.zeros(3, resolution, resolution)
                xs.append(x.flip(-1) if flip else x)
            m = encode(torch.stack(xs)).float().cpu().numpy()  # (b, 2C, h, w)
            m[bad] = np.nan
            if out is None:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                                shape=(len(items), len(flips)) + m.shape[1:])
            out[start:start + len(chunk), f] = m
        if progress is not None:
            progress(min(start + batch_size, len(items)))
    out.flush()
    del out
    tmp.replace(path)
    return path
