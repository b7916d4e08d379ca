"""Which step of the image preprocessing differs between two Pillow versions.

    python compare_resize.py dump OUT.npz [IMAGE_DIR]     # once under each Pillow version
    python compare_resize.py compare A.npz B.npz          # the differences, as JSON

On the first 20 JPEGs of IMAGE_DIR (default: the quickstart's eval images) it keeps the decoded RGB and
the resizes of chatterbox/data/transforms.py: bicubic (CLIP's "crop" mode, 224), bilinear to the tiny
preset's squashed CLIP input (112) and vision-branch input (128), and bilinear to the 13b's 512.
"""
import glob
import json
import sys

import numpy as np
from PIL import Image

STEPS = ("decode", "bicubic_224", "bilinear_112", "bilinear_128", "bilinear_512")


def dump(out: str, image_dir: str = "data/synthetic/MSCOCO2017/val2017") -> None:
    arrays = {}
    for i, path in enumerate(sorted(glob.glob(f"{image_dir}/*.jpg"))[:20]):
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        resized = [rgb.resize((224, 224), Image.BICUBIC)] + [rgb.resize((n, n), Image.BILINEAR) for n in (112, 128, 512)]
        for step, out_img in zip(STEPS, [rgb] + resized):
            arrays[f"{i}_{step}"] = np.asarray(out_img)
    np.savez(out, pillow=np.array(Image.__version__), **arrays)


def compare(a_path: str, b_path: str) -> None:
    a, b = np.load(a_path), np.load(b_path)
    result = {"pillow": [str(a["pillow"]), str(b["pillow"])]}
    for step in STEPS:
        diffs = [np.abs(a[k].astype(int) - b[k].astype(int)) for k in a.files if k.endswith(step)]
        result[step] = {"images": len(diffs), "max_abs_diff": int(max(d.max() for d in diffs)),
                        "share_of_values_differing": float(np.mean([(d > 0).mean() for d in diffs])),
                        "mean_abs_diff": float(np.mean([d.mean() for d in diffs]))}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    {"dump": dump, "compare": compare}[sys.argv[1]](*sys.argv[2:])
