// "Copy as code": one generation request written for curl and each official client the platform speaks.
//
// A request here is what the playground sends, dialect-free:
//   {prompt, aspectRatio (or null), width, height (exact size, or null), seed (-1: random), steps, guidance,
//    format: "jpg"|"png"|"webp", images: [urls of uploads], loras: [{path, scale}]}
// Aspect ratios go to POST /v1/predictions (the Pruna dialect); exact sizes to the OpenAI-style endpoint.
// The key stays out of the code (and out of screenshots and clipboard history): $KLEIN_API_KEY.

import { copyText, h } from "./dom.js";

export const MODEL = "flux-klein-4b";
export const RATIOS = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"];
const MEGAPIXEL = 1024 * 1024;
const OPENAI = { minSide: 256, maxSide: 2048, maxPixels: 1_048_576, maxSteps: 12, maxGuidance: 8 };
const WAVESPEED = { minSide: 256, maxSide: 1536, maxSeed: 2147483647 };
const FAL = { minSide: 256, maxSide: 1536, maxSteps: 50, maxGuidance: 20 };
const BFL = { minSide: 64, maxSide: 8192, maxPixels: 4 * MEGAPIXEL };

const round16 = (x) => Math.max(16, Math.round(x / 16) * 16);
const floor16 = (x) => Math.max(16, Math.floor(x / 16) * 16);

/** The model's size for a ratio, as models/klein.py computes it: about a megapixel, sides multiples of 16. */
export function sizeForRatio(widthOverHeight) {
  const width = Math.sqrt(MEGAPIXEL * widthOverHeight);
  return [round16(width), round16(width / widthOverHeight)];
}

export function sizeForAspectRatio(ratio) {
  const [a, b] = ratio.split(":").map(Number);
  return sizeForRatio(a / b);
}

/** (width, height) shrunk, ratio kept, until each side ≤ maxSide and the area ≤ maxPixels. */
function fit([width, height], { minSide, maxSide, maxPixels = Infinity }) {
  let scale = Math.min(1, maxSide / Math.max(width, height), Math.sqrt(maxPixels / (width * height)));
  let w = floor16(width * scale);
  let hh = floor16(height * scale);
  while (w * hh > maxPixels) {
    scale *= 0.99;
    w = floor16(width * scale);
    hh = floor16(height * scale);
  }
  return [Math.max(minSide, w), Math.max(minSide, hh)];
}

function nearestRatio(width, height) {
  const wanted = Math.log(width / height);
  const distance = (r) => Math.abs(Math.log(sizeForAspectRatio(r)[0] / sizeForAspectRatio(r)[1]) - wanted);
  return RATIOS.reduce((best, r) => (distance(r) < distance(best) ? r : best));
}

/** The request's output size in pixels (a reference's ratio for match_input_image, when known). */
export function pixelSize(request) {
  if (request.width && request.height) return [request.width, request.height];
  if (request.aspectRatio && request.aspectRatio !== "match_input_image") return sizeForAspectRatio(request.aspectRatio);
  if (request.referenceSize) return sizeForRatio(request.referenceSize[0] / request.referenceSize[1]);
  return [1024, 1024];
}

// --- the bodies the playground itself sends -----------------------------------------------------------

export function prunaInput(request) {
  const input = { prompt: request.prompt };
  if (request.aspectRatio) input.aspect_ratio = request.aspectRatio;
  input.seed = request.seed;
  input.num_inference_steps = request.steps;
  input.guidance = request.guidance;
  input.output_format = request.format;
  if (request.images.length) input.images = [...request.images];
  if (request.loras?.length) input.loras = request.loras.map((lora) => ({ ...lora }));
  return input;
}

export function openaiBody(request) {
  const [width, height] = fit(pixelSize(request), OPENAI);
  const body = { prompt: request.prompt, model: "flux-2-klein-4b", size: `${width}x${height}` };
  if (request.seed >= 0) body.seed = request.seed;
  body.num_inference_steps = Math.min(request.steps, OPENAI.maxSteps);
  body.guidance_scale = Math.min(request.guidance, OPENAI.maxGuidance);
  body.output_format = request.format === "jpg" ? "jpeg" : request.format;
  body.response_format = "url";
  if (request.images.length) body.images = [...request.images];
  return body;
}

/** A request rebuilt from a stored prediction's input, whichever dialect submitted it. */
export function requestFromInput(input, seed) {
  const size = typeof input.size === "string" && input.size !== "auto" ? input.size.split(/[x*]/).map(Number) : null;
  const exact = size && size.length === 2 && size.every(Number.isFinite) ? size : null;
  const format = String(input.output_format || input.format || "jpg").replace("jpeg", "jpg");
  let images = input.images || input.image_uris || [];
  if (typeof images === "string") images = images.split(",").map((u) => u.trim()).filter(Boolean);
  return {
    prompt: String(input.prompt || ""),
    aspectRatio: exact ? null : input.aspect_ratio || "1:1",
    width: exact ? exact[0] : (input.width ?? null),
    height: exact ? exact[1] : (input.height ?? null),
    seed: Number.isInteger(seed) ? seed : (input.seed ?? -1),
    steps: input.num_inference_steps ?? 4,
    guidance: input.guidance ?? input.guidance_scale ?? 1,
    format: ["jpg", "png", "webp"].includes(format) ? format : "jpg",
    images: Array.isArray(images) ? images.map(String) : [],
    loras: Array.isArray(input.loras) ? input.loras.map((l) => ({ path: String(l.path), scale: l.scale ?? 1 })) : [],
  };
}

// --- code ---------------------------------------------------------------------------------------------

function shellQuote(text) {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

/** A Python literal of JSON-like data (JSON's string escapes are valid Python ones). */
function py(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") return JSON.stringify(value);
  const inner = `${indent}    `;
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => `${inner}${py(v, inner)},`).join("\n")}\n${indent}]`;
  }
  const entries = Object.entries(value);
  if (!entries.length) return "{}";
  return `{\n${entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${py(v, inner)},`).join("\n")}\n${indent}}`;
}

function extension(format) {
  return format === "jpg" ? "jpg" : format;
}

// The page (the Pruna dialect) encodes JPEG and WebP at quality 80; WaveSpeed and the OpenAI style at 90.
function qualityNote(request) {
  if (request.format === "png") return [];
  return ["# This dialect encodes JPEG/WebP at quality 90 (the page: 80): the same picture, not the same bytes."];
}

function curl(request, origin) {
  const exact = Boolean(request.width && request.height);
  if (exact) {
    return [
      "# export KLEIN_API_KEY=<your key>",
      "# Exact sizes: the OpenAI-style endpoint answers when the image is ready, with signed links.",
      ...(request.loras?.length ? ["# This endpoint takes no LoRAs: this picture is made without them."] : []),
      `curl -sS -X POST ${shellQuote(`${origin}/v1/images/generations`)} \\`,
      `  -H "apikey: $KLEIN_API_KEY" \\`,
      "  -H 'Content-Type: application/json' \\",
      `  -d ${shellQuote(JSON.stringify(openaiBody(request)))}`,
    ].join("\n");
  }
  return [
    "# export KLEIN_API_KEY=<your key>",
    "# Try-Sync waits for the image (up to the server's limit); without it, poll get_url.",
    `curl -sS -X POST ${shellQuote(`${origin}/v1/predictions`)} \\`,
    `  -H "apikey: $KLEIN_API_KEY" \\`,
    `  -H ${shellQuote(`Model: ${MODEL}`)} \\`,
    "  -H 'Try-Sync: true' \\",
    "  -H 'Content-Type: application/json' \\",
    `  -d ${shellQuote(JSON.stringify({ input: prunaInput(request) }))}`,
  ].join("\n");
}

function pruna(request, origin) {
  const notes = [];
  let input = prunaInput(request);
  if (request.width && request.height) {
    const ratio = nearestRatio(request.width, request.height);
    notes.push(`# This dialect takes aspect ratios; the nearest to ${request.width}x${request.height} is ${ratio}.`);
    input = prunaInput({ ...request, aspectRatio: ratio, width: null, height: null });
  }
  const file = `output.${extension(request.format)}`;
  return [
    "# pip install pruna-client; export KLEIN_API_KEY=<your key>",
    ...notes,
    "import os",
    "",
    "from pruna_client import PrunaClient",
    "",
    'client = PrunaClient(api_key=os.environ["KLEIN_API_KEY"], timeout=120)',
    `client.base_url = ${py(`${origin}/v1`)}`,
    `response = client.generate(${py(MODEL)}, ${py(input)})`,
    'if response.response.get("status") in ("starting", "processing"):  # not done within the Try-Sync wait',
    "    response = client.poll_status(response=response)",
    "result = response.response",
    'if result.get("status") != "succeeded":',
    `    raise SystemExit(f"failed: {result.get('error')}")`,
    `with open(${py(file)}, "wb") as f:`,
    '    f.write(client.download_content(result["generation_url"]))',
    `print("saved", ${py(file)}, "seed", result["seed"])`,
  ].join("\n");
}

function wavespeed(request, origin) {
  const [width, height] = fit(pixelSize(request), WAVESPEED);
  const notes = [];
  const [w0, h0] = pixelSize(request);
  if (w0 !== width || h0 !== height) notes.push(`# This dialect's sides are at most 1536 px: ${width}*${height}.`);
  if (request.steps !== 4 || request.guidance !== 1) {
    notes.push("# This dialect always runs 4 steps at guidance 1.0.");
  }
  const body = { prompt: request.prompt, size: `${width}*${height}` };
  if (request.seed > WAVESPEED.maxSeed) notes.push("# This dialect's seeds stop at 2147483647: a random one here.");
  else if (request.seed >= 0) body.seed = request.seed;
  body.output_format = request.format === "jpg" ? "jpeg" : request.format;
  notes.push(...qualityNote(request));
  if (request.images.length) body.images = [...request.images];
  const withLoras = Boolean(request.loras?.length);
  if (withLoras) body.loras = request.loras.map((lora) => ({ ...lora }));
  const task = `${request.images.length ? "edit" : "text-to-image"}${withLoras ? "-lora" : ""}`;
  const file = `output.${extension(request.format)}`;
  return [
    "# pip install wavespeed; export KLEIN_API_KEY=<your key>",
    ...notes,
    "import os",
    "import urllib.request",
    "",
    "import wavespeed",
    "",
    `client = wavespeed.Client(api_key=os.environ["KLEIN_API_KEY"], base_url=${py(origin)})`,
    `result = client.run(${py(`wavespeed-ai/flux-2-klein-4b/${task}`)}, ${py(body)})`,
    `urllib.request.urlretrieve(result["outputs"][0], ${py(file)})  # a signed link: no key needed`,
    `print("saved", ${py(file)})`,
  ].join("\n");
}

function openai(request, origin) {
  const body = openaiBody(request);
  const notes = [];
  const [w0, h0] = pixelSize(request);
  if (body.size !== `${w0}x${h0}`) notes.push(`# This dialect allows at most 1,048,576 pixels: ${body.size}.`);
  if (body.num_inference_steps !== request.steps) notes.push("# This dialect allows at most 12 steps.");
  if (body.guidance_scale !== request.guidance) notes.push("# This dialect allows guidance up to 8.");
  if (request.loras?.length) notes.push("# This dialect takes no LoRAs: this picture is made without them.");
  notes.push(...qualityNote(request));
  const extra = {};
  for (const name of ["seed", "num_inference_steps", "guidance_scale", "output_format", "images"]) {
    if (body[name] !== undefined) extra[name] = body[name];
  }
  const file = `output.${extension(request.format)}`;
  return [
    "# pip install openai; export KLEIN_API_KEY=<your key>",
    ...notes,
    "import os",
    "import urllib.request",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(api_key=os.environ["KLEIN_API_KEY"], base_url=${py(`${origin}/v1`)})`,
    "result = client.images.generate(",
    `    model=${py(body.model)},`,
    `    prompt=${py(body.prompt)},`,
    `    size=${py(body.size)},`,
    `    extra_body=${py(extra, "    ")},`,
    ")",
    `urllib.request.urlretrieve(result.data[0].url, ${py(file)})  # a signed link: no key needed`,
    `print("saved", ${py(file)})`,
  ].join("\n");
}

// fal's queue API through fal-client (docs.fal.ai, "Queue"), which speaks https only and reads its hosts at import.
function fal(request, origin) {
  const [width, height] = fit(pixelSize(request), FAL);
  const [w0, h0] = pixelSize(request);
  const notes = ["# fal-client speaks https only: this server must too (klein up --tls-cert/--tls-key, or a TLS proxy)."];
  if (w0 !== width || h0 !== height) notes.push(`# This dialect's sides are 256–1536 px: ${width}x${height}.`);
  if (request.loras?.length) notes.push("# This dialect's klein endpoints take no LoRAs: made without them.");
  notes.push(...qualityNote(request));
  const body = { prompt: request.prompt, image_size: { width, height } };
  if (request.seed >= 0) body.seed = request.seed;
  body.num_inference_steps = Math.min(request.steps, FAL.maxSteps);
  body.guidance_scale = Math.min(request.guidance, FAL.maxGuidance);
  body.output_format = request.format === "jpg" ? "jpeg" : request.format;
  if (request.images.length) body.image_urls = [...request.images];
  const app = `fal-ai/flux-2/klein/4b${request.images.length ? "/edit" : ""}`;
  const host = new URL(origin).host;
  const file = `output.${extension(request.format)}`;
  return [
    "# pip install fal-client; export KLEIN_API_KEY=<your key>",
    ...notes,
    "import os",
    "import urllib.request",
    "",
    "# fal-client reads its hosts when it is imported: set them first.",
    `os.environ.setdefault("FAL_QUEUE_RUN_HOST", ${py(host)})`,
    `os.environ.setdefault("FAL_RUN_HOST", ${py(`${host}/fal-run`)})`,
    'os.environ["FAL_KEY"] = os.environ["KLEIN_API_KEY"]',
    "",
    "import fal_client  # noqa: E402",
    "",
    `result = fal_client.subscribe(${py(app)}, arguments=${py(body)})`,
    `urllib.request.urlretrieve(result["images"][0]["url"], ${py(file)})  # a signed link: no key needed`,
    `print("saved", ${py(file)}, "seed", result["seed"])`,
  ].join("\n");
}

// Black Forest Labs' API (docs.bfl.ai): submit, poll the polling_url, download result.sample.
function bfl(request, origin) {
  const [width, height] = fit(pixelSize(request), BFL);
  const notes = [];
  if (request.steps !== 4 || request.guidance !== 1) notes.push("# This dialect always runs 4 steps at guidance 1.0.");
  if (request.loras?.length) notes.push("# This dialect takes no LoRAs: this picture is made without them.");
  notes.push(...qualityNote(request));
  const body = { prompt: request.prompt, width, height };
  if (request.seed >= 0) body.seed = request.seed;
  body.output_format = request.format === "jpg" ? "jpeg" : request.format;
  request.images.forEach((url, i) => {
    body[i ? `input_image_${i + 1}` : "input_image"] = url;
  });
  const file = `output.${extension(request.format)}`;
  return [
    "# pip install requests; export KLEIN_API_KEY=<your key>",
    ...notes,
    "import os",
    "import time",
    "",
    "import requests",
    "",
    'headers = {"x-key": os.environ["KLEIN_API_KEY"]}',
    `task = requests.post(${py(`${origin}/v1/flux-2-klein-4b`)}, headers=headers, json=${py(body)}).json()`,
    'while (result := requests.get(task["polling_url"], headers=headers).json())["status"] == "Pending":',
    "    time.sleep(0.5)",
    'if result["status"] != "Ready":',
    `    raise SystemExit(f"{result['status']}: {result.get('error')}")`,
    `with open(${py(file)}, "wb") as f:`,
    '    f.write(requests.get(result["result"]["sample"]).content)  # a signed link: no key needed',
    `print("saved", ${py(file)}, "seed", result["result"]["seed"])`,
  ].join("\n");
}

export const DIALECTS = [
  { id: "curl", label: "curl", build: curl },
  { id: "pruna", label: "pruna-client", build: pruna },
  { id: "wavespeed", label: "wavespeed", build: wavespeed },
  { id: "openai", label: "openai", build: openai },
  { id: "fal", label: "fal-client", build: fal },
  { id: "bfl", label: "BFL (requests)", build: bfl },
];

/** A tabbed panel with the request as code in each dialect, and a Copy button. */
export function renderSnippets(container, request, origin = location.origin) {
  let current = DIALECTS[0].id;
  const tabs = h("div", { class: "snippet-tabs", role: "tablist", "aria-label": "Copy as code" });
  const blocks = DIALECTS.map((dialect) =>
    h(
      "pre",
      { class: "code", "data-dialect": dialect.id, role: "tabpanel", "aria-label": `${dialect.label} code` },
      h("code", { text: dialect.build(request, origin) }),
    ),
  );
  const status = h("span", { class: "hint", role: "status" });
  const copy = h("button", { type: "button", class: "small", "data-action": "copy" }, "Copy");
  const select = (id) => {
    current = id;
    for (const tab of tabs.children) tab.setAttribute("aria-selected", String(tab.dataset.dialect === id));
    for (const block of blocks) block.hidden = block.dataset.dialect !== id;
    status.textContent = "";
  };
  for (const dialect of DIALECTS) {
    const tab = h("button", { type: "button", role: "tab", class: "small", "data-dialect": dialect.id }, dialect.label);
    tab.addEventListener("click", () => select(dialect.id));
    tabs.append(tab);
  }
  copy.addEventListener("click", async () => {
    const block = blocks.find((b) => b.dataset.dialect === current);
    const copied = await copyText(block.textContent, block);
    status.textContent = copied ? "Copied." : "Selected: press Ctrl+C to copy.";
  });
  container.replaceChildren(
    h("h3", { text: "Copy as code" }),
    tabs,
    ...blocks,
    h("p", { class: "inline" }, copy, status),
  );
  select(current);
}
