"""
How many parameters GLIGEN adds to an MMDiT, and how much memory training them needs, with no download.

    python extras/mmdit_sizes.py

Builds SD3.5-medium, SD3.5-large and FLUX.1-dev's transformers from their full real configs (written out below) on
the meta device, so no weights are allocated and it runs in seconds on any machine, injects the fusers and position
net exactly as train_gligen.py does, and counts. Prints a markdown table for a README. GB = 1e9 bytes.
Memory per row: the adapters in fp32 with fp32 grads and AdamW's two fp32 moments (16 bytes/param), plus the frozen
base transformer in bf16 (2 bytes/param, buffers included). Activations, the text encoders (T5-XXL alone ~9.5 GB in
bf16, unless its features are precomputed or it is dropped) and the VAE come on top of that sum.
"""
import os
import sys
import time

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gligen as tg  # noqa: E402

GPU_GB = 80
HEADROOM_GB = 10  # below this much left over, the text encoder (T5-XXL ~9.5 GB) and activations cannot fit too

# The models' transformer/config.json as published (the fields diffusers' constructors take).
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                   qk_norm="rms_norm")
SD35_LARGE = dict(SD35_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                  pos_embed_max_size=192, dual_attention_layers=())
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def formula(n_fusers, d, pooled):
    """The same count by hand: a fuser with ctx = d is 16d^2 + d*d + 15d + 2; the position net is a
    (P + 64) -> 512 -> 512 -> d MLP plus its two null features (P and 64)."""
    fuser = 17 * d * d + 15 * d + 2
    position_net = (pooled + 64) * 512 + 512 + 512 * 512 + 512 + 512 * d + d + pooled + 64
    return n_fusers * fuser + position_net


def count(cls, config, **inject):
    """Adapter parameters, one fuser's, base parameters + buffers, and the fused blocks' width, on the meta device."""
    with torch.device("meta"):  # shapes only: a 12B model costs nothing
        model = tg.inject_mmdit(cls(**config), **inject)
    # the base's buffers count too: SD3's fixed sin/cos position table (226M numbers on medium) is stored in the
    # checkpoint and cast to bf16 with the weights
    sizes = {name: t.numel() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    names = tg.adapter_state(model).keys()
    adapter = sum(n for name, n in sizes.items() if name in names)
    one_fuser = sum(p.numel() for p in model.transformer_blocks[0].fuser.parameters())
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return adapter, one_fuser, sum(sizes.values()) - adapter, width


def human(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def row(model, placement, n_fusers, adapter, base):
    train_gb, base_gb = adapter * 16 / 1e9, base * 2 / 1e9
    total = train_gb + base_gb
    left = GPU_GB - total
    verdict = f"fits ({left:.0f} GB left)" if left >= HEADROOM_GB else \
        f"tight ({left:.0f} GB left)" if left > 0 else "does not fit"
    return (f"| {model} | {placement} | {n_fusers} | {human(adapter)} | {human(base)} | {train_gb:.1f} | "
            f"{base_gb:.1f} | {total:.1f} | {verdict} |")


def main():
    start = time.time()
    flux = dict(fuser=tg.PositionedFuser, code=tg.flux_position_code)
    rows = []
    for name, cls, config, inject in [("SD3.5-medium", SD3Transformer2DModel, SD35_MEDIUM, {}),
                                      ("SD3.5-large", SD3Transformer2DModel, SD35_LARGE, {}),
                                      ("FLUX.1-dev", FluxTransformer2DModel, FLUX_DEV, flux)]:
        adapter, one_fuser, base, width = count(cls, config, **inject)
        n = config["num_layers"]
        assert adapter == formula(n, width, config["pooled_projection_dim"]), (name, adapter)
        placement = "all joint blocks" if cls is SD3Transformer2DModel else "19 double-stream blocks"
        rows.append(row(name, placement, n, adapter, base))
    # Flux's 38 single-stream blocks are as wide (3072), so a fuser there would cost the same as on a double block;
    # train_gligen.py does not place fusers there, so this row is what it would cost, not what the trainer offers.
    n_all = FLUX_DEV["num_layers"] + FLUX_DEV["num_single_layers"]
    all_blocks = adapter + (n_all - n) * one_fuser
    assert all_blocks == formula(n_all, width, FLUX_DEV["pooled_projection_dim"])
    rows.append(row("FLUX.1-dev", "all 57 blocks (not offered)", n_all, all_blocks, base))

    print("| model | placement | fusers | adapter params | base params + buffers | "
          "adapters fp32 + grads + AdamW (GB) | base bf16 (GB) | sum (GB) | one 80 GB GPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nGB = 1e9 bytes. 'fits' = at least {HEADROOM_GB} GB of {GPU_GB} left. Activations, the text encoders "
          "(T5-XXL ~9.5 GB bf16, unless its features are precomputed or it is dropped) and the VAE come on top.")
    print(f"({time.time() - start:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
