// The generation form, built from the chosen model's input schema (GET /v1/models): one field per property, in
// the schema's order, with its description, default and range as the hint. Fields the page knows get a
// fitting control (the prompt with its counter, reference uploads, LoRA rows, the seed with a lock, the aspect
// ratio with an exact-size mode); any other field gets one by its type (checkbox, select, number, text), so a
// field added to the schema appears without a change here.

import { byId, h, show } from "./dom.js";
import { loraWidget } from "./loras.js";
import { fieldsOf } from "./models.js";
import { OPENAI } from "./request.js";

// Shorter labels than the schema's titles ("Num Inference Steps") for the fields every model has.
const LABELS = {
  prompt: "Prompt",
  images: "Reference images",
  aspect_ratio: "Aspect ratio",
  seed: "Seed",
  num_inference_steps: "Steps",
  guidance: "Guidance",
  output_format: "Format",
  output_quality: "Quality",
  num_outputs: "Images",
  loras: "LoRAs",
};
const number = (n) => (typeof n === "number" ? n.toLocaleString("en") : "");

/** "1–50, default 4": the range and default the schema gives, after its description. */
function hintOf(field) {
  const range = field.minimum !== undefined && field.maximum !== undefined ? `${number(field.minimum)}–${number(field.maximum)}` : "";
  const parts = [field.description, range, field.default !== undefined && field.default !== null && typeof field.default !== "object" ? `default ${field.default}` : ""];
  return parts.filter(Boolean).join(" · ");
}

export function setupSchemaForm(api, { container, refs, onChange }) {
  const images = byId("widget-images");
  const size = byId("widget-size");
  const sizeMode = byId("size-mode");
  const width = byId("width");
  const height = byId("height");
  const seedLock = byId("seed-lock");
  const seedLockLabel = byId("seed-lock-label");
  const promptExtras = byId("prompt-extras");
  let controls = []; // [{field, read(), fill(value), input}]
  let loras = null;

  function generic(field, id) {
    if (field.type === "boolean") {
      const input = h("input", { id, type: "checkbox" });
      input.checked = Boolean(field.default);
      return { input, read: () => input.checked, fill: (v) => (input.checked = Boolean(v)), check: true };
    }
    if (field.enum) {
      const input = h("select", { id });
      if (field.nullable || field.default === null) input.append(h("option", { value: "" }, "default"));
      for (const value of field.enum) input.append(h("option", { value }, String(value)));
      input.value = field.default ?? "";
      return { input, read: () => input.value || undefined, fill: (v) => (input.value = v ?? "") };
    }
    if (field.type === "integer" || field.type === "number") {
      const step = field.type === "integer" ? "1" : "any";
      const input = h("input", { id, type: "number", step, min: field.minimum, max: field.maximum, value: field.default ?? "" });
      if (field.required) input.required = true;
      return { input, read: () => (input.value === "" ? undefined : Number(input.value)), fill: (v) => (input.value = v ?? "") };
    }
    if (field.type === "string") {
      const input = h("input", { id, type: "text", maxlength: field.maxLength, value: field.default ?? "" });
      return { input, read: () => input.value || undefined, fill: (v) => (input.value = v ?? "") };
    }
    // Lists and objects the page does not know: JSON.
    const input = h("textarea", { id, rows: 2, class: "json", spellcheck: "false", placeholder: "JSON" });
    const read = () => {
      if (!input.value.trim()) return undefined;
      try {
        return JSON.parse(input.value);
      } catch {
        throw Object.assign(new Error(`${field.title}: not valid JSON.`), { input });
      }
    };
    return { input, read, fill: (v) => (input.value = v === undefined ? "" : JSON.stringify(v)) };
  }

  function special(field, id, model) {
    if (field.name === "prompt") {
      const input = h("textarea", { id, rows: 4, required: true, maxlength: field.maxLength, placeholder: "a red fox in fresh snow, morning light" });
      return { input, read: () => input.value, fill: (v) => (input.value = v ?? "") };
    }
    if (field.name === "images") {
      show(images);
      byId("references-label").textContent = `${LABELS.images} (optional, up to ${field.maxItems ?? 4})`;
      const read = () => refs.list.filter((ref) => ref.url).map((ref) => ref.url); // uploads still going: not yet
      return { element: images, own: true, read, fill: (v) => refs.replace(v || []) };
    }
    if (field.name === "loras") {
      loras = loraWidget(api, field, Math.min(field.maxItems ?? 0, model.max_loras ?? field.maxItems ?? 0));
      return { element: loras.element, read: () => loras.now(), fill: (v) => loras.fill(v) };
    }
    if (field.name === "seed") {
      const input = h("input", { id, type: "number", min: 0, max: field.maximum, step: "1", placeholder: "random" });
      return {
        input,
        extra: seedLockLabel,
        read: () => (seedLock.checked && input.value !== "" ? Number(input.value) : -1),
        fill: (v) => {
          const locked = typeof v === "number" && v >= 0;
          if (locked) input.value = String(v);
          seedLock.checked = locked;
        },
      };
    }
    if (field.name === "aspect_ratio" && field.enum) {
      const control = generic(field, id);
      return { ...control, element: size, place: byId("ratio-slot") };
    }
    return null;
  }

  /** Build the form for `model`, keeping what was typed (other than the last model's defaults) in fields of the
   * same name. */
  function render(model) {
    const before = controls.length ? snapshot() : null;
    for (const control of controls) {
      if (before && before[control.field.name] === control.field.default) delete before[control.field.name];
    }
    loras = null;
    show(images, false);
    // Parked while the form is rebuilt; placed again below where the schema has their fields.
    byId("parking").append(images, size, promptExtras, seedLockLabel);
    show(size, false);
    container.replaceChildren();
    controls = [];
    for (const field of fieldsOf(model.input_schema)) {
      const id = `in-${field.name}`;
      const control = special(field, id, model) || generic(field, id);
      const label = LABELS[field.name] || field.title;
      const hint = h("p", { class: "hint", id: `${id}-hint`, text: hintOf(field) });
      let element;
      if (control.element && control.place) {
        control.place.replaceChildren(h("label", { for: id, text: label }), control.input);
        element = control.element;
        show(element);
        byId("ratio-hint").replaceChildren(hint);
      } else if (control.own) {
        element = control.element; // labelled by itself
        element.querySelector(`#${hint.id}`)?.remove(); // the last model's
        element.append(hint);
        show(element);
      } else if (control.element) {
        element = h("div", { class: "field", "data-field": field.name }, h("span", { class: "label", text: label }), control.element, hint);
      } else {
        control.input.setAttribute("aria-describedby", hint.id);
        const title = h("label", { for: id, text: label });
        element = control.check
          ? h("div", { class: "field", "data-field": field.name }, h("label", { class: "check", for: id }, control.input, ` ${label}`), hint)
          : h("div", { class: "field", "data-field": field.name }, title, control.input, control.extra || null, hint);
      }
      if (field.name === "prompt") element.append(promptExtras);
      element.dataset.field = field.name;
      container.append(element);
      controls.push({ field, ...control });
    }
    if (before) fill(before, false);
    applySizeMode();
    onChange();
  }

  function applySizeMode() {
    const exact = sizeMode.value === "exact";
    show(byId("ratio-slot"), !exact);
    show(byId("exact-fields"), exact);
    show(byId("exact-hint"), exact);
    const steps = document.getElementById("in-num_inference_steps");
    const guidance = document.getElementById("in-guidance");
    const field = (name) => controls.find((c) => c.field.name === name)?.field;
    if (steps) steps.max = String(exact ? OPENAI.maxSteps : field("num_inference_steps").maximum);
    if (guidance) guidance.max = String(exact ? OPENAI.maxGuidance : field("guidance").maximum);
  }
  sizeMode.addEventListener("change", () => {
    applySizeMode();
    onChange();
  });

  /** The input the form holds now, as sent (fields left empty are left out: the server's defaults hold). */
  function snapshot() {
    const input = {};
    for (const control of controls) {
      const value = control.read();
      if (value === undefined || (Array.isArray(value) && !value.length)) continue;
      input[control.field.name] = value;
    }
    return input;
  }

  /** Put a request's input in the form (its seed locked); fields the model lacks are ignored. */
  function fill(input, all = true) {
    for (const control of controls) {
      const value = input[control.field.name];
      if (value !== undefined || all) control.fill(value === undefined ? control.field.default : value);
    }
  }

  return {
    render,
    snapshot,
    fill,
    applySizeMode,
    get controls() {
      return controls;
    },
    get loras() {
      return loras;
    },
    exact: () => (sizeMode.value === "exact" ? { width: Number(width.value), height: Number(height.value) } : null),
    setExact(exact) {
      sizeMode.value = exact ? "exact" : "ratio";
      if (exact) {
        width.value = String(exact.width);
        height.value = String(exact.height);
      }
      applySizeMode();
    },
  };
}
