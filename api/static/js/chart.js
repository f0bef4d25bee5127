// A bar chart as inline SVG, built from data: no chart library, nothing fetched.

import { h, s } from "./dom.js";

/** The days from start (inclusive) to end (exclusive), as YYYY-MM-DD, in UTC like the usage API. */
export function daysBetween(start, end) {
  const days = [];
  for (let d = new Date(`${start}T00:00:00Z`); d < new Date(`${end}T00:00:00Z`); d.setUTCDate(d.getUTCDate() + 1)) {
    days.push(d.toISOString().slice(0, 10));
  }
  return days;
}

export function isoDay(date) {
  return date.toISOString().slice(0, 10);
}

/** {title, points: [{label, value}], format(value) → text, alt: bool (second colour)} → a <figure>. */
export function barChart({ title, points, format = String, alt = false }) {
  const width = 640;
  const height = 200;
  const pad = { top: 16, right: 8, bottom: 24, left: 8 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const max = Math.max(0, ...points.map((p) => p.value));
  const slot = plotW / Math.max(1, points.length);
  const barW = Math.max(1, slot * 0.7);
  const total = points.reduce((sum, p) => sum + p.value, 0);
  const svg = s(
    "svg",
    {
      class: "chart",
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-label": `${title}: ${format(total)} in total over ${points.length} days, at most ${format(max)} a day`,
      preserveAspectRatio: "xMidYMid meet",
    },
    s("title", { text: title }),
  );
  const baseline = pad.top + plotH;
  svg.append(s("line", { class: "axis", x1: pad.left, x2: width - pad.right, y1: baseline, y2: baseline }));
  points.forEach((point, i) => {
    const barH = max > 0 ? (point.value / max) * plotH : 0;
    const x = pad.left + i * slot + (slot - barW) / 2;
    const bar = s("rect", {
      class: alt ? "bar alt" : "bar",
      x: x.toFixed(1),
      y: (baseline - barH).toFixed(1),
      width: barW.toFixed(1),
      height: Math.max(point.value > 0 ? 1 : 0, barH).toFixed(1),
      "data-day": point.label,
      "data-value": point.value,
    });
    bar.append(s("title", { text: `${point.label}: ${format(point.value)}` }));
    svg.append(bar);
  });
  // Labels: the first, middle and last day, and the maximum at the top left.
  const labelAt = new Set([0, Math.floor((points.length - 1) / 2), points.length - 1]);
  points.forEach((point, i) => {
    if (!labelAt.has(i)) return;
    const x = pad.left + i * slot + slot / 2;
    const anchor = i === 0 ? "start" : i === points.length - 1 ? "end" : "middle";
    svg.append(s("text", { x: x.toFixed(1), y: height - 6, "text-anchor": anchor, text: point.label.slice(5) }));
  });
  svg.append(s("text", { x: pad.left, y: 11, text: `max ${format(max)}` }));
  return h("figure", { class: "chart-figure" }, h("figcaption", { class: "chart-title", text: title }), svg);
}
