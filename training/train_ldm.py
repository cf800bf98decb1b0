"""Train shapes-ldm: an LDM UNet with cross-attention and a jointly trained CLIP-architecture
text encoder (LDM's tau_theta; Rombach et al. 2022, sec. 3.3) on the DDPM linear beta schedule,
eps- or v-prediction (`--prediction`; v: Salimans & Ho 2022, as SD 2.x), caption dropout for
classifier-free guidance.

    python -m training.train_ldm --vae models/shapes-vae --out runs/shapes-ldm --minutes 60
    python -m training.train_ldm --vae models/shapes-vae --out runs/shapes-ldm --export models/shapes-ldm
    python -m training.train_ldm --out runs/shapes-ldm-2 --init-model models/shapes-ldm --width 32  # a later session
    python -m training.train_ldm --out runs/shapes-ldm-v --prediction v_prediction --width 64 --minutes 240

Served with DDIM (the SD-1.x scheduler layout); loads in diffusers' StableDiffusionPipeline.
"""

from __future__ import annotations

import json
import random

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from engines.components import text_engine
from engines.conditioning import encode_ldm
from engines.schedules import vp_alphas_cumprod
from training.latents import load_or_build
from training.loop import denoiser_args, fit, load_ema, parse
from training.vocab import build_tokenizer

TEXT_LENGTH = 32
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def build(args):
    tokenizer = build_tokenizer(TEXT_LENGTH)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=args.text_width, intermediate_size=4 * args.text_width,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=TEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    w = args.width
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(w, 2 * w, 2 * w), layers_per_block=1,
        cross_attention_dim=args.text_width, attention_head_dim=max(1, w // 8),
        norm_num_groups=max(1, min(32, w // 4)),
    )
    return tokenizer, torch.nn.ModuleDict({"text_encoder": text_encoder, "unet": unet})


def schedule_config(args) -> dict:
    """The DDPM schedule, rescaled to zero terminal SNR with `--zero-snr` (Lin et al. 2024: the
    last step then sees pure noise, as sampling starts; needs v-prediction)."""
    return {**SCHEDULE, "rescale_betas_zero_snr": True} if args.zero_snr else dict(SCHEDULE)


def init_from_model(args, net: torch.nn.ModuleDict) -> None:
    """A fresh run (no checkpoint yet) with --init-model starts from that shipped model's UNet
    and text encoder."""
    if args.init_model and not (args.out / "checkpoint.pt").exists():
        net["unet"].load_state_dict(UNet2DConditionModel.from_pretrained(args.init_model / "unet").state_dict())
        net["text_encoder"].load_state_dict(CLIPTextModel.from_pretrained(args.init_model / "text_encoder").state_dict())
        print(f"initialised from {args.init_model}", flush=True)


def train(args) -> None:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer, net = build(args)
    init_from_model(args, net)
    bank = load_or_build(args.out / "bank.pt", args.vae, args.bank, device=args.device)
    latents, captions = bank["latents"].float().to(args.device), bank["captions"]
    alphas_cumprod = vp_alphas_cumprod(schedule_config(args)).to(args.device)

    def loss_on_batch(rng: random.Random) -> torch.Tensor:
        idx = [rng.randrange(len(captions)) for _ in range(args.batch)]
        texts = [captions[i] if rng.random() >= args.drop else "" for i in idx]
        cond = encode_ldm(tokenizer, text_engine(net["text_encoder"], pooled=False), texts)
        x0 = latents[idx]
        t = torch.randint(0, len(alphas_cumprod), (args.batch,), device=x0.device)
        eps = torch.randn_like(x0)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = net["unet"](x_t, t, encoder_hidden_states=cond.embeds).sample
        # v = sqrt(a) eps - sqrt(1 - a) x0: at high noise the network predicts x0 itself, where
        # eps-prediction's x0 estimate degrades (what limited the first shapes-ldm; its card).
        target = eps if args.prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return torch.nn.functional.mse_loss(pred, target)

    fit(args, net, loss_on_batch)


def export(args) -> None:
    tokenizer, net = build(args)
    ema, step, extra = load_ema(args, net)
    # Zero-SNR models sample from the last timestep, so their schedule is spaced "trailing".
    scheduler = DDIMScheduler(**schedule_config(args), clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="trailing" if args.zero_snr else "leading",
                              prediction_type=args.prediction)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(args.vae, use_safetensors=True), text_encoder=ema["text_encoder"],
        tokenizer=tokenizer, unet=ema["unet"], scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(args.export, safe_serialization=True)
    (args.export / "training.json").write_text(json.dumps({
        "step": step, "elapsed_s": extra.get("elapsed_s"), "seed": args.seed, "batch": args.batch,
        "lr": args.lr, "width": args.width, "text_width": args.text_width, "prediction": args.prediction,
        "zero_snr": args.zero_snr, "device": extra.get("device", "cpu"), "amp": extra.get("amp", False),
        "bank": extra.get("bank"), **({"batch": extra["batch"]} if "batch" in extra else {}),
    }, indent=2))
    print(f"exported step {step} to {args.export}")


def main() -> None:
    parser = denoiser_args(__doc__.splitlines()[0], "shapes-ldm", steps=10000, lr=3e-4, snapshot_steps=[])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--prediction", choices=("epsilon", "v_prediction"), default="epsilon")
    parser.add_argument("--zero-snr", action="store_true", help="rescale the schedule to zero terminal SNR")
    args = parse(parser)
    if args.zero_snr and args.prediction != "v_prediction":
        parser.error("--zero-snr needs --prediction v_prediction (eps is undefined at zero SNR)")
    export(args) if args.export else train(args)


if __name__ == "__main__":
    main()
