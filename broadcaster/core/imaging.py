"""
Pure Pillow functions: turn untrusted image bytes into a safe, normalised PNG.

Everything here is synchronous and CPU-bound, and is meant to run in a worker
thread (see :mod:`broadcaster.protocols.images`), never on the reactor thread.

Untrusted input is handled in this order, so that a hostile file costs as
little as possible before it is refused:

1. open lazily: Pillow reads only the header, which gives format and size;
2. refuse anything above ``max_pixels`` *before* decoding a single pixel
   (a 50 kB PNG can declare 100,000 x 100,000 pixels: a decompression bomb);
3. ``verify()`` the file's structure, then reopen (Pillow requires it) and
   decode it fully;
4. convert to RGB (transparent pixels onto white) and re-encode as PNG.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Optional

from PIL import Image, UnidentifiedImageError

#: Default for ``--image-max-pixels``.
DEFAULT_MAX_PIXELS = 50_000_000


class ImageError(ValueError):
    """
    The bytes are not an image we accept; ``str()`` is a reason fit to send
    back to the sender.
    """


@dataclass(frozen=True)
class NormalisedImage:
    """
    An image re-encoded as an RGB PNG.

    :ivar png: the PNG bytes.
    :ivar source_format: what the sender sent (``"JPEG"``, ``"PNG"``, ...).
    :ivar source_size: how many bytes the sender sent.
    """

    png: bytes
    width: int
    height: int
    source_format: str
    source_size: int


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below applies; Pillow's global one would
            # only warn (or raise for twice the limit) with a less clear message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not an image in a format the server can read") from None
    except Image.DecompressionBombError as e:
        raise ImageError("image too large: {}".format(e)) from None
    except Exception as e:
        raise ImageError("unreadable image: {}".format(e)) from None


def normalise(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_png_size: Optional[int] = None
) -> NormalisedImage:
    """
    Decode ``data`` and re-encode it as an RGB PNG.

    :param data: the bytes of an image in any format Pillow reads.
    :param max_pixels: refuse images with more pixels than this, before
        decoding them.
    :param max_png_size: refuse images whose PNG would be larger than this,
        so that what the server sends stays within the size it accepts
        (a small JPEG can make a large PNG).
    :raise ImageError: with a reason, if the bytes are not an acceptable image.
    """
    if not data:
        raise ImageError("empty image")
    image = _open(data)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError("image has no pixels ({}x{})".format(width, height))
    if width * height > max_pixels:
        raise ImageError(
            "image too large: {}x{} is {} pixels, the limit is {}".format(
                width, height, width * height, max_pixels
            )
        )
    source_format = image.format or "unknown"
    try:
        image.verify()
        # verify() leaves the image unusable; decode from a fresh open.
        image = _open(data)
        image.load()
    except ImageError:
        raise
    except Exception as e:
        raise ImageError("corrupt {} image: {}".format(source_format, e)) from None

    if image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    ):
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
    else:
        rgb = image.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    if max_png_size is not None and out.tell() > max_png_size:
        raise ImageError(
            "image too large once converted to PNG: {} bytes, the limit is {}".format(
                out.tell(), max_png_size
            )
        )
    return NormalisedImage(out.getvalue(), width, height, source_format, len(data))
