"""Train shapes-video: AnimateDiff-style temporal layers (Guo et al. 2023; the Video LDM idea,
Blattmann et al. 2023) inserted into the frozen shapes-ldm UNet, on clips of moving shapes.

The motion adapter (diffusers' MotionAdapter) mirrors the image UNet block for block (channels,
layers per block, norm groups), its output projections start at zero (AnimateDiff), so step 0
is the image model applied to every frame. Frames are encoded independently by the image
model's VAE; one timestep and noise level per clip; the image model's schedule and prediction
type (v on the DDPM linear schedule). Only the motion modules train, unless `--joint` also
fine-tunes the spatial layers at `--joint-lr-scale` times the learning rate.

The image model's text encoder stays frozen. Its vocabulary lacks the motion words ("moving",
"up", "down", "still": training.clips.MOTION_WORDS), so they are appended to the tokenizer and
only their embeddings train (textual inversion, Gal et al. 2022): every image prompt encodes
exactly as before.

    python -m training.train_video --out runs/shapes-video --frames 16 --batch 8 --minutes 240
    python -m training.train_video ... --min-frames 8   # also 8..15-frame clips (half the batches)
    python -m training.train_video --out runs/shapes-video --export models/shapes-video

The export loads in diffusers' AnimateDiffPipeline: the image model's layout (unet/ the spatial
UNet2DConditionModel, as shapes-ldm's unless --joint) plus motion_adapter/.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from tokenizers import Tokenizer
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedTokenizerFast

from engines.components import text_engine
from engines.conditioning import encode_ldm
from engines.schedules import vp_alphas_cumprod
from training.clips import MOTION_WORDS, clip_caption, random_clip, render_clip
from training.loop import denoiser_args, fit, load_ema, parse


def extend_tokenizer(base, new_words: tuple[str, ...]) -> PreTrainedTokenizerFast:
    """The image model's word-level tokenizer with `new_words` appended (old ids unchanged)."""
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for word in new_words:
        vocab.setdefault(word, len(vocab))
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=base.bos_token, eos_token=base.eos_token,
        unk_token=base.unk_token, pad_token=base.pad_token, model_max_length=base.model_max_length)


class AddedWords(torch.nn.Module):
    """A token embedding whose first `frozen` rows are the image model's (never updated, so
    weight decay never touches them either) and whose other rows train: the added words', kept
    from an earlier export or started at random, one per id up to `total`."""

    def __init__(self, weight: torch.Tensor, frozen: int, total: int, generator: torch.Generator):
        super().__init__()
        w = weight.detach()
        self.register_buffer("base", w[:frozen].clone())
        fresh = w[:frozen].mean(0) + w[:frozen].std(0) * torch.randn(total - len(w), w.shape[1], generator=generator)
        self.added = torch.nn.Parameter(torch.cat([w[frozen:], fresh]))

    def weight(self) -> torch.Tensor:
        return torch.cat([self.base, self.added])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight())


def mirror_adapter(unet_config, heads: int, max_frames: int) -> MotionAdapter:
    """A MotionAdapter matching the image UNet's blocks. UNetMotionModel normalises its motion
    modules with the UNet's norm groups, so the adapter must use the same count."""
    return MotionAdapter(
        block_out_channels=tuple(unet_config.block_out_channels), motion_layers_per_block=unet_config.layers_per_block,
        motion_norm_num_groups=unet_config.norm_num_groups, motion_num_attention_heads=heads,
        motion_max_seq_length=max_frames, use_motion_mid_block=True)


class VideoNet(torch.nn.ModuleDict):
    """{"unet": UNetMotionModel, "text_encoder": CLIPTextModel with AddedWords}; what trains."""

    lr_scale = 0.0  # the spatial layers' (0: frozen)

    def param_groups(self) -> list[dict]:
        motion = [p for n, p in self.named_parameters() if "motion_modules" in n or n.endswith("added")]
        groups = [{"params": motion, "lr_scale": 1.0}]
        if self.lr_scale:
            spatial = [p for n, p in self["unet"].named_parameters() if "motion_modules" not in n]
            groups.append({"params": spatial, "lr_scale": self.lr_scale})
        return groups


def build(args) -> tuple[PreTrainedTokenizerFast, VideoNet]:
    """The image model with a fresh adapter; or, for a fresh run with --init-model, a shipped
    video model's weights (how a run continues in a later session)."""
    source = args.init_model if args.init_model and not (args.out / "checkpoint.pt").exists() else None
    root = source or args.image_model
    tokenizer = extend_tokenizer(AutoTokenizer.from_pretrained(root / "tokenizer"), MOTION_WORDS)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder").requires_grad_(False)
    frozen = CLIPTextModel.config_class.from_pretrained(args.image_model / "text_encoder").vocab_size
    text_encoder.set_input_embeddings(AddedWords(text_encoder.get_input_embeddings().weight, frozen, len(tokenizer),
                                                 torch.Generator().manual_seed(args.seed)))
    unet2d = UNet2DConditionModel.from_pretrained(root / "unet")
    if source:
        adapter = MotionAdapter.from_pretrained(source / "motion_adapter")
        print(f"initialised from {source}", flush=True)
    else:
        adapter = mirror_adapter(unet2d.config, args.heads, args.max_frames)
        for module in adapter.modules():  # AnimateDiff's zero-initialised temporal output projections
            if hasattr(module, "proj_out") and hasattr(module, "transformer_blocks"):
                torch.nn.init.zeros_(module.proj_out.weight)
                torch.nn.init.zeros_(module.proj_out.bias)
    unet = UNetMotionModel.from_unet2d(unet2d, adapter)
    for name, p in unet.named_parameters():
        p.requires_grad_("motion_modules" in name or args.joint)
    net = VideoNet({"unet": unet, "text_encoder": text_encoder})
    net.lr_scale = args.joint_lr_scale if args.joint else 0.0
    return tokenizer, net


@torch.no_grad()
def build_clip_bank(vae_dir: Path, n: int, frames: int, seed: int = 1, chunk: int = 256, device: str = "cpu",
                    small_share: float | None = None) -> dict:
    """{"latents": fp16 [n, C, frames, h, w] (posterior means x scaling, each frame encoded
    alone as AnimateDiff does), "captions"}; encoded on `device`; `small_share` of the objects
    small (None: the domain's own half)."""
    vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True).eval().to(device)
    rng = random.Random(seed)
    clips, captions = [], []
    for _ in range(n):
        clip = random_clip(rng, small_share=small_share)
        clips.append(render_clip(clip, frames))
        captions.append(clip_caption(clip, rng))
    pixels = torch.from_numpy(np.stack(clips)).flatten(0, 1).permute(0, 3, 1, 2)  # [n * frames, 3, H, W]
    latents = []
    for start in range(0, len(pixels), chunk):
        x = pixels[start:start + chunk].float().to(device) / 127.5 - 1
        mean = vae.encode(x).latent_dist.mean
        latents.append(((mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).half().cpu())
    latents = torch.cat(latents).unflatten(0, (n, frames)).transpose(1, 2)
    return {"latents": latents.contiguous(), "captions": captions, "frames": frames, "small_share": small_share}


def load_or_build_bank(args, frames: int, n: int, name: str = "bank.pt", seed: int = 1) -> dict:
    path = args.out / name
    if path.exists():
        bank = torch.load(path, weights_only=False)
        if len(bank["captions"]) >= n and bank["frames"] == frames and bank.get("small_share") == args.small_share:
            return bank
    bank = build_clip_bank(args.vae or args.image_model / "vae", n, frames, seed=seed, device=args.device,
                           small_share=args.small_share)
    torch.save(bank, path)
    print(f"bank: {n} clips of {frames} frames", flush=True)
    return bank


def clip_banks(args) -> dict[int, dict]:
    """{frames: bank}: --bank clips of --frames, and --short-bank clips of each shorter length
    from --min-frames (each rendered at its length, so a clip makes its whole path in however
    many frames it has: the speed a user asking for fewer frames gets)."""
    banks = {args.frames: load_or_build_bank(args, args.frames, args.bank)}
    for frames in range(args.min_frames or args.frames, args.frames):
        banks[frames] = load_or_build_bank(args, frames, args.short_bank, f"bank-{frames}.pt", seed=100 + frames)
    return banks


def object_weights(x0: torch.Tensor, weight: float, threshold: float = 2.0) -> torch.Tensor:
    """[B, 1, F, h, w] loss weights: 1 + `weight` on the object and one latent pixel around it.
    A scene's background is one flat color, so the object is where a frame's latents stand
    off their median by more than `threshold` (the VAE's edge ripple at the borders stays
    under it). A small object covers a few of 256 latent pixels, so plain MSE barely sees its
    shape; this is where a star's points and a square's corners are decided."""
    background = x0.flatten(3).median(dim=3).values[..., None, None]
    mask = ((x0 - background).norm(dim=1, keepdim=True) > threshold).float()
    mask = F.max_pool3d(mask, (1, 3, 3), stride=1, padding=(0, 1, 1))
    return 1 + weight * mask


def train(args) -> None:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer, net = build(args)
    trained = sum(p.numel() for group in net.param_groups() for p in group["params"])
    print(f"video: {trained / 1e6:.3f}M parameters train (joint: {args.joint})", flush=True)
    banks = {frames: (bank["latents"].float().to(args.device), bank["captions"]) for frames, bank in clip_banks(args).items()}
    shorter = sorted(set(banks) - {args.frames})
    config = json.loads((args.image_model / "scheduler" / "scheduler_config.json").read_text())
    alphas = vp_alphas_cumprod(config).to(args.device)
    v_prediction = config.get("prediction_type") == "v_prediction"

    def loss_on_batch(rng: random.Random) -> torch.Tensor:
        # one length per batch: --frames for half of them, a shorter one for the rest
        frames = rng.choice(shorter) if shorter and rng.random() < 0.5 else args.frames
        latents, captions = banks[frames]
        idx = [rng.randrange(len(captions)) for _ in range(args.batch)]
        texts = [captions[i] if rng.random() >= args.drop else "" for i in idx]
        cond = encode_ldm(tokenizer, text_engine(net["text_encoder"], pooled=False), texts)
        x0 = latents[idx]  # [B, C, F, h, w]
        t = torch.randint(0, len(alphas), (args.batch,), device=x0.device)  # one noise level per clip
        eps = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        # the pipeline's layout: one text row per frame (batch-major)
        pred = net["unet"](x_t, t, encoder_hidden_states=cond.embeds.repeat_interleave(frames, 0)).sample
        target = a.sqrt() * eps - (1 - a).sqrt() * x0 if v_prediction else eps
        if not args.object_weight:
            return F.mse_loss(pred, target)
        w = object_weights(x0, args.object_weight)
        return ((pred.float() - target) ** 2 * w).mean() / w.mean()

    fit(args, net, loss_on_batch)


def split(unet: UNetMotionModel, image_unet: Path, adapter: MotionAdapter) -> UNet2DConditionModel:
    """The motion UNet's spatial weights as the image UNet, its temporal ones into `adapter`."""
    state = unet.state_dict()
    adapter.load_state_dict({k: v for k, v in state.items() if "motion_modules" in k})
    spatial = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(image_unet))
    spatial.load_state_dict({k: v for k, v in state.items() if "motion_modules" not in k})
    return spatial


def plain_text_encoder(encoder: CLIPTextModel) -> CLIPTextModel:
    """AddedWords folded back into an ordinary embedding (a larger vocabulary)."""
    weight = encoder.get_input_embeddings().weight().detach().clone()
    encoder.set_input_embeddings(torch.nn.Embedding.from_pretrained(weight, freeze=False))
    encoder.config.vocab_size = weight.shape[0]
    return encoder


def video_pipeline(*, unet: UNet2DConditionModel, **components) -> AnimateDiffPipeline:
    """An AnimateDiffPipeline that saves as the image model's components with unet/ the spatial
    UNet2DConditionModel, and motion_adapter/ (the pipeline combines them when it loads)."""
    pipe = AnimateDiffPipeline(unet=unet, **components)
    # The pipeline turned `unet` into a UNetMotionModel; store the image UNet itself instead
    # (unet/ then reads as the image model's, motion_adapter/ holds the rest, nothing twice).
    pipe.register_modules(unet=unet)
    return pipe


def save_video_model(path: Path, *, unet: UNet2DConditionModel, **components) -> None:
    video_pipeline(unet=unet, **components).save_pretrained(path, safe_serialization=True)


def export(args) -> None:
    tokenizer, net = build(args)
    ema, step, extra = load_ema(args, net)
    unet2d = UNet2DConditionModel.from_pretrained(args.image_model / "unet")
    adapter = mirror_adapter(unet2d.config, args.heads, args.max_frames)
    spatial = split(ema["unet"], args.image_model / "unet", adapter)
    # the motion layers in fp16, as the image model's UNet (training.slim brings fp16 back anyway); the
    # text encoder in fp32: transformers loads a model in its stored dtype, and AnimateDiffPipeline
    # makes its latents in the text embeddings' dtype
    save_video_model(args.export, vae=AutoencoderKL.from_pretrained(args.image_model / "vae"),
                     text_encoder=plain_text_encoder(ema["text_encoder"]), tokenizer=tokenizer,
                     unet=spatial.half(), motion_adapter=adapter.half(),
                     scheduler=DDIMScheduler.from_pretrained(args.image_model / "scheduler"))
    # The frozen image model's own files, byte for byte: git stores them once for both models.
    for shared in ("vae", *(() if args.joint else ("unet",))):
        shutil.copytree(args.image_model / shared, args.export / shared, dirs_exist_ok=True)
    (args.export / "training.json").write_text(json.dumps({
        "step": step, "elapsed_s": extra.get("elapsed_s"), "seed": args.seed, "lr": extra.get("lr", args.lr),
        "image_model": str(args.image_model), "frames": args.frames,
        "min_frames": args.min_frames or args.frames, "max_frames": args.max_frames,
        "heads": args.heads, "joint": args.joint, "joint_lr_scale": args.joint_lr_scale if args.joint else None,
        "object_weight": args.object_weight, "small_share": args.small_share,
        "added_words": list(MOTION_WORDS), "device": extra.get("device", "cpu"), "amp": extra.get("amp", False),
        "bank": extra.get("bank"), "batch": extra.get("batch", args.batch),
    }, indent=2))
    print(f"exported step {step} to {args.export}")


def main() -> None:
    parser = denoiser_args(__doc__.splitlines()[0], "shapes-video", steps=20000, lr=1e-4, snapshot_steps=[])
    parser.add_argument("--image-model", type=Path, default=Path("models/shapes-ldm"),
                        help="the frozen image model (tokenizer, text encoder, UNet, VAE, scheduler)")
    parser.add_argument("--frames", type=int, default=16, help="frames per training clip")
    parser.add_argument("--min-frames", type=int, help="also train on every shorter length down to this "
                        "(half the batches, one length each); default: --frames only")
    parser.add_argument("--short-bank", type=int, default=500, help="clips per shorter length")
    parser.add_argument("--max-frames", type=int, default=32, help="the temporal position embeddings' length")
    parser.add_argument("--heads", type=int, default=4, help="temporal attention heads per motion module")
    parser.add_argument("--joint", action="store_true", help="also fine-tune the spatial layers")
    parser.add_argument("--joint-lr-scale", type=float, default=0.1, help="their learning rate, times --lr")
    parser.add_argument("--object-weight", type=float, default=0.0,
                        help="weigh the loss on the object's latent pixels 1 + this (0: plain MSE)")
    parser.add_argument("--small-share", type=float, help="draw training clips' objects small this often "
                        "(default: half, as the image domain); small objects are where frames disagree")
    parser.set_defaults(vae=None, bank=4000, batch=8)  # vae: the image model's own
    args = parse(parser)
    if args.frames > args.max_frames:
        parser.error("--frames exceeds --max-frames")
    if args.min_frames is not None and not 1 <= args.min_frames <= args.frames:
        parser.error("--min-frames must be in 1..--frames")
    export(args) if args.export else train(args)


if __name__ == "__main__":
    main()
