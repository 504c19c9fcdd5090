"""
Turn COCO-format instance annotations into the phrases-and-boxes file that train_gligen.py reads.

    python prep_boxes.py --instances=coco/annotations/instances_train2017.json \
        --captions=coco/annotations/captions_train2017.json --out=data/coco/boxes.jsonl

Output: one JSON line per image,
    {"image": "000000397133.jpg", "width": 640, "height": 427, "caption": "...",
     "phrases": ["person", "dining table"], "boxes": [[x0, y0, x1, y1], ...]}
with boxes relative to the original image (0..1), so one file serves every training resolution: the trainer maps
them through the same center crop as the latents. The category name is the phrase. The same format, written by
any tool, is what the trainer accepts; the "image" and "caption" fields also make it a captions file for
prep_latents.py.

COCO's quirks, each counted in the summary: crowd annotations (a box around a group) are left out unless
--crowd=True; boxes reaching outside the image are clipped to it; boxes of zero area, before or after clipping,
are dropped; images with no annotations are kept with no boxes (they train with null grounding).
"""
import json
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path

from train_gligen import configure, fail

config = dict(
    instances="coco/annotations/instances_train2017.json",  # COCO-format instances JSON
    captions="",  # COCO captions JSON; each image gets its first caption (lowest annotation id)
    out="data/boxes.jsonl",  # output file, one JSON line per image
    crowd=False,  # keep iscrowd annotations
)


def load_json(path):
    if not Path(path).is_file():
        fail(f"file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        fail(f"{path}: not valid JSON ({e})")


def main(cfg):
    coco = load_json(cfg["instances"])
    where = cfg["instances"]
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            fail(f"{where}: no {key!r} list: not a COCO instances file")
    images = {}
    for im in coco["images"]:
        if not all(isinstance(im.get(k), int) and im[k] > 0 for k in ("width", "height")):
            fail(f"{where}: image id {im.get('id')} ({im.get('file_name')}) has no positive integer width and height")
        images[im["id"]] = im
    names = {c["id"]: c["name"] for c in coco["categories"]}
    counts, objects = Counter(), defaultdict(list)
    for ann in sorted(coco["annotations"], key=lambda a: a["id"]):
        if ann.get("image_id") not in images:
            fail(f"{where}: annotation id {ann.get('id')} refers to image id {ann.get('image_id')}, not listed")
        if ann.get("category_id") not in names:
            fail(f"{where}: annotation id {ann['id']} has category id {ann.get('category_id')}, which is not listed")
        im = images[ann["image_id"]]
        W, H = im["width"], im["height"]
        counts["annotations"] += 1
        if ann.get("iscrowd", 0) and not cfg["crowd"]:
            counts["crowd annotations left out"] += 1
            continue
        x, y, w, h = ann["bbox"]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            counts["boxes clipped to the image"] += 1
        if x1 <= x0 or y1 <= y0:
            counts["boxes of zero area dropped"] += 1
            continue
        box = [round(x0 / W, 6), round(y0 / H, 6), round(x1 / W, 6), round(y1 / H, 6)]
        objects[im["id"]].append((names[ann["category_id"]], box))
    captions = {}
    if cfg["captions"]:
        for ann in sorted(load_json(cfg["captions"]).get("annotations", []), key=lambda a: a["id"]):
            captions.setdefault(ann["image_id"], ann["caption"].strip())

    out = Path(cfg["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".tmp"), "w") as f:
        for im in sorted(images.values(), key=lambda im: im["id"]):
            rec = dict(image=im["file_name"], width=im["width"], height=im["height"])
            if im["id"] in captions:
                rec["caption"] = captions[im["id"]]
            elif cfg["captions"]:
                counts["images without a caption"] += 1
            rec["phrases"] = [p for p, _ in objects[im["id"]]]
            rec["boxes"] = [b for _, b in objects[im["id"]]]
            counts["images without boxes"] += not rec["boxes"]
            counts["boxes"] += len(rec["boxes"])
            f.write(json.dumps(rec) + "\n")
    os.replace(out.with_name(out.name + ".tmp"), out)
    print(f"wrote {len(images)} images to {out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return counts


if __name__ == "__main__":
    main(configure(config, sys.argv[1:], __doc__))
