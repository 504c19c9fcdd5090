"""
Draw the boxes: a local web app to try GLIGEN adapters, and to watch a training run start to use its boxes.

    pip install -r extras/requirements.txt      # Gradio, its box-drawing component, Playwright (for the test)
    python extras/app.py                        # the shapes demo's shipped base and adapters; open the printed URL
    python extras/app.py --model=stable-diffusion-v1-5/stable-diffusion-v1-5 --adapters=out/coco --watch=out/coco

Generate tab: draw boxes on the canvas (drag to draw, then type the box's phrase; drag to move, the corners to
resize, Delete to remove), or type them in the table (phrase, x0, y0, x1, y1 relative to the image); the two stay in
step, and the table is what is generated from. Write the caption, press Generate. The images come from sample.py's own
code (the Sampler class): for the same layout, seed, steps and scheduler they equal sample.py's PNGs pixel for pixel.
Each result is shown with its boxes drawn on; the layout saves and loads as the JSONL line sample.py --layouts reads,
and the equivalent sample.py command is shown for copying. Inpainting adapters add a photo (the boxes are drawn on
it; outside them it is kept); text-image adapters add reference images, one per box, named in the table's image
column (a box may have a phrase, an image or both); video models give a GIF (still boxes; moving ones: sample.py).

Training tab: point it at a run's out_dir; every few seconds it reads log.jsonl and the newest val_*.png (nothing
else, and it writes nothing) and shows the loss, images/s, the box-use losses and their gap, and says whether the
boxes count yet. A half-written last line of log.jsonl is skipped.

Local and offline: it binds 127.0.0.1, sends no analytics, loads nothing from the internet (Gradio >= 6.17 serves
its own fonts and scripts; the browser test fails on any request that leaves the machine); --share=True is the only
way out. One generation runs at a time; a bad layout shows sample.py's error message and the app keeps serving.
Settings: python extras/app.py --help. The controls start at sample.py's defaults, and on the shipped shapes model
at the demo's (25 DDIM steps, beta 1, as its held-out score was measured).
"""
import atexit
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
import sample  # noqa: E402  (the project's sampling code, after the path is set)
from train_gligen import check_image, check_layouts, configure, fail, is_moving  # noqa: E402

SHAPES = dict(model=str(ROOT / "extras" / "shapes_base"), adapters=str(ROOT / "extras" / "shapes_adapters"),
              steps=25, beta=1.0)  # the shipped demo: its base, its trained adapters, the settings it was scored with
config = dict(
    model=SHAPES["model"],  # base model, as sample.py's --model (default: the shapes demo's shipped base)
    adapters=SHAPES["adapters"],  # as sample.py's --adapters (default: the demo's shipped adapters); "" = none
    watch="demo/gligen",  # the training tab's run (out_dir); another can be typed in the page
    # the controls' starting values: sample.py's defaults (with no --model and --adapters, the demo's steps and beta)
    n=4,  # images per layout
    seed=0,  # the layout's seed
    steps=50,  # denoising steps
    guidance=7.5,  # classifier-free guidance scale
    beta=0.3,  # scheduled sampling: grounding for the first beta * steps steps
    scheduler="ddim",  # ddim, dpm, euler, euler_a, pndm, ddpm
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
def table_to_layout(caption, rows, refs=None):
    """(prompt, table rows [phrase, x0, y0, x1, y1(, image name)], uploaded reference images) -> a sample.py layout;
    numbers typed as text are read, blank rows dropped; checked as sample.py checks --layouts."""
    phrases, boxes, images = [], [], []
    refs = {Path(p).name: p for p in refs or []}
    for i, row in enumerate(rows or []):
        row = list(row) + [""] * (len(HEADERS) + 1 - len(row))
        if all(v in ("", None) for v in row):
            continue
        try:
            box = [float(v) for v in row[1:5]]
        except (TypeError, ValueError):
            fail(f"the table: row {i + 1}: x0, y0, x1, y1 must be numbers, got {row[1:5]!r}")
        phrase, image = (row[0] or "").strip() or None, (row[5] or "").strip() if len(row) > 5 else ""
        if image and image not in refs:
            fail(f"the table: row {i + 1}: no reference image named {image!r} was uploaded")
        phrases.append(phrase if phrase is not None or image else "")
        boxes.append(box)
        images.append(refs[image] if image else None)
    layout = dict(prompt=caption or "", phrases=phrases, boxes=boxes)
    if any(images):
        layout["images"] = images
    check_layouts([("the table", layout)], images=True)
    return layout


def layout_to_rows(layout, columns=len(HEADERS)):
    names = [Path(p).name if p else "" for p in layout.get("images") or [None] * len(layout["phrases"])]
    return [[p or "", *b, n][:columns] for p, b, n in zip(layout["phrases"], layout["boxes"], names)]


def canvas_to_rows(value, old_rows, columns=len(HEADERS)):
    """The canvas's boxes (pixels of its image) -> table rows, relative and rounded to 4 places; an image name typed
    in the table (text-image adapters' 6th column) stays with its box."""
    if not value or value.get("image") is None:
        return old_rows
    h, w = np.asarray(value["image"]).shape[:2]
    old_rows = [list(r) + [""] * (6 - len(r)) for r in old_rows or []]
    old_boxes = rows_to_canvas(old_rows, value)["boxes"] if len(old_rows) == len(value["boxes"]) else []
    rows = []
    for i, b in enumerate(value["boxes"]):
        b = {k: b.get(k) for k in ("xmin", "ymin", "xmax", "ymax", "label")}
        b["label"] = b["label"] or ""
        if i < len(old_boxes) and old_boxes[i] == b:  # this box as typed in the table: keep its exact numbers
            rows.append(old_rows[i])
            continue
        rows.append([b["label"], round(b["xmin"] / w, 4), round(b["ymin"] / h, 4), round(b["xmax"] / w, 4),
                     round(b["ymax"] / h, 4), old_rows[i][5] if i < len(old_rows) else ""])
    return [r[:columns] for r in rows]


def rows_to_canvas(rows, value):
    """Table rows -> the canvas's boxes on its current image (rows that are not four numbers in [0, 1] skipped)."""
    image = np.asarray(value["image"]) if value and value.get("image") is not None else blank_canvas()
    h, w = image.shape[:2]
    boxes = []
    for row in rows or []:
        try:
            x0, y0, x1, y1 = (float(v) for v in row[1:5])
        except (TypeError, ValueError):
            continue
        if all(0 <= v <= 1 for v in (x0, y0, x1, y1)) and x1 > x0 and y1 > y0:
            boxes.append(dict(xmin=round(x0 * w), ymin=round(y0 * h), xmax=round(x1 * w), ymax=round(y1 * h),
                              label=str(row[0] or "")))
    return dict(image=image, boxes=boxes)


def blank_canvas(height=CANVAS, width=CANVAS):
    s = CANVAS / max(height, width)
    return np.full((round(height * s), round(width * s), 3), 255, np.uint8)


def photo_canvas(path, height, width):
    """The inpainting photo as the sampler sees it (center-cropped to the output's shape) at canvas size, so the
    boxes drawn on it are relative to the output image."""
    check_image(path, "the photo")
    im = Image.open(path).convert("RGB")
    s = min(im.width / width, im.height / height)
    left, top = (im.width - width * s) / 2, (im.height - height * s) / 2
    size = blank_canvas(height, width).shape[:2][::-1]
    return np.asarray(im.crop((left, top, left + width * s, top + height * s)).resize(size, Image.Resampling.LANCZOS))


def sample_command(cfg, layout, opts, photo=None):
    """The sample.py command that makes the same images."""
    q = shlex.quote
    args = [f"--model={q(cfg['model'])}"] + ([f"--adapters={q(cfg['adapters'])}"] if cfg["adapters"] else [])
    args += [f"--prompt={q(layout['prompt'])}", f"--phrases={q(json.dumps(layout['phrases']))}",
             f"--boxes={q(json.dumps(layout['boxes']))}"]  # JSON lists of strings and numbers are Python literals
    args += [f"--images={q(repr(layout['images']))}"] if layout.get("images") else []
    args += [f"--inpaint_image={q(photo)}"] if photo else []
    args += [f"--{k}={opts[k]}" for k in ("n", "seed", "steps", "guidance", "beta", "scheduler")]
    args += [f"--{k}={cfg[k]}" for k in ("dtype", "frames", "image_encoder") if cfg[k] != sample.config[k]]
    return "python sample.py " + " \\\n    ".join(args)


def save_layout(caption, rows, refs, folder):
    layout = table_to_layout(caption, rows, refs)
    path = Path(folder) / "layout.jsonl"
    path.write_text(json.dumps(layout) + "\n")
    return str(path)


def load_layout(path, columns=len(HEADERS)):
    """The first layout of a JSONL file (sample.py --layouts), checked: (caption, rows, a note)."""
    lines = [l for l in Path(path).read_text().splitlines() if l.strip()]
    if not lines:
        fail(f"{Path(path).name}: no layout in it (one JSON object a line: prompt, phrases, boxes)")
    try:
        layout = json.loads(lines[0])
    except json.JSONDecodeError as e:
        fail(f"{Path(path).name}:1: not JSON ({e})")
    if isinstance(layout, dict) and is_moving(layout.get("boxes")):
        fail(f"{Path(path).name}:1: moving boxes (one list per frame) are not drawn here; sample.py --layouts takes "
             "them")
    check_layouts([(f"{Path(path).name}:1", layout)])
    note = f"loaded line 1 of {len(lines)} from {Path(path).name}" + (
        "; its reference images are not loaded: upload them and name them in the table" if layout.get("images") else "")
    return layout["prompt"], layout_to_rows(layout, columns), note


# -----------------------------------------------------------------------------------------------------------------
# The training tab: read a run's log.jsonl and validation grids, never write.
def read_log(path):
    """The records of a log.jsonl that may be being written: a last line without its newline is skipped (the trainer
    is mid-write), as are lines that are not JSON objects. (records, lines skipped)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return [], 0
    lines, skipped, records = data.split(b"\n"), 0, []
    if lines and lines[-1].strip():
        lines, skipped = lines[:-1], 1  # the half-written last line
    for line in lines:
        if line.strip():
            try:
                r = json.loads(line)
            except ValueError:
                r = None
            if isinstance(r, dict) and isinstance(r.get("step"), int):
                records.append(r)
            else:
                skipped += 1
    return records, skipped


def boxes_verdict(val):
    """In words, whether the adapters use their boxes yet, from the box-use validations (README, "Do the boxes count
    yet?"): the gap is the loss with the boxes mirrored minus the loss with the true boxes."""
    if not val:
        return "No box-use validation yet: the trainer writes one at step 0 and every --val_every steps."
    last = val[-1]
    gap = last["val_loss_mirrored"] - last["val_loss_boxes"]
    phrases = last["val_loss_no_grounding"] - last["val_loss_boxes"]
    uses = ("the phrases are used (no grounding is {:.4f} above the boxes)".format(phrases) if phrases > 1e-3 else
            "the phrases are not used yet either")
    where = f"At step {last['step']}"
    if len(val) == 1 or gap <= 1e-3:
        if last["step"] == 0:
            return f"{where} the gates are closed: the three losses are equal. Not yet."
        return (f"**Not yet.** {where} the gap is {gap:+.5f}, within noise (grounding shows as gaps of 1e-3 and more "
                f"that grow about tenfold between validations); {uses}.")
    before = val[-2]["val_loss_mirrored"] - val[-2]["val_loss_boxes"]
    if gap >= 0.1 * last["val_loss_boxes"]:
        return (f"**Yes, the boxes count.** {where} the gap is {gap:+.4f}, {100 * gap / last['val_loss_boxes']:.0f}% "
                f"of the loss with the true boxes: mirrored boxes put objects in the wrong places.")
    if gap > 3 * max(before, 1e-4):
        return (f"**Arriving.** {where} the gap grew from {before:+.5f} to {gap:+.5f} since step {val[-2]['step']}: "
                "grounding is arriving; the next validations should grow it further.")
    return f"**Starting.** {where} the gap is {gap:+.5f} (was {before:+.5f}): the boxes begin to count; {uses}."


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
    records, skipped = read_log(out / "log.jsonl")
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
        status += f" · {skipped} line(s) skipped (one being written)" if skipped else ""
    series = lambda rows, keys: pd.DataFrame(  # noqa: E731  (long format: one row per step and series)
        [dict(step=r["step"], value=r[k], series=name) for r in rows for k, name in keys.items() if k in r],
        columns=["step", "value", "series"])
    loss = series(train, {"loss": "training loss"})
    speed = series(train, {"img_per_s": "images/s"})
    box_use = series(val, {"val_loss_boxes": "true boxes", "val_loss_mirrored": "mirrored boxes",
                           "val_loss_no_grounding": "no grounding"})
    gaps = pd.DataFrame([dict(step=r["step"], value=r[a] - r["val_loss_boxes"], series=name) for r in val
                         for a, name in (("val_loss_mirrored", "mirrored - true (the boxes)"),
                                         ("val_loss_no_grounding", "no grounding - true (the phrases)"))],
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
    kind = dict(sd="Stable Diffusion", sdxl="SDXL", video="video")[sampler.family]
    mode = "inpainting" if sampler.inpaint else "text-image" if sampler.text_image else "text-box"
    columns = HEADERS + (["image"] if sampler.text_image else [])

    def shown(fn):
        """fn with the scripts' one-line "error: ..." (a SystemExit) shown in the page, the server kept running."""
        def run(*args):
            try:
                return fn(*args)
            except SystemExit as e:
                raise gr.Error(str(e), print_exception=False) from None
        return run

    @shown
    def generate(caption, rows, n, seed, steps, guidance, beta, scheduler, photo=None, refs=None,
                 progress=gr.Progress(track_tqdm=True)):
        layout = table_to_layout(caption, rows, refs)
        if photo and not sampler.inpaint:
            fail("a photo is for inpainting adapters (trained with --inpaint=True)")
        if photo:
            check_image(photo, "the photo")
        sampler.check([layout], photo)
        opts = dict(n=int(n), seed=int(seed), steps=int(steps), guidance=float(guidance), beta=float(beta),
                    scheduler=scheduler)
        sample.check_settings({**sample.config, **cfg, **opts, "out_dir": str(work), "export": ""})
        images = sampler.draw(layout, seed=opts["seed"], n=opts["n"], steps=opts["steps"], guidance=opts["guidance"],
                              beta=opts["beta"], scheduler=scheduler, inpaint_image=photo)
        out = Path(tempfile.mkdtemp(dir=work))
        paths = sample.write_images(out, "000", images, layout, sampler.video, cfg["fps"])
        labelled = [(str(b), f"seed {opts['seed']}, image {i}") for i, (_, b) in enumerate(paths)]
        return labelled, [str(p) for p, _ in paths], sample_command(cfg, layout, opts, photo)

    with gr.Blocks(title="GLIGEN: draw the boxes", analytics_enabled=False) as app:
        gr.Markdown(f"## GLIGEN: draw the boxes\n{kind} model `{cfg['model']}`, {mode} adapters "
                    f"`{cfg['adapters'] or '(none: the base model alone, boxes ignored)'}`, {w} x {h} pixels")
        with gr.Tab("Generate"):
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
                    caption = gr.Textbox(label="Caption", value="", elem_id="caption")
                    with gr.Row():
                        n = gr.Slider(1, 8, cfg["n"], step=1, label="Images")
                        seed = gr.Number(cfg["seed"], precision=0, label="Seed")
                        steps = gr.Slider(1, 150, cfg["steps"], step=1, label="Steps")
                    with gr.Row():
                        guidance = gr.Slider(0, 20, cfg["guidance"], step=0.5, label="Guidance")
                        beta = gr.Slider(0, 1, cfg["beta"], step=0.05,
                                         label="Beta: grounding for this share of the steps (scheduled sampling)")
                        scheduler = gr.Dropdown(list(sample.SCHEDULERS), value=cfg["scheduler"], label="Scheduler")
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
        with gr.Tab("Training"):
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
            timer = gr.Timer(REFRESH_S)

        inputs = [caption, table, n, seed, steps, guidance, beta, scheduler, photo, refs]
        go.click(generate, inputs, [boxed, plain, command], api_name="generate", concurrency_limit=1)
        canvas.change(lambda v, rows: canvas_to_rows(v, rows, len(columns)), [canvas, table], table,
                      api_visibility="private", queue=False)
        table.input(rows_to_canvas, [table, canvas], canvas, api_visibility="private", queue=False)
        photo.upload(shown(lambda p: dict(image=photo_canvas(p, h, w), boxes=[])), photo, canvas,
                     api_visibility="private")
        photo.clear(lambda: dict(image=blank_canvas(h, w), boxes=[]), None, canvas, api_visibility="private")

        @shown
        def on_load(path, value):
            if not path:
                return gr.skip(), gr.skip(), gr.skip(), ""
            c, rows, msg = load_layout(path, len(columns))
            return c, rows, rows_to_canvas(rows, value), msg

        save.click(shown(lambda c, rows, r: save_layout(c, rows, r, tempfile.mkdtemp(dir=work))), [caption, table, refs],
                   saved, api_visibility="private")
        load.upload(on_load, [load, canvas], [caption, table, canvas, note], api_visibility="private")
        watched = [status, verdict, loss_plot, speed_plot, use_plot, gap_plot, grid]
        watch.submit(watch_run, watch, watched, api_name="watch", queue=False)
        for event in (app.load, timer.tick):
            event(watch_run, watch, watched, api_visibility="private", queue=False, show_progress="hidden")
    return app


def main(cfg, argv):
    given = {a.removeprefix("--").partition("=")[0] for a in argv}
    if not given & {"model", "adapters"}:  # the shipped demo: score-setting controls unless set
        cfg.update({k: v for k, v in SHAPES.items() if k not in given})
    sample.in_range(cfg, "n steps frames fps", 1)
    sample.in_range(cfg, "guidance", 0)
    sample.in_range(cfg, "beta", 0, 1)
    if cfg["scheduler"] not in sample.SCHEDULERS or cfg["dtype"] not in sample.DTYPES:
        fail(f"--scheduler must be one of {', '.join(sample.SCHEDULERS)} and --dtype one of "
             f"{', '.join(sample.DTYPES)}")
    sampler = sample.Sampler({**sample.config, **cfg, "export": "", "inpaint_image": "", "height": 0, "width": 0})
    sampler.load()
    app = build(cfg, sampler)
    app.queue(default_concurrency_limit=1)
    return app


if __name__ == "__main__":
    argv = sys.argv[1:]
    cfg = configure(config, argv, __doc__)
    main(cfg, argv).launch(server_name=cfg["host"], server_port=cfg["port"] or None, share=cfg["share"], show_error=True,
                           footer_links=["gradio"])
