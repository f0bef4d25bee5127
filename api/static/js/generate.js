// The generation form: references uploaded through POST /v1/files, submit, live progress from the event
// stream, the image with its timings, and the request as code. Each prediction run here gets its own link,
// #/p/<id>: opening it (or reloading the page) follows that prediction again.

import { byId, clear, h, say, show, timingItems } from "./dom.js";
import { MODEL, openaiBody, prunaInput, renderSnippets, requestFromInput } from "./snippets.js";
import { setupReferences } from "./references.js";
import { follow, queuedLabel, readableError } from "./watch.js";


export function setupGenerate(api) {
  const form = byId("generate-form");
  const prompt = byId("prompt");
  const sizeMode = byId("size-mode");
  const ratio = byId("aspect-ratio");
  const width = byId("width");
  const height = byId("height");
  const seed = byId("seed");
  const seedLock = byId("seed-lock");
  const steps = byId("steps");
  const guidance = byId("guidance");
  const format = byId("format");
  const fileInput = byId("references");
  const submit = byId("generate-button");
  const cancel = byId("cancel-button");
  const stop = byId("stop-button");
  const runLinkBox = byId("run-link-box");
  const runLink = byId("run-link");
  const promptCount = byId("prompt-count");
  const loraField = byId("lora-field");
  const loraList = byId("lora-list");
  const formMessage = byId("form-message");
  const progressBox = byId("progress-box");
  const progress = byId("progress");
  const progressLabel = byId("progress-label");
  const resultEmpty = byId("result-empty");
  const result = byId("result");
  const image = byId("result-image");
  const resultPrompt = byId("result-prompt");
  const resultTimings = byId("result-timings");
  const download = byId("download-link");
  const resultError = byId("result-error");
  const resultCode = byId("result-code");

  const refs = setupReferences(api, { fileInput, formMessage });
  /** LoRAs of a prediction loaded from History, sent again as they were: [{path, scale}] */
  let loras = [];
  let running = null; // {controller, id}
  let lastSeed = null;

  // --- size mode: aspect ratios on the predictions API, exact sizes on the OpenAI-style endpoint ---------
  function applySizeMode() {
    const exact = sizeMode.value === "exact";
    show(byId("ratio-field"), !exact);
    show(byId("exact-fields"), exact);
    show(byId("exact-hint"), exact);
    steps.max = exact ? "12" : "50";
    guidance.max = exact ? "8" : "20";
  }
  sizeMode.addEventListener("change", applySizeMode);

  // --- keyboard: Enter (or Ctrl/Cmd+Enter) submits from the prompt; Shift+Enter is a new line ------------
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  function countPrompt() {
    promptCount.textContent = `${prompt.value.length.toLocaleString("en")} / 4,096 characters`;
  }
  prompt.addEventListener("input", countPrompt);

  seedLock.addEventListener("change", () => {
    if (seedLock.checked && seed.value === "" && lastSeed !== null) seed.value = String(lastSeed);
  });
  byId("reuse-seed").addEventListener("click", () => {
    if (lastSeed === null) return;
    seed.value = String(lastSeed);
    seedLock.checked = true;
    seed.focus();
  });

  // --- LoRAs of a prediction loaded from History ------------------------------------------------------
  function renderLoras() {
    clear(loraList);
    show(loraField, loras.length > 0);
    loras.forEach((lora, index) => {
      const name = lora.path.split("/").pop() || lora.path;
      const remove = h("button", { type: "button", class: "small", "aria-label": `Remove LoRA ${name}` }, "×");
      remove.addEventListener("click", () => {
        loras.splice(index, 1);
        renderLoras();
      });
      loraList.append(h("li", {}, h("span", { text: `${name} × ${lora.scale ?? 1}`, title: lora.path }), remove));
    });
  }

  // --- reading and filling the form -------------------------------------------------------------------
  function invalid(input, text) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
    say(formMessage, text, "error");
    return null;
  }

  function labelOf(input) {
    return document.querySelector(`label[for="${input.id}"]`)?.textContent.trim() || input.id;
  }

  async function readForm() {
    for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
    say(formMessage, "");
    if (!prompt.value.trim()) return invalid(prompt, "Write a prompt first.");
    const exact = sizeMode.value === "exact";
    const checked = exact ? [width, height, seed, steps, guidance] : [seed, steps, guidance];
    for (const input of checked) {
      if (!input.checkValidity()) return invalid(input, `${labelOf(input)}: ${input.validationMessage}`);
    }
    if (exact && Number(width.value) * Number(height.value) > 1_048_576) {
      return invalid(width, "Width × height must be at most 1,048,576 pixels.");
    }
    if (seedLock.checked && seed.value === "") return invalid(seed, "Seed: enter the seed to lock.");
    if (exact && loras.length) {
      return invalid(sizeMode, "Exact sizes go through the OpenAI-style endpoint, which takes no LoRAs: choose an aspect ratio or remove the LoRAs.");
    }
    const references = refs.list;
    if (references.some((ref) => ref.status === "uploading")) {
      say(formMessage, "Waiting for the reference uploads…");
      await Promise.allSettled(references.map((ref) => ref.upload));
      say(formMessage, "");
    }
    const failed = references.find((ref) => ref.status === "error");
    if (failed) return invalid(fileInput, `${failed.name}: ${failed.message} (remove it to go on)`);
    const first = references[0];
    return {
      prompt: prompt.value,
      aspectRatio: exact ? null : ratio.value,
      width: exact ? Number(width.value) : null,
      height: exact ? Number(height.value) : null,
      seed: seedLock.checked ? Number(seed.value) : -1,
      steps: Number(steps.value),
      guidance: Number(guidance.value),
      format: format.value,
      images: references.map((ref) => ref.url),
      referenceSize: first?.width ? [first.width, first.height] : null,
      loras: loras.map((lora) => ({ ...lora })),
    };
  }

  /** Put a request (from history) into the form, its seed locked. */
  function fillForm(request) {
    prompt.value = request.prompt;
    const exact = Boolean(request.width && request.height);
    sizeMode.value = exact ? "exact" : "ratio";
    if (exact) {
      width.value = String(request.width);
      height.value = String(request.height);
    } else {
      ratio.value = request.aspectRatio || "1:1";
    }
    applySizeMode();
    if (request.seed >= 0) {
      seed.value = String(request.seed);
      seedLock.checked = true;
    }
    steps.value = String(request.steps);
    guidance.value = String(request.guidance);
    format.value = request.format;
    refs.replace(request.images);
    loras = (request.loras || []).map((lora) => ({ ...lora }));
    renderLoras();
    countPrompt();
  }

  // --- running ----------------------------------------------------------------------------------------
  function setProgress(percent, label) {
    show(progressBox);
    if (percent === null) progress.removeAttribute("value");
    else progress.value = Math.max(0, Math.min(100, percent));
    progressLabel.textContent = label;
  }

  function onStatus(data) {
    if (data.status === "starting") setProgress(null, queuedLabel(data));
    else if (data.status === "processing") setProgress(0, "Processing…");
  }

  const onProgress = (data) => setProgress(data.percent, `Step ${data.step} of ${data.total}`);

  function showLink(id) {
    const link = `#/p/${encodeURIComponent(id)}`;
    runLink.href = link;
    runLink.textContent = `${location.origin}${location.pathname}${link}`;
    show(runLinkBox);
    if (location.hash !== link) history.replaceState(null, "", link); // a reload comes back to this run
  }

  async function runPrediction(request, signal) {
    const created = await api.post("/v1/predictions", {
      json: { input: prunaInput(request) },
      headers: { Model: MODEL },
      signal,
    });
    running.id = created.id;
    showLink(created.id);
    setProgress(null, "Queued…");
    return follow(api, created.id, { onStatus, onProgress }, signal);
  }

  async function runExact(request, signal) {
    setProgress(null, "Generating (the exact-size endpoint answers when the image is ready)…");
    show(runLinkBox, false); // an answer, not a prediction to follow: the page's link is no earlier run's
    if (location.hash.startsWith("#/p/")) history.replaceState(null, "", "#generate");
    const answer = await api.post("/v1/images/generations", { json: openaiBody(request), signal });
    running.id = answer.id;
    return {
      id: answer.id,
      status: "succeeded",
      seed: answer.seed,
      timings: answer.timings,
      urls: answer.data.map((item) => item.url),
      error: null,
    };
  }

  function showOutcome(request, outcome) {
    lastSeed = outcome.seed ?? null;
    if (!seedLock.checked && lastSeed !== null) seed.value = String(lastSeed);
    const withSeed = { ...request, seed: lastSeed ?? request.seed };
    renderSnippets(resultCode, withSeed);
    show(resultCode);
    if (outcome.status !== "succeeded" || !outcome.urls.length) {
      show(progressBox, false);
      say(resultError, `The prediction ${outcome.status}: ${outcome.error || "no image"}`, "error");
      return;
    }
    const total = outcome.timings?.total_ms;
    setProgress(100, typeof total === "number" ? `Done in ${(total / 1000).toFixed(2)} s` : "Done");
    const url = outcome.urls[0];
    result.dataset.predictionId = outcome.id;
    result.dataset.seed = String(lastSeed);
    image.alt = `Generated: ${request.prompt}`; // an attribute holds text, never markup
    image.src = url;
    resultPrompt.textContent = request.prompt;
    const size = h("li", {}, "size ", h("strong", { text: "…" }));
    image.addEventListener("load", () => (size.lastChild.textContent = `${image.naturalWidth}×${image.naturalHeight}`), {
      once: true,
    });
    resultTimings.replaceChildren(h("li", {}, "seed ", h("strong", { text: String(lastSeed) })), size, ...timingItems(outcome.timings));
    download.href = url;
    download.download = `klein-${outcome.id}.${request.format}`;
    show(resultEmpty, false);
    show(result);
  }

  /** Run `work(signal)` (a prediction to follow) as the page's current run, then show what it gave. */
  async function watch(id, request, work) {
    running?.controller.abort();
    const controller = new AbortController();
    const current = { controller, id };
    running = current;
    submit.disabled = true;
    show(cancel);
    show(stop);
    say(resultError, "");
    say(formMessage, "");
    try {
      const outcome = await work(controller.signal);
      if (running === current) showOutcome(outcome.request || request, outcome);
    } catch (error) {
      if (controller.signal.aborted) return;
      show(progressBox, false);
      if (error?.status === 422 && Array.isArray(error.body?.detail)) say(formMessage, readableError(error), "error");
      else say(resultError, readableError(error), "error");
    } finally {
      if (running === current) {
        running = null;
        submit.disabled = false;
        show(cancel, false);
        show(stop, false);
      }
    }
  }

  function run(request) {
    setProgress(null, "Submitting…");
    const exact = Boolean(request.width && request.height);
    return watch(null, request, (signal) => (exact ? runExact(request, signal) : runPrediction(request, signal)));
  }

  /** Follow prediction `id` again (its link was opened, or the page reloaded on it). */
  function resume(id) {
    if (running?.id === id) return;
    setProgress(null, "Reading the prediction…");
    showLink(id);
    return watch(id, null, async (signal) => {
      const row = await api.get(`/v1/predictions/status/${encodeURIComponent(id)}`, { signal });
      const request = requestFromInput(row.input || {}, row.seed);
      fillForm(request);
      const outcome = await follow(api, id, { onStatus, onProgress }, signal);
      return { ...outcome, request };
    });
  }

  function release() {
    const current = running;
    if (!current) return null;
    current.controller.abort();
    running = null;
    submit.disabled = false;
    show(cancel, false);
    show(stop, false);
    return current;
  }

  // Stop watching: the page lets go; the prediction goes on (History and its link show it).
  stop.addEventListener("click", () => {
    if (!release()) return;
    setProgress(0, "Stopped watching: the prediction goes on; see it in History or at its link.");
  });

  // Cancel: the server stops the prediction.
  cancel.addEventListener("click", async () => {
    const current = release();
    if (!current) return;
    setProgress(0, "Canceling…");
    if (!current.id) return setProgress(0, "Stopped before the server answered.");
    try {
      await api.post(`/v1/predictions/${encodeURIComponent(current.id)}/cancel`);
      setProgress(0, "Canceled: the server stopped this prediction.");
    } catch (error) {
      setProgress(0, "Not canceled.");
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

  applySizeMode();
  countPrompt();
  return { run, fillForm, resume };
}
