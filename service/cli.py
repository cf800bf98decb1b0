"""`latentserve`: generate images and videos, list models, inspect and cancel jobs against a
latentserve API, or run the whole service on this machine (`latentserve serve`, what `make
serve` runs).

Results go to stdout, messages and the progress bar to stderr, and the exit code says how it
ended (EPILOG), so scripts can rely on all three.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from contextlib import closing
from pathlib import Path

from service.cli_client import ApiRefused, Client, Event, Unreachable

OK, FAILED, USAGE, REFUSED, UNREACHABLE, CANCELLED, INTERRUPTED = 0, 1, 2, 3, 4, 5, 130
FORMATS = {".png": "png", ".webp": "webp", ".jpg": "jpeg", ".jpeg": "jpeg", ".mp4": "mp4", ".gif": "gif"}
VIDEO_ONLY = ("mp4", "gif")  # formats only videos come in (webp is both: an image, or an animation)
TASK_CHOICES = ("txt2img", "img2img", "inpaint", "superres", "txt2video")

EPILOG = """\
exit codes:
  0    success
  1    the job failed (its error on stderr)
  2    usage error
  3    the API refused the request (4xx: its message and field on stderr)
  4    server unreachable, or a server error (5xx)
  5    the job was cancelled
  130  interrupted (Ctrl+C; a job being waited for is cancelled first)

server: --url, else $LATENTSERVE_URL, else http://127.0.0.1:$LATENTSERVE_PORT (8000)
"""

GENERATE_EPILOG = """\
output: -o FILE writes one image to FILE; with -n N > 1, FILE's stem gets -0, -1, ...
(out.png -> out-0.png, out-1.png). -o DIR (an existing directory, or a path ending in /)
writes DIR/<job id>-<k>.<ext>; the default is the current directory. The format is --format,
else the file's suffix (.png .webp .jpg .jpeg; videos .mp4 .webp .gif), else png (mp4 for
a video).

tasks: the default is inpaint with --mask, img2img with --image, txt2video with --frames,
--fps or an mp4/gif output, else txt2img. superres (x4: the result is 4x --image) is named:
--task superres --image small.png [--noise-level 20]. --upscale runs txt2img and then the
model's x4 upscaler (`latentserve models`: UPSCALER) as one job: --size is the first stage's.

stdout: one line per image, "PATH<TAB>SEED"; with --json instead the finished job's JSON,
each image's base64 "data" replaced by the "path" it was written to.
"""


def default_url() -> str:
    if url := os.environ.get("LATENTSERVE_URL"):
        return url
    from service.config import load_settings  # the port `latentserve serve` would listen on

    return f"http://127.0.0.1:{load_settings().port}"


def say(message: str) -> None:
    print(f"latentserve: {message}", file=sys.stderr)


# ------------------------------------------------------------------ generate

def size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 512x512, got {text!r}")
    return int(width), int(height)


def request_body(args: argparse.Namespace, task: str, fmt: str) -> dict:
    """The generate body: only what was given, so the model's defaults apply to the rest."""
    width, height = args.size or (None, None)
    fields = {
        "prompt": args.prompt, "model": args.model, "task": task, "negative_prompt": args.negative,
        "width": width, "height": height, "num_images": args.num_images, "steps": args.steps,
        "seed": args.seed, "sampler": args.sampler, "schedule": args.schedule,
        "guidance_scale": args.guidance, "guidance": args.guidance_mode, "strength": args.strength,
        "noise_level": args.noise_level, "back_projection": False if args.no_back_projection else None,
        "num_frames": args.frames, "fps": args.fps, "free_init_iterations": args.free_init,
        "upscale": args.upscale or None, "output_format": fmt, "priority": args.priority,
        "timeout_s": args.timeout,
    }
    return {k: v for k, v in fields.items() if v is not None}


def output_folder(output: str) -> Path:
    """Where -o writes: the folder itself, or the file's folder."""
    path = Path(output)
    return path if output.endswith(("/", os.sep)) or path.is_dir() else path.parent


def output_paths(output: str, job_id: str, count: int, fmt: str) -> list[Path]:
    path = Path(output)
    ext = "jpg" if fmt == "jpeg" else fmt
    if output_folder(output) == path:
        return [path / f"{job_id}-{k}.{ext}" for k in range(count)]
    if not path.suffix:
        path = path.with_suffix(f".{ext}")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(count)]


class Progress:
    """The job's steps as a tqdm bar on stderr; its label says queued (with the position in
    the queue when the server reports it) or running."""

    def __init__(self, enabled: bool, upscale: bool = False):
        from tqdm import tqdm  # only generate draws a bar

        self.bar = tqdm(total=None, desc="queued", unit="step", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True)
        self.running = "stage 1/2: generating" if upscale else "running"

    def show(self, event: Event) -> None:
        data = event.data
        position = data.get("position", data.get("queue_position"))  # `queue` events; `status` while queued
        if event.name == "stage":  # an upscale chain's second stage: the count goes on over both
            self.running = label = f"stage 2/2: upscaling ({data.get('model')})"
        elif position is not None:
            label = f"queued (position {position})"
        else:
            running = event.name == "progress" or data.get("status") == "running"
            label = self.running if running else data.get("status")
        if label:
            self.bar.set_description_str(label, refresh=False)
        if data.get("total"):
            self.bar.total = data["total"]
            self.bar.update(data.get("step", 0) - self.bar.n)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def task_of(args: argparse.Namespace, fmt: str | None) -> str:
    if args.task:
        return args.task
    if args.mask:
        return "inpaint"
    if args.image:
        return "img2img"
    video = args.frames is not None or args.fps is not None or args.free_init is not None or fmt in VIDEO_ONLY
    return "txt2video" if video else "txt2img"


def generate(client: Client, args: argparse.Namespace) -> int:
    suffix_format = FORMATS.get(Path(args.output).suffix.lower())
    if args.format and suffix_format and args.format != suffix_format:
        args.parser.error(f"--format {args.format} but -o {args.output} names a {suffix_format} file")
    task = task_of(args, args.format or suffix_format)
    fmt = args.format or suffix_format or ("mp4" if task == "txt2video" else "png")
    folder = output_folder(args.output)  # checked before the job runs, not after
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        args.parser.error(f"-o {args.output}: {exc}")
    if not os.access(folder, os.W_OK):
        args.parser.error(f"-o {args.output}: {folder} is not writable")
    files = {}
    for name in ("image", "mask"):
        if path := getattr(args, name):
            try:
                files[name] = (Path(path).name, Path(path).read_bytes())
            except OSError as exc:
                args.parser.error(f"--{name}: {exc}")

    accepted = client.submit(request_body(args, task, fmt), files)
    job_id = accepted["id"]
    try:  # from here on the job exists: Ctrl+C cancels it
        say(f"job {job_id} queued")
        for warning in accepted.get("warnings") or []:
            say(f"warning: {warning}")
        job = follow(client, job_id, Progress(enabled=not args.quiet, upscale=args.upscale))
    except KeyboardInterrupt:
        cancel_on_interrupt(client, job_id)
        return INTERRUPTED
    return finish(job, args.output, fmt, args.json)


def follow(client: Client, job_id: str, progress: Progress) -> dict:
    """The finished job's body, its progress shown on the way."""
    try:
        with closing(client.events(job_id)) as events:
            for event in events:
                if event.name == "done":
                    job = event.data
                    break
                progress.show(event)
        # The final count and status, even for a job that ran before the stream opened.
        progress.show(Event("done", {**job["progress"], "status": job["status"]}))
    finally:
        progress.close()
    return job


def cancel_on_interrupt(client: Client, job_id: str) -> None:
    try:
        answer = client.cancel(job_id)
    except (ApiRefused, Unreachable) as exc:
        say(f"interrupted; could not cancel job {job_id}: {exc}")
        return
    if answer["status"] == "cancelled":
        say(f"interrupted; job {job_id} cancelled")
    else:
        say(f"interrupted; job {job_id} is running and stops at its next step")


def finish(job: dict, output: str, fmt: str, as_json: bool) -> int:
    images = job.get("images") or []
    if job["status"] == "succeeded":
        for image, path in zip(images, output_paths(output, job["id"], len(images), fmt)):
            path.write_bytes(base64.b64decode(image.pop("data")))
            image["path"] = str(path)
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        for image in images:
            print(f"{image['path']}\t{image['seed']}")
    if job["status"] == "failed":
        say(f"job {job['id']} failed: {job.get('error')}")
        return FAILED
    if job["status"] == "cancelled":
        say(f"job {job['id']} was cancelled" + (f": {job['error']}" if job.get("error") else ""))
        return CANCELLED
    return OK


# ------------------------------------------------------------------ models, jobs, serve

def models(client: Client, args: argparse.Namespace) -> int:
    answer = client.models()
    if args.json:
        print(json.dumps(answer, indent=2))
        return OK
    rows = [("ID", "TASKS", "SIZE", "STEPS", "SAMPLER", "UPSCALER", "WORKERS")]
    for m in answer["models"]:
        d = m["defaults"]
        rows.append((m["id"] + (" *" if m.get("default") else ""), ",".join(m["tasks"]),
                     f"{d['width']}x{d['height']}", str(d["steps"]), str(d.get("sampler")),
                     m.get("upscaler") or "-", str(m["live_workers"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("(* the default model)")
    return OK


def job_get(client: Client, args: argparse.Namespace) -> int:
    job = client.job(args.id)
    # The images themselves are at their own URLs: base64 blobs would drown the status.
    for k, image in enumerate(job.get("images") or []):
        image.pop("data", None)
        image["url"] = f"{client.url}/v1/jobs/{args.id}/images/{k}"
    print(json.dumps(job, indent=2))
    return OK


def job_cancel(client: Client, args: argparse.Namespace) -> int:
    print(json.dumps(client.cancel(args.id), indent=2))
    return OK


def serve(_args: argparse.Namespace) -> int:
    from service.serve import main as serve_main

    serve_main()
    return OK


# ------------------------------------------------------------------ the parser

def build_parser() -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    # --url is accepted before or after the command; SUPPRESS keeps a subcommand's unset
    # default from overwriting a value given before it.
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--url", default=argparse.SUPPRESS,
                        help="the API's base URL (default: $LATENTSERVE_URL, else http://127.0.0.1:8000)")
    parser = argparse.ArgumentParser(
        prog="latentserve", parents=[server], epilog=EPILOG, formatter_class=formatter,
        description="Generate images and videos with a latentserve API, or run the service.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", parents=[server], help="generate images or videos and write them to files",
                              epilog=GENERATE_EPILOG + "\n" + EPILOG, formatter_class=formatter)
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default=".", metavar="PATH", help="file or directory (see below)")
    gen.add_argument("--model", help="registry id (default: the server's default model)")
    gen.add_argument("--task", choices=TASK_CHOICES,
                     help="default: inpaint with --mask, img2img with --image, txt2video with --frames, --fps "
                          "or an .mp4/.gif output, else txt2img")
    gen.add_argument("--size", type=size, metavar="WxH", help="e.g. 512x512 (default: the model's)")
    gen.add_argument("-n", "--num-images", type=int, metavar="N", help="images (seeds seed, seed+1, ...)")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--seed", type=int, help="default: random (printed with each image)")
    gen.add_argument("--sampler", help="e.g. euler, ddim, dpmpp_2m (see `latentserve models --json`)")
    gen.add_argument("--schedule", help="default, karras, trailing, ...")
    gen.add_argument("--guidance", type=float, metavar="SCALE", help="guidance scale")
    gen.add_argument("--guidance-mode", choices=("cfg", "autoguidance", "apg", "none"))
    gen.add_argument("--negative", metavar="PROMPT", help="negative prompt")
    gen.add_argument("--image", metavar="FILE", help="img2img / inpaint / superres input (PNG, JPEG or WebP)")
    gen.add_argument("--mask", metavar="FILE", help="inpaint mask: white = repaint, black = keep")
    gen.add_argument("--strength", type=float, help="img2img: how far the input is noised (0-1]")
    gen.add_argument("--noise-level", type=int, metavar="N",
                     help="superres (and --upscale's second stage): noise added to the input, 0-350 (default 20)")
    gen.add_argument("--no-back-projection", action="store_true",
                     help="superres / --upscale: the upscaler's image as diffusers' pipeline gives it (by default it "
                          "is corrected to average back to the input)")
    gen.add_argument("--upscale", action="store_true",
                     help="txt2img, then the model's x4 upscaler, as one job (4x --size)")
    gen.add_argument("--frames", type=int, metavar="N", help="txt2video: frames per video (default: the model's)")
    gen.add_argument("--fps", type=int, help="txt2video: frames per second of the file (1-60, default 8)")
    gen.add_argument("--free-init", type=int, metavar="N", help="txt2video: N denoising passes with FreeInit "
                     "between them (frames agree more; N times the cost; 1-4, default 1: off)")
    gen.add_argument("--format", choices=("png", "webp", "jpeg", "mp4", "gif"),
                     help="images: png, webp, jpeg; videos: mp4 (default), webp, gif")
    gen.add_argument("--priority", choices=("high", "normal", "low"))
    gen.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="the server fails the job if it has not finished this long after submission")
    gen.add_argument("--json", action="store_true", help="print the finished job as JSON")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(run=generate, parser=gen)

    mod = commands.add_parser("models", parents=[server], help="the models the server knows")
    mod.add_argument("--json", action="store_true", help="the API's /v1/models answer as JSON")
    mod.set_defaults(run=models)

    jobs = commands.add_parser("jobs", help="inspect or cancel a job").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    get = jobs.add_parser("get", parents=[server], help="a job's status as JSON")
    get.add_argument("id")
    get.set_defaults(run=job_get)
    cancel = jobs.add_parser("cancel", parents=[server], help="cancel a job (a running one stops at its next step)")
    cancel.add_argument("id")
    cancel.set_defaults(run=job_cancel)

    srv = commands.add_parser(
        "serve", help="run Redis (if needed), the API and a worker here (`make serve`)",
        description="Run the whole service on this machine (as `python -m service.serve`): a local "
                    "redis-server unless REDIS_URL or LATENTSERVE_REDIS_URL is set, the API on "
                    "LATENTSERVE_HOST:LATENTSERVE_PORT, and a worker for the default model (restarted if it "
                    "dies). Ctrl+C or SIGTERM stops them all.")
    srv.set_defaults(serve=serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "serve", None):
        sys.exit(args.serve(args))
    client = Client(getattr(args, "url", None) or default_url())
    try:
        code = args.run(client, args)
    except ApiRefused as exc:
        say(str(exc))
        code = REFUSED
    except Unreachable as exc:
        say(str(exc))
        code = UNREACHABLE
    except KeyboardInterrupt:  # before a job existed, or while answering a plain request
        say("interrupted")
        code = INTERRUPTED
    finally:
        client.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
