"""Classical detection of coloured shapes: background from the border, colour-distance segmentation,
connected components, nearest named colour, and shape from geometric features (fill ratio,
solidity, hole, vertical mass balance, aspect, angular harmonics 3/4/5) matched to prototypes
rendered at the object's own pixel size and edge blur. Pure numpy; large images are box-reduced.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

from ldm.shapes.prompts import BACKGROUNDS, COLOURS, SHAPES

FG_THRESHOLD = 40.0      # RGB distance from the background that counts as foreground
MIN_AREA = 0.004         # components smaller than this fraction of the image are noise
MAX_SHAPE_DISTANCE = 12.0  # prototype distance above which a blob is no known shape
SPLIT_DISTANCE = 120.0   # touching blobs split only into colours at least this far apart
MIX_COST = 0.15         # colour naming: cost per unit of background mixed into a colour
MIN_RING_HOLE = 0.04     # hole fraction (of the filled area) a ring must show
SMALL_LARGE = 0.23       # bounding-box side (fraction of the image) between small and large
_FEATURE_SCALE = np.array([0.05, 0.05, 0.04, 0.03, 0.08, 0.04, 0.04, 0.04])  # see features()
_CANVASES = (28, 34, 40, 47, 54, 64, 78, 94, 112, 134, 160)  # calibration image sides (px)
_BLURS = (0.0, 0.7, 1.4, 2.2, 3.0)                               # calibration Gaussian blurs (px)
_PALETTE = np.array(list(COLOURS.values()), np.float32)
_BG_PALETTE = np.array(list(BACKGROUNDS.values()), np.float32)


@dataclass(frozen=True)
class Detection:
    """One object: named colour and shape (None if unrecognised), size, normalised box centre."""
    shape: str | None
    colour: str
    size: str
    cx: float
    cy: float
    extent: float          # larger box side / image side
    area: float            # fraction of the image
    shape_distance: float  # distance to the nearest shape prototype


def to_array(image) -> np.ndarray:
    """float32 HxWx3 array of an image (PIL, uint8 array, or float array in [0, 1]),
    box-reduced so that its larger side is <= 160 px."""
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype.kind == "f":
            arr = np.clip(arr * 255 if arr.max() <= 1.0 else arr, 0, 255).round()
        image = Image.fromarray(arr.astype(np.uint8))
    image = image.convert("RGB")
    factor = math.ceil(max(image.size) / 160)
    if factor > 1:
        image = image.reduce(factor)
    return np.asarray(image, np.float32)


def background_colour(arr: np.ndarray) -> np.ndarray:
    """Median colour of a border band (objects rarely touch the border)."""
    b = max(1, min(arr.shape[:2]) // 32)
    band = np.concatenate([arr[:b].reshape(-1, 3), arr[-b:].reshape(-1, 3),
                           arr[:, :b].reshape(-1, 3), arr[:, -b:].reshape(-1, 3)])
    return np.median(band, axis=0)


def nearest_background(rgb) -> str:
    d = np.linalg.norm(_BG_PALETTE - np.asarray(rgb, np.float32), axis=1)
    return list(BACKGROUNDS)[int(np.argmin(d))]


def nearest_colour(rgb, background=None) -> str:
    """Nearest named colour. Given the background, a colour may be partly mixed with it (thin or
    blurred objects): distance to the segment bg -> colour over coverage t in [0.5, 1], plus a
    small cost for t < 1."""
    rgb = np.asarray(rgb, np.float32)
    if background is None:
        return list(COLOURS)[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=1)))]
    bg = np.asarray(background, np.float32)
    span = _PALETTE - bg
    t = np.clip(span @ (rgb - bg) / np.maximum((span ** 2).sum(axis=1), 1e-6), 0.5, 1.0)
    mixed = bg + t[:, None] * span
    cost = np.linalg.norm(mixed - rgb, axis=1) + MIX_COST * (1 - t) * np.linalg.norm(span, axis=1)
    return list(COLOURS)[int(np.argmin(cost))]


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean mask (run-length union-find): labels 1..n."""
    edges = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = (a.tolist() for a in np.nonzero(edges == 1))
    ends = np.nonzero(edges == -1)[1].tolist()  # exclusive; same row-major order as starts
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev_lo = prev_hi = row_lo = 0  # runs of the previous row: [prev_lo, prev_hi)
    for i, (y, s, e) in enumerate(zip(rows, starts, ends)):
        if i == 0 or y != rows[i - 1]:
            adjacent = i > 0 and rows[i - 1] == y - 1
            prev_lo, prev_hi, row_lo = (row_lo, i, i) if adjacent else (i, i, i)
        for k in range(prev_lo, prev_hi):
            if starts[k] <= e and ends[k] >= s:
                a, b = find(k), find(i)
                parent[max(a, b)] = min(a, b)
    labels = np.zeros(mask.shape, np.int32)
    ids: dict[int, int] = {}
    for i, (y, s, e) in enumerate(zip(rows, starts, ends)):
        labels[y, s:e] = ids.setdefault(find(i), len(ids) + 1)
    return labels, len(ids)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Mask with enclosed background regions filled."""
    outside, _ = label(np.pad(~mask, 1, constant_values=True))
    border = set(np.unique(np.concatenate([outside[0], outside[-1]])))  # the padding is outside
    keep = np.isin(outside, list(border - {0}))[1:-1, 1:-1]
    return ~keep


def _smooth(a: np.ndarray) -> np.ndarray:
    """3x3 binomial smoothing."""
    p = np.pad(a, 1, mode="edge")
    a = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return (a[:, :-2] + 2 * a[:, 1:-1] + a[:, 2:]) / 4


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the mask's pixel squares (monotone chain + shoelace)."""
    pts = set()
    for y in np.flatnonzero(mask.any(axis=1)):
        xs = np.flatnonzero(mask[y])
        for x in (int(xs[0]), int(xs[-1]) + 1):
            pts.update({(x, int(y)), (x, int(y) + 1)})
    pts = sorted(pts)
    if len(pts) < 3:
        return float(mask.sum())

    def half(points):
        out = []
        for p in points:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    hull = half(pts) + half(pts[::-1])
    xs, ys = np.array([p[0] for p in hull], float), np.array([p[1] for p in hull], float)
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def features(alpha: np.ndarray) -> tuple[np.ndarray, dict]:
    """Shape features of a soft coverage map (fill ratio, solidity, hole fraction, vertical mass
    balance, aspect, |3rd|, real 4th and |5th| angular harmonic of the r^2-weighted mass), plus
    box centre, extent, area and edge blur in px."""
    col, row = alpha.max(axis=0), alpha.max(axis=1)
    width, height = float(col.sum()), float(row.sum())
    area = float(alpha.sum())
    ys, xs = np.arange(alpha.shape[0]) + 0.5, np.arange(alpha.shape[1]) + 0.5
    cx, cy = float(col @ xs / width), float(row @ ys / height)
    ymass = 0.5 + (float(alpha.sum(axis=1) @ ys) / area - cy) / height
    mask = alpha > 0.5
    filled = fill_holes(mask)
    n_filled = max(int(filled.sum()), 1)
    smooth = _smooth(alpha) > 0.5  # holes of a few noisy pixels are no holes
    hole = (int(fill_holes(smooth).sum()) - int(smooth.sum())) / max(int(smooth.sum()), 1)
    solidity = n_filled / max(_hull_area(filled), 1.0)
    yy, xx = np.meshgrid(ys - cy, xs - cx, indexing="ij")
    w = alpha * (xx ** 2 + yy ** 2)
    theta = np.arctan2(yy, xx)
    harm = [(w * np.exp(1j * k * theta)).sum() / max(w.sum(), 1e-6) for k in (3, 4, 5)]
    vec = np.array([area / (width * height), solidity, hole, ymass, width / height,
                    abs(harm[0]), harm[1].real, abs(harm[2])])
    gy, gx = np.gradient(alpha)
    blur = float((alpha * (1 - alpha)).sum() / max(np.hypot(gx, gy).sum(), 1e-6))
    return vec, {"cx": cx, "cy": cy, "extent": max(width, height), "area": area, "blur": blur}


@lru_cache(maxsize=1)
def _prototypes() -> np.ndarray:
    """Features of each shape rendered at a range of sizes and Gaussian blurs: [S, B, E, F+3].

    The last three columns are the drawn extent, the measured extent and the edge blur (px);
    `classify_shape` interpolates by the last two, so prototypes match the object's own
    resolution and sharpness, and recovers the drawn extent from the measured one.
    """
    from ldm.shapes.scenes import EXTENT, Scene, SceneObject, render
    table = np.zeros((len(SHAPES), len(_BLURS), len(_CANVASES), len(_FEATURE_SCALE) + 3))
    for e, canvas in enumerate(_CANVASES):
        for s, shape in enumerate(SHAPES):
            scene = Scene((SceneObject(shape, "red", "large", 1, None, ((0.5, 0.5),)),), "beige")
            image = render(scene, canvas)
            for b, sigma in enumerate(_BLURS):
                blurred = to_array(image.filter(ImageFilter.GaussianBlur(sigma)))
                vec, geo, _ = _components(blurred)[0]
                true_extent = EXTENT["large"] * canvas
                table[s, b, e] = np.concatenate([vec, [true_extent, geo["extent"], geo["blur"]]])
    return table


def _lerp(xs: np.ndarray, x: float, rows: np.ndarray) -> np.ndarray:
    """Linear interpolation of `rows` (one per sorted x in xs) at x, clamped at the ends."""
    i = int(np.clip(np.searchsorted(xs, x), 1, len(xs) - 1))
    t = float(np.clip((x - xs[i - 1]) / max(xs[i] - xs[i - 1], 1e-6), 0, 1))
    return (1 - t) * rows[i - 1] + t * rows[i]


def classify_shape(vec: np.ndarray, extent_px: float, blur: float):
    """(shape or None, prototype distance, drawn extent in px) by the nearest prototype at the
    object's measured pixel extent and edge blur."""
    dist, drawn = [], []
    for per_blur in _prototypes():
        at_extent = np.array([_lerp(rows[:, -2], extent_px, rows) for rows in per_blur])
        order = np.argsort(at_extent[:, -1])
        proto = _lerp(at_extent[order, -1], blur, at_extent[order])
        dist.append(float(np.sqrt((((proto[:-3] - vec) / _FEATURE_SCALE) ** 2).sum())))
        drawn.append(float(proto[-3]) * extent_px / max(float(proto[-2]), 1e-6))
    if vec[2] < MIN_RING_HOLE:  # a blurred ring prototype may lose its hole; a ring needs one
        dist[SHAPES.index("ring")] = float("inf")
    best = int(np.argmin(dist))
    if dist[best] > MAX_SHAPE_DISTANCE:
        return None, dist[best], extent_px
    return SHAPES[best], dist[best], drawn[best]


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= out[:, :-1].copy()
    out[:, :-1] |= out[:, 1:].copy()
    return out


def _split_by_colour(arr, comp, dist, min_area) -> list[np.ndarray]:
    """Split a component whose core holds two far-apart palette colours (touching objects)."""
    core = comp & (dist > 0.6 * np.percentile(dist[comp], 95))
    names = np.argmin(np.linalg.norm(arr[core][:, None] - _PALETTE[None], axis=2), axis=1)
    counts = np.bincount(names, minlength=len(_PALETTE))
    enough = max(0.3 * core.sum(), min_area)
    major = [int(k) for k in np.argsort(-counts)[:2] if counts[k] >= enough]
    if len(major) < 2 or np.linalg.norm(_PALETTE[major[0]] - _PALETTE[major[1]]) < SPLIT_DISTANCE:
        return [comp]
    nearest = np.argmin(np.linalg.norm(arr[..., None, :] - _PALETTE[major], axis=-1), axis=-1)
    parts = []
    for k in range(len(major)):
        labels, n = label(comp & (nearest == k))
        parts += [labels == j for j in range(1, n + 1)]
    named = {nearest_colour(np.median(arr[p], axis=0)) for p in parts if p.sum() >= min_area}
    return parts if len(named) >= 2 else [comp]


def _components(arr: np.ndarray, min_area: float = 0.0):
    """(feature vector, geometry, median colour) of every foreground object in an array."""
    bg = background_colour(arr)
    dist = np.linalg.norm(arr - bg, axis=2)
    labels, n = label(dist > FG_THRESHOLD)
    out = []
    for j in range(1, n + 1):
        comp = labels == j
        if comp.sum() < min_area:
            continue
        for part in _split_by_colour(arr, comp, dist, min_area):
            if part.sum() < min_area:
                continue
            core = part & (dist >= np.percentile(dist[part], 75))  # purest quarter
            colour = np.median(arr[core], axis=0)
            direction = colour - bg
            alpha = ((arr - bg) @ direction) / max(float(direction @ direction), 1e-6)
            alpha = np.clip((alpha - 0.2) / 0.6, 0, 1) * _dilate(_dilate(part))  # drop noise floor
            ys, xs = np.nonzero(alpha > 0)
            if len(ys) == 0:
                continue
            box = alpha[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            vec, geo = features(box)
            geo["cx"] += xs.min()
            geo["cy"] += ys.min()
            out.append((vec, geo, colour))
    return out


def detect(image) -> tuple[list[Detection], str]:
    """Objects found in an image, largest first, and the named background colour."""
    arr = to_array(image)
    h, w = arr.shape[:2]
    bg = background_colour(arr)
    dets = []
    for vec, geo, colour in _components(arr, MIN_AREA * h * w):
        shape, d, drawn = classify_shape(vec, geo["extent"], geo["blur"])
        extent = drawn / max(h, w)
        dets.append(Detection(shape, nearest_colour(colour, bg), "large" if extent >= SMALL_LARGE
                              else "small", geo["cx"] / w, geo["cy"] / h, extent,
                              geo["area"] / (h * w), d))
    dets.sort(key=lambda d: -d.area)
    return dets, nearest_background(bg)
