"""Image intake: what a person sending various files would see."""

from __future__ import annotations

import asyncio
import hashlib
import io
import socket
import struct
import zlib

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from bot.chat import images
from bot.chat.images import ImageLimits, ImageRejected, download, load_image, stored_image
from bot.engine.base import ImageRef

MB = 1024 * 1024
LIMITS = ImageLimits()
RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def encode(picture: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, fmt, **options)
    return buffer.getvalue()


def halves(size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]) -> Image.Image:
    picture = Image.new("RGB", size, left)
    picture.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return picture


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` pixels (the data would not decode)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def close_to(actual: object, expected: tuple[int, int, int], tolerance: int = 12) -> bool:
    assert isinstance(actual, tuple)
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def rejection(data: bytes, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(ImageRejected) as caught:
        load_image(data, limits)
    return str(caught.value)


# --- accepted formats --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "options", "mime"),
    [
        ("PNG", {}, "image/png"),
        ("JPEG", {"quality": 95}, "image/jpeg"),
        ("WEBP", {"lossless": True}, "image/webp"),
        ("GIF", {}, "image/gif"),
        ("BMP", {}, "image/bmp"),
    ],
)
def test_accepted_formats_are_stored_as_sent(fmt: str, options: dict[str, object], mime: str) -> None:
    data = encode(halves((64, 32), RED, BLUE), fmt, **options)
    prepared = load_image(data, LIMITS)
    assert prepared.data == data
    assert prepared.mime == mime
    assert prepared.sha256 == hashlib.sha256(data).hexdigest()
    assert prepared.image.mode == "RGB"
    assert (prepared.width, prepared.height) == prepared.image.size == (64, 32)
    assert close_to(prepared.image.getpixel((8, 16)), RED)
    assert close_to(prepared.image.getpixel((56, 16)), BLUE)


def test_the_model_sees_the_pixels_that_were_sent() -> None:
    # A noisy photo: any re-encoding would change many of these pixels.
    photo = Image.effect_noise((96, 64), 80).convert("RGB")
    for fmt, options in (("PNG", {}), ("JPEG", {"quality": 75})):
        data = encode(photo, fmt, **options)
        with Image.open(io.BytesIO(data)) as sent:
            expected = sent.convert("RGB").tobytes()
        assert load_image(data, LIMITS).image.tobytes() == expected, fmt
    assert load_image(encode(photo, "PNG"), LIMITS).image.tobytes() == photo.tobytes()


def exif_rotated_jpeg() -> bytes:
    # Cameras store the sensor's pixels and an orientation tag; 6 means "rotate 90° clockwise to view".
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(halves((40, 20), RED, BLUE), "JPEG", quality=95, exif=exif.tobytes())


def transparent_png() -> bytes:
    picture = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    picture.paste((255, 0, 0, 255), (0, 0, 10, 20))
    return encode(picture, "PNG")


@pytest.mark.parametrize(
    "upload",
    [
        pytest.param(lambda: encode(Image.effect_noise((50, 40), 60).convert("RGB"), "PNG"), id="png"),
        pytest.param(lambda: encode(Image.effect_noise((50, 40), 60).convert("RGB"), "JPEG"), id="jpeg"),
        pytest.param(exif_rotated_jpeg, id="exif-rotated"),
        pytest.param(transparent_png, id="transparent"),
        pytest.param(lambda: encode(Image.new("I;16", (16, 16), 32768), "PNG"), id="16-bit"),
        pytest.param(lambda: encode(Image.effect_noise((3000, 1000), 60).convert("RGB"), "JPEG"), id="shrunk"),
    ],
)
def test_follow_ups_see_the_same_pixels(upload: object) -> None:
    assert callable(upload)
    prepared = load_image(upload(), LIMITS)
    assert prepared.sha256 == hashlib.sha256(prepared.data).hexdigest()
    # A follow-up question reloads the stored bytes: it must see the very same pixels.
    reloaded = stored_image(prepared.sha256, prepared.data)
    assert reloaded == prepared and reloaded.mime == prepared.mime
    again = reloaded.image
    assert again.mode == prepared.image.mode == "RGB"
    assert again.size == prepared.image.size
    assert again.tobytes() == prepared.image.tobytes()


def test_same_upload_gives_same_digest() -> None:
    data = encode(halves((30, 30), RED, BLUE), "PNG")
    assert load_image(data, LIMITS).sha256 == load_image(data, LIMITS).sha256


def test_format_comes_from_content_not_name() -> None:
    # A JPEG whose bytes would be saved as "photo.png" is still read as the JPEG it is.
    prepared = load_image(encode(halves((20, 20), RED, BLUE), "JPEG"), LIMITS)
    assert isinstance(prepared, ImageRef)


def test_exif_orientation_is_applied() -> None:
    data = exif_rotated_jpeg()
    prepared = load_image(data, LIMITS)
    assert prepared.data == data, "the photo is stored as sent, orientation tag included"
    assert prepared.image.size == (20, 40)
    assert close_to(prepared.image.getpixel((10, 5)), RED)
    assert close_to(prepared.image.getpixel((10, 35)), BLUE)


def test_transparency_is_shown_on_white() -> None:
    picture = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    picture.paste((255, 0, 0, 255), (0, 0, 10, 20))
    for fmt in ("PNG", "WEBP"):
        prepared = load_image(encode(picture, fmt, **({"lossless": True} if fmt == "WEBP" else {})), LIMITS)
        assert close_to(prepared.image.getpixel((4, 10)), RED)
        assert close_to(prepared.image.getpixel((15, 10)), WHITE)


def test_palette_transparency_is_shown_on_white() -> None:
    picture = Image.new("P", (20, 20), 0)
    picture.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    picture.paste(1, (0, 0, 10, 20))
    data = encode(picture, "PNG", transparency=0)
    prepared = load_image(data, LIMITS)
    assert close_to(prepared.image.getpixel((4, 10)), RED)
    assert close_to(prepared.image.getpixel((15, 10)), WHITE)


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (24, 24), colour) for colour in (RED, BLUE, (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    prepared = load_image(data, LIMITS)
    assert close_to(prepared.image.getpixel((12, 12)), RED)


def test_sixteen_bit_greyscale_keeps_its_tones() -> None:
    grey = Image.new("I;16", (16, 16), 32768)
    prepared = load_image(encode(grey, "PNG"), LIMITS)
    assert close_to(prepared.image.getpixel((8, 8)), (128, 128, 128), tolerance=4)


def test_cmyk_jpeg_is_converted() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert close_to(load_image(data, LIMITS).image.getpixel((8, 8)), RED, tolerance=30)


def test_phone_jpeg_with_second_picture_is_accepted() -> None:
    first, second = Image.new("RGB", (16, 16), RED), Image.new("RGB", (8, 8), BLUE)
    data = encode(first, "MPO", save_all=True, append_images=[second])
    prepared = load_image(data, LIMITS)
    assert prepared.image.size == (16, 16)
    assert close_to(prepared.image.getpixel((8, 8)), RED)


def test_large_image_is_stored_shrunk_as_png() -> None:
    prepared = load_image(encode(Image.new("RGB", (3000, 1000), RED), "PNG"), LIMITS)
    assert (prepared.width, prepared.height) == (2048, 683)
    assert prepared.mime == "image/png"
    with Image.open(io.BytesIO(prepared.data)) as stored:
        assert stored.format == "PNG" and stored.size == (2048, 683)
    small = load_image(encode(Image.new("RGB", (3000, 1000), RED), "JPEG"), ImageLimits(max_side=300))
    assert max(small.image.size) == 300
    assert small.mime == "image/png"


def test_image_exactly_at_the_side_limit_is_kept() -> None:
    data = encode(Image.new("RGB", (300, 200), BLUE), "JPEG")
    assert load_image(data, ImageLimits(max_side=300)).data == data
    assert load_image(data, ImageLimits(max_side=299)).mime == "image/png"


# --- rejected uploads --------------------------------------------------------------------------------


def test_text_file_named_png_is_not_an_image() -> None:
    assert rejection(b"just some notes, saved as notes.png\n") == images.NOT_AN_IMAGE


def test_empty_file_is_not_an_image() -> None:
    assert rejection(b"") == images.NOT_AN_IMAGE


def test_unsupported_format_is_not_accepted() -> None:
    assert rejection(encode(Image.new("RGB", (10, 10), RED), "TIFF")) == images.NOT_AN_IMAGE


def test_truncated_jpeg_is_damaged() -> None:
    data = encode(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG", quality=90)
    assert rejection(data[: len(data) // 2]) == images.DAMAGED


def test_corrupt_png_data_is_damaged() -> None:
    assert rejection(png_header(64, 64)) == images.DAMAGED


def test_oversized_file_is_refused_before_reading_it() -> None:
    # Not even an image: the size is checked first, so the person learns the real problem.
    message = rejection(b"\0" * int(12.3 * MB))
    assert message == "That image is too large (12.3 MB; the limit is 10 MB)."


def test_size_limit_is_configurable() -> None:
    data = encode(Image.new("RGB", (10, 10), RED), "BMP")
    assert "too large" in rejection(data, ImageLimits(max_bytes=len(data) - 1))
    load_image(data, ImageLimits(max_bytes=len(data)))


def test_too_many_pixels_is_refused_from_the_header() -> None:
    # 48 megapixels: within Pillow's own limits, so only our check stands in the way; the data
    # would not decode, so a "too many pixels" answer shows nothing was decoded first.
    message = rejection(png_header(8000, 6000))
    assert message == "That image has too many pixels (8000×6000; the limit is 40 megapixels)."


@pytest.mark.parametrize("side", [10_000, 30_000])
def test_decompression_bomb_headers_are_refused(side: int) -> None:
    # 10000² makes Pillow warn and 30000² makes it raise; both must become a polite refusal.
    assert "too many pixels" in rejection(png_header(side, side))


def test_pixel_limit_is_configurable() -> None:
    data = encode(Image.new("RGB", (100, 100), RED), "PNG")
    assert "too many pixels" in rejection(data, ImageLimits(max_pixels=9_999))
    load_image(data, ImageLimits(max_pixels=10_000))


# --- downloading ----------------------------------------------------------------------------------


class Server:
    """A local HTTP server with a few routes that behave like a good or bad file host."""

    def __init__(self) -> None:
        self.payload = encode(halves((32, 32), RED, BLUE), "PNG")
        app = web.Application()
        app.router.add_get("/ok", self.ok)
        app.router.add_get("/big", self.big)
        app.router.add_get("/endless", self.endless)
        app.router.add_get("/slow", self.slow)
        self.endless_sent = 0
        self.server = TestServer(app)

    async def __aenter__(self) -> Server:
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.close()

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def ok(self, request: web.Request) -> web.Response:
        return web.Response(body=self.payload, content_type="image/png")

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(body=b"\0" * (2 * MB), content_type="image/png")

    async def endless(self, request: web.Request) -> web.StreamResponse:
        # No Content-Length at all: only counting the bytes can stop this.
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        chunk = b"\0" * 65536
        try:
            while self.endless_sent < 64 * MB:
                await response.write(chunk)
                self.endless_sent += len(chunk)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return response

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(body=self.payload)


async def test_download_returns_the_bytes() -> None:
    async with Server() as server, aiohttp.ClientSession() as session:
        data = await download(session, server.url("/ok"), LIMITS)
        assert data == server.payload
        assert load_image(data, LIMITS).image.size == (32, 32)


async def test_download_refuses_a_declared_large_file() -> None:
    async with Server() as server, aiohttp.ClientSession() as session:
        with pytest.raises(ImageRejected) as caught:
            await download(session, server.url("/big"), ImageLimits(max_bytes=1 * MB))
        assert str(caught.value) == "That image is too large (2 MB; the limit is 1 MB)."


async def test_download_stops_an_endless_body_at_the_cap() -> None:
    async with Server() as server, aiohttp.ClientSession() as session:
        with pytest.raises(ImageRejected) as caught:
            await download(session, server.url("/endless"), ImageLimits(max_bytes=1 * MB))
        assert str(caught.value) == "That image is too large (the limit is 1 MB)."
    assert server.endless_sent < 64 * MB


async def test_download_missing_file() -> None:
    async with Server() as server, aiohttp.ClientSession() as session:
        with pytest.raises(ImageRejected) as caught:
            await download(session, server.url("/gone"), LIMITS)
        assert str(caught.value) == images.DOWNLOAD_FAILED


async def test_download_times_out() -> None:
    async with Server() as server, aiohttp.ClientSession() as session:
        with pytest.raises(ImageRejected) as caught:
            await download(session, server.url("/slow"), LIMITS, time_limit=0.2)
        assert str(caught.value) == images.DOWNLOAD_FAILED


async def test_download_unreachable_host() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ImageRejected) as caught:
            await download(session, f"http://127.0.0.1:{port}/x.png", LIMITS)
        assert str(caught.value) == images.DOWNLOAD_FAILED
