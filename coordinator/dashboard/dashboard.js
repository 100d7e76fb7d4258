// The sparecycles dashboard: one EventSource on /v1/events, a full snapshot about every second,
// everything redrawn from it. Plain DOM, no library, no build step.
//
// Every string on this page may come from a stranger (account names, job ids, failure reasons,
// memos). They only ever reach the DOM as text nodes or attribute values (textContent,
// setAttribute): never innerHTML. The page's content-security policy forbids inline script as a
// second line of defence.
"use strict";

(() => {
  const HISTORY_SECONDS = 300; // the throughput chart's window
  const STALE_MS = 5000; // no snapshot for this long: the stream is as good as down
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  const history = []; // [{at: epoch seconds, tps}] oldest first

  // ---- DOM helpers: text only --------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null) node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  function replace(container, children) {
    container.replaceChildren(...children);
  }

  // ---- formatting --------------------------------------------------------------------------

  const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
  const exact = new Intl.NumberFormat();

  function num(x) {
    return typeof x === "number" && Number.isFinite(x) ? x : 0;
  }

  function credits(x) {
    const n = num(x);
    return Math.abs(n) < 10000 ? exact.format(n) : compact.format(n);
  }

  function rate(x) {
    const n = num(x);
    return n >= 100 ? exact.format(Math.round(n)) : n.toFixed(n >= 10 ? 1 : 2);
  }

  function duration(seconds) {
    const s = Math.max(0, Math.round(num(seconds)));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function ago(iso) {
    const t = Date.parse(iso);
    if (!Number.isFinite(t)) return "–";
    const s = (Date.now() - t) / 1000;
    return s < 2 ? "just now" : `${duration(s)} ago`;
  }

  function clock(iso) {
    const t = Date.parse(iso);
    return Number.isFinite(t) ? new Date(t).toLocaleTimeString() : "–";
  }

  function short(id, keep = 12) {
    const s = String(id ?? "");
    return s.length > keep ? `${s.slice(0, keep)}…` : s;
  }

  // a lookup that a key such as "constructor" or "__proto__" cannot turn into a prototype's member
  function pick(table, key, fallback) {
    return Object.hasOwn(table, String(key)) ? table[String(key)] : fallback;
  }

  function list(x) {
    return Array.isArray(x) ? x : [];
  }

  // ---- connection state --------------------------------------------------------------------

  let source = null;
  let lastSnapshot = 0;
  let retryMs = 1000;
  let retryTimer = null;

  function setConnection(state, text) {
    const pill = $("conn");
    pill.className = `pill pill-${state}`;
    pill.textContent = text;
    document.body.classList.toggle("offline", state === "down");
  }

  function connect() {
    clearTimeout(retryTimer);
    if (source) source.close();
    setConnection("wait", "connecting…");
    source = new EventSource("/v1/events");
    source.addEventListener("open", () => { retryMs = 1000; });
    source.addEventListener("snapshot", (event) => {
      let data;
      try {
        data = JSON.parse(event.data);
      } catch (err) {
        console.error("dashboard: a snapshot that is not JSON", err);
        return;
      }
      lastSnapshot = Date.now();
      setConnection("live", "live");
      render(data);
    });
    source.addEventListener("error", () => {
      setConnection("down", "disconnected — reconnecting");
      // EventSource retries by itself after a dropped connection, but gives up for good on an
      // HTTP error or a wrong content type (readyState CLOSED): then start a new one, backing off.
      if (source.readyState === EventSource.CLOSED) scheduleReconnect();
    });
  }

  function scheduleReconnect() {
    clearTimeout(retryTimer);
    retryTimer = setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 15000);
  }

  // A stream can also go quiet without an error (a proxy holding the socket): treat silence as a
  // drop.
  setInterval(() => {
    if (lastSnapshot && Date.now() - lastSnapshot > STALE_MS && $("conn").classList.contains("pill-live")) {
      setConnection("down", "disconnected — no update for 5 s");
      scheduleReconnect();
    }
    if (lastSnapshot) $("updated").textContent = `updated ${ago(new Date(lastSnapshot).toISOString())}`;
  }, 1000);

  // ---- rendering ---------------------------------------------------------------------------

  function render(data) {
    renderThroughput(data.throughput || {});
    renderJobs(list(data.jobs));
    renderNodes(list(data.nodes));
    const ledger = data.ledger || {};
    renderBalances(list(ledger.balances), data.unit);
    renderCheckpoint(ledger.checkpoint);
    renderLedger(list(ledger.recent));
    renderBlocked(list(data.blocked));
  }

  function renderThroughput(tp) {
    const at = num(tp.at) || Date.now() / 1000;
    const tps = num(tp.tasks_per_second);
    if (!history.length || at > history[history.length - 1].at) history.push({ at, tps });
    while (history.length && history[0].at < at - HISTORY_SECONDS) history.shift();
    $("tp-now").textContent = rate(tps);
    drawChart($("tp-chart"), at);
  }

  let chartNow = 0;
  // the chart is drawn in pixels: redraw it when the window changes size
  window.addEventListener("resize", () => { if (chartNow) drawChart($("tp-chart"), chartNow); });

  function drawChart(chart, now) {
    chartNow = now;
    // drawn in the element's own pixels, so text and strokes are never stretched
    const W = Math.max(200, Math.round(chart.clientWidth || 800)), H = 180, PAD = 6;
    chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
    const peak = Math.max(1, ...history.map((p) => p.tps));
    const top = niceCeil(peak);
    const x = (t) => ((t - (now - HISTORY_SECONDS)) / HISTORY_SECONDS) * W;
    const y = (v) => H - PAD - (v / top) * (H - 2 * PAD);
    const parts = [];
    for (const frac of [0.25, 0.5, 0.75, 1]) {
      parts.push(svg("line", { x1: 0, x2: W, y1: y(top * frac), y2: y(top * frac), class: "grid-line" }));
    }
    const label = svg("text", { x: 6, y: y(top) + 14, class: "chart-label" });
    label.textContent = `${rate(top)} tasks/s`;
    parts.push(label);
    if (history.length) {
      const pts = history.map((p) => `${x(p.at).toFixed(1)},${y(p.tps).toFixed(1)}`);
      const first = history[0], last = history[history.length - 1];
      const area = `M${x(first.at).toFixed(1)},${y(0)} L${pts.join(" L")} L${x(last.at).toFixed(1)},${y(0)} Z`;
      parts.push(svg("path", { d: area, class: "area" }));
      parts.push(svg("polyline", { points: pts.join(" "), class: "line" }));
      parts.push(svg("circle", { cx: x(last.at), cy: y(last.tps), r: 3.5, class: "dot" }));
    }
    replace(chart, parts);
  }

  function niceCeil(v) {
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function stateBadge(state) {
    const s = String(state ?? "unknown");
    const known = ["running", "done", "failed", "working", "idle", "away", "blocked"];
    return el("span", { class: `badge badge-${known.includes(s) ? s : "other"}` }, s);
  }

  function renderJobs(jobs) {
    $("jobs-count").textContent = jobs.length ? `${jobs.length} shown` : "";
    if (!jobs.length) {
      replace($("jobs"), [el("p", { class: "empty" }, "No jobs yet.")]);
      return;
    }
    replace($("jobs"), jobs.map((job) => {
      const t = job.tasks || {};
      const total = num(t.total), verified = num(t.verified), failed = num(t.failed);
      const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": 0,
        "aria-valuemax": total, "aria-valuenow": verified });
      const ok = el("div", { class: "bar-ok" });
      const bad = el("div", { class: "bar-bad" });
      // CSSOM writes are not inline styles in the CSP's sense: allowed without 'unsafe-inline'
      ok.style.width = `${total ? (100 * verified) / total : 0}%`;
      bad.style.width = `${total ? (100 * failed) / total : 0}%`;
      bar.append(ok, bad);
      const facts = [`${verified}/${total} verified`];
      if (failed) facts.push(`${failed} failed`);
      if (num(t.open)) facts.push(`${num(t.open)} open`);
      if (job.state === "running" && typeof job.eta_seconds === "number") facts.push(`ETA ${duration(job.eta_seconds)}`);
      return el("article", { class: `job job-${String(job.state)}`, "data-testid": "job", "data-job": job.job },
        el("div", { class: "job-head" },
          el("code", { class: "job-id", title: job.job }, short(job.job, 16)),
          stateBadge(job.state),
          el("span", { class: "muted" }, "by ", el("strong", { "data-testid": "submitter" }, job.submitter ?? "?")),
          el("span", { class: "muted right", title: job.created_at_iso }, clock(job.created_at_iso))),
        bar,
        el("div", { class: "job-facts" },
          el("span", { "data-testid": "progress" }, facts.join(" · "))),
        job.why ? el("p", { class: failed || job.state === "failed" ? "why why-bad" : "why",
          "data-testid": "why" }, String(job.why)) : null);
    }));
  }

  function trustCell(trust) {
    if (trust === null || trust === undefined) return el("span", { class: "muted" }, "–");
    if (typeof trust === "boolean") {
      return el("span", { class: trust ? "badge badge-done" : "badge badge-other" }, trust ? "trusted" : "untrusted");
    }
    if (typeof trust === "object") {
      // {level: trusted|untrusted|blocked, score 0..1 (the streak towards trust), streak, audit_rate}
      const level = String(trust.level ?? "unknown");
      const cls = pick({ trusted: "badge-done", blocked: "badge-failed" }, level, "badge-other");
      const meter = el("span", { class: "meter" }, el("span", { class: "meter-fill" }));
      meter.firstChild.style.width = `${Math.round(100 * Math.min(1, num(trust.score)))}%`;
      return el("span", { class: "trust", title: `streak ${num(trust.streak)}; audited at rate ${num(trust.audit_rate)}` },
        el("span", { class: `badge ${cls}` }, level), meter);
    }
    return el("span", {}, typeof trust === "number" ? trust.toFixed(2) : String(trust));
  }

  function renderNodes(nodes) {
    const online = nodes.filter((n) => (n.online ?? n.state !== "away")).length;
    $("nodes-count").textContent = `${online} online of ${nodes.length}`;
    if (!nodes.length) {
      replace($("nodes"), [el("tr", {}, el("td", { colspan: 7, class: "empty" }, "No nodes have connected."))]);
      return;
    }
    replace($("nodes"), nodes.map((n) => el("tr", { "data-testid": "node", "data-node": n.node },
      el("td", {}, el("code", { title: n.node }, short(n.node))),
      el("td", { "data-testid": "owner", title: n.owner ?? "" }, n.owner ?? "?"),
      el("td", {}, stateBadge(n.state)),
      el("td", { class: "num" }, String(num(n.slots))),
      el("td", { class: "num", title: n.speed_unit ?? "" }, typeof n.speed === "number" ? rate(n.speed) : "–"),
      el("td", {}, trustCell(n.trust)),
      el("td", { title: n.last_seen_iso ?? "" }, ago(n.last_seen_iso)))));
  }

  function renderBalances(balances, unit) {
    if (unit && unit.means) {
      $("unit").textContent = `${unit.name ?? "credit"}s`;
      $("unit").title = unit.means;
    }
    const rows = balances.filter((b) => b && b.owner !== undefined)
      .sort((a, b) => num(b.credits) - num(a.credits));
    if (!rows.length) {
      replace($("balances"), [el("p", { class: "empty" }, "No credit yet.")]);
      return;
    }
    const peak = Math.max(1, ...rows.map((b) => Math.abs(num(b.credits))));
    replace($("balances"), rows.map((b) => {
      const fill = el("div", { class: num(b.credits) < 0 ? "hbar-fill neg" : "hbar-fill" });
      fill.style.width = `${Math.max(1, (100 * Math.abs(num(b.credits))) / peak)}%`;
      return el("div", { class: "hbar", "data-testid": "balance", "data-owner": b.owner },
        el("span", { class: "hbar-name", title: String(b.owner) }, String(b.owner)),
        el("div", { class: "hbar-track" }, fill),
        el("span", { class: "hbar-value", title: `${exact.format(num(b.credits))} credits` }, credits(b.credits)));
    }));
  }

  function renderCheckpoint(value) {
    const cp = value && typeof value === "object" && value.checkpoint ? value.checkpoint : value;
    if (!cp || typeof cp !== "object") {
      replace($("checkpoint"), [el("dt", {}, "none yet"), el("dd", {}, "")]);
      return;
    }
    const when = cp.time ?? (cp.timestamp_ms ? new Date(cp.timestamp_ms).toISOString() : null);
    const pairs = [
      ["size", el("span", { "data-testid": "checkpoint-size" }, `${exact.format(num(cp.size))} entries`)],
      ["signed", el("span", { title: when ?? "" }, when ? `${clock(when)} (${ago(when)})` : "–")],
      ["root", el("code", { title: cp.root ?? "" }, short(cp.root, 20))],
      ["signature", el("code", { title: cp.signature ?? "" }, short(cp.signature, 20))],
    ];
    replace($("checkpoint"), pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  }

  function renderLedger(entries) {
    if (!entries.length) {
      replace($("ledger"), [el("tr", {}, el("td", { colspan: 6, class: "empty" }, "The ledger is empty."))]);
      return;
    }
    const signs = { credit: "+", grant: "+", refund: "+", charge: "−", clawback: "−" };
    const newestFirst = entries.slice().sort((a, b) => num(b.seq) - num(a.seq));
    replace($("ledger"), newestFirst.map((e) => {
      const who = e.owner ?? e.account ?? "";
      const note = e.memo ?? e.reason ?? "";
      return el("tr", { "data-testid": "entry" },
        el("td", { class: "num" }, e.seq ?? ""),
        el("td", {}, el("span", { class: `kind kind-${String(e.kind)}` }, e.kind ?? "?")),
        el("td", { title: note ? `${who}: ${note}` : who }, who,
          e.node ? el("span", { class: "muted" }, ` · ${short(e.node, 8)}`) : null),
        el("td", {}, e.job ? el("code", { title: e.job }, short(e.job, 10)) : ""),
        el("td", { class: "num" }, `${pick(signs, e.kind, "")}${credits(e.amount)}`),
        el("td", { title: e.created_at_iso ?? "" }, clock(e.created_at_iso)));
    }));
  }

  function renderBlocked(names) {
    if (!names.length) {
      replace($("blocked"), [el("li", { class: "empty" }, "none")]);
      return;
    }
    replace($("blocked"), names.map((n) => el("li", { class: "chip", "data-testid": "blocked-account" }, String(n))));
  }

  connect();
})();
