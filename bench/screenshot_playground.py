"""A screenshot of the playground for the README, taken in Debian's chromium against a
running service (`make serve`, whose worker serves the default model, or another --model):

    make serve                                             # in one shell
    .venv/bin/python -m bench.screenshot_playground       # writes docs/playground.png

It fills the gallery with a few results, then starts one more job and shoots the page
mid-generation (progress bar and live preview; --moment result waits for its result).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GALLERY = ["a blue square in the top left on a white background",
           "a green triangle at the bottom on a black background",
           "a yellow star in the center on a gray background"]
SHOWN = "a red circle in the center on a white background"
# Mid-generation: shoot once the bar is past this fraction, with a preview on screen.
MID = """fraction => {
  const bar = document.querySelector('#progress');
  return (!document.querySelector('#preview-image').hidden && bar.value >= fraction * bar.max)
    || document.querySelector('img.result') !== null;
}"""


def generate(page, prompt: str, seed: int, steps: int | None) -> None:
    page.get_by_label("Prompt", exact=True).fill(prompt)
    page.get_by_label("Seed", exact=True).fill(str(seed))
    if steps:
        page.get_by_label("Steps", exact=True).fill(str(steps))
    page.get_by_role("button", name="Generate").click()


def shoot(url: str, out: Path, model: str | None, moment: str, steps: int | None, chromium: str) -> str:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 860})
        page.goto(url.rstrip("/") + "/")
        expect(page.get_by_role("button", name="Generate")).to_be_enabled()
        if model:
            page.get_by_label("Model").select_option(model)
        done = page.get_by_role("status").first
        for seed, prompt in enumerate(GALLERY, start=1):
            generate(page, prompt, seed, steps)
            expect(page.get_by_role("button", name="Generate")).to_be_enabled(timeout=300_000)
        generate(page, SHOWN, 42, steps)
        if moment == "preview":
            page.wait_for_function(MID, arg=0.5, timeout=300_000, polling=20)
        else:
            expect(page.locator("img.result").first).to_be_visible(timeout=300_000)
        page.screenshot(path=str(out), full_page=True)
        shown = done.text_content()
        browser.close()
    return shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "playground.png")
    parser.add_argument("--model", default=None, help="default: the registry's default model")
    parser.add_argument("--moment", choices=["preview", "result"], default="preview")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("no chromium on PATH: apt-get install -y chromium")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    status = shoot(args.url, args.out, args.model, args.moment, args.steps, chromium)
    print(f"wrote {args.out} (status on screen: {status!r})")


if __name__ == "__main__":
    main()
