"""Images in for the metrics: folders listed in a fixed order, files read once (bytes → content hash
and pixels), unreadable files skipped with a warning, and clean-fid's "clean" resize."""
from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SIZE = 299                                        # Inception-v3's input side


class UnreadableImageWarning(UserWarning):
    """A file with an image extension that PIL cannot decode; it is left out of the metric."""


def image_files(folder) -> list[Path]:
    """The image files under `folder` (recursively, as clean-fid), sorted; ValueError if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder of images (give a folder, or a .npz of reference statistics)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(EXTENSIONS)})")
    return files


def read_bytes(path: Path) -> tuple[bytes, str]:
    """The file's bytes and their sha256 (the feature cache's key)."""
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def decode_rgb(data: bytes, name) -> np.ndarray | None:
    """(H, W, 3) uint8 — grayscale, palette and RGBA read as RGB, as clean-fid's
    `Image.open(path).convert("RGB")` — or None with a warning naming the file."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        reason = "not an image format PIL knows, or a damaged header"
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e)
    warnings.warn(f"{name}: can't read it as an image ({reason}); skipped", UnreadableImageWarning, stacklevel=3)
    return None


def clean_resize(rgb: np.ndarray, size: int = SIZE) -> np.ndarray:
    """clean-fid's "clean" mode (Parmar et al. 2022): each channel as a float32 PIL image (mode "F"),
    bicubic to size × size with PIL's antialiasing, clipped to [0, 255]; (size, size, 3) float32."""
    channels = [np.asarray(Image.fromarray(rgb[:, :, c].astype(np.float32)).resize((size, size), Image.BICUBIC))
                for c in range(3)]
    return np.stack(channels, axis=2).clip(0, 255).astype(np.float32)
