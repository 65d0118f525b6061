// shoal console: plain DOM, no build step. Every view polls its JSON
// endpoint under /api/ (ETags make an unchanged view a 304).
"use strict";

const $ = (sel) => document.querySelector(sel);
const main = () => $("#main");

// h builds an element: h("td", {class: "x"}, "text", child, …).
function h(tag, attrs, ...kids) {
  const el = tag === "svg" || tag === "polyline" || tag === "line" || tag === "text"
    ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === undefined || kid === null || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

const badge = (text, cls) => h("span", { class: "badge " + (cls || text) }, text);
const pct = (x) => (100 * (x || 0)).toFixed(0) + "%";
const num = (x) => (x || 0).toFixed(0);
const hms = (ms) => new Date(ms).toLocaleTimeString();

let timer = null;       // the current view's poll
let viewGen = 0;        // bumps on every navigation: late answers are dropped
let logSource = null;   // an open log stream
let chatAbort = null;   // a playground request in flight

function setStatus(text, bad) {
  const s = $("#status");
  s.textContent = text;
  s.className = bad ? "error" : "muted";
}

class AuthError extends Error {}

// lastText holds each path's last answer: a view that did not change is not
// drawn again (a 2,000-node cluster view is a large DOM).
const lastText = new Map();

async function api(path, opts, same) {
  const r = await fetch(path, Object.assign({ cache: "no-cache", credentials: "same-origin" }, opts || {}));
  if (r.status === 401) {
    const body = await r.json().catch(() => ({}));
    throw new AuthError(body.error || "not logged in");
  }
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    throw new Error(body.error || (r.status + " " + r.statusText));
  }
  const stale = r.headers.get("X-Shoal-Stale");
  staleWhy = stale || "";
  const text = await r.text();
  if (same && lastText.get(path) === text) return same;
  lastText.set(path, text);
  return JSON.parse(text);
}

// staleWhy is why the last answer could not be confirmed current ("" when
// it was): a replicated coordinator without a leader answers from its last
// state, and the page says so.
let staleWhy = "";

// UNCHANGED is what api() returns, when asked, for an answer like the last.
const UNCHANGED = Symbol("unchanged");

async function post(path, body) {
  return fetch(path, { method: "POST", credentials: "same-origin", cache: "no-store",
    headers: { "Content-Type": "application/json", "X-Shoal-Console": "1" }, body: JSON.stringify(body) });
}

// poll runs fn now and every ms until the view changes.
function poll(ms, fn) {
  const gen = viewGen;
  const tick = async () => {
    if (gen !== viewGen) return;
    try {
      await fn(gen);
      if (gen === viewGen) {
        if (staleWhy) setStatus("STALE (this coordinator's last state): " + staleWhy, true);
        else setStatus("updated " + new Date().toLocaleTimeString());
      }
    } catch (e) {
      if (e instanceof AuthError) { showLogin(e.message); return; }
      if (gen === viewGen) setStatus(e.message, true);
    }
    if (gen === viewGen) timer = setTimeout(tick, ms);
  };
  tick();
}

function leaveView() {
  viewGen++;
  lastText.clear(); // a view drawn anew needs its data, changed or not
  clearTimeout(timer);
  if (logSource) { logSource.close(); logSource = null; }
  if (chatAbort) { chatAbort.abort(); chatAbort = null; }
}

// ---- login

function showLogin(why) {
  leaveView();
  $("#nav").hidden = true;
  $("#logout").hidden = true;
  $("#who").textContent = "";
  setStatus("");
  const input = h("input", { type: "password", id: "token", placeholder: "shoal_…", autocomplete: "off" });
  const err = h("p", { class: "error", id: "login-error" }, why && why !== "not logged in" ? why : "");
  const go = async () => {
    const r = await post("/login", { token: input.value.trim() });
    if (r.ok) { location.hash = "#/cluster"; start(); return; }
    const body = await r.json().catch(() => ({}));
    err.textContent = body.error || ("login refused: " + r.status);
  };
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
  main().replaceChildren(h("div", { class: "panel login", id: "login" },
    h("h2", {}, "Log in"),
    h("p", { class: "muted" }, "The console takes what the CLI takes: a CLI token (shoal tls token create NAME), or a cli client certificate your browser presents."),
    input, h("button", { id: "login-button", onclick: go }, "Log in"), err));
}

// ---- cluster

function gpuCells(n) {
  const inv = n.inventory;
  if (n.missing) return h("td", {}, "—");
  if (!inv || inv.error) {
    const cells = [];
    for (let i = 0; i < (n.gpuCount || 0); i++) cells.push(h("span", { class: "gpu unknown", title: inv && inv.error ? inv.error : "inventory not read yet" }));
    return h("td", {}, cells, inv && inv.error ? h("div", { class: "reasons" }, inv.error) : null);
  }
  const reasons = [];
  const cells = inv.gpus.map((g) => {
    if (!g.healthy) reasons.push("GPU " + g.index + ": " + (g.reasons || ["unhealthy"]).join("; "));
    return h("span", { class: "gpu" + (g.healthy ? "" : " bad"), "data-gpu": g.index,
      title: `GPU ${g.index} ${g.name} ${(g.memoryMiB / 1024).toFixed(0)} GiB ${g.temperatureC}°C` + (g.healthy ? "" : " — " + (g.reasons || []).join("; ")) });
  });
  return h("td", {}, cells, reasons.length ? h("div", { class: "reasons" }, reasons.join("\n")) : null,
    (inv.events || []).length ? h("div", { class: "reasons" }, inv.events.join("\n")) : null);
}

function nodeRow(n) {
  return h("tr", { class: n.missing ? "missing" : "", "data-node": n.id, "data-role": n.role || "", "data-state": n.state },
    h("td", {}, n.id, " ", n.role === "head" ? badge("head", "head") : n.role ? h("span", { class: "muted" }, n.role) : null),
    h("td", {}, n.missing ? badge("missing") : n.healthy ? badge("healthy", "ok") : badge("unhealthy")),
    h("td", {}, n.missing ? "not in the gossip: its agent is gone or cut off" : n.state),
    h("td", {}, n.address || ""),
    h("td", {}, n.gpuModel ? `${n.gpuCount}× ${n.gpuModel}` + (n.gpuMemGiB ? ` ${n.gpuMemGiB} GiB` : "") : ""),
    gpuCells(n),
    h("td", {}, n.rdma || h("span", { class: "muted" }, "none")),
    h("td", {}, n.engine || ""),
    h("td", {}, n.progress || "", n.slurmJob ? " job " + n.slurmJob : "", n.leaving ? " LEAVING" : ""));
}

const nodeHead = () => h("tr", {}, ["node", "health", "state", "address", "GPUs", "devices", "RDMA", "engine", "pull / job"].map((t) => h("th", {}, t)));

async function viewCluster() {
  const depSel = h("select", { id: "filter-deployment" }, h("option", { value: "" }, "all deployments"));
  const healthSel = h("select", { id: "filter-health" },
    h("option", { value: "" }, "any health"), h("option", { value: "healthy" }, "healthy"), h("option", { value: "unhealthy" }, "unhealthy"));
  const body = h("div", { id: "cluster" });
  const q = new URLSearchParams(location.hash.split("?")[1] || "");
  const refilter = () => {
    const p = new URLSearchParams();
    if (depSel.value) p.set("deployment", depSel.value);
    if (healthSel.value) p.set("health", healthSel.value);
    location.hash = "#/cluster" + (p.toString() ? "?" + p : "");
  };
  depSel.addEventListener("change", refilter);
  healthSel.addEventListener("change", refilter);
  healthSel.value = q.get("health") || "";
  main().replaceChildren(h("h2", {}, "Cluster"),
    h("div", { class: "filters" }, h("label", {}, "Deployment ", depSel), h("label", {}, "Health ", healthSel)), body);
  poll(500, async (gen) => {
    const v = await api("/api/cluster?" + q, null, UNCHANGED);
    if (gen !== viewGen || v === UNCHANGED) return;
    const have = new Set([...depSel.options].map((o) => o.value));
    for (const d of v.deployments) if (!have.has(d)) depSel.append(h("option", { value: d }, d));
    depSel.value = q.get("deployment") || "";
    const parts = [h("div", { class: "cards" },
      h("div", { class: "stat", id: "stat-nodes" }, h("b", {}, v.nodes), "nodes"),
      h("div", { class: "stat" }, h("b", {}, v.healthyNodes), "healthy"),
      h("div", { class: "stat" }, h("b", {}, v.gpus), "GPUs"),
      h("div", { class: "stat" }, h("b", {}, v.unhealthyGpus), "unhealthy GPUs"),
      h("div", { class: "stat", id: "stat-replicas" }, h("b", {}, v.replicas.length), "replicas"))];
    for (const r of v.replicas) {
      parts.push(h("div", { class: "panel " + r.state, "data-replica": r.id, "data-state": r.state, "data-head": r.head || "" },
        h("h3", {}, h("a", { href: "#/replica/" + encodeURIComponent(r.id) }, r.id), " ", badge(r.state),
          h("span", { class: "muted" }, ` ${r.deployment} · epoch ${r.epoch}` + (r.head ? ` · head ${r.head}` : " · no head") +
            ` · running ${num(r.load.running)} · waiting ${num(r.load.waiting)} · KV ${pct(r.load.kvCacheUsage)}`),
          r.outdated ? badge("outdated", "warn") : null, r.progress ? " pulling " + r.progress : null,
          r.slurmReason ? " " + r.slurmReason : null),
        h("table", {}, nodeHead(), r.members.map(nodeRow))));
    }
    if (v.free.length) {
      parts.push(h("div", { class: "panel", id: "free" }, h("h3", {}, "In no replica"), h("table", {}, nodeHead(), v.free.map(nodeRow))));
    }
    if (!v.replicas.length && !v.free.length) parts.push(h("p", { class: "muted" }, "Nothing matches the filters."));
    body.replaceChildren(...parts);
  });
}

// ---- deployments

function eta(s) {
  if (s < 0) return "estimating";
  if (s < 90) return s.toFixed(0) + " s";
  return (s / 60).toFixed(0) + " min";
}

function replicaTable(reps) {
  return h("table", {}, h("tr", {}, ["replica", "epoch", "state", "head", "endpoint", "running", "waiting", "KV use", "members"].map((t) => h("th", {}, t))),
    reps.map((r) => h("tr", { "data-replica": r.id },
      h("td", {}, h("a", { href: "#/replica/" + encodeURIComponent(r.id) }, r.id || "(queued job " + r.slurmJob + ")")),
      h("td", {}, r.epoch), h("td", {}, badge(r.state), r.outdated ? " " : "", r.outdated ? badge("outdated", "warn") : null),
      h("td", {}, r.head || "—"), h("td", {}, r.endpoint || "—"),
      h("td", {}, num(r.load.running)), h("td", {}, num(r.load.waiting)), h("td", {}, pct(r.load.kvCacheUsage)),
      h("td", {}, r.members.map((m) => m.id + (m.missing ? " (missing)" : "")).join(", ")))));
}

async function viewDeployments() {
  const body = h("div", { id: "deployments" });
  main().replaceChildren(h("h2", {}, "Deployments"), body);
  poll(1000, async (gen) => {
    const ds = await api("/api/deployments", null, UNCHANGED);
    if (gen !== viewGen || ds === UNCHANGED) return;
    if (!ds.length) { body.replaceChildren(h("p", { class: "muted" }, "No deployment: shoal apply -f SPEC.yaml")); return; }
    body.replaceChildren(...ds.map((d) => h("div", { class: "panel", "data-deployment": d.name },
      h("h3", {}, d.name, " ", h("span", { class: "muted" }, `${d.engine} · ${d.model} · ${d.nodesPerReplica} node(s) per replica`),
        " ", badge(`${d.readyReplicas}/${d.desiredReplicas} ready`, d.readyReplicas >= d.desiredReplicas && d.desiredReplicas > 0 ? "ok" : "warn")),
      d.hold ? h("p", { class: "error" }, "Held: " + d.hold) : null,
      d.autoscaler ? h("p", {}, h("b", {}, "Autoscaler: "), h("span", { class: "autoscaler" }, d.autoscaler)) : h("p", { class: "muted" }, "No autoscaling: a fixed replica count."),
      replicaTable(d.replicas),
      d.downloads.length ? h("div", {}, h("h3", {}, "Weight pulls"),
        h("table", { class: "downloads" }, h("tr", {}, ["replica", "node", "done", "rate", "ETA"].map((t) => h("th", {}, t))),
          d.downloads.map((x) => h("tr", {}, h("td", {}, x.replica), h("td", {}, x.node), h("td", {}, x.percent.toFixed(0) + "%"),
            h("td", {}, x.rate), h("td", {}, eta(x.etaSeconds)))))) : null,
      d.adapters.length ? h("p", {}, h("b", {}, "Adapters: "), d.adapters.join(", ")) : null,
      h("h3", {}, "Events"),
      h("ul", { class: "events" }, d.events.slice(-30).reverse().map((e) => h("li", {}, e))))));
  });
}

// ---- replica

function chart(title, samples, key, scale) {
  const w = 300, ht = 100;
  const ys = samples.map((s) => (s[key] || 0) * (scale || 1));
  const top = Math.max(1, ...ys);
  const t0 = samples.length ? samples[0].t : 0, t1 = samples.length ? samples[samples.length - 1].t : 1;
  const pts = samples.map((s, i) => {
    const x = t1 > t0 ? ((s.t - t0) / (t1 - t0)) * w : 0;
    return x.toFixed(1) + "," + (ht - (ys[i] / top) * (ht - 8) - 4).toFixed(1);
  }).join(" ");
  const last = ys.length ? ys[ys.length - 1] : 0;
  const unit = scale ? "%" : "";
  return h("div", { class: "chart", "data-chart": key },
    h("div", {}, h("b", {}, title), " ", h("span", { class: "muted" }, `now ${last.toFixed(0)}${unit} · max ${Math.max(0, ...ys).toFixed(0)}${unit}` +
      (samples.length ? ` · ${hms(t0)}–${hms(t1)}` : " · no samples yet"))),
    h("svg", { viewBox: `0 0 ${w} ${ht}`, preserveAspectRatio: "none" }, h("polyline", { points: pts })));
}

async function viewReplica(id) {
  const head = h("div", {}), charts = h("div", { class: "charts" }), members = h("div", {});
  const nodeSel = h("select", { id: "log-node" }, h("option", { value: "" }, "head"));
  const nameIn = h("input", { id: "log-name", placeholder: "all logs (or vllm, ray, …)", size: 22 });
  const follow = h("input", { type: "checkbox", id: "log-follow", checked: true });
  const pre = h("pre", { class: "logs", id: "logs" });
  const openLogs = () => {
    if (logSource) logSource.close();
    pre.textContent = "";
    const p = new URLSearchParams({ tail: "65536" });
    if (nodeSel.value) p.set("node", nodeSel.value);
    if (nameIn.value.trim()) p.set("name", nameIn.value.trim());
    if (follow.checked) p.set("follow", "1");
    const src = new EventSource(`/api/replicas/${encodeURIComponent(id)}/logs?` + p);
    logSource = src;
    let last = "";
    src.addEventListener("log", (e) => {
      const c = JSON.parse(e.data);
      const key = c.node + "/" + c.name;
      if (key !== last) { pre.append(`==> ${key} <==\n`); last = key; }
      const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.append(c.text);
      if (pre.textContent.length > 2e6) pre.textContent = pre.textContent.slice(-1e6);
      if (stick) pre.scrollTop = pre.scrollHeight;
    });
    src.addEventListener("end", () => { pre.append("\n[end of logs]\n"); src.close(); });
    src.addEventListener("fail", (e) => { pre.append("\n[logs: " + JSON.parse(e.data).error + "]\n"); src.close(); });
    src.onerror = () => { if (src.readyState === EventSource.CLOSED) pre.append("\n[log stream closed]\n"); };
  };
  main().replaceChildren(h("h2", {}, "Replica ", id), head, charts, members,
    h("div", { class: "panel" }, h("h3", {}, "Engine logs"),
      h("div", { class: "row" }, h("label", {}, "Member ", nodeSel), nameIn, h("label", {}, follow, " follow"),
        h("button", { id: "log-open", onclick: openLogs }, "Show")), pre));
  let first = true;
  poll(2000, async (gen) => {
    const r = await api("/api/replicas/" + encodeURIComponent(id));
    if (gen !== viewGen) return;
    head.replaceChildren(h("p", {}, badge(r.state), ` ${r.deployment} · epoch ${r.epoch} · head ${r.head || "—"} · endpoint ${r.endpoint || "—"}`));
    charts.replaceChildren(chart("Running", r.series, "running"), chart("Waiting", r.series, "waiting"), chart("KV-cache use", r.series, "kvCacheUsage", 100));
    members.replaceChildren(h("div", { class: "panel" }, h("h3", {}, "Members"), h("table", {}, nodeHead(), r.members.map(nodeRow))));
    const have = new Set([...nodeSel.options].map((o) => o.value));
    for (const m of r.members) if (!have.has(m.id)) nodeSel.append(h("option", { value: m.id }, m.id));
    if (first) { first = false; openLogs(); }
  });
}

// ---- playground

async function viewPlayground() {
  const model = h("select", { id: "chat-model" });
  const key = h("input", { id: "chat-key", type: "password", placeholder: "router API key (if the router needs one)", size: 34, autocomplete: "off" });
  const prompt = h("textarea", { id: "chat-prompt" }, "Write a haiku about GPUs.");
  const maxTok = h("input", { id: "chat-max", type: "number", value: 64, min: 1, max: 4096 });
  const out = h("div", { class: "out", id: "chat-out" });
  const stats = h("p", { class: "muted", id: "chat-stats" });
  const send = h("button", { id: "chat-send" }, "Send");
  const stop = h("button", { class: "secondary", id: "chat-stop", disabled: true }, "Stop");
  main().replaceChildren(h("h2", {}, "Playground"), h("div", { class: "panel chat" },
    h("p", { class: "muted" }, "Sends a streamed chat completion through the coordinator's router, as any OpenAI client would."),
    h("div", { class: "row" }, h("label", {}, "Model ", model), h("label", {}, "max tokens ", maxTok), key),
    prompt, h("div", { class: "row" }, send, stop), out, stats));
  try {
    const ms = await api("/api/models");
    model.replaceChildren(...ms.data.map((m) => h("option", { value: m.id }, m.id + (m.parent ? ` (adapter of ${m.parent})` : ""))));
    setStatus("");
  } catch (e) {
    if (e instanceof AuthError) { showLogin(e.message); return; }
    out.textContent = e.message;
    send.disabled = true;
  }
  stop.addEventListener("click", () => chatAbort && chatAbort.abort());
  send.addEventListener("click", async () => {
    out.textContent = "";
    stats.textContent = "";
    send.disabled = true; stop.disabled = false;
    const ac = new AbortController();
    chatAbort = ac;
    const t0 = performance.now();
    let first = 0, chunks = 0;
    try {
      const headers = { "Content-Type": "application/json", "Accept": "text/event-stream", "X-Shoal-Console": "1" };
      if (key.value) headers["X-Router-Key"] = key.value;
      const r = await fetch("/api/chat", { method: "POST", credentials: "same-origin", headers, signal: ac.signal,
        body: JSON.stringify({ model: model.value, stream: true, max_tokens: Number(maxTok.value) || 64,
          messages: [{ role: "user", content: prompt.value }] }) });
      if (!r.ok) {
        const b = await r.json().catch(() => ({}));
        throw new Error((b.error && (b.error.message || b.error)) || r.status + " " + r.statusText);
      }
      const rd = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await rd.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const ev = buf.slice(0, i); buf = buf.slice(i + 2);
          for (const line of ev.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") continue;
            const j = JSON.parse(data);
            if (j.error) throw new Error(j.error.message || JSON.stringify(j.error));
            const d = j.choices && j.choices[0] && j.choices[0].delta;
            if (d && d.content) {
              if (!first) first = performance.now();
              chunks++;
              out.append(d.content);
              out.dataset.chunks = String(chunks);
            }
          }
        }
      }
      const t = performance.now();
      stats.textContent = `${chunks} chunks · first token after ${((first || t) - t0).toFixed(0)} ms · ${((t - t0) / 1000).toFixed(2)} s in all`;
      out.dataset.done = "1";
    } catch (e) {
      if (e.name !== "AbortError") out.append(h("div", { class: "error" }, e.message));
      else stats.textContent = "stopped";
    } finally {
      send.disabled = false; stop.disabled = true;
      if (chatAbort === ac) chatAbort = null;
    }
  });
}

// ---- routing

function route() {
  leaveView();
  const hash = location.hash || "#/cluster";
  const [path] = hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean);
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.view === (parts[0] === "replica" ? "cluster" : parts[0]));
  switch (parts[0]) {
    case "deployments": return viewDeployments();
    case "replica": return viewReplica(decodeURIComponent(parts.slice(1).join("/")));
    case "playground": return viewPlayground();
    default: return viewCluster();
  }
}

async function start() {
  // A login link (shoal dev prints one) carries the token in the fragment,
  // which the browser never sends: it is posted once and taken off the URL.
  const m = location.hash.match(/^#token=([^&]+)/);
  if (m) {
    history.replaceState(null, "", location.pathname + "#/cluster");
    const r = await post("/login", { token: decodeURIComponent(m[1]) });
    if (!r.ok) { const b = await r.json().catch(() => ({})); showLogin(b.error || "login refused"); return; }
  }
  try {
    const me = await api("/api/whoami");
    $("#who").textContent = me.name ? "as " + me.name : "";
    $("#nav").hidden = false;
    $("#logout").hidden = false;
    if (!me.playground) $('#nav a[data-view="playground"]').title = "this coordinator runs no router";
    route();
  } catch (e) {
    if (e instanceof AuthError) showLogin(e.message);
    else setStatus(e.message, true);
  }
}

window.addEventListener("hashchange", () => { if (!$("#nav").hidden) route(); });
window.addEventListener("DOMContentLoaded", () => {
  $("#logout").addEventListener("click", async () => { await post("/logout", {}); showLogin(""); });
  start();
});
