// The live page: every pool's status each second, with a chart of its backlog, capacity
// and calls a second over the last minutes, and a form per pool that sends a signal and
// shows its reply, or its chunks as they arrive. Addresses are relative, so the page
// works wherever the gateway is mounted; a ?token= is sent on every request.
"use strict";

const query = new URLSearchParams(location.search);
const token = query.get("token");
const views = new Map();
// Milliseconds of history the chart shows.
const CHART_SPAN = 5 * 60 * 1000;
const CHART_WIDTH = 600;
const CHART_HEIGHT = 110;

function headers(extra) {
  const all = Object.assign({}, extra || {});
  if (token) all.Authorization = "Bearer " + token;
  return all;
}

function describeProblem(problem) {
  return (problem.title || "error") + " (" + problem.status + "): " + (problem.detail || "");
}

async function problemOf(response) {
  try {
    return describeProblem(await response.json());
  } catch (error) {
    return response.status + " " + response.statusText;
  }
}

function cell(text, number) {
  const td = document.createElement("td");
  td.textContent = text;
  if (number) td.className = "number";
  return td;
}

function setState(element, state) {
  element.textContent = state;
  element.className = "state " + state;
}

// One point of a pool's history: its backlog and capacity, and the calls a second its
// agents handled since the point before (from the calls counter).
function record(view, status, now) {
  const last = view.history[view.history.length - 1];
  const calls = status.counters.calls;
  let rate = 0;
  if (last && now > last.t) rate = Math.max(0, calls - last.calls) * 1000 / (now - last.t);
  view.history.push({t: now, backlog: status.backlog, capacity: status.capacity,
                     calls: calls, rate: rate});
  while (view.history.length && view.history[0].t < now - CHART_SPAN) view.history.shift();
  return rate;
}

function drawChart(view, now) {
  const top = Math.max(1, ...view.history.map((point) => Math.max(
    point.backlog, point.capacity, point.rate)));
  const x = (t) => ((t - (now - CHART_SPAN)) / CHART_SPAN * CHART_WIDTH).toFixed(1);
  const y = (value) => (CHART_HEIGHT - 4 - value / top * (CHART_HEIGHT - 8)).toFixed(1);
  for (const name of ["backlog", "capacity", "rate"]) {
    view.chart.querySelector("polyline." + name).setAttribute("points", view.history
      .map((point) => x(point.t) + "," + y(point[name])).join(" "));
  }
  view.scale.textContent = "top " + Math.round(top) + " · last " +
    Math.round(CHART_SPAN / 60000) + " min";
}

function renderLoad(view, status) {
  const now = Date.now();
  const rate = record(view, status, now);
  const queued = status.queued === null ? "?" : status.queued;
  view.backlog.textContent = "backlog " + status.backlog + ": " + queued + " queued · " +
    status.reserved + " reserved · " + status.running + " running — capacity " +
    status.capacity + " — " + rate.toFixed(1) + " calls/s";
  drawChart(view, now);
}

function renderStatus(view, status) {
  setState(view.state, status.state);
  renderLoad(view, status);
  const byNode = new Map();
  for (const process of (status.processes.length ? status.processes : [status])) {
    const node = process.node || "?";
    if (!byNode.has(node)) byNode.set(node, []);
    byNode.get(node).push(process);
  }
  const rows = [];
  for (const [node, processes] of [...byNode.entries()].sort()) {
    const sum = (name) => processes.reduce((total, process) => total + process[name], 0);
    const states = processes.map((process) => process.state);
    const state = states.includes("ready") ? "ready"
      : states.includes("overflow") ? "overflow" : "full";
    const row = document.createElement("tr");
    row.dataset.node = node;
    const badge = document.createElement("span");
    setState(badge, state);
    const stateCell = document.createElement("td");
    stateCell.appendChild(badge);
    row.append(cell(node), stateCell, cell(sum("available") + " of " + sum("size"), true),
               cell(sum("checked_out"), true), cell(sum("waiting"), true),
               cell(sum("overflow"), true),
               cell(processes.reduce((total, process) => total + process.counters.calls, 0),
                    true));
    rows.push(row);
  }
  for (const node of status.not_answering || []) {
    const row = document.createElement("tr");
    row.dataset.node = node;
    row.append(cell(node), cell("not answering"), cell(""), cell(""), cell(""), cell(""),
               cell(""));
    rows.push(row);
  }
  view.body.replaceChildren(...rows);
}

async function refresh(view) {
  try {
    const response = await fetch("pools/" + view.name + "/status", {headers: headers()});
    if (response.ok) {
      renderStatus(view, await response.json());
    } else {
      setState(view.state, "no node");
      const row = document.createElement("tr");
      const td = cell(await problemOf(response));
      td.colSpan = 7;
      row.appendChild(td);
      view.body.replaceChildren(row);
    }
  } catch (error) {
    setState(view.state, "unreachable");
  }
}

function showReply(view, text, failed) {
  view.reply.textContent = text;
  view.reply.classList.toggle("failed", Boolean(failed));
}

function addChunk(view, chunk) {
  const item = document.createElement("li");
  item.className = "chunk";
  item.textContent = typeof chunk === "string" ? chunk : JSON.stringify(chunk);
  view.chunks.appendChild(item);
}

// Server-sent events from a POST (EventSource can only GET): read the body as it comes,
// one event per blank line.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer = (buffer + decoder.decode(value, {stream: true})).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(event, JSON.parse(data.join("\n")));
    }
  }
}

async function send(view, how) {
  view.chunks.replaceChildren();
  showReply(view, "");
  let data;
  try {
    data = JSON.parse(view.form.elements.data.value || "null");
  } catch (error) {
    showReply(view, "data is not JSON: " + error.message, true);
    return;
  }
  const body = JSON.stringify({type: view.form.elements.type.value, data: data});
  view.section.dataset.outcome = "pending";
  const response = await fetch("pools/" + view.name + "/" + how, {
    method: "POST", body: body, headers: headers({"Content-Type": "application/json"}),
  });
  if (!response.ok) {
    showReply(view, await problemOf(response), true);
    view.section.dataset.outcome = "error";
    return;
  }
  if (how === "call") {
    showReply(view, JSON.stringify(await response.json(), null, 2));
    view.section.dataset.outcome = "reply";
    return;
  }
  await readEvents(response, (event, value) => {
    if (event === "chunk") addChunk(view, value);
    else if (event === "reply") showReply(view, JSON.stringify(value, null, 2));
    else if (event === "error") showReply(view, describeProblem(value), true);
    if (event !== "chunk") view.section.dataset.outcome = event;
  });
}

function build(pool) {
  const section = document.getElementById("pool-template").content
    .firstElementChild.cloneNode(true);
  section.id = "pool-" + pool.name;
  section.dataset.pool = pool.name;
  section.querySelector(".name").textContent = pool.name;
  const nodes = pool.nodes.map((record) => record.node).join(", ") || "none recorded";
  section.querySelector(".agent").textContent = pool.agent + " · size " +
    pool.options.size + " per process · max_overflow " + pool.options.max_overflow +
    " · nodes: " + nodes;
  const form = section.querySelector("form");
  for (const signal of pool.signals) {
    const option = document.createElement("option");
    option.value = signal.type;
    option.textContent = signal.type + (signal.streams ? " (streams)" : "");
    form.elements.type.appendChild(option);
  }
  const view = {
    name: pool.name, section: section, form: form,
    state: section.querySelector(".state"), body: section.querySelector("tbody"),
    chunks: section.querySelector(".chunks"), reply: section.querySelector(".reply"),
    backlog: section.querySelector("p.backlog"), chart: section.querySelector(".chart"),
    scale: section.querySelector(".scale"), history: [],
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    send(view, event.submitter ? event.submitter.value : "call");
  });
  views.set(pool.name, view);
  return section;
}

// A link can fill a pool's form and send it once: ?pool=P&type=T&data={...}&send=stream
function sendFromLink() {
  const view = views.get(query.get("pool"));
  if (!view || !query.get("send")) return;
  if (query.get("type")) view.form.elements.type.value = query.get("type");
  if (query.get("data")) view.form.elements.data.value = query.get("data");
  send(view, query.get("send") === "stream" ? "stream" : "call");
}

async function tick() {
  await Promise.all([...views.values()].map(refresh));
  document.getElementById("updated").textContent =
    "updated " + new Date().toLocaleTimeString();
}

async function start() {
  const response = await fetch("pools", {headers: headers()});
  if (!response.ok) {
    const problem = document.getElementById("problem");
    problem.textContent = await problemOf(response);
    problem.hidden = false;
    document.getElementById("updated").textContent = "";
    return;
  }
  const document_ = await response.json();
  document.getElementById("pools").replaceChildren(...document_.pools.map(build));
  await tick();
  setInterval(tick, 1000);
  sendFromLink();
}

start();
