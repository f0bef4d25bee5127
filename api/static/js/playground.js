// The playground (GET /): the key (checked at once against GET /v1/account), the views (#generate, #history,
// #keys, #usage, and #/p/<id>: one prediction followed in the generate view) and their wiring. A view's data is
// read again each time it is shown.

import { setupKeys, setupUsage } from "./account.js";
import { client, keyStore } from "./api.js";
import { byId, money, say, show } from "./dom.js";
import { setupGenerate } from "./generate.js";
import { setupHistory } from "./history.js";
import { models } from "./models.js";
import "./enhance.js"; // the prompt enhancer's button (self-contained)

const VIEWS = ["generate", "history", "keys", "usage"];

function start() {
  const store = keyStore("klein.apiKey");
  const api = client("apikey", store);
  const keyInput = byId("api-key");
  const keyState = byId("key-state");

  const history = setupHistory(api, {
    rerun: (request) => generate.run(request),
    load: (request) => generate.fillForm(request),
  });
  const generate = setupGenerate(api);
  const keys = setupKeys(api, { currentKey: () => store.get(), useKey: (key) => useKey(key) });
  const usage = setupUsage(api);
  const loaders = { history: () => history.refresh(), keys: keys.refresh, usage: usage.refresh };

  function currentView() {
    const name = location.hash.slice(1);
    return VIEWS.includes(name) ? name : "generate";
  }

  /** The prediction a #/p/<id> link names, or null. */
  function linkedPrediction() {
    const match = /^#\/p\/([^/]+)$/.exec(location.hash);
    return match ? decodeURIComponent(match[1]) : null;
  }

  function route() {
    const view = currentView();
    const linked = linkedPrediction();
    if (linked && store.get()) generate.resume(linked);
    for (const section of document.querySelectorAll("main > section[data-view]")) {
      section.hidden = section.dataset.view !== view;
    }
    for (const link of document.querySelectorAll(".tabs a[data-view]")) {
      if (link.dataset.view === view) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    if (store.get() && loaders[view]) loaders[view]();
  }

  /** The served models (the form), and with a key: whether they are random weights (the banner). */
  async function catalogue(withKey) {
    try {
      await generate.loadCatalogue(withKey);
      const warning = models().map((model) => model.weights?.warning).find(Boolean);
      byId("weights-banner-text").textContent = warning ? `This server runs a ${warning}. Set --model to real weights for real pictures.` : "";
      show(byId("weights-banner"), Boolean(warning));
    } catch (error) {
      say(byId("form-message"), `The models could not be read: ${error.message}`, "error");
    }
  }

  /** Whether the key is valid, said next to it; the price per image from its account. */
  async function checkKey() {
    if (!store.get()) {
      say(keyState, "no key yet");
      generate.setAccount(null);
      return false;
    }
    say(keyState, "checking…");
    try {
      const account = await api.get("/v1/account");
      say(keyState, `valid: tenant ${account.name}, ${money(account.price_per_image, account.currency)} per image`, "ok");
      keyState.dataset.valid = "true";
      generate.setAccount(account);
      return true;
    } catch (error) {
      say(keyState, error.status === 401 ? `invalid key: ${error.message}` : error.message, "error");
      keyState.dataset.valid = "false";
      generate.setAccount(null);
      return false;
    }
  }

  async function useKey(key) {
    await started; // else the start's own route() could load the view a second time, after this one
    store.set(key.trim());
    keyInput.value = store.get();
    const valid = await checkKey();
    await catalogue(valid);
    if (valid) route();
  }

  keyInput.value = store.get();
  byId("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    useKey(keyInput.value);
  });
  byId("forget-key").addEventListener("click", () => {
    store.set("");
    keyInput.value = "";
    keyState.dataset.valid = "";
    checkKey();
  });
  window.addEventListener("hashchange", route);
  const started = (async () => {
    await catalogue(await checkKey());
    route();
  })();
}

start();
