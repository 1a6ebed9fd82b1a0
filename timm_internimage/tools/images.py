"""Reading images for the tools: decoding (EXIF orientation, 16-bit and float images), batching, the sample photo.

Library code: an unreadable image is a :class:`~timm_internimage.tools.loading.UsageError` naming the file.
"""
import re
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

from .loading import UsageError

__all__ = ['SAMPLE_IMAGE_CREDIT', 'SAMPLE_IMAGE_NAME', 'check_images', 'decode_image', 'image_batches',
           'sample_image_path']

SAMPLE_IMAGE_NAME = 'chelsea.jpg'
SAMPLE_IMAGE_CREDIT = ("'Chelsea the cat', scikit-image sample data (skimage.data.chelsea), CC0 by the photographer "
                       "Stefan van der Walt")


def sample_image_path() -> Path:
    return Path(str(resources.files('timm_internimage').joinpath('data', SAMPLE_IMAGE_NAME)))


def open_image(path: str):
    """The Pillow image of ``path``, header read but not decoded; ``UsageError`` naming the file if it is not one.

    Images over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) are refused, not just warned about.
    """
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            return Image.open(path)
    except FileNotFoundError:
        if path == '-':
            raise UsageError("-: reading images from standard input is not supported; save the image to a file "
                           "and pass its path") from None
        if re.match(r'[A-Za-z][A-Za-z0-9+.-]*://', path):
            raise UsageError(f'{path}: URLs are not supported; download the image first (for example '
                           f'`curl -LO URL`) and pass the file') from None
        raise UsageError(f'{path}: no such file') from None
    except IsADirectoryError:
        raise UsageError(f'{path}: is a directory, not an image') from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UsageError(f'{path}: refused as a possible decompression bomb ({e})') from None
    except UnidentifiedImageError:
        raise UsageError(f'{path}: not an image file Pillow can read (unknown or corrupt format)') from None
    except (OSError, ValueError) as e:
        raise UsageError(f'{path}: cannot be read as an image ({e})') from None


def check_images(paths: Sequence[str]) -> None:
    """Open every image (headers only), reporting all that cannot be read in one ``UsageError``."""
    problems = []
    for path in paths:
        try:
            open_image(path).close()
        except UsageError as e:
            problems.append(str(e))
    if problems:
        raise UsageError('cannot read image(s):\n  ' + '\n  '.join(problems))


def _white_level(mode: str, peak: float) -> float:
    """The value that is white in a single-channel high-bit-depth image.

    65535 for 16-bit images. 32-bit integer (``I``) and float (``F``) images carry no range, so it is the
    smallest of 1 (floats only), 255 and 65535 that holds the brightest pixel, or else that pixel.
    """
    if mode.startswith('I;16'):
        return 65535.0
    for level in ((1.0, 255.0, 65535.0) if mode == 'F' else (255.0, 65535.0)):
        if peak <= level:
            return level
    return peak


def _to_rgb(image):
    """8-bit RGB of a Pillow image; 16-bit, 32-bit integer and float images are scaled to 0-255, not clipped."""
    import numpy as np
    from PIL import Image
    if image.mode not in ('I', 'F') and not image.mode.startswith('I;16'):
        return image.convert('RGB')
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    scale = 255.0 / _white_level(image.mode, float(values.max(initial=0.0)))
    gray = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, 'L').convert('RGB')


def decode_image(path: str):
    """Decode ``path`` once: EXIF orientation applied, as 8-bit RGB."""
    from PIL import ImageOps
    with open_image(path) as image:
        try:
            return _to_rgb(ImageOps.exif_transpose(image))
        except (OSError, ValueError) as e:  # truncated or corrupt image data
            raise UsageError(f'{path}: cannot be decoded ({e})') from None


def image_batches(paths: Sequence[str], transform: Callable, batch_size: int
                   ) -> Iterator[Tuple[List[str], Any, List[Optional[str]]]]:
    """``(paths, batch tensor, errors)`` per batch, each image decoded when its batch is made: one batch in memory.

    ``errors[i]`` is the message for ``paths[i]`` if it cannot be decoded, else ``None``; the tensor holds the
    decoded images in order (``None`` if there are none)."""
    import torch
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        tensors, errors = [], []
        for path in chunk:
            try:
                tensors.append(transform(decode_image(path)))
                errors.append(None)
            except UsageError as e:
                errors.append(str(e))
        yield chunk, torch.stack(tensors) if tensors else None, errors

