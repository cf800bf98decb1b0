"""Train shapes-mmdit: an SD3-style MMDiT with two jointly trained CLIP-architecture text
encoders, by rectified flow with logit-normal timesteps (Esser et al. 2024, sec. 2-3).

    python -m training.train_mmdit --vae models/shapes-vae --out runs/shapes-mmdit --minutes 45
    python -m training.train_mmdit --vae models/shapes-vae --out runs/shapes-mmdit --export models/shapes-mmdit
    python -m training.train_mmdit --out runs/shapes-mmdit-ms --init-model models/shapes-mmdit \
        --sizes 64x64 64x96 64x128 96x64 96x96 96x128 128x64 128x96 128x128 --lr 2e-4   # several sizes

x_t = (1 - t) x0 + t eps, the network predicts v = eps - x0; t = sigmoid(n), n ~ N(0, 1).
Captions are dropped (replaced by "") 10% of the time for classifier-free guidance. The text
encoders follow the SD3 layout: penultimate hidden states of both, side by side, as the
sequence; both pooled projections concatenated as the pooled vector. No T5: the pipeline's
T5 slot is left empty (max_sequence_length=0). Weights are exported from an EMA.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from engines.components import text_engine
from engines.conditioning import encode_mmdit
from training.latents import load_or_build, load_or_build_sizes
from training.loop import denoiser_args, fit, load_ema, parse
from training.vocab import build_tokenizer

TEXT_LENGTH = 32
T5_TOKENS = 0  # no T5: an empty T5 slot


def build(args):
    tokenizer = build_tokenizer(TEXT_LENGTH)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=args.text_width, intermediate_size=4 * args.text_width,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=TEXT_LENGTH,
        projection_dim=args.text_width, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    encoders = torch.nn.ModuleList([CLIPTextModelWithProjection(config) for _ in range(2)])
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=args.layers,
        attention_head_dim=args.width // 4, num_attention_heads=4,
        joint_attention_dim=2 * args.text_width, caption_projection_dim=args.width,
        pooled_projection_dim=2 * args.text_width, pos_embed_max_size=32,
    )
    return tokenizer, torch.nn.ModuleDict({"encoders": encoders, "transformer": transformer})


def loss_fn(net, tokenizer, latents, captions, generator=None):
    encoders = [text_engine(encoder, pooled=True) for encoder in net["encoders"]]
    cond = encode_mmdit([tokenizer, tokenizer], encoders, captions,
                        net["transformer"].config.joint_attention_dim, T5_TOKENS)
    n = latents.shape[0]
    t = torch.sigmoid(torch.randn(n, generator=generator))  # logit-normal(0, 1)
    eps = torch.randn(latents.shape, generator=generator)
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * latents + tt * eps
    v = net["transformer"](hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=cond.embeds,
                           pooled_projections=cond.pooled).sample
    return torch.nn.functional.mse_loss(v, eps - latents)


def train(args) -> None:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer, net = build(args)
    if args.init_model and not (args.out / "checkpoint.pt").exists():
        init_from_model(net, args.init_model)
    if args.sizes == [(64, 64)]:
        banks = {(64, 64): load_or_build(args.out / "bank.pt", args.vae, args.bank)}
    else:  # the first size keeps the full bank; the others a quarter each
        counts = {size: args.bank if k == 0 else max(1, args.bank // 4) for k, size in enumerate(args.sizes)}
        banks = load_or_build_sizes(args.out / "banks.pt", args.vae, counts)
    banks = {size: (bank["latents"].float(), bank["captions"]) for size, bank in banks.items()}
    sizes = list(banks)

    def loss_on_batch(rng: random.Random) -> torch.Tensor:
        # One size per batch (a batch's latents share a shape). The first size gets a quarter
        # of the batches (all of them when it is the only one); batches hold about as many
        # tokens as a 64x64 batch of --batch, so a step costs about the same at every size.
        size = sizes[0] if len(sizes) == 1 or rng.random() < 0.25 else rng.choice(sizes[1:])
        latents, captions = banks[size]
        n = max(8, round(args.batch * 64 * 64 / (size[0] * size[1])))
        idx = [rng.randrange(len(captions)) for _ in range(n)]
        texts = [captions[i] if rng.random() >= args.drop else "" for i in idx]
        return loss_fn(net, tokenizer, latents[idx], texts)

    fit(args, net, loss_on_batch)


def init_from_model(net: torch.nn.ModuleDict, model_dir: Path) -> None:
    """Start from a shipped model's (EMA) weights: how a run continues in a later session,
    since checkpoints (with optimizer state) are too large to keep in git."""
    net["transformer"].load_state_dict(SD3Transformer2DModel.from_pretrained(model_dir / "transformer").state_dict())
    for i, sub in enumerate(("text_encoder", "text_encoder_2")):
        net["encoders"][i].load_state_dict(CLIPTextModelWithProjection.from_pretrained(model_dir / sub).state_dict())
    print(f"initialised from {model_dir}", flush=True)


def export(args) -> None:
    tokenizer, net = build(args)
    ema, step, extra = load_ema(args, net)
    vae = AutoencoderKL.from_pretrained(args.vae, use_safetensors=True)
    if args.half:  # stored in fp16 to keep the repo small; loaders upcast to the serving dtype
        ema.half()
    pipe = StableDiffusion3Pipeline(
        transformer=ema["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(shift=args.shift),
        vae=vae, text_encoder=ema["encoders"][0], tokenizer=tokenizer,
        text_encoder_2=ema["encoders"][1], tokenizer_2=build_tokenizer(TEXT_LENGTH),
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(args.export, safe_serialization=True)
    (args.export / "training.json").write_text(json.dumps({
        "step": step, "elapsed_s": extra.get("elapsed_s"), "seed": args.seed, "batch": args.batch,
        "lr": args.lr, "layers": args.layers, "width": args.width, "text_width": args.text_width,
        "t5_sequence_length": T5_TOKENS, "shift": args.shift, "sizes": [f"{w}x{h}" for w, h in args.sizes],
    }, indent=2))
    print(f"exported step {step} to {args.export}")


def parse_size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height




def main() -> None:
    parser = denoiser_args(__doc__.splitlines()[0], "shapes-mmdit", steps=12000, lr=5e-4, snapshot_steps=[2000])
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--shift", type=float, default=1.0, help="the exported scheduler's time shift")
    parser.add_argument("--half", action="store_true", help="export the transformer and text encoders in fp16")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(64, 64)],
                        help="training sizes WxH, the first the main one (e.g. 64x64 64x96 ... 128x128)")
    args = parse(parser)
    export(args) if args.export else train(args)


if __name__ == "__main__":
    main()
