"""LLaVA's image preprocessing in numpy and Pillow, pixel for pixel what the transformers processor produces.

Serving must not need PyTorch, yet the engines must feed the model exactly the pixels the reference feeds it
(a random or a small model answers differently for a one-level difference in a few pixels). transformers resizes
with PyTorch's antialiased uint8 kernel, which works like Pillow's resampling but with 16-bit fixed-point weights
whose precision depends on the largest weight; Pillow's own resize uses 22 bits and so rounds some pixels the
other way. :func:`resize` therefore recomputes PyTorch's integer weights and applies them in the same order
(rows first, then columns, rounding to uint8 in between), using float64 products that stay exact integers.

Every parameter comes from the converted model folder (``preprocessor_config.json``, ``processor_config.json``,
``config.json``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# PIL's resampling codes as processor configs store them.
BILINEAR, BICUBIC = 2, 3
# Rows handled per matrix product in a resize pass, so a large photo never becomes one huge float64 array.
_CHUNK_VALUES = 1 << 21


class PreprocessError(ValueError):
    """The model folder asks for preprocessing this module does not implement."""


# --- resizing -------------------------------------------------------------------------------------------
def _bicubic(x: np.ndarray) -> np.ndarray:
    # Keys' cubic convolution with a = -0.5, as Pillow and PyTorch's antialiased kernel use it.
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


_FILTERS: dict[int, tuple[Callable[[np.ndarray], np.ndarray], int]] = {BICUBIC: (_bicubic, 4), BILINEAR: (_triangle, 2)}


def _weights(size_in: int, size_out: int, resample: int) -> tuple[np.ndarray, int]:
    """Integer weights ``[size_out, size_in]`` of one resize pass, and their fixed-point precision in bits."""
    if resample not in _FILTERS:
        raise PreprocessError(f"resampling filter {resample} is not supported (only bilinear and bicubic)")
    filter_fn, taps = _FILTERS[resample]
    scale = size_in / size_out
    support = taps * 0.5 * scale if scale >= 1.0 else taps * 0.5
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    width = math.ceil(support) * 2 + 1
    center = scale * (np.arange(size_out, dtype=np.float64) + 0.5)
    start = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), size_in) - start
    taps_at = np.arange(width)
    raw = filter_fn((taps_at[None, :] + start[:, None] - center[:, None] + 0.5) * inv_scale)
    raw = np.where(taps_at[None, :] < count[:, None], raw, 0.0)
    total = np.zeros(size_out)
    for j in range(width):  # summed in order, as the reference does, so the rounding is the same
        total += raw[:, j]
    weights = raw / np.where(total != 0.0, total, 1.0)[:, None]
    largest = float(weights.max())
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5))
    matrix = np.zeros((size_out, size_in))
    rows = np.repeat(np.arange(size_out), width)
    columns = (start[:, None] + taps_at[None, :]).ravel()
    inside = (taps_at[None, :] < count[:, None]).ravel()
    matrix[rows[inside], columns[inside]] = fixed.ravel()[inside]
    return matrix, precision


def _pass(values: np.ndarray, matrix: np.ndarray, precision: int) -> np.ndarray:
    """``matrix @ values`` over the first axis of a uint8 array, rounded and clamped to uint8."""
    flat = values.reshape(values.shape[0], -1)
    out = np.empty((matrix.shape[0], flat.shape[1]), dtype=np.uint8)
    step = max(1, _CHUNK_VALUES // max(1, values.shape[0]))
    half = float(1 << (precision - 1))
    for first in range(0, flat.shape[1], step):
        part = matrix @ flat[:, first : first + step].astype(np.float64)
        out[:, first : first + step] = np.clip(np.floor((part + half) / (1 << precision)), 0, 255)
    return out.reshape((matrix.shape[0], *values.shape[1:]))


def resize(pixels: np.ndarray, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """Resize a uint8 HWC array with antialiasing, as transformers' image processors do."""
    if pixels.shape[:2] == (height, width):
        return pixels
    out = pixels
    if out.shape[1] != width:
        matrix, precision = _weights(out.shape[1], width, resample)
        out = _pass(out.transpose(1, 0, 2), matrix, precision).transpose(1, 0, 2)
    if out.shape[0] != height:
        matrix, precision = _weights(out.shape[0], height, resample)
        out = _pass(out, matrix, precision)
    return np.ascontiguousarray(out)


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """Output size when the shorter side becomes ``shortest`` and the aspect ratio is kept (rounded down)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre ``height x width`` of a HWC array, padded with zeros where the image is smaller."""
    image_height, image_width = pixels.shape[:2]
    if height > image_height or width > image_width:
        top = (height - image_height) // 2 if height > image_height else 0
        left = (width - image_width) // 2 if width > image_width else 0
        bottom = (height - image_height + 1) // 2 if height > image_height else 0
        right = (width - image_width + 1) // 2 if width > image_width else 0
        pixels = np.pad(pixels, ((top, bottom), (left, right), (0, 0)))
        image_height, image_width = pixels.shape[:2]
    top = int((image_height - height) / 2.0)
    left = int((image_width - width) / 2.0)
    return pixels[top : top + height, left : left + width]


# --- the model's settings ----------------------------------------------------------------------------
def _read(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    return dict(json.loads(path.read_text(encoding="utf-8"))) if path.exists() else {}


def _square(value: Any) -> tuple[int, int] | None:
    """(height, width) from a size setting given as a number or as {"height", "width"}."""
    if isinstance(value, int | float):
        return int(value), int(value)
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    return None


@dataclass(frozen=True)
class ImageSettings:
    """What the model's image processor does, read from the converted folder."""

    model_type: str
    do_resize: bool
    shortest_edge: int | None
    size: tuple[int, int] | None  # fixed (height, width) when the config gives one instead of a shortest edge
    resample: int
    do_center_crop: bool
    crop_size: tuple[int, int] | None
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    grid_pinpoints: tuple[tuple[int, int], ...]
    patch_size: int
    extra_tokens: int  # num_additional_image_tokens (the CLS position)
    drops_cls: bool  # vision_feature_select_strategy == "default"

    @classmethod
    def load(cls, folder: str | Path) -> ImageSettings:
        """Read the settings; ``preprocessor_config.json`` wins over ``processor_config.json``'s section."""
        folder = Path(folder)
        config = _read(folder, "config.json")
        processor = _read(folder, "processor_config.json")
        image = {**processor.get("image_processor", {}), **_read(folder, "preprocessor_config.json")}
        size = image.get("size", {"shortest_edge": 224})
        shortest = size.get("shortest_edge") if isinstance(size, dict) else None
        vision = config.get("vision_config", {})
        strategy = processor.get("vision_feature_select_strategy", config.get("vision_feature_select_strategy"))
        pinpoints = image.get("image_grid_pinpoints", config.get("image_grid_pinpoints")) or []
        return cls(
            model_type=str(config.get("model_type", "llava")),
            do_resize=bool(image.get("do_resize", True)),
            shortest_edge=int(shortest) if shortest else None,
            size=None if shortest else _square(size),
            resample=int(image.get("resample", BICUBIC)),
            do_center_crop=bool(image.get("do_center_crop", True)),
            crop_size=_square(image.get("crop_size", 224)),
            do_rescale=bool(image.get("do_rescale", True)),
            rescale_factor=float(image.get("rescale_factor", 1 / 255)),
            do_normalize=bool(image.get("do_normalize", True)),
            mean=tuple(float(v) for v in image.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
            std=tuple(float(v) for v in image.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
            grid_pinpoints=tuple((int(h), int(w)) for h, w in pinpoints),
            patch_size=int(processor.get("patch_size") or vision.get("patch_size", 14)),
            extra_tokens=int(processor.get("num_additional_image_tokens", 0)),
            drops_cls=strategy == "default",
        )


# --- LLaVA-1.5: one resized, centre-cropped square --------------------------------------------------
def as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB uint8 HWC array of a PIL image (converted to RGB as the processor does) or of an array."""
    if isinstance(image, Image.Image):
        image = image if image.mode == "RGB" else image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def _resized(pixels: np.ndarray, settings: ImageSettings) -> np.ndarray:
    if not settings.do_resize:
        return pixels
    if settings.shortest_edge:
        height, width = shortest_edge_size(pixels.shape[0], pixels.shape[1], settings.shortest_edge)
    elif settings.size:
        height, width = settings.size
    else:
        raise PreprocessError("the image processor's size has neither a shortest edge nor a height and width")
    return resize(pixels, height, width, settings.resample)


def clip_crop(image: Image.Image | np.ndarray, settings: ImageSettings) -> np.ndarray:
    """LLaVA-1.5's resize and centre crop: the uint8 HWC pixels the model's encoder sees."""
    pixels = _resized(as_array(image), settings)
    if settings.do_center_crop and settings.crop_size:
        pixels = center_crop(pixels, *settings.crop_size)
    return np.ascontiguousarray(pixels)


def normalise(pixels: np.ndarray, settings: ImageSettings) -> np.ndarray:
    """uint8 HWC pixels rescaled and normalised to float32 CHW, rounded as the reference rounds them."""
    values: np.ndarray = pixels.astype(np.float32)
    if settings.do_rescale and settings.do_normalize:
        # The reference folds the rescale factor into the mean and std (in float32) and then normalises.
        factor = np.float32(1.0 / settings.rescale_factor)
        mean = np.asarray(settings.mean, dtype=np.float32) * factor
        std = np.asarray(settings.std, dtype=np.float32) * factor
        values = (values - mean) / std
    elif settings.do_normalize:
        values = (values - np.asarray(settings.mean, dtype=np.float32)) / np.asarray(settings.std, dtype=np.float32)
    elif settings.do_rescale:
        values = values * np.float32(settings.rescale_factor)
    return np.ascontiguousarray(values.transpose(2, 0, 1))


def clip_pixels(image: Image.Image | np.ndarray, settings: ImageSettings) -> np.ndarray:
    """LLaVA-1.5's pixel values of one image: float32 ``[3, H, W]``."""
    return normalise(clip_crop(image, settings), settings)


def clip_tokens(settings: ImageSettings, processed: tuple[int, int]) -> int:
    """Image tokens one LLaVA-1.5 image expands to, given the processed (height, width)."""
    height, width = processed
    count = (height // settings.patch_size) * (width // settings.patch_size) + settings.extra_tokens
    return count - 1 if settings.drops_cls else count


def clip_output_size(settings: ImageSettings, height: int, width: int) -> tuple[int, int]:
    """(height, width) of LLaVA-1.5's processed pixels for an image of the given size."""
    if settings.do_center_crop and settings.crop_size:
        return settings.crop_size
    if not settings.do_resize:
        return height, width
    if settings.shortest_edge:
        return shortest_edge_size(height, width, settings.shortest_edge)
    if settings.size:
        return settings.size
    raise PreprocessError("the image processor's size has neither a shortest edge nor a height and width")


# --- LLaVA-NeXT: any-resolution tiles plus the whole image -------------------------------------------------
def best_resolution(height: int, width: int, pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The grid (height, width) that keeps most of the image's pixels and wastes least of the grid."""
    best: tuple[int, int] | None = None
    most_kept, least_wasted = 0, float("inf")
    for grid_height, grid_width in pinpoints:
        scale = min(grid_width / width, grid_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = grid_width * grid_height - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (grid_height, grid_width), kept, wasted
    if best is None:
        raise PreprocessError("the model lists no image grid resolutions")
    return best


def fitted_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """Size of the image scaled to fit inside ``target`` with its aspect ratio kept (rounded up)."""
    target_height, target_width = target
    scale_width, scale_height = target_width / width, target_height / height
    if scale_width < scale_height:
        return min(math.ceil(height * scale_width), target_height), target_width
    return target_height, min(math.ceil(width * scale_height), target_width)


def _tile_size(settings: ImageSettings) -> tuple[int, int]:
    if settings.crop_size:
        return settings.crop_size
    if settings.size:
        return settings.size
    if settings.shortest_edge:
        return settings.shortest_edge, settings.shortest_edge
    raise PreprocessError("the image processor gives no tile size")


def anyres_tiles(image: Image.Image | np.ndarray, settings: ImageSettings) -> list[np.ndarray]:
    """LLaVA-NeXT's uint8 HWC crops of one image: the whole image squeezed to one tile, then the grid's tiles."""
    pixels = as_array(image)
    height, width = pixels.shape[:2]
    grid = best_resolution(height, width, settings.grid_pinpoints)
    new_height, new_width = fitted_size(height, width, grid)
    fitted = resize(pixels, new_height, new_width, settings.resample)
    top, bottom_extra = divmod(grid[0] - new_height, 2)
    left, right_extra = divmod(grid[1] - new_width, 2)
    padded = np.pad(fitted, ((top, top + bottom_extra), (left, left + right_extra), (0, 0)))
    tile = _tile_size(settings)[0]  # the reference cuts square tiles of the crop height
    tiles = [padded[i : i + tile, j : j + tile] for i in range(0, grid[0], tile) for j in range(0, grid[1], tile)]
    base_size = (settings.shortest_edge, settings.shortest_edge) if settings.shortest_edge else settings.size
    if base_size is None:
        raise PreprocessError("the image processor's size has neither a shortest edge nor a height and width")
    crops = []
    for piece in [resize(pixels, *base_size, settings.resample), *tiles]:
        crop = _resized(np.ascontiguousarray(piece), settings)
        if settings.do_center_crop and settings.crop_size:
            crop = center_crop(crop, *settings.crop_size)
        crops.append(np.ascontiguousarray(crop))
    return crops


def anyres_pixels(image: Image.Image | np.ndarray, settings: ImageSettings) -> np.ndarray:
    """LLaVA-NeXT's pixel values of one image: float32 ``[tiles, 3, H, W]``."""
    return np.stack([normalise(tile, settings) for tile in anyres_tiles(image, settings)])


def anyres_tokens(settings: ImageSettings, height: int, width: int) -> int:
    """Image tokens one LLaVA-NeXT image of ``height x width`` expands to (tiles unpadded, a newline per row)."""
    tile_height, tile_width = _tile_size(settings)
    grid_height, grid_width = best_resolution(height, width, settings.grid_pinpoints)
    patches_height, patches_width = tile_height // settings.patch_size, tile_width // settings.patch_size
    current_height = patches_height * (grid_height // tile_height)
    current_width = patches_width * (grid_width // tile_width)
    if width / height > current_width / current_height:
        new_height = int(round(height * (current_width / width), 7))
        current_height -= (current_height - new_height) // 2 * 2
    else:
        new_width = int(round(width * (current_height / height), 7))
        current_width -= (current_width - new_width) // 2 * 2
    count = current_height * current_width + current_height + patches_height * patches_width + settings.extra_tokens
    return count - 1 if settings.drops_cls else count


def image_tokens(settings: ImageSettings, height: int, width: int) -> int:
    """Tokens an image of ``height x width`` takes in the prompt, for the model family of ``settings``."""
    if settings.model_type == "llava_next":
        return anyres_tokens(settings, height, width)
    return clip_tokens(settings, clip_output_size(settings, height, width))


def pixel_values(image: Image.Image | np.ndarray, settings: ImageSettings) -> np.ndarray:
    """The model's pixel values for one image (``[3, H, W]`` for LLaVA-1.5, ``[tiles, 3, H, W]`` for NeXT)."""
    if settings.model_type == "llava_next":
        return anyres_pixels(image, settings)
    return clip_pixels(image, settings)
