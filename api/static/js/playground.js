// The playground (GET /): the key, the views (#generate, #history, #keys, #usage, and #/p/<id>: one prediction
// followed in the generate view) and their wiring. A view's data is read again each time it is shown.

import { setupKeys, setupUsage } from "./account.js";
import { client, keyStore } from "./api.js";
import { byId } from "./dom.js";
import { setupGenerate } from "./generate.js";
import { setupHistory } from "./history.js";
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

  function showKeyState() {
    keyState.textContent = store.get() ? "key set for this tab" : "no key yet";
  }

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

  function useKey(key) {
    store.set(key.trim());
    keyInput.value = store.get();
    showKeyState();
    route();
  }

  keyInput.value = store.get();
  byId("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    useKey(keyInput.value);
  });
  keyInput.addEventListener("change", () => useKey(keyInput.value));
  byId("forget-key").addEventListener("click", () => {
    store.set("");
    keyInput.value = "";
    showKeyState();
  });
  window.addEventListener("hashchange", route);
  showKeyState();
  route();
}

start();
