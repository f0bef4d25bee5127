// Following one prediction: its event stream (status, progress, log, output, done), or polling its status when the
// stream cannot be read; the labels the page shows while it waits; API errors as a person reads them.

const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** A queued prediction's label: no live worker for its model, or its place and ETA. */
export function queuedLabel(data) {
  if (data.live_workers === 0) return "No worker is online for this model — waiting for one to start.";
  if (typeof data.queue_position !== "number") return "Queued…";
  const eta = typeof data.eta_s === "number" ? `, about ${Math.ceil(data.eta_s)} s` : "";
  return data.queue_position === 0 ? `Queued: next${eta}` : `Queued: ${data.queue_position} ahead${eta}`;
}

async function poll(api, id, onStatus, onProgress, signal) {
  for (;;) {
    const row = await api.get(`/v1/predictions/status/${encodeURIComponent(id)}`, { signal });
    if (TERMINAL.has(row.status)) return row;
    if (row.progress) onProgress(row.progress);
    else onStatus(row);
    await sleep(700);
  }
}

/** Follow prediction `id` until it ends: its final status view, with `urls` (links to its images). */
export async function follow(api, id, { onStatus, onProgress, onLog = () => {} }, signal) {
  let final = null;
  let urls = [];
  try {
    await api.events(
      `/v1/predictions/${encodeURIComponent(id)}/stream`,
      (name, data) => {
        if (name === "status") onStatus(data);
        else if (name === "progress") onProgress(data);
        else if (name === "log") onLog(data);
        else if (name === "output") urls = data.urls || [];
        else if (name === "done") final = data;
      },
      signal,
    );
  } catch (error) {
    if (signal.aborted) throw error;
    // The stream is a nicety (a proxy may cut it, or the tenant may have too many open): poll instead.
  }
  if (!final) final = await poll(api, id, onStatus, onProgress, signal);
  if (final.status === "succeeded" && !urls.length) urls = await api.blobUrls(final.generation_urls || []);
  return { ...final, urls };
}

const FIELDS = {
  prompt: "Prompt",
  seed: "Seed",
  num_inference_steps: "Steps",
  guidance: "Guidance",
  guidance_scale: "Guidance",
  images: "Reference images",
  loras: "LoRAs",
  size: "Size",
  aspect_ratio: "Aspect ratio",
  num_outputs: "Images",
  output_quality: "Quality",
  output_format: "Format",
};

/** An API error as a sentence per offending field ("Prompt: too long, at most 4,096 characters."), not the
 * validator's raw text. */
export function readableError(error) {
  const detail = error?.body?.detail;
  if (!Array.isArray(detail) || !detail.length) return error.message;
  return detail
    .map((d) => {
      const names = (d.loc || []).filter((part) => part !== "input" && part !== "body");
      const field = FIELDS[names[0]] || names.join(".") || "Request";
      const limit = /at most (\d+) characters/.exec(d.msg || "");
      if (d.type === "string_too_long" && limit) {
        return `${field}: too long, at most ${Number(limit[1]).toLocaleString("en")} characters.`;
      }
      const msg = String(d.msg || "invalid");
      return `${field}: ${msg.charAt(0).toLowerCase()}${msg.slice(1)}.`;
    })
    .join(" ");
}
