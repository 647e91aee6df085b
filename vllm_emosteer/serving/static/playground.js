"use strict";
// The playground: builds its controls from GET /v1/emosteer, then streams the same chat request unsteered,
// steered and (optionally) steered at a scaled intensity, side by side. It calls only this server's API, with
// relative URLs, and writes server text into the page only as text.

const $ = (id) => document.getElementById(id);
let info = null;
let model = null;
let running = null; // the AbortController of the run in progress

async function getJSON(url) {
  const reply = await fetch(url);
  if (!reply.ok) throw new Error(`${url}: HTTP ${reply.status} ${(await reply.text()).slice(0, 300)}`);
  return reply.json();
}

async function start() {
  try {
    const [emosteer, models] = await Promise.all([getJSON("v1/emosteer"), getJSON("v1/models")]);
    info = emosteer;
    model = models.data[0].id;
  } catch (error) {
    $("server-info").textContent = "not connected";
    showError("run", `cannot read this server's steering: ${error.message}`);
    return;
  }
  buildSliders();
  for (const mode of info.positions || ["response", "all"]) $("positions").add(new Option(mode, mode));
  const last = info.num_model_layers - 1;
  for (const id of ["layer-first", "layer-last"]) Object.assign($(id), {min: 0, max: last});
  $("server-info").textContent = `${model} · ${info.emotions.length} emotions · hook ${info.hook} · ` +
    `model layers 0-${last} · max intensity ${info.max_intensity}`;
  document.body.dataset.ready = "true";
}

function buildSliders() {
  const limit = info.max_intensity;
  info.emotions.forEach((emotion, i) => {
    const row = document.createElement("div");
    row.className = "slider";
    row.dataset.emotion = emotion;
    const label = document.createElement("label");
    label.htmlFor = `slider-${i}`;
    label.textContent = emotion;
    const input = Object.assign(document.createElement("input"),
      {type: "range", id: `slider-${i}`, min: -limit, max: limit, step: 0.1, value: 0});
    input.dataset.emotion = emotion;
    input.dataset.control = `emotion:${emotion}`;
    input.title = calibrationNote(emotion) + " Double-click: back to 0.";
    const output = document.createElement("output");
    output.htmlFor = input.id;
    const error = document.createElement("p");
    error.className = "error";
    error.dataset.errorFor = `emotion:${emotion}`;
    const show = () => {
      output.textContent = Number(input.value).toFixed(1);
      row.classList.toggle("active", Number(input.value) !== 0);
    };
    input.addEventListener("input", show);
    input.addEventListener("dblclick", () => { input.value = 0; show(); });
    show();
    row.append(label, input, output, error);
    $("sliders").append(row);
  });
}

function calibrationNote(emotion) {
  const dose = (info.calibrated || {})[emotion];
  const band = (info.bands || {})[emotion];
  if (dose === undefined) return "";
  return `1.0 = ${info.units || "alpha"} ${dose}` + (band ? ` on layers ${band[0]}-${band[1]}.` : ".");
}

function mix() {
  return [...document.querySelectorAll("#sliders input")]
    .filter((input) => Number(input.value) !== 0)
    .map((input) => [input.dataset.emotion, Number(input.value)]);
}

function numberOrNull(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

// Three decimals, as sent: the title of a column shows the intensities its request carries.
const scaled = (value, scale) => Math.round(value * scale * 1000) / 1000;

// The flat `vllm_xargs` form (README, "Steering requests"): OpenAI's extra body allows no nested objects.
function steering(pairs, scale) {
  if (pairs.length === 0) return null;
  const xargs = {
    emotions: pairs.map(([emotion]) => emotion),
    intensities: pairs.map(([, value]) => scaled(value, scale)),
    steer_positions: $("positions").value,
  };
  const first = numberOrNull("layer-first");
  const last = numberOrNull("layer-last");
  if (first !== null || last !== null) {
    xargs.steer_layers = [first ?? 0, last ?? info.num_model_layers - 1];
  }
  return xargs;
}

function describe(pairs, scale) {
  if (pairs.length === 0) return "no emotion set";
  return pairs.map(([emotion, value]) => `${emotion} ${scaled(value, scale)}`).join(", ");
}

function columns() {
  const pairs = mix();
  const list = [
    {id: "answer-plain", title: "unsteered", xargs: null},
    {id: "answer-steered", title: `steered: ${describe(pairs, 1)}`, xargs: steering(pairs, 1), pairs},
  ];
  const scale = numberOrNull("third-scale") ?? 2;
  if ($("third").checked) {
    list.push({id: "answer-third", title: `×${scale}: ${describe(pairs, scale)}`, xargs: steering(pairs, scale),
               pairs, scaleControl: "third-scale"});
  }
  return list;
}

function requestBody(xargs) {
  const body = {
    model,
    messages: [{role: "user", content: $("prompt").value}],
    stream: true,
    stream_options: {include_usage: true},
  };
  const fields = {seed: "seed", temperature: "temperature", max_tokens: "max-tokens"};
  for (const [field, id] of Object.entries(fields)) {
    const value = numberOrNull(id);
    if (value !== null) body[field] = value;
  }
  if (xargs) body.vllm_xargs = xargs;
  return body;
}

async function run() {
  clearErrors();
  running = new AbortController();
  $("run").textContent = "Stop";
  $("run").classList.add("stop");
  document.body.dataset.running = "true";
  try {
    await Promise.all(columns().map((column) => stream(column, running.signal)));
  } finally {
    running = null;
    $("run").textContent = "Run";
    $("run").classList.remove("stop");
    delete document.body.dataset.running;
  }
}

async function stream(column, signal) {
  const box = $(column.id);
  const textBox = box.querySelector(".text");
  const meta = box.querySelector(".meta");
  const body = requestBody(column.xargs);
  box.querySelector("h2").textContent = column.title;
  box.querySelector(".request").textContent = JSON.stringify(body, null, 1);
  textBox.textContent = "";
  meta.textContent = "";
  box.dataset.state = "running";
  const started = performance.now();
  let text = "";
  let finish = null;
  let usage = null;
  try {
    const reply = await fetch("v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify(body), signal,
    });
    if (!reply.ok) throw await serverError(reply);
    const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
    let pending = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      pending += value;
      const lines = pending.split("\n");
      pending = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const event = JSON.parse(line.slice(6));
        const failure = event.error || (event.object === "error" ? event : null);
        if (failure) throw Object.assign(new Error(failure.message), {param: failure.param});
        usage = event.usage || usage;
        const choice = (event.choices || [])[0];
        if (!choice) continue;
        text += (choice.delta && choice.delta.content) || "";
        finish = choice.finish_reason || finish;
        textBox.textContent = text;
      }
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const tokens = usage ? `${usage.completion_tokens} tokens · ` : "";
    meta.textContent = `${tokens}${seconds} s · finish: ${finish}`;
    box.dataset.state = "done";
  } catch (error) {
    if (error.name === "AbortError") {
      meta.textContent = "stopped";
      box.dataset.state = "stopped";
      return;
    }
    textBox.textContent = error.message;
    box.dataset.state = "error";
    showError(controlFor(error.param, error.message, column), error.message);
  }
}

async function serverError(reply) {
  const raw = await reply.text();
  let parsed = null;
  try { parsed = JSON.parse(raw); } catch { /* not JSON: keep the text */ }
  const error = (parsed && parsed.error) || parsed || {};
  const message = error.message || (typeof error.detail === "string" ? error.detail : null) ||
    `HTTP ${reply.status}: ${raw.slice(0, 300)}`;
  return Object.assign(new Error(message), {param: error.param});
}

// The control an error's field belongs to (README: a 400's `error.param` names the field). Pydantic's
// errors name it as a path: "body.seed", "body.vllm_xargs.steer_layers".
function controlFor(param, message, column) {
  if (!param) return "run";
  param = param.replace(/^body\./, "").replace(/^vllm_xargs\./, "");
  if (/layers/.test(param)) return "layers";
  if (/positions/.test(param)) return "positions";
  if (param.startsWith("messages")) return "prompt";
  if (param === "seed" || param === "temperature") return param;
  if (/max_(completion_)?tokens/.test(param)) return "max-tokens";
  if (/^(emotions?|intensit)/.test(param) || param.startsWith("emosteer")) {
    if (column.scaleControl && /^intensit/.test(param)) return column.scaleControl;
    const index = /^intensities\[(\d+)\]$/.exec(param);
    const pairs = column.pairs || [];
    const named = index ? pairs[Number(index[1])] : firstNamed(pairs, message);
    return named ? `emotion:${named[0]}` : "emotions";
  }
  return "run";
}

function firstNamed(pairs, message) {
  let best = null;
  for (const pair of pairs) {
    const at = message.indexOf(pair[0]);
    if (at >= 0 && (best === null || at < best.at)) best = {at, pair};
  }
  return best && best.pair;
}

function showError(control, message) {
  document.querySelector(`[data-error-for="${CSS.escape(control)}"]`).textContent = message;
  for (const input of document.querySelectorAll(`[data-control="${CSS.escape(control)}"]`)) {
    input.classList.add("invalid");
  }
}

function clearErrors() {
  for (const target of document.querySelectorAll("[data-error-for]")) target.textContent = "";
  for (const input of document.querySelectorAll(".invalid")) input.classList.remove("invalid");
}

document.addEventListener("DOMContentLoaded", () => {
  $("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    if (running) running.abort();
    else if (model) run();
  });
  $("third").addEventListener("change", () => { $("answer-third").hidden = !$("third").checked; });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("controls").requestSubmit();
  });
  start();
});
