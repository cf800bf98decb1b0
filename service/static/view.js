// The output side: status line, progress bar, live preview, results and this visit's gallery.

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
export function showPreview(preview, width, height) {
  const img = $("#preview-image");
  img.src = `data:${preview.mime};base64,${preview.data}`;
  img.style.aspectRatio = `${width} / ${height}`;
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

function imageSrc(image) {
  return `data:${image.mime};base64,${image.data}`;
}

function resultFigure(job, image, k) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = imageSrc(image);
  img.alt = `Result ${k + 1} of ${job.images.length}: ${job.prompt || ""} (seed ${image.seed})`;
  img.width = image.width;
  img.height = image.height;
  img.className = "result";
  const caption = document.createElement("figcaption");
  const link = document.createElement("a");
  link.href = img.src;
  link.download = `latentserve-${job.id.slice(0, 8)}-${k}.${extension(image.mime)}`;
  link.textContent = `Download ${extension(image.mime).toUpperCase()}`;
  caption.append(`${image.width}×${image.height}, seed ${image.seed} · `, link);
  figure.append(img, caption);
  return figure;
}

// `job`: the done event's body, with the request's prompt added by the caller.
export function showResult(job) {
  $("#preview-image").hidden = true;
  const results = $("#results");
  results.hidden = false;
  results.replaceChildren(...job.images.map((image, k) => resultFigure(job, image, k)));
}

export function addToGallery(job) {
  const gallery = $("#gallery");
  job.images.forEach((image, k) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.title = `${job.prompt} (seed ${image.seed})`;
    button.setAttribute("aria-label", `View ${job.prompt} (seed ${image.seed})`);
    const thumb = document.createElement("img");
    thumb.src = imageSrc(image);
    thumb.alt = "";
    button.append(thumb);
    button.addEventListener("click", () => {
      showResult({ ...job, images: [image] });
      const figure = $("#results figure");
      figure.querySelector("img").alt = `Result: ${job.prompt} (seed ${image.seed})`;
      figure.querySelector("a").download = `latentserve-${job.id.slice(0, 8)}-${k}.${extension(image.mime)}`;
      setStatus(`Viewing an earlier result (${job.model}, ${job.steps} steps)`, "done");
    });
    item.append(button);
    gallery.prepend(item);
  });
  $("#gallery-empty").hidden = true;
}
