"""Small, valid PNG files to stand in for generated images.

Downloads in tests should exercise real bytes (signature, chunks, CRCs, a zlib
stream) without shipping binary fixtures or needing an imaging library, so the
fake encodes a gradient once per size and serves the cached bytes.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LONG_SIDE = 512
#: Above Kling's 300 px minimum for an input image.
SHORT_SIDE_AT_LEAST = 320


def size_for_aspect_ratio(aspect_ratio: str) -> tuple[int, int]:
    """Width and height for ``"W:H"``: the long side :data:`LONG_SIDE` pixels,
    or longer where that leaves the short side under :data:`SHORT_SIDE_AT_LEAST`,
    so every placeholder can be fed back as an input image (Kling refuses inputs
    under 300 px)."""
    try:
        width_part, height_part = aspect_ratio.split(":")
        ratio_w, ratio_h = float(width_part), float(height_part)
    except ValueError:
        ratio_w = ratio_h = 1.0
    if not (ratio_w > 0 and ratio_h > 0 and math.isfinite(ratio_w) and math.isfinite(ratio_h)):
        ratio_w = ratio_h = 1.0
    ratio = max(ratio_w, ratio_h) / min(ratio_w, ratio_h)
    short = max(SHORT_SIDE_AT_LEAST, round(LONG_SIDE / ratio))
    long = max(LONG_SIDE, round(short * ratio))
    return (long, short) if ratio_w >= ratio_h else (short, long)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


@functools.lru_cache(maxsize=64)
def encode_png(width: int, height: int, *, watermark: bool = False) -> bytes:
    """An 8-bit RGB PNG of a colour gradient; ``watermark`` adds a white band so the
    two variants differ. Cached: the fake serves the same bytes for every task of a size.
    """
    if width < 1 or height < 1:
        raise ValueError("a PNG needs at least one pixel")
    reds = bytes(x * 255 // max(width - 1, 1) for x in range(width))
    blues = bytes(255 - red for red in reds)
    band = range(height * 9 // 20, height * 11 // 20) if watermark else range(0)
    white_row = b"\x00" + b"\xff" * (3 * width)
    row = bytearray(1 + 3 * width)  # byte 0 is the filter type: 0, none
    row[1::3] = reds
    row[3::3] = blues
    raw = bytearray()
    for y in range(height):
        if y in band:
            raw += white_row
            continue
        row[2::3] = bytes((y * 255 // max(height - 1, 1),)) * width
        raw += row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(bytes(raw), 6))
        + _chunk(b"IEND", b"")
    )
