"""
How many parameters GLIGEN adds to each family's real model, and how much memory training them takes, no download.

    python extras/model_sizes.py

Builds SD1.5, SD2.1, SDXL, ModelScope text-to-video, SD3.5-medium, SD3.5-large and FLUX.1-dev from their published
configs (written out below) on the meta device, so nothing is allocated, adds the adapters with the trainer's own
add_adapters stage, and counts. Prints the table of docs/families.md, which the README's families table takes from.
GB = 1e9 bytes. Memory per GPU under DDP (every GPU holds all of it): the adapters in fp32 with fp32 grads and AdamW's
two fp32 moments (16 bytes/param), plus the frozen denoiser, text encoders and VAE in bf16 (2 bytes/param, buffers
included), as the trainer's own memory_plan counts them; with --shard over 8 GPUs, an eighth of the adapters' part;
with --shard_base too, an eighth of the denoiser's frozen blocks and of T5 as well. Activations come on top.
"""
import os
import sys
import time

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gligen as tg  # noqa: E402

config = {}  # no settings
SHARDS = 8  # the GPUs of one node: --shard splits the adapters' fp32 state over them, --shard_base more

# The published unet/ or transformer/ config.json of each model (the fields diffusers' constructors take).
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD21 = dict(SD15, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True)
SDXL = dict(SD15, sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
MODELSCOPE = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=1024,
                  block_out_channels=(320, 640, 1280, 1280), attention_head_dim=64,
                  down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
                  up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3)
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                   num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                   pooled_projection_dim=2048, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                   qk_norm="rms_norm")
SD35_LARGE = dict(SD35_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                  pos_embed_max_size=192, dual_attention_layers=())
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# Text encoders (CLIP ViT-L, OpenCLIP ViT-H and ViT-bigG text towers, T5-XXL) and VAEs.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768)
CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
              projection_dim=512, hidden_act="gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
VAE4 = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
VAE16 = dict(VAE4, latent_channels=16)

# family, model, resolution, denoiser class, its config, text encoders [(class, config)], VAE config
MODELS = [
    ("sd", "SD1.5", 512, "UNet2DConditionModel", SD15, [(CLIPTextModel, CLIP_L)], VAE4),
    ("sd", "SD2.1", 768, "UNet2DConditionModel", SD21, [(CLIPTextModel, CLIP_H)], VAE4),
    ("sdxl", "SDXL", 1024, "UNet2DConditionModel", SDXL,
     [(CLIPTextModel, CLIP_L), (CLIPTextModelWithProjection, CLIP_G)], VAE4),
    ("video", "ModelScope T2V", 256, "UNet3DConditionModel", MODELSCOPE, [(CLIPTextModel, CLIP_H)], VAE4),
    ("sd3", "SD3.5-medium", 1024, "SD3Transformer2DModel", SD35_MEDIUM,
     [(CLIPTextModelWithProjection, CLIP_L), (CLIPTextModelWithProjection, CLIP_G), (T5EncoderModel, T5_XXL)], VAE16),
    ("sd3", "SD3.5-large", 1024, "SD3Transformer2DModel", SD35_LARGE,
     [(CLIPTextModelWithProjection, CLIP_L), (CLIPTextModelWithProjection, CLIP_G), (T5EncoderModel, T5_XXL)], VAE16),
    ("flux", "FLUX.1-dev", 1024, "FluxTransformer2DModel", FLUX_DEV,
     [(CLIPTextModel, CLIP_L), (T5EncoderModel, T5_XXL)], VAE16),
]


def numel(model):
    """Parameters + buffers: what a checkpoint stores and a bf16 cast keeps."""
    return sum(t.numel() for t in [*model.parameters(), *model.buffers()])


def text_encoder(cls, cfg):
    config = (T5Config if cls is T5EncoderModel else CLIPTextConfig)(**cfg)
    return cls(config)


def check_settings(cfg):
    """No settings to check."""


def formula(n_fusers, d, pooled):
    """The same count by hand: a fuser with ctx = d is 16d^2 + d*d + 15d + 2; the position net is a
    (P + 64) -> 512 -> 512 -> d MLP plus its two null features (P and 64)."""
    fuser = 17 * d * d + 15 * d + 2
    position_net = (pooled + 64) * 512 + 512 + 512 * 512 + 512 + 512 * d + d + pooled + 64
    return n_fusers * fuser + position_net


def build(family, denoiser, config, encoders):
    """(frozen bf16 denoiser with fp32 adapters, its adapter parameters, frozen bf16 text encoders) on the meta
    device: a 12B model costs nothing. The text encoders sit in one module, T5 as .t5, as the trainer's do."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, denoiser)(**config).requires_grad_(False)
        torch.nn.Module.to(model, torch.bfloat16)  # buffers too, as the trainer's load; diffusers' .to warns here
        model = tg.choose_stages(family).add_adapters(model)
        text = torch.nn.Module()
        for i, (cls, cfg) in enumerate(encoders):
            name = "t5" if cls is T5EncoderModel else f"clip_{i}"
            setattr(text, name, text_encoder(cls, cfg).requires_grad_(False).to(torch.bfloat16))
    params = tg.adapter_params(model)
    for p in params:
        p.data = p.data.float()
    return model, params, text


def vae_numel(vae):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return numel(AutoencoderKL(**vae))


def human(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def rows():
    """One record per model: its adapters, frozen parts and static training memory per GPU (the trainer's own
    memory_plan, plus the VAE in bf16) under DDP, --shard and --shard --shard_base over SHARDS GPUs."""
    out = []
    for family, name, resolution, denoiser, config, encoders, vae in MODELS:
        model, params, text = build(family, denoiser, config, encoders)
        adapter = sum(p.numel() for p in params)
        if family in ("sd3", "flux"):
            width = config["num_attention_heads"] * config["attention_head_dim"]
            assert adapter == formula(config["num_layers"], width, config["pooled_projection_dim"]), (name, adapter)
        fusers = sum(isinstance(m, (tg.Fuser, tg.PositionedFuser)) for m in model.modules())
        frozen = numel(model) + numel(text) - adapter + vae_numel(vae)
        gb = [(sum(tg.memory_plan(model, text, params, shards, base).values()) + 2 * vae_numel(vae)) / 1e9
              for shards, base in ((1, False), (SHARDS, False), (SHARDS, True))]
        out.append(dict(family=family, model=name, resolution=resolution, adapter=adapter, fusers=fusers,
                        frozen=frozen, train_gb=adapter * 16 / 1e9, frozen_gb=frozen * 2 / 1e9, ddp_gb=gb[0],
                        shard_gb=gb[1], shard_base_gb=gb[2]))
    return out


def main():
    start = time.time()
    print("| family | model | resolution | fusers | adapter params | frozen params (denoiser + text encoders + VAE) "
          "| adapters fp32 + grads + AdamW (GB) | frozen bf16 (GB) | per GPU, DDP (GB) | "
          f"per GPU, --shard over {SHARDS} (GB) | per GPU, --shard --shard_base over {SHARDS} (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows():
        print(f"| {r['family']} | {r['model']} | {r['resolution']} | {r['fusers']} | {human(r['adapter'])} | "
              f"{human(r['frozen'])} | {r['train_gb']:.1f} | {r['frozen_gb']:.1f} | {r['ddp_gb']:.1f} | "
              f"{r['shard_gb']:.1f} | {r['shard_base_gb']:.1f} |")
    print("\nComputed, not measured: GB = 1e9 bytes; activations (which --micro_batch and --grad_checkpointing set) "
          "come on top.")
    print(f"({time.time() - start:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
