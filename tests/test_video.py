"""Text to video: our sampler equals diffusers' AnimateDiffPipeline on random-weight motion
adapters over tiny-ldm (eps) and shapes-ldm (v) and on the shipped shapes-video, same seeds
(PSNR >= 40 dB per video); the
clip renderer and its scorer; frames encoded to WebP / GIF / MP4 and decoded back."""

from __future__ import annotations

import io
import json
import random

import av
import numpy as np
import pytest
import torch
from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from PIL import Image, ImageSequence
from transformers import AutoTokenizer, CLIPTextModel

from engines.registry import load_registry
from engines.tasks import video
from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch
from service.config import ROOT
from service.video_media import encode_video
from training.clips import MOTIONS, random_clip, read_clip, render_clip, validate_clip_scorer
from training.train_video import mirror_adapter, save_video_model

VIDEOS = [ImageRequest("a red circle moving right", "", 3, 5.0), ImageRequest("a large blue star", "green", 4, 5.0)]
FRAMES, WIDTH, HEIGHT = 8, 64, 48


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def random_video_model(image_model: str, path, seed: int = 0) -> None:
    """The image model's components and a motion adapter mirroring its UNet, random weights
    (diffusers' own init: the temporal layers are not zero, so they mix frames)."""
    root = ROOT / "models" / image_model
    unet = UNet2DConditionModel.from_pretrained(root / "unet")
    torch.manual_seed(seed)
    save_video_model(path, unet=unet, motion_adapter=mirror_adapter(unet.config, heads=4, max_frames=32),
                     vae=AutoencoderKL.from_pretrained(root / "vae"),
                     text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder"),
                     tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
                     scheduler=DDIMScheduler.from_pretrained(root / "scheduler"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    entries = []
    paths = {"shapes-video": ROOT / "models" / "shapes-video"}  # the shipped model, beside random adapters
    for image_model in ("tiny-ldm", "shapes-ldm"):
        random_video_model(image_model, root / image_model)
        paths[image_model] = root / image_model
    for image_model, path in paths.items():
        entries.append({"id": image_model, "path": str(path), "family": "ldm", "tasks": ["txt2video"],
                        "defaults": {"sampler": "ddim", "steps": 8, "guidance_scale": 5.0, "width": 64, "height": 64,
                                     "num_frames": FRAMES},
                        "limits": {"size_multiple": 16, "max_frames": 32}})
    (root / "registry.json").write_text(json.dumps({"default": "tiny-ldm", "models": entries}))
    return load_registry(root / "registry.json")


def reference(spec, sampler: str, steps: int, videos: list[ImageRequest], free_init: int = 1, **overrides) -> np.ndarray:
    pipe = AnimateDiffPipeline.from_pretrained(spec.path)
    if free_init > 1:
        pipe.enable_free_init(num_iters=free_init)
    if sampler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    out = pipe([v.prompt for v in videos], negative_prompt=[v.negative_prompt for v in videos], num_frames=FRAMES,
               width=WIDTH, height=HEIGHT, num_inference_steps=steps, guidance_scale=videos[0].guidance_scale,
               generator=[torch.Generator().manual_seed(v.seed) for v in videos], output_type="np",
               decode_chunk_size=5, **overrides).frames
    return (np.asarray(out) * 255).round().astype(np.uint8)  # [B, F, H, W, 3]


@pytest.mark.parametrize("image_model,sampler,steps,free_init", [
    ("tiny-ldm", "ddim", 10, 1), ("tiny-ldm", "euler", 6, 1), ("shapes-ldm", "ddim", 6, 1),
    ("shapes-video", "ddim", 6, 1), ("shapes-video", "ddim", 4, 3)])
def test_video_matches_animatediff_pipeline(registry, image_model, sampler, steps, free_init):
    """free_init > 1: the pipeline with enable_free_init(num_iters=free_init) (its defaults)."""
    spec = registry.get(image_model)
    model = video.load(spec)
    ours = video.run(model, video.VideoBatch(Txt2ImgBatch(WIDTH, HEIGHT, sampler, steps, VIDEOS), FRAMES,
                                             decode_chunk_size=3, free_init=free_init)).numpy()
    ref = reference(spec, sampler, steps, VIDEOS, free_init=free_init)
    assert ours.shape == ref.shape == (len(VIDEOS), FRAMES, HEIGHT, WIDTH, 3)
    for k in range(len(VIDEOS)):
        assert ref[k].std() > 5, "reference video is flat: the comparison would prove nothing"
        assert psnr(ours[k], ref[k]) >= 40, f"video {k}: {psnr(ours[k], ref[k]):.1f} dB"
    # Sensitive: frames out of order, or the other video, are clearly different.
    assert psnr(ours[0], ref[0][::-1]) < 30 and psnr(ours[0], ref[1]) < 30


def test_shipped_video_model_stores_its_image_model_once():
    """shapes-video's VAE is shapes-ldm's file byte for byte (git keeps one copy), and so is its
    spatial UNet exactly when training.json says the spatial layers stayed frozen (no `joint`);
    its text encoder is shapes-ldm's plus the motion words."""
    video_dir, image_dir = ROOT / "models" / "shapes-video", ROOT / "models" / "shapes-ldm"
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (video_dir / vae).read_bytes() == (image_dir / vae).read_bytes()
    joint = json.loads((video_dir / "training.json").read_text())["joint"]
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert ((video_dir / unet).read_bytes() == (image_dir / unet).read_bytes()) is not joint
    words = AutoTokenizer.from_pretrained(video_dir / "tokenizer").get_vocab()
    image_words = AutoTokenizer.from_pretrained(image_dir / "tokenizer").get_vocab()
    assert {w: words[w] for w in image_words} == image_words and {"moving", "still"} <= set(words)


def test_the_temporal_layers_matter_and_videos_do_not_depend_on_batch_mates(registry):
    """Without the motion modules' output (zeroed) the video differs: they mix frames. A video
    alone equals the same video beside another (per-video generators)."""
    spec = registry.get("tiny-ldm")
    model = video.load(spec)
    job = video.VideoBatch(Txt2ImgBatch(WIDTH, HEIGHT, "ddim", 6, VIDEOS), FRAMES)
    both = video.run(model, job).numpy()
    alone = video.run(model, video.VideoBatch(Txt2ImgBatch(WIDTH, HEIGHT, "ddim", 6, VIDEOS[1:]), FRAMES)).numpy()
    assert np.abs(both[1].astype(int) - alone[0].astype(int)).max() <= 2
    unet = model.components["denoiser"].module.unet
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "motion_modules" in name and "proj_out" in name:
                p.zero_()
    still = video.run(model, job).numpy()
    assert psnr(both[0], still[0]) < 35


def test_the_video_scorer_runs_through_the_serving_engine_and_reads_rendered_clips_perfectly(registry):
    """training.evaluate_video end to end at a smoke size: the report names the sampling it ran
    (the request's over the model's defaults) and scores the rendered clips at its ceiling, also
    after a round trip through the model's VAE."""
    from training.evaluate_video import evaluate

    model = video.load(registry.get("shapes-video"))
    result, videos = evaluate(model, n=2, frames=FRAMES, vae_ceiling=True, steps=3, free_init=1)
    assert videos.shape == (2, FRAMES, 64, 64, 3) and videos.dtype == np.uint8
    assert result["sampling"] == {"sampler": "ddim", "steps": 3, "guidance_scale": 5.0, "guidance": "cfg",
                                  "free_init_iterations": 1}
    for ceiling in ("rendered_clips", "rendered_clips_through_vae"):
        rendered = result[ceiling]
        assert rendered["per_frame_color_and_shape"] == rendered["same_object_every_frame"] == 1.0, ceiling
    assert result["model"]["moving_clips"] + result["model"]["still_clips"] == 2


def test_clips_move_as_captioned_and_the_scorer_reads_them():
    rng = random.Random(7)
    seen = set()
    for _ in range(40):
        clip = random_clip(rng)
        seen.add(clip.motion)
        frames = render_clip(clip, 12)
        assert frames.shape == (12, 64, 64, 3)
        travel = np.hypot(clip.end[0] - clip.start[0], clip.end[1] - clip.start[1])
        assert travel == 0 if clip.motion == "still" else travel >= 0.25
        assert np.array_equal(frames, render_clip(clip, 12))  # deterministic
        assert read_clip(frames).motion == clip.motion
    assert seen == set(MOTIONS)
    assert min(validate_clip_scorer(n=48, frames=8).values()) >= 0.99
    # A clip whose object changes between frames is not consistent.
    a, b = random_clip(random.Random(1)), random_clip(random.Random(2))
    assert not read_clip(np.concatenate([render_clip(a, 4), render_clip(b, 4)])).consistent


@pytest.mark.parametrize("output_format,mime", [("webp", "image/webp"), ("gif", "image/gif"), ("mp4", "video/mp4")])
@pytest.mark.parametrize("size", [(64, 48), (63, 47)])
def test_frames_encode_and_decode_back(output_format, mime, size):
    clip = random_clip(random.Random(11))
    frames = render_clip(clip, 10, size)  # (width, height)
    data, got_mime = encode_video(frames, output_format, fps=8)
    assert got_mime == mime
    if output_format == "mp4":
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264" and stream.average_rate == 8
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        width, height = size[0] + size[0] % 2, size[1] + size[1] % 2  # yuv420p: padded to even
        assert len(decoded) == 10 and decoded[0].shape == (height, width, 3)
        assert psnr(decoded[4][: size[1], : size[0]], frames[4]) >= 30  # lossy, but the same picture
        return
    image = Image.open(io.BytesIO(data))
    assert image.is_animated and image.n_frames == 10 and image.size == size and image.info["loop"] == 0
    decoded, durations = [], []
    for frame in ImageSequence.Iterator(image):
        decoded.append(np.asarray(frame.convert("RGB")))  # loads the frame, which sets its duration
        durations.append(frame.info["duration"])
    assert all(abs(d - 125) <= 5 for d in durations), durations  # GIF: hundredths of a second
    if output_format == "webp":
        assert all(np.array_equal(d, f) for d, f in zip(decoded, frames))  # lossless
    else:
        assert psnr(decoded[4], frames[4]) >= 30  # palette


def test_bad_frames_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        encode_video(np.zeros((4, 8, 8, 3), np.float32), "gif", 8)
    with pytest.raises(ValueError, match="unknown video format"):
        encode_video(np.zeros((4, 8, 8, 3), np.uint8), "avi", 8)
