"""Reading imagery as analysts have it: PNG/JPEG, 16-bit PNG/TIFF, multi-band GeoTIFF.

Everything ends as an 8-bit RGB PIL image, what `DeltaVLMProcessor` expects:

- 8-bit images are used as they are (RGBA / palette / grey converted to RGB).
- Other depths (uint16, int, float) get a per-band 2-98 % percentile stretch to 0..255. Each image is
  stretched on its own, so a global brightness difference between acquisitions (season, sensor gain) does
  not read as change.
- Bands: `bands=(3, 2, 1)` picks 1-based bands in R, G, B order; one band is repeated to grey RGB (a
  panchromatic or SAR scene is legitimate input, so it is converted with a warning, not refused). Without
  `bands`, a 3-band image is used in file order and an image of more bands uses its first three, with a
  warning naming `--bands`.

GeoTIFF is read with `tifffile` (pure Python + numpy); the georeferencing is not used.
"""

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from processing.image_processing_deltavlm import MIN_IMAGE_SIDE

TIFF_SUFFIXES = (".tif", ".tiff")
STRETCH_PERCENTILES = (2.0, 98.0)
# PIL guards against decompression bombs at ~179 MP; a scene for tiling may be larger, but beyond this
# it is almost certainly a mistake and would exhaust memory.
MAX_PIXELS = 40_000 * 40_000


class ImageryError(ValueError):
    """An image that cannot be used; the message names the file and says what is wrong."""


class ImageryWarning(UserWarning):
    """Something was changed to make an image usable (bands dropped, grey repeated, pair resized)."""


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """"3,2,1" -> (3, 2, 1); 1-based band numbers, one or three of them."""
    if text is None or not str(text).strip():
        return None
    try:
        bands = tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise ImageryError(f"--bands must be comma-separated band numbers such as 3,2,1, got {text!r}") from None
    if len(bands) not in (1, 3) or min(bands) < 1:
        raise ImageryError(f"--bands takes one or three 1-based band numbers (R,G,B), got {text!r}")
    return bands


def read_image(path, bands: tuple[int, ...] | None = None) -> Image.Image:
    """A file -> 8-bit RGB PIL image (see the module docstring). Raises ImageryError with a one-line reason."""
    path = Path(path)
    if not path.exists():
        raise ImageryError(f"{path}: no such file")
    if not path.is_file():
        raise ImageryError(f"{path}: not a file")
    array = _read_array(path)
    array = _bands_last(array, path)
    height, width = array.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ImageryError(f"{path}: {width}x{height} pixels is too small (at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE})")
    array = _select_bands(array, bands, path)
    if array.dtype != np.uint8:
        array = stretch_to_uint8(array)
    return Image.fromarray(array)  # (H, W, 3) uint8 -> RGB


def _read_array(path: Path) -> np.ndarray:
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            import tifffile
        except ImportError:
            tifffile = None
        if tifffile is not None:
            try:
                with tifffile.TiffFile(path) as tiff:
                    shape = tiff.series[0].shape
                    height, width = sorted(shape)[-2:] if len(shape) >= 2 else (0, 0)
                    if height * width > MAX_PIXELS:  # check the header before tifffile allocates the array
                        raise ImageryError(f"{path}: {width}x{height} pixels is beyond the {MAX_PIXELS:,} pixel limit")
                    return np.asarray(tiff.asarray())
            except ImageryError:
                raise
            except Exception as error:  # tifffile raises many types for bad files; fall back to PIL below
                tiff_error = error
        else:
            tiff_error = None
        try:
            return _read_with_pil(path)
        except ImageryError:
            if tiff_error is not None:
                raise ImageryError(f"{path}: cannot read as TIFF ({tiff_error})") from None
            raise ImageryError(f"{path}: cannot read this TIFF with PIL; install tifffile for multi-band GeoTIFF") from None
    return _read_with_pil(path)


def _read_with_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageryError(f"{path}: {image.width}x{image.height} pixels is beyond the {MAX_PIXELS:,} pixel limit")
            image.load()
            if image.mode in ("P", "PA", "RGBA", "LA", "CMYK", "YCbCr", "1"):
                # palette, alpha and other 8-bit modes: PIL converts them exactly; alpha is dropped
                image = image.convert("RGB" if image.mode not in ("LA", "1") else "L")
            return np.asarray(image)
    except Image.DecompressionBombError:
        raise ImageryError(f"{path}: image is too large to open safely") from None
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageryError):
            raise
        raise ImageryError(f"{path}: cannot read as an image ({error})") from None


def _bands_last(array: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) -> (H, W, 1); (C, H, W) with few bands -> (H, W, C), as GeoTIFFs are often band-first."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ImageryError(f"{path}: expected a 2-D image with bands, got an array of shape {array.shape}")
    if array.shape[0] < array.shape[2] and array.shape[0] <= 16:
        array = np.moveaxis(array, 0, -1)
    return array


def _select_bands(array: np.ndarray, bands: tuple[int, ...] | None, path: Path) -> np.ndarray:
    """(H, W, C) -> (H, W, 3)."""
    num_bands = array.shape[2]
    if bands is not None:
        if max(bands) > num_bands:
            raise ImageryError(f"{path}: has {num_bands} band(s); --bands asks for band {max(bands)}")
        array = array[:, :, [band - 1 for band in bands]]
    elif num_bands > 3:
        warnings.warn(f"{path}: {num_bands} bands; using bands 1,2,3 as R,G,B (choose with --bands)", ImageryWarning, 2)
        array = array[:, :, :3]
    elif num_bands == 2:
        raise ImageryError(f"{path}: has 2 bands; choose one or three with --bands")
    if array.shape[2] == 1:
        warnings.warn(f"{path}: single-band image, repeated to grey RGB", ImageryWarning, 2)
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def stretch_to_uint8(array: np.ndarray, percentiles=STRETCH_PERCENTILES) -> np.ndarray:
    """Per-band linear stretch of the low..high percentiles to 0..255 (H, W, C) -> uint8 (H, W, C).

    Non-finite values (nodata as NaN) are left out of the percentiles and become 0. A constant band has no
    range to stretch and becomes 0.
    """
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    out = np.zeros(values.shape, dtype=np.uint8)
    for band in range(values.shape[2]):
        band_values = values[:, :, band]
        valid = band_values[finite[:, :, band]]
        if valid.size == 0:
            continue
        low, high = np.percentile(valid, percentiles)
        if high <= low:
            continue
        scaled = (band_values - low) / (high - low) * 255.0
        out[:, :, band] = np.clip(np.nan_to_num(scaled, nan=0.0), 0, 255).round().astype(np.uint8)
    return out


def read_pair(before, after, bands: tuple[int, ...] | None = None) -> tuple[Image.Image, Image.Image]:
    """Both images of a pair, read with the same band choice. Warns when their sizes differ (the processor
    resizes both to the model's input size, so the pair still lines up only if it covers the same ground)."""
    before_image = read_image(before, bands)
    after_image = read_image(after, bands)
    if before_image.size != after_image.size:
        warnings.warn(
            f"before is {before_image.width}x{before_image.height} and after is {after_image.width}x{after_image.height};"
            " both are resized to the model's input size",
            ImageryWarning,
            2,
        )
    return before_image, after_image


def tile_boxes(width: int, height: int, tile: int) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """(row, col, (left, top, right, bottom)) of a grid of tile x tile crops covering the image.

    Tiles are full size: where the image is not a multiple of `tile`, the last row/column is shifted back to
    end at the border (overlapping its neighbour) rather than left as a thin sliver the model would stretch.
    An image smaller than `tile` along an axis gets one tile of its full extent along it.
    """
    if tile < MIN_IMAGE_SIDE:
        raise ImageryError(f"--tile must be at least {MIN_IMAGE_SIDE} pixels, got {tile}")

    def starts(length: int) -> list[int]:
        if length <= tile:
            return [0]
        positions = list(range(0, length - tile, tile))
        return positions + [length - tile]

    boxes = []
    for row, top in enumerate(starts(height)):
        for col, left in enumerate(starts(width)):
            boxes.append((row, col, (left, top, min(left + tile, width), min(top + tile, height))))
    return boxes


def tile_pair(before: Image.Image, after: Image.Image, tile: int):
    """Crops of the pair on the grid of `tile_boxes`: [(row, col, box, before_crop, after_crop), ...].

    The after image is resized to the before image's size first (with a warning) so that tile (r, c) covers
    the same ground in both.
    """
    if before.size != after.size:
        warnings.warn(
            f"after image resized from {after.width}x{after.height} to {before.width}x{before.height} before tiling",
            ImageryWarning,
            2,
        )
        after = after.resize(before.size, Image.Resampling.BICUBIC)
    return [
        (row, col, box, before.crop(box), after.crop(box)) for row, col, box in tile_boxes(before.width, before.height, tile)
    ]


__all__ = [
    "ImageryError",
    "ImageryWarning",
    "parse_bands",
    "read_image",
    "read_pair",
    "stretch_to_uint8",
    "tile_boxes",
    "tile_pair",
]
