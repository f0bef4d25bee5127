// The tenant's predictions, newest first (GET /v1/predictions, cursor pagination), and one in detail. Queued and
// running ones update as they go (their status read every POLL_MS while the view is shown), with Cancel; any
// one can be deleted (DELETE /v1/predictions/{id}: its images and references go, its usage stays).

import { byId, clear, h, say, show, timingItems, when } from "./dom.js";
import { modelById } from "./models.js";
import { requestFromInput } from "./request.js";
import { renderSnippets } from "./snippets.js";
import { queuedLabel } from "./watch.js";

const PAGE = 12;
const MAX_LIMIT = 100; // GET /v1/predictions' bound
const POLL_MS = 1500;
const LIVE = new Set(["starting", "processing"]);

export function setupHistory(api, { rerun, load }) {
  const view = byId("view-history");
  const form = byId("history-form");
  const status = byId("history-status");
  const list = byId("history-list");
  const message = byId("history-message");
  const more = byId("history-more");
  const detail = byId("detail");
  const detailEmpty = byId("detail-empty");
  const remove = byId("detail-delete");
  let cursor = null;
  let selected = null;
  let generation = 0; // a refresh makes pages still in flight from the one before stale
  let polling = null;

  /** Its first image, unless deleted (here, or by its retention): `expired_at` then, and the links answer 410. */
  const imageOf = (prediction) => (prediction.expired_at ? null : prediction.urls?.outputs?.[0]);

  function thumb(prediction) {
    if (prediction.expired_at) return h("span", { class: "thumb", text: "images deleted" });
    const url = imageOf(prediction);
    if (url) return h("span", { class: "thumb" }, h("img", { src: url, alt: "", loading: "lazy" }));
    return h("span", { class: "thumb", text: prediction.status });
  }

  /** What a live prediction is doing, in a few words. */
  function liveText(prediction) {
    if (prediction.status === "processing" && prediction.progress) return `processing ${prediction.progress.percent ?? 0} %`;
    if (prediction.status === "starting") return queuedLabel(prediction);
    return prediction.status;
  }

  function item(prediction) {
    const live = LIVE.has(prediction.status);
    const button = h(
      "button",
      { type: "button", class: "history-item", "aria-pressed": String(selected?.id === prediction.id), "data-id": prediction.id },
      thumb(prediction),
      h("span", { class: "history-prompt", text: prediction.input?.prompt ?? "" }),
      h("span", { class: `badge ${prediction.status}`, text: live ? liveText(prediction) : prediction.status }),
      h("span", { class: "hint", text: when(prediction.created_at) }),
    );
    button.addEventListener("click", () => {
      for (const other of list.querySelectorAll(".history-item")) other.setAttribute("aria-pressed", "false");
      button.setAttribute("aria-pressed", "true");
      select(prediction);
    });
    const row = h("li", { "data-id": prediction.id, "data-status": prediction.status }, button);
    if (live) {
      const stop = h("button", { type: "button", class: "small danger", "data-action": "cancel", "aria-label": `Cancel ${prediction.id}` }, "Cancel");
      stop.addEventListener("click", async () => {
        stop.disabled = true;
        try {
          update(await api.post(`/v1/predictions/${encodeURIComponent(prediction.id)}/cancel`));
        } catch (error) {
          say(message, error.message, "error");
          stop.disabled = false;
        }
      });
      row.append(stop);
    }
    return row;
  }

  /** A prediction's row (and its details, if shown) from a status view of it. */
  function update(fresh) {
    const old = list.querySelector(`li[data-id="${CSS.escape(fresh.id)}"]`);
    if (!old) return;
    // The status endpoint has no `urls`: keep the list's (a finished one is read again from the list below).
    const merged = { ...old.prediction, ...fresh, urls: old.prediction?.urls };
    const row = item(merged);
    row.prediction = merged;
    old.replaceWith(row);
    if (selected?.id === fresh.id) select(merged, false);
  }

  async function poll() {
    polling = null;
    if (view.hidden || !api.hasKey()) return;
    const live = [...list.querySelectorAll("li[data-id]")].filter((row) => LIVE.has(row.dataset.status));
    let finished = false;
    for (const row of live) {
      try {
        const fresh = await api.get(`/v1/predictions/status/${encodeURIComponent(row.dataset.id)}`);
        if (LIVE.has(fresh.status)) update(fresh);
        else finished = true;
      } catch {
        // read again on the next round
      }
    }
    if (finished) await page(true, true); // its images and final state, as the list shows them
    else if (live.length) polling = setTimeout(poll, POLL_MS);
  }

  function select(prediction, scroll = true) {
    selected = prediction;
    const input = prediction.input || {};
    const url = imageOf(prediction);
    const image = byId("detail-image");
    const download = byId("detail-download");
    show(image, Boolean(url));
    show(download, Boolean(url));
    if (url) {
      image.src = url;
      image.alt = `Generated: ${input.prompt ?? ""}`;
      download.href = url;
      download.download = `klein-${prediction.id}`;
    } else {
      image.removeAttribute("src");
    }
    byId("detail-prompt").textContent = input.prompt ?? "";
    const badge = byId("detail-status");
    badge.textContent = prediction.status;
    badge.className = `badge ${prediction.status}`;
    byId("detail-meta").textContent = `${prediction.id} · ${prediction.model ?? ""} · ${when(prediction.created_at)} · seed ${prediction.seed}`;
    byId("detail-error").textContent = prediction.error || (prediction.expired_at ? `Its images were deleted ${when(prediction.expired_at)}.` : "");
    byId("detail-timings").replaceChildren(...timingItems(prediction.timings));
    byId("detail-input").textContent = JSON.stringify(input, null, 2);
    detail.dataset.id = prediction.id;
    remove.dataset.confirm = "";
    remove.textContent = "Delete";
    const request = current();
    renderSnippets(byId("detail-code"), request, { model: modelById(request.model) || { id: request.model } });
    show(detailEmpty, false);
    show(detail);
    if (!scroll) return;
    // The details sit above (desktop, after "Load more") or below (one column) the clicked row: bring them to it.
    const box = detail.getBoundingClientRect();
    if (box.top < 0 || box.top > window.innerHeight - 80) detail.scrollIntoView({ block: "start" });
  }

  /** The first page (or, keeping the place, as many rows as are listed), or the next one. */
  async function page(first, keepPlace = false) {
    const mine = first ? ++generation : generation;
    clearTimeout(polling);
    const rows = keepPlace ? Math.min(MAX_LIMIT, Math.max(PAGE, list.children.length)) : PAGE;
    const params = new URLSearchParams({ limit: String(rows) });
    if (status.value) params.set("status", status.value);
    if (!first && cursor) params.set("cursor", cursor);
    say(message, "Loading…");
    try {
      const answer = await api.get(`/v1/predictions?${params}`);
      if (mine !== generation) return;
      if (first) clear(list);
      for (const prediction of answer.results || []) {
        const row = item(prediction);
        row.prediction = prediction;
        list.append(row);
      }
      cursor = answer.next || null;
      show(more, Boolean(cursor));
      const none = status.value ? `No ${status.value} predictions.` : "No predictions yet: generate one.";
      say(message, list.children.length ? "" : none);
      polling = setTimeout(poll, POLL_MS);
    } catch (error) {
      if (mine === generation) say(message, error.message, "error");
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    page(true);
  });
  status.addEventListener("change", () => page(true));
  more.addEventListener("click", () => page(false));

  function current() {
    const model = selected.model || "flux-klein-4b";
    const fields = Object.keys(modelById(model)?.input_schema?.properties || {});
    return requestFromInput(model, selected.input || {}, selected.seed, fields.length ? fields : null);
  }
  byId("detail-rerun").addEventListener("click", () => {
    if (!selected) return;
    const request = current();
    location.hash = "#generate";
    rerun(request);
  });
  byId("detail-load").addEventListener("click", () => {
    if (!selected) return;
    load(current());
    location.hash = "#generate";
  });
  // Two clicks instead of a confirm() dialog: nothing modal, and it works from the keyboard.
  remove.addEventListener("click", async () => {
    if (!selected) return;
    if (remove.dataset.confirm !== "yes") {
      remove.dataset.confirm = "yes";
      remove.textContent = "Confirm delete";
      return;
    }
    const gone = selected;
    try {
      await api.del(`/v1/predictions/${encodeURIComponent(gone.id)}`);
      list.querySelector(`li[data-id="${CSS.escape(gone.id)}"]`)?.remove();
      selected = null;
      show(detail, false);
      show(detailEmpty);
      say(message, `Deleted ${gone.id}: its images and references are gone.`, "ok");
    } catch (error) {
      say(message, error.message, "error");
    }
  });

  return { refresh: () => page(true) };
}
