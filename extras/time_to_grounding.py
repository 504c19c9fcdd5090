"""
How soon do the boxes count? One run of the shapes demo's GLIGEN stage with any trainer settings (a lever), measured
as docs/time-to-grounding.md's table measures it: the onset of the box-use gap, and held-out-free IoU on
development layouts at every 1,000 steps.

    python extras/time_to_grounding.py --seed=0 --out=levers/base                                  # GLIGEN's recipe
    python extras/time_to_grounding.py --seed=0 --out=levers/cubic --train="--timestep_power=3"    # one lever

1. The demo's world and data for --seed (demo_shapes.py's own functions: the same images, boxes and latents as
   `demo_shapes.py --seed=S`), in --data (default data<seed> beside --out), made once.
2. train_gligen.py with the demo's GLIGEN settings on the shipped base, caption kept 50% (GLIGEN; --train may say
   otherwise), validating every 250 steps on 512 training images and keeping every 1,000-step checkpoint. Onset: the
   first validation on the --onset_every grid whose gap exceeds 3 of its standard errors and stays above them at the
   next. Once onset is confirmed and at least --min_steps are done, the run stops at the next 1,000 steps.
3. sample.py (DDIM 25 steps, beta 1, guidance 7.5, as docs/time-to-grounding.md's lever table was measured; the
   demo samples at 1.5) from each 1,000-step checkpoint on --dev_layouts layouts drawn with seed + 100 (not the demo's
   held-out layouts, seed + 1), scored with the demo's colour-blob IoU.

Writes <out>/lever.json: the onset, each validation's gap and standard error, IoU per checkpoint, images/s. Run it
again and finished parts are skipped (a stopped training resumes). About 7-14 minutes a run on a 2-core CPU.

    python extras/time_to_grounding.py --plot=levers/gligen,levers/attn --out=levers   # levers/curves.png

--plot draws instead: the box-use gap against step of finished runs (their log.jsonl; each labelled and grouped by
seed from its lever.json), one panel per seed, the gap's 3 standard errors as a band (docs/time_to_grounding.png).
"""
import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "extras"))
import demo_shapes as ds
import train_gligen as tg
from train_gligen import configure, fail, in_range, read_jsonl

config = dict(
    seed=0,  # the demo's seed: its world, the training seed and the sampling seed
    out="levers/base",  # the run's directory: checkpoints, log.jsonl, samples, lever.json
    data="",  # the world and its prepared data; "" = <out>/../data<seed>
    train="",  # more train_gligen.py settings, as on its command line (the lever): "--timestep_power=3"
    min_steps=2000,  # train at least this long
    max_steps=4000,  # and at most this long
    onset_every=500,  # the validation grid on which onset is read (docs/time-to-grounding.md's table: 500)
    dev_layouts=60,  # development layouts for the IoU
    plot="",  # instead of a run: finished runs' directories, comma-separated, drawn into <out>/curves.png
)
LINE_COLORS = ["#000000", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def onset(vals, every):
    """The first step (a multiple of every) whose gap exceeds 3 standard errors, as does the next one's; or None."""
    v = [r for r in vals if r["step"] > 0 and r["step"] % every == 0]
    above = [r["gap"] > 3 * r["se"] for r in v]
    return next((v[i]["step"] for i in range(len(v) - 1) if above[i] and above[i + 1]), None)


def validations(log):
    return [dict(step=r["step"], gap=r["val_loss_mirrored"] - r["val_loss_boxes"], se=r["val_gap_se"] or 0.0,
                 high=r["val_gap_high_noise"] or 0.0) for _, r in read_jsonl(log) if "val_gap_se" in r] \
        if log.exists() else []


def curves(runs, path, width=420, height=300):
    """One panel per seed: each run's box-use gap (mirrored minus true boxes) against step, a line per run in its
    own colour with a band of 3 standard errors under it (gaps below zero, noise, are drawn at zero); runs =
    [(seed, label, validations)]. Written as a PNG."""
    from PIL import Image, ImageDraw

    seeds = sorted({seed for seed, _, _ in runs})
    labels = list(dict.fromkeys(label for _, label, _ in runs))
    color = {label: LINE_COLORS[i % len(LINE_COLORS)] for i, label in enumerate(labels)}
    x_max = max(v["step"] for _, _, vals in runs for v in vals) or 1
    y_max = max(max(max(v["gap"], 3 * v["se"]) for _, _, vals in runs for v in vals), 1e-9) * 1.05
    left, top, right, bottom = 48, 24, 12, 30  # margins of a panel
    legend_h = 18 * len(labels) + 8
    im = Image.new("RGB", (width * len(seeds), height + legend_h), "white")
    d = ImageDraw.Draw(im)
    for p, seed in enumerate(seeds):
        x0, x1, y0, y1 = p * width + left, (p + 1) * width - right, top, height - bottom
        at = lambda step, gap: (x0 + (x1 - x0) * step / x_max, y1 - (y1 - y0) * max(gap, 0) / y_max)  # noqa: E731
        d.rectangle([x0, y0, x1, y1], outline="#888888")
        d.text((x0, 4), f"seed {seed}: box-use gap against step", fill="black")
        for k in range(5):  # ticks: 0 to the largest step, 0 to the largest gap
            step, gap = x_max * k / 4, y_max * k / 4
            d.text((at(step, 0)[0] - 10, y1 + 6), f"{step:.0f}", fill="#444444")
            d.text((p * width + 4, at(0, gap)[1] - 6), f"{gap:.2f}", fill="#444444")
        mine = [(label, vals) for s, label, vals in runs if s == seed and vals]
        for label, vals in mine:  # the bands first, so that no band hides a line
            band = [at(v["step"], 3 * v["se"]) for v in vals]
            d.polygon([at(vals[0]["step"], 0), *band, at(vals[-1]["step"], 0)], fill="#e4e4e4")
        for label, vals in mine:
            points = [at(v["step"], v["gap"]) for v in vals]
            d.line(points, fill=color[label], width=2)
            if len(points) == 1:  # one validation: a dot, as a line of one point draws nothing
                (x, y), = points
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color[label])
    for i, label in enumerate(labels):
        y = height + 4 + 18 * i
        d.line([(left, y + 7), (left + 24, y + 7)], fill=color[label], width=3)
        d.text((left + 32, y), label, fill="black")
    d.text((max(width * len(seeds) - 330, left + 200), height + 4), "grey: 3 standard errors of each run's gap",
           fill="#444444")
    im.save(path)


def plot(cfg):
    """--plot: the runs' gaps, from their log.jsonl, labelled by the settings in their lever.json."""
    runs = []
    for run in (Path(r.strip()) for r in cfg["plot"].split(",") if r.strip()):
        if not (run / "lever.json").exists() or not (run / "log.jsonl").exists():
            fail(f"--plot: {run} has no lever.json and log.jsonl (a finished run of this script)")
        lever, vals = json.loads((run / "lever.json").read_text()), validations(run / "log.jsonl")
        if not vals:
            fail(f"--plot: {run / 'log.jsonl'} has no validation with the gap's standard error (val_gap_se)")
        runs.append((lever["seed"], lever["train"] or "GLIGEN's recipe", vals))
    Path(cfg["out"]).mkdir(parents=True, exist_ok=True)
    curves(runs, Path(cfg["out"]) / "curves.png")
    print(f"wrote {Path(cfg['out']) / 'curves.png'}")


def check_settings(cfg):
    """Stop on a setting that cannot work, the trainer's in --train included, before anything is made."""
    in_range(cfg, "seed", 0)
    in_range(cfg, "min_steps max_steps onset_every dev_layouts", 1)
    tg.check_settings(tg.configure(tg.config, shlex.split(cfg["train"])))


def main(cfg):
    if cfg["plot"]:
        return plot(cfg)
    check_settings(cfg)
    seed, out = cfg["seed"], Path(cfg["out"])
    data = Path(cfg["data"] or out.parent / f"data{seed}")
    base = ds.SHIPPED_BASES["sd"]
    if not (data / "latents" / "index.jsonl").exists():
        ds.write_world(data / "world", ds.config["train_images"], np.random.default_rng(seed))
        ds.run("prep_boxes.py", f"--instances={data / 'world/instances.json'}",
               f"--captions={data / 'world/captions.json'}", f"--out={data / 'boxes.jsonl'}")
        ds.run("prep_latents.py", f"--model={base}", f"--images={data / 'world/images'}",
               f"--captions={data / 'boxes.jsonl'}", f"--out={data / 'latents'}", f"--resolution={ds.SIZE}",
               "--batch_size=256", "--num_workers=0")
    dev = ds.test_layouts(cfg["dev_layouts"], np.random.default_rng(seed + 100))
    val = ds.test_layouts(6, np.random.default_rng(seed + 1))  # the demo's validation grid
    out.mkdir(parents=True, exist_ok=True)
    (out / "dev_layouts.jsonl").write_text("".join(json.dumps(l) + "\n" for l in dev))
    (out / "val_layouts.jsonl").write_text("".join(json.dumps(l) + "\n" for l in val))
    args = [sys.executable, str(ROOT / "train_gligen.py"), f"--model={base}", f"--latents={data / 'latents'}",
            f"--boxes={data / 'boxes.jsonl'}", f"--out_dir={out}", f"--max_steps={cfg['max_steps']}",
            f"--lr={ds.config['gligen_lr']}", "--caption_keep=0.5", "--warmup_steps=100", "--global_batch=32",
            "--micro_batch=32", "--num_workers=0", "--log_every=100", "--save_every=1000",
            f"--keep_last={cfg['max_steps'] // 1000 + 1}", "--val_every=250", "--val_images=512", "--val_steps=10",
            f"--val_layouts={out / 'val_layouts.jsonl'}", f"--seed={seed}", *shlex.split(cfg["train"])]
    t0, found = time.time(), None
    if not (out / "lever.json").exists():
        print("$ " + shlex.join(args[1:]), flush=True)
        train = subprocess.Popen(args)
        while train.poll() is None:
            time.sleep(5)
            vals = validations(out / "log.jsonl")
            found = onset(vals, 250)
            if found is not None and vals[-1]["step"] >= cfg["min_steps"] and vals[-1]["step"] % 1000 == 0:
                train.send_signal(signal.SIGTERM)  # the trainer saves and stops at the next step
                train.wait()
        if train.returncode:
            fail(f"train_gligen.py failed (exit code {train.returncode})")
    vals = validations(out / "log.jsonl")
    speed = [r["img_per_s"] for _, r in read_jsonl(out / "log.jsonl") if "img_per_s" in r][1:]
    result = dict(seed=seed, train=cfg["train"], onset=onset(vals, cfg["onset_every"]), onset_250=onset(vals, 250),
                  last_step=vals[-1]["step"], img_per_s=float(np.median(speed)) if speed else None,
                  minutes=round((time.time() - t0) / 60, 1), validations=vals, iou={})
    for ck in sorted(out.glob("step_*")):
        step = int(ck.name[5:])
        if step % 1000:
            continue
        samples = out / f"samples_{step}"
        if not (samples / f"{len(dev) - 1:03d}_00.png").exists():
            ds.run("sample.py", f"--model={base}", f"--adapters={ck}", f"--layouts={out / 'dev_layouts.jsonl'}",
                   "--n=1", "--steps=25", "--scheduler=ddim", f"--seed={seed}", f"--out_dir={samples}", "--beta=1.0")
        ious = ds.score(samples, dev)
        result["iou"][step] = dict(mean_iou=round(float(ious.mean()), 3),
                                   iou_ge_05=round(float((ious >= 0.5).mean()), 3))
    (out / "lever.json").write_text(json.dumps(result, indent=1))
    print(f"onset (every {cfg['onset_every']}): {result['onset']}; IoU by step: "
          + ", ".join(f"{k}: {v['mean_iou']}" for k, v in result["iou"].items()))
    return result


if __name__ == "__main__":
    main(configure(config, sys.argv[1:], __doc__))
