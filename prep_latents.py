"""
Encode a folder of captioned images into VAE latents for train_gligen.py.

    python prep_latents.py --model=stable-diffusion-v1-5/stable-diffusion-v1-5 --images=data/coco/train2017 \
        --captions=data/coco/boxes.jsonl --out=data/coco/latents --resolution=512

Captions come from a JSONL of {"image": path relative to --images, "caption": ...} (prep_boxes.py's output is
one), or, with --captions="", from a .txt beside each image. Each image's short side is center-cropped to a square,
resized to --resolution and encoded by the model's VAE (the mean of its latent distribution, times the VAE's
scaling factor). Output in --out:
    latents_00000.npy ...  float16 (N, 4, resolution/8, resolution/8), plain .npy (never pickled), memmappable
    index.jsonl            one line per image: key, caption, shard, row, original width/height, crop (pixels)
    meta.json              model, resolution, scaling factor, latent shape, counts
    skipped.jsonl          every image that was not encoded, and why
Unreadable images and images without a caption are skipped, counted and named; nothing is dropped silently.
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from train_gligen import configure, fail, read_jsonl

config = dict(
    model="stable-diffusion-v1-5/stable-diffusion-v1-5",  # whose VAE encodes the images
    images="data/images",  # folder of images, searched recursively
    captions="",  # JSONL of {"image", "caption"}; "" = a .txt file beside each image
    out="data/latents",  # output directory (must not hold a finished run)
    resolution=512,  # training resolution in pixels; the latents are resolution/8 on a side
    batch_size=16,  # images per VAE batch
    shard_size=4096,  # images per .npy shard
    num_workers=4,  # image decoding processes
    dtype="auto",  # VAE precision: auto = bf16 on CUDA, fp32 on CPU; or fp32
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def center_crop_box(width, height):
    """The largest centered square, (x0, y0, x1, y1) in pixels: the same crop the boxes are later mapped through."""
    m = min(width, height)
    left, top = (width - m) // 2, (height - m) // 2
    return [left, top, left + m, top + m]


class Images(torch.utils.data.Dataset):
    def __init__(self, root, keys, resolution):
        self.root, self.keys, self.resolution = root, keys, resolution

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        key = self.keys[i]
        try:
            with Image.open(self.root / key) as im:
                im = im.convert("RGB")
                crop = center_crop_box(*im.size)
                x = im.resize((self.resolution,) * 2, Image.Resampling.BICUBIC, box=crop)
            x = torch.from_numpy(np.asarray(x, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1  # (3, R, R) in [-1, 1]
            return key, x, im.size, crop, None
        except Exception as e:  # a corrupt or truncated file: skipped, counted, named
            return key, None, None, None, f"{type(e).__name__}: {e}"


def main(cfg):
    from diffusers import AutoencoderKL

    root, out = Path(cfg["images"]), Path(cfg["out"])
    if not root.is_dir():
        fail(f"image folder not found: {root}")
    if (out / "index.jsonl").exists():
        fail(f"{out} already holds encoded latents; remove it or choose another --out")
    if cfg["resolution"] % 8:
        fail("resolution must be a multiple of 8")
    keys = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if cfg["captions"]:
        captions = {}
        for line, rec in read_jsonl(cfg["captions"]):
            if isinstance(rec.get("image"), str) and isinstance(rec.get("caption"), str):
                captions[rec["image"]] = rec["caption"]
            elif "caption" in rec or "image" not in rec:
                fail(f"{cfg['captions']}:{line}: a record needs an image path and a caption string")
    else:
        captions = {k: (root / k).with_suffix(".txt").read_text().strip() for k in keys
                    if (root / k).with_suffix(".txt").is_file()}
    skipped = [dict(image=k, reason="no caption") for k in keys if k not in captions]
    keys = [k for k in keys if k in captions]
    if not keys:
        fail(f"no captioned images in {root} ({len(skipped)} images without a caption)")

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cfg["dtype"] == "auto" and cuda else torch.float32
    try:
        vae = AutoencoderKL.from_pretrained(cfg["model"], subfolder="vae", torch_dtype=dtype)
    except (OSError, ValueError) as e:
        fail(f"cannot load the VAE of {cfg['model']!r}: {e}")
    vae, scaling = vae.to("cuda" if cuda else "cpu"), vae.config.scaling_factor
    loader = torch.utils.data.DataLoader(Images(root, keys, cfg["resolution"]), batch_size=cfg["batch_size"],
                                         num_workers=cfg["num_workers"], collate_fn=list)
    out.mkdir(parents=True, exist_ok=True)
    index, buffer, n_shards, t0 = [], [], 0, time.perf_counter()

    def write_shard():
        nonlocal buffer, n_shards
        name = f"latents_{n_shards:05d}.npy"
        with open(out / (name + ".tmp"), "wb") as f:
            np.save(f, np.stack(buffer))
        os.replace(out / (name + ".tmp"), out / name)  # a shard is either whole or absent
        buffer, n_shards = [], n_shards + 1

    bar = tqdm(loader, desc="encoding", unit="batch")
    for batch in bar:
        skipped += [dict(image=key, reason="unreadable", error=err) for key, _, _, _, err in batch if err]
        batch = [b for b in batch if b[4] is None]
        if not batch:
            continue
        x = torch.stack([b[1] for b in batch]).to(vae.device, dtype)
        with torch.no_grad():
            z = (vae.encode(x).latent_dist.mean * scaling).float().cpu().numpy().astype(np.float16)
        for (key, _, (w, h), crop, _), latent in zip(batch, z):
            index.append(dict(key=key, caption=captions[key], shard=f"latents_{n_shards:05d}.npy", row=len(buffer),
                              width=w, height=h, crop=crop))
            buffer.append(latent)
            if len(buffer) == cfg["shard_size"]:
                write_shard()
        bar.set_postfix(img_per_s=f"{len(index) / (time.perf_counter() - t0):.1f}", skipped=len(skipped))
    if buffer:
        write_shard()
    if not index:
        fail(f"none of the {len(keys)} captioned images in {root} could be read (see {out / 'skipped.jsonl'})")

    def write_lines(name, records):  # whole or absent, like the shards
        with open(out / (name + ".tmp"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(out / (name + ".tmp"), out / name)

    write_lines("skipped.jsonl", skipped)
    (out / "meta.json").write_text(json.dumps(dict(
        model=cfg["model"], resolution=cfg["resolution"], scaling_factor=scaling, latent_shape=list(z.shape[1:]),
        images=len(index), shards=n_shards, skipped=len(skipped)), indent=1))
    write_lines("index.jsonl", index)  # last: its presence marks a finished run
    print(f"encoded {len(index)} images into {n_shards} shards in {out} "
          f"({len(index) / (time.perf_counter() - t0):.1f} img/s); skipped {len(skipped)}")
    for reason in sorted({s["reason"] for s in skipped}):
        names = [s["image"] for s in skipped if s["reason"] == reason]
        print(f"  skipped {len(names)} ({reason}): {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
    return index, skipped


if __name__ == "__main__":
    main(configure(config, sys.argv[1:], __doc__))
