"""What a photo must be before the service decodes it, read from its header and bytes alone:
a bad photo is an `ImageError` (a 4xx and its reason), never a decoding (README, Security).
The classifier checks every photo here, and the UI checks its uploads the same way."""

import io
import warnings

from dogbreeds.config import ServeArgs

# What Pillow identifies and TensorFlow's decoder reads (MPO is a camera's multi-picture JPEG).
SUPPORTED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP")
SUPPORTED_NAMES = "JPEG, PNG, GIF, BMP or WebP"
# Photos of up to this many pixels pass `max_pixels_per_byte` whatever their size in bytes
# (a flat 1 MP drawing may be a few KB).
FREE_PIXELS = 2_000_000


class ImageError(ValueError):
    """A photo the service cannot read; `status_code` is the HTTP answer (a 4xx)."""

    def __init__(self, status_code: int, reason: str):
        super().__init__(status_code, reason)  # both in args: it pickles across Ray
        self.status_code = status_code
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def read_header(encoded: bytes) -> dict:
    """Format, width, height and whether it is animated, of an encoded image, from its header
    only (no decoding). Raises what Pillow raises: `Image.DecompressionBombError` for a bomb,
    another error for what it cannot identify."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(encoded)) as image:
            try:
                animated = bool(getattr(image, "is_animated", False))
            except Exception:  # noqa: BLE001 - a broken animation: the decode op judges its first frame
                animated = False
            return {"format": image.format, "width": image.size[0], "height": image.size[1], "animated": animated}


def inspect_image(encoded: bytes, args: ServeArgs) -> dict:
    """`read_header`'s answer for a photo the service may decode.

    Raises `ImageError` for no bytes (400), what is not a supported image (415), decompression
    bombs (over `max_image_pixels`, or over `max_pixels_per_byte` for a large photo), extreme
    shapes and JPEGs of more scans than encoders write (422). Only an animation's first frame
    is ever decoded (`export.first_frame`), so its size is what counts."""
    from PIL import Image

    if not encoded:
        raise ImageError(400, "empty upload: the request holds no image bytes")
    try:
        header = read_header(encoded)
    except Image.DecompressionBombError as error:
        raise ImageError(422, f"image too large to decode safely: {error}") from None
    except Exception:  # noqa: BLE001 - whatever Pillow cannot identify is not a photo
        raise ImageError(
            415, f"not an image this service reads: send a {SUPPORTED_NAMES} photo"
        ) from None
    image_format, width, height = header["format"], header["width"], header["height"]
    if image_format not in SUPPORTED_FORMATS:
        raise ImageError(415, f"{image_format} images are not supported: send {SUPPORTED_NAMES}")
    if width * height > args.max_image_pixels:
        raise ImageError(
            422,
            f"image too large: {width}x{height} is {width * height} pixels, the limit is "
            f"{args.max_image_pixels} (a decompression bomb?)",
        )
    if width * height > max(FREE_PIXELS, args.max_pixels_per_byte * len(encoded)):
        raise ImageError(
            422, f"{width}x{height} pixels in {len(encoded)} bytes: a photo of that size holds at least "
                 f"1 byte per {args.max_pixels_per_byte:g} pixels (a decompression bomb?)")
    if min(width, height) < 1 or max(width, height) / min(width, height) > args.max_aspect_ratio:
        raise ImageError(
            422, f"image shape {width}x{height} is too elongated: the limit is {args.max_aspect_ratio:g} to 1"
        )
    # Every scan starts with an SOS marker, which entropy-coded data cannot hold (a 0xFF byte
    # there is followed by 0x00): counting the markers bounds the decoder's passes.
    scans = encoded.count(b"\xff\xda") if image_format == "JPEG" else 0
    if scans > args.max_jpeg_scans:
        raise ImageError(
            422, f"JPEG of {scans} scans: the limit is {args.max_jpeg_scans} (encoders write at most about 10)"
        )
    return header
