# -*- test-case-name: tests.e2e.test_statuspage -*-
"""
The status page at the admin root, for a browser: one self-contained HTML
document (no CDN, no build step) that polls /status, the admin snapshot,
every two seconds and renders it. With admin_token set, open it as
`/?token=…`; the page sends the token on its own requests.
"""

from __future__ import annotations

STATUS_PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>bioproxy</title>
<style>
  body { font: 13px/1.4 system-ui, sans-serif; margin: 1rem; color: #222; background: #fafafa; max-width: 1248px; }
  h1 { font-size: 1.3rem; margin: 0 0 .3rem; } h2 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
  table { border-collapse: collapse; background: #fff; min-width: 40rem; max-width: 100%; }
  th, td { text-align: left; padding: .2rem .45rem; border-bottom: 1px solid #e4e4e4; white-space: nowrap; }
  td.wrap { white-space: normal; overflow-wrap: anywhere; max-width: 18rem; }
  th { background: #f0f0f0; font-weight: 600; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  td.why { white-space: normal; overflow-wrap: anywhere; max-width: 20rem; color: #555; }
  #summary, #model { overflow-wrap: anywhere; }
  tr.sub td:first-child { padding-left: 1.6rem; color: #555; }
  .state { padding: .05rem .45rem; border-radius: .6rem; background: #eee; }
  .ok { background: #d8f3dc; } .wait { background: #fff3bf; } .bad { background: #ffd6d6; }
  #summary span { margin-right: 1.2rem; } #error { color: #b00; }
  small { color: #666; }
</style>
</head>
<body>
<h1>bioproxy <small id="version"></small></h1>
<div id="summary"><span id="backend">loading\xe2\x80\xa6</span><span id="ready"></span><span id="queue"></span></div>
<div id="model"></div>
<div id="error"></div>
<h2>Templates</h2>
<table id="templates"><thead><tr><th>head</th><th>warm state</th><th>tokens</th><th>hits</th><th>misses</th>
<th>hit ratio</th><th>tokens saved</th><th>warmup</th><th>last warmup</th><th>why not / error</th></tr></thead><tbody></tbody></table>
<h2>Slots</h2>
<table id="slots"><thead><tr><th>slot</th><th>holds</th><th>state</th><th>busy</th><th>idle s</th></tr></thead>
<tbody></tbody></table>
<h2>Last requests</h2>
<table id="requests"><thead><tr><th>time</th><th>request</th><th>status</th><th>template</th><th>why</th>
<th>cached</th><th>computed</th><th>first byte ms</th><th>ms</th><th>id</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token");
const headers = token ? { Authorization: "Bearer " + token } : {};
const good = ["warm in a slot", "warm in llama-server's RAM cache", "on disk"];
const waiting = ["queued", "warming", "retrying"];

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}
function badge(row, state, where) {
  const span = document.createElement("span");
  span.textContent = state || "";
  span.className = "state " + (good.includes(state) ? "ok" : waiting.includes(state) ? "wait" : "bad");
  const place = row.insertCell();
  place.className = "wrap";
  place.appendChild(span);
  if (where) place.appendChild(document.createTextNode(" at " + where));
}
function clock(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleTimeString([], { hour12: false }) : "";
}
function fill(id, items, render) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  for (const item of items) render(body.insertRow(), item);
}
function head(row, t, name, sub, several) {
  if (sub) row.className = "sub";
  cell(row, name);
  badge(row, t.warm_state, several ? t.warmest_backend : "");
  cell(row, t.tokens, "num"); cell(row, t.hits, "num"); cell(row, t.misses, "num");
  cell(row, t.hit_ratio === null || t.hit_ratio === undefined ? "" : (100 * t.hit_ratio).toFixed(0) + "%", "num");
  cell(row, t.tokens_saved, "num");
  cell(row, t.warmup_mode);
  cell(row, [t.last_warmup_how, clock(t.last_warmup)].filter(Boolean).join(" at "));
  cell(row, t.warmup_error || t.last_error || (t.warmup_mode === "prefill" ? t.warmup_mode_reason : ""), "why");
}
function render(s) {
  const h = s.health;
  document.getElementById("version").textContent = h.version;
  const backends = h.backends || [h.backend];
  document.getElementById("backend").textContent = (backends.length > 1 ? "backends " : "backend ") +
    backends.map(b => b.url + ": " + (b.reachable ? "up" : "down" + (b.last_error ? " (" + b.last_error + ")" : ""))).join("; ");
  const several = backends.length > 1;
  document.getElementById("model").textContent = (s.templates.backends || []).map(b =>
    "model " + (b.model ? b.model.name : "unknown") + (several ? " at " + b.url : "") +
    ": a restored cache file reuses " + b.restore_reuses + (b.restore_reuses_why ? " \u2014 " + b.restore_reuses_why : "")).join("; ");
  document.getElementById("ready").textContent = s.ready.ready ? "ready" : "not ready: " +
    (s.ready.backend_ready ? "warming " + s.ready.templates_untried.join(", ") : "backend not probed");
  const each = (s.slots && s.slots.backends && s.slots.backends.length) ? s.slots.backends : (s.slots ? [s.slots] : []);
  const waiting = p => each.reduce((n, b) => n + ((b.waiting || {})[p] || 0), 0);
  document.getElementById("queue").textContent = "queue: " + waiting("user") + " user, " + waiting("warmup") + " warmup";
  const rows = [];
  for (const t of s.templates.templates) {
    rows.push([t, t.prefix, false]);
    for (const v of t.variants || []) rows.push([v, t.prefix + " after " + v.summary, true]);
  }
  for (const l of s.templates.learned) rows.push([l, "learned: " + l.summary, false]);
  fill("templates", rows, (row, r) => head(row, r[0], r[1], r[2], several));
  const slots = each.flatMap(b => b.slots.map(slot => [each.length > 1 ? b.url + " " + slot.id : slot.id, slot]));
  fill("slots", slots, (row, [id, slot]) => {
    cell(row, id, "num"); cell(row, slot.template || ""); cell(row, slot.state);
    cell(row, slot.busy ? "by a " + slot.holder : ""); cell(row, slot.idle_seconds === null ? "" : slot.idle_seconds.toFixed(0), "num");
  });
  fill("requests", s.requests.slice().reverse(), (row, r) => {
    cell(row, clock(r.at)); cell(row, r.method + " " + r.path); cell(row, r.status, "num"); cell(row, r.prefix);
    cell(row, r.reason_text, "why"); cell(row, r.cached, "num"); cell(row, r.computed, "num");
    cell(row, r.ttfb_ms, "num"); cell(row, r.ms, "num"); cell(row, r.request_id);
  });
}
async function poll() {
  try {
    const answer = await fetch("status", { headers, cache: "no-store" });
    if (!answer.ok) throw new Error("HTTP " + answer.status + " from /status");
    render(await answer.json());
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = String(e);
  }
  setTimeout(poll, 2000);
}
poll();
</script>
</body>
</html>
"""
