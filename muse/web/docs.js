// The API docs page: reads /openapi.json and lists every operation -- method, path, summary, the request body's
// fields (type, default, description, required) and the replies. Served by the package itself, so it works offline
// (FastAPI's Swagger UI loads its code from a CDN). data-ready on #docs is "1" once rendered (the browser test waits
// on it), "error" if the schema could not be read.

"use strict";

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  for (const child of children) node.append(child);
  return node;
}

// A schema reference "#/components/schemas/Name" -> the schema it names.
function resolve(spec, schema) {
  while (schema && schema.$ref) {
    schema = schema.$ref.split("/").slice(1).reduce((node, key) => node[key], spec);
  }
  return schema || {};
}

// A readable type of a JSON schema: "integer", "string | array of string", "one of random, confidence", ...
function typeOf(spec, schema) {
  schema = resolve(spec, schema);
  const alternatives = schema.anyOf || schema.oneOf;
  if (alternatives) {
    const kinds = alternatives.map((s) => typeOf(spec, s)).filter((t) => t !== "null");
    return kinds.join(" | ") + (kinds.length < alternatives.length ? " | null" : "");
  }
  if (schema.enum) return "one of " + schema.enum.join(", ");
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  if (schema.type === "array") {
    const size = schema.minItems !== undefined && schema.minItems === schema.maxItems ? ` (${schema.minItems})` : "";
    return `array${size} of ${typeOf(spec, schema.items || {})}`;
  }
  return schema.type || "any";
}

function fieldsTable(spec, schema) {
  schema = resolve(spec, schema);
  const required = new Set(schema.required || []);
  const table = element("table", {}, element("tr", {}, element("th", {}, "field"), element("th", {}, "type"),
    element("th", {}, "default"), element("th", {}, "description")));
  for (const [name, field] of Object.entries(schema.properties || {})) {
    const shown = resolve(spec, field);
    const fallback = required.has(name) ? "required" : JSON.stringify(shown.default ?? null);
    table.append(element("tr", { class: "field", "data-field": name },
      element("td", {}, element("code", {}, name)), element("td", {}, typeOf(spec, field)),
      element("td", {}, fallback), element("td", {}, shown.description || "")));
  }
  return table;
}

function operationCard(spec, path, method, operation) {
  const id = `${method}-${path.replace(/[^a-z0-9]+/gi, "-")}`;
  const card = element("section", { class: "operation", id, "data-method": method.toUpperCase(), "data-path": path },
    element("h2", {}, element("span", { class: `method ${method}` }, method.toUpperCase()), path));
  if (operation.summary) card.append(element("p", {}, operation.summary));
  if (operation.description) card.append(element("p", { class: "muted" }, operation.description));
  const body = operation.requestBody?.content?.["application/json"]?.schema;
  if (body) {
    card.append(element("p", {}, "Body: JSON (", element("code", {}, "Content-Type: application/json"), ")"));
    card.append(fieldsTable(spec, body));
  }
  const replies = Object.entries(operation.responses || {}).map(([code, r]) => `${code} ${r.description || ""}`);
  if (replies.length) card.append(element("p", { class: "muted" }, "Replies: " + replies.join("; ")));
  return { card, id };
}

async function main() {
  const root = document.getElementById("docs");
  try {
    const response = await fetch("/openapi.json");
    if (!response.ok) throw new Error(`/openapi.json answered ${response.status}`);
    const spec = await response.json();
    document.getElementById("title").textContent = `${spec.info.title} ${spec.info.version || ""}`.trim();
    document.title = document.getElementById("title").textContent;
    document.getElementById("summary").textContent = spec.info.summary || spec.info.description || "";
    const toc = document.getElementById("toc");
    const list = document.getElementById("operations");
    for (const [path, methods] of Object.entries(spec.paths)) {
      for (const [method, operation] of Object.entries(methods)) {
        const { card, id } = operationCard(spec, path, method, operation);
        list.append(card);
        toc.append(element("a", { href: `#${id}` }, `${method.toUpperCase()} ${path}`));
      }
    }
    root.dataset.ready = "1";
  } catch (error) {
    const box = document.getElementById("error");
    box.textContent = `Could not read the API description: ${error.message}`;
    box.hidden = false;
    root.dataset.ready = "error";
  }
}

main();
