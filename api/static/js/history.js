// The tenant's predictions, newest first (GET /v1/predictions, cursor pagination), and one in detail.

import { byId, clear, h, say, show, timingItems, when } from "./dom.js";
import { renderSnippets, requestFromInput } from "./snippets.js";

const PAGE = 12;

export function setupHistory(api, { rerun, load }) {
  const form = byId("history-form");
  const status = byId("history-status");
  const list = byId("history-list");
  const message = byId("history-message");
  const more = byId("history-more");
  const detail = byId("detail");
  const detailEmpty = byId("detail-empty");
  let cursor = null;
  let selected = null;
  let generation = 0; // a refresh makes pages still in flight from the one before stale

  function thumb(prediction) {
    const url = prediction.urls?.outputs?.[0];
    if (url) return h("span", { class: "thumb" }, h("img", { src: url, alt: "", loading: "lazy" }));
    return h("span", { class: "thumb", text: prediction.status });
  }

  function item(prediction) {
    const button = h(
      "button",
      { type: "button", class: "history-item", "aria-pressed": "false", "data-id": prediction.id },
      thumb(prediction),
      h("span", { class: "history-prompt", text: prediction.input?.prompt ?? "" }),
      h("span", { class: `badge ${prediction.status}`, text: prediction.status }),
      h("span", { class: "hint", text: when(prediction.created_at) }),
    );
    button.addEventListener("click", () => {
      for (const other of list.querySelectorAll(".history-item")) other.setAttribute("aria-pressed", "false");
      button.setAttribute("aria-pressed", "true");
      select(prediction);
    });
    return h("li", {}, button);
  }

  function select(prediction) {
    selected = prediction;
    const input = prediction.input || {};
    const url = prediction.urls?.outputs?.[0];
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
    byId("detail-meta").textContent = `${prediction.id} · ${when(prediction.created_at)} · seed ${prediction.seed}`;
    byId("detail-error").textContent = prediction.error || "";
    byId("detail-timings").replaceChildren(...timingItems(prediction.timings));
    byId("detail-input").textContent = JSON.stringify(input, null, 2);
    detail.dataset.id = prediction.id;
    renderSnippets(byId("detail-code"), requestFromInput(input, prediction.seed));
    show(detailEmpty, false);
    show(detail);
    // The details sit above (desktop, after "Load more") or below (one column) the clicked row: bring them to it.
    const box = detail.getBoundingClientRect();
    if (box.top < 0 || box.top > window.innerHeight - 80) detail.scrollIntoView({ block: "start" });
  }

  async function page(first) {
    const mine = first ? ++generation : generation;
    const params = new URLSearchParams({ limit: String(PAGE) });
    if (status.value) params.set("status", status.value);
    if (!first && cursor) params.set("cursor", cursor);
    say(message, "Loading…");
    try {
      const answer = await api.get(`/v1/predictions?${params}`);
      if (mine !== generation) return;
      if (first) clear(list);
      for (const prediction of answer.results || []) list.append(item(prediction));
      cursor = answer.next || null;
      show(more, Boolean(cursor));
      const none = status.value ? `No ${status.value} predictions.` : "No predictions yet: generate one.";
      say(message, list.children.length ? "" : none);
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

  const current = () => requestFromInput(selected.input || {}, selected.seed);
  byId("detail-rerun").addEventListener("click", () => {
    if (!selected) return;
    const request = current();
    load(request);
    location.hash = "#generate";
    rerun(request);
  });
  byId("detail-load").addEventListener("click", () => {
    if (!selected) return;
    load(current());
    location.hash = "#generate";
  });

  return { refresh: () => page(true) };
}
