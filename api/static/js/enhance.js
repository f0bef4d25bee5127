// The prompt enhancer in the playground (docs/enhancer.md): an "Enhance" button under the prompt asks
// POST /v1/prompts/enhance (Try-Sync), shows the rewrite in an editable box, and "Use it" puts it in the prompt
// before generating; "Dismiss" keeps the prompt as it was. Self-contained: it adds its own elements next to the
// prompt field (#in-prompt in the form built from the model's schema, attached again whenever the form is
// rebuilt) and reads the key the page keeps (api.js). Hidden when the deployment has the enhancer off, as the
// models' catalogue says (models.js: the form is built from it, so it is loaded whenever the prompt field exists).

import { client, keyStore } from "./api.js";
import { h } from "./dom.js";
import { models } from "./models.js";

const POLL_MS = 500;

async function finished(api, job) {
  while (job.status === "starting" || job.status === "processing") {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    job = await api.get(new URL(job.get_url).pathname);
  }
  return job;
}

function promptBox() {
  return document.getElementById("in-prompt");
}

function setup() {
  const api = client("apikey", keyStore("klein.apiKey"));

  const button = h("button", { type: "button", id: "enhance-button", class: "small" }, "Enhance");
  const state = h("span", { id: "enhance-state", class: "hint", role: "status", "aria-live": "polite" });
  const rewrite = h("textarea", { id: "enhanced-prompt", rows: "4", maxlength: "4096", "aria-label": "Rewrite" });
  const use = h("button", { type: "button", id: "enhance-use", class: "small primary" }, "Use it");
  const dismiss = h("button", { type: "button", id: "enhance-dismiss", class: "small" }, "Dismiss");
  const note = h("p", { class: "hint", id: "enhance-note" });
  const panel = h(
    "div",
    { id: "enhance-panel", class: "field", hidden: true },
    h("label", { for: "enhanced-prompt" }, "Enhanced prompt: edit it, then use it or dismiss it"),
    rewrite,
    h("div", { class: "inline" }, use, dismiss),
    note,
  );
  const row = h("div", { class: "inline", id: "enhance-row" }, button, state);
  function showStatus() {
    const status = models()[0]?.prompt_enhancer; // the deployment's: every model carries the same
    button.hidden = status?.enabled === false;
    if (button.hidden) state.textContent = "Prompt enhancement is off on this deployment.";
    note.textContent = !button.hidden && status?.warning ? `Note: ${status.warning}.` : "";
  }
  function attach() {
    const prompt = promptBox();
    if (!prompt || row.isConnected) return;
    (prompt.closest(".field") || prompt).after(row, panel);
    showStatus();
  }
  new MutationObserver(attach).observe(document.body, { childList: true, subtree: true });
  attach();

  button.addEventListener("click", async () => {
    const text = (promptBox()?.value || "").trim();
    if (!text) {
      state.textContent = "Write a prompt first.";
      return;
    }
    button.disabled = true;
    state.textContent = "Enhancing…";
    try {
      const job = await finished(
        api,
        await api.post("/v1/prompts/enhance", { json: { prompt: text }, headers: { "Try-Sync": "true" } }),
      );
      if (job.status !== "succeeded") throw new Error(job.error || `the rewrite ${job.status}`);
      rewrite.value = job.prompt;
      panel.hidden = false;
      state.textContent = `Rewritten by ${job.model} in ${job.timings.enhance_ms ?? "?"} ms.`;
      rewrite.focus();
    } catch (error) {
      state.textContent = `Could not enhance: ${error.message}`;
    } finally {
      button.disabled = false;
    }
  });
  use.addEventListener("click", () => {
    const prompt = promptBox();
    prompt.value = rewrite.value;
    prompt.dispatchEvent(new Event("input", { bubbles: true })); // the page's character count follows
    panel.hidden = true;
    state.textContent = "The enhanced prompt is in the prompt box.";
    prompt.focus();
  });
  dismiss.addEventListener("click", () => {
    panel.hidden = true;
    state.textContent = "";
  });
}

setup();
