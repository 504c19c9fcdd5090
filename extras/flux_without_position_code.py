"""
train_gligen.py on a Flux model with GLIGEN's fuser as it is: no position code added to the image tokens' features.
The ablation of flux_position_code (train_gligen.py, the MMDiT section): Flux's image tokens carry no absolute
position (RoPE only, inside its attention), so the trainer's Flux fusers add a 2-D sin/cos code of each token's place;
this runs the same training without it, so that the box-use losses of the two runs can be compared.

    python extras/flux_without_position_code.py --model=... --latents=... --boxes=... --out_dir=...  # as the trainer

It takes train_gligen.py's settings and writes what it writes. The adapters it makes are for this comparison:
sample.py would run them with the code.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gligen as tg

config, check_settings = tg.config, tg.check_settings  # the trainer's


def main(argv):
    tg.FAMILIES["flux"]["add_adapters"] = tg.inject_mmdit  # Fuser, no code: SD3's injection
    cfg = tg.configure(config, argv, __doc__)
    if tg.family_of(cfg["model"]) != "flux":
        tg.fail(f"{cfg['model']}: not a Flux model; this ablation is of Flux's position code")
    tg.main(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
