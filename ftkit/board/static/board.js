// ftkit board: one page, four views (#/ runs, #/run/ID, #/compare/ID,ID, #/launch, #/data), no build step.
// Everything shown comes from the JSON API (ftkit/board/app.py); live curves come from /api/events.
"use strict";

const board = (window.ftkitBoard = { charts: {}, run: null, selected: new Set(), timers: [], source: null, route: 0 });
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#db2777", "#65a30d"];

// -- helpers --------------------------------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

async function api(path, options) {
  const response = await fetch(path, options);
  let body;
  try { body = await response.json(); } catch { body = { error: response.statusText }; }
  if (!response.ok) {
    const error = new Error(body.error || response.statusText);
    error.body = body; error.status = response.status;
    throw error;
  }
  return body;
}

const post = (path, data) => api(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                          body: JSON.stringify(data) });
const fmt = (value) => (value === null || value === undefined) ? "–" :
  (typeof value === "number" ? (Number.isInteger(value) ? value.toLocaleString() : String(Number(value.toPrecision(5))))
                             : value);
const badge = (status) => h("span", { class: `badge ${status}`, "data-status": status }, status);
const runLink = (id) => `#/run/${encodeURIComponent(id)}`;

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function every(ms, fn) { fn(); board.timers.push(setInterval(fn, ms)); }

// Each view checks after every await that it is still the one shown (the user may have moved on meanwhile).
const stillShown = (route) => route === board.route;

function leaveView() {
  board.route += 1;
  board.timers.forEach(clearInterval);
  board.timers = [];
  if (board.source) { board.source.close(); board.source = null; }
  for (const chart of Object.values(board.charts)) chart.destroy();
  board.charts = {};
  board.run = null;
}

function view(...children) {
  const main = document.getElementById("view");
  main.replaceChildren(...children);
  return main;
}

// -- charts ---------------------------------------------------------------------------------------------------
function lineChart(target, title, seriesLabels, data, { log = false, sci = false } = {}) {
  const width = Math.max(target.clientWidth - 4, 320);
  const series = [{ label: "step" }, ...seriesLabels.map((label, i) => ({
    label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
    points: { show: data[0].length < 60 || label.startsWith("eval") },
  }))];
  const yAxis = sci ? { values: (u, ticks) => ticks.map((v) => v.toExponential(1)), size: 64 } : { size: 56 };
  return new uPlot({ width, height: 230, title, series, scales: { x: { time: false }, y: log ? { distr: 3 } : {} },
                     axes: [{ label: "step" }, yAxis], legend: { live: true } }, data, target);
}

function lossData(train, evaluation) {
  if (!evaluation.step.length) return [train.step, train.loss];
  return uPlot.join([[train.step, train.loss], [evaluation.step, evaluation.eval_loss]]);
}

// -- runs -----------------------------------------------------------------------------------------------------
function renderRuns() {
  const compareButton = h("button", { id: "compare", class: "primary", disabled: true, onclick: () => {
    location.hash = `#/compare/${[...board.selected].map(encodeURIComponent).join(",")}`;
  } }, "Compare selected");
  const tbody = h("tbody");
  const table = h("table", { id: "runs-table" },
    h("thead", {}, h("tr", {}, ["", "run", "status", "model", "method", "dataset", "step", "loss", "tokens/s",
      "wall time", "general kept", "learned"].map((name, i) => h("th", { class: i >= 6 ? "num" : null }, name)))),
    tbody);
  view(h("h2", {}, "Runs"), h("div", { class: "toolbar" }, compareButton,
                            h("span", { class: "muted", id: "runs-count" }, "")), table);
  const refresh = async () => {
    let body;
    try { body = await api("/api/runs"); } catch (error) { tbody.replaceChildren(h("tr", {}, h("td", { colspan: 12, class: "error" }, error.message))); return; }
    document.getElementById("root").textContent = body.root;
    const ids = new Set(body.runs.map((r) => r.id));
    for (const id of [...board.selected]) if (!ids.has(id)) board.selected.delete(id);
    compareButton.disabled = board.selected.size < 2;
    document.getElementById("runs-count").textContent =
      `${body.runs.length} run${body.runs.length === 1 ? "" : "s"}; tick two or more to compare`;
    tbody.replaceChildren(...body.runs.map((run) => {
      const box = h("input", { type: "checkbox", checked: board.selected.has(run.id), onclick: (event) => {
        event.stopPropagation();
        if (event.target.checked) board.selected.add(run.id); else board.selected.delete(run.id);
        compareButton.disabled = board.selected.size < 2;
      } });
      const steps = run.max_steps && run.step !== run.max_steps ? `${fmt(run.step)} / ${fmt(run.max_steps)}` : fmt(run.step);
      return h("tr", { class: "clickable", "data-id": run.id, title: run.detail || "",
                       onclick: () => { location.hash = runLink(run.id); } },
        h("td", {}, run.pending ? "" : box), h("td", {}, run.id), h("td", { class: "status" }, badge(run.status)),
        h("td", {}, run.model || "–"), h("td", {}, run.method || "–"), h("td", {}, run.dataset || "–"),
        h("td", { class: "num" }, steps), h("td", { class: "num loss" }, fmt(run.loss)),
        h("td", { class: "num" }, fmt(run.tokens_per_second)), h("td", { class: "num" }, duration(run.wall_seconds)),
        h("td", { class: "num" }, run.general_kept || "–"), h("td", { class: "num" }, run.learned || "–"));
    }));
    if (!body.runs.length) {
      tbody.replaceChildren(h("tr", {}, h("td", { colspan: 12, class: "muted" },
        "No runs under this root yet: launch one from the Launch tab, or run ftkit train with an output_dir here.")));
    }
  };
  every(2000, refresh);
}

// -- one run --------------------------------------------------------------------------------------------------
async function renderRun(id) {
  const route = board.route;
  const status = h("span", { id: "run-status" });
  const detail = h("span", { id: "run-detail", class: "muted" });
  const stop = h("button", { id: "stop", onclick: async () => act("/api/stop") }, "Stop");
  const resume = h("button", { id: "resume", onclick: async () => act("/api/resume") }, "Resume");
  const message = h("div", { id: "run-message" });
  const charts = { loss: h("div", { class: "card", id: "chart-loss" }), lr: h("div", { class: "card", id: "chart-lr" }),
                   grad: h("div", { class: "card", id: "chart-grad" }) };
  const summary = h("dl", { class: "kv", id: "run-summary" });
  const configText = h("pre", { id: "config" });
  const side = h("div", {});
  const consoleBox = h("pre", { id: "console", class: "console" });
  const consoleCard = h("div", { hidden: true }, h("h3", {}, "Console"), consoleBox);
  const chat = h("div", { id: "chat", hidden: true });
  view(h("h2", {}, id, status, detail), h("div", { class: "toolbar" }, stop, resume), message,
       h("div", { class: "charts" }, charts.loss, charts.lr, charts.grad),
       h("div", { class: "grid2" }, h("div", {}, h("h3", {}, "Summary"), summary, side, chat),
         h("div", {}, h("h3", {}, "Resolved config"), configText)), consoleCard);

  async function act(path) {
    message.replaceChildren();
    try {
      await post(path, { id });
      message.replaceChildren(h("div", { class: "notice good" }, path.endsWith("stop") ? "Stopping…" : "Resuming…"));
    } catch (error) { message.replaceChildren(h("div", { class: "notice bad" }, error.message)); }
  }

  function showStatus(run) {
    status.replaceChildren(badge(run.status));
    detail.textContent = run.detail || "";
    stop.disabled = !["running", "starting"].includes(run.status);
    resume.disabled = !["interrupted", "failed"].includes(run.status);
    summary.replaceChildren(...[["model", run.model], ["method", run.method], ["dataset", run.dataset],
      ["step", run.max_steps ? `${fmt(run.step)} / ${fmt(run.max_steps)}` : fmt(run.step)], ["last loss", fmt(run.loss)],
      ["eval loss", fmt(run.eval_loss)], ["tokens/s", fmt(run.tokens_per_second)],
      ["wall time", duration(run.wall_seconds)], ["general answers kept", run.general_kept],
      ["training answers learned", run.learned]].filter(([, v]) => v !== null && v !== undefined && v !== "–")
      .flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    if (run.console !== null && run.console !== undefined) {
      consoleCard.hidden = false;
      const atEnd = consoleBox.scrollTop + consoleBox.clientHeight >= consoleBox.scrollHeight - 4;
      consoleBox.textContent = run.console;
      if (atEnd) consoleBox.scrollTop = consoleBox.scrollHeight;
    }
  }

  let run;
  try { run = await api(`/api/run?id=${encodeURIComponent(id)}`); } catch (error) {
    if (stillShown(route)) view(h("h2", {}, id), h("div", { class: "notice bad", id: "run-message" }, error.message));
    return;
  }
  if (!stillShown(route)) return;
  board.run = run;
  showStatus(run);
  configText.textContent = run.config_text || "(no resolved config yet)";
  side.replaceChildren(...runExtras(run));
  if (run.can_chat) chat.replaceChildren(...chatBox(id)), (chat.hidden = false);
  if (run.pending) {  // a launch whose folder has no run files yet: follow its console until it does
    every(1000, async () => {
      try { const now = await api(`/api/run?id=${encodeURIComponent(id)}`); showStatus(now);
            if (!now.pending) renderRoute(); } catch { /* the next tick tries again */ }
    });
    return;
  }
  let log;
  try { log = await api(`/api/log?id=${encodeURIComponent(id)}`); } catch (error) {
    if (stillShown(route)) message.replaceChildren(h("div", { class: "notice bad" }, error.message));
    return;
  }
  if (!stillShown(route)) return;
  board.log = log;
  board.charts.loss = lineChart(charts.loss, "loss", log.eval.step.length ? ["loss", "eval loss"] : ["loss"],
                                lossData(log.train, log.eval));
  board.charts.lr = lineChart(charts.lr, "learning rate", ["learning rate"], [log.train.step, log.train.learning_rate], { sci: true });
  board.charts.grad = lineChart(charts.grad, "grad norm", ["grad norm"], [log.train.step, log.train.grad_norm]);
  follow(id, log, showStatus);
}

function follow(id, log, showStatus) {
  const source = new EventSource(`/api/events?id=${encodeURIComponent(id)}&cursor=${encodeURIComponent(log.cursor)}`);
  board.source = source;
  source.addEventListener("log", (event) => {
    const chunk = JSON.parse(event.data);
    if (chunk.reset) { log.train = chunk.train; log.eval = chunk.eval; } else {
      for (const key of Object.keys(chunk.train)) log.train[key].push(...chunk.train[key]);
      for (const key of Object.keys(chunk.eval)) log.eval[key].push(...chunk.eval[key]);
    }
    log.cursor = chunk.cursor;
    const labels = log.eval.step.length ? ["loss", "eval loss"] : ["loss"];
    if (board.charts.loss.series.length !== labels.length + 1) {  // eval loss appeared (or a reset removed it)
      const target = board.charts.loss.root.parentNode;
      board.charts.loss.destroy();
      board.charts.loss = lineChart(target, "loss", labels, lossData(log.train, log.eval));
    } else board.charts.loss.setData(lossData(log.train, log.eval));
    board.charts.lr.setData([log.train.step, log.train.learning_rate]);
    board.charts.grad.setData([log.train.step, log.train.grad_norm]);
    board.lastUpdate = performance.now();
  });
  source.addEventListener("status", (event) => {
    const run = JSON.parse(event.data);
    const wasRunning = board.run && board.run.status === "running";
    board.run = { ...board.run, ...run };
    showStatus(run);
    if (wasRunning && run.status !== "running") refreshExtras(id);
  });
  source.addEventListener("gone", () => {
    source.close();
    document.getElementById("run-message").replaceChildren(h("div", { class: "notice bad", id: "gone" },
      "This run's folder was deleted; it is no longer on the board."));
  });
}

async function refreshExtras(id) {
  try {
    const run = await api(`/api/run?id=${encodeURIComponent(id)}`);
    const chat = document.getElementById("chat");
    if (run.can_chat && chat && chat.hidden) { chat.replaceChildren(...chatBox(id)); chat.hidden = false; }
    document.getElementById("config").textContent = run.config_text || "";
    const side = document.getElementById("run-summary").nextSibling;
    if (side) side.replaceChildren(...runExtras(run));
  } catch { /* the run may be gone; the event stream says so */ }
}

function runExtras(run) {
  const parts = [h("h3", {}, "Reproduce"), h("pre", { id: "command" }, run.command || "")];
  if (run.checkpoints && run.checkpoints.length) {
    parts.push(h("h3", {}, "Checkpoints"), h("table", { id: "checkpoints" }, h("tbody", {},
      run.checkpoints.map((c) => h("tr", {}, h("td", {}, c.name), h("td", {}, c.complete ? "complete" : "incomplete"))))));
  }
  if (run.results) {
    const shown = Object.entries(run.results).filter(([, v]) => typeof v !== "object");
    parts.push(h("h3", {}, "train_results.json"), h("dl", { class: "kv", id: "results" },
      shown.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, fmt(v))])));
  }
  for (const evaluation of run.evaluations || []) {
    const shown = Object.entries(evaluation.results).filter(([, v]) => typeof v !== "object");
    const nested = Object.entries(evaluation.results).filter(([, v]) => v && typeof v === "object" && !Array.isArray(v));
    parts.push(h("h3", {}, `evaluation: ${evaluation.path}`), h("dl", { class: "kv evaluation" },
      shown.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, fmt(v))]),
      nested.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, JSON.stringify(v))])));
  }
  return parts;
}

function chatBox(id) {
  const messages = [];
  const logBox = h("div", { class: "chat-log", id: "chat-log" });
  const input = h("input", { type: "text", id: "chat-input", placeholder: "Ask the fine-tuned model something…" });
  const send = h("button", { id: "chat-send", class: "primary" }, "Send");
  const error = h("div", { class: "error", id: "chat-error" });
  async function ask() {
    const text = input.value.trim();
    if (!text) return;
    messages.push({ role: "user", content: text });
    logBox.append(h("div", { class: "msg user" }, text));
    input.value = ""; send.disabled = true; error.textContent = "";
    try {
      const body = await post("/api/chat", { id, messages });
      messages.push({ role: "assistant", content: body.reply });
      logBox.append(h("div", { class: "msg assistant" }, body.reply));
    } catch (failure) { messages.pop(); error.textContent = failure.message; }
    send.disabled = false; logBox.scrollTop = logBox.scrollHeight;
  }
  send.addEventListener("click", ask);
  input.addEventListener("keydown", (event) => { if (event.key === "Enter") ask(); });
  return [h("h3", {}, "Try it"), logBox, h("div", { class: "chat-row" }, input, send), error];
}

// -- compare --------------------------------------------------------------------------------------------------
async function renderCompare(ids) {
  const route = board.route;
  const chartBox = h("div", { class: "card", id: "chart-compare" });
  const onlyDiff = h("input", { type: "checkbox", id: "only-differing", checked: true });
  const diff = h("table", { id: "config-diff" });
  view(h("h2", {}, `Compare ${ids.length} runs`), chartBox,
       h("h3", {}, "Configs ", h("label", { class: "muted" }, onlyDiff, " only the keys that differ")), diff);
  let body;
  try { body = await api(`/api/compare?${ids.map((id) => `id=${encodeURIComponent(id)}`).join("&")}`); } catch (error) {
    if (stillShown(route)) view(h("h2", {}, "Compare"), h("div", { class: "notice bad" }, error.message));
    return;
  }
  if (!stillShown(route)) return;
  board.compare = body;
  const data = uPlot.join(body.curves.map((c) => [c.step, c.loss]));
  board.charts.compare = lineChart(chartBox, "loss", body.curves.map((c) => c.id), data);
  const draw = () => {
    const rows = body.config.filter((row) => !onlyDiff.checked || row.differs);
    diff.replaceChildren(h("thead", {}, h("tr", {}, h("th", {}, "key"), body.runs.map((id) => h("th", {}, id)))),
      h("tbody", {}, rows.map((row) => h("tr", { class: row.differs ? "differs" : null, "data-key": row.key },
        h("td", {}, row.key), row.values.map((v) => h("td", {}, v === null ? "(not set)" : v))))));
  };
  onlyDiff.addEventListener("change", draw);
  draw();
}

// -- launch ---------------------------------------------------------------------------------------------------
async function renderLaunch() {
  const route = board.route;
  const pick = h("select", { id: "config-pick" }, h("option", { value: "" }, "pick a config to start from…"));
  const text = h("textarea", { id: "config-text", spellcheck: "false",
    placeholder: "model_name_or_path: smollm2-135m-instruct\nstage: sft\nfinetuning_type: lora\ndataset: identity\noutput_dir: saves/my-run" });
  const validate = h("button", { id: "validate" }, "Validate");
  const launch = h("button", { id: "launch", class: "primary" }, "Launch");
  const outcome = h("div", { id: "launch-outcome" });
  const annotated = h("div", { id: "annotated", class: "annotated", hidden: true });
  view(h("h2", {}, "Launch a training run"),
       h("p", { class: "muted" }, "Checked by the same schema as ftkit train; the run is an ordinary ftkit train process."),
       h("div", { class: "toolbar" }, pick, validate, launch), h("div", { class: "grid2" }, text,
         h("div", {}, outcome, annotated)));
  try {
    const body = await api("/api/configs");
    if (stillShown(route)) pick.append(...body.configs.map((name) => h("option", { value: name }, name)));
  } catch { /* the editor still works */ }
  pick.addEventListener("change", async () => {
    if (!pick.value) return;
    try { text.value = (await api(`/api/config?name=${encodeURIComponent(pick.value)}`)).text; } catch (error) {
      outcome.replaceChildren(h("div", { class: "notice bad" }, error.message));
    }
  });

  function showProblems(problems) {
    const byLine = new Map();
    const loose = [];
    for (const p of problems) (p.line ? (byLine.get(p.line) || byLine.set(p.line, []).get(p.line)) : loose).push(p);
    outcome.replaceChildren(h("div", { class: "notice bad" },
      `${problems.length} problem${problems.length === 1 ? "" : "s"}; nothing was started.`),
      ...loose.map((p) => h("div", { class: "problem error" }, p.message)));
    annotated.hidden = false;
    annotated.replaceChildren(...text.value.split("\n").flatMap((line, i) => {
      const found = byLine.get(i + 1) || [];
      return [h("div", { class: `line${found.length ? " bad" : ""}`, "data-line": i + 1 },
                h("span", { class: "n" }, i + 1), h("code", {}, line)),
              ...found.map((p) => h("div", { class: "problem", "data-key": p.key || "" }, p.message))];
    }));
  }

  validate.addEventListener("click", async () => {
    annotated.hidden = true;
    try {
      const body = await post("/api/validate", { yaml: text.value });
      if (body.ok) outcome.replaceChildren(h("div", { class: "notice good" }, "The config is valid."));
      else showProblems(body.problems);
    } catch (error) { outcome.replaceChildren(h("div", { class: "notice bad" }, error.message)); }
  });
  launch.addEventListener("click", async () => {
    annotated.hidden = true; launch.disabled = true;
    try {
      const body = await post("/api/launch", { yaml: text.value });
      location.hash = runLink(body.id);
    } catch (error) {
      if (error.body && error.body.problems) showProblems(error.body.problems);
      else outcome.replaceChildren(h("div", { class: "notice bad" }, error.message));
    }
    launch.disabled = false;
  });
}

// -- data -----------------------------------------------------------------------------------------------------
async function renderData() {
  const route = board.route;
  const tbody = h("tbody");
  const modelPick = h("select", { id: "preview-model" });
  const templatePick = h("select", { id: "preview-template" });
  const preview = h("div", { id: "preview" });
  view(h("h2", {}, "Datasets"), h("p", { class: "muted", id: "registry" }),
       h("table", { id: "datasets" }, h("thead", {}, h("tr", {}, ["name", "format", "source", "file", "available"]
         .map((n) => h("th", {}, n)))), tbody),
       h("div", { class: "toolbar" }, h("span", {}, "preview with the tokenizer of "), modelPick,
         h("span", {}, " and the template "), templatePick), preview);
  let body;
  try { body = await api("/api/datasets"); } catch (error) { preview.replaceChildren(h("div", { class: "notice bad" }, error.message)); return; }
  if (!stillShown(route)) return;
  document.getElementById("registry").textContent = body.error || `registry: ${body.registry}`;
  modelPick.append(...body.models.map((m) => h("option", { value: m }, m)));
  templatePick.append(...body.templates.map((t) => h("option", { value: t }, t === "auto" ? "auto (the model's own)" : t)));
  let showing = null;
  let asked = 0;  // only the newest preview request may draw: an older one can answer after it
  const show = async (name) => {
    showing = name;
    const ticket = ++asked;
    preview.replaceChildren(h("p", { class: "muted" }, `encoding ${name}…`));
    try {
      const shown = await api(`/api/datasets/preview?name=${encodeURIComponent(name)}&model=${encodeURIComponent(modelPick.value)}`
        + `&template=${encodeURIComponent(templatePick.value)}`);
      if (ticket !== asked) return;
      const s = shown.stats;
      preview.replaceChildren(h("h3", {}, `${name}: ${s.examples.toLocaleString()} of ${s.records.toLocaleString()} records encoded, `
          + `${s.trained_tokens.toLocaleString()} of ${s.tokens.toLocaleString()} tokens trained`),
        h("p", { class: "muted" }, h("span", { class: "example" }, h("span", { class: "trained" }, "trained")), " / ",
          h("span", { class: "example" }, h("span", { class: "masked" }, "masked (label -100)"))),
        ...s.skipped.map((k) => h("div", { class: "notice" }, `skipped ${k.count} with ${k.reason}`)),
        ...shown.examples.map((example, i) => h("div", { class: "example" },
          h("div", { class: "muted" }, `#${i}: ${example.tokens} tokens, ${example.trained} trained`),
          h("pre", {}, example.spans.map(([piece, trained]) => h("span", { class: trained ? "trained" : "masked" }, piece))))));
    } catch (error) { if (ticket === asked) preview.replaceChildren(h("div", { class: "notice bad" }, error.message)); }
  };
  for (const pick of [modelPick, templatePick]) pick.addEventListener("change", () => showing && show(showing));
  tbody.replaceChildren(...body.datasets.map((d) => h("tr", { class: "clickable", "data-name": d.name, onclick: () => show(d.name) },
    h("td", {}, d.name), h("td", {}, d.format || d.error || ""), h("td", {}, d.source || ""), h("td", {}, d.location || ""),
    h("td", {}, d.available === null || d.available === undefined ? "needs hub or cache" : (d.available ? "yes" : "MISSING")))));
}

// -- routing --------------------------------------------------------------------------------------------------
function renderRoute() {
  leaveView();
  const hash = location.hash || "#/";
  const [, page, arg] = hash.match(/^#\/([^/]*)\/?(.*)$/) || [null, "", ""];
  for (const link of document.querySelectorAll("header nav a")) {
    link.classList.toggle("active", link.dataset.tab === (page || "runs"));
  }
  const decode = (text) => { try { return decodeURIComponent(text); } catch { return text; } };
  if (page === "run" && arg) return renderRun(decode(arg));
  if (page === "compare" && arg) return renderCompare(arg.split(",").map(decode));
  if (page === "launch") return renderLaunch();
  if (page === "data") return renderData();
  return renderRuns();
}

window.addEventListener("hashchange", renderRoute);
renderRoute();
