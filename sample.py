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
--layouts=file.jsonl samples one layout a line; --batch=K draws K of them per UNet call, each with its own seed.
--adapters takes this project's out_dir, one of its step_* checkpoints or an adapters.safetensors, or a diffusers
GLIGEN model (directory or Hub id). Each image is written as <layout>_<i>.png, with a copy <layout>_<i>_boxes.png
that has the boxes and phrases drawn on.
Inpainting adapters (train_gligen.py --inpaint=True) keep --inpaint_image outside the boxes and generate inside.
Spatial-map adapters (train_gligen.py --maps) follow --map (a PNG or NPY map; a layout's "map"); boxes are not used.
--export writes a directory that diffusers' StableDiffusionGLIGENPipeline.from_pretrained loads; with the same seed,
scheduler and steps it gives the same images as this script (in fp32; half precision differs in the last bits).
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from train_gligen import (adapter_params, adapters_file, check_image, check_layouts, check_out_dir, choose_stages,
                          configure, draw_grounding, draw_layout, fail, family_of, in_range, is_moving, load_adapters,
                          load_clip_tower, load_image_project, load_model, map_net_of, mode_of, native_size,
                          project_image_embeds, read_jsonl, set_adapters, upright, vae_scale, SCHEDULERS)

config = dict(
    model="stable-diffusion-v1-5/stable-diffusion-v1-5",  # base model: Hub id or local diffusers directory
    adapters="",  # see above; "" = the base model alone (boxes are then ignored)
    prompt="a dog and a cat sitting on a sofa",  # the caption
    phrases=["a dog", "a cat"],  # one phrase per box, at most 30
    boxes=[[0.05, 0.35, 0.45, 0.9], [0.55, 0.3, 0.95, 0.9]],  # x0, y0, x1, y1 relative to the image
    layouts="",  # or a JSONL file of {prompt, phrases, boxes}, one layout a line (replaces the three above)
    n=4,  # images per layout
    seed=0,  # layout k uses seed + k
    batch=1,  # layouts per UNet call (n images each, decoded together): faster, more memory; each keeps its images
    steps=50,  # denoising steps
    guidance=7.5,  # classifier-free guidance scale
    beta=0.3,  # scheduled sampling: grounding for the first beta * steps steps (1.0 = all of them)
    scheduler="auto",  # auto: ddim (UNets), flow_euler (SD3, Flux); or dpm (DPM-Solver++ multistep), euler, euler_a,
    # pndm, ddpm (UNets)
    height=0,  # 0 = the model's native size
    width=0,  # 0 = the model's native size
    frames=16,  # video models: frames per clip
    fps=8,  # video models: frames per second of the GIFs
    dtype="auto",  # auto: fp16 on CUDA, fp32 on CPU; or fp32, fp16, bf16
    out_dir="samples",  # where the images go
    export="",  # also write a full diffusers StableDiffusionGLIGENPipeline directory here
    inpaint_image="",  # inpainting adapters (trained with --inpaint=True): the photo to keep outside the boxes
    images=[],  # text-image adapters: one reference image path (or None) per box; a box's phrase may then be None
    keypoints=[],  # keypoint adapters: per box (a person) 17 COCO keypoints, each [x, y] or None (not there)
    map="",  # spatial-map adapters: the map (PNG or NPY, as prep_latents.py --map reads) the image follows
    image_encoder="",  # text-image adapters: their CLIP image encoder; "" = the one they were trained with
)
DTYPES = dict(auto=None, fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)  # auto: fp16 on CUDA, else fp32


def export(path, unet, vae, text_encoder, tokenizer, scheduler, image_tower=None):
    """Save a StableDiffusionGLIGENPipeline: the base model with diffusers' own gated UNet holding these adapters.
    Text-image adapters (image_tower: processor, image encoder, image_project weight): a
    StableDiffusionGLIGENTextImagePipeline with a gated-text-image UNet."""
    from diffusers import StableDiffusionGLIGENPipeline, StableDiffusionGLIGENTextImagePipeline, UNet2DConditionModel
    from diffusers import CLIPImageProjection
    from transformers import CLIPProcessor

    gated = UNet2DConditionModel.from_config(unet.config, attention_type="gated-text-image" if image_tower else "gated")
    gated.load_state_dict(unet.state_dict(), assign=True)  # strict: every name of ours is diffusers' name; our dtype
    parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=gated,
                 scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if image_tower is None:
        return StableDiffusionGLIGENPipeline(**parts).save_pretrained(path)
    processor, encoder, weight = image_tower
    project = CLIPImageProjection(hidden_size=weight.shape[0])
    project.load_state_dict({"project.weight": weight.to(unet.dtype)}, assign=True)
    processor = CLIPProcessor(image_processor=processor, tokenizer=tokenizer)
    StableDiffusionGLIGENTextImagePipeline(**parts, processor=processor, image_encoder=encoder,
                                           image_project=project).save_pretrained(path)


def load_image_tower(cfg, device, dtype):
    """Text-image adapters' way from a reference image to its feature: (CLIP image processor, image encoder,
    image_project weight), from --image_encoder or the encoder the adapters were trained with, or a diffusers
    text-image model's own processor and image_encoder."""
    from safetensors import safe_open
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    weight = load_image_project(cfg["adapters"]).to(device, torch.float32)
    path, src, sub = adapters_file(cfg["adapters"]), cfg["image_encoder"], {}
    if not src and path is not None:  # this project's adapters name their encoder in their config
        with safe_open(path, "pt") as f:
            src = json.loads((f.metadata() or {}).get("config", "{}")).get("image_encoder", "")
    if not src and path is None:  # a diffusers text-image model
        src, sub = cfg["adapters"], dict(processor="processor", encoder="image_encoder")
    try:
        processor = CLIPImageProcessor.from_pretrained(src, **({"subfolder": sub["processor"]} if sub else {}))
        encoder = load_clip_tower(CLIPVisionModelWithProjection, src, **({"subfolder": sub["encoder"]} if sub else {}))
    except (OSError, ValueError) as e:
        fail(f"cannot load the image encoder {src!r} of text-image adapters (give --image_encoder): {e}")
    return processor, encoder.to(device, dtype).eval(), weight


def open_photo(path):
    """A photo in RGB as viewers show it: its EXIF orientation applied, as prep_latents.py does."""
    with upright(Image.open(path)) as im:
        return im.convert("RGB")


@torch.no_grad()
def image_features(paths, image_tower):
    """Each reference image's feature (D,) as the text-image pipeline makes it, or None where a box has none."""
    processor, encoder, weight = image_tower
    feats = []
    for p in paths:
        if p is not None:
            x = processor(images=[open_photo(p)], return_tensors="pt")["pixel_values"]
            embeds = encoder(pixel_values=x.to(encoder.device, encoder.dtype)).image_embeds
            p = project_image_embeds(embeds.float(), weight)[0]
        feats.append(p)
    return feats


def center_crop(size, height, width):
    """The box (left, top, right, bottom) that center-crops an image of size (W, H) to the shape height x width."""
    s = min(size[0] / width, size[1] / height)
    left, top = (size[0] - width * s) / 2, (size[1] - height * s) / 2
    return left, top, left + width * s, top + height * s


def photo_latent(path, vae, height, width):
    """An inpainting photo's VAE latent (1, 4, h, w): center-cropped to the output's shape and resized (LANCZOS), as
    the GLIGEN pipeline prepares it; the VAE's mean (the pipeline draws a sample)."""
    im = open_photo(path)
    if im.size != (width, height):
        im = im.crop(center_crop(im.size, height, width)).resize((width, height), Image.Resampling.LANCZOS)
    # (1, 3, H, W) in [-1, 1], channels last in memory as the pipeline's image processor leaves it: the VAE's
    # convolutions round differently for another layout
    x = torch.from_numpy((np.asarray(im, dtype=np.float32) / 255.0)[None].transpose(0, 3, 1, 2)) * 2 - 1
    with torch.no_grad():
        return vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode() * vae.config.scaling_factor


def check_settings(cfg):
    """Stop on a setting that cannot work, before the model loads."""
    in_range(cfg, "n batch steps frames fps", 1)
    in_range(cfg, "height width guidance", 0)
    in_range(cfg, "beta", 0, 1)
    if cfg["dtype"] not in DTYPES or cfg["scheduler"] not in ("auto", *SCHEDULERS):
        fail(f"--dtype must be one of {', '.join(DTYPES)} and --scheduler one of auto, {', '.join(SCHEDULERS)}")
    if cfg["export"] and not cfg["adapters"]:
        fail("--export needs --adapters: it writes the base model with them")
    check_out_dir(cfg["out_dir"], "out_dir")
    if cfg["export"]:
        check_out_dir(cfg["export"], "export")


def read_layouts(cfg):
    """The layouts to sample: --layouts' lines, or the one that --prompt, --phrases, --boxes (and --images) give;
    checked, before the model loads (minutes for SDXL): a bad layout fails at once."""
    if cfg["layouts"]:
        layouts = [(f"{cfg['layouts']}:{i}", r) for i, r in read_jsonl(cfg["layouts"])]
        if not layouts:
            fail(f"{cfg['layouts']}: no layouts in it (one JSON object a line: prompt, phrases, boxes)")
    else:
        layout = dict(prompt=cfg["prompt"], phrases=cfg["phrases"], boxes=cfg["boxes"],
                      **{k: cfg[k] for k in ("images", "keypoints", "map") if cfg[k]})
        layouts = [("--prompt/--phrases/--boxes", layout)]
    check_layouts(layouts, cfg["frames"], images=True)  # boxes per frame: whether the model makes video, checked later
    return [l for _, l in layouts]


class Sampler:
    """A base model and its adapters, loaded once, ready to draw layouts: what main below runs, and what
    extras/app.py serves. Sampler(cfg) reads the model's config and the adapters (fast, so bad settings fail before
    anything slow); load() loads the model; draw(layouts, seeds, ...) makes their images, in one batch (inpainting,
    maps: one layout at a time)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.family = family_of(cfg["model"])  # from its config: a wrong --model fails at once
        self.adapters = load_adapters(cfg["adapters"]) if cfg["adapters"] else {}  # a bad path fails here too
        self.inpaint, self.text_image, self.keypoints, self.spatial = mode_of(self.adapters)  # what they trained for
        self.stages = choose_stages(self.family, self.inpaint, self.text_image, self.keypoints,
                                    map_net_of(self.adapters) if self.spatial else None)
        self.video = self.family == "video"
        if cfg["export"] and self.family != "sd":
            fail("--export needs an SD1.x/2.x model (diffusers has no SDXL, video, SD3 or Flux GLIGEN pipeline)")
        if cfg["export"] and self.spatial:
            fail("--export: diffusers has no GLIGEN pipeline for spatial maps (its GLIGEN UNet takes boxes and phrases "
                 "or images, and a 4-channel input): sample map adapters with this script")
        if cfg["export"] and self.keypoints:
            fail("--export: diffusers has no GLIGEN pipeline for keypoints (its GLIGEN UNet takes boxes and phrases "
                 "or images): sample keypoint adapters with this script")
        self.schedulers, self.photos = {}, {}  # loaded by name; inpainting photos' latents by path

    def check(self, layouts, inpaint_image):
        """Stop unless these layouts and photo suit the adapters' mode and the model's family."""
        if any(l.get("images") for l in layouts) and not self.text_image:
            fail("reference images (--images, or \"images\" in --layouts) need text-image adapters")
        if self.adapters and not self.keypoints and any("keypoints" in l for l in layouts):  # the base ignores them
            fail("keypoints (--keypoints, or \"keypoints\" in --layouts) need keypoint adapters (trained with "
                 "--keypoints=True)")
        if self.spatial and not all("map" in l for l in layouts):
            fail(f"--adapters={self.cfg['adapters']} are spatial-map adapters: each layout needs a map (--map, or "
                 f"\"map\" in --layouts)")
        if self.adapters and not self.spatial and any("map" in l for l in layouts):  # the base ignores them
            fail("a map (--map, or \"map\" in --layouts) needs spatial-map adapters (trained with --maps)")
        if self.keypoints and any(l["boxes"] and "keypoints" not in l for l in layouts):
            fail(f"--adapters={self.cfg['adapters']} are keypoint adapters: each layout with boxes needs keypoints "
                 f"(--keypoints, or \"keypoints\" in --layouts)")
        if self.inpaint != bool(inpaint_image):
            fail(f"--adapters={self.cfg['adapters']} are inpainting adapters: give --inpaint_image" if self.inpaint
                 else "--inpaint_image needs inpainting adapters (trained with --inpaint=True)")
        if self.inpaint:
            check_image(inpaint_image, "--inpaint_image")
        if not self.video and any(is_moving(l["boxes"]) for l in layouts):
            fail(f"one list of boxes per frame is for video models; {self.cfg['model']} makes images")

    def scheduler(self, name, steps):
        """The named scheduler from the model's config (loaded once), checked against --steps; auto: the family's
        own (DDIM for a UNet, flow-matching Euler for an MMDiT)."""
        import diffusers

        name = self.stages.samplers[0] if name == "auto" else name
        if name not in self.stages.samplers:
            fail(f"--scheduler={name}: a {self.family} model samples with {', '.join(self.stages.samplers)}")
        if name not in self.schedulers:
            cls = getattr(diffusers, SCHEDULERS[name])
            self.schedulers[name] = cls.from_pretrained(self.cfg["model"], subfolder="scheduler")
        if steps > self.schedulers[name].config.num_train_timesteps:
            fail(f"--steps={steps}: at most {self.schedulers[name].config.num_train_timesteps}, the scheduler's "
                 "timesteps")
        return self.schedulers[name]

    def load(self):
        """The model in the sampling precision on the GPU if there is one, with the adapters; the output size."""
        from diffusers import AutoencoderKL

        cfg, stages = self.cfg, self.stages
        self.scheduler(cfg["scheduler"], cfg["steps"])  # --steps checked before the model loads
        self.device = device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = dtype = DTYPES[cfg["dtype"]] if cfg["dtype"] != "auto" else \
            torch.float16 if device == "cuda" else torch.float32
        self.unet, self.text_encoder, self.tokenizer, _ = stages.load(cfg["model"], device, dtype)
        # SDXL's VAE overflows in fp16: it decodes in fp32 there
        vae_dtype = torch.float32 if self.family == "sdxl" and dtype == torch.float16 else dtype
        self.vae = load_model(AutoencoderKL, cfg["model"], subfolder="vae", torch_dtype=vae_dtype).to(device)
        scale = vae_scale(self.vae)
        for k in ("height", "width"):
            if cfg[k] % scale:
                fail(f"--{k}={cfg[k]}: must be a multiple of {scale}, the VAE's downsampling factor")
        self.image_tower = load_image_tower(cfg, device, dtype) if self.text_image else None
        if self.adapters:
            stages.add_adapters(self.unet)
            set_adapters(self.unet, self.adapters, cfg["adapters"])
            for p in adapter_params(self.unet):  # the adapters in the sampling precision, as the base
                p.data = p.data.to(dtype)
        else:
            print("no --adapters: sampling the base model, boxes ignored")
        size = native_size(self.unet, self.vae)
        self.height, self.width = cfg["height"] or size, cfg["width"] or size
        return self

    def draw(self, layouts, seeds, n=None, steps=None, guidance=None, beta=None, scheduler=None, inpaint_image=None,
             progress=True):
        """n images (H, W, 3) uint8 of each layout, or for a video model n clips (F, H, W, 3), layout by layout, in
        one batch (inpainting, maps: one layout at a time); layout k from seeds[k]. Each setting left None is cfg's."""
        cfg = self.cfg
        n, steps, guidance, beta = (cfg[k] if v is None else v for k, v in
                                    (("n", n), ("steps", steps), ("guidance", guidance), ("beta", beta)))
        inpaint_image = inpaint_image or cfg["inpaint_image"]
        sched = self.scheduler(scheduler or cfg["scheduler"], steps)
        extra = {"frames": cfg["frames"]} if self.video else {}  # the video sampler's clip length
        if self.inpaint:  # the inpainting sampler's photo, encoded once
            if inpaint_image not in self.photos:
                self.photos[inpaint_image] = photo_latent(inpaint_image, self.vae, self.height, self.width)
            extra["inpaint_latent"] = self.photos[inpaint_image]
        layouts = [self.as_drawn(l) for l in layouts]
        return self.stages.generate(self.unet, self.vae, self.text_encoder, self.tokenizer, sched, layouts, seeds, n=n,
                                   steps=steps, guidance=guidance, beta=beta, height=self.height, width=self.width,
                                   progress=progress, **extra)

    def as_drawn(self, layout):
        """The layout as generate takes it: no phrases or map without adapters; text-image adapters' reference
        images as features."""
        if self.text_image:
            paths = layout.get("images") or [None] * len(layout["phrases"])
            layout = {**layout, "images": image_features(paths, self.image_tower)}
        return {k: v for k, v in layout.items() if k != "map" or self.adapters} | \
            {"phrases": layout["phrases"] if self.adapters else []}


def main(cfg):
    check_settings(cfg)
    layouts = read_layouts(cfg)
    sampler = Sampler(cfg)
    sampler.check(layouts, cfg["inpaint_image"])  # before the model loads (minutes for SDXL)
    sampler.load()
    if cfg["export"]:
        export(cfg["export"], sampler.unet, sampler.vae, sampler.text_encoder, sampler.tokenizer.tokenizer,
               sampler.scheduler(cfg["scheduler"], cfg["steps"]), sampler.image_tower)
        kind = "StableDiffusionGLIGENTextImagePipeline" if sampler.image_tower else "StableDiffusionGLIGENPipeline"
        print(f"wrote a {kind} to {cfg['export']}")

    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(layouts), desc="layouts", unit="layout", disable=len(layouts) == 1)
    for batch in batches(layouts, cfg["batch"]):
        images = sampler.draw([layouts[k] for k in batch], [cfg["seed"] + k for k in batch])
        for k, each in zip(batch, np.split(images, len(batch))):
            write_images(out, f"{k:03d}", each, layouts[k], sampler.video, cfg["fps"])
        bar.update(len(batch))
    bar.close()
    what = "clips (frames, a GIF, a GIF with boxes)" if sampler.video else "images (and copies with boxes)"
    print(f"wrote {len(layouts) * cfg['n']} {what} to {out}")


def batches(layouts, size):
    """The layouts' indices in runs of at most `size`, a run never mixing layouts with phrases and without."""
    runs = []
    for k, l in enumerate(layouts):
        if runs and len(runs[-1]) < size and bool(layouts[runs[-1][0]]["phrases"]) == bool(l["phrases"]):
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def write_images(out, prefix, images, layout, video, fps):
    """A layout's images as <prefix>_<i>.png with a copy <prefix>_<i>_boxes.png (clips: write_clip); the paths of the
    plain and boxed files."""
    labels = [p if p is not None else "(image)" for p in layout["phrases"]]
    paths = []
    for i, im in enumerate(images):
        name = f"{prefix}_{i:02d}"
        if video:
            paths.append(write_clip(out, name, im, labels, layout["boxes"], fps))
            continue
        im = Image.fromarray(im)
        im.save(out / f"{name}.png")
        draw_grounding(im, {**layout, "phrases": labels}).save(out / f"{name}_boxes.png")
        paths.append((out / f"{name}.png", out / f"{name}_boxes.png"))
    return paths


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
    return out / f"{name}.gif", out / f"{name}_boxes.gif"


if __name__ == "__main__":
    main(configure(config, sys.argv[1:], __doc__))
