"""Images from downloaded bytes: the one decoder, pixel cap and byte cap of the package.

The annotators (a task's primary image, checked before a batched call), the Serve replicas (which
decode what the annotators send, and an ``image_path`` they fetch themselves) take images from the
same untrusted places, so they refuse the same ones with the same words.

A batched call carries :class:`EncodedImage` (the file's bytes, its format and its size read from
the header), not pixels: a 512x512 JPEG is ~50 kB where its RGB array is 0.8 MB, and the call's
arguments cross the object store, usually to another node. The annotator checks what it can from the
header (:func:`sniff_image`: an image at all, a format PIL reads, the pixel cap); the replica decodes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from totask_ray.net.redact import first_line

# The largest image downloaded: the run's `max_image_bytes` and a Serve app's fetch option default to it.
MAX_IMAGE_BYTES = 50 * 1024 * 1024
# A small file can decode to a huge bitmap (a decompression bomb): cap the pixels, not just the bytes.
MAX_IMAGE_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image this package decodes. The message is a predicate, safe to show to
    anyone ("is not an image: it cannot be decoded"), said of what the caller names: `about`."""

    def about(self, subject: str) -> str:
        return f"{subject} {self}"


NOT_AN_IMAGE = "is not an image: it cannot be decoded"


@dataclass(frozen=True, slots=True)
class EncodedImage:
    """An image file's bytes as downloaded, with what its header says: what a batched call sends.

    ``shape`` is the decoded array's (height, width, 3), so code that only needs an image's size
    (the output checks, the coordinates' size for Label Studio) takes either form alike.
    """

    data: bytes
    format: str  # PIL's name for it: "JPEG", "PNG", ...
    width: int
    height: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    @property
    def nbytes(self) -> int:
        return len(self.data)


def sniff_image(body: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> EncodedImage:
    """The bytes as an :class:`EncodedImage` once the header says they are an image PIL reads, within
    the pixel cap; no pixel is decoded (a header read: microseconds, where a decode takes ms). A file
    whose header is sound but whose pixels are not fails later, where it is decoded, in the same words."""
    with _open(body, max_pixels) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageDecodeError(f"is {width}x{height}, over the {max_pixels:,}-pixel limit")
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"is {width}x{height}: it has no pixels")
        return EncodedImage(bytes(body), str(img.format or "unknown"), int(width), int(height))


def decode_image(body: bytes | EncodedImage, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """HxWx3 uint8 RGB, or :class:`ImageDecodeError` saying why not (never PIL's own traceback).

    The size is checked from the header before any pixel is decoded.
    """
    from PIL import Image

    if isinstance(body, EncodedImage):
        body = body.data
    with _open(body, max_pixels) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageDecodeError(f"is {width}x{height}, over the {max_pixels:,}-pixel limit")
        try:
            img.load()
            # convert() copies even an RGB image: only a conversion that changes something pays it
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise ImageDecodeError(f"cannot be decoded ({first_line(exc)})") from None


def read_image_size(body: bytes) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels."""
    with _open(body, MAX_IMAGE_PIXELS) as img:
        return img.size


def _open(body: bytes, max_pixels: int) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(body))
    except Image.DecompressionBombError:  # PIL's own cap, far above ours: refused from the header
        raise ImageDecodeError(f"is over the {max_pixels:,}-pixel limit") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageDecodeError(NOT_AN_IMAGE) from None
