// The generate view: the model picker and its form (js/schema-form.js), the price, the API tab for the form as
// it is, and runs: submit, follow (js/watch.js) with the run panel, results into the gallery. Each prediction
// run here gets its own link, #/p/<id>: opening it (or reloading the page) follows that prediction again.

import { byId, h, money, say, show } from "./dom.js";
import { setupGallery } from "./gallery.js";
import { loadModels, modelById, models } from "./models.js";
import { setupReferences } from "./references.js";
import { openaiBody, pixelSize, requestFromInput } from "./request.js";
import { setupRunPanel } from "./runpanel.js";
import { setupSchemaForm } from "./schema-form.js";
import { renderSnippets } from "./snippets.js";
import { follow, readableError } from "./watch.js";

export function setupGenerate(api) {
  const form = byId("generate-form");
  const picker = byId("model");
  const submit = byId("generate-button");
  const cancel = byId("cancel-button");
  const stop = byId("stop-button");
  const runLinkBox = byId("run-link-box");
  const runLink = byId("run-link");
  const formMessage = byId("form-message");
  const resultError = byId("result-error");
  const apiCode = byId("api-code");
  const price = byId("price");
  const promptCount = byId("prompt-count");
  const fileInput = byId("references");

  const refs = setupReferences(api, { fileInput, formMessage, onChange: () => changed() });
  const fields = setupSchemaForm(api, { container: byId("fields"), refs, onChange: () => changed() });
  const panel = setupRunPanel();
  const gallery = setupGallery(byId("gallery"), byId("result-empty"), { lockSeed });
  let running = null; // {controller, id}
  let account = null; // GET /v1/account: the price per image
  let pending = 0;

  const model = () => modelById(picker.value) || models()[0];
  const prompt = () => document.getElementById("in-prompt");

  function lockSeed(seed) {
    const input = document.getElementById("in-seed");
    if (!input || seed === null) return;
    input.value = String(seed);
    byId("seed-lock").checked = true;
    input.focus();
    changed();
  }

  // --- the form as it is: prompt counter, price, the API tab ----------------------------------------------
  function current() {
    const first = refs.list[0];
    return {
      model: model().id,
      input: fields.snapshot(),
      exact: fields.exact(),
      referenceSize: first?.width ? [first.width, first.height] : null,
    };
  }

  function changed() {
    const box = prompt();
    if (box) {
      const limit = Number(box.getAttribute("maxlength")) || 0;
      promptCount.textContent = `${box.value.length.toLocaleString("en")} / ${limit.toLocaleString("en")} characters`;
    }
    showPrice();
    clearTimeout(pending);
    pending = setTimeout(() => renderSnippets(apiCode, current(), { model: model() }), 120);
  }

  function showPrice() {
    if (!account) return say(price, "");
    const count = Number(document.getElementById("in-num_outputs")?.value) || 1;
    const each = money(account.price_per_image, account.currency);
    const total = count > 1 ? ` × ${count} = ${money(account.price_per_image * count, account.currency)}` : "";
    say(price, `Price: ${each} per image${total}`);
  }

  form.addEventListener("input", changed);
  form.addEventListener("change", changed);
  byId("seed-lock").addEventListener("change", () => {
    const seed = document.getElementById("in-seed");
    if (byId("seed-lock").checked && seed?.value === "" && seed.dataset.last) seed.value = seed.dataset.last;
  });
  for (const example of document.querySelectorAll("#examples button[data-prompt]")) {
    example.addEventListener("click", () => {
      prompt().value = example.dataset.prompt;
      prompt().focus();
      changed();
    });
  }
  // Enter (or Ctrl/Cmd+Enter) submits from the prompt; Shift+Enter is a new line.
  form.addEventListener("keydown", (event) => {
    if (event.target.id === "in-prompt" && event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  // --- models ---------------------------------------------------------------------------------------------
  function showModel() {
    const chosen = model();
    byId("model-notes").textContent = [chosen.description, chosen.notes].filter(Boolean).join(" ");
    fields.render(chosen);
  }
  picker.addEventListener("change", showModel);

  async function loadCatalogue(withKey = api.hasKey()) {
    const list = await loadModels(api, withKey);
    const keep = picker.value;
    picker.replaceChildren(...list.map((m) => h("option", { value: m.id }, m.id)));
    if (keep && modelById(keep)) picker.value = keep;
    if (!fields.controls.length || keep !== picker.value) showModel();
    return list;
  }

  // --- reading the form -------------------------------------------------------------------------------------
  function invalid(input, text) {
    input?.setAttribute("aria-invalid", "true");
    input?.focus();
    say(formMessage, text, "error");
    return null;
  }

  async function readForm() {
    for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
    say(formMessage, "");
    if (!prompt()?.value.trim()) return invalid(prompt(), "Write a prompt first.");
    const request = current();
    const checked = [...form.querySelectorAll("#fields input, #fields select, #fields textarea")];
    if (request.exact) checked.push(byId("width"), byId("height"));
    for (const input of checked) {
      if (input.closest("[hidden]") || input.checkValidity()) continue;
      const label = document.querySelector(`label[for="${input.id}"]`)?.textContent.trim() || input.getAttribute("aria-label") || input.id;
      return invalid(input, `${label}: ${input.validationMessage}`);
    }
    if (request.exact && request.exact.width * request.exact.height > 1_048_576) {
      return invalid(byId("width"), "Width × height must be at most 1,048,576 pixels.");
    }
    if (byId("seed-lock").checked && document.getElementById("in-seed")?.value === "") {
      return invalid(document.getElementById("in-seed"), "Seed: enter the seed to lock.");
    }
    if (refs.list.some((ref) => ref.status === "uploading")) {
      say(formMessage, "Waiting for the uploads…");
      await Promise.allSettled(refs.list.map((ref) => ref.upload));
      say(formMessage, "");
    }
    const failed = refs.list.find((ref) => ref.status === "error");
    if (failed) return invalid(fileInput, `${failed.name}: ${failed.message} (remove it to go on)`);
    try {
      const loras = fields.loras ? await fields.loras.value() : [];
      if (loras.length) request.input.loras = loras;
      else delete request.input.loras;
    } catch (error) {
      return invalid(null, error.message);
    }
    if (request.exact && request.input.loras?.length) {
      return invalid(byId("size-mode"), "Exact sizes go through the OpenAI-style endpoint, which takes no LoRAs: choose an aspect ratio or remove the LoRAs.");
    }
    return { ...request, input: { ...request.input, images: refs.list.map((ref) => ref.url).filter(Boolean) } };
  }

  // --- running --------------------------------------------------------------------------------------------
  const handlers = { onStatus: panel.status, onProgress: panel.progress, onLog: panel.log };

  function showLink(id) {
    const link = `#/p/${encodeURIComponent(id)}`;
    runLink.href = link;
    runLink.textContent = `${location.origin}${location.pathname}${link}`;
    show(runLinkBox);
    if (location.hash !== link) history.replaceState(null, "", link); // a reload comes back to this run
  }

  async function runPrediction(request, signal) {
    const input = { ...request.input };
    if (!input.images?.length) delete input.images;
    const created = await api.post("/v1/predictions", { json: { input }, headers: { Model: request.model }, signal });
    running.id = created.id;
    showLink(created.id);
    panel.set(null, "Queued…", "queued");
    return follow(api, created.id, handlers, signal);
  }

  async function runExact(request, signal) {
    panel.set(null, "Generating (the exact-size endpoint answers when the images are ready)…", "processing");
    show(runLinkBox, false); // an answer, not a prediction to follow: the page's link is no earlier run's
    if (location.hash.startsWith("#/p/")) history.replaceState(null, "", "#generate");
    const answer = await api.post("/v1/images/generations", { json: openaiBody(request), signal });
    running.id = answer.id;
    return { id: answer.id, status: "succeeded", seed: answer.seed, timings: answer.timings, urls: answer.data.map((d) => d.url) };
  }

  function showOutcome(request, outcome) {
    const seed = document.getElementById("in-seed");
    if (seed && typeof outcome.seed === "number") {
      seed.dataset.last = String(outcome.seed);
      if (!byId("seed-lock").checked) seed.value = String(outcome.seed);
    }
    if (outcome.status !== "succeeded" || !outcome.urls.length) {
      panel.finish(0, `The prediction ${outcome.status}.`, outcome.status);
      say(resultError, `The prediction ${outcome.status}: ${outcome.error || "no image"}`, "error");
      return;
    }
    const total = outcome.timings?.total_ms;
    panel.finish(100, typeof total === "number" ? `Done in ${(total / 1000).toFixed(2)} s` : "Done");
    const [width, height] = pixelSize(request);
    gallery.add(request, outcome).dataset.size = `${width}x${height}`;
  }

  /** Run `work(signal)` (a prediction to follow) as the page's current run, then show what it gave. */
  async function watch(request, work) {
    running?.controller.abort();
    const controller = new AbortController();
    const mine = { controller, id: null };
    running = mine;
    submit.disabled = true;
    show(cancel);
    show(stop);
    say(resultError, "");
    say(formMessage, "");
    try {
      const outcome = await work(controller.signal);
      if (running === mine) showOutcome(outcome.request || request, outcome);
    } catch (error) {
      if (controller.signal.aborted) return;
      panel.finish(0, "Not run.", "error");
      if (error?.status === 422 && Array.isArray(error.body?.detail)) say(formMessage, readableError(error), "error");
      else say(resultError, readableError(error), "error");
    } finally {
      if (running === mine) release();
    }
  }

  function run(request) {
    panel.start("Submitting…");
    return watch(request, (signal) => (request.exact ? runExact(request, signal) : runPrediction(request, signal)));
  }

  /** Follow prediction `id` again (its link was opened, or the page reloaded on it). */
  function resume(id) {
    if (running?.id === id) return;
    panel.start("Reading the prediction…");
    showLink(id);
    return watch(null, async (signal) => {
      running.id = id;
      const row = await api.get(`/v1/predictions/status/${encodeURIComponent(id)}`, { signal });
      if (!models().length) await loadCatalogue();
      if (modelById(row.model) && picker.value !== row.model) {
        picker.value = row.model;
        showModel();
      }
      const fieldNames = Object.keys(model().input_schema.properties || {});
      const request = requestFromInput(row.model, row.input || {}, row.seed, fieldNames);
      fillForm(request);
      if (!["succeeded", "failed", "canceled"].includes(row.status)) panel.start("Following the prediction…", row.created_at);
      for (const line of row.logs || []) panel.log(line);
      const outcome = await follow(api, id, handlers, signal);
      return { ...outcome, request };
    });
  }

  /** Put a request (from History, or a link) into the form. */
  function fillForm(request) {
    if (modelById(request.model) && picker.value !== request.model) {
      picker.value = request.model;
      showModel();
    }
    fields.fill(request.input);
    fields.setExact(request.exact);
    changed();
  }

  function release() {
    const mine = running;
    running = null;
    submit.disabled = false;
    show(cancel, false);
    show(stop, false);
    return mine;
  }

  // Stop watching: the page lets go; the prediction goes on (History and its link show it).
  stop.addEventListener("click", () => {
    const mine = release();
    if (!mine) return;
    mine.controller.abort();
    panel.finish(0, "Stopped watching: the prediction goes on; see it in History or at its link.", "stopped");
  });

  // Cancel: the server stops the prediction.
  cancel.addEventListener("click", async () => {
    const mine = release();
    if (!mine) return;
    mine.controller.abort();
    panel.set(0, "Canceling…", "canceling");
    if (!mine.id) return panel.finish(0, "Stopped before the server answered.", "canceled");
    try {
      await api.post(`/v1/predictions/${encodeURIComponent(mine.id)}/cancel`);
      panel.finish(0, "Canceled: the server stopped this prediction.", "canceled");
    } catch (error) {
      panel.finish(0, "Not canceled.", "error");
      say(resultError, readableError(error), "error");
    }
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (running) return;
    if (!api.hasKey()) {
      say(formMessage, "Enter your API key at the top of the page first.", "error");
      byId("api-key").focus();
      return;
    }
    const request = await readForm();
    if (request) await run(request);
  });

  return {
    run: (request) => (fillForm(request), run({ ...current(), ...request })),
    fillForm,
    resume,
    loadCatalogue,
    setAccount(value) {
      account = value;
      showPrice();
    },
  };
}
