// The API tab: one request (js/request.js) written for curl, JavaScript and each client the platform speaks.
// To add a client: write `build(request, target)` returning its code, and add it to DIALECTS. `target` is
// {origin, model: the catalogue entry of GET /v1/models (id, aliases)}. The key stays out of the code (and out
// of screenshots and clipboard history): $KLEIN_API_KEY.

import { copyText, h } from "./dom.js";
import { fit, nearestRatio, openaiBody, pixelSize, prunaInput } from "./request.js";

const WAVESPEED = { minSide: 256, maxSide: 1536, maxSeed: 2147483647 };
const FAL = { minSide: 256, maxSide: 1536, maxSteps: 50, maxGuidance: 20 };
const BFL = { minSide: 64, maxSide: 8192, maxPixels: 4 * 1024 * 1024 };
// Replicate's input for klein (api/routes/dialects/replicate_input.py): the model's own fields it passes on.
const REPLICATE_FIELDS = ["prompt", "aspect_ratio", "seed", "num_inference_steps", "guidance", "output_format", "output_quality", "num_outputs"];

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

const js = (value) => JSON.stringify(value, null, 2).replaceAll("\n", "\n  ");
const format = (request) => request.input.output_format || "jpg";
const file = (request) => `output.${format(request)}`;
const images = (request) => request.input.images || [];
const loras = (request) => request.input.loras || [];

/** Notes every snippet carries: uploaded references are links that expire. */
function common(request, comment) {
  return images(request).some((url) => url.includes("/v1/files/"))
    ? [`${comment} The reference images are uploads (POST /v1/files): their links expire (24 h by default).`]
    : [];
}

/** The model's name in Replicate's owner/name form. */
function replicateName(target) {
  return [target.model.id, ...(target.model.aliases || [])].find((n) => n.startsWith("black-forest-labs/")) || target.model.id;
}

function replicateInput(request, comment) {
  const input = {};
  const notes = [];
  for (const name of REPLICATE_FIELDS) if (request.input[name] !== undefined) input[name] = request.input[name];
  if (input.seed !== undefined && input.seed < 0) delete input.seed;
  if (images(request).length) input.input_images = [...images(request)];
  const dropped = Object.keys(request.input).filter((n) => !REPLICATE_FIELDS.includes(n) && n !== "images" && n !== "seed");
  // Fields left at what changes nothing (off, empty, the result cache on) are not worth a note.
  const meaningful = dropped.filter((n) => request.input[n] !== false && !(n === "cache" && request.input[n] === true) && !(Array.isArray(request.input[n]) && !request.input[n].length));
  if (meaningful.length) notes.push(`${comment} Replicate's input here has no ${meaningful.join(", ")}: this picture is made without.`);
  return { input, notes };
}

function curl(request, target) {
  const { origin } = target;
  const out = file(request);
  const lines = ["# export KLEIN_API_KEY=<your key>", ...common(request, "#")];
  if (request.exact) {
    lines.push(
      "# Exact sizes: the OpenAI-style endpoint answers when the image is ready, with signed links.",
      ...(loras(request).length ? ["# This endpoint takes no LoRAs: this picture is made without them."] : []),
      `curl -sS -X POST ${shellQuote(`${origin}/v1/images/generations`)} \\`,
      `  -H "apikey: $KLEIN_API_KEY" -H 'Content-Type: application/json' \\`,
      `  -d ${shellQuote(JSON.stringify(openaiBody(request)))} -o answer.json`,
      `url=$(sed -nE 's/.*"url":"([^"]+)".*/\\1/p' answer.json)`,
    );
  } else {
    lines.push(
      "# Try-Sync waits for the image (up to the server's limit); the second curl downloads it.",
      `curl -sS -X POST ${shellQuote(`${origin}/v1/predictions`)} \\`,
      `  -H "apikey: $KLEIN_API_KEY" -H ${shellQuote(`Model: ${request.model}`)} -H 'Try-Sync: true' \\`,
      "  -H 'Content-Type: application/json' \\",
      `  -d ${shellQuote(JSON.stringify({ input: prunaInput(request) }))} -o prediction.json`,
      `url=$(sed -nE 's/.*"generation_url":"([^"]+)".*/\\1/p' prediction.json)`,
    );
  }
  lines.push(
    `test -n "$url" || { cat ${request.exact ? "answer" : "prediction"}.json; exit 1; }  # failed, or still running: see its get_url`,
    `curl -sS -f -H "apikey: $KLEIN_API_KEY" -o ${out} "$url" && echo "saved ${out}"`,
  );
  return lines.join("\n");
}

function fetchJs(request, target) {
  const { origin } = target;
  const ext = format(request);
  return [
    "// Node 18+ as an ES module (node generate.mjs), or a page on this origin; export KLEIN_API_KEY=<your key>",
    ...common(request, "//"),
    'import { writeFile } from "node:fs/promises";',
    "",
    "const key = process.env.KLEIN_API_KEY;",
    `const response = await fetch(${JSON.stringify(`${origin}/v1/predictions`)}, {`,
    '  method: "POST",',
    `  headers: { apikey: key, Model: ${JSON.stringify(request.model)}, "Try-Sync": "true", "Content-Type": "application/json" },`,
    `  body: JSON.stringify({ input: ${js(prunaInput(request))} }),`,
    "});",
    "if (!response.ok) throw new Error(`HTTP ${response.status}: ${await response.text()}`);",
    "let prediction = await response.json();",
    'while (["starting", "processing"].includes(prediction.status)) { // not done within the Try-Sync wait',
    "  await new Promise((resolve) => setTimeout(resolve, 1000));",
    "  prediction = await (await fetch(prediction.get_url, { headers: { apikey: key } })).json();",
    "}",
    'if (prediction.status !== "succeeded") throw new Error(`${prediction.status}: ${prediction.error}`);',
    "for (const [i, url] of prediction.generation_urls.entries()) {",
    "  const image = await fetch(url, { headers: { apikey: key } });",
    `  const name = i ? \`output-\${i + 1}.${ext}\` : "output.${ext}";`,
    "  await writeFile(name, Buffer.from(await image.arrayBuffer()));",
    '  console.log("saved", name, "seed", prediction.seed);',
    "}",
  ].join("\n");
}

function pruna(request, target) {
  const notes = [];
  let input = prunaInput(request);
  if (request.exact) {
    const ratio = nearestRatio(request.exact.width, request.exact.height);
    notes.push(`# This dialect takes aspect ratios; the nearest to ${request.exact.width}x${request.exact.height} is ${ratio}.`);
    input = { ...input, aspect_ratio: ratio };
  }
  const out = file(request);
  return [
    "# pip install pruna-client; export KLEIN_API_KEY=<your key>",
    ...notes,
    ...common(request, "#"),
    "import os",
    "",
    "from pruna_client import PrunaClient",
    "",
    'client = PrunaClient(api_key=os.environ["KLEIN_API_KEY"], timeout=120)',
    `client.base_url = ${py(`${target.origin}/v1`)}`,
    `response = client.generate(${py(request.model)}, ${py(input)})`,
    'if response.response.get("status") in ("starting", "processing"):  # not done within the Try-Sync wait',
    "    response = client.poll_status(response=response)",
    "result = response.response",
    'if result.get("status") != "succeeded":',
    `    raise SystemExit(f"failed: {result.get('error')}")`,
    `with open(${py(out)}, "wb") as f:`,
    '    f.write(client.download_content(result["generation_url"]))',
    `print("saved", ${py(out)}, "seed", result["seed"])`,
  ].join("\n");
}

function replicatePython(request, target) {
  const { input, notes } = replicateInput(request, "#");
  const ext = format(request);
  return [
    "# pip install replicate; export KLEIN_API_KEY=<your key>",
    ...notes,
    ...common(request, "#"),
    "import os",
    "import urllib.request",
    "",
    "import replicate",
    "",
    `client = replicate.Client(api_token=os.environ["KLEIN_API_KEY"], base_url=${py(target.origin)})`,
    `outputs = client.run(${py(replicateName(target))}, input=${py(input)})`,
    "for i, output in enumerate(outputs):",
    `    name = f"output-{i + 1}.${ext}" if i else "output.${ext}"`,
    "    # A file object over https; a signed link (no key needed) as a plain string over http.",
    '    data = output.read() if hasattr(output, "read") else urllib.request.urlopen(output).read()',
    '    with open(name, "wb") as f:',
    "        f.write(data)",
    '    print("saved", name)',
  ].join("\n");
}

function replicateJs(request, target) {
  const { input, notes } = replicateInput(request, "//");
  const ext = format(request);
  return [
    "// npm install replicate; export KLEIN_API_KEY=<your key>; then node generate.mjs",
    ...notes,
    ...common(request, "//"),
    'import { writeFile } from "node:fs/promises";',
    'import Replicate from "replicate";',
    "",
    `const replicate = new Replicate({ auth: process.env.KLEIN_API_KEY, baseUrl: ${JSON.stringify(`${target.origin}/v1`)} });`,
    `const outputs = await replicate.run(${JSON.stringify(replicateName(target))}, { input: ${js(input)} });`,
    "for (const [i, output] of outputs.entries()) {",
    `  const name = i ? \`output-\${i + 1}.${ext}\` : "output.${ext}";`,
    "  // A FileOutput over https; over plain http the client hands back the signed link as a string.",
    "  const data = typeof output === \"string\" ? Buffer.from(await (await fetch(output)).arrayBuffer()) : output;",
    "  await writeFile(name, data);",
    '  console.log("saved", name);',
    "}",
  ].join("\n");
}

// The page encodes JPEG and WebP at the form's quality; WaveSpeed and the OpenAI style at 90.
function qualityNote(request) {
  if (format(request) === "png") return [];
  const quality = request.input.output_quality ?? 80;
  return quality === 90 ? [] : [`# This dialect encodes JPEG/WebP at quality 90 (the form: ${quality}): the same picture, not the same bytes.`];
}

function wavespeed(request, target) {
  const input = request.input;
  const [width, height] = fit(pixelSize(request), WAVESPEED);
  const notes = [];
  if (request.model !== "flux-klein-4b") notes.push("# WaveSpeed's endpoints serve the distilled model (flux-klein-4b) only.");
  const [w0, h0] = pixelSize(request);
  if (w0 !== width || h0 !== height) notes.push(`# This dialect's sides are at most 1536 px: ${width}*${height}.`);
  if ((input.num_inference_steps ?? 4) !== 4 || (input.guidance ?? 1) !== 1) notes.push("# This dialect always runs 4 steps at guidance 1.0.");
  if ((input.num_outputs ?? 1) > 1) notes.push("# This dialect makes one image per request.");
  const body = { prompt: input.prompt, size: `${width}*${height}` };
  if (input.seed > WAVESPEED.maxSeed) notes.push("# This dialect's seeds stop at 2147483647: a random one here.");
  else if (input.seed >= 0) body.seed = input.seed;
  body.output_format = format(request) === "jpg" ? "jpeg" : format(request);
  notes.push(...qualityNote(request));
  if (images(request).length) body.images = [...images(request)];
  if (loras(request).length) body.loras = loras(request).map((lora) => ({ ...lora }));
  const task = `${images(request).length ? "edit" : "text-to-image"}${loras(request).length ? "-lora" : ""}`;
  return [
    "# pip install wavespeed; export KLEIN_API_KEY=<your key>",
    ...notes,
    ...common(request, "#"),
    "import os",
    "import urllib.request",
    "",
    "import wavespeed",
    "",
    `client = wavespeed.Client(api_key=os.environ["KLEIN_API_KEY"], base_url=${py(target.origin)})`,
    `result = client.run(${py(`wavespeed-ai/flux-2-klein-4b/${task}`)}, ${py(body)})`,
    `urllib.request.urlretrieve(result["outputs"][0], ${py(file(request))})  # a signed link: no key needed`,
    `print("saved", ${py(file(request))})`,
  ].join("\n");
}

function openai(request, target) {
  const body = openaiBody(request);
  const notes = [];
  const [w0, h0] = pixelSize(request);
  if (body.size !== `${w0}x${h0}`) notes.push(`# This dialect allows at most 1,048,576 pixels: ${body.size}.`);
  if (body.num_inference_steps !== request.input.num_inference_steps) notes.push("# This dialect allows at most 12 steps.");
  if (body.guidance_scale !== request.input.guidance) notes.push("# This dialect allows guidance up to 8.");
  if (loras(request).length) notes.push("# This dialect takes no LoRAs: this picture is made without them.");
  notes.push(...qualityNote(request));
  const extra = {};
  for (const name of ["seed", "num_inference_steps", "guidance_scale", "output_format", "n", "images"]) {
    if (body[name] !== undefined) extra[name] = body[name];
  }
  return [
    "# pip install openai; export KLEIN_API_KEY=<your key>",
    ...notes,
    ...common(request, "#"),
    "import os",
    "import urllib.request",
    "",
    "from openai import OpenAI",
    "",
    `client = OpenAI(api_key=os.environ["KLEIN_API_KEY"], base_url=${py(`${target.origin}/v1`)})`,
    "result = client.images.generate(",
    `    model=${py(body.model)},`,
    `    prompt=${py(body.prompt)},`,
    `    size=${py(body.size)},`,
    `    extra_body=${py(extra, "    ")},`,
    ")",
    `urllib.request.urlretrieve(result.data[0].url, ${py(file(request))})  # a signed link: no key needed`,
    `print("saved", ${py(file(request))})`,
  ].join("\n");
}

// fal's queue API through fal-client (docs.fal.ai, "Queue"), which speaks https only and reads its hosts at import.
function fal(request, target) {
  const input = request.input;
  const [width, height] = fit(pixelSize(request), FAL);
  const [w0, h0] = pixelSize(request);
  const notes = ["# fal-client speaks https only: this server must too (klein up --tls-cert/--tls-key, or a TLS proxy)."];
  if (w0 !== width || h0 !== height) notes.push(`# This dialect's sides are 256–1536 px: ${width}x${height}.`);
  if (loras(request).length) notes.push("# This dialect's klein endpoints take no LoRAs: made without them.");
  notes.push(...qualityNote(request));
  const body = { prompt: input.prompt, image_size: { width, height } };
  if (input.seed >= 0) body.seed = input.seed;
  if (input.num_inference_steps !== undefined) body.num_inference_steps = Math.min(input.num_inference_steps, FAL.maxSteps);
  if (input.guidance !== undefined) body.guidance_scale = Math.min(input.guidance, FAL.maxGuidance);
  if ((input.num_outputs ?? 1) > 1) body.num_images = input.num_outputs;
  body.output_format = format(request) === "jpg" ? "jpeg" : format(request);
  if (images(request).length) body.image_urls = [...images(request)];
  const base = request.model !== "flux-klein-4b";
  const app = `fal-ai/flux-2/klein/4b${base ? "/base" : ""}${images(request).length ? "/edit" : ""}`;
  const host = new URL(target.origin).host;
  return [
    "# pip install fal-client; export KLEIN_API_KEY=<your key>",
    ...notes,
    ...common(request, "#"),
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
    `urllib.request.urlretrieve(result["images"][0]["url"], ${py(file(request))})  # a signed link: no key needed`,
    `print("saved", ${py(file(request))}, "seed", result["seed"])`,
  ].join("\n");
}

// Black Forest Labs' API (docs.bfl.ai): submit, poll the polling_url, download result.sample.
function bfl(request, target) {
  const input = request.input;
  const [width, height] = fit(pixelSize(request), BFL);
  const notes = [];
  if ((input.num_inference_steps ?? 4) !== 4 || (input.guidance ?? 1) !== 1) notes.push("# This dialect always runs 4 steps at guidance 1.0.");
  if ((input.num_outputs ?? 1) > 1) notes.push("# This dialect makes one image per request.");
  if (loras(request).length) notes.push("# This dialect takes no LoRAs: this picture is made without them.");
  notes.push(...qualityNote(request));
  const body = { prompt: input.prompt, width, height };
  if (input.seed >= 0) body.seed = input.seed;
  body.output_format = format(request) === "jpg" ? "jpeg" : format(request);
  images(request).forEach((url, i) => {
    body[i ? `input_image_${i + 1}` : "input_image"] = url;
  });
  const endpoint = request.model !== "flux-klein-4b" ? "flux-2-klein-base-4b" : "flux-2-klein-4b";
  return [
    "# pip install requests; export KLEIN_API_KEY=<your key>",
    ...notes,
    ...common(request, "#"),
    "import os",
    "import time",
    "",
    "import requests",
    "",
    'headers = {"x-key": os.environ["KLEIN_API_KEY"]}',
    `task = requests.post(${py(`${target.origin}/v1/${endpoint}`)}, headers=headers, json=${py(body)}).json()`,
    'while (result := requests.get(task["polling_url"], headers=headers).json())["status"] == "Pending":',
    "    time.sleep(0.5)",
    'if result["status"] != "Ready":',
    `    raise SystemExit(f"{result['status']}: {result.get('error')}")`,
    `with open(${py(file(request))}, "wb") as f:`,
    '    f.write(requests.get(result["result"]["sample"]).content)  # a signed link: no key needed',
    `print("saved", ${py(file(request))}, "seed", result["result"]["seed"])`,
  ].join("\n");
}

// `exact`: whether it can ask for an exact size itself (else it says what it sends instead).
export const DIALECTS = [
  { id: "curl", label: "curl", build: curl },
  { id: "fetch", label: "JavaScript (fetch)", build: fetchJs },
  { id: "pruna", label: "pruna-client", build: pruna },
  { id: "replicate-python", label: "Replicate (Python)", build: replicatePython },
  { id: "replicate-js", label: "Replicate (JS)", build: replicateJs },
  { id: "wavespeed", label: "wavespeed", build: wavespeed },
  { id: "openai", label: "openai", build: openai },
  { id: "fal", label: "fal-client", build: fal },
  { id: "bfl", label: "BFL (requests)", build: bfl },
];

/** A tabbed panel with the request as code in each dialect, and a Copy button; the chosen tab is kept when
 * the same container is rendered again (the API tab follows the form as it changes). */
export function renderSnippets(container, request, target) {
  let current = container.dataset.dialect || DIALECTS[0].id;
  const tabs = h("div", { class: "snippet-tabs", role: "tablist", "aria-label": "The request as code" });
  const blocks = DIALECTS.map((dialect) =>
    h(
      "pre",
      { class: "code", "data-dialect": dialect.id, role: "tabpanel", "aria-label": `${dialect.label} code` },
      h("code", { text: dialect.build(request, { origin: location.origin, ...target }) }),
    ),
  );
  const status = h("span", { class: "hint", role: "status" });
  const copy = h("button", { type: "button", class: "small", "data-action": "copy" }, "Copy");
  const select = (id) => {
    current = id;
    container.dataset.dialect = id;
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
  container.replaceChildren(tabs, ...blocks, h("p", { class: "inline" }, copy, status));
  select(current);
}
