"""
Generate images from a base Stable Diffusion model plus GLIGEN adapters, for a prompt, phrases and boxes.

    python sample.py --model=stable-diffusion-v1-5/stable-diffusion-v1-5 --adapters=out/coco \
        --prompt="a dog and a cat sitting on a sofa" --phrases='["a dog", "a cat"]' \
        --boxes='[[0.05, 0.35, 0.45, 0.9], [0.55, 0.3, 0.95, 0.9]]' --n=4 --out_dir=samples
    python sample.py --model=CompVis/stable-diffusion-v1-4 --adapters=masterful/gligen-1-4-generation-text-box ...
    python sample.py --model=... --adapters=out/coco --export=gligen-pipeline   # a diffusers pipeline directory
    python sample.py --model=CompVis/stable-diffusion-v1-4 --adapters=out/coco-inpaint --inpaint_image=room.png \
        --prompt="a birthday cake on a table" --phrases='["a birthday cake"]' --boxes='[[0.27, 0.61, 0.48, 0.72]]'

Boxes are x0, y0, x1, y1 relative to the image. SDXL models work the same way. Video models (ModelScope,
Zeroscope) make --frames frames: --boxes is one list of boxes (still) or one list per frame (moving), and each clip
is written as <layout>_<i>.gif and <layout>_<i>_boxes.gif, with its frames in <layout>_<i>/.
--adapters takes this project's out_dir, one of its step_* checkpoints or an adapters.safetensors, or a diffusers
GLIGEN model (directory or Hub id). Each image is written as <layout>_<i>.png, with a copy <layout>_<i>_boxes.png
that has the boxes and phrases drawn on.
Inpainting adapters (train_gligen.py --inpaint=True) keep --inpaint_image outside the boxes and generate inside.
--export writes a directory that diffusers' StableDiffusionGLIGENPipeline.from_pretrained loads; with the same seed,
scheduler and steps it gives the same images as this script (in fp32; half precision differs in the last bits).
"""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from train_gligen import (check_layout, configure, draw_layout, fail, generate, in_range, inject_gligen, is_moving,
                          is_sdxl, is_video, load_adapters, load_base, read_jsonl, set_adapters, widen_conv_in)

config = dict(
    model="stable-diffusion-v1-5/stable-diffusion-v1-5",  # base model: Hub id or local diffusers directory
    adapters="",  # see above; "" = the base model alone (boxes are then ignored)
    prompt="a dog and a cat sitting on a sofa",  # the caption
    phrases=["a dog", "a cat"],  # one phrase per box, at most 30
    boxes=[[0.05, 0.35, 0.45, 0.9], [0.55, 0.3, 0.95, 0.9]],  # x0, y0, x1, y1 relative to the image
    layouts="",  # or a JSONL file of {prompt, phrases, boxes}, one layout a line (replaces the three above)
    n=4,  # images per layout
    seed=0,  # layout k uses seed + k
    steps=50,  # denoising steps
    guidance=7.5,  # classifier-free guidance scale
    beta=0.3,  # scheduled sampling: grounding for the first beta * steps steps (1.0 = all of them)
    scheduler="ddim",  # ddim, dpm (DPM-Solver++ multistep), euler, euler_a, pndm, ddpm
    height=0,  # 0 = the model's native size
    width=0,  # 0 = the model's native size
    frames=16,  # video models: frames per clip
    fps=8,  # video models: frames per second of the GIFs
    dtype="auto",  # auto: fp16 on CUDA, fp32 on CPU; or fp32, fp16, bf16
    out_dir="samples",  # where the images go
    export="",  # also write a full diffusers StableDiffusionGLIGENPipeline directory here
    inpaint_image="",  # inpainting adapters (trained with --inpaint=True): the photo to keep outside the boxes
)
DTYPES = dict(auto=None, fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)  # auto: fp16 on CUDA, else fp32
SCHEDULERS = dict(ddim="DDIMScheduler", dpm="DPMSolverMultistepScheduler", euler="EulerDiscreteScheduler",
                  euler_a="EulerAncestralDiscreteScheduler", pndm="PNDMScheduler", ddpm="DDPMScheduler")


def export(path, unet, vae, text_encoder, tokenizer, scheduler):
    """Save a StableDiffusionGLIGENPipeline: the base model with diffusers' own gated UNet holding these adapters."""
    from diffusers import StableDiffusionGLIGENPipeline, UNet2DConditionModel

    gated = UNet2DConditionModel.from_config(unet.config, attention_type="gated")
    gated.load_state_dict(unet.state_dict())  # strict: every name of ours is diffusers' name
    pipe = StableDiffusionGLIGENPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                         unet=gated.to(unet.dtype), scheduler=scheduler, safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)


def photo_latent(path, vae, height, width):
    """An inpainting photo's VAE latent (1, 4, h, w): center-cropped to the output's shape and resized (LANCZOS), as
    the GLIGEN pipeline prepares it; the VAE's mean (the pipeline draws a sample)."""
    im = Image.open(path).convert("RGB")
    if im.size != (width, height):
        s = min(im.width / width, im.height / height)
        left, top = (im.width - width * s) / 2, (im.height - height * s) / 2
        im = im.crop((left, top, left + width * s, top + height * s)).resize((width, height), Image.Resampling.LANCZOS)
    # (1, 3, H, W) in [-1, 1], channels last in memory as the pipeline's image processor leaves it: the VAE's
    # convolutions round differently for another layout
    x = torch.from_numpy((np.asarray(im, dtype=np.float32) / 255.0)[None].transpose(0, 3, 1, 2)) * 2 - 1
    with torch.no_grad():
        return vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode() * vae.config.scaling_factor


def check_settings(cfg):
    """Stop on a setting that cannot work, before the model loads."""
    in_range(cfg, "n steps frames fps", 1)
    in_range(cfg, "height width guidance", 0)
    in_range(cfg, "beta", 0, 1)
    if cfg["dtype"] not in DTYPES or cfg["scheduler"] not in SCHEDULERS:
        fail(f"--dtype must be one of {', '.join(DTYPES)} and --scheduler one of {', '.join(SCHEDULERS)}")
    if cfg["export"] and not cfg["adapters"]:
        fail("--export needs --adapters: it writes the base model with them")


def main(cfg):
    import diffusers
    from diffusers import AutoencoderKL

    check_settings(cfg)
    if cfg["layouts"]:
        layouts = [(f"{cfg['layouts']}:{i}", r) for i, r in read_jsonl(cfg["layouts"])]
    else:
        layout = dict(prompt=cfg["prompt"], phrases=cfg["phrases"], boxes=cfg["boxes"])
        layouts = [("--prompt/--phrases/--boxes", layout)]
    for where, l in layouts:  # before the model loads (minutes for SDXL): a bad layout fails at once
        if not isinstance(l.get("prompt"), str):
            fail(f"{where}: a layout needs a prompt string")
        moving = is_moving(l.get("boxes"))
        if moving and len(l["boxes"]) != cfg["frames"]:
            fail(f"{where}: {len(l['boxes'])} lists of boxes for --frames={cfg['frames']} "
                 "(one list per frame, for video models)")
        for f, frame_boxes in enumerate(l["boxes"] if moving else [l.get("boxes")]):
            check_layout(l.get("phrases"), frame_boxes, where + (f" frame {f}" if moving else ""))
    adapters = load_adapters(cfg["adapters"]) if cfg["adapters"] else None  # a bad path fails before the model loads
    inpaint = adapters is not None and "conv_in.weight" in adapters  # inpainting adapters carry conv_in
    if inpaint != bool(cfg["inpaint_image"]):
        fail(f"--adapters={cfg['adapters']} are inpainting adapters: give --inpaint_image" if inpaint else
             "--inpaint_image needs inpainting adapters (trained with --inpaint=True)")
    if inpaint and not Path(cfg["inpaint_image"]).is_file():
        fail(f"--inpaint_image: file not found: {cfg['inpaint_image']}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[cfg["dtype"]] if cfg["dtype"] != "auto" else torch.float16 if device == "cuda" else torch.float32
    unet, text_encoder, tokenizer, _ = load_base(cfg["model"], device, dtype)
    for where, l in layouts:
        if is_moving(l["boxes"]) and not is_video(unet):
            fail(f"{where}: one list of boxes per frame is for video models; {cfg['model']} makes images")
    # SDXL's VAE overflows in fp16: it decodes in fp32 there
    vae_dtype = torch.float32 if is_sdxl(unet) and dtype == torch.float16 else dtype
    vae = AutoencoderKL.from_pretrained(cfg["model"], subfolder="vae", torch_dtype=vae_dtype).to(device)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    for k in ("height", "width"):
        if cfg[k] % scale:
            fail(f"--{k}={cfg[k]}: must be a multiple of {scale}, the VAE's downsampling factor")
    scheduler = getattr(diffusers, SCHEDULERS[cfg["scheduler"]]).from_pretrained(cfg["model"], subfolder="scheduler")
    if inpaint and (is_sdxl(unet) or is_video(unet) or any(is_moving(l["boxes"]) for _, l in layouts)):
        fail("inpainting is for SD1.x/2.x image models")
    if adapters is not None:
        if inpaint:
            widen_conv_in(unet)
        inject_gligen(unet)
        set_adapters(unet, adapters, cfg["adapters"])
        unet.to(dtype)
    else:
        print("no --adapters: sampling the base model, boxes ignored")
    if cfg["export"]:
        if is_sdxl(unet) or is_video(unet):
            fail("--export needs an SD1.x/2.x model (diffusers has no SDXL or video GLIGEN pipeline)")
        export(cfg["export"], unet, vae, text_encoder, tokenizer, scheduler)
        print(f"wrote a StableDiffusionGLIGENPipeline to {cfg['export']}")

    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    height, width = cfg["height"] or unet.config.sample_size * scale, cfg["width"] or unet.config.sample_size * scale
    kept = photo_latent(cfg["inpaint_image"], vae, height, width) if inpaint else None
    for k, (_, l) in enumerate(tqdm(layouts, desc="layouts", unit="layout", disable=len(layouts) == 1)):
        images = generate(unet, vae, text_encoder, tokenizer, scheduler, l["prompt"],
                          l["phrases"] if cfg["adapters"] else [], l["boxes"], seed=cfg["seed"] + k, n=cfg["n"],
                          steps=cfg["steps"], guidance=cfg["guidance"], beta=cfg["beta"], height=height, width=width,
                          frames=cfg["frames"], inpaint_latent=kept, progress=True)
        for i, im in enumerate(images):
            name = f"{k:03d}_{i:02d}"
            if is_video(unet):
                write_clip(out, name, im, l["phrases"], l["boxes"], cfg["fps"])
                continue
            im = Image.fromarray(im)
            im.save(out / f"{name}.png")
            draw_layout(im, l["phrases"], l["boxes"]).save(out / f"{name}_boxes.png")
    what = "clips (frames, a GIF, a GIF with boxes)" if is_video(unet) else "images (and copies with boxes)"
    print(f"wrote {len(layouts) * cfg['n']} {what} to {out}")


def write_clip(out, name, frames, phrases, boxes, fps):
    """A clip's frames as PNGs in out/name/, and two GIFs: out/name.gif and out/name_boxes.gif with boxes drawn."""
    moving = is_moving(boxes)
    (out / name).mkdir(exist_ok=True)
    plain = [Image.fromarray(f) for f in frames]
    drawn = [draw_layout(im, phrases, boxes[f] if moving else boxes) for f, im in enumerate(plain)]
    for f, im in enumerate(plain):
        im.save(out / name / f"frame_{f:03d}.png")
    for path, ims in ((out / f"{name}.gif", plain), (out / f"{name}_boxes.gif", drawn)):
        ims[0].save(path, save_all=True, append_images=ims[1:], duration=round(1000 / fps), loop=0)


if __name__ == "__main__":
    main(configure(config, sys.argv[1:], __doc__))
