"""The browser playground at `/`, driven in Debian's chromium through Playwright against the
real API and workers: generate with progress, live previews and a result; queue position,
a full queue and cancelling; the API's errors at their fields; a phone-sized screen;
Ctrl+Enter; the request as a curl command that runs and as Python. Videos, superres and
upscaling from the page: tests/test_playground_media.py."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
from PIL import Image

from tests.conftest import generate, job_status

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (`make test` installs "
                                "Debian's; Playwright's own browser download cannot work here)")

# Records every value the progress bar, the preview image and the status line take, from
# before Generate.
WATCH = """() => {
  window.seen = {progress: [], previews: [], status: []};
  const bar = document.querySelector('#progress');
  const preview = document.querySelector('#preview-image');
  const status = document.querySelector('#status');
  new MutationObserver(() => window.seen.progress.push(bar.value))
    .observe(bar, {attributes: true, attributeFilter: ['value']});
  new MutationObserver(() => window.seen.previews.push(preview.getAttribute('src')))
    .observe(preview, {attributes: true, attributeFilter: ['src']});
  new MutationObserver(() => window.seen.status.push(status.textContent))
    .observe(status, {childList: true, characterData: true, subtree: true});
}"""


@contextmanager
def chromium():
    """Debian's chromium through Playwright (each browser test module launches its own)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def browser():
    with chromium() as launched:
        yield launched


class Visit:
    """The playground in a fresh browser context that may reach only the API (it must work
    offline); `close()` fails on a script error or a request to anywhere else."""

    def __init__(self, browser, api, width=1280, height=900):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        origin = str(api.base_url).rstrip("/")
        self.foreign, self.errors = [], []

        def only_local(route):
            if route.request.url.startswith((origin + "/", "data:")):
                route.continue_()
            else:
                self.foreign.append(route.request.url)
                route.abort()

        self.context.route("**/*", only_local)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.goto(origin + "/")
        expect(self.page.get_by_role("button", name="Generate")).to_be_enabled()  # models loaded

    def close(self):
        self.context.close()
        assert not self.foreign, f"the page fetched from outside the API: {self.foreign}"
        assert not self.errors, f"script errors: {self.errors}"


@contextmanager
def visits(browser, api):
    """open_page(width=390, height=844) -> a page of the playground; all closed (and checked)
    on leaving."""
    opened = []

    def open_page(**viewport):
        opened.append(Visit(browser, api, **viewport))
        return opened[-1].page

    yield open_page
    for each in opened:
        each.close()


@pytest.fixture()
def visit(browser, api):
    """Opens the playground: visit(width=390, height=844) -> a page."""
    with visits(browser, api) as open_page:
        yield open_page


@pytest.fixture()
def page(visit, worker):
    return visit()


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def choose(page, model: str, prompt: str, **numbers):
    page.get_by_label("Model").select_option(model)
    page.get_by_label("Prompt", exact=True).fill(prompt)
    for label, value in numbers.items():
        page.get_by_label(label, exact=True).fill(str(value))


def submitted_job(page, action) -> str:
    """Runs `action`, which submits; the id the API gave the job."""
    with page.expect_response(lambda r: r.url.endswith("/v1/generate") and r.request.method == "POST") as info:
        action()
    response = info.value
    assert response.status == 202, response.text()
    return response.json()["id"]


def snippet(page, kind: str) -> str:
    """Clicks Copy as `kind`; the code shown."""
    page.get_by_role("button", name=f"Copy as {kind}").click()
    code = page.get_by_label("Request code")
    expect(code).to_contain_text("curl -sS" if kind == "curl" else "import ")
    return code.text_content()


def status(page):
    return page.get_by_role("status").first


def test_generate_shows_progress_and_results(page, api):
    choose(page, "tiny-ldm", "a red circle", Width=48, Height=40, Steps=30, Seed=7)
    page.evaluate(WATCH)
    job_id = submitted_job(page, lambda: page.get_by_role("button", name="Generate").click())

    result = page.get_by_role("img", name=re.compile(r"^Result 1 of 1"))
    expect(result).to_be_visible(timeout=60_000)
    assert result.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [48, 40]
    expect(status(page)).to_have_text(re.compile(r"^Done"))
    seen = page.evaluate("window.seen")
    running = [v for v in seen["progress"] if v > 0]
    assert len(set(running)) >= 2, seen  # the bar moved through the steps, not just to the end
    assert running == sorted(running) and running[-1] == 30, seen
    # Live previews (on by default), each tiny-ldm's x0 estimate at latent resolution (f4 VAE),
    # shown scaled up in the result's box; the last one stays loaded behind the result.
    assert len(set(seen["previews"])) >= 2 and all(p.startswith("data:image/png;base64,") for p in seen["previews"])
    assert page.locator("#preview-image").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [12, 10]

    # The image shown is the job's own, and its download link names the right type.
    src = result.get_attribute("src")
    assert src == f"data:image/png;base64,{job_status(api, job_id)['images'][0]['data']}"
    download = page.get_by_role("link", name="Download PNG")
    assert download.get_attribute("download").endswith(".png") and download.get_attribute("href") == src

    # Ctrl+Enter submits from the keyboard; the gallery keeps both results.
    page.get_by_label("Format").select_option("webp")
    page.get_by_label("Prompt", exact=True).fill("a blue square")
    second = submitted_job(page, lambda: page.keyboard.press("Control+Enter"))
    expect(page.get_by_role("link", name="Download WEBP")).to_be_visible(timeout=60_000)
    assert page.get_by_role("link", name="Download WEBP").get_attribute("download").endswith(".webp")
    assert job_status(api, second)["images"][0]["mime"] == "image/webp"
    gallery = page.get_by_role("list", name="Gallery").get_by_role("button")
    expect(gallery).to_have_count(2)
    page.get_by_role("button", name="View a red circle (seed 7)").click()
    expect(page.get_by_role("img", name=re.compile("^Result: a red circle"))).to_have_attribute("src", src)


def test_queue_position_full_queue_and_cancel(page, api):
    """`limited` is never served (max_queue 2): its jobs wait in the queue."""
    waiting = [generate(api, wait=False, model="limited", prompt=f"a star {k}", steps=2).json()["id"]
               for k in range(2)]
    try:
        choose(page, "limited", "a green star", Steps=2)
        page.get_by_role("button", name="Generate").click()  # 429: shown in the general area
        expect(page.get_by_role("alert").filter(has_text="unfinished jobs")).to_contain_text("retry in 5 s")
        assert api.delete(f"/v1/jobs/{waiting.pop()}").json()["status"] == "cancelled"

        waiting.append(submitted_job(page, lambda: page.get_by_role("button", name="Generate").click()))
        expect(status(page)).to_have_text("Queued")
        expect(page.get_by_text("1 ahead in the queue")).to_be_visible()
        api.delete(f"/v1/jobs/{waiting.pop(0)}")
        expect(page.get_by_text("next in the queue")).to_be_visible(timeout=10_000)  # moved up

        page.get_by_role("button", name="Cancel").click()
        expect(status(page)).to_have_text("Cancelled")
        assert job_status(api, waiting[0])["status"] == "cancelled"
        expect(page.get_by_text("in the queue")).to_have_count(0)
    finally:
        for left in waiting:
            api.delete(f"/v1/jobs/{left}")


def test_cancel_a_running_job(visit, api, start_worker):
    start_worker("slow-ldm", "playground-cancel")
    page = visit()
    # The most work slow-ldm allows: many steps over a full batch of its largest images.
    choose(page, "slow-ldm", "an orange square", Width=128, Height=128, Steps=50, Images=8)
    job_id = submitted_job(page, lambda: page.get_by_role("button", name="Generate").click())
    expect(status(page)).to_have_text(re.compile(r"^Running: step"), timeout=60_000)
    page.get_by_role("button", name="Cancel").click()
    expect(status(page)).to_have_text("Cancelled", timeout=60_000)
    final = job_status(api, job_id)
    assert final["status"] == "cancelled" and final["progress"]["step"] < 50
    expect(page.get_by_role("img", name=re.compile("^Result"))).to_have_count(0)
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()


def test_api_errors_are_shown_at_their_fields(page, api):
    for label, field, bad in [("Width", "width", 60), ("Steps", "steps", 51)]:
        choose(page, "tiny-ldm", "a green star", Width=64, Steps=20)
        # Set through the DOM, past the input's own limits: the API is what must object.
        page.get_by_label(label, exact=True).evaluate("(input, v) => { input.value = v; }", str(bad))
        page.get_by_role("button", name="Generate").click()
        expected = api.post("/v1/generate", json={"model": "tiny-ldm", "prompt": "a green star",
                                                     field: bad}).json()["error"]
        assert expected["field"] == field
        control = page.get_by_label(label, exact=True)
        expect(control).to_have_accessible_description(expected["message"])
        expect(control).to_have_attribute("aria-invalid", "true")
        expect(status(page)).to_have_text("Not submitted")
    # Fixed, it goes through, and the marks are gone.
    page.get_by_label("Steps", exact=True).fill("3")
    page.get_by_role("button", name="Generate").click()
    expect(status(page)).to_have_text(re.compile(r"^Done"), timeout=60_000)
    expect(page.get_by_label("Steps", exact=True)).not_to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Steps", exact=True)).to_have_accessible_description("")


def test_phone_width_has_no_horizontal_scroll(visit, worker):
    page = visit(width=390, height=844)
    choose(page, "tiny-mmdit", "a yellow triangle at the bottom", Steps=6, Images=3)
    page.get_by_label("Live preview").uncheck()  # and previews come only when asked for
    page.evaluate(WATCH)
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("img", name=re.compile("^Result 3 of 3"))).to_be_visible(timeout=60_000)
    assert page.evaluate("window.seen.previews") == []
    snippet(page, "curl")  # long lines: they scroll in their own box
    expect(page.get_by_label("Request code")).to_be_visible()
    widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1] == 390, widths


def test_request_as_curl_and_python(page, api, tmp_path):
    choose(page, "tiny-mmdit", "it's a purple circle", Width=32, Height=48, Steps=3, Seed=11)
    command = snippet(page, "curl")
    host = urlsplit(str(api.base_url)).netloc
    assert command.startswith(f"curl -sS 'http://{host}/v1/generate?wait=true'")
    assert shutil.which("curl"), "the snippet test runs curl: apt-get install -y curl"
    run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)  # as pasted
    job = json.loads(run.stdout)
    assert job["status"] == "succeeded", run
    assert [(i["width"], i["height"], i["seed"]) for i in job["images"]] == [(32, 48, 11)]

    program = snippet(page, "Python")
    assert "client.images.generate(" in program and 'size="32x48"' in program
    # Run with the real openai package against the OpenAI-compatible route: the same image.
    run = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    ours = generate(api, model="tiny-mmdit", prompt="it's a purple circle", width=32, height=48, steps=3,
                    seed=11).json()["images"][0]
    assert (tmp_path / "image-0.png").read_bytes() == base64.b64decode(ours["data"])


def test_img2img_upload_and_its_curl_command(page, api, tmp_path):
    Image.new("RGB", (50, 30), (200, 30, 30)).save(tmp_path / "input.png")  # resized to fit by the API
    choose(page, "tiny-ldm", "a red circle", Width=48, Height=32, Steps=10, Seed=5)
    page.get_by_label("Task").select_option("img2img")
    page.get_by_label("Image", exact=True).set_input_files(tmp_path / "input.png")
    page.get_by_label("Strength").fill("0.5")
    job_id = submitted_job(page, lambda: page.get_by_role("button", name="Generate").click())
    result = page.get_by_role("img", name=re.compile(r"^Result 1 of 1"))
    expect(result).to_be_visible(timeout=60_000)
    assert result.evaluate("img => img.naturalWidth") == 48
    job = job_status(api, job_id)
    assert job["task"] == "img2img" and job["progress"]["total"] == 5  # strength 0.5 of 10 steps

    # The same request as a multipart curl command, the file by its name: the same image.
    command = snippet(page, "curl")
    assert "-F 'image=@input.png'" in command and "--form-string 'strength=0.5'" in command
    run = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert json.loads(run.stdout)["images"][0]["data"] == job["images"][0]["data"], run


def test_page_and_static_files_count_as_routes(page, api):
    metrics = api.get("/metrics").text
    for route in ("/", "/static"):
        assert re.search(rf'latentserve_http_requests_total\{{code="200",method="GET",route="{route}"\}}', metrics)

