"""
GLIGEN for diffusers UNets: the method (gated self-attention "fusers" and the position net, injected into a stock
UNet), loading base models and adapters, text and layouts, and sampling. train_gligen.py trains the adapters,
sample.py draws with them; lift the method block below into another project as it is.
"""
import hashlib
import inspect
import json
import math
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file


def fail(msg):
    """Stop with a message that says what is wrong and where (file, record)."""
    raise SystemExit(f"error: {msg}")


# -----------------------------------------------------------------------------------------------------------------
# The method: gated self-attention ("fuser") and the position net, injected into a stock diffusers UNet.
# Parameter names equal diffusers' attention_type="gated" UNet, so weights move both ways without renaming.
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


def inject_gligen(unet):
    """Give every spatial transformer block of a stock diffusers UNet a fresh fuser and the UNet a fresh position net.
    diffusers' BasicTransformerBlock already calls `self.fuser` between self- and cross-attention when
    cross_attention_kwargs holds "gligen", and the UNet turns {boxes, masks, positive_embeddings} into tokens with
    `self.position_net`; so injecting is attaching the modules. Pass grounding as
    unet(x, t, text, cross_attention_kwargs={"gligen": {"boxes": ..., "masks": ..., "positive_embeddings": ...}}).
    Video UNets (UNet3DConditionModel): fusers in the spatial blocks only, one set of grounding tokens per frame
    (boxes (batch x frames, 30, 4), frame-minor), temporal blocks untouched."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    D = unet.config.cross_attention_dim
    spatial = {id(b) for m in unet.modules() if isinstance(m, Transformer2DModel) for b in m.transformer_blocks}
    for block in unet.modules():
        if isinstance(block, BasicTransformerBlock):
            a = block.attn1
            block.fuser = Fuser(a.query_dim, D, a.heads, a.inner_dim // a.heads).to(unet.device) \
                if id(block) in spatial else NoFuser()
    unet.position_net = PositionNet(D).to(unet.device)
    if is_video(unet):
        unet.register_forward_pre_hook(video_position_net, with_kwargs=True)
    return unet


def is_video(unet):
    return type(unet).__name__ == "UNet3DConditionModel"


def is_sdxl(unet):
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def is_moving(boxes):
    """Whether a video layout's boxes are one list per frame (they move) rather than one list for all frames."""
    first = boxes[0] if boxes else None
    return isinstance(first, (list, tuple)) and bool(first) and isinstance(first[0], (list, tuple))


def forward_process(alphas_cumprod, x0, noise, t, prediction_type):
    """The noised latent x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, and the UNet's target: the noise, or v."""
    a = alphas_cumprod[t].view(-1, *[1] * (x0.dim() - 1))
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return xt, noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0


class SDXLTextEncoders(nn.Module):
    """SDXL's two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG) behind one CLIPTextModel-like call, on ids
    (B, 2, L) from both tokenizers. As SDXL: the context is both penultimate hidden states side by side (768 + 1280 =
    2048) and text_embeds is bigG's projected EOS feature. The phrase feature (pooler_output) is ViT-L's EOS feature
    beside bigG's projected one: 768 + 1280 = 2048, the UNet's cross-attention width, as a phrase must be."""

    def __init__(self, te1, te2):
        super().__init__()
        self.te1, self.te2 = te1, te2

    def forward(self, ids, attention_mask=None):
        m = (None, None) if attention_mask is None else (attention_mask, attention_mask)
        o1 = self.te1(ids[:, 0], attention_mask=m[0], output_hidden_states=True)
        o2 = self.te2(ids[:, 1], attention_mask=m[1], output_hidden_states=True)
        return SimpleNamespace(last_hidden_state=torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1),
                               pooler_output=torch.cat([o1.pooler_output, o2.text_embeds], -1), text_embeds=o2.text_embeds)


def grounding(text_encoder, phrase_ids, phrase_mask, slot_phrase, boxes, masks):
    """The UNet's "gligen" kwargs: each distinct phrase encoded alone (pooler_output), placed in its slots."""
    feats = text_encoder(phrase_ids, attention_mask=phrase_mask).pooler_output  # (U, D)
    return {"boxes": boxes, "masks": masks, "positive_embeddings": feats[slot_phrase]}  # (B, 30, D)


# -----------------------------------------------------------------------------------------------------------------
# Loading: the frozen base model, and adapters from this project's checkpoints or diffusers GLIGEN models.
def is_adapter(name):
    return ".fuser." in name or name.startswith("position_net.")


def adapter_state(unet):
    return {k: v for k, v in unet.state_dict().items() if is_adapter(k)}


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


# This project's checkpoints: out_dir/step_0002000/ with adapters.safetensors, state.pt and manifest.json (each
# file's size and sha256); train_gligen.py writes them. A checkpoint whose files do not match is unusable.
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


def load_adapters(src):
    """Adapter tensors from this project's adapters.safetensors, checkpoint or out_dir (its latest checkpoint),
    or from a diffusers GLIGEN model (directory or Hub id, e.g. the official SD1.4 text-box model)."""
    path = Path(src)
    if path.is_dir() and checkpoints(path):
        path = latest_good_checkpoint(path) or fail(f"{path}: none of its checkpoints is usable")
    if path.is_dir() and (path / "adapters.safetensors").exists():
        path = path / "adapters.safetensors"
    if path.suffix == ".safetensors":
        if not path.is_file():
            fail(f"adapter file not found: {path}")
        return load_file(path)
    from diffusers import UNet2DConditionModel

    try:
        sd = UNet2DConditionModel.from_pretrained(src, subfolder="unet").state_dict()
    except (OSError, ValueError) as e:
        fail(f"cannot read adapters from {src!r} (no checkpoint, .safetensors or diffusers GLIGEN model there): {e}")
    sd = {k: v for k, v in sd.items() if is_adapter(k)}
    if not sd:
        fail(f"{src}: its UNet has no GLIGEN adapters (it was not built with attention_type='gated')")
    return sd


def load_base(model, device, dtype):
    """The frozen parts of a diffusers SD model (directory or Hub id): UNet, text encoder, tokenizer, scheduler.
    SDXL (its UNet takes "text_time" conditioning): both text encoders as one SDXLTextEncoders, a tokenizer pair.
    ModelScope/Zeroscope: a UNet3DConditionModel."""
    from diffusers import DDPMScheduler, UNet2DConditionModel, UNet3DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if not os.path.isdir(model) and (model.startswith((".", "/", "~")) or model.count("/") != 1):
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
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    return unet, text_encoder, tokenizer, scheduler


# -----------------------------------------------------------------------------------------------------------------
# Text and layouts: tokenization, checks on phrases and boxes, and batching them into the 30 grounding slots.
def side_by_side(pair):
    """SDXL's two tokenizers' (ids, mask) as ids (B, 2, L) and one mask: same vocabulary, so the same lengths."""
    return torch.stack([pair[0][0], pair[1][0]], 1), pair[0][1]


def tokenize(tokenizer, texts, longest=False):
    """Token ids and attention mask: captions padded to 77 as SD expects; phrases (longest=True) to the longest.
    SDXL's pair of tokenizers gives ids (B, 2, L) (their pad tokens differ)."""
    if isinstance(tokenizer, tuple):
        return side_by_side([tokenize(t, texts, longest) for t in tokenizer])
    t = tokenizer(texts, padding="longest" if longest else "max_length", max_length=tokenizer.model_max_length,
                  truncation=True)  # lists, then one torch.tensor each: transformers' own conversion is 3x slower
    return torch.tensor(t["input_ids"]), torch.tensor(t["attention_mask"])


def check_layout(phrases, boxes, where):
    """Fail, naming `where`, unless phrases and boxes are equal-length lists of non-empty strings and xyxy in [0,1]."""
    if not isinstance(phrases, list) or not isinstance(boxes, list) or len(phrases) != len(boxes):
        fail(f"{where}: phrases and boxes must be lists of the same length, got {phrases!r} and {boxes!r}")
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


def tokenize_phrases(tokenizer, phrases):
    """tokenize(tokenizer, phrases, longest=True), each phrase tokenized once per process and kept on the tokenizer:
    phrases repeat across batches ("a man", "the table"), and the loader workers spend most of their time here."""
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
# Sampling: used for train_gligen.py's validation grid and by sample.py.
@torch.no_grad()
def generate(unet, vae, text_encoder, tokenizer, scheduler, prompt, phrases, boxes, seed, n=1, steps=25,
             guidance=7.5, beta=1.0, height=None, width=None, frames=16):
    """n images (uint8, (n, H, W, 3)) for one layout, as StableDiffusionGLIGENPipeline makes them: classifier-free
    guidance where the unconditional half gets null grounding, and fusers on for the first beta * steps steps.
    SDXL: the unconditional half has zero text features, and size conditioning (H, W, 0, 0, H, W), as its pipeline.
    Video UNets: n clips (n, frames, H, W, 3); boxes may be one list (still) or one list per frame (moving)."""
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
        layouts = [(phrases, per_frame[f]) for _ in range(2 * n) for f in range(F_)]  # frame-minor, as the UNet
        phrase_ids, phrase_mask, slot_phrase, bxs, masks = layout_tensors(tokenizer, layouts)
        masks[:n * F_] = 0  # the unconditional half: null grounding
        kwargs = {"gligen": grounding(text_encoder, phrase_ids.to(device), phrase_mask.to(device),
                                      slot_phrase.to(device), bxs.to(device), masks.to(device, text.dtype))}
    g = torch.Generator().manual_seed(seed)  # on the CPU, so a seed gives the same image on any device
    shape = (n, unet.config.in_channels) + ((F_,) if is_video(unet) else ()) + (height // scale, width // scale)
    latents = torch.randn(shape, generator=g).to(device)
    scheduler.set_timesteps(steps, device=device)
    latents = latents * scheduler.init_noise_sigma
    extra = {k: v for k, v in dict(eta=0.0, generator=g).items() if k in inspect.signature(scheduler.step).parameters}
    n_grounded = int(beta * len(scheduler.timesteps))  # GLIGEN's scheduled sampling
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t).to(unet.dtype)
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
