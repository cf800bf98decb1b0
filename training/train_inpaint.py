"""Train shapes-inpaint: the SD-inpainting design (Rombach et al. 2022, sec. 4.5) on shapes-ldm:
a UNet with 9 input channels (the noisy latent, the mask at latent size, the latents of the
masked image), fine-tuned from shapes-ldm (its first conv's new channels start at zero, so
step 0 is shapes-ldm ignoring the mask), on random masks (training.masks), v-prediction.

    python -m training.train_inpaint --init-model models/shapes-ldm --out runs/shapes-inpaint --minutes 60
    python -m training.train_inpaint --out runs/shapes-inpaint --export models/shapes-inpaint

Loads in diffusers' StableDiffusionInpaintPipeline; served by latentserve's inpaint task.
"""

from __future__ import annotations

import json
import random

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel

from engines.components import text_engine
from engines.conditioning import encode_ldm
from engines.schedules import vp_alphas_cumprod
from training.latents import load_or_build
from training.loop import denoiser_args, fit, load_ema, parse
from training.masks import random_masks
from training.train_ldm import SCHEDULE, build as build_ldm, init_from_model


def widen_conv_in(unet: UNet2DConditionModel, channels: int = 9) -> UNet2DConditionModel:
    """The same UNet with `channels` inputs: the old weights on the first 4, zeros on the rest."""
    config = dict(unet.config, in_channels=channels)
    wide = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    weight = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], channels - weight.shape[1],
                                                                  *weight.shape[2:])], 1)
    wide.load_state_dict(state)
    return wide


def build(args):
    tokenizer, net = build_ldm(args)
    net["unet"] = widen_conv_in(net["unet"])
    return tokenizer, net


def train(args) -> None:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer, net = build_ldm(args)
    init_from_model(args, net)
    net["unet"] = widen_conv_in(net["unet"])
    vae = AutoencoderKL.from_pretrained(args.vae, use_safetensors=True).eval().requires_grad_(False).to(args.device)
    bank = load_or_build(args.out / "bank.pt", args.vae, args.bank, device=args.device, keep_images=True)
    latents, captions, images = bank["latents"].float().to(args.device), bank["captions"], bank["images"]
    alphas_cumprod = vp_alphas_cumprod(SCHEDULE).to(args.device)
    masks_rng = torch.Generator().manual_seed(args.seed)

    def loss_on_batch(rng: random.Random) -> torch.Tensor:
        idx = [rng.randrange(len(captions)) for _ in range(args.batch)]
        texts = [captions[i] if rng.random() >= args.drop else "" for i in idx]
        cond = encode_ldm(tokenizer, text_engine(net["text_encoder"], pooled=False), texts)
        pixels = images[idx]
        mask = random_masks(pixels, masks_rng).to(args.device)
        image = pixels.to(args.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():  # as the pipeline: the masked image's latents, its mask at latent size
            masked = vae.encode(image * (mask < 0.5)).latent_dist.mean * vae.config.scaling_factor
        small = F.interpolate(mask, size=masked.shape[-2:])
        x0 = latents[idx]
        t = torch.randint(0, len(alphas_cumprod), (args.batch,), device=x0.device)
        eps = torch.randn_like(x0)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = net["unet"](torch.cat([x_t, small, masked], 1), t, encoder_hidden_states=cond.embeds).sample
        return F.mse_loss(pred, a.sqrt() * eps - (1 - a).sqrt() * x0)  # v-prediction, as shapes-ldm

    fit(args, net, loss_on_batch)


def export(args) -> None:
    tokenizer, net = build(args)
    ema, step, extra = load_ema(args, net)
    ema.half()  # stored in fp16 (the EMA weights training.slim brings back are fp16 already)
    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction")
    pipe = StableDiffusionInpaintPipeline(
        vae=AutoencoderKL.from_pretrained(args.vae, use_safetensors=True), text_encoder=ema["text_encoder"],
        tokenizer=tokenizer, unet=ema["unet"], scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(args.export, safe_serialization=True)
    (args.export / "training.json").write_text(json.dumps({
        "step": step, "elapsed_s": extra.get("elapsed_s"), "seed": args.seed, "lr": args.lr, "width": args.width,
        "init_model": str(args.init_model) if args.init_model else None, "device": extra.get("device", "cpu"),
        "amp": extra.get("amp", False), "bank": extra.get("bank"), "batch": extra.get("batch", args.batch),
    }, indent=2))
    print(f"exported step {step} to {args.export}")


def main() -> None:
    parser = denoiser_args(__doc__.splitlines()[0], "shapes-inpaint", steps=20000, lr=1e-4, snapshot_steps=[])
    parser.add_argument("--width", type=int, default=64)
    args = parse(parser)
    args.prediction, args.zero_snr = "v_prediction", False
    export(args) if args.export else train(args)


if __name__ == "__main__":
    main()
