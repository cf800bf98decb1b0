"""Which claimed jobs share engine calls, and which rows each owns (pure: no Redis or model)."""

from service.batching import Admitted, Batch, plan_batches
from service.queue import Claimed, Job
from service.runners import Txt2ImgParams


def item(n: int, width: int = 64, sampler: str = "ddim", model: str = "m", images: int = 1) -> Admitted:
    params = Txt2ImgParams(prompt=f"p{n}", negative_prompt="", width=width, height=64, num_images=images,
                           steps=10, sampler=sampler, guidance_scale=4.0, seed=n, output_format="png")
    return Admitted(Job(id=str(n), model=model, task="txt2img", request={}),
                    Claimed(model, f"{n}-0", str(n), images), params)


def ids(batches):
    return [[a.job.id for a in batch] for batch in batches]


def test_compatible_jobs_share_a_batch_and_others_wait_their_turn():
    items = [item(1), item(2, width=128), item(3), item(4, sampler="euler")]
    assert ids(plan_batches(items, {"m": 8})) == [["1", "3"], ["2"], ["4"]]


def test_batches_count_images_not_jobs():
    items = [item(1, images=4), item(2, images=3), item(3, images=2)]
    assert ids(plan_batches(items, {"m": 8})) == [["1", "2"], ["3"]]


def test_a_job_larger_than_max_batch_runs_alone():
    assert ids(plan_batches([item(1, images=8), item(2)], {"m": 4})) == [["1"], ["2"]]


def test_models_never_mix_and_each_batches_up_to_its_own_max_batch():
    items = [item(1, model="a"), item(2, model="b"), item(3, model="a"), item(4, model="b"), item(5, model="b")]
    assert ids(plan_batches(items, {"a": 8, "b": 2})) == [["1", "3"], ["2", "4"], ["5"]]


def test_each_job_owns_a_fixed_row_range_whatever_happens_to_the_others():
    batch = Batch.build([item(1, images=2), item(2, images=3), item(3)])
    assert [m.rows for m in batch.members] == [range(0, 2), range(2, 5), range(5, 6)]
    batch.members[0].stopped = "cancelled"  # a cancelled member keeps its rows in the call
    assert batch.rows == 6 and [m.rows for m in batch.live()] == [range(2, 5), range(5, 6)]
