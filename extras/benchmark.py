"""
Benchmarks, with no download.

    python extras/benchmark.py --what=loader --workers=2
    python extras/benchmark.py --what=train --unet=sd15 --batch_sizes=8,16,32 --profile=True      # on a GPU

--what=train: images/s, model-FLOPs utilisation and peak memory of a GLIGEN training step on a randomly initialised
full-size UNet and text encoder (--unet: sd15, sd21-base, sdxl; "tiny" for a CPU smoke run), for this project's step
and for the reference recipe that IGLIGEN and diffusers' example train with, side by side in one process on one device:
    ours        train_gligen.py's own sd_loss and optimizer_step: frozen base and text encoder in bf16, fp32
                adapters under bf16 autocast, distinct phrases padded to the longest and encoded once, SDPA, fused
                AdamW with the on-device NaN skip (torch.compile with --compile=True)
    reference   IGLIGEN's step: diffusers' own attention_type="gated" UNet in fp32 under fp16 autocast, GradScaler,
                AdamW, text encoder in fp16, each image's phrases encoded in a loop
Both train the adapters only, on random latents, captions and 10 boxes per image (10 distinct phrases each: ours
gains nothing here from encoding repeated phrases once). FLOPs per image are model FLOPs, counted as the trainer
counts them (train_gligen.count_flops: torch's flop counter on one image's step, SDPA's math kernel). Our fusers let
only the visual tokens query (diffusers' let the grounding tokens query too, then drop their outputs), so the
reference executes a few more FLOPs for the same result, and both MFUs are computed with ours, the work the model
needs. The speed of a network does not depend on its weights. Results also go to --out as JSON.
--profile=True also profiles our step at the first batch size: the shares of its time spent in the text encoders,
the frozen base (forward and backward), the optimizer, the fusers and the rest (each part timed alone), and in
attention, the top ops by time (GPU kernels on a GPU), and on a GPU the host synchronisations in one step.

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

ROOT = Path(__file__).resolve().parents[1]  # train_gligen.py and the scripts this one builds on
sys.path.insert(0, str(ROOT))
import train_gligen as tg

config = dict(
    what="loader",  # loader: samples/s of the training data loader; train: a training step, ours vs reference
    unet="sd15",  # train: sd15, sd21-base, sdxl, or tiny
    batch_sizes="8,16,32",  # train: images per step, comma-separated
    steps=20,  # train: timed steps per measurement
    compile=False,  # train: torch.compile our UNet
    profile=False,  # train: also profile our step at the first batch size: shares of the step, top ops
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
              attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 2,
              up_block_types=("CrossAttnUpBlock2D",) * 2),
)
WORDS = ("a the dog cat red blue car tree man woman sitting standing on in near beside under large small green "
         "house street table chair with and of photo image bowl person bicycle grass sky white black").split()


def write_data(root, n, resolution, rng, scaling_factor=0.18215):
    """prep_latents.py's output format, and a boxes file, for n random images (as if made by a VAE of this scaling)."""
    if (root / "index.jsonl").is_file() and json.loads((root / "meta.json").read_text())["images"] == n:
        return
    root.mkdir(parents=True, exist_ok=True)
    h, index, boxes = resolution // 8, [], []
    for s in range(0, n, 4096):
        rows = min(4096, n - s)
        shard = rng.standard_normal((rows, 1, 1, 4, h, h), np.float32).astype(np.float16)
        np.save(root / f"bench_{s // 4096:05d}.npy", shard)
        for r in range(rows):
            key = f"{s + r:08d}.jpg"
            index.append(dict(key=key, caption=" ".join(rng.choice(WORDS, rng.integers(8, 25))),
                              shard=f"bench_{s // 4096:05d}.npy", row=r, width=640, height=480, crop=[80, 0, 560, 480]))
            k = int(rng.integers(1, 11))
            xy = rng.uniform(0, 0.6, (k, 2))
            b = np.concatenate([xy, xy + rng.uniform(0.15, 0.4, (k, 2))], 1).clip(0, 1).round(4)
            phrases = [" ".join(rng.choice(WORDS, 2)) for _ in range(k)]
            boxes.append(dict(image=key, width=640, height=480, phrases=phrases, boxes=b.tolist()))
    meta = dict(model="synthetic", resolution=resolution, scaling_factor=scaling_factor, latent_shape=[4, h, h],
                views=["original"], stats=["mean"], images=n)
    (root / "meta.json").write_text(json.dumps(meta))
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
    (root / "boxes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in boxes))


def loader_benchmark(cfg):
    root = Path(cfg["dir"])
    write_data(root, cfg["images"], cfg["resolution"], np.random.default_rng(0))
    if cfg["model"]:
        from transformers import CLIPTokenizer
        tokenizer = tg.Tokenizer(CLIPTokenizer.from_pretrained(cfg["model"], subfolder="tokenizer"))
    else:
        from demo_shapes import write_tokenizer
        tokenizer = tg.Tokenizer(write_tokenizer(root / "tokenizer", sorted(set(WORDS)), max_length=77))
    data = tg.GroundedLatents(root, root / "boxes.jsonl")
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=tg.rank_batches(len(data), cfg["batch"], cfg["batch"], 1, 0, 0, 0),
        num_workers=cfg["workers"], collate_fn=partial(data.collate, tokenizer),
        prefetch_factor=4 if cfg["workers"] else None, persistent_workers=False)
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


def text_encoder(unet_name):
    """A randomly initialised text encoder of the base model's size: CLIP ViT-L (SD1.x), OpenCLIP ViT-H (SD2.x), both
    of SDXL's (ViT-L and ViT-bigG) behind the trainer's SDXLTextEncoders; "tiny": 2 layers of width 32."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vit_l = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    vit_h = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 hidden_act="gelu", projection_dim=1024)
    vit_big_g = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280)
    tiny = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    if unet_name == "sdxl":
        return tg.SDXLTextEncoders(CLIPTextModel(CLIPTextConfig(**vit_l)),
                                   CLIPTextModelWithProjection(CLIPTextConfig(**vit_big_g)))
    return CLIPTextModel(CLIPTextConfig(**dict(sd15=vit_l, sd21_base=vit_h, tiny=tiny)[unet_name]))


def step_batch(unet_name, unet_cfg, B, device, g):
    """A micro-batch as the trainer's loader delivers it: latents (B, 1, 4, h, w), captions of 8-24 words padded to
    77 tokens, 10 boxes per image with 10 distinct phrases of 2-6 words each, padded to the longest (the worst
    case for ours: real batches repeat phrases, and ours encodes each once), SDXL's size conditioning. Also each
    image's own phrases padded to its own longest, as the reference recipe tokenizes them."""
    BOS, EOS, L = 49406, 49407, 77

    def ids(n_words):  # BOS, random words, EOS, padded with EOS as SD's tokenizer does
        return [BOS] + torch.randint(0, 49000, (n_words,), generator=g).tolist() + [EOS]

    def padded(rows, length):
        out, mask = torch.full((len(rows), length), EOS), torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        return out, mask

    sdxl, K, h = unet_name == "sdxl", 10, unet_cfg["sample_size"]
    pair = (lambda x: torch.stack([x, x], 1)) if sdxl else (lambda x: x)  # SDXL: ids (n, 2, L) for its two tokenizers
    phrases = [ids(int(torch.randint(2, 7, (1,), generator=g))) for _ in range(B * K)]
    phrase_ids, phrase_mask = padded(phrases, max(map(len, phrases)))
    xy = torch.rand(B, tg.N_SLOTS, 2, generator=g) * 0.6
    masks, slot_phrase = torch.zeros(B, tg.N_SLOTS), torch.zeros(B, tg.N_SLOTS, dtype=torch.long)
    masks[:, :K], slot_phrase[:, :K] = 1, torch.arange(B * K).view(B, K)
    batch = dict(latents=torch.randn(B, 1, 4, h, h, generator=g),
                 caption_ids=pair(padded([ids(int(torch.randint(8, 25, (1,), generator=g))) for _ in range(B)], L)[0]),
                 phrase_ids=pair(phrase_ids), phrase_mask=phrase_mask, slot_phrase=slot_phrase,
                 boxes=torch.cat([xy, xy + 0.3], -1), masks=masks,
                 time_ids=torch.tensor([[h * 8.0, h * 8, 0, 0, h * 8, h * 8]] * B))
    own = [padded(phrases[i * K:(i + 1) * K], max(map(len, phrases[i * K:(i + 1) * K]))) for i in range(B)]
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["per_image"] = [(pair(ids).to(device), mask.to(device)) for ids, mask in own]  # the reference's phrases
    batch["empty_ids"] = pair(padded([[BOS, EOS]], L)[0]).to(device)  # the dropped caption
    return batch


def recipe(name, unet_name, device, compile_=False):
    """(step, parts) for one recipe on a fresh random UNet and text encoder; step(batch, i) is one training step:
    text encoders, forward, backward and the optimizer update. parts: what the profile times on its own."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    base, scheduler = UNet2DConditionModel(**UNETS[unet_name]), DDPMScheduler()
    if name == "ours":  # train_gligen.py's own step: sd_loss and optimizer_step
        dtype = torch.bfloat16 if cuda else torch.float32  # the frozen base; the adapters stay fp32
        unet = tg.inject_gligen(base.to(device, dtype).requires_grad_(False))
        te = text_encoder(unet_name).to(device, dtype).requires_grad_(False)
        params = [p.requires_grad_(True) for p in tg.adapter_params(unet)]
        opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0, fused=True)
        model = torch.compile(unet) if compile_ else unet
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
        schedule = tg.noise_schedule(scheduler, unet_name, device)
        loss_fn = tg.sdxl_loss if unet_name == "sdxl" else tg.sd_loss  # the trainer's step, GLIGEN's recipe

        def loss(batch, i, model=model):
            g = tg.sample_generator(0, i, 0, device)
            return loss_fn(model, batch, g, te, schedule, batch["empty_ids"], tg.config, autocast)

        def step(batch, i):
            loss(batch, i).backward()
            tg.optimizer_step(opt, params, 1.0)

        def flops(batch):  # as the trainer counts them, on the eager UNet
            n = tg.count_flops(lambda: loss(batch, 0, unet).backward())
            opt.zero_grad(set_to_none=True)
            return n
        return step, dict(unet=unet, model=model, text_encoder=te, autocast=autocast, opt=opt, params=params,
                          flops=flops)
    # The reference: IGLIGEN's step (diffusers' example trains the same way). diffusers' gated UNet in fp32 under
    # fp16 autocast with a GradScaler and AdamW; the text encoder in fp16; each image's phrases encoded in a loop.
    unet = UNet2DConditionModel.from_config(base.config, attention_type="gated").to(device).requires_grad_(False)
    te = text_encoder(unet_name).to(device, torch.float16 if cuda else torch.float32).requires_grad_(False)
    params = [p.requires_grad_(True) for p in tg.adapter_params(unet)]
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else nullcontext()
    D, sdxl = unet.config.cross_attention_dim, unet_name == "sdxl"

    def step(batch, i):
        x0 = batch["latents"][:, 0].float()
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (x0.shape[0],), device=device)
        with torch.no_grad():
            encoded = te(batch["caption_ids"])
            dtype = torch.float16 if cuda else torch.float32
            feats = torch.zeros(x0.shape[0], tg.N_SLOTS, D, device=device, dtype=dtype)
            for b, (ids, mask) in enumerate(batch["per_image"]):
                feats[b, :ids.shape[0]] = te(ids, attention_mask=mask).pooler_output
        added = {"added_cond_kwargs": dict(text_embeds=encoded.text_embeds, time_ids=batch["time_ids"])} if sdxl else {}
        with autocast:
            pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=encoded.last_hidden_state,
                        cross_attention_kwargs={"gligen": dict(boxes=batch["boxes"], masks=batch["masks"],
                                                               positive_embeddings=feats)}, **added).sample
            loss = F.mse_loss(pred.float(), noise)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return step, dict(unet=unet, flops=lambda batch: tg.count_flops(lambda: step(batch, 0)))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn, device, n, warmup=2):
    """Mean seconds of fn() over n calls after warmup calls; the GPU's peak memory counts from the first timed call."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def profile(step, parts, batch, device, n):
    """Where our step's time goes. Shares by timing the parts alone: the text encoders (captions and phrases), the
    frozen base's forward and backward with the grounding off (backward to the latents, as the real step's backward
    runs through the base to the first fuser), the optimizer update; the fusers and position net are the rest. The
    attention share and the top ops by self time (device time on a GPU) from torch's profiler over n steps; on a GPU
    also the host synchronisations in one step (torch.cuda's sync debug mode)."""
    import warnings
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile

    names = ("unet", "model", "text_encoder", "autocast", "opt", "params")
    unet, model, te, autocast, opt, params = (parts[k] for k in names)
    cuda, sdxl = device.type == "cuda", isinstance(te, tg.SDXLTextEncoders)
    counter = iter(range(10**6))
    t_step = seconds_per_call(lambda: step(batch, next(counter)), device, n)

    def text():
        with torch.no_grad(), autocast:
            te(batch["caption_ids"])
            te(batch["phrase_ids"], attention_mask=batch["phrase_mask"])

    x = batch["latents"][:, 0].float().requires_grad_(True)
    t = torch.randint(0, 1000, (x.shape[0],), device=device)
    with torch.no_grad(), autocast:
        encoded = te(batch["caption_ids"])
    added = {"added_cond_kwargs": dict(text_embeds=encoded.text_embeds, time_ids=batch["time_ids"])} if sdxl else {}

    def base():
        with autocast:
            out = model(x, t, encoder_hidden_states=encoded.last_hidden_state, **added).sample
        out.float().square().mean().backward()

    def update():
        for p in params:
            p.grad = torch.zeros_like(p)
        tg.optimizer_step(opt, params, 1.0)

    t_text, t_base = seconds_per_call(text, device, n), seconds_per_call(base, device, n)
    t_update = seconds_per_call(update, device, n) - seconds_per_call(
        lambda: [setattr(p, "grad", torch.zeros_like(p)) for p in params], device, n)
    shares = dict(text_encoders=t_text / t_step, frozen_base=t_base / t_step, optimizer=t_update / t_step)
    shares["fusers_and_rest"] = 1 - sum(shares.values())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(n):
            step(batch, next(counter))
        sync(device)
    events = prof.key_averages()
    if cuda:  # the GPU's kernels, by device time
        ops = [e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
        self_time, total_time = (lambda e: e.self_device_time_total), (lambda e: e.device_time_total)
    else:  # the CPU's ops, by their own time (children excluded)
        ops, self_time, total_time = list(events), (lambda e: e.self_cpu_time_total), (lambda e: e.cpu_time_total)
    everything = max(sum(self_time(e) for e in ops), 1)
    # SDPA's implementations and their backwards (flash, memory-efficient, cuDNN, CPU), kernels included
    attention = sum(total_time(e) for e in events if e.key.startswith("aten::_scaled_dot_product_"))
    shares["attention"] = attention / everything
    top = sorted(ops, key=self_time, reverse=True)[:15]
    result = dict(step_ms=round(t_step * 1e3, 2), shares={k: round(v, 3) for k, v in shares.items()},
                  top_ops=[dict(name=e.key, self_ms_per_step=round(self_time(e) / 1e3 / n, 3),
                                share=round(self_time(e) / everything, 3), calls_per_step=e.count // n) for e in top])
    if cuda:  # every host synchronisation in a step that does not log is a stall: count them
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(batch, next(counter))
            sync(device)
        torch.cuda.set_sync_debug_mode("default")
        result["host_syncs_per_step"] = sum("synchroniz" in str(w.message) for w in caught)
    print(f"profile of our step, batch {batch['latents'].shape[0]}: {result['step_ms']} ms; shares "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result["shares"].items())
          + (f"; host syncs per step: {result['host_syncs_per_step']}" if cuda else ""))
    for e in result["top_ops"]:
        print(f"  {e['share'] * 100:5.1f}%  {e['self_ms_per_step']:9.3f} ms  x{e['calls_per_step']:<4d} "
              f"{e['name'][:90]}")
    return result


def train_benchmark(cfg):
    import diffusers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda, unet_name = device.type == "cuda", cfg["unet"].replace("-", "_")
    if unet_name not in UNETS:
        tg.fail(f"--unet={cfg['unet']!r}: one of {', '.join(UNETS)}")
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = next((v for k, v in tg.PEAK_BF16.items() if k in name), 0)
    print(f"{cfg['unet']} UNet, {UNETS[unet_name]['sample_size'] * 8} px; {name}; torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}, diffusers {diffusers.__version__}")
    results, g, profiled = [], torch.Generator().manual_seed(0), None
    for B in [int(b) for b in str(cfg["batch_sizes"]).split(",")]:
        row, batch = {}, step_batch(unet_name, UNETS[unet_name], B, device, g)
        one = step_batch(unet_name, UNETS[unet_name], 1, device, g)
        for rname in ("ours", "reference"):
            try:
                step, parts = recipe(rname, unet_name, device, cfg["compile"] and rname == "ours")
                flops = parts["flops"](one)  # per image: on one image, with SDPA's math kernel (tg.count_flops)
                i = iter(range(1, 10**9))  # step numbers: each step its own noise and timesteps
                ips = B / seconds_per_call(lambda: step(batch, next(i)), device, cfg["steps"], cfg["warmup"])
                model_flops = row["ours"]["flops"] if rname == "reference" and "flops" in row.get("ours", {}) else flops
                row[rname] = dict(img_per_s=round(ips, 2), tflop_per_image=float(f"{flops / 1e12:.5g}"), flops=flops,
                                  mfu=round(model_flops * ips / peak, 4) if peak else None,
                                  peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
                if cfg["profile"] and rname == "ours" and profiled is None:
                    profiled = dict(batch=B, **profile(step, parts, batch, device, max(2, min(cfg["steps"], 10))))
            except torch.OutOfMemoryError:
                row[rname] = dict(img_per_s=None, error="out of memory")
            step = parts = None
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
                                                diffusers=diffusers.__version__, results=results, profile=profiled),
                                           indent=1))
    return results, profiled


def check_settings(cfg):
    """Stop on a setting that cannot work, before anything is built."""
    if cfg["what"] not in ("loader", "train"):
        tg.fail(f"--what={cfg['what']!r}: loader or train")
    if not all(b.strip().isdigit() and int(b) > 0 for b in cfg["batch_sizes"].split(",")):
        tg.fail(f"--batch_sizes={cfg['batch_sizes']}: positive integers separated by commas")
    tg.in_range(cfg, "steps resolution batch images", 1)
    tg.in_range(cfg, "workers warmup seconds", 0)
    if cfg["resolution"] % 8:
        tg.fail(f"--resolution={cfg['resolution']}: must be a multiple of 8")
    if cfg["images"] < cfg["batch"]:
        tg.fail(f"--images={cfg['images']}: fewer than one --batch ({cfg['batch']})")


if __name__ == "__main__":
    cfg = tg.configure(config, sys.argv[1:], __doc__)
    check_settings(cfg)
    loader_benchmark(cfg) if cfg["what"] == "loader" else train_benchmark(cfg)
