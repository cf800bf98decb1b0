"""Distil shapes-mmdit into a few-step turbo model by Latent Adversarial Diffusion
Distillation (LADD; Sauer et al. 2024, "Fast high-resolution image synthesis with latent
adversarial diffusion distillation").

    python -m training.train_ladd --teacher models/shapes-mmdit --out runs/shapes-mmdit-turbo --minutes 40
    python -m training.train_ladd --teacher models/shapes-mmdit --out runs/shapes-mmdit-turbo --export models/shapes-mmdit-turbo
    python -m training.train_ladd ... --adv-weight 0      # the baseline without the adversarial loss

- Data: latents the teacher generates with guidance (its default: 20 flow-Euler steps, CFG 4)
  from training captions at every size it serves, each kept with the noise it started from
  (synthetic data, as LADD trains on). Built once, then loaded.
- Student: starts as the teacher's transformer and is trained only at the turbo timesteps
  (flow sigmas 1, 3/4, 1/2, 1/4 for 4 steps): from x_t = (1 - t) x0 + t noise it predicts x0.
- Discriminator: small heads on the frozen teacher's image-token features (a few of its
  blocks), at an independently drawn noise level t' (logit-normal), seeing re-noised student
  outputs against re-noised teacher latents, conditioned on the pooled text embedding
  (projection); hinge loss; batches of >= 8 (batch-1 hinge losses collapse).
- Distillation term (`--distill-weight`): the student's x0 against the teacher latent its noise
  led to (the coupling the teacher's ODE defines; a reflow-style regression, cheaper than ADD's
  score distillation, which would cost a second teacher call). LADD alone was not tried at
  this scale first; the card reports the adversarial and distillation-only runs side by side.
The text encoders and VAE are the teacher's (frozen); only the transformer is distilled.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from engines.conditioning import Conditioning
from engines.denoisers import FlowDenoiser
from engines.guidance import Guidance, evaluator
from engines.sampling import sample, start
from engines.schedules import make_schedule
from training import checkpoint
from training.loop import autocast, stop_on_signal
from training.shapes import caption, random_scene
from training.train_mmdit import parse_size


def turbo_sigmas(steps: int) -> torch.Tensor:
    return torch.tensor([1 - k / steps for k in range(steps)])


def load_teacher(path: Path, device: str = "cpu") -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32)
    for module in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        module.requires_grad_(False).eval().to(device)
    return pipe


def encode(pipe: StableDiffusion3Pipeline, prompts: list[str]) -> Conditioning:
    from engines.components import text_engine
    from engines.conditioning import encode_mmdit

    encoders = [text_engine(pipe.text_encoder, pooled=True), text_engine(pipe.text_encoder_2, pooled=True)]
    return encode_mmdit([pipe.tokenizer, pipe.tokenizer_2], encoders, prompts,
                        pipe.transformer.config.joint_attention_dim, 0)


def transformer_net(transformer):
    def net(x, t, cond: Conditioning, _t=None):
        return transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                           pooled_projections=cond.pooled).sample

    return net


@torch.no_grad()
def synthesize(pipe, sizes: list[tuple[int, int]], counts: list[int], seed: int, guidance: float = 4.0,
               steps: int = 20, chunk: int = 32, device: str = "cpu") -> dict:
    """{size: {noise, latents, embeds, pooled, captions}}: the teacher's guided samples."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    denoise = FlowDenoiser(transformer_net(pipe.transformer))
    config = dict(pipe.scheduler.config)
    out = {}
    for size, n in zip(sizes, counts):
        w, h = size
        parts = {"noise": [], "latents": [], "embeds": [], "pooled": [], "captions": []}
        for begin in range(0, n, chunk):
            texts = [caption(random_scene(rng), rng)[0] for _ in range(min(chunk, n - begin))]
            cond, uncond = encode(pipe, texts), encode(pipe, [""] * len(texts))
            noise = torch.randn(len(texts), 4, h // 4, w // 4, generator=gen).to(device)
            schedule = make_schedule(config, "flow_euler", steps)
            rows = [start(noise[k], schedule, "flow_euler", cond=c, uncond=u, guidance=Guidance("cfg", guidance))
                    for k, (c, u) in enumerate(zip(cond.rows(), uncond.rows()))]
            rows = sample(evaluator(denoise), rows)
            parts["noise"].append(noise.cpu())
            parts["latents"].append(torch.stack([r.x for r in rows]).float().cpu())
            parts["embeds"].append(cond.embeds.float().cpu())
            parts["pooled"].append(cond.pooled.float().cpu())
            parts["captions"] += texts
        out[size] = {k: (torch.cat(v) if k != "captions" else v) for k, v in parts.items()}
        print(f"synthetic {w}x{h}: {n} teacher latents", flush=True)
    return out


class Heads(torch.nn.Module):
    """Discriminator heads on the teacher's image tokens at a few blocks, each conditioned on
    the pooled text embedding by projection (Miyato & Koyama 2018)."""

    def __init__(self, width: int, pooled_dim: int, blocks: list[int]):
        super().__init__()
        self.blocks = blocks
        self.mlp = torch.nn.ModuleList(torch.nn.Sequential(
            torch.nn.LayerNorm(width), torch.nn.Linear(width, width), torch.nn.SiLU(), torch.nn.Linear(width, width))
            for _ in blocks)
        self.out = torch.nn.ModuleList(torch.nn.Linear(width, 1) for _ in blocks)
        self.proj = torch.nn.ModuleList(torch.nn.Linear(pooled_dim, width) for _ in blocks)

    def forward(self, features: list[torch.Tensor], pooled: torch.Tensor) -> torch.Tensor:
        logits = 0
        for f, mlp, out, proj in zip(features, self.mlp, self.out, self.proj):
            h = mlp(f)  # [B, tokens, width]
            logits = logits + out(h).mean(dim=(1, 2)) + (h.mean(1) * proj(pooled)).sum(-1) / h.shape[-1] ** 0.5
        return logits


def teacher_features(teacher, blocks: list[int], x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> list:
    """The image tokens after each block in `blocks` (the teacher stays frozen; gradients flow to x)."""
    captured: dict[int, torch.Tensor] = {}
    hooks = [teacher.transformer_blocks[i].register_forward_hook(
        lambda _m, _inp, output, i=i: captured.__setitem__(i, output[1])) for i in blocks]
    try:
        teacher(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled)
    finally:
        for hook in hooks:
            hook.remove()
    return [captured[i] for i in blocks]


def synthetic_data(args, pipe) -> dict:
    """The teacher's latents: built once per run (or read from `--data-from`, another run's),
    on the device, kept on the CPU and moved to the device for training."""
    path = args.data_from or args.out / "synthetic.pt"
    if args.data_from:
        while not path.exists():  # another run is still building it
            time.sleep(5)
    if path.exists():
        data = torch.load(path, weights_only=False)
    else:
        counts = [args.data if k == 0 else max(8, args.data // 4) for k in range(len(args.sizes))]
        with autocast(args):
            data = synthesize(pipe, args.sizes, counts, args.seed, chunk=args.chunk, device=args.device)
        tmp = path.with_suffix(".tmp")
        torch.save(data, tmp)  # our own file; renamed whole, so a reader never sees half of it
        os.replace(tmp, path)
    return {size: {k: (v.to(args.device) if torch.is_tensor(v) else v) for k, v in d.items()} for size, d in data.items()}


def train(args) -> None:
    torch.manual_seed(args.seed)
    pipe = load_teacher(args.teacher, args.device)
    teacher = pipe.transformer
    data = synthetic_data(args, pipe)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    ema = copy.deepcopy(student).requires_grad_(False)
    blocks = [i for i in args.blocks if i < len(teacher.transformer_blocks)]
    heads = Heads(teacher.config.num_attention_heads * teacher.config.attention_head_dim,
                  teacher.config.pooled_projection_dim, blocks).to(args.device)
    opt_g = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.0, 0.99), weight_decay=0.0)
    opt_d = torch.optim.AdamW(heads.parameters(), lr=args.lr_d, betas=(0.0, 0.99), weight_decay=0.0)
    modules = {"student": student, "ema": ema, "heads": heads}
    step, extra = checkpoint.load(args.out / "checkpoint.pt", modules, opt_g)
    if step and "opt_d" in extra:
        opt_d.load_state_dict(extra.pop("opt_d"))
    rng = random.Random(args.seed + step)
    sigmas = turbo_sigmas(args.turbo_steps).to(args.device)
    sizes = list(data)
    log = open(args.out / "log.jsonl", "a")
    started, last_save, stop = time.time(), time.time(), stop_on_signal()
    elapsed = lambda: extra.get("elapsed_s", 0.0) + time.time() - started  # noqa: E731

    def save():
        checkpoint.save(args.out / "checkpoint.pt", step, modules, opt_g,
                        {"elapsed_s": elapsed(), "opt_d": opt_d.state_dict(), "config": json.dumps(run_config(args))})

    print(f"{args.out.name}: student {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M, "
          f"heads {sum(p.numel() for p in heads.parameters()) / 1e6:.2f}M, from step {step}", flush=True)
    while step < args.steps and time.time() - started < args.minutes * 60 and not stop.is_set():
        size = sizes[0] if len(sizes) == 1 or rng.random() < 0.25 else rng.choice(sizes[1:])
        d = data[size]
        n = max(8, round(args.batch * 64 * 64 / (size[0] * size[1])))
        idx = torch.tensor([rng.randrange(len(d["captions"])) for _ in range(n)], device=args.device)
        x0, noise = d["latents"][idx], d["noise"][idx]
        cond = Conditioning(d["embeds"][idx], d["pooled"][idx])
        t = sigmas[torch.randint(len(sigmas), (n,), device=args.device)].view(-1, 1, 1, 1)
        x_t = (1 - t) * x0 + t * noise
        t_d = torch.sigmoid(torch.randn(n, device=args.device) * args.t_d_std + args.t_d_mean).view(-1, 1, 1, 1)

        # Generator: fool the heads on re-noised student outputs, stay near the teacher's latents.
        with autocast(args):
            x0_hat = x_t - t * student(hidden_states=x_t, timestep=t.flatten() * 1000,
                                       encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled).sample.float()
            loss_g = args.distill_weight * F.mse_loss(x0_hat, x0)
            adv_g = torch.zeros((), device=args.device)
            if args.adv_weight > 0:
                fake = (1 - t_d) * x0_hat + t_d * torch.randn_like(x0)
                adv_g = -heads(teacher_features(teacher, blocks, fake, t_d.flatten(), cond), cond.pooled).float().mean()
                loss_g = loss_g + args.adv_weight * adv_g
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt_g.step()

        # Discriminator: hinge loss, real = re-noised teacher latents, fake = re-noised student outputs.
        loss_d = torch.zeros(())
        if args.adv_weight > 0:
            eps = torch.randn_like(x0)
            with autocast(args):
                with torch.no_grad():
                    real_f = teacher_features(teacher, blocks, (1 - t_d) * x0 + t_d * eps, t_d.flatten(), cond)
                    fake_f = teacher_features(teacher, blocks, (1 - t_d) * x0_hat.detach() + t_d * eps, t_d.flatten(),
                                              cond)
                loss_d = (F.relu(1 - heads(real_f, cond.pooled).float()).mean()
                          + F.relu(1 + heads(fake_f, cond.pooled).float()).mean())
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

        step += 1
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), student.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if step % 25 == 0:
            record = {"step": step, "distill": round(F.mse_loss(x0_hat.detach(), x0).item(), 5),
                      "adv_g": round(adv_g.item(), 4), "d": round(float(loss_d), 4), "elapsed_s": round(elapsed(), 1)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(record, flush=True)
        if time.time() - last_save > 300:
            save()
            last_save = time.time()
    save()
    print(f"stopped at step {step}", flush=True)


def export(args) -> None:
    pipe = load_teacher(args.teacher)
    step, extra = _load_ema(args, pipe.transformer)  # the student has the teacher's architecture
    if args.half:
        pipe.transformer.half()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # the turbo sigmas are used as given
    if args.half:
        pipe.text_encoder.half()
        pipe.text_encoder_2.half()
    pipe.save_pretrained(args.export, safe_serialization=True)
    config = json.loads(extra["config"]) if "config" in extra else run_config(args)  # as trained
    (args.export / "training.json").write_text(json.dumps({
        "step": step, "elapsed_s": extra.get("elapsed_s"), **config, "t5_sequence_length": 0}, indent=2))
    print(f"exported step {step} to {args.export}")


def run_config(args) -> dict:
    return {"seed": args.seed, "batch": args.batch, "lr": args.lr, "lr_d": args.lr_d, "adv_weight": args.adv_weight,
            "distill_weight": args.distill_weight, "turbo_steps": args.turbo_steps, "teacher": str(args.teacher),
            "blocks": args.blocks, "sizes": [f"{w}x{h}" for w, h in args.sizes], "data": args.data,
            "device": args.device, "amp": args.amp}


def _load_ema(args, ema: torch.nn.Module) -> tuple[int, dict]:
    state = torch.load(args.out / "checkpoint.pt", weights_only=False, map_location="cpu")  # training.checkpoint's
    ema.load_state_dict(state["modules"]["ema"])
    return state["step"], state["extra"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=Path("models/shapes-mmdit"))
    parser.add_argument("--out", type=Path, default=Path("runs/shapes-mmdit-turbo"))
    parser.add_argument("--export", type=Path)
    parser.add_argument("--half", action="store_true", help="export the transformer and text encoders in fp16")
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument("--minutes", type=float, default=40)
    parser.add_argument("--batch", type=int, default=32, help="at 64x64; other sizes keep the token count")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--lr-d", type=float, default=1e-4)
    parser.add_argument("--ema", type=float, default=0.99)
    parser.add_argument("--adv-weight", type=float, default=1.0, help="0: the distillation-only baseline")
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--turbo-steps", type=int, default=4)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 3, 4], help="teacher blocks the heads read")
    parser.add_argument("--t-d-mean", type=float, default=0.0, help="logit-normal mean of the heads' noise level")
    parser.add_argument("--t-d-std", type=float, default=1.0)
    parser.add_argument("--data", type=int, default=2048, help="teacher latents at the first size (a quarter at others)")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(64, 64)])
    parser.add_argument("--data-from", type=Path, help="another run's synthetic.pt (waits for it to appear)")
    parser.add_argument("--chunk", type=int, default=32, help="teacher samples per synthesis batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for the forward passes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    export(args) if args.export else train(args)


if __name__ == "__main__":
    main()
