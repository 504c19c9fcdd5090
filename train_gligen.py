"""
Train GLIGEN grounding adapters on a frozen SD1.x/2.x, SDXL, ModelScope video, SD3/SD3.5 or Flux.1 model; also
GLIGEN's text-image (--image_features) and inpainting (--inpaint=True) modes. SD1.x/2.x text-box training reads top
to bottom; each other family or mode is a section after main that replaces whole stages (STAGES).

One process (CPU or one GPU):
    python train_gligen.py --model=stable-diffusion-v1-5/stable-diffusion-v1-5 --latents=data/coco/latents \
        --boxes=data/coco/boxes.jsonl --out_dir=out/coco
One node, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 train_gligen.py --model=... --latents=... --boxes=...
Several nodes (the same command on each, node_rank = 0, 1, ...):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \
        train_gligen.py --model=... --latents=... --boxes=...

Override any `config` value with --key=value. The same command again resumes from out_dir.
"""
import ast
import copy
import difflib
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import re
import resource
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer runs in forked loader workers
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

# -----------------------------------------------------------------------------------------------------------------
# Config: the GLIGEN recipe. Override any value with --key=value.
VAL_LAYOUTS = [  # boxes: x0, y0, x1, y1 relative to the image
    dict(prompt="a dog and a cat sitting on a sofa", phrases=["a dog", "a cat"],
         boxes=[[0.05, 0.35, 0.45, 0.9], [0.55, 0.3, 0.95, 0.9]]),
    dict(prompt="a red car parked beside a tree", phrases=["a red car", "a tree"],
         boxes=[[0.05, 0.5, 0.6, 0.9], [0.65, 0.05, 0.95, 0.9]]),
    dict(prompt="a hot air balloon over a lake", phrases=["a hot air balloon", "a lake"],
         boxes=[[0.55, 0.05, 0.9, 0.45], [0.0, 0.6, 1.0, 1.0]]),
]
config = dict(
    model="stable-diffusion-v1-5/stable-diffusion-v1-5",  # base model: Hub id or local diffusers directory
    latents="data/latents",  # directory written by prep_latents.py
    boxes="data/boxes.jsonl",  # file written by prep_boxes.py: phrases and boxes per image
    out_dir="out",  # checkpoints, log.jsonl, validation grids; a run started again resumes here
    init_from="",  # "": fresh; else a checkpoint or diffusers GLIGEN model to fine-tune
    global_batch=32,  # images per optimizer step
    micro_batch=8,  # the most images one GPU takes per forward pass (fewer where the batch plan needs)
    max_steps=500_000,  # optimizer steps
    lr=5e-5,  # AdamW
    weight_decay=0.0,  # AdamW's decoupled weight decay
    warmup_steps=1000,  # linear warmup, then constant
    grad_clip=1.0,  # clip the adapters' gradient norm to this
    max_bad_steps=20,  # NaN/Inf steps are skipped; this many in a row stop
    caption_keep=0.5,  # probability that a sample keeps its caption
    grounding_drop=0.1,  # probability that a sample gets null grounding
    max_boxes=30,  # boxes per image, largest first (at most 30)
    min_box_area=0.01,  # boxes under this share of the crop are dropped
    flip=True,  # mirror half the samples where prep_latents.py stored flipped latents
    seed=0,  # init, data order, noise, timesteps and drops follow from it
    dtype="auto",  # bf16: bf16 base, fp32 adapters, bf16 autocast; fp32; auto: bf16 on CUDA
    inpaint=False,  # GLIGEN's inpainting mode: the UNet also sees the image outside the boxes
    image_features="",  # GLIGEN's text-image mode: prep_latents.py --image_encoder's output
    keypoints=False,  # GLIGEN's keypoint mode: the boxes file's persons' keypoints ground, not phrases
    maps="",  # GLIGEN's spatial-map mode: prep_latents.py --map's output (depth, edges, your own maps)
    map_encoder="facebook/convnext-tiny-224",  # the spatial-map mode's token net to start from (a ConvNeXt)
    grad_checkpointing=False,  # recompute activations in backward: less memory, slower
    compile="",  # torch.compile backend for the step: "" off, or e.g. inductor
    shard=False,  # FSDP2 under torchrun: adapters, gradients and AdamW state sharded across the GPUs (not DDP)
    shard_base=False,  # with --shard: the frozen denoiser blocks and T5 sharded too
    num_workers=4,  # data loader processes per GPU
    log_every=20,  # log line every N steps, also in out_dir/log.jsonl
    save_every=2000,  # checkpoint every N steps, and at the end
    keep_last=2,  # checkpoints kept (the newest that verify)
    val_every=2000,  # grid and box-use losses every N steps, at start and end; 0 = never
    val_steps=25,  # DDIM steps for the validation grid
    val_layouts="",  # JSONL of {prompt, phrases, boxes}; "" = VAL_LAYOUTS
    val_images=64,  # images whose loss is logged with true, mirrored, no boxes
    # Levers that may make boxes count sooner (docs/time-to-grounding.md); the defaults are GLIGEN's.
    timestep_power=1.0,  # timesteps t = (1 - u^p) T, u uniform: 1 uniform (GLIGEN), 3 cubic
    box_loss_weight=1.0,  # loss weight inside the boxes, normalised per image; 1 = off
    box_attn_loss=0.0,  # weight of a loss sending box k's tokens' attention to token k; 0 = off
)


def check_settings(cfg):
    """Stop on a setting that cannot work, before anything slow."""
    in_range(cfg, "global_batch micro_batch max_steps max_bad_steps log_every save_every keep_last val_steps", 1)
    in_range(cfg, "lr weight_decay warmup_steps seed num_workers val_every val_images box_attn_loss", 0)
    in_range(cfg, "caption_keep grounding_drop min_box_area", 0, 1)
    in_range(cfg, "max_boxes", 1, N_SLOTS)
    for k in ("timestep_power", "box_loss_weight", "grad_clip"):  # grad_clip 0 would clip every gradient away
        if not cfg[k] > 0:
            fail(f"--{k}={cfg[k]}: must be above 0")
    if cfg["dtype"] not in ("auto", "bf16", "fp32"):
        fail(f"--dtype={cfg['dtype']}: must be auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32")
    if cfg["compile"] and cfg["compile"] not in torch._dynamo.list_backends(exclude_tags=()):
        fail(f"--compile={cfg['compile']}: not a torch.compile backend (e.g. inductor, aot_eager)")
    if cfg["shard_base"] and not cfg["shard"]:
        fail("--shard_base=True shards the base beside the adapters: it needs --shard=True")
    if cfg["keypoints"] and (cfg["inpaint"] or cfg["image_features"] or cfg["box_loss_weight"] != 1
                             or cfg["box_attn_loss"]):
        fail("--keypoints=True is a mode of its own: not with --inpaint, --image_features, --box_loss_weight or "
             "--box_attn_loss")
    if cfg["maps"] and (cfg["inpaint"] or cfg["image_features"] or cfg["keypoints"] or cfg["box_loss_weight"] != 1
                        or cfg["box_attn_loss"] or cfg["shard"]):
        fail("--maps is a mode of its own: not with --inpaint, --image_features, --keypoints, --box_loss_weight, "
             "--box_attn_loss or --shard")
    check_out_dir(cfg["out_dir"], "out_dir")


def batch_plan(global_batch, micro_batch, world):
    """(images a GPU takes a pass, passes a step): global_batch a step on world GPUs, passes of at most micro_batch."""
    if global_batch < world or global_batch % world:
        near = sorted({max(world, global_batch // world * world), -(-global_batch // world) * world})
        gpus = max(d for d in range(1, world + 1) if global_batch % d == 0)
        fail(f"--global_batch={global_batch} images a step cannot be shared by {world} GPUs: use "
             f"{' or '.join(f'--global_batch={g}' for g in near)}, or {gpus} GPUs")
    share = global_batch // world
    per_pass = max(d for d in range(1, min(micro_batch, share) + 1) if share % d == 0)
    return per_pass, share // per_pass


def fail(msg):
    """Stop with one line naming what is wrong; exit status 1."""
    raise SystemExit(f"error: {msg}")


def configure(defaults, argv, doc=""):
    """Override defaults with --key=value arguments (Python literals; strings may be bare)."""
    cfg = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
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
        if isinstance(v, bool) != (want is bool) or not (isinstance(v, want) or (want is float and isinstance(v, int))):
            fail(f"--{key}={value}: expected {want.__name__}")  # True is an int to Python
        cfg[key] = float(v) if want is float else v
    return cfg


def check_out_dir(path, setting):
    """Stop now if --setting=path cannot become a directory to write in."""
    path = Path(path).absolute()
    first = next(p for p in [path, *path.parents] if p.exists())
    if not first.is_dir():
        fail(f"--{setting}={path}: {first} is a file, not a directory")
    if not os.access(first, os.W_OK):
        fail(f"--{setting}={path}: {first} is not writable")


def in_range(cfg, keys, low, high=math.inf):
    """Stop unless each of the settings `keys` is in [low, high]."""
    for k in keys.split():
        if not low <= cfg[k] <= high:
            fail(f"--{k}={cfg[k]}: must be " + (f"at least {low}" if high == math.inf else f"in [{low}, {high}]"))


# -----------------------------------------------------------------------------------------------------------------
# The method: the fuser and the position net, on a stock diffusers UNet; lift it out as it is. Names equal
# diffusers' attention_type="gated" UNet's. A new parameter older files lack goes in MAY_BE_MISSING (set_adapters).
N_SLOTS = 30  # grounding tokens per image


class Attention(nn.Module):
    """Multi-head attention of x over ctx; bias on the output only."""

    def __init__(self, dim, heads, head_dim):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_k = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_v = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim)])

    def forward(self, x, ctx):
        B, N, M = x.shape[0], x.shape[1], ctx.shape[1]
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, heads, N, head_dim)
        k = self.to_k(ctx).view(B, M, self.heads, -1).transpose(1, 2)  # (B, heads, M, head_dim)
        v = self.to_v(ctx).view(B, M, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, -1))


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)  # exact-erf GELU


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))  # net.1: dropout slot

    def forward(self, x):
        return self.net(x)


class Fuser(nn.Module):
    """Gated self-attention: visual tokens attend to [visual; grounding], added through tanh gates."""

    def __init__(self, dim, ctx_dim, heads, head_dim):
        super().__init__()
        self.linear = nn.Linear(ctx_dim, dim)  # grounding tokens to the block's width
        self.attn = Attention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.alpha_attn = nn.Parameter(torch.tensor(0.0))  # tanh(0) = 0: the UNet starts equal to its base
        self.alpha_dense = nn.Parameter(torch.tensor(0.0))

    def forward(self, x, objs):  # x (B, N, C) visual, objs (B, 30, D) grounding tokens
        n = x.shape[1]
        h = self.norm1(torch.cat([x, self.linear(objs)], dim=1))  # (B, N + 30, C)
        # only the visual tokens' outputs are kept
        x = x + self.alpha_attn.tanh() * self.attn(h[:, :n], h)
        x = x + self.alpha_dense.tanh() * self.ff(self.norm2(x))
        return x


def fourier_boxes(boxes, n_freqs=8):
    """(B, S, 4) boxes -> (B, S, 64): sin, then cos, at frequencies 100^(k/8); fp32."""
    freqs = 100 ** (torch.arange(n_freqs, device=boxes.device) / n_freqs)
    x = boxes.float()[..., None, :] * freqs[:, None]  # (B, S, 8, 4)
    return torch.cat([x.sin(), x.cos()], dim=-1).flatten(2)


def or_null(masks, x, null):
    """x in the filled slots, the learned null elsewhere."""
    return torch.where(masks[..., None] > 0, x.to(null.dtype), null)


def position_mlp(dim, n_freqs=8, out_dim=None):
    """[phrase feature; box code] -> 512 -> 512 -> a token."""
    return nn.Sequential(nn.Linear(dim + 8 * n_freqs, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(),
                         nn.Linear(512, out_dim or dim))


class PositionNet(nn.Module):
    """Grounding tokens from phrase features and box codes; empty slots get nulls."""

    def __init__(self, dim, n_freqs=8, out_dim=None):
        super().__init__()
        self.linears = position_mlp(dim, n_freqs, out_dim)
        self.null_positive_feature = nn.Parameter(torch.zeros(dim))
        self.null_position_feature = nn.Parameter(torch.zeros(8 * n_freqs))

    def forward(self, boxes, masks, positive_embeddings):  # (B, 30, 4), (B, 30), (B, 30, D): diffusers' names
        pos = or_null(masks, fourier_boxes(boxes), self.null_position_feature)  # (B, 30, 64)
        phr = or_null(masks, positive_embeddings, self.null_positive_feature)  # (B, 30, D)
        return self.linears(torch.cat([phr, pos], dim=-1))  # (B, 30, D)


def transformer_blocks(unet):
    """The UNet's transformer blocks, in module order."""
    from diffusers.models.attention import BasicTransformerBlock

    return [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]


def inject_gligen(unet, position_net=PositionNet, blocks=transformer_blocks):
    """Fresh fusers and position net on a stock UNet, whose blocks call `self.fuser` given "gligen" inputs:
    unet(x, t, text, cross_attention_kwargs={"gligen": {"boxes", "masks", "positive_embeddings"}})."""
    D = unet.config.cross_attention_dim
    for block in blocks(unet):
        a = block.attn1
        block.fuser = Fuser(a.query_dim, D, a.heads, a.inner_dim // a.heads).to(unet.device)
    unet.position_net = position_net(D).to(unet.device)
    return unet


# -----------------------------------------------------------------------------------------------------------------
# The model: its family, its frozen parts, and the adapters in and out.
def family_of(model):
    """"sd", "sdxl", "video", "sd3" or "flux"; stops on a model GLIGEN cannot start from."""
    from diffusers import UNet2DConditionModel

    if missing_local_path(model):
        fail(f"model directory not found: {model}")
    if Path(model).is_file():
        fail(f"{model} is a file: give the model's diffusers directory (model_index.json, unet/, vae/, ...)")
    if has_transformer(model):
        return mmdit_family(model)
    with loading(model):
        unet = UNet2DConditionModel.load_config(model, subfolder="unet")
    if unet.get("_class_name") not in ("UNet2DConditionModel", "UNet3DConditionModel"):
        fail(f"{model}: not a Stable Diffusion model in diffusers' layout (its unet/config.json names "
             f"{unet.get('_class_name')!r}, not a UNet2DConditionModel or UNet3DConditionModel)")
    if unet.get("attention_type", "default") != "default":
        fail(f"{model} is already a GLIGEN model: pass its base as --model, and it as --init_from (train_gligen.py) "
             f"or --adapters (sample.py)")
    if unet.get("in_channels", 4) != unet.get("out_channels", 4):
        fail(f"{model}: its UNet takes {unet['in_channels']} input channels (an inpainting or depth model?); "
             f"GLIGEN trains on a text-to-image base (for inpainting: that base with --inpaint=True)")
    if unet["_class_name"] == "UNet3DConditionModel":
        return "video"
    return "sdxl" if unet.get("addition_embed_type") == "text_time" else "sd"


def has_transformer(model):
    """Whether the model's model_index.json names a transformer (an MMDiT)."""
    from diffusers import DiffusionPipeline

    try:
        return "transformer" in DiffusionPipeline.load_config(model)
    except (OSError, ValueError):  # a UNet model's directory may have only unet/
        return False


def mode_of(adapters):
    """(inpaint, text_image, keypoints, spatial): the adapters' mode, from their names."""
    spatial = "conv_in.downsample_net.layers.0.weight" in adapters
    return ("conv_in.weight" in adapters and not spatial, "position_net.linears_text.0.weight" in adapters,
            "position_net.keypoint_embeddings" in adapters, spatial)


@contextmanager
def loading(model):
    """A model that cannot be read stops with one error line."""
    try:
        yield
    except (OSError, ValueError) as e:
        fail(f"cannot load the model {model!r} (not a local diffusers directory; as a Hub id it needs the network, or "
             f"the Hugging Face cache where HF_HUB_OFFLINE=1): {e}")


def load_model(cls, model, **kwargs):
    """cls.from_pretrained, quietly: diffusers without accelerate advises installing it."""
    from diffusers.utils import is_accelerate_available

    return cls.from_pretrained(model, low_cpu_mem_usage=is_accelerate_available(), **kwargs)


def load_sd(model, device, dtype, unet_class="UNet2DConditionModel"):
    """SD's frozen parts: the UNet, text encoder, tokenizer and noise scheduler."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    with loading(model):
        unet = load_model(getattr(diffusers, unet_class), model, subfolder="unet", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype)
        tokenizer = Tokenizer(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"))
        scheduler = diffusers.DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    return unet.to(device).requires_grad_(False), text_encoder.to(device).requires_grad_(False), tokenizer, scheduler


# The adapters: one rule for what they are, one loader.
MODE_NAMES = ("inpainting", "text-image", "keypoint", "spatial-map")  # mode_of's


def mode_name(mode):
    """A mode_of answer in words: "inpainting and text-image", "text-box"."""
    return " and ".join(k for k, on in zip(MODE_NAMES, mode) if on) or "text-box"
MAY_BE_MISSING = ("conv_in.weight",)  # absent from a file, they keep their start: inpainting from text-box


def adapter_state(unet):
    """What trains and is saved: fusers, position net, a widened conv_in's weight and downsampler."""
    widened = hasattr(unet, "conv_in") and unet.config.in_channels != unet.config.out_channels
    return {k: v for k, v in unet.state_dict().items() if ".fuser." in k or k.startswith("position_net.")
            or widened and (k == "conv_in.weight" or k.startswith("conv_in.downsample_net."))}


def adapter_params(unet):
    """The adapters' parameters, in the model's order."""
    names = adapter_state(unet).keys()
    return [p for name, p in unet.named_parameters() if name in names]


def set_adapters(unet, sd, source):
    """Load adapters: every name and shape must match, but MAY_BE_MISSING's."""
    own = adapter_state(unet)
    missing = sorted(k for k in own.keys() - sd.keys() if k not in MAY_BE_MISSING)
    unexpected = sorted(sd.keys() - own.keys())
    if missing or unexpected:
        kind = lambda m: mode_name(mode_of(m))
        fusers = lambda m: sum(k.endswith(".fuser.alpha_attn") for k in m)
        why = f"{kind(sd)} adapters, and this run is {kind(own)}" if kind(sd) != kind(own) else \
            f"{fusers(sd)} fusers, and this UNet has {fusers(own)} transformer blocks: another model's?"
        fail(f"{source}: adapters do not fit this UNet ({why}): {len(missing)} missing (e.g. {missing[:2]}), "
             f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            fail(f"{source}: {k} has shape {tuple(v.shape)}, this UNet needs {tuple(own[k].shape)}")
    unet.load_state_dict(sd, strict=False)


def missing_local_path(src):
    """Whether src reads as a missing local path."""
    src = str(src)
    return not os.path.exists(src) and (src.startswith((".", "/", "~")) or src.count("/") != 1
                                        or src.endswith(".safetensors"))


def adapters_file(src):
    """The adapters.safetensors that src names; None for a diffusers model."""
    path = Path(src)
    if missing_local_path(src):
        fail(f"adapters not found: {src}")
    if path.is_dir() and checkpoints(path):
        path = latest_good_checkpoint(path) or fail(f"{path}: none of its checkpoints is usable")
    if path.is_dir() and (path / "adapters.safetensors").exists():
        path = path / "adapters.safetensors"
    return path if path.suffix == ".safetensors" else None


def read_safetensors(path):
    """A .safetensors file's tensors; a damaged one stops with its name."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        fail(f"{path}: not a readable safetensors file ({e}): damaged, or cut short in a copy?")


def load_adapters(src):
    """Adapter tensors from this project's files or a diffusers GLIGEN model."""
    path = adapters_file(src)
    if path is not None:
        return read_safetensors(path)
    from diffusers import UNet2DConditionModel

    try:
        unet = load_model(UNet2DConditionModel, src, subfolder="unet")
    except (OSError, ValueError) as e:
        fail(f"cannot read adapters from {src!r} (no checkpoint, .safetensors or diffusers GLIGEN model there): {e}")
    sd = adapter_state(unet)
    if not sd:
        fail(f"{src}: its UNet has no GLIGEN adapters (it was not built with attention_type='gated')")
    return sd


# -----------------------------------------------------------------------------------------------------------------
# Text and layouts: tokenizing, checking, batching into the 30 slots.
class Tokenizer:
    """CLIP's tokenizer: captions padded to 77, phrases to the longest (CLIP is causal), each once."""

    def __init__(self, tokenizer):
        self.tokenizer, self.known = tokenizer, {}

    def captions(self, texts):
        """Token ids (B, 77), by lists: 3x faster than transformers' tensors."""
        t = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True)
        return torch.tensor(t["input_ids"])

    def phrases(self, phrases):
        """Token ids (U, L) and mask, padded to the longest."""
        if len(self.known) > 200_000:  # a bound on memory
            self.known.clear()
        new = [p for p in phrases if p not in self.known]
        if new:
            ids = self.tokenizer(new, max_length=self.tokenizer.model_max_length, truncation=True)["input_ids"]
            self.known.update(zip(new, ids))
        n = max(len(self.known[p]) for p in phrases)
        ids = np.full((len(phrases), n), self.tokenizer.pad_token_id, np.int64)
        mask = np.zeros((len(phrases), n), np.int64)
        for i, p in enumerate(phrases):
            ids[i, :len(self.known[p])], mask[i, :len(self.known[p])] = self.known[p], 1
        return torch.from_numpy(ids), torch.from_numpy(mask)


def check_layout(phrases, boxes, where, max_boxes=N_SLOTS):
    """Stop, naming `where`, unless phrases are strings and boxes xyxy in [0, 1], as many."""
    if not isinstance(phrases, list) or not isinstance(boxes, list) or len(phrases) != len(boxes):
        fail(f"{where}: phrases and boxes must be lists of the same length, got {phrases!r} and {boxes!r}")
    if max_boxes is not None and len(boxes) > max_boxes:
        fail(f"{where}: {len(boxes)} phrases and boxes; a layout has at most {max_boxes} (the grounding slots)")
    for p, b in zip(phrases, boxes):
        if not isinstance(p, str) or not p.strip():
            fail(f"{where}: phrase {p!r} is not a non-empty string")
        if not isinstance(b, (list, tuple)) or len(b) != 4 or not all(isinstance(v, (int, float)) for v in b):
            fail(f"{where}: box {b!r} for {p!r} is not four numbers x0, y0, x1, y1")
        if not all(math.isfinite(v) for v in b):
            fail(f"{where}: box {b!r} for {p!r} has NaN or inf")
        if not all(0 <= v <= 1 for v in b):
            fail(f"{where}: box {b!r} for {p!r} is outside [0, 1] (boxes are relative to the image size)")
        if b[2] < b[0] or b[3] < b[1]:
            fail(f"{where}: box {b!r} for {p!r} has x1 < x0 or y1 < y0 (boxes are x0, y0, x1, y1)")


LAYOUT_KEYS = ("prompt", "phrases", "boxes", "images", "keypoints", "map")  # a layout line of sample.py, --val_layouts


def check_layouts(layouts, frames=None, images=False):
    """Stop, naming the layout, unless its prompt, phrases, boxes and images check."""
    for where, l in layouts:
        if not isinstance(l, dict) or not isinstance(l.get("prompt"), str):
            fail(f"{where}: a layout needs a prompt string, got {l!r}")
        for key in l.keys() - set(LAYOUT_KEYS):
            near = difflib.get_close_matches(key, LAYOUT_KEYS, 1)
            fail(f"{where}: unknown key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                 + f"; a layout has {', '.join(LAYOUT_KEYS)} (images, keypoints, map: those modes' adapters only)")
        phrases, boxes, images = l.get("phrases"), l.get("boxes"), l.get("images") if images else None
        if images:
            if not isinstance(images, list) or not isinstance(phrases, list) or len(images) != len(phrases):
                fail(f"{where}: images must be a list with one path (or None) per phrase, got {images!r}")
            for k, (p, im) in enumerate(zip(phrases, images)):
                if im is not None:
                    check_image(im, f"{where}: reference image")
                if p is None and im is None:
                    fail(f"{where}: box {k} has neither a phrase nor an image")
            phrases = [p if p is not None else "(image)" for p in phrases]
        per_frame = is_moving(boxes)
        if per_frame and frames is None:
            fail(f"{where}: one list of boxes per frame is for video models")
        if per_frame and len(boxes) != frames:
            fail(f"{where}: {len(boxes)} lists of boxes for --frames={frames} (one list per frame, for video models)")
        for f, frame_boxes in enumerate(boxes if per_frame else [boxes]):
            check_layout(phrases, frame_boxes, where + (f" frame {f}" if per_frame else ""))
        if "keypoints" in l:
            check_keypoints(l, where)
        if "map" in l and not (isinstance(l["map"], str) and Path(l["map"]).is_file()):
            fail(f"{where}: map must be the path of a map file (PNG or NPY), got {l['map']!r}: not found")


def upright(im):
    """im turned in place by its EXIF orientation, as viewers show it and boxes are drawn."""
    ImageOps.exif_transpose(im, in_place=True)
    return im


def check_image(path, what):
    """Stop unless path is an image PIL decodes whole."""
    if not Path(str(path)).is_file():
        fail(f"{what} not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, ValueError, SyntaxError) as e:
        fail(f"{what} {path} is not a readable image ({e})")


def is_moving(boxes):
    """Whether a video layout's boxes are one list per frame."""
    first = boxes[0] if isinstance(boxes, list) and boxes else None
    return isinstance(first, (list, tuple)) and bool(first) and isinstance(first[0], (list, tuple))


def mirror(boxes):
    """Boxes (..., 4) mirrored left to right, in a new array."""
    m = boxes[..., [2, 1, 0, 3]]
    m[..., [0, 2]] = 1 - m[..., [0, 2]]
    return m


def layout_tensors(tokenizer, layouts):
    """[(phrases, boxes)] -> distinct phrases' ids and mask, slot -> phrase, boxes, masks."""
    phrases = list(dict.fromkeys(p for phr, _ in layouts for p in phr)) or [""]  # distinct, in order of appearance
    ids, mask = tokenizer.phrases(phrases)
    row = {p: i for i, p in enumerate(phrases)}
    slot_phrase = np.zeros((len(layouts), N_SLOTS), np.int64)  # numpy: a torch call per row costs more
    boxes, masks = np.zeros((len(layouts), N_SLOTS, 4), np.float32), np.zeros((len(layouts), N_SLOTS), np.float32)
    for i, (phr, bxs) in enumerate(layouts):
        slot_phrase[i, :len(phr)] = [row[p] for p in phr]
        boxes[i, :len(bxs)] = np.asarray(bxs, dtype=np.float32).reshape(-1, 4)
        masks[i, :len(phr)] = 1
    return ids, mask, torch.from_numpy(slot_phrase), torch.from_numpy(boxes), torch.from_numpy(masks)


# -----------------------------------------------------------------------------------------------------------------
# The data: prep_latents.py's latents joined with prep_boxes.py's phrases and boxes.
def read_jsonl(path):
    """(line number, record) of a JSONL file; a bad line stops, named."""
    if not Path(path).is_file():
        fail(f"file not found: {path}")
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    fail(f"{path}:{i}: not valid JSON ({e})")
                if not isinstance(rec, dict):
                    fail(f"{path}:{i}: a record is a JSON object {{...}}, this line is a {type(rec).__name__}")
                yield i, rec


@dataclass(slots=True)
class Item:
    """A training image as the loader keeps it."""
    shard: Path
    row: int
    caption: str
    phrases: list
    boxes: np.ndarray  # (k, 4) in the training crop, largest first


class GroundedLatents(torch.utils.data.Dataset):
    """Sample (i, flip): image i's latent, caption and (phrase, box)es in its crop, mirrored if flip."""
    Item = Item
    files = ()  # copied beside a checkpoint's adapters

    def __init__(self, latents_dir, boxes_path, max_boxes=N_SLOTS, min_box_area=0.01):
        self.dir, self.max_boxes, self.min_box_area = Path(latents_dir), max_boxes, min_box_area
        for f, script in ((self.dir / "meta.json", "prep_latents"), (self.dir / "index.jsonl", "prep_latents"),
                          (Path(boxes_path), "prep_boxes")):
            if not f.is_file():
                fail(f"data file not found: {f} (write it with {script}.py)")
        meta = self.meta = json.loads((self.dir / "meta.json").read_text())
        if "latent_shape" not in meta:
            fail(f"{self.dir} holds no latents (its meta.json is not prep_latents.py's for latents: box image "
                 f"features? Those go in --image_features)")
        self.resolution, self.has_flipped = meta["resolution"], "flipped" in meta["views"]
        self.row_shape = (len(meta["views"]), len(meta["stats"]), *meta["latent_shape"])
        layouts = {}
        for line, rec in read_jsonl(boxes_path):
            where = f"{boxes_path}:{line} (image {rec.get('image')!r})"
            if not all(k in rec for k in ("image", "width", "height", "phrases", "boxes")):
                fail(f"{where}: a record needs image, width, height, phrases and boxes")
            size = (rec["width"], rec["height"])
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 and v % 1 == 0 for v in size):
                fail(f"{where}: width and height must be positive whole numbers, got {size[0]!r} and {size[1]!r}")
            check_layout(rec["phrases"], rec["boxes"], where, max_boxes=None)
            if rec["image"] in layouts:
                fail(f"{where}: a second record for this image (the first: {layouts[rec['image']][0]})")
            layouts[rec["image"]] = (where, rec)
        self.items, self.rows, missing = [], {}, []  # shard -> (rows needed, a row's shape)
        for line, rec in read_jsonl(self.dir / "index.jsonl"):
            if rec["key"] not in layouts:
                missing.append(rec["key"])
                continue
            where, lay = layouts[rec["key"]]
            if (lay["width"], lay["height"]) != (rec["width"], rec["height"]):
                turned = (lay["width"], lay["height"]) == (rec["height"], rec["width"])
                fail(f"{where}: image size {lay['width']}x{lay['height']} does not match "
                     f"{rec['width']}x{rec['height']} in {self.dir / 'index.jsonl'}:{line}: latents and boxes are "
                     f"of different images" + (" (or a photo turned by its EXIF orientation: prep_latents.py "
                                               "encodes it upright, as shown; give its size and boxes so)" * turned))
            self.items.append(self.item(rec, lay))
        if missing:
            named = {Path(k).name for k in layouts}
            hint = " (the boxes file names them by file name alone: was --images of prep_latents.py the folder " \
                   "above the images'?)" if all(Path(k).name in named for k in missing[:100]) else ""
            fail(f"{boxes_path} has no record for {len(missing)} of the images in {self.dir / 'index.jsonl'} "
                 f"(e.g. {missing[:3]}): were they made from the same images?{hint}")
        self.check_shards()
        self.config = dict(resolution=self.resolution, images=len(self.items))
        self.arrays = {}

    def item(self, rec, lay, **more):
        """An index record and its layout as an Item."""
        phrases, boxes, _ = self.crop_layout(lay, rec["crop"], self.max_boxes, self.min_box_area)
        shard, row = self.need(self.dir / rec["shard"], rec["row"], self.row_shape)
        return self.Item(shard=shard, row=row, caption=rec["caption"], phrases=phrases, boxes=boxes, **more)

    def need(self, shard, row, shape):
        """(shard, row), noting that the shard must hold that row."""
        self.rows[shard] = (max(self.rows.get(shard, (0,))[0], row + 1), shape)
        return shard, row

    def check_shards(self):
        """A shard cut short fails here, not in a loader worker."""
        for path, (n, shape) in self.rows.items():
            try:
                got = np.load(path, mmap_mode="r").shape
                problem = None if got[0] >= n and got[1:] == shape else f"its shape is {got}"
            except (OSError, ValueError, EOFError) as e:
                problem = f"it is unreadable ({e})"
            if problem:
                fail(f"{path}: {problem}, and {path.parent / 'index.jsonl'} needs {n} rows of {shape}: cut "
                     f"short or from another run? Copy it again, or delete it and {path.stem}.json and run the same "
                     f"prep_latents.py command again: it redoes that shard alone")

    @staticmethod
    def crop_layout(lay, crop, max_boxes, min_box_area):
        """A layout in the square crop: clipped, small boxes dropped, largest first."""
        cx0, cy0, cx1, cy1 = crop  # in original pixels
        W, H, side = lay["width"], lay["height"], cx1 - cx0
        b = np.asarray(lay["boxes"], dtype=np.float64).reshape(-1, 4) * [W, H, W, H]
        b = ((b - [cx0, cy0, cx0, cy0]) / side).clip(0, 1)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        keep = [i for i in np.argsort(-area, kind="stable") if area[i] >= min_box_area][:max_boxes]
        return [lay["phrases"][i] for i in keep], b[keep].astype(np.float32), keep

    def __len__(self):
        return len(self.items)

    def array(self, path):
        if path not in self.arrays:  # opened once per worker
            self.arrays[path] = np.load(path, mmap_mode="r")
        return self.arrays[path]

    def __getitem__(self, sample):
        i, flip = sample
        it = self.items[i]
        latent = torch.from_numpy(np.array(self.array(it.shard)[it.row, int(flip)]))  # view 1: mirrored
        return dict(latent=latent, caption=it.caption, phrases=it.phrases, boxes=mirror(it.boxes) if flip else it.boxes)

    def collate(self, tokenizer, samples):
        """Samples -> a micro-batch, tokenized in the loader workers."""
        ids, mask, slot_phrase, boxes, masks = layout_tensors(tokenizer, [(x["phrases"], x["boxes"]) for x in samples])
        return dict(latents=torch.stack([x["latent"] for x in samples]),
                    caption_ids=tokenizer.captions([x["caption"] for x in samples]), phrase_ids=ids, phrase_mask=mask,
                    slot_phrase=slot_phrase, boxes=boxes, masks=masks)


def training_data(cfg, Latents=GroundedLatents):
    """The training set; its latents must be of this model's VAE."""
    from diffusers import AutoencoderKL

    data = Latents(cfg["latents"], cfg["boxes"], cfg["max_boxes"], cfg["min_box_area"])
    with loading(cfg["model"]):
        vae = AutoencoderKL.load_config(cfg["model"], subfolder="vae")
    made = (data.meta.get("scaling_factor"), data.meta.get("shift_factor", 0.0), data.meta["latent_shape"][0])
    ours = (vae.get("scaling_factor", 0.18215), vae.get("shift_factor") or 0.0, vae.get("latent_channels", 4))
    if made != ours:
        fail(f"{cfg['latents']} holds latents of {data.meta.get('model')!r}'s VAE (scaling and shift factors, "
             f"channels: {made}), "
             f"and {cfg['model']}'s VAE makes {ours}: encode the images with prep_latents.py --model={cfg['model']}")
    return data


def rank_batches(n, global_batch, micro_batch, world, rank, seed, start_step, flip=False):
    """This rank's micro-batches [(index, flip)] from start_step; a resume replays nothing."""
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
    """A micro-batch's random stream by (seed, step, first slot): the same on any number of GPUs."""
    g = torch.Generator(device)
    return g.manual_seed(int(np.random.SeedSequence([seed, step, slot]).generate_state(1)[0]))


# -----------------------------------------------------------------------------------------------------------------
# The step: a micro-batch's loss, and the update.
class Schedule(NamedTuple):
    """What SD's step needs of the noise scheduler."""
    alphas_cumprod: torch.Tensor
    prediction_type: str  # epsilon or v_prediction, recorded in checkpoints


def noise_schedule(noise_scheduler, model, device):
    """The Schedule of a DDPM noise scheduler."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        fail(f"{model}: prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")
    return Schedule(noise_scheduler.alphas_cumprod.to(device), prediction_type)


def draw_timesteps(T, b, g, power=1.0):
    """b timesteps: uniform (power 1, GLIGEN's), or t = (1 - u^power) T, more of them at high noise."""
    if power == 1:
        return torch.randint(0, T, (b,), generator=g, device=g.device)
    u = torch.rand(b, generator=g, device=g.device)
    return ((1 - u ** power) * T).long().clamp(0, T - 1)


def forward_process(alphas_cumprod, x0, noise, t, prediction_type):
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, and the target: the noise, or v."""
    a = alphas_cumprod[t].view(-1, *[1] * (x0.dim() - 1))
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return xt, noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0


def vae_sample(latents, g):
    """The VAE's mean, or a sample where the std was stored."""
    x0 = latents[:, 0].float()
    if latents.shape[1] == 2:
        x0 = x0 + latents[:, 1].float() * torch.randn(x0.shape, generator=g, device=g.device)
    return x0


def dropped(batch, keep_caption, keep_grounding, empty_ids):
    """The caption ids (dropped: empty), and the filled slots (dropped grounding: none)."""
    keep = keep_caption.view(-1, *[1] * (empty_ids.dim() - 1))  # (b, 1): whatever the ids' shape
    return torch.where(keep, batch["caption_ids"], empty_ids), batch["masks"] * keep_grounding[:, None]


def noised(batch, g, schedule, empty_ids, cfg):
    """The first half of SD's step: the draws from g, in an order resumes and ranks rely on (caption keeps,
    grounding keeps, noise, timesteps, the latent's sample), and what follows from them."""
    b, device = len(batch["latents"]), schedule.alphas_cumprod.device
    keep_caption = torch.rand(b, generator=g, device=device) < cfg["caption_keep"]
    keep_grounding = torch.rand(b, generator=g, device=device) >= cfg["grounding_drop"]
    noise = torch.randn(batch["latents"][:, 0].shape, generator=g, device=device)
    t = draw_timesteps(len(schedule.alphas_cumprod), b, g, cfg["timestep_power"])
    x0 = vae_sample(batch["latents"], g)
    xt, target = forward_process(schedule.alphas_cumprod, x0, noise, t, schedule.prediction_type)
    return x0, xt, t, target, *dropped(batch, keep_caption, keep_grounding, empty_ids)


def text_box_grounding(text_encoder, batch, masks):
    """The UNet's "gligen" inputs: each phrase's pooled feature in its slots."""
    feats = text_encoder(batch["phrase_ids"], attention_mask=batch["phrase_mask"]).pooler_output  # (U, D)
    return {"boxes": batch["boxes"], "masks": masks, "positive_embeddings": feats[batch["slot_phrase"]]}  # (B, 30, D)


def sd_loss(model, batch, g, text_encoder, schedule, empty_ids, cfg, autocast=nullcontext(), levers=None,
            per_image=False):
    """GLIGEN's loss on a micro-batch; model: the UNet, maybe DDP-wrapped or compiled."""
    x0, xt, t, target, ids, masks = noised(batch, g, schedule, empty_ids, cfg)
    with torch.no_grad(), autocast:
        text = text_encoder(ids).last_hidden_state  # (b, 77, D)
        gligen = text_box_grounding(text_encoder, batch, masks)
    with autocast:
        pred = model(xt, t, encoder_hidden_states=text, cross_attention_kwargs={"gligen": gligen}).sample
    return denoising_loss(pred, target, batch, levers, per_image, t.float() / len(schedule.alphas_cumprod))


def denoising_loss(pred, target, batch, levers=None, per_image=False, level=None):
    """Every family's loss: the MSE (or the levers'); per_image: also each image's, and its level."""
    loss = F.mse_loss(pred.float(), target) if levers is None else levers.loss(pred.float(), target, batch)
    if per_image:
        return loss, F.mse_loss(pred.float(), target, reduction="none").flatten(1).mean(1), level
    return loss


@torch.no_grad()
def mirrored_boxes(batch):
    """A batch with its boxes mirrored: box-use validation's wrong layout."""
    return {**batch, "boxes": mirror(batch["boxes"])}


@torch.no_grad()
def box_use_losses(image_losses, unet, batches, seed, resamples=1000, mirrored=mirrored_boxes):
    """Do the adapters use the boxes? The loss on fixed batches with true, mirrored and no boxes, the gap's
    bootstrap standard error, and the gap at high noise; image_losses -> (loss, each image's, each one's level)."""
    losses, n = dict(boxes=0.0, mirrored=0.0, no_grounding=0.0), sum(len(b["latents"]) for b in batches)
    each, level = dict(boxes=[], mirrored=[]), []
    for k, b in enumerate(batches):
        variants = dict(boxes=b, mirrored=mirrored(b),
                        no_grounding={**b, "masks": torch.zeros_like(b["masks"])})
        for name, batch in variants.items():  # the same noise and timesteps
            g = torch.Generator(b["latents"].device).manual_seed(seed + k)
            loss, per_image, t = image_losses(unet, batch, g)
            losses[name] += loss.item() * len(b["latents"]) / n
            if name in each:
                each[name].append(per_image.double().cpu())
        level.append(t.cpu())
    gap = (torch.cat(each["mirrored"]) - torch.cat(each["boxes"])).numpy()
    high = gap[torch.cat(level).numpy() >= 0.5]
    rng = np.random.default_rng(seed)

    def se(x):
        return float(x[rng.integers(0, len(x), (resamples, len(x)))].mean(1).std()) if len(x) > 1 else None

    return {**{f"val_loss_{k}": v for k, v in losses.items()}, "val_gap_se": se(gap),
            "val_gap_high_noise": float(high.mean()) if len(high) else None, "val_gap_high_noise_se": se(high)}


def count_flops(fn):
    """fn()'s model FLOPs, with SDPA's math kernel (no flash recompute)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def reduced_on(model, last):
    """A pass's backward context: gradients reduced across ranks on a step's last pass only."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
        return nullcontext()
    return model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()


def optimizer_step(opt, params, grad_clip):
    """Clip and step fused AdamW, which skips a non-finite step on the device (no host sync); whether it stepped."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    ok = torch.isfinite(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # sharded: the global norm
    opt.found_inf = (~ok).float()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return ok


# -----------------------------------------------------------------------------------------------------------------
# Sampling: the validation grid's images, and sample.py's.
SCHEDULERS = dict(ddim="DDIMScheduler", dpm="DPMSolverMultistepScheduler", euler="EulerDiscreteScheduler",
                  euler_a="EulerAncestralDiscreteScheduler", pndm="PNDMScheduler", ddpm="DDPMScheduler",
                  flow_euler="FlowMatchEulerDiscreteScheduler")  # sample.py's --scheduler -> diffusers' class
UNET_SAMPLERS = ("ddim", "dpm", "euler", "euler_a", "pndm", "ddpm")  # the first validates


def prompt_inputs(text_encoder, tokenizer, prompt, n, height, width):
    """The UNet's text inputs of n x [unconditional; conditional]."""
    ids = tokenizer.captions(["", prompt]).to(next(text_encoder.parameters()).device)
    return {"encoder_hidden_states": text_encoder(ids).last_hidden_state.repeat_interleave(n, dim=0)}


def layout_grounding(text_encoder, tokenizer, layout, rows, dtype):
    """A layout's "gligen" inputs, the first half null."""
    device = next(text_encoder.parameters()).device
    ids, mask, slot_phrase, boxes, masks = layout_tensors(tokenizer, rows)
    masks[:len(rows) // 2] = 0
    batch = dict(phrase_ids=ids.to(device), phrase_mask=mask.to(device), slot_phrase=slot_phrase.to(device),
                 boxes=boxes.to(device))
    return text_box_grounding(text_encoder, batch, masks.to(device, dtype))


def both_halves(scheduler, latents, t, g):
    """A layout's latents, and the UNet's input: them twice, scaled."""
    return latents, scheduler.scale_model_input(torch.cat([latents] * 2), t)


def stack_halves(parts):
    """Layouts' [unconditional; conditional] inputs as one, unconditional halves first."""
    if isinstance(parts[0], dict):
        return {k: stack_halves([p[k] for p in parts]) for k in parts[0]}
    halves = [p.chunk(2) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves])


def grounded(layouts, seeds):
    """Whether a batch of layouts gets grounding (all or none have phrases or a map)."""
    if len(seeds) != len(layouts):
        fail(f"{len(layouts)} layouts and {len(seeds)} seeds: give one seed per layout")
    if len({bool(l["phrases"]) or "map" in l for l in layouts}) > 1:
        fail("a batch of layouts mixes layouts with phrases and without; sample those apart")
    return bool(layouts[0]["phrases"]) or "map" in layouts[0]


def batch_grounding(text_encoder, tokenizer, layouts, seeds, rows, dtype, layout_grounding):
    """A batch of layouts' "gligen" inputs; None without phrases or a map."""
    if not grounded(layouts, seeds):
        return None
    return {"gligen": stack_halves([layout_grounding(text_encoder, tokenizer, l, r, dtype)
                                    for l, r in zip(layouts, rows)])}


def batch_noise(seeds, shape):
    """Each layout's first latents and stream, from its own seed, on the CPU."""
    streams = [torch.Generator().manual_seed(s) for s in seeds]
    return torch.cat([torch.randn(shape, generator=g) for g in streams]), streams


@torch.no_grad()
def generate(unet, vae, text_encoder, tokenizer, scheduler, layouts, seeds, n=1, steps=25, guidance=7.5, beta=1.0,
             height=None, width=None, progress=False, model_input=both_halves, prompt_inputs=prompt_inputs,
             layout_grounding=layout_grounding):
    """n images (uint8, (layouts x n, H, W, 3)) of each layout, as StableDiffusionGLIGENPipeline makes them; layout k
    from seeds[k], the same in any batch. Families pass their own model_input, prompt_inputs and layout_grounding."""
    scale = vae_scale(vae)
    height, width = height or native_size(unet, vae), width or native_size(unet, vae)
    text = stack_halves([prompt_inputs(text_encoder, tokenizer, l["prompt"], n, height, width) for l in layouts])
    dtype = text["encoder_hidden_states"].dtype
    rows = [[(l["phrases"], l["boxes"])] * (2 * n) for l in layouts]
    gligen = batch_grounding(text_encoder, tokenizer, layouts, seeds, rows, dtype, layout_grounding)
    latents, streams = batch_noise(seeds, (n, unet.config.out_channels, height // scale, width // scale))
    latents = denoise(unet, scheduler, latents.to(unet.device), text, gligen, streams, steps, guidance, beta, progress,
                      model_input)
    return decode(vae, latents)


def denoise(unet, scheduler, latents, text, gligen, streams, steps, guidance, beta, progress=False,
            model_input=both_halves):
    """The sampler's loop: guidance, grounding for beta * steps steps, each layout its own scheduler copy and
    stream; model_input(scheduler, latents, t, g) -> (a layout's latents, its UNet input)."""
    schedulers = [copy.deepcopy(scheduler) for _ in streams]
    for s in schedulers:
        s.set_timesteps(steps, device=latents.device)
    latents = latents * schedulers[0].init_noise_sigma
    takes = inspect.signature(scheduler.step).parameters
    extras = [{k: v for k, v in dict(eta=0.0, generator=g).items() if k in takes} for g in streams]
    n_grounded = int(beta * len(schedulers[0].timesteps))
    for i, t in enumerate(tqdm(schedulers[0].timesteps, desc="denoising", leave=False, disable=not progress)):
        pieces = [model_input(s, z, t, g) for s, z, g in zip(schedulers, latents.chunk(len(streams)), streams)]
        x = stack_halves([x for _, x in pieces])
        out = unet(x.to(unet.dtype), t, **text, cross_attention_kwargs=gligen if i < n_grounded else None)
        uncond, cond = out.sample.float().chunk(2)
        guided = (uncond + guidance * (cond - uncond)).chunk(len(streams))
        latents = torch.cat([s.step(e, t, z, **extra).prev_sample
                             for s, e, (z, _), extra in zip(schedulers, guided, pieces, extras)])
    return latents


def vae_scale(vae):
    """Pixels per latent on a side: 8 for SD's VAE."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def native_size(unet, vae):
    """The model's image side; 1,024 where it names none (Flux)."""
    return unet.config.get("sample_size", 128) * vae_scale(vae)


def decode(vae, latents):
    """Latents (n, 4, h, w) -> images, uint8 (n, H, W, 3)."""
    shift = vae.config.get("shift_factor") or 0.0  # None on SD's VAEs
    image = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
    image = (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (image * 255).round().astype(np.uint8)


def trained_size(data, pick):
    """The validation grid at the training images' size."""
    return dict(height=data.resolution, width=data.resolution)


COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#ffe119"]


def draw_layout(image, phrases, boxes):
    """A copy of an image with its boxes and phrases drawn on."""
    image = image.convert("RGB")
    scale = max(1, 256 // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    d, (W, H) = ImageDraw.Draw(image), image.size
    font = ImageFont.load_default(size=max(8, W // 28))
    for i, (p, (x0, y0, x1, y1)) in enumerate(zip(phrases, boxes)):
        c = COLORS[i % len(COLORS)]
        d.rectangle([x0 * W, y0 * H, x1 * W, y1 * H], outline=c, width=max(1, W // 128))
        tag = d.textbbox((x0 * W, y0 * H), p, font=font)
        d.rectangle([tag[0], tag[1], tag[2] + 4, tag[3] + 2], fill=c)
        d.text((x0 * W + 2, y0 * H), p, fill="white", font=font)
    return image


def draw_grounding(image, layout):
    """draw_layout's copy of a layout's image: keypoints' skeletons drawn on, a map beside."""
    if "map" in layout:  # no boxes: the map as the image took it
        image, m = draw_layout(image, [], []), layout["map"]
        m = read_map(m) if isinstance(m, (str, Path)) else m
        return beside(image, map_image(map_for(m, image.height, image.width), image.size))
    image = draw_layout(image, layout["phrases"], layout["boxes"])
    return draw_keypoints(image, layout["keypoints"]) if "keypoints" in layout else image


# -----------------------------------------------------------------------------------------------------------------
# Checkpoints: out_dir/step_0002000/ holds adapters.safetensors, state.pt (optimizer, step, config; a sharded
# run's optimizer is in optimizer/, a DCP checkpoint) and manifest.json (sizes, sha256), written as
# step_0002000.tmp and renamed when whole; a checkpoint that fails its manifest is set aside.
def checkpoint_dir(out_dir, step):
    return Path(out_dir) / f"step_{step:07d}"


def checkpoints(out_dir):
    """The finished checkpoints in out_dir, oldest first."""
    return sorted(p for p in Path(out_dir).glob("step_*") if re.fullmatch(r"step_\d+", p.name) and p.is_dir())


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(ckpt):
    """None if every file matches the manifest, else what is wrong."""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"no readable manifest.json ({e})"
    for name, want in manifest.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, not {want['bytes']} (truncated?)"
        if sha256(f) != want["sha256"]:
            return f"{name} does not match its sha256 (corrupted)"
    return None


def latest_good_checkpoint(out_dir, set_aside=False):
    """The newest checkpoint that verifies; newer broken ones are reported (and set aside)."""
    for ckpt in reversed(checkpoints(out_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        print(f"warning: checkpoint {ckpt} is unusable: {problem}. "
              + (f"Moved aside to {ckpt.name}.corrupt; " if set_aside else "") + "falling back to the one before.",
              file=sys.stderr)
        if set_aside:
            ckpt.rename(ckpt.with_name(ckpt.name + ".corrupt"))
    return None


def save_checkpoint(out_dir, step, unet, opt, cfg, files=(), gathered=None):
    """Write out_dir/step_<step> (and copies of files); None, or what went wrong. gathered: gather_state's."""
    final = checkpoint_dir(out_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    adapters, opt_state = gathered or (adapter_state(unet), opt.state_dict())
    adapters = {k: v.detach().float().cpu().contiguous() for k, v in adapters.items()}
    if not all(torch.isfinite(v).all() for v in adapters.values()):
        return f"the adapters hold NaN or Inf at step {step}: not saved"  # never let poisoned weights be resumed
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = {"format": "gligen-adapters", "config": json.dumps(cfg)}
        save_file(adapters, tmp / "adapters.safetensors", metadata=meta)
        if isinstance(opt_state, Path):  # the sharded optimizer, already written by every rank
            os.replace(opt_state, tmp / "optimizer")
            opt_state = None
        torch.save({"step": step, "optimizer": opt_state, "config": cfg}, tmp / "state.pt")
        for f in files:
            shutil.copyfile(f, tmp / Path(f).name)
        manifest = {}
        for f in sorted(f for f in tmp.rglob("*") if f.is_file()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            manifest[f.relative_to(tmp).as_posix()] = dict(bytes=f.stat().st_size, sha256=sha256(f))
        with open(tmp / "manifest.json", "w") as fh:
            json.dump(manifest, fh)
            fh.flush()
            os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        dir_fd = os.open(out_dir, os.O_RDONLY)
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
        shutil.rmtree(old)  # older ones, and saves cut off by a kill
    return None


# -----------------------------------------------------------------------------------------------------------------
# The stages of a run: SD1.x/2.x's here; each family or mode after main replaces some.
# choose_stages decides once; main calls them by name.
STAGES = dict(
    load=load_sd,  # model -> frozen UNet, text encoder, tokenizer, noise scheduler
    schedule=noise_schedule,  # noise scheduler -> what the loss needs of it
    add_adapters=inject_gligen,  # UNet -> with fresh fusers and position net
    training_data=training_data,  # settings -> the training set
    loss=sd_loss,  # micro-batch -> loss
    generate=generate,  # layouts -> images
    samplers=UNET_SAMPLERS,  # sample.py's schedulers; the first validates
    val_inputs=trained_size,  # the validation grid's extra inputs to generate
    val_layouts=lambda data: VAL_LAYOUTS,  # data -> the validation grid's layouts without --val_layouts
    layout_needs=(),  # what else a layout with boxes needs (a mode's keys; a map: every layout)
    mirrored=mirrored_boxes,  # a validation batch -> its wrong layout, for the box-use gap
)
FAMILIES = {"sd": {}}
MODES = {(False, False, False, False): {}}  # by mode_of


def choose_stages(family, inpaint=False, text_image=False, keypoints=False, map_net=None):
    """This run's stages: SD's, with those its family and mode replace; map_net: the spatial-map mode's
    () -> (map channels, ConvNeXt), or None."""
    mode = (inpaint, text_image, keypoints, map_net is not None)
    if mode not in MODES:
        fail(f"{mode_name(mode)} at once: no such mode")
    if any(mode) and family != "sd":
        fail(f"{mode_name(mode)} grounding is for SD1.x/2.x models; this is {family}")
    chosen = {**STAGES, **FAMILIES[family], **MODES[mode]}
    if map_net:
        chosen["add_adapters"] = partial(chosen["add_adapters"], map_net=map_net)
    return SimpleNamespace(family=family, inpaint=inpaint, text_image=text_image, keypoints=keypoints,
                           spatial=map_net is not None, **chosen)


# -----------------------------------------------------------------------------------------------------------------
# main: settings, setup, data, model, validation, the loop, the exit; its helpers first.
def setup_distributed(cuda):
    """Join torchrun's process group: rank, world, device, a CPU group for votes."""
    # keys by restart attempt: a restarted worker never reads a dead group's addresses
    store, rank, world = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world)
    device = f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device, dist.new_group(backend="gloo") if cuda else dist.group.WORLD


def validation_layouts(cfg, default, needs=()):
    """The validation grid's layouts: --val_layouts' (checked, with the keys `needs`), or the mode's default."""
    if not cfg["val_layouts"]:
        return default
    layouts = [(f"{cfg['val_layouts']}:{line}", l) for line, l in read_jsonl(cfg["val_layouts"])]
    if not layouts:
        fail(f"--val_layouts={cfg['val_layouts']}: no layouts in it (one JSON object a line: prompt, phrases, boxes)")
    check_layouts(layouts)
    for where, l in layouts:
        if missing := [k for k in needs if k not in l and (l["boxes"] or k == "map")]:  # a map layout has no boxes
            fail(f"{where}: no {missing[0]}, which this mode's layouts need (docs/data.md)")
        if "map" in l and "map" not in needs:
            fail(f"{where}: a map is for the spatial-map mode (--maps)")
    return [l for _, l in layouts]


def restore(cfg, unet, resume):
    """Adapters to resume or init from; the step and optimizer state."""
    if resume:
        state = torch.load(resume / "state.pt", map_location="cpu", weights_only=True)
        for key in ("model", "resolution", "global_batch", "images", "inpaint", "keypoints", "map"):
            if state["config"].get(key, False) != cfg.get(key, False):  # a setting newer than the checkpoint: False
                fail(f"{resume} was trained with {key}={state['config'].get(key, False)!r}, this run has "
                     f"{key}={cfg[key]!r}. Run with the same {key}, or start a new out_dir with --init_from={resume}")
        if state["optimizer"] is None and not cfg["shard"]:
            fail(f"{resume} was saved by a sharded run (its optimizer state is in optimizer/): resume it with "
                 f"--shard=True, on any number of ranks, or start a new out_dir with --init_from={resume}")
        set_adapters(unet, read_safetensors(resume / "adapters.safetensors"), resume)
        return state["step"], resume / "optimizer" if state["optimizer"] is None else state["optimizer"]
    if cfg["init_from"]:
        set_adapters(unet, load_adapters(cfg["init_from"]), cfg["init_from"])
    return 0, None


VAL_OVERRIDES = dict(caption_keep=1.0, grounding_drop=0.0, timestep_power=1.0)  # validation's loss, levers off


def setup_validation(cfg, stages, data, layouts, unet, text_encoder, tokenizer, schedule, empty_ids, device, dtype,
                     autocast):
    """What validation needs: the grid's sampler, and its loss on fixed training batches."""
    import diffusers

    vae = load_model(diffusers.AutoencoderKL, cfg["model"], subfolder="vae", torch_dtype=dtype).to(device)
    sampler = getattr(diffusers, SCHEDULERS[stages.samplers[0]]).from_pretrained(cfg["model"], subfolder="scheduler")
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg["seed"]))[:cfg["val_images"]].tolist()
    chunks = (pick[j:j + cfg["micro_batch"]] for j in range(0, len(pick), cfg["micro_batch"]))
    val_cfg, inputs = {**cfg, **VAL_OVERRIDES}, stages.val_inputs(data, pick)

    def draw(layout):  # its first image (a clip's first frame)
        with autocast:
            im = stages.generate(unet, vae, text_encoder, tokenizer, sampler, [layout], [cfg["seed"]],
                                 steps=cfg["val_steps"], **inputs)
        return im.reshape(-1, *im.shape[-3:])[0]

    def image_losses(model, batch, g):
        return stages.loss(model, batch, g, text_encoder, schedule, empty_ids, val_cfg, autocast, per_image=True)

    batches = [{k: v.to(device) for k, v in data.collate(tokenizer, [data[(i, False)] for i in c]).items()}
               for c in chunks]
    return SimpleNamespace(layouts=layouts, draw=draw, image_losses=image_losses, batches=batches,
                           mirrored=stages.mirrored, seed=cfg["seed"])


def validate(val, step, unet, out, bar, write=True):
    """The grid (out/val_<step>.png), and the box-use losses (log.jsonl); write False: a sharded run's other ranks,
    computing along for the gathers."""
    images = [draw_grounding(Image.fromarray(val.draw(l)), l) for l in val.layouts]
    if not write:
        return val.batches and box_use_losses(val.image_losses, unet, val.batches, val.seed, mirrored=val.mirrored)
    grid = Image.new("RGB", (sum(im.width for im in images), images[0].height))
    for k, im in enumerate(images):
        grid.paste(im, (k * im.width, 0))
    grid.save(out / f"val_{step:07d}.png")
    if val.batches:
        rec = dict(step=step, **box_use_losses(val.image_losses, unet, val.batches, val.seed, mirrored=val.mirrored))
        pm = {k: f" +- {v:.5f}" if v is not None else "" for k, v in rec.items() if k.endswith("_se")}
        high = f"; high noise {rec['val_gap_high_noise']:+.5f}{pm['val_gap_high_noise_se']}" \
            if rec["val_gap_high_noise"] is not None else ""
        bar.write(f"val step {step} | loss with boxes {rec['val_loss_boxes']:.5f}, mirrored "
                  f"{rec['val_loss_mirrored']:.5f} (gap {rec['val_loss_mirrored'] - rec['val_loss_boxes']:+.5f}"
                  f"{pm['val_gap_se']}{high}), no grounding {rec['val_loss_no_grounding']:.5f}")
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


class Preemption:
    """SIGTERM or SIGUSR1 stops every rank at the same step, after a save."""

    def __init__(self, group):
        self.group, self.signals, self.vote, self.work = group, [], None, None
        self.handlers = {sig: signal.signal(sig, lambda num, frame: self.signals.append(signal.Signals(num).name))
                         for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def stop(self):
        """Whether every rank stops after this step."""
        if self.group is None:
            return bool(self.signals)
        if self.work is not None:
            self.work.wait()
        stop = self.vote is not None and self.vote.item() > 0
        self.vote = torch.tensor([float(bool(self.signals))])
        self.work = dist.all_reduce(self.vote, group=self.group, async_op=True)
        return stop

    def close(self):
        """Wait for the last vote; give the signals back."""
        if self.work is not None:
            self.work.wait()
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12}  # dense TFLOP/s per GPU


class Meter:
    """The log line's sums, on the device; the clock pauses for saves and validation."""

    def __init__(self, device, world):
        self.world, zero = world, torch.zeros((), device=device)
        self.loss, self.good, self.bad_run, self.worst_run = zero.clone(), zero.clone(), zero.clone(), zero.clone()
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, step_loss, ok):
        """A step's loss, and whether it was taken."""
        self.loss += torch.where(ok, step_loss, torch.zeros_like(step_loss))
        self.good += ok
        self.bad_run = (self.bad_run + 1) * ~ok
        self.worst_run = torch.maximum(self.worst_run, self.bad_run)
        self.steps += 1

    @contextmanager
    def pause(self):
        t = time.perf_counter()
        yield
        self.t0 += time.perf_counter() - t

    def read(self):
        """(mean loss of steps taken, steps, skipped, longest skipped run, seconds)."""
        if self.world > 1:
            dist.all_reduce(self.loss)
        good = int(self.good.item())  # .item() waits for the GPU, so the clock is right
        read = (self.loss.item() / self.world / max(good, 1), self.steps, self.steps - good,
                int(self.worst_run.item()), time.perf_counter() - self.t0)
        self.loss.zero_(), self.good.zero_(), self.worst_run.zero_()
        self.steps, self.t0 = 0, time.perf_counter()
        return read


def peak_memory():
    """Peak GPU memory, or on a CPU peak resident size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # in KiB on Linux


def log_line(out, rec, bar):
    """Print the log line, and append its record to out/log.jsonl."""
    skipped = f" | skipped {rec['skipped']} (NaN/Inf)" if rec["skipped"] else ""
    mfu = f" | MFU {100 * rec['mfu']:.1f}%" if "mfu" in rec else ""
    bar.write(f"step {rec['step']} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | {rec['img_per_s']:.1f} img/s{mfu} | "
              f"peak mem {rec['mem_gb']:.2f} GB{skipped}")
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def memory_plan(unet, text_encoder, params, shards=1, base=False):
    """Bytes a GPU holds before activations, computed: fp32 adapters, their gradients, AdamW's two moments (a
    1/shards share of each), and the frozen rest (the denoiser and text encoders; base_units' 1/shards with base)."""
    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    n = sum(p.numel() for p in params)
    held = size(t for m in (unet, text_encoder) for t in [*m.parameters(), *m.buffers()])
    split = size({id(p): p for b in base_units(unet, text_encoder) for p in b.parameters()
                  if not p.requires_grad}.values()) if base else 0
    return dict(adapters=4 * n // shards, gradients=4 * n // shards, adamw=8 * n // shards,
                frozen=held - 4 * n - split + split // shards)


def print_header(cfg, out, step, resume, n_params, memory):
    """Versions, config, the batch, the memory plan; log.jsonl cut back to the step resumed."""
    import diffusers
    import transformers

    gpu = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if torch.cuda.is_available() else "CPU"
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
          f"{gpu}")
    print(json.dumps(cfg))
    passes = f"{cfg['grad_accum']} pass" + ("es" if cfg["grad_accum"] > 1 else "")
    print(f"{cfg['images']} images; batch plan: {cfg['global_batch']} images a step = {cfg['world_size']} processes x "
          f"{passes} x {cfg['per_pass']} images (micro_batch {cfg['micro_batch']} at most); "
          f"{n_params / 1e6:.2f}M trainable parameters; "
          + (f"resuming from {resume}" if resume else f"adapters from {cfg['init_from'] or 'a fresh init'}"))
    print(f"memory a GPU holds before activations (computed): {sum(memory.values()) / 1e9:.3g} GB = "
          + " + ".join(f"{k} {v / 1e9:.3g}" for k, v in memory.items()))
    if step >= cfg["max_steps"]:
        print(f"note: {resume} is at step {step}, and --max_steps={cfg['max_steps']}: nothing to train (raise "
              f"--max_steps to train on)")
    if (out / "log.jsonl").exists():
        kept = [json.dumps(r) + "\n" for _, r in read_jsonl(out / "log.jsonl") if r["step"] <= step]
        (out / "log.jsonl").write_text("".join(kept))


def ignore_stop_signals(worker_id):
    """Loader workers leave SIGTERM and SIGUSR1 to the main process."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def main(cfg):
    check_settings(cfg)
    # Setup: DDP under torchrun, else one process; stages; precision.
    ddp, cuda = "RANK" in os.environ, torch.cuda.is_available()
    if cfg["shard"] and not ddp:
        fail("--shard=True runs under torchrun (torchrun --nproc_per_node=1 for one process)")
    rank, world, device, cpu_group = setup_distributed(cuda) if ddp else (0, 1, "cuda" if cuda else "cpu", None)
    master, G, out = rank == 0, cfg["global_batch"], Path(cfg["out_dir"])
    B, accum = batch_plan(G, cfg["micro_batch"], world)  # images a pass, passes a step, on each GPU
    stages = choose_stages(family_of(cfg["model"]), cfg["inpaint"], bool(cfg["image_features"]), cfg["keypoints"],
                           partial(load_map_net, cfg["maps"], cfg["map_encoder"]) if cfg["maps"] else None)
    bf16 = cfg["dtype"] == "bf16" or cfg["dtype"] == "auto" and cuda
    base_dtype = torch.bfloat16 if bf16 else torch.float32  # the frozen base's; adapters stay fp32
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    preemption = Preemption(cpu_group)

    # Data: checked before the model loads, so bad data fails in seconds.
    data = stages.training_data(cfg)
    if len(data) < G:
        fail(f"{cfg['latents']} has {len(data)} usable images, fewer than one global batch ({G})")
    layouts = validation_layouts(cfg, stages.val_layouts(data), stages.layout_needs)
    if cfg["init_from"] and missing_local_path(cfg["init_from"]):
        fail(f"--init_from={cfg['init_from']}: adapters not found")

    # Model: the frozen base + fp32 adapters.
    unet, text_encoder, tokenizer, noise_scheduler = stages.load(cfg["model"], device, base_dtype)
    schedule = stages.schedule(noise_scheduler, cfg["model"], device)
    torch.manual_seed(cfg["seed"])  # the same init on any number of processes
    stages.add_adapters(unet)
    for p in adapter_params(unet):
        p.data = p.data.float()
    resume = [latest_good_checkpoint(out, set_aside=True) if master else None]
    if ddp:
        dist.broadcast_object_list(resume, src=0, group=cpu_group)
    cfg = {**cfg, "world_size": world, "per_pass": B, "grad_accum": accum, **data.config,
           "prediction_type": schedule.prediction_type}
    if cfg["val_every"] and cfg["val_steps"] > noise_scheduler.config.num_train_timesteps:
        fail(f"--val_steps={cfg['val_steps']}: at most {noise_scheduler.config.num_train_timesteps}, the scheduler's "
             f"timesteps")
    step, opt_state = restore(cfg, unet, resume[0])
    params = [p.requires_grad_(True) for p in adapter_params(unet)]
    memory = memory_plan(unet, text_encoder, params, world if cfg["shard"] else 1, cfg["shard_base"])
    has = torch.cuda.get_device_properties(device).total_memory if cuda else math.inf
    if sum(memory.values()) > has:
        sharded = sum(memory_plan(unet, text_encoder, params, world, base=True).values())
        fail(f"{cfg['model']} needs {sum(memory.values()) / 1e9:.1f} GB a GPU before activations (computed: "
             + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in memory.items()) + f"), more than this GPU's "
             f"{has / 1e9:.1f} GB" + (f"; --shard=True --shard_base=True would hold {sharded / 1e9:.1f} GB on "
                                      f"{world} GPUs" if not cfg["shard_base"] and sharded < has else "")
             + " (docs/families.md)")
    if cfg["grad_checkpointing"]:  # each block checkpointed, fusers included
        if not getattr(unet, "_supports_gradient_checkpointing", False):
            fail(f"--grad_checkpointing=True: diffusers' {type(unet).__name__} does not support it")
        unet.enable_gradient_checkpointing()
        unet.train()  # older diffusers checkpoint in training mode only
    # the model the step calls: DDP-wrapped (gradients all-reduced) or sharded (reduce-scattered), compiled
    device_ids = [torch.cuda.current_device()] if cuda else None
    if cfg["shard"]:
        model = shard_model(unet, text_encoder, cfg["shard_base"])
        params = adapter_params(unet)  # now shards (DTensors)
    else:
        model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=device_ids) if ddp else unet
    model = torch.compile(model, backend=cfg["compile"]) if cfg["compile"] else model
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=True)
    if opt_state:
        load_optimizer_state(unet, opt, opt_state) if cfg["shard"] else opt.load_state_dict(opt_state)
    empty_ids = tokenizer.captions([""]).to(device)  # the dropped caption
    levers = make_levers(unet, cfg)  # None under GLIGEN's recipe
    # Each rank loads its own micro-batches from the step's position.
    loader = iter(torch.utils.data.DataLoader(
        data, batch_sampler=rank_batches(len(data), G, B, world, rank, cfg["seed"], step,
                                         cfg["flip"] and data.has_flipped),
        num_workers=cfg["num_workers"], collate_fn=partial(data.collate, tokenizer), pin_memory=cuda,
        worker_init_fn=ignore_stop_signals))

    # Logging and validation on rank 0; a step's FLOPs, for the MFU.
    out.mkdir(parents=True, exist_ok=True)
    if master:
        print_header(cfg, out, step, resume[0], sum(p.numel() for p in params), memory)
    val = setup_validation(cfg, stages, data, layouts, unet, text_encoder, tokenizer, schedule, empty_ids, device,
                           base_dtype, autocast) if (master or cfg["shard"]) and cfg["val_every"] else None
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=not master, dynamic_ncols=True)
    if val and step == 0:
        validate(val, step, unet, out, bar, master)  # the base, before training
    # on one image, in a pass of its own (the counter may pick other kernels)
    probe = {k: v.to(device) for k, v in data.collate(tokenizer, [data[(0, False)]]).items()}
    flops = count_flops(lambda: stages.loss(unet, probe, torch.Generator(device).manual_seed(0), text_encoder,
                                            schedule, empty_ids, cfg, autocast, levers).backward())
    opt.zero_grad(set_to_none=True)
    peak = next((v for k, v in PEAK_BF16.items() if cuda and k in torch.cuda.get_device_name()), 0)
    meter = Meter(device, world)
    if master:
        bar.write(f"one step: {flops / 1e12:.4g} TFLOP per image (model FLOPs, torch flop counter)"
                  + (f"; {peak / 1e12:.0f} TFLOP/s bf16 peak per GPU" if peak else ""))

    # The loop: accumulate, step, log, save, validate; stop at max_steps or a signal.
    while step < cfg["max_steps"]:
        lr = cfg["lr"] * min(1.0, (step + 1) / max(1, cfg["warmup_steps"]))  # linear warmup, then constant
        for group in opt.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(loader).items()}
            g = sample_generator(cfg["seed"], step, (micro * world + rank) * B, device)
            with reduced_on(model, micro == accum - 1):  # all-reduce (or reduce-scatter) once
                loss = stages.loss(model, batch, g, text_encoder, schedule, empty_ids, cfg, autocast, levers) / accum
                loss.backward()
            step_loss += loss.detach()
        # a NaN or Inf on any rank makes the all-reduced norm non-finite: the step is skipped
        meter.add(step_loss, optimizer_step(opt, params, cfg["grad_clip"]))
        step += 1
        bar.update()
        stop, last = preemption.stop(), step == cfg["max_steps"]
        if step % cfg["log_every"] == 0 or last or stop:  # the record is built here: a field is one line
            mean_loss, steps, skipped, worst, seconds = meter.read()
            speed = steps * G / seconds
            rec = dict(step=step, loss=round(mean_loss, 6), lr=lr, img_per_s=round(speed, 2),
                       mem_gb=round(peak_memory() / 2**30, 2), skipped=skipped, tflop_per_image=round(flops / 1e12, 6),
                       max_steps=cfg["max_steps"], left_s=round((cfg["max_steps"] - step) * G / speed))
            if peak:  # model-FLOPs utilisation against the bf16 peak
                rec["mfu"] = round(flops * speed / world / peak, 4)
            if master:
                log_line(out, rec, bar)
            if worst >= cfg["max_bad_steps"]:
                fail(f"{worst} steps in a row had a NaN or Inf loss or gradient (by step {step}): stopping. Skipped "
                     f"steps leave the adapters untouched, so nothing poisoned was saved; look for bad latents in "
                     f"{cfg['latents']}, or lower lr")
        with meter.pause():  # not counted against images/s
            if step % cfg["save_every"] == 0 or last or stop:
                staged = checkpoint_dir(out, step).with_suffix(".optimizer.tmp")
                gathered = gather_state(unet, opt, staged) if cfg["shard"] else None
                error = [save_checkpoint(out, step, unet, opt, cfg, data.files, gathered) if master else None]
                if ddp:
                    dist.broadcast_object_list(error, src=0, group=cpu_group)  # and no rank runs ahead of a save
                if error[0]:
                    fail(error[0])
            if val and (step % cfg["val_every"] == 0 or last):
                validate(val, step, unet, out, bar, master)
        if stop:
            why = ", ".join(preemption.signals) or "another rank got a signal"
            bar.write(f"rank {rank}: {why}: stopped at step {step}, saved {checkpoint_dir(out, step)}; run the same "
                      f"command to resume\n", end="")  # one write: ranks' lines never interleave
            break

    # The exit.
    bar.close()
    preemption.close()
    if ddp:
        dist.destroy_process_group()
    return unet, text_encoder


# =================================================================================================================
# The levers that may make boxes count sooner (docs/time-to-grounding.md), off by default; levers is None when
# off. --timestep_power is draw_timesteps'.
def make_levers(unet, cfg):
    """The Levers of these settings, or None where they are off."""
    if cfg["box_loss_weight"] == 1 and cfg["box_attn_loss"] == 0:
        return None
    return Levers(unet, cfg["box_loss_weight"], cfg["box_attn_loss"])


class Levers:
    """The loss with --box_loss_weight's in-box weights and --box_attn_loss's attention term."""

    def __init__(self, unet, box_loss_weight, box_attn_loss):
        self.weight, self.attn_weight = box_loss_weight, box_attn_loss
        self.attention = BoxAttention(unet) if box_attn_loss > 0 else None

    def loss(self, pred, target, batch):
        if self.weight == 1:
            loss = F.mse_loss(pred, target)
        else:
            loss = box_weighted_mse(pred, target, batch["boxes"], batch["masks"], self.weight)
        if self.attention is not None:
            loss = loss + self.attn_weight * self.attention.loss()
        return loss


def box_cells(boxes, h, w):
    """(B, S, h, w): the grid cells each box covers, rounded as GLIGEN and diffusers: rows int(y0 h) to int(y1 h)."""
    b = boxes.double() * torch.tensor([w, h, w, h], dtype=torch.float64, device=boxes.device)
    b = b.floor()[..., None]  # (B, S, 4, 1)
    x, y = torch.arange(w, device=boxes.device), torch.arange(h, device=boxes.device)
    return ((y >= b[:, :, 1]) & (y < b[:, :, 3]))[..., :, None] & ((x >= b[:, :, 0]) & (x < b[:, :, 2]))[..., None, :]


def in_boxes(boxes, masks, h, w):
    """(B, 1, h, w): 1 inside any filled slot's box."""
    return (box_cells(boxes, h, w) & (masks[..., None, None] > 0)).any(1, keepdim=True).float()


def box_weighted_mse(pred, target, boxes, masks, weight):
    """The MSE, `weight` inside the boxes, normalised per image (GeoDiffusion's)."""
    h, w = target.shape[-2:]
    m = 1 + (weight - 1) * in_boxes(boxes, masks, h, w)  # (B, 1, h, w)
    m = m.view(len(target), *[1] * (target.dim() - 3), h, w).expand_as(target)
    return (((pred - target) ** 2 * m).flatten(1).mean(1) / m.flatten(1).mean(1)).mean()


class BoxAttention:
    """Ask each fuser's visual tokens in box k to attend to grounding token k (a cross-entropy of its attention
    logits; tokens in no box are left alone): it reaches the position net while the gates are closed. Hooks catch
    what it needs; with gradient checkpointing they run again in backward, and that is dropped at the next forward."""

    def __init__(self, unet):
        self.targets, self.losses, self.caught = None, [], {}
        unet.position_net.register_forward_pre_hook(self.start, with_kwargs=True)
        for fuser in (m for m in unet.modules() if isinstance(m, Fuser)):
            fuser.attn.to_q.register_forward_hook(self.catch)
            fuser.attn.to_k.register_forward_hook(self.catch)
            fuser.register_forward_hook(self.hook)

    def loss(self):  # the mean over the fusers (none without gradients)
        return torch.stack(self.losses).mean() if self.losses else 0.0

    def on(self):
        return self.targets is not None and torch.is_grad_enabled()

    def start(self, position_net, args, kwargs):
        self.losses, self.caught = [], {}
        self.targets = (kwargs["boxes"], kwargs["masks"]) if torch.is_grad_enabled() else None

    def catch(self, linear, args, out):  # to_q: the visual tokens'; to_k: theirs, then grounding's
        if self.on():
            self.caught[linear] = out

    def hook(self, fuser, args, out):
        if not self.on():
            return
        (x, objs), (boxes, masks) = args[:2], self.targets  # args[2]: Flux's position code
        B, N, heads = x.shape[0], x.shape[1], fuser.attn.heads
        h = math.isqrt(N)  # the block's token grid: the latent's, downsampled
        if h * h != N:
            fail(f"--box_attn_loss: a fuser's {N} tokens are not a square grid, as the training latents are")
        r = objs.shape[1] // masks.shape[1]  # tokens per slot: 1, text-image's 2
        masks = masks.repeat(1, r)
        cells = box_cells(boxes.repeat(1, r, 1), h, h) & (masks[..., None, None] > 0)  # (B, r S, h, w)
        target = cells.flatten(2).transpose(1, 2).float()  # (B, N, r S)
        inside = target.sum(-1)  # (B, N): tokens each is sent to
        q = self.caught.pop(fuser.attn.to_q).view(B, N, heads, -1).transpose(1, 2)
        k = self.caught.pop(fuser.attn.to_k)[:, N:]  # the grounding tokens' keys
        k = k.reshape(B, -1, heads, q.shape[-1]).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])  # (B, heads, N, r S)
        logp = logits.masked_fill(masks[:, None, None] == 0, -1e9).log_softmax(-1)
        ce = -(target[:, None] / inside.clamp(min=1)[:, None, :, None] * logp).sum(-1).mean(1)
        self.losses.append((ce * (inside > 0)).sum() / (inside > 0).sum().clamp(min=1))


# =================================================================================================================
# Sharded training (--shard=True): FSDP2 instead of DDP. Each fuser and the position net is a unit split across the
# ranks, and with --shard_base=True each frozen block of the denoiser and of T5.
# Checkpoints hold the adapters whole, and the optimizer state as each rank's shards (torch.distributed.checkpoint),
# which a run on any number of ranks reshards as it loads.
GATES = (".alpha_attn", ".alpha_dense")  # 0-d, which FSDP2 cannot split: (1,) while sharded


def shard_model(unet, text_encoder, base):
    """The UNet with its adapters (and with base, base_units) sharded; the GATES (1,) until saved."""
    from torch.distributed.fsdp import fully_shard

    names = set(adapter_state(unet))
    for name, p in unet.named_parameters():
        if name.endswith(GATES):
            p.data = p.data.reshape(1)
    for m in [m for m in unet.modules() if isinstance(getattr(m, "fuser", None), Fuser)]:
        fully_shard(m.fuser)
    fully_shard(unet.position_net)
    for unit in base_units(unet, text_encoder) if base else []:
        fully_shard(unit, reshard_after_forward=True)  # else T5, a root, stays gathered
    return fully_shard(unet, ignored_params={p for k, p in unet.named_parameters() if k not in names})


def base_units(unet, text_encoder):
    """--shard_base's units, inner first: the denoiser's frozen blocks, T5's, and T5 (sharded CLIPs lose
    hidden_states)."""
    t5 = getattr(text_encoder, "t5", None)
    return frozen_blocks(unet) + ([*t5.encoder.block, t5] if t5 is not None else [])


def frozen_blocks(model):
    """The items of the denoiser's outermost ModuleLists, adapters aside."""
    def walk(m):
        for child in m.children():
            if all(p.requires_grad for p in child.parameters()):  # an adapter
                continue
            yield from child if isinstance(child, nn.ModuleList) else walk(child)

    return list(walk(model))


def gather_state(unet, opt, optimizer_dir):
    """(whole adapters, optimizer_dir) on rank 0, else None; a collective: every rank writes its optimizer shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    if dist.get_rank() == 0:  # dcp.save's first collective waits for it
        shutil.rmtree(optimizer_dir, ignore_errors=True)
    dcp.save(get_optimizer_state_dict(unet, opt), checkpoint_id=optimizer_dir)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model = get_model_state_dict(unet, options=whole)
    if dist.get_rank() != 0:
        return None
    names = set(adapter_state(unet))
    return {k: v.reshape(()) if k.endswith(GATES) else v for k, v in model.items() if k in names}, optimizer_dir


def load_optimizer_state(unet, opt, state):
    """An optimizer state into a sharded run's optimizer: a sharded run's optimizer/ (resharded as it loads), or a
    whole one (opt.state_dict()'s keys, a DDP run's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, \
        set_optimizer_state_dict

    if isinstance(state, Path):
        optim = get_optimizer_state_dict(unet, opt)
        dcp.load(optim, checkpoint_id=state)
        set_optimizer_state_dict(unet, opt, optim)
        return
    names = [k for k, p in unet.named_parameters() if p.requires_grad]
    shape = {k: p.shape for k, p in unet.named_parameters()}
    optim = dict(state={names[i]: {k: v.reshape(shape[names[i]]) if k != "step" else v for k, v in st.items()}
                        for i, st in state["state"].items()},
                 param_groups=[{**state["param_groups"][0], "params": names}])
    set_optimizer_state_dict(unet, opt, optim, options=StateDictOptions(full_state_dict=True))


# =================================================================================================================
# SDXL: two text encoders and size conditioning. Replaces load, training_data, loss and generate.
class SDXLTextEncoders(nn.Module):
    """SDXL's two text encoders as one on ids (B, 2, L): the context both penultimate states; a phrase's feature
    ViT-L's EOS beside bigG's projected one (2048, the UNet's context width)."""

    def __init__(self, te1, te2):
        super().__init__()
        self.te1, self.te2 = te1, te2

    def forward(self, ids, attention_mask=None):
        o1 = self.te1(ids[:, 0], attention_mask=attention_mask, output_hidden_states=True)
        o2 = self.te2(ids[:, 1], attention_mask=attention_mask, output_hidden_states=True)
        return SimpleNamespace(last_hidden_state=torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1),
                               pooler_output=torch.cat([o1.pooler_output, o2.text_embeds], -1),
                               text_embeds=o2.text_embeds)


class SDXLTokenizers:
    """SDXL's two tokenizers as one: ids (B, 2, L)."""

    def __init__(self, first, second):
        self.pair = (first, second)

    def captions(self, texts):
        return torch.stack([t.captions(texts) for t in self.pair], 1)

    def phrases(self, phrases):
        (ids, mask), (ids2, _) = (t.phrases(phrases) for t in self.pair)
        return torch.stack([ids, ids2], 1), mask


def load_sdxl(model, device, dtype):
    """SDXL's frozen parts: both text encoders as one, both tokenizers."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    unet, text_encoder, tokenizer, scheduler = load_sd(model, device, dtype)
    with loading(model):
        te2 = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", torch_dtype=dtype)
        tokenizer2 = Tokenizer(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2"))
    te2 = te2.to(device).requires_grad_(False)
    return unet, SDXLTextEncoders(text_encoder, te2), SDXLTokenizers(tokenizer, tokenizer2), scheduler


@dataclass(slots=True)
class SDXLItem(Item):
    time_ids: tuple  # original (H, W), crop top and left, target (R, R)
    flipped_left: int  # the mirrored crop's left


class SDXLLatents(GroundedLatents):
    """SDXL's samples carry their time ids, the mirror's if flipped."""
    Item = SDXLItem

    def item(self, rec, lay):
        time_ids, flipped_left = self.time_ids(rec, self.resolution)
        return super().item(rec, lay, time_ids=time_ids, flipped_left=flipped_left)

    @staticmethod
    def time_ids(rec, R):
        """SDXL's time ids of a crop at side R, and the mirrored crop's left."""
        x0, y0, x1, _ = rec["crop"]
        scale = R / (x1 - x0)
        top, left, width = round(y0 * scale), round(x0 * scale), round(rec["width"] * scale)
        return (rec["height"], rec["width"], top, left, R, R), width - left - R

    def __getitem__(self, sample):
        x, it = super().__getitem__(sample), self.items[sample[0]]
        x["time_ids"] = (*it.time_ids[:3], it.flipped_left, *it.time_ids[4:]) if sample[1] else it.time_ids
        return x

    def collate(self, tokenizer, samples):
        batch = super().collate(tokenizer, samples)
        batch["time_ids"] = torch.tensor([x["time_ids"] for x in samples], dtype=torch.float32)
        return batch


def sdxl_training_data(cfg):
    return training_data(cfg, SDXLLatents)


def sdxl_loss(model, batch, g, text_encoder, schedule, empty_ids, cfg, autocast=nullcontext(), levers=None,
              per_image=False):
    """sd_loss, the UNet also given SDXL's pooled text and time ids."""
    x0, xt, t, target, ids, masks = noised(batch, g, schedule, empty_ids, cfg)
    with torch.no_grad(), autocast:
        text = text_encoder(ids)
        gligen = text_box_grounding(text_encoder, batch, masks)
    added = dict(text_embeds=text.text_embeds, time_ids=batch["time_ids"])
    with autocast:
        pred = model(xt, t, encoder_hidden_states=text.last_hidden_state, added_cond_kwargs=added,
                     cross_attention_kwargs={"gligen": gligen}).sample
    return denoising_loss(pred, target, batch, levers, per_image, t.float() / len(schedule.alphas_cumprod))


def sdxl_prompt_inputs(text_encoder, tokenizer, prompt, n, height, width):
    """As SDXL's pipeline: zero unconditional text; size conditioning."""
    ids = tokenizer.captions(["", prompt]).to(next(text_encoder.parameters()).device)
    encoded = text_encoder(ids)
    text = torch.cat([torch.zeros_like(encoded.last_hidden_state[:1]), encoded.last_hidden_state[1:]])
    pooled = torch.cat([torch.zeros_like(encoded.text_embeds[:1]), encoded.text_embeds[1:]])
    time_ids = torch.tensor([[height, width, 0, 0, height, width]] * 2, device=text.device, dtype=text.dtype)
    return {"encoder_hidden_states": text.repeat_interleave(n, dim=0),
            "added_cond_kwargs": {"text_embeds": pooled.repeat_interleave(n, dim=0),
                                  "time_ids": time_ids.repeat_interleave(n, dim=0)}}


def generate_sdxl(*args, **kwargs):
    return generate(*args, prompt_inputs=sdxl_prompt_inputs, **kwargs)


FAMILIES["sdxl"] = dict(load=load_sdxl, training_data=sdxl_training_data, loss=sdxl_loss, generate=generate_sdxl)


# =================================================================================================================
# Video (ModelScope, Zeroscope). Replaces load, add_adapters (spatial blocks), training_data (images as
# one-frame clips) and generate (clips, boxes still or per frame).
def load_video(model, device, dtype):
    return load_sd(model, device, dtype, unet_class="UNet3DConditionModel")


class NoFuser(nn.Module):
    """The temporal blocks get the grounding kwargs too, and ignore them."""

    def forward(self, x, objs):
        return x


def spatial_blocks(unet):
    """The transformer blocks of the spatial transformers, in module order."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return [b for m in unet.modules() if isinstance(m, Transformer2DModel) for b in m.transformer_blocks]


def video_position_net(unet, args, kwargs):
    """The video UNet makes no grounding tokens: make them on the way in."""
    gligen = (kwargs.get("cross_attention_kwargs") or {}).get("gligen")
    if gligen is not None and "objs" not in gligen:
        kwargs["cross_attention_kwargs"] = {**kwargs["cross_attention_kwargs"],
                                            "gligen": {"objs": unet.position_net(**gligen)}}
    return args, kwargs


def inject_video(unet):
    """Fusers in the spatial blocks, tokens per frame; NoFuser in the temporal ones."""
    for block in transformer_blocks(unet):
        block.fuser = NoFuser()
    inject_gligen(unet, blocks=spatial_blocks)
    unet.register_forward_pre_hook(video_position_net, with_kwargs=True)
    return unet


class OneFrameLatents(GroundedLatents):
    """Images as one-frame clips: latents (b, stats, 4, 1, h, w)."""

    def collate(self, tokenizer, samples):
        batch = super().collate(tokenizer, samples)
        batch["latents"] = batch["latents"][:, :, :, None]
        return batch


def video_training_data(cfg):
    return training_data(cfg, OneFrameLatents)


@torch.no_grad()
def generate_video(unet, vae, text_encoder, tokenizer, scheduler, layouts, seeds, n=1, steps=25, guidance=7.5,
                   beta=1.0, height=None, width=None, progress=False, frames=1):
    """n clips of each layout; boxes still or one list per frame."""
    scale = vae_scale(vae)
    height, width = height or native_size(unet, vae), width or native_size(unet, vae)
    text = stack_halves([prompt_inputs(text_encoder, tokenizer, l["prompt"], n, height, width) for l in layouts])
    dtype = text["encoder_hidden_states"].dtype
    per_frame = [l["boxes"] if is_moving(l["boxes"]) else [l["boxes"]] * frames for l in layouts]
    for b in per_frame:
        if len(b) != frames:
            fail(f"{len(b)} lists of boxes for {frames} frames")
    rows = [[(l["phrases"], b[f]) for _ in range(2 * n) for f in range(frames)]  # frame-minor
            for l, b in zip(layouts, per_frame)]
    gligen = batch_grounding(text_encoder, tokenizer, layouts, seeds, rows, dtype, layout_grounding)
    latents, streams = batch_noise(seeds, (n, unet.config.out_channels, frames, height // scale, width // scale))
    latents = denoise(unet, scheduler, latents.to(unet.device), text, gligen, streams, steps, guidance, beta, progress)
    images = decode(vae, latents.transpose(1, 2).flatten(0, 1))  # -> frames (K n F, C, h, w)
    return images.reshape(-1, frames, *images.shape[1:])


FAMILIES["video"] = dict(load=load_video, add_adapters=inject_video, training_data=video_training_data,
                         generate=generate_video)


# =================================================================================================================
# Inpainting, GLIGEN's mode: generate inside the boxes, keep the image outside. Replaces load (conv_in widened),
# loss (the kept image and mask as inputs), generate and val_inputs.
def widen_conv_in(unet):
    """conv_in takes [noisy latent, z * m, mask m]; the new inputs zero, the UNet starts as its base."""
    old, c = unet.conv_in, unet.conv_in.in_channels
    new = nn.Conv2d(2 * c + 1, old.out_channels, old.kernel_size, padding=old.padding, device="meta")
    new = new.to_empty(device=old.weight.device).to(old.weight.dtype)  # every value is set below
    with torch.no_grad():
        new.weight.zero_()[:, :c] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new.requires_grad_(False)
    unet.register_to_config(in_channels=2 * c + 1)
    return unet


def load_inpaint(model, device, dtype):
    unet, text_encoder, tokenizer, scheduler = load_sd(model, device, dtype)
    return widen_conv_in(unet), text_encoder, tokenizer, scheduler


def inpaint_mask(boxes, masks, h, w):
    """(B, 1, h, w): 0 inside the boxes, 1 where kept."""
    return 1 - in_boxes(boxes, masks, h, w)


def with_kept(x, z, m):
    """The inpainting UNet's input: [x, the kept latent z * m, the mask m]."""
    return torch.cat([x, z * m, m], dim=1)


def inpaint_loss(model, batch, g, text_encoder, schedule, empty_ids, cfg, autocast=nullcontext(), levers=None,
                 per_image=False):
    """sd_loss, the UNet also given the sample outside all its boxes, even where grounding is dropped."""
    x0, xt, t, target, ids, masks = noised(batch, g, schedule, empty_ids, cfg)
    x = with_kept(xt, x0, inpaint_mask(batch["boxes"], batch["masks"], *x0.shape[-2:]))
    with torch.no_grad(), autocast:
        text = text_encoder(ids).last_hidden_state
        gligen = text_box_grounding(text_encoder, batch, masks)
    with autocast:
        pred = model(x, t, encoder_hidden_states=text, cross_attention_kwargs={"gligen": gligen}).sample
    return denoising_loss(pred, target, batch, levers, per_image, t.float() / len(schedule.alphas_cumprod))


@torch.no_grad()
def generate_inpaint(unet, vae, text_encoder, tokenizer, scheduler, layouts, seeds, inpaint_latent,
                     layout_grounding=layout_grounding, **kwargs):
    """As generate, inpaint_latent pasted in outside the boxes each step, as diffusers does."""
    z = inpaint_latent.to(unet.device, torch.float32)

    def draw(layout, seed):
        boxes = torch.tensor(layout["boxes"], dtype=torch.float64).reshape(1, -1, 4)
        m = inpaint_mask(boxes, torch.ones(1, len(layout["boxes"])), *z.shape[-2:]).to(unet.device)

        def model_input(scheduler, latents, t, g):
            noisy = scheduler.add_noise(z, torch.randn(z.shape, generator=g).to(unet.device), t.reshape(1))
            latents, x = both_halves(scheduler, noisy * m + latents * (1 - m), t, g)
            kept = (v.to(unet.dtype).expand(len(x), -1, -1, -1) for v in (z, m))
            return latents, with_kept(x.to(unet.dtype), *kept)

        return generate(unet, vae, text_encoder, tokenizer, scheduler, [layout], [seed], model_input=model_input,
                        layout_grounding=layout_grounding, **kwargs)

    return np.concatenate([draw(l, s) for l, s in zip(layouts, seeds)])


def inpaint_val_inputs(data, pick):
    """The grid fills its boxes into a training image."""
    return dict(trained_size(data, pick), inpaint_latent=data[(pick[0] if pick else 0, False)]["latent"][:1].float())


MODES[True, False, False, False] = dict(load=load_inpaint, loss=inpaint_loss, generate=generate_inpaint,
                                        val_inputs=inpaint_val_inputs)


# =================================================================================================================
# Text-image, GLIGEN's mode: a box has a phrase, a reference image, or both. Replaces add_adapters, training_data,
# loss and generate.
class PositionNetTextImage(nn.Module):
    """The box code goes to two MLPs, with phrase and image features: 30 text, then 30 image tokens."""

    def __init__(self, dim, n_freqs=8):
        super().__init__()
        self.linears_text, self.linears_image = position_mlp(dim, n_freqs), position_mlp(dim, n_freqs)
        self.null_text_feature = nn.Parameter(torch.zeros(dim))
        self.null_image_feature = nn.Parameter(torch.zeros(dim))
        self.null_position_feature = nn.Parameter(torch.zeros(8 * n_freqs))

    def forward(self, boxes, masks, phrases_masks, image_masks, phrases_embeddings, image_embeddings):
        pos = or_null(masks, fourier_boxes(boxes), self.null_position_feature)
        phr = or_null(phrases_masks, phrases_embeddings, self.null_text_feature)
        img = or_null(image_masks, image_embeddings, self.null_image_feature)
        return torch.cat([self.linears_text(torch.cat([phr, pos], -1)), self.linears_image(torch.cat([img, pos], -1))],
                         dim=1)  # (B, 60, D)


def project_image_embeds(image_embeds, weight, norm=28.7):
    """CLIP image embeddings through image_project, scaled to norm 28.7."""
    f = F.linear(image_embeds, weight)
    return torch.stack([r / r.norm() * norm for r in f])  # row by row, as the pipeline: the same bits


def load_image_project(src, required=True):
    """image_project's weight, beside adapters or in a diffusers model."""
    from diffusers import CLIPImageProjection

    path = adapters_file(src)
    if path is not None and path.with_name("image_project.safetensors").is_file():
        return read_safetensors(path.with_name("image_project.safetensors"))["project.weight"]
    why = ""
    if path is None:
        try:
            return load_model(CLIPImageProjection, src, subfolder="image_project").project.weight.detach()
        except (OSError, ValueError) as e:
            why = f": {e}"
    if required:
        fail(f"{src}: no image_project (text-image adapters keep image_project.safetensors beside them; a diffusers "
             f"text-image model, an image_project folder){why}")
    return None


def load_clip_tower(cls, src, **kwargs):
    """One tower of a CLIP model, quietly."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return cls.from_pretrained(src, **kwargs)
    finally:
        logging.set_verbosity(level)


@dataclass(slots=True)
class ImageFeatureItem(Item):
    feature_shard: Path
    feature_rows: np.ndarray


class ImageFeatureLatents(GroundedLatents):
    """Text-image samples also hold their kept boxes' image features (k, D)."""
    Item = ImageFeatureItem

    def __init__(self, latents_dir, boxes_path, max_boxes, min_box_area, image_features):
        self.features = Path(image_features)
        if not (self.features / "index.jsonl").is_file():
            fail(f"data file not found: {self.features / 'index.jsonl'} (write it with prep_latents.py "
                 f"--image_encoder)")
        self.image_meta = json.loads((self.features / "meta.json").read_text())
        if "dim" not in self.image_meta:
            fail(f"{self.features} holds no box image features (its meta.json is not prep_latents.py "
                 f"--image_encoder's: latents? Those go in --latents)")
        if not (self.features / "image_project.safetensors").is_file():
            fail(f"data file not found: {self.features / 'image_project.safetensors'} (prep_latents.py "
                 f"--image_encoder writes it with the features)")
        self.feature_index = {r["key"]: (line, r) for line, r in read_jsonl(self.features / "index.jsonl")}
        super().__init__(latents_dir, boxes_path, max_boxes, min_box_area)
        self.config["image_encoder"] = self.image_meta["image_encoder"]
        self.files = [self.features / "image_project.safetensors"]  # kept with the adapters

    def item(self, rec, lay):
        keep = self.crop_layout(lay, rec["crop"], self.max_boxes, self.min_box_area)[2]
        if rec["key"] not in self.feature_index:
            fail(f"{self.features / 'index.jsonl'} has no record for image {rec['key']!r} of "
                 f"{self.dir / 'index.jsonl'}: were the features made from the same images?")
        line, f = self.feature_index[rec["key"]]
        if f["boxes"] != len(lay["boxes"]):
            fail(f"{self.features / 'index.jsonl'}:{line}: {f['boxes']} box features for image {rec['key']!r}, but "
                 f"its boxes record has {len(lay['boxes'])} boxes: were the features made from another boxes file?")
        shard, _ = self.need(self.features / f["shard"], f["row"] + f["boxes"] - 1, (self.image_meta["dim"],))
        return super().item(rec, lay, feature_shard=shard, feature_rows=f["row"] + np.asarray(keep, np.int64))

    def __getitem__(self, sample):
        x, it = super().__getitem__(sample), self.items[sample[0]]
        x["image_feats"] = self.array(it.feature_shard)[it.feature_rows].astype(np.float32)
        return x

    def collate(self, tokenizer, samples):
        """... and each box's image feature in its slot (B, 30, D)."""
        batch = super().collate(tokenizer, samples)
        f = np.zeros((len(samples), N_SLOTS, self.image_meta["dim"]), np.float32)
        for i, x in enumerate(samples):
            f[i, :len(x["image_feats"])] = x["image_feats"]
        batch["image_feats"] = torch.from_numpy(f)
        return batch


def text_image_training_data(cfg):
    """The training set with box image features, checked against the model."""
    from diffusers import UNet2DConditionModel

    data = training_data(cfg, partial(ImageFeatureLatents, image_features=cfg["image_features"]))
    with loading(cfg["model"]):
        D = UNet2DConditionModel.load_config(cfg["model"], subfolder="unet")["cross_attention_dim"]
    if data.image_meta["dim"] != D:
        fail(f"{cfg['image_features']}: image features of {data.image_meta['dim']}, but {cfg['model']} takes {D} "
             f"(SD1.x: a CLIP ViT-L/14, SD2.x: an OpenCLIP ViT-H/14 image encoder)")
    own = load_image_project(cfg["init_from"], required=False) if cfg["init_from"] else None
    if own is not None and not torch.equal(own.float(), read_safetensors(data.files[0])["project.weight"]):
        fail(f"{cfg['image_features']} was made with another image_project than {cfg['init_from']}'s: "
             f"run prep_latents.py --image_encoder with --image_project={cfg['init_from']}")
    return data


def text_image_inputs(boxes, masks, has_phrase, has_image, phrase_feats, image_feats):
    """The text-image position net's inputs under diffusers' names."""
    return {"boxes": boxes, "masks": masks, "phrases_masks": masks * has_phrase, "image_masks": masks * has_image,
            "phrases_embeddings": phrase_feats, "image_embeddings": image_feats}


def text_image_grounding(text_encoder, batch, masks, g):
    """Text-image training: half the boxes lose their phrase or image, drawn from g."""
    drop = torch.rand(masks.shape, generator=g, device=masks.device) < 0.5
    image_side = torch.rand(masks.shape, generator=g, device=masks.device) < 0.5
    feats = text_encoder(batch["phrase_ids"], attention_mask=batch["phrase_mask"]).pooler_output  # (U, D)
    return text_image_inputs(batch["boxes"], masks, ~(drop & ~image_side), ~(drop & image_side),
                             feats[batch["slot_phrase"]], batch["image_feats"])


def text_image_layout_grounding(text_encoder, tokenizer, layout, rows, dtype):
    """Text-image sampling: a box's phrase, reference image feature, or both."""
    device, phrases = next(text_encoder.parameters()).device, layout["phrases"]
    _, _, _, boxes, masks = layout_tensors(tokenizer, [([q or "" for q in phr], b) for phr, b in rows])
    masks[:len(rows) // 2] = 0
    feats = torch.zeros(2, N_SLOTS, text_encoder.config.hidden_size, device=device, dtype=dtype)
    has = torch.zeros(2, N_SLOTS, device=device, dtype=dtype)
    for k, (phrase, im) in enumerate(zip(phrases, layout.get("images") or [None] * len(phrases))):
        if phrase is not None:
            ids, mask = (x.to(device) for x in tokenizer.phrases([phrase]))
            feats[0, k], has[0, k] = text_encoder(ids, attention_mask=mask).pooler_output[0], 1
        if im is not None:
            feats[1, k], has[1, k] = im, 1
    return text_image_inputs(boxes.to(device), masks.to(device, dtype), has[0], has[1],
                             feats[0].expand(len(rows), -1, -1), feats[1].expand(len(rows), -1, -1))


def inject_text_image(unet):
    return inject_gligen(unet, PositionNetTextImage)


def text_image_loss(model, batch, g, text_encoder, schedule, empty_ids, cfg, autocast=nullcontext(), levers=None,
                    per_image=False):
    """sd_loss with text-image grounding."""
    x0, xt, t, target, ids, masks = noised(batch, g, schedule, empty_ids, cfg)
    with torch.no_grad(), autocast:
        text = text_encoder(ids).last_hidden_state
        gligen = text_image_grounding(text_encoder, batch, masks, g)
    with autocast:
        pred = model(xt, t, encoder_hidden_states=text, cross_attention_kwargs={"gligen": gligen}).sample
    return denoising_loss(pred, target, batch, levers, per_image, t.float() / len(schedule.alphas_cumprod))


def generate_text_image(*args, **kwargs):
    return generate(*args, layout_grounding=text_image_layout_grounding, **kwargs)


MODES[False, True, False, False] = dict(add_adapters=inject_text_image, training_data=text_image_training_data,
                                        loss=text_image_loss, generate=generate_text_image)


# Both modes at once.
def inpaint_text_image_loss(model, batch, g, text_encoder, schedule, empty_ids, cfg, autocast=nullcontext(),
                            levers=None, per_image=False):
    x0, xt, t, target, ids, masks = noised(batch, g, schedule, empty_ids, cfg)
    x = with_kept(xt, x0, inpaint_mask(batch["boxes"], batch["masks"], *x0.shape[-2:]))
    with torch.no_grad(), autocast:
        text = text_encoder(ids).last_hidden_state
        gligen = text_image_grounding(text_encoder, batch, masks, g)
    with autocast:
        pred = model(x, t, encoder_hidden_states=text, cross_attention_kwargs={"gligen": gligen}).sample
    return denoising_loss(pred, target, batch, levers, per_image, t.float() / len(schedule.alphas_cumprod))


def generate_inpaint_text_image(*args, **kwargs):
    return generate_inpaint(*args, layout_grounding=text_image_layout_grounding, **kwargs)


MODES[True, True, False, False] = {**MODES[True, False, False, False], **MODES[False, True, False, False],
                                   "loss": inpaint_text_image_loss, "generate": generate_inpaint_text_image}


# =================================================================================================================
# Keypoints, GLIGEN's mode: 8 persons x 17 COCO keypoints, 136 tokens. A point rides as the box [x, y, x, y]: the
# drops and box-use gap are SD's. Replaces add_adapters, training_data, loss, generate, val_layouts, layout_needs.
KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
             "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
             "right_knee", "left_ankle", "right_ankle")  # COCO's order
MIRRORED = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]  # each keypoint's mirror image: left <-> right
SKELETON = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8), (7, 9),
            (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]  # COCO's limbs, drawn by draw_keypoints
N_PERSONS = 8


class PositionNetKeypoints(nn.Module):
    """A token per person and keypoint: their identities summed, beside the point's code; the official names."""

    def __init__(self, dim, n_freqs=8):
        super().__init__()
        self.person_embeddings = nn.Parameter(torch.zeros(N_PERSONS, dim))
        self.keypoint_embeddings = nn.Parameter(torch.zeros(len(KEYPOINTS), dim))
        self.linears = nn.Sequential(nn.Linear(dim + 4 * n_freqs, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(),
                                     nn.Linear(512, dim))
        self.null_person_feature = nn.Parameter(torch.zeros(dim))
        self.null_xy_feature = nn.Parameter(torch.zeros(4 * n_freqs))

    def forward(self, boxes, masks):  # (B, 136, 4) points as [x, y, x, y], person-major; (B, 136)
        who = (self.person_embeddings[:, None] + self.keypoint_embeddings).flatten(0, 1)  # (136, D)
        who = or_null(masks, who.expand(len(boxes), -1, -1), self.null_person_feature)
        xy = or_null(masks, fourier_boxes(boxes[..., :2]), self.null_xy_feature)  # (B, 136, 32)
        return self.linears(torch.cat([who, xy], dim=-1))  # (B, 136, D)


def inject_keypoints(unet):
    return inject_gligen(unet, PositionNetKeypoints)


def check_keypoints(lay, where):
    """Stop, naming `where`, unless each box has 17 keypoints, [x, y, v] (COCO's v), [x, y] or None, in [0, 1]."""
    persons = lay.get("keypoints")
    if not isinstance(persons, list) or len(persons) != len(lay["boxes"]):
        fail(f"{where}: keypoints must be a list with one person (17 keypoints) per box, got {persons!r}")
    for n, person in enumerate(persons):
        if not isinstance(person, list) or len(person) != len(KEYPOINTS):
            fail(f"{where}: person {n} has {len(person) if isinstance(person, list) else person!r} keypoints, not "
                 f"COCO's 17 ({', '.join(KEYPOINTS)})")
        for name, p in zip(KEYPOINTS, person):
            ok = p is None or isinstance(p, list) and len(p) in (2, 3) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in p)
            if not ok or p is not None and len(p) == 3 and p[2] not in (0, 1, 2):
                fail(f"{where}: person {n}'s {name} is {p!r}, not [x, y, v] (v 0, 1 or 2), [x, y] or null")
            if p is not None and (len(p) == 2 or p[2] > 0) and not (0 <= p[0] <= 1 and 0 <= p[1] <= 1):
                fail(f"{where}: person {n}'s {name} {p!r} is outside the image (x and y are relative to it, 0 to 1)")


def triples(person):
    """A person's 17 keypoints as [x, y, v]: [x, y] is visible (2), None unlabelled (0)."""
    return [[0, 0, 0] if p is None else [*p, 2] if len(p) == 2 else p for p in person]


def keypoint_slots(points, seen):
    """Points (P, 17, 2), largest persons first, and seen (P, 17) as boxes (136, 4) and masks: the first 8 persons
    with one seen."""
    n, keep = N_PERSONS * len(KEYPOINTS), seen.any(-1)
    boxes, masks = np.zeros((n, 4), np.float32), np.zeros(n, np.float32)
    p, m = points[keep][:N_PERSONS].reshape(-1, 2), seen[keep][:N_PERSONS].reshape(-1)
    boxes[:len(p)], masks[:len(p)] = np.concatenate([p, p], -1), m
    return boxes, masks


@dataclass(slots=True)
class KeypointItem(Item):
    points: np.ndarray  # (k, 17, 2) in the crop, largest persons first (keypoint_slots picks)
    seen: np.ndarray  # (k, 17): v = 2, in the crop


class KeypointLatents(GroundedLatents):
    """Visible keypoints in the crop, of the 8 largest persons with one; mirrored: left and right swapped."""
    Item = KeypointItem

    def __init__(self, latents_dir, boxes_path, max_boxes, min_box_area):
        for line, rec in read_jsonl(boxes_path):  # checked, with the line
            if "keypoints" not in rec:
                fail(f"{boxes_path}:{line} (image {rec.get('image')!r}): no keypoints (prep_boxes.py writes them from "
                     f"COCO's person_keypoints_*.json)")
            if isinstance(rec.get("boxes"), list):
                check_keypoints(rec, f"{boxes_path}:{line} (image {rec.get('image')!r})")
        super().__init__(latents_dir, boxes_path, max_boxes, min_box_area)

    def item(self, rec, lay):
        cx0, cy0, cx1, cy1 = rec["crop"]
        _, _, order = self.crop_layout(lay, rec["crop"], len(lay["boxes"]), 0.0)  # largest first, all of them
        kp = np.asarray([triples(lay["keypoints"][i]) for i in order], np.float64).reshape(-1, len(KEYPOINTS), 3)
        xy = (kp[..., :2] * [lay["width"], lay["height"]] - [cx0, cy0]) / (cx1 - cx0)
        seen = (kp[..., 2] == 2) & (xy >= 0).all(-1) & (xy <= 1).all(-1)
        shard, row = self.need(self.dir / rec["shard"], rec["row"], self.row_shape)
        return self.Item(shard=shard, row=row, caption=rec["caption"], phrases=[], boxes=np.zeros((0, 4), np.float32),
                         points=xy.astype(np.float32), seen=seen)

    def __getitem__(self, sample):
        x, it = super().__getitem__(sample), self.items[sample[0]]
        points, seen = it.points, it.seen
        if sample[1]:  # mirrored, and each keypoint takes its mirror image's place
            points, seen = np.stack([1 - points[..., 0], points[..., 1]], -1)[:, MIRRORED], seen[:, MIRRORED]
        x["boxes"], x["masks"] = keypoint_slots(points, seen)
        return x

    def collate(self, tokenizer, samples):
        return dict(latents=torch.stack([x["latent"] for x in samples]),
                    caption_ids=tokenizer.captions([x["caption"] for x in samples]),
                    boxes=torch.from_numpy(np.stack([x["boxes"] for x in samples])),
                    masks=torch.from_numpy(np.stack([x["masks"] for x in samples])))


def keypoint_training_data(cfg):
    return training_data(cfg, KeypointLatents)


def keypoint_loss(model, batch, g, text_encoder, schedule, empty_ids, cfg, autocast=nullcontext(), levers=None,
                  per_image=False):
    """sd_loss with keypoint grounding."""
    x0, xt, t, target, ids, masks = noised(batch, g, schedule, empty_ids, cfg)
    with torch.no_grad(), autocast:
        text = text_encoder(ids).last_hidden_state
    with autocast:
        pred = model(xt, t, encoder_hidden_states=text,
                     cross_attention_kwargs={"gligen": {"boxes": batch["boxes"], "masks": masks}}).sample
    return denoising_loss(pred, target, batch, levers, per_image, t.float() / len(schedule.alphas_cumprod))


def keypoint_layout_grounding(text_encoder, tokenizer, layout, rows, dtype):
    """A keypoint layout's "gligen" inputs, the first half null; the largest persons first."""
    device = next(text_encoder.parameters()).device
    area = [-(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in layout["boxes"]]
    kp = np.asarray([triples(layout["keypoints"][i]) for i in np.argsort(area, kind="stable")], np.float32)
    points, seen = kp.reshape(-1, len(KEYPOINTS), 3)[..., :2], kp.reshape(-1, len(KEYPOINTS), 3)[..., 2] == 2
    boxes, masks = (torch.from_numpy(a).repeat(len(rows), *[1] * a.ndim) for a in keypoint_slots(points, seen))
    masks[:len(rows) // 2] = 0
    return {"boxes": boxes.to(device), "masks": masks.to(device, dtype)}


def generate_keypoints(*args, **kwargs):
    return generate(*args, layout_grounding=keypoint_layout_grounding, **kwargs)


def standing(prompt, label, *persons):
    """A layout of persons facing us, each (centre x, top, height)."""
    template = [(0, .06), (.03, .04), (-.03, .04), (.06, .05), (-.06, .05), (.14, .2), (-.14, .2), (.2, .36),
                (-.2, .36), (.22, .5), (-.22, .5), (.09, .52), (-.09, .52), (.1, .74), (-.1, .74), (.11, .96),
                (-.11, .96)]
    return dict(prompt=prompt, phrases=[label] * len(persons),
                boxes=[[round(x - .25 * h, 4), top, round(x + .25 * h, 4), round(top + h, 4)] for x, top, h in persons],
                keypoints=[[[round(x + dx * h, 4), round(top + dy * h, 4)] for dx, dy in template]
                           for x, top, h in persons])


KEYPOINT_VAL_LAYOUTS = [standing("a man standing on a beach", "a man", (0.5, 0.1, 0.85)),
                        standing("two women talking in a park", "a woman", (0.3, 0.2, 0.7), (0.72, 0.15, 0.75))]
MODES[False, False, True, False] = dict(add_adapters=inject_keypoints, training_data=keypoint_training_data,
                                        loss=keypoint_loss, generate=generate_keypoints,
                                        val_layouts=lambda data: KEYPOINT_VAL_LAYOUTS, layout_needs=("keypoints",))


def draw_keypoints(image, persons):
    """A copy of draw_layout's image with the persons' visible keypoints and limbs drawn on."""
    image = image.convert("RGB")
    d, (W, H) = ImageDraw.Draw(image), image.size
    for n, person in enumerate(persons):
        c, at = COLORS[n % len(COLORS)], [v == 2 and (x * W, y * H) for x, y, v in triples(person)]
        for a, b in SKELETON:
            if at[a] and at[b]:
                d.line([at[a], at[b]], fill=c, width=max(1, W // 100))
        for p in filter(None, at):
            r = max(1, W // 80)
            d.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=c)
    return image


# =================================================================================================================
# Spatial maps, GLIGEN's mode: a map aligned with the image (depth, edges, yours) enters conv_in by a downsampler,
# and grounds as 64 ConvNeXt tokens. Replaces add_adapters, training_data, loss, generate, val_layouts, layout_needs,
# mirrored.
class Downsampler(nn.Module):
    """A map at 4x the latent's side -> 8 channels at its side: GLIGEN's depth downsampler."""

    def __init__(self, channels):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(channels, 4, 4, 2, 1), nn.SiLU(), nn.Conv2d(4, 8, 4, 2, 1))

    def forward(self, maps):
        return self.layers(maps)


class MapConvIn(nn.Conv2d):
    """conv_in for [latent; map packed 4 x 4 into channels]: the map unpacked, downsampled and convolved beside the
    latent; the new inputs start at zero."""

    def __init__(self, conv, channels):
        super().__init__(conv.in_channels + 8, conv.out_channels, conv.kernel_size, padding=conv.padding)
        self.latent_channels, self.downsample_net = conv.in_channels, Downsampler(channels)
        with torch.no_grad():
            self.weight.zero_()[:, :conv.in_channels] = conv.weight
            self.bias.copy_(conv.bias)

    def forward(self, x):
        z, maps = x[:, :self.latent_channels], F.pixel_shuffle(x[:, self.latent_channels:], 4)
        return super().forward(torch.cat([z, self.downsample_net(maps).to(z.dtype)], dim=1))


def with_map(x, maps):
    """The map UNet's input: [x; maps at 4x x's side, packed 4 x 4 into channels]."""
    side = (4 * x.shape[-2], 4 * x.shape[-1])
    if maps.shape[-2:] != side:
        maps = F.interpolate(maps.float(), size=side, mode="bilinear", antialias=True)
    return torch.cat([x, F.pixel_unshuffle(maps.to(x.dtype), 4)], dim=1)


class PositionNetSpatial(nn.Module):
    """64 tokens: a ConvNeXt's last 8 x 8 map features (or the null feature), plus positions, through an MLP."""

    def __init__(self, dim, encoder):
        super().__init__()
        c = encoder.config
        self.size = 8 * c.patch_size * 2 ** (c.num_stages - 1)  # 8 x 8 features: 256 px for a ConvNeXt-T
        self.convnext, width = encoder, c.hidden_sizes[-1]
        self.convnext.layernorm = nn.Identity()  # unused; DDP needs each parameter used
        self.null_feature = nn.Parameter(torch.zeros(width))
        self.pos_embedding = nn.Parameter(torch.empty(1, 64, width).normal_(std=0.02))
        self.linears = nn.Sequential(nn.Linear(width, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(),
                                     nn.Linear(512, dim))

    def forward(self, maps, masks):  # (B, C, H, W) in [-1, 1]; (B, 1)
        x = F.interpolate(maps.float(), size=(self.size, self.size), mode="nearest")
        x = x.expand(-1, self.convnext.config.num_channels, -1, -1) if x.shape[1] == 1 else x  # grey as RGB
        feats = self.convnext(x.to(self.null_feature.dtype)).last_hidden_state.flatten(2).transpose(1, 2)
        return self.linears(or_null(masks, feats, self.null_feature) + self.pos_embedding)  # (B, 64, D)


def load_map_net(maps_dir, encoder):
    """(map channels, the pretrained ConvNeXt), a fresh first layer for another channel count."""
    from transformers import ConvNextModel

    channels = map_meta(maps_dir)["channels"]
    try:
        net = load_clip_tower(ConvNextModel, encoder)
        if channels not in (1, net.config.num_channels):
            net = load_clip_tower(ConvNextModel, encoder, num_channels=channels, ignore_mismatched_sizes=True)
        return channels, net
    except (OSError, ValueError) as e:
        fail(f"--map_encoder={encoder}: cannot load a ConvNeXt (transformers' ConvNextModel) from it: {e}")


def map_net_of(adapters):
    """() -> (map channels, a ConvNeXt of the adapters' shapes), for sampling."""
    from transformers import ConvNextConfig, ConvNextModel

    p = "position_net.convnext."
    patch, stages = adapters[p + "embeddings.patch_embeddings.weight"], []
    while f"{p}encoder.stages.{len(stages)}.layers.0.dwconv.weight" in adapters:
        stage = f"{p}encoder.stages.{len(stages)}.layers."
        stages.append((adapters[stage + "0.dwconv.weight"].shape[0],
                       len({k[len(stage):].split(".")[0] for k in adapters if k.startswith(stage)})))
    config = ConvNextConfig(num_channels=patch.shape[1], patch_size=patch.shape[-1], num_stages=len(stages),
                            hidden_sizes=[h for h, _ in stages], depths=[d for _, d in stages])
    return lambda: (adapters["conv_in.downsample_net.layers.0.weight"].shape[1], ConvNextModel(config))


def inject_spatial(unet, map_net):
    """conv_in widened for the map, fresh fusers and the map's position net."""
    channels, encoder = map_net()
    conv = unet.conv_in
    unet.conv_in = MapConvIn(conv, channels).to(conv.weight.device, conv.weight.dtype).requires_grad_(False)
    unet.register_to_config(in_channels=conv.in_channels + 16 * channels)
    return inject_gligen(unet, partial(PositionNetSpatial, encoder=encoder))


def read_map(path):
    """A map file as float32 (C, H, W) in [0, 1]: an 8- or 16-bit image, or an NPY (H, W[, C]) of uint8, uint16 or
    floats."""
    try:
        if Path(path).suffix.lower() == ".npy":
            a = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as im:
                deep = im.mode.startswith("I")  # 16-bit, any byte order
                a = np.asarray(im.convert("L") if im.mode == "1" else im if deep or im.mode in (
                    "L", "LA", "RGB", "RGBA", "F") else im.convert("RGB"))
                a = a.astype(np.uint16) if deep else a
    except (OSError, ValueError) as e:
        fail(f"{path}: not a readable map ({type(e).__name__}: {e})")
    a = a[..., None] if a.ndim == 2 else a
    if a.ndim != 3 or 0 in a.shape:
        fail(f"{path}: a map is (height, width) or (height, width, channels), this one is {a.shape}")
    if a.dtype.kind == "u" and a.dtype.itemsize <= 2:
        a = a / np.iinfo(a.dtype).max
    elif a.dtype.kind != "f" or not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        fail(f"{path}: a map holds uint8, uint16, or floats in [0, 1]; this one holds {a.dtype}"
             + (f" from {a.min()} to {a.max()}" if a.dtype.kind in "fiu" else ""))
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))


def fit_map(m, crop, size):
    """A map's crop (pixels) resized to size (h, w), bilinear, as PIL resizes the image's."""
    fit = [Image.fromarray(c).resize(size[::-1], Image.Resampling.BILINEAR, box=crop) for c in m.float().numpy()]
    return torch.from_numpy(np.stack([np.asarray(c) for c in fit])).clamp(0, 1)


def map_for(m, height, width):
    """A map as an image of that size takes it: center-cropped to its shape, at half its side."""
    h, w = m.shape[-2:]
    s = min(h / height, w / width)
    ch, cw = round(height * s), round(width * s)
    return fit_map(m, ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch), (height // 2, width // 2))


def map_image(m, size):
    """A map (C, H, W) as an RGB picture of size (w, h)."""
    m = m[:3] if len(m) >= 3 else m[:1].expand(3, -1, -1)
    pixels = (F.interpolate(m[None].float(), size[::-1], mode="bilinear")[0].clamp(0, 1) * 255).round().byte()
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def beside(a, b):
    """Two pictures side by side."""
    both = Image.new("RGB", (a.width + b.width, max(a.height, b.height)), "white")
    both.paste(a, (0, 0))
    both.paste(b, (a.width, 0))
    return both


def map_meta(maps_dir):
    """prep_latents.py --map's meta.json, checked."""
    path = Path(maps_dir) / "meta.json"
    if not path.is_file() or not (Path(maps_dir) / "index.jsonl").is_file():
        fail(f"data file not found: {path} or index.jsonl beside it (write them with prep_latents.py --map)")
    meta = json.loads(path.read_text())
    if "channels" not in meta:
        fail(f"{maps_dir} holds no maps (its meta.json is not prep_latents.py --map's: latents? Those go in --latents)")
    return meta


@dataclass(slots=True)
class MapItem(Item):
    map_shard: Path
    map_row: int


class MapLatents(GroundedLatents):
    """Sample (i, flip): image i's latent, caption and map (C, R/2, R/2), mirrored if flip."""
    Item = MapItem

    def __init__(self, latents_dir, maps_dir):
        self.dir, self.maps, self.arrays, self.rows, self.items = Path(latents_dir), Path(maps_dir), {}, {}, []
        if not (self.dir / "meta.json").is_file() or not (self.dir / "index.jsonl").is_file():
            fail(f"data file not found: {self.dir / 'meta.json'} or index.jsonl (write them with prep_latents.py)")
        self.meta, self.map_meta = json.loads((self.dir / "meta.json").read_text()), map_meta(maps_dir)
        if "latent_shape" not in self.meta:
            fail(f"{self.dir} holds no latents (its meta.json is not prep_latents.py's for latents: maps? Those go in "
                 f"--maps)")
        self.resolution, self.has_flipped = self.meta["resolution"], "flipped" in self.meta["views"]
        if self.map_meta["resolution"] != self.resolution:
            fail(f"{self.maps} holds maps for {self.map_meta['resolution']} px images, {self.dir} latents of "
                 f"{self.resolution} px: make both with the same --resolution")
        self.row_shape = (len(self.meta["views"]), len(self.meta["stats"]), *self.meta["latent_shape"])
        map_shape = (self.map_meta["channels"], self.resolution // 2, self.resolution // 2)
        maps = {r["key"]: (line, r) for line, r in read_jsonl(self.maps / "index.jsonl")}
        for line, rec in read_jsonl(self.dir / "index.jsonl"):
            if rec["key"] not in maps:
                fail(f"{self.maps / 'index.jsonl'} has no map for image {rec['key']!r} of {self.dir / 'index.jsonl'}:"
                     f"{line}: were the maps made from the same images?")
            map_line, m = maps[rec["key"]]
            if m["crop"] != rec["crop"]:
                fail(f"{self.maps / 'index.jsonl'}:{map_line}: image {rec['key']!r}'s map was cropped at {m['crop']}, "
                     f"its latent at {rec['crop']} ({self.dir / 'index.jsonl'}:{line}): of different images?")
            shard, row = self.need(self.dir / rec["shard"], rec["row"], self.row_shape)
            map_shard, map_row = self.need(self.maps / m["shard"], m["row"], map_shape)
            self.items.append(MapItem(shard=shard, row=row, caption=rec["caption"], phrases=[],
                                      boxes=np.zeros((0, 4), np.float32), map_shard=map_shard, map_row=map_row))
        self.check_shards()
        self.config = dict(resolution=self.resolution, images=len(self.items), map=self.map_meta["map"])

    def __getitem__(self, sample):
        x, it = super().__getitem__(sample), self.items[sample[0]]
        m = self.array(it.map_shard)[it.map_row]  # uint16
        x["map"] = torch.from_numpy(np.array(m[..., ::-1] if sample[1] else m, np.float32) / 65535)
        return x

    def collate(self, tokenizer, samples):
        return dict(latents=torch.stack([x["latent"] for x in samples]),
                    caption_ids=tokenizer.captions([x["caption"] for x in samples]),
                    maps=torch.stack([x["map"] for x in samples]) * 2 - 1, masks=torch.ones(len(samples), 1))


def map_training_data(cfg):
    return training_data(cfg, lambda *_: MapLatents(cfg["latents"], cfg["maps"]))


def map_loss(model, batch, g, text_encoder, schedule, empty_ids, cfg, autocast=nullcontext(), levers=None,
             per_image=False):
    """sd_loss, the map in conv_in (grounding dropped or not) and as tokens."""
    x0, xt, t, target, ids, masks = noised(batch, g, schedule, empty_ids, cfg)
    with torch.no_grad(), autocast:
        text = text_encoder(ids).last_hidden_state
    with autocast:
        pred = model(with_map(xt, batch["maps"]), t, encoder_hidden_states=text,
                     cross_attention_kwargs={"gligen": {"maps": batch["maps"], "masks": masks}}).sample
    return denoising_loss(pred, target, batch, levers, per_image, t.float() / len(schedule.alphas_cumprod))


def mirrored_maps(batch):
    """mirrored_boxes, for maps."""
    return {**batch, "maps": batch["maps"].flip(-1)}


def map_layout_grounding(text_encoder, tokenizer, layout, rows, dtype):
    """A map layout's "gligen" inputs, the first half null."""
    masks = torch.ones(len(rows), 1)
    masks[:len(rows) // 2] = 0
    return {"maps": layout["map"].expand(len(rows), -1, -1, -1), "masks": masks.to(layout["map"].device, dtype)}


@torch.no_grad()
def generate_maps(unet, vae, text_encoder, tokenizer, scheduler, layouts, seeds, height=None, width=None, **kwargs):
    """As generate; a layout's map ("map": a file, or a (C, H, W) tensor in [0, 1]) in conv_in every step, as
    tokens while grounding lasts."""
    height, width = height or native_size(unet, vae), width or native_size(unet, vae)

    def draw(layout, seed):
        m = layout.get("map")
        m = read_map(m) if isinstance(m, (str, Path)) else m
        if m is None or m.shape[0] != unet.conv_in.downsample_net.layers[0].in_channels:
            fail(f"layout {layout['prompt']!r}: these adapters need a map of "
                 f"{unet.conv_in.downsample_net.layers[0].in_channels} channels, got {None if m is None else m.shape}")
        m = (map_for(m, height, width) * 2 - 1)[None].to(unet.device, unet.dtype)

        def model_input(scheduler, latents, t, g):
            latents, x = both_halves(scheduler, latents, t, g)
            return latents, with_map(x.to(unet.dtype), m.expand(len(x), -1, -1, -1))

        return generate(unet, vae, text_encoder, tokenizer, scheduler, [{**layout, "map": m}], [seed], height=height,
                        width=width, model_input=model_input, layout_grounding=map_layout_grounding, **kwargs)

    return np.concatenate([draw(l, s) for l, s in zip(layouts, seeds)])


def map_val_layouts(data):
    """The grid's layouts: two training images' captions and maps."""
    return [dict(prompt=data.items[i].caption, phrases=[], boxes=[], map=data[(i, False)]["map"])
            for i in range(min(2, len(data)))]


MODES[False, False, False, True] = dict(add_adapters=inject_spatial, training_data=map_training_data, loss=map_loss,
                                        generate=generate_maps, val_layouts=map_val_layouts, layout_needs=("map",),
                                        mirrored=mirrored_maps)


# =================================================================================================================
# MMDiT: SD3/SD3.5, Flux.1. A fuser after each joint block, on its image tokens, by hooks; rectified flow.
# Replaces load, schedule, add_adapters, loss, generate and samplers.
SD3_T5_TOKENS, FLUX_T5_TOKENS = 256, 512  # the pipelines' max_sequence_length
FLUX_GUIDANCE = 3.5  # Flux-dev's guidance input (diffusers' scripts' default)


def mmdit_family(model):
    """"sd3" or "flux"; stops on other transformers, Flux Fill or Kontext."""
    from diffusers import SD3Transformer2DModel

    with loading(model):
        t = SD3Transformer2DModel.load_config(model, subfolder="transformer")
    family = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}.get(t.get("_class_name"))
    if family is None:
        fail(f"{model}: its transformer is a {t.get('_class_name')!r}; GLIGEN trains on a UNet (SD1.x/2.x, SDXL, "
             f"video), SD3Transformer2DModel or FluxTransformer2DModel")
    if family == "flux" and t.get("out_channels") not in (None, t["in_channels"]):
        fail(f"{model}: its transformer takes {t['in_channels']} input channels for {t['out_channels']} out (Flux "
             f"Fill or another conditioned model?); GLIGEN trains on a text-to-image base")
    return family


class SD3TextEncoders(nn.Module):
    """SD3's three text encoders as one; a phrase's feature: both CLIPs' pooled."""

    def __init__(self, clip_l, clip_g, t5, split, joint_dim):
        super().__init__()
        self.clip_l, self.clip_g, self.t5, self.split, self.joint_dim = clip_l, clip_g, t5, split, joint_dim

    def forward(self, ids, attention_mask=None):
        l = self.clip_l(ids[:, 0], attention_mask=attention_mask).text_embeds
        g = self.clip_g(ids[:, 1], attention_mask=attention_mask).text_embeds
        return SimpleNamespace(pooler_output=torch.cat([l, g], -1))

    def captions(self, ids):
        ids_l, ids_g, ids_t5 = ids.split(self.split, dim=1)
        l = self.clip_l(ids_l, output_hidden_states=True)
        g = self.clip_g(ids_g, output_hidden_states=True)
        clip = torch.cat([l.hidden_states[-2], g.hidden_states[-2]], -1)
        t5 = self.t5(ids_t5).last_hidden_state if self.t5 is not None else \
            clip.new_zeros(len(ids), SD3_T5_TOKENS, self.joint_dim)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], 1),
                "pooled_projections": torch.cat([l.text_embeds, g.text_embeds], -1)}


class FluxTextEncoders(nn.Module):
    """Flux's two text encoders as one; a phrase's feature: CLIP-L's pooled."""

    def __init__(self, clip, t5, split, guidance):
        super().__init__()
        self.clip, self.t5, self.split, self.guidance = clip, t5, split, guidance

    def forward(self, ids, attention_mask=None):
        return SimpleNamespace(pooler_output=self.clip(ids, attention_mask=attention_mask).pooler_output)

    def captions(self, ids):
        ids_clip, ids_t5 = ids.split(self.split, dim=1)
        text = {"encoder_hidden_states": self.t5(ids_t5).last_hidden_state,
                "pooled_projections": self.clip(ids_clip).pooler_output}
        if self.guidance is not None:  # dev is guidance-distilled
            text["guidance"] = torch.full((len(ids),), self.guidance, device=ids.device)
        return text


def t5_ids(tokenizer, texts, length):
    """T5's ids of captions, padded; (B, 0) without T5."""
    if tokenizer is None:
        return torch.zeros(len(texts), 0, dtype=torch.long)
    return torch.tensor(tokenizer(texts, padding="max_length", max_length=length, truncation=True)["input_ids"])


class SD3Tokenizers(SDXLTokenizers):
    """SD3's tokenizers: captions through all three, phrases the CLIPs."""

    def __init__(self, first, second, t5, t5_tokens):
        super().__init__(first, second)
        self.t5, self.t5_tokens = t5, t5_tokens

    def captions(self, texts):
        return torch.cat([super().captions(texts).flatten(1), t5_ids(self.t5, texts, self.t5_tokens)], 1)


class FluxTokenizers(Tokenizer):
    """Flux's tokenizers: captions through CLIP-L and T5, phrases through CLIP-L."""

    def __init__(self, clip, t5, t5_tokens):
        super().__init__(clip)
        self.t5, self.t5_tokens = t5, t5_tokens

    def captions(self, texts):
        return torch.cat([super().captions(texts), t5_ids(self.t5, texts, self.t5_tokens)], 1)


def load_t5(model, index, dtype, encoder, tokenizer, max_tokens):
    """The model's T5 encoder, tokenizer and tokens a caption; None, None, 0 without."""
    from transformers import AutoTokenizer, T5EncoderModel

    if (index.get(encoder) or [None])[0] is None:
        return None, None, 0
    t5 = T5EncoderModel.from_pretrained(model, subfolder=encoder, torch_dtype=dtype)
    tok = AutoTokenizer.from_pretrained(model, subfolder=tokenizer)
    return t5, tok, min(max_tokens, tok.model_max_length)


def load_sd3(model, device, dtype):
    """SD3's frozen parts (T5 optional, as its pipeline)."""
    import diffusers
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    with loading(model):
        index = diffusers.DiffusionPipeline.load_config(model)
        transformer = load_model(diffusers.SD3Transformer2DModel, model, subfolder="transformer", torch_dtype=dtype)
        clips = [CLIPTextModelWithProjection.from_pretrained(model, subfolder=f, torch_dtype=dtype)
                 for f in ("text_encoder", "text_encoder_2")]
        toks = [Tokenizer(CLIPTokenizer.from_pretrained(model, subfolder=f)) for f in ("tokenizer", "tokenizer_2")]
        t5, t5_tok, n = load_t5(model, index, dtype, "text_encoder_3", "tokenizer_3", SD3_T5_TOKENS)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    L = toks[0].tokenizer.model_max_length
    encoders = SD3TextEncoders(*clips, t5, (L, L, n), transformer.config.joint_attention_dim)
    transformer = transformer.to(device, dtype)  # diffusers may load it in fp32
    return (transformer.requires_grad_(False), encoders.to(device).requires_grad_(False),
            SD3Tokenizers(*toks, t5_tok, n), scheduler)


def load_flux(model, device, dtype):
    """Flux's frozen parts; dev gets FLUX_GUIDANCE."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTokenizer

    with loading(model):
        index = diffusers.DiffusionPipeline.load_config(model)
        transformer = load_model(diffusers.FluxTransformer2DModel, model, subfolder="transformer", torch_dtype=dtype)
        clip = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype)
        tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        t5, t5_tok, n = load_t5(model, index, dtype, "text_encoder_2", "tokenizer_2", FLUX_T5_TOKENS)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    if t5 is None:
        fail(f"{model}: Flux needs its T5 text encoder (text_encoder_2): its context is T5's")
    guidance = FLUX_GUIDANCE if transformer.config.guidance_embeds else None
    encoders = FluxTextEncoders(clip, t5, (tok.model_max_length, n), guidance)
    return (transformer.to(device).requires_grad_(False), encoders.to(device).requires_grad_(False),
            FluxTokenizers(tok, t5_tok, n), scheduler)


# The method on an MMDiT: joint_attention_kwargs["gligen"] carries the grounding inputs, popped by a hook.
def take_grounding(model, args, kwargs, code=None):
    """Before the transformer: pop "gligen" and leave its tokens with each block until the next call (a
    checkpointing recompute must find them). Without "gligen": the base."""
    extra = dict(kwargs.get("joint_attention_kwargs") or {})
    gligen = extra.pop("gligen", None)
    tokens = None if gligen is None else \
        (model.position_net(**gligen),) + ((code(model, kwargs),) if code else ())
    for block in model.transformer_blocks:
        block.grounding = tokens
    return args, {**kwargs, "joint_attention_kwargs": extra or None}


def fuse(block, args, out):
    """After a joint block: its image tokens through its fuser."""
    if block.grounding is None:
        return None
    text, image = out
    return text, block.fuser(image, *block.grounding)


def inject_mmdit(model, fuser=Fuser, code=None):
    """Fresh fusers on the joint blocks and a fresh position net, as wide as the blocks; names as on a UNet."""
    c = model.config
    width = c.num_attention_heads * c.attention_head_dim
    for block in model.transformer_blocks:
        block.fuser = fuser(width, width, c.num_attention_heads, c.attention_head_dim).to(model.device)
        block.grounding = None
        block.register_forward_hook(fuse)
    model.position_net = PositionNet(c.pooled_projection_dim, out_dim=width).to(model.device)
    model.register_forward_pre_hook(partial(take_grounding, code=code), with_kwargs=True)
    return model


class PositionedFuser(Fuser):
    """Flux's fuser: a position code added before the attention (Flux's tokens have RoPE only)."""

    def forward(self, x, objs, pos):
        n = x.shape[1]
        h = self.norm1(torch.cat([x, self.linear(objs)], dim=1))
        h = torch.cat([h[:, :n] + pos.to(h.dtype), h[:, n:]], dim=1)
        x = x + self.alpha_attn.tanh() * self.attn(h[:, :n], h)
        x = x + self.alpha_dense.tanh() * self.ff(self.norm2(x))
        return x


def flux_position_code(model, kwargs):
    """(N, width): a sin/cos code of each image token's centre."""
    ids = kwargs["img_ids"]
    ids = ids[0] if ids.dim() == 3 else ids  # diffusers < 0.31: batched
    width = model.config.num_attention_heads * model.config.attention_head_dim
    rows, cols = ids[:, 1].float(), ids[:, 2].float()
    y, x = (rows + 0.5) / (rows.max() + 1), (cols + 0.5) / (cols.max() + 1)
    k = width // 4
    freqs = 100 ** (torch.arange(k, device=ids.device) / k)
    code = torch.cat([f(v[:, None] * freqs) for v in (x, y) for f in (torch.sin, torch.cos)], 1)
    return F.pad(code, (0, width - 4 * k))


# Rectified flow: x_t = (1 - s) x0 + s noise, the target noise - x0.
class FlowSchedule(NamedTuple):
    """What the rectified-flow step needs."""
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    density: object  # (b, g) -> b levels in [0, 1)
    prediction_type: str = "flow"


def logit_normal(b, g):
    """SD3's noise level density: sigmoid of a standard normal."""
    return torch.randn(b, generator=g, device=g.device).sigmoid()


def uniform(b, g):
    """Flux's: uniform."""
    return torch.rand(b, generator=g, device=g.device)


def sd3_schedule(noise_scheduler, model, device):
    return FlowSchedule(noise_scheduler.timesteps.to(device), noise_scheduler.sigmas.to(device), logit_normal)


def flux_schedule(noise_scheduler, model, device):
    return FlowSchedule(noise_scheduler.timesteps.to(device), noise_scheduler.sigmas.to(device), uniform)


def sd3_call(model, x, t, text, gligen):
    """SD3's transformer, called as its pipeline calls it."""
    return model(hidden_states=x, timestep=t, **text, joint_attention_kwargs=gligen).sample


def flux_call(model, x, t, text, gligen):
    """Flux's transformer, its latents packed 2 x 2 as FluxPipeline packs them."""
    B, C, h, w = x.shape
    tokens = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w // 4, 4 * C)
    img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
    img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
    img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
    txt_ids = torch.zeros(text["encoder_hidden_states"].shape[1], 3, device=x.device)
    out = model(hidden_states=tokens, timestep=t / 1000, img_ids=img_ids.flatten(0, 1), txt_ids=txt_ids, **text,
                joint_attention_kwargs=gligen).sample
    return out.view(B, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)


def flow_loss(call, model, batch, g, text_encoder, schedule, empty_ids, cfg, autocast, levers, per_image):
    """GLIGEN's loss under rectified flow: the family's density, its call."""
    b, device, T = len(batch["latents"]), schedule.sigmas.device, len(schedule.timesteps)
    keep_caption = torch.rand(b, generator=g, device=device) < cfg["caption_keep"]
    keep_grounding = torch.rand(b, generator=g, device=device) >= cfg["grounding_drop"]
    noise = torch.randn(batch["latents"][:, 0].shape, generator=g, device=device)
    i = (schedule.density(b, g) ** cfg["timestep_power"] * T).long().clamp(max=T - 1)
    x0 = vae_sample(batch["latents"], g)
    s = schedule.sigmas[i].view(-1, 1, 1, 1)
    xt, target = (1 - s) * x0 + s * noise, noise - x0
    ids, masks = dropped(batch, keep_caption, keep_grounding, empty_ids)
    with torch.no_grad(), autocast:
        text = text_encoder.captions(ids)
        gligen = text_box_grounding(text_encoder, batch, masks)
    with autocast:
        pred = call(model, xt, schedule.timesteps[i], text, {"gligen": gligen})
    return denoising_loss(pred, target, batch, levers, per_image, schedule.sigmas[i].float())


def sd3_loss(model, batch, g, text_encoder, schedule, empty_ids, cfg, autocast=nullcontext(), levers=None,
             per_image=False):
    return flow_loss(sd3_call, model, batch, g, text_encoder, schedule, empty_ids, cfg, autocast, levers, per_image)


def flux_loss(model, batch, g, text_encoder, schedule, empty_ids, cfg, autocast=nullcontext(), levers=None,
              per_image=False):
    return flow_loss(flux_call, model, batch, g, text_encoder, schedule, empty_ids, cfg, autocast, levers, per_image)


def mmdit_prompt_inputs(text_encoder, tokenizer, prompt, n, height, width):
    """The text inputs of n x [unconditional; conditional]."""
    ids = tokenizer.captions(["", prompt]).to(next(text_encoder.parameters()).device)
    return {k: v.repeat_interleave(n, dim=0) for k, v in text_encoder.captions(ids).items()}


def flow_timesteps(scheduler, steps, tokens, device, sigmas=False, max_shift=1.16):
    """The sampling schedule, as SD3's pipeline (or, sigmas, FluxPipeline) sets it."""
    c = scheduler.config
    (base, top), shift = (c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)), c.get("base_shift", 0.5)
    m = (max_shift - shift) / (top - base)
    mu = tokens * m + (shift - m * base)  # the pipelines' calculate_shift
    kwargs = {"mu": mu} if c.get("use_dynamic_shifting") else {}
    if sigmas:
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, **kwargs)
    else:
        scheduler.set_timesteps(steps, device=device, **kwargs)


@torch.no_grad()
def flow_generate(unet, vae, text_encoder, tokenizer, scheduler, layouts, seeds, n=1, steps=28, guidance=7.0,
                  beta=1.0, height=None, width=None, progress=False, prompt_inputs=mmdit_prompt_inputs,
                  layout_grounding=layout_grounding, call=sd3_call, flux=False):
    """generate for an MMDiT: flow-matching Euler steps as the pipelines."""
    scale = vae_scale(vae) * (2 if flux else 1)
    height, width = height or native_size(unet, vae), width or native_size(unet, vae)
    if height % scale or width % scale:
        fail(f"{height} x {width}: this model's image sides must be multiples of {scale}")
    text = stack_halves([prompt_inputs(text_encoder, tokenizer, l["prompt"], n, height, width) for l in layouts])
    dtype = text["encoder_hidden_states"].dtype
    rows = [[(l["phrases"], l["boxes"])] * (2 * n) for l in layouts]
    gligen = batch_grounding(text_encoder, tokenizer, layouts, seeds, rows, dtype, layout_grounding)
    h, w = height // vae_scale(vae), width // vae_scale(vae)
    latents, streams = batch_noise(seeds, (n, vae.config.latent_channels, h, w))
    latents = latents.to(unet.device)
    schedulers = [copy.deepcopy(scheduler) for _ in streams]
    patch = 2 if flux else unet.config.patch_size
    for s in schedulers:
        flow_timesteps(s, steps, (h // patch) * (w // patch), latents.device, sigmas=flux,
                       max_shift=1.15 if flux else 1.16)
    n_grounded = int(beta * len(schedulers[0].timesteps))
    for i, t in enumerate(tqdm(schedulers[0].timesteps, desc="denoising", leave=False, disable=not progress)):
        x = stack_halves([torch.cat([z] * 2) for z in latents.chunk(len(streams))])
        out = call(unet, x.to(unet.dtype), t.expand(len(x)), text, gligen if i < n_grounded else None)
        uncond, cond = out.float().chunk(2)
        guided = (uncond + guidance * (cond - uncond)).chunk(len(streams))
        latents = torch.cat([s.step(e, t, z, generator=g).prev_sample
                             for s, e, z, g in zip(schedulers, guided, latents.chunk(len(streams)), streams)])
    return decode(vae, latents)


def generate_sd3(*args, **kwargs):
    return flow_generate(*args, call=sd3_call, **kwargs)


def generate_flux(*args, **kwargs):
    return flow_generate(*args, call=flux_call, flux=True, **kwargs)


def inject_flux(model):
    return inject_mmdit(model, fuser=PositionedFuser, code=flux_position_code)


MMDIT = dict(samplers=("flow_euler",))
FAMILIES["sd3"] = dict(MMDIT, load=load_sd3, schedule=sd3_schedule, add_adapters=inject_mmdit, loss=sd3_loss,
                       generate=generate_sd3)
FAMILIES["flux"] = dict(MMDIT, load=load_flux, schedule=flux_schedule, add_adapters=inject_flux, loss=flux_loss,
                        generate=generate_flux)


def cli():
    """The script: main with the command line's settings."""
    try:
        main(configure(config, sys.argv[1:], __doc__))
    except BaseException:
        # after an error, stop the loader workers (they ignore SIGTERM)
        for worker in multiprocessing.active_children():
            worker.kill()
        raise
    if "RANK" in os.environ:
        # gloo's exit handlers may abort a finished run: leave without them
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    cli()
