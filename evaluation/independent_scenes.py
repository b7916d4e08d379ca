"""Grounding and referring on scenes drawn independently of the synthetic corpus, through the notebook API.

    python evaluation/independent_scenes.py --config tiny_stage2 --checkpoint outputs/tiny_stage2/export

The synthetic corpus (chatterbox/data/synthetic.py) trains and evaluates the tiny model on scenes from one
generator. This check draws its own: the same colour and kind words, but its own renderer: image sizes
drawn from a continuous range, exact circles and squares, equilateral triangles at any rotation, fills
from its own hue table, a dark outline on half the shapes, and backgrounds the generator never makes
(stripes, checkerboards, radial vignettes, low-saturation clutter). Every question goes through
``ChatterBox.from_pretrained(export).chat_session(image).ask(...)`` with the session's default prompt
options, one session per question, as a notebook user would call it.

Reported, each beside its control:

* grounding: "Where is the <colour> <kind>?" with ``ground=True``: success (IoU >= 0.5 with the named
  shape); controls: the box answering *another* shape's name in the same image scored against this shape
  (a model that ignores the words scores as high as on its own question), always the largest shape, and
  chance (1 / shapes in the image);
* referring: "What is it <bbox>?" + the config's ``eval.referring_suffix`` (as the RefCOCOg runner asks;
  the tiny config's is empty) on each shape's box: the reply names the colour and the kind (whole words),
  each word on its own, beside the most-frequent-word controls.

Per kind and per background the success rates are in the summary; the last line printed is its JSON.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import math
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatterbox.data.synthetic import COLOURS, KINDS  # noqa: E402  (the vocabulary only)

#: This renderer's own hue centre (degrees) per colour word.
HUE_CENTRES = {"red": 0, "orange": 29, "yellow": 54, "green": 122, "blue": 222, "purple": 282}
BACKGROUNDS = ("stripes", "checker", "vignette", "clutter")
assert set(HUE_CENTRES) == set(COLOURS)


@dataclass
class DrawnShape:
    colour: str
    kind: str
    box_xyxy_abs: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def area(self) -> int:
        x1, y1, x2, y2 = self.box_xyxy_abs
        return (x2 - x1) * (y2 - y1)


@dataclass
class DrawnScene:
    image: Image.Image
    background: str
    shapes: list[DrawnShape]


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h % 360) / 360, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _muted(rng: random.Random) -> tuple[int, int, int]:
    """A low-saturation colour: a background never mistaken for a named colour."""
    return _rgb(rng.uniform(0, 360), rng.uniform(0, 0.15), rng.uniform(0.1, 0.95))


def _background(rng: random.Random, kind: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    a, b = _muted(rng), _muted(rng)
    img = Image.new("RGB", size, a)
    draw = ImageDraw.Draw(img)
    if kind == "stripes":
        period = rng.randint(8, 40)
        vertical = rng.random() < 0.5
        for start in range(0, w if vertical else h, 2 * period):
            draw.rectangle((start, 0, start + period - 1, h) if vertical else (0, start, w, start + period - 1), fill=b)
    elif kind == "checker":
        cell = rng.randint(10, 48)
        for y in range(0, h, cell):
            for x in range(0, w, cell):
                if (x // cell + y // cell) % 2:
                    draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=b)
    elif kind == "vignette":
        rings = 24
        radius = math.hypot(w, h) / 2
        for i in range(rings):
            t = i / (rings - 1)
            colour = tuple(int(a[c] + (b[c] - a[c]) * t) for c in range(3))
            r = radius * (1 - t)
            draw.ellipse((w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r), fill=colour)
    else:  # clutter: low-saturation rectangles and ellipses behind the shapes
        for _ in range(rng.randint(6, 14)):
            x1, y1 = rng.uniform(0, w), rng.uniform(0, h)
            x2, y2 = x1 + rng.uniform(10, w / 3), y1 + rng.uniform(10, h / 3)
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x1, y1, x2, y2), fill=_muted(rng))
    return img


def _triangle(cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    return [(cx + radius * math.cos(angle + k * 2 * math.pi / 3), cy + radius * math.sin(angle + k * 2 * math.pi / 3))
            for k in range(3)]


def _apart(a, b, margin: int = 6) -> bool:
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def draw_scene(rng: random.Random) -> DrawnScene:
    """2-4 shapes with distinct "<colour> <kind>" names, boxes tight around what is drawn."""
    size = (rng.randint(200, 480), rng.randint(200, 480))
    background = rng.choice(BACKGROUNDS)
    image = _background(rng, background, size)
    draw = ImageDraw.Draw(image)
    short = min(size)
    shapes: list[DrawnShape] = []
    for colour, kind in rng.sample([(c, k) for c in COLOURS for k in KINDS], rng.randint(2, 4)):
        for _ in range(200):
            side = rng.uniform(0.18, 0.42) * short
            cx, cy = rng.uniform(side / 2, size[0] - side / 2), rng.uniform(side / 2, size[1] - side / 2)
            if kind == "triangle":
                points = _triangle(cx, cy, side / 2, rng.uniform(0, 2 * math.pi))
                xs, ys = [p[0] for p in points], [p[1] for p in points]
                box = (math.floor(min(xs)), math.floor(min(ys)), math.ceil(max(xs)), math.ceil(max(ys)))
            else:
                box = (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))
            if all(_apart(box, s.box_xyxy_abs) for s in shapes):
                break
        else:
            continue
        # yellow and orange turn olive and brown when dark
        value = rng.uniform(0.85, 1.0) if colour in ("yellow", "orange") else rng.uniform(0.65, 0.95)
        fill = _rgb(HUE_CENTRES[colour] + rng.uniform(-5, 5), rng.uniform(0.65, 0.95), value)
        outline = (25, 25, 25) if rng.random() < 0.5 else None
        width = 2 if outline else 0
        if kind == "triangle":
            draw.polygon(points, fill=fill, outline=outline, width=width)
        elif kind == "circle":
            draw.ellipse((box[0], box[1], box[2] - 1, box[3] - 1), fill=fill, outline=outline, width=width)
        else:
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=fill, outline=outline, width=width)
        shapes.append(DrawnShape(colour, kind, box))
    return DrawnScene(image, background, shapes)


def _rate(flags) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def evaluate(model, scenes: list[DrawnScene], referring_question: str) -> tuple[dict, list[dict]]:
    from chatterbox.eval.benchmarks import colour_kind_accuracy_fields, names_object, referring_name_accuracy
    from chatterbox.eval.grounding_metrics import iou_per_item

    records = []
    for index, scene in enumerate(scenes):
        answers = {}
        for shape in scene.shapes:
            reply = model.chat_session(scene.image).ask(f"Where is the {shape.name}?", ground=True)
            answers[shape.name] = reply.boxes_xyxy_abs[-1].tolist() if len(reply.boxes_xyxy_abs) else None
        for shape in scene.shapes:
            others = [s for s in scene.shapes if s is not shape]
            box = answers[shape.name]
            reply = model.chat_session(scene.image).ask(referring_question, boxes=[list(shape.box_xyxy_abs)])
            records.append({
                "scene": index, "background": scene.background, "name": shape.name, "kind": shape.kind,
                "shapes": len(scene.shapes), "box_xyxy_abs": list(shape.box_xyxy_abs), "predicted_box": box,
                "grounded": box is not None and float(iou_per_item(box, shape.box_xyxy_abs)) >= 0.5,
                # each other shape's answer box scored against this shape: the words are ignored if it hits
                "other_names_grounded": [answers[o.name] is not None
                                         and float(iou_per_item(answers[o.name], shape.box_xyxy_abs)) >= 0.5
                                         for o in others],
                "largest": max(scene.shapes, key=lambda s: s.area) is shape,
                "reply": reply.text, "reply_names_it": names_object(reply.text, shape.name),
            })
    referring = referring_name_accuracy([r["reply"] for r in records], [r["name"] for r in records])
    summary = {
        "scenes": len(scenes), "questions": len(records),
        "grounding_success_rate": _rate(r["grounded"] for r in records),
        "grounding_success_rate_other_name": _rate(g for r in records for g in r["other_names_grounded"]),
        "grounding_success_rate_largest_shape": _rate(r["largest"] for r in records),
        "grounding_chance": statistics.mean(1 / r["shapes"] for r in records),
        "grounding_success_rate_by_kind": {k: _rate(r["grounded"] for r in records if r["kind"] == k) for k in KINDS},
        "grounding_success_rate_by_background": {b: _rate(r["grounded"] for r in records if r["background"] == b)
                                                 for b in BACKGROUNDS},
        **colour_kind_accuracy_fields(referring),
    }
    return summary, records


def contact_sheet(scenes: list[DrawnScene], records: list[dict], out: Path, count: int = 9, cell: int = 256) -> Path:
    """The first ``count`` grounding questions: truth green, answer red, the name written on top."""
    sheet = Image.new("RGB", (3 * cell, math.ceil(count / 3) * cell), "white")
    for i, r in enumerate(records[:count]):
        image = scenes[r["scene"]].image.copy()
        draw = ImageDraw.Draw(image)
        draw.rectangle(r["box_xyxy_abs"], outline=(0, 200, 0), width=3)
        if r["predicted_box"] is not None:
            draw.rectangle(r["predicted_box"], outline=(230, 0, 0), width=2)
        draw.text((4, 4), r["name"], fill=(0, 0, 0))
        image.thumbnail((cell, cell))
        sheet.paste(image, ((i % 3) * cell, (i // 3) * cell))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def main(argv=None) -> int:
    from chatterbox.config import add_config_arguments, config_from_args
    from chatterbox.model.chatterbox import ChatterBox

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="an export (save_pretrained) or its Hub id")
    parser.add_argument("--num-scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--output-dir", default="outputs/independent_scenes")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    scenes = [draw_scene(rng) for _ in range(args.num_scenes)]
    model = ChatterBox.from_pretrained(args.checkpoint)
    summary, records = evaluate(model, scenes, "What is it <bbox>?" + config_from_args(args).eval.referring_suffix)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "records.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    summary["picture"] = str(contact_sheet(scenes, records, out / "grounding.png"))
    summary.update(checkpoint=args.checkpoint, seed=args.seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
