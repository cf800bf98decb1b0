// A request from the page, written out as a shell command or a Python program that sends
// the same thing. Image files appear under their own names (the page cannot know their paths).

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

export function curl(origin, request) {
  const body = shareable(request.body);
  const url = shellQuote(`${origin}/v1/generate?wait=true`);
  const names = Object.keys(request.files);
  if (!names.length) {
    return `curl -sS ${url} \\\n  -H 'Content-Type: application/json' \\\n  -d ${shellQuote(JSON.stringify(body))}`;
  }
  // Image tasks: a multipart form, the image (and mask) as files. --form-string: a value
  // starting with @ or < is text, not a file to read.
  const fields = Object.entries(body).filter(([key]) => !names.includes(key))
    .map(([key, value]) => `--form-string ${shellQuote(`${key}=${value}`)}`);
  const files = names.map((key) => `-F ${shellQuote(`${key}=@${request.files[key]}`)}`);
  return [`curl -sS ${url}`, ...fields, ...files].join(" \\\n  ");
}

export function python(origin, request) {
  const body = shareable(request.body);
  const names = Object.keys(request.files);
  if (names.length) return pythonHttpx(origin, body, request.files);
  // The OpenAI call names its own parameters; everything else rides in extra_body.
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
    `    with open(f"image-{k}.${extension(body.output_format)}", "wb") as f:`,
    "        f.write(base64.b64decode(image.b64_json))",
  ].join("\n");
}

function pythonHttpx(origin, body, files) {
  const fields = Object.fromEntries(
    Object.entries(body).filter(([key]) => !(key in files)).map(([k, v]) => [k, String(v)]));
  const opened = Object.entries(files).map(([key, name]) => `${py(key)}: open(${py(name)}, "rb")`);
  return [
    "import base64",
    "",
    "import httpx",
    "",
    `fields = ${py(fields)}`,
    `files = {${opened.join(", ")}}`,
    `job = httpx.post(${py(`${origin}/v1/generate`)}, params={"wait": "true"}, data=fields, files=files,`,
    "                 timeout=300).json()",
    `for k, image in enumerate(job["images"]):`,
    `    with open(f"image-{k}.${extension(body.output_format)}", "wb") as f:`,
    `        f.write(base64.b64decode(image["data"]))`,
  ].join("\n");
}

export function extension(formatOrMime) {
  const kind = String(formatOrMime).split("/").pop();
  return kind === "jpeg" ? "jpg" : kind;
}
