// A generation request as the playground holds it, dialect-free, and the sizes the model makes:
//   {model: "flux-klein-4b", input: {...the model's input, as POST /v1/predictions takes it...},
//    exact: null | {width, height} (an exact size: the OpenAI-style endpoint), referenceSize: null | [w, h]}
// The input's fields are whatever the model's schema has (GET /v1/models): fields this file does not know pass
// through untouched.

export const RATIOS = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"];
const MEGAPIXEL = 1024 * 1024;
export const OPENAI = { minSide: 256, maxSide: 2048, maxPixels: 1_048_576, maxSteps: 12, maxGuidance: 8 };

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
export function fit([width, height], { minSide, maxSide, maxPixels = Infinity }) {
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

export function nearestRatio(width, height) {
  const wanted = Math.log(width / height);
  const distance = (r) => Math.abs(Math.log(sizeForAspectRatio(r)[0] / sizeForAspectRatio(r)[1]) - wanted);
  return RATIOS.reduce((best, r) => (distance(r) < distance(best) ? r : best));
}

/** The request's output size in pixels (a reference's ratio for match_input_image or no ratio, when known). */
export function pixelSize(request) {
  if (request.exact) return [request.exact.width, request.exact.height];
  const ratio = request.input.aspect_ratio;
  if (ratio && ratio !== "match_input_image") return sizeForAspectRatio(ratio);
  if (request.referenceSize) return sizeForRatio(request.referenceSize[0] / request.referenceSize[1]);
  return [1024, 1024];
}

const list = (value) => (Array.isArray(value) ? value : []);

/** The body POST /v1/predictions gets: the input as the form made it. */
export function prunaInput(request) {
  return structuredClone(request.input);
}

/** The OpenAI-style endpoint's body (exact sizes): it knows fewer fields and lower bounds. */
export function openaiBody(request) {
  const input = request.input;
  const [width, height] = fit(pixelSize(request), OPENAI);
  const body = { prompt: input.prompt, model: request.model, size: `${width}x${height}` };
  if (input.seed >= 0) body.seed = input.seed;
  if (input.num_inference_steps !== undefined) body.num_inference_steps = Math.min(input.num_inference_steps, OPENAI.maxSteps);
  if (input.guidance !== undefined) body.guidance_scale = Math.min(input.guidance, OPENAI.maxGuidance);
  const format = input.output_format || "jpg";
  body.output_format = format === "jpg" ? "jpeg" : format;
  if ((input.num_outputs ?? 1) > 1) body.n = input.num_outputs;
  body.response_format = "url";
  if (list(input.images).length) body.images = [...input.images];
  return body;
}

// Other dialects' names for the model's fields, so a prediction submitted in any of them reads back as a form.
const FOREIGN = { guidance_scale: "guidance", format: "output_format", image_uris: "images", n: "num_outputs", num_images: "num_outputs" };

/** A request rebuilt from a stored prediction's input (whichever dialect submitted it), with the seed it ran
 * with; `fields`, when known, are the model's schema properties: other keys are dropped. */
export function requestFromInput(model, stored, seed, fields = null) {
  const input = {};
  let exact = null;
  for (const [name, value] of Object.entries(stored || {})) {
    if (name === "size" && typeof value === "string" && value !== "auto") {
      const [width, height] = value.split(/[x*]/).map(Number);
      if (Number.isFinite(width) && Number.isFinite(height)) exact = { width, height };
    } else if (value !== null && value !== undefined) {
      input[FOREIGN[name] || name] = value;
    }
  }
  if (typeof input.images === "string") input.images = input.images.split(",").map((u) => u.trim()).filter(Boolean);
  if (input.output_format === "jpeg") input.output_format = "jpg";
  if (Array.isArray(input.loras)) input.loras = input.loras.map((l) => ({ path: String(l.path), scale: l.scale ?? 1 }));
  if (Number.isInteger(seed)) input.seed = seed;
  if (fields) for (const name of Object.keys(input)) if (!fields.includes(name)) delete input[name];
  for (const name of ["images", "loras"]) if (Array.isArray(input[name]) && !input[name].length) delete input[name];
  return { model, input, exact, referenceSize: null };
}
