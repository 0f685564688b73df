// musegen web editor: one page over the JSON and server-sent-event API of `muse serve` (muse/server.py).
// Plain JavaScript, no build step and nothing fetched from elsewhere, so the page works offline wherever the server runs.
//
// The page holds:
//   - a history of images (the server's PNGs, kept as the exact base64 it sent, so an edit sends back the same bytes);
//   - one mask at the current image's size, a byte per pixel, 1 = regenerate (white in the PNG sent to /inpaint);
//   - at most one request in flight, whose `step` events draw live previews over the image.
// `window.museEditor.state` is that state, for the browser test and for anyone poking at the page from devtools.
"use strict";

const HISTORY_LIMIT = 50; // images kept in the strip; the oldest go first
const MASK_RGBA = [40, 90, 255, 115]; // the mask overlay's colour: translucent, so the image shows through

const state = {
  config: null, // GET /config: resolution, stride, has_superres, defaults, limits, preview_every
  history: [], // entries {png (base64), width, height, label, seed, image (decoded HTMLImageElement)}
  current: -1, // index of the entry shown
  mask: null, // Uint8Array(width * height), 1 = regenerate
  maskWidth: 0,
  maskHeight: 0,
  tool: "brush", // or "eraser"
  brush: 8, // brush diameter in image pixels
  controller: null, // AbortController of the request in flight; null when idle
  previews: 0, // previews drawn during the latest request
  events: [], // what the latest request drew, in order: "preview", "final", "error" (the test reads it)
  requests: 0, // requests finished, well or not
  scale: 1, // CSS pixels per image pixel
  lastPoint: null, // the previous pointer position of the stroke being painted, in image pixels
};

const $ = (id) => document.getElementById(id);
const imageCanvas = () => $("image");
const maskCanvas = () => $("mask");

// ---------------------------------------------------------------------------------------------------------------
// Start-up

async function init() {
  bindControls();
  bindPainting();
  bindKeyboard();
  updateButtons();
  // The stage changes size with the window and when the history strip fills: refit the image each time.
  new ResizeObserver(layout).observe($("stage"));
  try {
    applyConfig(await fetchJSON("/config"));
  } catch (e) {
    showError(`Cannot read the server's /config: ${e.message}`);
    return;
  }
  publish();
}

async function fetchJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  return response.json();
}

function applyConfig(config) {
  state.config = config;
  const { defaults, limits, stride, resolution } = config;
  setNumber("steps", defaults.num_steps, { max: limits.max_steps });
  setNumber("guidance", defaults.guidance_scale);
  setNumber("candidates", Math.min(defaults.num_candidates, limits.max_candidates), { max: limits.max_candidates });
  for (const side of ["left", "top", "right", "bottom"]) {
    setNumber(`pad-${side}`, 0, { step: stride, max: limits.max_pad });
  }
  $("pad-note").textContent = `(px per side, multiples of ${stride})`;
  $("upscale").hidden = !config.has_superres;
  const size = $("brush-size");
  size.max = String(Math.max(8, resolution / 2));
  setBrush(stride); // one token wide: the server regenerates whole tokens (and a margin) around any painted pixel
  $("model-info").textContent =
    `${resolution} px images · ${stride} px per token · previews every ${config.preview_every} steps`;
  resetMask(resolution, resolution);
  layout();
  $("editor").dataset.ready = "1";
}

function setNumber(id, value, { max, step } = {}) {
  const input = $(id);
  input.value = String(value);
  if (max !== undefined) input.max = String(max);
  if (step !== undefined) input.step = String(step);
}

function bindControls() {
  $("generate").addEventListener("click", generate);
  $("inpaint").addEventListener("click", inpaint);
  $("outpaint").addEventListener("click", outpaint);
  $("edit").addEventListener("click", edit);
  $("upscale").addEventListener("click", upscale);
  $("cancel").addEventListener("click", cancel);
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);
  $("dice").addEventListener("click", () => {
    $("seed").value = String(randomSeed());
  });
  $("brush").addEventListener("click", () => setTool("brush"));
  $("eraser").addEventListener("click", () => setTool("eraser"));
  $("clear-mask").addEventListener("click", () => {
    state.mask.fill(0);
    renderMask();
  });
  $("brush-size").addEventListener("input", (e) => setBrush(Number(e.target.value)));
  $("strength").addEventListener("input", showStrength);
  showStrength();
  $("error-close").addEventListener("click", clearError);
  $("load").addEventListener("change", (e) => {
    const file = e.target.files[0];
    e.target.value = ""; // so that choosing the same file again still fires `change`
    if (file) loadFile(file);
  });
  for (const side of ["left", "top", "right", "bottom"]) {
    $(`pad-${side}`).addEventListener("change", (e) => {
      e.target.value = String(padValue(e.target));
    });
  }
  for (const id of ["prompt", "negative"]) {
    $(id).addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.isComposing) {
        e.preventDefault();
        generate();
      }
    });
  }
}

function showStrength() {
  $("strength-value").textContent = Number($("strength").value).toFixed(2);
}

// ---------------------------------------------------------------------------------------------------------------
// Tasks: each builds its own fields and hands them to the one request path, `runTask`

function generate() {
  runTask("/generate", {}, "generate");
}

function inpaint() {
  const entry = currentEntry();
  if (!entry) return showError("Generate or load an image first.");
  if (!state.mask.includes(1)) return showError("Paint the part to regenerate first (B: brush).");
  runTask("/inpaint", { image: entry.png, mask: maskPNG() }, "inpaint");
}

function outpaint() {
  const entry = currentEntry();
  if (!entry) return showError("Generate or load an image first.");
  const pad = ["left", "top", "right", "bottom"].map((side) => padValue($(`pad-${side}`)));
  if (pad.every((p) => p === 0)) return showError("Set a pad on at least one side to outpaint.");
  runTask("/outpaint", { image: entry.png, pad }, "outpaint");
}

function edit() {
  const entry = currentEntry();
  if (!entry) return showError("Generate or load an image first.");
  runTask("/edit", { image: entry.png, strength: Number($("strength").value) }, "edit");
}

function upscale() {
  const entry = currentEntry();
  if (!entry) return showError("Generate or load an image first.");
  runTask("/upscale", { image: entry.png }, "upscale");
}

// A pad in pixels, rounded to a multiple of the stride (the server refuses others) and clamped to 0..max_pad.
function padValue(input) {
  const { stride, limits } = state.config;
  const value = Math.round((Number(input.value) || 0) / stride) * stride;
  return Math.min(Math.max(value, 0), limits.max_pad);
}

// The fields every task shares: prompt, seed, and the sampling options shown in the panel.
function sharedFields(endpoint, seed) {
  const fields = {
    prompt: $("prompt").value,
    seed,
    num_images: 1,
    guidance_scale: numberOr($("guidance"), state.config.defaults.guidance_scale),
  };
  // Best-of-N as the command line does it: generation takes the field (the model's default to start with); the
  // editing tasks make one candidate, as `muse inpaint` and the others do unless asked.
  if (endpoint === "/generate") fields.num_candidates = numberOr($("candidates"), state.config.defaults.num_candidates);
  // /upscale runs the super-res stage alone and refuses `num_steps` (its steps are `superres_steps`).
  if (endpoint !== "/upscale") fields.num_steps = numberOr($("steps"), state.config.defaults.num_steps);
  const negative = $("negative").value.trim();
  if (negative) fields.negative_prompt = negative;
  return fields;
}

// An empty or unreadable number field falls back to the model's default; out-of-range values go to the server,
// whose error names the limit.
function numberOr(input, fallback) {
  return input.value === "" || Number.isNaN(input.valueAsNumber) ? fallback : input.valueAsNumber;
}

function randomSeed() {
  return crypto.getRandomValues(new Uint32Array(1))[0]; // the server's seeds are 32-bit
}

// An empty seed field means a fresh random seed per request; the one used is shown and kept with the image.
function chooseSeed() {
  const value = $("seed").value;
  return value === "" ? randomSeed() : Number(value);
}

// ---------------------------------------------------------------------------------------------------------------
// The request path: POST with "stream": true, then read the server-sent events

async function runTask(endpoint, fields, label) {
  if (state.controller || !state.config) return;
  clearError();
  const controller = new AbortController();
  const started = performance.now();
  const seed = chooseSeed();
  state.previews = 0;
  state.events = [];
  let drawing = Promise.resolve(); // previews decode asynchronously; chaining keeps them, and the result, in order
  setBusy(controller);
  showProgress(0, 1, `starting ${label}, seed ${seed}…`);
  try {
    const response = await fetch(endpoint, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify({ ...sharedFields(endpoint, seed), ...fields, stream: true }),
      signal: controller.signal,
    }).catch((e) => {
      if (e.name === "AbortError") throw e;
      throw new Error(`Cannot reach the server (${e.message}). Is muse serve still running?`);
    });
    // Refusals that need no decoding (400, 413, 429) come back as plain JSON, not as a stream.
    if (!(response.headers.get("content-type") || "").startsWith("text/event-stream")) {
      throw new Error(await refusal(response));
    }
    let result = null;
    for await (const { event, data } of serverEvents(response)) {
      const payload = JSON.parse(data);
      if (event === "queued") {
        const ahead = payload.position;
        showProgress(0, 1, ahead ? `queued behind ${ahead} other request${ahead > 1 ? "s" : ""}` : "queued");
      } else if (event === "step") {
        showStep(payload);
        if (payload.preview) drawing = drawing.then(() => drawPreview(payload.preview));
      } else if (event === "done") {
        result = payload;
        break;
      } else if (event === "error") {
        throw new Error(describeFailure(payload.status, payload.error));
      }
    }
    if (!result) throw new Error("The server closed the stream before sending the result.");
    await drawing;
    const entry = await makeEntry(result.images[0], label, result.seeds[0]);
    pushHistory(entry);
    state.events.push("final");
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(`${label}: ${entry.width}×${entry.height}, seed ${entry.seed}, ${seconds} s`);
    $("progress-text").textContent += " · done";
  } catch (e) {
    await drawing.catch(() => {});
    state.events.push("error");
    if (e.name === "AbortError") setStatus(`${label} cancelled`);
    else showError(e.message);
    showProgress(0, 1, "idle");
    showCurrent(); // a preview may be on the canvas: put the image back
  } finally {
    state.requests += 1;
    setBusy(null);
  }
}

// Server-sent events of a fetch() response, as {event, data} (EventSource cannot POST a body, so this parses the
// text/event-stream format itself: blocks separated by a blank line, "field: value" lines, data lines joined).
async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const parsed = parseEventBlock(block);
        if (parsed) yield parsed;
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // we stop reading after "done": let the connection go
  }
}

function parseEventBlock(block) {
  let event = "message";
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (line === "" || line.startsWith(":")) continue; // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event, data: data.join("\n") } : null;
}

// The message of a refused request: the server's JSON {"error"} when there is one, with what the status means.
async function refusal(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error) message = body.error;
  } catch {
    // not JSON (a proxy's page, an empty 499): the status alone
  }
  if (response.status === 429) {
    const wait = response.headers.get("retry-after");
    return `The server is busy (429)${wait ? `; try again in ${wait} s` : ""}: ${message}`;
  }
  return describeFailure(response.status, message);
}

function describeFailure(status, message) {
  const kind = { 400: "Refused", 408: "Too slow", 413: "Too large", 429: "Busy", 504: "Timed out" }[status] || "Failed";
  return `${kind} (${status}): ${message}`;
}

function showStep({ job, step, steps }) {
  const stage = job > 0 ? ` (job ${job + 1})` : "";
  showProgress(step, steps, `step ${step} / ${steps}${stage}`);
}

function showProgress(value, max, text) {
  $("progress").max = max;
  $("progress").value = value;
  $("progress-text").textContent = text;
}

async function drawPreview(png) {
  if (!state.controller) return; // the request ended while this preview was decoding
  const image = await decodePNG(png);
  drawImage(image);
  $("frame").classList.add("previewing"); // the mask is hidden under a preview: it may be another size
  state.previews += 1;
  state.events.push("preview");
  publish();
}

function cancel() {
  if (state.controller) state.controller.abort(); // the server cancels the job when the connection drops
}

function setBusy(controller) {
  state.controller = controller;
  $("cancel").hidden = !controller;
  $("frame").classList.remove("previewing");
  updateButtons();
  publish();
}

// ---------------------------------------------------------------------------------------------------------------
// History

async function makeEntry(png, label, seed) {
  const image = await decodePNG(png);
  return { png, width: image.naturalWidth, height: image.naturalHeight, label, seed, image };
}

function decodePNG(png) {
  const image = new Image();
  image.src = `data:image/png;base64,${png}`;
  return image.decode().then(() => image);
}

// A new image always goes to the end of the strip, even after an undo: nothing made is ever dropped, and undo /
// redo walk the strip.
function pushHistory(entry) {
  state.history.push(entry);
  if (state.history.length > HISTORY_LIMIT) state.history.shift();
  select(state.history.length - 1);
}

function select(index) {
  if (index < 0 || index >= state.history.length) return;
  state.current = index;
  showCurrent();
  renderHistory();
  updateButtons();
  publish();
}

function undo() {
  if (!state.controller) select(state.current - 1);
}

function redo() {
  if (!state.controller) select(state.current + 1);
}

function currentEntry() {
  return state.history[state.current] || null;
}

function showCurrent() {
  const entry = currentEntry();
  $("placeholder").hidden = Boolean(entry);
  if (!entry) return;
  drawImage(entry.image);
  if (entry.width !== state.maskWidth || entry.height !== state.maskHeight) {
    resetMask(entry.width, entry.height); // a mask only makes sense at its image's size
  }
  const download = $("download");
  download.href = entry.image.src;
  download.download = `muse-${entry.label}${entry.seed === null ? "" : `-${entry.seed}`}.png`;
  download.removeAttribute("aria-disabled");
}

function drawImage(image) {
  const canvas = imageCanvas();
  if (canvas.width !== image.naturalWidth || canvas.height !== image.naturalHeight) {
    canvas.width = image.naturalWidth;
    canvas.height = image.naturalHeight;
    layout();
  }
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.clearRect(0, 0, canvas.width, canvas.height);
  context.drawImage(image, 0, 0);
}

function renderHistory() {
  const strip = $("history-strip");
  strip.replaceChildren(
    ...state.history.map((entry, i) => {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      const name = `${i + 1}: ${entry.label}${entry.seed !== null ? `, seed ${entry.seed}` : ""}, ` +
        `${entry.width}×${entry.height}`;
      button.title = name;
      button.setAttribute("aria-label", name);
      if (i === state.current) button.setAttribute("aria-current", "true");
      button.addEventListener("click", () => {
        if (!state.controller) select(i);
      });
      const thumb = document.createElement("img");
      thumb.src = entry.image.src;
      thumb.alt = "";
      button.append(thumb);
      item.append(button);
      return item;
    }),
  );
  const current = strip.querySelector("[aria-current]");
  if (current) current.scrollIntoView({ block: "nearest", inline: "nearest" });
}

function updateButtons() {
  const busy = Boolean(state.controller);
  const hasImage = Boolean(currentEntry());
  for (const button of document.querySelectorAll("button[data-needs]")) {
    button.disabled = busy || (button.dataset.needs === "image" && !hasImage);
  }
  $("undo").disabled = busy || state.current <= 0;
  $("redo").disabled = busy || state.current >= state.history.length - 1;
}

// ---------------------------------------------------------------------------------------------------------------
// Loading an image from disk: scaled so its shorter side is the model's resolution, then centre-cropped so both
// sides are multiples of the stride (the server refuses other sizes) and it stays under the pixel limit.

async function loadFile(file) {
  clearError();
  let image;
  try {
    image = await decodeFile(file);
  } catch {
    return showError(`${file.name} is not an image this browser can read.`);
  }
  const { resolution, stride, limits } = state.config;
  const [w0, h0] = [image.naturalWidth, image.naturalHeight];
  const scale = resolution / Math.min(w0, h0);
  let width = Math.max(stride, Math.floor((w0 * scale) / stride) * stride);
  let height = Math.max(stride, Math.floor((h0 * scale) / stride) * stride);
  while (width * height > limits.max_pixels) {
    if (width >= height) width -= stride;
    else height -= stride;
  }
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff"; // the server reads RGB: transparent pixels become white, as the emoji were trained
  context.fillRect(0, 0, width, height);
  context.imageSmoothingQuality = "high";
  const [sw, sh] = [width / scale, height / scale]; // the centred source rectangle that fills the canvas
  context.drawImage(image, (w0 - sw) / 2, (h0 - sh) / 2, sw, sh, 0, 0, width, height);
  const png = canvas.toDataURL("image/png").split(",")[1];
  pushHistory(await makeEntry(png, "loaded", null));
  showProgress(0, 1, "idle");
  const [fw, fh] = [Math.round(w0 * scale), Math.round(h0 * scale)];
  const scaled = scale === 1 ? "kept at its size" : `scaled to ${fw}×${fh}`;
  const cropped = width < fw || height < fh ? `, centre-cropped to ${width}×${height}` : "";
  setStatus(`Loaded ${file.name} (${w0}×${h0}): ${scaled}${cropped} (sides: multiples of ${stride} px, the ` +
    `shorter one ${resolution} px).`);
}

function decodeFile(file) {
  const image = new Image();
  const url = URL.createObjectURL(file);
  image.src = url;
  return image.decode().then(() => image).finally(() => URL.revokeObjectURL(url));
}

// ---------------------------------------------------------------------------------------------------------------
// The mask: painted in image pixels with a hard-edged disc, so what is shown is exactly what is sent

function resetMask(width, height) {
  state.mask = new Uint8Array(width * height);
  state.maskWidth = width;
  state.maskHeight = height;
  maskCanvas().width = width;
  maskCanvas().height = height;
  renderMask();
  layout();
}

function setTool(tool) {
  state.tool = tool;
  $("brush").setAttribute("aria-pressed", String(tool === "brush"));
  $("eraser").setAttribute("aria-pressed", String(tool === "eraser"));
  $("frame").dataset.tool = tool;
}

function setBrush(size) {
  const input = $("brush-size");
  state.brush = Math.min(Math.max(Math.round(size), Number(input.min)), Number(input.max));
  input.value = String(state.brush);
  $("brush-size-value").textContent = String(state.brush);
  $("cursor").style.width = $("cursor").style.height = `${state.brush * state.scale}px`;
}

// Every pixel whose centre lies within the brush's radius of (x, y), and always the pixel under (x, y), so a
// 1 px brush paints single pixels.
function paintDisc(x, y) {
  const { mask, maskWidth: width, maskHeight: height } = state;
  const value = state.tool === "brush" ? 1 : 0;
  const r = state.brush / 2;
  const [x0, x1] = [Math.max(0, Math.floor(x - r)), Math.min(width - 1, Math.ceil(x + r))];
  const [y0, y1] = [Math.max(0, Math.floor(y - r)), Math.min(height - 1, Math.ceil(y + r))];
  for (let j = y0; j <= y1; j++) {
    for (let i = x0; i <= x1; i++) {
      if ((i + 0.5 - x) ** 2 + (j + 0.5 - y) ** 2 <= r * r) mask[j * width + i] = value;
    }
  }
  const [pi, pj] = [Math.floor(x), Math.floor(y)];
  if (pi >= 0 && pi < width && pj >= 0 && pj < height) mask[pj * width + pi] = value;
}

// Discs along the segment, close enough that a fast stroke leaves no gaps.
function paintLine(from, to) {
  const distance = Math.hypot(to.x - from.x, to.y - from.y);
  const steps = Math.max(1, Math.ceil(distance / Math.max(0.5, state.brush / 4)));
  for (let s = 1; s <= steps; s++) {
    paintDisc(from.x + ((to.x - from.x) * s) / steps, from.y + ((to.y - from.y) * s) / steps);
  }
}

function renderMask() {
  const canvas = maskCanvas();
  const { mask, maskWidth: width, maskHeight: height } = state;
  const pixels = new ImageData(width, height);
  for (let p = 0; p < mask.length; p++) {
    if (mask[p]) pixels.data.set(MASK_RGBA, p * 4);
  }
  canvas.getContext("2d").putImageData(pixels, 0, 0);
}

// The mask as the server reads it: a PNG of the image's size, white = regenerate, black = keep.
function maskPNG() {
  const { mask, maskWidth: width, maskHeight: height } = state;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const pixels = new ImageData(width, height);
  for (let p = 0; p < mask.length; p++) {
    const v = mask[p] ? 255 : 0;
    pixels.data.set([v, v, v, 255], p * 4);
  }
  canvas.getContext("2d").putImageData(pixels, 0, 0);
  return canvas.toDataURL("image/png").split(",")[1];
}

// Pointer Events cover the mouse, pens and touch alike; `touch-action: none` (editor.css) keeps touch strokes
// from scrolling the page.
function bindPainting() {
  const canvas = maskCanvas();
  canvas.addEventListener("pointerdown", (e) => {
    if (e.button !== 0 || !currentEntry() || state.controller) return;
    e.preventDefault();
    canvas.focus(); // out of the prompt box, so that B, E, [ ] and Ctrl+Z work at once
    canvas.setPointerCapture(e.pointerId);
    state.lastPoint = imagePoint(e);
    paintDisc(state.lastPoint.x, state.lastPoint.y);
    renderMask();
  });
  canvas.addEventListener("pointermove", (e) => {
    moveCursor(e);
    if (!state.lastPoint) return;
    // Coalesced events: the positions the browser merged into this one, for smooth fast strokes.
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
    for (const each of events.length ? events : [e]) {
      const point = imagePoint(each);
      paintLine(state.lastPoint, point);
      state.lastPoint = point;
    }
    renderMask();
  });
  const end = () => {
    state.lastPoint = null;
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  canvas.addEventListener("pointerleave", () => {
    $("cursor").hidden = true;
  });
}

function imagePoint(e) {
  const rect = maskCanvas().getBoundingClientRect();
  return {
    x: ((e.clientX - rect.left) / rect.width) * state.maskWidth,
    y: ((e.clientY - rect.top) / rect.height) * state.maskHeight,
  };
}

function moveCursor(e) {
  const cursor = $("cursor");
  const rect = maskCanvas().getBoundingClientRect();
  cursor.hidden = !currentEntry();
  cursor.style.left = `${e.clientX - rect.left}px`;
  cursor.style.top = `${e.clientY - rect.top}px`;
}

// The largest whole-number scale that fits the stage (crisp pixels); a fraction only for an image larger than it.
function layout() {
  const stage = $("stage");
  const canvas = imageCanvas();
  const fit = Math.min((stage.clientWidth - 16) / canvas.width, (stage.clientHeight - 16) / canvas.height);
  state.scale = fit >= 1 ? Math.floor(fit) : fit;
  const frame = $("frame");
  frame.style.width = `${canvas.width * state.scale}px`;
  frame.style.height = `${canvas.height * state.scale}px`;
  setBrush(state.brush);
}

// ---------------------------------------------------------------------------------------------------------------
// Keyboard: single keys act only outside text fields, so typing a prompt never switches tools

function bindKeyboard() {
  document.addEventListener("keydown", (e) => {
    const typing = isTextField(e.target);
    if (e.key === "Escape" && state.controller) return cancel();
    if ((e.ctrlKey || e.metaKey) && !e.altKey && !typing) {
      const key = e.key.toLowerCase();
      if (key === "z" || key === "y") {
        e.preventDefault();
        if (key === "y" || e.shiftKey) redo();
        else undo();
      }
      return;
    }
    if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
    const actions = {
      b: () => setTool("brush"),
      e: () => setTool("eraser"),
      "[": () => setBrush(state.brush - 1),
      "]": () => setBrush(state.brush + 1),
      i: inpaint,
    };
    const action = actions[e.key.toLowerCase()];
    if (action) {
      e.preventDefault();
      action();
    }
  });
}

function isTextField(element) {
  if (element.isContentEditable || element.tagName === "TEXTAREA" || element.tagName === "SELECT") return true;
  return element.tagName === "INPUT" && !["range", "checkbox", "radio", "button", "file"].includes(element.type);
}

// ---------------------------------------------------------------------------------------------------------------
// Messages and the state the test reads

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

function setStatus(message) {
  $("status").textContent = message;
}

// Mirrors the request counters in data- attributes, which a test (or a stylesheet) can wait on.
function publish() {
  const root = $("editor");
  root.dataset.busy = state.controller ? "1" : "0";
  root.dataset.requests = String(state.requests);
  root.dataset.previews = String(state.previews);
  root.dataset.history = `${state.current + 1}/${state.history.length}`;
}

window.museEditor = { state, select, undo, redo };
document.addEventListener("DOMContentLoaded", init);
