// The output side: status line, progress bar, live preview, results (images and videos) and
// this visit's gallery.

import { extension } from "./snippets.js";

const $ = (selector) => document.querySelector(selector);

export function setStatus(text, state = "") {
  const node = $("#status");
  node.textContent = text;
  node.dataset.state = state;
}

// `position`: jobs ahead in the model's queue (0: next); absent once it runs, or from a
// server that does not report it.
export function setQueuePosition(position) {
  let text = "";
  if (Number.isInteger(position)) text = position === 0 ? "next in the queue" : `${position} ahead in the queue`;
  $("#queue-position").textContent = text;
}

export function setProgress(step, total) {
  const bar = $("#progress");
  bar.max = Math.max(total, 1);
  bar.value = Math.min(step, bar.max);
  bar.setAttribute("aria-valuetext", `step ${step} of ${total}`);
}

// A preview is the latent decoded cheaply, at latent resolution: shown scaled up to the
// size the job will deliver, in the box its result will take.
export function showPreview(preview, size) {
  const img = $("#preview-image");
  img.src = `data:${preview.mime};base64,${preview.data}`;
  img.style.aspectRatio = size ? `${size.width} / ${size.height}` : "";
  img.hidden = false;
  $("#results").hidden = true;
}

export function clearOutput() {
  $("#preview-image").hidden = true;
  $("#preview-image").removeAttribute("src");
  $("#results").replaceChildren();
  $("#results").hidden = false;
  $("#warnings").replaceChildren();
  setQueuePosition(null);
  setProgress(0, 1);
}

export function showWarnings(warnings) {
  $("#warnings").replaceChildren(...(warnings || []).map((text) => {
    const item = document.createElement("li");
    item.textContent = text;
    return item;
  }));
}

function fileSrc(image) {
  return `data:${image.mime};base64,${image.data}`;
}

// A result file as its element: a <video> for MP4, an <img> for images and for animated WebP
// / GIF videos (which browsers play as images).
function media(image, label) {
  const video = image.mime.startsWith("video/");
  const node = document.createElement(video ? "video" : "img");
  if (video) {
    // Muted: browsers only autoplay silent media (and these have no sound anyway).
    for (const name of ["controls", "loop", "autoplay", "muted", "playsinline"]) node.setAttribute(name, "");
    node.muted = true;
    node.setAttribute("aria-label", label);
  } else {
    node.alt = label;
  }
  node.src = fileSrc(image);
  node.width = image.width;
  node.height = image.height;
  node.className = "result";
  return node;
}

function describe(image) {
  const size = `${image.width}×${image.height}`;
  return image.frames ? `${size}, ${image.frames} frames at ${image.fps} fps` : size;
}

function resultFigure(job, image, k, label) {
  const figure = document.createElement("figure");
  const shown = media(image, label);
  const caption = document.createElement("figcaption");
  const link = document.createElement("a");
  link.href = shown.src;
  link.download = `latentserve-${job.id.slice(0, 8)}-${k}.${extension(image.mime)}`;
  link.textContent = `Download ${extension(image.mime).toUpperCase()}`;
  caption.append(`${describe(image)}, seed ${image.seed} · `, link);
  figure.append(shown, caption);
  return figure;
}

// `job`: the done event's body, with the request's prompt added by the caller; `only`: show
// just its file k (a gallery entry).
export function showResult(job, only = null) {
  $("#preview-image").hidden = true;
  const results = $("#results");
  results.hidden = false;
  const count = job.images.length;
  const figures = job.images.map((image, k) => {
    const what = only === null ? `Result ${k + 1} of ${count}` : "Result";
    return resultFigure(job, image, k, `${what}: ${job.prompt || ""} (seed ${image.seed})`);
  });
  results.replaceChildren(...(only === null ? figures : [figures[only]]));
}

function thumbnail(image) {
  if (!image.mime.startsWith("video/")) {
    const img = document.createElement("img");
    img.src = fileSrc(image);
    img.alt = "";
    return img;
  }
  const video = document.createElement("video"); // its first frame, still
  video.muted = true;
  video.preload = "metadata";
  video.src = fileSrc(image);
  video.setAttribute("aria-hidden", "true");
  return video;
}

export function addToGallery(job) {
  const gallery = $("#gallery");
  job.images.forEach((image, k) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    const kind = image.frames ? "video " : "";
    button.title = `${job.prompt} (${kind}seed ${image.seed})`;
    button.setAttribute("aria-label", `View ${job.prompt} (${kind}seed ${image.seed})`);
    button.append(thumbnail(image));
    button.addEventListener("click", () => {
      showResult(job, k);
      setStatus(`Viewing an earlier result (${job.model}, ${job.steps} steps)`, "done");
    });
    item.append(button);
    gallery.prepend(item);
  });
  $("#gallery-empty").hidden = true;
}
