// weightcache dashboard: polls the node's JSON API once a second, renders it, and acts on one
// pipeline at a time (warm, pin, unpin, evict, delete) through the same API, as the token's tenant.
// Plain browser JavaScript, no dependencies. Every string from the API goes through esc().
(() => {
  "use strict";

  const POLL_MS = 1000;
  const TIMEOUT_MS = 5000;
  const TOKEN_KEY = "weightcache.token";
  const STATES = ["warm", "warming", "cold", "failed", "evicted"];
  const STAGES = [
    ["lease", "Lease"],
    ["manifest", "Manifest"],
    ["connect", "Connect"],
    ["stream", "Stream"],
    ["other", "Other"],
  ];
  const CHART_BARS = 30;
  const CARD_LOADS = 5;

  const $ = (id) => document.getElementById(id);

  // The token lives in this tab's session storage only: it goes when the tab closes. A copy an
  // older version of this page left in local storage is removed, never read.
  localStorage.removeItem(TOKEN_KEY);

  const view = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    filter: "all",
    query: "",
    node: null,
    pipelines: [],
    loads: [],
    lastOk: 0,
    waitingForToken: false,
    authError: null, // the node's answer to a request without a (good) token: {status, code, message}
    busy: new Set(), // pipeline keys with an action in flight
    actionErrors: new Map(), // pipeline key -> {verb, status, code, message}
    timer: 0,
    toastTimer: 0,
    cards: new Map(), // pipeline key -> {el, head, rest, fill, meta, html}
  };

  // ------------------------------------------------------------------ formatting

  function esc(value) {
    return String(value ?? "").replace(/[&<>"']/g, (c) => ({
      "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
    }[c]));
  }

  function fmtBytes(n) {
    if (n === null || n === undefined || Number.isNaN(n)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let value = Number(n);
    let unit = 0;
    while (Math.abs(value) >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    const digits = unit === 0 ? 0 : value >= 100 ? 0 : value >= 10 ? 1 : 2;
    return `${value.toFixed(digits)} ${units[unit]}`;
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 0.001) return "0 ms";
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
    return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  }

  function fmtRelative(ts) {
    if (!ts) return "never";
    const delta = Date.now() / 1000 - ts;
    const future = delta < 0;
    const d = Math.abs(delta);
    let text;
    if (d < 5) return future ? "now" : "just now";
    if (d < 60) text = `${Math.round(d)} s`;
    else if (d < 3600) text = `${Math.round(d / 60)} min`;
    else if (d < 86400) text = `${Math.round(d / 3600)} h`;
    else text = `${Math.round(d / 86400)} d`;
    return future ? `in ${text}` : `${text} ago`;
  }

  function fmtClock(ts) {
    const date = new Date(ts * 1000);
    const sameDay = date.toDateString() === new Date().toDateString();
    const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
    return sameDay ? time : `${date.toLocaleDateString()} ${time}`;
  }

  function fmtRate(gbps) {
    if (!gbps) return "–";
    if (gbps >= 10) return `${gbps.toFixed(1)} GB/s`;
    if (gbps >= 1) return `${gbps.toFixed(2)} GB/s`;
    const mbps = gbps * 1000;
    return `${mbps >= 10 ? mbps.toFixed(0) : mbps.toFixed(1)} MB/s`;
  }

  function shortSource(source) {
    // a local path can be long: keep its scheme and last two parts, the full one is the title
    if (!source.startsWith("file://") || source.length <= 44) return source;
    const parts = source.slice(7).split("/").filter(Boolean);
    return `file://…/${parts.slice(-2).join("/")}`;
  }

  function pct(part, whole) {
    if (!whole) return 0;
    return Math.max(0, Math.min(100, (100 * part) / whole));
  }

  function shortRevision(rev) {
    if (!rev) return "";
    if (/^[0-9a-f]{40}$/.test(rev)) return rev.slice(0, 10);
    if (rev.startsWith("local-")) return rev.slice(0, 14);
    return rev.length > 18 ? `${rev.slice(0, 17)}…` : rev;
  }

  // ------------------------------------------------------------------ API

  // An answer that is not 2xx, with the code and message of the node's JSON error body
  // ({"error": {"code", "message", ...}}), or what the answer itself says when it has none.
  class HttpError extends Error {
    constructor(status, body, statusText) {
      const error = body && typeof body === "object" && body.error && typeof body.error === "object" ? body.error : {};
      super(String(error.message || statusText || `HTTP ${status}`));
      this.status = status;
      this.code = String(error.code || `http_${status}`);
    }
  }

  // A request that got no answer at all (network down, node gone, too slow).
  function unreachable(error) {
    const timedOut = error && error.name === "AbortError";
    const failure = new Error(timedOut ? `no answer within ${TIMEOUT_MS / 1000} s` : `the node did not answer (${error && error.message ? error.message : error})`);
    failure.status = 0;
    failure.code = timedOut ? "timeout" : "unreachable";
    return failure;
  }

  async function request(method, path) {
    const headers = { Accept: "application/json" };
    if (view.token) headers.Authorization = `Bearer ${view.token}`;
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
    let response;
    try {
      response = await fetch(path, { method, headers, signal: controller.signal, cache: "no-store" });
    } catch (error) {
      throw unreachable(error);
    } finally {
      clearTimeout(timer);
    }
    if (!response.ok) {
      throw new HttpError(response.status, await response.json().catch(() => null), response.statusText);
    }
    if (response.status === 204) return null;
    return response.json().catch(() => null);
  }

  const api = (path) => request("GET", path);

  // ------------------------------------------------------------------ actions

  const ACTIONS = {
    warm: { method: "POST", suffix: "/warm", label: "Warm now", done: "warming" },
    pin: { method: "POST", suffix: "/pin", label: "Pin", done: "pinned" },
    unpin: { method: "POST", suffix: "/unpin", label: "Unpin", done: "unpinned" },
    evict: {
      method: "POST", suffix: "/evict", label: "Evict", done: "evicted", danger: true,
      confirm: (id) => [`Evict ${id}?`, `This frees the bytes of pipeline ${id} on this node. It stays registered (evicted) and warms again on request; replicas starting meanwhile wait for it.`],
    },
    delete: {
      method: "DELETE", suffix: "", label: "Delete", done: "deleted", danger: true,
      confirm: (id) => [`Delete ${id}?`, `This forgets pipeline ${id}: its registration, its history and every byte no other pipeline holds. Registering it again fetches it again.`],
    },
  };

  function actionPath(verb, id, tenant) {
    return `/v1/pipelines/${encodeURIComponent(id)}${ACTIONS[verb].suffix}?tenant=${encodeURIComponent(tenant)}`;
  }

  // Resolves true when the person confirms, false on Cancel or Escape.
  function confirmAction(title, text, label) {
    const dialog = $("confirm-dialog");
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = label;
    return new Promise((resolve) => {
      const finish = (answer) => {
        $("confirm-form").removeEventListener("submit", onSubmit);
        $("confirm-cancel").removeEventListener("click", onCancel);
        dialog.removeEventListener("close", onClose);
        if (dialog.open) dialog.close();
        resolve(answer);
      };
      const onSubmit = (event) => { event.preventDefault(); finish(true); };
      const onCancel = () => finish(false);
      const onClose = () => finish(false);
      $("confirm-form").addEventListener("submit", onSubmit);
      $("confirm-cancel").addEventListener("click", onCancel);
      dialog.addEventListener("close", onClose);
      dialog.showModal();
      $("confirm-cancel").focus(); // the safe answer is the default one
    });
  }

  async function runAction(button) {
    const { action: verb, id, tenant } = button.dataset;
    const spec = ACTIONS[verb];
    const key = `${tenant}/${id}`;
    if (!spec || view.busy.has(key)) return;
    if (spec.confirm) {
      const [title, text] = spec.confirm(id);
      if (!(await confirmAction(title, text, spec.label))) return;
    }
    view.busy.add(key);
    view.actionErrors.delete(key);
    renderCards();
    try {
      await request(spec.method, actionPath(verb, id, tenant));
      toast(`${id}: ${spec.done}`);
    } catch (error) {
      // never silent: the node's own code and message stay on the card until dismissed
      view.actionErrors.set(key, { verb, status: error.status || 0, code: error.code || "error", message: error.message });
      if (error.status === 401) showAuthError(error);
    } finally {
      view.busy.delete(key);
    }
    renderCards();
    if (!view.waitingForToken) poll();
  }

  function toast(text) {
    const el = $("toast");
    el.textContent = text;
    el.hidden = false;
    clearTimeout(view.toastTimer);
    view.toastTimer = setTimeout(() => { el.hidden = true; }, 4000);
  }

  // ------------------------------------------------------------------ auth

  function forgetTenantData() {
    for (const card of view.cards.values()) card.el.remove();
    view.cards.clear();
    view.pipelines = [];
    view.loads = [];
    view.actionErrors.clear();
    // the figures drawn from them go too: they were the last tenant's
    for (const id of ["st-warm", "st-leases"]) $(id).textContent = "–";
    renderFilters();
    renderChart();
  }

  // The node would not say (a 401): its figures are not shown from an earlier answer either.
  function forgetNodeData() {
    view.node = null;
    for (const id of ["node-id", "node-region", "node-version"]) $(id).textContent = "…";
    for (const id of ["st-used", "st-reserved", "st-free", "st-capacity", "st-inflight", "st-partials", "st-quarantined"]) {
      $(id).textContent = "–";
      delete $(id).dataset.bytes;
    }
    for (const id of ["seg-used", "seg-reserved"]) $(id).style.width = "0";
    for (const id of ["wm-low", "wm-high"]) $(id).hidden = true;
    $("storage-note").textContent = "";
  }

  // The node refused the token (or the lack of one): show its answer, show nothing of a tenant.
  function showAuthError(error) {
    view.authError = { status: error.status, code: error.code, message: error.message };
    forgetTenantData();
    forgetNodeData();
    $("banner-title").textContent = view.token
      ? "This node did not accept the token: nothing can be shown or done with it."
      : "This node needs a token: without one, nothing can be shown or done.";
    $("banner-code").textContent = `${error.code} (HTTP ${error.status})`;
    $("banner-message").textContent = error.message;
    $("banner").hidden = false;
    $("empty").hidden = true;
  }

  function clearAuthError() {
    view.authError = null;
    $("banner").hidden = true;
  }

  async function poll() {
    clearTimeout(view.timer);
    try {
      const [node, list, loads, region] = await Promise.all([
        api("/v1/node"),
        api("/v1/pipelines"),
        api(`/v1/loads?limit=${CHART_BARS + 20}`).catch((error) => {
          if (error instanceof HttpError && error.status === 401) throw error;
          return { loads: [] }; // history is a nicety: never let it blank the page
        }),
        api("/v1/region").catch(() => null), // an older node has no region view
      ]);
      view.region = region;
      view.node = node;
      view.pipelines = list.pipelines || [];
      view.loads = loads.loads || [];
      view.lastOk = Date.now();
      clearAuthError();
      render();
      setLive("ok");
    } catch (error) {
      if (error instanceof HttpError && error.status === 401) {
        showAuthError(error);
        askForToken(view.token ? "That token was not accepted by this node." : null);
        setLive("auth");
        return; // polling resumes when a token is saved
      }
      setLive("error", error);
    }
    view.timer = setTimeout(poll, POLL_MS);
  }

  function setLive(mode, error) {
    const live = $("live");
    live.dataset.live = mode;
    const text = $("live-text");
    if (mode === "ok") text.textContent = "live";
    else if (mode === "auth") text.textContent = "token needed";
    else {
      const since = view.lastOk ? `, last update ${fmtRelative(view.lastOk / 1000)}` : "";
      text.textContent = `offline, retrying${since}`;
      live.title = String(error && error.message ? error.message : error || "");
    }
  }

  // ------------------------------------------------------------------ node panel

  function renderNode(node) {
    $("node-id").textContent = node.node_id;
    $("node-region").textContent = node.region;
    $("node-version").textContent = node.version;
    const cap = node.capacity || 0;
    $("seg-used").style.width = `${pct(node.used, cap)}%`;
    $("seg-reserved").style.width = `${pct(node.reserved, cap)}%`;
    // watermarks at 100% mean the background trim is off (eviction runs on demand only)
    const trimming = node.high_watermark < 1;
    const marks = [
      ["wm-low", node.low_watermark, "low", trimming && node.low_watermark < node.high_watermark],
      ["wm-high", node.high_watermark, node.low_watermark < node.high_watermark ? "high" : "trim", trimming],
    ];
    for (const [id, mark, label, shown] of marks) {
      const el = $(id);
      el.hidden = !shown;
      el.style.left = `${Math.round(mark * 1000) / 10}%`;
      el.firstElementChild.textContent = `${label} ${Math.round(mark * 100)}%`;
    }
    const usedPct = pct(node.used + node.reserved, cap);
    $("st-used").innerHTML = `${esc(fmtBytes(node.used))}<small>${pct(node.used, cap).toFixed(0)}%</small>`;
    $("st-reserved").textContent = fmtBytes(node.reserved);
    $("st-free").textContent = fmtBytes(node.free);
    $("st-capacity").textContent = fmtBytes(cap);
    // in flight: what running fills wrote so far; idle partials are leftovers kept to resume
    for (const [id, bytes] of [["st-inflight", node.in_flight || 0], ["st-partials", node.temp || 0]]) {
      $(id).textContent = fmtBytes(bytes);
      $(id).dataset.bytes = String(bytes);
    }
    $("st-quarantined").textContent = fmtBytes(node.quarantined || 0);
    $("st-quarantined").classList.toggle("alarm", Boolean(node.quarantined));
    const warm = view.pipelines.filter((p) => p.state === "warm").length;
    $("st-warm").innerHTML = `${warm}<small>of ${view.pipelines.length}</small>`;
    $("st-leases").textContent = String(view.pipelines.reduce((n, p) => n + (p.active_leases || 0), 0));
    const allocated = `${usedPct.toFixed(usedPct < 10 ? 1 : 0)}% allocated`;
    let policy = "evicts on demand";
    if (trimming && usedPct >= node.high_watermark * 100) policy = "above the high watermark: trimming";
    else if (trimming) policy = `trims to ${Math.round(node.low_watermark * 100)}% above ${Math.round(node.high_watermark * 100)}%`;
    $("storage-note").textContent = `${allocated} · ${policy}`;
  }

  // ------------------------------------------------------------------ filters

  function renderFilters() {
    const counts = Object.fromEntries(STATES.map((s) => [s, 0]));
    for (const p of view.pipelines) counts[p.state] = (counts[p.state] || 0) + 1;
    const items = [["all", "All", view.pipelines.length], ...STATES.map((s) => [s, s[0].toUpperCase() + s.slice(1), counts[s]])];
    const html = items.map(([key, label, count]) => {
      const dot = key === "all" ? "" : `<i class="dot dot-${key}"></i>`;
      return `<button type="button" class="filter" role="tab" data-filter="${key}" aria-selected="${view.filter === key}">${dot}${label}<span class="count">${count}</span></button>`;
    }).join("");
    const filters = $("filters");
    if (filters.dataset.html !== html) {
      filters.innerHTML = html;
      filters.dataset.html = html;
    }
  }

  function visible(p) {
    if (view.filter !== "all" && p.state !== view.filter) return false;
    if (!view.query) return true;
    const q = view.query.toLowerCase();
    return p.id.toLowerCase().includes(q)
      || p.tenant.toLowerCase().includes(q)
      || p.models.some((m) => m.name.toLowerCase().includes(q) || m.source.toLowerCase().includes(q));
  }

  // ------------------------------------------------------------------ cold-start chart

  function stageParts(load) {
    const s = load.stages;
    const known = s.lease + s.manifest + s.connect + s.stream;
    return { lease: s.lease, manifest: s.manifest, connect: s.connect, stream: s.stream, other: Math.max(0, s.total - known) };
  }

  function niceMax(value) {
    if (value <= 0) return 1;
    const exp = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * exp >= value) return step * exp;
    return 10 * exp;
  }

  function renderChart() {
    const loads = view.loads.slice(0, CHART_BARS).reverse(); // oldest first, left to right
    const chart = $("chart");
    $("legend").innerHTML = STAGES.map(([k, label]) => `<span><i class="st-${k}"></i>${label}</span>`).join("");
    if (loads.length === 0) {
      const html = '<div class="chart-empty">No loads reported yet.<br>Each <code>weightcache load</code> reports its stage timings here.</div>';
      if (chart.dataset.html !== html) { chart.innerHTML = html; chart.dataset.html = html; }
      $("chart-note").textContent = "";
      return;
    }
    // drawn at the box's own pixel width, so text is never stretched
    const W = Math.max(260, Math.round(chart.getBoundingClientRect().width) || 600);
    const H = 132, left = 44, bottom = 16, top = 6;
    const max = niceMax(Math.max(...loads.map((l) => l.stages.total)));
    const plotH = H - bottom - top;
    const slots = Math.max(12, loads.length);
    const slot = (W - left) / slots;
    const barW = Math.min(22, Math.max(4, slot * 0.62));
    let svg = `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="cold-start times">`;
    for (const f of [0, 0.5, 1]) {
      const y = top + plotH * (1 - f);
      svg += `<line class="grid" x1="${left}" x2="${W}" y1="${y}" y2="${y}"/>`;
      svg += `<text class="axis-label" x="${left - 6}" y="${y + 3.5}" text-anchor="end">${esc(fmtSeconds(max * f))}</text>`;
    }
    loads.forEach((load, i) => {
      const x = left + slot * (slots - loads.length + i) + (slot - barW) / 2;
      let y = top + plotH;
      const parts = stageParts(load);
      let rects = "";
      for (const [k] of STAGES) {
        const h = (parts[k] / max) * plotH;
        if (h <= 0) continue;
        y -= h;
        rects += `<rect class="st-${k}" x="${x.toFixed(1)}" y="${y.toFixed(1)}" width="${barW.toFixed(1)}" height="${h.toFixed(1)}"/>`;
      }
      const title = `${load.pipeline} · TP${load.tp_size} rank ${load.rank} · ${load.device}\n`
        + `${fmtSeconds(load.stages.total)} total · ${fmtRate(load.gbps)} · ${fmtBytes(load.bytes)}\n`
        + STAGES.slice(0, 4).map(([k, label]) => `${label} ${fmtSeconds(load.stages[k])}`).join(" · ")
        + ` · Verify ${fmtSeconds(load.stages.verify)}\n${fmtRelative(load.at)}`;
      svg += `<g class="bar"><title>${esc(title)}</title>${rects}</g>`;
    });
    svg += `<text class="axis-label" x="${left}" y="${H - 2}">older</text>`;
    svg += `<text class="axis-label" x="${W}" y="${H - 2}" text-anchor="end">latest</text></svg>`;
    if (chart.dataset.html !== svg) { chart.innerHTML = svg; chart.dataset.html = svg; }
    const totals = loads.map((l) => l.stages.total).sort((a, b) => a - b);
    const median = totals[Math.floor((totals.length - 1) / 2)];
    const best = Math.max(...loads.map((l) => l.gbps));
    const latest = loads[loads.length - 1];
    $("chart-note").textContent = `last ${fmtSeconds(latest.stages.total)} · median ${fmtSeconds(median)} · best ${fmtRate(best)}`;
  }

  // ------------------------------------------------------------------ pipeline cards

  const ICONS = {
    pin: '<svg viewBox="0 0 16 16"><path d="M9.8 1.5l4.7 4.7-1.4.4-2.6 2.6.3 3.4-1.2 1.2-2.8-2.8-3.6 3.6-.7-.7 3.6-3.6L3.3 7.5l1.2-1.2 3.4.3 2.6-2.6z"/></svg>',
    flame: '<svg viewBox="0 0 16 16"><path d="M8 1c.5 2.5 4 4 4 8a4 4 0 0 1-8 0c0-1.8.9-3 2-4 0 1.2.5 2 1.3 2.3C7 5.5 7.3 3 8 1z"/></svg>',
    lock: '<svg viewBox="0 0 16 16"><path d="M4 7V5a4 4 0 0 1 8 0v2h1v8H3V7zm2 0h4V5a2 2 0 0 0-4 0z"/></svg>',
  };

  function cardKey(p) {
    return `${p.tenant}/${p.id}`;
  }

  function cardHead(p, showTenant) {
    const registered = `registered ${fmtRelative(p.registered_at)}`;
    const tenant = showTenant ? `<span>tenant ${esc(p.tenant)}</span> · ` : "";
    return `<div class="card-head">
        <div class="card-title">
          <a class="pid" href="/v1/pipelines/${encodeURIComponent(p.id)}?tenant=${encodeURIComponent(p.tenant)}" data-json-path="/v1/pipelines/${encodeURIComponent(p.id)}?tenant=${encodeURIComponent(p.tenant)}" title="Show this pipeline's JSON">${esc(p.id)}</a><a class="json-link" href="/v1/pipelines/${encodeURIComponent(p.id)}?tenant=${encodeURIComponent(p.tenant)}" data-json-path="/v1/pipelines/${encodeURIComponent(p.id)}?tenant=${encodeURIComponent(p.tenant)}">JSON</a>
          <div class="subtitle">${tenant}${esc(registered)}</div>
        </div>
        <span class="chip" data-state="${esc(p.state)}"><span><span class="chip-key">cache:</span> ${esc(p.state)}</span></span>
      </div>`;
  }

  function progressText(p) {
    const percent = p.state === "warm" ? 100 : Math.floor(p.progress * 1000) / 10;
    return `<span><strong>${esc(fmtBytes(p.bytes_cached))}</strong> / ${esc(fmtBytes(p.bytes_total))} cached</span><span>${percent.toFixed(p.state === "warming" ? 1 : 0)}%</span>`;
  }

  function badges(p) {
    const out = [];
    if (p.hot) out.push(`<span class="badge hot" title="used within the hot window">${ICONS.flame}hot</span>`);
    if (p.pinned) out.push(`<span class="badge pinned" title="never evicted">${ICONS.pin}pinned</span>`);
    if (p.active_leases) {
      const n = p.active_leases;
      out.push(`<span class="badge leases" title="replicas loading it now">${ICONS.lock}${n} lease${n === 1 ? "" : "s"}</span>`);
    }
    return out.join("");
  }

  function fact(key, value, dim) {
    return `<div class="fact"><div class="fact-key">${esc(key)}</div><div class="fact-value${dim ? " dim" : ""}">${value}</div></div>`;
  }

  function stageBar(load) {
    const parts = stageParts(load);
    const total = Object.values(parts).reduce((a, b) => a + b, 0) || 1;
    let x = 0;
    let rects = "";
    for (const [k] of STAGES) {
      const w = (parts[k] / total) * 100;
      if (w <= 0) continue;
      rects += `<rect class="st-${k}" x="${x.toFixed(2)}" y="0" width="${w.toFixed(2)}" height="8"/>`;
      x += w;
    }
    const title = STAGES.map(([k, label]) => `${label} ${fmtSeconds(parts[k])}`).join(" · ") + ` · Verify ${fmtSeconds(load.stages.verify)}`;
    return `<svg class="stagebar" viewBox="0 0 100 8" preserveAspectRatio="none"><title>${esc(title)}</title>${rects}</svg>`;
  }

  function loadsTable(p) {
    const loads = view.loads.filter((l) => l.pipeline === p.id).slice(0, CARD_LOADS);
    if (loads.length === 0) return '<div class="no-loads">No loads reported yet.</div>';
    const rows = loads.map((l) => `<tr>
        <td title="${esc(fmtClock(l.at))}">${esc(fmtRelative(l.at))}</td>
        <td>TP${l.tp_size} · r${l.rank}</td>
        <td class="mono col-device">${esc(l.device)}</td>
        <td class="col-via">${esc(l.source)}</td>
        <td class="num">${esc(fmtBytes(l.bytes))}</td>
        <td class="num">${esc(fmtSeconds(l.stages.total))}</td>
        <td class="num gbps">${esc(fmtRate(l.gbps))}</td>
        <td class="stages">${stageBar(l)}</td>
      </tr>`).join("");
    return `<table class="loads"><thead><tr><th>when</th><th>shard</th><th class="col-device">device</th><th class="col-via">via</th><th class="num">bytes</th><th class="num">total</th><th class="num">speed</th><th class="stages">stages</th></tr></thead><tbody>${rows}</tbody></table>`;
  }

  // A model with no files yet is being resolved only while the pipeline warms; a failed (or
  // evicted) one never got that far, and saying "resolving…" there would be a lie.
  function unresolved(state) {
    return state === "warming" ? "resolving…" : "not resolved";
  }

  // The node sets retry_at only when it will retry (a failed pipeline, retries on); a time in
  // the past means the retry is starting now.
  function retrying(error, state) {
    return state === "failed" && Boolean(error.retry_at);
  }

  function retryText(error, state) {
    if (retrying(error, state)) {
      const when = fmtClock(error.retry_at);
      return error.retry_at * 1000 > Date.now()
        ? `retries ${fmtRelative(error.retry_at)} (${when})`
        : `retry due now (${when})`;
    }
    return `no automatic retry: ${error.action || "fix the cause, then warm it again"}`;
  }

  function actionButton(p, verb, disabled) {
    const spec = ACTIONS[verb];
    return `<button type="button" class="action${spec.danger ? " danger" : ""}" data-action="${verb}" data-id="${esc(p.id)}" data-tenant="${esc(p.tenant)}"${disabled ? " disabled" : ""}>${esc(spec.label)}</button>`;
  }

  function actionsRow(p) {
    const busy = view.busy.has(cardKey(p));
    const disabled = busy || Boolean(view.authError);
    const verbs = [];
    if (["failed", "evicted", "cold"].includes(p.state) || (p.last_attempt && p.state === "warm")) verbs.push("warm");
    verbs.push(p.pinned ? "unpin" : "pin");
    if (p.state !== "evicted") verbs.push("evict");
    verbs.push("delete");
    const working = busy ? '<span class="action-busy">working…</span>' : "";
    return `<div class="actions">${verbs.map((verb) => actionButton(p, verb, disabled)).join("")}${working}</div>`;
  }

  function actionError(p) {
    const failure = view.actionErrors.get(cardKey(p));
    if (!failure) return "";
    const status = failure.status ? `HTTP ${failure.status}` : "no answer";
    return `<div class="error-box action-error" role="alert" data-action="${esc(failure.verb)}">
        <div class="action-error-head">
          <span class="error-title">${esc(ACTIONS[failure.verb].label)} refused (${esc(status)})</span>
          <button type="button" class="action dismiss" data-dismiss="${esc(cardKey(p))}" title="Dismiss">Dismiss</button>
        </div>
        <div class="error-code">${esc(failure.code)}</div>
        <div class="error-message">${esc(failure.message)}</div>
      </div>`;
  }

  function cardRest(p) {
    const models = p.models.map((m) => `<div class="model">
        <span class="model-name">${esc(m.name)}</span>
        <span class="model-source" title="${esc(m.source)}${m.revision ? ` @ ${esc(m.revision)}` : ""}">${esc(shortSource(m.source))}${m.revision ? `<span class="rev">${esc(shortRevision(m.revision))}</span>` : ""}</span>
        <span class="model-size">${m.files ? `${m.files} file${m.files === 1 ? "" : "s"} · ${esc(fmtBytes(m.bytes_total))}` : unresolved(p.state)}</span>
      </div>`).join("");
    const shards = p.tp_sizes.map((tp) => {
      const ready = (p.shards && p.shards[String(tp)]) || "pending";
      return `<span class="shard" data-ready="${esc(ready)}" data-tp="${tp}"><b>TP ${tp}</b>${esc(ready)}</span>`;
    }).join("");
    const captures = capturesList(p);
    let error = "";
    if (p.error) {
      error = `<div class="error-box" role="alert">
          <div class="error-code">${esc(p.error.code)}</div>
          <div class="error-message">${esc(p.error.message)}</div>
          <div class="error-retry"${retrying(p.error, p.state) ? ` data-retry-at="${esc(p.error.retry_at)}"` : ""}>${esc(retryText(p.error, p.state))}</div>
        </div>`;
    }
    const attempt = p.pending || p.last_attempt;
    if (attempt) {
      const spec = attempt.models.map((m) => esc(shortSource(m.source)) + (m.revision ? ` @ ${esc(shortRevision(m.revision))}` : "")).join(", ");
      error += attempt.error
        ? `<div class="error-box" role="alert">
            <div class="error-code">new spec failed: ${esc(attempt.error.code)}</div>
            <div class="error-message">${esc(attempt.error.message)}</div>
            <div class="error-retry">${spec}; the version above keeps serving. ${esc(retryText(attempt.error, attempt.state))}</div>
          </div>`
        : `<div class="note-box">New spec filling (${Math.round(pct(attempt.progress, 1))}%): ${spec}. The version above keeps serving until it is warm.</div>`;
    }
    let note = "";
    if (p.state === "evicted") note = `<div class="note-box">Evicted${p.evicted_reason ? ` (${esc(p.evicted_reason)})` : ""}: its bytes were freed; it warms again on request.</div>`;
    const unverified = p.unverified_files
      ? `<div class="quiet">${p.unverified_files} file${p.unverified_files === 1 ? "" : "s"} without an origin digest: size-checked, then hashed on arrival.</div>`
      : "";
    const lastUsed = p.last_used_at ? esc(fmtRelative(p.last_used_at)) : "never";
    return `<div class="facts">
        ${fact("Size", esc(fmtBytes(p.bytes_total)))}
        ${fact("Last used", lastUsed, !p.last_used_at)}
        ${fact("Active leases", String(p.active_leases || 0), !p.active_leases)}
        ${fact("Flags", badges(p) ? `<span class="badges">${badges(p)}</span>` : "none", !badges(p))}
      </div>
      ${error}${note}${actionsRow(p)}${actionError(p)}
      <div class="section"><div class="section-title">Models</div><div class="models">${models}</div>${unverified}</div>
      <div class="section"><div class="section-title">Tensor-parallel shards</div><div class="shards">${shards}</div></div>
      ${captures}
      <div class="section"><div class="section-title">Recent loads</div>${loadsTable(p)}</div>`;
  }

  // Engine shard sets (one per TP rank) and compile caches replicas uploaded: grouped by
  // what they were made for, each group's ranks and bytes. Nothing when there is none.
  function capturesList(p) {
    const captures = p.captures || [];
    if (!captures.length) return "";
    const groups = new Map();
    for (const c of captures) {
      const k = c.key;
      const what = k.kind === "weights"
        ? `${k.model} · TP ${k.tp_size} · ${k.dtype}${k.quantization !== "none" ? ` ${k.quantization}` : ""}`
        : `${k.model} · compile cache · TP ${k.tp_size}`;
      const where = `${k.engine} ${k.engine_version} · ${k.device}`;
      const key = `${k.kind}|${what}|${where}|${c.stage || ""}`;
      const group = groups.get(key) || { kind: k.kind, what, where, stage: c.stage, ranks: [], bytes: 0, at: 0 };
      if (k.rank !== null && k.rank !== undefined) group.ranks.push(k.rank);
      group.bytes += c.bytes;
      group.at = Math.max(group.at, c.created_at);
      groups.set(key, group);
    }
    const rows = [...groups.values()].map((g) => {
      const ranks = g.ranks.length ? `ranks ${g.ranks.sort((a, b) => a - b).join(", ")}` : "";
      const stage = g.stage ? `${g.stage} tensors` : "";
      return `<div class="capture" data-kind="${esc(g.kind)}">
          <span class="capture-what">${esc(g.what)}</span>
          <span class="capture-where">${esc(g.where)}</span>
          <span class="capture-size">${esc([ranks, stage, fmtBytes(g.bytes), fmtRelative(g.at)].filter(Boolean).join(" · "))}</span>
        </div>`;
    }).join("");
    return `<div class="section"><div class="section-title">Engine captures</div><div class="captures">${rows}</div></div>`;
  }

  function makeCard(key) {
    const el = document.createElement("article");
    el.className = "card";
    el.innerHTML = '<div class="card-top"></div><div class="progress"><div class="progress-fill"></div></div><div class="progress-meta"></div><div class="card-rest"></div>';
    const card = {
      el,
      top: el.querySelector(".card-top"),
      fill: el.querySelector(".progress-fill"),
      meta: el.querySelector(".progress-meta"),
      rest: el.querySelector(".card-rest"),
      html: {},
    };
    view.cards.set(key, card);
    return card;
  }

  function setHtml(card, part, html) {
    if (card.html[part] !== html) {
      card[part].innerHTML = html;
      card.html[part] = html;
    }
  }

  function renderCards() {
    const container = $("pipelines");
    const showTenant = new Set(view.pipelines.map((p) => p.tenant)).size > 1;
    const shown = view.pipelines.filter(visible);
    const keep = new Set();
    shown.forEach((p, index) => {
      const key = cardKey(p);
      keep.add(key);
      const card = view.cards.get(key) || makeCard(key);
      card.el.dataset.pipeline = p.id;
      card.el.dataset.state = p.state;
      setHtml(card, "top", cardHead(p, showTenant));
      const width = p.state === "warm" ? 100 : pct(p.progress, 1);
      card.fill.style.width = `${width}%`;
      card.fill.dataset.progress = width.toFixed(2);
      setHtml(card, "meta", progressText(p));
      setHtml(card, "rest", cardRest(p));
      if (container.children[index] !== card.el) container.insertBefore(card.el, container.children[index] || null);
    });
    for (const [key, card] of view.cards) {
      if (!keep.has(key)) {
        card.el.remove();
        view.cards.delete(key);
      }
    }
    const empty = $("empty");
    if (view.authError) {
      empty.hidden = true; // the banner says why there is nothing
    } else if (view.pipelines.length === 0) {
      empty.innerHTML = "No pipelines on this node yet. Register one:<br><br><code>weightcache register chat --model llm=hf://org/model --tp 1,2 --wait</code>";
      empty.hidden = false;
    } else if (shown.length === 0) {
      empty.textContent = "No pipeline matches this filter.";
      empty.hidden = false;
    } else {
      empty.hidden = true;
    }
  }

  function render() {
    if (view.node) renderNode(view.node);
    renderFilters();
    renderChart();
    renderRegion();
    renderCards();
  }

  // The region panel: shown on a node of a region (--redis), hidden on a node on its own.
  function renderRegion() {
    const region = view.region;
    $("region-panel").hidden = !region || region.connected === false;
    if ($("region-panel").hidden) return;
    $("region-note").textContent = region.connected
      ? `${region.region} · ${region.nodes.length} node(s)`
      : `${region.region} · Redis unreachable`;
    const body = $("region-nodes");
    body.replaceChildren();
    for (const node of region.nodes) {
      const row = document.createElement("tr");
      const beat = node.last_heartbeat
        ? `${Math.max(0, Math.round(Date.now() / 1000 - node.last_heartbeat))}s ago` : "–";
      for (const text of [node.node_id, node.state, fmtBytes(node.used), fmtBytes(node.free), beat]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      row.title = node.data_url || node.url;
      body.append(row);
    }
    $("region-copies").textContent = region.pipelines.length
      ? "copies: " + region.pipelines.map((p) => `${p.id} ×${p.copies}` + (p.nodes && p.nodes.length ? ` (${p.nodes.join(" ")})` : "")).join(", ") : "";
  }

  // ------------------------------------------------------------------ token and JSON dialogs

  function askForToken(reason) {
    view.waitingForToken = true;
    $("token-reason").textContent = reason || "This node needs a token to show its pipelines.";
    $("token-input").value = "";
    const dialog = $("token-dialog");
    if (!dialog.open) dialog.showModal();
    $("token-input").focus();
  }

  function renderTokenButton() {
    const button = $("token-button");
    button.dataset.token = view.token ? "set" : "none";
    button.textContent = view.token ? "Token ✓" : "Token";
    button.title = view.token ? "A token is set for this tab: replace or forget it" : "Set the API token";
  }

  function saveToken(token) {
    view.token = token;
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
    forgetTenantData(); // another token is another tenant: nothing of the last one stays
    renderTokenButton();
    $("token-dialog").close();
    view.waitingForToken = false;
    poll();
  }

  function highlightJson(value) {
    const text = JSON.stringify(value, null, 2);
    return esc(text).replace(
      /(&quot;(?:[^&]|&(?!quot;))*?&quot;)(\s*:)?|\b(true|false|null)\b|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)/g,
      (match, str, colon, literal, number) => {
        if (str) return colon ? `<span class="k">${str}</span>${colon}` : `<span class="s">${str}</span>`;
        if (literal) return `<span class="l">${literal}</span>`;
        return `<span class="n">${number}</span>`;
      },
    );
  }

  async function showJson(path) {
    const dialog = $("json-dialog");
    $("json-title").textContent = path;
    $("json-body").textContent = "loading…";
    if (!dialog.open) dialog.showModal();
    try {
      $("json-body").innerHTML = highlightJson(await api(path));
    } catch (error) {
      $("json-body").textContent = `Could not load ${path}: ${error.message}`;
    }
  }

  // ------------------------------------------------------------------ wiring

  function readHash() {
    const match = /(?:^|[#&])state=([a-z]+)/.exec(location.hash);
    view.filter = match && STATES.includes(match[1]) ? match[1] : "all";
  }

  document.addEventListener("DOMContentLoaded", () => {
    readHash();
    $("filters").addEventListener("click", (event) => {
      const button = event.target.closest("[data-filter]");
      if (!button) return;
      view.filter = button.dataset.filter;
      history.replaceState(null, "", view.filter === "all" ? location.pathname : `#state=${view.filter}`);
      render();
    });
    window.addEventListener("hashchange", () => { readHash(); render(); });
    window.addEventListener("resize", () => { if (view.lastOk) renderChart(); });
    $("search").addEventListener("input", (event) => {
      view.query = event.target.value.trim();
      renderCards();
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "/" && document.activeElement.tagName !== "INPUT") {
        event.preventDefault();
        $("search").focus();
      }
    });
    document.addEventListener("click", (event) => {
      const action = event.target.closest("button[data-action]");
      if (action) { if (!action.disabled) runAction(action); return; }
      const dismiss = event.target.closest("[data-dismiss]");
      if (dismiss) { view.actionErrors.delete(dismiss.dataset.dismiss); renderCards(); return; }
      const link = event.target.closest("[data-json-path]");
      // a modified click opens the raw JSON (works as is when auth is off)
      if (!link || event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
      event.preventDefault();
      showJson(link.dataset.jsonPath);
    });
    $("json-close").addEventListener("click", () => $("json-dialog").close());
    $("token-button").addEventListener("click", () => askForToken(view.token ? "Replace or forget the token this page uses." : "Paste an API token for this node."));
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      saveToken($("token-input").value.trim());
    });
    $("token-clear").addEventListener("click", () => saveToken(""));
    $("banner-token").addEventListener("click", () => askForToken(view.token ? "That token was not accepted by this node." : null));
    renderTokenButton();
    $("token-cancel").addEventListener("click", () => {
      $("token-dialog").close();
      if (view.waitingForToken) setLive("auth");
    });
    poll();
    // relative times ("12 s ago") keep moving between polls that change nothing
    setInterval(() => { if (!view.waitingForToken && view.lastOk) render(); }, 5000);
  });
})();
