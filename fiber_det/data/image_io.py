"""The one image reader of fiber-det: training mapper, predictor, demo and evaluators decode here.

Every path gives the same pixels for the same file:

* EXIF orientation is applied (the image as every viewer shows it, and as Detectron2's
  ``read_image`` does; the official loader ignores the tag, which only matters for photos that
  carry one). :func:`image_size` reports the size after it, for dataset dicts.
* 16-bit (and 32-bit integer) grey images keep their high byte: ``value >> 8`` after clipping to
  [0, 65535]. ``convert("RGB")`` would saturate them at 255 (an all-white image); the high byte
  is the mapping Pillow itself applies to 16-bit colour PNGs, so a dark image stays dark.
  A uint16 numpy array is scaled the same way.
* grey, palette, CMYK, YCbCr are converted to RGB; the alpha channel of RGBA / LA / PA is
  dropped (as the official ``Image.open(...).convert("RGB")``).
* floating-point images are refused: they have no defined 8-bit range.

Errors name the file (or the in-memory image's name): FileNotFoundError for a missing file,
ValueError for anything that cannot be decoded.
"""
import contextlib
import os
from typing import BinaryIO, Iterator, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["read_image", "image_size", "ImageSource"]

ImageSource = Union[str, os.PathLike, BinaryIO, Image.Image, np.ndarray]

_INTEGER_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_FORMATS = ("BGR", "RGB")
# EXIF orientations 5-8 transpose the image (width and height swap)
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112


def read_image(image: ImageSource, format: str = "BGR", *, name: Optional[str] = None,
               input_format: str = "BGR") -> np.ndarray:
    """Decodes a file, a PIL image or a numpy array into a (H, W, 3) uint8 array.

    Args:
        image: a path, an open binary file (e.g. ``io.BytesIO`` of encoded bytes), a PIL image,
            or a numpy array (H, W), (H, W, 3) or (H, W, 4) of uint8 or uint16 in
            ``input_format`` channel order (a 4th channel is alpha and dropped).
        format: channel order of the result, "BGR" (the model's) or "RGB".
        name: how errors call the image (default: the path, else "image").
        input_format: channel order of a numpy ``image`` ("BGR" or "RGB").

    Returns:
        A C-contiguous (H, W, 3) uint8 array.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the image cannot be decoded or has an unsupported type, shape or dtype.
    """
    for what, value in (("format", format), ("input_format", input_format)):
        if value not in _FORMATS:
            raise ValueError(f"{what} must be 'BGR' or 'RGB', got {value!r}")
    if isinstance(image, (str, os.PathLike)):
        name = name or os.fspath(image)
        rgb = _decode_file(os.fspath(image), name)
    elif hasattr(image, "read"):  # an open binary file, e.g. io.BytesIO of encoded bytes
        rgb = _decode(image, name or "image")
    elif isinstance(image, Image.Image):
        rgb = _pil_to_rgb(ImageOps.exif_transpose(image), name or "image")
    elif isinstance(image, np.ndarray):
        rgb = _array_to_rgb(image, input_format, name or "image")
    else:
        raise ValueError(f"{name or 'image'}: unsupported image type {type(image).__name__} "
                         "(a path, an open binary file, a PIL image or a numpy array)")
    return np.ascontiguousarray(rgb[:, :, ::-1] if format == "BGR" else rgb)


def image_size(file_name: Union[str, os.PathLike]) -> Tuple[int, int]:
    """(height, width) of an image file as :func:`read_image` returns it (EXIF orientation
    applied), read from the header only.

    Raises:
        FileNotFoundError, ValueError: as :func:`read_image`.
    """
    file_name = os.fspath(file_name)
    with _open(file_name) as image:
        width, height = image.size
        if image.getexif().get(_EXIF_ORIENTATION_TAG) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
    return height, width


@contextlib.contextmanager
def _open(file_name: str) -> Iterator[Image.Image]:
    """``Image.open`` whose errors name the file."""
    _check_file(file_name)
    try:
        image = Image.open(file_name)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image '{file_name}': {e}") from e
    with image:
        yield image


def _check_file(file_name: str) -> None:
    if not os.path.isfile(file_name):
        what = "is not a file" if os.path.exists(file_name) else "does not exist"
        raise FileNotFoundError(f"image file '{file_name}' {what}")


def _decode_file(file_name: str, name: str) -> np.ndarray:
    _check_file(file_name)
    return _decode(file_name, name)


def _decode(source, name: str) -> np.ndarray:
    """Decodes a file name or an open binary file; ValueError naming ``name``."""
    try:
        with Image.open(source) as image:
            return _pil_to_rgb(ImageOps.exif_transpose(image), name)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image '{name}': {e}") from e


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    if image.mode in _INTEGER_GREY_MODES:
        return _grey_to_rgb(_high_byte(np.asarray(image)))
    if image.mode == "F":
        raise ValueError(f"cannot read image '{name}': floating-point pixels have no defined 8-bit range")
    return np.asarray(image.convert("RGB"))


def _high_byte(values: np.ndarray) -> np.ndarray:
    """16-bit (or wider integer) values -> uint8: clip to [0, 65535], keep the high byte."""
    return (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def _array_to_rgb(array: np.ndarray, input_format: str, name: str) -> np.ndarray:
    if array.dtype == np.uint16:
        array = _high_byte(array)
    elif array.dtype != np.uint8:
        raise ValueError(f"{name}: numpy images must be uint8 or uint16, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim == 2:
        array = _grey_to_rgb(array)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name}: numpy images must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    return array[:, :, ::-1] if input_format == "BGR" else array
