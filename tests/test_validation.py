"""Bad input gets a 4xx naming the field, and never reaches a worker."""

from __future__ import annotations

import pytest

from tests.conftest import generate

GOOD = dict(prompt="a red circle", steps=2)


@pytest.mark.parametrize("change,field", [
    ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "a" * 501}, "prompt"),
    ({"negative_prompt": "a" * 501}, "negative_prompt"),
    ({"width": 36}, "width"),
    ({"width": 256}, "width"),
    ({"height": 16}, "height"),
    ({"height": "tall"}, "height"),
    ({"num_images": 0}, "num_images"),
    ({"num_images": 9}, "num_images"),
    ({"steps": 0}, "steps"),
    ({"steps": 51}, "steps"),
    ({"sampler": "ddim"}, "sampler"),  # an eps sampler for the flow model
    ({"sampler": "dpmpp_2m"}, "sampler"),
    ({"sampler": "flow_heun", "schedule": "karras"}, "schedule"),  # FlowMatchHeun has no Karras sigmas
    ({"schedule": "cosine"}, "schedule"),
    ({"eta": 0.5}, "eta"),  # DDIM's, not flow Euler's
    ({"eta": 2}, "eta"),
    ({"guidance": "autoguidance"}, "guidance"),  # tiny-mmdit has no guide model
    ({"guidance": "magic"}, "guidance"),
    ({"guidance_interval": [0.5, 0.2]}, "guidance_interval"),
    ({"guidance_interval": [0.5]}, "guidance_interval"),
    ({"guidance_interval_fraction": [0.2, 1.5]}, "guidance_interval_fraction"),
    ({"guidance_interval": [0.1, 0.5], "guidance_interval_fraction": [0.2, 0.5]}, "guidance_interval_fraction"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"guidance_scale": 31}, "guidance_scale"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"output_format": "gif"}, "output_format"),
    ({"task": "superres"}, "task"),  # a real task this model does not serve
    ({"task": "paint"}, "task"),
    ({"colour": "red"}, "colour"),
])
def test_each_bad_field_is_a_422_naming_it(api, r, change, field):
    body = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    before = r.xlen("latentserve:stream:tiny-mmdit")
    response = generate(api, **body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["code"] == "invalid_request"
    assert field in error["message"] or field == "prompt"
    assert r.xlen("latentserve:stream:tiny-mmdit") == before  # nothing was queued


def test_body_that_is_not_json_is_a_422(api):
    response = api.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["field"]


def test_unknown_model_is_404_naming_the_field(api):
    response = generate(api, model="sd-99", **GOOD)
    assert response.status_code == 404
    assert response.json()["error"] == {
        "code": "model_not_found", "message": "unknown model 'sd-99'; see GET /v1/models", "field": "model"}


def test_unknown_job_is_404(api):
    assert api.get("/v1/jobs/0123").status_code == 404
    assert api.get("/v1/jobs/0123/images/0").status_code == 404


def test_queue_over_its_limit_is_429_with_retry_after(api):
    # `limited` has max_queue 2 and no worker: two jobs wait, the third is refused.
    ids = [generate(api, wait=False, model="limited", **GOOD) for _ in range(2)]
    assert [response.status_code for response in ids] == [202, 202]
    refused = generate(api, wait=False, model="limited", **GOOD)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) > 0
    assert refused.json()["error"]["code"] == "queue_full"
    for response in ids:  # cancelling frees the places
        assert api.delete(f"/v1/jobs/{response.json()['id']}").status_code == 200
    again = generate(api, wait=False, model="limited", **GOOD)
    assert again.status_code == 202
    api.delete(f"/v1/jobs/{again.json()['id']}")  # `limited` empty again: other files fill it too


def test_sampler_aliases_resolve_and_the_job_reports_the_canonical_name_and_calls(api, worker):
    job = generate(api, model="tiny-ldm", prompt="a star", steps=3, sampler="Euler a", seed=1).json()
    assert job["status"] == "succeeded", job
    assert job["sampler"] == "euler_ancestral" and job["schedule"] == "default" and job["steps"] == 3
    assert job["denoiser_calls"] == 3
    heun = generate(api, model="tiny-mmdit", prompt="a star", steps=3, sampler="heun").json()
    assert heun["sampler"] == "flow_heun" and heun["denoiser_calls"] == 5  # N steps: 2N - 1 calls
    karras = generate(api, model="tiny-ldm", prompt="a star", steps=3, sampler="DPM++ 2M", schedule="karras").json()
    assert karras["status"] == "succeeded" and karras["sampler"] == "dpmpp_2m" and karras["schedule"] == "karras"


def test_models_list_samplers_with_their_schedules(api):
    models = {m["id"]: m for m in api.get("/v1/models").json()["models"]}
    ldm = models["tiny-ldm"]["samplers"]
    assert set(ldm) == {"ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc"}
    assert "karras" in ldm["euler"]["schedules"] and "karras" not in ldm["ddim"]["schedules"]
    assert set(models["tiny-mmdit"]["samplers"]) == {"flow_euler", "flow_heun", "flow_lcm"}


@pytest.mark.parametrize("change,field", [
    ({"width": 128, "height": 64}, "width"),  # not one of its sizes
    ({"steps": 5}, "steps"),  # distilled for 4
    ({"guidance": "cfg", "guidance_scale": 4.0}, "guidance"),  # distilled to run unguided
])
def test_a_distilled_model_refuses_what_it_was_not_distilled_for(api, change, field):
    response = generate(api, model="turbo-mmdit", prompt="a red circle", **change)
    assert response.status_code == 422 and response.json()["error"]["field"] == field, response.text


def test_a_distilled_model_serves_its_defaults_and_its_sizes(api, worker):
    job = generate(api, model="turbo-mmdit", prompt="a red circle", width=64, height=96).json()
    assert job["status"] == "succeeded", job
    assert job["steps"] == 4 and job["schedule"] == "turbo" and job["denoiser_calls"] == 4
    assert job["images"][0]["width"] == 64 and job["images"][0]["height"] == 96
