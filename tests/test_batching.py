"""Which claimed jobs share engine calls (pure functions, no Redis or model)."""

from service.batching import plan_batches
from service.queue import Job


def job(n: int, width: int = 64, sampler: str = "ddim", model: str = "m", images: int = 1) -> Job:
    request = {"width": width, "height": 64, "sampler": sampler, "steps": 10, "num_images": images}
    return Job(id=str(n), model=model, task="txt2img", request=request)


def ids(batches):
    return [[j.id for j, _ in batch] for batch in batches]


def test_compatible_jobs_share_a_batch_and_others_wait_their_turn():
    items = [(job(1), None), (job(2, width=128), None), (job(3), None), (job(4, sampler="euler"), None)]
    assert ids(plan_batches(items, 8)) == [["1", "3"], ["2"], ["4"]]


def test_batches_count_images_not_jobs():
    items = [(job(1, images=4), None), (job(2, images=3), None), (job(3, images=2), None)]
    assert ids(plan_batches(items, 8)) == [["1", "2"], ["3"]]


def test_a_job_larger_than_max_batch_runs_alone():
    items = [(job(1, images=8), None), (job(2), None)]
    assert ids(plan_batches(items, 4)) == [["1"], ["2"]]


def test_models_never_mix():
    assert ids(plan_batches([(job(1, model="a"), None), (job(2, model="b"), None)], 8)) == [["1"], ["2"]]
