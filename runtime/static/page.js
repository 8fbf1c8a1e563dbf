"use strict";
// The MaskBit playground, served at / by `maskbit-run serve`: plain JavaScript, no build step, nothing loaded from
// anywhere but this server. It reads /v1/models, posts /v1/generate with `stream: true` and reads the Server-Sent
// Events with fetch and a stream reader (EventSource cannot POST). Side by side: the same seed, labels and settings
// go to two models at once, one pane each. The grid download is drawn here on a canvas, in the layout of the
// server's grid_png (images in rows, 2 px white padding; one image is the image itself), so nothing runs twice.

const $ = (id) => document.getElementById(id);
const MAIN_SETTINGS = ["num_steps", "guidance_scale"];
const MAX_SENT_IMAGES = 10000;   // more is refused here: an array that large would stall the tab before the server's 413

let models = [];
let running = null;              // the AbortControllers of the generation in flight
let objectUrls = [];             // grid downloads of the last generation, revoked by the next

const byId = (id) => models.find((m) => m.id === id);
const sentence = (text) => (/[.!?]$/.test(text) ? text : `${text}.`);
const seconds = (s) => `${Number(s).toFixed(2)} s`;

async function loadModels() {
  const response = await fetch("/v1/models");
  if (!response.ok) throw new Error(`/v1/models answered HTTP ${response.status}`);
  models = (await response.json()).data;
  const a = $("model-a"), b = $("model-b");
  for (const m of models) {
    a.add(new Option(`${m.id} (${m.precision}, ${m.backend})`, m.id));
    b.add(new Option(`${m.id} (${m.precision}, ${m.backend})`, m.id));
  }
  b.add(new Option("(none)", ""), 0);
  if (models.length > 1) {
    $("model-field").hidden = $("compare-field").hidden = false;
    b.value = models[1].id;
  }
  a.addEventListener("change", () => useModel(byId(a.value)));
  useModel(models[0]);
}

// The class picker, the defaults and the advanced fields of `model` (the left one when side by side).
function useModel(model) {
  const select = $("label"), kept = select.value;
  const names = model.classes || Array.from({length: model.num_classes}, (_, i) => String(i));
  select.replaceChildren(...names.map((name, i) => new Option(name, String(i))));
  if (Number(kept) < names.length) select.value = kept;
  $("count").max = model.limits.max_images;
  for (const name of MAIN_SETTINGS) {
    $(name).value = model.sampling[name];
    $(name).placeholder = `default ${model.sampling[name]}`;
  }
  const fields = Object.keys(model.sampling).filter((name) => !MAIN_SETTINGS.includes(name))
    .map((name) => settingField(name, model.sampling[name], model.sampling_help[name],
                                (model.sampling_choices || {})[name]));
  $("advanced-fields").replaceChildren(...fields);
}

function settingField(name, value, help, choices) {
  const field = document.createElement("div"), label = document.createElement("label");
  field.className = "field";
  label.htmlFor = name;
  label.textContent = name.replaceAll("_", " ");
  let input;
  if (typeof value === "boolean") {
    input = Object.assign(document.createElement("input"), {type: "checkbox", checked: value});
    field.classList.add("checkbox");
  } else if (choices) {
    input = document.createElement("select");
    for (const choice of choices) input.add(new Option(choice, choice));
    input.value = value;
  } else if (typeof value === "string") {
    input = Object.assign(document.createElement("input"), {type: "text", value: value});
  } else {
    input = Object.assign(document.createElement("input"), {type: "number", step: "any", inputMode: "decimal",
                                                            value: value ?? "", placeholder: `default ${value}`});
  }
  input.id = name;
  input.dataset.setting = name;
  field.append(label, input);
  if (help) {
    const note = Object.assign(document.createElement("span"), {className: "help", id: `${name}-help`,
                                                                textContent: help});
    input.setAttribute("aria-describedby", note.id);
    field.append(note);
  }
  return field;
}

// The request body for `model`; an empty field is left out (the model's default). Values go as typed: the server
// judges them (422 with the field named), so the page and the API never disagree on what is valid.
function requestBody(model) {
  const number = (input) => (input.value === "" ? undefined : Number(input.value));
  const count = number($("count")) ?? 1;       // the page's own field (the API takes one label per image)
  if (!Number.isInteger(count) || count < 1 || count > MAX_SENT_IMAGES) {
    throw new Error(`Images: a whole number from 1 to ${model.limits.max_images} (this server's limit)`);
  }
  const label = Number($("label").value);
  const body = {labels: Array(count).fill(label), seed: number($("seed")) ?? 0, stream: true, model: model.id};
  for (const name of MAIN_SETTINGS) body[name] = number($(name));
  for (const input of $("advanced-fields").querySelectorAll("[data-setting]")) {
    const name = input.dataset.setting;
    body[name] = input.type === "checkbox" ? input.checked : input.type === "number" ? number(input)
      : input.value === "" ? undefined : input.value;
  }
  const steps = body.num_steps ?? model.sampling.num_steps;
  body.preview_every = Math.max(1, Math.ceil(steps / model.limits.max_previews));
  return body;
}

// One sentence for a refused request: 422 and 413 quote the server's line, 503 says when to retry.
async function apiError(response) {
  let text = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") text = body.error;
  } catch { /* not JSON: keep the status */ }
  if (response.status === 503) {
    const after = response.headers.get("Retry-After");
    return `The server is busy: ${text}; try again in ${after || "a few"} s.`;
  }
  if (response.status === 422) return sentence(`Not accepted: ${text}`);
  if (response.status === 413) return sentence(`Too large: ${text}`);
  return sentence(`The request failed (HTTP ${response.status}): ${text}`);
}

class Pane {
  constructor(model, count, labelName) {
    this.model = model;
    this.root = $("pane-template").content.firstElementChild.cloneNode(true);
    this.root.dataset.model = model.id;
    this.root.setAttribute("aria-label", `Model ${model.id}`);
    this.root.querySelector(".pane-title").textContent = `${model.id}: ${model.precision}, ${model.backend}`;
    const gate = this.root.querySelector(".gate");
    gate.textContent = model.gate.summary;
    gate.dataset.passed = String(model.gate.passed);
    this.status = this.root.querySelector(".status");
    this.bar = this.root.querySelector(".progress");
    this.bar.setAttribute("aria-label", `Progress of ${model.id}`);
    this.figures = Array.from({length: count}, (_, j) => {
      const figure = document.createElement("figure"), img = document.createElement("img");
      img.alt = `${labelName}, image ${j + 1} of ${count} (${model.id})`;
      figure.append(img);
      this.root.querySelector(".images").append(figure);
      return figure;
    });
    this.finished = false;
    this.root.setAttribute("aria-busy", "true");      // screen readers announce the status once, when it ends
  }

  say(text) { this.status.textContent = text; }

  progress(data, elapsed) {
    const step = Math.min(...data.steps);
    this.bar.max = data.num_steps;
    this.bar.value = step;
    this.say(`step ${step} / ${data.num_steps} · ${seconds(elapsed)}`);
  }

  preview(data) {
    const img = this.figures[data.image]?.querySelector("img");
    if (!img) return;
    img.dataset.kind = "preview";
    img.dataset.step = data.step;
    img.src = `data:image/png;base64,${data.png}`;
  }

  async result(data, elapsed, seed) {
    const pngs = data.images.map((item) => item.png);
    data.images.forEach((item, j) => {
      const figure = this.figures[j], img = figure.querySelector("img");
      img.dataset.kind = "final";
      delete img.dataset.step;
      img.src = `data:image/png;base64,${item.png}`;
      const link = Object.assign(document.createElement("a"), {className: "download", href: img.src,
                                                               textContent: `Download image ${j + 1}`});
      link.download = `maskbit_${this.model.id}_seed${seed}_label${item.label}_${item.index}.png`;
      const caption = document.createElement("figcaption");
      caption.append(link);
      figure.append(caption);
    });
    this.bar.value = this.bar.max;
    this.say(`done in ${seconds(elapsed)} (server: ${seconds(data.queued_seconds)} queued, ` +
             `${seconds(data.computing_seconds)} computing)`);
    const link = this.root.querySelector(".grid-link a");
    link.href = await gridUrl(pngs);
    link.download = `maskbit_${this.model.id}_seed${seed}_grid.png`;
    link.className = "grid";
    this.root.querySelector(".grid-link").hidden = false;
    this.finished = true;
  }
}

async function gridUrl(pngs) {
  if (pngs.length === 1) return `data:image/png;base64,${pngs[0]}`;
  const images = await Promise.all(pngs.map(async (png) => {
    const image = new Image();
    image.src = `data:image/png;base64,${png}`;
    await image.decode();
    return image;
  }));
  const pad = 2, width = images[0].naturalWidth, height = images[0].naturalHeight;
  const columns = Math.ceil(Math.sqrt(images.length)), rows = Math.ceil(images.length / columns);
  const canvas = Object.assign(document.createElement("canvas"), {width: columns * (width + pad) + pad,
                                                                 height: rows * (height + pad) + pad});
  const context = canvas.getContext("2d");
  context.fillStyle = "#ffffff";
  context.fillRect(0, 0, canvas.width, canvas.height);
  images.forEach((image, i) => context.drawImage(image, pad + (i % columns) * (width + pad),
                                                 pad + Math.floor(i / columns) * (height + pad)));
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  const url = URL.createObjectURL(blob);
  objectUrls.push(url);
  return url;
}

function parseEvent(chunk) {
  const kind = chunk.match(/^event: (.*)$/m), data = chunk.match(/^data: (.*)$/m);
  return kind && data ? {kind: kind[1], data: JSON.parse(data[1])} : null;
}

// One streamed generation into `pane`; resolves when the result is shown, throws an Error with one sentence.
async function run(pane, body, signal) {
  const started = performance.now(), elapsed = () => (performance.now() - started) / 1000;
  pane.say("waiting for the server…");
  let response;
  try {
    response = await fetch("/v1/generate", {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify(body), signal});
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new Error(`The server did not answer (${error.message}).`);
  }
  if (!response.ok) throw new Error(await apiError(response));
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    for (let end; (end = buffer.indexOf("\n\n")) >= 0;) {
      const event = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (!event) continue;
      if (event.kind === "progress") pane.progress(event.data, elapsed());
      if (event.kind === "preview") pane.preview(event.data);
      if (event.kind === "result") await pane.result(event.data, elapsed(), body.seed);
      if (event.kind === "error") throw new Error(sentence(`The generation stopped: ${event.data.error}`));
    }
  }
  if (!pane.finished) throw new Error("The server closed the stream before the result.");
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  const message = $("message");
  message.textContent = "";
  objectUrls.forEach((url) => URL.revokeObjectURL(url));
  objectUrls = [];
  const chosen = [byId($("model-a").value)];
  const other = byId($("model-b").value);
  if (!$("compare-field").hidden && other && other !== chosen[0]) chosen.push(other);
  let bodies;
  try {
    bodies = chosen.map(requestBody);
  } catch (error) {
    message.textContent = sentence(error.message);
    return;
  }
  const count = Math.max(0, Math.min(bodies[0].labels.length, chosen[0].limits.max_images));
  const labelName = $("label").selectedOptions[0]?.textContent ?? $("label").value;
  const panes = chosen.map((model) => new Pane(model, count, labelName));
  $("panes").replaceChildren(...panes.map((pane) => pane.root));
  running = chosen.map(() => new AbortController());
  setBusy(true);
  const outcomes = await Promise.allSettled(panes.map((pane, i) => run(pane, bodies[i], running[i].signal)));
  const errors = [];
  outcomes.forEach((outcome, i) => {
    panes[i].root.setAttribute("aria-busy", "false");
    if (outcome.status === "fulfilled") return;
    const cancelled = outcome.reason?.name === "AbortError";
    panes[i].say(cancelled ? "cancelled" : "failed");
    if (!cancelled) errors.push({model: chosen[i].id, text: outcome.reason.message});
  });
  const texts = [...new Set(errors.map((e) => e.text))];
  message.textContent = texts.length === 1 ? texts[0] : errors.map((e) => `${e.model}: ${e.text}`).join(" ");
  running = null;
  setBusy(false);
}

function setBusy(busy) {
  const refocus = !busy && document.activeElement === $("cancel");
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
  if (refocus) $("generate").focus();
}

function cancel() {
  if (running) running.forEach((controller) => controller.abort());
}

document.addEventListener("DOMContentLoaded", () => {
  $("settings").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") cancel(); });
  $("random-seed").addEventListener("click", () => {
    $("seed").value = crypto.getRandomValues(new Uint32Array(1))[0];
  });
  loadModels().catch((error) => { $("message").textContent = sentence(`Cannot load the models: ${error.message}`); });
});
