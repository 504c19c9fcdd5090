"""
Score generated images against their layouts with an open-vocabulary detector: the GLIGEN paper's "YOLO score"
(detect objects in the generated images, then compute AP against the requested boxes), with a detector that reads
the phrases themselves, so any phrase can be scored, not only COCO's 80 classes.

    python sample.py --model=... --adapters=out/run --layouts=layouts/val.jsonl --n=4 --out_dir=samples
    python extras/score_grounding.py --layouts=layouts/val.jsonl --images=samples --n=4
    python extras/score_grounding.py ... --detector=IDEA-Research/grounding-dino-tiny

The detector is GroundingDINO from transformers (AutoModelForZeroShotObjectDetection), a Hub id or a local
directory. Each distinct phrase of an image is detected on its own, so every box found belongs to that phrase.
Image <k>_<i>.png of --images belongs to line k of --layouts (sample.py's names). Over all requested boxes:
    AP        COCO-style: IoU thresholds 0.50, 0.55, ..., 0.95, 101-point interpolated precision, averaged over the
              phrases (each distinct phrase is a class) and the thresholds
    AP50      the same at IoU 0.5
    mean IoU  for each requested box, the best IoU among the detector's boxes for its phrase (0 if none)
and writes them, with every detection, to <images>/scores.json.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]  # train_gligen.py and the scripts this one builds on
sys.path.insert(0, str(ROOT))
from prep_boxes import iou
from train_gligen import check_layout, configure, fail, in_range, read_jsonl

config = dict(
    layouts="layouts/val.jsonl",  # JSONL of {prompt, phrases, boxes}, boxes x0, y0, x1, y1 relative
    images="samples",  # the generated images, named <layout>_<i>.png as sample.py names them
    n=1,  # images per layout
    detector="IDEA-Research/grounding-dino-base",  # a GroundingDINO: Hub id or local directory
    threshold=0.1,  # detections with a lower score are dropped (AP wants the low-scoring ones too)
)


def average_precision(detections, truth, threshold):
    """COCO's AP for one class: detections [(image, score, box)], truth {image: [boxes]}; 101-point interpolation."""
    n_true = sum(len(b) for b in truth.values())
    taken = {img: [False] * len(b) for img, b in truth.items()}
    hits = []
    for img, _, box in sorted(detections, key=lambda d: -d[1]):  # each detection takes the best free true box
        ious = [iou(box, t) if not taken[img][j] else -1 for j, t in enumerate(truth.get(img, []))]
        j = int(np.argmax(ious)) if ious else -1
        hit = j >= 0 and ious[j] >= threshold
        if hit:
            taken[img][j] = True
        hits.append(hit)
    tp = np.cumsum(hits)
    recall, precision = tp / n_true, tp / np.arange(1, len(hits) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the best precision at this recall or beyond
    at = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in at]))


def scores(layouts, detections):
    """AP, AP50 and mean IoU. layouts: [(phrases, boxes)] per image; detections: [(phrase, score, box)] per image."""
    classes = sorted({p for phrases, _ in layouts for p in phrases})
    aps = {t: [] for t in np.linspace(0.5, 0.95, 10).round(2)}
    for c in classes:
        truth = {i: [b for p, b in zip(*lay) if p == c] for i, lay in enumerate(layouts)}
        found = [(i, s, b) for i, dets in enumerate(detections) for p, s, b in dets if p == c]
        for t in aps:
            aps[t].append(average_precision(found, truth, t))
    best = [max([iou(b, d) for q, _, d in dets if q == p], default=0.0)
            for (phrases, boxes), dets in zip(layouts, detections) for p, b in zip(phrases, boxes)]
    return dict(AP=float(np.mean([np.mean(v) for v in aps.values()])), AP50=float(np.mean(aps[0.5])),
                mean_iou=float(np.mean(best)), boxes=len(best), images=len(layouts), classes=len(classes))


def detector(name, device):
    """A function (image, phrases, threshold) -> [(phrase, score, box: relative x0, y0, x1, y1)]."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(name).to(device).eval()
    except (OSError, ValueError) as e:
        fail(f"cannot load the detector {name!r} (a Hub id or a local directory): {e}")
    if model.config.model_type != "grounding-dino":
        fail(f"{name} is a {model.config.model_type!r} model; this script reads GroundingDINO's outputs")

    @torch.no_grad()
    def detect(image, phrases, threshold):
        W, H = image.size
        found = []
        for p in dict.fromkeys(phrases):  # one phrase at a time: every box returned is that phrase's
            inputs = processor(images=image, text=p.lower().rstrip(".") + ".", return_tensors="pt").to(device)
            # positional: the box threshold is box_threshold in transformers 4.46 and threshold in 5.x
            out = processor.post_process_grounded_object_detection(model(**inputs), inputs.input_ids, threshold, 0.0,
                                                                   [(H, W)])[0]
            found += [(p, float(s), [float(b[0]) / W, float(b[1]) / H, float(b[2]) / W, float(b[3]) / H])
                      for s, b in zip(out["scores"], out["boxes"])]
        return found

    return detect


def check_settings(cfg):
    """Stop on a setting that cannot work, before anything is read."""
    in_range(cfg, "n", 1)
    in_range(cfg, "threshold", 0, 1)


def main(cfg):
    check_settings(cfg)
    layouts = [r for _, r in read_jsonl(cfg["layouts"])]
    for k, lay in enumerate(layouts):
        check_layout(lay.get("phrases"), lay.get("boxes"), f"{cfg['layouts']}:{k + 1}")
    files = [(k, Path(cfg["images"]) / f"{k:03d}_{i:02d}.png") for k in range(len(layouts)) for i in range(cfg["n"])]
    missing = [str(f) for _, f in files if not f.is_file()]
    if missing:
        fail(f"{len(missing)} images missing, e.g. {missing[0]} (layout k's images are <k>_<i>.png, as sample.py "
             f"names them)")
    detect = detector(cfg["detector"], "cuda" if torch.cuda.is_available() else "cpu")
    truth, found = [], []
    for k, f in tqdm(files, desc="detecting"):
        lay = layouts[k]
        truth.append((lay["phrases"], lay["boxes"]))
        found.append(detect(Image.open(f).convert("RGB"), lay["phrases"], cfg["threshold"]))
    result = scores(truth, found)
    report = dict(config=cfg, **result, detections=[dict(image=str(f), found=d) for (_, f), d in zip(files, found)])
    (Path(cfg["images"]) / "scores.json").write_text(json.dumps(report, indent=1))
    print(f"{result['images']} images, {result['boxes']} requested boxes, {result['classes']} phrases, "
          f"detector {cfg['detector']}")
    print(f"AP {100 * result['AP']:.1f} | AP50 {100 * result['AP50']:.1f} | mean IoU {result['mean_iou']:.3f}")
    return result


if __name__ == "__main__":
    main(configure(config, sys.argv[1:], __doc__))
