"""
Tests for :mod:`broadcaster.core.imaging`: untrusted bytes in, a safe RGB PNG out.
Images are made in memory with Pillow.
"""

import io
import struct
import zlib

from PIL import Image
from twisted.trial.unittest import SynchronousTestCase

from broadcaster.core.imaging import ImageError, normalise


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
        self.assertIn("not an image", str(error))
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
