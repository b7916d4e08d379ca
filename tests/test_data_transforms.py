"""Image loading for every PIL mode upstream data contains, and the two CLIP pipelines + DINO input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from chatterbox.data.transforms import CLIP_MEAN, CLIP_STD, ClipGeometry, clip_image, dino_image, load_image


def _rgb(width=40, height=30):
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[: height // 2, : width // 2] = (255, 0, 0)  # red top-left quadrant
    arr[height // 2:, width // 2:] = (0, 0, 255)
    return Image.fromarray(arr)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "I;16"])
def test_modes_load_as_rgb(tmp_path, mode):
    src = _rgb()
    if mode == "I;16":
        img = Image.fromarray((np.asarray(src.convert("L"), dtype=np.uint16) * 257))
    else:
        img = src.convert(mode)
    path = tmp_path / ("x.png" if mode not in ("CMYK",) else "x.jpg")
    img.save(path)
    out = load_image(str(path))
    assert out.mode == "RGB" and out.size == (40, 30)
    if mode in ("RGBA", "P", "CMYK"):
        r, g, b = out.getpixel((2, 2))
        assert r > 200 and g < 60 and b < 60


def test_an_annotated_size_must_match_the_file(tmp_path):
    from chatterbox.data.errors import DataError

    path = tmp_path / "x.png"
    _rgb(40, 30).save(path)
    assert load_image(str(path), "ann.json#3", annotated_size=(40, 30)).size == (40, 30)
    with pytest.raises(DataError, match=r"ann.json record 3 field 'image_size': annotation says 41x30") as err:
        load_image(str(path), "ann.json#3", annotated_size=(41, 30))
    assert str(path) in str(err.value)


def test_exif_rotation_is_applied(tmp_path):
    img = _rgb(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_image(str(path))
    assert out.size == (30, 40)
    r, g, b = out.getpixel((27, 2))  # red quadrant moved to the top right
    assert r > 200 and b < 60


def test_clip_crop_matches_hf_clip_image_processor():
    from transformers import CLIPImageProcessor
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (180, 300, 3), dtype=np.uint8))
    ours, geom = clip_image(img, 224, "crop")
    ref = CLIPImageProcessor()(images=img, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == ref.shape == (3, 224, 224)
    assert (ours - ref).abs().mean() < 0.02  # same resize/crop; resampler rounding only
    assert (geom.resized_width, geom.resized_height, geom.crop_left, geom.crop_top) == (373, 224, 74, 0)


def test_squash_and_dino_normalisation():
    img = Image.new("RGB", (50, 20), (255, 255, 255))
    clip, geom = clip_image(img, 224, "squash")
    expected = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    assert torch.allclose(clip[:, 100, 100], expected, atol=1e-5)
    assert geom.boxes_to_clip_norm(torch.tensor([[0.0, 0.0, 25.0, 10.0]])).tolist() == [[0.0, 0.0, 0.5, 0.5]]
    dino = dino_image(img, 512)
    assert dino.shape == (3, 512, 512)
    assert torch.allclose(dino[:, 0, 0], torch.tensor([(255 - 123.675) / 58.395, (255 - 116.28) / 57.12,
                                                       (255 - 103.53) / 57.375]), atol=1e-4)


def test_crop_geometry_clamps_regions_outside_the_crop():
    geom = ClipGeometry.build(400, 200, 224, "crop")  # resized 448x224, crop left 112
    inside = torch.tensor([[200.0, 50.0, 300.0, 150.0]])
    back = geom.boxes_from_clip_norm(geom.boxes_to_clip_norm(inside).double())
    assert torch.allclose(back.float(), inside, atol=1e-4)
    outside = geom.boxes_to_clip_norm(torch.tensor([[0.0, 0.0, 20.0, 20.0]]))
    x1, y1, x2, y2 = outside[0].tolist()
    assert 0 <= x1 < x2 <= 1 and x2 - x1 == pytest.approx(1 / 224)


def test_clip_image_bounds_the_centre_crop_resize():
    from chatterbox.data.transforms import MAX_CLIP_RESIZED_PIXELS, ImageShapeError

    thin = Image.new("RGB", (20000, 1), (200, 10, 10))
    with pytest.raises(ImageShapeError, match=r"20000x1 image is too thin .* 4480000x224 pixels"):
        clip_image(thin, 224, "crop")
    squashed, _ = clip_image(thin, 224, "squash")  # squashing never enlarges past the CLIP square
    assert squashed.shape == (3, 224, 224)
    wide = Image.new("RGB", (5000, 100), (200, 10, 10))  # 11200x224 after scaling: within the limit
    assert 11200 * 224 < MAX_CLIP_RESIZED_PIXELS and clip_image(wide, 224, "crop")[0].shape == (3, 224, 224)
