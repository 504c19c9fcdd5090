"""
Train GLIGEN grounding adapters on a frozen Stable Diffusion UNet (SD1.x/2.x, SDXL, ModelScope/Zeroscope video).

GLIGEN (Li et al., CVPR 2023) adds one gated self-attention layer ("fuser") to every transformer block of a
frozen text-to-image UNet, fed by 30 grounding tokens made from each box (Fourier code) and its phrase (text
encoder feature). Only the fusers and the position net train; the UNet and text encoder stay frozen. This one file
is the whole trainer: config, the method (a block you can lift), the model, the data, the step, checkpoints, main.
sample.py and the prep scripts import what they share from it. Two more of GLIGEN's modes: --image_features (boxes
grounded by reference images too) and --inpaint=True (generation inside the boxes of a kept image).

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
import hashlib
import inspect
import json
import math
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
from types import SimpleNamespace

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer runs in forked loader workers
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

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
    inpaint=False,  # GLIGEN's inpainting mode: conv_in also takes the image outside the boxes; conv_in.weight trains
    image_features="",  # GLIGEN's text-image mode: prep_latents.py --image_encoder's output; boxes get images too
    grad_checkpointing=False,  # recompute the UNet's activations in the backward pass: less memory (SDXL), slower
    compile="",  # torch.compile backend for the UNet's training step: "" off, "inductor" (compiles for minutes first)
    num_workers=4,  # data loader processes per GPU
    log_every=20,  # log line (step, loss, lr, images/s, peak memory), also appended to out_dir/log.jsonl
    save_every=2000,  # checkpoint every N steps, and at the end
    keep_last=2,  # checkpoints kept in out_dir (the newest that verify)
    val_every=2000,  # validation (a grid, the losses of val_images) every N steps, at the start and the end; 0 = never
    val_steps=25,  # DDIM steps for the validation grid
    val_layouts="",  # JSONL file of {prompt, phrases, boxes} for the validation grid; "" = VAL_LAYOUTS above
    val_images=64,  # training images whose loss each validation logs with true, mirrored and no boxes; 0 = none
)


def fail(msg):
    """Stop with one line that says what is wrong and where (setting, file, record): no traceback, exit status 1."""
    raise SystemExit(f"error: {msg}")


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
        if isinstance(v, bool) != (want is bool) or not (isinstance(v, want) or (want is float and isinstance(v, int))):
            fail(f"--{key}={value}: expected {want.__name__}")  # True is an int to Python, not a batch size
        cfg[key] = float(v) if want is float else v
    return cfg


def in_range(cfg, keys, low, high=math.inf):
    """Stop, naming the setting, unless each of the settings `keys` (space-separated) is in [low, high]."""
    for k in keys.split():
        if not low <= cfg[k] <= high:
            fail(f"--{k}={cfg[k]}: must be " + (f"at least {low}" if high == math.inf else f"in [{low}, {high}]"))


# -----------------------------------------------------------------------------------------------------------------
# The method: gated self-attention ("fuser") and the position net, injected into a stock diffusers UNet. This block
# needs only torch and diffusers: lift it into another project as it is. Parameter names equal diffusers'
# attention_type="gated" UNet, so weights move both ways without renaming.
N_SLOTS = 30  # grounding tokens per image


class Attention(nn.Module):
    """Multi-head attention: queries from x, keys and values from ctx; no bias on q/k/v, bias on the output."""

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
    """Gated self-attention: visual tokens attend to [visual; grounding] tokens; added back through tanh gates."""

    def __init__(self, dim, ctx_dim, heads, head_dim):
        super().__init__()
        self.linear = nn.Linear(ctx_dim, dim)  # grounding tokens to the block's width
        self.attn = Attention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.alpha_attn = nn.Parameter(torch.tensor(0.0))  # tanh(0) = 0: the UNet starts equal to its base
        self.alpha_dense = nn.Parameter(torch.tensor(0.0))

    def forward(self, x, objs):  # x (B, N, C) visual tokens, objs (B, 30, D) grounding tokens
        n = x.shape[1]
        h = self.norm1(torch.cat([x, self.linear(objs)], dim=1))  # (B, N + 30, C)
        # only the visual tokens' outputs are kept, so only they need to query
        x = x + self.alpha_attn.tanh() * self.attn(h[:, :n], h)
        x = x + self.alpha_dense.tanh() * self.ff(self.norm2(x))
        return x


def fourier_boxes(boxes, n_freqs=8):
    """(B, S, 4) xyxy in [0, 1] -> (B, S, 64): for each frequency 100^(k/8), sin of x0,y0,x1,y1 then cos; fp32."""
    freqs = 100 ** (torch.arange(n_freqs, device=boxes.device) / n_freqs)
    x = boxes.float()[..., None, :] * freqs[:, None]  # (B, S, 8, 4)
    return torch.cat([x.sin(), x.cos()], dim=-1).flatten(2)


class PositionNet(nn.Module):
    """Grounding tokens from (phrase feature, Fourier box code); empty slots take learned null features."""

    def __init__(self, dim, n_freqs=8):
        super().__init__()
        self.linears = nn.Sequential(nn.Linear(dim + 8 * n_freqs, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(),
                                     nn.Linear(512, dim))
        self.null_positive_feature = nn.Parameter(torch.zeros(dim))
        self.null_position_feature = nn.Parameter(torch.zeros(8 * n_freqs))

    def forward(self, boxes, masks, positive_embeddings):  # (B, 30, 4), (B, 30), (B, 30, D): diffusers' names
        filled = masks[..., None] > 0
        pos = torch.where(filled, fourier_boxes(boxes).to(self.null_position_feature.dtype), self.null_position_feature)
        phr = torch.where(filled, positive_embeddings.to(pos.dtype), self.null_positive_feature)
        return self.linears(torch.cat([phr, pos], dim=-1))  # (B, 30, D)


class PositionNetTextImage(nn.Module):
    """GLIGEN's text-image-box mode: each box may have a phrase, a reference image, or both. The same Fourier box code
    goes to two MLPs, one with the phrase feature and one with the image feature (CLIP image embedding, projected into
    the phrase space); 30 text tokens, then 30 image tokens. Empty slots, and each missing feature, take nulls."""

    def __init__(self, dim, n_freqs=8):
        super().__init__()
        mlp = lambda: nn.Sequential(nn.Linear(dim + 8 * n_freqs, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(),
                                    nn.Linear(512, dim))
        self.linears_text, self.linears_image = mlp(), mlp()
        self.null_text_feature = nn.Parameter(torch.zeros(dim))
        self.null_image_feature = nn.Parameter(torch.zeros(dim))
        self.null_position_feature = nn.Parameter(torch.zeros(8 * n_freqs))

    def forward(self, boxes, masks, phrases_masks, image_masks, phrases_embeddings, image_embeddings):  # diffusers'
        pos = torch.where(masks[..., None] > 0, fourier_boxes(boxes).to(self.null_position_feature.dtype),
                          self.null_position_feature)
        phr = torch.where(phrases_masks[..., None] > 0, phrases_embeddings.to(pos.dtype), self.null_text_feature)
        img = torch.where(image_masks[..., None] > 0, image_embeddings.to(pos.dtype), self.null_image_feature)
        return torch.cat([self.linears_text(torch.cat([phr, pos], -1)), self.linears_image(torch.cat([img, pos], -1))],
                         dim=1)  # (B, 60, D)


class NoFuser(nn.Module):
    """The video UNet's temporal blocks get the grounding kwargs too, and are left as they are."""

    def forward(self, x, objs):
        return x


def video_position_net(unet, args, kwargs):
    """The video UNet does not make grounding tokens itself as the image UNet does: make them on the way in."""
    gligen = (kwargs.get("cross_attention_kwargs") or {}).get("gligen")
    if gligen is not None and "objs" not in gligen:
        kwargs["cross_attention_kwargs"] = {**kwargs["cross_attention_kwargs"], "gligen": {"objs": unet.position_net(**gligen)}}
    return args, kwargs


def inject_gligen(unet, images=False):
    """Give every spatial transformer block of a stock diffusers UNet a fresh fuser and the UNet a fresh position net.
    diffusers' BasicTransformerBlock already calls `self.fuser` between self- and cross-attention when
    cross_attention_kwargs holds "gligen", and the UNet turns {boxes, masks, positive_embeddings} into tokens with
    `self.position_net`; so injecting is attaching the modules. Pass grounding as
    unet(x, t, text, cross_attention_kwargs={"gligen": {"boxes": ..., "masks": ..., "positive_embeddings": ...}}).
    Video UNets (UNet3DConditionModel): fusers in the spatial blocks only, one set of grounding tokens per frame
    (boxes (batch x frames, 30, 4), frame-minor), temporal blocks untouched. images=True: the text-image-box position
    net (diffusers' attention_type="gated-text-image")."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    D = unet.config.cross_attention_dim
    spatial = {id(b) for m in unet.modules() if isinstance(m, Transformer2DModel) for b in m.transformer_blocks}
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock):
            a = block.attn1
            block.fuser = Fuser(a.query_dim, D, a.heads, a.inner_dim // a.heads).to(unet.device) \
                if id(block) in spatial else NoFuser()
    unet.position_net = (PositionNetTextImage if images else PositionNet)(D).to(unet.device)
    if is_video(unet):
        unet.register_forward_pre_hook(video_position_net, with_kwargs=True)
    return unet


def is_video(unet):
    return type(unet).__name__ == "UNet3DConditionModel"


# GLIGEN's inpainting mode: the UNet also sees the image outside the boxes, and generates inside them.
def widen_conv_in(unet):
    """conv_in takes [noisy latent (4), masked image latent z * m (4), mask m (1)], GLIGEN's order (not SD-inpainting's:
    mask last, 1 where the image is kept). The new input channels start at zero: the UNet starts equal to its base."""
    old, c = unet.conv_in, unet.conv_in.in_channels
    new = nn.Conv2d(2 * c + 1, old.out_channels, old.kernel_size, padding=old.padding).to(old.weight)
    with torch.no_grad():
        new.weight.zero_()[:, :c] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new.requires_grad_(False)
    unet.register_to_config(in_channels=2 * c + 1)
    return unet


def is_inpaint(unet):
    return unet.config.in_channels != unet.config.out_channels


def inpaint_mask(boxes, masks, h, w):
    """(B, 1, h, w): 1 where the image is kept, 0 inside any filled slot's box, on the latent grid with GLIGEN's and
    diffusers' rounding (rows int(y0 * h) to int(y1 * h)). boxes (B, 30, 4) x0, y0, x1, y1; masks (B, 30)."""
    b = boxes.double() * torch.tensor([w, h, w, h], dtype=torch.float64, device=boxes.device)
    b = b.floor()[..., None]  # (B, 30, 4, 1)
    x, y = torch.arange(w, device=boxes.device), torch.arange(h, device=boxes.device)
    inside = ((y >= b[:, :, 1]) & (y < b[:, :, 3]))[..., :, None] & ((x >= b[:, :, 0]) & (x < b[:, :, 2]))[..., None, :]
    return 1 - (inside & (masks[..., None, None] > 0)).any(1, keepdim=True).float()  # (B, 1, h, w)


class SDXLTextEncoders(nn.Module):
    """SDXL's two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG) behind one CLIPTextModel-like call, on ids
    (B, 2, L) from both tokenizers. As SDXL: the context is both penultimate hidden states side by side (768 + 1280 =
    2048) and text_embeds is bigG's projected EOS feature. The phrase feature (pooler_output) is ViT-L's EOS feature
    beside bigG's projected one: 768 + 1280 = 2048, the UNet's cross-attention width, as a phrase must be."""

    def __init__(self, te1, te2):
        super().__init__()
        self.te1, self.te2 = te1, te2

    def forward(self, ids, attention_mask=None):
        o1 = self.te1(ids[:, 0], attention_mask=attention_mask, output_hidden_states=True)
        o2 = self.te2(ids[:, 1], attention_mask=attention_mask, output_hidden_states=True)
        return SimpleNamespace(last_hidden_state=torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1),
                               pooler_output=torch.cat([o1.pooler_output, o2.text_embeds], -1), text_embeds=o2.text_embeds)


def project_image_embeds(image_embeds, weight, norm=28.7):
    """Text-image mode: CLIP image embeddings (N, D) into the phrase space, through image_project's weight, then
    scaled to norm 28.7 (a phrase's pooled text feature's), as GLIGEN and diffusers' text-image pipeline do."""
    f = F.linear(image_embeds, weight)
    return torch.stack([r / r.norm() * norm for r in f])  # row by row, as the pipeline: the same last bits


def grounding(text_encoder, phrase_ids, phrase_mask, slot_phrase, boxes, masks, images=None):
    """The UNet's "gligen" kwargs: each distinct phrase encoded alone (pooler_output), placed in its slots. Text-image
    training, images = (image features (B, 30, D), phrases_masks, image_masks): each box may lose a phrase or image."""
    feats = text_encoder(phrase_ids, attention_mask=phrase_mask).pooler_output  # (U, D)
    if images is None:
        return {"boxes": boxes, "masks": masks, "positive_embeddings": feats[slot_phrase]}  # (B, 30, D)
    image_feats, phrases_masks, image_masks = images
    return {"boxes": boxes, "masks": masks, "phrases_masks": phrases_masks, "image_masks": image_masks,
            "phrases_embeddings": feats[slot_phrase], "image_embeddings": image_feats}


# -----------------------------------------------------------------------------------------------------------------
# The model: the frozen base, and adapters from this project's checkpoints or from diffusers GLIGEN models.
def is_sdxl(unet):
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def is_adapter(name, inpaint=False):
    """What trains and what a checkpoint holds: fusers, the position net, and in inpainting mode conv_in's weight."""
    return ".fuser." in name or name.startswith("position_net.") or (inpaint and name == "conv_in.weight")


def adapter_state(unet):
    return {k: v for k, v in unet.state_dict().items() if is_adapter(k, is_inpaint(unet))}


def set_adapters(unet, sd, source):
    """Load adapter tensors into an injected UNet; every name and shape must match."""
    own = adapter_state(unet)
    missing, extra = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or extra:
        fail(f"{source}: adapters do not fit this UNet: {len(missing)} missing (e.g. {missing[:2]}), "
             f"{len(extra)} unexpected (e.g. {extra[:2]})")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            fail(f"{source}: {k} has shape {tuple(v.shape)}, this UNet needs {tuple(own[k].shape)}")
    unet.load_state_dict(sd, strict=False)


def missing_local_path(src):
    """Whether src reads as a local path (not a Hub id "owner/name") that does not exist."""
    src = str(src)
    return not os.path.exists(src) and (src.startswith((".", "/", "~")) or src.count("/") != 1
                                        or src.endswith(".safetensors"))


def adapters_file(src):
    """This project's adapters.safetensors for src (the file, a checkpoint, or an out_dir's latest checkpoint), or
    None for a diffusers GLIGEN model (directory or Hub id)."""
    path = Path(src)
    if missing_local_path(src):
        fail(f"adapters not found: {src}")
    if path.is_dir() and checkpoints(path):
        path = latest_good_checkpoint(path) or fail(f"{path}: none of its checkpoints is usable")
    if path.is_dir() and (path / "adapters.safetensors").exists():
        path = path / "adapters.safetensors"
    return path if path.suffix == ".safetensors" else None


def load_adapters(src):
    """Adapter tensors from this project's adapters.safetensors, checkpoint or out_dir (its latest checkpoint),
    or from a diffusers GLIGEN model (directory or Hub id, e.g. the official SD1.4 text-box model)."""
    path = adapters_file(src)
    if path is not None:
        return load_file(path)
    from diffusers import UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet")
    except (OSError, ValueError) as e:
        fail(f"cannot read adapters from {src!r} (no checkpoint, .safetensors or diffusers GLIGEN model there): {e}")
    sd = {k: v for k, v in unet.state_dict().items() if is_adapter(k, is_inpaint(unet))}
    if not sd:
        fail(f"{src}: its UNet has no GLIGEN adapters (it was not built with attention_type='gated')")
    return sd


def load_image_project(src):
    """A text-image model's image_project weight (D, D): beside this project's adapters.safetensors, or a diffusers
    text-image model's own (its image_project folder)."""
    from diffusers.pipelines.stable_diffusion.clip_image_project_model import CLIPImageProjection

    path = adapters_file(src)
    if path is not None:
        if not path.with_name("image_project.safetensors").is_file():
            fail(f"{path.with_name('image_project.safetensors')} not found: text-image adapters keep it beside them")
        return load_file(path.with_name("image_project.safetensors"))["project.weight"]
    try:
        return CLIPImageProjection.from_pretrained(src, subfolder="image_project").project.weight.detach()
    except (OSError, ValueError) as e:
        fail(f"{src}: no image_project (a diffusers GLIGEN text-image model has one): {e}")


def load_base(model, device, dtype):
    """The frozen parts of a diffusers SD model (directory or Hub id): UNet, text encoder, tokenizer, scheduler.
    SDXL (its UNet takes "text_time" conditioning): both text encoders as one SDXLTextEncoders, a tokenizer pair.
    ModelScope/Zeroscope: a UNet3DConditionModel."""
    from diffusers import DDPMScheduler, UNet2DConditionModel, UNet3DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if missing_local_path(model):
        fail(f"model directory not found: {model}")
    try:
        video = UNet2DConditionModel.load_config(model, subfolder="unet")["_class_name"] == "UNet3DConditionModel"
        unet_class = UNet3DConditionModel if video else UNet2DConditionModel
        unet = unet_class.from_pretrained(model, subfolder="unet", torch_dtype=dtype).to(device)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype).to(device)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
        if is_sdxl(unet):
            te2 = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", torch_dtype=dtype)
            text_encoder = SDXLTextEncoders(text_encoder, te2.to(device))
            tokenizer = (tokenizer, CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2"))
        scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    except (OSError, ValueError) as e:
        fail(f"cannot load the model {model!r} (not a local diffusers directory, and not loadable from the Hub): {e}")
    if getattr(unet.config, "attention_type", "default") != "default":
        fail(f"{model} is already a GLIGEN model: pass its base as --model and it as --init_from")
    if is_inpaint(unet):
        fail(f"{model}: its UNet takes {unet.config.in_channels} input channels (an inpainting or depth model?); "
             f"GLIGEN trains on a text-to-image base (for inpainting: that base with --inpaint=True)")
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    return unet, text_encoder, tokenizer, scheduler


# -----------------------------------------------------------------------------------------------------------------
# Text and layouts: tokenization, checks on phrases and boxes, and batching them into the 30 grounding slots.
def side_by_side(pair):
    """SDXL's two tokenizers' (ids, mask) as ids (B, 2, L) and one mask: same vocabulary, so the same lengths."""
    return torch.stack([pair[0][0], pair[1][0]], 1), pair[0][1]


def tokenize(tokenizer, texts):
    """Token ids and attention mask of captions, padded to 77 as SD expects. SDXL's pair of tokenizers gives ids
    (B, 2, 77) (their pad tokens differ)."""
    if isinstance(tokenizer, tuple):
        return side_by_side([tokenize(t, texts) for t in tokenizer])
    t = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                  truncation=True)  # lists, then one torch.tensor each: transformers' own conversion is 3x slower
    return torch.tensor(t["input_ids"]), torch.tensor(t["attention_mask"])


def tokenize_phrases(tokenizer, phrases):
    """Phrases padded to the longest (CLIP is causal: the pooled feature equals the phrase alone at 77), each phrase
    tokenized once per process and kept on the tokenizer: phrases repeat across batches ("a man", "the table"), and
    the loader workers spend most of their time here."""
    if isinstance(tokenizer, tuple):  # SDXL
        return side_by_side([tokenize_phrases(t, phrases) for t in tokenizer])
    known = tokenizer.__dict__.setdefault("gligen_phrase_ids", {})
    new = [p for p in phrases if p not in known]
    if new:
        if len(known) > 200_000:
            known.clear()
        known.update(zip(new, tokenizer(new, max_length=tokenizer.model_max_length, truncation=True)["input_ids"]))
    n = max(len(known[p]) for p in phrases)
    ids, mask = np.full((len(phrases), n), tokenizer.pad_token_id, np.int64), np.zeros((len(phrases), n), np.int64)
    for i, p in enumerate(phrases):
        ids[i, :len(known[p])], mask[i, :len(known[p])] = known[p], 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def check_layout(phrases, boxes, where, max_boxes=N_SLOTS):
    """Fail, naming `where`, unless phrases and boxes are equal-length lists (at most max_boxes; None: any number)
    of non-empty strings and xyxy in [0, 1]."""
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


def is_moving(boxes):
    """Whether a video layout's boxes are one list per frame (they move) rather than one list for all frames."""
    first = boxes[0] if boxes else None
    return isinstance(first, (list, tuple)) and bool(first) and isinstance(first[0], (list, tuple))


def mirror(boxes):
    """Boxes (..., 4) x0, y0, x1, y1 mirrored left to right; numpy or torch, a new array."""
    m = boxes[..., [2, 1, 0, 3]]
    m[..., [0, 2]] = 1 - m[..., [0, 2]]
    return m


def layout_tensors(tokenizer, layouts):
    """Batch of layouts -> phrase ids of the distinct phrases, slot->phrase index, boxes (B, 30, 4), masks (B, 30)."""
    phrases = list(dict.fromkeys(p for phr, _ in layouts for p in phr)) or [""]  # distinct, in order of appearance
    ids, mask = tokenize_phrases(tokenizer, phrases)
    row = {p: i for i, p in enumerate(phrases)}
    slot_phrase = np.zeros((len(layouts), N_SLOTS), np.int64)  # filled in numpy: a torch call per row costs more
    boxes, masks = np.zeros((len(layouts), N_SLOTS, 4), np.float32), np.zeros((len(layouts), N_SLOTS), np.float32)
    for i, (phr, bxs) in enumerate(layouts):
        slot_phrase[i, :len(phr)] = [row[p] for p in phr]
        boxes[i, :len(bxs)] = np.asarray(bxs, dtype=np.float32).reshape(-1, 4)
        masks[i, :len(phr)] = 1
    return ids, mask, torch.from_numpy(slot_phrase), torch.from_numpy(boxes), torch.from_numpy(masks)


# -----------------------------------------------------------------------------------------------------------------
# The data: latents from prep_latents.py joined with phrases and boxes from prep_boxes.py.
def read_jsonl(path):
    """(line number, record) for each line of a JSONL file; a bad line stops with the file and line named."""
    if not Path(path).is_file():
        fail(f"file not found: {path}")
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
    largest first. Shards are memmapped: a sample reads only its own rows, from any shard. With image_features (the
    text-image mode) an item also holds its kept boxes' image features (k, D), the same when mirrored (as GLIGEN's
    precomputed ones)."""

    def __init__(self, latents_dir, boxes_path, max_boxes=N_SLOTS, min_box_area=0.01, image_features=""):
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
            check_layout(rec["phrases"], rec["boxes"], where, max_boxes=None)  # the largest max_boxes are kept
            layouts[rec["image"]] = (where, rec)
        fdir, feats, shapes = Path(image_features), {}, {}
        if image_features:
            if not (fdir / "index.jsonl").is_file():
                fail(f"data file not found: {fdir / 'index.jsonl'} (write it with prep_latents.py --image_encoder)")
            feats = {r["key"]: (line, r) for line, r in read_jsonl(fdir / "index.jsonl")}
            self.image_meta = json.loads((fdir / "meta.json").read_text())
        self.items, missing, rows = [], [], {}
        for line, rec in read_jsonl(self.dir / "index.jsonl"):
            if rec["key"] not in layouts or (image_features and rec["key"] not in feats):
                missing.append(rec["key"])
                continue
            where, lay = layouts[rec["key"]]
            if (lay["width"], lay["height"]) != (rec["width"], rec["height"]):
                fail(f"{where}: image size {lay['width']}x{lay['height']} does not match "
                     f"{rec['width']}x{rec['height']} in {self.dir / 'index.jsonl'}:{line}: latents and boxes are "
                     f"of different images")
            phrases, boxes, keep = self.crop_layout(lay, rec["crop"], max_boxes, min_box_area)
            feat = None
            if image_features:
                fline, f = feats[rec["key"]]
                if f["boxes"] != len(lay["boxes"]):
                    fail(f"{fdir / 'index.jsonl'}:{fline}: {f['boxes']} box features for image {rec['key']!r}, but "
                         f"{where} has {len(lay['boxes'])} boxes: were the features made from another boxes file?")
                feat = (fdir / f["shard"], f["row"] + np.asarray(keep, np.int64))
                n = max(rows.get(feat[0], 0), f["row"] + f["boxes"])
                rows[feat[0]], shapes[feat[0]] = n, (self.image_meta["dim"],)
            self.items.append((self.dir / rec["shard"], rec["row"], rec["caption"], phrases, boxes,
                               self.time_ids(rec, self.resolution), feat))
            rows[self.dir / rec["shard"]] = max(rows.get(self.dir / rec["shard"], 0), rec["row"] + 1)
            shapes[self.dir / rec["shard"]] = (len(meta["views"]), len(meta["stats"]), *meta["latent_shape"])
        if missing:
            fail(f"{boxes_path}" + (f" or {fdir / 'index.jsonl'}" if image_features else "") + f" has no record for "
                 f"{len(missing)} of the images in {self.dir / 'index.jsonl'} (e.g. {missing[:3]}): were they made "
                 f"from the same images?")
        for path, n in rows.items():  # a shard cut short (a copy that stopped) fails here, not in a loader worker
            try:
                got = np.load(path, mmap_mode="r").shape
                problem = None if got[0] >= n and got[1:] == shapes[path] else f"its shape is {got}"
            except (OSError, ValueError, EOFError) as e:
                problem = f"it is unreadable ({e})"
            if problem:
                fail(f"{path}: {problem}, and {path.parent / 'index.jsonl'} needs {n} rows of {shapes[path]}: cut "
                     f"short or from another run? Copy it again, or delete it and {path.stem}.json and run the same "
                     f"prep_latents.py command again: it redoes that shard alone")
        self.arrays = {}

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
        return [lay["phrases"][i] for i in keep], b[keep].astype(np.float32), keep

    def __len__(self):
        return len(self.items)

    def array(self, path):
        if path not in self.arrays:  # memmapped, opened once per worker process
            self.arrays[path] = np.load(path, mmap_mode="r")
        return self.arrays[path]

    def __getitem__(self, item):
        i, flip = item
        shard, row, caption, phrases, boxes, (time_ids, flipped_left), feat = self.items[i]
        if flip:
            boxes = mirror(boxes)
            time_ids = (*time_ids[:3], flipped_left, *time_ids[4:])
        latent = torch.from_numpy(np.array(self.array(shard)[row, int(flip)]))  # view 1: the mirrored image
        if feat is None:
            return latent, caption, phrases, boxes, time_ids
        return latent, caption, phrases, boxes, time_ids, self.array(feat[0])[feat[1]].astype(np.float32)


def collate(tokenizer, items):
    """Items -> a micro-batch of tensors. Strings are tokenized here, in the loader workers, not in the loop."""
    latents, captions, phrases, boxes, time_ids, *feats = zip(*items)
    ids, mask, slot_phrase, boxes, masks = layout_tensors(tokenizer, list(zip(phrases, boxes)))
    batch = dict(latents=torch.stack(latents), caption_ids=tokenize(tokenizer, list(captions))[0], phrase_ids=ids,
                 phrase_mask=mask, slot_phrase=slot_phrase, boxes=boxes, masks=masks,
                 time_ids=torch.tensor(time_ids, dtype=torch.float32))  # one call for the batch: cheaper than per item
    if feats:  # text-image: each box's image feature in its slot, (B, 30, D)
        f = np.zeros((len(items), N_SLOTS, feats[0][0].shape[-1]), np.float32)
        for i, x in enumerate(feats[0]):
            f[i, :len(x)] = x
        batch["image_feats"] = torch.from_numpy(f)
    return batch


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
# The training step: the loss of one micro-batch, and the update. benchmark.py times these same functions.
def forward_process(alphas_cumprod, x0, noise, t, prediction_type):
    """The noised latent x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, and the UNet's target: the noise, or v."""
    a = alphas_cumprod[t].view(-1, *[1] * (x0.dim() - 1))
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return xt, noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0


def micro_step_loss(model, batch, g, text_encoder, alphas_cumprod, empty_ids, cfg, autocast=nullcontext(), video=False,
                    inpaint=False):
    """The GLIGEN loss of one micro-batch: caption and grounding drops, noise and timestep from the generator g; the
    frozen text encoder on captions and phrases; the UNet (model: possibly DDP-wrapped or compiled). inpaint: the UNet
    also gets the latent outside the sample's boxes and the mask (from all its boxes, even with grounding dropped)."""
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
    if inpaint:
        m = inpaint_mask(batch["boxes"], batch["masks"], *x0.shape[-2:])
        xt = torch.cat([xt, x0 * m, m], dim=1)  # (b, 9, h, w)
    with torch.no_grad(), autocast:
        keep = keep_caption.view(-1, *[1] * (empty_ids.dim() - 1))
        encoded = text_encoder(torch.where(keep, batch["caption_ids"], empty_ids))
        text = encoded.last_hidden_state  # (b, 77, D)
        added = {}  # SDXL: its pooled text and size conditioning
        if isinstance(text_encoder, SDXLTextEncoders):
            added = {"added_cond_kwargs": dict(text_embeds=encoded.text_embeds, time_ids=batch["time_ids"])}
        masks = batch["masks"] * keep_grounding[:, None]  # dropped grounding: every slot null
        images = None
        if "image_feats" in batch:  # text-image: half the boxes lose their phrase or their image (never both)
            drop = torch.rand(masks.shape, generator=g, device=device) < 0.5
            image_side = torch.rand(masks.shape, generator=g, device=device) < 0.5
            images = (batch["image_feats"], masks * ~(drop & ~image_side), masks * ~(drop & image_side))
        gligen = grounding(text_encoder, batch["phrase_ids"], batch["phrase_mask"], batch["slot_phrase"],
                           batch["boxes"], masks, images)
    with autocast:
        pred = model(xt, t, encoder_hidden_states=text, cross_attention_kwargs={"gligen": gligen}, **added).sample
    return F.mse_loss(pred.float(), target)


@torch.no_grad()
def box_use_losses(loss_of, unet, batches, seed):
    """Do the adapters use the boxes? The loss on fixed batches of training images (noise and timesteps fixed by seed;
    loss_of keeps every caption and all grounding) three ways: with their true boxes, with the boxes mirrored left to
    right, and with no grounding. Once the adapters place objects by their boxes, the true boxes give a clearly lower
    loss than the mirrored ones, long before a picture shows it."""
    losses, n = dict(boxes=0.0, mirrored=0.0, no_grounding=0.0), sum(len(b["latents"]) for b in batches)
    for k, b in enumerate(batches):
        variants = dict(boxes=b, mirrored={**b, "boxes": mirror(b["boxes"])},
                        no_grounding={**b, "masks": torch.zeros_like(b["masks"])})
        for name, batch in variants.items():  # the same noise and timesteps for each
            g = torch.Generator(b["latents"].device).manual_seed(seed + k)
            losses[name] += loss_of(unet, batch, g).item() * len(b["latents"]) / n
    return {f"val_loss_{k}": v for k, v in losses.items()}


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
# Sampling: the validation grid's images here, and sample.py's.
@torch.no_grad()
def generate(unet, vae, text_encoder, tokenizer, scheduler, prompt, phrases, boxes, seed, n=1, steps=25,
             guidance=7.5, beta=1.0, height=None, width=None, frames=16, inpaint_latent=None, images=None,
             progress=False):
    """n images (uint8, (n, H, W, 3)) for one layout, as StableDiffusionGLIGENPipeline makes them: classifier-free
    guidance where the unconditional half gets null grounding, and fusers on for the first beta * steps steps.
    SDXL: the unconditional half has zero text features, and size conditioning (H, W, 0, 0, H, W), as its pipeline.
    Video UNets: n clips (n, frames, H, W, 3); boxes may be one list (still) or one list per frame (moving).
    inpaint_latent (1, 4, h, w), for an inpainting UNet: that image is kept outside the boxes (noised to each step's
    level and pasted in before it, as the pipeline does) and the phrases are generated inside them. images, for a
    text-image UNet: per box its reference image's feature (project_image_embeds) or None; a phrase may be None.
    progress: a tqdm bar over the denoising steps."""
    device, scale = unet.device, 2 ** (len(vae.config.block_out_channels) - 1)
    height, width = height or unet.config.sample_size * scale, width or unet.config.sample_size * scale
    F_ = frames if is_video(unet) else 1
    ids = torch.cat([tokenize(tokenizer, [""])[0], tokenize(tokenizer, [prompt])[0]]).to(device)
    encoded = text_encoder(ids)
    text, added = encoded.last_hidden_state, {}
    if is_sdxl(unet):
        text = torch.cat([torch.zeros_like(text[:1]), text[1:]])
        pooled = torch.cat([torch.zeros_like(encoded.text_embeds[:1]), encoded.text_embeds[1:]])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * 2, device=device, dtype=text.dtype)
        added = {"added_cond_kwargs": {"text_embeds": pooled.repeat_interleave(n, dim=0),
                                       "time_ids": time_ids.repeat_interleave(n, dim=0)}}
    text = text.repeat_interleave(n, dim=0)  # (2n, 77, D): [uncond; cond]
    kwargs = None
    if phrases:
        per_frame = boxes if is_moving(boxes) else [boxes] * F_
        if len(per_frame) != F_:
            fail(f"{len(per_frame)} lists of boxes for {F_} frames")
        layouts = [([p or "" for p in phrases], per_frame[f]) for _ in range(2 * n) for f in range(F_)]  # frame-minor
        phrase_ids, phrase_mask, slot_phrase, bxs, masks = layout_tensors(tokenizer, layouts)
        masks[:n * F_] = 0  # the unconditional half: null grounding
        if not hasattr(unet.position_net, "linears_text"):
            kwargs = {"gligen": grounding(text_encoder, phrase_ids.to(device), phrase_mask.to(device),
                                          slot_phrase.to(device), bxs.to(device), masks.to(device, text.dtype))}
        else:  # text-image: a box has a phrase (not None), an image, or both
            feats = torch.zeros(2, N_SLOTS, text.shape[-1], device=device, dtype=text.dtype)  # phrases, images
            has = torch.zeros(2, N_SLOTS, device=device, dtype=text.dtype)
            for k, (p, im) in enumerate(zip(phrases, images or [None] * len(phrases))):
                if p is not None:  # each phrase encoded alone, as the text-image pipeline does: the same last bits
                    ids, mask = (x.to(device) for x in tokenize_phrases(tokenizer, [p]))
                    feats[0, k], has[0, k] = text_encoder(ids, attention_mask=mask).pooler_output[0], 1
                if im is not None:
                    feats[1, k], has[1, k] = im, 1
            m = masks.to(device, text.dtype)
            kwargs = {"gligen": {"boxes": bxs.to(device), "masks": m, "phrases_masks": m * has[0],
                                 "image_masks": m * has[1], "phrases_embeddings": feats[0].expand(len(layouts), -1, -1),
                                 "image_embeddings": feats[1].expand(len(layouts), -1, -1)}}
    g = torch.Generator().manual_seed(seed)  # on the CPU, so a seed gives the same image on any device
    shape = (n, unet.config.out_channels) + ((F_,) if is_video(unet) else ()) + (height // scale, width // scale)
    latents = torch.randn(shape, generator=g).to(device)
    scheduler.set_timesteps(steps, device=device)
    latents = latents * scheduler.init_noise_sigma
    if inpaint_latent is not None:
        z = inpaint_latent.to(device, torch.float32)
        m = inpaint_mask(torch.tensor(boxes, dtype=torch.float64).reshape(1, -1, 4), torch.ones(1, len(boxes)),
                         *z.shape[-2:])
        m = m.to(device)
        kept = torch.cat([z * m, m], dim=1).to(unet.dtype).expand(2 * n, -1, -1, -1)  # (2n, 5, h, w)
    extra = {k: v for k, v in dict(eta=0.0, generator=g).items() if k in inspect.signature(scheduler.step).parameters}
    n_grounded = int(beta * len(scheduler.timesteps))  # GLIGEN's scheduled sampling
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="denoising", leave=False, disable=not progress)):
        if inpaint_latent is not None:  # the image outside the boxes, at this step's noise level
            noisy = scheduler.add_noise(z, torch.randn(z.shape, generator=g).to(device), t.reshape(1))
            latents = noisy * m + latents * (1 - m)
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t).to(unet.dtype)
        if inpaint_latent is not None:
            x = torch.cat([x, kept], dim=1)
        out = unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=kwargs if i < n_grounded else None, **added)
        uncond, cond = out.sample.float().chunk(2)
        latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents, **extra).prev_sample
    if is_video(unet):  # (n, C, F, h, w) -> frames (n F, C, h, w)
        latents = latents.transpose(1, 2).flatten(0, 1)
    image = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
    image = (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    image = (image * 255).round().astype(np.uint8)
    return image.reshape(n, F_, *image.shape[1:]) if is_video(unet) else image


COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#ffe119"]


def draw_layout(image, phrases, boxes):
    """A copy of a PIL image with each box and its phrase drawn on (small images enlarged first, to be readable)."""
    image = image.convert("RGB")
    scale = max(1, 256 // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    d, (W, H) = ImageDraw.Draw(image), image.size
    font = ImageFont.load_default(size=max(8, W // 28))
    for i, (p, (x0, y0, x1, y1)) in enumerate(zip(phrases, boxes)):
        c = COLORS[i % len(COLORS)]
        d.rectangle([x0 * W, y0 * H, x1 * W, y1 * H], outline=c, width=max(1, W // 128))
        tag = d.textbbox((x0 * W, y0 * H), p, font=font)  # the phrase on a tag in the box's colour
        d.rectangle([tag[0], tag[1], tag[2] + 4, tag[3] + 2], fill=c)
        d.text((x0 * W + 2, y0 * H), p, fill="white", font=font)
    return image


# -----------------------------------------------------------------------------------------------------------------
# Checkpoints: out_dir/step_0002000/ holds adapters.safetensors, state.pt (optimizer, step, config, data position)
# and manifest.json (each file's size and sha256, written last). It is written as step_0002000.tmp and renamed when
# whole, so a kill while saving leaves the previous checkpoint the latest; one whose files do not match their
# manifest (truncated, corrupted) is set aside, and the run resumes from the one before.
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
    """The newest checkpoint that verifies. Newer broken ones are reported, and renamed *.corrupt if set_aside."""
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


def save_checkpoint(out_dir, step, unet, opt, cfg, data, files=()):
    """Write out_dir/step_<step>, with copies of files (a text-image model's image_project). Returns None, or what
    went wrong (a full disk, say); the previous checkpoint is then intact."""
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
        for f in files:
            shutil.copyfile(f, tmp / Path(f).name)
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
# main, in stages: settings, setup, data, model, validation, the loop, the exit.
def check_settings(cfg):
    """Stop on a setting that cannot work, before anything slow starts."""
    in_range(cfg, "global_batch micro_batch max_steps max_bad_steps log_every save_every keep_last val_steps", 1)
    in_range(cfg, "lr weight_decay warmup_steps seed num_workers val_every val_images", 0)
    in_range(cfg, "caption_keep grounding_drop min_box_area", 0, 1)
    in_range(cfg, "max_boxes", 1, N_SLOTS)
    if not cfg["grad_clip"] > 0:
        fail(f"--grad_clip={cfg['grad_clip']}: must be above 0 (at 0 every gradient is clipped to nothing)")
    if cfg["dtype"] not in ("auto", "fp32"):
        fail(f"--dtype={cfg['dtype']}: must be auto (bf16 on CUDA, fp32 on CPU) or fp32")
    if cfg["init_from"] and missing_local_path(cfg["init_from"]):
        fail(f"--init_from={cfg['init_from']}: adapters not found")
    if cfg["compile"] and cfg["compile"] not in torch._dynamo.list_backends(exclude_tags=()):
        fail(f"--compile={cfg['compile']}: not a torch.compile backend (e.g. inductor, aot_eager)")


def setup_distributed(cuda):
    """Under torchrun: join the process group. Returns rank, world size, device, and a CPU group for small votes."""
    # After a worker dies, torchrun --max-restarts starts new workers on the same store: keys prefixed by the
    # attempt keep them from reading the dead group's addresses (a refused connection, or a hang, otherwise).
    store, rank, world = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world)
    device = f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device, dist.new_group(backend="gloo") if cuda else dist.group.WORLD  # votes skip the GPU


def restore(cfg, unet, resume):
    """Adapters from the checkpoint to resume (which must be of the same setup), or from init_from. Returns the step
    and the optimizer state to continue from (0 and None for a new run)."""
    if not resume:
        if cfg["init_from"]:
            sd = load_adapters(cfg["init_from"])
            if cfg["image_features"] and "position_net.linears_text.0.weight" in sd:  # a text-image model's own map
                own = load_image_project(cfg["init_from"])
                if not torch.equal(own.float(), load_file(Path(cfg["image_features"]) / "image_project.safetensors")[
                        "project.weight"]):
                    fail(f"{cfg['image_features']} was made with another image_project than {cfg['init_from']}'s: "
                         f"run prep_latents.py --image_encoder with --image_project={cfg['init_from']}")
            if cfg["inpaint"]:  # from a text-box model (the official's route): conv_in as widened, its new inputs zero
                sd.setdefault("conv_in.weight", unet.conv_in.weight.detach().clone())
            set_adapters(unet, sd, cfg["init_from"])
        return 0, None
    state = torch.load(resume / "state.pt", map_location="cpu", weights_only=True)
    for key in ("model", "resolution", "global_batch", "images", "inpaint"):  # what a checkpoint cannot carry over
        if state["config"].get(key, False) != cfg[key]:
            fail(f"{resume} was trained with {key}={state['config'][key]!r}, this run has {key}={cfg[key]!r}. "
                 f"Run with the same {key}, or start a new out_dir with --init_from={resume}")
    set_adapters(unet, load_file(resume / "adapters.safetensors"), resume)  # checks all, then loads
    return state["step"], state["optimizer"]


def validation_grid(path, layouts, models, cfg, autocast, **extra):
    """A row of images from fixed layouts and seed, with the boxes drawn on. models: unet, vae, text encoder,
    tokenizer, scheduler; extra: generate's (an inpainting model's image)."""
    images = []
    for l in layouts:
        with autocast:
            im = generate(*models, l["prompt"], l["phrases"], l["boxes"], seed=cfg["seed"], steps=cfg["val_steps"],
                          frames=1, **extra)[0]
        im = im[0] if is_video(models[0]) else im  # a video model's one-frame clip
        images.append(draw_layout(Image.fromarray(im), l["phrases"], l["boxes"]))
    grid = Image.new("RGB", (sum(im.width for im in images), images[0].height))
    for k, im in enumerate(images):
        grid.paste(im, (k * im.width, 0))
    grid.save(path)


def ignore_stop_signals(worker_id):
    """Loader workers leave SIGTERM and SIGUSR1 to the main process, which saves, then stops them."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def main(cfg):
    check_settings(cfg)
    # Setup: DDP when torchrun sets RANK, else one process; precision; preemption signals.
    ddp, cuda = "RANK" in os.environ, torch.cuda.is_available()
    rank, world, device, cpu_group = setup_distributed(cuda) if ddp else (0, 1, "cuda" if cuda else "cpu", None)
    master, G, B, out = rank == 0, cfg["global_batch"], cfg["micro_batch"], Path(cfg["out_dir"])
    if G % (B * world):
        fail(f"global_batch {G} is not a multiple of micro_batch {B} x world size {world}")
    accum = G // (B * world)
    bf16 = cfg["dtype"] == "auto" and cuda
    base_dtype = torch.bfloat16 if bf16 else torch.float32  # the frozen base; adapters stay fp32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # Preemption: SIGTERM (SLURM, torchrun) and SIGUSR1 (SLURM's warning) ask to save and stop at a step boundary.
    signals = []
    old_handlers = {sig: signal.signal(sig, lambda num, frame: signals.append(signal.Signals(num).name))
                    for sig in (signal.SIGTERM, signal.SIGUSR1)}

    # Data: read and checked before the model loads, so bad data fails in seconds, not after minutes of loading.
    data = GroundedLatents(cfg["latents"], cfg["boxes"], cfg["max_boxes"], cfg["min_box_area"], cfg["image_features"])
    n = len(data)
    if n < G:
        fail(f"{cfg['latents']} has {n} usable images, fewer than one global batch ({G})")
    layouts = [r for _, r in read_jsonl(cfg["val_layouts"])] if cfg["val_layouts"] else VAL_LAYOUTS
    for i, l in enumerate(layouts):
        where = f"{cfg['val_layouts'] or 'VAL_LAYOUTS'}[{i}]"
        check_layout(l.get("phrases"), l.get("boxes"), where)
        if not isinstance(l.get("prompt"), str):
            fail(f"{where}: a layout needs a prompt string")

    # Model: the frozen base (bf16 on CUDA) + adapters (fp32): resumed, from init_from, or fresh.
    unet, text_encoder, tokenizer, noise_scheduler = load_base(cfg["model"], device, base_dtype)
    for mode, on in (("--inpaint=True", cfg["inpaint"]), ("--image_features", cfg["image_features"])):
        if on and (is_sdxl(unet) or is_video(unet)):
            fail(f"{mode} is for SD1.x/2.x models, and {cfg['model']} is an SDXL or video model")
    if cfg["image_features"] and data.image_meta["dim"] != unet.config.cross_attention_dim:
        fail(f"{cfg['image_features']}: image features of {data.image_meta['dim']}, but {cfg['model']} takes "
             f"{unet.config.cross_attention_dim} (SD1.x: a CLIP ViT-L/14, SD2.x: an OpenCLIP ViT-H/14 image encoder)")
    if cfg["inpaint"]:
        widen_conv_in(unet)
    torch.manual_seed(cfg["seed"])  # fresh adapters are the same for any number of processes
    inject_gligen(unet, images=bool(cfg["image_features"]))
    resume = [latest_good_checkpoint(out, set_aside=True) if master else None]
    if ddp:
        dist.broadcast_object_list(resume, src=0, group=cpu_group)
    cfg = {**cfg, "world_size": world, "grad_accum": accum, "resolution": data.resolution, "images": n,
           "prediction_type": noise_scheduler.config.prediction_type}
    image_project = []  # text-image: the features' image_project, kept with the adapters for sampling and export
    if cfg["image_features"]:
        cfg["image_encoder"] = data.image_meta["image_encoder"]
        image_project = [Path(cfg["image_features"]) / "image_project.safetensors"]
    if cfg["prediction_type"] not in ("epsilon", "v_prediction"):
        fail(f"{cfg['model']}: prediction_type {cfg['prediction_type']!r} is not supported (epsilon or v_prediction)")
    step, opt_state = restore(cfg, unet, resume[0])
    params = [p.requires_grad_(True) for name, p in unet.named_parameters() if is_adapter(name, cfg["inpaint"])]
    if cfg["grad_checkpointing"]:  # diffusers checkpoints each resnet and transformer block, fusers included
        unet.enable_gradient_checkpointing()
        unet.train()  # older diffusers checkpoint in training mode only; SD has no dropout, so nothing else changes
    device_ids = [torch.cuda.current_device()] if cuda else None
    model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=device_ids) if ddp else unet
    step_model = torch.compile(model, backend=cfg["compile"]) if cfg["compile"] else model  # flags stay on model
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], fused=True)
    if opt_state:
        opt.load_state_dict(opt_state)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)  # (T,): the forward process's a_t
    empty_ids = tokenize(tokenizer, [""])[0].to(device)  # the dropped caption
    loss_of = partial(micro_step_loss, text_encoder=text_encoder, alphas_cumprod=alphas_cumprod, empty_ids=empty_ids,
                      cfg=cfg, autocast=autocast, video=is_video(unet), inpaint=cfg["inpaint"])  # (model, batch, g)
    # Each rank loads its own micro-batches from the data position that the step implies.
    loader = iter(torch.utils.data.DataLoader(
        data, batch_sampler=rank_batches(n, G, B, world, rank, cfg["seed"], step, cfg["flip"] and data.has_flipped),
        num_workers=cfg["num_workers"],
        collate_fn=partial(collate, tokenizer), pin_memory=cuda, worker_init_fn=ignore_stop_signals))

    # Logging and validation, on rank 0.
    out.mkdir(parents=True, exist_ok=True)
    if master:
        import diffusers
        import transformers

        gpu = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if cuda else "CPU"
        print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
              f"transformers {transformers.__version__}, {gpu}")
        print(json.dumps(cfg))
        print(f"{n} images; {world} processes x {accum} micro-steps x {B} = {G} per step; "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters; "
              + (f"resuming from {resume[0]}" if resume[0] else f"adapters from {cfg['init_from'] or 'a fresh init'}"))
        if (out / "log.jsonl").exists():  # steps logged after the checkpoint we resume from run again: drop them
            kept = [json.dumps(r) + "\n" for _, r in read_jsonl(out / "log.jsonl") if r["step"] <= step]
            (out / "log.jsonl").write_text("".join(kept))
        if cfg["val_every"]:
            from diffusers import AutoencoderKL, DDIMScheduler

            vae = AutoencoderKL.from_pretrained(cfg["model"], subfolder="vae", torch_dtype=base_dtype).to(device)
            ddim = DDIMScheduler.from_pretrained(cfg["model"], subfolder="scheduler")
            val_models = (unet, vae, text_encoder, tokenizer, ddim)
            # the box-use losses: a fixed random set of training images, unflipped, every caption and box kept
            pick = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"]))[:cfg["val_images"]].tolist()
            val_batches = [{k: v.to(device) for k, v in collate(tokenizer, [data[(i, False)] for i in chunk]).items()}
                           for chunk in (pick[j:j + B] for j in range(0, len(pick), B))]
            val_loss_of = partial(loss_of, cfg={**cfg, "caption_keep": 1.0, "grounding_drop": 0.0})
            # an inpainting model fills the validation layouts' boxes into a training image (the first of val_images)
            extra = dict(inpaint_latent=data[(pick[0] if pick else 0, False)][0][:1].float(), height=data.resolution,
                         width=data.resolution) if cfg["inpaint"] else {}
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=not master, dynamic_ncols=True)

    def validate():  # rank 0: the grid, and the loss with the true boxes, mirrored ones and none, logged
        validation_grid(out / f"val_{step:07d}.png", layouts, val_models, cfg, autocast, **extra)
        if val_batches:
            rec = dict(step=step, **box_use_losses(val_loss_of, unet, val_batches, cfg["seed"]))
            bar.write(f"val step {step} | loss with boxes {rec['val_loss_boxes']:.5f}, mirrored "
                      f"{rec['val_loss_mirrored']:.5f} (gap {rec['val_loss_mirrored'] - rec['val_loss_boxes']:+.5f}), "
                      f"no grounding {rec['val_loss_no_grounding']:.5f}")
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    if master and cfg["val_every"] and step == 0:
        validate()  # the base model, before training: what the adapters start from
    # FLOPs of one step per image, for the MFU in the log: counted once, on one image, in a pass of its own (a dispatch
    # mode may pick other kernels: the counted pass must not be a training step)
    probe = {k: v.to(device) for k, v in collate(tokenizer, [data[(0, False)]]).items()}
    flops_per_image = count_flops(lambda: loss_of(unet, probe, torch.Generator(device).manual_seed(0)).backward())
    opt.zero_grad(set_to_none=True)
    peak = next((v for k, v in PEAK_BF16.items() if cuda and k in torch.cuda.get_device_name()), 0)
    if master:
        bar.write(f"one step: {flops_per_image / 1e12:.4g} TFLOP per image (model FLOPs, torch flop counter)"
                  + (f"; {peak / 1e12:.0f} TFLOP/s bf16 peak per GPU" if peak else ""))

    # The loop: accumulate micro-batches, step, log, save, validate; stop at max_steps or on a signal.
    zero = torch.zeros((), device=device)
    loss_sum, n_good, bad_run, worst_run = zero.clone(), zero.clone(), zero.clone(), zero.clone()
    n_logged, t0, vote, vote_work = 0, time.perf_counter(), None, None
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
            error = [save_checkpoint(out, step, unet, opt, cfg, position, image_project) if master else None]
            if ddp:
                dist.broadcast_object_list(error, src=0, group=cpu_group)  # and no rank runs ahead of a checkpoint
            if error[0]:
                fail(error[0])
        if master and cfg["val_every"] and (step % cfg["val_every"] == 0 or last):
            validate()
        t0 += time.perf_counter() - t_io  # checkpoints and validation do not count against images/s
        if stop:
            bar.write(f"rank {rank}: {', '.join(signals) or 'another rank got a signal'}: stopped at step {step}, "
                      f"saved {out / f'step_{step:07d}'}; run the same command to resume")
            break

    # The exit: wait for the last vote, give the signals back, leave the process group.
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
