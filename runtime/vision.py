"""Images into prompts, without torch: decode, resize, rescale, normalise and patchify an image exactly as
transformers' Gemma4ImageProcessor (its PIL backend) does, run the bundle's vision graph, and expand each
`<|image|>` of a prompt into `<|image>` + one `<|image|>` per soft token + `<image|>` as Gemma4Processor does.

The settings come from the manifest's `vision` section (export/vision.py): patch size p, pooling kernel k,
the soft-token budget, the resize filter, rescale factor, mean/std. An image of H x W pixels is resized,
keeping its aspect ratio, to the largest h x w that are multiples of k*p with (h/p)*(w/p) <= budget*k^2
patches; it then becomes (h/p)*(w/p) patches of p*p*3 values (rows of patches, each patch row-major with
the channel last) and (h/p)*(w/p)/k^2 soft tokens, each the average of a k x k block of patches.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgegen.runtime import manifest as names
from edgegen.runtime.errors import EdgegenError
from edgegen.runtime.prompt import SoftTokens, encode, place

if TYPE_CHECKING:
    from PIL import Image

# Largest image accepted, in pixels (decoded size): Pillow's own decompression-bomb limit is 89.5 Mpx with a
# warning and twice that with an error; an image this large is resized to at most a few thousand patches
# anyway, and decoding it would take gigabytes.
MAX_PIXELS = 64 * 1024 * 1024
IMAGE_TOKEN = "<|image|>"


@dataclass
class Patches:
    """One preprocessed image: what the vision graph takes, and its content key for KV reuse."""

    pixel_values: np.ndarray  # [N, 3*p*p] float32
    positions: np.ndarray  # [N, 2] int64: (x, y) of each patch
    pooling: np.ndarray  # [T, N] float32: soft token t averages the patches of its k x k block
    key: str

    @property
    def soft_tokens(self) -> int:
        return self.pooling.shape[0]


def open_image(source) -> Image.Image:
    """A decoded Pillow image from a path, bytes or a Pillow image; one EdgegenError line for anything that is
    not a readable image of a sane size."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        image, what = source, "the image"
    else:
        what = f"image '{source}'" if isinstance(source, (str, Path)) else "the image bytes"
        try:
            data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
        except OSError as exc:
            raise EdgegenError(f"cannot read {what} ({exc.strerror or exc}); check the path") from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
                if image.width * image.height > MAX_PIXELS:
                    raise EdgegenError(f"{what} is {image.width}x{image.height} pixels, more than the "
                                       f"{MAX_PIXELS // 2**20} Mpx edgegen decodes; downscale it first")
                image.load()
        except EdgegenError:
            raise
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise EdgegenError(f"{what} is not an image Pillow can decode ({type(exc).__name__}); use a PNG, "
                               "JPEG, WebP, GIF or BMP file") from None
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise EdgegenError(f"{what} is damaged or truncated ({detail}); re-save or re-download it") from None
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise EdgegenError(f"{what} has {image.mode} pixels (16/32-bit or float); Pillow would clip them to 8 bits "
                           "when converting to RGB, so convert the image to 8-bit RGB first")
    if image.width < 1 or image.height < 1:
        raise EdgegenError(f"{what} is empty ({image.width}x{image.height} pixels)")
    if image.width * image.height > MAX_PIXELS:
        raise EdgegenError(f"{what} is {image.width}x{image.height} pixels, more than the {MAX_PIXELS // 2**20} Mpx "
                           "edgegen decodes; downscale it first")
    return image


def to_rgb(image) -> np.ndarray:
    """[H, W, 3] uint8: transformers' convert_to_rgb (transparency composited onto white)."""
    from PIL import Image

    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        else:
            rgb = image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise EdgegenError(f"the image's mode {image.mode} cannot be converted to RGB ({exc}); save it as an RGB "
                           "PNG or JPEG") from None
    return np.asarray(rgb, dtype=np.uint8)


def target_size(height: int, width: int, patch: int, max_patches: int, kernel: int) -> tuple[int, int]:
    """The resized (height, width): Gemma4ImageProcessor's aspect-ratio-preserving size."""
    factor = math.sqrt(max_patches * patch**2 / (height * width))
    side = kernel * patch
    h, w = int(math.floor(factor * height / side)) * side, int(math.floor(factor * width / side)) * side
    longest = (max_patches // kernel**2) * side
    if h == 0 and w == 0:
        raise EdgegenError(f"the image ({width}x{height}) is too small to resize to multiples of {side} pixels")
    if h == 0:
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:
        w, h = side, min(int(math.floor(height / width)) * side, longest)
    return h, w


_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}


def preprocess(image, settings: dict) -> Patches:
    """One image (path, bytes or Pillow image) -> Patches, as the processor computes pixel_values and
    image_position_ids (without its padding to max_patches)."""
    from PIL import Image

    image = open_image(image)
    rgb = to_rgb(image) if settings.get("do_convert_rgb", True) else np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise EdgegenError(f"the image has mode {image.mode}, not 3 colour channels; save it as RGB")
    p, k = settings["patch_size"], settings["pooling_kernel_size"]
    max_patches = settings["max_soft_tokens"] * k * k
    if settings.get("do_resize", True):
        h, w = target_size(rgb.shape[0], rgb.shape[1], p, max_patches, k)
        if (h, w) != rgb.shape[:2]:
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h), resample=_FILTERS[settings["resample"]]))
    pixels = rgb.astype(np.float64) * settings["rescale_factor"] if settings.get("do_rescale", True) else rgb
    pixels = pixels.astype(np.float32)  # [H, W, 3]
    if settings.get("do_normalize"):
        pixels = (pixels - np.asarray(settings["image_mean"], np.float32)) / np.asarray(settings["image_std"],
                                                                                      np.float32)
    ph, pw = pixels.shape[0] // p, pixels.shape[1] // p
    if ph % k or pw % k:
        raise EdgegenError(f"the image is {pixels.shape[1]}x{pixels.shape[0]} pixels after resizing, not a multiple "
                           f"of {k * p}; check the bundle's image settings")
    patches = pixels[:ph * p, :pw * p].reshape(ph, p, pw, p, 3).transpose(0, 2, 1, 3, 4).reshape(ph * pw, -1)
    grid_x, grid_y = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    positions = np.stack([grid_x, grid_y], axis=-1).reshape(-1, 2).astype(np.int64)
    # Gemma4VisionPooler: patch (x, y) belongs to soft token (x // k) + (width // k) * (y // k).
    token = positions[:, 0] // k + (pw // k) * (positions[:, 1] // k)
    pooling = np.zeros((ph * pw // (k * k), ph * pw), np.float32)
    pooling[token, np.arange(ph * pw)] = 1.0 / (k * k)
    key = hashlib.sha256(patches.tobytes()).hexdigest()
    return Patches(np.ascontiguousarray(patches), positions, pooling, key)


class VisionEncoder:
    """The bundle's vision graph and its processor settings: images -> soft tokens [T, hidden]."""

    def __init__(self, session, settings: dict):
        self.session, self.settings = session, settings
        self.encode_s = 0.0  # time spent in the graph (the last `encode_all`)

    def preprocess(self, image) -> Patches:
        return preprocess(image, self.settings)

    def encode(self, patches: Patches) -> np.ndarray:
        feeds = {names.PIXEL_VALUES: patches.pixel_values[None], names.PIXEL_POSITIONS: patches.positions[None],
                 names.POOLING: patches.pooling[None]}
        return encode(self.session, feeds, "vision")

    def close(self) -> None:
        self.session = None

    def expand(self, text: str, patches: list[Patches]) -> str:
        """Gemma4Processor's prompt expansion: the i-th `<|image|>` becomes boi + T_i image tokens + eoi."""
        found = text.count(IMAGE_TOKEN)
        if found != len(patches):
            raise EdgegenError(f"the prompt has {found} {IMAGE_TOKEN} placeholder(s) for {len(patches)} image(s); "
                               f"give one {IMAGE_TOKEN} per image")
        pieces = text.split(IMAGE_TOKEN)
        out = [pieces[0]]
        for piece, p in zip(pieces[1:], patches, strict=True):
            out.append(f"<|image>{IMAGE_TOKEN * p.soft_tokens}<image|>{piece}")
        return "".join(out)

    def soft_tokens(self, ids: list[int], patches: list[Patches], cache: dict | None = None) -> list[SoftTokens]:
        """The images' soft tokens placed at the runs of image-token ids in `ids` (one run per image, in order);
        runs the vision graph once per image not in `cache` (key -> soft tokens; filled here) and records the
        time in `encode_s`."""
        media = [(p.key, p.soft_tokens, lambda p=p: self.encode(p)) for p in patches]
        spans, self.encode_s = place(ids, self.settings["image_token_id"], media, cache, "image", "images")
        return spans
