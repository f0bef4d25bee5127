// The run in progress: its stage (queued, no worker, step n of N, decoding and uploading, done), a progress bar,
// the time since it was submitted, and its log as the event stream's `log` events bring it.

import { byId, h, show } from "./dom.js";
import { queuedLabel } from "./watch.js";

export function setupRunPanel() {
  const box = byId("progress-box");
  const bar = byId("progress");
  const label = byId("progress-label");
  const elapsed = byId("elapsed");
  const log = byId("run-log");
  const logBox = byId("run-log-box");
  let started = 0;
  let timer = null;

  function tick() {
    elapsed.textContent = `${((performance.now() - started) / 1000).toFixed(1)} s`;
  }

  function stopTimer() {
    if (timer !== null) clearInterval(timer);
    timer = null;
    if (started) tick();
  }

  function set(percent, text, stage = "") {
    show(box);
    if (percent === null) bar.removeAttribute("value");
    else bar.value = Math.max(0, Math.min(100, percent));
    label.textContent = text;
    box.dataset.stage = stage;
  }

  return {
    /** A new run: the timer from now (or from `since`, a resumed prediction's created_at), the log emptied. */
    start(text, since = null) {
      stopTimer();
      started = since ? performance.now() - Math.max(0, Date.now() - Date.parse(since)) : performance.now();
      timer = setInterval(tick, 200);
      tick();
      log.replaceChildren();
      show(logBox, false);
      set(null, text, "submitting");
    },
    set,
    status(data) {
      if (data.status === "starting") set(null, queuedLabel(data), data.live_workers === 0 ? "no-worker" : "queued");
      else if (data.status === "processing") set(0, "Processing…", "processing");
    },
    progress(data) {
      if (data.step >= data.total) set(100, `Step ${data.step} of ${data.total}: decoding and uploading…`, "decoding");
      else set(data.percent, `Step ${data.step} of ${data.total}`, "steps");
    },
    log(data) {
      const at = data.at ? new Date(data.at).toLocaleTimeString() : "";
      log.append(h("li", {}, h("time", { text: at }), " ", data.message ?? JSON.stringify(data)));
      show(logBox);
      log.scrollTop = log.scrollHeight;
    },
    finish(percent, text, stage = "done") {
      stopTimer();
      set(percent, text, stage);
    },
    hide() {
      stopTimer();
      show(box, false);
    },
  };
}
