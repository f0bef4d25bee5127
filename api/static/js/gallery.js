// The results of this tab's runs, newest first: each run a card with its images (one per output), prompt, seed,
// timings and downloads. Earlier results stay until the page is closed (at most KEEP of them).

import { h, timingItems } from "./dom.js";

const KEEP = 24;

export function setupGallery(container, empty, { lockSeed }) {
  /** A run's card: figure[data-prediction-id][data-seed] with an img per output. */
  function add(request, outcome) {
    const format = request.input.output_format || "jpg";
    const seed = outcome.seed ?? null;
    const pictures = outcome.urls.map((url, i) => {
      const image = h("img", { src: url, alt: `Generated${outcome.urls.length > 1 ? ` (${i + 1} of ${outcome.urls.length})` : ""}: ${request.input.prompt}` });
      const size = h("span", { class: "hint", text: "…" });
      image.addEventListener("load", () => (size.textContent = `${image.naturalWidth}×${image.naturalHeight}`), { once: true });
      const name = `klein-${outcome.id}${outcome.urls.length > 1 ? `-${i + 1}` : ""}.${format}`;
      const save = h("a", { class: "button small", href: url, download: name, "data-action": "download" }, "Download");
      return h("div", { class: "output" }, image, h("p", { class: "inline" }, save, size));
    });
    const lock = h("button", { type: "button", class: "small", "data-action": "lock-seed" }, "Lock this seed");
    lock.addEventListener("click", () => lockSeed(seed));
    const remove = h("button", { type: "button", class: "small", "data-action": "dismiss", "aria-label": "Remove from this view" }, "×");
    const card = h(
      "figure",
      { class: "run", "data-prediction-id": outcome.id, "data-seed": String(seed) },
      h("div", { class: `outputs n${Math.min(outcome.urls.length, 4)}` }, pictures),
      h(
        "figcaption",
        {},
        h("p", { class: "prompt-text", text: request.input.prompt }),
        h("ul", { class: "timings" }, h("li", {}, "seed ", h("strong", { text: String(seed) })), timingItems(outcome.timings)),
        h("p", { class: "inline" }, lock, remove),
      ),
    );
    remove.addEventListener("click", () => {
      card.remove();
      empty.hidden = container.children.length > 0;
    });
    container.prepend(card);
    while (container.children.length > KEEP) container.lastElementChild.remove();
    empty.hidden = true;
    return card;
  }

  return { add };
}
