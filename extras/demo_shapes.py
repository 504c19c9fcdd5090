"""
The shapes demo: a test, on a laptop CPU and with no download, of whether trained adapters put objects in their
boxes. Under 10 minutes on a 2-core CPU; docs/shapes-demo.md has the measured tables (seeds 0 to 4).

    python extras/demo_shapes.py                    # 2,000 GLIGEN steps on the shipped base; writes demo/
    python extras/demo_shapes.py --train_base=True  # the same after retraining the base from scratch (+12 minutes)
    python extras/demo_shapes.py --family=sd3       # the same on a tiny SD3-shaped base (MMDiT); writes demo_sd3/
    python extras/demo_shapes.py --family=flux      # the same on a tiny Flux-shaped base; writes demo_flux/
    python extras/demo_shapes.py --keypoints=True --gligen_steps=6000  # the keypoint mode: 5 keypoints a shape
    python extras/demo_shapes.py --maps=True        # the spatial-map mode: each shape's silhouette as its map

1. A synthetic world: red, green, blue and yellow squares, circles and triangles on a plain background, 1 to 3 per
   32 x 32 image, each with a caption ("a red circle and a blue square") and, per shape, its phrase and exact box,
   written as COCO-format JSON.
2. A tiny text-to-image base model, trained on captions alone, is the input, as SD's weights are: a tiny autoencoder
   (AutoencoderKL, 32 px -> 8 x 8 x 4), a tiny CLIP text encoder and a tiny v-prediction UNet, shipped in
   extras/shapes_base (5.6 MB; its settings in settings.json), made by train_base below. Nothing in it knows boxes.
   Its transformer blocks were also taught where they are (see train_base): GLIGEN's fusers have no position code
   of their own and read position from the base's features, which large models have and this tiny one otherwise
   lacks. With --family=sd3 or --family=flux the base is a tiny MMDiT instead (extras/shapes_base_sd3,
   extras/shapes_base_flux: an SD3Transformer2DModel with CLIP-L, CLIP-G and T5, or a FluxTransformer2DModel with
   CLIP-L and T5, on 16 x 16 x 4 latents: an autoencoder one level shallower, so that 2 x 2 patches make 8 x 8
   tokens), trained by rectified flow as SD3 and Flux are, and taught where its tokens are in the same way.
3. The project's own scripts, run as a user runs them: prep_boxes.py and prep_latents.py on the images and their
   COCO JSON, train_gligen.py with the base frozen, sample.py on held-out layouts. The GLIGEN stage is GLIGEN's
   recipe plus one lever, the trainer's --box_attn_loss: each fuser's visual tokens inside box k are asked to attend
   to grounding token k, which opens the box-use gap at the first validation instead of after 2,000-4,000 steps
   (docs/time-to-grounding.md). sample.py draws 50 layouts per UNet call, at guidance 1.5: at SD's 7.5 this tiny
   base oversaturates, and a shape's colour is then often missing from the image (docs/shapes-demo.md).
4. The metric: each requested shape is found in the generated image by its colour, and its box is compared with the
   requested one (IoU). Reported for the base model (no grounding) and the adapters at beta = 1. Also checked: with
   the fusers off (beta = 0) the images equal the base model's (on the first 50 layouts); and whether the adapters
   use the boxes at all (the trainer's last validation: loss with the true boxes against the boxes mirrored).

--keypoints=True: the same world with each shape a "person" whose keypoints are its box's corners and centre (nose
the centre, left_eye top right, right_eye top left, left_ankle bottom right, right_ankle bottom left: the mirror
image of a shape swaps them, as the trainer's flip does), written as COCO's person_keypoints JSON; the trainer's
--keypoints=True mode (no phrases: the caption names the shape, the keypoints place it; the attention-loss lever is
for boxes); held-out layouts of one shape each, scored as above with the box its keypoints span. Writes
demo_keypoints/.

--maps=True: the same world with a map per image, each shape's silhouette (1 on the shape, 0 elsewhere, as a depth map
of shapes before a far wall), through prep_latents.py --map=<folder> (your own maps); the trainer's spatial-map mode
with a small ConvNeXt made here at random (no download: the real mode starts from ImageNet's ConvNeXt-T); held-out
layouts of one shape each with its silhouette, scored as above. With the fusers off the map still enters conv_in, so
that check is left out. Writes demo_maps/.

Each stage keeps its output in --out and is skipped when run again. Results: demo/results.json, demo/result.png.
"""
import json
import math
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]  # train_gligen.py and the scripts this one builds on
sys.path.insert(0, str(ROOT))
import train_gligen as tg
from prep_boxes import iou as box_iou
from train_gligen import configure, fail

config = dict(
    family="sd",  # the base: "sd" (a UNet, SD-shaped), "sd3" (an SD3-shaped MMDiT) or "flux" (a Flux-shaped one)
    keypoints=False,  # GLIGEN's keypoint mode instead of boxes (SD base): each shape placed by 5 keypoints
    maps=False,  # GLIGEN's spatial-map mode instead of boxes (SD base): each shape placed by its silhouette
    out="",  # everything the demo makes goes here; "": demo/ (sd), demo_sd3/, demo_flux/
    train_images=4000,  # synthetic training images
    test_layouts=100,  # held-out layouts for the metric
    check_layouts=50,  # of those, how many check that the fusers off give the base's pixels
    seed=0,
    gligen_steps=2000,  # train_gligen.py steps (batch 32)
    gligen_lr=1e-3,  # higher than the SD recipe's 5e-5: a tiny model, a tiny world, a few minutes
    gligen_caption_keep=0.5,  # share of samples that keep their caption (GLIGEN's 0.5); the rest learn from boxes only
    gligen_box_attn_loss=1.0,  # the trainer's --box_attn_loss, fusers' attention sent to their boxes; 0: GLIGEN's
    sample_steps=25,  # sampling steps for the held-out layouts (DDIM; the MMDiTs: flow-matching Euler)
    sample_guidance=1.5,  # classifier-free guidance scale; SD's 7.5 oversaturates this tiny base (docs/shapes-demo.md)
    sample_batch=50,  # layouts per UNet call in sample.py (--batch; main takes its gcd with check_layouts)
    # the base model: the shipped one, or with --train_base=True one trained here with these settings
    train_base=False,
    vae_steps=800,  # autoencoder training steps (batch 32)
    base_steps=4000,  # base text-to-image training steps (batch 32)
    position_aux=1.0,  # weight of the base's where-am-I loss (see train_base); 0 trains a base without it
    positions=0.0,  # share of training captions that also say where each shape is; held-out prompts never do
    prediction="v_prediction",  # the UNet base's target: "v_prediction" (as SD2.x at 768) or "epsilon" (as SD1.x);
    # the MMDiTs' is rectified flow's, as SD3's and Flux's
)
BASE_SETTINGS = ("seed", "train_images", "vae_steps", "base_steps", "position_aux", "positions", "prediction")
SHIPPED_BASES = {family: ROOT / "extras" / name for family, name in
                 (("sd", "shapes_base"), ("sd3", "shapes_base_sd3"), ("flux", "shapes_base_flux"))}
SIZE = 32  # image side in pixels
COLORS = dict(red=(220, 30, 30), green=(30, 160, 50), blue=(30, 60, 220), yellow=(235, 195, 20))
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (235, 235, 235)
PHRASES = [f"{c} {s}" for c in COLORS for s in SHAPES]  # every phrase the shapes world's boxes are trained on
WORDS = ["a", "and", *COLORS, *SHAPES]
WORDS_WITH_PLACES = ["a", "and", "at", "in", "the", *COLORS, *SHAPES, "top", "bottom", "left", "right", "center"]


# -----------------------------------------------------------------------------------------------------------------
# The world: scenes of 1 to 3 non-overlapping shapes of distinct colours.
def scene(rng):
    """(phrases, boxes in pixels [x0, y0, x1, y1)) for one image."""
    phrases, boxes = [], []
    for color in rng.permutation(list(COLORS))[: rng.integers(1, 4)]:
        for _ in range(50):  # find a free spot
            s = int(rng.integers(10, 17))
            x0, y0 = (int(v) for v in rng.integers(0, SIZE - s + 1, 2))
            box = [x0, y0, x0 + s, y0 + s]
            if all(box[0] >= b[2] + 1 or b[0] >= box[2] + 1 or box[1] >= b[3] + 1 or b[1] >= box[3] + 1 for b in boxes):
                phrases.append(f"{color} {rng.choice(SHAPES)}")
                boxes.append(box)
                break
    return phrases, boxes


def render(phrases, boxes, silhouette=False):
    """The image; silhouette: its map instead, 8-bit grey, 255 on the shapes and 0 elsewhere."""
    im = Image.new("L", (SIZE, SIZE), 0) if silhouette else Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    d = ImageDraw.Draw(im)
    for phrase, (x0, y0, x1, y1) in zip(phrases, boxes):
        color, shape = phrase.split()
        fill = 255 if silhouette else COLORS[color]
        if shape == "square":
            d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=fill)
        elif shape == "circle":
            d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        else:
            d.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
    return im


def caption(phrases, boxes=None):
    """"a red circle and a blue square"; with boxes (pixels), each shape's place too: "a red circle at the top left"."""
    parts = [f"a {p}" for p in phrases]
    if boxes is not None:
        parts = [f"{part} {place(b)}" for part, b in zip(parts, boxes)]
    return " and ".join(parts)


def place(box):
    """Where a box's centre falls on a 3 x 3 grid: "at the top left", "at the right", "in the center"."""
    cx, cy = (box[0] + box[2]) / 2 / SIZE, (box[1] + box[3]) / 2 / SIZE
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return f"at the {' '.join(w for w in (row, col) if w)}" if row or col else "in the center"


CORNERS = dict(nose=lambda b: ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2), left_eye=lambda b: (b[2], b[1]),
               right_eye=lambda b: (b[0], b[1]), left_ankle=lambda b: (b[2], b[3]), right_ankle=lambda b: (b[0], b[3]))


def shape_keypoints(box, scale=1.0):
    """A shape's 17 keypoints, COCO's [x, y, v] (v 2 for its CORNERS, 0 for the rest), in box units times scale."""
    return [[*(v * scale for v in CORNERS[k](box)), 2] if k in CORNERS else [0, 0, 0] for k in tg.KEYPOINTS]


def write_world(root, n, rng, positions=0.0, maps=False):
    """n images, COCO instances and captions JSON: the input of prep_boxes.py and prep_latents.py; beside them
    person_keypoints.json, each shape a person with shape_keypoints, and with maps each image's silhouette in maps/."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    if maps:
        (root / "maps").mkdir(exist_ok=True)
    names = [f"{c} {s}" for c in COLORS for s in SHAPES]
    images, anns, caps = [], [], []
    for i in tqdm(range(n), desc="drawing"):
        phrases, boxes = scene(rng)
        name = f"{i:06d}.png"
        render(phrases, boxes).save(root / "images" / name)
        if maps:
            render(phrases, boxes, silhouette=True).save(root / "maps" / name)
        images.append(dict(id=i, file_name=name, width=SIZE, height=SIZE))
        say_where = positions > 0 and rng.random() < positions
        caps.append(dict(id=i, image_id=i, caption=caption(phrases, boxes if say_where else None)))
        for p, (x0, y0, x1, y1) in zip(phrases, boxes):
            anns.append(dict(id=len(anns), image_id=i, category_id=names.index(p), bbox=[x0, y0, x1 - x0, y1 - y0],
                             area=(x1 - x0) * (y1 - y0), iscrowd=0))
    categories = [dict(id=k, name=name) for k, name in enumerate(names)]
    (root / "instances.json").write_text(json.dumps(dict(images=images, annotations=anns, categories=categories)))
    persons = [dict(a, category_id=0, keypoints=[v for p in shape_keypoints(
        [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]) for v in p])
        for a in anns]
    limbs = [[a + 1, b + 1] for a, b in tg.SKELETON]  # COCO's numbering starts at 1
    person = [dict(id=0, name="person", keypoints=list(tg.KEYPOINTS), skeleton=limbs)]
    (root / "person_keypoints.json").write_text(json.dumps(dict(images=images, annotations=persons,
                                                                categories=person)))
    (root / "captions.json").write_text(json.dumps(dict(images=images, annotations=caps)))


def test_layouts(n, rng, keypoints=False, maps=None):
    """Held-out layouts {prompt, phrases, boxes (relative)}, drawn from the same world with another seed; with
    keypoints, one shape each and its keypoints ([x, y], None); with maps (a folder), one shape each and its
    silhouette written there, as the layout's map."""
    out = []
    for k in range(n):
        phrases, boxes = scene(rng)
        phrases, boxes = (phrases[:1], boxes[:1]) if keypoints or maps else (phrases, boxes)
        if maps:
            Path(maps).mkdir(parents=True, exist_ok=True)
            render(phrases, boxes, silhouette=True).save(Path(maps) / f"{k:03d}.png")
        lay = dict(prompt=caption(phrases), phrases=phrases, boxes=[[v / SIZE for v in b] for b in boxes])
        if keypoints:
            lay["keypoints"] = [[p[:2] if p[2] else None for p in shape_keypoints(b, 1 / SIZE)] for b in boxes]
        if maps:
            lay["map"] = str(Path(maps) / f"{k:03d}.png")
        out.append(lay)
    return out


# -----------------------------------------------------------------------------------------------------------------
# The metric: find each requested shape by its colour; IoU of the found box with the requested one.
def find_color(image, color, tol=90):
    """Box [x0, y0, x1, y1) (relative) of the pixels within `tol` of the colour, or None; specks are ignored."""
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    mask = np.linalg.norm(px - np.array(COLORS[color], np.float32), axis=-1) < tol
    rows, cols = np.nonzero(mask.sum(1) >= 2)[0], np.nonzero(mask.sum(0) >= 2)[0]  # lines with 2+ such pixels
    if mask.sum() < 6 or not len(rows) or not len(cols):
        return None
    H, W = mask.shape
    return [cols[0] / W, rows[0] / H, (cols[-1] + 1) / W, (rows[-1] + 1) / H]


def iou(found, box):
    """IoU of the found box with the requested one; 0 when the colour was not found."""
    return 0.0 if found is None else box_iou(found, box)


def score(sample_dir, layouts):
    """Per requested shape, IoU of the same-coloured blob in the generated image with its box."""
    ious = []
    for k, lay in enumerate(layouts):
        im = Image.open(Path(sample_dir) / f"{k:03d}_00.png")
        ious += [iou(find_color(im, p.split()[0]), b) for p, b in zip(lay["phrases"], lay["boxes"])]
    return np.array(ious)


# -----------------------------------------------------------------------------------------------------------------
# The base model, trained on captions alone.
def write_tokenizer(path, words=WORDS, max_length=16):  # 16: "<bos> a red circle and ... <eos>" for 3 shapes
    """A CLIP BPE tokenizer whose merges spell each word of this world into one token (vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:] + [256 + k for k in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    chars = [chr(c) for c in cs]  # CLIP's byte alphabet
    vocab, merges = chars + [c + "</w>" for c in chars], []
    for w in sorted(words, key=len, reverse=True):  # "red": r e -> re, re d</w> -> red</w>; longest words first,
        # so that no shorter word's merge ("a n" of "and") can split a longer one ("triangle") before it is spelled
        piece = w[0]
        for k, ch in enumerate(w[1:], 1):
            nxt = ch + ("</w>" if k == len(w) - 1 else "")
            merges.append(f"{piece} {nxt}")
            piece += nxt
            if piece not in vocab:
                vocab.append(piece)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length)


def save_base(pipeline, model_dir):
    """The base's pipeline, its tokenizers also as vocab.json + merges.txt (what transformers 4's CLIPTokenizer reads;
    transformers 5 writes tokenizer.json alone)."""
    pipeline.save_pretrained(model_dir)
    for folder in Path(model_dir).glob("tokenizer*"):
        if (folder / "vocab.json").is_file():  # transformers 4 wrote them
            continue
        bpe = json.loads((folder / "tokenizer.json").read_text())["model"]
        (folder / "vocab.json").write_text(json.dumps(bpe["vocab"]))
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_vae(family="sd"):
    """The base's tiny autoencoder, untrained: 32 x 32 x 3 -> 8 x 8 x 4 and back; an MMDiT's -> 16 x 16 x 4 (its
    transformer cuts 2 x 2 patches: 8 x 8 tokens, as many as the UNet's first level has)."""
    from diffusers import AutoencoderKL

    levels = 3 if family == "sd" else 2
    return AutoencoderKL(block_out_channels=(16, 32, 32)[:levels], down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=4, norm_num_groups=8,
                         sample_size=SIZE, layers_per_block=1)


def build_denoiser(cfg, tokenizer_dir):
    """The base's other parts, untrained: tokenizer, CLIP text encoder, UNet, training noise schedule."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    L = 32 if cfg["positions"] else 16  # tokens in the longest caption, with places
    tokenizer = write_tokenizer(tokenizer_dir, WORDS_WITH_PLACES if cfg["positions"] else WORDS, L)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=L, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
                                cross_attention_dim=64, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D",) * 2,
                                up_block_types=("CrossAttnUpBlock2D",) * 2)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                    prediction_type=cfg["prediction"])
    return tokenizer, text_encoder, unet, noise_scheduler


def position_code(side):
    """(side * side, 8): sin and cos of pi*k*x and pi*k*y, k = 1, 2, at each token's centre, row by row."""
    c = (torch.arange(side) + 0.5) / side
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    k = torch.tensor([1.0, 2.0])
    return torch.cat([f(torch.pi * k * v.reshape(-1, 1)) for v in (xx, yy) for f in (torch.sin, torch.cos)], 1)


def where_loss(heads, feats):
    """The base's where-am-I loss: each block's linear head reads position_code from the features caught there
    (B, side * side, C), layer-normed; the mean squared error, averaged over the blocks."""
    codes = {j: position_code(int(f.shape[1] ** 0.5)).to(f.device).expand(len(f), -1, -1) for j, f in feats.items()}
    return sum(F.mse_loss(head(F.layer_norm(feats[j], feats[j].shape[-1:])), codes[j])
               for j, head in enumerate(heads)) / len(heads)


def train_base(root, model_dir, cfg):
    """Autoencoder, then the text encoders and the denoiser (UNet or MMDiT) on its latents (captions only, 10% dropped
    for guidance).

    The denoiser is also taught where each of its tokens is. GLIGEN's fusers add no position code to the visual tokens:
    a token can only attend to the box it lies in if the base's features already say where the token is, as a large
    model's do. This tiny base, on a world where nothing depends on place, learns little (a ridge read-out of (x, y)
    from the 8 x 8 features of a UNet base taught places by its captions: R^2 0.15-0.49), and GLIGEN then plateaus for
    8,000-10,000 steps. So a linear head per transformer block (thrown away afterwards) reads position_code from the
    features the fusers will see (a UNet's: the input of cross-attention; an MMDiT's: a joint block's image tokens),
    its error weighted by position_aux. The saved base is a plain diffusers model."""
    torch.manual_seed(cfg["seed"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = sorted(p.name for p in (root / "images").iterdir())
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(root / "images" / n), np.float32)) for n in names])
    x = (x.permute(0, 3, 1, 2) / 127.5 - 1).to(device)  # (N, 3, 32, 32) in [-1, 1]
    captions = {c["image_id"]: c["caption"] for c in json.loads((root / "captions.json").read_text())["annotations"]}
    captions = [captions[int(n[:-4])] for n in names]

    # The autoencoder first.
    vae = build_vae(cfg["family"]).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    for step in (bar := tqdm(range(cfg["vae_steps"]), desc="autoencoder")):
        batch = x[torch.randint(0, len(x), (32,))]
        post = vae.encode(batch).latent_dist
        loss = F.mse_loss(vae.decode(post.sample()).sample, batch) + 1e-6 * post.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
    DENOISERS[cfg["family"]](vae, z, captions, root, model_dir, cfg, device)
    (model_dir / "settings.json").write_text(json.dumps(base_settings(cfg), indent=1) + "\n")


def vocabulary(model):
    """PHRASES for a base that train_base made (its settings.json says so), else None: a real model's is open."""
    made = Path(model) / "settings.json"
    return PHRASES if made.is_file() and "base_steps" in json.loads(made.read_text()) else None


def base_settings(cfg):
    """What a base is made with (its settings.json): the UNet's target, or which MMDiT."""
    keys = BASE_SETTINGS if cfg["family"] == "sd" else (*BASE_SETTINGS[:-1], "family")
    return {k: cfg[k] for k in keys}


def update(opt, params, step, loss, where, cfg, bar):
    """One step of a base's optimizer on the denoising loss plus the weighted where-am-I loss: clipped, lr 1e-3 after
    100 warm-up steps."""
    (loss + cfg["position_aux"] * where).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for g in opt.param_groups:
        g["lr"] = 1e-3 * min(1, (step + 1) / 100)
    opt.step()
    opt.zero_grad(set_to_none=True)
    bar.set_postfix(loss=f"{loss.item():.4f}", where=f"{where.item():.4f}")


def train_unet(vae, z, captions, root, model_dir, cfg, device):
    """The UNet base: text encoder and UNet trained together on (caption, latent) by the v- or epsilon objective."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    vae.register_to_config(scaling_factor=float(1 / z.std()))
    z = z * vae.config.scaling_factor  # unit variance, as SD's factor makes its latents
    tokenizer, text_encoder, unet, noise_scheduler = build_denoiser(cfg, root / "tokenizer")
    unet, text_encoder, L = unet.to(device), text_encoder.to(device), tokenizer.model_max_length
    ids = tokenizer(captions + [""], padding="max_length", max_length=L, return_tensors="pt").input_ids
    ids, empty = ids[:-1].to(device), ids[-1].to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    blocks = [m for m in unet.modules() if m.__class__.__name__ == "BasicTransformerBlock"]
    feats, hooks = {}, []  # each block's cross-attention input, (B, side * side, C), caught on the way
    if cfg["position_aux"]:
        hooks = [b.norm2.register_forward_pre_hook(lambda mod, args, j=j: feats.__setitem__(j, args[0]))
                 for j, b in enumerate(blocks)]
        heads = torch.nn.ModuleList(torch.nn.Linear(b.norm2.normalized_shape[0], 8) for b in blocks).to(device)
        params += list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    for step in (bar := tqdm(range(cfg["base_steps"]), desc="base model")):
        i = torch.randint(0, len(z), (32,))
        tok = torch.where((torch.rand(32, 1) < 0.1).to(device), empty, ids[i])  # 10% without caption: for guidance
        noise, t = torch.randn_like(z[i]), torch.randint(0, 1000, (32,)).to(device)
        text = text_encoder(tok).last_hidden_state
        pred = unet(noise_scheduler.add_noise(z[i], noise, t), t, encoder_hidden_states=text)
        target = noise if cfg["prediction"] == "epsilon" else noise_scheduler.get_velocity(z[i], noise, t)
        loss = F.mse_loss(pred.sample, target)
        update(opt, params, step, loss, where_loss(heads, feats) if hooks else torch.zeros(()), cfg, bar)
        feats.clear()
    for hook in hooks:
        hook.remove()
    scheduler = DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False, steps_offset=1)
    save_base(StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                      scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False), model_dir)


def text_encoder_parts(tokenizer_dir, clip_width):
    """The MMDiTs' text side, untrained: one tokenizer (CLIP's BPE over this world's words, also standing in for
    T5's, which cannot be built offline), a CLIP text encoder config and a T5 encoder 64 wide."""
    from transformers import CLIPTextConfig, T5Config, T5EncoderModel

    tokenizer = write_tokenizer(tokenizer_dir, WORDS, 16)
    clip = CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=clip_width,
                          intermediate_size=2 * clip_width, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=16, projection_dim=clip_width, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer.get_vocab()), d_model=64, d_ff=128, d_kv=16, num_heads=4,
                                 num_layers=2, relative_attention_num_buckets=8, feed_forward_proj="relu",
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 decoder_start_token_id=0))
    return tokenizer, clip, t5


def build_sd3(tokenizer_dir):
    """A tiny SD3, untrained: CLIP-L and CLIP-G (32 wide each, side by side 64; pooled 32 + 32), T5 (64), 4 joint
    blocks 64 wide (4 heads) on 2 x 2 patches of 16 x 16 x 4 latents, the flow scheduler unshifted (shift 1: SD3's 3
    is for 1024 pixels)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer, clip, t5 = text_encoder_parts(tokenizer_dir, 32)
    clip_l, clip_g = CLIPTextModelWithProjection(clip), CLIPTextModelWithProjection(clip)
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                        attention_head_dim=16, num_attention_heads=4, caption_projection_dim=64,
                                        joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=16)
    L = tokenizer.model_max_length
    return SimpleNamespace(
        transformer=transformer, call=tg.sd3_call, density=tg.logit_normal,
        encoders=tg.SD3TextEncoders(clip_l, clip_g, t5, (L, L, L), 64),
        tokenizers=tg.SD3Tokenizers(tg.Tokenizer(tokenizer), tg.Tokenizer(tokenizer), tokenizer, L),
        pipeline=partial(StableDiffusion3Pipeline, transformer=transformer, text_encoder=clip_l, tokenizer=tokenizer,
                         text_encoder_2=clip_g, tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=tokenizer,
                         scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0)))


def build_flux(tokenizer_dir):
    """A tiny Flux (schnell-like: no guidance embedding, so that classifier-free guidance works as on the others):
    CLIP-L (64 wide, its pooled output 64), T5 (64), 3 double-stream and 1 single-stream blocks 64 wide (4 heads, RoPE
    over 4 + 6 + 6 dimensions) on 2 x 2 packed 16 x 16 x 4 latents, the dynamically shifted flow scheduler of Flux."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, clip, t5 = text_encoder_parts(tokenizer_dir, 64)
    clip = CLIPTextModel(clip)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=3, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                         pooled_projection_dim=64, axes_dims_rope=[4, 6, 6], guidance_embeds=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    L = tokenizer.model_max_length
    return SimpleNamespace(
        transformer=transformer, call=tg.flux_call, density=tg.uniform,
        encoders=tg.FluxTextEncoders(clip, t5, (L, L), None), tokenizers=tg.FluxTokenizers(tokenizer, tokenizer, L),
        pipeline=partial(FluxPipeline, transformer=transformer, text_encoder=clip, tokenizer=tokenizer,
                         text_encoder_2=t5, tokenizer_2=tokenizer, scheduler=scheduler))


def train_mmdit(vae, z, captions, root, model_dir, cfg, device, build):
    """An MMDiT base (build: build_sd3 or build_flux): text encoders and transformer trained together on (caption,
    latent) by rectified flow, called as the trainer calls it (x_t = (1 - s) x0 + s noise, target noise - x0; s drawn
    by the family's density); the latents shifted and scaled as SD3's and Flux's VAEs record it."""
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    m = build(root / "tokenizer")
    model, encoders = m.transformer.to(device), m.encoders.to(device)
    ids = m.tokenizers.captions(captions + [""]).to(device)
    ids, empty = ids[:-1], ids[-1]
    params = list(model.parameters()) + list(encoders.parameters())
    feats, hooks = {}, []  # each joint block's image tokens, (B, 64, C), caught on the way out
    if cfg["position_aux"]:
        hooks = [b.register_forward_hook(lambda mod, args, out, j=j: feats.__setitem__(j, out[1]))
                 for j, b in enumerate(model.transformer_blocks)]
        heads = torch.nn.ModuleList(torch.nn.Linear(model.config.num_attention_heads * model.config.attention_head_dim,
                                                    8) for _ in hooks).to(device)
        params += list(heads.parameters())
    g = torch.Generator().manual_seed(cfg["seed"])  # the noise levels
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    for step in (bar := tqdm(range(cfg["base_steps"]), desc="base model")):
        i = torch.randint(0, len(z), (32,))
        tok = torch.where((torch.rand(32, 1) < 0.1).to(device), empty, ids[i])  # 10% without caption: for guidance
        noise, s = torch.randn_like(z[i]), m.density(32, g).to(device)
        x = (1 - s.view(-1, 1, 1, 1)) * z[i] + s.view(-1, 1, 1, 1) * noise
        loss = F.mse_loss(m.call(model, x, s * 1000, encoders.captions(tok), None), noise - z[i])
        update(opt, params, step, loss, where_loss(heads, feats) if hooks else torch.zeros(()), cfg, bar)
        feats.clear()
    for hook in hooks:
        hook.remove()
    save_base(m.pipeline(vae=vae), model_dir)


DENOISERS = {"sd": train_unet, "sd3": partial(train_mmdit, build=build_sd3),
             "flux": partial(train_mmdit, build=build_flux)}


# -----------------------------------------------------------------------------------------------------------------
def run(script, *args):
    """Run one of the project's scripts as a user would; stop the demo if it fails."""
    print(f"\n$ python {script} " + " ".join(args), flush=True)
    if subprocess.run([sys.executable, str(ROOT / script), *args]).returncode:
        fail(f"{script} failed")


def picture(layouts, rows, path):
    """One row per condition (label, sample dir), one column per layout; requested boxes drawn on."""
    tiles = [[tg.draw_grounding(Image.open(Path(sample_dir) / f"{k:03d}_00.png"), lay) for k, lay in enumerate(layouts)]
             for _, sample_dir in rows]
    (w, h), pad, label_w = tiles[0][0].size, 6, 130  # a map layout's tile: the image and its map
    grid = Image.new("RGB", (label_w + len(layouts) * (w + pad), len(rows) * (h + pad)), "white")
    d = ImageDraw.Draw(grid)
    for r, ((label, _), row) in enumerate(zip(rows, tiles)):
        d.text((4, r * (h + pad) + h // 2 - 6), label, fill="black")
        for c, tile in enumerate(row):
            grid.paste(tile, (label_w + c * (w + pad), r * (h + pad)))
    grid.save(path)


def map_encoder(path, seed):
    """A small ConvNeXt at random (2 stages 32 and 64 wide, stride 4: 8 x 8 tokens of a 32 px map) for the
    spatial-map mode, made once: the real mode starts from ImageNet's ConvNeXt-T, which is a download."""
    from transformers import ConvNextConfig, ConvNextModel

    if not (path / "config.json").is_file():
        torch.manual_seed(seed)
        ConvNextModel(ConvNextConfig(patch_size=2, num_stages=2, hidden_sizes=[32, 64], depths=[2, 2])).save_pretrained(
            path)
    return path


def check_settings(cfg):
    """Stop on a setting that cannot work, before anything is made."""
    tg.in_range(cfg, "train_images", 32)  # at least one GLIGEN batch
    tg.in_range(cfg, "test_layouts vae_steps base_steps gligen_steps sample_steps sample_batch check_layouts", 1)
    tg.in_range(cfg, "seed gligen_lr gligen_box_attn_loss position_aux sample_guidance", 0)
    tg.in_range(cfg, "positions gligen_caption_keep", 0, 1)
    if cfg["prediction"] not in ("epsilon", "v_prediction"):
        fail(f"--prediction={cfg['prediction']}: epsilon or v_prediction")
    if not isinstance(cfg["train_base"], bool):
        fail(f"--train_base={cfg['train_base']}: True or False")
    if cfg["family"] not in SHIPPED_BASES:
        fail(f"--family={cfg['family']}: one of {', '.join(SHIPPED_BASES)}")
    if (cfg["keypoints"] or cfg["maps"]) and cfg["family"] != "sd":
        fail("--keypoints=True, --maps=True: those modes are for SD-shaped bases (--family=sd)")
    if cfg["keypoints"] and cfg["maps"]:
        fail("--keypoints=True and --maps=True: one mode at a time")
    if cfg["family"] != "sd" and cfg["positions"]:
        fail("--positions: the MMDiT bases are trained on captions that never say where (--positions=0)")


def main(cfg):
    check_settings(cfg)
    name = "demo_keypoints" if cfg["keypoints"] else "demo_maps" if cfg["maps"] else \
        "demo" if cfg["family"] == "sd" else f"demo_{cfg['family']}"
    out, t0 = Path(cfg["out"] or name), time.time()
    world, data, adapters = out / "world", out / "data", out / "gligen"
    model = out / "base-model" if cfg["train_base"] else SHIPPED_BASES[cfg["family"]]
    out.mkdir(parents=True, exist_ok=True)
    if not (world / "instances.json").exists():
        write_world(world, cfg["train_images"], np.random.default_rng(cfg["seed"]), cfg["positions"], cfg["maps"])
    if not (model / "model_index.json").exists():
        if not cfg["train_base"]:
            fail(f"{model}: the shipped base model is missing; --train_base=True trains one (about 12 minutes)")
        train_base(world, model, cfg)
    made = json.loads((model / "settings.json").read_text())
    if made.get("family", "sd") != cfg["family"]:
        fail(f"{model} is a {made.get('family', 'sd')!r} base, and --family={cfg['family']}: another --out?")
    print(f"base model: {model}; made with " + json.dumps(made))
    layouts = test_layouts(cfg["test_layouts"], np.random.default_rng(cfg["seed"] + 1), cfg["keypoints"],
                           cfg["maps"] and out / "test_maps")
    checked = 0 if cfg["maps"] else min(cfg["check_layouts"], len(layouts))  # maps: conv_in sees the map anyway
    (out / "test_layouts.jsonl").write_text("".join(json.dumps(l) + "\n" for l in layouts))
    (out / "check_layouts.jsonl").write_text("".join(json.dumps(l) + "\n" for l in layouts[:checked]))
    (out / "val_layouts.jsonl").write_text("".join(json.dumps(l) + "\n" for l in layouts[:6]))
    m = f"--model={model}"

    # The project's scripts, as a user runs them.
    if not (data / "boxes.jsonl").exists():
        instances = world / ("person_keypoints.json" if cfg["keypoints"] else "instances.json")
        run("prep_boxes.py", f"--instances={instances}", f"--captions={world / 'captions.json'}",
            f"--out={data / 'boxes.jsonl'}")
    if not (data / "latents" / "index.jsonl").exists():
        run("prep_latents.py", m, f"--images={world / 'images'}", f"--captions={data / 'boxes.jsonl'}",
            f"--out={data / 'latents'}", f"--resolution={SIZE}", "--batch_size=256", "--num_workers=0")
    mode = ["--keypoints=True"] if cfg["keypoints"] else [f"--box_attn_loss={cfg['gligen_box_attn_loss']}"]
    if cfg["maps"]:
        if not (data / "maps" / "index.jsonl").exists():
            run("prep_latents.py", f"--map={world / 'maps'}", f"--images={world / 'images'}", f"--out={data / 'maps'}",
                f"--resolution={SIZE}", "--batch_size=256", "--num_workers=0")
        mode = [f"--maps={data / 'maps'}", f"--map_encoder={map_encoder(out / 'convnext', cfg['seed'])}"]
    run("train_gligen.py", m, f"--latents={data / 'latents'}", f"--boxes={data / 'boxes.jsonl'}",
        f"--out_dir={adapters}", f"--max_steps={cfg['gligen_steps']}", f"--lr={cfg['gligen_lr']}",
        f"--caption_keep={cfg['gligen_caption_keep']}",
        *mode,
        "--warmup_steps=100", "--global_batch=32", "--micro_batch=32",
        "--num_workers=0", "--log_every=100", "--save_every=500", "--val_every=500", "--val_images=512",
        "--val_steps=10",  # the validation grid is a picture; 10 DDIM steps instead of 25 save half a minute
        f"--val_layouts={out / 'val_layouts.jsonl'}", f"--seed={cfg['seed']}")
    conditions = {  # label: (samples directory, layouts, sample.py's arguments); the same seeds in each
        "base model": ("base", "test_layouts", []),
        "adapters, beta=1": ("beta1", "test_layouts", [f"--adapters={adapters}", "--beta=1.0"]),
        "fusers off (beta=0)": ("fusers-off", "check_layouts", [f"--adapters={adapters}", "--beta=0.0"]),
    }
    if not checked:
        del conditions["fusers off (beta=0)"]
    dirs = {name: out / "samples" / d for name, (d, _, _) in conditions.items()}
    # the checked layouts must meet the UNet in the same batches in the base's run and the fusers-off run (another
    # batch size may round the last bits differently): a batch size that divides their number
    batch = math.gcd(cfg["sample_batch"], checked or cfg["sample_batch"])
    for name, (_, which, extra) in conditions.items():
        run("sample.py", m, *extra, f"--layouts={out / (which + '.jsonl')}", "--n=1",
            f"--steps={cfg['sample_steps']}", "--scheduler=auto", f"--height={SIZE}", f"--width={SIZE}",
            f"--guidance={cfg['sample_guidance']}",
            f"--batch={batch}", f"--seed={cfg['seed']}", f"--out_dir={dirs[name]}")

    # The metric.
    results = {}
    for name in list(conditions)[:2]:
        ious = score(dirs[name], layouts)
        results[name] = dict(mean_iou=round(float(ious.mean()), 3), iou_ge_05=round(float((ious >= 0.5).mean()), 3),
                             objects=len(ious))
    same = all(np.array_equal(np.asarray(Image.open(dirs["base model"] / f"{k:03d}_00.png")),
                              np.asarray(Image.open(dirs["fusers off (beta=0)"] / f"{k:03d}_00.png")))
               for k in range(checked))
    if checked:
        results[f"fusers off equals base model ({checked} layouts)"] = same
    # the trainer's box-use check at its last validation: the loss on 512 training images (caption kept, fixed noise)
    # with the true boxes, the boxes mirrored left to right, and no grounding
    last = [r for _, r in tg.read_jsonl(adapters / "log.jsonl") if "val_loss_boxes" in r][-1]
    results["training loss with"] = {k: v for k, v in last.items() if k == "step" or k.startswith("val_loss_")}
    results["minutes"] = round((time.time() - t0) / 60, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    picture(layouts[:6], [("base model", dirs["base model"]), ("adapters, beta=1", dirs["adapters, beta=1"])],
            out / "result.png")
    print(f"\n{'condition':<22} mean IoU   IoU >= 0.5   ({results['base model']['objects']} objects in "
          f"{len(layouts)} held-out layouts)")
    for name in list(conditions)[:2]:
        print(f"{name:<22} {results[name]['mean_iou']:8.3f}   {results[name]['iou_ge_05']:10.3f}")
    if checked:
        print(f"fusers off (beta=0) gives the base model's images exactly, on {checked} layouts: {same}")
    print("training loss (caption kept, 512 images, fixed noise) with " +
          ", ".join(f"{k[9:]} {v:.5f}" for k, v in results["training loss with"].items() if k != "step"))
    print(f"{results['minutes']} minutes; picture: {out / 'result.png'}; numbers: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main(configure(config, sys.argv[1:], __doc__))
