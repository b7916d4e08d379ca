"""Which shape a stage-1 export's grounding answer lands on: any shape of the image, and the largest one.

    python which_box.py INSTANCES_JSON PREDICTION_JSON...

INSTANCES_JSON: the corpus's MSCOCO2017/annotations/instances_val2017.json; each PREDICTION_JSON: the
prediction.json a grounding run wrote (evaluation/coco_grounding.py). IoU >= 0.5 counts as landing on a shape.
"""
import collections
import json
import sys

from chatterbox.eval.grounding_metrics import iou_per_item


def main(instances_path: str, *prediction_paths: str) -> None:
    instances = json.load(open(instances_path))
    image_ids = {im["file_name"]: im["id"] for im in instances["images"]}
    boxes = collections.defaultdict(list)
    for a in instances["annotations"]:
        x, y, w, h = a["bbox"]
        boxes[a["image_id"]].append((x, y, x + w, y + h))
    for path in prediction_paths:
        predictions = json.load(open(path))
        on_largest = on_any = 0
        for p in predictions:
            shapes = boxes[image_ids[p["image_abs_path"].split("/")[-1]]]
            largest = max(shapes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
            on_largest += float(iou_per_item(p["out_boxes"], largest)) >= 0.5
            on_any += max(float(iou_per_item(p["out_boxes"], b)) for b in shapes) >= 0.5
        n = len(predictions)
        print(json.dumps({"predictions": path, "questions": n, "on_some_shape": on_any / n,
                          "on_the_largest_shape": on_largest / n}))


if __name__ == "__main__":
    main(*sys.argv[1:])
