// The tenant's own keys (list, create with a name and an expiry, revoke) and usage (a chart per day).
// Both tables and the revoke button are shared with the console, which calls the admin routes.

import { barChart, daysBetween, isoDay } from "./chart.js";
import { byId, clear, copyText, h, money, say, show, when } from "./dom.js";

/** Rows of keys into `body`; revoke(key) is called after a second click ("Confirm revoke"). */
export function renderKeys(body, keys, { revoke, currentKey = "" }) {
  clear(body);
  const now = Date.now();
  if (!keys.length) body.append(h("tr", {}, h("td", { colspan: 6, text: "No keys." })));
  for (const key of keys) {
    const expired = key.expires_at && new Date(key.expires_at).getTime() <= now;
    const mine = currentKey && key.prefix && currentKey.startsWith(key.prefix);
    let state;
    if (key.revoked_at) state = h("span", { text: `revoked ${when(key.revoked_at)}` });
    else if (expired) state = h("span", { text: "expired" });
    else {
      const button = h("button", { type: "button", class: "small danger", "data-key-id": key.id }, "Revoke");
      button.addEventListener("click", async () => {
        if (button.dataset.confirm !== "yes") {
          // Two clicks instead of a confirm() dialog: nothing modal, and it works from the keyboard.
          button.dataset.confirm = "yes";
          button.textContent = mine ? "Confirm: this tab's key" : "Confirm revoke";
          return;
        }
        button.disabled = true;
        await revoke(key);
      });
      state = button;
    }
    body.append(
      h(
        "tr",
        { class: key.revoked_at ? "revoked" : "", "data-key-id": key.id },
        h("td", {}, key.name || "—", mine ? h("span", { class: "hint", text: " (this tab)" }) : null),
        h("td", {}, h("code", { text: key.prefix })),
        h("td", { text: when(key.created_at) }),
        h("td", { text: when(key.last_used_at) }),
        h("td", { text: key.expires_at ? when(key.expires_at) : "never" }),
        h("td", {}, state),
      ),
    );
  }
}

/** The ISO instant a date input means: the start of that day, UTC. */
export function expiryOf(dateInput) {
  return dateInput.value ? `${dateInput.value}T00:00:00Z` : undefined;
}

export function setupKeys(api, { currentKey, useKey }) {
  const form = byId("key-create-form");
  const name = byId("key-name");
  const expiry = byId("key-expiry");
  const message = byId("key-message");
  const box = byId("new-key-box");
  const newKey = byId("new-key");
  const body = byId("keys-body");

  async function refresh() {
    try {
      const answer = await api.get("/v1/keys");
      renderKeys(body, answer.data || [], { revoke, currentKey: currentKey() });
    } catch (error) {
      say(message, error.message, "error");
    }
  }

  async function revoke(key) {
    try {
      await api.del(`/v1/keys/${encodeURIComponent(key.id)}`);
      say(message, `Revoked ${key.name || key.prefix}.`, "ok");
    } catch (error) {
      say(message, error.message, "error");
    }
    await refresh();
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    say(message, "");
    try {
      const created = await api.post("/v1/keys", { json: { name: name.value.trim(), expires_at: expiryOf(expiry) } });
      newKey.textContent = created.key;
      show(box);
      name.value = "";
      expiry.value = "";
    } catch (error) {
      show(box, false);
      say(message, error.message, "error");
    }
    await refresh();
  });
  byId("copy-new-key").addEventListener("click", () => copyText(newKey.textContent, newKey));
  byId("use-new-key").addEventListener("click", () => useKey(newKey.textContent));

  return { refresh };
}

/** Per-day totals of usage rows, every day of the period present (0 where nothing ran). */
export function perDay(rows, start, end) {
  const days = new Map(daysBetween(start, end).map((day) => [day, { images: 0, amount: 0, predictions: 0 }]));
  for (const row of rows) {
    const day = days.get(row.day);
    if (!day) continue;
    day.images += row.images;
    day.amount += row.amount;
    day.predictions += row.predictions;
  }
  return [...days.entries()].map(([day, totals]) => ({ day, ...totals }));
}

export function period(days) {
  const end = new Date();
  end.setUTCDate(end.getUTCDate() + 1); // the API's end is exclusive: through today
  const start = new Date(end);
  start.setUTCDate(start.getUTCDate() - days);
  return { start: isoDay(start), end: isoDay(end) };
}

export function renderUsage({ report, totals, charts }) {
  const days = perDay(report.days, report.start, report.end);
  const currency = report.currency || "USD";
  clear(totals).append(
    ...[
      ["Predictions", String(report.total.predictions)],
      ["Images", String(report.total.images)],
      ["Megapixels", report.total.megapixels.toFixed(1)],
      ["Cost", money(report.total.amount, currency)],
    ].map(([label, value]) => h("div", {}, h("dt", { text: label }), h("dd", { text: value }))),
  );
  clear(charts).append(
    barChart({ title: "Images per day", points: days.map((d) => ({ label: d.day, value: d.images })) }),
    barChart({
      title: `Cost per day (${currency})`,
      points: days.map((d) => ({ label: d.day, value: d.amount })),
      format: (v) => money(v, currency),
      alt: true,
    }),
  );
}

export function setupUsage(api) {
  const form = byId("usage-form");
  const range = byId("usage-range");
  const message = byId("usage-message");
  const body = byId("usage-body");

  async function refresh() {
    const { start, end } = period(Number(range.value));
    say(message, "Loading…");
    try {
      const report = await api.get(`/v1/usage?start=${start}&end=${end}`);
      renderUsage({ report, totals: byId("usage-totals"), charts: byId("usage-charts") });
      clear(body);
      for (const row of [...report.days].reverse()) {
        body.append(
          h(
            "tr",
            {},
            h("td", { text: row.day }),
            h("td", { text: row.batch ? `${row.model} (batch)` : row.model }),
            h("td", { class: "num", text: String(row.predictions) }),
            h("td", { class: "num", text: String(row.images) }),
            h("td", { class: "num", text: row.megapixels.toFixed(2) }),
            h("td", { class: "num", text: money(row.amount, report.currency) }),
          ),
        );
      }
      if (!report.days.length) body.append(h("tr", {}, h("td", { colspan: 6, text: "Nothing in this period." })));
      say(message, "");
    } catch (error) {
      say(message, error.message, "error");
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    refresh();
  });
  range.addEventListener("change", refresh);
  return { refresh };
}
