"""
Encode captioned images into VAE latents for train_gligen.py: an image folder, COCO, SA-1B or webdataset tars.

    python prep_latents.py --model=stable-diffusion-v1-5/stable-diffusion-v1-5 --images=coco/train2017 \
        --captions=coco/annotations/captions_train2017.json --out=data/coco/latents --resolution=512
    torchrun --nproc_per_node=8 prep_latents.py --tars="sa1b/sa_*.tar" --captions=sam_llava_captions.json \
        --out=data/sa1b/latents --std=True --flip=True

Inputs (one of):
    --images   a folder of images, searched recursively; cut into output shards of --shard_size images
    --tars     tar files (a glob, or several separated by commas); each tar is one output shard. A tar holds one
               image per key (key.jpg/.png/.webp) and may hold key.txt or key.json with a "caption" (webdataset);
               SA-1B's key.json (masks) is ignored
Captions (--captions): a JSONL of {"image", "caption"} (prep_boxes.py writes one), a JSON map {image name:
caption} (the SAM-LLaVA captions of SA-1B), or a COCO captions JSON (the first caption of each image); an image is
looked up by its path, its file name, then its file name without extension. With --captions="" each image's caption
is key.txt beside it (folder) or inside the tar (key.txt, or "caption" in key.json).

Each image's short side is center-cropped to a square, resized to --resolution and encoded by the model's VAE:
the mean of its latent distribution, less the VAE's shift factor (SD3's and Flux's VAEs have one), times its scaling
factor, as the pipelines take latents (--std=True stores the std, times the scaling factor, too, so training
can draw a fresh sample each time; --flip=True also encodes the mirrored image, so training can flip).
Output in --out:
    <shard>.npy     float16 (N, views, stats, 4, resolution/8, resolution/8): views = original[, flipped],
                    stats = mean[, std]; plain .npy (never pickled), memmappable
    <shard>.json    that shard's index and skipped images; written after the .npy, so its presence marks the shard
                    done. A job run again skips done shards: a killed job loses only the shard in flight.
    index.jsonl     one line per image: key, caption, shard, row, original width/height, crop (pixels)
    meta.json       model, resolution, scaling and shift factors, latent shape, views, stats, counts
    skipped.jsonl   every image not encoded (corrupt, truncated tar, no caption, too small), and why
Under torchrun, rank r encodes input shards r, r + world, ...; output names come from the input shards, so ranks
never write the same file; rank 0 writes index.jsonl, meta.json and skipped.jsonl when all are done.

IGLIGEN's published SA-1B latents and boxes convert to this format (plus <out>/boxes.jsonl) with
    python prep_latents.py --igligen=sa-1b_data --out=data/sa1b/latents --allow_pickle=True

Box image features for GLIGEN's text-image mode (train_gligen.py --image_features), from the same images and boxes:
    python prep_latents.py --image_encoder=openai/clip-vit-large-patch14 --images=coco/train2017 \
        --boxes=data/coco/boxes.jsonl --out=data/coco/image-features
Each box is cropped from the original image and goes through the CLIP image processor (resized, center-cropped to
the encoder's size) and CLIPVisionModelWithProjection; its image_embeds are mapped into the phrase space by
image_project and scaled to norm 28.7, as GLIGEN does. image_project is derived from the same CLIP model: the
transpose of its text projection (GLIGEN's fixed matrix), or with --image_project=<diffusers text-image model> that
model's own. Output in --out: <shard>.npy float16 (boxes, D), <shard>.json, index.jsonl (key, shard, row, boxes),
meta.json, image_project.safetensors; resumable and under torchrun like the latents.

Spatial maps for GLIGEN's spatial-map mode (train_gligen.py --maps), one per image, through the latents' crop:
    python prep_latents.py --map=depth --depth_model=depth-anything/Depth-Anything-V2-Small-hf \
        --images=coco/train2017 --out=data/coco/depth --resolution=512
--map=depth: a transformers depth-estimation model's prediction on each crop, min-max per image; --map=edges: where
the grey image's Sobel gradient passes a quarter of its largest; --map=<folder>: your maps, <image key, or its file
name, without its extension>.png/.npy/.tif/.tiff (8- or 16-bit, any channels; NPY uint8, uint16 or floats in [0, 1]),
each the size of its image. Output in --out: <shard>.npy uint16 (N, C, resolution/2, resolution/2), <shard>.json,
index.jsonl (key, shard, row, width, height, crop, channels), meta.json, skipped.jsonl; resumable and under torchrun
like the latents.
"""
import gzip
import io
import json
import math
import os
import shutil
import sys
import tarfile
import time
from collections import defaultdict
from datetime import timedelta
from glob import glob
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from train_gligen import (check_layout, check_out_dir, configure, fail, fit_map, in_range, load_clip_tower,
                          project_image_embeds, read_jsonl, read_map, sha256, upright)

config = dict(
    model="stable-diffusion-v1-5/stable-diffusion-v1-5",  # whose VAE encodes the images
    images="",  # a folder of images, searched recursively
    tars="",  # or tar files: a glob, or several separated by commas (SA-1B, webdataset)
    captions="",  # JSONL {"image", "caption"}, JSON map {name: caption} or COCO captions JSON; "" = beside each image
    out="data/latents",  # output directory; a job run again with the same settings resumes here
    resolution=512,  # training resolution in pixels; the latents are resolution/8 on a side
    std=False,  # also store the VAE's std, so training draws a new latent sample each time
    flip=False,  # also encode the horizontally flipped image, so training can flip (boxes flip with it)
    max_upscale=4.0,  # images that must be enlarged more than this to reach --resolution are skipped: too small
    batch_size=16,  # images per VAE batch
    shard_size=4096,  # images per output shard, for --images (a tar is one shard)
    num_workers=4,  # image decoding processes
    dtype="auto",  # VAE precision: auto = bf16 on CUDA, fp32 on CPU; or fp32
    igligen="",  # instead: convert IGLIGEN's shards (<dir>/latents/*.npy, <dir>/boxes/*.npy)
    allow_pickle=False,  # needed for --igligen: its files are pickles, and loading a pickle runs code from it
    igligen_threshold=0.25,  # IGLIGEN boxes with a lower GroundingDINO confidence are left out (IGLIGEN's value)
    image_encoder="",  # instead: each box crop's CLIP image feature, for text-image training (a CLIP, Hub id or dir)
    boxes="",  # with --image_encoder: prep_boxes.py's file, whose boxes are cropped from the same images
    image_project="",  # with --image_encoder: a diffusers text-image GLIGEN model whose image_project to use
    map="",  # instead: a spatial map per image (train_gligen.py --maps): edges, depth, or a folder of your maps
    depth_model="depth-anything/Depth-Anything-V2-Small-hf",  # with --map=depth: a transformers depth-estimation model
)
Image.init()
IMAGE_SUFFIXES = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN}  # all PIL opens
SIDECARS = {".txt", ".json", ".caption"}  # a folder's or tar's captions and metadata, not images
DEEP_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1}  # grey: full scale


# -----------------------------------------------------------------------------------------------------------------
# Inputs, shared with prep_boxes.py: input shards, their images, and captions.
def load_captions(path):
    """{image name: caption} from a JSONL of {"image", "caption"}, a JSON map {name: caption}, or COCO captions."""
    if not Path(path).is_file():
        fail(f"captions file not found: {path}")
    if str(path).endswith(".jsonl"):
        captions = {}
        for line, rec in read_jsonl(path):
            if isinstance(rec.get("image"), str) and isinstance(rec.get("caption"), str):
                captions[rec["image"]] = rec["caption"]
            elif "caption" in rec or "image" not in rec:
                fail(f"{path}:{line}: a record needs an image path and a caption string")
        return captions
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        fail(f"{path}: not valid JSON ({e})")
    if isinstance(data, dict) and "annotations" in data and "images" in data:  # COCO: the first caption by id
        names, captions = {im["id"]: im["file_name"] for im in data["images"]}, {}
        for ann in sorted(data["annotations"], key=lambda a: a["id"]):
            if ann.get("image_id") not in names:
                fail(f"{path}: caption id {ann.get('id')} refers to image id {ann.get('image_id')}, not listed")
            captions.setdefault(names[ann["image_id"]], ann["caption"].strip())
        return captions
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        return data
    fail(f"{path}: neither a JSONL of {{image, caption}}, a JSON map of image name to caption, nor COCO captions")


def find_caption(captions, key):
    """A dict look-up, by path, then file name, then file name without extension: O(1) per image."""
    name = key.rsplit("/", 1)[-1]
    for k in (key, name, name.split(".", 1)[0]):
        if k in captions:
            return captions[k]
    return None


def input_shards(cfg):
    """[(shard name, source)]: a tar path, or a list of image paths of the folder (shard_size each)."""
    if bool(cfg["images"]) == bool(cfg["tars"]):
        fail("give one input: --images=<folder> or --tars=<glob>")
    if cfg["tars"]:
        tars = sorted({p for pattern in cfg["tars"].split(",") for p in glob(pattern.strip())})
        if not tars:
            fail(f"no tar files match {cfg['tars']!r}")
        names = [Path(t).name.split(".")[0] for t in tars]
        if len(set(names)) < len(names):
            fail("two tar files have the same name; output shards are named after them")
        return list(zip(names, [Path(t) for t in tars]))
    root = Path(cfg["images"])
    if not root.is_dir():
        fail(f"--images={root}: " + ("a file, not a folder of images" if root.is_file() else "folder not found"))
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() not in SIDECARS)
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
        others = f" ({len(files)} other files, e.g. {', '.join(p.name for p in files[:3])}: no type PIL opens)"
        fail(f"no images in {root}" + (others if files else ""))
    n = cfg["shard_size"]
    return [(f"images_{i // n:05d}", files[i:i + n]) for i in range(0, len(files), n)]


def open_tar(path, out):
    """A tar to read members from by offset. A compressed one is first decompressed into out (deleted after)."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return path
    plain = out / f".{path.name}.plain"
    with gzip.open(path) as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
    return plain


def shard_items(source, captions, root, out, need_caption=True):
    """The images of one input shard: [(key, file, offset, size, caption)] (size -1: a whole file), the images
    skipped before decoding [(key, reason)], and the file to delete afterwards (a decompressed tar) or None."""
    items, skipped = [], []
    if isinstance(source, list):  # a folder
        for p in source:
            key = p.relative_to(root).as_posix()
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((key, "not an image (no type PIL opens)"))
                continue
            cap = find_caption(captions, key) if captions is not None else (
                p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file() else None)
            items.append((key, str(p), 0, -1, cap))
        if not need_caption:
            return items, skipped, None
        return [i for i in items if i[4] is not None], skipped + [(i[0], "no caption") for i in items
                                                                  if i[4] is None], None
    path = open_tar(source, out)
    size, groups, truncated = path.stat().st_size, defaultdict(dict), None
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = m.name.removeprefix("./")
                folder, _, base = name.rpartition("/")
                stem, _, ext = base.partition(".")  # webdataset: the key ends at the file name's first dot
                key = f"{folder}/{stem}" if folder else stem
                if ext.lower() in ("txt", "json", "caption") and captions is None and m.size < 1 << 20:
                    groups[key][ext.lower()] = tar.extractfile(m).read()
                elif "." + ext.lower() in IMAGE_SUFFIXES:
                    groups[key]["image"] = (name, m.offset_data, m.size)
                elif "." + ext.lower() not in SIDECARS:
                    skipped.append((name, "not an image (no type PIL opens)"))
    except (tarfile.ReadError, EOFError, OSError) as e:  # a truncated tar: keep what was listed before the break
        truncated = f"{type(e).__name__}: {e}"
    for key, g in groups.items():
        if "image" not in g:
            continue
        name, offset, n = g["image"]
        if captions is not None:
            cap = find_caption(captions, name)
        elif "txt" in g or "caption" in g:
            cap = (g.get("txt") or g["caption"]).decode("utf-8").strip()
        else:
            cap = json.loads(g["json"]).get("caption") if "json" in g else None
        if offset + n > size:
            skipped.append((name, "truncated tar"))
        elif not isinstance(cap, str) and need_caption:
            skipped.append((name, "no caption"))
        else:
            items.append((name, str(path), offset, n, cap))
    if truncated:
        skipped.append((source.name, f"truncated tar: {truncated}; the {len(items)} images before the break are kept"))
    return items, skipped, (path if path != source else None)


def read_image(file, offset, size, handles):
    """The image at (file, offset, size), upright (its EXIF orientation applied); handles caches one open file per
    tar in each worker."""
    if size < 0:
        return upright(Image.open(file))
    if file not in handles:
        handles[file] = open(file, "rb")
    f = handles[file]
    f.seek(offset)
    data = f.read(size)
    if len(data) < size:
        raise EOFError(f"the tar ends {size - len(data)} bytes into this image")
    return upright(Image.open(io.BytesIO(data)))


def to_rgb(im):
    """The image in 8-bit RGB; a 16-bit or float grey one scaled from its full range, not clipped at 255."""
    if im.mode not in DEEP_MODES:
        return im.convert("RGB")
    grey = np.asarray(im.convert("F"), dtype=np.float32) / DEEP_MODES[im.mode]
    return Image.fromarray((grey.clip(0, 1) * 255).round().astype(np.uint8)).convert("RGB")


def square_pixels(im, crop, resolution):
    """(3, R, R) float in [-1, 1]: the crop resized to R, at the image's own depth (16-bit grey resized as floats)."""
    if im.mode not in DEEP_MODES:
        x = im.convert("RGB").resize((resolution,) * 2, Image.Resampling.BICUBIC, box=crop)
        return torch.from_numpy(np.asarray(x, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    x = im.convert("F").resize((resolution,) * 2, Image.Resampling.BICUBIC, box=crop)
    grey = torch.from_numpy(np.asarray(x, dtype=np.float32) / DEEP_MODES[im.mode]).clamp(0, 1) * 2 - 1
    return grey.expand(3, -1, -1).clone()


def center_crop_box(width, height):
    """The largest centered square, (x0, y0, x1, y1) in pixels: the same crop the boxes are later mapped through."""
    m = min(width, height)
    left, top = (width - m) // 2, (height - m) // 2
    return [left, top, left + m, top + m]


class Skipped(Exception):
    """An image left out, (reason, detail); reason "fail": bad input that stops the job."""


class Images(torch.utils.data.Dataset):
    """Decodes, crops and resizes in the loader workers: (key, pixels (views, 3, R, R) in [-1, 1], size, crop, error);
    error: None, or (reason, detail) for an image skipped."""

    def __init__(self, items, resolution, flip, max_upscale=math.inf):
        self.items, self.resolution, self.flip, self.handles = items, resolution, flip, {}
        self.max_upscale = max_upscale

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        key, file, offset, size, _ = self.items[i]
        try:
            with read_image(file, offset, size, self.handles) as im:
                if min(im.size) * self.max_upscale < self.resolution:
                    return key, None, None, None, ("too small", f"{im.width}x{im.height} px")
                crop = center_crop_box(*im.size)
                return key, self.view(key, im, crop), im.size, crop, None
        except Skipped as e:
            return key, None, None, None, e.args
        except Exception as e:  # a corrupt or truncated file: skipped, counted, named
            return key, None, None, None, ("unreadable", f"{type(e).__name__}: {e}")

    def view(self, key, im, crop):
        """What the loader gives of an image: its crop's pixels, and their mirror image with --flip."""
        x = square_pixels(im, crop, self.resolution)
        return torch.stack([x, x.flip(-1)] if self.flip else [x])


# -----------------------------------------------------------------------------------------------------------------
def write_atomic(path, write):
    """Write path whole or not at all: to path.tmp, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def write_json(path, obj, indent=None):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=indent).encode()))


def write_jsonl(path, records):
    write_atomic(path, lambda f: f.writelines((json.dumps(r) + "\n").encode() for r in records))


def print_skipped(skipped):
    """The summary's lines: for each reason (up to its first colon), how many images and the first ten names."""
    reasons = defaultdict(list)
    for image, reason in skipped:
        reasons[reason.split(":")[0]].append(image)
    for reason, names in sorted(reasons.items()):
        print(f"  skipped {len(names)} ({reason}): {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")


def save_shard(out, name, latents, index, skipped, boxes=None):
    """<name>.npy, then <name>.json (its index and skipped images): the .json marks the shard done."""
    if latents is not None:
        write_atomic(out / f"{name}.npy", lambda f: np.save(f, latents))
    rec = dict(index=index, skipped=skipped, **({"boxes": boxes} if boxes is not None else {}))
    write_json(out / f"{name}.json", rec)


def encode_shard(vae, cfg, out, name, source, captions, root, dtype):
    items, skipped, temp = shard_items(source, captions, root, out)
    skipped = [dict(image=k, shard=name, reason=r) for k, r in skipped]
    images = Images(items, cfg["resolution"], cfg["flip"], cfg["max_upscale"])
    loader = torch.utils.data.DataLoader(images, batch_size=cfg["batch_size"], num_workers=cfg["num_workers"],
                                         collate_fn=list)
    index, latents, caption_of = [], [], {it[0]: it[4] for it in items}
    for batch in loader:
        skipped += [dict(image=key, shard=name, reason=err[0], error=err[1]) for key, *_, err in batch if err]
        batch = [b for b in batch if b[4] is None]
        if not batch:
            continue
        x = torch.cat([b[1] for b in batch]).to(vae.device, dtype)  # (batch x views, 3, R, R)
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            shift = vae.config.get("shift_factor") or 0.0  # None on SD's VAEs
            z = torch.stack([posterior.mean - shift, posterior.std][:1 + cfg["std"]], 1) * vae.config.scaling_factor
        z = z.float().cpu().numpy().astype(np.float16)
        z = z.reshape(len(batch), -1, *z.shape[1:])  # (batch, views, stats, C, h, w)
        for (key, _, (w, h), crop, _), latent in zip(batch, z):
            index.append(dict(key=key, caption=caption_of[key], shard=f"{name}.npy", row=len(latents), width=w,
                              height=h, crop=crop))
            latents.append(latent)
    save_shard(out, name, np.stack(latents) if latents else None, index, skipped)
    if temp:
        temp.unlink()
    return len(index), len(skipped)


def pending(shards, rank, world, marker, verb):
    """This rank's shards (r, r + world, ...) whose marker file, marker(name), is not written yet; said on stdout.
    The same for every job here (encode, embed, detect): a job run again skips what is done."""
    mine = shards[rank::world]
    todo = [(n, s) for n, s in mine if not marker(n).is_file()]
    print(f"rank {rank}: {len(todo)} of its {len(mine)} shards to {verb} ({len(shards)} in all, {world} processes)")
    return todo


def all_done(shards, marker, done):
    """Stop, before joining, unless every shard's marker file is written (a rank's part was cut short)."""
    missing = [n for n, _ in shards if not marker(n).is_file()]
    if missing:
        fail(f"{len(missing)} shards are not {done} yet (e.g. {missing[:3]}); run the job again to finish them")


def finish(out, shards, settings, extra=None):
    """Join the shards' indexes into index.jsonl, skipped.jsonl and meta.json (index.jsonl last: it marks the end).
    Without a resolution in settings (IGLIGEN's shards) it is the latents' size x 8, as in every SD VAE."""
    all_done(shards, lambda n: out / f"{n}.json", "encoded")
    index, skipped, boxes, seen, shape = [], [], [], {}, None
    for name, _ in shards:
        rec = json.loads((out / f"{name}.json").read_text())
        for r in rec["index"]:
            if r["key"] in seen:
                fail(f"image {r['key']!r} is in shard {seen[r['key']]} and in shard {name}: keys must be unique")
            seen[r["key"]] = name
        index += rec["index"]
        skipped += rec["skipped"]
        boxes += rec.get("boxes", [])
        if rec["index"] and shape is None:
            shape = np.load(out / f"{name}.npy", mmap_mode="r").shape[1:]
    write_jsonl(out / "skipped.jsonl", skipped)
    if not index:
        print_skipped([(s["image"], s["reason"]) for s in skipped])
        fail(f"none of the {len(skipped)} images could be encoded (the reasons above, each image in "
             f"{out / 'skipped.jsonl'})")
    if boxes:
        write_jsonl(out / "boxes.jsonl", boxes)
    meta = dict({"resolution": shape[-1] * 8, **settings}, latent_shape=list(shape[2:]),
                views=["original", "flipped"][:shape[0]], stats=["mean", "std"][:shape[1]], images=len(index),
                shards=len(shards), skipped=len(skipped), **(extra or {}))
    write_json(out / "meta.json", meta, indent=1)
    write_jsonl(out / "index.jsonl", index)
    print(f"{len(index)} images in {len(shards)} shards in {out}; skipped {len(skipped)}")
    print_skipped([(s["image"], s["reason"]) for s in skipped])
    return index, skipped


def start(out, settings):
    """(rank, world, device), after checking that out holds nothing, or the same job's shards."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # gloo, for the barrier before rank 0 joins the shards: the job may last days
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    out.mkdir(parents=True, exist_ok=True)
    job = out / "job.json"
    done = [f for f in out.glob("*.json") if f.name not in ("job.json", "meta.json")]  # finished shards
    if job.is_file() and done:
        old = json.loads(job.read_text())
        for k in settings.keys() & old.keys():  # (a setting newer than the job's shards: not held to it)
            if old[k] != settings[k]:
                fail(f"{out} holds shards made with {k}={old.get(k)!r}, this job has {k}={settings[k]!r}: "
                     f"run with the same setting, or choose another --out")
    elif rank == 0:  # a job that stopped before its first shard starts over with these settings
        write_json(job, settings, indent=1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    return rank, world, device


# -----------------------------------------------------------------------------------------------------------------
# Box image features for text-image training: each box's crop through a CLIP image encoder.
class Crops(Images):
    """Decodes an image and cuts out its boxes (relative to the original image), through the CLIP image processor, in
    the loader workers: (key, pixels (boxes, 3, S, S), error)."""

    def __init__(self, items, boxes, processor):
        super().__init__(items, 0, False)
        self.boxes, self.processor = boxes, processor

    def __getitem__(self, i):
        key, file, offset, size, _ = self.items[i]
        try:
            with read_image(file, offset, size, self.handles) as im:
                im = to_rgb(im)
            W, H = im.size
            crops = [im.crop((round(x0 * W), round(y0 * H), max(round(x1 * W), round(x0 * W) + 1),
                              max(round(y1 * H), round(y0 * H) + 1))) for x0, y0, x1, y1 in self.boxes[key]]
            return key, self.processor(images=crops, return_tensors="pt")["pixel_values"] if crops else None, None
        except Exception as e:  # a corrupt or truncated file: skipped, counted, named
            return key, None, f"{type(e).__name__}: {e}"


def image_project_weight(cfg):
    """image_project's (D, D) weight: a diffusers text-image model's own, or the transpose of the CLIP model's text
    projection, which maps CLIP's joint space back towards the pooled text features the phrases use (GLIGEN)."""
    from diffusers import CLIPImageProjection
    from transformers import CLIPTextModelWithProjection

    try:
        if cfg["image_project"]:
            return CLIPImageProjection.from_pretrained(cfg["image_project"], subfolder="image_project").project.weight
        return load_clip_tower(CLIPTextModelWithProjection, cfg["image_encoder"]).text_projection.weight.T.contiguous()
    except (OSError, ValueError) as e:
        fail(f"cannot load image_project from {cfg['image_project'] or cfg['image_encoder']!r}: {e}")


@torch.no_grad()
def embed_shard(encoder, weight, processor, boxes, cfg, out, name, source, root, device):
    items, skipped, temp = shard_items(source, None, root, out, need_caption=False)
    skipped = [dict(image=k, shard=name, reason=r) for k, r in skipped]
    skipped += [dict(image=it[0], shard=name, reason="no record in --boxes") for it in items if it[0] not in boxes]
    items = [it for it in items if it[0] in boxes]
    loader = torch.utils.data.DataLoader(Crops(items, boxes, processor), batch_size=cfg["batch_size"],
                                         num_workers=cfg["num_workers"], collate_fn=list)
    index, feats, row = [], [], 0
    for batch in loader:
        skipped += [dict(image=key, shard=name, reason="unreadable", error=err) for key, _, err in batch if err]
        for key, pixels, err in batch:
            if err is None:
                index.append(dict(key=key, shard=f"{name}.npy", row=row, boxes=len(boxes[key])))
                row += len(boxes[key])
                if pixels is not None:
                    embeds = encoder(pixel_values=pixels.to(device, encoder.dtype)).image_embeds.float()
                    feats.append(project_image_embeds(embeds, weight).cpu().numpy().astype(np.float16))
    dim = weight.shape[0]
    save_shard(out, name, np.concatenate(feats) if feats else np.zeros((0, dim), np.float16), index, skipped)
    if temp:
        temp.unlink()
    return len(index)


def embed_main(cfg):
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    out, root = Path(cfg["out"]), Path(cfg["images"])
    if not cfg["boxes"]:
        fail("--image_encoder needs --boxes: the boxes file whose boxes are cropped")
    boxes = {}
    for line, rec in read_jsonl(cfg["boxes"]):
        check_layout(rec.get("phrases"), rec.get("boxes"), f"{cfg['boxes']}:{line} (image {rec.get('image')!r})",
                     max_boxes=None)
        boxes[rec["image"]] = rec["boxes"]
    shards = input_shards(cfg)
    settings = {k: cfg[k] for k in ("image_encoder", "image_project", "boxes", "images", "tars", "shard_size")}
    settings["input_files"] = sum(1 if isinstance(s, Path) else len(s) for _, s in shards)
    rank, world, device = start(out, settings)
    weight = image_project_weight(cfg).detach().float().to(device)
    todo = pending(shards, rank, world, lambda n: out / f"{n}.json", "embed")
    if todo:
        try:
            processor = CLIPImageProcessor.from_pretrained(cfg["image_encoder"])
            encoder = load_clip_tower(CLIPVisionModelWithProjection, cfg["image_encoder"]).to(device).eval()
        except (OSError, ValueError) as e:
            fail(f"cannot load the image encoder {cfg['image_encoder']!r} (a CLIP model, Hub id or directory): {e}")
        if encoder.config.projection_dim != weight.shape[1]:
            fail(f"{cfg['image_encoder']}: image_embeds of {encoder.config.projection_dim}, image_project takes "
                 f"{weight.shape[1]}")
        for name, source in tqdm(todo, desc=f"rank {rank} shards", unit="shard", position=rank):
            embed_shard(encoder, weight, processor, boxes, cfg, out, name, source, root, device)
    if world > 1:
        dist.barrier()
    if rank == 0:
        all_done(shards, lambda n: out / f"{n}.json", "embedded")
        recs = [json.loads((out / f"{n}.json").read_text()) for n, _ in shards]
        index, skipped = [r for rec in recs for r in rec["index"]], [r for rec in recs for r in rec["skipped"]]
        save_file({"project.weight": weight.cpu().contiguous()}, out / "image_project.safetensors")
        write_jsonl(out / "skipped.jsonl", skipped)
        write_json(out / "meta.json", dict(settings, dim=weight.shape[0], images=len(index),
                                           boxes=sum(r["boxes"] for r in index), norm=28.7), indent=1)
        write_jsonl(out / "index.jsonl", index)  # last: it marks the end
        print(f"{len(index)} images, {sum(r['boxes'] for r in index)} box features in {out}; skipped {len(skipped)}")
        print_skipped([(r["image"], r["reason"]) for r in skipped])
    if world > 1:
        dist.destroy_process_group()


# -----------------------------------------------------------------------------------------------------------------
# Spatial maps for the spatial-map mode: each image's map, through the latents' crop, at half their side.
MAP_SUFFIXES = (".png", ".npy", ".tif", ".tiff")  # a map of your own: <folder>/<image's key, this suffix>


def find_map(folder, key):
    """Your map for an image: <folder>/<its key>.<suffix>, or <folder>/<its file name>.<suffix>; None if none."""
    for stem in (Path(key).with_suffix(""), Path(Path(key).name).with_suffix("")):
        for suffix in MAP_SUFFIXES:  # a stem may hold dots: photo.2020.jpg -> photo.2020.png
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def edge_map(pixels):
    """(1, S, S) edges of (3, S, S) pixels: 1 where the grey image's Sobel gradient passes a quarter of its most."""
    grey = F.pad(pixels.mean(0)[None, None], (1, 1, 1, 1), mode="replicate")
    sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    g = F.conv2d(grey, torch.stack([sobel, sobel.T])[:, None])[0]
    mag = g.pow(2).sum(0, keepdim=True).sqrt()
    return (mag > 0.25 * mag.max()).float() if mag.max() > 0 else mag


class MapSources(Images):
    """In the loader workers, an image's map source: (key, what, size, crop, error). what: edges (C, S, S), the
    cropped RGB image for a depth model, or your map fitted (C, S, S); error as Images', or ("fail", message) for bad
    input that stops the job."""

    def __init__(self, items, cfg, folder):
        super().__init__(items, cfg["resolution"], False, cfg["max_upscale"])
        self.kind, self.folder, self.side = cfg["map"], folder, cfg["resolution"] // 2

    def view(self, key, im, crop):
        if self.kind == "edges":
            return edge_map(square_pixels(im, crop, self.side))
        if self.kind == "depth":
            return to_rgb(im).crop(crop)
        path = find_map(self.folder, key)
        if path is None:
            raise Skipped("no map", f"no {Path(key).with_suffix('')}.png/.npy in {self.folder}")
        try:
            m = read_map(path)
        except SystemExit as e:
            raise Skipped("fail", f"{e}".removeprefix("error: ") + f" (the map of image {key!r})") from None
        if m.shape[1:] != (im.height, im.width):
            why = f"{path}: the map is {m.shape[2]}x{m.shape[1]} px, its image {key!r} {im.width}x{im.height} (upright)"
            raise Skipped("fail", why + ": a map is aligned with its image, pixel for pixel")
        return fit_map(m, crop, (self.side, self.side))


@torch.no_grad()
def depth_maps(model, processor, images, side):
    """Relative depth (1, S, S) in [0, 1] of each image, near bright, as the model predicts it, min-max per image."""
    inputs = processor(images=images, return_tensors="pt").to(model.device, model.dtype)
    d = F.interpolate(model(**inputs).predicted_depth[:, None].float(), (side, side), mode="bicubic").cpu()
    lo, hi = d.amin((1, 2, 3), keepdim=True), d.amax((1, 2, 3), keepdim=True)
    return list((d - lo) / (hi - lo).clamp_min(1e-12))


def map_shard(depth, cfg, out, name, source, root, folder):
    items, skipped, temp = shard_items(source, None, root, out, need_caption=False)
    skipped = [dict(image=k, shard=name, reason=r) for k, r in skipped]
    loader = torch.utils.data.DataLoader(MapSources(items, cfg, folder), batch_size=cfg["batch_size"],
                                         num_workers=cfg["num_workers"], collate_fn=list)
    index, maps = [], []
    for batch in loader:
        for *_, err in batch:
            if err and err[0] == "fail":
                fail(err[1])
        skipped += [dict(image=key, shard=name, reason=err[0], error=err[1]) for key, *_, err in batch if err]
        batch = [b for b in batch if b[4] is None]
        got = depth_maps(*depth, [b[1] for b in batch], cfg["resolution"] // 2) if depth and batch else \
            [b[1] for b in batch]
        for (key, _, (w, h), crop, _), m in zip(batch, got):
            if maps and len(m) != len(maps[0]):
                fail(f"the map of image {key!r} has {len(m)} channels, the maps before it {len(maps[0])}: one count "
                     f"for all")
            index.append(dict(key=key, shard=f"{name}.npy", row=len(maps), width=w, height=h, crop=crop,
                              channels=len(m)))
            maps.append((m.numpy() * 65535).round().astype(np.uint16))
    save_shard(out, name, np.stack(maps) if maps else None, index, skipped)
    if temp:
        temp.unlink()
    return len(index)


def map_main(cfg):
    out, root = Path(cfg["out"]), Path(cfg["images"])
    folder = None if cfg["map"] in ("edges", "depth") else Path(cfg["map"])
    if folder is not None and not folder.is_dir():
        fail(f"--map={cfg['map']}: edges, depth, or a folder of your maps (one per image); folder not found")
    if cfg["resolution"] % 16:
        fail(f"--resolution={cfg['resolution']}: maps are stored at half of it, 4x the latents' side: a multiple of 16")
    shards = input_shards(cfg)
    keys = ("map", "resolution", "max_upscale", "images", "tars", "shard_size")
    keys += ("depth_model",) * (cfg["map"] == "depth")
    settings = {k: cfg[k] for k in keys}
    settings["input_files"] = sum(1 if isinstance(s, Path) else len(s) for _, s in shards)
    rank, world, device = start(out, settings)
    todo = pending(shards, rank, world, lambda n: out / f"{n}.json", "map")
    depth = None
    if todo and cfg["map"] == "depth":
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        try:
            depth = (AutoModelForDepthEstimation.from_pretrained(cfg["depth_model"]).to(device).eval(),
                     AutoImageProcessor.from_pretrained(cfg["depth_model"]))
        except (OSError, ValueError) as e:
            fail(f"--depth_model={cfg['depth_model']}: cannot load a transformers depth-estimation model from it: {e}")
    for name, source in tqdm(todo, desc=f"rank {rank} shards", unit="shard", position=rank):
        map_shard(depth, cfg, out, name, source, root, folder)
    if world > 1:
        dist.barrier()
    if rank == 0:
        all_done(shards, lambda n: out / f"{n}.json", "mapped")
        recs = [json.loads((out / f"{n}.json").read_text()) for n, _ in shards]
        index, skipped = [r for rec in recs for r in rec["index"]], [r for rec in recs for r in rec["skipped"]]
        if not index:
            print_skipped([(r["image"], r["reason"]) for r in skipped])
            fail(f"no map was made for any of the {len(skipped)} images (the reasons above)")
        if len({r["channels"] for r in index}) > 1:
            other = next(r for r in index if r["channels"] != index[0]["channels"])
            fail(f"the map of image {other['key']!r} has {other['channels']} channels, that of image "
                 f"{index[0]['key']!r} {index[0]['channels']}: one count for all")
        write_jsonl(out / "skipped.jsonl", skipped)
        write_json(out / "meta.json", dict(settings, channels=index[0]["channels"], side=cfg["resolution"] // 2,
                                           images=len(index), skipped=len(skipped)), indent=1)
        write_jsonl(out / "index.jsonl", index)  # last: it marks the end
        print(f"{len(index)} maps ({index[0]['channels']} channels, {cfg['resolution'] // 2} px) in {out}; "
              f"skipped {len(skipped)}")
        print_skipped([(r["image"], r["reason"]) for r in skipped])
    if world > 1:
        dist.destroy_process_group()


def check_settings(cfg):
    """Stop on a setting that cannot work, before anything slow starts."""
    in_range(cfg, "resolution batch_size shard_size", 1)
    in_range(cfg, "num_workers", 0)
    in_range(cfg, "igligen_threshold", 0, 1)
    in_range(cfg, "max_upscale", 1)
    if cfg["resolution"] % 8:
        fail(f"--resolution={cfg['resolution']}: must be a multiple of 8 (the VAE's downsampling factor)")
    if cfg["dtype"] not in ("auto", "fp32"):
        fail(f"--dtype={cfg['dtype']}: must be auto (bf16 on CUDA, fp32 on CPU) or fp32")
    if sum(bool(cfg[k]) for k in ("igligen", "image_encoder", "map")) > 1:
        fail("--igligen, --image_encoder and --map are three jobs: give one of them")
    check_out_dir(cfg["out"], "out")


def main(cfg):
    check_settings(cfg)
    if cfg["igligen"]:
        return import_igligen(cfg)
    if cfg["image_encoder"]:
        return embed_main(cfg)
    if cfg["map"]:
        return map_main(cfg)
    from diffusers import AutoencoderKL

    out, root = Path(cfg["out"]), Path(cfg["images"])
    shards = input_shards(cfg)
    try:
        vae_config = AutoencoderKL.load_config(cfg["model"], subfolder="vae")
    except (OSError, ValueError) as e:
        fail(f"cannot load the VAE of {cfg['model']!r}: {e}")
    # what the shards depend on: another value on a job with shards is refused (a changed folder would shift them)
    keys = ("model", "resolution", "std", "flip", "max_upscale", "images", "tars", "shard_size")
    settings = {k: cfg[k] for k in keys}
    settings["captions_sha256"] = sha256(cfg["captions"]) if Path(cfg["captions"]).is_file() else None
    settings["input_files"] = sum(1 if isinstance(s, Path) else len(s) for _, s in shards)
    scaling = dict(scaling_factor=vae_config.get("scaling_factor", 0.18215),
                   shift_factor=vae_config.get("shift_factor") or 0.0)
    rank, world, device = start(out, dict(settings, **scaling))
    captions = load_captions(cfg["captions"]) if cfg["captions"] else None
    dtype = torch.bfloat16 if cfg["dtype"] == "auto" and device.type == "cuda" else torch.float32
    todo = pending(shards, rank, world, lambda n: out / f"{n}.json", "encode")
    if todo:
        try:
            vae = AutoencoderKL.from_pretrained(cfg["model"], subfolder="vae", torch_dtype=dtype).to(device)
        except (OSError, ValueError) as e:
            fail(f"cannot load the VAE of {cfg['model']!r}: {e}")
        t0, n_images = time.perf_counter(), 0
        bar = tqdm(todo, desc=f"rank {rank} shards", unit="shard", position=rank)
        for name, source in bar:
            n, _ = encode_shard(vae, cfg, out, name, source, captions, root, dtype)
            n_images += n
            bar.set_postfix(img_per_s=f"{n_images / (time.perf_counter() - t0):.1f}")
        print(f"rank {rank}: encoded {n_images} images in {time.perf_counter() - t0:.0f} s "
              f"({n_images / (time.perf_counter() - t0):.1f} img/s)")
    if world > 1:
        dist.barrier()
    result = finish(out, shards, dict(settings, **scaling)) if rank == 0 else None
    if world > 1:
        dist.destroy_process_group()
    return result


# -----------------------------------------------------------------------------------------------------------------
# IGLIGEN's shards: latents/<shard>.npy, a pickled 0-d object array {"indices": [SA-1B image ids], "latents": (N, 4,
# h, w) float16, one VAE sample x 0.18215 of a resize-short-side + center crop}; boxes/<shard>.npy, pickled rows
# [image id, caption, boxes (K, 4) cx, cy, w, h relative to the crop, confidence (K,), phrases].
def import_igligen(cfg):
    if not cfg["allow_pickle"]:
        fail("IGLIGEN's shards are pickled numpy object arrays, and loading a pickle runs whatever code the file "
             "holds. Import only files from a source you trust, and say so with --allow_pickle=True")
    src, out = Path(cfg["igligen"]), Path(cfg["out"])
    files = sorted((src / "latents").glob("*.npy"))
    if not files:
        fail(f"no IGLIGEN latent shards in {src / 'latents'}")
    shards = [(f.stem, f) for f in files]
    settings = dict(model="imported from IGLIGEN", igligen=str(src), igligen_threshold=cfg["igligen_threshold"])
    start(out, settings)
    for name, f in tqdm(shards, desc="importing", unit="shard"):
        if (out / f"{name}.json").is_file():
            continue
        lat = np.load(f, allow_pickle=True).item()
        resolution = lat["latents"].shape[-1] * 8
        box_file = src / "boxes" / f"{name}.npy"
        rows = {int(r[0]): r for r in np.load(box_file, allow_pickle=True)} if box_file.is_file() else {}
        index, skipped, boxes, keep = [], [], [], []
        for row, image_id in enumerate(lat["indices"]):
            key = f"sa_{int(image_id)}.jpg"
            if int(image_id) not in rows:  # the caption lives in the boxes file
                skipped.append(dict(image=key, shard=name, reason="no caption"))
                continue
            _, caption, b, conf, phrases = rows[int(image_id)]
            b = np.asarray(b, np.float64).reshape(-1, 4)
            xyxy = np.clip(np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1), 0, 1)
            ok = [i for i in range(len(b)) if conf[i] >= cfg["igligen_threshold"] and
                  xyxy[i, 2] > xyxy[i, 0] and xyxy[i, 3] > xyxy[i, 1]]
            index.append(dict(key=key, caption=str(caption), shard=f"{name}.npy", row=len(keep), width=resolution,
                              height=resolution, crop=[0, 0, resolution, resolution]))
            boxes.append(dict(image=key, width=resolution, height=resolution, caption=str(caption),
                              phrases=[str(phrases[i]) for i in ok], boxes=[xyxy[i].round(6).tolist() for i in ok]))
            keep.append(row)
        latents = lat["latents"][keep][:, None, None].astype(np.float16) if keep else None
        save_shard(out, name, latents, index, skipped, boxes)
    return finish(out, shards, dict(settings, scaling_factor=0.18215), dict(latent="one VAE sample (IGLIGEN)"))


if __name__ == "__main__":
    main(configure(config, sys.argv[1:], __doc__))
