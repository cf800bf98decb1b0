"""The shapes domain, its scorer, the evaluation set and smoke runs of every trainer (a few
steps on a tiny config: trains, saves, resumes, exports, reloads in diffusers)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from service.config import ROOT
from training.evaluate import eval_cases, shuffled_cases, validate_scorer
from training.shapes import COLORS, HELD_OUT, SHAPES, caption, random_scene, render
from training.vocab import words


def test_scorer_reads_rendered_scenes_at_least_99_percent():
    result = validate_scorer(None, n=384)["rendered"]
    assert min(result.values()) >= 0.99, result


def test_non_square_scenes_render_and_score_relative_to_width_and_height():
    for size in ((64, 128), (128, 96), (96, 64)):
        result = validate_scorer(None, n=64, size=size)["rendered"]
        assert min(result.values()) >= 0.99, (size, result)
    scene = random_scene(random.Random(1))
    square = render(scene, 64, random.Random(2))
    assert np.array_equal(square, render(scene, (64, 64), random.Random(2)))  # square unchanged
    assert render(scene, (96, 64)).shape == (64, 96, 3)  # (width, height) -> [height, width, 3]


def test_training_captions_use_the_vocabulary_and_never_a_held_out_pair():
    rng = random.Random(3)
    vocab = set(words())
    for _ in range(3000):
        text, scene = caption(random_scene(rng), rng)
        assert set(text.split()) <= vocab, text
        for obj in scene.objects:
            assert (obj.color, obj.shape) not in HELD_OUT
        tokens = text.split()
        pairs = {(a, b) for a, b in zip(tokens, tokens[1:]) if a in COLORS and b in SHAPES}
        assert not pairs & HELD_OUT, text


def test_evaluation_set_is_a_fixed_rule_covering_every_kind():
    cases = eval_cases(256)
    assert cases == eval_cases(256) and len(cases) == 256
    kinds = {kind: sum(c.kind == kind for c in cases) for kind in ("single", "two", "held_out")}
    assert kinds == {"single": 160, "two": 48, "held_out": 48}
    held = {(c.scene.objects[0].color, c.scene.objects[0].shape) for c in cases if c.kind == "held_out"}
    assert held == set(HELD_OUT)
    assert [c.prompt for c in shuffled_cases(16)] == [c.prompt for c in shuffled_cases(16)]


def run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_vae_trainer_smoke(tmp_path):
    common = ["-m", "training.train_vae", "--out", str(tmp_path / "run"), "--width", "16", "--batch", "4"]
    run(*common, "--steps", "3")
    assert "from step 3" in run(*common, "--steps", "5")  # resumes
    run(*common, "--export", str(tmp_path / "vae"))
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tmp_path / "vae", use_safetensors=True)
    assert vae.config.scaling_factor > 0 and 2 ** (len(vae.config.block_out_channels) - 1) == 4
    out = vae(torch.zeros(1, 3, 64, 64)).sample
    assert out.shape == (1, 3, 64, 64)

    # Decoder fine-tuning keeps the encoder, so the latent space (and scaling) stay the same.
    tuned = ["-m", "training.train_vae", "--out", str(tmp_path / "dec"), "--width", "16", "--batch", "4",
             "--init", str(tmp_path / "run" / "checkpoint.pt"), "--decoder-only"]
    run(*tuned, "--steps", "2")
    run(*tuned, "--export", str(tmp_path / "vae-dec"))
    dec = AutoencoderKL.from_pretrained(tmp_path / "vae-dec", use_safetensors=True)
    for a, b in zip(vae.encoder.parameters(), dec.encoder.parameters()):
        assert torch.equal(a, b)
    assert dec.config.scaling_factor == vae.config.scaling_factor
    assert any(not torch.equal(a, b) for a, b in zip(vae.decoder.parameters(), dec.decoder.parameters()))


def test_mmdit_trainer_smoke_exports_a_model_diffusers_and_our_engine_both_run(tmp_path):
    common = ["-m", "training.train_mmdit", "--vae", str(ROOT / "models" / "tiny-mmdit" / "vae"),
              "--out", str(tmp_path / "run"), "--layers", "1", "--width", "32", "--text-width", "32",
              "--batch", "4", "--bank", "64"]
    run(*common, "--steps", "4", "--snapshot-steps", "2")
    assert (tmp_path / "run" / "snapshot-2.pt").exists()
    run(*common, "--export", str(tmp_path / "model"))
    training = json.loads((tmp_path / "model" / "training.json").read_text())
    assert training["step"] == 4 and training["t5_sequence_length"] == 0
    # Several sizes: one bank per size, batches of one size each.
    sized = [a if a != str(tmp_path / "run") else str(tmp_path / "sized") for a in common]
    run(*sized, "--steps", "3", "--sizes", "64x64", "64x96", "--bank", "16")
    banks = torch.load(tmp_path / "sized" / "banks.pt", weights_only=False)
    assert banks[(64, 96)]["latents"].shape[-2:] == (24, 16)  # height 96 / 4, width 64 / 4
    # A later session continues from the shipped weights.
    later = [a if a != str(tmp_path / "run") else str(tmp_path / "run2") for a in common]
    assert "initialised from" in run(*later, "--steps", "1", "--init-model", str(tmp_path / "model"))

    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "model", text_encoder_3=None, tokenizer_3=None)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, max_sequence_length=0,
                 output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()

    from engines import loader
    from engines.registry import load_registry
    from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch, run as txt2img

    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"default": "m", "models": [{
        "id": "m", "path": str(tmp_path / "model"), "family": "mmdit", "samplers": ["flow_euler"],
        "defaults": {"sampler": "flow_euler", "steps": 2, "guidance_scale": 3.0, "width": 64, "height": 64},
        "options": {"t5_sequence_length": 0}}]}))
    model = loader.load(load_registry(registry).get("m"))
    ours = txt2img(model, Txt2ImgBatch(64, 64, "flow_euler", 2, [ImageRequest("a red circle", "", 1, 3.0)]))
    assert ours.shape == (1, 64, 64, 3)


def test_ldm_trainer_smoke_exports_a_model_the_sd_pipeline_runs(tmp_path):
    common = ["-m", "training.train_ldm", "--vae", str(ROOT / "models" / "tiny-ldm" / "vae"),
              "--out", str(tmp_path / "run"), "--width", "16", "--text-width", "32",
              "--batch", "4", "--bank", "64"]
    run(*common, "--steps", "3")
    run(*common, "--export", str(tmp_path / "model"))
    later = [a if a != str(tmp_path / "run") else str(tmp_path / "run2") for a in common]
    assert "initialised from" in run(*later, "--steps", "1", "--init-model", str(tmp_path / "model"))
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None,
                                                   requires_safety_checker=False)
    assert pipe.scheduler.config.beta_schedule == "linear"
    image = pipe("a blue star", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_a_slim_checkpoint_exports_the_same_model_as_the_full_one(tmp_path):
    """training.slim: how a run on a lent GPU comes back (fp16 EMA weights, no optimizer)."""
    common = ["-m", "training.train_ldm", "--vae", str(ROOT / "models" / "tiny-ldm" / "vae"),
              "--out", str(tmp_path / "run"), "--width", "16", "--text-width", "32", "--batch", "4",
              "--bank", "64", "--prediction", "v_prediction", "--zero-snr"]
    run(*common, "--steps", "2")
    run(*common, "--export", str(tmp_path / "full"))
    (tmp_path / "slim").mkdir()
    run("-m", "training.slim", str(tmp_path / "run" / "checkpoint.pt"), str(tmp_path / "slim" / "checkpoint.pt"))
    assert (tmp_path / "slim" / "checkpoint.pt").stat().st_size < (tmp_path / "run" / "checkpoint.pt").stat().st_size / 3
    slim = [a if a != str(tmp_path / "run") else str(tmp_path / "slim") for a in common]
    run(*slim, "--export", str(tmp_path / "from-slim"))
    from diffusers import DDIMScheduler, UNet2DConditionModel

    full, half = (UNet2DConditionModel.from_pretrained(tmp_path / d / "unet") for d in ("full", "from-slim"))
    for (name, a), b in zip(full.state_dict().items(), half.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name  # fp16 rounding only
    scheduler = DDIMScheduler.from_pretrained(tmp_path / "from-slim" / "scheduler")
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
    assert json.loads((tmp_path / "from-slim" / "training.json").read_text())["step"] == 2


def test_ladd_trainer_smoke_distils_a_turbo_model_that_serves_with_the_turbo_schedule(tmp_path):
    common = ["-m", "training.train_ladd", "--teacher", str(ROOT / "models" / "tiny-mmdit"),
              "--out", str(tmp_path / "run"), "--data", "16", "--batch", "8", "--sizes", "64x64", "64x96"]
    run(*common, "--steps", "2")
    assert "from step 2" in run(*common, "--steps", "3")  # resumes (both optimizers)
    run(*common, "--export", str(tmp_path / "model"))
    training = json.loads((tmp_path / "model" / "training.json").read_text())
    assert training["step"] == 3 and training["turbo_steps"] == 4 and training["sizes"] == ["64x64", "64x96"]

    from engines import loader
    from engines.registry import load_registry
    from engines.tasks.txt2img import ImageRequest, Txt2ImgBatch, run as txt2img

    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"default": "t", "models": [{
        "id": "t", "path": str(tmp_path / "model"), "family": "mmdit",
        "defaults": {"sampler": "flow_euler", "schedule": "turbo", "steps": 4, "guidance_scale": 1.0,
                     "guidance": "none", "width": 64, "height": 64},
        "options": {"t5_sequence_length": 0}}]}))
    model = loader.load(load_registry(registry).get("t"))
    image = ImageRequest("a red circle", "", 1, 1.0, "flow_euler", 4, "turbo", guidance="none")
    out = txt2img(model, Txt2ImgBatch(64, 96, "flow_euler", 4, [image]))
    assert out.shape == (1, 96, 64, 3)


def test_video_trainer_smoke_trains_motion_only_and_exports_an_animatediff_model(tmp_path):
    tiny = ROOT / "models" / "tiny-ldm"
    common = ["-m", "training.train_video", "--image-model", str(tiny), "--out", str(tmp_path / "run"),
              "--frames", "4", "--bank", "6", "--batch", "2"]
    run(*common, "--steps", "2")
    assert "from step 2" in run(*common, "--steps", "3")  # resumes
    run(*common, "--export", str(tmp_path / "model"))
    training = json.loads((tmp_path / "model" / "training.json").read_text())
    assert training["step"] == 3 and training["frames"] == 4 and not training["joint"]
    later = [a if a != str(tmp_path / "run") else str(tmp_path / "run2") for a in common]
    assert "initialised from" in run(*later, "--steps", "2", "--joint", "--init-model", str(tmp_path / "model"),
                                     "--min-frames", "2", "--short-bank", "4", "--object-weight", "5")
    for frames in (2, 3):  # a bank per shorter length, rendered at that length
        bank = torch.load(tmp_path / "run2" / f"bank-{frames}.pt", weights_only=False)
        assert bank["latents"].shape[:3] == (4, 4, frames) and len(bank["captions"]) == 4

    from diffusers import AnimateDiffPipeline, UNet2DConditionModel

    # Motion modules only: the spatial UNet is the image model's, bit for bit; the image
    # vocabulary keeps its ids and the motion words are new ones.
    image_unet, video_unet = (UNet2DConditionModel.from_pretrained(d / "unet") for d in (tiny, tmp_path / "model"))
    assert all(torch.equal(a, b) for a, b in zip(image_unet.state_dict().values(), video_unet.state_dict().values()))
    pipe = AnimateDiffPipeline.from_pretrained(tmp_path / "model")
    ids = pipe.tokenizer("a red circle moving up").input_ids
    image_vocab = json.loads((tiny / "text_encoder" / "config.json").read_text())["vocab_size"]
    assert pipe.tokenizer.unk_token_id not in ids and max(ids) >= image_vocab
    out = pipe("a red circle moving up", num_frames=4, num_inference_steps=2, height=64, width=64,
               output_type="np").frames[0]
    assert out.shape == (4, 64, 64, 3) and np.isfinite(out).all()


def test_object_weights_cover_the_object_and_its_rim_and_nothing_else():
    from training.clips import Clip, render_clip
    from training.shapes import Obj
    from diffusers import AutoencoderKL

    from training.train_video import object_weights

    clip = Clip(Obj("star", "red", "small", "center"), "white", "right", (0.3, 0.4), (0.7, 0.4))
    vae = AutoencoderKL.from_pretrained(ROOT / "models" / "shapes-ldm" / "vae")
    pixels = torch.from_numpy(render_clip(clip, 2)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        x0 = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    x0 = x0.transpose(0, 1)[None]  # [1, C, F, h, w], the clip banks' layout
    w = object_weights(x0, 5.0)
    assert w.shape == (1, 1, 2, 16, 16) and set(w.unique().tolist()) == {1.0, 6.0}
    for k, (fx, fy) in enumerate((clip.start, clip.end)):  # the object's centre weighs 6 in each frame
        assert w[0, 0, k, int(fy * 16), int(fx * 16)] == 6.0
        assert 4 <= int((w[0, 0, k] > 1).sum()) <= 40  # a small star and its rim, not the scene
    border = torch.cat([w[..., 0, :], w[..., -1, :], w[..., :, 0], w[..., :, -1]], dim=-1)
    assert (border == 1).all()  # the VAE's edge ripple is not an object


def test_clips_draw_small_objects_at_the_share_asked_and_the_scored_clips_stay_as_they_were():
    from training.clips import clip_caption, random_clip
    from training.evaluate_video import eval_clips

    rng = random.Random(3)
    clips = [random_clip(rng, small_share=0.8) for _ in range(600)]
    assert 0.75 <= np.mean([c.obj.size == "small" for c in clips]) <= 0.85
    said = [(c.obj.size, set(clip_caption(c, rng).split()) & {"small", "large"}) for c in clips]
    assert all(words <= {size} for size, words in said) and sum(bool(words) for _, words in said) > 100
    # Without a share the stream is the domain's own: the scored set (clip seed 17) is the one
    # the eval reports were made on, 60 of its 128 objects small.
    assert sum(c.obj.size == "small" for c in eval_clips(128, 17)) == 60


def test_a_resumed_run_takes_its_learning_rate_scales_from_its_command_line(tmp_path):
    """The optimizer's saved state carries each group's lr_scale; a run resumed with another
    (--joint-lr-scale) must train at the new one, not the checkpoint's."""
    from types import SimpleNamespace

    from training.loop import fit

    class Net(torch.nn.ModuleDict):
        def __init__(self, scale):
            super().__init__({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})
            self.scale = scale

        def param_groups(self):
            return [{"params": self["a"].parameters(), "lr_scale": 1.0},
                    {"params": self["b"].parameters(), "lr_scale": self.scale}]

    def loss(_rng, net):
        return sum(net[k](torch.ones(1, 2)).square().sum() for k in ("a", "b"))

    args = SimpleNamespace(out=tmp_path, steps=1, minutes=1, lr=1e-3, ema=0.9, seed=0, snapshot_steps=[],
                           device="cpu", amp=False, batch=1, bank=1, cooldown=0)
    for steps, scale in ((1, 0.1), (2, 0.5)):
        net = Net(scale)
        fit(SimpleNamespace(**{**vars(args), "steps": steps}), net, lambda rng, net=net: loss(rng, net))
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 2
    assert [g["lr_scale"] for g in saved["optimizer"]["param_groups"]] == [1.0, 0.5]


def test_the_learning_rate_warms_up_holds_and_with_a_cooldown_decays_to_zero_at_the_last_step():
    from types import SimpleNamespace

    from training.loop import learning_rate

    held = SimpleNamespace(lr=1e-3, steps=1000, cooldown=0)
    assert learning_rate(held, 0) == pytest.approx(1e-3 / 200)
    assert learning_rate(held, 500) == learning_rate(held, 999) == 1e-3
    annealed = SimpleNamespace(lr=1e-3, steps=1000, cooldown=400)
    assert learning_rate(annealed, 600) == 1e-3
    assert learning_rate(annealed, 800) == pytest.approx(0.5e-3)
    assert learning_rate(annealed, 999) == pytest.approx(1e-3 / 400)
    assert learning_rate(annealed, 1000) == 0.0
