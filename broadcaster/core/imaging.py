"""
Pure Pillow functions: turn untrusted image bytes into a safe, normalised PNG.

Everything here is synchronous and CPU-bound, and is meant to run in a worker
thread (see :mod:`broadcaster.protocols.images`), never on the reactor thread.

Untrusted input is handled in this order, so that a hostile file costs as
little as possible before it is refused:

1. open lazily, trying only the accepted formats (:data:`DEFAULT_FORMATS`;
   ``--image-formats``): Pillow reads only the header, which gives format
   and size.  Without the list Pillow would try every one of the forty-odd
   formats it knows, EPS (which runs Ghostscript), FITS and PSD included,
   each a decoder an attacker could aim at;
2. refuse anything above ``max_pixels`` *before* decoding a single pixel
   (a 50 kB PNG can declare 100,000 x 100,000 pixels: a decompression bomb);
3. reserve the memory its pixels will take from the :class:`DecodeBudget`
   shared by every decoding thread, or refuse it as "busy" if the others
   hold too much (:func:`decode_cost`);
4. ``verify()`` the file's structure, then reopen (Pillow requires it) and
   decode it fully;
5. convert to RGB (transparent pixels onto white) and re-encode as PNG.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

from PIL import Image, UnidentifiedImageError

#: Default for ``--image-max-pixels``.
DEFAULT_MAX_PIXELS = 50_000_000

#: The formats accepted by default (``--image-formats``): those that
#: cameras, phones and browsers produce.
DEFAULT_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")

#: Every format ``--image-formats`` may name: the defaults and TIFF (off
#: by default: its decoder has had the most security fixes of these).
KNOWN_FORMATS = DEFAULT_FORMATS + ("TIFF",)

#: Bytes a decoded pixel may take at most while it is normalised: Pillow
#: holds 4 bytes a pixel for every mode above 8 bits, then an RGB copy (4)
#: and, for a transparent image, an RGBA copy (4).
MAX_BYTES_PER_PIXEL = 12


class ImageError(ValueError):
    """
    The bytes are not an image we accept; ``str()`` is a reason fit to send
    back to the sender.
    """


class ImageBusy(ImageError):
    """
    The image may be fine, but the server is decoding too many others now:
    the sender may retry later.
    """


class DecodeBudget:
    """
    Bytes of decoded pixels the decoding threads may hold between them
    (``--image-decode-memory``): the one bound on memory that does not grow
    with the number of senders.  Thread-safe.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, cost: int) -> None:
        """
        :raise ImageBusy: if ``cost`` more bytes would pass the limit.
        """
        with self._lock:
            if self.used + cost > self.limit:
                raise ImageBusy(
                    "the server is busy decoding other images; retry later"
                )
            self.used += cost

    def release(self, cost: int) -> None:
        with self._lock:
            self.used -= cost


def decode_cost(image: Image.Image) -> int:
    """
    The most memory normalising an image opened lazily will take, from its
    header alone: its pixels once decoded (1 byte each for 1-, 8-bit and
    palette modes, else 4), an RGB copy, and an RGBA copy if it has
    transparency.
    """
    pixels = image.size[0] * image.size[1]
    decoded = 1 if image.mode in ("1", "L", "P") else 4
    copies = 8 if _transparent(image) else 4
    return pixels * (decoded + copies)


def _transparent(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )


def _formats_list(formats: Sequence[str]) -> str:
    names = list(formats)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


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


def _open(data: bytes, formats: Sequence[str]) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below applies; Pillow's global one would
            # only warn (or raise for twice the limit) with a less clear message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=formats)
    except UnidentifiedImageError:
        raise ImageError(
            "unsupported image format (the server accepts {})".format(_formats_list(formats))
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageError("image too large: {}".format(e)) from None
    except Exception as e:
        raise ImageError("unreadable image: {}".format(e)) from None


def normalise(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_png_size: Optional[int] = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    budget: Optional[DecodeBudget] = None,
) -> NormalisedImage:
    """
    Decode ``data`` and re-encode it as an RGB PNG.

    :param data: the bytes of an image in one of ``formats``.
    :param max_pixels: refuse images with more pixels than this, before
        decoding them.
    :param max_png_size: refuse images whose PNG would be larger than this,
        so that what the server sends stays within the size it accepts
        (a small JPEG can make a large PNG).
    :param formats: the Pillow format names to try (:data:`KNOWN_FORMATS`).
    :param budget: where the decoded pixels' memory is reserved first.
    :raise ImageBusy: if ``budget`` cannot hold this image now.
    :raise ImageError: with a reason, if the bytes are not an acceptable image.
    """
    if not data:
        raise ImageError("empty image")
    image = _open(data, formats)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError("image has no pixels ({}x{})".format(width, height))
    if width * height > max_pixels:
        raise ImageError(
            "image too large: {}x{} is {} pixels, the limit is {}".format(
                width, height, width * height, max_pixels
            )
        )
    cost = decode_cost(image)
    if budget is not None:
        if cost > budget.limit:
            raise ImageError(
                "image too large to decode: {}x{} needs {} bytes, more than the {} the"
                " server decodes at once".format(width, height, cost, budget.limit)
            )
        budget.reserve(cost)
    try:
        return _decode(data, image, width, height, max_png_size, formats)
    finally:
        if budget is not None:
            budget.release(cost)


def _decode(
    data: bytes,
    image: Image.Image,
    width: int,
    height: int,
    max_png_size: Optional[int],
    formats: Sequence[str],
) -> NormalisedImage:
    source_format = image.format or "unknown"
    try:
        image.verify()
        # verify() leaves the image unusable; decode from a fresh open.
        image = _open(data, formats)
        image.load()
    except ImageError:
        raise
    except Exception as e:
        raise ImageError("corrupt {} image: {}".format(source_format, e)) from None

    if _transparent(image):
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
