"""
Benchmarks. --what=loader: how many training samples per second train_gligen.py's data loader delivers from disk,
on this machine, with no GPU and no download.

    python benchmark.py --what=loader --workers=2

It writes a synthetic prep_latents.py output (--images latents of 4 x 64 x 64 float16, i.e. 512 px, in shards of
4096, with captions and 1 to 10 boxes per image) to --dir, then runs the trainer's own loader on it:
GroundedLatents (memmapped shards, random access across all of them), rank_batches and collate (tokenizing the
captions and phrases in the workers), as a training run of --batch images per micro-batch would. The tokenizer is
a CLIP BPE tokenizer whose vocabulary holds each word of the synthetic captions (a real model's tokenizer can be
given with --model). The first epoch's pages come from disk; the figure is over --seconds after --warmup batches.
"""
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

import train_gligen as tg

config = dict(
    what="loader",  # loader: samples/s of the training data loader
    dir="/tmp/gligen-bench",  # where the synthetic latents are written (about 32 KB an image)
    images=40_000,  # synthetic images
    resolution=512,  # their resolution: latents of 4 x resolution/8 x resolution/8
    batch=32,  # samples per micro-batch
    workers=2,  # loader worker processes
    seconds=20.0,  # measured time
    warmup=20,  # batches before the clock starts
    model="",  # "" = the synthetic captions' own tokenizer; else a diffusers model whose tokenizer to use
)
WORDS = ("a the dog cat red blue car tree man woman sitting standing on in near beside under large small green "
         "house street table chair with and of photo image bowl person bicycle grass sky white black").split()


def write_data(root, n, resolution, rng):
    """prep_latents.py's output format, and a boxes file, for n random images."""
    if (root / "index.jsonl").is_file() and json.loads((root / "meta.json").read_text())["images"] == n:
        return
    root.mkdir(parents=True, exist_ok=True)
    h, index, boxes = resolution // 8, [], []
    for s in range(0, n, 4096):
        rows = min(4096, n - s)
        np.save(root / f"bench_{s // 4096:05d}.npy", rng.standard_normal((rows, 1, 1, 4, h, h), np.float32).astype(np.float16))
        for r in range(rows):
            key = f"{s + r:08d}.jpg"
            index.append(dict(key=key, caption=" ".join(rng.choice(WORDS, rng.integers(8, 25))),
                              shard=f"bench_{s // 4096:05d}.npy", row=r, width=640, height=480, crop=[80, 0, 560, 480]))
            k = int(rng.integers(1, 11))
            xy = rng.uniform(0, 0.6, (k, 2))
            b = np.concatenate([xy, xy + rng.uniform(0.15, 0.4, (k, 2))], 1).clip(0, 1).round(4)
            boxes.append(dict(image=key, width=640, height=480, phrases=[" ".join(rng.choice(WORDS, 2)) for _ in range(k)],
                              boxes=b.tolist()))
    (root / "meta.json").write_text(json.dumps(dict(resolution=resolution, latent_shape=[4, h, h], views=["original"],
                                                    stats=["mean"], images=n)))
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
    (root / "boxes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in boxes))


def loader_benchmark(cfg):
    root = Path(cfg["dir"])
    write_data(root, cfg["images"], cfg["resolution"], np.random.default_rng(0))
    if cfg["model"]:
        from transformers import CLIPTokenizer
        tokenizer = CLIPTokenizer.from_pretrained(cfg["model"], subfolder="tokenizer")
    else:
        from demo_shapes import write_tokenizer
        tokenizer = write_tokenizer(root / "tokenizer", sorted(set(WORDS)), max_length=77)
    data = tg.GroundedLatents(root, root / "boxes.jsonl")
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=tg.rank_batches(len(data), cfg["batch"], cfg["batch"], 1, 0, 0, 0),
        num_workers=cfg["workers"], collate_fn=partial(tg.collate, tokenizer), prefetch_factor=4 if cfg["workers"] else None,
        persistent_workers=False)
    it = iter(loader)
    for _ in range(cfg["warmup"]):
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < cfg["seconds"]:
        batch = next(it)
        n += batch["latents"].shape[0]
    rate = n / (time.perf_counter() - t0)
    print(f"loader: {rate:.0f} samples/s ({cfg['workers']} workers, micro-batch {cfg['batch']}, "
          f"latents 4x{cfg['resolution'] // 8}x{cfg['resolution'] // 8} float16 with 1-10 boxes, {len(data)} images, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return rate


if __name__ == "__main__":
    cfg = tg.configure(config, sys.argv[1:], __doc__)
    if cfg["what"] != "loader":
        tg.fail(f"--what={cfg['what']!r}: only 'loader' is benchmarked so far")
    loader_benchmark(cfg)
