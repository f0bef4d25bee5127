// The operator console (GET /console): every call under /admin/v1 with the X-Admin-Key header.

import { expiryOf, period, renderKeys, renderUsage } from "./account.js";
import { client, keyStore } from "./api.js";
import { byId, clear, h, money, say, show, when } from "./dom.js";

const LIMITS = [
  ["rate_limit_per_minute", "edit-rate", "int"],
  ["tenant_rate_limit_per_minute", "edit-tenant-rate", "int"],
  ["max_in_flight", "edit-in-flight", "int"],
  ["price_per_image", "edit-price", "float"],
  ["batch_price_per_image", "edit-batch-price", "float"],
  ["retention_s", "edit-retention", "int"],
];
const QUEUE_REFRESH_MS = 5000;

function start() {
  const store = keyStore("klein.adminKey");
  const api = client("X-Admin-Key", store);
  const keyInput = byId("admin-key");
  const message = byId("console-message");
  const panel = byId("tenant-panel");
  let tenants = [];
  let editing = null;

  // Two clicks instead of a confirm() dialog (as a key's revoke): nothing modal, and it works from the keyboard.
  function confirmed(button, question, action) {
    const label = button.textContent;
    button.addEventListener("click", () => {
      if (button.dataset.confirm !== "yes") {
        button.dataset.confirm = "yes";
        button.textContent = question;
        return;
      }
      delete button.dataset.confirm;
      button.textContent = label;
      action();
    });
  }

  const tenantName = (id) => tenants.find((t) => t.id === id)?.name ?? id;
  const fail = (error) => say(message, error.message, "error");
  const cell = (value, format = String) => h("td", { class: "num", text: format(value) });
  // A limit left unset follows the platform's default (KLEIN_DEFAULT_…), which only the server knows.
  const limit = (value, format = String) =>
    value === null || value === undefined ? h("td", { class: "num hint", text: "default" }) : cell(value, format);

  // --- queue ----------------------------------------------------------------------------------------
  async function loadQueue() {
    const queue = await api.get("/admin/v1/queue");
    const priorities = Object.keys(queue.depth || {}).sort((a, b) => Number(a) - Number(b));
    const waiting = priorities.reduce((sum, p) => sum + queue.depth[p], 0);
    const oldest = Math.max(0, ...Object.values(queue.oldest_age_s || {}));
    const stats = [
      ["Queued", String(waiting)],
      ...priorities.map((p) => [`Priority ${p}`, String(queue.depth[p])]),
      ["Oldest wait", `${oldest.toFixed(1)} s`],
      ["Live workers", String(queue.live_workers)],
      ["Webhook backlog", String(queue.webhook_backlog)],
    ];
    clear(byId("queue-stats")).append(
      ...stats.map(([label, value]) => h("div", {}, h("dt", { text: label }), h("dd", { text: value }))),
    );
    byId("queue-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  // --- tenants --------------------------------------------------------------------------------------
  async function loadTenants() {
    tenants = (await api.get("/admin/v1/tenants")).data || [];
    const body = clear(byId("tenants-body"));
    for (const tenant of tenants) {
      const edit = h("button", { type: "button", class: "small", "data-tenant-id": tenant.id }, "Edit");
      edit.setAttribute("aria-label", `Edit ${tenant.name}`);
      edit.addEventListener("click", () => openEditor(tenant));
      const suspended = Boolean(tenant.suspended_at);
      const verb = suspended ? "Resume" : "Suspend";
      const toggle = h("button", { type: "button", class: "small", "data-action": "suspend" }, verb);
      toggle.setAttribute("aria-label", `${verb} ${tenant.name}`);
      const act = () => setSuspended(tenant, !suspended).catch(fail);
      if (suspended) toggle.addEventListener("click", act);
      else confirmed(toggle, "Confirm suspend", act);
      body.append(
        h(
          "tr",
          { "data-tenant-id": tenant.id },
          h(
            "td",
            {},
            h("strong", { text: tenant.name }),
            suspended ? " " : "",
            suspended ? h("span", { class: "badge failed", title: when(tenant.suspended_at) }, "suspended") : "",
            h("br"),
            h("code", { class: "hint", text: tenant.id }),
          ),
          limit(tenant.rate_limit_per_minute),
          limit(tenant.tenant_rate_limit_per_minute),
          limit(tenant.max_in_flight),
          limit(tenant.price_per_image, (v) => money(v)),
          limit(tenant.retention_s, (v) => `${v} s`),
          h("td", {}, edit, " ", toggle),
        ),
      );
    }
    if (!tenants.length) body.append(h("tr", {}, h("td", { colspan: 7, text: "No tenants yet." })));
  }

  async function setSuspended(tenant, suspend) {
    await api.post(`/admin/v1/tenants/${encodeURIComponent(tenant.id)}/${suspend ? "suspend" : "resume"}`);
    say(message, `${tenant.name} ${suspend ? "suspended" : "resumed"}.`, "ok");
    await loadTenants();
  }

  // --- one prediction, any tenant's -----------------------------------------------------------------
  let shown = null;
  const lookupNote = byId("lookup-message");

  async function lookUp(id) {
    byId("lookup-id").value = id;
    say(lookupNote, "");
    try {
      shown = await api.get(`/admin/v1/predictions/${encodeURIComponent(id)}`);
    } catch (error) {
      shown = null;
      show(byId("lookup-result"), false);
      return say(lookupNote, error.message, "error");
    }
    const stats = [
      ["Status", shown.status],
      ["Tenant", tenantName(shown.tenant_id)],
      ["Model", shown.model],
      ["Created", when(shown.created_at)],
      ["Finished", when(shown.completed_at)],
      ["Attempts", String(shown.attempts)],
      ["Worker", shown.worker_id || "—"],
      ["Outputs", shown.expired_at ? "deleted" : String((shown.outputs || []).length)],
    ];
    clear(byId("lookup-stats")).append(
      ...stats.map(([label, value]) => h("div", {}, h("dt", { text: label }), h("dd", { text: value }))),
    );
    byId("lookup-error").textContent = shown.error || "";
    show(byId("lookup-cancel"), shown.status === "created" || shown.status === "processing");
    show(byId("lookup-requeue"), shown.status === "failed" && !shown.expired_at);
    show(byId("lookup-delete"), !shown.expired_at);
    show(byId("lookup-result"));
  }

  async function act(run, done) {
    const id = shown.id;
    try {
      await run(`/admin/v1/predictions/${encodeURIComponent(id)}`);
    } catch (error) {
      return say(lookupNote, error.message, "error");
    }
    await lookUp(id);
    say(lookupNote, done, "ok");
    await loadFailures();
  }

  byId("lookup-form").addEventListener("submit", (event) => {
    event.preventDefault();
    lookUp(byId("lookup-id").value.trim());
  });
  byId("lookup-cancel").addEventListener("click", () => act((path) => api.post(`${path}/cancel`), "Canceled."));
  byId("lookup-requeue").addEventListener("click", () => act((path) => api.post(`${path}/requeue`), "Requeued."));
  confirmed(byId("lookup-delete"), "Confirm delete", () => act((path) => api.del(path), "Deleted."));

  function openEditor(tenant) {
    editing = tenant;
    byId("editor-title").textContent = `Limits and price: ${tenant.name}`;
    for (const [field, id] of LIMITS) {
      const value = tenant[field];
      byId(id).value = value === null || value === undefined ? "" : String(value);
    }
    say(byId("editor-message"), "");
    show(byId("tenant-new-key-box"), false);
    show(panel);
    loadTenantKeys();
    byId(LIMITS[0][1]).focus();
  }

  async function loadTenantKeys() {
    const tenant = editing;
    const answer = await api.get(`/admin/v1/tenants/${encodeURIComponent(tenant.id)}/keys`);
    if (tenant !== editing) return;
    renderKeys(byId("tenant-keys-body"), answer.data || [], {
      revoke: async (key) => {
        try {
          await api.del(`/admin/v1/keys/${encodeURIComponent(key.id)}`);
        } catch (error) {
          fail(error);
        }
        await loadTenantKeys();
      },
    });
  }

  byId("tenant-editor").addEventListener("submit", async (event) => {
    event.preventDefault();
    const note = byId("editor-message");
    const changes = {};
    for (const [field, id, kind] of LIMITS) {
      const input = byId(id);
      if (!input.checkValidity()) {
        input.focus();
        return say(note, `${input.labels[0].textContent}: ${input.validationMessage}`, "error");
      }
      changes[field] = input.value === "" ? null : kind === "int" ? Number.parseInt(input.value, 10) : Number(input.value);
    }
    try {
      editing = await api.patch(`/admin/v1/tenants/${encodeURIComponent(editing.id)}`, { json: changes });
      say(note, "Saved.", "ok");
      await loadTenants();
    } catch (error) {
      say(note, error.message, "error");
    }
  });
  byId("editor-close").addEventListener("click", () => {
    editing = null;
    show(panel, false);
  });

  byId("tenant-key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = byId("tenant-key-name");
    const note = byId("tenant-key-message");
    say(note, "");
    try {
      const created = await api.post(`/admin/v1/tenants/${encodeURIComponent(editing.id)}/keys`, {
        json: { name: name.value.trim(), expires_at: expiryOf(byId("tenant-key-expiry")) },
      });
      byId("tenant-new-key").textContent = created.key;
      show(byId("tenant-new-key-box"));
      name.value = "";
    } catch (error) {
      say(note, error.message, "error");
    }
    await loadTenantKeys();
  });

  byId("tenant-create").addEventListener("submit", async (event) => {
    event.preventDefault();
    const note = byId("tenant-create-message");
    const body = { name: byId("new-tenant-name").value.trim() };
    const rate = byId("new-tenant-rate").value;
    const price = byId("new-tenant-price").value;
    if (rate) body.rate_limit_per_minute = Number.parseInt(rate, 10);
    if (price) body.price_per_image = Number(price);
    try {
      const created = await api.post("/admin/v1/tenants", { json: body });
      byId("tenant-create-key").textContent = created.key.key;
      show(byId("tenant-create-key-box"));
      say(note, `Created ${created.tenant.name}.`, "ok");
      event.target.reset();
      await loadTenants();
    } catch (error) {
      show(byId("tenant-create-key-box"), false);
      say(note, error.message, "error");
    }
  });

  // --- usage and failures ---------------------------------------------------------------------------
  async function loadUsage() {
    const { start: from, end } = period(Number(byId("console-usage-range").value));
    const report = await api.get(`/admin/v1/usage?start=${from}&end=${end}`);
    renderUsage({ report, totals: byId("console-usage-totals"), charts: byId("console-usage-charts") });
    const byTenant = new Map();
    for (const row of report.days) {
      const sums = byTenant.get(row.tenant_id) || { predictions: 0, images: 0, megapixels: 0, amount: 0 };
      for (const field of Object.keys(sums)) sums[field] += row[field];
      byTenant.set(row.tenant_id, sums);
    }
    const body = clear(byId("console-usage-body"));
    for (const [tenantId, sums] of [...byTenant].sort((a, b) => b[1].amount - a[1].amount)) {
      body.append(
        h(
          "tr",
          {},
          h("td", { text: tenantName(tenantId) }),
          cell(sums.predictions),
          cell(sums.images),
          cell(sums.megapixels, (v) => v.toFixed(2)),
          cell(sums.amount, (v) => money(v, report.currency)),
        ),
      );
    }
    if (!byTenant.size) body.append(h("tr", {}, h("td", { colspan: 5, text: "Nothing in this period." })));
  }

  async function loadFailures() {
    const failures = (await api.get("/admin/v1/failures?limit=50")).data || [];
    const body = clear(byId("failures-body"));
    for (const failure of failures) {
      body.append(
        h(
          "tr",
          { "data-prediction-id": failure.id },
          h("td", { text: when(failure.completed_at || failure.created_at) }),
          h("td", { text: tenantName(failure.tenant_id) }),
          h("td", { text: failure.model }),
          h("td", { class: "error-text", text: failure.error || "" }),
          h("td", {}, h("code", { text: failure.id })),
          h("td", {}, failureActions(failure)),
        ),
      );
    }
    if (!failures.length) body.append(h("tr", {}, h("td", { colspan: 6, text: "No failures." })));
    shownFailures = failures;
  }

  let shownFailures = [];

  function failureActions(failure) {
    const open = h("button", { type: "button", class: "small" }, "Open");
    open.setAttribute("aria-label", `Open ${failure.id}`);
    open.addEventListener("click", () => lookUp(failure.id));
    const requeue = h("button", { type: "button", class: "small", "data-action": "requeue" }, "Requeue");
    requeue.setAttribute("aria-label", `Requeue ${failure.id}`);
    requeue.addEventListener("click", () => requeueFailures([failure.id]));
    return h("span", { class: "inline" }, open, requeue);
  }

  async function requeueFailures(ids) {
    const note = byId("failures-message");
    try {
      const path = "/admin/v1/predictions";
      const answer = ids
        ? await api.post(`${path}/${encodeURIComponent(ids[0])}/requeue`)
        : await api.post(`${path}/requeue`, { json: { limit: Math.max(1, shownFailures.length) } });
      say(note, `Requeued ${answer.requeued.length}.`, "ok");
    } catch (error) {
      say(note, error.message, "error");
    }
    await loadFailures();
  }

  confirmed(byId("requeue-failures"), "Confirm: run them again", () => requeueFailures(null));

  // --- flagged by the safety checker (docs/safety.md): the check's record only, never an image -------
  async function loadFlagged() {
    const flagged = (await api.get("/admin/v1/flagged?limit=50")).data || [];
    const body = clear(byId("flagged-body"));
    for (const row of flagged) {
      const outputs = row.safety.flagged || [];
      body.append(
        h(
          "tr",
          { "data-prediction-id": row.id },
          h("td", { text: when(row.completed_at) }),
          h("td", { text: tenantName(row.tenant_id) }),
          h("td", { text: row.safety.policy }),
          h("td", { class: "num", text: `${outputs.filter(Boolean).length} of ${outputs.length}` }),
          h("td", {}, h("code", { text: row.id })),
        ),
      );
    }
    if (!flagged.length) body.append(h("tr", {}, h("td", { colspan: 5, text: "Nothing flagged." })));
  }

  byId("console-usage-form").addEventListener("submit", (event) => {
    event.preventDefault();
    loadUsage().catch(fail);
  });
  byId("console-usage-range").addEventListener("change", () => loadUsage().catch(fail));

  // --- the key and loading --------------------------------------------------------------------------
  async function loadAll() {
    byId("admin-key-state").textContent = store.get() ? "key set for this tab" : "no key yet";
    if (!store.get()) return;
    say(message, "");
    try {
      await loadTenants(); // names for the usage and failure tables
      await Promise.all([loadQueue(), loadUsage(), loadFailures(), loadFlagged()]);
    } catch (error) {
      fail(error);
    }
  }

  keyInput.value = store.get();
  byId("admin-key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    store.set(keyInput.value.trim());
    loadAll();
  });
  byId("forget-admin-key").addEventListener("click", () => {
    store.set("");
    keyInput.value = "";
    loadAll();
  });
  setInterval(() => {
    if (store.get() && document.visibilityState === "visible") loadQueue().catch(fail);
  }, QUEUE_REFRESH_MS);
  loadAll();
}

start();
