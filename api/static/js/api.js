// Calls to the platform with the key in a header (never in a URL or a cookie), and an event-stream reader:
// EventSource cannot send headers, so the stream is read with fetch() and parsed here.

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

/** The message of any dialect's error body: {"error": "..."}, {"error": {"message"}}, {"detail"}, {"message"}. */
export function errorText(body, status) {
  if (body && typeof body === "object") {
    for (const value of [body.error, body.detail, body.message]) {
      if (typeof value === "string" && value) return value;
      if (value && typeof value.message === "string") return value.message;
    }
    if (Array.isArray(body.detail)) {
      return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
    }
  }
  if (typeof body === "string" && body && body.length < 300) return body;
  return `the server answered HTTP ${status}`;
}

/** A key kept in this tab's sessionStorage: gone when the tab closes, never sent anywhere but a header. */
export function keyStore(name) {
  return {
    get: () => sessionStorage.getItem(name) || "",
    set: (value) => (value ? sessionStorage.setItem(name, value) : sessionStorage.removeItem(name)),
  };
}

export function client(header, store) {
  function headers(extra = {}) {
    const key = store.get();
    if (!key) throw new ApiError(0, "Enter a key first (at the top of the page).");
    return { [header]: key, ...extra };
  }

  async function call(method, path, { json, form, headers: extra, signal } = {}) {
    const init = { method, headers: headers(extra), signal, cache: "no-store", credentials: "omit" };
    if (json !== undefined) {
      init.body = JSON.stringify(json);
      init.headers["Content-Type"] = "application/json";
    } else if (form) {
      init.body = form;
    }
    const response = await fetch(path, init);
    const text = await response.text();
    let body = text;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      // not JSON: keep the text for the message
    }
    if (!response.ok) throw new ApiError(response.status, errorText(body, response.status), body);
    return body;
  }

  /** Read `path`'s Server-Sent Events, calling onEvent(name, data) for each, until the stream ends. */
  async function events(path, onEvent, signal) {
    const response = await fetch(path, {
      headers: headers({ Accept: "text/event-stream" }),
      signal,
      cache: "no-store",
      credentials: "omit",
    });
    if (!response.ok) {
      let body = null;
      try {
        body = await response.json();
      } catch {
        // no JSON body
      }
      throw new ApiError(response.status, errorText(body, response.status), body);
    }
    await parseEvents(response.body, onEvent);
  }

  /** Object URLs of files that need the key (outputs when no signed link came): fetched with the header. */
  async function blobUrls(urls) {
    return Promise.all(
      urls.map(async (url) => {
        const response = await fetch(url, { headers: headers(), cache: "no-store", credentials: "omit" });
        if (!response.ok) throw new ApiError(response.status, `download failed: HTTP ${response.status}`, null);
        return URL.createObjectURL(await response.blob());
      }),
    );
  }

  return {
    get: (path, options) => call("GET", path, options),
    post: (path, options) => call("POST", path, options),
    patch: (path, options) => call("PATCH", path, options),
    del: (path, options) => call("DELETE", path, options),
    events,
    blobUrls,
    hasKey: () => Boolean(store.get()),
  };
}

/** The text/event-stream format: `event:` and `data:` lines, a blank line ends an event, `:` a comment. */
export async function parseEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let name = "message";
  let data = [];
  const dispatch = () => {
    if (data.length) {
      const text = data.join("\n");
      let parsed = text;
      try {
        parsed = JSON.parse(text);
      } catch {
        // plain text data
      }
      onEvent(name, parsed);
    }
    name = "message";
    data = [];
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    for (;;) {
      const end = /\r\n|\r|\n/.exec(buffer);
      // A lone "\r" at the end may be the first half of "\r\n": wait for the next chunk.
      if (!end || (end[0] === "\r" && end.index === buffer.length - 1)) break;
      const line = buffer.slice(0, end.index);
      buffer = buffer.slice(end.index + end[0].length);
      if (line === "") dispatch();
      else if (line.startsWith(":")) continue;
      else {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const rest = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") name = rest;
        else if (field === "data") data.push(rest);
      }
    }
  }
  dispatch();
}
