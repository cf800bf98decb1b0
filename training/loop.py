"""The training loop the denoiser trainers share: warmup, clipping, EMA, logging, resumable
checkpoints and snapshots, stopping at a step count or a wall-clock budget."""

from __future__ import annotations

import argparse
import copy
import json
import random
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from training import checkpoint


def fit(args, net: torch.nn.Module, loss_on_batch: Callable[[random.Random], torch.Tensor]) -> None:
    """Train `net` (a ModuleDict of everything trained jointly); keeps an EMA copy.

    args: out, steps, minutes, lr, ema, seed, snapshot_steps. Checkpoints hold both.
    """
    net.to(args.device)
    ema = copy.deepcopy(net).requires_grad_(False)
    # A net may name its own parameter groups (`param_groups()`, each with an `lr_scale`): the
    # video trainer fine-tunes frozen-by-default layers slower than the ones it adds.
    groups = net.param_groups() if hasattr(net, "param_groups") else net.parameters()
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01)
    scales = [group.get("lr_scale", 1.0) for group in opt.param_groups]
    ckpt = args.out / "checkpoint.pt"
    modules = {"net": net, "ema": ema}
    step, extra = checkpoint.load(ckpt, modules, opt)
    for group, scale in zip(opt.param_groups, scales):  # loading restored the saved run's; this run's apply
        group["lr_scale"] = scale
    rng = random.Random(args.seed + step)  # a fresh stream after a resume, still seeded
    print(f"{args.out.name}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M trained params, "
          f"from step {step}", flush=True)
    log = open(args.out / "log.jsonl", "a")
    started, last_save = time.time(), time.time()
    elapsed = lambda: extra.get("elapsed_s", 0.0) + time.time() - started  # noqa: E731
    # Where and how it trained, for the exported training.json (the last run's settings).
    run_extra = lambda: {"elapsed_s": elapsed(), "device": args.device, "amp": args.amp,  # noqa: E731
                         "batch": args.batch, "bank": args.bank, "lr": args.lr}
    stop = stop_on_signal()
    net.train()
    while step < args.steps and time.time() - started < args.minutes * 60 and not stop.is_set():
        lr = learning_rate(args, step)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with autocast(args):
            loss = loss_on_batch(rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - decay)
        if step % 50 == 0:
            record = {"step": step, "loss": round(loss.item(), 5), "lr": lr, "elapsed_s": round(elapsed(), 1)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(record, flush=True)
        if step in args.snapshot_steps:
            checkpoint.save(args.out / f"snapshot-{step}.pt", step, modules, opt, run_extra())
        if time.time() - last_save > 300:
            checkpoint.save(ckpt, step, modules, opt, run_extra())
            last_save = time.time()
    checkpoint.save(ckpt, step, modules, opt, run_extra())
    print(f"stopped at step {step}", flush=True)


def learning_rate(args, step: int) -> float:
    """Linear warmup over 200 steps, then constant; with `--cooldown N`, a linear decay to zero
    over the last N steps before `--steps` (warmup-stable-decay: a run can be resumed from any
    checkpoint of the constant phase and annealed from there)."""
    lr = args.lr * min(1.0, (step + 1) / 200)
    if args.cooldown:
        lr *= min(1.0, max(0.0, (args.steps - step) / args.cooldown))
    return lr


def autocast(args):
    """bf16 autocast where asked (`--amp`, on an accelerator or an AMX CPU); weights and the
    optimizer stay fp32."""
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.amp)


def stop_on_signal() -> threading.Event:
    """SIGTERM / SIGINT end training after the current step (and its checkpoint), not mid-write."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def load_ema(args, net: torch.nn.Module) -> tuple[torch.nn.Module, int, dict]:
    """The EMA weights of the last checkpoint (or of snapshot `args.export_step`)."""
    ema = copy.deepcopy(net)
    name = f"snapshot-{args.export_step}.pt" if args.export_step else "checkpoint.pt"
    step, extra = checkpoint.load(args.out / name, {"net": net, "ema": ema})
    return ema, step, extra


def denoiser_args(description: str, name: str, *, steps: int, lr: float,
                  snapshot_steps: list[int]) -> argparse.ArgumentParser:
    """The command line both denoiser trainers share; each adds its architecture flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--vae", type=Path, default=Path("models/shapes-vae"))
    parser.add_argument("--out", type=Path, default=Path("runs") / name)
    parser.add_argument("--export", type=Path, help="write the trained model here (diffusers layout) and exit")
    parser.add_argument("--export-step", type=int, help="export this snapshot instead of the last step")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--cooldown", type=int, default=0,
                        help="decay the learning rate linearly to zero over the last N steps before --steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--drop", type=float, default=0.1, help="caption dropout (for CFG)")
    parser.add_argument("--text-width", type=int, default=64)
    parser.add_argument("--bank", type=int, default=40000, help="(latent, caption) pairs to train on")
    parser.add_argument("--snapshot-steps", type=int, nargs="*", default=snapshot_steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for the forward passes")
    parser.add_argument("--init-model", type=Path,
                        help="start from a shipped model's weights (when there is no checkpoint yet): how a run "
                             "continues in a later session, since checkpoints are too large for git")
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.snapshot_steps = set(args.snapshot_steps)
    args.out.mkdir(parents=True, exist_ok=True)
    return args
