// A request from the page, written out as a shell command or a Python program that sends
// the same thing. Image files appear under their own names (the page cannot know their paths).
// Python: txt2img (upscaled or not) through the openai SDK's images.generate; what OpenAI's
// Images API has no call for (videos, superres, uploads) through httpx to /v1/generate.

const shellQuote = (text) => `'${String(text).replaceAll("'", `'\\''`)}'`;

// JSON values as Python literals (json.dumps output is valid Python once the three
// keywords are spelled Python's way).
function py(value) {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map(py).join(", ")}]`;
  if (typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${py(v)}`).join(", ")}}`;
  }
  return JSON.stringify(value);
}

// The body as sent, minus what only the page wants (live previews) and an empty negative prompt.
function shareable(body) {
  const { preview, ...rest } = body;
  if (!rest.negative_prompt) delete rest.negative_prompt;
  return rest;
}

// Where a snippet writes result k: video-0.mp4, image-0.png... (k: a number, or the name of
// the program's variable).
function fileName(body, k) {
  return `${body.task === "txt2video" ? "video" : "image"}-${k}.${extension(body.output_format)}`;
}

export function curl(origin, request) {
  const body = shareable(request.body);
  const url = shellQuote(`${origin}/v1/generate?wait=true`);
  const names = Object.keys(request.files);
  if (!names.length) {
    const json = `curl -sS ${url} \\\n  -H 'Content-Type: application/json' \\\n`
      + `  -d ${shellQuote(JSON.stringify(body))}`;
    return body.task === "txt2video" ? curlVideo(origin, json, body) : json;
  }
  // Image tasks: a multipart form, the image (and mask) as files. --form-string: a value
  // starting with @ or < is text, not a file to read.
  const fields = Object.entries(body).filter(([key]) => !names.includes(key))
    .map(([key, value]) => `--form-string ${shellQuote(`${key}=${value}`)}`);
  const files = names.map((key) => `-F ${shellQuote(`${key}=@${request.files[key]}`)}`);
  return [`curl -sS ${url}`, ...fields, ...files].join(" \\\n  ");
}

// A video is a file of its own: the job's id from the answer, then each video as the images
// route serves it (-f: a job that failed or is still running writes no file).
function curlVideo(origin, json, body) {
  const id = "python3 -c 'import json, sys; job = json.load(sys.stdin); "
    + `print(job["id"]) if "id" in job else sys.exit(job)'`;
  const save = (k, file) => `curl -fsS "${origin}/v1/jobs/$id/images/${k}" -o ${file}`;
  const all = body.num_images === 1
    ? save(0, fileName(body, 0))
    : `for k in ${[...Array(body.num_images).keys()].join(" ")}; do ${save("$k", `"${fileName(body, "$k")}"`)}; done`;
  return `id=$(${json} \\\n  | ${id}) \\\n  && ${all}`;
}

export function python(origin, request) {
  const body = shareable(request.body);
  if (Object.keys(request.files).length || body.task !== "txt2img") {
    return pythonHttpx(origin, body, request.files);
  }
  // The OpenAI call names its own parameters; everything else (upscale too) rides in
  // extra_body. `size` is the first stage's: an upscaled answer is 4x it.
  const { model, prompt, width, height, num_images: n, task, ...extra } = body;
  return [
    "import base64",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${py(`${origin}/v1`)}, api_key="unused")`,
    "result = client.images.generate(",
    `    model=${py(model)},`,
    `    prompt=${py(prompt)},`,
    `    size=${py(`${width}x${height}`)},`,
    `    n=${n},`,
    `    response_format="b64_json",`,
    `    extra_body=${py(extra)},`,
    ")",
    "for k, image in enumerate(result.data):",
    `    with open(f"${fileName(body, "{k}")}", "wb") as f:`,
    "        f.write(base64.b64decode(image.b64_json))",
  ].join("\n");
}

// Uploads as a multipart form (files by their names), anything else as JSON. Each entry of
// the job's "images" is one whole file, a video's too.
function pythonHttpx(origin, body, files) {
  const names = Object.keys(files);
  const lines = ["import base64", "", "import httpx", ""];
  let payload = "json=body";
  if (names.length) {
    const fields = Object.fromEntries(
      Object.entries(body).filter(([key]) => !names.includes(key)).map(([k, v]) => [k, String(v)]));
    const opened = names.map((key) => `${py(key)}: open(${py(files[key])}, "rb")`);
    lines.push(`fields = ${py(fields)}`, `files = {${opened.join(", ")}}`);
    payload = "data=fields, files=files";
  } else {
    lines.push(`body = ${py(body)}`);
  }
  return [
    ...lines,
    `job = httpx.post(${py(`${origin}/v1/generate`)}, params={"wait": "true"}, ${payload},`,
    "                 timeout=300).json()",
    `for k, item in enumerate(job["images"]):`,
    `    with open(f"${fileName(body, "{k}")}", "wb") as f:`,
    `        f.write(base64.b64decode(item["data"]))`,
  ].join("\n");
}

export function extension(formatOrMime) {
  const kind = String(formatOrMime).split("/").pop();
  return kind === "jpeg" ? "jpg" : kind;
}
