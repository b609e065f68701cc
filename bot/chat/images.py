"""Image intake: download an attachment with a byte cap, validate it, and normalise it for the model.

Everything here treats the upload as hostile: the size is checked before reading further, the format
is taken from the content (never the file name), and the pixel count is checked from the header
before any pixel is decoded, so a small file that expands to gigabytes is turned away cheaply.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import aiohttp
from PIL import Image, ImageOps, UnidentifiedImageError

from bot.engine.base import ImageRef

log = logging.getLogger(__name__)

# --- what the person reads -------------------------------------------------------------------------
NOT_AN_IMAGE = "That file isn't an image I can read (PNG, JPEG, WebP, GIF or BMP)."
TOO_LARGE = "That image is too large ({size}; the limit is {limit})."
TOO_LARGE_UNKNOWN = "That image is too large (the limit is {limit})."
TOO_MANY_PIXELS = "That image has too many pixels ({width}×{height}; the limit is {limit} megapixels)."
TOO_MANY_PIXELS_UNKNOWN = "That image has too many pixels (the limit is {limit} megapixels)."
DAMAGED = "That image is damaged and can't be opened."
DOWNLOAD_FAILED = "I couldn't download that image; please try sending it again."

# Pillow's format names for what we accept. Phone cameras often write JPEGs with a second
# (depth or preview) picture, which Pillow's JPEG reader reports as MPO; its first frame is the photo.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_DETECTED_FORMATS = {*ACCEPTED_FORMATS, "MPO"}

# What is stored is what the person sent whenever it fits the limits: any re-encoding (even JPEG at
# quality 92) changes the pixels, and with them the model's answers. Only an upload that must be
# shrunk is stored as a new file, and then losslessly as PNG, so the stored bytes still decode to
# exactly the pixels the model saw. Phone JPEGs with a second picture (MPO) are JPEG files.
_MIME_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}
RESIZED_MIME = "image/png"
_WHITE = (255, 255, 255)
_MB = 1024 * 1024
_DOWNLOAD_CHUNK = 64 * 1024


class ImageRejected(Exception):
    """The upload can't be used; ``str(error)`` is one sentence to show the person."""


@dataclass(frozen=True)
class ImageLimits:
    """What an upload may weigh and measure; ``max_side`` bounds the stored copy, not the upload."""

    max_bytes: int = 10 * _MB
    max_pixels: int = 40_000_000
    max_side: int = 2048


def _format_mb(n_bytes: int) -> str:
    megabytes = n_bytes / _MB
    if megabytes < 0.1:
        return f"{max(1, round(n_bytes / 1024))} KB"
    return f"{megabytes:.0f} MB" if megabytes == int(megabytes) else f"{megabytes:.1f} MB"


def _format_megapixels(pixels: int) -> str:
    return f"{pixels / 1_000_000:g}"


def check_size(n_bytes: int, limits: ImageLimits) -> None:
    """Reject a file of ``n_bytes`` bytes if it is over the limit (useful before downloading)."""
    if n_bytes > limits.max_bytes:
        raise ImageRejected(TOO_LARGE.format(size=_format_mb(n_bytes), limit=_format_mb(limits.max_bytes)))


def load_image(data: bytes, limits: ImageLimits) -> ImageRef:
    """Validate an uploaded image and decide what to store; raises :class:`ImageRejected` with a sentence.

    The upload itself is stored when its longest side is within ``limits.max_side``; otherwise a PNG of
    the shrunk picture is. The reference names the stored bytes (hashed here, once, for the whole way to
    the engine), and its ``image`` is decoded from them, so the first answer and every later follow-up
    (which reload the bytes with :func:`stored_image`) see exactly the same pixels.
    Blocking (decoding takes tens of milliseconds): run it with ``asyncio.to_thread``.
    """
    check_size(len(data), limits)
    source = _open(data, limits)
    with source:
        if source.format not in _DETECTED_FORMATS:
            raise ImageRejected(NOT_AN_IMAGE)
        width, height = source.size
        # The header is all Pillow has read so far: this is the last cheap moment to refuse.
        if width * height > limits.max_pixels:
            raise ImageRejected(
                TOO_MANY_PIXELS.format(width=width, height=height, limit=_format_megapixels(limits.max_pixels))
            )
        kept = max(width, height) <= limits.max_side
        try:
            picture = _upright_rgb(source) if kept else _shrunk(source, limits.max_side)
        except Exception as exc:  # truncated or corrupt pixel data; Pillow raises many kinds
            log.info("upload rejected: %s image failed to decode (%s)", source.format, exc)
            raise ImageRejected(DAMAGED) from exc
        upload_format = str(source.format)

    if kept:
        stored, mime = data, _MIME_TYPES[upload_format]
    else:
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        stored, mime = buffer.getvalue(), RESIZED_MIME
    log.debug(
        "image accepted: %s %dx%d, %d bytes -> %s %dx%d, %d bytes",
        upload_format,
        width,
        height,
        len(data),
        "kept as sent" if kept else "stored as PNG",
        picture.width,
        picture.height,
        len(stored),
    )
    return ImageRef.from_data(stored, mime, picture)


def stored_image(sha256: str, data: bytes) -> ImageRef:
    """The reference to stored image bytes, reloaded by their key ``sha256`` (the store derived it from them).

    Its picture is what the model sees: first frame, upright, RGB. :func:`load_image` produces its ``image``
    the same way, so a follow-up that reloads the stored bytes sees exactly the pixels of the first answer.
    Blocking (it decodes): run it with ``asyncio.to_thread``.
    """
    with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as source:
        mime = _MIME_TYPES.get(str(source.format), "application/octet-stream")
        return ImageRef(sha256, _upright_rgb(source), data, mime)


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        # Pillow warns (and past twice its limit, raises) when the header declares a huge image. The
        # warning becomes an error here so it lands in the except clause below. catch_warnings swaps
        # the process-wide filter list; two threads racing can at worst leave this same filter behind.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(TOO_MANY_PIXELS_UNKNOWN.format(limit=_format_megapixels(limits.max_pixels))) from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected(NOT_AN_IMAGE) from exc
    except Exception as exc:  # a recognised format whose header is malformed
        log.info("upload rejected: unreadable header (%s)", exc)
        raise ImageRejected(DAMAGED) from exc


def _upright_rgb(source: Image.Image) -> Image.Image:
    """Decode the first frame at full size, apply the EXIF orientation and convert it to RGB."""
    source.load()
    return _to_rgb(ImageOps.exif_transpose(source))


def _shrunk(source: Image.Image, max_side: int) -> Image.Image:
    """Like :func:`_upright_rgb`, with the longest side brought down to ``max_side``."""
    # For JPEG this lets libjpeg decode at 1/2, 1/4 or 1/8 scale: far less memory and time for big
    # photos. It never goes below max_side, so the resize below still does the real work.
    source.draft(None, (max_side, max_side))
    picture = _upright_rgb(source)
    if max(picture.size) > max_side:
        picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return picture


def _to_rgb(picture: Image.Image) -> Image.Image:
    """Convert any mode to RGB; transparent areas become white, as a viewer would show them."""
    if picture.mode.startswith("I"):
        # 16-bit greyscale PNGs: a plain convert would clip every value above 255 to white.
        picture = picture.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    has_alpha = picture.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        picture.mode == "P" and "transparency" in picture.info
    )
    if not has_alpha:
        return picture.convert("RGB")
    rgba = picture.convert("RGBA")
    flattened = Image.new("RGB", rgba.size, _WHITE)
    flattened.paste(rgba, mask=rgba.getchannel("A"))
    return flattened


async def download(session: aiohttp.ClientSession, url: str, limits: ImageLimits, *, time_limit: float = 30.0) -> bytes:
    """Fetch ``url`` into memory, refusing it as soon as it grows past ``limits.max_bytes``.

    ``Content-Length`` is only used to refuse early: the body is counted as it arrives, after any
    transfer decompression, so a lying or missing header can't get more than the cap into memory.
    Network failures, timeouts and non-200 answers become :class:`ImageRejected`.
    """
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=time_limit)) as response:
            if response.status != 200:
                log.info("image download failed: HTTP %d", response.status)
                raise ImageRejected(DOWNLOAD_FAILED)
            declared = response.content_length
            if declared is not None and "Content-Encoding" not in response.headers:
                check_size(declared, limits)
            body = bytearray()
            async for chunk in response.content.iter_chunked(_DOWNLOAD_CHUNK):
                body += chunk
                if len(body) > limits.max_bytes:
                    raise ImageRejected(TOO_LARGE_UNKNOWN.format(limit=_format_mb(limits.max_bytes)))
            return bytes(body)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.info("image download failed: %r", exc)
        raise ImageRejected(DOWNLOAD_FAILED) from exc
