// The playground: one job at a time, from the form to its result, over the public API.

import * as api from "./api.js";
import { SettingsForm } from "./form.js";
import * as snippets from "./snippets.js";
import * as view from "./view.js";

const $ = (selector) => document.querySelector(selector);
const settings = new SettingsForm($("#settings"));
const generateButton = $("#generate");
const cancelButton = $("#cancel");
const previewBox = $("#live-preview");
let current = null; // the job being watched: {id, request, size, stage, stop}

function showGeneralError(message) {
  $("#general-error").textContent = message;
}

function showError(error) {
  if (!(error instanceof api.ApiError) || !settings.showFieldError(error.field, error.message)) {
    showGeneralError(error.message);
  }
}

function busy(on) {
  generateButton.disabled = on;
  cancelButton.disabled = !on;
}

async function generate() {
  if (generateButton.disabled) return; // a job is on its way: one at a time
  busy(true);
  settings.clearErrors();
  showGeneralError("");
  const request = await settings.body({ preview: previewBox.checked && !previewBox.disabled });
  view.clearOutput();
  view.setStatus("Submitting…", "busy");
  let accepted;
  try {
    accepted = await api.submit(request.body);
  } catch (error) {
    busy(false);
    view.setStatus("Not submitted", "error");
    showError(error);
    return;
  }
  view.showWarnings(accepted.warnings);
  const output = $("#output"); // below the form on a phone: bring it into view
  if (output.getBoundingClientRect().top > window.innerHeight) output.scrollIntoView({ behavior: "smooth" });
  view.setStatus("Queued", "queued");
  view.setProgress(0, request.body.steps); // an upscale's events then count both stages
  current = {
    id: accepted.id, request, size: settings.outputSize(), upscaler: settings.model.upscaler,
    stage: request.body.upscale ? "stage 1 of 2: generating" : "",
  };
  current.stop = api.watch(accepted.id, {
    status: onStatus, queue: (event) => view.setQueuePosition(event.position),
    progress: onProgress, stage: onStage, done: finish,
    lost: () => finish({ status: "failed", error: "lost the job's event stream (expired or unknown)" }),
  });
}

function onStatus(event) {
  if (event.status === "queued") {
    view.setStatus("Queued", "queued");
    view.setQueuePosition(event.queue_position ?? event.position);
  } else {
    view.setStatus(event.status === "running" ? running() : event.status, "busy");
    view.setQueuePosition(null);
  }
  if (event.total) view.setProgress(event.step, event.total);
}

// "Running: step 12 of 30" (and which stage of an upscale chain).
function running(step, total) {
  const stage = current && current.stage ? ` · ${current.stage}` : "";
  return step === undefined ? `Running${stage}` : `Running: step ${step} of ${total}${stage}`;
}

function onProgress(event) {
  // Past the first stage's steps: the upscaler's (its `stage` event may have come before
  // this page's stream opened).
  if (current && current.request.body.upscale && event.step > current.request.body.steps) upscaling(current.upscaler);
  view.setStatus(running(event.step, event.total), "busy");
  view.setQueuePosition(null);
  view.setProgress(event.step, event.total);
  if (event.preview && current) view.showPreview(event.preview, current.size);
}

function upscaling(model) {
  current.stage = `stage 2 of 2: upscaling (${model})`;
}

// A chained job moved on to its upscaler (the progress count goes on over both stages).
function onStage(event) {
  if (!current) return;
  upscaling(event.model);
  view.setStatus(running(), "busy");
}

function finish(job) {
  if (!current) return;
  const { request, stop } = current;
  stop();
  current = null;
  busy(false);
  view.setQueuePosition(null);
  if (job.status === "succeeded") {
    const shown = { ...job, prompt: request.body.prompt };
    view.setProgress(job.progress?.total || 1, job.progress?.total || 1);
    const seconds = job.timings?.total_s; // submission to delivery
    view.setStatus(seconds ? `Done in ${Number(seconds).toFixed(2)} s` : "Done", "done");
    view.showResult(shown);
    view.addToGallery(shown);
  } else if (job.status === "cancelled") {
    view.setStatus("Cancelled", "cancelled");
  } else {
    view.setStatus("Failed", "error");
    showGeneralError(job.error || `job ended as ${job.status}`);
  }
}

async function cancel() {
  if (!current) return;
  const { id } = current;
  cancelButton.disabled = true;
  view.setStatus("Cancelling…", "busy");
  try {
    const { body } = await api.cancel(id);
    // 200: it never ran; 202: it stops at its next step and the stream says so.
    if (body.status === "cancelled" && current && current.id === id) finish({ status: "cancelled" });
  } catch (error) {
    if (error.code !== "job_finished") showGeneralError(error.message); // else `done` is on its way
  }
}

async function showSnippet(kind) {
  const request = await settings.body({ preview: false, inline: false });
  const text = snippets[kind](window.location.origin, request);
  $("#snippet").textContent = text;
  $("#snippet-box").hidden = false;
  let note = "Select the text below to copy it.";
  try {
    await navigator.clipboard.writeText(text);
    note = "Copied to the clipboard.";
  } catch {
    // no clipboard here (an insecure origin, or permission refused): the text is shown
  }
  $("#snippet-note").textContent = `${kind === "curl" ? "curl" : "Python"}: ${note}`;
}

async function start() {
  try {
    const [catalog, preview] = await Promise.all([api.listModels(), api.acceptsPreview()]);
    settings.setModels(catalog);
    if (!preview) {
      previewBox.checked = false;
      previewBox.disabled = true;
      $("#live-preview-hint").textContent = "(this server sends no previews)";
    }
    generateButton.disabled = false;
    view.setStatus("Ready", "");
  } catch (error) {
    showGeneralError(`cannot load the models: ${error.message}`);
  }
}

$("#settings").addEventListener("submit", (event) => {
  event.preventDefault();
  generate();
});
settings.el("model").addEventListener("change", () => settings.applyModel());
settings.el("sampler").addEventListener("change", () => settings.applySampler());
settings.el("task").addEventListener("change", () => settings.applyTask());
for (const name of ["width", "height", "upscale"]) {
  settings.el(name).addEventListener("input", () => settings.applySize());
}
settings.el("image").addEventListener("change", () => settings.noteImage());
settings.el("strength").addEventListener("input", (event) => {
  $("#strength-value").textContent = event.target.value;
});
cancelButton.addEventListener("click", cancel);
$("#copy-curl").addEventListener("click", () => showSnippet("curl"));
$("#copy-python").addEventListener("click", () => showSnippet("python"));
document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    if (!generateButton.disabled) $("#settings").requestSubmit();
  }
});

start();
