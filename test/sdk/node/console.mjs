// The web console in a real headless Chromium (Debian's, driven by
// playwright-core), against a `shoal dev` cluster; run by
// test/e2e/console_test.go, which reads the lines this prints and answers
// on stdin. Env: SHOAL_CONSOLE (the login link shoal dev printed),
// SHOAL_CHROMIUM, SHOAL_SCREENSHOTS (a directory), SHOAL_NODES (how many).
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { mkdirSync } from "node:fs";
import assert from "node:assert/strict";

const link = process.env.SHOAL_CONSOLE;
const base = link.split("#")[0];
const shots = process.env.SHOAL_SCREENSHOTS;
const wantNodes = Number(process.env.SHOAL_NODES || "5");
mkdirSync(shots, { recursive: true });

const lines = createInterface({ input: process.stdin });
const inbox = [];
let waiting = null;
lines.on("line", (l) => { if (waiting) { const w = waiting; waiting = null; w(l); } else inbox.push(l); });
const nextLine = () => inbox.length ? Promise.resolve(inbox.shift()) : new Promise((r) => { waiting = r; });

const say = (...a) => console.log(...a);
const shot = async (page, name) => { await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true }); say("SCREENSHOT", `${shots}/${name}.png`); };

const browser = await chromium.launch({
  executablePath: process.env.SHOAL_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage"],
});
try {
  // ---- unauthenticated: the page asks for a login, the API answers 401,
  // a wrong token is refused.
  {
    const ctx = await browser.newContext({ viewport: { width: 1366, height: 800 } });
    const page = await ctx.newPage();
    await page.goto(base);
    await page.locator("#login").waitFor({ timeout: 10000 });
    assert.equal(await page.locator("[data-node]").count(), 0, "no node shown before a login");
    const api = await page.evaluate(async () => { const r = await fetch("/api/cluster"); return { status: r.status, body: await r.text() }; });
    assert.equal(api.status, 401, "/api/cluster without a login: " + api.body);
    const logs = await page.evaluate(async () => (await fetch("/api/replicas/x/logs")).status);
    assert.equal(logs, 401);
    const chat = await page.evaluate(async () => (await fetch("/api/chat", { method: "POST", headers: { "X-Shoal-Console": "1" }, body: "{}" })).status);
    assert.equal(chat, 401);
    await page.fill("#token", "shoal_0000000000000000000000000000000000000000000000ff");
    await page.click("#login-button");
    await page.locator("#login-error", { hasText: "not accepted" }).waitFor({ timeout: 5000 });
    await shot(page, "login-refused");
    say("OK unauthenticated access refused (page, /api/cluster, logs, chat; a wrong token)");
    await ctx.close();
  }

  const ctx = await browser.newContext({ viewport: { width: 1440, height: 900 } });
  const page = await ctx.newPage();
  page.on("pageerror", (e) => { say("PAGE ERROR", e.message); process.exitCode = 1; });
  await page.goto(link); // the token in the fragment logs in and leaves the URL
  await page.locator("#cluster [data-replica]").first().waitFor({ timeout: 20000 });
  assert.ok(!page.url().includes("token="), "the token is taken off the URL: " + page.url());

  // ---- cluster: every node, both replicas with their heads.
  const cluster = async () => page.evaluate(() => {
    const reps = [...document.querySelectorAll("#cluster [data-replica]")].map((r) => ({
      id: r.dataset.replica, state: r.dataset.state, head: r.dataset.head,
      members: [...r.querySelectorAll("[data-node]")].map((n) => ({ id: n.dataset.node, role: n.dataset.role, state: n.dataset.state })),
    }));
    const free = [...document.querySelectorAll("#free [data-node]")].map((n) => n.dataset.node);
    return { reps, free, nodes: Number(document.querySelector("#stat-nodes b").textContent) };
  });
  const ready2 = async (ms) => {
    const t = Date.now();
    for (;;) {
      const c = await cluster();
      if (c.reps.length === 2 && c.reps.every((r) => r.state === "ready" && r.head && r.members[0].role === "head")) return c;
      if (Date.now() - t > ms) throw new Error("two ready replicas with heads not shown: " + JSON.stringify(c));
      await page.waitForTimeout(100);
    }
  };
  const c0 = await ready2(30000);
  await page.waitForFunction(() => document.querySelectorAll("#cluster .gpu:not(.unknown)").length >= 32, null, { timeout: 15000 });
  const c1 = await cluster();
  assert.equal(c1.nodes, wantNodes, "nodes");
  const shown = new Set([...c1.reps.flatMap((r) => r.members.map((m) => m.id)), ...c1.free]);
  assert.equal(shown.size, wantNodes, "every node is shown once: " + [...shown]);
  await shot(page, "cluster");
  say("OK cluster shows", c1.nodes, "nodes,", c1.reps.length, "replicas, heads", c1.reps.map((r) => r.head).join(" "));

  // filters
  await page.selectOption("#filter-health", "unhealthy");
  await page.locator("#cluster", { hasText: "Nothing matches" }).waitFor({ timeout: 5000 });
  await page.selectOption("#filter-health", "");
  await page.locator("#cluster [data-replica]").first().waitFor({ timeout: 5000 });

  // ---- a head's agent is killed: visible within 2 s, and the replica comes back.
  const victim = c0.reps[0];
  say("KILL", victim.head, victim.id);
  const killed = Number((await nextLine()).split(" ")[1]);
  for (;;) {
    const c = await cluster();
    const r = c.reps.find((x) => x.id === victim.id);
    const gone = !r || r.state !== "ready" || r.members.some((m) => m.id === victim.head && m.state === "missing");
    if (gone) break;
    if (Date.now() - killed > 10000) throw new Error("the kill never showed: " + JSON.stringify(c));
    await page.waitForTimeout(25);
  }
  const seen = Date.now() - killed;
  await shot(page, "cluster-head-killed");
  say("OK the killed head showed after", seen, "ms");
  assert.ok(seen <= 2000, `the head's loss showed after ${seen} ms, over 2 s`);
  const c2 = await ready2(90000);
  assert.ok(!c2.reps.some((r) => r.members.some((m) => m.id === victim.head)), "the replica came back without the dead node");
  say("OK the replica came back:", c2.reps.map((r) => `${r.id}@${r.head}`).join(" "));
  await shot(page, "cluster-recovered");

  // ---- deployments
  await page.click('#nav a[data-view="deployments"]');
  await page.locator('#deployments [data-deployment="demo"]').waitFor({ timeout: 10000 });
  await page.locator("#deployments .events li", { hasText: "placed replica" }).first().waitFor({ timeout: 5000 });
  const depReps = await page.locator('#deployments [data-deployment="demo"] tr[data-replica]').count();
  assert.equal(depReps, 2, "the deployment lists its two replicas");
  await shot(page, "deployments");
  say("OK deployments view lists", depReps, "replicas and the events");

  // ---- a replica: members, charts (under load), logs
  const rid = c2.reps[0].id;
  // Load for the charts: long streamed chats through the console, as the
  // playground sends them, left running.
  await page.evaluate(() => {
    for (let i = 0; i < 16; i++) {
      fetch("/api/chat", { method: "POST", headers: { "Content-Type": "application/json", "X-Shoal-Console": "1" },
        body: JSON.stringify({ model: "demo", stream: true, max_tokens: 600, messages: [{ role: "user", content: "load " + i }] }) })
        .then((r) => r.text()).catch(() => {});
    }
  });
  await page.waitForFunction(async (id) => {
    const r = await fetch("/api/replicas/" + encodeURIComponent(id));
    return (await r.json()).series.some((s) => s.running > 0);
  }, rid, { timeout: 20000, polling: 500 });
  await page.goto(base + "#/replica/" + encodeURIComponent(rid));
  await page.locator("[data-chart=running] polyline").waitFor({ state: "attached", timeout: 10000 });
  await page.locator("#logs", { hasText: "==> " }).waitFor({ timeout: 15000 });
  await page.waitForFunction(() => (document.querySelector("[data-chart=running] polyline").getAttribute("points") || "").split(" ").length >= 2, null, { timeout: 15000 });
  await shot(page, "replica");
  say("OK replica view: members, charts, logs");

  // ---- playground: a streamed chat
  await page.click('#nav a[data-view="playground"]');
  await page.locator('#chat-model option[value="demo"]').waitFor({ state: "attached", timeout: 10000 });
  await page.fill("#chat-max", "48");
  await page.click("#chat-send");
  const lengths = new Set();
  const t0 = Date.now();
  for (;;) {
    const s = await page.evaluate(() => { const o = document.querySelector("#chat-out"); return { n: o.textContent.length, done: o.dataset.done === "1", chunks: Number(o.dataset.chunks || 0), err: o.querySelector(".error")?.textContent }; });
    if (s.err) throw new Error("chat failed: " + s.err);
    if (s.n > 0) lengths.add(s.n);
    if (s.done) { say("OK chat streamed", s.chunks, "chunks; seen at", lengths.size, "lengths"); assert.ok(s.chunks >= 10, "chunks"); break; }
    if (Date.now() - t0 > 30000) throw new Error("the chat did not finish");
    await page.waitForTimeout(10);
  }
  assert.ok(lengths.size >= 3, "the answer grew while it streamed (seen at " + lengths.size + " lengths)");
  await shot(page, "playground");

  // ---- a GPU fails (Xid 79 on GPU 3 of a node): the cluster view marks
  // the GPU and says why; the unhealthy filter finds the node.
  const sick = c2.reps[1].members[1].id;
  say("FAULT", sick, "3 79");
  await nextLine();
  await page.goto(base + "#/cluster?health=unhealthy");
  const row = page.locator(`#cluster tr[data-node="${sick}"]`);
  await row.locator('.gpu.bad[data-gpu="3"]').waitFor({ timeout: 20000 });
  const why = await row.locator(".reasons").first().textContent();
  assert.match(why, /GPU 3: .*79/, "the reason names the GPU and the Xid: " + why);
  assert.ok(!(await page.locator('#cluster tr[data-node] .badge.ok').count()), "the unhealthy filter shows no healthy node");
  await shot(page, "cluster-gpu-fault");
  say("OK the failed GPU shows with its reason:", why.split("\n")[0]);
  say("DONE");
} finally {
  await browser.close();
  lines.close();
}
