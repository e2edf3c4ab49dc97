// The scaler's live dashboard: one EventSource on /events ("init" with the history, then an
// "update" after every cycle), uPlot charts per service, the event feed, and the operator's
// controls (POST /services/<name>/<action> with the token the user types; it is kept in this
// tab's sessionStorage only).
"use strict";

// Replica states drawn stacked in the table and as lines on the chart. A state the server adds
// later (e.g. "warm") shows up as soon as its points carry it.
const REPLICA_STATES = ["serving", "starting", "draining", "warm"];
const COLOURS = {
  serving: "#079455", starting: "#1570ef", draining: "#9e77ed", warm: "#f79009",
  desired: "#101828", waiting: "#f04438", in_flight: "#1570ef", oldest_age_s: "#b54708",
};
const LABELS = {
  serving: "serving", starting: "starting", draining: "draining", warm: "warm",
  desired: "desired", waiting: "waiting", in_flight: "in flight", oldest_age_s: "oldest (s)",
};
const CHART_HEIGHT = 150;
const MAX_EVENTS_SHOWN = 200;

const state = {
  points: [],        // [{t, seq, role, services: {name: {serving, ...}}}], oldest first
  status: {},        // the last cycle's snapshot (as /status)
  control: false,    // the server has a token configured
  windowS: 300,
  historyS: 600,
  cards: {},         // service -> {el, charts: {replicas, messages, age}}
};
window.dashboard = state;  // for people poking at it in the console, and for the browser tests

const $ = (sel, root = document) => root.querySelector(sel);

function fmt(value, digits = 0) {
  if (value === null || value === undefined) return "?";
  if (typeof value === "number" && !Number.isInteger(value)) return value.toFixed(digits || 1);
  return String(value);
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
}

// -- charts ---------------------------------------------------------------------------------

function chartSpec(kind, service) {
  if (kind === "replicas") {
    const keys = REPLICA_STATES.filter((k) => k !== "warm" || hasKey(service, "warm"));
    return { title: "replicas", keys: [...keys, "desired"], dash: { desired: [6, 4] } };
  }
  if (kind === "messages") return { title: "messages", keys: ["waiting", "in_flight"], dash: {} };
  return { title: "oldest message age (s)", keys: ["oldest_age_s"], dash: {} };
}

function hasKey(service, key) {
  return state.points.some((p) => p.services[service] && key in p.services[service]);
}

function chartWidth(el) {
  return Math.max(220, Math.floor(el.getBoundingClientRect().width || 320));
}

function makeChart(el, kind, service) {
  const spec = chartSpec(kind, service);
  const series = [{}].concat(spec.keys.map((key) => ({
    label: LABELS[key] || key,
    stroke: COLOURS[key],
    width: 2,
    dash: spec.dash[key],
    spanGaps: false,   // a missing signal is a gap, never a zero
    points: { show: false },
  })));
  const opts = {
    title: spec.title,
    width: chartWidth(el),
    height: CHART_HEIGHT,
    series,
    scales: {
      // Always the chosen window, newest on the right, so the charts line up across services.
      x: { time: true, range: (u, min, max) => [max - state.windowS, max] },
      y: { range: (u, min, max) => [0, Math.max(1, (max || 0) * 1.1)] },
    },
    axes: [{}, { size: 44 }],
    legend: { live: false },
    cursor: { drag: { x: false, y: false } },
  };
  const chart = new uPlot(opts, chartData(service, spec.keys), el);
  chart.keys = spec.keys;
  chart.kind = kind;
  return chart;
}

function visiblePoints() {
  if (!state.points.length) return [];
  const last = state.points[state.points.length - 1].t;
  return state.points.filter((p) => p.t >= last - state.windowS);
}

function chartData(service, keys) {
  const pts = visiblePoints();
  const xs = pts.map((p) => p.t);
  const columns = keys.map((key) => pts.map((p) => {
    const row = p.services[service];
    const v = row ? row[key] : null;
    return v === undefined ? null : v;
  }));
  return [xs, ...columns];
}

// -- the service cards ----------------------------------------------------------------------

function card(service) {
  if (state.cards[service]) return state.cards[service];
  const el = $("#service-card").content.firstElementChild.cloneNode(true);
  el.dataset.service = service;
  el.id = `svc-${service}`;
  $(".name", el).textContent = service;
  for (const button of el.querySelectorAll("button[data-action]")) {
    button.addEventListener("click", () => control(service, button.dataset.action, el));
  }
  const services = $("#services");
  const names = [...services.children].map((c) => c.dataset.service);
  const before = names.find((n) => n > service);
  services.insertBefore(el, before ? $(`[data-service="${CSS.escape(before)}"]`, services) : null);
  const entry = { el, charts: {} };
  state.cards[service] = entry;
  for (const holder of el.querySelectorAll("[data-chart]")) {
    entry.charts[holder.dataset.chart] = makeChart(holder, holder.dataset.chart, service);
  }
  return entry;
}

function renderCards() {
  const services = state.status.services || {};
  const lastPoint = state.points[state.points.length - 1];
  const readOnly = state.status.role === "standby" || !state.control;
  for (const [name, row] of Object.entries(services)) {
    const { el, charts } = card(name);
    const live = (lastPoint && lastPoint.services[name]) || {};
    const set = (field, value) => { $(`[data-field="${field}"]`, el).textContent = value; };
    for (const key of ["serving", "starting", "draining"]) set(key, fmt(live[key]));
    set("desired", fmt(row.desired));
    set("range", `${row.min_replicas}–${row.max_replicas}`);
    set("waiting", fmt(row.waiting));
    set("in_flight", fmt(row.in_flight));
    set("oldest_age_s", row.oldest_age_s === null ? "–" : `${fmt(row.oldest_age_s, 1)} s`);
    set("action", (row.action || "?") + (row.emergency ? " (emergency)" : ""));
    let why = (row.reasons || []).join("; ");
    if (row.note) why = `(${row.note}) ${why}`;
    if (row.error) why = `ERROR ${row.error}; ${why}`;
    set("reasons", why);
    $(".override", el).textContent = row.override ? `[${row.override}]` : "";
    for (const b of el.querySelectorAll("button, input")) b.disabled = readOnly;
    for (const chart of Object.values(charts)) chart.setData(chartData(name, chart.keys));
  }
}

// -- header, banners, events ----------------------------------------------------------------

function renderHeader() {
  const s = state.status;
  const role = s.role || "?";
  const badge = $("#role");
  badge.textContent = role;
  badge.dataset.role = role;
  $("#cycle").textContent = s.cycle ? `cycle ${s.cycle} at ${clock(s.written_at)}` : "no cycle yet";
  const standby = $("#standby");
  if (role === "standby") {
    const holder = (s.leader && s.leader.holder) || "nobody";
    standby.textContent = `Standby: a read-only view. The leader (${holder}) acts; controls ` +
      "are off on this page (open the leader's dashboard to pause or pin).";
    standby.hidden = false;
  } else if (!state.control) {
    standby.textContent = "Read-only: this scaler has no SCALER_TOKEN, so control is disabled.";
    standby.hidden = false;
  } else {
    standby.hidden = true;
  }
  const problems = [...(s.errors || [])];
  if (s.policy_error) problems.unshift(`policy reload refused: ${s.policy_error}`);
  $("#problems").hidden = problems.length === 0;
  $("#problems").textContent = problems.join(" | ");
}

function addEvents(events) {
  const list = $("#events");
  for (const e of events) {
    const li = document.createElement("li");
    li.dataset.kind = e.kind;
    if (e.service) li.dataset.service = e.service;
    const time = document.createElement("time");
    time.textContent = clock(e.at);
    const kind = document.createElement("span");
    kind.className = "kind";
    kind.dataset.kind = e.kind;
    kind.textContent = e.kind;
    li.append(time, kind, document.createTextNode(e.text));
    list.prepend(li);
  }
  while (list.children.length > MAX_EVENTS_SHOWN) list.lastElementChild.remove();
}

function trim() {
  if (!state.points.length) return;
  const last = state.points[state.points.length - 1].t;
  const keep = Math.max(state.historyS, state.windowS);
  while (state.points.length && state.points[0].t < last - keep) state.points.shift();
}

// -- the stream -----------------------------------------------------------------------------

function connect() {
  const source = new EventSource("/events");
  const conn = $("#conn");
  source.addEventListener("init", (msg) => {
    const data = JSON.parse(msg.data);
    state.points = data.points;
    state.status = data.status || {};
    state.control = Boolean(data.control);
    state.historyS = data.history_s;
    $("#events").replaceChildren();
    addEvents(data.events);
    render();
    conn.textContent = "live";
    conn.dataset.state = "live";
  });
  source.addEventListener("update", (msg) => {
    const data = JSON.parse(msg.data);
    state.points.push(...data.points);
    state.status = data.status || state.status;
    trim();
    addEvents(data.events);
    render();
  });
  source.onerror = () => {
    conn.textContent = "reconnecting…";
    conn.dataset.state = "reconnecting";
  };
}

function render() {
  renderHeader();
  renderCards();
}

// -- control --------------------------------------------------------------------------------

async function control(service, action, el) {
  const msg = $("#control-msg");
  const body = { reason: "from the dashboard" };
  if (action === "pin") {
    const raw = $(".pin-n", el).value;
    if (raw === "" || !/^\d+$/.test(raw)) {
      msg.textContent = `${service}: type the number of replicas to pin first`;
      msg.dataset.ok = "false";
      return;
    }
    body.replicas = Number(raw);
  }
  if (action === "resume" || action === "unpin") delete body.reason;
  const token = $("#token").value.trim();
  sessionStorage.setItem("scaler-token", token);
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  let reply;
  let ok = false;
  try {
    const response = await fetch(`/services/${encodeURIComponent(service)}/${action}`, {
      method: "POST", headers, body: JSON.stringify(body),
    });
    reply = await response.json();
    ok = response.ok;
  } catch (err) {
    reply = { error: String(err) };
  }
  msg.dataset.ok = String(ok);
  msg.textContent = ok
    ? `${service}: ${action} done (takes effect at the next cycle)`
    : `${service}: ${action} refused: ${reply.error}`;
}

// -- start ----------------------------------------------------------------------------------

$("#token").value = sessionStorage.getItem("scaler-token") || "";
$("#window").addEventListener("change", (e) => {
  state.windowS = Number(e.target.value);
  renderCards();
});
window.addEventListener("resize", () => {
  for (const { charts } of Object.values(state.cards)) {
    for (const chart of Object.values(charts)) {
      chart.setSize({ width: chartWidth(chart.root.parentElement), height: CHART_HEIGHT });
    }
  }
});
connect();
