// Building DOM nodes from data without HTML parsing: text goes in as text, never as markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(el, props, children) {
  for (const [name, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) throw new Error(`no inline handlers (${name}): use addEventListener`);
    if (name === "class") el.setAttribute("class", value);
    else if (name === "text") el.textContent = String(value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** An HTML element: h("td", {class: "num"}, "12"). Strings become text nodes. */
export function h(tag, props = {}, ...children) {
  return fill(document.createElement(tag), props, children);
}

/** An SVG element, the same way. */
export function s(tag, props = {}, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), props, children);
}

export function byId(id) {
  const el = document.getElementById(id);
  if (!el) throw new Error(`missing #${id}`);
  return el;
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

export function show(el, visible = true) {
  el.hidden = !visible;
}

export function say(el, text, kind = "") {
  el.textContent = text || "";
  el.classList.toggle("error", kind === "error");
  el.classList.toggle("ok", kind === "ok");
}

// --- formatting -------------------------------------------------------------------------------------

export function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

export function duration(ms) {
  if (typeof ms !== "number") return "—";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

export function money(amount, currency = "USD") {
  return new Intl.NumberFormat(undefined, { style: "currency", currency, maximumFractionDigits: 4 }).format(amount || 0);
}

/** Timings ({"queue_ms": 12, …}) as list items, in the order things happen, total last. */
export function timingItems(timings) {
  const order = ["queue_ms", "fetch_ms", "inference_ms", "encode_ms", "upload_ms", "total_ms"];
  const rank = (name) => (order.includes(name) ? order.indexOf(name) : order.length - 1.5); // unknown: before total
  const entries = Object.entries(timings || {}).filter(([name, value]) => name.endsWith("_ms") && typeof value === "number");
  entries.sort(([a], [b]) => rank(a) - rank(b));
  return entries.map(([name, value]) => h("li", {}, `${name.slice(0, -3)} `, h("strong", { text: duration(value) })));
}

/** Copy text; the clipboard API needs a secure context (localhost or HTTPS), so fall back to selecting. */
export async function copyText(text, selectable) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    if (selectable) window.getSelection()?.selectAllChildren(selectable);
    return false;
  }
}
