// cna-vllm steering playground: plain ES module, no dependencies, nothing fetched from elsewhere.
// Talks only to this server's public API through relative URLs (works behind a path prefix):
//   GET v1/models, GET v1/circuits, POST v1/chat/completions (stream: true).

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

/** "/prefix/playground" -> "/prefix/": where the API lives, relative to this page. */
function apiBase() {
  const path = location.pathname.replace(/\/playground\/?$/, "/");
  return path.endsWith("/") ? path : `${path}/`;
}
const API = apiBase();
const KEY_STORAGE = "cna-vllm-playground-api-key";
const VALUE_KEY = { scale: "multiplier", patch: "alpha", shift: "alpha" };
const DEFAULTS = { scale: 0, patch: 0.5, shift: 1 };
const HINTS = { scale: "1 = unsteered · 0 = ablate", patch: "0 = unsteered · 1 = full patch", shift: "0 = unsteered" };

const state = {
  model: null,
  circuits: [],
  limits: { max_items: 8, max_abs_multiplier: 20, max_abs_alpha: 20 },
  specs: [],
  controllers: [],
  copyFormat: "curl",
};
let uid = 0;

// --------------------------------------------------------------------------- API helpers
function apiKey() {
  return $("#api-key").value.trim();
}

function headers(json = false) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

const STATUS_HINTS = {
  401: "check the API key field",
  403: "check the API key field",
  413: "the request body is too large for this server",
  429: "the server is busy; try again in a moment",
  503: "the server is not ready",
};

/** A readable message for a non-2xx response: the OpenAI error JSON's error.message where there is one. */
async function errorMessage(resp) {
  let text = "";
  try {
    text = await resp.text();
  } catch {
    /* body unreadable: the status says enough */
  }
  let msg = text.trim();
  try {
    const data = JSON.parse(text);
    const err = data.error ?? data.detail ?? data.message;
    if (typeof err === "string") msg = err;
    else if (Array.isArray(err)) msg = err.map((d) => d.msg ?? JSON.stringify(d)).join("; ");
    else if (err && typeof err === "object") msg = err.message ?? JSON.stringify(err);
  } catch {
    /* not JSON: keep the text */
  }
  const head = `HTTP ${resp.status}${resp.statusText ? ` ${resp.statusText}` : ""}`;
  const hint = STATUS_HINTS[resp.status];
  return `${head}: ${msg || "(no message)"}${hint ? ` — ${hint}` : ""}`;
}

function networkMessage(err) {
  return `network error: ${err.message || err} — is the server still running?`;
}

async function getJSON(path) {
  let resp;
  try {
    resp = await fetch(API + path, { headers: headers(), cache: "no-store" });
  } catch (err) {
    throw new Error(networkMessage(err));
  }
  if (!resp.ok) throw new Error(await errorMessage(resp));
  return resp.json();
}

// --------------------------------------------------------------------------- catalogue
function setStatus(text, kind = "") {
  const el = $("#catalog-status");
  el.textContent = text;
  el.dataset.kind = kind;
}

async function loadCatalog() {
  setStatus("loading circuits…");
  const [models, circuits] = await Promise.allSettled([getJSON("v1/models"), getJSON("v1/circuits")]);
  if (circuits.status === "fulfilled") {
    const data = circuits.value;
    state.circuits = data.data ?? [];
    state.limits = { ...state.limits, ...(data.limits ?? {}) };
    state.model = state.model ?? data.model ?? null;
  }
  if (models.status === "fulfilled" && models.value.data?.length) state.model = models.value.data[0].id;
  $("#model-name").textContent = state.model ?? "unknown";
  if (circuits.status === "rejected") {
    setStatus(`circuits: ${circuits.reason.message}`, "error");
  } else {
    const n = state.circuits.length;
    setStatus(n ? `${n} circuit${n === 1 ? "" : "s"} · |m| ≤ ${state.limits.max_abs_multiplier} · |α| ≤ ${state.limits.max_abs_alpha}` : "no circuits loaded on this server", n ? "ok" : "error");
  }
  for (const spec of state.specs) {
    if (!spec.seeded && state.circuits.length && !spec.items.length) {
      spec.seeded = true;
      addItem(spec);
    }
    for (const item of spec.items) refreshItem(item);
    refreshSpec(spec);
  }
  updateCopy();
}

/** The catalogue entry of a circuit name, or of the circuit whose signed part NAME[part] names. */
function circuitInfo(id) {
  const base = id.replace(/\[(pos|neg|up|down)\]$/, "");
  return state.circuits.find((c) => c.id === base && (base === id || c.kind !== "caa"));
}

// --------------------------------------------------------------------------- steering editor
function makeSpec(index) {
  const frag = $("#spec-template").content.cloneNode(true);
  const el = $("fieldset", frag);
  el.id = `spec-${index}`;
  $(".spec-letter", el).textContent = "AB"[index];
  const adv = $(".adv-input", el);
  adv.id = `spec-${index}-advanced`;
  $(".adv-label", el).htmlFor = adv.id;
  const spec = { index, el, adv, items: [], seeded: false };
  $(".add-item", el).addEventListener("click", () => {
    addItem(spec);
    $(".circuit", spec.items.at(-1).el).focus();
  });
  adv.addEventListener("input", () => {
    refreshSpec(spec);
    updateCopy();
  });
  $("#specs").append(el);
  state.specs.push(spec);
  return spec;
}

function addItem(spec, from = null) {
  const frag = $("#item-template").content.cloneNode(true);
  const el = $(".item", frag);
  const id = `item-${++uid}`;
  el.id = id;
  const item = { spec, el, values: { ...DEFAULTS } };
  for (const [cls, label] of [["circuit", "l-circuit"], ["mode", "l-mode"], ["strength-range", "l-range"], ["strength-number", "l-number"]]) {
    const input = $(`.${cls}`, el);
    input.id = `${id}-${cls}`;
    $(`.${label}`, el).htmlFor = input.id;
  }
  const circuit = $(".circuit", el);
  const mode = $(".mode", el);
  const range = $(".strength-range", el);
  const number = $(".strength-number", el);
  if (from) {
    item.values = { ...from.values };
    item.initial = { circuit: $(".circuit", from.el).value, mode: $(".mode", from.el).value };
  } else {
    const first = state.circuits.find((c) => c.kind !== "caa") ?? state.circuits[0];
    item.initial = { circuit: first?.id ?? "", mode: first?.modes?.[0] ?? "scale" };
  }
  circuit.addEventListener("change", () => {
    refreshItem(item);
    updateCopy();
  });
  mode.addEventListener("change", () => {
    setStrength(item, item.values[mode.value] ?? DEFAULTS[mode.value]);
    refreshItem(item);
    updateCopy();
  });
  range.addEventListener("input", () => {
    number.value = range.value;
    item.values[mode.value] = Number(range.value);
    markInvalid(item);
    updateCopy();
  });
  number.addEventListener("input", () => {
    if (number.value !== "" && Number.isFinite(Number(number.value))) {
      range.value = number.value;
      item.values[mode.value] = Number(number.value);
    }
    markInvalid(item);
    updateCopy();
  });
  $(".remove-item", el).addEventListener("click", () => {
    const i = spec.items.indexOf(item);
    spec.items.splice(i, 1);
    el.remove();
    const next = spec.items[Math.min(i, spec.items.length - 1)];
    (next ? $(".remove-item", next.el) : $(".add-item", spec.el)).focus();
    refreshSpec(spec);
    updateCopy();
  });
  $(".items", spec.el).append(el);
  spec.items.push(item);
  refreshItem(item);
  refreshSpec(spec);
  updateCopy();
  return item;
}

function bound(mode) {
  return VALUE_KEY[mode] === "multiplier" ? state.limits.max_abs_multiplier : state.limits.max_abs_alpha;
}

function setStrength(item, value) {
  $(".strength-number", item.el).value = String(value);
  $(".strength-range", item.el).value = String(value);
}

function markInvalid(item) {
  const number = $(".strength-number", item.el);
  const mode = $(".mode", item.el).value;
  const v = Number(number.value);
  const bad = number.value === "" || !Number.isFinite(v) || Math.abs(v) > bound(mode);
  number.setAttribute("aria-invalid", String(bad));
}

/** Fill an item's selects from the catalogue and set its strength bounds for the chosen mode. */
function refreshItem(item) {
  const circuit = $(".circuit", item.el);
  const mode = $(".mode", item.el);
  const wanted = circuit.value || item.initial?.circuit || "";
  circuit.replaceChildren(
    ...state.circuits.flatMap((c) => {
      const opt = new Option(c.kind === "caa" ? `${c.id} (CAA)` : c.id, c.id);
      opt.title = c.description ?? "";
      // signed parts: NAME[pos] / [neg] (which set drives a neuron harder), [up] / [down] (sign of δ)
      const parts = Object.entries(c.kind === "caa" ? {} : c.parts ?? {}).filter(([, n]) => n > 0);
      return [opt, ...parts.map(([p, n]) => new Option(`${c.id}[${p}] (${n} neurons)`, `${c.id}[${p}]`))];
    }),
  );
  if (wanted && !circuitInfo(wanted)) circuit.add(new Option(`${wanted} (not on this server)`, wanted));
  circuit.value = wanted || state.circuits[0]?.id || "";
  const info = circuitInfo(circuit.value);
  const modes = info?.modes ?? ["scale", "patch", "shift"];
  const wantedMode = mode.value || item.initial?.mode || modes[0];
  mode.replaceChildren(...modes.map((m) => new Option(m, m)));
  mode.value = modes.includes(wantedMode) ? wantedMode : modes[0];
  const key = VALUE_KEY[mode.value];
  const b = bound(mode.value);
  const range = $(".strength-range", item.el);
  const number = $(".strength-number", item.el);
  for (const input of [range, number]) {
    input.min = String(-b);
    input.max = String(b);
  }
  range.step = b > 5 ? "0.05" : "0.01";
  $(".l-range", item.el).textContent = key === "multiplier" ? "Multiplier" : "Alpha";
  $(".l-range", item.el).dataset.hint = HINTS[mode.value];
  $(".l-number", item.el).textContent = `${key} value`;
  const value = item.values[mode.value] ?? DEFAULTS[mode.value];
  setStrength(item, Math.max(-b, Math.min(b, value)));
  markInvalid(item);
  circuit.title = info?.description ?? "";
  $(".item-desc", item.el).textContent = describe(info);
}

function layerSpan(layers) {
  if (!layers?.length) return "";
  const lo = Math.min(...layers);
  const hi = Math.max(...layers);
  return lo === hi ? `layer ${lo}` : `layers ${lo}–${hi}`;
}

/** One line about a catalogue entry: "CNA circuit · 46 neurons · layers 27–29". */
function describe(info) {
  if (!info) return "not in this server's catalogue";
  if (info.kind === "caa") return ["CAA vectors", info.site, layerSpan(info.layers)].filter(Boolean).join(" · ");
  const n = info.num_neurons;
  return ["CNA circuit", n === undefined ? "" : `${n} neuron${n === 1 ? "" : "s"}`, layerSpan(info.layers)]
    .filter(Boolean)
    .join(" · ");
}

function refreshSpec(spec) {
  const advanced = spec.adv.value.trim() !== "";
  spec.el.classList.toggle("is-advanced", advanced);
  for (const item of spec.items) {
    for (const input of $$("select, input", item.el)) input.disabled = advanced;
  }
  const add = $(".add-item", spec.el);
  add.disabled = advanced || !state.circuits.length || spec.items.length >= state.limits.max_items;
  spec.adv.placeholder = compact(itemsOf(spec)) || "NAME@VALUE[:mode],…";
}

function itemsOf(spec) {
  return spec.items.map((item) => {
    const mode = $(".mode", item.el).value;
    const raw = $(".strength-number", item.el).value;
    const value = raw === "" ? Number.NaN : Number(raw);
    return { circuit: $(".circuit", item.el).value, mode, [VALUE_KEY[mode]]: value };
  });
}

function compact(items) {
  return items
    .map((it) => `${it.circuit}@${it[VALUE_KEY[it.mode]]}${it.mode === "scale" ? "" : `:${it.mode}`}`)
    .join(",");
}

/** The request's ``steering`` value for a spec: the advanced string, the item list, or null. */
function steeringOf(spec) {
  const adv = spec.adv.value.trim();
  if (adv) return adv;
  const items = itemsOf(spec);
  return items.length ? items : null;
}

// --------------------------------------------------------------------------- request
function messages() {
  const out = [];
  const system = $("#system").value.trim();
  if (system) out.push({ role: "system", content: system });
  out.push({ role: "user", content: $("#prompt").value });
  return out;
}

function requestBody(steering, stream) {
  const body = { model: state.model ?? "default", messages: messages() };
  const temperature = Number($("#temperature").value);
  if ($("#temperature").value !== "" && Number.isFinite(temperature)) body.temperature = temperature;
  const maxTokens = Number.parseInt($("#max-tokens").value, 10);
  if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
  const seed = Number.parseInt($("#seed").value, 10);
  if (Number.isFinite(seed)) body.seed = seed;
  if (stream) {
    body.stream = true;
    body.stream_options = { include_usage: true };
  }
  if (steering !== null && steering !== undefined) body.steering = steering;
  return body;
}

// --------------------------------------------------------------------------- panes
function resetPane(pane, echo) {
  const out = $(".out", pane);
  const text = document.createElement("div");
  text.className = "text";
  out.replaceChildren(text);
  if (echo !== undefined) $(".echo", pane).textContent = echo;
  $(".fp", pane).textContent = "—";
  setPane(pane, "streaming", "waiting for the first token…");
  return text;
}

function setPane(pane, st, meta, detail = "") {
  pane.dataset.state = st;
  const el = $(".pane-meta", pane);
  el.textContent = meta;
  el.title = detail || meta;
}

function showError(pane, message) {
  const box = document.createElement("div");
  box.className = "error";
  box.setAttribute("role", "alert");
  const title = document.createElement("strong");
  title.textContent = "Error";
  const msg = document.createElement("p");
  msg.className = "error-message";
  msg.textContent = message;
  box.append(title, msg);
  $(".out", pane).append(box);
  setPane(pane, "error", "failed");
}

class StreamError extends Error {}

async function streamInto(pane, body, signal) {
  const text = resetPane(pane);
  const node = document.createTextNode("");
  text.append(node);
  const out = $(".out", pane);
  const started = performance.now();
  let firstAt = null;
  let tokens = 0;
  let usage = null;
  let finish = null;
  try {
    const resp = await fetch(`${API}v1/chat/completions`, {
      method: "POST",
      headers: headers(true),
      body: JSON.stringify(body),
      signal,
    });
    const echo = resp.headers.get("x-cna-steering");
    const fp = resp.headers.get("x-cna-steering-fingerprint");
    if (echo) $(".echo", pane).textContent = echo;
    $(".fp", pane).textContent = fp || "—";
    if (!resp.ok) throw new StreamError(await errorMessage(resp));
    if (!resp.body) throw new StreamError("the response has no body to stream");
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const payload = line.slice(5).trim();
        if (payload === "[DONE]") {
          done = true;
          break;
        }
        let data;
        try {
          data = JSON.parse(payload);
        } catch {
          continue;
        }
        if (data.error) {
          const e = data.error;
          throw new StreamError(`stream error: ${typeof e === "string" ? e : (e.message ?? JSON.stringify(e))}`);
        }
        if (data.usage) usage = data.usage;
        const choice = data.choices?.[0];
        if (!choice) continue;
        if (choice.finish_reason) finish = choice.finish_reason;
        const delta = choice.delta?.content;
        if (delta) {
          const atBottom = out.scrollHeight - out.scrollTop - out.clientHeight < 24;
          node.appendData(delta);
          tokens += 1;
          if (firstAt === null) firstAt = performance.now();
          if (atBottom) out.scrollTop = out.scrollHeight;
          setPane(pane, "streaming", `streaming · ${tokens} tokens`);
        }
      }
    }
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    const n = usage?.completion_tokens ?? tokens;
    const ttft = firstAt === null ? "" : ` · first token after ${((firstAt - started) / 1000).toFixed(2)} s`;
    const summary = `done · ${n} tokens · ${secs} s${finish ? ` · ${finish}` : ""}`;
    if (!node.data) text.classList.add("empty");
    setPane(pane, "done", summary, `${summary}${ttft}`);
  } catch (err) {
    if (err.name === "AbortError") {
      setPane(pane, "stopped", `stopped · ${tokens} tokens`);
    } else if (err instanceof StreamError) {
      showError(pane, err.message);
    } else {
      showError(pane, networkMessage(err));
    }
  }
}

// --------------------------------------------------------------------------- run / stop
function panes() {
  const out = [{ pane: $("#pane-default"), steering: null }];
  for (const spec of state.specs) out.push({ pane: $(`#pane-${"ab"[spec.index]}`), steering: steeringOf(spec) });
  return out;
}

function stop() {
  for (const c of state.controllers) c.abort();
  state.controllers = [];
}

async function run(event) {
  event?.preventDefault();
  stop();
  if (!$("#prompt").value.trim()) {
    $("#prompt").setAttribute("aria-invalid", "true");
    $("#prompt").focus();
    return;
  }
  $("#prompt").removeAttribute("aria-invalid");
  const controller = new AbortController();
  state.controllers = [controller];
  $("#stop").disabled = false;
  $("#run").setAttribute("aria-busy", "true");
  const jobs = panes().map(({ pane, steering }) => {
    resetPane(pane, steering === null ? "none" : "…");
    return streamInto(pane, requestBody(steering, true), controller.signal);
  });
  await Promise.allSettled(jobs);
  if (state.controllers[0] === controller) {
    state.controllers = [];
    $("#stop").disabled = true;
    $("#run").removeAttribute("aria-busy");
  }
}

// --------------------------------------------------------------------------- compare
function setCompare(on) {
  const btn = $("#compare-toggle");
  btn.setAttribute("aria-pressed", String(on));
  btn.textContent = on ? "− compare" : "+ compare";
  $("#pane-b").hidden = !on;
  $("#copy-for-wrap").hidden = !on;
  $("#outputs").dataset.columns = on ? "3" : "2";
  if (on && state.specs.length === 1) {
    const a = state.specs[0];
    const b = makeSpec(1);
    b.seeded = true;
    b.adv.value = a.adv.value;
    for (const item of a.items) addItem(b, item);
    refreshSpec(b);
    b.el.scrollIntoView({ block: "nearest" });
  } else if (!on && state.specs.length > 1) {
    const b = state.specs.pop();
    b.el.remove();
    $("#copy-for").value = "0";
  }
  updateCopy();
}

// --------------------------------------------------------------------------- copy as
function shellQuote(s) {
  return `'${s.replaceAll("'", "'\\''")}'`;
}

function pyLiteral(value, indent = 0) {
  const pad = " ".repeat(indent);
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return Number.isFinite(value) ? String(value) : 'float("nan")';
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    const inner = value.map((v) => `${pad}    ${pyLiteral(v, indent + 4)}`).join(",\n");
    return `[\n${inner},\n${pad}]`;
  }
  const entries = Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pyLiteral(v, indent)}`);
  return `{${entries.join(", ")}}`;
}

function updateCopy() {
  const spec = state.specs[Number($("#copy-for").value)] ?? state.specs[0];
  if (!spec) return;
  const steering = steeringOf(spec);
  const body = requestBody(steering, false);
  const origin = new URL(API, location.href).href;
  const keyed = apiKey() !== "";
  let code;
  if (state.copyFormat === "curl") {
    const lines = [`curl -si ${shellQuote(`${origin}v1/chat/completions`)}`, "  -H 'Content-Type: application/json'"];
    if (keyed) lines.push('  -H "Authorization: Bearer $CNA_VLLM_API_KEY"');
    lines.push(`  -d ${shellQuote(JSON.stringify(body, null, 2))}`);
    code = lines.join(" \\\n");
  } else {
    const args = [
      `    model=${pyLiteral(body.model)},`,
      `    messages=${pyLiteral(body.messages, 4)},`,
    ];
    for (const k of ["temperature", "max_tokens", "seed"]) if (k in body) args.push(`    ${k}=${pyLiteral(body[k])},`);
    if (steering !== null) args.push(`    extra_body={"steering": ${pyLiteral(steering, 4)}},`);
    code = [
      ...(keyed ? ["import os", ""] : []),
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url=${pyLiteral(`${origin}v1`)}, api_key=${keyed ? 'os.environ["CNA_VLLM_API_KEY"]' : '"EMPTY"'})`,
      "raw = client.chat.completions.with_raw_response.create(",
      ...args,
      ")",
      'print(raw.headers["x-cna-steering"], raw.headers["x-cna-steering-fingerprint"])',
      "print(raw.parse().choices[0].message.content)",
    ].join("\n");
  }
  $("#copy-code").value = code;
}

function selectTab(format) {
  state.copyFormat = format;
  for (const tab of $$('[role="tab"]')) {
    const on = tab.id === `tab-${format}`;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
  }
  $("#copy-code").setAttribute("aria-labelledby", `tab-${format}`);
  updateCopy();
}

async function copyCode() {
  const area = $("#copy-code");
  const btn = $("#copy-btn");
  try {
    await navigator.clipboard.writeText(area.value);
  } catch {
    area.select();
    document.execCommand?.("copy");
  }
  btn.textContent = "Copied";
  setTimeout(() => {
    btn.textContent = "Copy";
  }, 1200);
}

// --------------------------------------------------------------------------- wiring
function init() {
  const key = $("#api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) ?? "";
  let timer = null;
  key.addEventListener("input", () => {
    if (key.value) sessionStorage.setItem(KEY_STORAGE, key.value);
    else sessionStorage.removeItem(KEY_STORAGE);
    updateCopy();
    clearTimeout(timer);
    timer = setTimeout(loadCatalog, 300);
  });
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    clearTimeout(timer);
    loadCatalog();
  });
  const form = $("#controls");
  form.addEventListener("submit", run);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      form.requestSubmit();
    } else if (e.key === "Escape" && state.controllers.length) {
      stop();
    }
  });
  for (const id of ["system", "prompt", "temperature", "max-tokens", "seed"]) $(`#${id}`).addEventListener("input", updateCopy);
  $("#stop").addEventListener("click", stop);
  $("#compare-toggle").addEventListener("click", () => setCompare(state.specs.length < 2));
  $("#copy-for").addEventListener("change", updateCopy);
  $("#copy-btn").addEventListener("click", copyCode);
  for (const tab of $$('[role="tab"]')) {
    tab.addEventListener("click", () => selectTab(tab.id.slice(4)));
    tab.addEventListener("keydown", (e) => {
      if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
        const next = state.copyFormat === "curl" ? "python" : "curl";
        selectTab(next);
        $(`#tab-${next}`).focus();
      }
    });
  }
  addPaneB();
  makeSpec(0);
  selectTab("curl");
  loadCatalog();
}

/** The "+ compare" pane: a copy of pane A's markup with its letter and label changed (one copy in the HTML). */
function addPaneB() {
  const a = $("#pane-a");
  const b = a.cloneNode(true);
  b.id = "pane-b";
  b.hidden = true;
  $(".spec-letter", b).textContent = "B";
  $(".out", b).setAttribute("aria-label", "Steered B completion");
  a.after(b);
}

init();
