"""
Benchmarks, with no download.

    python benchmark.py --what=loader --workers=2
    python benchmark.py --what=train --unet=sd15 --batch_sizes=8,16,32      # on a GPU

--what=train: images/s, model-FLOPs utilisation and peak memory of a GLIGEN training step on a randomly initialised
full-size UNet (--unet: sd15, sd21-base, sdxl; "tiny" for a CPU smoke run), for this project's recipe and for the
reference recipe that IGLIGEN and diffusers' example use, side by side in one process on one device:
    ours        frozen base in bf16, fp32 adapters under bf16 autocast, fused AdamW with the NaN skip, SDPA
                (torch.compile with --compile=True)
    reference   diffusers' own attention_type="gated" UNet in fp32, fp16 autocast, GradScaler, AdamW
Both train the adapters only, on random latents, text features and 10 boxes per image; the text encoders are left
out of both (the same cost for either). FLOPs per image come from torch's flop counter on one step; our fusers let
only the visual tokens query (diffusers' let the grounding tokens query too, then drop their outputs), so the
reference executes a few more FLOPs for the same result, and both MFUs are computed with ours, the work the model
needs. The speed of a network does not depend on its weights. Results also go to --out as JSON.

--what=loader: how many training samples per second train_gligen.py's data loader delivers from disk.

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
import torch.nn.functional as F
from contextlib import nullcontext
from torch.utils.flop_counter import FlopCounterMode

import train_gligen as tg

config = dict(
    what="loader",  # loader: samples/s of the training data loader; train: a training step, ours vs reference
    unet="sd15",  # train: sd15, sd21-base, sdxl, or tiny
    batch_sizes="8,16,32",  # train: images per step, comma-separated
    steps=20,  # train: timed steps per measurement
    compile=False,  # train: torch.compile our UNet
    out="benchmark_train.json",  # train: where the results go
    dir="/tmp/gligen-bench",  # where the synthetic latents are written (about 32 KB an image)
    images=40_000,  # synthetic images
    resolution=512,  # their resolution: latents of 4 x resolution/8 x resolution/8
    batch=32,  # samples per micro-batch
    workers=2,  # loader worker processes
    seconds=20.0,  # measured time
    warmup=20,  # batches before the clock starts
    model="",  # "" = the synthetic captions' own tokenizer; else a diffusers model whose tokenizer to use
)
SD15 = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
UNETS = dict(
    sd15=SD15,
    sd21_base=dict(SD15, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
    sdxl=dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
              use_linear_projection=True, transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time",
              addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
    tiny=dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
              attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2),
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


def step_inputs(unet_cfg, B, device, g):
    """Random latents, timesteps, text features, 10 boxes per image (and SDXL's added conditioning)."""
    D, h = unet_cfg["cross_attention_dim"], unet_cfg["sample_size"]
    xy = torch.rand(B, tg.N_SLOTS, 2, generator=g) * 0.6
    masks = torch.zeros(B, tg.N_SLOTS)
    masks[:, :10] = 1
    gligen = dict(boxes=torch.cat([xy, xy + 0.3], -1), masks=masks, positive_embeddings=torch.randn(B, tg.N_SLOTS, D, generator=g))
    inputs = dict(x=torch.randn(B, 4, h, h, generator=g), t=torch.randint(0, 1000, (B,), generator=g),
                  text=torch.randn(B, 77, D, generator=g), target=torch.randn(B, 4, h, h, generator=g), gligen=gligen)
    if unet_cfg.get("addition_embed_type") == "text_time":
        inputs["added"] = dict(text_embeds=torch.randn(B, 1280, generator=g), time_ids=torch.tensor([[h * 8.0, h * 8, 0, 0, h * 8, h * 8]] * B))
    return {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device)) for k, v in inputs.items()}


def recipe(name, unet_cfg, device, compile_):
    """(step function, model) for one recipe; step(inputs) runs forward, backward and the optimizer update."""
    from diffusers import UNet2DConditionModel

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    if name == "ours":
        unet = tg.inject_gligen(UNet2DConditionModel(**unet_cfg).to(device, torch.bfloat16 if cuda else torch.float32))
        unet.requires_grad_(False)
        params = [p.requires_grad_(True) for n, p in unet.named_parameters() if tg.is_adapter(n)]  # fp32
        opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0, fused=True)
        model = torch.compile(unet) if compile_ else unet
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

        def step(i):
            with autocast:
                pred = model(i["x"], i["t"], encoder_hidden_states=i["text"], cross_attention_kwargs={"gligen": i["gligen"]},
                             **({"added_cond_kwargs": i["added"]} if "added" in i else {})).sample
            F.mse_loss(pred.float(), i["target"]).backward()
            ok = torch.isfinite(torch.nn.utils.clip_grad_norm_(params, 1.0))
            opt.found_inf = (~ok).float()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, unet
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel(**unet_cfg).config, attention_type="gated").to(device)
    unet.requires_grad_(False)
    params = [p.requires_grad_(True) for n, p in unet.named_parameters() if tg.is_adapter(n)]
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else nullcontext()

    def step(i):
        with autocast:
            pred = unet(i["x"], i["t"], encoder_hidden_states=i["text"], cross_attention_kwargs={"gligen": i["gligen"]},
                        **({"added_cond_kwargs": i["added"]} if "added" in i else {})).sample
            loss = F.mse_loss(pred.float(), i["target"])
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step, unet


def train_benchmark(cfg):
    import diffusers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    unet_cfg = UNETS[cfg["unet"].replace("-", "_")] if cfg["unet"].replace("-", "_") in UNETS else tg.fail(
        f"--unet={cfg['unet']!r}: one of {', '.join(UNETS)}")
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = next((v for k, v in tg.PEAK_BF16.items() if k in name), 0)
    print(f"{cfg['unet']} UNet, {unet_cfg['sample_size'] * 8} px; {name}; torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}, diffusers {diffusers.__version__}")
    results, g = [], torch.Generator().manual_seed(0)
    for B in [int(b) for b in str(cfg["batch_sizes"]).split(",")]:
        row = {}
        for rname in ("ours", "reference"):
            step, unet = recipe(rname, unet_cfg, device, cfg["compile"] and rname == "ours")
            inputs = step_inputs(unet_cfg, B, device, g)
            try:
                with FlopCounterMode(display=False) as counter:
                    step(inputs)
                for _ in range(cfg["warmup"]):
                    step(inputs)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for _ in range(cfg["steps"]):
                    step(inputs)
                if cuda:
                    torch.cuda.synchronize()
                ips = B * cfg["steps"] / (time.perf_counter() - t0)
                flops = counter.get_total_flops() / B
                model_flops = row["ours"]["flops"] if rname == "reference" and "ours" in row else flops
                row[rname] = dict(img_per_s=round(ips, 2), tflop_per_image=float(f"{flops / 1e12:.5g}"), flops=flops,
                                  mfu=round(model_flops * ips / peak, 4) if peak else None,
                                  peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
            except torch.OutOfMemoryError:
                row[rname] = dict(img_per_s=None, error="out of memory")
            del step, unet, inputs
            if cuda:
                torch.cuda.empty_cache()
        for r in row.values():
            r.pop("flops", None)
        ours, ref = row["ours"]["img_per_s"], row["reference"]["img_per_s"]
        row = dict(unet=cfg["unet"], batch=B, device=name, compile=cfg["compile"], **row,
                   ratio=round(ours / ref, 3) if ours and ref else None)
        results.append(row)
        print(json.dumps(row))
    Path(cfg["out"]).write_text(json.dumps(dict(torch=torch.__version__, cuda=torch.version.cuda,
                                                diffusers=diffusers.__version__, results=results), indent=1))
    return results


if __name__ == "__main__":
    cfg = tg.configure(config, sys.argv[1:], __doc__)
    if cfg["what"] not in ("loader", "train"):
        tg.fail(f"--what={cfg['what']!r}: loader or train")
    loader_benchmark(cfg) if cfg["what"] == "loader" else train_benchmark(cfg)
