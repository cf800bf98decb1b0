// The settings form: filled from a model's entry in GET /v1/models (its tasks, samplers,
// defaults and limits), read back into a /v1/generate body, and marked with the API's errors.
// Which fields show depends on the task: an input image for img2img / inpaint / superres,
// frames, fps and FreeInit passes for txt2video, the upscale checkbox for txt2img on a model with an upscaler.

const INPUT_TASKS = new Set(["img2img", "inpaint", "superres"]);
const SUPERRES = 4; // a superres job's size: 4x its input's, per side (the API's rule)
const FORMATS = {
  image: [["png", "PNG"], ["webp", "WebP (lossless)"], ["jpeg", "JPEG"]],
  video: [["mp4", "MP4 (H.264)"], ["webp", "WebP (animated, lossless)"], ["gif", "GIF"]],
};

function options(select, values, selected, label = (v) => v) {
  select.replaceChildren(
    ...values.map((value) => {
      const option = new Option(label(value), value);
      option.selected = value === selected;
      return option;
    }),
  );
}

function limitInput(input, { min, max, step, value }) {
  Object.assign(input, { min, max, step });
  input.value = value;
}

export class SettingsForm {
  constructor(form) {
    this.form = form;
    this.el = (name) => form.elements.namedItem(name);
    this.models = new Map();
    this.inputSize = null; // the chosen input image's [width, height], once read
  }

  setModels(catalog) {
    this.models = new Map(catalog.models.map((m) => [m.id, m]));
    options(this.el("model"), [...this.models.keys()], catalog.default);
    this.applyModel();
  }

  get model() {
    return this.models.get(this.el("model").value);
  }

  get task() {
    return this.el("task").value;
  }

  // Whether the request chains the model's x4 upscaler after txt2img.
  get upscaling() {
    return this.task === "txt2img" && Boolean(this.model.upscaler) && this.el("upscale").checked;
  }

  show(selector, on) {
    this.form.querySelector(selector).hidden = !on;
  }

  // Every option back to the chosen model's defaults and limits.
  applyModel() {
    const m = this.model;
    const d = m.defaults;
    const lim = m.limits;
    const task = this.task;
    options(this.el("task"), m.tasks, m.tasks.includes(task) ? task : m.tasks[0]);
    const size = { min: lim.min_size, max: lim.max_size, step: lim.size_multiple };
    limitInput(this.el("width"), { ...size, value: d.width });
    limitInput(this.el("height"), { ...size, value: d.height });
    limitInput(this.el("steps"), { min: 1, max: lim.max_steps, step: 1, value: d.steps });
    limitInput(this.el("guidance_scale"), {
      min: 0, max: lim.max_guidance_scale, step: "any", value: d.guidance_scale,
    });
    limitInput(this.el("num_images"), { min: 1, max: lim.max_images, step: 1, value: 1 });
    if (lim.max_frames) {
      const frames = d.num_frames || lim.max_frames;
      limitInput(this.el("num_frames"), { min: lim.min_frames || 1, max: lim.max_frames, step: 1, value: frames });
    }
    options(this.el("sampler"), Object.keys(m.samplers), d.sampler);
    const modes = (lim.guidance_modes || ["cfg", "autoguidance", "apg", "none"])
      .filter((mode) => mode !== "autoguidance" || m.guide);
    options(this.el("guidance"), modes, d.guidance || "cfg");
    this.applySampler();
    this.el("upscale").checked = false;
    this.form.querySelector("#upscale-label").textContent = m.upscaler ? `Upscale x4 (${m.upscaler})` : "Upscale x4";
    this.form.querySelector("#model-description").textContent = m.description || "";
    this.applyTask();
  }

  applySampler() {
    const m = this.model;
    const sampler = this.el("sampler").value;
    const schedules = m.samplers[sampler].schedules;
    const preferred = sampler === m.defaults.sampler ? m.defaults.schedule || "default" : "default";
    options(this.el("schedule"), schedules, schedules.includes(preferred) ? preferred : schedules[0]);
  }

  applyTask() {
    const task = this.task;
    const video = task === "txt2video";
    const superres = task === "superres";
    this.show("#image-inputs", INPUT_TASKS.has(task));
    this.form.querySelector("#image-inputs legend").textContent = superres ? "Low-resolution input" : "Input image";
    this.show("#mask-row", task === "inpaint");
    this.show("#strength-row", task === "img2img");
    this.show("#noise_level-row", superres);
    this.show("#width-row", !superres); // a superres job's size is its input's, x4
    this.show("#height-row", !superres);
    this.show("#num_frames-row", video);
    this.show("#fps-row", video);
    this.show("#free_init_iterations-row", video);
    this.show("#upscale-row", task === "txt2img" && Boolean(this.model.upscaler));
    this.show("#live-preview-row", !video); // the API refuses previews for videos
    this.form.querySelector("#num_images-label").textContent = video ? "Videos" : "Images";
    const format = this.el("output_format").value;
    const formats = FORMATS[video ? "video" : "image"];
    const values = formats.map(([value]) => value);
    options(this.el("output_format"), values, values.includes(format) ? format : values[0],
      (value) => formats.find(([v]) => v === value)[1]);
    this.applySize();
  }

  // The hint under the size fields: the model's sizes, what an upscale makes, or (superres)
  // the size the chosen input gives.
  applySize() {
    const lim = this.model.limits;
    let hint = lim.sizes && lim.sizes.length
      ? `sizes ${lim.sizes.map(([w, h]) => `${w}×${h}`).join(", ")}`
      : `multiples of ${lim.size_multiple} from ${lim.min_size} to ${lim.max_size}`;
    if (this.task === "superres") {
      hint = `The result is 4× the input image per side (fitted to ${hint})`;
      if (this.inputSize) {
        const [w, h] = this.inputSize;
        hint += `: this ${w}×${h} image gives about ${w * SUPERRES}×${h * SUPERRES}`;
      }
      hint += ".";
    }
    this.form.querySelector("#size-hint").textContent = hint;
    const up = this.upscaling;
    this.form.querySelector("#upscale-hint").textContent = up
      ? `then ${this.model.upscaler} makes it ${Number(this.el("width").value) * SUPERRES}×`
        + `${Number(this.el("height").value) * SUPERRES}`
      : "";
  }

  // Reads the chosen input image's size (for the superres hint and the preview's box).
  async noteImage() {
    const file = this.el("image").files[0];
    this.inputSize = null;
    if (file) {
      try {
        const bitmap = await createImageBitmap(file);
        this.inputSize = [bitmap.width, bitmap.height];
        bitmap.close();
      } catch {
        // not an image the browser reads: the API will say what is wrong with it
      }
    }
    this.applySize();
  }

  // The size the job delivers, where the page knows it (a superres job's input may not be read yet).
  outputSize() {
    if (this.task === "superres") {
      return this.inputSize && { width: this.inputSize[0] * SUPERRES, height: this.inputSize[1] * SUPERRES };
    }
    const factor = this.upscaling ? SUPERRES : 1;
    return { width: Number(this.el("width").value) * factor, height: Number(this.el("height").value) * factor };
  }

  // The generate body, every option explicit (the request is reproducible as shown).
  // Image tasks carry their files as data: URLs (unless `inline` is false: the snippets name
  // them instead), resized to the chosen size by the API.
  async body({ preview, inline = true }) {
    const v = (name) => this.el(name).value;
    const task = v("task");
    const body = { model: v("model"), task, prompt: v("prompt"), negative_prompt: v("negative_prompt") };
    if (task !== "superres") {
      body.width = Number(v("width"));
      body.height = Number(v("height"));
    }
    Object.assign(body, {
      steps: Number(v("steps")),
      sampler: v("sampler"),
      schedule: v("schedule"),
      guidance: v("guidance"),
      guidance_scale: Number(v("guidance_scale")),
      num_images: Number(v("num_images")),
      output_format: v("output_format"),
    });
    if (task === "txt2video") {
      body.num_frames = Number(v("num_frames"));
      body.fps = Number(v("fps"));
      if (Number(v("free_init_iterations")) > 1) body.free_init_iterations = Number(v("free_init_iterations"));
    }
    if (this.upscaling) body.upscale = true;
    if (v("seed") !== "") body.seed = Number(v("seed"));
    const files = {}; // field -> file name, for the snippets (a placeholder until one is chosen)
    if (INPUT_TASKS.has(task)) {
      body.resize = "fit";
      for (const name of task === "inpaint" ? ["image", "mask"] : ["image"]) {
        const file = this.el(name).files[0];
        files[name] = file ? file.name : `${name}.png`;
        if (file && inline) body[name] = await dataUrl(file);
      }
      if (task === "img2img") body.strength = Number(v("strength"));
      if (task === "superres") body.noise_level = Number(v("noise_level"));
    }
    if (preview && task !== "txt2video") body.preview = true;
    return { body, files };
  }

  clearErrors() {
    for (const node of this.form.querySelectorAll(".field-error")) node.textContent = "";
    for (const node of this.form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
  }

  // Shows `message` beside the field the API named; false if the form has no such field.
  showFieldError(field, message) {
    const name = (field || "").split(".")[0];
    const input = name && this.form.elements.namedItem(name);
    const slot = input && this.form.querySelector(`#${name}-error`);
    if (!slot || slot.closest("[hidden]")) return false; // a hidden field: the general area says it
    slot.textContent = message;
    input.setAttribute("aria-invalid", "true");
    input.focus();
    return true;
  }
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
