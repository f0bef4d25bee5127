// The models this deployment serves, as GET /v1/models describes them (id, aliases, notes, input_schema,
// max_loras, and with a key the weights it runs), and their input schemas read as a list of fields.

let catalogue = null; // the last answer: [model]

/** GET /v1/models: with the key when it is a valid one (the weights are shown only then), else anonymously. */
export async function loadModels(api, withKey) {
  const answer = withKey ? await api.get("/v1/models") : await (await fetch("/v1/models", { cache: "no-store" })).json();
  const all = answer.data || [];
  const served = all.filter((model) => model.served);
  catalogue = served.length ? served : all;
  return catalogue;
}

export const models = () => catalogue || [];
export const modelById = (id) => models().find((model) => model.id === id) || null;

/** The schema's `#/$defs/…` reference resolved. */
function deref(schema, root) {
  if (schema?.$ref?.startsWith("#/$defs/")) return root.$defs?.[schema.$ref.slice(8)] || {};
  return schema || {};
}

/**
 * The schema's fields in its own order: {name, title, description, type, default, nullable, enum, minimum,
 * maximum, maxLength, maxItems, items}. `anyOf: [X, null]` (an optional field) reads as X, nullable.
 */
export function fieldsOf(schema) {
  const required = new Set(schema.required || []);
  return Object.entries(schema.properties || {}).map(([name, raw]) => {
    let prop = deref(raw, schema);
    let nullable = false;
    if (Array.isArray(prop.anyOf)) {
      const kinds = prop.anyOf.map((p) => deref(p, schema));
      nullable = kinds.some((p) => p.type === "null");
      prop = { ...raw, ...(kinds.find((p) => p.type !== "null") || {}), anyOf: undefined };
    }
    return {
      name,
      title: raw.title || prop.title || name,
      description: raw.description || prop.description || "",
      type: prop.type || (prop.enum ? "string" : "string"),
      default: raw.default ?? prop.default,
      required: required.has(name),
      nullable,
      enum: prop.enum || null,
      minimum: prop.minimum ?? prop.exclusiveMinimum,
      maximum: prop.maximum ?? prop.exclusiveMaximum,
      maxLength: prop.maxLength,
      maxItems: prop.maxItems,
      items: prop.items ? deref(prop.items, schema) : null,
    };
  });
}
