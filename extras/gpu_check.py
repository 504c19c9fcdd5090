"""
What a GPU must show, in one command: no download, at most about 8 minutes on one H100/H200-class GPU (--budget_s).

    python extras/gpu_check.py                  # on a machine with NVIDIA GPUs: every GPU; results in gpu_check/
    python extras/gpu_check.py --dry_run=True   # the same code on tiny models on a CPU, in under a minute (tested)

It builds randomly initialised full-size SD1.5 and SDXL model directories here (the configs of extras/benchmark.py,
in fp16: a network's speed does not depend on its weights) and synthetic latents at 512 and 1024 px, then measures,
stage after stage:
  sd15      train_gligen.py with its defaults (bf16 on CUDA), under torchrun on every GPU: images/s, MFU and peak
            memory at micro-batch 8, 16 and 32 on SD1.5 at 512 (over the second half of its steps)
  resume    a run stopped halfway and started again against the straight micro-batch 8 run: the largest difference
            of their adapters (on a GPU bit equality is not expected: cuBLAS and SDPA may sum in another order from
            run to run; on a CPU it is 0)
  sample    sample.py in fp16 with those adapters and its export run by diffusers' StableDiffusionGLIGENPipeline in
            fp16, the same seed: the largest and the mean pixel difference (both 0 in fp32 on a CPU)
  benchmark extras/benchmark.py --what=train on SD1.5: this trainer's step against the reference recipe (IGLIGEN's)
            in one process, and the profile of ours (shares of the step, top kernels, host syncs per step)
  sdxl      SDXL at 1024 with --grad_checkpointing=True at micro-batch 2 and 4: images/s, peak memory
  sharded   the same with --shard=True (FSDP2), under torchrun even on one GPU, and at micro-batch 2 with
            --shard_base=True too: images/s and peak memory per GPU beside the sdxl stage's (DDP)
  compile   --compile=inductor at micro-batch 16: the run's wall time against the eager one's (the compile), and
            images/s after it
The GPU, driver, CUDA, torch, diffusers and transformers versions come first. A stage starts only while the time
spent is under --budget_s, and a stage that fails is recorded with its error; the others still run. Everything goes
to --out: results.json (rewritten after each stage, so a killed run keeps what it measured) and log.txt (each
command and the end of its output). Without a GPU it stops with one error line, unless --dry_run=True: tiny models,
the CPU, one process, 4 steps, the scripts run in this process, dynamo's eager backend for compile.
"""
import contextlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]  # train_gligen.py and the scripts this one builds on
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "extras"))
import train_gligen as tg
from benchmark import UNETS, WORDS, write_data
from demo_shapes import write_tokenizer

config = dict(
    out="gpu_check",  # results.json, log.txt, the models built here (10 GB) and runs (up to 22 GB at a time)
    dry_run=False,  # tiny models on the CPU: the same code, in under a minute
    budget_s=330,  # a stage starts only while the time spent is under this (the longest, compile, takes about 150 s)
    steps=30,  # training steps of a speed measurement on SD1.5 (SDXL: a third): the speed of the second half
    gpus=0,  # processes (one per GPU); 0 = every GPU
)
VIT_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
VIT_BIG_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
TINY_VAE = dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
TINY_SDXL = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=64, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 use_linear_projection=True, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)


def build_model(path, sdxl, tiny, device):
    """A diffusers SD1.5- or SDXL-shaped model directory of random weights, in fp16 (fp32 when tiny), with a tokenizer
    whose vocabulary spells the synthetic captions' words, and text encoders sized to it."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if (path / "model_index.json").is_file():
        return path
    torch.manual_seed(0)
    tokenizer = write_tokenizer(path / "_tok", sorted(set(WORDS)), max_length=77)
    n = len(tokenizer)
    text = lambda size, **k: CLIPTextConfig(vocab_size=n, max_position_embeddings=77, bos_token_id=n - 2,
                                            eos_token_id=n - 1, pad_token_id=n - 1, **size, **k)
    unet_config = (TINY_SDXL if sdxl else UNETS["tiny"]) if tiny else UNETS["sdxl" if sdxl else "sd15"]
    with torch.device(device):  # random init on the GPU: seconds, not minutes
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE), sample_size=unet.config.sample_size * (2 if tiny else 8),
                            scaling_factor=0.13025 if sdxl else 0.18215)
        te = CLIPTextModel(text(TINY_TEXT if tiny else VIT_L))
        te2 = CLIPTextModelWithProjection(text(TINY_TEXT, projection_dim=32) if tiny else text(VIT_BIG_G)) \
            if sdxl else None
    parts = dict(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet,
                 scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                  steps_offset=1, timestep_spacing="leading"))
    if sdxl:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=te2, tokenizer_2=tokenizer)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.to(torch.float32 if tiny else torch.float16).save_pretrained(path)
    shutil.rmtree(path / "_tok")
    return path


def launch(script, args, gpus, log, in_process=False, torchrun=False):
    """Run a project script as a command (under torchrun for more than one process); the dry run runs it in this
    process instead (as __main__: the same code, without starting Python and torch again each time). Returns its wall
    time; the command and the end of its output go to the log; an exit other than 0 raises."""
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"] \
        if gpus > 1 or torchrun else [sys.executable]
    cmd, t0 = runner + [str(ROOT / script), *args], time.perf_counter()
    if in_process:
        buf, argv, code = io.StringIO(), sys.argv, 0
        sys.argv = [str(ROOT / script), *args]
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                runpy.run_path(str(ROOT / script), run_name="__main__")
        except SystemExit as e:
            code, buf = e.code, io.StringIO(buf.getvalue() + f"{e}\n")
        finally:
            sys.argv = argv
        output = buf.getvalue()
    else:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
        code, output = r.returncode, r.stdout + r.stderr
    wall = time.perf_counter() - t0
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n({wall:.1f} s, exit {code})\n{output[-4000:]}\n\n")
    if code:
        raise RuntimeError(f"{script} exited {code}: {output.strip().splitlines()[-1:]}")
    return wall


def train(cfg, name, model, data, micro, log, gpus, *extra, steps=None, fresh=True, keep=False, torchrun=False):
    """A train_gligen.py run (fresh: in an emptied out_dir, else resuming); its last logged speed, MFU and peak
    memory, and its wall time. Its out_dir is deleted unless kept: checkpoints are 2.5 GB (SD1.5) to 22 GB (SDXL)."""
    out = Path(cfg["out"]) / "runs" / name
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    steps = steps or cfg["steps"]
    args = [f"--model={model}", f"--latents={data}", f"--boxes={data / 'boxes.jsonl'}", f"--out_dir={out}",
            f"--micro_batch={micro}", f"--global_batch={micro * gpus}", f"--max_steps={steps}",
            f"--log_every={max(1, steps // 2)}", "--val_every=0", f"--save_every={steps}", "--warmup_steps=0",
            f"--num_workers={0 if cfg['dry_run'] else 4}", *extra]
    wall = launch("train_gligen.py", args, gpus, log, cfg["dry_run"] and not torchrun, torchrun)
    rec = [r for _, r in tg.read_jsonl(out / "log.jsonl") if "img_per_s" in r][-1]
    if not keep:
        shutil.rmtree(out)
    return out, dict(micro_batch=micro, img_per_s=rec["img_per_s"], mfu=rec.get("mfu"), peak_mem_gb=rec["mem_gb"],
                     tflop_per_image=rec["tflop_per_image"], wall_s=round(wall, 1))


def versions():
    import diffusers
    import transformers

    cuda = torch.cuda.is_available()
    driver = "unknown"
    if cuda and shutil.which("nvidia-smi"):
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip().splitlines()[0]
    return dict(gpu=torch.cuda.get_device_name() if cuda else "CPU (dry run)", gpus=torch.cuda.device_count(),
                driver=driver, cuda=torch.version.cuda, torch=torch.__version__, diffusers=diffusers.__version__,
                transformers=transformers.__version__, python=sys.version.split()[0])


def sample_vs_pipeline(cfg, model, adapters, log, device):
    """sample.py in fp16 (fp32 in the dry run), and its export run by StableDiffusionGLIGENPipeline: pixel
    differences."""
    from diffusers import StableDiffusionGLIGENPipeline
    from PIL import Image

    out, dtype = Path(cfg["out"]) / "samples", "fp32" if cfg["dry_run"] else "fp16"
    layout = dict(prompt="a dog and a cat on a sofa", phrases=["a dog", "a cat"],
                  boxes=[[0.05, 0.35, 0.45, 0.9], [0.55, 0.3, 0.95, 0.9]])
    shutil.rmtree(out, ignore_errors=True)
    args = [f"--model={model}", f"--adapters={adapters}", f"--prompt={layout['prompt']}",
            f"--phrases={layout['phrases']}", f"--boxes={layout['boxes']}", "--n=2", "--seed=3", "--steps=20",
            "--beta=0.5", f"--dtype={dtype}", f"--out_dir={out}", f"--export={out / 'pipe'}"]
    launch("sample.py", args, 1, log, cfg["dry_run"])
    ours = np.stack([np.asarray(Image.open(out / f"000_0{i}.png")) for i in range(2)]).astype(int)
    torch_dtype = torch.float32 if cfg["dry_run"] else torch.float16
    pipe = StableDiffusionGLIGENPipeline.from_pretrained(out / "pipe", torch_dtype=torch_dtype).to(device)
    theirs = pipe(layout["prompt"], gligen_phrases=layout["phrases"], gligen_boxes=layout["boxes"],
                  gligen_scheduled_sampling_beta=0.5, num_inference_steps=20, num_images_per_prompt=2,
                  generator=torch.Generator().manual_seed(3), output_type="np").images
    d = np.abs(ours - (theirs * 255).round().astype(int))
    return dict(dtype=dtype, max_pixel_diff=int(d.max()), mean_pixel_diff=round(float(d.mean()), 4))


def check_settings(cfg):
    """Stop on a setting that cannot work, before anything starts."""
    tg.in_range(cfg, "steps", 3)
    tg.in_range(cfg, "budget_s gpus", 0)
    tg.check_out_dir(cfg["out"], "out")


def main(cfg):
    check_settings(cfg)
    cuda = torch.cuda.is_available()
    if not cuda and not cfg["dry_run"]:
        tg.fail("no GPU here: this measures what a GPU does (--dry_run=True runs the same code on a CPU, tiny)")
    out, t_start = Path(cfg["out"]), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    log, device = out / "log.txt", "cuda" if cuda else "cpu"
    log.write_text("")
    gpus = cfg["gpus"] or max(1, torch.cuda.device_count())
    tiny, steps = cfg["dry_run"], 4 if cfg["dry_run"] else cfg["steps"]
    cfg = dict(cfg, steps=steps)
    results = dict(versions=versions(), settings=cfg, budget_s=cfg["budget_s"], stages={})
    print(json.dumps(results["versions"]))

    def stage(name, fn):
        spent = time.perf_counter() - t_start
        if spent > cfg["budget_s"]:
            results["stages"][name] = dict(skipped=f"out of time ({spent:.0f} s spent)")
        else:
            t0 = time.perf_counter()
            try:
                results["stages"][name] = fn()
            except Exception as e:  # recorded, and the next stage runs
                results["stages"][name] = dict(error=f"{type(e).__name__}: {e}"[:2000])
            results["stages"][name]["stage_s"] = round(time.perf_counter() - t0, 1)
        results["total_s"] = round(time.perf_counter() - t_start, 1)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"{name}: {json.dumps(results['stages'][name])}", flush=True)
        return results["stages"][name]

    built = {}

    def build():
        t0 = time.perf_counter()
        for name, sdxl, res in (("sd15", False, 16 if tiny else 512), ("sdxl", True, 16 if tiny else 1024)):
            built[name] = (build_model(out / f"model-{name}", sdxl, tiny, device), out / f"latents-{name}")
            write_data(built[name][1], 32 if tiny else 512, res, np.random.default_rng(0),
                       scaling_factor=0.13025 if sdxl else 0.18215)
        return dict(seconds=round(time.perf_counter() - t0, 1))

    micro = [2] if tiny else [8, 16, 32]
    runs = {}

    def sd15():
        rows = []
        for m in micro:  # the first is the straight run of resume, and its adapters are sample's
            runs[m], row = train(cfg, f"sd15-mb{m}", *built["sd15"], m, log, gpus, keep=m == micro[0])
            rows.append(row)
        return dict(rows=rows)

    def resume():
        m = micro[0]
        resumed, _ = train(cfg, "resume", *built["sd15"], m, log, gpus, steps=steps // 2, keep=True)
        train(cfg, "resume", *built["sd15"], m, log, gpus, fresh=False, keep=True)  # the full length: resumes halfway
        a, b = tg.load_adapters(str(resumed)), tg.load_adapters(str(runs[m]))
        shutil.rmtree(resumed)
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        return dict(steps=steps, stopped_at=steps // 2, max_abs_diff=diff, bit_equal=diff == 0.0)

    def sample():
        result = sample_vs_pipeline(cfg, built["sd15"][0], runs[micro[0]], log, device)
        shutil.rmtree(out / "runs")
        return result

    def benchmark():
        bench = out / "benchmark.json"
        launch("extras/benchmark.py", ["--what=train", f"--unet={'tiny' if tiny else 'sd15'}",
                                       f"--batch_sizes={','.join(map(str, micro[:2]))}", f"--steps={steps}",
                                       "--profile=True", f"--out={bench}"], 1, log, cfg["dry_run"])
        return json.loads(bench.read_text())

    def sdxl():
        rows = [train(cfg, f"sdxl-mb{m}", *built["sdxl"], m, log, gpus, "--grad_checkpointing=True",
                      steps=max(4, steps // 3))[1] for m in ([1] if tiny else [2, 4])]
        return dict(rows=rows)

    def sharded():
        def run(m, *extra):
            return train(cfg, f"sdxl-shard-mb{m}", *built["sdxl"], m, log, gpus, "--grad_checkpointing=True",
                         "--shard=True", *extra, steps=max(4, steps // 3), torchrun=True)[1]

        rows = [] if tiny else [run(m) for m in (2, 4)]  # the dry run: one torchrun, the base sharded too
        return dict(rows=rows, base_rows=[run(1 if tiny else 2, "--shard_base=True")],
                    ddp_rows=results["stages"].get("sdxl", {}).get("rows"))

    def compiled():
        m = micro[1] if len(micro) > 1 else micro[0]
        backend = "eager" if tiny else "inductor"  # the dry run: dynamo's capture alone, in seconds
        _, row = train(cfg, "compile", *built["sd15"], m, log, gpus, f"--compile={backend}")
        eager = next((r for r in results["stages"].get("sd15", {}).get("rows", []) if r["micro_batch"] == m), None)
        return dict(backend=backend, **row, compile_s=round(row["wall_s"] - eager["wall_s"], 1) if eager else None)

    for name, fn in (("build", build), ("sd15", sd15), ("resume", resume), ("sample", sample),
                     ("benchmark", benchmark), ("sdxl", sdxl), ("sharded", sharded), ("compile", compiled)):
        if name != "build" and "error" in results["stages"].get("build", {}):
            break
        stage(name, fn)
    print(f"{results['total_s']} s in all; {out / 'results.json'}, {log}")
    return results


if __name__ == "__main__":
    main(tg.configure(config, sys.argv[1:], __doc__))
