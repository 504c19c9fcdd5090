"""
Smoke tests: a tiny end-to-end run on CPU with no downloads, plus checks that can fail.

    pytest -q test_smoke.py        # about 5 to 7 minutes on 2 CPU cores (docs/tests.md has the timings)

Tiny randomly initialised components are saved as diffusers directories, so the real from_pretrained paths run.
The file reads: helpers and fixtures, then the method, prep, training, determinism, sampling, bad input, faults,
extras, the code, the app. The app's tests need extras/requirements.txt and Debian's chromium; without them they skip
(under GLIGEN_CI=1, as .ci/run sets, they fail).
"""
import copy
import errno
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train_gligen as tg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "extras"))  # the shapes demo, the benchmark, the grounding scorer


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """tg.main installs SIGTERM/SIGUSR1 handlers; a test that stops inside it must not leave them behind."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------------------------
# Helpers: tiny models and data, running the scripts, and one assertion per kind of equality
def write_tokenizer(path):
    """A tiny CLIP BPE vocabulary: CLIP's byte alphabet, with and without the end-of-word mark, a few merges."""
    path.mkdir(parents=True, exist_ok=True)
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    merges = ["a n", "t h", "th e</w>", "o n</w>", "e d</w>", "i n", "r e"]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def tiny_tokenizer(path, **kwargs):
    """A CLIPTokenizer over the offline vocabulary that write_tokenizer(path / "_tok") wrote."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(path / "_tok" / "vocab.json"), str(path / "_tok" / "merges.txt"), model_max_length=77,
                         **kwargs)


def tiny_text_config(n_vocab, **kwargs):
    """A 32-wide, 2-layer CLIP text encoder config over that vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=n_vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, bos_token_id=n_vocab - 2,
                          eos_token_id=n_vocab - 1, pad_token_id=n_vocab - 1, **kwargs)


def tiny_vae(**kwargs):
    """A 2-level autoencoder: 16 x 16 x 3 pixels to 8 x 8 x 4 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16,
                         **kwargs)


def make_tiny_sd(path, prediction_type="epsilon", sd2=False):
    """A tiny SD1.x-shaped (or SD2.x-shaped: linear projections, per-block heads, v-prediction) model directory."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    n_vocab = write_tokenizer(path / "_tok")
    tokenizer = tiny_tokenizer(path)
    text_encoder = CLIPTextModel(tiny_text_config(n_vocab))
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4) if sd2 else 8, use_linear_projection=sd2)
    vae = tiny_vae()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def make_tiny_sdxl(path):
    """A tiny SDXL-shaped model: two text encoders (32 + 32 = the UNet's 64-wide cross-attention, the second with a
    projection), a second tokenizer padding with "!", "text_time" added conditioning, 2-layer transformer blocks."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    n_vocab = write_tokenizer(path / "_tok")
    tok = [tiny_tokenizer(path), tiny_tokenizer(path, pad_token="!")]
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=64,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    vae = tiny_vae(scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(tiny_text_config(n_vocab)),
                              text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(n_vocab, projection_dim=32)),
                              tokenizer=tok[0], tokenizer_2=tok[1], unet=unet,
                              scheduler=scheduler).save_pretrained(path)
    return path


def make_tiny_video(path):
    """A tiny ModelScope-shaped text-to-video model (UNet3DConditionModel: spatial and temporal transformers)."""
    from diffusers import DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    n_vocab = write_tokenizer(path / "_tok")
    tokenizer = tiny_tokenizer(path)
    text_encoder = CLIPTextModel(tiny_text_config(n_vocab))
    unet = UNet3DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        attention_head_dim=8)
    vae = tiny_vae()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                          scheduler=scheduler).save_pretrained(path)
    return path


def tiny_t5(n_vocab, width):
    """A 2-layer T5 encoder over the same vocabulary (an offline stand-in: its tokenizer is the CLIP one)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=n_vocab, d_model=width, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                                   relative_attention_num_buckets=8, feed_forward_proj="relu", pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0))


def tiny_flow_vae():
    """The VAE of both tiny MMDiTs (the same weights: one set of latents trains both), shifted and scaled like SD3's."""
    torch.manual_seed(0)
    return tiny_vae(shift_factor=0.0609, scaling_factor=1.5035)


def make_tiny_sd3(path):
    """A tiny SD3-shaped model: 2 joint blocks (the last one context_pre_only) 32 wide, patch 2; CLIP-L and CLIP-G
    (32 + 32 wide states, zero-padded to T5's 80), pooled 16 + 16; T5; the flow scheduler with SD3's static shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    vae = tiny_flow_vae()
    n_vocab = write_tokenizer(path / "_tok")
    tok = tiny_tokenizer(path)
    te1, te2 = (CLIPTextModelWithProjection(tiny_text_config(n_vocab, projection_dim=16)) for _ in range(2))
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=80, pooled_projection_dim=32, pos_embed_max_size=16)
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                             text_encoder=te1, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok,
                             text_encoder_3=tiny_t5(n_vocab, 80), tokenizer_3=tok).save_pretrained(path)
    return path


def make_tiny_flux(path, guidance_embeds=True):
    """A tiny Flux-shaped model: 2 double-stream and 1 single-stream blocks 32 wide, RoPE over (4, 4, 8) dims, 4-channel
    latents packed into 16; CLIP-L and T5; dev's guidance embedding (schnell without); the dynamically shifted
    flow scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    vae = tiny_flow_vae()
    n_vocab = write_tokenizer(path / "_tok")
    tok = tiny_tokenizer(path)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(tiny_text_config(
        n_vocab)), tokenizer=tok, text_encoder_2=tiny_t5(n_vocab, 32), tokenizer_2=tok).save_pretrained(path)
    return path


def make_tiny_clip(path):
    """A tiny CLIP (text and vision towers with their projections, 32 wide) and its image processor (32 px), as the
    image encoder of the text-image mode."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    torch.manual_seed(0)
    n_vocab = write_tokenizer(path / "_tok")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = tiny_text_config(n_vocab, projection_dim=32).to_dict()
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=32)).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def make_tiny_grounding_dino_vocab(path):
    """An offline BERT vocabulary: a few words, then single letters for everything else."""
    path.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", "a", "red", "blue", "square", "circle", "cat",
             "on", "mat", "tall", "door", "five", "six"]
    (path / "vocab.txt").write_text("\n".join(words + list("abcdefghijklmnopqrstuvwxyz")) + "\n")
    return path


def make_tiny_grounding_dino(path):
    """A tiny random GroundingDINO (Swin backbone, BERT text encoder) with an offline BERT vocabulary."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    torch.manual_seed(0)
    make_tiny_grounding_dino_vocab(path)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1], num_heads=[1, 1, 1],
                                   window_size=4, out_features=["stage2", "stage3"]),
        text_config=BertConfig(vocab_size=len((path / "vocab.txt").read_text().split()), hidden_size=32,
                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=64),
        d_model=32, num_queries=8, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_feature_levels=2, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32, use_timm_backbone=False, use_pretrained_backbone=False)
    GroundingDinoForObjectDetection(config).save_pretrained(path)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}),
                           tokenizer=BertTokenizer(str(path / "vocab.txt"))).save_pretrained(path)
    return path


SHAPES = {1: ("red square", (220, 40, 40)), 2: ("blue circle", (40, 60, 220)), 3: ("green triangle", (40, 180, 60))}


def make_coco(root, n=12, seed=0):
    """n images of coloured shapes (sizes vary, so crops differ) with COCO instances and captions JSON, plus the
    quirks of the real files: a crowd box, a box reaching outside its image, a zero-area box, an image with no
    annotations; and a corrupt JPEG and an image without a caption for prep_latents to skip."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, anns, caps = [], [], []
    for i in range(n):
        W, H = [(48, 32), (32, 48), (40, 40)][i % 3]
        name = f"img_{i:03d}.{'jpg' if i % 2 else 'png'}"
        arr = np.full((H, W, 3), 235, np.uint8)
        k = 0 if i == 5 else 1 + i % 3  # image 5 has no annotations
        for j in range(k):
            cat = 1 + (i + j) % 3
            w, h = int(rng.integers(8, W // 2)), int(rng.integers(8, H // 2))
            x, y = int(rng.integers(0, W - w)), int(rng.integers(0, H - h))
            arr[y:y + h, x:x + w] = SHAPES[cat][1]
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=cat, bbox=[x, y, w, h], iscrowd=0,
                             area=w * h))
        Image.fromarray(arr).save(root / "images" / name)
        images.append(dict(id=i + 1, file_name=name, width=W, height=H))
        caps += [dict(id=1000 + 2 * i + 1, image_id=i + 1, caption=f" second caption {i}"),
                 dict(id=1000 + 2 * i, image_id=i + 1, caption=f"a picture of shapes number {i} ")]
    anns += [dict(id=900, image_id=1, category_id=1, bbox=[0, 0, 20, 20], iscrowd=1, area=400),  # crowd
             dict(id=901, image_id=2, category_id=2, bbox=[-4, 20, 16, 40], iscrowd=0, area=640),  # outside: clipped
             dict(id=902, image_id=3, category_id=3, bbox=[5, 5, 0, 10], iscrowd=0, area=0)]  # zero area
    images.append(dict(id=n + 1, file_name="broken.jpg", width=40, height=40))
    caps.append(dict(id=5000, image_id=n + 1, caption="a broken file"))
    images.append(dict(id=n + 2, file_name="small.png", width=3, height=2))  # under 16 / 4 px: too small to encode
    caps.append(dict(id=5001, image_id=n + 2, caption="a thumbnail"))
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(root / "images" / "small.png")
    (root / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "images" / "uncaptioned.png")
    cats = [dict(id=c, name=name) for c, (name, _) in SHAPES.items()]
    (root / "instances.json").write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    (root / "captions.json").write_text(json.dumps(dict(images=images, annotations=caps)))
    return root


def jpeg_bytes(seed, size=(40, 28)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def png_bytes(jpeg):
    """A JPEG's image as PNG bytes."""
    b = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(b, "PNG")
    return b.getvalue()


def write_tar(path, members, gz=False):
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_tars(root):
    """Two SA-1B tars (jpg + masks json per image, captions in a separate JSON map) and a gzipped webdataset tar
    (captions inside). Among them: a corrupt JPEG, an image without a caption, and a tar cut off inside an image."""
    root.mkdir(parents=True)
    masks = lambda i: json.dumps(dict(image=dict(image_id=i, width=40, height=28), annotations=[])).encode()
    write_tar(root / "sa_000000.tar", [("sa_1.jpg", jpeg_bytes(1)), ("sa_1.json", masks(1)),
                                       ("sa_2.jpg", jpeg_bytes(2, (28, 40))), ("sa_2.json", masks(2)),
                                       ("sa_3.jpg", b"\xff\xd8\xff\xe0 not a jpeg"), ("sa_4.jpg", jpeg_bytes(4))])
    write_tar(root / "sa_000001.tar", [("sa_5.jpg", jpeg_bytes(5)), ("sa_6.jpg", jpeg_bytes(6)),
                                       ("sa_7.jpg", jpeg_bytes(7))])
    data = (root / "sa_000001.tar").read_bytes()
    cut = data.index(jpeg_bytes(7)) + 100
    (root / "sa_000001.tar").write_bytes(data[:cut])  # the download broke inside sa_7.jpg
    captions = {"sa_1": "a cat on a mat", "sa_2.jpg": "a tall red door", "sa_3": "broken", "sa_5": "five",
                "sa_6": "six", "sa_7": "seven"}  # SAM-LLaVA style: names with or without the extension
    (root / "captions.json").write_text(json.dumps(captions))
    (root / "wds").mkdir()
    write_tar(root / "wds" / "part-000.tar.gz", [
        ("000000.png", png_bytes(jpeg_bytes(8))),
        ("000000.txt", b"a png with a txt caption"), ("000001.jpg", jpeg_bytes(9)),
        ("000001.json", json.dumps(dict(caption="a jpg with a json caption")).encode()),
        ("000002.jpg", jpeg_bytes(10))], gz=True)
    return root


def write_boxes(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def nan_latents(tiny_data, tmp_path, keys):
    """A copy of the latents where the images `keys` are NaN."""
    out = tmp_path / "latents"
    shutil.copytree(tiny_data["latents"], out)
    for rec in map(json.loads, (out / "index.jsonl").read_text().splitlines()):
        if rec["key"] in keys:
            shard = np.load(out / rec["shard"])
            shard[rec["row"]] = np.nan
            np.save(out / rec["shard"], shard)
    return out


def embed_features(tiny_clip, tiny_data, out):
    """prep_latents.py --image_encoder on the tiny data's images and boxes (in this process: cheaper than a new one)."""
    import prep_latents as pl

    pl.main({**pl.config, "image_encoder": str(tiny_clip), "images": str(tiny_data["root"] / "images"),
             "boxes": str(tiny_data["boxes"]), "out": str(out), "batch_size": 3, "shard_size": 4, "num_workers": 0})
    return out


def grounding_inputs(B=2, D=32, seed=1, images=False):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, tg.N_SLOTS, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + torch.rand(B, tg.N_SLOTS, 2, generator=g) * 0.5], dim=-1)
    masks = torch.zeros(B, tg.N_SLOTS)
    masks[0, :3] = 1
    masks[1, :1] = 1
    if images:  # text-image: box 0 has both, box 1 only a phrase, box 2 only an image
        phrases_masks = masks * torch.tensor([1.0, 1, 0] + [1] * 27)
        image_masks = masks * torch.tensor([1.0, 0] + [1] * 28)
        return dict(boxes=boxes, masks=masks, phrases_masks=phrases_masks, image_masks=image_masks,
                    phrases_embeddings=torch.randn(B, tg.N_SLOTS, D, generator=g),
                    image_embeddings=torch.randn(B, tg.N_SLOTS, D, generator=g))
    return dict(boxes=boxes, masks=masks, positive_embeddings=torch.randn(B, tg.N_SLOTS, D, generator=g))


def run(script, *args, torchrun=0, timeout=None, **env):
    """Run a project script as a user would; return its completed process (stdout and stderr as text)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else []
    cmd = [sys.executable, *launcher]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(cmd + [str(HERE / script), *args], capture_output=True, text=True, env=env, cwd=HERE,
                          timeout=timeout)


def train_cfg(tiny_sd, tiny_data, out_dir, **over):
    return {**tg.config, "model": str(tiny_sd), "latents": str(tiny_data["latents"]), "boxes": str(tiny_data["boxes"]),
            "out_dir": str(out_dir), "global_batch": 4, "micro_batch": 2, "num_workers": 0, "log_every": 1,
            "val_every": 0, "warmup_steps": 2, "lr": 1e-3, **over}


def args_of(cfg):
    """A cfg as the trainer's command line: the settings that differ from config."""
    return [f"--{k}={v}" for k, v in cfg.items() if k in tg.config and v != tg.config[k]]


def fault_args(tiny_sd, tiny_data, out_dir, *extra):
    """The command line of the fault tests' run: train_cfg's, 20 steps, a checkpoint every 5."""
    return args_of(train_cfg(tiny_sd, tiny_data, out_dir, max_steps=20, save_every=5)) + list(extra)


ONE_THREAD = dict(OMP_NUM_THREADS="1")  # as torchrun sets for its workers: the same float reductions everywhere


def adapters_of(run_dir):
    return tg.load_adapters(str(run_dir))


def losses(run_dir):
    return [r["loss"] for _, r in tg.read_jsonl(Path(run_dir) / "log.jsonl") if "loss" in r]  # not the validations


def wait_for(condition, timeout=120):
    end = time.time() + timeout
    while not condition():
        assert time.time() < end, "timed out"
        time.sleep(0.05)


def assert_latents_of(tiny_sd, image, shard, row, resolution):
    """Row `row` of `shard` holds the VAE mean (less its shift factor, where it has one) and std of the image's center
    crop and its mirror, x scaling."""
    from diffusers import AutoencoderKL

    im = Image.open(image).convert("RGB")
    m = min(im.size)
    crop = ((im.width - m) // 2, (im.height - m) // 2, (im.width - m) // 2 + m, (im.height - m) // 2 + m)
    x = torch.from_numpy(np.asarray(im.resize((resolution,) * 2, Image.Resampling.BICUBIC, box=crop), np.float32))
    x = x.permute(2, 0, 1) / 127.5 - 1
    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    with torch.no_grad():
        d = vae.encode(torch.stack([x, x.flip(-1)])).latent_dist
    shift = vae.config.shift_factor or 0.0
    want = torch.stack([d.mean - shift, d.std], 1) * vae.config.scaling_factor  # (views, stats, 4, h, w)
    got = np.load(shard, mmap_mode="r")[row]
    assert got.dtype == np.float16 and got.shape == tuple(want.shape)
    torch.testing.assert_close(torch.from_numpy(got.astype(np.float32)), want, atol=2e-3, rtol=2e-3)


def assert_same_tensors(a, b):
    """Two dicts of tensors (adapters, optimizer states) hold the same names and the same bits."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_base_untouched(unet, base):
    """Every tensor of a trained UNet but its adapters equals the frozen base's, bit for bit."""
    adapters = tg.adapter_state(unet)
    for name, v in unet.state_dict().items():
        if name not in adapters:
            assert torch.equal(v, base.state_dict()[name]), f"frozen {name} changed"


def pixels(images):
    """A diffusers pipeline's images (output_type="np", floats in [0, 1]) as sample.py writes them: uint8 levels."""
    return (images * 255).round().astype(int)


def pngs(folder, n, layout=0):
    """sample.py's first n images of a layout, (n, H, W, 3) ints."""
    return np.stack([np.asarray(Image.open(folder / f"{layout:03d}_{i:02d}.png")) for i in range(n)]).astype(int)


def optimizer_state(run_dir):
    state = torch.load(tg.checkpoints(run_dir)[-1] / "state.pt", weights_only=True)["optimizer"]["state"]
    return {f"{i}.{k}": v for i in state for k, v in state[i].items()}


def random_adapters_of(stages, base, seed, path, gate=2.0, noise=1.0, **metadata):
    """Adapters of a family and mode with wide-open gates (alpha = gate: tanh(2)) and strong random weights, saved as a
    checkpoint saves them (path/adapters.safetensors): strong enough that grounding in late denoising steps, and in
    the unconditional half, shows in the pixels (noise scales the random part). Returns the tensors."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    sd = tg.adapter_state(stages.add_adapters(copy.deepcopy(base)))
    sd = {k: torch.full_like(v, gate) if ".alpha_" in k else
          v + torch.randn_like(v) * noise * (0.5 if v.ndim < 2 else 0.3) for k, v in sd.items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, path / "adapters.safetensors", metadata={"config": json.dumps(metadata)})
    return sd

# ---------------------------------------------------------------------------------------------------------------
# Fixtures: built once per session (the torchrun one per test)
@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("tiny-sd2"), prediction_type="v_prediction", sd2=True)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_video(tmp_path_factory):
    return make_tiny_video(tmp_path_factory.mktemp("tiny-video"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    return make_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    return make_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_data(tiny_sd, tmp_path_factory):
    root = make_coco(tmp_path_factory.mktemp("coco"))
    boxes = run("prep_boxes.py", f"--instances={root / 'instances.json'}", f"--captions={root / 'captions.json'}",
                f"--out={root / 'boxes.jsonl'}")
    assert boxes.returncode == 0, boxes.stderr
    latents = run("prep_latents.py", f"--model={tiny_sd}", f"--images={root / 'images'}",
                  f"--captions={root / 'boxes.jsonl'}", f"--out={root / 'latents'}", "--resolution=16",
                  "--batch_size=5", "--shard_size=4", "--num_workers=2", "--std=True", "--flip=True")
    assert latents.returncode == 0, latents.stderr
    return dict(root=root, boxes=root / "boxes.jsonl", latents=root / "latents", boxes_log=boxes.stdout,
                latents_log=latents.stdout)


def encode_tiny_data(model, tiny_data, name):
    """The tiny data's images encoded by another model's VAE (in-process), beside tiny_data's own latents."""
    import prep_latents as pl

    out = tiny_data["root"] / name
    pl.main({**pl.config, "model": str(model), "images": str(tiny_data["root"] / "images"),
             "captions": str(tiny_data["boxes"]), "out": str(out), "resolution": 16, "batch_size": 5, "shard_size": 4,
             "num_workers": 0, "std": True, "flip": True})
    return {**tiny_data, "latents": out}


@pytest.fixture(scope="session")
def tiny_sdxl_data(tiny_sdxl, tiny_data):
    """The tiny data's images encoded by the tiny SDXL's VAE (its own scaling factor), for SDXL training."""
    return encode_tiny_data(tiny_sdxl, tiny_data, "latents-sdxl")


@pytest.fixture(scope="session")
def tiny_flow_data(tiny_sd3, tiny_data):
    """tiny_data's images encoded by the tiny MMDiTs' VAE (shared by both): its shift and scaling applied."""
    return encode_tiny_data(tiny_sd3, tiny_data, "latents-flow")


def make_pose(root, seed=0):
    """COCO's person_keypoints file for make_coco's images: every box a person with 17 keypoints (v 0, 1 or 2)
    inside it, and the real file's quirks: the crowd box with no keypoints, a person with none labelled, a labelled
    point outside its image."""
    rng = np.random.default_rng(seed)
    coco = json.loads((root / "instances.json").read_text())
    size = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    for ann in coco["annotations"]:
        (x, y, w, h), (W, H) = ann["bbox"], size[ann["image_id"]]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)  # inside the image
        kp = [[rng.uniform(x0, max(x0, x1)), rng.uniform(y0, max(y0, y1)), int(rng.choice([2, 2, 2, 1, 0]))]
              for _ in tg.KEYPOINTS]
        kp = [[0, 0, 0] if ann["iscrowd"] or ann["id"] == 1 or v == 0 else [round(a, 2), round(b, 2), v]
              for a, b, v in kp]
        if ann["id"] == 901:  # its box reaches left of the image: so does a labelled point
            kp[0] = [-2, 25, 2]
        ann.update(category_id=1, keypoints=[v for p in kp for v in p], num_keypoints=sum(p[2] > 0 for p in kp))
    coco["categories"] = [dict(id=1, name="person", keypoints=list(tg.KEYPOINTS),
                               skeleton=[[a + 1, b + 1] for a, b in tg.SKELETON])]  # COCO's: 1-based
    (root / "person_keypoints.json").write_text(json.dumps(coco))
    r = run("prep_boxes.py", f"--instances={root / 'person_keypoints.json'}", f"--captions={root / 'captions.json'}",
            f"--out={root / 'pose.jsonl'}")
    assert r.returncode == 0, r.stderr
    (root / "pose.log").write_text(r.stdout)
    return root / "pose.jsonl"


@pytest.fixture(scope="session")
def tiny_pose(tiny_data):
    """make_pose's boxes file of tiny_data's images (whose latents it joins); prep_boxes.py's summary beside it."""
    return make_pose(tiny_data["root"])


def make_maps(root):
    """A map of your own for each of make_coco's images, aligned with it, of the kinds people have: 8-bit PNG,
    16-bit PNG, uint16 NPY and float NPY, one grey channel of random values."""
    (root / "maps").mkdir()
    for i, p in enumerate(sorted((root / "images").iterdir())):
        try:
            with Image.open(p) as im:
                W, H = im.size
        except OSError:  # the broken JPEG
            continue
        a = np.random.default_rng(i).random((H, W))
        [lambda: Image.fromarray((a * 255).round().astype(np.uint8)).save(root / "maps" / f"{p.stem}.png"),
         lambda: Image.fromarray((a * 65535).round().astype(np.uint16)).save(root / "maps" / f"{p.stem}.png"),
         lambda: np.save(root / "maps" / f"{p.stem}.npy", (a * 65535).round().astype(np.uint16)),
         lambda: np.save(root / "maps" / f"{p.stem}.npy", a.astype(np.float32))][i % 4]()
    return root / "maps"


@pytest.fixture(scope="session")
def tiny_maps(tiny_data):
    """prep_latents.py --map's maps of make_maps' files for tiny_data's images, under torchrun (3 shards on 2 ranks);
    its summary beside them."""
    folder = make_maps(tiny_data["root"])
    out = tiny_data["root"] / "map-data"
    r = run("prep_latents.py", f"--map={folder}", f"--images={tiny_data['root'] / 'images'}", f"--out={out}",
            "--resolution=16", "--num_workers=1", "--shard_size=6", torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    (out / "prep.log").write_text(r.stdout)
    return out


@pytest.fixture(scope="session")
def tiny_convnext(tmp_path_factory):
    """A 2-stage ConvNeXt (stride 4: a 32 px map gives 8 x 8 features), as a transformers directory."""
    from transformers import ConvNextConfig, ConvNextModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("convnext")
    config = ConvNextConfig(patch_size=2, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], layer_scale_init_value=0.5)
    ConvNextModel(config).save_pretrained(path)  # layer scales as a trained one has them, not 1e-6
    return path


def map_stages(tiny_maps, tiny_convnext):
    """The spatial-map mode's stages, its map net from these maps and ConvNeXt."""
    return tg.choose_stages("sd", map_net=partial(tg.load_map_net, str(tiny_maps), str(tiny_convnext)))


@pytest.fixture(scope="session")
def tiny_features(tiny_clip, tiny_data):
    """Each box's image feature, for the text-image mode."""
    return embed_features(tiny_clip, tiny_data, tiny_data["root"] / "image-features")


@pytest.fixture(scope="session")
def tars(tmp_path_factory):
    return make_tars(tmp_path_factory.mktemp("data") / "tars")


@pytest.fixture(scope="session")
def reference(tiny_sd, tiny_data, tmp_path_factory):
    """The adapters after 20 steps without a fault."""
    out = tmp_path_factory.mktemp("reference")
    r = run("train_gligen.py", *fault_args(tiny_sd, tiny_data, out), **ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    return adapters_of(out)


@pytest.fixture
def torchrun():
    """Start `torchrun --standalone` on train_gligen.py in the background; whatever happens, it is killed at the end."""
    started = []

    def start(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", *args]
        started.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                                        env={**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"},
                                        start_new_session=True))
        return started[-1]

    yield start
    for p in started:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # torchrun and any worker left, even if torchrun itself has exited
        except ProcessLookupError:
            pass
        p.communicate(timeout=30)


@pytest.fixture(scope="session")
def random_adapters(tiny_sd, tmp_path_factory):
    """Random strong SD1 text-box adapters (random_adapters_of), as an adapters.safetensors path."""
    stages = tg.choose_stages("sd")
    path = tmp_path_factory.mktemp("adapters")
    random_adapters_of(stages, stages.load(str(tiny_sd), "cpu", torch.float32)[0], 3, path)
    return path / "adapters.safetensors"

# ---------------------------------------------------------------------------------------------------------------
# The method: the hand-written layers equal diffusers' gated UNet with the same weights; fresh adapters leave the base
# exactly; the text features and the forward process are diffusers' and SD's
@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl", "sd1-text-image"])
def test_injection_equals_diffusers_gated_unet(variant, tiny_sd, tiny_sd2, tiny_sdxl):
    from diffusers import UNet2DConditionModel

    model = dict(sd1=tiny_sd, sd2=tiny_sd2, sdxl=tiny_sdxl, **{"sd1-text-image": tiny_sd})[variant]
    images = variant == "sd1-text-image"
    pn = dict(position_net=tg.PositionNetTextImage) if images else {}
    D = 64 if variant == "sdxl" else 32
    torch.manual_seed(0)
    base = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    # diffusers' own gated UNet on the same base. (from_pretrained(..., attention_type="gated") would leave the new
    # tensors uninitialised in diffusers 0.42.1, non-finite values included; from_config initialises them.)
    kind = "gated-text-image" if images else "gated"
    gated = UNet2DConditionModel.from_config(base.config, attention_type=kind).eval()
    assert gated.load_state_dict(base.state_dict(), strict=False).unexpected_keys == []
    with torch.no_grad():  # random adapters, gates open: every term of the fuser counts
        for p in tg.adapter_params(gated):
            p.add_(torch.randn_like(p) * (0.5 if p.ndim < 2 else 0.05))
    ours = tg.inject_gligen(UNet2DConditionModel.from_pretrained(model, subfolder="unet"), **pn).eval()
    assert list(ours.state_dict()) == list(gated.state_dict())  # the same names, in the same order
    tg.set_adapters(ours, tg.adapter_state(gated), "diffusers")
    n_blocks = len([n for n in tg.adapter_state(ours) if n.endswith("fuser.alpha_attn")])
    assert n_blocks == (8 if variant == "sdxl" else 7)  # one per transformer block

    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, D, generator=g)
    t = torch.tensor([10, 700])
    kw = {"gligen": grounding_inputs(D=D, images=images)}
    added = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=g),
                                   "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}}
    added = added if variant == "sdxl" else {}
    with torch.no_grad():
        want = gated(x, t, encoder_hidden_states=text, cross_attention_kwargs=kw, **added).sample
        got = ours(x, t, encoder_hidden_states=text, cross_attention_kwargs=kw, **added).sample
        base_out = base(x, t, encoder_hidden_states=text, **added).sample
    assert (got - want).abs().max() <= 1e-5
    assert (got - base_out).abs().max() > 1e-2  # the adapters do act

    fresh = tg.inject_gligen(UNet2DConditionModel.from_pretrained(model, subfolder="unet"), **pn)
    with torch.no_grad():
        zero = fresh(x, t, encoder_hidden_states=text, cross_attention_kwargs=kw, **added).sample
    assert torch.equal(zero, base_out)  # alphas at zero: exactly the base UNet


def test_video_unet_gets_fusers_in_its_spatial_blocks_only(tiny_video):
    """ModelScope-shaped UNet3D: fusers in the spatial transformer blocks, none in the temporal ones, grounding
    tokens per frame; fresh adapters leave it exactly the base; open gates change it."""
    from diffusers import UNet3DConditionModel

    base = UNet3DConditionModel.from_pretrained(tiny_video, subfolder="unet").eval()
    ours = tg.inject_video(UNet3DConditionModel.from_pretrained(tiny_video, subfolder="unet")).eval()
    names = list(tg.adapter_state(ours))
    assert len([n for n in names if n.endswith("fuser.alpha_attn")]) == 4  # the 4 spatial blocks
    assert not [n for n in names if "temp_attentions" in n or "transformer_in" in n]  # temporal: untouched
    assert all(n in ours.state_dict() for n in base.state_dict())
    B, F_ = 2, 3
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(B, 4, F_, 8, 8, generator=g), torch.randn(B, 77, 32, generator=g)
    t = torch.tensor([10, 700])
    kw = {"gligen": grounding_inputs(B=B * F_)}  # one set of tokens per frame: rows b * F + f
    with torch.no_grad():
        base_out = base(x, t, encoder_hidden_states=text).sample
        assert torch.equal(ours(x, t, encoder_hidden_states=text, cross_attention_kwargs=kw).sample, base_out)
        for p in tg.adapter_params(ours):
            p.add_(torch.randn_like(p) * (0.5 if p.ndim < 2 else 0.05))
        got = ours(x, t, encoder_hidden_states=text, cross_attention_kwargs=kw).sample
        moved = {**kw["gligen"], "boxes": kw["gligen"]["boxes"].flip(-1)}
        other = ours(x, t, encoder_hidden_states=text, cross_attention_kwargs={"gligen": moved}).sample
    assert got.shape == base_out.shape and (got - base_out).abs().max() > 1e-2
    # grounding rows 0 and 1 (the only ones with boxes) are frames 0 and 1 of clip 0: moving them changes clip 0 only
    assert (got[0] - other[0]).abs().max() > 0 and torch.equal(got[1], other[1])

    # generate() hands each frame its own boxes, in the same frame-minor order, and null grounding to the
    # unconditional half
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    seen = []
    ours.position_net.register_forward_pre_hook(lambda m, args, kw: seen.append((kw["boxes"], kw["masks"])),
                                                with_kwargs=True)
    per_frame = [[[0.1 * f, 0.2, 0.1 * f + 0.3, 0.6]] for f in range(F_)]
    with torch.no_grad():
        clips = tg.generate_video(ours, AutoencoderKL.from_pretrained(tiny_video, subfolder="vae"),
                                  CLIPTextModel.from_pretrained(tiny_video, subfolder="text_encoder"),
                                  tg.Tokenizer(CLIPTokenizer.from_pretrained(tiny_video, subfolder="tokenizer")),
                                  DDIMScheduler.from_pretrained(tiny_video, subfolder="scheduler"),
                                  [dict(prompt="a red square", phrases=["a red square"], boxes=per_frame)], [0],
                                  n=2, steps=1, frames=F_)
    assert clips.shape == (2, F_, 16, 16, 3)
    boxes, masks = seen[0]  # rows: (uncond, cond) x 2 clips x F frames
    assert masks[:2 * F_].sum() == 0 and masks[2 * F_:, 0].tolist() == [1.0] * 2 * F_
    assert torch.allclose(boxes[2 * F_:, 0], torch.tensor([per_frame[f][0] for _ in range(2) for f in range(F_)]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_forward_process_matches_diffusers(prediction_type):
    from diffusers import DDPMScheduler

    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    xt, target = tg.forward_process(s.alphas_cumprod, x0, noise, t, prediction_type)
    torch.testing.assert_close(xt, s.add_noise(x0, noise, t), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(target, noise if prediction_type == "epsilon" else s.get_velocity(x0, noise, t),
                               atol=1e-6, rtol=1e-6)


def test_phrases_padded_to_longest_equal_each_alone(tiny_sd):
    """Each distinct phrase is encoded once, padded to the longest: its feature equals the phrase alone at 77."""
    from transformers import CLIPTextModel, CLIPTokenizer

    te = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    layouts = [(["a dog", "a red car parked in the rain"], [[0, 0, 1, 1]] * 2), (["a dog"], [[0, 0, 0.5, 0.5]])]
    ids, mask, slot_phrase, boxes, masks = tg.layout_tensors(tg.Tokenizer(tok), layouts)
    assert ids.shape[0] == 2 and ids.shape[1] < 77  # "a dog" once; padded to the longest phrase, not to 77
    for phrases in (["a dog", "a red car parked in the rain"], ["a cat", "a dog"]):  # remembered and new phrases
        want = tok(phrases, padding="longest", max_length=77, truncation=True, return_tensors="pt")
        got = tg.Tokenizer(tok).phrases(phrases)
        assert torch.equal(got[0], want.input_ids) and torch.equal(got[1], want.attention_mask)
    with torch.no_grad():
        batch = dict(phrase_ids=ids, phrase_mask=mask, slot_phrase=slot_phrase, boxes=boxes)
        feats = tg.text_box_grounding(te, batch, masks)["positive_embeddings"]  # (2, 30, D)
        for i, (phrases, _) in enumerate(layouts):
            for k, p in enumerate(phrases):
                alone = te(tg.Tokenizer(tok).captions([p])).pooler_output[0]  # padded to 77
                torch.testing.assert_close(feats[i, k], alone, atol=1e-5, rtol=1e-5)
    assert masks.sum(1).tolist() == [2, 1] and boxes[1, 0].tolist() == [0, 0, 0.5, 0.5]
    full = tg.Tokenizer(tok)  # past its bound the cache starts over, phrases it knew included
    full.phrases(["a dog"])
    full.known.update({f"phrase {i}": [0] for i in range(200_001)})
    assert torch.equal(full.phrases(["a dog", "a cat"])[0], tg.Tokenizer(tok).phrases(["a dog", "a cat"])[0])


def test_sdxl_text_features(tiny_sdxl):
    """SDXL: both tokenizers (their own pad tokens), the 2048-style phrase feature = ViT-L pooled beside bigG's
    projected EOS feature, the context = both penultimate layers."""
    _, te, tok, _ = tg.load_sdxl(str(tiny_sdxl), "cpu", torch.float32)
    ids = tok.captions(["a red square"])
    pads = [t.tokenizer.pad_token_id for t in tok.pair]
    assert ids.shape == (1, 2, 77) and ids[0, 0, -1] == pads[0] and ids[0, 1, -1] == pads[1]
    assert pads[0] != pads[1] and torch.equal(ids[0, 0, :5], ids[0, 1, :5])
    with torch.no_grad():
        out = te(ids)
        o1 = te.te1(ids[:, 0], output_hidden_states=True)
        o2 = te.te2(ids[:, 1], output_hidden_states=True)
    assert torch.equal(out.pooler_output, torch.cat([o1.pooler_output, o2.text_embeds], -1))  # (1, 64)
    assert torch.equal(out.last_hidden_state, torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1))

# ---------------------------------------------------------------------------------------------------------------
# Prep: boxes from COCO and GroundingDINO, latents from folders, tars and IGLIGEN's shards, box image features
def test_prep_boxes_handles_coco_quirks(tiny_data):
    recs = {r["image"]: r for r in map(json.loads, tiny_data["boxes"].read_text().splitlines())}
    assert len(recs) == 14  # every listed image, the unannotated, the broken and the too small one included
    assert recs["img_000.png"]["caption"] == "a picture of shapes number 0"  # first caption by id, stripped
    assert "red square" not in recs["img_000.png"]["phrases"][1:]  # the crowd box (id 900) is left out
    assert recs["img_005.jpg"]["phrases"] == [] and recs["img_005.jpg"]["boxes"] == []
    w, h = recs["img_001.jpg"]["width"], recs["img_001.jpg"]["height"]
    assert recs["img_001.jpg"]["boxes"][-1] == [0.0, round(20 / h, 6), round(12 / w, 6), 1.0]  # clipped left and bottom
    assert len(recs["img_002.png"]["boxes"]) == 3  # its zero-area box is dropped
    log = tiny_data["boxes_log"]
    for quirk in ("1 crowd annotations left out", "1 boxes clipped", "1 boxes of zero area dropped",
                  "3 images without boxes"):
        assert quirk in log, log


def test_prep_boxes_reads_coco_keypoints(tiny_data, tiny_pose, tmp_path):
    """COCO's person_keypoints file: each kept box gets its 17 keypoints as [x, y, v] relative to the image, in
    COCO's order; the crowd box is left out with its keypoints, a labelled point outside the image is made
    unlabelled, a person with none visible is kept and counted. Keypoints other than COCO's 17 stop, named."""
    path, log = tiny_pose, tiny_pose.with_suffix(".log").read_text()
    recs = {r["image"]: r for _, r in tg.read_jsonl(path)}
    coco = json.loads((tiny_data["root"] / "person_keypoints.json").read_text())
    ann = next(a for a in coco["annotations"] if a["id"] == 2)
    rec = recs[next(im["file_name"] for im in coco["images"] if im["id"] == ann["image_id"])]
    W, H, (x, y, v) = rec["width"], rec["height"], ann["keypoints"][:3]
    assert rec["keypoints"][0][0] == [round(x / W, 6), round(y / H, 6), v] and len(rec["keypoints"][0]) == 17
    assert all(len(r["keypoints"]) == len(r["boxes"]) for r in recs.values())
    assert recs["img_001.jpg"]["keypoints"][-1][0] == [0.0, 0.0, 0]  # outside its image: unlabelled
    assert not any(all(p == [0, 0, 0] for p in k) and b == [0.0, 0.0, 20 / 48, 20 / 32]
                   for r in recs.values() for k, b in zip(r["keypoints"], r["boxes"]))  # the crowd box is out
    for quirk in ("1 crowd annotations left out", "1 keypoints outside their image unlabelled",
                  "persons without visible keypoints"):
        assert quirk in log, log
    coco["categories"][0]["keypoints"] = ["head", "tail"]
    (tmp_path / "kp.json").write_text(json.dumps(coco))
    import prep_boxes
    with pytest.raises(SystemExit, match=r"kp.json: category 'person' has keypoints \['head', 'tail'\]"):
        prep_boxes.main({**prep_boxes.config, "instances": str(tmp_path / "kp.json"), "out": str(tmp_path / "o")})


def test_prep_latents_encodes_crops_and_names_skipped(tiny_sd, tiny_data):
    out = tiny_data["latents"]
    meta = json.loads((out / "meta.json").read_text())
    index = [r for _, r in tg.read_jsonl(out / "index.jsonl")]
    assert meta["latent_shape"] == [4, 8, 8] and meta["resolution"] == 16 and meta["images"] == len(index) == 12
    assert (meta["views"], meta["stats"]) == (["original", "flipped"], ["mean", "std"])
    assert sorted(p.name for p in out.glob("*.npy")) == [f"images_0000{i}.npy" for i in range(4)]  # 15 files, 4 a shard
    assert not list(out.glob("*.tmp"))
    skipped = {s["image"]: s["reason"] for s in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert skipped == {"broken.jpg": "unreadable", "uncaptioned.png": "no caption", "small.png": "too small"}
    assert "broken.jpg" in tiny_data["latents_log"] and "uncaptioned.png" in tiny_data["latents_log"]
    # stored: the VAE mean and std of the center crop and of its mirror image, times the scaling factor
    rec = next(r for r in index if r["key"] == "img_000.png")  # 48 x 32: the crop is x 8..40
    got = (rec["width"], rec["height"], rec["crop"], rec["caption"])
    assert got == (48, 32, [8, 0, 40, 32], "a picture of shapes number 0")
    assert_latents_of(tiny_sd, tiny_data["root"] / "images" / "img_000.png", out / rec["shard"], rec["row"], 16)


def test_captions_from_a_coco_json_a_name_map_and_a_jsonl(tiny_data, tmp_path):
    import prep_latents as pl

    coco = pl.load_captions(tiny_data["root"] / "captions.json")  # the first caption by id, as prep_boxes takes
    assert coco["img_003.jpg"] == "a picture of shapes number 3" and len(coco) == 14
    assert pl.load_captions(tiny_data["boxes"])["img_003.jpg"] == "a picture of shapes number 3"
    assert pl.find_caption({"sa_9": "x"}, "sub/sa_9.jpg") == "x" and pl.find_caption({}, "a.jpg") is None
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="bad.json: neither a JSONL"):
        pl.load_captions(tmp_path / "bad.json")


def test_own_images_upright_at_their_depth_of_any_type_and_non_images_named(tiny_sd, tmp_path):
    """A phone photo's EXIF orientation is applied (its size too), a 16-bit grey image is scaled from its full range
    (not clipped at 255), .tif and .gif encode, and a file PIL cannot open is named in skipped.jsonl."""
    import prep_latents as pl

    folder, rng = tmp_path / "images", np.random.default_rng(0)
    folder.mkdir()
    a = rng.integers(0, 256, (16, 24, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to show"
    Image.fromarray(a).save(folder / "phone.png", exif=exif.tobytes())
    Image.fromarray(np.ascontiguousarray(np.rot90(a, -1))).save(folder / "upright.png")
    deep = (np.linspace(0, 65535, 20 * 20).reshape(20, 20)).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")
    Image.fromarray((deep / 257).round().astype(np.uint8)).convert("RGB").save(folder / "deep8.png")
    Image.fromarray(a).save(folder / "scan.tif")
    Image.fromarray(a).save(folder / "anim.gif")
    (folder / "notes.docx").write_bytes(b"PK not an image")
    (folder / "readme.txt").write_text("a sidecar, not an image")
    names = ["phone.png", "upright.png", "deep.png", "deep8.png", "scan.tif", "anim.gif", "notes.docx"]
    (tmp_path / "captions.json").write_text(json.dumps({n: f"picture {n}" for n in names}))
    out = tmp_path / "latents"
    pl.main({**pl.config, "model": str(tiny_sd), "images": str(folder), "captions": str(tmp_path / "captions.json"),
             "out": str(out), "resolution": 16, "batch_size": 8, "num_workers": 0})
    index = {r["key"]: r for _, r in tg.read_jsonl(out / "index.jsonl")}
    assert sorted(index) == sorted(names[:-1])
    assert [r for _, r in tg.read_jsonl(out / "skipped.jsonl")] == [
        dict(image="notes.docx", shard="images_00000", reason="not an image (no type PIL opens)")]
    phone, upright = index["phone.png"], index["upright.png"]
    assert (phone["width"], phone["height"], phone["crop"]) == (16, 24, [0, 4, 16, 20]) == (
        upright["width"], upright["height"], upright["crop"])
    row = lambda r: np.load(out / r["shard"])[r["row"]]
    assert np.array_equal(row(phone), row(upright))
    x16, x8 = (pl.Images([(n, str(folder / n), 0, -1, "")], 16, False)[0][1] for n in ("deep.png", "deep8.png"))
    assert (x16 - x8).abs().max() <= 2 / 127.5 and x16.min() < -0.95 and x16.max() > 0.95  # full range, unclipped
    assert np.asarray(pl.to_rgb(Image.open(folder / "deep.png")))[10, 10, 0] == np.asarray(
        Image.open(folder / "deep8.png"))[10, 10, 0]


def test_prep_latents_reads_sa1b_and_webdataset_tars_on_two_ranks(tiny_sd, tars, tmp_path):
    out = tmp_path / "sa1b"
    r = run("prep_latents.py", f"--model={tiny_sd}", f"--tars={tars / 'sa_*.tar'}",
            f"--captions={tars / 'captions.json'}",
            f"--out={out}", "--resolution=16", "--batch_size=2", "--num_workers=1", "--std=True", "--flip=True",
            torchrun=2, **ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0: 1 of its 1 shards" in r.stdout and "rank 1: 1 of its 1 shards" in r.stdout  # one tar each
    index = {rec["key"]: rec for _, rec in tg.read_jsonl(out / "index.jsonl")}
    assert sorted(index) == ["sa_1.jpg", "sa_2.jpg", "sa_5.jpg", "sa_6.jpg"]
    assert index["sa_2.jpg"]["caption"] == "a tall red door" and index["sa_6.jpg"]["shard"] == "sa_000001.npy"
    skipped = {s["image"]: s["reason"] for _, s in tg.read_jsonl(out / "skipped.jsonl")}
    got = (skipped["sa_3.jpg"], skipped["sa_4.jpg"], skipped["sa_7.jpg"])
    assert got == ("unreadable", "no caption", "truncated tar")
    assert all(name in r.stdout for name in ("sa_3.jpg", "sa_4.jpg", "sa_7.jpg"))  # named in the summary
    with tarfile.open(tars / "sa_000000.tar") as tar:
        (tmp_path / "sa_2.jpg").write_bytes(tar.extractfile("sa_2.jpg").read())
    rec = index["sa_2.jpg"]  # 28 x 40: the crop is y 6..34
    assert (rec["width"], rec["height"], rec["crop"]) == (28, 40, [0, 6, 28, 34])
    assert_latents_of(tiny_sd, tmp_path / "sa_2.jpg", out / rec["shard"], rec["row"], 16)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.plain"))

    out = tmp_path / "wds"  # webdataset, gzipped, captions from inside the tar
    r = run("prep_latents.py", f"--model={tiny_sd}", f"--tars={tars / 'wds' / '*.tar.gz'}", f"--out={out}",
            "--resolution=16", "--num_workers=0")
    assert r.returncode == 0, r.stderr[-3000:]
    index = {rec["key"]: rec["caption"] for _, rec in tg.read_jsonl(out / "index.jsonl")}
    assert index == {"000000.png": "a png with a txt caption", "000001.jpg": "a jpg with a json caption"}
    assert [s["image"] for _, s in tg.read_jsonl(out / "skipped.jsonl")] == ["000002.jpg"]
    assert not list(out.glob(".*.plain"))  # the decompressed copy is gone


def test_prep_latents_killed_and_restarted_equals_uninterrupted(tiny_sd, tiny_data, tmp_path):
    out = tmp_path / "latents"
    args = [f"--model={tiny_sd}", f"--images={tiny_data['root'] / 'images'}", f"--captions={tiny_data['boxes']}",
            f"--out={out}", "--resolution=16", "--batch_size=5", "--shard_size=4", "--num_workers=2", "--std=True",
            "--flip=True"]  # the command of the tiny_data fixture
    # the real script, SIGKILLed halfway through writing its second shard
    (tmp_path / "dies.py").write_text(
        "import os, signal, sys, numpy as np\n"
        "import prep_latents as pl\n"
        "real, calls = np.save, []\n"
        "def save(f, a, *args, **kw):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        f.write(b'half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(f, a, *args, **kw)\n"
        "np.save = save\n"
        "pl.main(pl.configure(pl.config, sys.argv[1:]))\n")
    r = run(tmp_path / "dies.py", *args, PYTHONPATH=str(HERE))
    assert r.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out.iterdir()) == ["images_00000.json", "images_00000.npy", "images_00001.npy.tmp",
                                                     "job.json"]
    r = run("prep_latents.py", *args)  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 of its 4 shards to encode" in r.stdout
    want = tiny_data["latents"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in want.iterdir())
    for f in want.iterdir():
        assert f.read_bytes() == (out / f.name).read_bytes(), f.name
    r = run("prep_latents.py", *args[:-1], "--flip=False")  # resuming with another setting is refused, and says why
    assert r.returncode == 1 and "holds shards made with flip=True, this job has flip=False" in r.stderr
    import prep_latents as pl

    other = tmp_path / "captions.jsonl"  # captions mended: the shards hold the old ones, so the job is refused
    other.write_text(tiny_data["boxes"].read_text().replace("a picture of", "a photo of"))
    with pytest.raises(SystemExit, match="holds shards made with captions_sha256="):
        pl.main(pl.configure(pl.config, [f"--captions={other}" if a.startswith("--captions") else a for a in args]))
    job = json.loads((out / "job.json").read_text())  # as a job started before a setting existed: not held to it
    (out / "job.json").write_text(json.dumps({k: v for k, v in job.items() if k != "captions_sha256"}))
    pl.main(pl.configure(pl.config, args))
    (tmp_path / "bad.json").write_text("{")  # a job that stopped before its first shard: another setting is no conflict
    for flip in ("True", "False"):
        with pytest.raises(SystemExit, match="bad.json: not valid JSON"):
            pl.main(pl.configure(pl.config, [*args[:2], f"--out={tmp_path / 'fresh'}",
                                             f"--captions={tmp_path / 'bad.json'}", f"--flip={flip}"]))


def test_igligen_import_needs_opt_in_and_reads_its_pickles(tmp_path):
    import prep_latents as pl

    src, out = tmp_path / "igligen", tmp_path / "latents"
    (src / "latents").mkdir(parents=True)
    (src / "boxes").mkdir()
    lat = np.random.default_rng(0).standard_normal((3, 4, 4, 4)).astype(np.float16)  # 32 px
    np.save(src / "latents" / "sa_000000.npy", np.array(dict(indices=[12, 5, 7], latents=lat), dtype=object))
    rows = [[5, "a dog and a ball", np.array([[0.5, 0.5, 0.4, 0.6], [0.1, 0.1, 0.4, 0.4]]), np.array([0.9, 0.1]),
             ["a dog", "a ball"]],
            [12, "a cat", np.array([[0.5, 0.5, 1.0, 1.0]]), np.array([0.5]), ["a cat"]]]  # image 7: no caption
    rows_arr = np.empty(len(rows), dtype=object)
    rows_arr[:] = [tuple(r) for r in rows]
    np.save(src / "boxes" / "sa_000000.npy", rows_arr)
    cfg = {**pl.config, "igligen": str(src), "out": str(out)}
    with pytest.raises(SystemExit, match="loading a pickle runs whatever code the file holds"):
        pl.main(cfg)
    assert not out.exists()
    pl.main({**cfg, "allow_pickle": True})
    index = {r["key"]: r for _, r in tg.read_jsonl(out / "index.jsonl")}
    assert sorted(index) == ["sa_12.jpg", "sa_5.jpg"] and index["sa_5.jpg"]["caption"] == "a dog and a ball"
    assert [s["image"] for _, s in tg.read_jsonl(out / "skipped.jsonl")] == ["sa_7.jpg"]
    boxes = {r["image"]: r for _, r in tg.read_jsonl(out / "boxes.jsonl")}
    assert boxes["sa_5.jpg"]["phrases"] == ["a dog"]  # the ball's confidence 0.1 is under the threshold
    np.testing.assert_allclose(boxes["sa_5.jpg"]["boxes"], [[0.3, 0.2, 0.7, 0.8]])  # cx, cy, w, h -> corners
    assert boxes["sa_12.jpg"]["boxes"] == [[0.0, 0.0, 1.0, 1.0]]  # clipped
    data = tg.GroundedLatents(out, out / "boxes.jsonl")
    assert data.resolution == 32 and len(data) == 2
    k = [i for i, it in enumerate(data.items) if it.caption == "a dog and a ball"][0]
    assert torch.equal(data[(k, False)]["latent"][0], torch.from_numpy(lat[1]))  # image 5 is row 1 of IGLIGEN's shard


def test_prep_image_features_crop_each_box(tiny_clip, tiny_data, tiny_features, capsys):
    """Each box's feature is CLIP's image_embeds of its crop (the CLIP processor's resize and center crop), through
    image_project (the transpose of CLIP's text projection), scaled to norm 28.7; images that cannot be read are
    named; the job run again has nothing left to do."""
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    index = {r["key"]: r for _, r in tg.read_jsonl(tiny_features / "index.jsonl")}
    boxes = {r["image"]: r for _, r in tg.read_jsonl(tiny_data["boxes"])}
    assert "broken.jpg" not in index and "broken.jpg" in (tiny_features / "skipped.jsonl").read_text()
    assert all(index[k]["boxes"] == len(boxes[k]["boxes"]) for k in index) and len(index) >= 12
    weight = load_file(tiny_features / "image_project.safetensors")["project.weight"]
    assert torch.equal(weight, CLIPTextModelWithProjection.from_pretrained(tiny_clip).text_projection.weight.T)
    key = next(k for k in index if len(boxes[k]["boxes"]) >= 2)
    rec, (x0, y0, x1, y1) = index[key], boxes[key]["boxes"][1]
    im = Image.open(tiny_data["root"] / "images" / key).convert("RGB")
    W, H = im.size
    crop = im.crop((round(x0 * W), round(y0 * H), round(x1 * W), round(y1 * H)))
    pixels = CLIPImageProcessor.from_pretrained(tiny_clip)(images=[crop], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeds = CLIPVisionModelWithProjection.from_pretrained(tiny_clip)(pixel_values=pixels).image_embeds
    want = embeds @ weight.T / (embeds @ weight.T).norm() * 28.7
    got = torch.from_numpy(np.load(tiny_features / rec["shard"])[rec["row"] + 1].astype(np.float32))
    torch.testing.assert_close(got, want[0], atol=0.02, rtol=0.002)  # stored in float16
    capsys.readouterr()
    embed_features(tiny_clip, tiny_data, tiny_features)  # the same job again
    assert "rank 0: 0 of its 4 shards to embed" in capsys.readouterr().out


def test_phrase_spans_and_nms():
    import prep_boxes as pb
    from transformers import BertTokenizer

    path = make_tiny_grounding_dino_vocab(Path(tempfile.mkdtemp()))
    tok = BertTokenizer(str(path / "vocab.txt"))
    phrases = ["a red square", "circle", "a blue circle"]
    text, spans = pb.phrase_spans(tok, phrases)
    ids = tok(text).input_ids
    for p, span in zip(phrases, spans):  # each phrase's tokens sit where the span says
        assert [ids[i] for i in span] == tok(p, add_special_tokens=False).input_ids
    a, b = [0, 0, 0.5, 0.5], [0.05, 0, 0.55, 0.5]  # IoU 0.82
    found = [("x", 0.5, b), ("x", 0.9, a), ("y", 0.4, a), ("x", 0.3, [0.6, 0.6, 1, 1])]
    assert pb.nms(found, 0.5) == [("x", 0.9, a), ("y", 0.4, a), ("x", 0.3, [0.6, 0.6, 1, 1])]  # only within a phrase
    assert len(pb.nms(found, 0.9)) == 4


def test_prep_boxes_detects_with_grounding_dino_and_resumes(tars, tmp_path):
    detector = make_tiny_grounding_dino(tmp_path / "detector")
    out = tmp_path / "boxes.jsonl"
    args = [f"--detector={detector}", f"--tars={tars / 'sa_*.tar'}", f"--captions={tars / 'captions.json'}",
            f"--out={out}", "--box_threshold=0.0", "--text_threshold=0.0", "--nms=1.0", "--batch_size=3",
            "--num_workers=1"]
    r = run("prep_boxes.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = {rec["image"]: rec for _, rec in tg.read_jsonl(out)}
    assert sorted(recs) == ["sa_1.jpg", "sa_2.jpg", "sa_5.jpg", "sa_6.jpg"]
    door = recs["sa_2.jpg"]
    assert (door["width"], door["height"], door["caption"]) == (28, 40, "a tall red door")
    for rec in recs.values():  # box threshold 0 and no NMS: every query is a box
        assert len(rec["boxes"]) == len(rec["phrases"]) == len(rec["scores"]) == 8
        assert all(0 <= v <= 1 for b in rec["boxes"] for v in b)
        assert all(b[2] > b[0] and b[3] > b[1] for b in rec["boxes"])
    assert recs["sa_1.jpg"]["phrases"][0] == "a cat on a mat"  # text threshold 0: all the caption's words, in order
    skipped = {s["image"]: s["skipped"] for _, s in tg.read_jsonl(tmp_path / "boxes.skipped.jsonl")}
    assert skipped["sa_3.jpg"] == "unreadable" and skipped["sa_4.jpg"] == "no caption" and "sa_7.jpg" in skipped
    for i, (_, rec) in enumerate(tg.read_jsonl(out)):
        tg.check_layout(rec["phrases"], rec["boxes"], f"{out}:{i + 1}")

    parts = tmp_path / "boxes.jsonl.parts"
    before = out.read_text()
    (parts / "sa_000001.jsonl").unlink()  # as if killed while on the second tar
    r = run("prep_boxes.py", *args)
    assert r.returncode == 0 and "1 of its 2 shards to detect" in r.stdout, r.stderr[-3000:]
    assert out.read_text() == before

    # given phrases (a folder of images this time), and NMS: each box takes one of its image's phrases
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg_bytes(i, (48, 32)))
    (tmp_path / "phrases.jsonl").write_text(json.dumps(dict(image="0.jpg", phrases=["a red square", "circle"])) + "\n"
                                            + json.dumps(dict(image="1.jpg", phrases=["a blue circle"])) + "\n")
    r = run("prep_boxes.py", f"--detector={detector}", f"--images={tmp_path / 'imgs'}",
            f"--phrases={tmp_path / 'phrases.jsonl'}", f"--out={tmp_path / 'given.jsonl'}", "--box_threshold=0.0",
            "--nms=0.3", "--num_workers=0")
    assert r.returncode == 0, r.stderr[-3000:]
    recs = {rec["image"]: rec for _, rec in tg.read_jsonl(tmp_path / "given.jsonl")}
    assert sorted(recs) == ["0.jpg", "1.jpg"] and "2.jpg" in r.stdout  # 2.jpg has no phrases: skipped, named
    assert set(recs["0.jpg"]["phrases"]) <= {"a red square", "circle"}
    assert set(recs["1.jpg"]["phrases"]) == {"a blue circle"}
    from prep_boxes import iou
    for rec in recs.values():  # after NMS no two boxes of a phrase overlap by more than 0.3
        for i, (p, a) in enumerate(zip(rec["phrases"], rec["boxes"])):
            assert all(iou(a, b) <= 0.3 for q, b in zip(rec["phrases"][:i], rec["boxes"][:i]) if q == p)

# ---------------------------------------------------------------------------------------------------------------
# Training: the data, the step, what trains, the box-use losses, FLOPs
def test_loader_maps_boxes_through_the_crop(tiny_data):
    data = tg.GroundedLatents(tiny_data["latents"], tiny_data["boxes"], max_boxes=2, min_box_area=0.01)
    assert len(data) == 12
    # a 48 x 32 image cropped to x 8..40: a box over x 0..16 of the image keeps x 8..16, a quarter of the crop
    phrases, boxes, _ = tg.GroundedLatents.crop_layout(
        dict(width=48, height=32, phrases=["a", "b", "c"],
             boxes=[[0, 0, 16 / 48, 0.5], [0, 0, 4 / 48, 1], [0.5, 0.5, 1, 1]]),
        [8, 0, 40, 32], max_boxes=2, min_box_area=0.01)
    assert phrases == ["c", "a"]  # largest first; "b" lies outside the crop and is dropped
    np.testing.assert_allclose(boxes, [[0.5, 0.5, 1, 1], [0, 0, 0.25, 0.5]], atol=1e-6)
    latent, caption, phrases, boxes = data[(0, False)].values()
    assert latent.shape == (2, 4, 8, 8) and isinstance(caption, str) and len(phrases) == len(boxes) <= 2
    mirrored, _, same, flipped = data[(0, True)].values()  # the mirrored image's latent, the boxes mirrored with it
    shard = np.load(data.items[0].shard)
    assert torch.equal(mirrored, torch.from_numpy(shard[data.items[0].row, 1])) and same == phrases
    np.testing.assert_allclose(flipped, np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], 1))


def test_sdxl_items_carry_their_own_size_conditioning(tiny_sdxl, tiny_sdxl_data):
    """SDXL's time ids come from each image's crop (the mirrored crop's for a flip), and each sample's own reach the
    UNet in the training step."""
    rec = dict(width=48, height=32, crop=[8, 0, 40, 32])  # resized to 16 on the short side: 24 x 16, crop left 4
    assert tg.SDXLLatents.time_ids(rec, 16) == ((32, 48, 0, 4, 16, 16), 4)
    rec = dict(width=51, height=32, crop=[9, 0, 41, 32])  # an odd margin: the mirrored crop starts one further
    assert tg.SDXLLatents.time_ids(rec, 32) == ((32, 51, 0, 9, 32, 32), 10)
    stages = tg.choose_stages("sdxl")
    unet, te, tok, scheduler = stages.load(str(tiny_sdxl), "cpu", torch.float32)
    stages.add_adapters(unet)
    data = stages.training_data(train_cfg(tiny_sdxl, tiny_sdxl_data, "unused"))
    items = [data[(i, i % 2 == 1)] for i in range(6)]  # three image sizes, mirrored or not
    seen = []
    unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["added_cond_kwargs"]["time_ids"]), with_kwargs=True)
    with torch.no_grad():
        stages.loss(unet, data.collate(tok, items), torch.Generator().manual_seed(0), te,
                    stages.schedule(scheduler, "tiny", "cpu"), tok.captions([""]), tg.config)
    want = [data.time_ids(r, 16) for _, r in tg.read_jsonl(tiny_sdxl_data["latents"] / "index.jsonl")][:6]
    want = [(*ids[:3], left, *ids[4:]) if i % 2 else ids for i, (ids, left) in enumerate(want)]
    assert seen[0].tolist() == [list(map(float, w)) for w in want] and len({tuple(w) for w in want}) >= 3
    data.items[0].time_ids, data.items[0].flipped_left = (32, 51, 0, 9, 16, 16), 10  # an odd margin: the mirror's at 10
    assert data[(0, False)]["time_ids"][3] == 9 and data[(0, True)]["time_ids"][3] == 10


def test_text_image_drops_a_phrase_or_an_image_never_both(tiny_sd):
    """Text-image training: per object, with p 0.5 its phrase or its image feature is dropped, never both; empty
    slots have neither."""
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    masks = (torch.rand(64, tg.N_SLOTS, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    batch = dict(phrase_ids=torch.tensor([[0, 1, 2]]), phrase_mask=torch.ones(1, 3, dtype=torch.long),
                 slot_phrase=torch.zeros(64, tg.N_SLOTS, dtype=torch.long), boxes=torch.rand(64, tg.N_SLOTS, 4),
                 image_feats=torch.randn(64, tg.N_SLOTS, 32))
    with torch.no_grad():
        got = tg.text_image_grounding(te, batch, masks, torch.Generator().manual_seed(1))
    both, filled = got["phrases_masks"] + got["image_masks"], masks > 0
    assert both[~filled].eq(0).all() and both[filled].ge(1).all()  # never neither
    kept_both = both[filled].eq(2).float().mean()  # 1 - 0.5: half keep both, a quarter each lose one
    assert 0.4 < kept_both < 0.6
    assert (got["phrases_masks"][filled] == 0).any() and (got["image_masks"][filled] == 0).any()


def test_keypoint_tokens_and_flip_equal_a_hand_computation(tiny_data, tiny_pose):
    """The keypoint mode's samples: each person's visible (v = 2) points inside the crop, in crop coordinates, the
    largest boxes first, as slots person * 17 + keypoint; mirrored, x -> 1 - x and each keypoint in its mirror
    image's slot (left <-> right, which the official code forgets). The tokens: MLP([person + keypoint identity;
    the Fourier code of (x, y)]), the nulls in empty slots, by hand."""
    assert [tg.KEYPOINTS[i] for i in tg.MIRRORED] == [
        k.replace("left", "@").replace("right", "left").replace("@", "right") for k in tg.KEYPOINTS]
    path = tiny_pose
    data = tg.KeypointLatents(tiny_data["latents"], path, 30, 0.01)
    recs = {r["image"]: r for _, r in tg.read_jsonl(path)}
    index = {r["key"]: r for _, r in tg.read_jsonl(tiny_data["latents"] / "index.jsonl")}
    i = next(i for i, r in enumerate(index) if len(recs[r]["boxes"]) >= 3)
    key = list(index)[i]
    rec, (cx0, cy0, cx1, cy1) = recs[key], index[key]["crop"]
    W, H, side = rec["width"], rec["height"], cx1 - cx0
    want_boxes, want_masks = np.zeros((136, 4), np.float32), np.zeros(136, np.float32)
    clipped = [np.clip((np.array(b) * [W, H, W, H] - [cx0, cy0, cx0, cy0]) / side, 0, 1) for b in rec["boxes"]]
    slot, area = 0, [-(c[2] - c[0]) * (c[3] - c[1]) for c in clipped]
    for n in sorted(range(len(clipped)), key=lambda n: area[n]):
        pts = [((x * W - cx0) / side, (y * H - cy0) / side, v == 2) for x, y, v in rec["keypoints"][n]]
        pts = [(x, y, seen and 0 <= x <= 1 and 0 <= y <= 1) for x, y, seen in pts]
        if not any(seen for _, _, seen in pts):
            continue
        for k, (x, y, seen) in enumerate(pts):
            want_boxes[slot * 17 + k], want_masks[slot * 17 + k] = [x, y, x, y], seen
        slot += 1
    x, mirrored = data[(i, False)], data[(i, True)]
    assert slot >= 2 and want_masks.sum() > 0
    np.testing.assert_allclose(x["boxes"][want_masks > 0], want_boxes[want_masks > 0], atol=1e-6)
    assert np.array_equal(x["masks"], want_masks)
    for p in range(slot):
        for k in range(17):
            a, b = p * 17 + k, p * 17 + tg.MIRRORED[k]  # the mirror image of keypoint k sits in k's mirror's slot
            assert mirrored["masks"][b] == x["masks"][a]
            if x["masks"][a]:
                np.testing.assert_allclose(mirrored["boxes"][b], [1 - x["boxes"][a][0], x["boxes"][a][1]] * 2,
                                           atol=1e-6)
    torch.manual_seed(0)
    net = tg.PositionNetKeypoints(16)
    for p in net.parameters():
        torch.nn.init.normal_(p)
    boxes = torch.from_numpy(np.stack([x["boxes"], mirrored["boxes"]]))
    masks = torch.from_numpy(np.stack([x["masks"], mirrored["masks"]]))
    got = net(boxes, masks)
    freqs = [100 ** (f / 8) for f in range(8)]
    for b in range(2):
        for s_ in range(136):
            px, py = boxes[b, s_, :2].tolist()
            code = torch.tensor([v for f in freqs for v in (math.sin(f * px), math.sin(f * py), math.cos(f * px),
                                                             math.cos(f * py))])
            who = net.person_embeddings[s_ // 17] + net.keypoint_embeddings[s_ % 17]
            inp = torch.cat([who, code]) if masks[b, s_] else torch.cat([net.null_person_feature, net.null_xy_feature])
            torch.testing.assert_close(got[b, s_], net.linears(inp), rtol=1e-4, atol=1e-4)


def test_prep_latents_reads_every_kind_of_map_and_refuses_bad_ones(tiny_data, tiny_maps, tmp_path):
    """prep_latents.py --map: your maps (8- and 16-bit PNG, uint16 and float NPY, RGB) read to [0, 1] exactly, each
    through its image's center crop (the latents' crop) and resized to half the resolution as PIL resizes it, kept
    in 16 bits; edges by hand: where the Sobel gradient passes a quarter of its most; depth from a transformers
    depth-estimation model, min-max per image. Refused, each naming the file and the image: a map of another size
    than its image, one of another channel count, floats outside [0, 1]; a folder that is not there."""
    import prep_latents as pl
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    a = np.random.default_rng(0).random((5, 7, 3))
    Image.fromarray((a[..., 0] * 255).round().astype(np.uint8)).save(tmp_path / "8.png")
    Image.fromarray((a[..., 0] * 65535).round().astype(np.uint16)).save(tmp_path / "16.png")
    Image.fromarray((a * 255).round().astype(np.uint8)).save(tmp_path / "rgb.png")
    np.save(tmp_path / "f.npy", a.astype(np.float32))
    np.save(tmp_path / "u16.npy", (a * 65535).round().astype(np.uint16))
    big_endian = (a[..., 0] * 65535).round().astype(">u2")
    Image.frombytes("I;16B", (7, 5), big_endian.tobytes()).save(tmp_path / "be.tif")  # a 16-bit TIFF, big-endian
    Image.fromarray(a[..., 0] > 0.5).save(tmp_path / "1bit.png")  # a 1-bit edge map
    for name, want in {"be.tif": big_endian[None] / 65535, "1bit.png": (a[None, ..., 0] > 0.5) * 1.0,
                       "8.png": (a[None, ..., 0] * 255).round() / 255, "16.png": (a[None, ..., 0] * 65535).round()
                       / 65535, "rgb.png": (a.transpose(2, 0, 1) * 255).round() / 255, "f.npy": a.transpose(2, 0, 1),
                       "u16.npy": (a.transpose(2, 0, 1) * 65535).round() / 65535}.items():
        np.testing.assert_allclose(tg.read_map(tmp_path / name).numpy(), want, atol=1e-7, err_msg=name)
    np.save(tmp_path / "over.npy", a.astype(np.float32) + 1)
    with pytest.raises(SystemExit, match=r"over.npy: a map holds uint8, uint16, or floats in \[0, 1\]; .* from 1.0"):
        tg.read_map(tmp_path / "over.npy")

    meta, folder = json.loads((tiny_maps / "meta.json").read_text()), tiny_data["root"] / "maps"
    assert (meta["channels"], meta["side"], meta["images"]) == (1, 8, 13)  # all but the broken and the too small
    assert "rank 1: 1 of its 1 shards to map (3 in all, 2 processes)" in (tiny_maps / "prep.log").read_text()
    crops = {r["key"]: r["crop"] for _, r in tg.read_jsonl(tiny_data["latents"] / "index.jsonl")}
    for _, r in tg.read_jsonl(tiny_maps / "index.jsonl"):
        src = pl.find_map(folder, r["key"])
        m = np.load(src) if src.suffix == ".npy" else np.asarray(Image.open(src))
        m = m / 65535 if m.dtype == np.uint16 else m / 255 if m.dtype == np.uint8 else m
        want = Image.fromarray(m.astype(np.float32)).resize((8, 8), Image.Resampling.BILINEAR, box=r["crop"])
        got = np.load(tiny_maps / r["shard"])[r["row"]]
        assert got.dtype == np.uint16 and got.shape == (1, 8, 8)
        np.testing.assert_allclose(got[0] / 65535, np.asarray(want), atol=1e-4, err_msg=r["key"])
        assert r["crop"] == crops.get(r["key"], r["crop"])

    images = tmp_path / "images"
    images.mkdir()
    square = np.zeros((48, 64, 3), np.uint8)
    square[14:34, 22:42] = 255  # the crop is x 8..56: the square sits at 14..34 in it
    Image.fromarray(square).save(images / "square.png")
    edges = lambda **over: pl.main({**pl.config, "images": str(images), "out": str(tmp_path / "edges"),
                                    "resolution": 96, "num_workers": 0, "map": "edges", **over})
    edges()
    got = np.load(tmp_path / "edges" / "images_00000.npy")[0, 0] / 65535
    win = np.lib.stride_tricks.sliding_window_view(np.pad(square[:, 8:56, 0], 1, mode="edge"), (3, 3))
    assert np.array_equal(got, (win.max((2, 3)) != win.min((2, 3))).astype(float))  # where the 3 x 3 window changes

    torch.manual_seed(0)
    dpt = DPTForDepthEstimation(DPTConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=8,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8] * 4, fusion_hidden_size=8,
        reassemble_factors=[4, 2, 1, 0.5]))
    dpt.save_pretrained(tmp_path / "dpt")
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dpt")
    pl.main({**pl.config, "images": str(tiny_data["root"] / "images"), "out": str(tmp_path / "depth"),
             "resolution": 16, "num_workers": 0, "map": "depth", "depth_model": str(tmp_path / "dpt")})
    depth = np.concatenate([np.load(f) for f in sorted((tmp_path / "depth").glob("*.npy"))])
    assert depth.shape == (13, 1, 8, 8) and (depth.min((1, 2, 3)) == 0).all() and (depth.max((1, 2, 3)) == 65535).all()

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    for f in bad.glob("img_005.*"):
        f.unlink()
    run_bad = lambda: pl.main({**pl.config, "images": str(tiny_data["root"] / "images"), "map": str(bad),
                               "out": str(tmp_path / f"bad-{len(list(tmp_path.glob('bad-*')))}"), "resolution": 16,
                               "num_workers": 0})
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(bad / "img_005.png")  # its image is 40 x 40
    with pytest.raises(SystemExit, match=r"bad/img_005.png: the map is 40x32 px, its image 'img_005.jpg' 40x40 "):
        run_bad()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(bad / "img_005.png")
    with pytest.raises(SystemExit, match=r"the map of image 'img_005.jpg' has 3 channels, the maps before it 1"):
        run_bad()
    np.save(bad / "img_005.npy", np.full((40, 40), 2.0))
    (bad / "img_005.png").unlink()
    with pytest.raises(SystemExit, match=r"img_005.npy: a map holds .* \(the map of image 'img_005.jpg'\)"):
        run_bad()
    with pytest.raises(SystemExit, match=r"--map=.*nowhere: edges, depth, or a folder of your maps .* not found"):
        edges(map=str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match=r"--igligen, --image_encoder and --map are three jobs: give one of them"):
        edges(image_encoder="openai/clip-vit-large-patch14")
    (bad / "photo.2020.npy").write_bytes(b"")  # a stem with dots keeps them
    assert pl.find_map(bad, "sub/photo.2020.jpg") == bad / "photo.2020.npy" and pl.find_map(bad, "photo.jpg") is None


def test_map_tokens_conv_in_and_flip_equal_a_hand_computation(tiny_sd, tiny_data, tiny_maps, tiny_convnext):
    """The spatial-map mode's samples: the stored map in [0, 1], mirrored with the flipped latent. The UNet's input
    packs the map (resized to 4x the latent's side) into channels, and conv_in convolves [latent; the downsampler's 8
    channels of it], by hand; fresh, the UNet gives its base's output whatever the map. The tokens: the ConvNeXt's
    8 x 8 last features of the map (nearest-resized, grey as RGB), the null feature where grounding is dropped, plus
    the positions, through the MLP, by hand."""
    data = tg.MapLatents(tiny_data["latents"], tiny_maps)
    it = data.items[1]
    x, flipped = data[(1, False)], data[(1, True)]
    stored = torch.from_numpy(np.load(it.map_shard)[it.map_row].astype(np.float32) / 65535)
    assert torch.equal(x["map"], stored) and torch.equal(flipped["map"], stored.flip(-1))
    assert torch.equal(flipped["latent"], torch.from_numpy(np.load(it.shard)[it.row, 1].copy()))
    tokenizer = tg.load_sd(str(tiny_sd), "cpu", torch.float32)[2]
    batch = data.collate(tokenizer, [x, flipped])
    assert torch.equal(batch["maps"], torch.stack([stored, stored.flip(-1)]) * 2 - 1)
    assert torch.equal(batch["masks"], torch.ones(2, 1))
    assert torch.equal(tg.mirrored_maps(batch)["maps"], batch["maps"].flip(-1))

    stages = map_stages(tiny_maps, tiny_convnext)
    base = stages.load(str(tiny_sd), "cpu", torch.float32)[0]
    torch.manual_seed(0)
    unet = stages.add_adapters(copy.deepcopy(base))
    z, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    gligen = {"gligen": {"maps": batch["maps"], "masks": torch.tensor([[1.0], [0.0]])}}
    fresh = unet(tg.with_map(z, batch["maps"]), t, text, cross_attention_kwargs=gligen).sample
    torch.testing.assert_close(fresh, base(z, t, text).sample, rtol=1e-5, atol=1e-6)
    for p in tg.adapter_params(unet):
        torch.nn.init.normal_(p, std=0.3)
    inp = tg.with_map(z, batch["maps"])
    resized = F.interpolate(batch["maps"], size=(32, 32), mode="bilinear", antialias=True)
    assert inp.shape == (2, 20, 8, 8) and torch.equal(inp[:, :4], z)
    assert torch.equal(F.pixel_shuffle(inp[:, 4:], 4), resized)
    conv = unet.conv_in
    want = F.conv2d(torch.cat([z, conv.downsample_net.layers(resized)], 1), conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(conv(inp), want)

    net = unet.position_net
    got = net(batch["maps"], gligen["gligen"]["masks"])
    up = batch["maps"].repeat_interleave(4, -1).repeat_interleave(4, -2)  # nearest, 8 -> 32 px
    feats = net.convnext(up.expand(-1, 3, -1, -1)).last_hidden_state  # (2, 16, 8, 8)
    assert got.shape == (2, 64, 32)
    for b in range(2):
        for k in range(64):
            f = feats[b, :, k // 8, k % 8] if b == 0 else net.null_feature
            torch.testing.assert_close(got[b, k], net.linears(f + net.pos_embedding[0, k]), rtol=1e-4, atol=1e-5)


def test_map_mode_samples_and_refuses_what_does_not_fit(tiny_sd, tiny_data, tiny_maps, tiny_convnext, random_adapters,
                                                        tmp_path):
    """Spatial-map adapters: sample.py draws a map (a file: --map or a layout's "map"), the map steers the image and
    sits beside it in the _boxes copy; a map layout's grounding is its map, the unconditional half's tokens null.
    Trained in bf16 with the validation grid. Refused, each with one line: --export, a layout without a map, a map
    to other adapters, a map of the wrong channel count, a map file not there; in training a mode mixed with
    --maps, text-box adapters as --init_from, maps of another resolution than the latents, latents as --maps, a
    --map_encoder that is no ConvNeXt."""
    import prep_latents as pl
    import sample

    m = torch.rand(1, 8, 8)
    g = tg.map_layout_grounding(None, None, {"map": m[None] * 2 - 1}, [None] * 4, torch.float32)
    assert torch.equal(g["masks"], torch.tensor([[0.0], [0.0], [1.0], [1.0]]))
    assert torch.equal(g["maps"], (m[None] * 2 - 1).expand(4, -1, -1, -1))

    stages = map_stages(tiny_maps, tiny_convnext)
    random_adapters_of(stages, stages.load(str(tiny_sd), "cpu", torch.float32)[0], 5, tmp_path / "ad")
    maps = [str(p) for p in sorted((tiny_data["root"] / "maps").glob("*"))[:2]]
    (tmp_path / "layouts.jsonl").write_text(json.dumps(dict(prompt="shapes", phrases=[], boxes=[], map=maps[1])) + "\n")
    cfg = lambda out, **over: {**sample.config, "model": str(tiny_sd), "adapters": str(tmp_path / "ad"),
                               "prompt": "shapes", "n": 1, "steps": 3, "out_dir": str(tmp_path / out), **over}
    for out, map_ in (("a", maps[0]), ("b", maps[1]), ("b-again", maps[1])):
        sample.main(cfg(out, map=map_))
    sample.main(cfg("from-layouts", layouts=str(tmp_path / "layouts.jsonl")))
    a, b, again, listed = (pngs(tmp_path / out, 1) for out in ("a", "b", "b-again", "from-layouts"))
    assert np.abs(a - b).mean() > 1 and np.array_equal(b, again) and np.array_equal(b, listed)
    boxed = np.asarray(Image.open(tmp_path / "b" / "000_00_boxes.png"))
    drawn = Image.open(tmp_path / "b" / "000_00.png").resize((256, 256), Image.Resampling.NEAREST)
    assert boxed.shape == (256, 2 * 256, 3) and np.array_equal(boxed[:, :256], np.asarray(drawn))  # no boxes drawn
    assert np.array_equal(boxed[:, 256:], np.asarray(tg.map_image(tg.map_for(tg.read_map(maps[1]), 256, 256),
                                                                  (256, 256))))  # the map beside, cropped as taken
    for over, why in ((dict(map=maps[0], export=str(tmp_path / "exp")), "no GLIGEN pipeline for spatial maps"),
                      (dict(), "are spatial-map adapters: each layout needs a map"),
                      (dict(map=maps[0], adapters=str(random_adapters)), "a map .* needs spatial-map adapters"),
                      (dict(map=str(tmp_path / "none.png")), "map must be the path of a map file .* not found")):
        with pytest.raises(SystemExit, match=why):
            sample.main(cfg("refused", **over))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(SystemExit, match=r"these adapters need a map of 1 channels, got torch.Size\(\[3, 8, 8\]\)"):
        sample.main(cfg("refused", map=str(tmp_path / "rgb.png")))

    train = lambda out, **over: tg.main(train_cfg(tiny_sd, tiny_data, tmp_path / out, **{
        "maps": str(tiny_maps), "map_encoder": str(tiny_convnext), "max_steps": 1, **over}))
    train("bf16", dtype="bf16", val_every=1, val_steps=1, val_images=1)
    assert Image.open(tmp_path / "bf16" / "val_0000001.png").size == (2 * 2 * 256, 256)  # two images, maps beside
    pl.main({**pl.config, "images": str(tiny_data["root"] / "images"), "out": str(tmp_path / "edges16"),
             "resolution": 16, "num_workers": 0, "map": "edges"})
    with pytest.raises(SystemExit, match=r"bf16/step_0000001 was trained with map='.*/maps', this run has map='edges'"):
        train("bf16", maps=str(tmp_path / "edges16"), max_steps=2)  # other maps of the same channel count
    (tmp_path / "val.jsonl").write_text(json.dumps(dict(prompt="x", phrases=[], boxes=[])) + "\n")
    with pytest.raises(SystemExit, match=r"val.jsonl:1: no map, which this mode's layouts need"):
        train("x", val_layouts=str(tmp_path / "val.jsonl"))
    (tmp_path / "val.jsonl").write_text(json.dumps(dict(prompt="x", phrases=[], boxes=[], map=maps[0])) + "\n")
    with pytest.raises(SystemExit, match=r"val.jsonl:1: a map is for the spatial-map mode \(--maps\)"):
        tg.main(train_cfg(tiny_sd, tiny_data, tmp_path / "x", val_layouts=str(tmp_path / "val.jsonl")))
    with pytest.raises(SystemExit, match="--maps is a mode of its own: not with --inpaint, .*--keypoints"):
        train("x", keypoints=True)
    with pytest.raises(SystemExit, match="text-box adapters, and this run is spatial-map"):
        train("x", init_from=str(random_adapters))
    pl.main({**pl.config, "images": str(tiny_data["root"] / "images"), "out": str(tmp_path / "edges32"),
             "resolution": 32, "num_workers": 0, "map": "edges"})
    with pytest.raises(SystemExit, match="edges32 holds maps for 32 px images, .* latents of 16 px"):
        train("x", maps=str(tmp_path / "edges32"))
    with pytest.raises(SystemExit, match="latents holds no maps"):
        train("x", maps=str(tiny_data["latents"]))
    with pytest.raises(SystemExit, match="--map_encoder=.*: cannot load a ConvNeXt"):
        train("x", map_encoder=str(tiny_sd))


def test_training_overfits_one_batch_and_changes_only_adapters(tiny_sd, tiny_data, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    # the 12 images are one global batch, so every step sees the same batch (with new noise and timesteps)
    cfg = train_cfg(tiny_sd, tiny_data, tmp_path / "run", global_batch=12, micro_batch=6, max_steps=60, lr=3e-3,
                    warmup_steps=0, caption_keep=1.0, grounding_drop=0.0, val_every=30, val_steps=3, val_images=4)
    unet, text_encoder = tg.main(cfg)
    log = losses(tmp_path / "run")
    assert len(log) == 60 and all(np.isfinite(log))
    assert np.mean(log[-10:]) < 0.8 * np.mean(log[:10]), log

    assert_base_untouched(unet, UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"))
    frozen = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    assert_same_tensors(text_encoder.state_dict(), frozen.state_dict())
    saved = adapters_of(tmp_path / "run")
    assert_same_tensors(saved, tg.adapter_state(unet))
    grids = sorted(p.name for p in (tmp_path / "run").glob("val_*.png"))
    assert grids == ["val_0000000.png", "val_0000030.png", "val_0000060.png"]


def test_training_draws_latents_from_the_stored_std(tiny_sd, tiny_data, tmp_path):
    """With the VAE's std stored, each step trains on mean + std x noise: zeroing the std changes the loss."""
    latents = tmp_path / "latents"
    shutil.copytree(tiny_data["latents"], latents)
    for f in latents.glob("*.npy"):
        shard = np.load(f)
        shard[:, :, 1] = 0  # every view's std
        np.save(f, shard)
    tg.main(train_cfg(tiny_sd, tiny_data, tmp_path / "with", max_steps=2))
    tg.main({**train_cfg(tiny_sd, tiny_data, tmp_path / "without", max_steps=2), "latents": str(latents)})
    assert losses(tmp_path / "with") != losses(tmp_path / "without")


@pytest.mark.parametrize("family, fusers", [("sdxl", 8), ("sd3", 2), ("flux", 2)])
def test_gradient_checkpointing_recomputes_and_changes_nothing(family, fusers, tiny_data, tmp_path, monkeypatch,
                                                               request):
    """With grad_checkpointing each fuser runs twice per micro-batch (forward, then again in backward), and the
    adapters end bit-equal to a run without it; with the attention loss on, whose hooks run in the recompute too. On
    an MMDiT the fusers run from hooks on the blocks, and the grounding tokens must still be there in the recompute."""
    calls = []
    counting = lambda real: lambda self, *args: calls.append(1) or real(self, *args)
    for cls in (tg.Fuser, tg.PositionedFuser):
        monkeypatch.setattr(cls, "forward", counting(cls.forward))
    data = request.getfixturevalue({"sdxl": "tiny_sdxl_data"}.get(family, "tiny_flow_data"))
    runs = {}
    for ckpt in (False, True):
        calls.clear()
        model = str(request.getfixturevalue(f"tiny_{family}"))
        tg.main(train_cfg(model, data, tmp_path / str(ckpt), max_steps=2, save_every=2, grad_checkpointing=ckpt,
                          box_attn_loss=1.0))
        runs[ckpt] = (len(calls), adapters_of(tmp_path / str(ckpt)))
    # the fusers x (the FLOP-counting pass + 2 micro-batches x 2 steps), twice with checkpointing
    assert runs[True][0] == 2 * runs[False][0] == 2 * fusers * (1 + 2 * 2)
    assert_same_tensors(runs[True][1], runs[False][1])
    if family != "sdxl":
        return
    video = request.getfixturevalue("tiny_video")
    with pytest.raises(SystemExit, match="--grad_checkpointing=True: diffusers' UNet3DConditionModel does not"):
        tg.main(train_cfg(video, tiny_data, tmp_path / "video", grad_checkpointing=True))


def test_compile_setting_compiles_the_training_step_and_trains_the_same(tiny_sd, tiny_data, tmp_path):
    """--compile=<backend> runs the training step through torch.compile, and the adapters are bit-equal to an eager run.
    aot_eager (dynamo's graph capture and AOT autograd, eager kernels) compiles in seconds on a CPU; inductor, the
    backend for GPUs, takes minutes here."""
    import torch._dynamo

    runs = {}
    for backend in ("", "aot_eager"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        tg.main({**train_cfg(tiny_sd, tiny_data, tmp_path / (backend or "eager"), max_steps=2, save_every=2),
                 "compile": backend})
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        runs[backend] = (graphs, adapters_of(tmp_path / (backend or "eager")))
    assert runs[""][0] == 0 and runs["aot_eager"][0] >= 1
    eager, compiled = runs[""][1], runs["aot_eager"][1]
    assert_same_tensors(eager, compiled)


def test_box_use_losses_mirror_the_boxes_and_drop_the_grounding(tiny_sd, tiny_data, random_adapters):
    """The trainer's validation losses with true, mirrored and no boxes: with closed gates (fresh adapters) all three
    equal and the gap's standard error 0; with open ones, three values, the mirrored one that of the boxes mirrored
    left to right; the gap's bootstrap standard error and the gap on the high-noise images are those of each image's
    loss."""
    unet, te, tok, scheduler = tg.load_sd(str(tiny_sd), "cpu", torch.float32)
    tg.inject_gligen(unet)
    data = tg.GroundedLatents(tiny_data["latents"], tiny_data["boxes"])
    batch = data.collate(tok, [data[(i, False)] for i in range(8)])
    cfg = {**tg.config, **tg.VAL_OVERRIDES}
    loss_of = lambda unet, batch, g, per_image=False: tg.sd_loss(  # noqa: E731
        unet, batch, g, te, tg.noise_schedule(scheduler, "tiny", "cpu"), tok.captions([""]), cfg, per_image=per_image)
    losses = lambda rec: {k: v for k, v in rec.items() if k.startswith("val_loss_")}  # noqa: E731
    closed = tg.box_use_losses(partial(loss_of, per_image=True), unet, [batch], seed=5)
    assert len(set(losses(closed).values())) == 1 and closed["val_gap_se"] == 0 == closed["val_gap_high_noise_se"]
    tg.set_adapters(unet, tg.load_adapters(str(random_adapters)), "random")
    got = tg.box_use_losses(partial(loss_of, per_image=True), unet, [batch], seed=5)
    assert len(set(losses(got).values())) == 3, got
    b = batch["boxes"]
    mirrored = torch.stack([1 - b[..., 2], b[..., 1], 1 - b[..., 0], b[..., 3]], -1)  # x -> 1 - x, x0 and x1 swapped
    five = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert got["val_loss_mirrored"] == loss_of(unet, {**batch, "boxes": mirrored}, five()).item()
    assert got["val_loss_boxes"] == loss_of(unet, batch, torch.Generator().manual_seed(5)).item()
    with torch.no_grad():
        (loss, true, t), (_, wrong, _) = (loss_of(unet, x, torch.Generator().manual_seed(5), per_image=True)
                                          for x in (batch, {**batch, "boxes": mirrored}))
    assert torch.allclose(true.mean(), loss) and t.shape == (8,) and (0 <= t).all() and (t < 1).all()
    gap = (wrong.double() - true.double()).numpy()
    high = gap[t.numpy() >= 0.5]
    assert 2 <= len(high) < 8 and got["val_gap_high_noise"] == float(high.mean())
    resample = np.random.default_rng(5).integers(0, 8, (1000, 8))  # the bootstrap, redone
    assert got["val_gap_se"] == float(gap[resample].mean(1).std()) > 0


def test_levers_draw_high_noise_weigh_the_boxes_and_supervise_the_fusers_attention(tiny_sd, tiny_data, monkeypatch):
    """The grounding-sooner levers. timestep_power 1 draws torch.randint's timesteps; 3 draws t = (1 - u^3) T (mean
    3T/4, 67% above 0.7T). box_loss_weight weighs the latent cells inside the boxes (GLIGEN's rounding), each image
    divided by its mean weight; 1 is the plain loss. box_attn_loss adds the cross-entropy, over the filled slots, of the
    logits that each fuser's attention computes (caught on their way into SDPA) for the tokens in a box, toward that
    box; it reaches the position net while the closed gates give it no gradient from the denoising loss."""
    T, g = 1000, lambda: torch.Generator().manual_seed(3)
    assert torch.equal(tg.draw_timesteps(T, 64, g()), torch.randint(0, T, (64,), generator=g()))
    t = tg.draw_timesteps(T, 20000, g(), power=3.0).double() / T
    assert 0 <= t.min() and t.max() < 1 and abs(t.mean() - 0.75) < 0.01
    assert abs((t > 0.7).double().mean() - 0.3 ** (1 / 3)) < 0.01

    target, pred = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)  # error 1 everywhere but
    pred[0, :, :, :4] = 3  # image 0: squared error 9 in its left half, which its box covers
    pred[1, :, 2:4, 2:4] = 3  # image 1: 9 in the cells of its box: rows and columns int(0.3 * 8) to int(0.55 * 8) - 1
    boxes, masks = torch.zeros(2, tg.N_SLOTS, 4), torch.zeros(2, tg.N_SLOTS)
    boxes[0, 0], boxes[1, 0], masks[:, 0] = torch.tensor([0, 0, 0.5, 1]), torch.tensor([0.3, 0.3, 0.55, 0.55]), 1
    want = ((3 * 9 * 32 + 32) / (3 * 32 + 32) + (3 * 9 * 4 + 60) / (3 * 4 + 60)) / 2
    assert tg.box_weighted_mse(pred, target, boxes, masks, 3.0).item() == pytest.approx(want, rel=1e-6)
    plain_mse = torch.nn.functional.mse_loss(pred, target).item()
    assert tg.box_weighted_mse(pred, target, boxes, masks, 1.0).item() == pytest.approx(plain_mse)

    unet, te, tok, scheduler = tg.load_sd(str(tiny_sd), "cpu", torch.float32)
    torch.manual_seed(0)
    tg.inject_gligen(unet)  # fresh: closed gates
    data = tg.GroundedLatents(tiny_data["latents"], tiny_data["boxes"])
    batch = data.collate(tok, [data[(i, False)] for i in range(4)])
    assert batch["masks"].sum() >= 5
    cfg = {**tg.config, **tg.VAL_OVERRIDES}
    levers = tg.Levers(unet, 1.0, 0.5)  # the attention loss alone, at weight 0.5

    def step(batch, g, cfg, levers=None):
        return tg.sd_loss(unet, batch, g, te, tg.noise_schedule(scheduler, "tiny", "cpu"), tok.captions([""]), cfg,
                          levers=levers)

    loss_of = partial(step, batch)
    net = [p for n, p in unet.named_parameters() if n.startswith("position_net.linears")]  # (the null features are
    # not in the supervised softmax: it is over the filled slots)
    plain = loss_of(g(), cfg=cfg)
    plain.backward()
    assert all(p.grad is None or not p.grad.any() for p in net)  # tanh(0) gates: nothing reaches the position net
    unet.zero_grad(set_to_none=True)

    F = torch.nn.functional
    caught, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, *a, **kw: caught.append((q, k)) or sdpa(q, k, v, *a, **kw))
    supervised = loss_of(g(), cfg=cfg, levers=levers)
    supervised.backward()
    assert all(p.grad is not None and p.grad.any() for p in net)
    fusers = [(q, k) for q, k in caught if k.shape[2] == q.shape[2] + tg.N_SLOTS]  # [visual; grounding] keys
    assert len(fusers) == sum(isinstance(m, tg.Fuser) for m in unet.modules()) > 0
    want = []
    for q, k in fusers:  # the cross-entropy, by hand: cells by loops, logits of the grounding keys from SDPA's inputs
        B, heads, N, d = q.shape
        side = int(N ** 0.5)  # square latents
        logits = (q @ k[:, :, N:].transpose(-1, -2)) / d ** 0.5  # (B, heads, N, 30)
        total, count = 0.0, 0
        for b in range(B):
            filled = [s for s in range(tg.N_SLOTS) if batch["masks"][b, s]]
            logp = logits[b][..., filled].log_softmax(-1)  # (heads, N, filled)
            for n in range(N):
                r, c = divmod(n, side)
                cell = lambda s, i: int(batch["boxes"][b, s, i] * side)  # noqa: E731
                ins = [j for j, s in enumerate(filled) if cell(s, 1) <= r < cell(s, 3) and cell(s, 0) <= c < cell(s, 2)]
                if ins:
                    total, count = total - logp[:, n, ins].mean(-1).mean(), count + 1
        want.append(total / count)
    assert supervised.item() == pytest.approx(plain.item() + 0.5 * torch.stack(want).mean().item(), rel=1e-5)
    with torch.no_grad():  # validation and sampling (other batch sizes) after a supervised step: the hooks stay out
        small = data.collate(tok, [data[(i, False)] for i in range(2)])
        assert torch.isfinite(step(small, g(), cfg=cfg, levers=levers))


def test_step_flops_are_counted_per_image(tiny_sd, tiny_data, tmp_path):
    """The log carries the FLOPs of one step per image (torch's flop counter on a pass before training): the same
    for micro-batches of 1 and 2, and at least the UNet's forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    per_image = []
    for micro in (1, 2):
        tg.main(train_cfg(tiny_sd, tiny_data, tmp_path / str(micro), max_steps=1, micro_batch=micro))
        per_image.append(json.loads((tmp_path / str(micro) / "log.jsonl").read_text())["tflop_per_image"])
    unet = tg.inject_gligen(tg.load_sd(str(tiny_sd), "cpu", torch.float32)[0])
    for p in tg.adapter_state(unet):
        unet.get_parameter(p).requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        unet(torch.randn(2, 4, 8, 8), torch.tensor([5, 9]), encoder_hidden_states=torch.randn(2, 77, 32),
             cross_attention_kwargs={"gligen": grounding_inputs()}).sample.square().mean().backward()
    assert per_image[0] == per_image[1] and per_image[0] * 1e12 >= counter.get_total_flops() / 2 > 0
    # model FLOPs of attention, on any device: Q K^T and A V, each 2 b h n m d = 640 FLOPs, are 1,280 forward and
    # twice that backward (torch's counter gives the flash kernels' backward 2.5 times: it recomputes Q K^T; and on
    # a CPU it counts no attention at all)
    q, k, v = (torch.randn(1, 2, n, 4, requires_grad=True) for n in (8, 5, 5))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert tg.count_flops(lambda: sdpa(q, k, v).sum().backward()) == 1280 * 3


def test_init_from_a_diffusers_gligen_model(tiny_sd, tiny_data, random_adapters, tmp_path):
    """Fine-tuning starts from a diffusers GLIGEN directory's adapters (here one written by export, lr 0)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    import sample

    unet = tg.inject_gligen(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"))
    want = tg.load_adapters(str(random_adapters))
    tg.set_adapters(unet, want, "test")
    sample.export(tmp_path / "gligen", unet, AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae"),
                  CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder"),
                  CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer"),
                  DDIMScheduler.from_pretrained(tiny_sd, subfolder="scheduler"))
    tg.main(train_cfg(tiny_sd, tiny_data, tmp_path / "run", init_from=str(tmp_path / "gligen"), max_steps=1, lr=0.0))
    got = adapters_of(tmp_path / "run")
    assert_same_tensors(got, want)

# ---------------------------------------------------------------------------------------------------------------
# Determinism: a resumed run equals a straight one, for every family and mode; two processes equal one
VARIANTS = dict(sd1=("tiny_sd", {}), sd2=("tiny_sd2", {}), sdxl=("tiny_sdxl", {}), video=("tiny_video", {}),
                inpaint=("tiny_sd", dict(inpaint=True)), text_image=("tiny_sd", dict(image_features="tiny_features")),
                levers=("tiny_sd", dict(timestep_power=3.0, box_loss_weight=3.0, box_attn_loss=1.0)),
                sd3=("tiny_sd3", {}), flux=("tiny_flux", dict(box_attn_loss=1.0, timestep_power=2.0)),
                keypoints=("tiny_sd", dict(keypoints=True, boxes="tiny_pose")),
                maps=("tiny_sd", dict(maps="tiny_maps", map_encoder="tiny_convnext")))
PATHS = ("image_features", "boxes", "maps", "map_encoder")  # a variant's settings that name a fixture: its path
DATA = dict(sdxl="tiny_sdxl_data", sd3="tiny_flow_data", flux="tiny_flow_data")  # latents of the model's own VAE


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resumed_equals_straight_and_the_base_stays(variant, request, tmp_path):
    """Every family and mode, and SD1 with every grounding-sooner lever on: 4 steps straight (validating every 2
    steps) equal 2 steps, a resume and 2 steps, across an epoch boundary (12 images, 4 a step): the same adapters,
    optimizer state and logged losses (validation leaves the training stream alone). Every adapter tensor trained;
    every tensor of the frozen base stayed bit-equal; the checkpoints keep what the run's data names (text-image:
    image_project) and the base's prediction type."""
    fixture, mode = VARIANTS[variant]
    model = request.getfixturevalue(fixture)
    mode = {k: str(request.getfixturevalue(v)) if k in PATHS else v for k, v in mode.items()}
    data = request.getfixturevalue(DATA.get(variant, "tiny_data"))  # its own VAE's latents
    cfg = lambda out, **over: train_cfg(model, data, tmp_path / out, **mode, **over)
    tg.main(cfg("straight", max_steps=4, save_every=4, val_every=2, val_steps=1, val_images=4))
    tg.main(cfg("resumed", max_steps=2, save_every=2))
    tg.main(cfg("resumed", max_steps=4, save_every=2))
    straight = adapters_of(tmp_path / "straight")
    assert_same_tensors(adapters_of(tmp_path / "resumed"), straight)
    assert_same_tensors(optimizer_state(tmp_path / "resumed"), optimizer_state(tmp_path / "straight"))
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    assert np.isfinite(losses(tmp_path / "straight")).all()
    val = [r["step"] for _, r in tg.read_jsonl(tmp_path / "straight" / "log.jsonl") if "val_loss_boxes" in r]
    assert val == [0, 2, 4] and max(p.name for p in (tmp_path / "straight").glob("val_*.png")) == "val_0000004.png"

    stages = tg.choose_stages(tg.family_of(str(model)), mode.get("inpaint", False), "image_features" in mode,
                              mode.get("keypoints", False), mode.get("maps") and partial(
                                  tg.load_map_net, mode["maps"], mode["map_encoder"]))
    base, _, _, scheduler = stages.load(str(model), "cpu", torch.float32)
    torch.manual_seed(0)
    fresh = tg.adapter_state(stages.add_adapters(copy.deepcopy(base)))
    assert fresh.keys() == straight.keys() and all(not torch.equal(straight[k], fresh[k]) for k in fresh)  # trained
    trained = stages.add_adapters(copy.deepcopy(base))
    tg.set_adapters(trained, straight, "straight")
    assert_base_untouched(trained, base)
    ckpt = tg.checkpoints(tmp_path / "straight")[-1]
    for f in stages.training_data(cfg("straight")).files:
        assert (ckpt / f.name).read_bytes() == f.read_bytes()
    config = torch.load(ckpt / "state.pt", weights_only=True)["config"]
    assert config["prediction_type"] == scheduler.config.get("prediction_type", "flow")  # an MMDiT's: rectified flow
    if variant == "levers":  # adapters trained with every lever on export to diffusers' pipeline as any others
        ours, pipeline = sample_and_export(model, tmp_path / "straight", tmp_path)
        assert np.array_equal(ours, pipeline(0.5))


@pytest.mark.parametrize("variant", ["sd1", "sdxl", "video", "inpaint", "text_image", "sd3", "flux"])
def test_bf16_trains_every_family_and_mode(variant, request, tmp_path):
    """--dtype=bf16, what auto is on CUDA, on a CPU: the frozen base in bf16 and bit-equal to itself loaded in bf16;
    the adapters (inpainting's conv_in weight too) and their optimizer state in fp32, and trained; the step under bf16
    autocast, its losses within 5e-3 of fp32's (bf16 rounds each value to 2^-8 = 0.4%; a mean over the batch is
    closer: 3e-4 measured here); validation (grid and box-use losses) runs."""
    fixture, mode = VARIANTS[variant]
    model = request.getfixturevalue(fixture)
    mode = {k: str(request.getfixturevalue(v)) if k in PATHS else v for k, v in mode.items()}
    data = request.getfixturevalue(DATA.get(variant, "tiny_data"))
    cfg = lambda dtype, **over: train_cfg(model, data, tmp_path / dtype, max_steps=2, dtype=dtype, **mode, **over)
    unet, _ = tg.main(cfg("bf16", val_every=2, val_steps=1, val_images=2))
    tg.main(cfg("fp32"))
    np.testing.assert_allclose(losses(tmp_path / "bf16"), losses(tmp_path / "fp32"), rtol=5e-3)
    assert (tmp_path / "bf16" / "val_0000002.png").is_file()
    stages = tg.choose_stages(tg.family_of(str(model)), mode.get("inpaint", False), "image_features" in mode,
                              mode.get("keypoints", False), mode.get("maps") and partial(
                                  tg.load_map_net, mode["maps"], mode["map_encoder"]))
    base = stages.load(str(model), "cpu", torch.bfloat16)[0]
    assert_base_untouched(unet, base)
    trained, state = tg.adapter_state(unet), optimizer_state(tmp_path / "bf16")
    assert all(v.dtype == torch.bfloat16 for k, v in unet.state_dict().items() if k not in trained)
    assert all(v.dtype == torch.float32 for v in [*trained.values(), *state.values()])
    torch.manual_seed(0)
    fresh = tg.adapter_state(stages.add_adapters(copy.deepcopy(base)))
    assert all(not torch.equal(trained[k], fresh[k].float()) for k in fresh)


def test_memory_plan_counts_what_a_gpu_holds_before_activations(tiny_sd):
    """The start-up memory plan: 16 bytes a trainable parameter (fp32 weights, gradients, AdamW's two moments) and
    the frozen base's own bytes at its dtype, the adapters not counted twice."""
    unet, text_encoder, _, _ = tg.load_sd(str(tiny_sd), "cpu", torch.bfloat16)
    tg.inject_gligen(unet)
    params = tg.adapter_params(unet)
    for p in params:
        p.data = p.data.float()
    n = sum(p.numel() for p in params)
    names = set(tg.adapter_state(unet))
    frozen = sum(t.numel() * 2 for k, t in [*unet.named_parameters(), *unet.named_buffers()] if k not in names)
    frozen += sum(t.numel() * t.element_size() for t in [*text_encoder.parameters(), *text_encoder.buffers()])
    assert all(t.dtype == torch.bfloat16 for k, t in unet.named_parameters() if k not in names)
    assert tg.memory_plan(unet, text_encoder, params) == dict(adapters=4 * n, gradients=4 * n, adamw=8 * n,
                                                              frozen=frozen)
    # --shard_base over 4: a quarter of each frozen block of the UNet, the rest whole
    split = sum(t.numel() * 2 for k, t in unet.named_parameters() if k not in names and k.startswith(
        ("down_blocks.", "mid_block.", "up_blocks.")))
    assert tg.memory_plan(unet, text_encoder, params, 4, base=True) == dict(
        adapters=n, gradients=n, adamw=2 * n, frozen=frozen - split + split // 4)


def test_shard_base_shards_the_frozen_blocks_and_t5(tiny_flux, tmp_path):
    """--shard_base on Flux, in-process on a world of 1: the transformer's blocks and all of T5 become FSDP2 shards
    (DTensors), counted 1/shards in the memory plan, CLIP and the rest stay whole; T5 gives the same context sharded
    and is sharded again after its forward (a root by default stays gathered)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    stages = tg.choose_stages("flux")
    unet, text_encoder, tokenizer, _ = stages.load(str(tiny_flux), "cpu", torch.float32)
    stages.add_adapters(unet)
    params, names = tg.adapter_params(unet), set(tg.adapter_state(unet))
    n = sum(p.numel() for p in params)
    blocks = sum(p.numel() * 4 for k, p in unet.named_parameters() if k not in names and k.startswith(
        ("transformer_blocks.", "single_transformer_blocks.")))
    t5 = sum(p.numel() * 4 for p in text_encoder.t5.parameters())
    whole = tg.memory_plan(unet, text_encoder, params)["frozen"]
    assert tg.memory_plan(unet, text_encoder, params, 4, base=True) == dict(
        adapters=n, gradients=n, adamw=2 * n, frozen=whole - blocks - t5 + (blocks + t5) // 4)
    ids = tokenizer.captions(["a red circle", "two squares"])
    with torch.no_grad():
        want = text_encoder.captions(ids)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        tg.shard_model(unet, text_encoder, base=True)
        with torch.no_grad():
            got = text_encoder.captions(ids)
        sharded = {k for k, p in [*unet.named_parameters(), *text_encoder.named_parameters()] if isinstance(p, DTensor)}
    finally:
        dist.destroy_process_group()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert {f"t5.{k}" for k, _ in text_encoder.t5.named_parameters()} <= sharded  # and after its forward
    assert names <= sharded and "transformer_blocks.0.attn.to_q.weight" in sharded
    assert "single_transformer_blocks.0.proj_out.weight" in sharded
    assert not any(k.startswith(("clip.", "x_embedder.", "proj_out.")) for k in sharded)


def test_batch_plan_takes_global_batch_images_a_step_on_any_world_size():
    n, G, steps = 70, 32, 4  # two epochs and a bit: the last partial batch of an epoch is never drawn
    steps_of = {}
    for world in (1, 2, 4, 8, 16, 32):
        B, accum = tg.batch_plan(G, 8, world)
        assert B <= 8 and B * accum * world == G
        ranks = [tg.rank_batches(n, G, B, world, r, 0, 0) for r in range(world)]
        steps_of[world] = []
        for _ in range(steps):
            step = [i for batches in ranks for _ in range(accum) for i, _ in next(batches)]
            assert len(step) == len(set(step)) == G  # each image once, exactly G of them, across ranks and passes
            steps_of[world].append(set(step))
    assert all(s == steps_of[1] for s in steps_of.values())  # the same images each step, whatever the world size
    assert tg.batch_plan(32, 8, 8) == (4, 1) and tg.batch_plan(36, 8, 4) == (3, 3) and tg.batch_plan(32, 8, 1) == (8, 4)
    with pytest.raises(SystemExit, match=r"--global_batch=32 images a step cannot be shared by 64 GPUs: use "
                                         r"--global_batch=64, or 32 GPUs"):
        tg.batch_plan(32, 8, 64)
    with pytest.raises(SystemExit, match=r"cannot be shared by 8 GPUs: use --global_batch=24 or --global_batch=32, "
                                         r"or 6 GPUs"):
        tg.batch_plan(30, 8, 8)


def test_two_processes_equal_one(tiny_sd, tiny_data, tiny_features, tiny_pose, tiny_maps, tiny_convnext, tmp_path):
    """In the inpainting and text-image modes at once, so that every trainable tensor of every mode is in the
    all-reduce (fusers, both position nets' parts, conv_in); text-box training is the same code less those. With the
    grounding-sooner levers on: their timesteps, weights and attention loss follow each sample as the rest does. And
    sharded (--shard=True, FSDP2) the 2 processes give DDP's bits. The keypoint and spatial-map modes, modes of
    their own, too."""
    args = [f"--model={tiny_sd}", f"--latents={tiny_data['latents']}", f"--boxes={tiny_data['boxes']}",
            "--global_batch=4", "--micro_batch=2", "--max_steps=4", "--lr=1e-3", "--warmup_steps=2",
            "--num_workers=1", "--val_every=0", "--log_every=2", "--inpaint=True", f"--image_features={tiny_features}",
            "--timestep_power=3", "--box_loss_weight=3", "--box_attn_loss=1"]
    # one CPU thread in each, as torchrun sets for its workers: float reductions then run in the same order
    one = run("train_gligen.py", *args, f"--out_dir={tmp_path / 'one'}", OMP_NUM_THREADS="1")  # 1 process x 2 x 2
    two = run("train_gligen.py", *args, f"--out_dir={tmp_path / 'two'}", torchrun=2, OMP_NUM_THREADS="1")  # 2 x 1 x 2
    shard = run("train_gligen.py", *args, "--shard=True", f"--out_dir={tmp_path / 'shard'}", torchrun=2,
                OMP_NUM_THREADS="1")  # FSDP2: adapters, gradients and AdamW state split over the 2
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert shard.returncode == 0, shard.stderr[-3000:]
    assert "batch plan: 4 images a step = 2 processes x 1 pass x 2 images" in two.stdout
    assert "memory a GPU holds before activations (computed): " in two.stdout
    a, b = adapters_of(tmp_path / "one"), adapters_of(tmp_path / "two")
    assert not torch.equal(a["position_net.null_position_feature"], torch.zeros(64))  # they trained
    assert "conv_in.weight" in a and "position_net.linears_image.0.weight" in a
    # exact: the same samples, noise and timesteps per sample, and (g0 + g1) / 2 == g0 / 2 + g1 / 2 in floating point
    assert_same_tensors(a, b)
    assert_same_tensors(b, adapters_of(tmp_path / "shard"))  # a reduce-scatter's average is the all-reduce's
    # the logged loss is averaged over ranks (summed in another order than one process accumulates it)
    np.testing.assert_allclose(losses(tmp_path / "one"), losses(tmp_path / "two"), rtol=1e-5)
    common = [*args[:2], "--global_batch=4", "--micro_batch=2", "--max_steps=2", "--lr=1e-3", "--num_workers=0",
              "--val_every=0"]
    for mode, extra in (("kp", [f"--boxes={tiny_pose}", "--keypoints=True"]),
                        ("maps", [f"--maps={tiny_maps}", f"--map_encoder={tiny_convnext}"])):
        one = run("train_gligen.py", *common, *extra, f"--out_dir={tmp_path / mode}-one", OMP_NUM_THREADS="1")
        two = run("train_gligen.py", *common, *extra, f"--out_dir={tmp_path / mode}-two", torchrun=2,
                  OMP_NUM_THREADS="1")
        assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
        assert_same_tensors(adapters_of(f"{tmp_path / mode}-one"), adapters_of(f"{tmp_path / mode}-two"))

def test_sharded_checkpoint_resumes_on_another_world_size(tiny_sd, tiny_data, tmp_path):
    """A --shard=True run on 2 ranks (2 accumulation passes each, validation on), killed in its step-4 save after the
    optimizer's shards are written, resumes sharded on 1 rank from its step-2 checkpoint (whole adapters, the
    optimizer's 2 shards resharded to 1) and ends where one process goes straight; the adapters file holds diffusers'
    0-d gates. Unsharded, the run refuses that checkpoint."""
    args = [f"--model={tiny_sd}", f"--latents={tiny_data['latents']}", f"--boxes={tiny_data['boxes']}",
            "--global_batch=4", "--micro_batch=1", "--lr=1e-3", "--warmup_steps=2", "--num_workers=0",
            "--log_every=2", "--save_every=2", "--max_steps=4"]
    sharded = [*args, "--shard=True", "--val_every=2", "--val_images=2", "--val_steps=2",
               f"--out_dir={tmp_path / 'sharded'}"]
    (tmp_path / "dies_while_saving.py").write_text(  # rank 0 SIGKILLs itself once step 4's shards are on disk
        "import os, signal, sys\n"
        "import torch.distributed as dist, torch.distributed.checkpoint as dcp\n"
        "import train_gligen as tg\n"
        "real_save = dcp.save\n"
        "def save(state, checkpoint_id, **kwargs):\n"
        "    real_save(state, checkpoint_id=checkpoint_id, **kwargs)\n"
        "    if 'step_0000004' in str(checkpoint_id) and dist.get_rank() == 0:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "dcp.save = save\n"
        "tg.main(tg.configure(tg.config, sys.argv[1:]))\n")
    first = run(tmp_path / "dies_while_saving.py", *sharded, torchrun=2, PYTHONPATH=str(HERE), OMP_NUM_THREADS="1")
    ckpt = tmp_path / "sharded" / "step_0000002"
    assert first.returncode != 0 and "Signal 9 (SIGKILL)" in first.stderr, first.stderr[-3000:]
    assert tg.checkpoints(tmp_path / "sharded") == [ckpt]
    assert (tmp_path / "sharded" / "step_0000004.optimizer.tmp" / ".metadata").is_file()  # the kill came after it
    assert torch.load(ckpt / "state.pt", weights_only=True)["optimizer"] is None  # in optimizer/, each rank's shard
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert {"optimizer/.metadata", "optimizer/__0_0.distcp", "optimizer/__1_0.distcp"} <= manifest.keys()
    unsharded = run("train_gligen.py", *args, f"--out_dir={tmp_path / 'sharded'}")
    assert unsharded.returncode == 1 and "was saved by a sharded run" in unsharded.stderr, unsharded.stderr[-3000:]
    resumed = run("train_gligen.py", *sharded, torchrun=1, OMP_NUM_THREADS="1")
    straight = run("train_gligen.py", *args, f"--out_dir={tmp_path / 'straight'}", OMP_NUM_THREADS="1")
    for r in (resumed, straight):
        assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {ckpt}" in resumed.stdout and not list((tmp_path / "sharded").glob("*.tmp"))
    sharded, straight = adapters_of(tmp_path / "sharded"), adapters_of(tmp_path / "straight")
    gate = "down_blocks.0.attentions.0.transformer_blocks.0.fuser.alpha_attn"
    assert sharded[gate].dim() == 0 and sharded.keys() == straight.keys() and len(sharded) == 127
    assert not torch.equal(sharded["position_net.null_position_feature"], torch.zeros(64))  # they trained
    for k in sharded:  # 2 ranks x 2 passes add the first steps' gradients in another order: 1.2e-7 measured
        torch.testing.assert_close(sharded[k], straight[k], rtol=0, atol=1e-6, msg=k)
    vals = [r for _, r in tg.read_jsonl(tmp_path / "sharded" / "log.jsonl") if "val_loss_boxes" in r]
    assert [r["step"] for r in vals] == [0, 2, 4] and (tmp_path / "sharded" / "val_0000004.png").is_file()


def test_sharded_sdxl_equals_one_process(tiny_sdxl, tiny_sdxl_data, tmp_path):
    """--shard=True on SDXL (two text encoders, size ids), its frozen blocks sharded too, over 2 ranks ends within
    1e-6 of one process: FSDP2's hooks on a block's inputs change the order autograd sums their gradients in."""
    args = [f"--model={tiny_sdxl}", f"--latents={tiny_sdxl_data['latents']}", f"--boxes={tiny_sdxl_data['boxes']}",
            "--global_batch=4", "--micro_batch=2", "--max_steps=2", "--lr=1e-3", "--warmup_steps=2",
            "--num_workers=0", "--val_every=0", "--log_every=2"]
    one = run("train_gligen.py", *args, f"--out_dir={tmp_path / 'one'}", OMP_NUM_THREADS="1")
    shard = run("train_gligen.py", *args, "--shard=True", "--shard_base=True", f"--out_dir={tmp_path / 'shard'}",
                torchrun=2, OMP_NUM_THREADS="1")
    assert one.returncode == 0 and shard.returncode == 0, (one.stderr + shard.stderr)[-3000:]
    a, b = adapters_of(tmp_path / "one"), adapters_of(tmp_path / "shard")
    assert not torch.equal(b["position_net.null_position_feature"], torch.zeros(64))  # they trained
    for k in a:  # 6e-8 measured
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


def test_two_processes_equal_one_on_mmdits(tiny_sd3, tiny_flux, tiny_flow_data, tmp_path):
    """SD3 and Flux (with the attention loss, and Flux's position code in its fusers) on 2 processes equal 1: the
    rectified-flow step draws its noise levels per sample, as the UNets' step draws its timesteps. Sharded
    (--shard=True; the fusers run by hooks; on Flux the frozen blocks sharded too) the 2 give DDP's bits."""
    for model in (tiny_sd3, tiny_flux):
        args = [f"--model={model}", f"--latents={tiny_flow_data['latents']}", f"--boxes={tiny_flow_data['boxes']}",
                "--global_batch=4", "--micro_batch=2", "--max_steps=3", "--lr=1e-3", "--warmup_steps=2",
                "--num_workers=0", "--val_every=0", "--log_every=3", "--box_attn_loss=1"]
        one = run("train_gligen.py", *args, f"--out_dir={tmp_path / model.name / 'one'}", OMP_NUM_THREADS="1")
        two = run("train_gligen.py", *args, f"--out_dir={tmp_path / model.name / 'two'}", torchrun=2,
                  OMP_NUM_THREADS="1")
        base = ["--shard_base=True"] if model == tiny_flux else []
        shard = run("train_gligen.py", *args, "--shard=True", *base, f"--out_dir={tmp_path / model.name / 'shard'}",
                    torchrun=2, OMP_NUM_THREADS="1")
        assert one.returncode == 0, one.stderr[-3000:]
        assert two.returncode == 0, two.stderr[-3000:]
        assert shard.returncode == 0, shard.stderr[-3000:]
        assert_same_tensors(adapters_of(tmp_path / model.name / "two"), adapters_of(tmp_path / model.name / "shard"))
        a, b = adapters_of(tmp_path / model.name / "one"), adapters_of(tmp_path / model.name / "two")
        assert any(k.startswith("transformer_blocks.1.fuser.") for k in a)  # the fusers, by the UNets' names
        assert not torch.equal(a["position_net.null_position_feature"], torch.zeros(64))  # they trained
        assert_same_tensors(a, b)


def test_flux_ablation_trains_without_the_position_code(tiny_flux, tiny_sd3, tiny_flow_data, tmp_path, monkeypatch):
    """extras/flux_without_position_code.py trains Flux's fusers with train_gligen.py's settings but no position code:
    from the same start and batches, the attention loss (which reads the fusers' queries) sends them elsewhere; it
    refuses another family."""
    sys.path.insert(0, str(HERE / "extras"))
    import flux_without_position_code as ablation

    monkeypatch.setitem(tg.FAMILIES["flux"], "add_adapters", tg.FAMILIES["flux"]["add_adapters"])  # restored after
    cfg = train_cfg(tiny_flux, tiny_flow_data, tmp_path / "code", max_steps=2, box_attn_loss=1.0, save_every=2)
    tg.main(cfg)
    ablation.main([f"--{k}={v}" for k, v in {**cfg, "out_dir": tmp_path / "none"}.items()
                   if k in ("model", "latents", "boxes", "out_dir", "global_batch", "micro_batch", "num_workers",
                            "val_every", "warmup_steps", "lr", "max_steps", "box_attn_loss", "save_every")])
    with_code, without = adapters_of(tmp_path / "code"), adapters_of(tmp_path / "none")
    assert with_code.keys() == without.keys()
    assert not torch.equal(with_code["transformer_blocks.0.fuser.attn.to_q.weight"],
                           without["transformer_blocks.0.fuser.attn.to_q.weight"])
    with pytest.raises(SystemExit, match="not a Flux model"):
        ablation.main([f"--model={tiny_sd3}", f"--latents={tiny_flow_data['latents']}", "--out_dir=x"])


# ---------------------------------------------------------------------------------------------------------------
# Sampling: sample.py equals diffusers' pipelines (exported, or SDXL's own), pixel for pixel; every family samples
LAYOUT = dict(prompt="a red square and a blue circle", phrases=["a red square", "a blue circle"],
              boxes=[[0.1, 0.1, 0.5, 0.6], [0.55, 0.4, 0.95, 0.95]])


def sample_and_export(tiny_sd, adapters, tmp_path, scheduler="ddim", command_line=False):
    """sample.py's 2 images of LAYOUT (8 steps, beta 0.5, seed 7, 32 x 32) with adapters, and a function giving the
    exported StableDiffusionGLIGENPipeline's images of the same at a beta."""
    from diffusers import StableDiffusionGLIGENPipeline

    args = [f"--model={tiny_sd}", f"--adapters={adapters}", f"--prompt={LAYOUT['prompt']}",
            f"--phrases={LAYOUT['phrases']}", f"--boxes={LAYOUT['boxes']}", "--n=2", "--seed=7", "--steps=8",
            "--beta=0.5", f"--scheduler={scheduler}", "--height=32", "--width=32", f"--out_dir={tmp_path / 'samples'}",
            f"--export={tmp_path / 'pipe'}"]
    if command_line:
        r = run("sample.py", *args)
        assert r.returncode == 0, r.stderr[-3000:]
    else:
        import sample
        sample.main(sample.configure(sample.config, args))
    pipe = StableDiffusionGLIGENPipeline.from_pretrained(tmp_path / "pipe")
    assert type(pipe.scheduler).__name__ == tg.SCHEDULERS[scheduler]

    def pipeline(beta):
        images = pipe(LAYOUT["prompt"], gligen_phrases=LAYOUT["phrases"], gligen_boxes=LAYOUT["boxes"],
                      gligen_scheduled_sampling_beta=beta, num_inference_steps=8, guidance_scale=7.5, height=32,
                      width=32, num_images_per_prompt=2, generator=torch.Generator().manual_seed(7), output_type="np")
        return pixels(images.images)

    return pngs(tmp_path / "samples", 2), pipeline


def test_stack_halves_puts_every_unconditional_half_first():
    """Batched sampling's row order: each layout's inputs are [unconditional; conditional] (n rows each, or n x frames
    for video); the batch is every layout's unconditional half, in layout order, then every conditional half, in
    nested dicts too (SDXL's added_cond_kwargs). Labels: layout * 100 + (0 unconditional, 50 conditional) + row."""
    n, frames = 2, 3
    rows = n * frames
    part = lambda k: torch.tensor([k * 100 + half + r for half in (0, 50) for r in range(rows)])
    stacked = tg.stack_halves([{"x": part(k), "added": {"y": part(k)[:, None].expand(-1, 4)}} for k in range(3)])
    want = [k * 100 + half + r for half in (0, 50) for k in range(3) for r in range(rows)]
    assert stacked["x"].tolist() == want and stacked["added"]["y"][:, 0].tolist() == want
    assert tg.grounded([LAYOUT, LAYOUT], [0, 1]) and not tg.grounded([dict(prompt="", phrases=[], boxes=[])], [0])
    with pytest.raises(SystemExit, match="mixes layouts with phrases and without"):
        tg.grounded([LAYOUT, dict(prompt="", phrases=[], boxes=[])], [0, 1])
    with pytest.raises(SystemExit, match="2 layouts and 1 seeds"):
        tg.grounded([LAYOUT, LAYOUT], [0])


@pytest.mark.parametrize("scheduler", ["euler_a", "dpm"])  # noise drawn per step; a multistep solver's state
def test_sample_batch_gives_each_layout_its_own_images(scheduler, tiny_sd, random_adapters, tmp_path):
    """sample.py --batch: several layouts share each UNet call, and each still gets its own images: its own seed's
    noise, at every step of a stochastic sampler, and its own copy of a scheduler that keeps state between steps. A
    layout without phrases is drawn in a batch of its own (no grounding, not null grounding)."""
    import sample

    layouts = [LAYOUT, {**LAYOUT, "prompt": "a blue circle", "boxes": LAYOUT["boxes"][::-1]},
               dict(prompt="a red square", phrases=[], boxes=[]), {**LAYOUT, "prompt": "shapes"}, LAYOUT]
    (tmp_path / "layouts.jsonl").write_text("".join(json.dumps(l) + "\n" for l in layouts))
    runs = {}
    for batch in (1, 3):
        sample.main({**sample.config, "model": str(tiny_sd), "adapters": str(random_adapters), "n": 2,
                     "layouts": str(tmp_path / "layouts.jsonl"), "steps": 6, "beta": 0.5, "scheduler": scheduler,
                     "batch": batch, "out_dir": str(tmp_path / str(batch))})
        runs[batch] = np.stack([np.asarray(Image.open(tmp_path / str(batch) / f"{k:03d}_{i:02d}.png"), np.int16)
                                for k in range(len(layouts)) for i in range(2)])
    assert sample.batches(layouts, 3) == [[0, 1], [2], [3, 4]]
    # the same images, up to a matrix product's last bits in another batch size, which the steps carry on: on a 2-core
    # AVX-512 CPU (2026-12-02) DPM-Solver++'s images differed by 1-2 levels on 22% of the values (mean 0.23), on the
    # machine before by at most 1; another layout's seed or a shared scheduler moves them by tens
    off = np.abs(runs[1] - runs[3])
    assert off.max() <= 3 and off.mean() < 0.5, (off.max(), off.mean())
    assert np.abs(runs[3][0] - runs[3][8]).max() > 10  # layouts 0 and 4 are the same layout with other seeds


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])  # euler_a also draws noise from the generator per step
def test_sample_equals_exported_pipeline(scheduler, tiny_sd, random_adapters, tmp_path):
    ours, pipeline = sample_and_export(tiny_sd, random_adapters, tmp_path, scheduler, command_line=scheduler == "ddim")
    assert ours.shape == (2, 32, 32, 3)
    for i in range(2):  # the copy with boxes drawn on differs from the image
        assert not np.array_equal(np.asarray(Image.open(tmp_path / "samples" / f"000_0{i}_boxes.png")), ours[i])
    assert np.array_equal(ours, pipeline(0.5))  # the same pixels
    assert np.abs(ours - pipeline(0.0)).max() > 10  # and the comparison can tell: no grounding,
    assert np.abs(ours - pipeline(1.0)).max() > 10  # or grounding in all 8 steps, gives another image


def test_sdxl_sampling_equals_diffusers_sdxl_pipeline(tiny_sdxl):
    """generate() on SDXL without grounding gives the pixels of diffusers' StableDiffusionXLPipeline: the two text
    encoders, zero unconditional features, size conditioning and VAE are used as SDXL's own pipeline uses them."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    stages = tg.choose_stages("sdxl")
    unet, te, tok, _ = stages.load(str(tiny_sdxl), "cpu", torch.float32)
    vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    scheduler = EulerDiscreteScheduler.from_pretrained(tiny_sdxl, subfolder="scheduler")
    with torch.no_grad():
        ours = stages.generate(unet, vae, te, tok, scheduler, [dict(prompt="a red square and a blue circle", phrases=[],
                              boxes=[])], [3], n=2, steps=3)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    want = pipe("a red square and a blue circle", num_inference_steps=3, guidance_scale=7.5, num_images_per_prompt=2,
                generator=torch.Generator().manual_seed(3), output_type="np").images
    assert ours.shape == (2, 16, 16, 3) and np.array_equal(ours, pixels(want))


@pytest.mark.parametrize("family", ["sd3", "flux", "flux-schnell"])
def test_mmdit_sampling_equals_diffusers_pipelines_and_fresh_adapters_change_nothing(family, request, tiny_flow_data,
                                                                                     tmp_path):
    """Without grounding, generate() on SD3 and Flux (dev: guidance embedded; schnell: none) gives the pixels of
    diffusers' StableDiffusion3Pipeline and FluxPipeline (true classifier-free guidance, an empty negative prompt),
    for two layouts in one batch, each from its own seed (up to one level on under 1% of the values: the pipelines
    draw one layout a call, and FluxPipeline runs its two halves as two; 1 of 3,072 measured on each): text encoding
    aside (given to the pipelines as embeddings, as no tokenizer can be built offline), the schedule, guidance,
    packing and VAE are theirs. Fresh adapters with boxes leave those pixels exactly (zero gates); trained-like ones
    change them, and their fusers off (beta 0) do not. The latents the tiny MMDiTs train on are the VAE's shifted
    and scaled means, as the pipelines' latents are."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    model = make_tiny_flux(tmp_path / "schnell", guidance_embeds=False) if family == "flux-schnell" else \
        request.getfixturevalue(f"tiny_{family}")
    stages = tg.choose_stages(tg.family_of(str(model)))
    transformer, te, tok, _ = stages.load(str(model), "cpu", torch.float32)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    layouts = [dict(LAYOUT, phrases=[], boxes=[]), dict(prompt="the cat on the mat", phrases=[], boxes=[])]
    draw = lambda unet, layouts, beta=1.0: stages.generate(unet, vae, te, tok, scheduler, layouts, [3, 4], steps=3,
                                                          guidance=4.0, beta=beta, height=32, width=32)
    ours = draw(transformer, layouts)
    Pipeline = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    pipe = Pipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None,
                    text_encoder_2=None, tokenizer_2=None, **dict(text_encoder_3=None, tokenizer_3=None)
                    if family == "sd3" else {})
    for k, (layout, seed) in enumerate(zip(layouts, [3, 4])):
        text = tg.mmdit_prompt_inputs(te, tok, layout["prompt"], 1, 32, 32)
        latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
        embeds = dict(prompt_embeds=text["encoder_hidden_states"][1:],
                      pooled_prompt_embeds=text["pooled_projections"][1:],
                      negative_prompt_embeds=text["encoder_hidden_states"][:1],
                      negative_pooled_prompt_embeds=text["pooled_projections"][:1])
        if family == "sd3":
            want = pipe(**embeds, latents=latents, num_inference_steps=3, guidance_scale=4.0, height=32, width=32,
                        output_type="np").images
        else:  # FluxPipeline takes latents packed 2 x 2
            packed = latents.view(1, 4, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 64, 16)
            want = pipe(**embeds, latents=packed, true_cfg_scale=4.0, guidance_scale=tg.FLUX_GUIDANCE,
                        num_inference_steps=3, height=32, width=32, output_type="np").images
        # both layouts in one batch against the pipeline's one (FluxPipeline also calls the model on its two halves
        # apart): a matrix product may round a last bit otherwise (SD3: equal on one CPU, 1 of 3,072 values one level
        # off on an AVX-512 one; Flux: 1 of 3,072)
        off = np.abs(ours[k].astype(int) - pixels(want)[0])
        assert off.max() <= 1 and (off > 0).mean() < 0.01, k
    grounded = [LAYOUT, dict(prompt="the cat on the mat", phrases=["a cat"], boxes=[[0.5, 0.5, 1.0, 1.0]])]
    fresh = stages.add_adapters(copy.deepcopy(transformer))
    assert np.array_equal(draw(fresh, grounded), ours)
    random_adapters_of(stages, transformer, 0, tmp_path / "run")
    tg.set_adapters(fresh, tg.load_adapters(str(tmp_path / "run")), "random")
    assert np.abs(draw(fresh, grounded).astype(int) - ours).mean() > 1
    assert np.array_equal(draw(fresh, grounded, beta=0.0), ours)
    if family == "sd3":
        rec = next(r for _, r in tg.read_jsonl(tiny_flow_data["latents"] / "index.jsonl") if r["key"] == "img_000.png")
        assert_latents_of(model, tiny_flow_data["root"] / "images" / "img_000.png",
                          tiny_flow_data["latents"] / rec["shard"], rec["row"], 16)


def test_inpainting_keeps_the_photo_and_equals_the_exported_pipeline(tiny_sd, random_adapters, tmp_path, monkeypatch):
    """Inpainting adapters (conv_in widened to 9 channels): sample.py keeps the photo outside the boxes and generates
    inside them, and StableDiffusionGLIGENPipeline(gligen_inpaint_image=...) loaded from --export gives the same pixels.
    That pipeline draws its first latents and each step's re-noising of the photo from torch's global generator
    (randn_like, ignoring `generator`) and encodes the photo with a VAE sample; here it is handed sample.py's own
    noise, in sample.py's order, and the VAE's mean, which is what sample.py uses."""
    import sample
    from diffusers import StableDiffusionGLIGENPipeline, UNet2DConditionModel
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from safetensors.torch import save_file

    torch.manual_seed(4)
    sd = tg.load_adapters(str(random_adapters))
    conv = tg.widen_conv_in(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")).conv_in.weight.detach()
    sd["conv_in.weight"] = conv + torch.randn_like(conv) * 0.3  # the photo's channels count
    save_file(sd, tmp_path / "inpaint.safetensors")
    yy, xx = np.mgrid[0:16, 0:16]
    photo = Image.fromarray(np.stack([xx * 16, yy * 16, 255 - xx * 8], -1).astype(np.uint8))  # a smooth gradient
    photo.save(tmp_path / "photo.png")
    phrases, boxes = ["a red square"], [[0.0, 0.0, 0.5, 1.0]]  # the left half is generated
    sample.main({**sample.config, "model": str(tiny_sd), "adapters": str(tmp_path / "inpaint.safetensors"),
                 "prompt": "a red square", "phrases": phrases, "boxes": boxes, "n": 2, "seed": 7, "steps": 8,
                 "beta": 0.5, "out_dir": str(tmp_path / "samples"), "export": str(tmp_path / "pipe"),
                 "inpaint_image": str(tmp_path / "photo.png")})
    ours = pngs(tmp_path / "samples", 2)

    pipe = StableDiffusionGLIGENPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.unet.config.in_channels == 9
    rng = np.random.default_rng(0)  # the mask is the pipeline's, pixel for pixel, on square latent grids
    for size in (8, 64):
        for _ in range(20):
            xy = rng.random((3, 2)) * 0.7
            bx = np.concatenate([xy, xy + rng.random((3, 2)) * 0.3], 1).tolist()
            want = pipe.draw_inpaint_mask_from_boxes(bx, (size, size))
            assert torch.equal(tg.inpaint_mask(torch.tensor([bx]), torch.ones(1, 3), size, size)[0, 0], want)
    # a diffusers inpainting model (as the official one) loads back as adapters + conv_in, for --init_from
    assert_same_tensors(tg.load_adapters(str(tmp_path / "pipe")), sd)
    g = torch.Generator().manual_seed(7)  # sample.py's draws: the first latents, then one re-noising per step
    noise = [torch.randn(2, 4, 8, 8, generator=g)] + [torch.randn(1, 4, 8, 8, generator=g) for _ in range(8)]
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: noise.pop(0))
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    theirs = pipe("a red square", gligen_phrases=phrases, gligen_boxes=boxes, gligen_inpaint_image=photo,
                  gligen_scheduled_sampling_beta=0.5, num_inference_steps=8, guidance_scale=7.5,
                  num_images_per_prompt=2, generator=torch.Generator().manual_seed(7), output_type="np").images
    monkeypatch.undo()
    assert not noise and np.array_equal(ours, pixels(theirs))  # every draw used, same pixels

    # in latent space: outside the box the photo's latent is kept, inside another is made
    z = sample.photo_latent(tmp_path / "photo.png", pipe.vae, 16, 16)
    final = []
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode",
                        lambda x, **kw: final.append(x * pipe.vae.config.scaling_factor) or decode(x))
    tg.generate_inpaint(pipe.unet, pipe.vae, pipe.text_encoder, tg.Tokenizer(pipe.tokenizer), pipe.scheduler,
                        [dict(prompt="a red square", phrases=phrases, boxes=boxes)], [7], inpaint_latent=z, n=2,
                        steps=8, beta=0.5)
    outside, inside = (final[0] - z)[..., 4:].abs(), (final[0] - z)[..., :4].abs()  # the box: latent columns 0-3
    assert outside.mean() < 0.05 and inside.mean() > 1.0, (outside.mean(), inside.mean())  # measured 0.031 and 5.94


def test_keypoint_mode_samples_and_refuses_what_does_not_fit(tiny_sd, tiny_data, tiny_pose, tmp_path):
    """Keypoint adapters: a layout's keypoints become the slots the trainer's samples hold (largest box's person
    first, [x, y] visible, None empty, the unconditional half null), sample.py draws them (skeleton on the _boxes
    copy) and they steer the image; refused, each with one line: a keypoint outside the image (boxes file: file and
    line; layout: which), a boxes file without keypoints, box layouts as --val_layouts, text-box adapters in a
    keypoint run and a keypoint checkpoint resumed without --keypoints, keypoint layouts to other adapters and the
    reverse, and --export."""
    import sample
    from safetensors.torch import save_file

    small, big = tg.standing("", "a", (0.2, 0.5, 0.3))["keypoints"][0], tg.standing("", "a", (0.6, 0.1, 0.8))
    layout = dict(prompt="two people", phrases=["a child", "a man"],
                  boxes=[tg.standing("", "a", (0.2, 0.5, 0.3))["boxes"][0], big["boxes"][0]],
                  keypoints=[[None] + small[1:], big["keypoints"][0]])
    text_encoder = tg.load_sd(str(tiny_sd), "cpu", torch.float32)[1]
    g = tg.keypoint_layout_grounding(text_encoder, None, layout, [None] * 4, torch.float32)
    assert g["boxes"].shape == (4, 136, 4) and not g["masks"][:2].any()  # the unconditional half
    assert torch.equal(g["boxes"][2, 3], torch.tensor(big["keypoints"][0][3] * 2))  # the big man first
    assert torch.equal(g["boxes"][3, 17 + 5], torch.tensor(small[5] * 2))
    assert g["masks"][2].tolist() == [1.0] * 17 + [0.0] + [1.0] * 16 + [0.0] * 102  # the child's nose: None
    hidden = dict(layout, phrases=layout["phrases"] + ["a ghost"], boxes=layout["boxes"] + [[0.1, 0.1, 0.5, 0.5]],
                  keypoints=layout["keypoints"] + [[None] * 17])
    assert all(torch.equal(a, b) for a, b in zip(  # a person with no visible point takes no slot, as in training
        g.values(), tg.keypoint_layout_grounding(text_encoder, None, hidden, [None] * 4, torch.float32).values()))
    with pytest.raises(SystemExit, match="inpainting and keypoint at once: no such mode"):
        tg.choose_stages("sd", True, False, True)

    out = tmp_path / "kp"
    tg.main(train_cfg(tiny_sd, tiny_data, out, boxes=str(tiny_pose), keypoints=True, max_steps=2))
    cfg = {**sample.config, "model": str(tiny_sd), "adapters": str(out), "prompt": layout["prompt"], "n": 1,
           "steps": 3, "beta": 1.0, "phrases": layout["phrases"], "boxes": layout["boxes"],
           "keypoints": layout["keypoints"]}
    sample.main({**cfg, "out_dir": str(tmp_path / "s")})
    assert (tmp_path / "s" / "000_00.png").is_file() and (tmp_path / "s" / "000_00_boxes.png").is_file()
    im = Image.open(tmp_path / "s" / "000_00.png")  # the validation grid's tiles: the skeletons drawn on too
    assert not np.array_equal(np.asarray(tg.draw_grounding(im, layout)),
                              np.asarray(tg.draw_layout(im, layout["phrases"], layout["boxes"])))
    adapters = adapters_of(out)
    for k in adapters:  # gates open, so that the keypoints steer the image
        if k.endswith(("alpha_attn", "alpha_dense")):
            adapters[k] = torch.tensor(1.0)
    save_file(adapters, tmp_path / "open.safetensors")
    moved = [[[1 - p[0], p[1]] if p else p for p in person] for person in layout["keypoints"]]
    for name, kp in (("a", layout["keypoints"]), ("b", moved)):
        sample.main({**cfg, "adapters": str(tmp_path / "open.safetensors"), "keypoints": kp,
                     "out_dir": str(tmp_path / name)})
    assert not np.array_equal(pngs(tmp_path / "a", 1), pngs(tmp_path / "b", 1))

    bad = tmp_path / "bad.jsonl"
    recs = [r for _, r in tg.read_jsonl(tiny_pose)]
    n = next(i for i, r in enumerate(recs) if r["keypoints"])
    recs[n]["keypoints"][0][0] = [1.5, 0.5, 2]
    bad.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(SystemExit, match=rf"bad.jsonl:{n + 1} \(image .*\): person 0's nose \[1.5, 0.5, 2\] is "
                                         r"outside the image"):
        tg.main(train_cfg(tiny_sd, tiny_data, tmp_path / "x", boxes=str(bad), keypoints=True))
    with pytest.raises(SystemExit, match=r"boxes.jsonl:1 \(image .*\): no keypoints \(prep_boxes.py writes them"):
        tg.main(train_cfg(tiny_sd, tiny_data, tmp_path / "x", keypoints=True))
    tg.main(train_cfg(tiny_sd, tiny_data, tmp_path / "text-box", max_steps=1))
    with pytest.raises(SystemExit, match="text-box adapters, and this run is keypoint"):
        tg.main(train_cfg(tiny_sd, tiny_data, tmp_path / "x", boxes=str(tiny_pose), keypoints=True,
                          init_from=str(tmp_path / "text-box")))
    with pytest.raises(SystemExit, match=r"val.jsonl:1: no keypoints, which this mode's layouts need"):
        tg.main(train_cfg(tiny_sd, tiny_data, tmp_path / "y", boxes=str(tiny_pose), keypoints=True, val_every=2,
                          val_steps=1, val_images=2, val_layouts=str(HERE / "layouts" / "val.jsonl")))
    with pytest.raises(SystemExit, match="was trained with keypoints=True, this run has keypoints=False"):
        tg.main(train_cfg(tiny_sd, tiny_data, out, boxes=str(tiny_pose), max_steps=3))
    with pytest.raises(SystemExit, match="person 1's left_eye \\[1.2, 0.3\\] is outside the image"):
        sample.main({**cfg, "keypoints": [small, [small[0], [1.2, 0.3]] + small[2:]], "out_dir": str(tmp_path / "x")})
    with pytest.raises(SystemExit, match="are keypoint adapters: each layout with boxes needs keypoints"):
        sample.main({**cfg, "keypoints": [], "out_dir": str(tmp_path / "x")})
    with pytest.raises(SystemExit, match="need keypoint adapters"):
        sample.main({**cfg, "adapters": str(tmp_path / "text-box"), "out_dir": str(tmp_path / "x")})
    with pytest.raises(SystemExit, match="diffusers has no GLIGEN pipeline for keypoints"):
        sample.main({**cfg, "export": str(tmp_path / "pipe"), "out_dir": str(tmp_path / "x")})


def test_text_image_sample_equals_exported_pipeline(tiny_sd, tiny_clip, tiny_data, tiny_features, tmp_path):
    """Text-image adapters exported with --export: sample.py (beta = 1) with that model as --adapters, and
    StableDiffusionGLIGENTextImagePipeline loading it, give the same pixels for a box with a phrase and an image, a
    phrase-only box and an image-only box. That pipeline always grounds (it ignores gligen_scheduled_sampling_beta) and
    runs the UNet twice a step, the conditional half grounded and the unconditional half with all-null grounding: what
    sample.py computes in one pass. The export holds the same adapters and image_project. (The run that exports reads
    its image encoder from another file: the same weights at another memory offset, where the CPU's matrix kernel
    rounds CLIP's projection differently in the last bit, and these strong random adapters amplify that to whole
    pixel levels; so the pixels are compared for the same files.)"""
    import sample
    from diffusers import StableDiffusionGLIGENTextImagePipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(5)
    sd = tg.adapter_state(tg.inject_gligen(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"),
                                          position_net=tg.PositionNetTextImage))
    sd = {k: torch.full_like(v, 2.0) if ".alpha_" in k else v + torch.randn_like(v) * (0.5 if v.ndim < 2 else 0.3)
          for k, v in sd.items()}
    (tmp_path / "run").mkdir()
    save_file(sd, tmp_path / "run" / "adapters.safetensors",
              metadata={"config": json.dumps({"image_encoder": str(tiny_clip)})})
    weight = CLIPTextModelWithProjection.from_pretrained(tiny_clip).text_projection.weight.T.contiguous()
    save_file({"project.weight": weight}, tmp_path / "run" / "image_project.safetensors")
    rng = np.random.default_rng(1)
    refs = [Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)) for _ in range(2)]
    for i, im in enumerate(refs):
        im.save(tmp_path / f"ref{i}.png")
    phrases = ["a red square", "a blue circle", None]
    images = [str(tmp_path / "ref0.png"), None, str(tmp_path / "ref1.png")]
    boxes = [[0.1, 0.1, 0.5, 0.6], [0.55, 0.4, 0.95, 0.95], [0.5, 0.0, 1.0, 0.4]]
    sample.main({**sample.config, "model": str(tiny_sd), "adapters": str(tmp_path / "run"), "prompt": "shapes",
                 "phrases": phrases, "images": images, "boxes": boxes, "n": 2, "seed": 7, "steps": 6, "beta": 1.0,
                 "out_dir": str(tmp_path / "samples"), "export": str(tmp_path / "pipe")})
    sample.main({**sample.config, "model": str(tiny_sd), "adapters": str(tmp_path / "pipe"), "prompt": "shapes",
                 "phrases": phrases, "images": images, "boxes": boxes, "n": 2, "seed": 7, "steps": 6, "beta": 1.0,
                 "out_dir": str(tmp_path / "samples2")})
    ours = pngs(tmp_path / "samples2", 2)
    pipe = StableDiffusionGLIGENTextImagePipeline.from_pretrained(tmp_path / "pipe")

    def pipeline(imgs):
        out = pipe("shapes", gligen_phrases=phrases, gligen_images=imgs, gligen_boxes=boxes, num_inference_steps=6,
                   guidance_scale=7.5, num_images_per_prompt=2, generator=torch.Generator().manual_seed(7),
                   output_type="np").images
        return pixels(out)

    theirs = pipeline([refs[0], None, refs[1]])
    assert np.array_equal(ours, theirs)  # the same pixels
    assert np.abs(ours - pipeline([refs[1], None, refs[0]])).max() > 10  # and the reference images count
    assert_same_tensors(tg.load_adapters(str(tmp_path / "pipe")), sd)
    assert torch.equal(tg.load_image_project(str(tmp_path / "pipe")), weight)
    # and it starts a text-image run (--init_from), bit for bit (one step at lr 0), with its image_project checked
    tg.main(train_cfg(tiny_sd, tiny_data, tmp_path / "init", image_features=str(tiny_features),
                      init_from=str(tmp_path / "pipe"), max_steps=1, lr=0.0))
    assert_same_tensors(adapters_of(tmp_path / "init"), sd)


def test_video_sampling_gives_each_frame_its_boxes(tiny_video):
    """generate_video hands each frame its own boxes (frame-minor rows, as the UNet groups them) and null grounding to
    the unconditional half; a layout's boxes are one list for all frames, or one list per frame."""
    from diffusers import AutoencoderKL, DDIMScheduler

    stages = tg.choose_stages("video")
    unet, te, tok, _ = stages.load(str(tiny_video), "cpu", torch.float32)
    stages.add_adapters(unet)
    seen = []
    unet.position_net.register_forward_pre_hook(lambda m, args, kw: seen.append((kw["boxes"], kw["masks"])),
                                                with_kwargs=True)
    F_, per_frame = 3, [[[0.1 * f, 0.2, 0.1 * f + 0.3, 0.6]] for f in range(3)]
    draw = partial(stages.generate, unet, AutoencoderKL.from_pretrained(tiny_video, subfolder="vae"), te, tok,
                   DDIMScheduler.from_pretrained(tiny_video, subfolder="scheduler"), seeds=[0], n=2, steps=1, frames=F_)
    clips = draw([dict(prompt="a red square", phrases=["a red square"], boxes=per_frame)])
    assert clips.shape == (2, F_, 16, 16, 3)
    boxes, masks = seen[0]  # rows: (uncond, cond) x 2 clips x F frames
    assert masks[:2 * F_].sum() == 0 and masks[2 * F_:, 0].tolist() == [1.0] * 2 * F_
    assert torch.allclose(boxes[2 * F_:, 0], torch.tensor([per_frame[f][0] for _ in range(2) for f in range(F_)]))
    draw([dict(prompt="a red square", phrases=["a red square"], boxes=per_frame[0])])  # still: every frame the same
    assert torch.equal(seen[-1][0][2 * F_:, 0], torch.tensor([per_frame[0][0]] * 2 * F_))


@pytest.mark.parametrize("family", ["sd2", "sdxl", "video", "inpaint", "text_image", "sd3", "flux"])
def test_sample_py_draws_every_family_and_mode(family, request, tiny_sd, tiny_clip, tmp_path):
    """sample.py on adapters of each family and mode: SD2 and SDXL images; video clips (PNG frames and GIFs, boxes
    moving); inpainting keeps a photo (and asks for one); text-image boxes by phrase, image or both (and a box needs
    one); SD3 and Flux images (their flow scheduler by default). Each also writes a copy with the boxes drawn on. In
    bf16 and fp16 (SDXL's VAE in fp32) the images are close to fp32's: mean level differences under 8 and 2 (bf16
    keeps 8 bits of mantissa, fp16 11)."""
    import sample

    fixture, mode = VARIANTS[family]
    model = request.getfixturevalue(fixture)
    stages = tg.choose_stages(tg.family_of(str(model)), "inpaint" in mode, "image_features" in mode)
    random_adapters_of(stages, stages.load(str(model), "cpu", torch.float32)[0], 5, tmp_path / "run", gate=0.3,
                       noise=0.05, image_encoder=str(tiny_clip))  # mild: strong random ones amplify rounding
    out, cfg = tmp_path / "samples", {**sample.config, "model": str(model), "adapters": str(tmp_path / "run"),
                                      "prompt": "a red square", "phrases": ["a red square"],
                                      "boxes": [[0.1, 0.2, 0.5, 0.8]], "n": 1, "steps": 2,
                                      "out_dir": str(tmp_path / "samples")}
    if family == "flux":  # Flux's transformer names no native size (its pipeline's default: 128 latents)
        cfg.update(height=16, width=16)
    if family == "video":  # the shipped layouts: 16 frames, boxes moving
        cfg.update(layouts=str(HERE / "layouts" / "video.jsonl"), frames=16)
    if family == "inpaint":
        Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "photo.png")  # cropped and resized to 16 x 16
        with pytest.raises(SystemExit, match="are inpainting adapters: give --inpaint_image"):
            sample.main(cfg)
        cfg["inpaint_image"] = str(tmp_path / "photo.png")
    if family == "text_image":
        from safetensors.torch import save_file
        from transformers import CLIPTextModelWithProjection

        weight = CLIPTextModelWithProjection.from_pretrained(tiny_clip).text_projection.weight.T.contiguous()
        save_file({"project.weight": weight}, tmp_path / "run" / "image_project.safetensors")
        Image.new("RGB", (20, 30), (40, 60, 220)).save(tmp_path / "ref.png")
        with pytest.raises(SystemExit, match="box 0 has neither a phrase nor an image"):
            sample.main({**cfg, "phrases": [None], "images": [None]})
        cfg.update(phrases=["a red square", "a blue circle", None], images=[str(tmp_path / "ref.png"), None,
                   str(tmp_path / "ref.png")], boxes=[[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9], [0.5, 0, 1, 0.4]])
    sample.main(cfg)
    if family == "video":
        assert sorted(p.name for p in (out / "001_00").iterdir()) == [f"frame_{f:03d}.png" for f in range(16)]
        with Image.open(out / "000_00_boxes.gif") as gif:
            assert gif.n_frames == 16 and gif.size == (256, 256)  # enlarged to draw the boxes readably
        with pytest.raises(SystemExit, match="16 lists of boxes for --frames=8"):
            sample.main({**cfg, "frames": 8})
    else:
        assert Image.open(out / "000_00.png").size == (16, 16) and (out / "000_00_boxes.png").is_file()
    images = lambda d: np.stack([np.asarray(Image.open(f)) for f in sorted(d.rglob("*.png")) if "boxes" not in f.name])
    for dtype in ("fp32", "bf16", "fp16"):  # one layout, 3 frames for video
        sample.main({**cfg, "layouts": "", "frames": 3, "dtype": dtype, "out_dir": str(tmp_path / dtype)})
    for dtype, levels in (("bf16", 8), ("fp16", 2)):
        assert np.abs(images(tmp_path / dtype).astype(int) - images(tmp_path / "fp32")).mean() < levels, dtype

# ---------------------------------------------------------------------------------------------------------------
# Bad input: one error line that names the setting, file and record, before anything slow
@pytest.mark.parametrize("change, message", [
    (dict(boxes=[[0.1, 0.1, 1.2, 0.5]]), "outside [0, 1]"),
    (dict(boxes=[[0.6, 0.1, 0.2, 0.5]]), "x1 < x0"),
    (dict(boxes=[[0.1, float("nan"), 0.2, 0.5]]), "NaN"),
    (dict(phrases=["a", "b"], boxes=[[0.1, 0.1, 0.2, 0.5]]), "same length"),
    (dict(width=999), "latents and boxes are of different images"),
    (dict(width=48, height=32), "or a photo turned by its EXIF orientation"),  # img_004.png is 32 x 48
    (dict(width="40"), "width and height must be positive whole numbers, got '40'"),
])
def test_bad_boxes_name_file_and_record(change, message, tiny_data, tmp_path):
    recs = [r for _, r in tg.read_jsonl(tiny_data["boxes"])]
    bad = next(i for i, r in enumerate(recs) if r["image"] == "img_004.png")
    recs[bad] = {**recs[bad], "phrases": ["a"], "boxes": [[0.1, 0.1, 0.2, 0.5]], **change}
    path = write_boxes(tmp_path / "boxes.jsonl", recs)
    with pytest.raises(SystemExit) as e:
        tg.GroundedLatents(tiny_data["latents"], path)
    assert message in str(e.value) and f"{path}:{bad + 1}" in str(e.value) and "img_004.png" in str(e.value)


def test_missing_records_and_models_are_named(tiny_sd, tiny_sdxl, tiny_data, tiny_features, tmp_path, monkeypatch,
                                              capsys):
    recs = [r for _, r in tg.read_jsonl(tiny_data["boxes"])]
    path = write_boxes(tmp_path / "boxes.jsonl", [r for r in recs if r["image"] != "img_007.jpg"])
    with pytest.raises(SystemExit, match=r"has no record for 1 of the images .*img_007\.jpg"):
        tg.GroundedLatents(tiny_data["latents"], path)
    path = write_boxes(tmp_path / "twice.jsonl", recs + [recs[3]])
    with pytest.raises(SystemExit, match=rf"twice.jsonl:{len(recs) + 1} .*a second record for this image \(the first"):
        tg.GroundedLatents(tiny_data["latents"], path)
    latents = tmp_path / "latents"  # prep_latents.py run on the folder above the images: keys with its name
    shutil.copytree(tiny_data["latents"], latents)
    index = [r for _, r in tg.read_jsonl(latents / "index.jsonl")]
    write_boxes(latents / "index.jsonl", [{**r, "key": "images/" + r["key"]} for r in index])
    with pytest.raises(SystemExit, match=r"by file name alone: was --images of prep_latents.py the folder above"):
        tg.GroundedLatents(latents, tiny_data["boxes"])
    with pytest.raises(SystemExit, match=r"holds no latents .* box image features\? Those go in --image_features"):
        tg.GroundedLatents(tiny_features, tiny_data["boxes"])
    with pytest.raises(SystemExit, match=r"holds no box image features .* latents\? Those go in --latents"):
        tg.ImageFeatureLatents(tiny_data["latents"], tiny_data["boxes"], 30, 0.01, tiny_data["latents"])
    with pytest.raises(SystemExit, match=r"holds latents of .*tiny-sd.*'s VAE \(scaling and shift factors, channels: "
                                         r"\(0.18215, 0.0, 4\)\), and .*tiny-sdxl.*'s VAE makes \(0.13025, 0.0, 4\)"):
        tg.training_data(train_cfg(tiny_sdxl, tiny_data, tmp_path / "run"))
    with pytest.raises(SystemExit, match="model directory not found: /no/such/model"):
        tg.family_of("/no/such/model")
    r = run("train_gligen.py", "--model=/no/such/model", f"--latents={tiny_data['latents']}",
            f"--boxes={tiny_data['boxes']}", "--global_batch=4", "--micro_batch=2", "--max_steps=1")  # as a user would
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == "error: model directory not found: /no/such/model"
    import prep_boxes

    monkeypatch.setattr(sys, "argv", [str(HERE / "prep_boxes.py"), "--help"])  # every setting, its default and meaning
    with pytest.raises(SystemExit) as e:
        tg.configure(prep_boxes.config, sys.argv[1:], prep_boxes.__doc__)
    assert e.value.code == 0 and "  --crowd=False  keep iscrowd annotations" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown argument '--lr_max=1'"):
        tg.configure(tg.config, ["--lr_max=1"])
    with pytest.raises(SystemExit, match="--lr=fast: not a Python literal"):
        tg.configure(tg.config, ["--lr=fast"])
    with pytest.raises(SystemExit, match="--max_steps=True: expected int"):  # True is an int to Python
        tg.configure(tg.config, ["--max_steps=True"])


THIRTY_ONE = dict(phrases=[f"thing {i}" for i in range(31)], boxes=[[0.1, 0.1, 0.2, 0.2]] * 31)
LAYOUT_LINE = json.dumps(dict(prompt="many things", **THIRTY_ONE))


@pytest.mark.parametrize("script, change, message", [  # "@text": the path of a file holding text
    ("train_gligen", dict(micro_batch=0), "--micro_batch=0: must be at least 1"),
    ("train_gligen", dict(save_every=0), "--save_every=0: must be at least 1"),
    ("train_gligen", dict(log_every=0), "--log_every=0: must be at least 1"),
    ("train_gligen", dict(seed=-1), "--seed=-1: must be at least 0"),
    ("train_gligen", dict(grounding_drop=1.5), "--grounding_drop=1.5: must be in [0, 1]"),
    ("train_gligen", dict(timestep_power=0.0), "--timestep_power=0.0: must be above 0"),
    ("train_gligen", dict(box_attn_loss=-1.0), "--box_attn_loss=-1.0: must be at least 0"),
    ("train_gligen", dict(grad_clip=0.0), "--grad_clip=0.0: must be above 0"),
    ("train_gligen", dict(dtype="fp16"), "--dtype=fp16: must be auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32"),
    ("train_gligen", dict(compile="no_such_backend"), "--compile=no_such_backend: not a torch.compile backend"),
    ("train_gligen", dict(init_from="./no/such/adapters"), "--init_from=./no/such/adapters: adapters not found"),
    ("train_gligen", dict(out_dir="@a file"), "is a file, not a directory"),
    ("train_gligen", dict(val_layouts="no/such/layouts.jsonl"), "file not found: no/such/layouts.jsonl"),
    ("train_gligen", dict(val_layouts="@" + LAYOUT_LINE),
     "val_layouts:1: 31 phrases and boxes; a layout has at most 30"),
    ("train_gligen", dict(val_layouts="@\n"), "no layouts in it"),
    ("train_gligen", dict(val_layouts='@["a dog", [0, 0, 1, 1]]'),
     "val_layouts:1: a record is a JSON object {...}, this line is a list"),
    ("train_gligen", dict(val_layouts='@{"prompt": "a", "phrases": [null], "boxes": [[0, 0, 1, 1]], '
                                      '"images": ["a.png"]}'),
     "val_layouts:1: phrase None is not a non-empty string"),  # reference images are for sample.py
    ("train_gligen", dict(model="@{}"), "is a file: give the model's diffusers directory"),
    ("train_gligen", dict(val_layouts='@{"prompt": "a", "phrase": ["a dog"], "boxes": [[0, 0, 1, 1]]}'),
     "val_layouts:1: unknown key 'phrase' (did you mean 'phrases'?)"),
    ("sample", dict(phrases=["a dog"], boxes=[[0.5, 0.5, 0.4, 0.9]]),
     "--prompt/--phrases/--boxes: box [0.5, 0.5, 0.4, 0.9] for 'a dog' has x1 < x0"),
    ("sample", dict(n=0), "--n=0: must be at least 1"),
    ("sample", dict(steps=0), "--steps=0: must be at least 1"),
    ("sample", dict(beta=1.5), "--beta=1.5: must be in [0, 1]"),
    ("sample", dict(frames=0), "--frames=0: must be at least 1"),
    ("sample", THIRTY_ONE, "--prompt/--phrases/--boxes: 31 phrases and boxes; a layout has at most 30"),
    ("sample", dict(layouts="@"), "no layouts in it"),
    ("sample", dict(layouts='@"a dog in a box"'), "layouts:1: a record is a JSON object {...}, this line is a str"),
    ("sample", dict(layouts='@{"prompt": "a", "phrases": [], "boxes": []}\n{"prompt": "b", "phrases": [], "box": []}'),
     "layouts:2: unknown key 'box' (did you mean 'boxes'?)"),
    ("sample", dict(phrases=["a dog"], images=["@not an image"]), "images is not a readable image"),
    ("sample", dict(adapters="./some/local/dir"), "adapters not found: ./some/local/dir"),
    ("sample", dict(adapters="out/run/adapters.safetensors"), "adapters not found: out/run/adapters.safetensors"),
    ("sample", dict(adapters="@not safetensors"), "not a readable safetensors file"),
    ("sample", dict(export="pipeline"), "--export needs --adapters"),
    ("sample", dict(inpaint_image="photo.png"), "--inpaint_image needs inpainting adapters"),
    ("sample", dict(out_dir="@a file"), "is a file, not a directory"),
    ("sample", dict(steps=1001), "--steps=1001: at most 1000, the scheduler's timesteps"),
    ("prep_latents", dict(resolution=12), "--resolution=12: must be a multiple of 8"),
    ("prep_latents", dict(batch_size=0), "--batch_size=0: must be at least 1"),
    ("prep_latents", dict(images="@a file"), "a file, not a folder of images"),
    ("prep_boxes", dict(nms=1.5), "--nms=1.5: must be in [0, 1]"),
    ("prep_boxes", dict(images="photos"), "--images, --tars and --phrases are for detection: add --detector"),
    ("score_grounding", dict(n=0), "--n=0: must be at least 1"),
])
def test_bad_settings_stop_with_one_error_line(script, change, message, tiny_sd, tiny_data, tmp_path):
    """A setting that cannot work, a path that is not there or a file that is not what it should be stops with one
    error line naming it, before any weights load: the model here is a directory of its configs alone."""
    import importlib

    module = importlib.import_module(script)
    model = tmp_path / "configs-only"
    for part in ("unet", "vae", "scheduler"):
        (model / part).mkdir(parents=True)
        shutil.copy(next((tiny_sd / part).glob("*config.json")), model / part)

    def files(key, v):  # "@text" -> the path of a file named after the setting that holds text
        if isinstance(v, list):
            return [files(key, x) for x in v]
        if isinstance(v, str) and v.startswith("@"):
            path = tmp_path / (key + (".safetensors" if key == "adapters" else ""))  # as adapters are named
            path.write_text(v[1:])
            return str(path)
        return v

    cfg = {**module.config, "model": str(model)}
    if script == "train_gligen":
        cfg.update(latents=str(tiny_data["latents"]), boxes=str(tiny_data["boxes"]), out_dir=str(tmp_path / "run"),
                   global_batch=4, micro_batch=2, num_workers=0)
    cfg.update({k: files(k, v) for k, v in change.items()})
    with pytest.raises(SystemExit) as e:
        module.main(cfg)
    assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_truncated_latent_shard_is_named_before_training(tiny_data, tmp_path):
    """A shard cut short on disk (a copy that stopped) is named with the way to mend it, when the data is read."""
    shutil.copytree(tiny_data["latents"], tmp_path / "latents")
    shard = sorted((tmp_path / "latents").glob("*.npy"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(SystemExit, match=rf"{shard}: it is unreadable .* run the same prep_latents.py command again"):
        tg.GroundedLatents(tmp_path / "latents", tiny_data["boxes"])


def test_sizes_and_steps_must_fit_the_model(tiny_sd, tiny_data, tmp_path):
    import sample

    with pytest.raises(SystemExit, match=r"--height=13: must be a multiple of 2, the VAE's"):  # the tiny VAE: 2 levels
        sample.main({**sample.config, "model": str(tiny_sd), "height": 13, "out_dir": str(tmp_path)})
    with pytest.raises(SystemExit, match=r"--steps=1001: at most 1000, the scheduler's timesteps"):
        sample.main({**sample.config, "model": str(tiny_sd), "steps": 1001, "out_dir": str(tmp_path)})
    with pytest.raises(SystemExit, match=r"--val_steps=1001: at most 1000, the scheduler's timesteps"):
        tg.main(train_cfg(tiny_sd, tiny_data, tmp_path / "run", val_every=1, val_steps=1001))


def test_resume_of_a_checkpoint_older_than_a_setting_names_it(tiny_sd, tiny_data, tmp_path):
    """A checkpoint written before a setting existed (its config lacks the key) is taken to have that setting's old
    default; resumed with the setting on, the run stops with one line naming it (it raised a KeyError)."""
    out = tmp_path / "run"
    tg.main(train_cfg(tiny_sd, tiny_data, out, max_steps=1))
    state_path = tg.checkpoints(out)[-1] / "state.pt"
    state = torch.load(state_path, weights_only=True)
    del state["config"]["inpaint"]
    torch.save(state, state_path)
    manifest = json.loads((state_path.parent / "manifest.json").read_text())  # the checkpoint stays verified
    manifest["state.pt"] = dict(bytes=state_path.stat().st_size, sha256=tg.sha256(state_path))
    (state_path.parent / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match=r"^error: .* was trained with inpaint=False, this run has inpaint=True"):
        tg.main(train_cfg(tiny_sd, tiny_data, out, max_steps=2, inpaint=True))

# ---------------------------------------------------------------------------------------------------------------
# Faults: preemption, kills, elastic restarts, corrupt checkpoints, NaN batches, a full disk, mismatched
# resumes, errors. Every recovery ends where an uninterrupted run ends, bit for bit.
def test_kill_9_in_the_middle_of_a_save(tiny_sd, tiny_data, reference, tmp_path):
    out = tmp_path / "run"
    # the real trainer, with torch.save writing half of the second checkpoint's state.pt and then SIGKILLing itself
    (tmp_path / "dies_while_saving.py").write_text(
        "import os, signal, sys, torch\n"
        "import train_gligen as tg\n"
        "real_save = torch.save\n"
        "def save(obj, path, *args, **kwargs):\n"
        "    if 'step_0000010' in str(path):\n"
        "        open(path, 'wb').write(b'half a file')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real_save(obj, path, *args, **kwargs)\n"
        "torch.save = save\n"
        "tg.main(tg.configure(tg.config, sys.argv[1:]))\n")
    r = run(tmp_path / "dies_while_saving.py", *fault_args(tiny_sd, tiny_data, out), PYTHONPATH=str(HERE), **ONE_THREAD)
    assert r.returncode == -signal.SIGKILL
    assert [p.name for p in tg.checkpoints(out)] == ["step_0000005"] and (out / "step_0000010.tmp").is_dir()
    assert [r["step"] for _, r in tg.read_jsonl(out / "log.jsonl")] == list(range(1, 11))  # logged past the save
    r = run("train_gligen.py", *fault_args(tiny_sd, tiny_data, out), **ONE_THREAD)  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {out / 'step_0000005'}" in r.stdout
    assert_same_tensors(adapters_of(out), reference)
    assert not list(out.glob("*.tmp")) and [p.name for p in tg.checkpoints(out)] == ["step_0000015", "step_0000020"]
    assert [r["step"] for _, r in tg.read_jsonl(out / "log.jsonl")] == list(range(1, 21))  # steps 6 to 10 once


def test_sigterm_saves_at_a_step_boundary_and_a_restart_ends_equal(tiny_sd, tiny_data, reference, tmp_path, torchrun):
    out = tmp_path / "run"
    p = torchrun("--nproc_per_node=2", str(HERE / "train_gligen.py"), *fault_args(tiny_sd, tiny_data, out))
    wait_for(lambda: (out / "log.jsonl").exists() and len((out / "log.jsonl").read_text().splitlines()) >= 3)
    workers = sorted(int(pid) for pid in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split())
    os.kill(workers[1], signal.SIGTERM)  # to one worker only: the ranks must still agree on the step to stop at
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-3000:]
    saved = tg.checkpoints(out)[-1]
    step = int(saved.name.split("_")[1])
    assert 3 <= step < 20 and tg.verify_checkpoint(saved) is None
    said = sorted(line.split(": ", 2)[1] for line in stdout.splitlines() if line.startswith("rank "))
    assert said == ["SIGTERM", "another rank got a signal"], stdout[-3000:]  # both ranks stopped, with a message,
    assert stdout.count(f"stopped at step {step}, saved {saved}") == 2  # at the same step
    r = run("train_gligen.py", *fault_args(tiny_sd, tiny_data, out), **ONE_THREAD)  # now one process, same batch
    assert r.returncode == 0 and f"resuming from {saved}" in r.stdout, r.stderr[-3000:]
    assert_same_tensors(adapters_of(out), reference)


def test_elastic_restart_after_a_worker_dies(tiny_sd, tiny_data, reference, tmp_path, torchrun):
    out = tmp_path / "run"
    p = torchrun("--nproc_per_node=2", "--max-restarts=1", str(HERE / "train_gligen.py"),
                 *fault_args(tiny_sd, tiny_data, out))
    wait_for(lambda: tg.checkpoints(out))
    workers = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)  # a worker dies; torchrun restarts both, which resume
    stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, stderr[-3000:]
    assert stdout.count("resuming from") == 1, stdout[-3000:]
    assert_same_tensors(adapters_of(out), reference)


def test_corrupt_and_truncated_checkpoints_fall_back(tiny_sd, tiny_data, reference, tmp_path):
    out = tmp_path / "run"
    r = run("train_gligen.py", *fault_args(tiny_sd, tiny_data, out, "--max_steps=15", "--keep_last=3"), **ONE_THREAD)
    assert r.returncode == 0
    assert [p.name for p in tg.checkpoints(out)] == ["step_0000005", "step_0000010", "step_0000015"]
    with open(out / "step_0000015" / "adapters.safetensors", "r+b") as f:  # flip bytes inside the newest
        f.seek(5000)
        f.write(b"\xff" * 16)
    with open(out / "step_0000010" / "state.pt", "r+b") as f:  # cut the one before short
        f.truncate(100)
    r = run("train_gligen.py", *fault_args(tiny_sd, tiny_data, out), **ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step_0000015 is unusable: adapters.safetensors does not match its sha256 (corrupted)" in r.stderr
    assert "step_0000010 is unusable: state.pt has 100 bytes" in r.stderr
    assert f"resuming from {out / 'step_0000005'}" in r.stdout
    assert (out / "step_0000015.corrupt").is_dir() and (out / "step_0000010.corrupt").is_dir()
    assert_same_tensors(adapters_of(out), reference)


def test_nan_batch_is_skipped_and_counted(tiny_sd, tiny_data, tmp_path):
    from diffusers import UNet2DConditionModel

    keys = [r["key"] for _, r in tg.read_jsonl(tiny_data["latents"] / "index.jsonl")]
    latents = nan_latents(tiny_data, tmp_path, {"img_004.png"})
    # the steps whose batch holds the bad image, from the same data order the trainer uses
    batches = tg.rank_batches(12, 4, 2, 1, 0, 0, 0)
    bad = {step + 1 for step in range(8) for _ in range(2) if keys.index("img_004.png") in dict(next(batches))}
    for dtype in ("bf16", "fp32"):  # bf16 (CUDA's precision) skips the same steps
        tg.main({**train_cfg(tiny_sd, tiny_data, tmp_path / dtype, max_steps=8, dtype=dtype), "latents": str(latents)})
        log = [r for _, r in tg.read_jsonl(tmp_path / dtype / "log.jsonl")]
        assert bad and {r["step"] for r in log if r["skipped"]} == bad and all(r["skipped"] <= 1 for r in log)
        assert all(np.isfinite(r["loss"]) for r in log)
    torch.manual_seed(0)
    fresh = tg.adapter_state(tg.inject_gligen(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")))
    trained = adapters_of(tmp_path / "fp32")
    k = next(iter(fresh))
    assert all(torch.isfinite(v).all() for v in trained.values()) and not torch.equal(trained[k], fresh[k])

    # every batch bad: a few in a row stop the run, and nothing is saved
    latents = nan_latents(tiny_data, tmp_path / "all", set(keys))
    with pytest.raises(SystemExit, match="3 steps in a row had a NaN or Inf loss or gradient"):
        tg.main(train_cfg(tiny_sd, {**tiny_data, "latents": latents}, tmp_path / "all" / "run", max_steps=8,
                          save_every=100, max_bad_steps=3))
    assert not tg.checkpoints(tmp_path / "all" / "run")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_sd, tiny_data, tmp_path, monkeypatch):
    real = tg.save_file

    def disk_full(tensors, path, metadata=None):
        if "step_0000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(tg, "save_file", disk_full)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        tg.main(train_cfg(tiny_sd, tiny_data, out, max_steps=6, save_every=2))
    assert f"could not write checkpoint {out / 'step_0000004'}: No space left on device" in str(e.value)
    assert f"The previous checkpoint {out / 'step_0000002'} is intact" in str(e.value)
    assert [p.name for p in tg.checkpoints(out)] == ["step_0000002"] and not list(out.glob("*.tmp"))
    assert tg.verify_checkpoint(out / "step_0000002") is None


def test_resume_with_another_setup_names_the_setting(tiny_sd, tiny_sd2, tiny_data, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "run"
    tg.main(train_cfg(tiny_sd, tiny_data, out, max_steps=2))
    tg.main(train_cfg(tiny_sd, tiny_data, out, max_steps=2))  # run again when done: says so
    assert f"note: {out / 'step_0000002'} is at step 2, and --max_steps=2: nothing to train" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=rf"was trained with model='{tiny_sd}', this run has model='{tiny_sd2}'"):
        tg.main(train_cfg(tiny_sd2, tiny_data, out, max_steps=4))
    latents = tmp_path / "latents"
    shutil.copytree(tiny_data["latents"], latents)
    meta = json.loads((latents / "meta.json").read_text())
    (latents / "meta.json").write_text(json.dumps({**meta, "resolution": 32}))
    with pytest.raises(SystemExit, match="was trained with resolution=16, this run has resolution=32"):
        tg.main({**train_cfg(tiny_sd, tiny_data, out, max_steps=4), "latents": str(latents)})
    with pytest.raises(SystemExit, match="was trained with global_batch=4, this run has global_batch=8"):
        tg.main(train_cfg(tiny_sd, tiny_data, out, max_steps=4, global_batch=8))
    # adapters of another shape: refused whole, nothing half-loaded
    unet = tg.inject_gligen(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"))
    before = {k: v.clone() for k, v in tg.adapter_state(unet).items()}
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    wider = tg.inject_gligen(UNet2DConditionModel.from_config({**base.config, "cross_attention_dim": 48}))
    with pytest.raises(SystemExit, match=r"fuser\.linear\.weight has shape \(32, 48\), this UNet needs \(32, 32\)"):
        tg.set_adapters(unet, tg.adapter_state(wider), "wider")
    text_image = tg.inject_gligen(copy.deepcopy(base), position_net=tg.PositionNetTextImage)
    with pytest.raises(SystemExit, match=r"^error: ti: adapters do not fit this UNet \(text-image adapters, and "
                                         r"this run is text-box\): 7 missing"):
        tg.set_adapters(unet, tg.adapter_state(text_image), "ti")
    sdxl_like = {k.replace("down_blocks.1", "down_blocks.3"): v for k, v in tg.adapter_state(unet).items()}
    sdxl_like["mid_block.attentions.0.transformer_blocks.1.fuser.alpha_attn"] = torch.zeros(())
    with pytest.raises(SystemExit, match=r"\(8 fusers, and this UNet has 7 transformer blocks: another model's\?\)"):
        tg.set_adapters(unet, sdxl_like, "sdxl")
    assert_same_tensors(tg.adapter_state(unet), before)


@pytest.mark.parametrize("where", ["step", "worker"])
def test_an_error_in_the_loop_ends_the_run(where, tiny_sd, tiny_data, tmp_path):
    """An exception in a training step (a CUDA out-of-memory, say) or in a loader worker ends the process with the
    traceback: the workers ignore SIGTERM (it is for the main process, which saves), so the interpreter's exit could
    not stop them and the process hung until killed."""
    broken = dict(step="tg.optimizer_step = fails", worker="tg.GroundedLatents.collate = fails")[where]
    (tmp_path / "fails.py").write_text(
        "import sys\n"
        "import train_gligen as tg\n"
        "def fails(*args):\n"
        "    raise RuntimeError('out of memory (simulated)')\n"
        f"{broken}\n"
        "tg.cli()\n")
    args = fault_args(tiny_sd, tiny_data, tmp_path / "run", "--num_workers=1", "--max_steps=2")
    r = run(tmp_path / "fails.py", *args, PYTHONPATH=str(HERE), timeout=60)
    assert r.returncode == 1 and "RuntimeError: out of memory (simulated)" in r.stderr, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# Extras: the grounding metric for real models (score_grounding.py), the shapes demo, the benchmark
def test_ap_and_mean_iou_on_known_detections():
    import score_grounding as sg

    box = [0.1, 0.1, 0.5, 0.5]
    shifted = [0.1, 0.1, 0.5, 0.5 * 0.62 + 0.1 * 0.38]  # IoU 0.62 with box
    assert abs(sg.iou(box, shifted) - 0.62) < 1e-9
    layouts = [(["a dog"], [box])]
    perfect = sg.scores(layouts, [[("a dog", 0.9, box)]])
    assert (perfect["AP"], perfect["AP50"], perfect["mean_iou"]) == (1.0, 1.0, 1.0)
    loose = sg.scores(layouts, [[("a dog", 0.9, shifted)]])  # a hit at IoU 0.5, 0.55, 0.6; a miss above
    assert (round(loose["AP"], 6), loose["AP50"], round(loose["mean_iou"], 6)) == (0.3, 1.0, 0.62)
    # a false positive scored above the true box: precision 1/2 at every recall
    fp = sg.scores(layouts, [[("a dog", 0.9, [0.6, 0.6, 0.9, 0.9]), ("a dog", 0.8, box)]])
    assert (fp["AP50"], fp["mean_iou"]) == (0.5, 1.0)
    assert sg.scores(layouts, [[("a cat", 0.9, box)]])["AP"] == 0.0  # another phrase's box counts for nothing
    two = sg.scores([(["a dog", "a cat"], [box, [0.6, 0.6, 0.9, 0.9]])], [[("a dog", 0.9, box)]])
    assert (two["AP50"], two["mean_iou"], two["classes"]) == (0.5, 0.5, 2)  # averaged over phrases


def test_score_grounding_runs_a_detector_from_a_directory(tmp_path):
    detector = make_tiny_grounding_dino(tmp_path / "detector")
    layouts = [dict(prompt="a red square", phrases=["a red square"], boxes=[[0.1, 0.2, 0.6, 0.7]]),
               dict(prompt="a red square and a blue circle", phrases=["a red square", "a blue circle"],
                    boxes=[[0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0]])]
    (tmp_path / "layouts.jsonl").write_text("".join(json.dumps(l) + "\n" for l in layouts))
    (tmp_path / "samples").mkdir()
    for k in range(2):
        for i in range(2):
            Image.fromarray(np.random.default_rng(k * 2 + i).integers(0, 255, (48, 64, 3), np.uint8)).save(
                tmp_path / "samples" / f"{k:03d}_{i:02d}.png")
    r = run("extras/score_grounding.py", f"--layouts={tmp_path / 'layouts.jsonl'}", f"--images={tmp_path / 'samples'}",
            "--n=2", f"--detector={detector}", "--threshold=0.0")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "samples" / "scores.json").read_text())
    assert (out["images"], out["boxes"], out["classes"]) == (4, 6, 2) and "AP50" in r.stdout
    assert all(0 <= out[k] <= 1 for k in ("AP", "AP50", "mean_iou"))
    found = out["detections"][2]["found"]  # layout 1, image 0: 8 queries for each of its two phrases
    assert sorted({p for p, _, _ in found}) == ["a blue circle", "a red square"] and len(found) == 16
    assert all(0 <= v <= 1 for _, _, b in found for v in b)
    r = run("extras/score_grounding.py", f"--layouts={tmp_path / 'layouts.jsonl'}", f"--images={tmp_path / 'samples'}",
            "--n=3", f"--detector={detector}")
    assert r.returncode == 1 and "2 images missing, e.g." in r.stderr and "000_02.png" in r.stderr


def test_onset_is_the_first_of_two_validations_over_3_standard_errors():
    """time_to_grounding.py's onset (docs/time-to-grounding.md): read on its grid of steps; one validation above 3
    standard errors is not enough, the next must be above too; a gap of exactly 3 is not above."""
    import time_to_grounding as ttg

    v = lambda step, gap, se=1.0: dict(step=step, gap=gap, se=se)  # noqa: E731
    vals = [v(0, 0, 0), v(250, 5), v(500, 2), v(750, 4), v(1000, 3.5), v(1250, 3), v(1500, 9), v(1750, 8)]
    assert ttg.onset(vals, 250) == 750 and ttg.onset(vals, 500) == 1000
    assert ttg.onset(vals[:6], 500) is None and ttg.onset([v(0, 0, 0)], 250) is None  # 1,000 is above; no next
    assert ttg.onset([v(250, 4), v(500, 3), v(750, 4), v(1000, 5)], 250) == 750


def test_curves_draw_each_runs_gap_in_its_seeds_panel(tmp_path):
    """time_to_grounding.py --plot (docs/time_to_grounding.png): finished runs' logs, a panel per seed, a line per
    run in its label's colour; a directory that is not a finished run is named."""
    import time_to_grounding as ttg

    for name, seed, train, gaps in (("a", 0, "", [0, 0, 0.1]), ("b", 0, "--box_attn_loss=1", [0, 0.3, 0.5]),
                                    ("c", 1, "--box_attn_loss=1", [0, 0.2, 0.4])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "lever.json").write_text(json.dumps(dict(seed=seed, train=train)))
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(dict(
            step=500 * i, val_loss_boxes=0.2, val_loss_mirrored=0.2 + g, val_gap_se=0.01, val_gap_high_noise=g))
            + "\n"
            for i, g in enumerate(gaps)))
    ttg.main({**ttg.config, "plot": ",".join(str(tmp_path / n) for n in "abc"), "out": str(tmp_path / "fig")})
    im = np.asarray(Image.open(tmp_path / "fig" / "curves.png").convert("RGB")).astype(int)
    assert im.shape[1] == 2 * 420  # two seeds, two panels
    red = (np.abs(im - [0xD6, 0x27, 0x28]).sum(-1) < 30)  # the attention loss's colour, the second label
    panel_rows = slice(0, 300)
    assert red[panel_rows, :420].sum() > 50 and red[panel_rows, 420:].sum() > 50  # its line in both panels
    black = (im[panel_rows, 420:].sum(-1) < 30)  # seed 1 has no GLIGEN run: no black line there, only text
    assert black.sum() < red[panel_rows, 420:].sum()
    with pytest.raises(SystemExit, match="no lever.json"):
        ttg.main({**ttg.config, "plot": str(tmp_path), "out": str(tmp_path / "fig")})
    (tmp_path / "c" / "log.jsonl").write_text(json.dumps(dict(step=0, loss=0.2)) + "\n")  # no validation logged
    with pytest.raises(SystemExit, match="c/log.jsonl has no validation"):
        ttg.main({**ttg.config, "plot": str(tmp_path / "c"), "out": str(tmp_path / "fig")})


def test_shapes_world_metric_and_tokenizer(tmp_path):
    import demo_shapes as ds

    layouts = ds.test_layouts(60, np.random.default_rng(5))
    truth, chance = [], []
    for k, lay in enumerate(layouts):  # the requested scene drawn exactly, and another layout's scene
        for target, into in ((truth, lay), (chance, layouts[(k + 1) % len(layouts)])):
            im = ds.render(into["phrases"], [[v * ds.SIZE for v in b] for b in into["boxes"]])
            target += [ds.iou(ds.find_color(im, p.split()[0]), b) for p, b in zip(lay["phrases"], lay["boxes"])]
    assert min(truth) > 0.6 and np.mean(truth) > 0.9  # the metric finds what was drawn
    assert np.mean(chance) < 0.15  # and chance stays low
    tok = ds.write_tokenizer(tmp_path / "tok")
    caption = "a yellow triangle and a green square and a blue circle"
    assert tok.convert_ids_to_tokens(tok(caption).input_ids)[1:-1] == [w + "</w>" for w in caption.split()]
    # captions that say where (the grounding recipe's base): a 3 x 3 grid of places, every word one token
    boxes = [[0, 0, 10, 10], [12, 0, 22, 10], [22, 22, 32, 32], [0, 12, 10, 22], [11, 11, 21, 21], [20, 7, 30, 17]]
    caption = ds.caption(["red circle"] * 6, boxes)
    assert caption == ("a red circle at the top left and a red circle at the top and a red circle at the bottom "
                       "right and a red circle at the left and a red circle in the center and a red circle at the "
                       "right")
    tok = ds.write_tokenizer(tmp_path / "tok_places", ds.WORDS_WITH_PLACES, 32)
    assert tok.convert_ids_to_tokens(tok(caption).input_ids)[1:-1] == [w + "</w>" for w in caption.split()]


def test_shapes_demo_runs_end_to_end_at_tiny_scale(tmp_path, monkeypatch):
    """The demo's whole path with --train_base=True (world, base model with its where-am-I heads, prep, train_gligen,
    sample, metric, picture) at a few steps each, with captions that say where; then --keypoints=True and
    --maps=True. The scripts
    run in this process with the arguments the demo gives them (the demo starts each as a process: 6 imports of
    torch, about 20 s here)."""
    import importlib

    import demo_shapes as ds

    def in_process(script, *args):
        module = importlib.import_module(Path(script).stem)
        module.main(tg.configure(module.config, list(args)))

    monkeypatch.setattr(ds, "run", in_process)

    out = tmp_path / "demo"
    cfg = {**ds.config, "out": str(out), "train_images": 40, "test_layouts": 3, "check_layouts": 2, "vae_steps": 2,
           "base_steps": 2, "gligen_steps": 2, "sample_steps": 2, "positions": 0.5, "train_base": True}
    result = ds.main(cfg)
    captions = [c["caption"] for c in json.loads((out / "world" / "captions.json").read_text())["annotations"]]
    said = [c for c in captions if " at the " in c or " in the center" in c]
    assert 0 < len(said) < len(captions)  # about half say where; held-out prompts never do
    assert not any(" the " in r["prompt"] for _, r in tg.read_jsonl(out / "test_layouts.jsonl"))
    scheduler = json.loads((out / "base-model" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert json.loads((out / "base-model" / "settings.json").read_text()) == {k: cfg[k] for k in ds.BASE_SETTINGS}
    assert result["fusers off equals base model (2 layouts)"] is True
    assert len(list((out / "samples" / "fusers-off").glob("*_00.png"))) == 2
    loss = result["training loss with"]  # the trainer's box-use losses at its last validation, the last step
    assert loss["step"] == 2 and set(loss) == {"step", "val_loss_boxes", "val_loss_mirrored", "val_loss_no_grounding"}
    assert all(np.isfinite(list(loss.values())))
    for name in ("base model", "adapters, beta=1"):
        assert result[name]["objects"] == sum(len(l["phrases"]) for l in ds.test_layouts(3, np.random.default_rng(1)))
    assert (out / "result.png").is_file() and json.loads((out / "results.json").read_text()) == result
    ckpt = tg.checkpoints(out / "gligen")[-1]  # the demo's GLIGEN settings reached the trainer
    trained = torch.load(ckpt / "state.pt", weights_only=True)["config"]
    assert (trained["caption_keep"], trained["lr"], trained["max_steps"], trained["box_attn_loss"]) == \
           (cfg["gligen_caption_keep"], cfg["gligen_lr"], cfg["gligen_steps"], cfg["gligen_box_attn_loss"])

    # --keypoints=True on the shipped base: each shape a person placed by its box's corners and centre
    kp = ds.main({**cfg, "out": str(tmp_path / "kp"), "train_base": False, "positions": 0.0, "keypoints": True})
    assert kp["fusers off equals base model (2 layouts)"] is True and kp["base model"]["objects"] == 3
    recs = [r for _, r in tg.read_jsonl(tmp_path / "kp" / "data" / "boxes.jsonl") if r["boxes"]]
    (x0, y0, x1, y1), nose, eye = recs[0]["boxes"][0], *recs[0]["keypoints"][0][:2]
    assert nose == [(x0 + x1) / 2, (y0 + y1) / 2, 2] and eye == [x1, y0, 2]  # its left eye: the top right corner
    assert torch.load(tg.checkpoints(tmp_path / "kp" / "gligen")[-1] / "state.pt",
                      weights_only=True)["config"]["keypoints"]

    # --maps=True: each shape placed by its silhouette, a map of your own through prep_latents.py --map
    maps = ds.main({**cfg, "out": str(tmp_path / "maps"), "train_base": False, "positions": 0.0, "maps": True})
    assert maps["base model"]["objects"] == 3 and not any(k.startswith("fusers off") for k in maps)
    world = tmp_path / "maps" / "world"
    image, silhouette = (np.asarray(Image.open(world / d / "000000.png")) for d in ("images", "maps"))
    assert np.array_equal((image != ds.BACKGROUND).any(-1) * 255, silhouette)  # its shapes, pixel for pixel
    assert torch.load(tg.checkpoints(tmp_path / "maps" / "gligen")[-1] / "state.pt",
                      weights_only=True)["config"]["maps"] == str(tmp_path / "maps" / "data" / "maps")


def test_shapes_demo_runs_on_an_mmdit_at_tiny_scale(tmp_path, monkeypatch):
    """--family=flux: the same path on a Flux-shaped base (its autoencoder shifted and scaled, rectified flow with the
    where-am-I heads on the joint blocks' image tokens, saved as a FluxPipeline), the project's scripts on it with the
    flow sampler at 32 px; a base of another family, or captions that say where, are refused."""
    import importlib

    import demo_shapes as ds

    def in_process(script, *args):
        module = importlib.import_module(Path(script).stem)
        module.main(tg.configure(module.config, list(args)))

    monkeypatch.setattr(ds, "run", in_process)
    out = tmp_path / "demo"
    cfg = {**ds.config, "family": "flux", "out": str(out), "train_images": 40, "test_layouts": 3, "check_layouts": 2,
           "vae_steps": 2, "base_steps": 2, "gligen_steps": 2, "sample_steps": 2, "train_base": True}
    result = ds.main(cfg)
    base = out / "base-model"
    assert tg.family_of(str(base)) == "flux"
    assert json.loads((base / "settings.json").read_text()) == ds.base_settings(cfg)
    vae = json.loads((base / "vae" / "config.json").read_text())
    meta = json.loads((out / "data" / "latents" / "meta.json").read_text())
    assert vae["shift_factor"] != 0 and (meta["shift_factor"], meta["scaling_factor"]) == \
           (vae["shift_factor"], vae["scaling_factor"])
    assert meta["latent_shape"] == [4, 16, 16]  # 2 x 2 patches: 8 x 8 tokens
    assert result["fusers off equals base model (2 layouts)"] is True
    assert Image.open(out / "samples" / "base" / "000_00.png").size == (32, 32)
    loss = result["training loss with"]
    assert loss["step"] == 2 and all(np.isfinite(list(loss.values())))
    with pytest.raises(SystemExit, match="is a 'flux' base, and --family=sd3"):
        ds.main({**cfg, "family": "sd3"})
    with pytest.raises(SystemExit, match="--positions"):
        ds.main({**cfg, "positions": 0.5})


def test_shipped_shapes_base_is_what_train_base_builds(tmp_path):
    """extras/shapes_base loads as a diffusers pipeline and is, part for part, the architecture that train_base
    builds with the settings recorded beside it, which are the demo's defaults; the position code is sin/cos."""
    import demo_shapes as ds
    from diffusers import StableDiffusionPipeline

    settings = json.loads((ds.SHIPPED_BASES["sd"] / "settings.json").read_text())
    assert settings == ds.base_settings(ds.config)  # --train_base=True remakes this base
    pipe = StableDiffusionPipeline.from_pretrained(ds.SHIPPED_BASES["sd"], safety_checker=None)
    tokenizer, text_encoder, unet, noise_scheduler = ds.build_denoiser(settings, tmp_path / "tok")
    same_parts([(ds.build_vae(), pipe.vae), (text_encoder, pipe.text_encoder), (unet, pipe.unet)],
               skip=("scaling_factor",))  # set from the trained latents' spread
    assert tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    assert tokenizer.model_max_length == pipe.tokenizer.model_max_length
    assert pipe.scheduler.config.prediction_type == noise_scheduler.config.prediction_type == settings["prediction"]
    code = ds.position_code(4)  # rows then columns, token centres; sin/cos of pi*k*x, then of pi*k*y
    assert code.shape == (16, 8)
    assert torch.allclose(code[1, :2], torch.sin(torch.pi * torch.tensor([1.0, 2.0]) * 3 / 8))
    assert torch.allclose(code[4, 4:6], torch.sin(torch.pi * torch.tensor([1.0, 2.0]) * 3 / 8))


def same_parts(pairs, skip=("scaling_factor", "shift_factor")):
    """Each (built, shipped) pair: the same class, parameter shapes and config (skip: set from the trained latents;
    and what saving adds to a transformers config)."""
    ignore = {*skip, "transformers_version", "dtype", "torch_dtype", "architectures"}
    for built, shipped in pairs:
        assert type(built) is type(shipped)
        assert {k: v.shape for k, v in built.state_dict().items()} == \
               {k: v.shape for k, v in shipped.state_dict().items()}
        configs = [m.config.to_dict() if hasattr(m.config, "to_dict") else dict(m.config) for m in (built, shipped)]
        known = set(type(built.config)().to_dict()) if hasattr(built.config, "to_dict") else set(
            __import__("inspect").signature(type(built).__init__).parameters)  # what the installed version knows
        plain = [json.loads(json.dumps({k: v for k, v in c.items() if k[0] != "_" and k not in ignore and k in known},
                                       default=str)) for c in configs]  # (tuples and lists alike, as saved)
        assert plain[0] == plain[1]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_shipped_mmdit_shapes_bases_are_what_train_base_builds(tmp_path, family):
    """extras/shapes_base_sd3 and _flux load as diffusers' StableDiffusion3Pipeline and FluxPipeline and are, part for
    part, what train_base builds for the family, with the demo's settings (family aside); the trainer reads them as
    that family, its VAE shifted."""
    import demo_shapes as ds
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    base = ds.SHIPPED_BASES[family]
    assert json.loads((base / "settings.json").read_text()) == ds.base_settings({**ds.config, "family": family})
    assert tg.family_of(str(base)) == family
    pipe = (StableDiffusion3Pipeline if family == "sd3" else FluxPipeline).from_pretrained(base)
    built = (ds.build_sd3 if family == "sd3" else ds.build_flux)(tmp_path / "tok")
    parts = built.pipeline.keywords
    names = [k for k in parts if k.startswith(("text_encoder", "transformer"))]
    same_parts([(ds.build_vae(family), pipe.vae)] + [(parts[k], getattr(pipe, k)) for k in names])
    plain = lambda c: {k: v for k, v in c.items() if k[0] != "_"}
    assert plain(pipe.scheduler.config) == plain(parts["scheduler"].config)
    assert pipe.tokenizer.get_vocab() == parts["tokenizer"].get_vocab()
    assert pipe.vae.config.shift_factor != 0 and pipe.vae.config.scaling_factor != 1


def test_gpu_check_dry_run_runs_every_stage(tmp_path, monkeypatch):
    """extras/gpu_check.py, the command that measures what a GPU must show, runs every stage on tiny models on a CPU
    (--dry_run=True), so the command is checked without a GPU: speeds from train_gligen.py, a resumed run bit-equal
    to a straight one, sample.py equal to its exported pipeline, SDXL with gradient checkpointing under DDP and
    sharded with its base (one torchrun), compile, and extras/benchmark.py --what=train: the trainer's own step
    (sd_loss, optimizer_step: not a copy) against the reference recipe (IGLIGEN's: diffusers' gated UNet, fp32 +
    GradScaler, phrases encoded per image) on the same network, FLOPs within 10% (the reference's fusers also let the
    grounding tokens query, and it pads each image's phrases to their own longest), and the profile of ours, its
    shares adding up. Without a GPU and without --dry_run it stops with one line; out of time, stages are skipped."""
    import gpu_check

    with pytest.raises(SystemExit, match="^error: no GPU here"):
        gpu_check.main({**gpu_check.config, "out": str(tmp_path / "no")})
    calls = []
    for name in ("sd_loss", "optimizer_step"):  # counted where the benchmark's steps call them
        real = getattr(tg, name)
        monkeypatch.setattr(tg, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    r = gpu_check.main({**gpu_check.config, "dry_run": True, "out": str(tmp_path / "dry")})
    stages = r["stages"]
    assert list(stages) == ["build", "sd15", "resume", "sample", "benchmark", "sdxl", "sharded", "compile"]
    assert not [k for k, v in stages.items() if "error" in v or "skipped" in v], stages
    assert all(row["img_per_s"] > 0 for row in stages["sd15"]["rows"] + stages["sdxl"]["rows"] + [stages["compile"]]
               + stages["sharded"]["base_rows"]) and len(stages["sharded"]["base_rows"]) == 1
    assert stages["sharded"]["ddp_rows"] == stages["sdxl"]["rows"]
    assert stages["resume"]["bit_equal"] and stages["sample"]["max_pixel_diff"] == 0  # on a CPU in fp32: exact
    assert json.loads((tmp_path / "dry" / "results.json").read_text()) == r
    assert r["versions"]["torch"] == torch.__version__
    (row,), prof = stages["benchmark"]["results"], stages["benchmark"]["profile"]
    assert calls.count("sd_loss") >= 4 and calls.count("optimizer_step") >= 4
    assert row["ours"]["img_per_s"] > 0 and row["reference"]["img_per_s"] > 0 and row["ratio"] > 0
    assert 0.9 < row["reference"]["tflop_per_image"] / row["ours"]["tflop_per_image"] < 1.1
    shares = prof["shares"]
    assert set(shares) == {"text_encoders", "frozen_base", "optimizer", "fusers_and_rest", "attention"}
    assert 0 < shares["attention"] < 1 and 0 < shares["frozen_base"] and 0 < shares["text_encoders"] < 1
    assert abs(sum(v for k, v in shares.items() if k != "attention") - 1) < 3e-3  # the rest; 4 shares rounded to 0.001
    assert any("scaled_dot_product" in op["name"] for op in prof["top_ops"])  # SDPA, forward and backward
    r = gpu_check.main({**gpu_check.config, "dry_run": True, "budget_s": 0, "out": str(tmp_path / "late")})
    assert all("out of time" in v["skipped"] for v in r["stages"].values())


def test_model_sizes_count_the_trainers_own_adapters(capsys, tmp_path, tiny_sd3):
    """extras/model_sizes.py builds each family's full published config on the meta device, adds the adapters with the
    trainer's own stage and counts them (the MMDiTs checked inside against 16d^2 + d^2 + 15d + 2 per fuser) and their
    memory with the trainer's memory_plan. And an
    MMDiT the trainer cannot take, or a UNet scheduler asked of one, stops with one line."""
    import model_sizes
    import sample

    model_sizes.main()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| sd", "| video", "| flux"))]
    rows = [line.split(" | ")[1:5] for line in lines]
    for line in lines:  # GB a GPU: DDP > --shard > --shard --shard_base (the base's blocks found on the meta device)
        ddp, shard, base = (float(x) for x in line.rstrip(" |").split(" | ")[-3:])
        assert ddp > shard > base, line
    assert rows == [["SD1.5", "512", "16", "209M"], ["SD2.1", "768", "16", "213M"], ["SDXL", "1024", "70", "1.81B"],
                    ["ModelScope T2V", "256", "16", "213M"], ["SD3.5-medium", "1024", "24", "965M"],
                    ["SD3.5-large", "1024", "38", "3.82B"], ["FLUX.1-dev", "1024", "19", "3.05B"]]
    other = tmp_path / "pixart"
    shutil.copytree(tiny_sd3, other)
    config = json.loads((other / "transformer" / "config.json").read_text())
    pixart = {**config, "_class_name": "PixArtTransformer2DModel"}
    (other / "transformer" / "config.json").write_text(json.dumps(pixart))
    with pytest.raises(SystemExit, match="its transformer is a 'PixArtTransformer2DModel'"):
        tg.family_of(str(other))
    with pytest.raises(SystemExit, match="--scheduler=ddim: a sd3 model samples with flow_euler"):
        sample.main({**sample.config, "model": str(tiny_sd3), "scheduler": "ddim", "out_dir": str(tmp_path / "s")})

# ---------------------------------------------------------------------------------------------------------------
# The code: the house style's two measurable limits
def prose_words_per_code_line(path):
    """Words of comments and docstrings in a Python file, per line of code (not blank, comment or docstring)."""
    import tokenize

    toks = list(tokenize.generate_tokens(io.StringIO(Path(path).read_text()).readline))
    words, prose_lines, prev = 0, set(), None
    for i, t in enumerate(toks):
        if t.type == tokenize.COMMENT:
            words += len(t.string.lstrip("#").split())
        elif (t.type == tokenize.STRING and toks[i + 1].type in (tokenize.NEWLINE, tokenize.ENDMARKER)
              and prev in (None, tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE)):  # a statement of one string
            words += len(t.string.strip("\"'").split())
            prose_lines.update(range(t.start[0], t.end[0] + 1))
        if t.type not in (tokenize.COMMENT, tokenize.NL):
            prev = t.type
    lines = Path(path).read_text().splitlines()
    code = sum(1 for n, line in enumerate(lines, 1)
               if line.strip() and not line.strip().startswith("#") and n not in prose_lines)
    return words / code


def test_code_keeps_to_120_columns_and_train_gligen_to_2_words_of_prose_a_line(tmp_path):
    """No line of any .py over 120 columns; at most 2 words of comments and docstrings per code line in the trainer
    (contracts, not history: measurements go to docs/). The counter counts what it should: a file of 3 code lines
    and 12 words of prose reads 4."""
    long = [f"{p.relative_to(HERE)}:{n}" for p in [*HERE.glob("*.py"), *HERE.glob("extras/*.py")]
            for n, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 120]
    assert not long, long
    assert prose_words_per_code_line(HERE / "train_gligen.py") <= 2.0
    (tmp_path / "f.py").write_text('"""one two three."""\nx = 1  # four five\n\n\ndef f():\n    """six seven"""\n'
                                   '    # eight nine ten eleven twelve\n    return x\n')
    assert prose_words_per_code_line(tmp_path / "f.py") == 4.0


# ---------------------------------------------------------------------------------------------------------------
# The docs: every command of a project script in README.md and docs/*.md works as written
DOC_SCRIPTS = {p.relative_to(HERE).as_posix() for p in [*HERE.glob("*.py"), *HERE.glob("extras/*.py")]}
PLACEHOLDER = re.compile(r"^\.\.\.$|<[^<>]+>")  # --model=... or --out_dir=out/<run>: the text says what goes there
SEPARATORS = {"&&", "||", ";", "|", "&"}


def doc_commands(text, where):
    """The project-script commands of a markdown text's bash blocks: (file:line, script, its arguments, world size).
    Lines ending in a backslash are joined, VAR=value assignments expanded (an unset $VAR becomes a placeholder),
    and a torchrun line's world is --nnodes x --nproc_per_node, with $SLURM_NNODES from the block's #SBATCH --nodes."""
    import shlex

    commands, fence, pending, start, env = [], None, "", 0, {}
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            env.update(SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1")
            continue
        if fence not in ("bash", "sh", "shell"):
            continue
        if m := re.match(r"#SBATCH .*--nodes[= ](\d+)", line):
            env.update(SLURM_NNODES=m[1], SLURM_JOB_NUM_NODES=m[1])
        start = start or n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full, pending, first, start = pending + line, "", start, 0
        full = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], f"<{m[1]}>"), full)
        lex = shlex.shlex(full, posix=True, punctuation_chars="|&;")  # <x> is a placeholder
        lex.whitespace_split = True
        tokens, segment = list(lex) + [";"], []
        for tok in tokens:
            if tok not in SEPARATORS:
                segment.append(tok)
                continue
            while segment and re.fullmatch(r"[A-Za-z_]\w*=.*", segment[0]):  # VAR=value, alone or before a command
                key, _, value = segment.pop(0).partition("=")
                env[key] = value if not segment else env.get(key, "")
            segment = [t for t in segment if t != "..."]  # "and more settings"
            scripts = [i for i, t in enumerate(segment) if t.removeprefix("./") in DOC_SCRIPTS]
            if scripts:
                i = scripts[0]
                launcher = " ".join(segment[:i])
                world = 1
                if "torchrun" in launcher or "torch.distributed.run" in launcher:
                    get = lambda k: re.search(rf"--{k}[= ](\S+)", launcher)  # noqa: E731
                    world = int(get("nproc[_-]per[_-]node")[1]) * int((get("nnodes") or [0, "1"])[1])
                commands.append((f"{where}:{first}", segment[i].removeprefix("./"), segment[i + 1:], world))
            segment = []
    return commands


def doc_command_problem(script, args, world):
    """What is wrong with one command, or None: a --key that is not the script's setting, a value that does not parse,
    settings its own checks refuse (they load nothing), or, for the trainer, no batch plan for the world size."""
    import importlib

    if "--help" in args or "-h" in args:
        return None
    try:
        mod = importlib.import_module(Path(script).stem)
    except ImportError as e:
        return None if os.environ.get("GLIGEN_CI") != "1" else f"cannot import {script}: {e}"
    config = getattr(mod, "config", {})
    keys = [a.removeprefix("--").partition("=")[0] for a in args]
    if unknown := [k for k in keys if k not in config]:
        return f"--{unknown[0]} is not a setting of {script}"
    try:
        cfg = tg.configure(config, [a for a in args if not PLACEHOLDER.search(a.partition("=")[2])])
        getattr(mod, "check_settings", lambda cfg: None)(cfg)
        if config is tg.config:
            tg.batch_plan(cfg["global_batch"], cfg["micro_batch"], world)
    except SystemExit as e:
        return str(e)


def doc_problems(text, where):
    return [f"{w}: {script}: {problem}" for w, script, args, world in doc_commands(text, where)
            if (problem := doc_command_problem(script, args, world))]


def test_settings_page_is_what_the_scripts_config_dicts_say():
    """docs/settings.md is extras/settings_doc.py's page of every script's settings, current; and the page follows the
    code: a setting added to a config dict, with its comment, is a row of it."""
    import settings_doc

    assert (HERE / "docs" / "settings.md").read_text() == settings_doc.page(), "run: python extras/settings_doc.py"
    source = (HERE / "sample.py").read_text().replace("config = dict(\n", "config = dict(\n    knob=3,  # a knob\n", 1)
    rows = settings_doc.settings(source)
    assert rows[0] == ("knob", "3", "a knob") and rows[1:] == settings_doc.settings((HERE / "sample.py").read_text())


def test_every_command_in_readme_and_docs_works_as_written(monkeypatch, tmp_path):
    """Each command of a project script in a bash block of README.md and docs/*.md: real settings, values that parse,
    passing the script's checks, and a batch plan for the trainer's world size. Broken commands are caught."""
    monkeypatch.chdir(tmp_path)  # relative output paths land nowhere that exists
    pages = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]
    found = [c for p in pages for c in doc_commands(p.read_text(), p.relative_to(HERE))]
    assert len({c[1] for c in found}) >= 6 and any(c[3] == 8 for c in found)  # the scripts, and the 8-GPU commands
    assert [p for page in pages for p in doc_problems(page.read_text(), page.relative_to(HERE))] == []

    broken = """
```bash
RUN=out/a
python train_gligen.py --model=... --latents=<dir> --out_dir=$RUN/x  # fine
torchrun --standalone --nproc_per_node=8 train_gligen.py --model=... --global_batch=30
python prep_latents.py --resolution=100 && python sample.py --phrase=a
CUDA_VISIBLE_DEVICES=0 python sample.py --n=two
python train_gligen.py \\
    --lr=-1
```
```text
python train_gligen.py --not_checked=1
```
```bash
#SBATCH --nodes=2
srun torchrun --nnodes=$SLURM_NNODES --nproc_per_node=8 train_gligen.py --global_batch=8 --out_dir=$RUN
```
"""
    assert [c[1:] for c in doc_commands(broken, "x")][0] == ("train_gligen.py", ["--model=...", "--latents=<dir>",
                                                                                 "--out_dir=out/a/x"], 1)
    assert doc_problems(broken, "x") == [
        "x:5: train_gligen.py: error: --global_batch=30 images a step cannot be shared by 8 GPUs: use "
        "--global_batch=24 or --global_batch=32, or 6 GPUs",
        "x:6: prep_latents.py: error: --resolution=100: must be a multiple of 8 (the VAE's downsampling factor)",
        "x:6: sample.py: --phrase is not a setting of sample.py",
        "x:7: sample.py: error: --n=two: not a Python literal",
        "x:8: train_gligen.py: error: --lr=-1.0: must be at least 0",
        "x:16: train_gligen.py: error: --global_batch=8 images a step cannot be shared by 16 GPUs: use "
        "--global_batch=16, or 8 GPUs"]


def test_readme_8_gpu_coco_command_trains_under_torchrun_with_8_processes(tiny_sd, tmp_path):
    """The README's 8-GPU COCO training command, its batch settings as written, starts and trains 2 steps under
    torchrun with 8 processes (gloo, the tiny SD, 40 images): the batch plan shares 32 images a step among them."""
    import prep_boxes
    import prep_latents

    readme = (HERE / "README.md").read_text()
    coco = [c for c in doc_commands(readme, "README.md")
            if c[1] == "train_gligen.py" and c[3] == 8 and any("coco" in a for a in c[2])]
    assert coco, "no 8-GPU COCO training command in the README"
    root = make_coco(tmp_path / "coco", n=40)
    prep_boxes.main({**prep_boxes.config, "instances": str(root / "instances.json"),
                     "captions": str(root / "captions.json"), "out": str(root / "boxes.jsonl")})
    prep_latents.main({**prep_latents.config, "model": str(tiny_sd), "images": str(root / "images"),
                       "captions": str(root / "boxes.jsonl"), "out": str(root / "latents"), "resolution": 16,
                       "num_workers": 0, "flip": True})
    ours = dict(model=tiny_sd, latents=root / "latents", boxes=root / "boxes.jsonl", out_dir=tmp_path / "run")
    args = [a for a in coco[0][2] if a.removeprefix("--").partition("=")[0] not in ours]
    args += [f"--{k}={v}" for k, v in ours.items()]
    args += ["--max_steps=2", "--num_workers=0", "--val_every=0", "--log_every=1"]
    assert not any(a.startswith(("--global_batch", "--micro_batch")) for a in args)  # the defaults
    r = run("train_gligen.py", *args, torchrun=8, timeout=600, **ONE_THREAD)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "batch plan: 32 images a step = 8 processes x 1 pass x 4 images (micro_batch 8 at most)" in r.stdout
    log = [r for _, r in tg.read_jsonl(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    assert "position_net.null_position_feature" in adapters_of(tmp_path / "run")


# ---------------------------------------------------------------------------------------------------------------
# The app (extras/app.py): its layout and log reading, then the launched app through gradio_client and in a browser.
# Its packages are optional (extras/requirements.txt, and Debian's chromium for the browser): without them these
# tests skip, saying why; under CI (GLIGEN_CI=1, set by .ci/run, which installs them) a skip is a failure.
def app_extras(browser=False):
    import importlib.util

    missing = [m for m in ("gradio", "gradio_client", "gradio_image_annotation", "pandas") + ("playwright",) * browser
               if importlib.util.find_spec(m) is None]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser and not chromium:
        missing.append("a system chromium (apt-get install chromium)")
    if missing:
        why = f"the app's extras are missing ({', '.join(missing)}): pip install -r extras/requirements.txt"
        (pytest.fail if os.environ.get("GLIGEN_CI") else pytest.skip)(why)
    return chromium


@pytest.fixture
def launch_app(tmp_path, monkeypatch):
    """launch_app(*argv) -> the URL of extras/app.py started in this process with those arguments (closed after)."""
    for k, v in dict(no_proxy="localhost,127.0.0.1", NO_PROXY="localhost,127.0.0.1", HF_HUB_OFFLINE="1",
                     GRADIO_TEMP_DIR=str(tmp_path / "gradio"), GRADIO_ANALYTICS_ENABLED="False").items():
        monkeypatch.setenv(k, v)
    apps = []

    def launch(*argv):
        import app

        a = app.main(tg.configure(app.config, list(argv)), list(argv))
        apps.append(a)
        return a.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, show_error=True)[1]

    yield launch
    for a in apps:
        a.close()


def write_log(path, half=True):
    """A run's log.jsonl as the trainer writes it, grounding arriving (the demo's seed-0 gaps), cut mid-line."""
    val = [(0, 0.1995, 0.1995, 0.1995), (500, 0.1970, 0.1969, 0.2114), (1000, 0.1500, 0.1523, 0.1800),
           (1500, 0.1300, 0.1490, 0.1700)]
    lines = [json.dumps(dict(step=s, val_loss_boxes=b, val_loss_mirrored=m, val_loss_no_grounding=n)) + "\n"
             for s, b, m, n in val]
    lines += [json.dumps(dict(step=s, loss=0.25 - s / 1e4, lr=1e-3, img_per_s=170.0, max_steps=4000,
                              left_s=(4000 - s) * 32 // 170)) + "\n" for s in range(100, 1600, 100)]
    lines.sort(key=lambda l: json.loads(l)["step"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines) + ('{"step": 1600, "loss": 0.2' if half else ""))


def test_app_reads_layouts_commands_and_logs_as_sample_py_and_the_trainer_write_them(tmp_path):
    """extras/app.py's pure parts, without its extras: the table gives sample.py's layout (numbers typed as text,
    blank rows dropped, a phrase twice kept twice) and a bad one the error sample.py gives; the canvas and the table
    round-trip; the command shown parses (through sample.py's own configure) to the same layout and settings; a saved
    layout is a line sample.py --layouts reads; log.jsonl is read while being written (the half-written last line
    and a broken line skipped); the verdict follows the box-use gap."""
    import app
    import sample

    shared = set(app.config) & set(sample.config)  # --model, --adapters and the controls: sample.py's defaults
    assert len(shared) == 12 and {k: app.config[k] for k in shared} == {k: sample.config[k] for k in shared}
    rows = [["a dog", "0.1", 0.2, 0.4, "0.5"], ["", "", "", "", ""], ["a dog", 0.5, 0.2, 0.9, 0.6]]
    layout = app.table_to_layout("two dogs", rows)
    assert layout == dict(prompt="two dogs", phrases=["a dog", "a dog"],
                          boxes=[[0.1, 0.2, 0.4, 0.5], [0.5, 0.2, 0.9, 0.6]])
    for bad in ([["a dog", 0.1, 0.2, 1.4, 0.5]], [["a dog", 0.5, 0.2, 0.1, 0.5]], [["", 0.1, 0.2, 0.4, 0.5]],
                [["a dog", 0.1, 0.1, 0.2, 0.2]] * 31):  # outside the image, x1 < x0, no phrase, too many boxes
        with pytest.raises(SystemExit) as ours:
            app.table_to_layout("x", bad)
        with pytest.raises(SystemExit) as theirs:
            sample.read_layouts({**sample.config, "prompt": "x", "phrases": [r[0] for r in bad],
                                 "boxes": [r[1:] for r in bad]})
        assert str(ours.value).startswith("error: the table: ")  # the same message; the table named
        assert str(ours.value).removeprefix("error: the table: ") == \
               str(theirs.value).removeprefix("error: --prompt/--phrases/--boxes: ")
    with pytest.raises(SystemExit, match="row 1: x0, y0, x1, y1 must be numbers"):
        app.table_to_layout("x", [["a dog", "left", 0.2, 0.4, 0.5]])

    canvas = app.rows_to_canvas(rows, None)  # a blank 512 x 512 canvas; the blank row skipped
    assert canvas["image"].shape == (512, 512, 3) and [b["xmin"] for b in canvas["boxes"]] == [51, 256]
    kept = [r for r in rows if r[0]]
    assert app.canvas_to_rows(canvas, kept) == kept  # the canvas redrawn from the table: its numbers stay as typed
    moved = {**canvas, "boxes": [canvas["boxes"][0], {**canvas["boxes"][1], "xmax": 500, "label": "a cat"}]}
    assert app.canvas_to_rows(moved, kept) == [kept[0], ["a cat", 0.5, 0.1992, 0.9766, 0.5996]]  # 102/512, 307/512
    assert app.canvas_to_rows(moved, []) == [["a dog", 0.0996, 0.1992, 0.4004, 0.5], ["a cat", 0.5, 0.1992, 0.9766,
                                                                                          0.5996]]
    typing = kept + [["a cat", "", "", "", ""], ["a cow", 0.1, 0.1, 1.2, 0.5]]  # a row being typed; one off the image
    assert app.canvas_to_rows(app.rows_to_canvas(typing, None), typing) == typing  # both stay, off the canvas
    drawn = {**canvas, "boxes": canvas["boxes"] + [dict(xmin=0, ymin=0, xmax=128, ymax=64, label="a cow")]}
    assert app.canvas_to_rows(drawn, typing) == typing + [["a cow", 0.0, 0.0, 0.25, 0.125]]  # a new box: a new row
    start = dict(xmin=10, ymin=20, xmax=10, ymax=20, label="")  # a box being dragged out, then labelled
    dragged = app.canvas_to_rows({**canvas, "boxes": [start]}, [])
    assert app.canvas_to_rows({**canvas, "boxes": [{**start, "xmax": 100, "ymax": 80, "label": "a cow"}]}, dragged) == \
           [["a cow", 0.0195, 0.0391, 0.1953, 0.1562]]
    refs = [["a", 0.1, 0.1, 0.2, 0.2, "a.png"], ["b", 0.3, 0.3, 0.4, 0.4, "b.png"], ["c", 0.5, 0.5, 0.6, 0.6, "c.png"]]
    three = app.rows_to_canvas(refs, None)
    assert app.canvas_to_rows({**three, "boxes": three["boxes"][1:]}, refs, 6) == refs[1:]  # images stay with boxes
    nudged = [three["boxes"][0], {**three["boxes"][1], "xmin": 160}, three["boxes"][2]]
    assert app.canvas_to_rows({**three, "boxes": nudged}, refs, 6)[1] == ["b", 0.3125, 0.3008, 0.4004, 0.4004, "b.png"]
    assert app.blank_canvas(32, 64).shape == (256, 512, 3)

    layout["prompt"] = "a dog's \"ball\" -- and $HOME"
    opts = dict(n=2, seed=7, steps=12, guidance=4.5, beta=0.6, scheduler="euler_a")
    command = app.sample_command({**app.config, "model": "m", "adapters": "a b"}, layout, opts)
    argv = __import__("shlex").split(command.replace("\\\n", ""))
    assert argv[:2] == ["python", "sample.py"]
    cfg = tg.configure(sample.config, argv[2:])
    assert {k: cfg[k] for k in ("prompt", "phrases", "boxes")} == layout and cfg["adapters"] == "a b"
    assert {k: cfg[k] for k in opts} == opts
    with_refs = {**layout, "phrases": ["a dog", None], "images": [None, "/my refs/dog.png"]}  # an image-only box
    command = app.sample_command(app.config, with_refs, opts, photo="/my photos/room.png")
    cfg = tg.configure(sample.config, __import__("shlex").split(command.split("\n", 1)[1].replace("\\\n", ""))[2:])
    assert {k: cfg[k] for k in ("phrases", "images", "inpaint_image")} == \
           {"phrases": ["a dog", None], "images": [None, "/my refs/dog.png"], "inpaint_image": "/my photos/room.png"}
    saved = app.save_layout(layout["prompt"], rows, None, tmp_path)
    assert sample.read_layouts({**sample.config, "layouts": saved}) == [layout]
    assert app.load_layout(saved) == (layout["prompt"], [["a dog", 0.1, 0.2, 0.4, 0.5], ["a dog", 0.5, 0.2, 0.9, 0.6]],
                                      "loaded line 1 of 1 from layout.jsonl", "")
    (tmp_path / "moving.jsonl").write_text(json.dumps(dict(prompt="x", phrases=["a"], boxes=[[[0, 0, 1, 1]]] * 2)))
    with pytest.raises(SystemExit, match="moving boxes"):
        app.load_layout(tmp_path / "moving.jsonl")
    (tmp_path / "refs.jsonl").write_text(json.dumps(with_refs) + "\n")  # as the app saves a text-image layout
    assert app.load_layout(tmp_path / "refs.jsonl", 6)[1:3] == ([["a dog", 0.1, 0.2, 0.4, 0.5, ""],
                                                                 ["", 0.5, 0.2, 0.9, 0.6, "dog.png"]],
        "loaded line 1 of 1 from refs.jsonl; upload its reference images again (the table's image column names them)")
    posed = tg.KEYPOINT_VAL_LAYOUTS[1]  # keypoints: typed as JSON, saved, loaded, in the command, drawn on the canvas
    kp = json.dumps(posed["keypoints"])
    assert app.table_to_layout(posed["prompt"], app.layout_to_rows(posed), None, kp) == posed
    saved_kp = app.save_layout(posed["prompt"], app.layout_to_rows(posed), None, tmp_path, kp)
    assert app.load_layout(saved_kp)[3] == kp
    assert app.load_layout(saved_kp, keypoints=False)[2:] == (
        "loaded line 1 of 1 from layout.jsonl; its keypoints are left out: these adapters take none", "")
    command = app.sample_command(app.config, posed, opts).replace("\\\n", "")
    assert tg.configure(sample.config, __import__("shlex").split(command)[2:])["keypoints"] == posed["keypoints"]
    with pytest.raises(SystemExit, match=r"the keypoints: not JSON"):
        app.table_to_layout("x", app.layout_to_rows(posed), None, kp[:-3])
    with pytest.raises(SystemExit, match=r"the table: person 1's nose \[1.5, 0.3\] is outside the image"):
        app.table_to_layout("x", app.layout_to_rows(posed), None, kp.replace("[0.72, 0.195]", "[1.5, 0.3]", 1))
    Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))).save(tmp_path / "ramp.png")
    mapped = dict(prompt="a ramp", phrases=[], boxes=[], map=str(tmp_path / "ramp.png"))  # a map: saved, in the command
    saved_map = app.save_layout("a ramp", [], None, tmp_path, "", mapped["map"])
    assert json.loads(Path(saved_map).read_text()) == mapped
    (tmp_path / "ramp.png").rename(tmp_path / "gone.png")  # a saved map's upload is the app's copy: upload it again
    assert app.load_layout(saved_map)[2] == "loaded line 1 of 1 from layout.jsonl; upload its map again (ramp.png)"
    command = app.sample_command(app.config, mapped, opts).replace("\\\n", "")
    assert tg.configure(sample.config, __import__("shlex").split(command.splitlines()[-1])[2:])["map"] == mapped["map"]
    shown = app.map_canvas(tmp_path / "gone.png", 32, 32)  # the canvas shows the map, dark to light, at its size
    assert shown.shape == app.blank_canvas(32, 32).shape and shown[0, 0, 0] < 10 and shown[0, -1, 0] > 235
    blank = app.blank_canvas(32, 32)
    assert not np.array_equal(app.skeleton_canvas(kp, 32, 32), blank)
    assert np.array_equal(app.skeleton_canvas(kp[:-3], 32, 32), blank)  # half typed: the canvas stays blank
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)))
    with pytest.raises(SystemExit, match="binary.jsonl: not a text file"):
        app.load_layout(tmp_path / "binary.jsonl")

    write_log(tmp_path / "run" / "log.jsonl")
    with open(tmp_path / "run" / "log.jsonl", "r+") as f:  # a broken line in the middle, too
        text = f.read().replace('{"step": 700,', '{"step": 700,,', 1)
        f.seek(0), f.write(text)
    records, partial, bad = app.read_log(tmp_path / "run" / "log.jsonl")
    assert len(records) == 4 + 15 - 1 and partial and bad == 1 and records[-1]["step"] == 1500
    assert app.read_log(tmp_path / "nothing.jsonl") == ([], False, 0)
    val = [r for r in records if "val_loss_boxes" in r]
    assert app.boxes_verdict([]).startswith("No box-use validation yet")
    assert "Not yet" in app.boxes_verdict(val[:1]) and "Not yet" in app.boxes_verdict(val[:2])
    assert "Arriving" in app.boxes_verdict(val[:3]) and "+0.00230" in app.boxes_verdict(val[:3])
    assert "Yes, the boxes count" in app.boxes_verdict(val)
    assert "the gates are closed" in app.boxes_verdict(val[:1])  # step 0 of a fresh run
    grounded = dict(step=0, val_loss_boxes=0.1, val_loss_mirrored=0.3, val_loss_no_grounding=0.2)  # --init_from
    assert "Yes, the boxes count" in app.boxes_verdict([grounded])
    assert "Starting" in app.boxes_verdict([{**grounded, "val_loss_mirrored": 0.105}])
    noisy = {**grounded, "val_loss_mirrored": 0.1025, "val_gap_se": 0.001}  # with the trainer's standard error
    assert "under 3 standard errors (0.00100)" in app.boxes_verdict([noisy])
    assert "5.0 standard errors" in app.boxes_verdict([{**noisy, "val_loss_mirrored": 0.105}])


def test_app_gives_sample_py_pixels_and_survives_bad_layouts(launch_app, tmp_path):
    """`python extras/app.py` with no arguments (the shipped shapes base and adapters), through gradio_client: a
    layout typed in the table gives, pixel for pixel, the PNGs that the sample.py command it shows writes; a bad
    layout gives sample.py's error line and the app answers the next request; the training tab's endpoint reads a run
    being written (its half-written last line skipped)."""
    app_extras()
    import sample
    from gradio_client import Client

    import app
    import demo_shapes

    known = demo_shapes.vocabulary(HERE / "extras" / "shapes_base")
    assert known == demo_shapes.PHRASES and len(known) == 12 and demo_shapes.vocabulary(HERE / "layouts") is None
    assert app.off_vocabulary({"phrases": ["red circle", None, "a red circle"]}, known).startswith(
        "not phrases this model knows, so they will not ground: 'a red circle'. It knows: red square, red circle")
    assert app.off_vocabulary({"phrases": ["red circle"]}, known) is None is app.off_vocabulary(
        {"phrases": ["a red circle"]}, None)
    client = Client(launch_app(), verbose=False)
    rows = {"headers": ["phrase", "x0", "y0", "x1", "y1"],
            "data": [["a red circle", 0.1, 0.1, 0.45, 0.45], ["a blue square", 0.55, 0.5, 0.95, 0.9]]}
    args = ("a red circle and a blue square", rows, 2, 3, 6, 7.5, 1.0, "ddim", None, [], "")
    boxed, plain, command = client.predict(*args, api_name="/generate")
    argv = __import__("shlex").split(command.replace("\\\n", ""))[2:]
    assert f"--adapters={HERE / 'extras' / 'shapes_adapters'}" in argv and "--steps=6" in argv
    sample.main(tg.configure(sample.config, argv + [f"--out_dir={tmp_path / 'cli'}"]))
    read = lambda gallery: np.stack([np.asarray(Image.open(im["image"])) for im in gallery]).astype(int)
    assert read(plain).shape == (2, 32, 32, 3) and np.array_equal(read(plain), pngs(tmp_path / "cli", 2))
    assert Image.open(boxed[0]["image"]).size == (256, 256)  # enlarged, the boxes and phrases drawn on
    from gradio_client.exceptions import AppError

    for bad, message in ((["a red circle", 0.1, 0.1, 1.45, 0.45], "is outside [0, 1]"),
                         (["", 0.1, 0.1, 0.45, 0.45], "phrase '' is not a non-empty string")):
        with pytest.raises(AppError, match=r"^error: the table: .*" + __import__("re").escape(message)):
            client.predict("x", {**rows, "data": [bad]}, *args[2:], api_name="/generate")
    with pytest.raises(AppError, match="a layout has at most 30"):
        client.predict("x", {**rows, "data": rows["data"] * 16}, *args[2:], api_name="/generate")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    with pytest.raises(AppError, match="--inpaint_image needs inpainting adapters"):
        client.predict(*args[:8], __import__("gradio_client").handle_file(tmp_path / "photo.png"), [], "",
                       api_name="/generate")
    again = client.predict(*args, api_name="/generate")[1]  # still serving, and the same seed gives the same pixels
    assert np.array_equal(read(again), pngs(tmp_path / "cli", 2))

    write_log(tmp_path / "run" / "log.jsonl")
    Image.new("RGB", (8, 8)).save(tmp_path / "run" / "val_0001000.png")
    (tmp_path / "run" / "val_0001500.png").write_bytes(b"\x89PNG\r\n")  # being written: passed over
    status, verdict, loss, speed, use, gaps, grid = client.predict(str(tmp_path / "run"), api_name="/watch")
    assert status.startswith("step 1500 of 4000 · 170.0 images/s · loss 0.1000 · about 0h 07m left")
    assert "val_0001000.png" in status and "the last line is being written" in status
    assert "Yes, the boxes count" in verdict
    assert len(loss["data"]) == len(speed["data"]) == 15 and len(use["data"]) == 3 * 4 and len(gaps["data"]) == 2 * 4
    assert grid is not None and Image.open(grid).size == (8, 8)


def test_app_draws_every_mode_as_sample_py(launch_app, tiny_sd, tiny_video, tiny_clip, tiny_data, tiny_maps,
                                           tiny_convnext, tmp_path):
    """The app on adapters that inpaint and take reference images (a photo uploaded, a reference image named in the
    table's image column, a box with an image and no phrase), on a video model (GIFs), on keypoint adapters (the
    keypoints as JSON) and on spatial-map adapters (a map uploaded): sample.py's pixels."""
    app_extras()
    import sample
    from gradio_client import Client, handle_file
    from safetensors.torch import save_file
    from transformers import CLIPTextModelWithProjection

    stages = tg.choose_stages("sd", True, True)
    random_adapters_of(stages, stages.load(str(tiny_sd), "cpu", torch.float32)[0], 5, tmp_path / "run", gate=0.3,
                       noise=0.05, image_encoder=str(tiny_clip))
    weight = CLIPTextModelWithProjection.from_pretrained(tiny_clip).text_projection.weight.T.contiguous()
    save_file({"project.weight": weight}, tmp_path / "run" / "image_project.safetensors")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "photo.png")
    Image.new("RGB", (20, 30), (40, 60, 220)).save(tmp_path / "ref.png")
    client = Client(launch_app(f"--model={tiny_sd}", f"--adapters={tmp_path / 'run'}"), verbose=False)
    rows = {"headers": ["phrase", "x0", "y0", "x1", "y1", "image"],
            "data": [["a red square", 0.1, 0.1, 0.4, 0.4, ""], ["", 0.5, 0.5, 0.9, 0.9, "ref.png"]]}
    _, plain, command = client.predict("a room", rows, 1, 0, 2, 7.5, 0.3, "ddim", handle_file(tmp_path / "photo.png"),
                                       [handle_file(tmp_path / "ref.png")], "", api_name="/generate")
    sample.main({**sample.config, "model": str(tiny_sd), "adapters": str(tmp_path / "run"), "prompt": "a room",
                 "phrases": ["a red square", None], "images": [None, str(tmp_path / "ref.png")], "n": 1, "steps": 2,
                 "boxes": [r[1:5] for r in rows["data"]], "inpaint_image": str(tmp_path / "photo.png"),
                 "out_dir": str(tmp_path / "cli")})
    assert "--inpaint_image=" in command and "--images=" in command
    (tmp_path / "cut.png").write_bytes((tmp_path / "photo.png").read_bytes()[:40])  # a photo cut short
    with pytest.raises(__import__("gradio_client").exceptions.AppError, match="is not a readable image"):
        client.predict("a room", rows, 1, 0, 2, 7.5, 0.3, "ddim", handle_file(tmp_path / "cut.png"),
                       [handle_file(tmp_path / "ref.png")], "", api_name="/generate")
    assert np.array_equal(np.asarray(Image.open(plain[0]["image"])), pngs(tmp_path / "cli", 1)[0])

    stages = tg.choose_stages("video")
    random_adapters_of(stages, stages.load(str(tiny_video), "cpu", torch.float32)[0], 5, tmp_path / "vrun")
    client = Client(launch_app(f"--model={tiny_video}", f"--adapters={tmp_path / 'vrun'}", "--frames=3"), verbose=False)
    rows = {"headers": ["phrase", "x0", "y0", "x1", "y1"], "data": [["a red square", 0.1, 0.1, 0.5, 0.5]]}
    boxed, plain, _ = client.predict("a red square", rows, 1, 0, 2, 7.5, 0.3, "ddim", None, [], "",
                                     api_name="/generate")
    sample.main({**sample.config, "model": str(tiny_video), "adapters": str(tmp_path / "vrun"), "frames": 3,
                 "prompt": "a red square", "phrases": ["a red square"], "boxes": [[0.1, 0.1, 0.5, 0.5]], "n": 1,
                 "steps": 2, "out_dir": str(tmp_path / "vcli")})
    assert Path(plain[0]["image"]).read_bytes() == (tmp_path / "vcli" / "000_00.gif").read_bytes()
    with Image.open(boxed[0]["image"]) as gif:
        assert gif.n_frames == 3

    stages = tg.choose_stages("sd", keypoints=True)  # keypoints typed as JSON beside the table
    random_adapters_of(stages, stages.load(str(tiny_sd), "cpu", torch.float32)[0], 5, tmp_path / "krun", gate=0.3)
    client = Client(launch_app(f"--model={tiny_sd}", f"--adapters={tmp_path / 'krun'}"), verbose=False)
    posed = tg.KEYPOINT_VAL_LAYOUTS[1]
    rows = {"headers": ["phrase", "x0", "y0", "x1", "y1"], "data": [[p, *b] for p, b in zip(posed["phrases"],
                                                                                          posed["boxes"])]}
    _, plain, command = client.predict(posed["prompt"], rows, 1, 0, 2, 7.5, 0.3, "ddim", None, [],
                                       json.dumps(posed["keypoints"]), api_name="/generate")
    sample.main({**sample.config, "model": str(tiny_sd), "adapters": str(tmp_path / "krun"), "n": 1, "steps": 2,
                 **{k: posed[k] for k in ("prompt", "phrases", "boxes", "keypoints")},
                 "out_dir": str(tmp_path / "kcli")})
    assert "--keypoints=" in command
    assert np.array_equal(np.asarray(Image.open(plain[0]["image"])), pngs(tmp_path / "kcli", 1)[0])

    stages = map_stages(tiny_maps, tiny_convnext)
    random_adapters_of(stages, stages.load(str(tiny_sd), "cpu", torch.float32)[0], 5, tmp_path / "mrun")
    client = Client(launch_app(f"--model={tiny_sd}", f"--adapters={tmp_path / 'mrun'}"), verbose=False)
    map_ = sorted((tiny_data["root"] / "maps").glob("*.png"))[0]
    boxed, plain, command = client.predict("shapes", rows, 1, 0, 2, 7.5, 0.3, "ddim", None, [], "",
                                           handle_file(map_), api_name="/generate")
    sample.main({**sample.config, "model": str(tiny_sd), "adapters": str(tmp_path / "mrun"), "n": 1, "steps": 2,
                 "prompt": "shapes", "map": str(map_), "out_dir": str(tmp_path / "mcli")})
    assert "--map=" in command and Image.open(boxed[0]["image"]).size == (2 * 256, 256)  # the image and its map
    assert np.array_equal(np.asarray(Image.open(plain[0]["image"])), pngs(tmp_path / "mcli", 1)[0])

def test_app_in_a_browser_draws_a_box_generates_and_stays_on_this_machine(launch_app, tmp_path):
    """The app in headless Chromium (the system's, through Playwright; nothing downloaded): drag a box on the canvas,
    type its phrase, write the caption, press Generate and get the images with the box drawn on; the training tab
    shows a run's verdict. Every request the page makes is recorded: any to another host fails the test (no CDN, no
    web fonts, no analytics). GLIGEN_APP_SCREENSHOTS=folder also saves the two screenshots there (docs/app.md's)."""
    chromium = app_extras(browser=True)
    from urllib.parse import urlparse

    from playwright.sync_api import expect, sync_playwright

    run = tmp_path / "run"  # the shipped adapters' own run, being written
    shutil.copytree(HERE / "extras" / "shapes_adapters", run)
    last = [r for _, r in tg.read_jsonl(run / "log.jsonl")][-1]["step"]
    with open(run / "log.jsonl", "a") as f:
        f.write(f'{{"step": {last + 100}, "lo')
    url, outside, seen = launch_app(f"--watch={run}"), [], []

    def route(r):
        seen.append(r.request.url)
        if urlparse(r.request.url).hostname in ("127.0.0.1", "localhost"):
            return r.continue_()
        outside.append(r.request.url)
        r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.route("**/*", route)
            page = context.new_page()
            page.goto(url)
            expect(page.locator("#generate")).to_be_visible(timeout=60_000)
            canvas = page.locator("#canvas canvas").first
            wait_for(lambda: (canvas.bounding_box() or {}).get("height", 0) > 100, 30)  # sized once its image loads
            canvas = canvas.bounding_box()
            at = lambda fx, fy: (canvas["x"] + fx * canvas["width"], canvas["y"] + fy * canvas["height"])
            page.mouse.move(*at(0.2, 0.2))
            page.mouse.down()
            page.mouse.move(*at(0.5, 0.6), steps=10)
            page.mouse.up()
            page.locator('#model-box-edit input[aria-label="Label"]').fill("a red circle")
            page.locator("#model-box-edit button", has_text="OK").click()
            expect(page.locator("#table")).to_contain_text("a red circle", timeout=20_000)  # the canvas -> the table
            page.locator("#caption textarea").fill("a red circle")
            expect(page.locator("#vocabulary")).to_contain_text("red circle")  # the shapes model's 12 phrases
            page.locator("#generate").click()
            expect(page.get_by_text("so they will not ground: 'a red circle'").first).to_be_visible(timeout=20_000)
            expect(page.locator("#boxed img")).to_have_count(4, timeout=120_000)
            page.screenshot(path=tmp_path / "app.png", full_page=True)
            page.get_by_role("tab", name="Training").click()
            expect(page.locator("#verdict")).to_contain_text("Yes, the boxes count", timeout=20_000)
            expect(page.locator("#status")).to_contain_text(f"step {last}", timeout=20_000)
            for plot in ("#loss_plot", "#gap_plot"):  # the curves drawn
                expect(page.locator(f"{plot} canvas, {plot} svg").first).to_be_visible(timeout=20_000)
            expect(page.locator("#grid img")).to_be_visible(timeout=20_000)
            page.screenshot(path=tmp_path / "app_training.png", full_page=True)
        finally:
            browser.close()
    for name in ("app.png", "app_training.png") if os.environ.get("GLIGEN_APP_SCREENSHOTS") else ():
        shutil.copy(tmp_path / name, Path(os.environ["GLIGEN_APP_SCREENSHOTS"]) / name)
    assert not outside, f"the page asked other hosts for: {outside}"
    assert len(seen) > 10 and Image.open(tmp_path / "app.png").size[0] == 1400
