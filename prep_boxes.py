"""
Write the phrases-and-boxes file that train_gligen.py reads: from COCO annotations, or by detecting the objects
with GroundingDINO, as IGLIGEN made its SA-1B boxes.

    python prep_boxes.py --instances=coco/annotations/instances_train2017.json \
        --captions=coco/annotations/captions_train2017.json --out=data/coco/boxes.jsonl
    torchrun --nproc_per_node=8 prep_boxes.py --detector=IDEA-Research/grounding-dino-base \
        --tars="sa1b/sa_*.tar" --captions=sam_llava_captions.json --out=data/sa1b/boxes.jsonl

Output: one JSON line per image,
    {"image": "000000397133.jpg", "width": 640, "height": 427, "caption": "...",
     "phrases": ["person", "dining table"], "boxes": [[x0, y0, x1, y1], ...]}
with boxes relative to the original image (0..1), so one file serves every training resolution: the trainer maps
them through the same center crop as the latents. The category name is the phrase. The same format, written by
any tool, is what the trainer accepts; the "image" and "caption" fields also make it a captions file for
prep_latents.py.

Detection (--detector): the inputs and captions are prep_latents.py's (--images or --tars, --captions). The phrases
are the caption's tokens whose score on a box passes --text_threshold, for boxes whose best token score passes
--box_threshold (GroundingDINO's phrases from its token map, as IGLIGEN made them), or, with
--phrases=<JSONL of {"image", "phrases"}>, the given phrases, each box labelled with the phrase its score is highest
on. Overlapping
boxes of one phrase are thinned by non-maximum suppression (--nms, IoU). Each image is detected whole, at the
detector's own resolution, in batches; boxes are stored relative to the original image with its size, and with
their "scores". Under torchrun the input shards are split over the ranks; each shard's boxes go to
<out>.parts/<shard>.jsonl (atomically, skipped when the job runs again) and rank 0 joins them into --out.

From COCO's person_keypoints_*.json each record also has "keypoints": for each box (a person) 17 [x, y, v] in
COCO's order, x and y relative to the image, v COCO's (0 unlabelled, 1 labelled but hidden, 2 visible), which
train_gligen.py --keypoints=True trains on; a labelled point outside its image is made unlabelled, counted.

COCO's quirks, each counted in the summary: crowd annotations (a box around a group) are left out unless
--crowd=True; boxes reaching outside the image are clipped to it; boxes of zero area, before or after clipping,
are dropped; images with no annotations are kept with no boxes (they train with null grounding).
"""
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import prep_latents as pl
from train_gligen import check_out_dir, configure, fail, in_range, read_jsonl, KEYPOINTS

config = dict(
    instances="coco/annotations/instances_train2017.json",  # COCO-format instances JSON (without --detector)
    captions="",  # COCO captions JSON (first caption of each image); with --detector, as prep_latents.py's
    out="data/boxes.jsonl",  # output file, one JSON line per image
    crowd=False,  # keep iscrowd annotations
    detector="",  # detect instead: a GroundingDINO, Hub id or local dir (e.g. IDEA-Research/grounding-dino-base)
    images="",  # with --detector: a folder of images, as prep_latents.py
    tars="",  # with --detector: or tar files, as prep_latents.py
    phrases="",  # with --detector: JSONL of {"image", "phrases"} to detect; "" = the caption's own token spans
    box_threshold=0.2,  # boxes with a lower score are dropped (IGLIGEN: 0.2)
    text_threshold=0.2,  # caption tokens with a lower score are not part of a phrase (IGLIGEN: 0.2)
    nms=0.5,  # a box overlapping a higher-scoring box of the same phrase by more IoU than this is dropped
    batch_size=8,  # images per detector batch
    shard_size=4096,  # images per shard, for --images
    num_workers=4,  # image decoding and preprocessing processes
)


def load_json(path):
    if not Path(path).is_file():
        fail(f"file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        fail(f"{path}: not valid JSON ({e})")


def keypoints_of(ann, W, H, where, counts):
    """An annotation's 17 keypoints as [x, y, v] relative to the image; a labelled point outside it is unlabelled."""
    kp = ann.get("keypoints", [0] * 3 * len(KEYPOINTS))
    if not isinstance(kp, list) or len(kp) != 3 * len(KEYPOINTS) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in kp):
        fail(f"{where}: annotation id {ann['id']} has no 51 numbers of keypoints (x, y, v for each of 17): {kp!r}")
    out = []
    for x, y, v in zip(kp[0::3], kp[1::3], kp[2::3]):
        if v not in (0, 1, 2):
            fail(f"{where}: annotation id {ann['id']} has a keypoint visibility {v!r}, not 0, 1 or 2")
        if v and not (0 <= x <= W and 0 <= y <= H):
            counts["keypoints outside their image unlabelled"] += 1
            x, y, v = 0, 0, 0
        out.append([round(x / W, 6), round(y / H, 6), int(v)])
    counts["persons without visible keypoints"] += not any(v == 2 for _, _, v in out)
    return out


def check_settings(cfg):
    """Stop on a setting that cannot work, before anything is read."""
    in_range(cfg, "batch_size shard_size", 1)
    in_range(cfg, "num_workers", 0)
    in_range(cfg, "box_threshold text_threshold nms", 0, 1)
    out = Path(cfg["out"])
    if out.is_dir():
        fail(f"--out={out} is a directory: give the path of the .jsonl file to write")
    check_out_dir(out.parent, "out")
    if not cfg["detector"] and (cfg["images"] or cfg["tars"] or cfg["phrases"]):
        fail("--images, --tars and --phrases are for detection: add --detector=<a GroundingDINO> (or, for COCO "
             "annotations, give --instances alone)")


def main(cfg):
    check_settings(cfg)
    if cfg["detector"]:
        return detect_main(cfg)
    coco = load_json(cfg["instances"])
    where = cfg["instances"]
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco, dict) or not isinstance(coco.get(key), list):
            fail(f"{where}: no {key!r} list: not a COCO instances file")
    images = {}
    for im in coco["images"]:
        if not (isinstance(im, dict) and isinstance(im.get("id"), (int, str)) and isinstance(im.get("file_name"), str)):
            fail(f"{where}: image {str(im)[:200]} has no id and file_name")
        if not all(isinstance(im.get(k), int) and im[k] > 0 for k in ("width", "height")):
            fail(f"{where}: image id {im.get('id')} ({im.get('file_name')}) has no positive integer width and height")
        images[im["id"]] = im
    for c in coco["categories"]:
        if not isinstance(c, dict) or "id" not in c or not isinstance(c.get("name"), str):
            fail(f"{where}: category {c!r} has no id and name")
    names = {c["id"]: c["name"] for c in coco["categories"]}
    posed = [c for c in coco["categories"] if "keypoints" in c]  # a person_keypoints file: keypoints are written
    for c in posed:
        if c["keypoints"] != list(KEYPOINTS):
            fail(f"{where}: category {c['name']!r} has keypoints {str(c['keypoints'])[:60]}: the keypoint mode takes "
                 f"COCO's 17 ({', '.join(KEYPOINTS)})")
    for ann in coco["annotations"]:
        if not isinstance(ann, dict) or not isinstance(ann.get("id"), (int, str)):
            fail(f"{where}: annotation {str(ann)[:200]} has no id")
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
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            fail(f"{where}: annotation id {ann['id']} has no bbox of four numbers [x, y, width, height]: {bbox!r}")
        x, y, w, h = bbox
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            counts["boxes clipped to the image"] += 1
        if x1 <= x0 or y1 <= y0:
            counts["boxes of zero area dropped"] += 1
            continue
        box = [round(x0 / W, 6), round(y0 / H, 6), round(x1 / W, 6), round(y1 / H, 6)]
        objects[im["id"]].append((names[ann["category_id"]], box, posed and keypoints_of(ann, W, H, where, counts)))
    captions = {}
    if cfg["captions"]:
        anns = load_json(cfg["captions"])
        anns = anns.get("annotations") if isinstance(anns, dict) else None
        if not isinstance(anns, list):
            fail(f"{cfg['captions']}: no 'annotations' list: not a COCO captions file")
        for ann in anns:
            ok = isinstance(ann, dict) and isinstance(ann.get("id"), (int, str)) and isinstance(ann.get("caption"), str)
            if not ok:
                instances = isinstance(ann, dict) and "bbox" in ann
                fail(f"{cfg['captions']}: annotation {str(ann)[:200]} has no id and caption string"
                     + (" (this is an instances file: give --captions a COCO captions file)" if instances else ""))
        for ann in sorted(anns, key=lambda a: a["id"]):
            captions.setdefault(ann.get("image_id"), ann["caption"].strip())

    out = Path(cfg["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".tmp"), "w") as f:
        for im in sorted(images.values(), key=lambda im: im["id"]):
            rec = dict(image=im["file_name"], width=im["width"], height=im["height"])
            if im["id"] in captions:
                rec["caption"] = captions[im["id"]]
            elif cfg["captions"]:
                counts["images without a caption"] += 1
            rec["phrases"] = [p for p, _, _ in objects[im["id"]]]
            rec["boxes"] = [b for _, b, _ in objects[im["id"]]]
            if posed:
                rec["keypoints"] = [k for _, _, k in objects[im["id"]]]
            counts["images without boxes"] += not rec["boxes"]
            counts["boxes"] += len(rec["boxes"])
            f.write(json.dumps(rec) + "\n")
    os.replace(out.with_name(out.name + ".tmp"), out)
    print(f"wrote {len(images)} images to {out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return counts


# -----------------------------------------------------------------------------------------------------------------
# Detection
def iou(a, b):
    """Intersection over union of two boxes x0, y0, x1, y1."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms(found, threshold):
    """Greedy non-maximum suppression within each phrase: found [(phrase, score, box)], best first."""
    kept = []
    for p, s, b in sorted(found, key=lambda d: -d[1]):
        if all(q != p or iou(b, c) <= threshold for q, _, c in kept):
            kept.append((p, s, b))
    return kept


class Detect(pl.Images):
    """Decodes an image and runs the detector's own preprocessing, in the loader workers."""

    def __init__(self, items, processor):
        super().__init__(items, 0, False)
        self.processor = processor

    def __getitem__(self, i):
        key, file, offset, size, _ = self.items[i]
        try:
            with pl.read_image(file, offset, size, self.handles) as im:
                im = pl.to_rgb(im)
        except Exception as e:  # a corrupt or truncated image; an error of the detector's own code is not caught
            return key, None, None, f"{type(e).__name__}: {e}"
        return key, self.processor.image_processor(im, return_tensors="pt"), im.size, None


def phrase_spans(tokenizer, phrases):
    """GroundingDINO's text for a phrase list, "p1 . p2 . ", and each phrase's token positions in it."""
    spans, pos = [], 1  # after [CLS]
    for p in phrases:
        n = len(tokenizer(p, add_special_tokens=False).input_ids)
        spans.append(range(pos, pos + n))
        pos += n + 1  # the "."
    return " . ".join(phrases) + " .", spans


def pad(pixels):
    """Zero-pad a batch of (3, h, w) images to the largest, bottom and right, with the mask of the real pixels."""
    H, W = max(p.shape[-2] for p in pixels), max(p.shape[-1] for p in pixels)
    x, mask = torch.zeros(len(pixels), 3, H, W), torch.zeros(len(pixels), H, W, dtype=torch.long)
    for i, p in enumerate(pixels):
        x[i, :, :p.shape[-2], :p.shape[-1]], mask[i, :p.shape[-2], :p.shape[-1]] = p, 1
    return x, mask


@torch.no_grad()
def detect_batch(model, processor, batch, captions, phrase_lists, cfg, device):
    """[(phrase, score, box relative to the image)] for each image of a batch. With phrase_lists, each box takes
    the given phrase it scores highest on; else the phrase is made of the caption's tokens that score on the box."""
    pixels, mask = pad([b[1]["pixel_values"][0] for b in batch])
    texts = [phrase_spans(processor.tokenizer, p)[0] if p else c.lower().strip() + "."
             for c, p in zip(captions, phrase_lists)]
    text = processor.tokenizer(texts, padding="longest", return_tensors="pt")
    inputs = dict(pixel_values=pixels, pixel_mask=mask, input_ids=text.input_ids, attention_mask=text.attention_mask,
                  **({"token_type_ids": text.token_type_ids} if "token_type_ids" in text else {}))
    out = model(**{k: v.to(device) for k, v in inputs.items()})
    not_words = set(processor.tokenizer.all_special_ids) | set(processor.tokenizer.convert_tokens_to_ids([".", "?"]))
    found = []
    for b, (_, _, (W, H), _) in enumerate(batch):
        probs, boxes = out.logits[b].sigmoid().float().cpu(), out.pred_boxes[b].float().cpu()  # (Q, T), (Q, 4) cxcywh
        xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1).clamp(0, 1)
        if phrase_lists[b] is None:  # a box's phrase: the caption's tokens scoring over text_threshold on it
            ids = text.input_ids[b].tolist()
            words = [i for i, t in enumerate(ids) if text.attention_mask[b, i] and t not in not_words]
            score = probs[:, words].max(1).values if words else torch.zeros(len(probs))
            dets = []
            for q in torch.nonzero(score > cfg["box_threshold"]).flatten().tolist():
                phrase = processor.tokenizer.decode([ids[i] for i in words if probs[q, i] > cfg["text_threshold"]])
                if phrase.strip():
                    dets.append((phrase.strip(), float(score[q]), xyxy[q].tolist()))
        else:
            phrases = phrase_lists[b]
            per_phrase = torch.stack([probs[:, list(sp)].max(1).values  # (Q, phrases)
                                      for sp in phrase_spans(processor.tokenizer, phrases)[1]], 1)
            score, which = per_phrase.max(1)
            dets = [(phrases[int(which[q])], float(score[q]), xyxy[q].tolist())
                    for q in range(len(score)) if score[q] > cfg["box_threshold"]]
        found.append([(p, s, [round(v, 6) for v in bx]) for p, s, bx in nms(dets, cfg["nms"])
                      if bx[2] > bx[0] and bx[3] > bx[1]])
    return found


def detect_main(cfg):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    out = Path(cfg["out"])
    parts = out.with_name(out.name + ".parts")
    shards = pl.input_shards(cfg)
    settings = {k: cfg[k] for k in ("detector", "images", "tars", "captions", "phrases", "box_threshold",
                                    "text_threshold", "nms", "shard_size")}
    settings["input_files"] = sum(1 if isinstance(s, Path) else len(s) for _, s in shards)
    rank, world, device = pl.start(parts, settings)
    captions = pl.load_captions(cfg["captions"]) if cfg["captions"] else None
    given = None
    if cfg["phrases"]:
        given = {}
        for line, rec in read_jsonl(cfg["phrases"]):
            if not isinstance(rec.get("image"), str) or not isinstance(rec.get("phrases"), list) or not all(
                    isinstance(p, str) and p.strip() for p in rec["phrases"]):
                fail(f"{cfg['phrases']}:{line}: a record needs an image path and a list of non-empty phrases")
            given[rec["image"]] = rec["phrases"]
    todo = pl.pending(shards, rank, world, lambda n: parts / f"{n}.jsonl", "detect")
    if todo:
        try:
            processor = AutoProcessor.from_pretrained(cfg["detector"])
            model = AutoModelForZeroShotObjectDetection.from_pretrained(cfg["detector"]).to(device).eval()
        except (OSError, ValueError) as e:
            fail(f"cannot load the detector {cfg['detector']!r} (a Hub id or a local directory): {e}")
        if model.config.model_type != "grounding-dino":
            fail(f"{cfg['detector']} is a {model.config.model_type!r} model; this script reads GroundingDINO's outputs")
        t0, n_images = time.perf_counter(), 0
        for name, source in tqdm(todo, desc=f"rank {rank} shards", unit="shard", position=rank):
            n_images += detect_shard(model, processor, cfg, parts, name, source, captions, given, device)
        print(f"rank {rank}: {n_images} images in {time.perf_counter() - t0:.0f} s "
              f"({n_images / (time.perf_counter() - t0):.1f} img/s)")
    if world > 1:
        dist.barrier()
    if rank == 0:
        join_parts(parts, shards, out)
    if world > 1:
        dist.destroy_process_group()


def detect_shard(model, processor, cfg, parts, name, source, captions, given, device):
    # with given phrases a caption is optional (kept when there is one); else the caption is what is detected
    items, skipped, temp = pl.shard_items(source, captions, Path(cfg["images"]), parts, need_caption=given is None)
    caption_of = {it[0]: it[4] for it in items}
    records = [dict(image=k, skipped=r) for k, r in skipped]
    loader = torch.utils.data.DataLoader(Detect(items, processor), batch_size=cfg["batch_size"],
                                         num_workers=cfg["num_workers"], collate_fn=list)
    for batch in loader:
        records += [dict(image=key, skipped="unreadable", error=err) for key, *_, err in batch if err]
        batch = [b for b in batch if b[3] is None]
        if given is not None:
            records += [dict(image=b[0], skipped="no phrases") for b in batch if pl.find_caption(given, b[0]) is None]
            batch = [b for b in batch if pl.find_caption(given, b[0]) is not None]
        if not batch:
            continue
        phrase_lists = [pl.find_caption(given, b[0]) if given is not None else None for b in batch]
        found = detect_batch(model, processor, batch, [caption_of[b[0]] for b in batch], phrase_lists, cfg, device)
        for (key, _, (w, h), _), dets in zip(batch, found):
            rec = dict(image=key, width=w, height=h, **({"caption": caption_of[key]} if caption_of[key] else {}))
            records.append(dict(rec, phrases=[p for p, _, _ in dets], boxes=[b for _, _, b in dets],
                                scores=[round(s, 4) for _, s, _ in dets]))
    pl.write_jsonl(parts / f"{name}.jsonl", records)
    if temp:
        temp.unlink()
    return sum("skipped" not in r for r in records)


def join_parts(parts, shards, out):
    pl.all_done(shards, lambda n: parts / f"{n}.jsonl", "detected")
    records = [r for n, _ in shards for _, r in read_jsonl(parts / f"{n}.jsonl")]
    done, skipped = [r for r in records if "skipped" not in r], [r for r in records if "skipped" in r]
    pl.write_jsonl(out, done)
    pl.write_jsonl(out.with_name(out.stem + ".skipped.jsonl"), skipped)
    n_boxes = sum(len(r["boxes"]) for r in done)
    print(f"wrote {len(done)} images with {n_boxes} boxes to {out}; skipped {len(skipped)}")
    pl.print_skipped([(r["image"], r["skipped"]) for r in skipped])
    return done, skipped


if __name__ == "__main__":
    main(configure(config, sys.argv[1:], __doc__))
