"""
Draw the boxes: a local web app to try GLIGEN adapters, and to watch a training run start to use its boxes.

    pip install -r extras/requirements.txt      # Gradio, its box-drawing component, Playwright (for the test)
    python extras/app.py                        # the shapes demo's shipped base and adapters; open the printed URL
    python extras/app.py --model=stable-diffusion-v1-5/stable-diffusion-v1-5 --adapters=out/coco --watch=out/coco

Generate tab: draw boxes on the canvas (drag to draw, then type the box's phrase; drag to move, the corners to
resize, Delete to remove), or type them in the table (phrase, x0, y0, x1, y1 relative to the image); the two stay in
step, and the table is what is generated from. Write the caption, press Generate. The images come from sample.py's own
code (the Sampler class): for the same layout, seed, steps and scheduler they equal sample.py's PNGs pixel for pixel
(at its default --batch=1; in a batch, up to the last bits).
Each result is shown with its boxes drawn on; the layout saves and loads as the JSONL line sample.py --layouts reads,
and the equivalent sample.py command is shown for copying. Inpainting adapters add a photo (the boxes are drawn on
it; outside them it is kept); text-image adapters add reference images, one per box, named in the table's image
column (a box may have a phrase, an image or both); keypoint adapters add a keypoints box (JSON: one person per
table row, 17 COCO keypoints [x, y] or null each), whose skeletons the canvas shows and the results have drawn on;
spatial-map adapters take a map file (PNG or NPY, as sample.py --map), which the canvas shows and the results have
beside them (the table's boxes are not used); video models give a GIF (still boxes; moving ones: sample.py).

Training tab: point it at a run's out_dir; every few seconds it reads log.jsonl and the newest val_*.png (nothing
else, and it writes nothing) and shows the loss, images/s, the box-use losses and their gap, and says whether the
boxes count yet. A half-written last line of log.jsonl is skipped.

Local and offline: it binds 127.0.0.1, sends no analytics, loads nothing from the internet (Gradio >= 6.17 serves
its own fonts and scripts; the browser test fails on any request that leaves the machine); --share=True is the only
way out. One generation runs at a time; a bad layout shows sample.py's error message and the app keeps serving.
Settings: python extras/app.py --help. The controls start at sample.py's defaults, and on the shipped shapes model
at the demo's (25 DDIM steps, guidance 1.5, beta 1, as its held-out score was measured).
"""
import ast
import atexit
import functools
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # Gradio posts usage to its server unless told not to
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "extras"))
import sample  # noqa: E402  (the project's sampling code, after the path is set)
from demo_shapes import config as demo, vocabulary  # noqa: E402
from train_gligen import (check_image, check_keypoints, check_layouts, configure, draw_keypoints, fail,  # noqa: E402
                          in_range, is_moving, map_for, map_image, read_map)

# the shipped demo: its base, its trained adapters, and the settings it was scored with
SHAPES = dict(model=str(ROOT / "extras" / "shapes_base"), adapters=str(ROOT / "extras" / "shapes_adapters"),
              steps=demo["sample_steps"], guidance=demo["sample_guidance"], beta=1.0)
config = dict(
    model=sample.config["model"],  # base model, as sample.py's --model (given neither this nor --adapters: SHAPES)
    adapters="",  # as sample.py's --adapters; "" = the base model alone
    watch="demo/gligen",  # the training tab's run (out_dir); another can be typed in the page
    # the controls' starting values: sample.py's defaults (with no --model and --adapters, the demo's: SHAPES)
    n=4,  # images per layout
    seed=0,  # the layout's seed
    steps=50,  # denoising steps
    guidance=7.5,  # classifier-free guidance scale
    beta=0.3,  # scheduled sampling: grounding for the first beta * steps steps
    scheduler="auto",  # auto (the family's own: ddim for UNets, flow_euler for SD3 and Flux); UNets: dpm, euler,
    # euler_a, pndm, ddpm
    # fixed while the app runs, as in sample.py
    frames=16,  # video models: frames per clip
    fps=8,  # video models: frames per second of the GIFs
    dtype="auto",  # auto: fp16 on CUDA, fp32 on CPU; or fp32, fp16, bf16
    image_encoder="",  # text-image adapters: their CLIP image encoder; "" = the one they were trained with
    # the server
    host="127.0.0.1",  # the address to serve on; 0.0.0.0 opens it to the network
    port=0,  # 0: the first free port from 7860 up
    share=False,  # True: a public gradio.live link through Gradio's servers (the only thing that leaves the machine)
)
HEADERS = ["phrase", "x0", "y0", "x1", "y1"]
CANVAS = 512  # the drawing canvas's long side, in canvas pixels
REFRESH_S = 3  # the training tab's refresh interval


# -----------------------------------------------------------------------------------------------------------------
# Layouts: the table (the source of truth) <-> the canvas <-> the JSONL line sample.py reads.
def cell(v):
    """A table cell as text ("" for an empty one)."""
    return "" if v is None else str(v).strip()


def table_to_layout(caption, rows, refs=None, keypoints=""):
    """(prompt, table rows [phrase, x0, y0, x1, y1(, image name)], uploaded reference images, keypoints as JSON) ->
    a sample.py layout; numbers typed as text are read, blank rows dropped; checked as sample.py checks --layouts."""
    phrases, boxes, images = [], [], []
    names = [Path(p).name for p in refs or []]
    if len(set(names)) < len(names):
        fail(f"two reference images have the same name ({sorted(n for n in names if names.count(n) > 1)[0]!r}): "
             "rename one, the table names them")
    refs = dict(zip(names, refs or []))
    for i, row in enumerate(rows or []):
        row = [cell(v) for v in row] + [""] * (len(HEADERS) + 1 - len(row))
        if not any(row):
            continue
        try:
            box = [float(v) for v in row[1:5]]
        except ValueError:
            fail(f"the table: row {i + 1}: x0, y0, x1, y1 must be numbers, got {row[1:5]!r}")
        phrase, image = row[0] or None, row[5]
        if image and image not in refs:
            fail(f"the table: row {i + 1}: no reference image named {image!r} was uploaded")
        phrases.append(phrase if phrase is not None or image else "")
        boxes.append(box)
        images.append(refs[image] if image else None)
    layout = dict(prompt=caption or "", phrases=phrases, boxes=boxes)
    if any(images):
        layout["images"] = images
    if keypoints and keypoints.strip():
        layout["keypoints"] = parse_keypoints(keypoints)
    check_layouts([("the table", layout)], images=True)
    return layout


def parse_keypoints(text):
    """The keypoints box's JSON: one person per table row, 17 points [x, y] or null each."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"the keypoints: not JSON ({e}); give one list per box of 17 [x, y] or null")


def skeleton_canvas(text, height, width):
    """A blank canvas with the keypoints' skeletons drawn on, or blank where the text does not read yet."""
    blank = blank_canvas(height, width)
    try:
        persons = json.loads(text or "[]")
        check_keypoints(dict(boxes=persons, keypoints=persons), "the keypoints")
    except (json.JSONDecodeError, TypeError, SystemExit):
        return blank
    return np.asarray(draw_keypoints(Image.fromarray(blank), persons))


def layout_to_rows(layout, columns=len(HEADERS)):
    names = [Path(p).name if p else "" for p in layout.get("images") or [None] * len(layout["phrases"])]
    return [[p or "", *b, n][:columns] for p, b, n in zip(layout["phrases"], layout["boxes"], names)]


def pixel_box(row, w, h):
    """A table row's box in canvas pixels (xmin, ymin, xmax, ymax), or None where it cannot be drawn (not four
    numbers x0 <= x1, y0 <= y1 in [0, 1]: a row being typed, or one sample.py would refuse). A box of no size is
    drawn: the canvas reports one while a box is being dragged out."""
    try:
        x0, y0, x1, y1 = (float(v) for v in row[1:5])
    except (TypeError, ValueError):
        return None
    if not (all(0 <= v <= 1 for v in (x0, y0, x1, y1)) and x1 >= x0 and y1 >= y0):
        return None
    return round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)


def canvas_to_rows(value, old_rows, columns=len(HEADERS)):
    """The table after a change on the canvas. Each canvas box finds its row: the row it was drawn from (its typed
    numbers, phrase and image name kept), else the row of a box just moved or resized (image name kept, the numbers
    from the canvas, relative, to 4 places), else a new row at the end. Rows of deleted boxes go; rows that cannot be
    drawn (being typed) stay where they are."""
    if not value or value.get("image") is None:
        return old_rows
    h, w = np.asarray(value["image"]).shape[:2]
    old = [list(r) + [""] * (6 - len(r)) for r in old_rows or []]
    drawn = [pixel_box(r, w, h) for r in old]
    boxes = [((b["xmin"], b["ymin"], b["xmax"], b["ymax"]), b.get("label") or "") for b in value["boxes"]]
    row_of = {}  # canvas box -> its old row
    for i, (box, _) in enumerate(boxes):
        row_of[i] = next((j for j, d in enumerate(drawn) if d == box and j not in row_of.values()), None)
    left = iter(j for j, d in enumerate(drawn) if d is not None and j not in row_of.values())
    for i in [i for i, j in row_of.items() if j is None]:  # moved or resized: the next row whose box is gone
        row_of[i] = next(left, None)
    new_of_row = {j: i for i, j in row_of.items() if j is not None}
    rows = []
    for j, r in enumerate(old):
        if drawn[j] is None:
            rows.append(r)
        elif j in new_of_row:
            box, label = boxes[new_of_row[j]]
            numbers = r[1:5] if drawn[j] == box else [round(v / d, 4) for v, d in zip(box, (w, h, w, h))]
            rows.append([label, *numbers, r[5]])
    for i, j in row_of.items():
        if j is None:
            box, label = boxes[i]
            rows.append([label, *[round(v / d, 4) for v, d in zip(box, (w, h, w, h))], ""])
    return [r[:columns] for r in rows]


def rows_to_canvas(rows, value):
    """Table rows -> the canvas's boxes on its current image (rows that cannot be drawn are left off)."""
    image = np.asarray(value["image"]) if value and value.get("image") is not None else blank_canvas()
    h, w = image.shape[:2]
    boxes = [dict(zip(("xmin", "ymin", "xmax", "ymax"), b), label=cell(r[0]))
             for r in rows or [] if (b := pixel_box(r, w, h)) is not None]
    return dict(image=image, boxes=boxes)


def blank_canvas(height=CANVAS, width=CANVAS):
    s = CANVAS / max(height, width)
    return np.full((round(height * s), round(width * s), 3), 255, np.uint8)


def map_canvas(path, height, width):
    """A map file as the canvas's picture, as an image of that size takes it, at canvas size."""
    return np.asarray(map_image(map_for(read_map(path), height, width), blank_canvas(height, width).shape[:2][::-1]))


def photo_canvas(path, height, width):
    """The inpainting photo as the sampler sees it (center-cropped to the output's shape) at canvas size, so the
    boxes drawn on it are relative to the output image."""
    check_image(path, "the photo")
    im = sample.open_photo(path)
    size = blank_canvas(height, width).shape[:2][::-1]
    return np.asarray(im.crop(sample.center_crop(im.size, height, width)).resize(size, Image.Resampling.LANCZOS))


def literal(value):
    """value as a Python literal for a --key=value argument: JSON where it reads back the same (lists of strings and
    numbers), else Python's own (None, in image-only boxes)."""
    text = json.dumps(value)
    try:
        return text if ast.literal_eval(text) == value else repr(value)
    except (ValueError, SyntaxError):
        return repr(value)


def sample_command(cfg, layout, opts, photo=None):
    """The sample.py command that makes the same images."""
    q = shlex.quote
    args = [f"--model={q(cfg['model'])}"] + ([f"--adapters={q(cfg['adapters'])}"] if cfg["adapters"] else [])
    args += [f"--prompt={q(layout['prompt'])}", f"--phrases={q(literal(layout['phrases']))}",
             f"--boxes={q(literal(layout['boxes']))}"]
    args += [f"--images={q(literal(layout['images']))}"] if layout.get("images") else []
    args += [f"--keypoints={q(literal(layout['keypoints']))}"] if layout.get("keypoints") else []
    args += [f"--map={q(layout['map'])}"] if layout.get("map") else []
    args += [f"--inpaint_image={q(photo)}"] if photo else []
    args += [f"--{k}={opts[k]}" for k in ("n", "seed", "steps", "guidance", "beta", "scheduler")]
    args += [f"--{k}={cfg[k]}" for k in ("dtype", "frames", "image_encoder") if cfg[k] != sample.config[k]]
    uploads = "# the photo, map and reference images above are the app's copies of your uploads: give your files\n" \
        if photo or layout.get("images") or layout.get("map") else ""
    return uploads + "python sample.py " + " \\\n    ".join(args)


def save_layout(caption, rows, refs, folder, keypoints="", map_path=None):
    layout = table_to_layout(caption, rows, refs, keypoints) | ({"map": map_path} if map_path else {})
    path = Path(folder) / "layout.jsonl"
    path.write_text(json.dumps(layout) + "\n")
    return str(path)


def load_layout(path, columns=len(HEADERS), keypoints=True):
    """The first layout of a JSONL file (sample.py --layouts), checked: (caption, rows, a note, its keypoints as JSON
    or "": without keypoints, left out). Reference images are named in the rows (columns=6), for the user to upload
    again."""
    name = Path(path).name
    try:
        lines = [l for l in Path(path).read_bytes().decode("utf-8").splitlines() if l.strip()]
    except UnicodeDecodeError:
        fail(f"{name}: not a text file (a layout file has one JSON object a line: prompt, phrases, boxes)")
    if not lines:
        fail(f"{name}: no layout in it (one JSON object a line: prompt, phrases, boxes)")
    try:
        layout = json.loads(lines[0])
    except json.JSONDecodeError as e:
        fail(f"{name}:1: not JSON ({e})")
    if isinstance(layout, dict) and is_moving(layout.get("boxes")):
        fail(f"{name}:1: moving boxes (one list per frame) are not drawn here; sample.py --layouts takes them")
    images = layout.get("images") if isinstance(layout, dict) else None
    checked = layout
    if isinstance(images, list) and isinstance(layout.get("phrases"), list) and len(images) == len(layout["phrases"]):
        # an image-only box passes as text here: its image is named in the table, not opened
        checked = {**layout, "phrases": [p if p is not None or im is None else "(image)"
                                         for p, im in zip(layout["phrases"], images)]}
    check_layouts([(f"{name}:1", {k: v for k, v in checked.items() if k != "map"})])  # the map: uploaded again
    note = f"loaded line 1 of {len(lines)} from {name}"
    if images and columns > len(HEADERS):
        note += "; upload its reference images again (the table's image column names them)"
    elif images:
        note += "; its reference images are left out: these adapters take none"
    kp = json.dumps(layout["keypoints"]) if "keypoints" in layout and keypoints else ""
    if "keypoints" in layout and not keypoints:
        note += "; its keypoints are left out: these adapters take none"
    if "map" in layout:
        note += f"; upload its map again ({Path(str(layout['map'])).name})"
    return layout["prompt"], layout_to_rows(layout, columns), note, kp


# -----------------------------------------------------------------------------------------------------------------
# The training tab: read a run's log.jsonl and validation grids, never write.
def read_log(path):
    """The records of a log.jsonl that may be being written: (records, whether a last line without its newline was
    left out (the trainer mid-write), how many other lines were not records and were skipped)."""
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except OSError:
        return [], False, 0
    partial = bool(lines[-1].strip())
    records, bad = [], 0
    for line in lines[:-1]:
        if line.strip():
            try:
                r = json.loads(line)
            except ValueError:
                r = None
            if isinstance(r, dict) and isinstance(r.get("step"), int):
                records.append(r)
            else:
                bad += 1
    return records, partial, bad


def boxes_verdict(val):
    """In words, whether the adapters use their boxes yet, from the box-use validations (docs/time-to-grounding.md):
    the gap is the loss with the boxes mirrored minus the loss with the true boxes."""
    if not val:
        return "No box-use validation yet: the trainer writes one at step 0 and every --val_every steps."
    last, where = val[-1], f"At step {val[-1]['step']}"
    gap = last["val_loss_mirrored"] - last["val_loss_boxes"]
    phrase_gap = last["val_loss_no_grounding"] - last["val_loss_boxes"]
    uses = (f"the phrases are used (no grounding is {phrase_gap:.4f} above the boxes)" if phrase_gap > 1e-3 else
            "the phrases are not used yet either")
    if gap > 1e-3 and gap >= 0.1 * last["val_loss_boxes"]:
        return (f"**Yes, the boxes count.** {where} the gap is {gap:+.4f}, {100 * gap / last['val_loss_boxes']:.0f}% "
                f"of the loss with the true boxes: mirrored boxes put objects in the wrong places.")
    se = last.get("val_gap_se")  # the gap's standard error, logged since it was added to the trainer
    noise = f"under 3 standard errors ({se:.5f})" if se else "within noise"
    if gap <= (3 * se if se else 1e-3):
        if max(abs(gap), abs(phrase_gap)) < 1e-7:
            return f"**Not yet.** {where} the three losses are equal: the gates are closed (a fresh start)."
        return (f"**Not yet.** {where} the gap is {gap:+.5f}, {noise} (grounding shows as gaps of 1e-3 and more "
                f"that grow about tenfold between validations); {uses}.")
    before = val[-2]["val_loss_mirrored"] - val[-2]["val_loss_boxes"] if len(val) > 1 else None
    if before is not None and gap > 3 * max(before, 1e-4):
        return (f"**Arriving.** {where} the gap grew from {before:+.5f} to {gap:+.5f} since step {val[-2]['step']}: "
                "grounding is arriving; the next validations should grow it further.")
    above = f"{gap / se:.1f} standard errors" if se else "above noise"
    return f"**Starting.** {where} the gap is {gap:+.5f}, {above}: the boxes begin to count; {uses}."


def latest_grid(out):
    """The newest validation grid that reads whole (one being written is passed over), as (PIL image, name)."""
    for p in sorted(Path(out).glob("val_*.png"), reverse=True):
        try:
            with Image.open(p) as im:
                im.load()
                return im.copy(), p.name
        except (OSError, SyntaxError, ValueError):
            continue
    return None, None


def watch_run(out_dir):
    """(status line, verdict, loss, images/s, box-use losses, gaps, latest grid) for the training tab."""
    import pandas as pd

    out = Path(out_dir or ".")
    records, partial, bad = read_log(out / "log.jsonl")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss_boxes" in r]
    grid, grid_name = latest_grid(out)
    if not records:
        status = f"No log yet at {out / 'log.jsonl'}: start train_gligen.py --out_dir={out}; this page refreshes."
    else:
        r = train[-1] if train else records[-1]
        status = f"step {r['step']}" + (f" of {r['max_steps']}" if "max_steps" in r else "")
        status += f" · {r['img_per_s']:.1f} images/s · loss {r['loss']:.4f}" if train else ""
        if "left_s" in r:
            status += f" · about {r['left_s'] // 3600}h {r['left_s'] % 3600 // 60:02d}m left (steps only)"
        status += f" · latest grid {grid_name}" if grid_name else ""
        status += " · the last line is being written" if partial else ""
        status += f" · {bad} line(s) not records, skipped" if bad else ""

    def series(rows, keys):  # long format, as the plots take it: one row per step and series
        return pd.DataFrame([dict(step=r["step"], value=r[k], series=name) for r in rows for k, name in keys.items()
                             if k in r], columns=["step", "value", "series"])

    loss = series(train, {"loss": "training loss"})
    speed = series(train, {"img_per_s": "images/s"})
    box_use = series(val, {"val_loss_boxes": "true boxes", "val_loss_mirrored": "mirrored boxes",
                           "val_loss_no_grounding": "no grounding"})
    gaps = pd.DataFrame([dict(step=r["step"], value=r[a] - r["val_loss_boxes"], series=name) for r in val
                         for a, name in (("val_loss_mirrored", "mirrored - true (the boxes)"),
                                         ("val_loss_no_grounding", "no grounding - true (the phrases)"))] +
                        [dict(step=r["step"], value=3 * r["val_gap_se"], series="3 standard errors of the gap")
                         for r in val if r.get("val_gap_se") is not None] +
                        [dict(step=r["step"], value=r["val_gap_high_noise"], series="the gap at high noise")
                         for r in val if r.get("val_gap_high_noise") is not None],
                        columns=["step", "value", "series"])
    return status, boxes_verdict(val), loss, speed, box_use, gaps, grid


# -----------------------------------------------------------------------------------------------------------------
# The app.
def build(cfg, sampler):
    import gradio as gr
    from gradio_image_annotation import image_annotator

    work = Path(tempfile.mkdtemp(prefix="gligen-app-"))  # generated images and saved layouts, deleted at exit
    atexit.register(shutil.rmtree, work, True)
    h, w = sampler.height, sampler.width
    kind = dict(sd="Stable Diffusion", sdxl="SDXL", video="video", sd3="SD3", flux="Flux")[sampler.family]
    mode = "inpainting" if sampler.inpaint else "text-image" if sampler.text_image else \
        "keypoint" if sampler.keypoints else "spatial-map" if sampler.spatial else "text-box"
    columns = HEADERS + (["image"] if sampler.text_image else [])
    known = vocabulary(cfg["model"])  # the shapes base's 12 phrases; None for a real model

    def shown(fn):
        """fn with the scripts' one-line "error: ..." (a SystemExit) shown in the page, the server kept running."""
        @functools.wraps(fn)  # Gradio reads fn's signature (the progress tracker's default)
        def run(*args):
            try:
                return fn(*args)
            except SystemExit as e:
                raise gr.Error(str(e), print_exception=False) from None
        return run

    @shown
    def generate(caption, rows, n, seed, steps, guidance, beta, scheduler, photo=None, refs=None, keypoints="",
                 map_path=None, progress=gr.Progress(track_tqdm=True)):
        layout = table_to_layout(caption, rows, refs, keypoints if sampler.keypoints else "")
        layout |= {"map": map_path} if map_path and sampler.spatial else {}
        sampler.check([layout], photo)  # sample.py's checks and messages: the photo, reference images, video
        if warning := off_vocabulary(layout, known):
            gr.Warning(warning)
        for k, v in dict(images=n, seed=seed, steps=steps, guidance=guidance, beta=beta).items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                fail(f"{k} must be a number, got {v!r}")
        opts = dict(n=int(n), seed=int(seed), steps=int(steps), guidance=float(guidance), beta=float(beta),
                    scheduler=scheduler)
        sample.check_settings({**sampler.cfg, **opts, "out_dir": str(work)})
        images = sampler.draw([layout], [opts["seed"]], n=opts["n"], steps=opts["steps"], guidance=opts["guidance"],
                              beta=opts["beta"], scheduler=scheduler, inpaint_image=photo)
        out = Path(tempfile.mkdtemp(dir=work))
        paths = sample.write_images(out, "000", images, layout, sampler.video, cfg["fps"])
        labelled = [(str(b), f"seed {opts['seed']}, image {i}") for i, (_, b) in enumerate(paths)]
        return labelled, [str(p) for p, _ in paths], sample_command(cfg, layout, opts, photo)

    with gr.Blocks(title="GLIGEN: draw the boxes", analytics_enabled=False) as app:
        gr.Markdown(f"## GLIGEN: draw the boxes\n{kind} model `{cfg['model']}`, {mode} adapters "
                    f"`{cfg['adapters'] or '(none: the base model alone, boxes ignored)'}`, {w} x {h} pixels")
        with gr.Tab("Generate") as generate_tab:
            with gr.Row():
                with gr.Column(scale=1):
                    photo = gr.File(label="Photo to inpaint (kept outside the boxes; drawn on the canvas)",
                                    file_types=["image"], type="filepath", visible=sampler.inpaint)
                    canvas = image_annotator(dict(image=blank_canvas(h, w), boxes=[]), image_type="numpy",
                                             label="Boxes: drag to draw one and type its phrase; drag to move; "
                                                   "Delete removes", box_min_size=4, show_remove_button=True,
                                             sources=[], show_clear_button=False, show_download_button=False,
                                             elem_id="canvas")
                    table = gr.Dataframe(headers=columns, datatype=["str"] + ["number"] * 4 + ["str"] * (
                                         len(columns) - 5), type="array", interactive=True, column_count=len(columns),
                                         label="Boxes (x0, y0, x1, y1 relative to the image); the table is what "
                                               "is generated", elem_id="table")
                    refs = gr.File(label="Reference images (name each in the table's image column)",
                                   file_count="multiple", file_types=["image"], visible=sampler.text_image)
                    keypoints = gr.Textbox(label="Keypoints (JSON): one person per box, 17 COCO keypoints [x, y] "
                                                 "or null each; the canvas shows their skeletons", value="",
                                           lines=3, visible=sampler.keypoints, elem_id="keypoints")
                    map_file = gr.File(label="Map (PNG or NPY, aligned with the image): the image follows it; the "
                                             "boxes are not used", file_types=[".png", ".npy", ".tif", ".tiff"],
                                       type="filepath", visible=sampler.spatial, elem_id="map")
                    caption = gr.Textbox(label="Caption", value="", elem_id="caption")
                    if known:
                        gr.Markdown(f"This shapes model knows {len(known)} phrases, and only these ground: "
                                    + ", ".join(f"`{p}`" for p in known), elem_id="vocabulary")
                    with gr.Row():
                        n = gr.Slider(1, max(8, cfg["n"]), cfg["n"], step=1, label="Images")
                        seed = gr.Number(cfg["seed"], precision=0, label="Seed")
                        steps = gr.Slider(1, max(150, cfg["steps"]), cfg["steps"], step=1, label="Steps")
                    with gr.Row():
                        guidance = gr.Slider(0, 20, cfg["guidance"], step=0.5, label="Guidance")
                        beta = gr.Slider(0, 1, cfg["beta"], step=0.05,
                                         label="Beta: grounding for this share of the steps (scheduled sampling)")
                        scheduler = gr.Dropdown(["auto", *sampler.stages.samplers], value=cfg["scheduler"],
                                                label="Scheduler")
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=1):
                    boxed = gr.Gallery(label="With the boxes drawn on", format="png", columns=2, elem_id="boxed")
                    plain = gr.Gallery(label="As generated (sample.py's PNGs)", format="png", columns=4)
                    command = gr.Code(label="The same with sample.py", language="shell")
                    with gr.Row():
                        save = gr.Button("Save layout (JSONL)")
                        saved = gr.File(label="Layout", interactive=False)
                    load = gr.File(label="Load a layout (the first line of a --layouts JSONL)", file_types=[".jsonl",
                                   ".json"], type="filepath")
                    note = gr.Markdown()
        with gr.Tab("Training") as training_tab:
            gr.Markdown("Reads the run's `log.jsonl` and newest `val_*.png` every few seconds; writes nothing.")
            watch = gr.Textbox(cfg["watch"], label="Run (out_dir)", elem_id="watch")
            status, verdict = gr.Markdown(elem_id="status"), gr.Markdown(elem_id="verdict")
            with gr.Row():
                loss_plot = gr.LinePlot(x="step", y="value", color="series", title="Training loss", y_title="loss",
                                        elem_id="loss_plot")
                speed_plot = gr.LinePlot(x="step", y="value", color="series", title="Speed", y_title="images/s")
            with gr.Row():
                use_plot = gr.LinePlot(x="step", y="value", color="series", y_title="loss",
                                       title="Box use: validation loss with the true boxes, mirrored, none")
                gap_plot = gr.LinePlot(x="step", y="value", color="series", y_title="gap", title="The gaps",
                                       elem_id="gap_plot")
            grid = gr.Image(label="Latest validation grid", type="pil", format="png", interactive=False,
                            elem_id="grid")
            timer = gr.Timer(REFRESH_S, active=False)  # ticks while the tab is open

        inputs = [caption, table, n, seed, steps, guidance, beta, scheduler, photo, refs, keypoints, map_file]
        go.click(generate, inputs, [boxed, plain, command], api_name="generate", concurrency_limit=1)
        canvas.change(lambda v, rows: canvas_to_rows(v, rows, len(columns)), [canvas, table], table,
                      api_visibility="private", queue=False)
        table.input(rows_to_canvas, [table, canvas], canvas, api_visibility="private", queue=False)
        # the photo under the boxes already drawn (the table's)
        photo.upload(shown(lambda p, rows: rows_to_canvas(rows, dict(image=photo_canvas(p, h, w)))), [photo, table],
                     canvas, api_visibility="private")
        photo.clear(lambda rows: rows_to_canvas(rows, dict(image=blank_canvas(h, w))), table, canvas,
                    api_visibility="private")
        map_file.upload(shown(lambda p, rows: rows_to_canvas(rows, dict(image=map_canvas(p, h, w)))),
                        [map_file, table], canvas, api_visibility="private")
        if sampler.keypoints:
            keypoints.change(lambda text, rows: rows_to_canvas(rows, dict(image=skeleton_canvas(text, h, w))),
                             [keypoints, table], canvas, api_visibility="private", queue=False)

        @shown
        def on_load(path, value):
            c, rows, msg, kp = load_layout(path, len(columns), sampler.keypoints)
            return c, rows, rows_to_canvas(rows, value), msg, kp

        save.click(shown(lambda c, rows, r, kp, m: save_layout(c, rows, r, tempfile.mkdtemp(dir=work),
                                                               kp if sampler.keypoints else "", m)),
                   [caption, table, refs, keypoints, map_file], saved, api_visibility="private")
        load.upload(on_load, [load, canvas], [caption, table, canvas, note, keypoints], api_visibility="private")
        watched = [status, verdict, loss_plot, speed_plot, use_plot, gap_plot, grid]
        watch.submit(watch_run, watch, watched, api_name="watch", queue=False)
        for event in (app.load, timer.tick, training_tab.select):
            event(watch_run, watch, watched, api_visibility="private", queue=False, show_progress="hidden")
        training_tab.select(lambda: gr.Timer(active=True), None, timer, api_visibility="private", queue=False)
        generate_tab.select(lambda: gr.Timer(active=False), None, timer, api_visibility="private", queue=False)
    return app


def sample_settings(cfg):
    """sample.py's settings for the app's."""
    return {**sample.config, **cfg, "export": "", "out_dir": tempfile.gettempdir()}


def off_vocabulary(layout, known):
    """A warning naming the layout's phrases that a fixed-vocabulary model (the shapes base) never saw, or None."""
    if known is None:
        return None
    unknown = [p for p in layout["phrases"] if p is not None and p not in known]
    return f"not phrases this model knows, so they will not ground: {', '.join(map(repr, unknown))}. It knows: " \
           f"{', '.join(known)}" if unknown else None


def check_settings(cfg):
    """sample.py's checks of the app's settings, and the port's, before the model loads."""
    in_range(cfg, "port", 0, 65535)
    sample.check_settings(sample_settings(cfg))


def main(cfg, argv):
    given = {a.removeprefix("--").partition("=")[0] for a in argv}
    if not given & {"model", "adapters"}:  # the shipped demo: score-setting controls unless set
        cfg.update({k: v for k, v in SHAPES.items() if k not in given})
    check_settings(cfg)
    sampler = sample.Sampler(sample_settings(cfg))
    sampler.load()
    app = build(cfg, sampler)
    app.queue(default_concurrency_limit=1)
    return app


if __name__ == "__main__":
    argv = sys.argv[1:]
    cfg = configure(config, argv, __doc__)
    main(cfg, argv).launch(server_name=cfg["host"], server_port=cfg["port"] or None, share=cfg["share"],
                           show_error=True, footer_links=["gradio"])
