"""A small synthetic corpus in every upstream on-disk format, with boxes that are known exactly.

Each scene is a JPEG with 2-4 coloured shapes (circle, square, triangle pointing any way) on a plain,
gradient or noisy low-saturation background, in sizes from a fifth to ~45% of the image side; fills
vary around each colour's hue. A shape is named by colour and kind ("red circle") and the name is unique
in its image (a colour or a kind may repeat), so "Where is the red circle?" has exactly one right box
and needs both words. The same scenes are written in the layouts of COCO 2014/2017, the refer
toolkit (refs pickles + instances.json), CB-300K, CB-materials, the MDETR-style RefCOCO/VG/Flickr30K
json files and LLaVA-Instruct, so every reader is exercised on files in their real layout, and the tiny
preset can learn something measurable (colour/kind -> location, region -> name) in minutes on a CPU.
Six train scenes also make ``own_data/``, an example of ChatterBox's own JSONL format for your own data.
Every question is well posed: relation questions ("What is to the left of the red circle?") are asked
only where one shape is in that relation.

Scenes are split into train and eval (held out: COCO val2017, refer val/test splits, eval/ files).
Everything is deterministic given the seed.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

#: Prototype RGB of each colour name (a shape's fill is drawn around it, see `_fill`).
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220),
    "yellow": (235, 205, 40), "purple": (140, 50, 170), "orange": (245, 135, 20),
}
#: Hue range (degrees) of each colour name. Fills vary in hue, saturation and brightness so that a model
#: learns the colour category, not one RGB value.
HUES = {"red": (-8, 8), "orange": (22, 36), "yellow": (48, 60), "green": (95, 150), "blue": (205, 240),
        "purple": (270, 295)}
KINDS = ("circle", "square", "triangle")
CATEGORIES = [f"{c} {k}" for c in COLOURS for k in KINDS]  # COCO category id = index + 1
IMAGE_SIZES = [(320, 240), (240, 320), (256, 256), (320, 160), (192, 256), (288, 216), (160, 224), (128, 128),
               (400, 300), (224, 168), (352, 288), (200, 300)]
TRIANGLE_POINTS = ("up", "down", "left", "right")
BACKGROUND_TEXTURES = ("plain", "gradient", "noise")


@dataclass
class Shape:
    colour: str
    kind: str
    box_xyxy_abs: tuple[int, int, int, int]
    fill: tuple[int, int, int] | None = None  # drawn RGB (None: the colour's prototype)
    points: str = "up"  # where a triangle's apex points

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def category_id(self) -> int:
        return CATEGORIES.index(self.name) + 1

    @property
    def box_xywh_abs(self) -> tuple[int, int, int, int]:
        x1, y1, x2, y2 = self.box_xyxy_abs
        return (x1, y1, x2 - x1, y2 - y1)

    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box_xyxy_abs
        return (x1 + x2) / 2, (y1 + y2) / 2


@dataclass
class Scene:
    image_id: int
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: list[Shape]
    split: str  # "train" or "eval"
    jpeg: bytes = b""
    texture: str = "plain"  # "plain", "gradient" (to background2) or "noise"
    background2: tuple[int, int, int] | None = None
    texture_seed: int = 0

    def position(self, shape: Shape) -> str:
        cx, cy = shape.centre()
        col = ("left", "center", "right")[min(2, int(3 * cx / self.width))]
        row = ("top", "middle", "bottom")[min(2, int(3 * cy / self.height))]
        if (row, col) == ("middle", "center"):
            return "in the center"
        return f"at the {row} {col}" if col != "center" else f"at the {row}"


def article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def relation(a: Shape, b: Shape) -> str:
    """Spatial relation of b with respect to a, from the box centres."""
    (ax, ay), (bx, by) = a.centre(), b.centre()
    if abs(bx - ax) >= abs(by - ay):
        return "to the right of" if bx > ax else "to the left of"
    return "below" if by > ay else "above"


def unique_relations(scene: Scene) -> list[tuple[Shape, str, Shape]]:
    """(a, relation, b) where b is the only shape of the scene in that relation to a: "What is to the
    left of a?" then has exactly one right answer."""
    out = []
    for a in scene.shapes:
        others = [b for b in scene.shapes if b is not a]
        for b in others:
            rel = relation(a, b)
            if sum(relation(a, c) == rel for c in others) == 1:
                out.append((a, rel, b))
    return out


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((h % 360) / 360, s, v)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def _fill(rng: random.Random, colour: str) -> tuple[int, int, int]:
    low, high = HUES[colour]
    value = rng.uniform(0.75, 1.0) if colour in ("yellow", "orange") else rng.uniform(0.55, 0.95)
    return _hsv_to_rgb(rng.uniform(low, high), rng.uniform(0.7, 1.0), value)


def _background(rng: random.Random) -> tuple[int, int, int]:
    """A low-saturation colour (white, greys, black, tints): never mistaken for a shape's colour."""
    return _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.2), rng.choice([rng.uniform(0.05, 0.3),
                                                                                 rng.uniform(0.55, 1.0)]))


def _make_scene(rng: random.Random, image_id: int, split: str, image_sizes=IMAGE_SIZES) -> Scene:
    """2-4 shapes with distinct names (a colour or a kind may repeat: "red circle" beside "red square"),
    on a plain, gradient or noisy low-saturation background."""
    width, height = rng.choice(image_sizes)
    n_shapes = rng.randint(2, 4)
    names = rng.sample([(c, k) for c in COLOURS for k in KINDS], n_shapes)
    shapes: list[Shape] = []
    short = min(width, height)
    for colour, kind in names:
        for _ in range(100):
            side = rng.randint(max(20, short // 5), max(28, int(short / 2.2)))
            w = side if rng.random() < 0.5 else int(side * rng.uniform(0.7, 1.3))
            w = max(12, min(w, width - 2))
            h = min(side, height - 2)
            x1, y1 = rng.randint(0, width - w), rng.randint(0, height - h)
            box = (x1, y1, x1 + w, y1 + h)
            if all(_gap(box, s.box_xyxy_abs) for s in shapes):
                shapes.append(Shape(colour, kind, box, _fill(rng, colour), rng.choice(TRIANGLE_POINTS)))
                break
    texture = rng.choice(BACKGROUND_TEXTURES)
    return Scene(image_id, width, height, _background(rng), shapes, split, texture=texture,
                 background2=_background(rng), texture_seed=rng.randrange(2**31))


def _gap(a, b, margin: int = 4) -> bool:
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def _triangle(box, points: str) -> list[tuple[float, float]]:
    x1, y1, x2, y2 = box[0], box[1], box[2] - 1, box[3] - 1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return {"up": [(x1, y2), (x2, y2), (cx, y1)], "down": [(x1, y1), (x2, y1), (cx, y2)],
            "left": [(x2, y1), (x2, y2), (x1, cy)], "right": [(x1, y1), (x1, y2), (x2, cy)]}[points]


def _background_image(scene: Scene) -> Image.Image:
    size = (scene.width, scene.height)
    if scene.texture == "plain" or scene.background2 is None:
        return Image.new("RGB", size, scene.background)
    if scene.texture == "gradient":
        ramp = Image.linear_gradient("L").resize(size)
        if scene.texture_seed % 2:
            ramp = ramp.transpose(Image.Transpose.ROTATE_90).resize(size)
        return Image.composite(Image.new("RGB", size, scene.background2), Image.new("RGB", size, scene.background),
                               ramp)
    # noise: the background with every pixel's brightness jittered (a grain a shape must stand out from)
    grain = Image.frombytes("L", size, random.Random(scene.texture_seed).randbytes(size[0] * size[1]))
    base = Image.new("RGB", size, scene.background)
    return Image.blend(base, Image.merge("RGB", (grain, grain, grain)), 0.25)


def render_scene(scene: Scene) -> Image.Image:
    img = _background_image(scene)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        x1, y1, x2, y2 = s.box_xyxy_abs
        fill = s.fill or COLOURS[s.colour]
        # PIL's outlines are inclusive: drawing to x2-1/y2-1 fills exactly the pixels of [x1,x2)x[y1,y2).
        if s.kind == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        else:
            draw.polygon(_triangle(s.box_xyxy_abs, s.points), fill=fill)
    return img


def make_scenes(num_images: int = 64, eval_fraction: float = 0.25, seed: int = 0,
                image_sizes=IMAGE_SIZES) -> list[Scene]:
    rng = random.Random(seed)
    n_eval = max(1, int(round(num_images * eval_fraction)))
    scenes = []
    for i in range(num_images):
        scene = _make_scene(rng, 100001 + i, "eval" if i >= num_images - n_eval else "train", image_sizes)
        buf = io.BytesIO()
        render_scene(scene).save(buf, format="JPEG", quality=92)
        scene.jpeg = buf.getvalue()
        scenes.append(scene)
    return scenes


# ----------------------------------------------------------------------------------------------------
# file names per layout


def coco2014_name(scene: Scene) -> str:
    return f"COCO_train2014_{scene.image_id:012d}.jpg"


def coco2017_name(scene: Scene) -> str:
    return f"{scene.image_id:012d}.jpg"


def vg_name(scene: Scene) -> str:
    return f"{scene.image_id}.jpg"


#: The example of ChatterBox's own JSONL format (readers/jsonl.py), its images in images/ beside it.
JSONL_EXAMPLE = "own_data/dialogues.jsonl"


def _box_str(box) -> str:
    return "[" + ", ".join(str(int(v)) for v in box) + "]"


def _group(entries) -> str:
    return "<" + ", ".join(f"{name}:{_box_str(box)}" for name, box in entries) + ">"


@dataclass
class SyntheticCorpus:
    root: Path
    scenes: list[Scene]
    files: dict[str, str] = field(default_factory=dict)

    def data_paths(self) -> dict[str, str]:
        """Values for DataConfig.paths pointing at this corpus."""
        r = self.root
        return {
            "cb300k_dir": str(r / "CB-300K"),
            "cb_materials_dir": str(r / "CB-materials"),
            "opensource_dir": str(r / "OpenSource"),
            "refer_dir": str(r / "refer"),
            "coco2014_dir": str(r / "MSCOCO2014"),
            "coco2017_dir": str(r / "MSCOCO2017"),
            "vg_dir": str(r / "VG"),
            "flickr30k_dir": str(r / "flickr30k"),
            "llava_instruct_json": str(r / "llava_instruct_150k.json"),
        }

    @property
    def jsonl_example(self) -> Path:
        """For ``data.paths.jsonl_files`` (kept out of `data_paths` so that data_paths.yaml stays as it was)."""
        return self.root / JSONL_EXAMPLE


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=None))


def write_corpus(root: str | os.PathLike, num_images: int = 64, seed: int = 0, eval_fraction: float = 0.25,
                 image_sizes=IMAGE_SIZES, kind_question_share: float = 0.0) -> SyntheticCorpus:
    """Write the corpus under ``root`` and return its description (see `SyntheticCorpus.data_paths`).

    ``image_sizes``: (width, height) choices; the default is small for tests and the tiny preset, the
    benchmark passes COCO/VG-like sizes. ``kind_question_share``: the share of CB_REF.json's rounds that ask
    for the kind alone ("What shape is <it>?" -> "It is a circle."), where the reply reads the region for the
    kind as it does for the colour of a name (docs/results/tiny_recipe, "the kind through the language model")."""
    root = Path(root)
    scenes = make_scenes(num_images, eval_fraction, seed, image_sizes)
    rng = random.Random(seed + 1)
    corpus = SyntheticCorpus(root, scenes)
    train = [s for s in scenes if s.split == "train"]
    evals = [s for s in scenes if s.split == "eval"]

    _write_images(root, scenes)
    _write_coco(root, train, evals)
    _write_refer(root, scenes, rng)
    _write_cb_materials(root, train, rng)
    # A random stream of its own, so that the kind questions change no other file.
    _write_cb300k(root, train, rng, kind_question_share, random.Random(seed + 2))
    _write_mdetr(root, train, rng)
    _write_llava(root, train, rng)
    _write_eval_files(root, evals, rng)
    _write_jsonl_example(corpus.jsonl_example, train, seed)
    paths = corpus.data_paths()
    _write_json(root / "data_paths.json", paths)
    (root / "data_paths.yaml").write_text(
        "# DataConfig.paths for this synthetic corpus: merge under `data: paths:`\n"
        + "".join(f"{k}: {json.dumps(v)}\n" for k, v in paths.items())
    )
    return corpus


def _write_images(root: Path, scenes: list[Scene]) -> None:
    for s in scenes:
        targets = [root / "MSCOCO2014" / "train2014" / coco2014_name(s),
                   root / "MSCOCO2017" / ("train2017" if s.split == "train" else "val2017") / coco2017_name(s),
                   root / "VG" / "VG_100K" / vg_name(s),
                   root / "VG" / "images" / vg_name(s),
                   root / "flickr30k" / "flickr30k-images" / vg_name(s)]
        for t in targets:
            t.parent.mkdir(parents=True, exist_ok=True)
            t.write_bytes(s.jpeg)


def _coco_instances(scenes: list[Scene], file_name) -> dict:
    images, annotations = [], []
    for s in scenes:
        images.append({"id": s.image_id, "file_name": file_name(s), "width": s.width, "height": s.height,
                       "license": 1, "coco_url": "", "date_captured": ""})
        for j, sh in enumerate(s.shapes):
            x, y, w, h = sh.box_xywh_abs
            annotations.append({
                "id": s.image_id * 10 + j, "image_id": s.image_id, "category_id": sh.category_id,
                "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            })
    categories = [{"id": i + 1, "name": n, "supercategory": n.split()[1]} for i, n in enumerate(CATEGORIES)]
    return {"info": {"description": "ChatterBox synthetic"}, "licenses": [], "images": images,
            "annotations": annotations, "categories": categories}


def _write_coco(root: Path, train: list[Scene], evals: list[Scene]) -> None:
    ann = root / "MSCOCO2017" / "annotations"
    _write_json(ann / "instances_train2017.json", _coco_instances(train, coco2017_name))
    _write_json(ann / "instances_val2017.json", _coco_instances(evals, coco2017_name))


def _write_refer(root: Path, scenes: list[Scene], rng: random.Random) -> None:
    instances = _coco_instances(scenes, coco2014_name)
    layouts = {"refcoco": ("unc", ("val", "testA", "testB")), "refcoco+": ("unc", ("val", "testA", "testB")),
               "refcocog": ("umd", ("val", "test"))}
    sent_id = 0
    for dataset, (split_by, eval_splits) in layouts.items():
        refs = []
        ref_id = 0
        for s in scenes:
            for j, sh in enumerate(s.shapes):
                split = "train" if s.split == "train" else eval_splits[(s.image_id + j) % len(eval_splits)]
                if dataset == "refcoco+":  # RefCOCO+ avoids location words
                    raws = [f"{sh.colour} {sh.kind}", f"the {sh.kind} that is {sh.colour}"]
                elif dataset == "refcocog":  # longer expressions
                    raws = [f"{article(sh.name)} {s.position(sh)} of the picture",
                            f"the {sh.kind} coloured {sh.colour}"]
                else:
                    raws = [f"{sh.colour} {sh.kind} {s.position(sh)}", f"{sh.colour} {sh.kind}"]
                sentences = []
                for raw in raws:
                    sentences.append({"tokens": raw.split(), "raw": raw, "sent_id": sent_id, "sent": raw})
                    sent_id += 1
                ann_id = s.image_id * 10 + j
                refs.append({
                    "ref_id": ref_id, "ann_id": ann_id, "image_id": s.image_id, "split": split,
                    "sentences": sentences, "sent_ids": [x["sent_id"] for x in sentences],
                    "file_name": f"COCO_train2014_{s.image_id:012d}_{ann_id}.jpg",
                    "category_id": sh.category_id,
                })
                ref_id += 1
        folder = root / "refer" / dataset
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"refs({split_by}).p", "wb") as f:
            pickle.dump(refs, f, protocol=2)
        _write_json(folder / "instances.json", instances)


def _write_cb_materials(root: Path, train: list[Scene], rng: random.Random) -> None:
    folder = root / "CB-materials"
    gnd_questions = ["Where is the {n}?", "Can you find the {n} in the picture?", "Show me the {n}."]
    refcoco_gnd, coco_gnd, refcoco_ref = [], [], []
    for s in train:
        for sh in s.shapes:
            q = rng.choice(gnd_questions).format(n=sh.name)
            a = f"The {sh.name} is {s.position(sh)}."
            refcoco_gnd.append({"image": coco2014_name(s), "category_id": sh.category_id, "conversation": [
                {"from": "human", "value": q}, {"from": "gpt", "value": f"{a} {_group([(sh.name, sh.box_xywh_abs)])}"}]})
            coco_gnd.append({"image": coco2017_name(s), "category_id": sh.category_id, "conversation": [
                {"from": "human", "value": q}, {"from": "gpt", "value": f"{a} {_group([(sh.name, sh.box_xyxy_abs)])}"}]})
            refcoco_ref.append({"image": coco2014_name(s), "category_id": sh.category_id, "conversation": [
                {"from": "human", "value": f"What is <it>? {_group([('object', sh.box_xywh_abs)])}"},
                {"from": "gpt", "value": f"It is a {sh.name}."},
                {"from": "human", "value": f"Where is it? {_group([('object', sh.box_xywh_abs)])}"},
                {"from": "gpt", "value": f"It is {s.position(sh)} of the image."}]})
    _write_json(folder / "CB-refcoco-GND.json", {"data": refcoco_gnd})
    _write_json(folder / "CB-coco-GND.json", {"data": coco_gnd})
    _write_json(folder / "CB-refcoco-REF.json", {"data": refcoco_ref})


def _relation_rounds(s: Scene, rng: random.Random, limit: int = 3) -> list[tuple[Shape, str, Shape]]:
    """Up to ``limit`` well-posed relation questions about a scene (see `unique_relations`)."""
    triples = unique_relations(s)
    return rng.sample(triples, min(limit, len(triples)))


def _write_cb300k(root: Path, train: list[Scene], rng: random.Random, kind_question_share: float,
                  question_rng: random.Random) -> None:
    folder = root / "CB-300K"
    mrg, ref, gnd, lc = [], [], [], []
    for s in train:
        common = {"image": f"VG_100K/{vg_name(s)}", "id": s.image_id, "image_wh": [s.width, s.height]}
        conv = []
        for a, rel, b in _relation_rounds(s, rng):
            conv += [{"from": "human", "value": f"What is {rel} the {a.name}? {_group([(a.name, a.box_xyxy_abs)])}"},
                     {"from": "gpt", "value": f"The {b.name} is {rel} the {a.name}. {_group([(b.name, b.box_xyxy_abs)])}"}]
        if not conv:  # no well-posed relation: name a shape instead
            sh = rng.choice(s.shapes)
            conv = [{"from": "human", "value": f"What is <it>? {_group([('object', sh.box_xyxy_abs)])}"},
                    {"from": "gpt", "value": f"It is {article(sh.name)}."}]
        mrg.append({**common, "conversation": conv})

        conv = []
        for sh in rng.sample(s.shapes, len(s.shapes)):
            placeholder = rng.choice(["<it>", "<region>", ""])
            if placeholder == "<it>":
                q = f"What is <it>? {_group([('object', sh.box_xyxy_abs)])}"
            elif placeholder == "<region>":
                q = f"What is the shape in <region>? {_group([('object', sh.box_xyxy_abs)])}"
            else:
                q = f"What is {s.position(sh)} of the image? {_group([('object', sh.box_xyxy_abs)])}"
            answer = f"It is {article(sh.name)}."
            if question_rng.random() < kind_question_share:
                q = q.replace("What is the shape in", "What shape is in").replace("What is", "What shape is")
                answer = f"It is {article(sh.kind)}."
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": answer}]
        ref.append({**common, "conversation": conv})

        conv = []
        if len(s.shapes) >= 3:  # a multi-box answer: never a grounding target (exactly one box required)
            two = s.shapes[:2]
            conv += [{"from": "human", "value": "Which two shapes are in the image first?"},
                     {"from": "gpt", "value": f"The {two[0].name} and the {two[1].name}. "
                                              f"{_group([(x.name, x.box_xyxy_abs) for x in two])}"}]
        for sh in rng.sample(s.shapes, len(s.shapes)):
            conv += [{"from": "human", "value": f"Where is the {sh.name}?"},
                     {"from": "gpt", "value": f"It is {s.position(sh)}. {_group([(sh.name, sh.box_xyxy_abs)])}"}]
        gnd.append({**common, "conversation": conv})

        lc.append({**common, "conversation": _coreference_rounds(s, rng, logic_marker="[it]")})
    _write_json(folder / "CB_MRG.json", {"data": mrg})
    _write_json(folder / "CB_REF.json", {"data": ref})
    _write_json(folder / "CB_GND.json", {"data": gnd})
    _write_json(folder / "CB_LC.json", {"data": lc})


def _coreference_rounds(s: Scene, rng: random.Random, logic_marker: str = "it") -> list[dict]:
    """Pairs of rounds whose second needs the first: "What is <it>?" about a region, answered with the
    shape's name, then "Where is it?", answered with that shape's box. Every shape of the scene once."""
    conv = []
    for sh in rng.sample(s.shapes, len(s.shapes)):
        conv += [{"from": "human", "value": f"What is <it>? {_group([('object', sh.box_xyxy_abs)])}"},
                 {"from": "gpt", "value": f"It is {article(sh.name)}."},
                 {"from": "human", "value": f"Where is {logic_marker}?"},
                 {"from": "gpt", "value": f"It is {s.position(sh)}. {_group([(sh.name, sh.box_xyxy_abs)])}"}]
    return conv


def _mdetr_json(train: list[Scene], file_name, captions, dataset_name: str) -> dict:
    images, annotations = [], []
    entry_id = 0
    for s in train:
        for j, sh in enumerate(s.shapes):
            caption, spans = captions(s, sh)
            images.append({"id": entry_id, "file_name": file_name(s), "height": s.height, "width": s.width,
                           "caption": caption, "dataset_name": dataset_name, "original_id": s.image_id,
                           "tokens_negative": [[0, len(caption)]]})
            targets = spans if spans is not None else [(sh, [[0, len(caption)]])]
            for k, (target, tokens_positive) in enumerate(targets):
                x, y, w, h = target.box_xywh_abs
                annotations.append({"id": entry_id * 100 + k, "image_id": entry_id, "category_id": target.category_id,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                                    "tokens_positive": tokens_positive})
            entry_id += 1
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _flickr_caption(s: Scene, sh: Shape):
    """A caption mentioning every shape; each shape's phrase is one tokens_positive span."""
    parts, spans, pos = [], [], 0
    prefix = "A picture with "
    pos = len(prefix)
    for i, x in enumerate(s.shapes):
        phrase = article(x.name)
        sep = "" if i == 0 else (" and " if i == len(s.shapes) - 1 else ", ")
        pos += len(sep)
        parts.append(sep + phrase)
        spans.append((x, [[pos, pos + len(phrase)]]))
        pos += len(phrase)
    return prefix + "".join(parts) + ".", spans


def _write_mdetr(root: Path, train: list[Scene], rng: random.Random) -> None:
    folder = root / "OpenSource"
    _write_json(folder / "finetune_refcoco_train.json", _mdetr_json(
        train, coco2014_name, lambda s, sh: (f"{sh.name} {s.position(sh)}", None), "refcoco"))
    _write_json(folder / "finetune_refcoco+_train.json", _mdetr_json(
        train, coco2014_name, lambda s, sh: (f"{sh.colour} {sh.kind} shape", None), "refcoco+"))
    _write_json(folder / "finetune_refcocog_train.json", _mdetr_json(
        train, coco2014_name, lambda s, sh: (f"{sh.name} {s.position(sh)} of the picture", None), "refcocog"))
    vg = _mdetr_json(train, vg_name, lambda s, sh: (article(sh.name), None), "vg")
    # GPT4RoI's VG file: one image entry per image, captions on the annotations, category "object".
    vg_images, vg_anns = {}, []
    for img in vg["images"]:
        vg_images.setdefault(img["original_id"], {k: img[k] for k in ("file_name", "height", "width")} | {"id": img["original_id"]})
    by_entry = {img["id"]: img for img in vg["images"]}
    for a in vg["annotations"]:
        entry = by_entry[a["image_id"]]
        vg_anns.append({"id": a["id"], "image_id": entry["original_id"], "bbox": a["bbox"], "area": a["area"],
                        "iscrowd": 0, "category_id": 1, "caption": entry["caption"]})
    _write_json(folder / "vg_train.json", {"images": list(vg_images.values()), "annotations": vg_anns,
                                           "categories": [{"id": 1, "name": "object"}]})
    # the raw Visual Genome release layout of the same regions
    _write_json(root / "VG" / "image_data.json", [
        {"image_id": s.image_id, "width": s.width, "height": s.height, "coco_id": None, "flickr_id": None,
         "url": f"https://cs.stanford.edu/people/rak248/VG_100K/{vg_name(s)}"} for s in train])
    _write_json(root / "VG" / "region_descriptions.json", [
        {"id": s.image_id, "regions": [
            {"region_id": s.image_id * 10 + j, "image_id": s.image_id, "phrase": article(sh.name),
             "x": sh.box_xywh_abs[0], "y": sh.box_xywh_abs[1], "width": sh.box_xywh_abs[2],
             "height": sh.box_xywh_abs[3]} for j, sh in enumerate(s.shapes)]} for s in train])
    flickr_scenes = []
    seen = set()
    for s in train:
        if s.image_id not in seen:
            seen.add(s.image_id)
            flickr_scenes.append(s)
    flickr = _mdetr_json([s for s in flickr_scenes], vg_name, _flickr_caption, "flickr")
    # one caption entry per image (MDETR writes one per sentence); keep the first shape's entry per image
    keep, out_images = set(), []
    for img in flickr["images"]:
        if img["original_id"] not in keep:
            keep.add(img["original_id"])
            out_images.append(img)
    ids = {img["id"] for img in out_images}
    flickr["images"] = out_images
    flickr["annotations"] = [a for a in flickr["annotations"] if a["image_id"] in ids]
    _write_json(folder / "final_flickr_separateGT_train.json", flickr)


def _write_llava(root: Path, train: list[Scene], rng: random.Random) -> None:
    items = []
    for s in train:
        names = [x.name for x in s.shapes]
        conv = [{"from": "human", "value": "<image>\nWhat shapes can you see in the image?" if rng.random() < 0.5
                 else "What shapes can you see in the image?\n<image>"},
                {"from": "gpt", "value": "I can see " + ", ".join(article(n) for n in names) + "."}]
        sh = rng.choice(s.shapes)
        conv += [{"from": "human", "value": f"Where is the {sh.name}?"},
                 {"from": "gpt", "value": f"The {sh.name} is {s.position(sh)} of the image."}]
        items.append({"id": f"{s.image_id:012d}", "image": coco2017_name(s), "conversations": conv})
    _write_json(root / "llava_instruct_150k.json", items)


def _write_eval_files(root: Path, evals: list[Scene], rng: random.Random) -> None:
    """Held-out question files: COCO grounding QA in upstream's format (spec §4.1), and multi-round
    dialogues in the CB-MRG format (`_coreference_rounds`: round 2k answers with the box of round
    2k-1's region, which only the dialogue says)."""
    qa = []
    for s in evals:
        for sh in s.shapes:
            x, y, w, h = sh.box_xywh_abs
            qa.append({"image_id": s.image_id, "filename": coco2017_name(s), "wh": [s.width, s.height],
                       "catgory": sh.name, "question": f"Where is the {sh.name}?",
                       "answer": f"<{sh.name}:[{x}, {y}, {w}, {h}]>", "gt_box": [x, y, w, h]})
    _write_json(root / "eval" / "grounding_qa.json", qa)
    dialogues = [{"image": f"VG_100K/{vg_name(s)}", "id": s.image_id, "image_wh": [s.width, s.height],
                  "conversation": _coreference_rounds(s, rng)} for s in evals]
    _write_json(root / "eval" / "CB_MRG_eval.json", {"data": dialogues})


def _write_jsonl_example(path: Path, train: list[Scene], seed: int, num_dialogues: int = 6) -> None:
    """Dialogues about the first train scenes in ChatterBox's own JSONL format, with copies of their images:
    by turns a region question then a grounding one, a grounding question alone, and questions with neither
    (so each of jsonl_gnd, jsonl_ref and jsonl_vqa has records). A random stream of its own, so that the
    files above stay as they were."""
    rng = random.Random(f"jsonl example {seed}")
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for k, s in enumerate(train[:num_dialogues]):
        (path.parent / "images" / vg_name(s)).write_bytes(s.jpeg)
        region, target = rng.choice(s.shapes), rng.choice(s.shapes)
        ask_region = {"question": "What is <bbox>?", "answer": f"It is {article(region.name)}.",
                      "region_boxes_xyxy_abs": [list(region.box_xyxy_abs)]}
        ground = {"question": f"Where is the {target.name}? [VG]", "answer": f"It is {s.position(target)}.",
                  "grounding_boxes_xyxy_abs": [list(target.box_xyxy_abs)]}
        describe = [{"question": "What shapes can you see?",
                     "answer": "I can see " + ", ".join(article(x.name) for x in s.shapes) + "."},
                    {"question": f"Where is the {target.name}?", "answer": f"It is {s.position(target)}."}]
        rounds = ([ask_region, ground], [ground], describe)[k % 3]
        lines.append(json.dumps({"id": f"scene-{s.image_id}", "image": f"images/{vg_name(s)}",
                                 "image_wh": [s.width, s.height], "rounds": rounds}))
    path.write_text("".join(line + "\n" for line in lines))
