"""Turning what a user calls "an image" into what Kling accepts on the wire.

Kling takes an image as an http(s) URL or as bare base64 (no ``data:`` prefix),
and rejects anything that is not a jpg/png of at most 10 MB with both sides at
least 300 px and an aspect ratio within 1:2.5..2.5:1. We check all of that here,
from the file header alone, so a bad image fails with a :class:`ValidationError`
before a request is sent rather than as a 1201 after an upload. URLs are passed
through: fetching them would be I/O and Kling fetches them anyway.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import struct
from pathlib import Path

import attrs

from ._exceptions import ValidationError
from ._urls import is_http_url, url_scheme

__all__ = ["ImageFile", "ImageInput", "WireImage"]

ImageInput = str | bytes | bytearray | memoryview | os.PathLike[str]
"""An image as a filesystem path, raw bytes, an http(s) URL, or base64 (a
``data:image/...;base64,`` prefix is accepted and stripped)."""

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MIN_IMAGE_SIDE = 300
MAX_ASPECT_RATIO = 2.5
IMAGE_FORMATS = ("png", "jpeg")

# A str this long cannot be a path on any platform we support, so it is only
# ever tried as base64; this also keeps os.stat() away from megabytes of text.
_MAX_PATH_LENGTH = 4096
# Shorter than this, a string that is not base64 of an image was more likely
# meant as a file name (the longest one most file systems allow).
_MAX_NAME_LENGTH = 255
# Base64 beyond this many characters is abbreviated in reprs.
_REPR_LENGTH = 32
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers carry the dimensions; C4, C8 and CC are not frames.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@attrs.frozen
class ImageInfo:
    """What a header says about an image: its format and pixel size."""

    format: str
    width: int
    height: int


class WireImage(str):
    """An image already validated and in wire form (URL or bare base64).

    Marking it lets a request be copied with :func:`attrs.evolve` without
    decoding and re-checking megabytes of base64 each time.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        # A request's repr would otherwise print megabytes of base64.
        if len(self) <= _REPR_LENGTH or self.startswith(("http://", "https://")):
            return str.__repr__(self)
        return f"{str.__repr__(self[:_REPR_LENGTH])[:-1]}...' ({len(self):,} chars of base64)"


def sniff_image(data: bytes) -> ImageInfo | None:
    """Read format and size from a PNG or JPEG header; ``None`` if neither."""
    if data.startswith(_PNG_SIGNATURE):
        # The IHDR chunk must come first: length(4) type(4) width(4) height(4).
        if len(data) >= 24 and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            return ImageInfo("png", width, height)
        return None
    if data.startswith(b"\xff\xd8"):
        return _sniff_jpeg(data)
    return None


def _sniff_jpeg(data: bytes) -> ImageInfo | None:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if marker in _JPEG_SOF_MARKERS:
            if position + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return ImageInfo("jpeg", width, height)
        if marker == 0xDA:  # start of scan without a frame header before it
            return None
        position += 2 + length
    return None


def check_image(data: bytes, field: str) -> ImageInfo:
    """Apply Kling's image rules to raw bytes, raising :class:`ValidationError`."""
    if len(data) > MAX_IMAGE_BYTES:
        raise ValidationError(
            field, f"is {len(data):,} bytes; Kling accepts at most {MAX_IMAGE_BYTES:,} (10 MB)"
        )
    info = sniff_image(data)
    if info is None:
        raise ValidationError(field, "must be a JPEG or PNG image")
    if min(info.width, info.height) < MIN_IMAGE_SIDE:
        raise ValidationError(
            field,
            f"is {info.width}x{info.height} px; each side must be at least {MIN_IMAGE_SIDE} px",
        )
    ratio = max(info.width, info.height) / min(info.width, info.height)
    if ratio > MAX_ASPECT_RATIO:
        raise ValidationError(
            field,
            f"is {info.width}x{info.height} px; its aspect ratio must be between 1:2.5 and 2.5:1",
        )
    return info


@attrs.frozen
class ImageFile:
    """An image given as a file, not read yet: :func:`read_image_file` reads and
    checks it. Building a request does no I/O; the client reads every such file
    (off the event loop) before it sends the request."""

    path: Path
    #: The text the caller gave, for messages about a file that is not there.
    given: str = attrs.field(eq=False)

    def __str__(self) -> str:
        return str(self.path)


def encode_image(value: object, field: str) -> WireImage | ImageFile:
    """Normalise one image input to its wire form, validating it on the way;
    a file comes back as an :class:`ImageFile` to read (this does no I/O).

    Strings are read as, in order: an http(s) URL (any case of the scheme), a
    ``data:`` URL, base64 of a JPEG or PNG, a file path. Bytes are the file's
    contents. A rejection says what is wrong with the thing given: a URL of
    another scheme, a suffix Kling refuses, or data that is not a JPEG or PNG.
    """
    if isinstance(value, (WireImage, ImageFile)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        check_image(data, field)
        return WireImage(base64.b64encode(data).decode("ascii"))
    if isinstance(value, os.PathLike):
        return _image_file(Path(value), str(value), field)
    if not isinstance(value, str):
        raise ValidationError(
            field, f"expected a path, bytes, URL or base64 string, got {type(value).__name__}"
        )
    text = value.strip()
    if not text:
        raise ValidationError(field, "must not be empty")
    scheme = url_scheme(text)
    if scheme in ("http", "https"):
        if not is_http_url(text):
            raise ValidationError(field, f"{text[:80]!r} is not a valid http(s) URL")
        # Kling is sent the scheme in lower case, as most servers expect it.
        return WireImage(scheme + text[len(scheme) :])
    if scheme is not None:
        local = "; for a local file give its path" if scheme == "file" else ""
        raise ValidationError(field, f"must be an http(s) URL; {scheme}:// is not supported{local}")
    if text[:5].lower() == "data:":
        header, comma, payload = text.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ValidationError(
                field, "a data: URL must be of the form data:image/...;base64,..."
            )
        return _encode_base64(payload, field)
    # Base64 has no "." and no backslash: a string with either can only be a path.
    if len(text) <= _MAX_PATH_LENGTH and not any(c in text for c in ".\\"):
        decoded = _decode_base64(text)
        if decoded is not None and (sniff_image(decoded) or len(text) > _MAX_NAME_LENGTH):
            return _checked_base64(decoded, text, field)
    if len(text) <= _MAX_PATH_LENGTH and (
        any(c in text for c in ".\\") or len(text) <= _MAX_NAME_LENGTH
    ):
        return _image_file(Path(text), text, field)
    return _encode_base64(text, field)


def _image_file(path: Path, given: str, field: str) -> ImageFile:
    suffix = path.suffix.lower()
    if suffix and suffix not in (".png", ".jpg", ".jpeg"):
        raise ValidationError(field, f"{path.name}: Kling accepts .jpg, .jpeg and .png files")
    return ImageFile(path, given)


def read_image_file(image: ImageFile, field: str) -> WireImage:
    """Read an image file and check it as Kling would (the one image function
    that does I/O): a directory, a device, a missing or oversized file is a
    :class:`ValidationError` naming ``field``, raised before reading megabytes."""
    path = image.path
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ValidationError(field, f"{path} is a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):  # a device or a pipe could be read for ever
            raise ValidationError(field, f"{path} is not a regular file")
        if info.st_size > MAX_IMAGE_BYTES:  # refuse before reading a huge file into memory
            raise ValidationError(
                field,
                f"{path} is {info.st_size:,} bytes; Kling accepts at most {MAX_IMAGE_BYTES:,} "
                "(10 MB)",
            )
        data = path.read_bytes()
    except FileNotFoundError:
        given = image.given.strip()
        if "/" in given or os.sep in given or "." in given or "\\" in given:
            # A relative path is looked for from the working directory: say where,
            # which is rarely where the user thought.
            where = "" if path.is_absolute() else f" (looked for {path.absolute()})"
            raise ValidationError(field, f"image file {path} does not exist{where}") from None
        raise ValidationError(
            field,
            f"{given!r} is not an http(s) URL, an existing file, or base64 JPEG or PNG data",
        ) from None
    except OSError as error:
        raise ValidationError(field, f"cannot read image file {path}: {error.strerror}") from None
    check_image(data, field)
    return WireImage(base64.b64encode(data).decode("ascii"))


def _decode_base64(text: str) -> bytes | None:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def _checked_base64(data: bytes, text: str, field: str) -> WireImage:
    check_image(data, field)
    return WireImage("".join(text.split()))


def _encode_base64(text: str, field: str) -> WireImage:
    """Decode and check base64 image data."""
    data = _decode_base64(text)
    if data is None:
        raise ValidationError(
            field, "not an http(s) URL, an existing file, or valid base64 image data"
        )
    return _checked_base64(data, text, field)
