"""Images and boxes for both branches (spec/upstream.md §3.1).

* `load_image`: any file PIL reads -> RGB, EXIF orientation applied (grayscale, palette, RGBA, CMYK,
  16-bit handled); a missing or unreadable file raises DataError naming the file and the record.
* CLIP image [3,224,224]: "crop" = HF CLIPImageProcessor (shortest side -> 224 bicubic, centre crop),
  "squash" = mmdet-style resize to 224x224 ignoring aspect (bilinear); then /255 and CLIP mean/std.
* DINO image [3,512,512]: resize to exactly 512x512 (bilinear, aspect not kept) and ImageNet mean/std on
  0-255 values.
* Boxes: region inputs (`<bbox>`) become xyxy normalised to the CLIP input (`ClipGeometry`), grounding
  targets become cxcywh normalised to the original image. All layout changes go through chatterbox.boxes.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from chatterbox.boxes import BoxError, convert_layout, normalize, validate_xyxy
from chatterbox.data.errors import DataError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)

# Large images are decoded anyway (annotations are in their pixels); this only guards against bombs.
Image.MAX_IMAGE_PIXELS = 200_000_000
#: The CLIP centre crop first scales the short side to the CLIP size: a thin image (20000x1) would become
#: a huge one (4,480,000x224). Past this many pixels after that scaling, `clip_image` refuses the image.
MAX_CLIP_RESIZED_PIXELS = 40_000_000


class ImageShapeError(ValueError):
    """An image whose shape the CLIP preprocessing cannot take (too thin to centre-crop within memory)."""


def load_image(path: str, sample_id: str = "?", annotated_size: Sequence[int] | None = None) -> Image.Image:
    """Open an image as 8-bit RGB with its EXIF orientation applied; ``annotated_size`` (width, height), when
    the annotation gives one, must match the file."""
    file, _, record = sample_id.rpartition("#")
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path}", file or sample_id, record or None, "image")
    try:
        with Image.open(path) as img:
            image = to_rgb(ImageOps.exif_transpose(img))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}", file or sample_id, record or None, "image") from e
    if annotated_size is not None and tuple(annotated_size) != image.size:
        raise DataError(f"annotation says {annotated_size[0]}x{annotated_size[1]} but the image file {path} is "
                        f"{image.size[0]}x{image.size[1]}", file or sample_id, record or None, "image_size")
    return image


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (EXIF orientation is the caller's business; `load_image` applies it)."""
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode == "P":
        # Palette images may carry transparency; going through RGBA keeps PIL from warning.
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float grayscale: rescale the value range to 8 bits.
        lo, hi = img.getextrema() if img.mode != "I;16" else (0, 65535)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = img.point(lambda v: (v - lo) * scale).convert("L")
    # RGBA/LA: drop alpha and keep the colour values, as cv2.imread (upstream) does.
    return img.convert("RGB")




@dataclass(frozen=True)
class ClipGeometry:
    """How an original (width, height) image maps into the square CLIP input of side ``size``."""

    width: int
    height: int
    size: int
    mode: str  # "crop" or "squash"
    resized_width: int
    resized_height: int
    crop_left: int
    crop_top: int

    @classmethod
    def build(cls, width: int, height: int, size: int = 224, mode: str = "crop") -> "ClipGeometry":
        if mode == "squash":
            return cls(width, height, size, mode, size, size, 0, 0)
        if mode != "crop":
            raise ValueError(f"CLIP resize mode must be 'crop' or 'squash', got {mode!r}")
        # HF CLIPImageProcessor: shortest edge -> size, the long edge scaled and truncated to int.
        if width <= height:
            rw, rh = size, int(size * height / width)
        else:
            rw, rh = int(size * width / height), size
        return cls(width, height, size, mode, rw, rh, (rw - size) // 2, (rh - size) // 2)

    def boxes_to_clip_norm(self, boxes_xyxy_abs: torch.Tensor) -> torch.Tensor:
        """Original-pixel xyxy -> xyxy normalised to the CLIP input (clamped to it, at least 1 px wide)."""
        sx = self.resized_width / self.width
        sy = self.resized_height / self.height
        scale = torch.tensor([sx, sy, sx, sy], dtype=boxes_xyxy_abs.dtype)
        shift = torch.tensor([self.crop_left, self.crop_top] * 2, dtype=boxes_xyxy_abs.dtype)
        boxes_xyxy_clip = (boxes_xyxy_abs * scale - shift).clamp(0, self.size)
        # A region cut away by the centre crop keeps a 1-pixel sliver on the crop border rather than a
        # zero-area box, so RoIAlign still gets a valid (if uninformative) box.
        min_side = 1.0
        x1 = boxes_xyxy_clip[:, 0].clamp(max=self.size - min_side)
        y1 = boxes_xyxy_clip[:, 1].clamp(max=self.size - min_side)
        x2 = torch.maximum(boxes_xyxy_clip[:, 2], x1 + min_side)
        y2 = torch.maximum(boxes_xyxy_clip[:, 3], y1 + min_side)
        return torch.stack([x1, y1, x2, y2], dim=-1) / self.size

    def boxes_from_clip_norm(self, boxes_xyxy_clip_norm: torch.Tensor) -> torch.Tensor:
        """Inverse of `boxes_to_clip_norm` for boxes inside the crop."""
        sx = self.resized_width / self.width
        sy = self.resized_height / self.height
        shift = torch.tensor([self.crop_left, self.crop_top] * 2, dtype=boxes_xyxy_clip_norm.dtype)
        scale = torch.tensor([sx, sy, sx, sy], dtype=boxes_xyxy_clip_norm.dtype)
        return (boxes_xyxy_clip_norm * self.size + shift) / scale


def _to_chw_float(img: Image.Image) -> torch.Tensor:
    hwc = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    return hwc.permute(2, 0, 1).float()


def _normalise(chw_255: torch.Tensor, mean_255, std_255) -> torch.Tensor:
    mean = torch.tensor(mean_255, dtype=chw_255.dtype).view(3, 1, 1)
    std = torch.tensor(std_255, dtype=chw_255.dtype).view(3, 1, 1)
    return chw_255.sub_(mean).div_(std)


def clip_resize_mode(configured: str, source_mode: str) -> str:
    """The `clip_image` mode for one image: "squash" where the config squashes every image
    (``model.clip.resize`` / ``data.clip_resize`` = "squash"), else the mode of the image's own source."""
    return "squash" if configured == "squash" else source_mode


def clip_image(img: Image.Image, size: int = 224, mode: str = "crop") -> tuple[torch.Tensor, ClipGeometry]:
    """The CLIP branch input [3,size,size] (CLIP mean/std) and the geometry used to make it."""
    geom = ClipGeometry.build(img.width, img.height, size, mode)
    if geom.resized_width * geom.resized_height > MAX_CLIP_RESIZED_PIXELS:
        raise ImageShapeError(
            f"a {img.width}x{img.height} image is too thin for the CLIP centre crop: scaled to a short side of "
            f"{size} it would be {geom.resized_width}x{geom.resized_height} pixels (limit "
            f"{MAX_CLIP_RESIZED_PIXELS:,}); crop it to a less extreme aspect ratio, or squash it "
            f"(model.clip.resize=squash)")
    if mode == "crop":
        resized = img.resize((geom.resized_width, geom.resized_height), Image.BICUBIC)
        out = resized.crop((geom.crop_left, geom.crop_top, geom.crop_left + size, geom.crop_top + size))
    else:
        out = img.resize((size, size), Image.BILINEAR)
    mean_255 = tuple(255 * m for m in CLIP_MEAN)
    std_255 = tuple(255 * s for s in CLIP_STD)
    return _normalise(_to_chw_float(out), mean_255, std_255), geom


@dataclass(frozen=True)
class SquashAugment:
    """mmdet's RandomShift + RandomFlip on the squashed CLIP image (COCO detection only, spec §3.1):
    content moved by (dx, dy) pixels of the CLIP input, zero-filled, then optionally mirrored."""

    dx: int = 0
    dy: int = 0
    flip: bool = False

    def apply_to_image(self, image_clip: torch.Tensor) -> torch.Tensor:
        if self.dx or self.dy:
            _, h, w = image_clip.shape
            # mmdet pads with pixel value 0 before normalising; this is that value after normalisation
            fill = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], dtype=image_clip.dtype).view(3, 1, 1)
            shifted = fill.expand_as(image_clip).clone()
            src_x, dst_x = (slice(0, w - self.dx), slice(self.dx, w)) if self.dx >= 0 else (slice(-self.dx, w), slice(0, w + self.dx))
            src_y, dst_y = (slice(0, h - self.dy), slice(self.dy, h)) if self.dy >= 0 else (slice(-self.dy, h), slice(0, h + self.dy))
            shifted[:, dst_y, dst_x] = image_clip[:, src_y, src_x]
            image_clip = shifted
        return image_clip.flip(-1) if self.flip else image_clip

    def apply_to_boxes(self, boxes_xyxy_clip_norm: torch.Tensor, size: int) -> torch.Tensor:
        shift = torch.tensor([self.dx, self.dy, self.dx, self.dy], dtype=boxes_xyxy_clip_norm.dtype) / size
        boxes = (boxes_xyxy_clip_norm + shift).clamp(0, 1)
        if self.flip:
            boxes = torch.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], dim=-1)
        return boxes


def dino_image(img: Image.Image, size: int = 512) -> torch.Tensor:
    """The vision-branch input [3,size,size]: squash-resize, ImageNet mean/std on 0-255 values."""
    out = img.resize((size, size), Image.BILINEAR)
    return _normalise(_to_chw_float(out), IMAGENET_MEAN_255, IMAGENET_STD_255)


def check_boxes_in_image(boxes_xyxy_abs, width: int, height: int, sample_id: str, field: str) -> torch.Tensor:
    """Validate original-pixel boxes against the loaded image; DataError naming the sample and field."""
    file, _, record = sample_id.rpartition("#")
    try:
        return validate_xyxy(boxes_xyxy_abs, width, height, where=field).to(torch.float64)
    except BoxError as e:
        raise DataError(str(e), file or sample_id, record or None, field) from e


def region_boxes_from_pixels(boxes_xyxy_abs, width: int, height: int, geometry: ClipGeometry, normalisation: str,
                             sample_id: str) -> torch.Tensor:
    """`<bbox>` inputs from original-pixel region boxes (possibly none): checked against the image, then
    :func:`region_boxes_for_model`."""
    checked = (check_boxes_in_image(boxes_xyxy_abs, width, height, sample_id, "region boxes")
               if len(boxes_xyxy_abs) else torch.zeros(0, 4, dtype=torch.float64))
    return region_boxes_for_model(checked, geometry, normalisation)


def region_boxes_for_model(boxes_xyxy_abs: torch.Tensor, geometry: ClipGeometry, normalisation: str) -> torch.Tensor:
    """`<bbox>` inputs: xyxy normalised to the CLIP input.

    ``normalisation="crop"`` maps through the resize/crop CLIP sees; ``"full_image"`` divides by the
    original size as upstream does for CB data (identical for "squash" images).
    """
    if boxes_xyxy_abs.numel() == 0:
        return torch.zeros(0, 4, dtype=torch.float32)
    if normalisation == "full_image" or geometry.mode == "squash":
        return normalize(boxes_xyxy_abs, geometry.width, geometry.height).clamp(0, 1).float()
    if normalisation != "crop":
        raise ValueError(f"region_box_normalisation must be 'crop' or 'full_image', got {normalisation!r}")
    return geometry.boxes_to_clip_norm(boxes_xyxy_abs).float()


def grounding_targets_for_model(boxes_xyxy_abs: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """`[VG]` targets: cxcywh normalised to the original image (what the 512² squash preserves)."""
    boxes_xyxy_norm = normalize(boxes_xyxy_abs, width, height)
    return convert_layout(boxes_xyxy_norm, "xyxy", "cxcywh").float()


def is_finite_box(box) -> bool:
    return len(box) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
