// loraplex playground: mix adapters with sliders, compare mixes side by side, watch the
// registry, the engine and fine-tuning jobs. Framework-free and build-free: the server ships
// these three files from its binary, and the page calls only the public API of its own origin.
// The page's state lives in its URL (documented in the README):
//   /ui?mix=NAME:SCALE,NAME:SCALE&mix2=…&mix3=…&mix4=…&prompt=…&mode=prompt|chat
//      &max_tokens=N&temperature=T&top_p=P&seed=S&run=1
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const state = {
  key: sessionStorage.getItem("loraplex-key") || "",
  base: null,          // the base model's id
  maxScale: 100,       // the server's |scale| limit
  adapters: [],        // names of adapters
  mixes: {},           // named mix → [{name, scale}]
  columns: [[]],       // one mix per column: [{name, scale}]
  ran: false,          // a generation ran (slider moves then regenerate)
  inflight: [],
};
const SLIDER_STEP = 0.05;
// The slider spans ±4 (where mixing is interesting) or the server's limit if smaller; the
// number box beside it takes any scale the server allows, and the slider widens to show it.
const sliderSpan = (scale) => Math.min(state.maxScale, Math.max(4, Math.ceil(Math.abs(scale))));

// ---- the URL ----

function parseMix(text) {
  if (!text) return [];
  return text.split(",").map((item) => item.trim()).filter(Boolean).map((item) => {
    const i = item.lastIndexOf(":");
    const name = i < 0 ? item : item.slice(0, i);
    const scale = i < 0 ? 1 : Number(item.slice(i + 1));
    return { name, scale: Number.isFinite(scale) ? scale : 1 };
  });
}

const formatScale = (s) => String(Math.round(s * 1000) / 1000);
const mixText = (mix) => mix.map((m) => `${m.name}:${formatScale(m.scale)}`).join(",");

function readUrl() {
  const q = new URLSearchParams(location.search);
  const cols = [q.get("mix") ?? ""];
  for (let k = 2; k <= 4; k++) if (q.has(`mix${k}`)) cols.push(q.get(`mix${k}`));
  state.columns = cols.map(parseMix);
  if (q.has("prompt")) $("#prompt").value = q.get("prompt");
  if (q.get("mode") === "chat") $('input[name=mode][value=chat]').checked = true;
  for (const [param, id] of [["max_tokens", "#max-tokens"], ["temperature", "#temperature"], ["top_p", "#top-p"], ["seed", "#seed"]]) {
    if (q.has(param)) $(id).value = q.get(param);
  }
  return q.get("run") === "1";
}

function writeUrl() {
  const q = new URLSearchParams();
  state.columns.forEach((mix, i) => q.set(i === 0 ? "mix" : `mix${i + 1}`, mixText(mix)));
  q.set("prompt", $("#prompt").value);
  q.set("mode", mode());
  q.set("max_tokens", $("#max-tokens").value);
  q.set("temperature", $("#temperature").value);
  if ($("#top-p").value !== "1") q.set("top_p", $("#top-p").value);
  if ($("#seed").value !== "") q.set("seed", $("#seed").value);
  if (state.ran) q.set("run", "1");
  history.replaceState(null, "", `/ui?${q}`);
}

const mode = () => $('input[name=mode]:checked').value;

// ---- the API ----

function headers(json = true) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: { ...headers(!!options.body), ...(options.headers || {}) } });
  const text = await r.text();
  let body;
  try { body = JSON.parse(text); } catch { body = text; }
  if (!r.ok) throw new Error(body?.error?.message || `${r.status} ${text.slice(0, 200)}`);
  return body;
}

async function loadModels() {
  const models = await api("/v1/models");
  state.adapters = [];
  state.mixes = {};
  for (const m of models.data) {
    const info = m.loraplex || {};
    if (!m.parent) {
      state.base = m.id;
      if (info.max_abs_scale) state.maxScale = info.max_abs_scale;
    } else if (info.kind === "mix") {
      if (!info.error) state.mixes[m.id] = info.adapters;
    } else if (info.state !== "failed") {
      state.adapters.push(m.id);
    }
  }
  // Earlier resident versions, pinned as `name@N` (the current one is the plain name).
  try {
    const list = await api("/v1/adapters");
    for (const a of list.data) {
      for (const v of a.versions || []) {
        if (v !== a.version && state.adapters.includes(a.name)) state.adapters.push(`${a.name}@${v}`);
      }
    }
  } catch (e) { /* the list is optional here */ }
}

// ---- the mixer ----

function renderColumns() {
  const box = $("#columns");
  box.replaceChildren();
  state.columns.forEach((mix, col) => {
    const node = $("#column-template").content.firstElementChild.cloneNode(true);
    $(".column-title", node).textContent = state.columns.length > 1 ? `Mix ${col + 1}` : "Mix";
    const rows = $(".mix", node);
    if (mix.length === 0) rows.append(Object.assign(document.createElement("p"), { className: "empty", textContent: "No adapter: the base model." }));
    mix.forEach((m, i) => rows.append(mixRow(col, i, m)));
    const select = $(".add-adapter", node);
    select.setAttribute("aria-label", `add an adapter or named mix to mix ${col + 1}`);
    for (const name of state.adapters) select.append(new Option(name, `a:${name}`));
    for (const name of Object.keys(state.mixes)) select.append(new Option(`${name} (named mix)`, `m:${name}`));
    select.addEventListener("change", () => {
      const [kind, name] = [select.value.slice(0, 1), select.value.slice(2)];
      const add = kind === "m" ? state.mixes[name].map((a) => ({ ...a })) : [{ name, scale: 1 }];
      for (const a of add) if (!mix.some((x) => x.name === a.name)) mix.push(a);
      changed(true);
    });
    const remove = $(".remove-column", node);
    remove.hidden = state.columns.length === 1;
    remove.addEventListener("click", () => { state.columns.splice(col, 1); changed(true); });
    $(".save-mix", node).addEventListener("click", () => saveMix(mix));
    const out = $(".output", node);
    out.dataset.testid = `output-${col + 1}`;
    out.setAttribute("aria-label", `output of mix ${col + 1}`);
    box.append(node);
  });
  $("#add-column").disabled = state.columns.length >= 4;
}

function mixRow(col, i, m) {
  const row = document.createElement("div");
  row.className = "mix-row";
  const id = `s-${col}-${i}`;
  const label = Object.assign(document.createElement("label"), { htmlFor: id, className: "name", textContent: m.name });
  const span = sliderSpan(m.scale);
  const slider = Object.assign(document.createElement("input"), {
    type: "range", id, min: -span, max: span, step: SLIDER_STEP, value: m.scale,
  });
  slider.dataset.testid = `slider-${col + 1}-${m.name}`;
  slider.setAttribute("aria-valuetext", `scale ${formatScale(m.scale)}`);
  const number = Object.assign(document.createElement("input"), {
    type: "number", min: -state.maxScale, max: state.maxScale, step: SLIDER_STEP, value: formatScale(m.scale),
  });
  number.setAttribute("aria-label", `scale of ${m.name}, exact`);
  const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "✕" });
  remove.setAttribute("aria-label", `remove ${m.name} from mix ${col + 1}`);
  const show = () => {
    label.classList.toggle("off", m.scale === 0);
    slider.setAttribute("aria-valuetext", `scale ${formatScale(m.scale)}${m.scale === 0 ? ", off" : ""}`);
  };
  show();
  slider.addEventListener("input", () => { m.scale = Number(slider.value); number.value = formatScale(m.scale); show(); changed(false); });
  number.addEventListener("change", () => {
    const v = Number(number.value);
    if (Number.isFinite(v) && Math.abs(v) <= state.maxScale) {
      m.scale = v;
      const wide = sliderSpan(v);
      if (wide > Number(slider.max)) { slider.min = -wide; slider.max = wide; }
      slider.value = v; show(); changed(false);
    }
    else number.value = formatScale(m.scale);
  });
  remove.addEventListener("click", () => { state.columns[col].splice(i, 1); changed(true); });
  row.append(label, slider, number, remove);
  return row;
}

let regenTimer = null;
function changed(structure) {
  if (structure) renderColumns();
  writeUrl();
  if (state.ran) {
    clearTimeout(regenTimer);
    regenTimer = setTimeout(runAll, 350);
  }
}

async function saveMix(mix) {
  const name = prompt("Name of the new mix (letters, digits, . _ -):");
  if (!name) return;
  try {
    await api("/v1/mixes", { method: "POST", body: JSON.stringify({ name, adapters: mix.filter((m) => m.scale !== 0) }) });
    status(`saved named mix ${name}`);
    await loadModels();
    renderColumns();
  } catch (e) { status(`could not save: ${e.message}`); }
}

function status(text) { $("#status").textContent = text; }

// ---- generation ----

function requestBody(mix) {
  const body = {
    model: state.base,
    max_tokens: Number($("#max-tokens").value) || 64,
    temperature: Number($("#temperature").value) || 0,
    stream: true,
    adapters: mix.filter((m) => m.scale !== 0).map((m) => ({ name: m.name, scale: m.scale })),
  };
  const topP = Number($("#top-p").value);
  if (topP && topP !== 1) body.top_p = topP;
  if ($("#seed").value !== "") body.seed = Number($("#seed").value);
  if (mode() === "chat") {
    body.messages = [{ role: "user", content: $("#prompt").value }];
    body.logprobs = true;
  } else {
    body.prompt = $("#prompt").value;
    body.logprobs = 1;
  }
  return body;
}

function runAll() {
  state.ran = true;
  writeUrl();
  for (const c of state.inflight) c.abort();
  state.inflight = [];
  document.querySelectorAll(".column").forEach((node, col) => run(node, state.columns[col]));
}

async function run(node, mix) {
  const out = $(".output", node), meta = $(".meta", node);
  out.replaceChildren();
  out.dataset.state = "running";
  meta.textContent = "";
  const ctrl = new AbortController();
  state.inflight.push(ctrl);
  const started = performance.now();
  let tokens = 0, firstAt = null, finish = null;
  try {
    const path = mode() === "chat" ? "/v1/chat/completions" : "/v1/completions";
    const r = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(requestBody(mix)), signal: ctrl.signal });
    if (!r.ok) {
      const e = await r.json().catch(() => ({}));
      throw new Error(e?.error?.message || `HTTP ${r.status}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const choice = chunk.choices?.[0];
          if (!choice) continue;
          for (const [text, lp] of pieces(choice)) {
            firstAt ??= performance.now();
            tokens++;
            out.append(token(text, lp));
          }
          finish = choice.finish_reason || finish;
        }
      }
    }
    const secs = (performance.now() - started) / 1000;
    const ttft = firstAt ? ((firstAt - started) / 1000).toFixed(2) : "–";
    meta.textContent = `${tokens} tokens in ${secs.toFixed(2)} s, first after ${ttft} s, finish: ${finish ?? "?"}`;
    out.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") return;
    out.dataset.state = "error";
    out.textContent = `Error: ${e.message}`;
  }
}

// A chunk's text pieces with their log-probabilities (completions: per token; chat: per
// content token).
function pieces(choice) {
  if (choice.delta) {
    const lps = choice.logprobs?.content;
    if (lps && lps.length) return lps.map((t) => [t.token, t.logprob]);
    return choice.delta.content ? [[choice.delta.content, null]] : [];
  }
  const lp = choice.logprobs;
  if (lp?.tokens?.length) {
    // Their concatenation is the chunk's text.
    const joined = lp.tokens.join("");
    if (joined === choice.text) return lp.tokens.map((t, i) => [t, lp.token_logprobs[i]]);
  }
  return choice.text ? [[choice.text, null]] : [];
}

function token(text, logprob) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  if (logprob !== null && logprob !== undefined) {
    const p = Math.exp(logprob);
    span.title = `logprob ${logprob.toFixed(3)} (p ${(p * 100).toFixed(1)} %)`;
  }
  return span;
}

// ---- operations ----

const history60 = { t: [], tokS: [], ttft: [], running: [], kv: [] };
let lastScrape = null;

function parseMetrics(text) {
  const sums = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/);
    if (!m) continue;
    sums[m[1]] = (sums[m[1]] || 0) + Number(m[3]);
  }
  return sums;
}

async function pollEngine() {
  let m;
  try {
    const r = await fetch("/metrics", { headers: headers(false) });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    m = parseMetrics(await r.text());
  } catch (e) { $("#engine-now").textContent = `metrics unavailable: ${e.message}`; return; }
  const now = performance.now() / 1000;
  const g = (n) => m[n] || 0;
  const figures = {
    "running": g("loraplex_sequences_running"),
    "waiting": g("loraplex_sequences_waiting"),
    "KV pool": `${g("loraplex_kv_cache_tokens")} / ${g("loraplex_kv_cache_capacity_tokens")} tokens`,
    "prefix-cache hit rate": g("loraplex_prefix_cache_queries_total") ? `${(100 * g("loraplex_prefix_cache_hits_total") / g("loraplex_prefix_cache_queries_total")).toFixed(1)} %` : "–",
  };
  if (lastScrape) {
    const dt = now - lastScrape.t;
    const tokS = (g("loraplex_generated_tokens_total") - lastScrape.gen) / dt;
    const n = g("loraplex_time_to_first_token_seconds_count") - lastScrape.ttftN;
    const ttft = n > 0 ? (g("loraplex_time_to_first_token_seconds_sum") - lastScrape.ttftS) / n * 1000 : null;
    for (const [k, v] of [["t", now], ["tokS", tokS], ["ttft", ttft], ["running", g("loraplex_sequences_running")], ["kv", g("loraplex_kv_cache_tokens")]]) {
      history60[k].push(v);
      if (history60[k].length > 150) history60[k].shift();
    }
    figures["tokens/s"] = tokS.toFixed(1);
    figures["mean TTFT (last 2 s)"] = ttft === null ? "–" : `${ttft.toFixed(0)} ms`;
  }
  lastScrape = { t: now, gen: g("loraplex_generated_tokens_total"), ttftN: g("loraplex_time_to_first_token_seconds_count"), ttftS: g("loraplex_time_to_first_token_seconds_sum") };
  const dl = $("#engine-now");
  dl.replaceChildren();
  for (const [k, v] of Object.entries(figures)) {
    dl.append(Object.assign(document.createElement("dt"), { textContent: k }), Object.assign(document.createElement("dd"), { textContent: String(v) }));
  }
  const charts = $("#engine-charts");
  charts.replaceChildren(
    chart("output tokens/s, last 5 minutes", history60.tokS),
    chart("mean time to first token (ms), last 5 minutes", history60.ttft),
    chart("running sequences, last 5 minutes", history60.running),
  );
}

function polyline(values, w, h) {
  let vs = values.map((v) => (v === null || !Number.isFinite(v) ? 0 : v));
  if (vs.length === 1) vs = [vs[0], vs[0]]; // one sample: a level line
  const max = Math.max(1e-9, ...vs);
  return vs.map((v, i) => `${(i / Math.max(1, vs.length - 1)) * w},${h - (v / max) * (h - 4) - 2}`).join(" ");
}

function chart(caption, values) {
  const fig = document.createElement("figure");
  fig.className = "chart";
  fig.style.margin = "0";
  const last = values.length ? values[values.length - 1] : null;
  const max = values.length ? Math.max(...values.map((v) => v ?? 0)) : 0;
  fig.innerHTML = `<figcaption></figcaption><svg viewBox="0 0 300 60" preserveAspectRatio="none" role="img"><polyline points="${polyline(values, 300, 60)}"/></svg>`;
  fig.querySelector("figcaption").textContent = `${caption}: now ${last === null ? "–" : last.toFixed(1)}, max ${max.toFixed(1)}`;
  fig.querySelector("svg").setAttribute("aria-label", `${caption}; ${values.length} samples, latest ${last === null ? "none" : last.toFixed(1)}`);
  return fig;
}

async function pollRegistry() {
  let list;
  try { list = await api("/v1/adapters"); } catch (e) { return; }
  const body = $("#registry tbody");
  body.replaceChildren();
  for (const a of list.data) {
    const tr = document.createElement("tr");
    tr.dataset.adapter = a.name;
    const when = a.last_used ? new Date(a.last_used * 1000).toLocaleTimeString() : "–";
    const size = a.size_bytes ? `${(a.size_bytes / 1024 / 1024).toFixed(1)} MiB` : "–";
    const versions = (a.versions || []).length > 1 ? `${a.version} (resident: ${a.versions.join(", ")})` : a.version;
    for (const [text, cls] of [[a.name], [a.state], [versions], [a.rank ?? "–"], [size], [(a.targets || []).join(", ")], [when], [a.error || "", "error"]]) {
      const td = document.createElement("td");
      td.textContent = String(text);
      if (cls) td.className = cls;
      tr.append(td);
    }
    body.append(tr);
  }
}

async function pollJobs() {
  const box = $("#jobs");
  let jobs;
  try { jobs = await api("/v1/fine_tuning/jobs?limit=5"); } catch (e) { box.textContent = `jobs unavailable: ${e.message}`; return; }
  if (!jobs.data.length) { box.textContent = "No jobs yet (POST /v1/fine_tuning/jobs)."; return; }
  box.replaceChildren();
  for (const j of jobs.data) {
    const div = document.createElement("div");
    div.className = "job";
    div.dataset.job = j.id;
    let losses = [];
    try {
      const ev = await api(`/v1/fine_tuning/jobs/${j.id}/events?limit=10000`);
      losses = ev.data.filter((e) => e.type === "metrics").reverse().map((e) => e.data.train_loss);
    } catch (e) { /* shown without a curve */ }
    const head = document.createElement("p");
    head.textContent = `${j.id}: ${j.status}${j.fine_tuned_model ? ` → ${j.fine_tuned_model}` : ""}, ${losses.length} steps${losses.length ? `, loss ${losses[losses.length - 1].toFixed(4)}` : ""}`;
    div.append(head);
    if (losses.length > 1) div.append(chart("training loss per step", losses));
    if (j.fine_tuned_model) {
      const a = document.createElement("a");
      a.href = `/ui?mix=${encodeURIComponent(`${j.fine_tuned_model}:1`)}`;
      a.textContent = "Try it in the mixer";
      div.append(a);
    }
    box.append(div);
  }
}

// ---- start ----

async function start() {
  $("#api-key").value = state.key;
  $("#key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    state.key = $("#api-key").value;
    sessionStorage.setItem("loraplex-key", state.key);
    await boot(false);
  });
  for (const id of ["#prompt", "#max-tokens", "#temperature", "#top-p", "#seed"]) $(id).addEventListener("change", () => changed(false));
  document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", () => changed(false)));
  $("#run").addEventListener("click", runAll);
  $("#add-column").addEventListener("click", () => {
    if (state.columns.length < 4) state.columns.push(state.columns[state.columns.length - 1].map((m) => ({ ...m })));
    changed(true);
  });
  $("#copy-link").addEventListener("click", () => { writeUrl(); navigator.clipboard?.writeText(location.href); status("link copied"); });
  const runNow = readUrl();
  await boot(runNow);
}

async function boot(runNow) {
  try {
    await loadModels();
    $("#key-state").textContent = "connected";
  } catch (e) {
    $("#key-state").textContent = `not connected: ${e.message}`;
    renderColumns();
    return;
  }
  renderColumns();
  if (runNow) runAll(); else writeUrl();
  pollEngine(); pollRegistry(); pollJobs();
  clearInterval(state.timer);
  state.timer = setInterval(() => { pollEngine(); pollRegistry(); pollJobs(); }, 2000);
}

start();
