"""The OpenAI-compatible routes driven by the official `openai` package, unmodified, against the
real API, Redis and worker processes: what an SDK user writes must work, and what it gets back
must be the same job our own /v1/generate runs."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import generate

PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def client(api, worker) -> openai.OpenAI:
    # No retries: a test must see the first answer (the SDK retries 429 and 5xx by default).
    return openai.OpenAI(base_url=f"{str(api.base_url).rstrip('/')}/v1", api_key="unused", max_retries=0)


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def ours(api: httpx.Client, **body) -> dict:
    response = generate(api, **body)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded", job
    return job


@pytest.mark.parametrize("model,fmt,size", [("tiny-mmdit", "png", (64, 48)), ("tiny-ldm", "webp", (48, 64))])
def test_generate_b64_json_is_a_decodable_image_of_the_asked_size_and_format(client, model, fmt, size):
    result = client.images.generate(model=model, prompt=PROMPT, size=f"{size[0]}x{size[1]}", output_format=fmt,
                                    quality="high", style="vivid", user="tester", extra_body={"steps": 4})
    assert isinstance(result, openai.types.ImagesResponse)
    assert result.size == f"{size[0]}x{size[1]}" and result.output_format == fmt and result.created > 0
    [image] = result.data
    assert image.url is None
    picture = decoded(image.b64_json)
    assert picture.format == fmt.upper() and picture.size == size


def test_size_auto_is_the_models_default(client):
    result = client.images.generate(model="tiny-ldm", prompt=PROMPT, size="auto", extra_body={"steps": 2})
    assert result.size == "64x64" and decoded(result.data[0].b64_json).size == (64, 64)


def test_response_format_url_is_an_absolute_url_of_our_image_route(client, api):
    result = client.images.generate(model="tiny-mmdit", prompt=PROMPT, response_format="url", n=2,
                                    extra_body={"steps": 3, "seed": 11})
    assert [image.b64_json for image in result.data] == [None, None]
    for k, image in enumerate(result.data):
        assert image.url == f"{str(api.base_url).rstrip('/')}/v1/jobs/{result.id}/images/{k}"
        fetched = httpx.get(image.url)
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)


def test_n_images_use_seed_plus_k_exactly_as_our_own_route(client, api):
    body = {"steps": 4, "seed": 1234, "sampler": "euler"}
    result = client.images.generate(model="tiny-ldm", prompt=PROMPT, n=3, extra_body=body)
    assert [image.seed for image in result.data] == [1234, 1235, 1236]  # our extra field on each item
    got = [base64.b64decode(image.b64_json) for image in result.data]
    assert len(set(got)) == 3  # distinct images
    same = ours(api, model="tiny-ldm", prompt=PROMPT, num_images=3, **body)
    assert got == [base64.b64decode(image["data"]) for image in same["images"]]  # the same job, byte for byte
    # Image k is seed + k's image: alone (a batch of 1 instead of 3) within the measured batch-invariance bound.
    alone = ours(api, model="tiny-ldm", prompt=PROMPT, num_images=1, **{**body, "seed": 1236})
    assert np.abs(pixels(got[2]) - pixels(base64.b64decode(alone["images"][0]["data"]))).max() <= 2


def test_our_options_ride_in_extra_body(client, api):
    result = client.images.generate(model="tiny-ldm", prompt=PROMPT, extra_body={
        "steps": 3, "seed": 77, "sampler": "Euler a", "guidance_scale": 2.5, "negative_prompt": "blue"})
    job = api.get(f"/v1/jobs/{result.id}").json()
    assert job["status"] == "succeeded" and job["model"] == "tiny-ldm" and result.model == "tiny-ldm"
    assert (job["steps"], job["sampler"], job["images"][0]["seed"]) == (3, "euler_ancestral", 77)
    assert job["progress"] == {"step": 3, "total": 3}


def test_upscale_in_extra_body_answers_the_upscaled_images_at_their_final_size(client, api, start_worker):
    """`upscale: true` chains tiny-ldm's txt2img and its upscaler tiny-x4 as one job: `size` asks
    for the first stage's images, the answer (and a stream's completed event) is 4x them."""
    start_worker("tiny-x4", "openai-x4")
    body = {"upscale": True, "steps": 3, "seed": 9}
    result = client.images.generate(model="tiny-ldm", prompt=PROMPT, size="32x48", n=2, output_format="webp",
                                    extra_body=body)
    assert result.size == "128x192" and [image.seed for image in result.data] == [9, 10]
    pictures = [decoded(image.b64_json) for image in result.data]
    assert all(p.format == "WEBP" and p.size == (128, 192) for p in pictures)
    job = api.get(f"/v1/jobs/{result.id}").json()
    assert job["stage"]["index"] == 2 and [s["model"] for s in job["stage"]["stages"]] == ["tiny-ldm", "tiny-x4"]
    assert job["progress"] == {"step": 13, "total": 13}  # 3 txt2img steps + tiny-x4's default 10
    same = ours(api, model="tiny-ldm", prompt=PROMPT, width=32, height=48, num_images=2, output_format="webp", **body)
    for k, image in enumerate(result.data):  # our route's chained job: the same images
        assert np.abs(pixels(base64.b64decode(image.b64_json)) - pixels(base64.b64decode(same["images"][k]["data"]))
                      ).max() <= 2

    events = list(client.images.generate(model="tiny-ldm", prompt=PROMPT, size="32x48", stream=True,
                                         output_format="webp", extra_body=body))
    assert [e.type for e in events] == ["image_generation.completed"]  # tiny-ldm has no preview map: no partials
    assert events[0].size == "128x192" and decoded(events[0].b64_json).size == (128, 192)
    streamed, first = (pixels(base64.b64decode(b64)) for b64 in (events[0].b64_json, result.data[0].b64_json))
    assert np.abs(streamed - first).max() <= 2


def test_invalid_size_is_a_bad_request_with_our_message_naming_the_field(client, api):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="tiny-mmdit", prompt=PROMPT, size="1024x1024")
    ours_error = generate(api, model="tiny-mmdit", prompt=PROMPT, width=1024, height=1024).json()["error"]
    assert caught.value.status_code == 400 and caught.value.param == "size"
    assert caught.value.body["message"] == ours_error["message"] and "width must be" in ours_error["message"]
    assert caught.value.code == "invalid_request" and caught.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="tiny-mmdit", prompt=PROMPT, size="big")
    assert caught.value.param == "size" and "WIDTHxHEIGHT" in caught.value.message


def test_n_over_the_limit_says_the_limit(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="tiny-mmdit", prompt=PROMPT, n=9)
    assert caught.value.param == "n" and "between 1 and 8" in caught.value.message


@pytest.mark.parametrize("kwargs,param", [
    ({"extra_body": {"stepz": 4}}, "stepz"),          # a misspelt option of ours
    ({"extra_body": {"steps": 500}}, "steps"),        # over the model's limit
    ({"output_format": "gif"}, "output_format"),
    ({"stream": True, "n": 2}, "n"),                  # one image per stream
    ({"stream": True, "size": "1x1"}, "size"),        # refused before any event: a plain error answer
])
def test_bad_options_are_bad_requests_naming_them(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="tiny-mmdit", prompt=PROMPT, **kwargs)
    assert caught.value.param == param, caught.value.body


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="dall-e-3", prompt=PROMPT)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"


def test_a_full_queue_is_a_rate_limit_with_retry_after(client, api):
    # `limited` has max_queue 2 and no worker: two jobs wait, the third is refused.
    waiting = [generate(api, wait=False, model="limited", prompt=PROMPT) for _ in range(2)]
    try:
        assert [r.status_code for r in waiting] == [202, 202]
        with pytest.raises(openai.RateLimitError) as caught:
            client.images.generate(model="limited", prompt=PROMPT)
        assert int(caught.value.response.headers["retry-after"]) > 0 and caught.value.code == "queue_full"
    finally:
        for r in waiting:
            api.delete(f"/v1/jobs/{r.json()['id']}")


def test_stream_yields_partial_images_then_the_completed_image(client, api, start_worker):
    # Previews need a model with a fitted latent -> RGB map (the shipped shapes models; the
    # tiny random ones have none): the distilled turbo model, 4 steps.
    start_worker("shapes-mmdit-turbo", "turbo")
    body = {"seed": 5}
    stream = client.images.generate(model="shapes-mmdit-turbo", prompt=PROMPT, size="96x64", stream=True,
                                    partial_images=2, output_format="webp", extra_body=body)
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event in events:
        assert event.size == "96x64" and event.output_format == "webp"
        picture = decoded(event.b64_json)
        assert picture.format == "WEBP" and picture.size == (96, 64)
    final = base64.b64decode(events[-1].b64_json)
    assert events[-1].usage.total_tokens == 0
    same = ours(api, model="shapes-mmdit-turbo", prompt=PROMPT, width=96, height=64, output_format="webp", **body)
    assert final == base64.b64decode(same["images"][0]["data"])  # previews change nothing in the image
    assert len({e.b64_json for e in events}) == 3  # the partials are earlier states, not the final image
    # An edit streams the same way, under image_edit.* (img2img without a mask: 3 of the 4 steps run).
    edited = list(client.images.edit(model="shapes-mmdit-turbo", image=("in.png", final), prompt="a blue square",
                                     stream=True, partial_images=1, extra_body=body))
    assert [e.type for e in edited] == ["image_edit.partial_image", "image_edit.completed"]
    assert all(decoded(e.b64_json).size == (96, 64) for e in edited)


def test_a_job_that_ends_without_an_image_ends_its_stream_with_an_error_event(client, api):
    stream = client.images.generate(model="limited", prompt=PROMPT, stream=True)  # no worker: it waits
    job_id = stream.response.headers["x-job-id"]
    assert api.delete(f"/v1/jobs/{job_id}").status_code == 200
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert caught.value.message == f"job {job_id} was cancelled" and caught.value.code == "job_cancelled"


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def picture(size: int = 64) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)


def test_edit_repaints_only_the_transparent_area_of_the_mask(client):
    image = picture()
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, 32:] = 0  # OpenAI's convention: the transparent right half is repainted
    mask = np.dstack([np.zeros((64, 64, 3), np.uint8), alpha])
    result = client.images.edit(model="tiny-ldm", image=("in.png", png(image)), mask=("mask.png", png(mask)),
                                prompt="a blue square", extra_body={"steps": 4, "seed": 3})
    out = pixels(base64.b64decode(result.data[0].b64_json))
    assert result.size == "64x64" and out.shape == (64, 64, 3)
    assert (out[:, :32] == image[:, :32]).all()  # kept: the input's own pixels
    assert np.abs(out[:, 32:] - image[:, 32:]).mean() > 10  # repainted


def test_edit_without_mask_is_img2img_resized_to_the_asked_size(client, api):
    result = client.images.edit(model="tiny-mmdit", image=[("in.png", png(picture(80)))], prompt="a star",
                                size="64x48", extra_body={"steps": 4, "strength": 0.5})
    assert decoded(result.data[0].b64_json).size == (64, 48)
    job = api.get(f"/v1/jobs/{result.id}").json()
    assert job["task"] == "img2img" and job["progress"] == {"step": 2, "total": 2}  # 4 steps x strength 0.5


@pytest.mark.parametrize("model,mask_mode,message", [
    ("shapes-mmdit-turbo", "RGBA", "does not serve inpainting"),
    ("tiny-ldm", "L", "needs an alpha channel"),
])
def test_edit_refusals_are_bad_requests_naming_the_mask(client, model, mask_mode, message):
    mask = Image.new(mask_mode, (64, 64))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model=model, image=("in.png", png(picture())), mask=("m.png", buf.getvalue()),
                           prompt="a star")
    assert caught.value.param == "mask" and message in caught.value.message


def test_models_list_and_retrieve(client, api):
    ours_body = api.get("/v1/models").json()
    assert ours_body["default"] == "tiny-mmdit" and ours_body["models"]  # our consumers' keys stay
    listed = client.models.list().data
    assert [m.id for m in listed] == [m["id"] for m in ours_body["models"]]
    assert all(m.object == "model" and m.owned_by == "latentserve" and m.created > 0 for m in listed)
    model = client.models.retrieve("tiny-ldm")
    assert model.id == "tiny-ldm" and "inpaint" in model.tasks
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-image-1")
