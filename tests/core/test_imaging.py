"""
Tests for :mod:`broadcaster.core.imaging`: untrusted bytes in, a safe RGB PNG out.
Images are made in memory with Pillow.
"""

import io
import struct
import zlib

from PIL import Image
from twisted.trial.unittest import SynchronousTestCase

from broadcaster.core.imaging import (
    MAX_BYTES_PER_PIXEL,
    DecodeBudget,
    ImageBusy,
    ImageError,
    decode_cost,
    normalise,
)


def make_image(fmt="PNG", mode="RGB", size=(4, 3), color=(200, 10, 30)):
    image = Image.new(mode, size, color)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def bomb_png(width, height):
    """A tiny PNG whose header declares a huge image."""

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


class NormaliseTests(SynchronousTestCase):
    def decode(self, png):
        image = Image.open(io.BytesIO(png))
        self.assertEqual(image.format, "PNG")
        return image

    def test_png_round_trip(self):
        """A PNG comes back as an RGB PNG of the same size and pixels."""
        result = normalise(make_image("PNG"))
        self.assertEqual((result.width, result.height, result.source_format), (4, 3, "PNG"))
        image = self.decode(result.png)
        self.assertEqual(image.mode, "RGB")
        self.assertEqual(image.getpixel((0, 0)), (200, 10, 30))

    def test_jpeg_becomes_png(self):
        """A JPEG is re-encoded as PNG, remembering it was a JPEG."""
        result = normalise(make_image("JPEG", size=(16, 8)))
        self.assertEqual((result.width, result.height, result.source_format), (16, 8, "JPEG"))
        self.decode(result.png)

    def test_transparency_is_flattened_onto_white(self):
        """Transparent pixels become white in the RGB output."""
        result = normalise(make_image("PNG", mode="RGBA", color=(0, 0, 0, 0)))
        self.assertEqual(self.decode(result.png).getpixel((1, 1)), (255, 255, 255))

    def test_greyscale_and_palette_become_rgb(self):
        """Any mode is converted to RGB."""
        for mode, color in (("L", 128), ("P", 3), ("1", 1), ("CMYK", (0, 0, 0, 0))):
            fmt = "JPEG" if mode == "CMYK" else "PNG"
            image = self.decode(normalise(make_image(fmt, mode=mode, color=color)).png)
            self.assertEqual(image.mode, "RGB", mode)

    def test_garbage_is_refused(self):
        """Bytes that are no image are refused with a clear reason."""
        error = self.assertRaises(ImageError, normalise, b"hello, this is not an image")
        self.assertEqual(
            str(error),
            "unsupported image format (the server accepts PNG, JPEG, GIF, WEBP or BMP)",
        )
        self.assertRaises(ImageError, normalise, b"")

    def test_truncated_image_is_refused(self):
        """A PNG cut short is refused, not half-decoded."""
        data = make_image("PNG", size=(64, 64))
        error = self.assertRaises(ImageError, normalise, data[: len(data) // 2])
        self.assertTrue(str(error))

    def test_decompression_bomb_is_refused_before_decoding(self):
        """An image declaring more pixels than the limit is refused from its header."""
        bomb = bomb_png(100_000, 100_000)
        self.assertLess(len(bomb), 2000)
        error = self.assertRaises(ImageError, normalise, bomb)
        self.assertIn("too large", str(error))

    def test_limit_is_configurable(self):
        """The pixel limit is the caller's: 4x3 passes 12 and fails 11."""
        normalise(make_image(), max_pixels=12)
        self.assertRaises(ImageError, normalise, make_image(), max_pixels=11)

    def test_png_larger_than_the_limit_is_refused(self):
        """An image whose PNG would exceed max_png_size is refused, so the
        server never sends a frame larger than it accepts."""
        noisy = Image.effect_noise((64, 64), 100).convert("RGB")
        out = io.BytesIO()
        noisy.save(out, format="JPEG", quality=5)
        error = self.assertRaises(ImageError, normalise, out.getvalue(), max_png_size=1000)
        self.assertIn("once converted to PNG", str(error))
        self.assertTrue(normalise(out.getvalue(), max_png_size=10**6).png)


#: Files Pillow would open but the server must not try: EPS (Ghostscript
#: runs it), PSD, FITS, a Windows icon and TIFF (off by default).
OTHER_FORMATS = {
    "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
    "PSD": b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 4, 4, 8, 3)
    + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + b"\x80" * 48,
    "FITS": b"SIMPLE  =                    T" + b" " * 50
    + b"BITPIX  =                    8" + b" " * 50
    + b"NAXIS   =                    2" + b" " * 50
    + b"NAXIS1  =                    4" + b" " * 50
    + b"NAXIS2  =                    4" + b" " * 50
    + b"END" + b" " * 77 + b" " * (2880 - 6 * 80) + b"\x00" * 2880,
    "ICO": None,
    "TIFF": None,
}


def other_format(name):
    data = OTHER_FORMATS[name]
    if data is None:
        data = make_image(name, size=(4, 4))
    return data


class FormatTests(SynchronousTestCase):
    """Only the formats accepted are ever tried."""

    def test_pillow_reads_them_all(self):
        """Every one of the files below is an image Pillow would open (so
        the refusals that follow come from the list, not from the file)."""
        for name in OTHER_FORMATS:
            with Image.open(io.BytesIO(other_format(name))) as image:
                self.assertEqual(image.format, name)

    def test_other_formats_are_refused_unopened(self):
        """EPS, PSD, FITS, ICO and (by default) TIFF are refused as an
        unsupported image format."""
        for name in OTHER_FORMATS:
            error = self.assertRaises(ImageError, normalise, other_format(name))
            self.assertIn("unsupported image format", str(error), name)

    def test_the_list_is_the_caller_s(self):
        """TIFF is accepted when asked for; PNG refused when left out."""
        tiff = normalise(other_format("TIFF"), formats=("PNG", "TIFF"))
        self.assertEqual(tiff.source_format, "TIFF")
        error = self.assertRaises(ImageError, normalise, make_image("PNG"), formats=("JPEG",))
        self.assertEqual(str(error), "unsupported image format (the server accepts JPEG)")

    def test_every_default_format_is_accepted(self):
        for name in ("PNG", "JPEG", "GIF", "WEBP", "BMP"):
            self.assertEqual(normalise(make_image(name, size=(5, 5))).source_format, name)


class DecodeBudgetTests(SynchronousTestCase):
    """The memory the decoding threads may hold between them."""

    def test_cost_from_the_header(self):
        """An RGB image costs 8 bytes a pixel, a transparent one 12, a
        greyscale one 5: from the header, before any pixel is decoded."""
        for mode, color, per_pixel in (
            ("RGB", (1, 2, 3), 8),
            ("RGBA", (1, 2, 3, 4), MAX_BYTES_PER_PIXEL),
            ("L", 7, 5),
        ):
            with Image.open(io.BytesIO(make_image("PNG", mode=mode, size=(10, 20), color=color))) as image:
                self.assertEqual(decode_cost(image), 200 * per_pixel, mode)

    def test_an_image_that_does_not_fit_now_is_busy(self):
        """While others hold the budget, an image is refused as busy (the
        sender may retry); the budget is whole again after each decode,
        whether it succeeded or failed."""
        budget = DecodeBudget(1000)
        budget.reserve(700)
        error = self.assertRaises(ImageBusy, normalise, make_image(size=(10, 10)), budget=budget)
        self.assertIn("retry later", str(error))
        budget.release(700)
        normalise(make_image(size=(10, 10)), budget=budget)
        self.assertRaises(ImageError, normalise, make_image(size=(10, 10))[:60], budget=budget)
        self.assertEqual(budget.used, 0)

    def test_an_image_that_could_never_fit_is_not_busy(self):
        """An image larger than the whole budget is refused for good, not
        as busy: retrying would not help."""
        error = self.assertRaises(
            ImageError, normalise, make_image(size=(20, 20)), budget=DecodeBudget(1000)
        )
        self.assertNotIsInstance(error, ImageBusy)
        self.assertIn("too large to decode", str(error))
