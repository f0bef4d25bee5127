// The form's LoRA rows: each an https URL or a .safetensors file uploaded at once through POST /v1/files, with
// its scale; as many as the deployment allows (GET /v1/models' max_loras, within the schema's maxItems).

import { h } from "./dom.js";

export function loraWidget(api, field, limit) {
  const scale = field.items?.properties?.scale || {};
  const rows = h("ol", { class: "lora-rows", "aria-label": "LoRAs" });
  const add = h("button", { type: "button", class: "small", id: "add-lora" }, "Add a LoRA");
  const note = h("span", { class: "hint", id: "lora-limit" });
  /** @type {{path: HTMLInputElement, scale: HTMLInputElement, state: HTMLElement, upload?: Promise<void>, failed?: string}[]} */
  let entries = [];

  function refresh() {
    add.disabled = entries.length >= limit;
    note.textContent = limit ? `${entries.length} of ${limit} here` : "This deployment takes no LoRAs.";
    entries.forEach((entry, i) => {
      entry.path.setAttribute("aria-label", `LoRA ${i + 1}: URL of a .safetensors file`);
      entry.scale.setAttribute("aria-label", `LoRA ${i + 1}: scale`);
    });
  }

  function addRow(value = { path: "", scale: scale.default ?? 1 }) {
    if (entries.length >= limit) return;
    const path = h("input", { type: "url", class: "lora-path", placeholder: "https://…/style.safetensors", value: value.path });
    const weight = h("input", {
      type: "number",
      class: "lora-scale",
      min: scale.minimum ?? -4,
      max: scale.maximum ?? 4,
      step: "0.05",
      value: String(value.scale ?? 1),
    });
    const file = h("input", { type: "file", accept: ".safetensors", class: "visually-hidden" });
    const pick = h("label", { class: "button small" }, "Upload", file);
    const state = h("em", { class: "hint" });
    const remove = h("button", { type: "button", class: "small", "aria-label": "Remove this LoRA" }, "×");
    const entry = { path, scale: weight, state };
    file.setAttribute("aria-label", "Upload a .safetensors LoRA");
    file.addEventListener("change", () => {
      const chosen = file.files?.[0];
      if (!chosen) return;
      const body = new FormData();
      body.append("file", chosen, chosen.name);
      state.textContent = `uploading ${chosen.name}…`;
      entry.failed = undefined;
      entry.upload = api
        .post("/v1/files", { form: body })
        .then((uploaded) => {
          path.value = uploaded.url;
          state.textContent = `${chosen.name} uploaded`;
          path.dispatchEvent(new Event("input", { bubbles: true }));
        })
        .catch((error) => {
          entry.failed = `${chosen.name}: ${error.message}`;
          state.textContent = `failed: ${error.message}`;
        });
      file.value = "";
    });
    const row = h("li", { class: "lora-row" }, path, weight, pick, remove, state);
    remove.addEventListener("click", () => {
      entries = entries.filter((other) => other !== entry);
      row.remove();
      refresh();
      rows.dispatchEvent(new Event("input", { bubbles: true }));
    });
    entries.push(entry);
    rows.append(row);
    refresh();
  }

  add.addEventListener("click", () => {
    addRow();
    entries.at(-1)?.path.focus();
  });

  return {
    element: h("div", { class: "lora-widget" }, rows, h("p", { class: "inline" }, add, note)),
    /** [{path, scale}] of the filled rows, after any upload in flight; a failed upload throws its message. */
    async value() {
      await Promise.allSettled(entries.map((entry) => entry.upload));
      const failed = entries.find((entry) => entry.failed);
      if (failed) throw new Error(`${failed.failed} (remove it to go on)`);
      return entries.filter((e) => e.path.value.trim()).map((e) => ({ path: e.path.value.trim(), scale: Number(e.scale.value) }));
    },
    /** The rows now, without waiting (the API tab's view of the form). */
    now: () => entries.filter((e) => e.path.value.trim()).map((e) => ({ path: e.path.value.trim(), scale: Number(e.scale.value) })),
    fill(loras) {
      entries = [];
      rows.replaceChildren();
      for (const lora of loras || []) addRow(lora);
      refresh();
    },
    invalidInput: () => entries.find((e) => !e.scale.checkValidity())?.scale || null,
  };
}
