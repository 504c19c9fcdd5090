"""
Train GLIGEN grounding adapters on a frozen Stable Diffusion 1.x/2.x UNet.

GLIGEN (Li et al., CVPR 2023) adds one gated self-attention layer ("fuser") to every transformer block of a
frozen text-to-image UNet, fed by 30 grounding tokens made from each box (Fourier code) and its phrase (text
encoder feature). Only the fusers and the position net train; the UNet and text encoder stay frozen. The method,
model loading and sampling are in gligen.py; this file is the training: config, data, the step, checkpoints, the loop.

One process (CPU or one GPU):
    python train_gligen.py --model=stable-diffusion-v1-5/stable-diffusion-v1-5 --latents=data/coco/latents \
        --boxes=data/coco/boxes.jsonl --out_dir=out/coco
One node, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train_gligen.py --model=... --latents=... --boxes=...
Several nodes (the same command on each, node_rank = 0, 1, ...):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \
        train_gligen.py --model=... --latents=... --boxes=...

Settings are the `config` values below; override any with --key=value (Python literals). Run the same command
again and it resumes from the latest checkpoint in out_dir.
"""
import ast
import json
import os
import re
import resource
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer runs in forked loader workers
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from gligen import (N_SLOTS, SDXLTextEncoders, adapter_state, check_layout, checkpoints, draw_layout, fail,
                    forward_process, generate, grounding, inject_gligen, is_adapter, is_video, latest_good_checkpoint,
                    layout_tensors, load_adapters, load_base, set_adapters, sha256, tokenize)

# -----------------------------------------------------------------------------------------------------------------
# Config: the GLIGEN recipe. Every value can be overridden with --key=value.
VAL_LAYOUTS = [  # fixed validation layouts: boxes are x0, y0, x1, y1 relative to the image
    dict(prompt="a dog and a cat sitting on a sofa", phrases=["a dog", "a cat"],
         boxes=[[0.05, 0.35, 0.45, 0.9], [0.55, 0.3, 0.95, 0.9]]),
    dict(prompt="a red car parked beside a tree", phrases=["a red car", "a tree"],
         boxes=[[0.05, 0.5, 0.6, 0.9], [0.65, 0.05, 0.95, 0.9]]),
    dict(prompt="a hot air balloon over a lake", phrases=["a hot air balloon", "a lake"],
         boxes=[[0.55, 0.05, 0.9, 0.45], [0.0, 0.6, 1.0, 1.0]]),
]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12}  # dense TFLOP/s per GPU
config = dict(
    model="stable-diffusion-v1-5/stable-diffusion-v1-5",  # base model: Hub id or local diffusers directory
    latents="data/latents",  # directory written by prep_latents.py
    boxes="data/boxes.jsonl",  # file written by prep_boxes.py: phrases and boxes per image
    out_dir="out",  # checkpoints, log.jsonl and validation grids; a run started again resumes from here
    init_from="",  # "" fresh adapters, else adapters to fine-tune: a checkpoint, or a diffusers GLIGEN model
    global_batch=32,  # images per optimizer step = micro_batch * grad_accum * world_size
    micro_batch=8,  # images per forward pass on one GPU
    max_steps=500_000,  # optimizer steps
    lr=5e-5,  # AdamW
    weight_decay=0.0,  # AdamW's decoupled weight decay
    warmup_steps=1000,  # linear warmup, then constant
    grad_clip=1.0,  # clip the adapters' gradient norm to this
    max_bad_steps=20,  # steps with a NaN/Inf loss or gradient are skipped; this many in a row stop the run
    caption_keep=0.5,  # probability that a sample keeps its caption (else the empty caption)
    grounding_drop=0.1,  # probability that a sample gets null grounding (all slots empty)
    max_boxes=30,  # boxes per image, largest first (at most 30, the number of grounding slots)
    min_box_area=0.01,  # boxes under this fraction of the training crop are dropped
    flip=True,  # mirror half the samples, boxes too, where prep_latents.py stored flipped latents (--flip=True)
    seed=0,  # adapter init, data order, noise, timesteps and drops all follow from it
    dtype="auto",  # "auto": bf16 autocast with a bf16 frozen base on CUDA, fp32 on CPU; or "fp32"
    grad_checkpointing=False,  # recompute the UNet's activations in the backward pass: less memory (SDXL), slower
    compile="",  # torch.compile backend for the UNet's training step: "" off, "inductor" (compiles for minutes first)
    num_workers=4,  # data loader processes per GPU
    log_every=20,  # log line (step, loss, lr, images/s, peak memory), also appended to out_dir/log.jsonl
    save_every=2000,  # checkpoint every N steps, and at the end
    keep_last=2,  # checkpoints kept in out_dir (the newest that verify)
    val_every=2000,  # validation grid every N steps (and at the start of a fresh run); 0 = never
    val_steps=25,  # DDIM steps for the validation grid
    val_layouts="",  # JSONL file of {prompt, phrases, boxes} for the validation grid; "" = VAL_LAYOUTS above
)


def configure(defaults, argv, doc=""):
    """Override a script's defaults with --key=value arguments; values are Python literals, strings may be bare."""
    cfg = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):  # the docstring, then each setting with its default and its comment
            notes = dict(re.findall(r"^ {4}(\w+)=.*?# (.*)$", Path(sys.argv[0]).read_text(), re.M))
            print(doc + "\nSettings:\n" + "\n".join(f"  --{k}={v!r}  {notes.get(k, '')}" for k, v in cfg.items()))
            raise SystemExit(0)
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in cfg:
            fail(f"unknown argument {arg!r}; settings are: {', '.join(cfg)}")
        if isinstance(cfg[key], str):
            cfg[key] = value
            continue
        try:
            v = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            fail(f"--{key}={value}: not a Python literal")
        want = type(cfg[key])
        if not (isinstance(v, want) or (want is float and isinstance(v, int))):
            fail(f"--{key}={value}: expected {want.__name__}")
        cfg[key] = float(v) if want is float else v
    return cfg


# -----------------------------------------------------------------------------------------------------------------
# Data: latents from prep_latents.py joined with phrases and boxes from prep_boxes.py.
def read_jsonl(path):
    """(line number, record) for each line of a JSONL file; a bad line stops with the file and line named."""
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    fail(f"{path}:{i}: not valid JSON ({e})")


class GroundedLatents(torch.utils.data.Dataset):
    """Item (i, flip): image i's latent (stats, 4, h, w) (stats: mean, or mean and std), caption, and up to max_boxes
    (phrase, box) in its training crop, all mirrored if flip. Boxes are stored relative to the original image; they
    go through the crop that prep_latents.py took, are clipped to it, dropped under min_box_area of it, and kept
    largest first. Shards are memmapped: a sample reads only its own rows, from any shard."""

    def __init__(self, latents_dir, boxes_path, max_boxes=N_SLOTS, min_box_area=0.01):
        self.dir = Path(latents_dir)
        for f, script in ((self.dir / "meta.json", "prep_latents"), (self.dir / "index.jsonl", "prep_latents"),
                          (Path(boxes_path), "prep_boxes")):
            if not f.is_file():
                fail(f"data file not found: {f} (write it with {script}.py)")
        meta = json.loads((self.dir / "meta.json").read_text())
        self.resolution, self.has_flipped = meta["resolution"], "flipped" in meta["views"]
        layouts = {}
        for line, rec in read_jsonl(boxes_path):
            where = f"{boxes_path}:{line} (image {rec.get('image')!r})"
            if not all(k in rec for k in ("image", "width", "height", "phrases", "boxes")):
                fail(f"{where}: a record needs image, width, height, phrases and boxes")
            check_layout(rec["phrases"], rec["boxes"], where)
            layouts[rec["image"]] = (where, rec)
        self.items, missing = [], []
        for line, rec in read_jsonl(self.dir / "index.jsonl"):
            if rec["key"] not in layouts:
                missing.append(rec["key"])
                continue
            where, lay = layouts[rec["key"]]
            if (lay["width"], lay["height"]) != (rec["width"], rec["height"]):
                fail(f"{where}: image size {lay['width']}x{lay['height']} does not match "
                     f"{rec['width']}x{rec['height']} in {self.dir / 'index.jsonl'}:{line}: latents and boxes are "
                     f"of different images")
            phrases, boxes = self.crop_layout(lay, rec["crop"], max_boxes, min_box_area)
            self.items.append((rec["shard"], rec["row"], rec["caption"], phrases, boxes,
                               self.time_ids(rec, self.resolution)))
        if missing:
            fail(f"{boxes_path} has no record for {len(missing)} of the images in {self.dir / 'index.jsonl'} "
                 f"(e.g. {missing[:3]}): were both made from the same images?")
        self.shards = {}

    @staticmethod
    def time_ids(rec, R):
        """SDXL's size conditioning: original (height, width), the crop's top-left in the image resized to the crop
        side R, the target (R, R); and the crop's left for the mirrored image."""
        x0, y0, x1, _ = rec["crop"]
        scale = R / (x1 - x0)
        top, left, width = round(y0 * scale), round(x0 * scale), round(rec["width"] * scale)
        return (rec["height"], rec["width"], top, left, R, R), width - left - R

    @staticmethod
    def crop_layout(lay, crop, max_boxes, min_box_area):
        cx0, cy0, cx1, cy1 = crop  # in original pixels
        W, H, side = lay["width"], lay["height"], cx1 - cx0  # the crop is square
        b = np.asarray(lay["boxes"], dtype=np.float64).reshape(-1, 4) * [W, H, W, H]  # to pixels
        b = ((b - [cx0, cy0, cx0, cy0]) / side).clip(0, 1)  # to the crop, clipped to it
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        keep = [i for i in np.argsort(-area, kind="stable") if area[i] >= min_box_area][:max_boxes]
        return [lay["phrases"][i] for i in keep], b[keep].astype(np.float32)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, item):
        i, flip = item
        shard, row, caption, phrases, boxes, (time_ids, flipped_left) = self.items[i]
        if shard not in self.shards:  # memmapped, opened once per worker process
            self.shards[shard] = np.load(self.dir / shard, mmap_mode="r")
        if flip:
            boxes = np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1)
            time_ids = (*time_ids[:3], flipped_left, *time_ids[4:])
        latent = torch.from_numpy(np.array(self.shards[shard][row, int(flip)]))  # view 1: the mirrored image
        return latent, caption, phrases, boxes, time_ids


def collate(tokenizer, items):
    """Items -> a micro-batch of tensors. Strings are tokenized here, in the loader workers, not in the loop."""
    latents, captions, phrases, boxes, time_ids = zip(*items)
    ids, mask, slot_phrase, boxes, masks = layout_tensors(tokenizer, list(zip(phrases, boxes)))
    return dict(latents=torch.stack(latents), caption_ids=tokenize(tokenizer, list(captions))[0], phrase_ids=ids,
                phrase_mask=mask, slot_phrase=slot_phrase, boxes=boxes, masks=masks,
                time_ids=torch.tensor(time_ids, dtype=torch.float32))  # one call for the batch: cheaper than per item


def rank_batches(n, global_batch, micro_batch, world, rank, seed, start_step, flip=False):
    """This rank's micro-batches [(dataset index, flip)], step after step from start_step. Each epoch is a new
    permutation (and, with flip, a coin per sample) seeded by (seed, epoch), the same on all ranks; the global batch
    of a step is split into micro-batches ordered by (micro-step, rank), and this rank takes its own, so every rank
    sees different samples. Starting at any step needs no replay: the position follows from the step."""
    accum, per_epoch = global_batch // (micro_batch * world), n // global_batch
    step, perm_epoch = start_step, -1
    while True:
        epoch, b = divmod(step, per_epoch)
        if epoch != perm_epoch:
            g = torch.Generator().manual_seed(seed + epoch)
            perm, coins, perm_epoch = torch.randperm(n, generator=g), torch.randint(0, 2, (n,), generator=g), epoch
        for micro in range(accum):
            s = b * global_batch + (micro * world + rank) * micro_batch
            yield [(i, flip and bool(coins[i])) for i in perm[s:s + micro_batch].tolist()]
        step += 1


def sample_generator(seed, step, slot, device):
    """The random stream of one micro-batch, keyed by (seed, step, its first slot in the global batch): a resumed run
    and a run on any number of GPUs draw the same noise, timesteps and drops for the same sample."""
    g = torch.Generator(device)
    return g.manual_seed(int(np.random.SeedSequence([seed, step, slot]).generate_state(1)[0]))


# -----------------------------------------------------------------------------------------------------------------
# The training step: the loss of one micro-batch, and the update. benchmark.py times these same two functions.
def micro_step_loss(model, batch, g, text_encoder, alphas_cumprod, empty_ids, cfg, autocast=nullcontext(), video=False):
    """The GLIGEN loss of one micro-batch: caption and grounding drops, noise and timestep from the generator g; the
    frozen text encoder on captions and phrases; the UNet (model: possibly DDP-wrapped or compiled)."""
    device, T = alphas_cumprod.device, alphas_cumprod.shape[0]
    x0 = batch["latents"][:, 0].float()  # the VAE mean
    b = x0.shape[0]
    keep_caption = torch.rand(b, generator=g, device=device) < cfg["caption_keep"]
    keep_grounding = torch.rand(b, generator=g, device=device) >= cfg["grounding_drop"]
    noise = torch.randn(x0.shape, generator=g, device=device)
    t = torch.randint(0, T, (b,), generator=g, device=device)
    if batch["latents"].shape[1] == 2:  # the std was stored: a fresh sample of the VAE's latent
        x0 = x0 + batch["latents"][:, 1].float() * torch.randn(x0.shape, generator=g, device=device)
    if video:  # a video UNet trains on images as one-frame clips (b, 4, 1, h, w)
        x0, noise = x0[:, :, None], noise[:, :, None]
    xt, target = forward_process(alphas_cumprod, x0, noise, t, cfg["prediction_type"])
    with torch.no_grad(), autocast:
        keep = keep_caption.view(-1, *[1] * (empty_ids.dim() - 1))
        encoded = text_encoder(torch.where(keep, batch["caption_ids"], empty_ids))
        text = encoded.last_hidden_state  # (b, 77, D)
        added = {}  # SDXL: its pooled text and size conditioning
        if isinstance(text_encoder, SDXLTextEncoders):
            added = {"added_cond_kwargs": dict(text_embeds=encoded.text_embeds, time_ids=batch["time_ids"])}
        masks = batch["masks"] * keep_grounding[:, None]  # dropped grounding: every slot null
        gligen = grounding(text_encoder, batch["phrase_ids"], batch["phrase_mask"], batch["slot_phrase"],
                           batch["boxes"], masks)
    with autocast:
        pred = model(xt, t, encoder_hidden_states=text, cross_attention_kwargs={"gligen": gligen}, **added).sample
    return F.mse_loss(pred.float(), target)


def count_flops(fn):
    """The model FLOPs of fn() (a forward and backward pass), by torch's flop counter, with SDPA's math kernel: the
    flash kernels' backward recomputes the attention matrix, which the counter counts too (4% more on an SD1.5 step);
    model-FLOPs utilisation counts the work the model needs, without recomputation. Math attention holds whole
    attention matrices: count on one image."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def optimizer_step(opt, params, grad_clip):
    """Clip the adapters' gradient and step fused AdamW, which skips the whole update on the device when the gradient
    norm is not finite (NaN or Inf on any rank, as torch's GradScaler uses found_inf): no host sync, no poison.
    Returns whether the step was taken, as a 0-dim bool tensor on the device."""
    ok = torch.isfinite(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    opt.found_inf = (~ok).float()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return ok


# -----------------------------------------------------------------------------------------------------------------
# Checkpoints: out_dir/step_0002000/ holds adapters.safetensors, state.pt (optimizer, step, config, data position)
# and manifest.json (each file's size and sha256, written last). It is written as step_0002000.tmp and renamed when
# whole, so a kill while saving leaves the previous checkpoint the latest; one whose files do not match their
# manifest (truncated, corrupted) is set aside, and the run resumes from the one before.
def save_checkpoint(out_dir, step, unet, opt, cfg, data):
    """Write out_dir/step_<step>. Returns None, or what went wrong (a full disk, say); the previous checkpoint is
    then intact."""
    final = Path(out_dir) / f"step_{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    adapters = {k: v.detach().float().cpu().contiguous() for k, v in adapter_state(unet).items()}
    if not all(torch.isfinite(v).all() for v in adapters.values()):
        return f"the adapters hold NaN or Inf at step {step}: not saved"  # never let poisoned weights be resumed
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = {"format": "gligen-adapters", "config": json.dumps(cfg)}
        save_file(adapters, tmp / "adapters.safetensors", metadata=meta)
        torch.save({"step": step, "optimizer": opt.state_dict(), "config": cfg, "data": data}, tmp / "state.pt")
        manifest = {}
        for f in sorted(tmp.iterdir()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            manifest[f.name] = dict(bytes=f.stat().st_size, sha256=sha256(f))
        with open(tmp / "manifest.json", "w") as fh:
            json.dump(manifest, fh)
            fh.flush()
            os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        dir_fd = os.open(out_dir, os.O_RDONLY)  # make the rename itself durable
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = checkpoints(out_dir)
        free = shutil.disk_usage(out_dir).free / 2**30
        return (f"could not write checkpoint {final}: {e.strerror or e} ({free:.1f} GB free). "
                + (f"The previous checkpoint {prev[-1]} is intact" if prev else "There is no earlier checkpoint")
                + ": make room, then run the same command to resume.")
    for old in checkpoints(out_dir)[:-cfg["keep_last"]] + list(Path(out_dir).glob("step_*.tmp")):
        shutil.rmtree(old)  # older checkpoints, and saves cut off by a kill
    return None


# -----------------------------------------------------------------------------------------------------------------
def ignore_stop_signals(worker_id):
    """Loader workers leave SIGTERM and SIGUSR1 to the main process, which saves, then stops them."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def main(cfg):
    # Setup: DDP when torchrun sets RANK, else one process; precision.
    ddp, cuda = "RANK" in os.environ, torch.cuda.is_available()
    if ddp:
        # After a worker dies, torchrun --max-restarts starts new workers on the same store: keys prefixed by the
        # attempt keep them from reading the dead group's addresses (a refused connection, or a hang, otherwise).
        store, rank, world = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world)
        local_rank = int(os.environ["LOCAL_RANK"])
        device = f"cuda:{local_rank}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(device)
        cpu_group = dist.new_group(backend="gloo") if cuda else dist.group.WORLD  # small votes that skip the GPU
    else:
        rank, world, device = 0, 1, "cuda" if cuda else "cpu"
    master, G, B, out = rank == 0, cfg["global_batch"], cfg["micro_batch"], Path(cfg["out_dir"])
    if G % (B * world):
        fail(f"global_batch {G} is not a multiple of micro_batch {B} x world size {world}")
    if cfg["dtype"] not in ("auto", "bf16", "fp32"):
        fail(f"dtype must be auto, bf16 or fp32, not {cfg['dtype']!r}")
    if not 1 <= cfg["max_boxes"] <= N_SLOTS:
        fail(f"max_boxes must be 1..{N_SLOTS}, not {cfg['max_boxes']}")
    accum = G // (B * world)
    bf16 = cfg["dtype"] == "bf16" or (cfg["dtype"] == "auto" and cuda)
    base_dtype = torch.bfloat16 if bf16 else torch.float32  # the frozen base; adapters stay fp32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # Preemption: SIGTERM (SLURM, torchrun) and SIGUSR1 (SLURM's warning) ask to save and stop at a step boundary.
    signals = []
    old_handlers = {sig: signal.signal(sig, lambda num, frame: signals.append(signal.Signals(num).name))
                    for sig in (signal.SIGTERM, signal.SIGUSR1)}

    # Model: the frozen base (bf16 on CUDA) + adapters (fp32): resumed, from init_from, or fresh.
    unet, text_encoder, tokenizer, noise_scheduler = load_base(cfg["model"], device, base_dtype)
    video = is_video(unet)
    torch.manual_seed(cfg["seed"])  # fresh adapters are the same for any number of processes
    inject_gligen(unet)
    resume = [latest_good_checkpoint(out, set_aside=True) if master else None]
    if ddp:
        dist.broadcast_object_list(resume, src=0, group=cpu_group)
    resume, step = resume[0], 0
    data = GroundedLatents(cfg["latents"], cfg["boxes"], cfg["max_boxes"], cfg["min_box_area"])
    n = len(data)
    if n < G:
        fail(f"{cfg['latents']} has {n} usable images, fewer than one global batch ({G})")
    cfg = {**cfg, "world_size": world, "grad_accum": accum, "resolution": data.resolution, "images": n,
           "prediction_type": noise_scheduler.config.prediction_type}
    if cfg["prediction_type"] not in ("epsilon", "v_prediction"):
        fail(f"{cfg['model']}: prediction_type {cfg['prediction_type']!r} is not supported (epsilon or v_prediction)")
    if resume:
        state = torch.load(resume / "state.pt", map_location="cpu", weights_only=True)
        for key in ("model", "resolution", "global_batch", "images"):  # what a checkpoint cannot carry over
            if state["config"][key] != cfg[key]:
                fail(f"{resume} was trained with {key}={state['config'][key]!r}, this run has {key}={cfg[key]!r}. "
                     f"Run with the same {key}, or start a new out_dir with --init_from={resume}")
        set_adapters(unet, load_file(resume / "adapters.safetensors"), resume)  # checks all, then loads
        step = state["step"]
    elif cfg["init_from"]:
        set_adapters(unet, load_adapters(cfg["init_from"]), cfg["init_from"])
    params = [p.requires_grad_(True) for name, p in unet.named_parameters() if is_adapter(name)]
    if cfg["grad_checkpointing"]:  # diffusers checkpoints each resnet and transformer block, fusers included
        unet.enable_gradient_checkpointing()
        unet.train()  # older diffusers checkpoint in training mode only; SD has no dropout, so nothing else changes
    model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[local_rank] if cuda else None) if ddp else unet
    step_model = torch.compile(model, backend=cfg["compile"]) if cfg["compile"] else model  # flags stay on model
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=True)
    if resume:
        opt.load_state_dict(state["optimizer"])
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)  # (T,): the forward process's a_t
    empty_ids = tokenize(tokenizer, [""])[0].to(device)  # the dropped caption
    # Data: each rank loads its own micro-batches from the data position that the step implies.
    loader = iter(torch.utils.data.DataLoader(
        data, batch_sampler=rank_batches(n, G, B, world, rank, cfg["seed"], step, cfg["flip"] and data.has_flipped),
        num_workers=cfg["num_workers"],
        collate_fn=partial(collate, tokenizer), pin_memory=cuda, worker_init_fn=ignore_stop_signals))

    # Logging and validation, on rank 0.
    out.mkdir(parents=True, exist_ok=True)
    layouts = [r for _, r in read_jsonl(cfg["val_layouts"])] if cfg["val_layouts"] else VAL_LAYOUTS
    for i, l in enumerate(layouts):
        check_layout(l["phrases"], l["boxes"], f"{cfg['val_layouts'] or 'VAL_LAYOUTS'}[{i}]")
    if master:
        import diffusers
        import transformers

        gpu = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if cuda else "CPU"
        print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
              f"transformers {transformers.__version__}, {gpu}")
        print(json.dumps(cfg))
        print(f"{n} images; {world} processes x {accum} micro-steps x {B} = {G} per step; "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters; "
              + (f"resuming from {resume}" if resume else f"adapters from {cfg['init_from'] or 'a fresh init'}"))
        if (out / "log.jsonl").exists():  # steps logged after the checkpoint we resume from run again: drop them
            kept = [json.dumps(r) + "\n" for _, r in read_jsonl(out / "log.jsonl") if r["step"] <= step]
            (out / "log.jsonl").write_text("".join(kept))
        if cfg["val_every"]:
            from diffusers import AutoencoderKL, DDIMScheduler

            vae = AutoencoderKL.from_pretrained(cfg["model"], subfolder="vae", torch_dtype=base_dtype).to(device)
            val_scheduler = DDIMScheduler.from_pretrained(cfg["model"], subfolder="scheduler")

    def validate():  # a row of images from fixed layouts and seed, with the boxes drawn on
        images = []
        for l in layouts:
            with autocast:
                im = generate(unet, vae, text_encoder, tokenizer, val_scheduler, l["prompt"], l["phrases"], l["boxes"],
                              seed=cfg["seed"], steps=cfg["val_steps"], frames=1)[0]
            im = im[0] if video else im  # a video model's one-frame clip
            images.append(draw_layout(Image.fromarray(im), l["phrases"], l["boxes"]))
        grid = Image.new("RGB", (sum(im.width for im in images), images[0].height))
        for k, im in enumerate(images):
            grid.paste(im, (k * im.width, 0))
        grid.save(out / f"val_{step:07d}.png")

    if master and cfg["val_every"] and step == 0:
        validate()  # the base model, before training: what the adapters start from
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=not master, dynamic_ncols=True)
    zero = torch.zeros((), device=device)
    loss_sum, n_good, bad_run, worst_run = zero.clone(), zero.clone(), zero.clone(), zero.clone()
    n_logged, t0, vote, vote_work = 0, time.perf_counter(), None, None

    loss_of = partial(micro_step_loss, text_encoder=text_encoder, alphas_cumprod=alphas_cumprod, empty_ids=empty_ids,
                      cfg=cfg, autocast=autocast, video=video)  # loss_of(model, batch, generator)
    # FLOPs of one step per image, for the MFU in the log: counted once, on one image, in a pass of its own (a dispatch
    # mode may pick other kernels: the counted pass must not be a training step)
    probe = {k: v.to(device) for k, v in collate(tokenizer, [data[(0, False)]]).items()}
    flops_per_image = count_flops(lambda: loss_of(unet, probe, torch.Generator(device).manual_seed(0)).backward())
    opt.zero_grad(set_to_none=True)
    peak = next((v for k, v in PEAK_BF16.items() if cuda and k in torch.cuda.get_device_name()), 0)
    if master:
        bar.write(f"one step: {flops_per_image / 1e12:.4g} TFLOP per image (model FLOPs, torch flop counter)"
                  + (f"; {peak / 1e12:.0f} TFLOP/s bf16 peak per GPU" if peak else ""))

    while step < cfg["max_steps"]:
        lr = cfg["lr"] * min(1.0, (step + 1) / max(1, cfg["warmup_steps"]))
        for group in opt.param_groups:
            group["lr"] = lr
        step_loss = zero.clone()
        for micro in range(accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
            g = sample_generator(cfg["seed"], step, (micro * world + rank) * B, device)
            if ddp:
                model.require_backward_grad_sync = micro == accum - 1  # all-reduce on the last micro-step only
            loss = loss_of(step_model, batch, g) / accum
            loss.backward()
            step_loss += loss.detach()
        # A NaN or Inf loss or gradient on any rank makes the all-reduced gradient norm non-finite: the step is skipped.
        ok = optimizer_step(opt, params, cfg["grad_clip"])
        loss_sum += torch.where(ok, step_loss, zero)
        n_good += ok
        bad_run = (bad_run + 1) * ~ok
        worst_run = torch.maximum(worst_run, bad_run)
        step, n_logged = step + 1, n_logged + 1
        bar.update()
        # Preemption: every rank must stop at the same step. A vote on the CPU group, started here and read at the
        # next step, agrees on it without waiting for the GPU.
        stop = bool(signals)
        if ddp:
            if vote_work is not None:
                vote_work.wait()
            stop, vote = vote is not None and vote.item() > 0, torch.tensor([float(bool(signals))])
            vote_work = dist.all_reduce(vote, group=cpu_group, async_op=True)

        last = step == cfg["max_steps"]
        if step % cfg["log_every"] == 0 or last or stop:
            if ddp:
                dist.all_reduce(loss_sum)
            good = int(n_good.item())  # .item() waits for the GPU, so the clock below is right
            loss = loss_sum.item() / world / max(good, 1)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak, in KiB on Linux
            mem = torch.cuda.max_memory_allocated() if cuda else rss
            speed = n_logged * G / (time.perf_counter() - t0)
            rec = dict(step=step, loss=round(loss, 6), lr=lr, img_per_s=round(speed, 2), mem_gb=round(mem / 2**30, 2),
                       skipped=n_logged - good, tflop_per_image=round(flops_per_image / 1e12, 6))
            if peak:  # model-FLOPs utilisation: the counted FLOPs at this speed over the GPUs' bf16 peak
                rec["mfu"] = round(flops_per_image * speed / world / peak, 4)
            if master:
                skipped = f" | skipped {rec['skipped']} (NaN/Inf)" if rec["skipped"] else ""
                mfu = f" | MFU {100 * rec['mfu']:.1f}%" if peak else ""
                bar.write(f"step {step} | loss {loss:.4f} | lr {lr:.2e} | {rec['img_per_s']:.1f} img/s{mfu} | peak mem "
                          f"{rec['mem_gb']:.2f} GB{skipped}")
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if worst_run.item() >= cfg["max_bad_steps"]:
                fail(f"{int(worst_run.item())} steps in a row had a NaN or Inf loss or gradient (by step {step}): "
                     f"stopping. Skipped steps leave the adapters untouched, so nothing poisoned was saved; look for "
                     f"bad latents in {cfg['latents']}, or lower lr")
            loss_sum.zero_(), n_good.zero_(), worst_run.zero_()
            n_logged, t0 = 0, time.perf_counter()
        t_io = time.perf_counter()
        if step % cfg["save_every"] == 0 or last or stop:
            position = dict(epoch=step // (n // G), batch_in_epoch=step % (n // G))  # where the data resumes
            error = [save_checkpoint(out, step, unet, opt, cfg, position) if master else None]
            if ddp:
                dist.broadcast_object_list(error, src=0, group=cpu_group)  # and no rank runs ahead of a checkpoint
            if error[0]:
                fail(error[0])
        if master and cfg["val_every"] and step % cfg["val_every"] == 0:
            validate()
        t0 += time.perf_counter() - t_io  # checkpoints and validation do not count against images/s
        if stop:
            bar.write(f"rank {rank}: {', '.join(signals) or 'another rank got a signal'}: stopped at step {step}, "
                      f"saved {out / f'step_{step:07d}'}; run the same command to resume")
            break
    bar.close()
    if vote_work is not None:
        vote_work.wait()
    for sig, handler in old_handlers.items():
        signal.signal(sig, handler)
    if ddp:
        dist.destroy_process_group()
    return unet, text_encoder


if __name__ == "__main__":
    main(configure(config, sys.argv[1:], __doc__))
    if "RANK" in os.environ:
        # DDP keeps its process group alive after destroy_process_group (a torch leak), so gloo's threads would be
        # torn down by C++ exit handlers, which now and then abort a finished run (SIGABRT, "terminate called without
        # an active exception"): everything is saved and closed, so leave without them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
