// The settings form: filled from a model's entry in GET /v1/models (its tasks, samplers,
// defaults and limits), read back into a /v1/generate body, and marked with the API's errors.

const IMAGE_TASKS = new Set(["img2img", "inpaint"]);

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
  }

  setModels(catalog) {
    this.models = new Map(catalog.models.map((m) => [m.id, m]));
    options(this.el("model"), [...this.models.keys()], catalog.default);
    this.applyModel();
  }

  get model() {
    return this.models.get(this.el("model").value);
  }

  // Every option back to the chosen model's defaults and limits.
  applyModel() {
    const m = this.model;
    const d = m.defaults;
    const lim = m.limits;
    const task = this.el("task").value;
    options(this.el("task"), m.tasks, m.tasks.includes(task) ? task : m.tasks[0]);
    const size = { min: lim.min_size, max: lim.max_size, step: lim.size_multiple };
    limitInput(this.el("width"), { ...size, value: d.width });
    limitInput(this.el("height"), { ...size, value: d.height });
    limitInput(this.el("steps"), { min: 1, max: lim.max_steps, step: 1, value: d.steps });
    limitInput(this.el("guidance_scale"), {
      min: 0, max: lim.max_guidance_scale, step: "any", value: d.guidance_scale,
    });
    limitInput(this.el("num_images"), { min: 1, max: lim.max_images, step: 1, value: 1 });
    options(this.el("sampler"), Object.keys(m.samplers), d.sampler);
    const modes = (lim.guidance_modes || ["cfg", "autoguidance", "apg", "none"])
      .filter((mode) => mode !== "autoguidance" || m.guide);
    options(this.el("guidance"), modes, d.guidance || "cfg");
    this.applySampler();
    const sizes = lim.sizes && lim.sizes.length
      ? `sizes ${lim.sizes.map(([w, h]) => `${w}×${h}`).join(", ")}`
      : `multiples of ${lim.size_multiple} from ${lim.min_size} to ${lim.max_size}`;
    this.form.querySelector("#size-hint").textContent = sizes;
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
    const task = this.el("task").value;
    this.form.querySelector("#image-inputs").hidden = !IMAGE_TASKS.has(task);
    this.form.querySelector("#mask-row").hidden = task !== "inpaint";
    this.form.querySelector("#strength-row").hidden = task !== "img2img";
  }

  // The generate body, every option explicit (the request is reproducible as shown).
  // Image tasks carry their files as data: URLs (unless `inline` is false: the snippets name
  // them instead), resized to the chosen size by the API.
  async body({ preview, inline = true }) {
    const v = (name) => this.el(name).value;
    const body = {
      model: v("model"),
      task: v("task"),
      prompt: v("prompt"),
      negative_prompt: v("negative_prompt"),
      width: Number(v("width")),
      height: Number(v("height")),
      steps: Number(v("steps")),
      sampler: v("sampler"),
      schedule: v("schedule"),
      guidance: v("guidance"),
      guidance_scale: Number(v("guidance_scale")),
      num_images: Number(v("num_images")),
      output_format: v("output_format"),
    };
    if (v("seed") !== "") body.seed = Number(v("seed"));
    const files = {}; // field -> file name, for the snippets (a placeholder until one is chosen)
    if (IMAGE_TASKS.has(body.task)) {
      body.resize = "fit";
      for (const name of body.task === "inpaint" ? ["image", "mask"] : ["image"]) {
        const file = this.el(name).files[0];
        files[name] = file ? file.name : `${name}.png`;
        if (file && inline) body[name] = await dataUrl(file);
      }
      if (body.task === "img2img") body.strength = Number(v("strength"));
    }
    if (preview) body.preview = true;
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
    if (!slot) return false;
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
