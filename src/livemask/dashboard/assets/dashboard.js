// livemask dashboard: plain JavaScript and <canvas>, no libraries, no network beyond /ws.
// Messages from /ws: JSON text ({type: hello | update | status | event}) and binary images
// ("LMD1", uint32 LE header length, JSON header, width*height grey bytes, then the outline
// packed 1 bit per pixel, MSB first). See docs/dashboard.md.
"use strict";
(() => {
  const MAX_POINTS = 3000;
  const MAX_EVENTS = 100;
  const PLOT_WINDOW_S = 300;
  const OUTLINE_RGBA = 0xff00ccff; // ABGR in little-endian memory: #ffcc00 (amber)
  const COLORS = { count: "#4fc3f7", area: "#81c784", intensity: "#ffb74d", hist: "#9575cd",
                   tile: "#f06292", grid: "#2c323d", axis: "#8a94a3" };

  const $ = (id) => document.getElementById(id);
  window.livemaskStats = { images: 0, firstImageAt: null, lastImageAt: null };
  const S = {
    config: null, points: [], summary: null, grains: null, status: null, rates: null,
    dashboard: null, events: [], shown: [], dirty: true, image: null, imageDirty: false,
    offline: false, // the WebSocket closed: the dashboard server (and the service?) is gone
    silent: null, // seconds without a status, as the server says (the service went silent)
    quiet: null, // seconds without any message from the server, once that is too long
    waiting: null, // seconds the server has waited for the service's first status
  };

  // ------------------------------------------------------------ connection
  let retryMs = 500;
  let socket = null;
  // The server sends something at least every config.keepalive_s (1 s): a page that hears
  // nothing for 3 of those (3 s at least) says so (a frozen service or server, a hung
  // loop, a dropped tunnel: the WebSocket does not close then), and after DROP_AFTER_MS
  // it drops the socket and connects again.
  // An image the server announced ({"type": "image", "bytes": N}) may take long over a
  // slow link, and nothing else comes meanwhile: it gets 3 times what it should take at the
  // link's rate as measured on the images before (at first SLOW_LINK_BPS, a slow mobile
  // link).
  const DROP_AFTER_MS = 30000;
  const SLOW_LINK_BPS = 8000;
  let lastDataAt = performance.now();
  let incoming = null; // the image announced and not received yet: {bytes, at}
  let linkBps = null; // bytes per second of the last image that took a while
  function quietAfterMs() {
    const every = S.config && S.config.keepalive_s > 0 ? S.config.keepalive_s : 1;
    const quiet = Math.max(3000, 3000 * every);
    if (!incoming) return quiet;
    return Math.max(quiet, 3000 * incoming.bytes / (linkBps || SLOW_LINK_BPS));
  }
  function imageArrived(bytes) {
    if (incoming) {
      const ms = performance.now() - incoming.at;
      if (ms > 200) linkBps = (1000 * bytes) / ms; // (a fast link: the default stays unused)
    }
    incoming = null;
  }
  function wantsImages() {
    return !document.hidden && $("show-image").checked;
  }
  function sendView() { // a hidden tab or a paused image costs the service nothing
    if (socket && socket.readyState === WebSocket.OPEN) {
      // ack: this page acknowledges every image, and gets the next only then (over a slow
      // link the server's socket buffers would otherwise fill with old images)
      socket.send(JSON.stringify({ type: "view", images: wantsImages(), ack: true }));
    }
  }
  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${proto}//${location.host}/ws`);
    ws.binaryType = "arraybuffer";
    socket = ws;
    lastDataAt = performance.now(); // (the connect itself gets DROP_AFTER_MS too)
    ws.onopen = () => { setConn(true); retryMs = 500; sendView(); };
    ws.onclose = () => {
      if (socket !== ws) return; // (dropped for silence: already reconnecting)
      socket = null;
      incoming = null;
      setConn(false);
      // embedded in the service, the server went with it: do not go on showing its last
      // state and rates as if live (greyed out until the next hello)
      S.offline = true;
      setStatus(S.status, null, null, null);
      setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 5000);
    };
    ws.onmessage = (ev) => {
      lastDataAt = performance.now();
      if (S.quiet !== null) { S.quiet = null; setConn(true); showState(); }
      try {
        if (typeof ev.data === "string") {
          onJson(JSON.parse(ev.data));
        } else {
          if (ws.readyState === WebSocket.OPEN) ws.send('{"type":"ack"}'); // got it: next one
          imageArrived(ev.data.byteLength);
          onImage(ev.data);
        }
      } catch (err) {
        console.error("livemask dashboard: bad message", err);
      }
    };
  }

  function checkQuiet() { // once a second: has the server gone quiet?
    if (!socket) return; // closed: onclose said so, and reconnects
    const quietMs = performance.now() - lastDataAt;
    if (quietMs >= Math.max(DROP_AFTER_MS, 2 * quietAfterMs())) { // connect again (close()
      // alone may wait for the dead peer)
      const ws = socket;
      socket = null;
      ws.onclose = ws.onmessage = ws.onopen = null;
      try { ws.close(); } catch (err) { /* (already closing) */ }
      S.quiet = null;
      incoming = null;
      setConn(false);
      S.offline = true;
      showState();
      setTimeout(connect, 0);
      return;
    }
    if (socket.readyState !== WebSocket.OPEN) return; // connecting: nothing heard yet
    if (quietMs >= quietAfterMs()) {
      S.quiet = quietMs / 1000;
      const el = $("conn");
      el.textContent = "no data";
      el.className = "badge off";
      showState();
    }
  }

  function setConn(live) {
    const el = $("conn");
    el.textContent = live ? "live" : "disconnected";
    el.className = "badge " + (live ? "live" : "off");
  }

  // ------------------------------------------------------------ JSON messages
  function onJson(m) {
    switch (m.type) {
      case "hello": // first, and again when the service restarted: nothing of before is live
        clearImage();
        S.config = m.config;
        S.points = m.points || [];
        S.events = m.events || [];
        S.grains = m.grains || null;
        S.offline = false;
        $("source").textContent = `${m.config.source} · livemask ${m.config.version}`;
        setSummary(m.summary, m.frame_id);
        setStatus(m.status || null, m.rates, null, m.silent_s, m.waiting_s);
        renderEvents();
        break;
      case "update":
        for (const p of m.points) S.points.push(p);
        if (S.points.length > MAX_POINTS) S.points.splice(0, S.points.length - MAX_POINTS);
        if ("grains" in m) S.grains = m.grains;
        setSummary(m.summary, m.frame_id);
        break;
      case "status":
        setStatus(m.status, m.rates, m.dashboard, m.silent_s, m.waiting_s);
        break;
      case "alive": // the server's keep-alive (lastDataAt is set)
        break;
      case "image": // an image of m.bytes comes next: give it time over a slow link
        incoming = { bytes: m.bytes, at: performance.now() };
        break;
      case "event":
        S.events.push(m.event);
        if (S.events.length > MAX_EVENTS) S.events.splice(0, S.events.length - MAX_EVENTS);
        renderEvents();
        break;
      default:
        break; // a later server may send more types
    }
    if (m.type === "hello" || m.type === "update") { S.dirty = true; schedule(); }
  }

  function setSummary(summary, frameId) {
    S.summary = summary;
    const known = frameId !== null && frameId !== undefined;
    if (summary && summary.count !== undefined && summary.count !== null) {
      $("count").textContent = String(summary.count);
      // the image may show an older frame than the newest measured one: say whose count
      $("count-label").textContent = known ? `objects in frame ${frameId}` : "objects";
    } else if (!summary) { // none yet (e.g. the service restarted): no count of before
      $("count").textContent = "–";
      $("count-label").textContent = "objects";
    }
    if (known) $("count").dataset.frameId = frameId;
    else delete $("count").dataset.frameId;
  }

  // ------------------------------------------------------------ images
  let imageData = null;
  function clearImage() {
    S.image = null;
    S.imageDirty = false;
    const canvas = $("frame");
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    $("frame-id").textContent = "–";
    $("frame-meta").textContent = "waiting for a frame…";
  }
  function onImage(buf) {
    const u8 = new Uint8Array(buf);
    if (u8[0] !== 76 || u8[1] !== 77 || u8[2] !== 68 || u8[3] !== 49) return; // "LMD1"
    const n = new DataView(buf).getUint32(4, true);
    const head = JSON.parse(new TextDecoder().decode(u8.subarray(8, 8 + n)));
    const w = head.width, h = head.height, npx = w * h;
    const grey = u8.subarray(8 + n, 8 + n + npx);
    const bits = head.outline ? u8.subarray(8 + n + npx, 8 + n + npx + Math.ceil(npx / 8)) : null;
    S.image = { head, grey, bits };
    S.imageDirty = true; // drawn in the next animation frame (only the newest, if several came)
    schedule();
    const now = performance.now();
    const st = window.livemaskStats; // counters for tests and benchmarks
    st.images += 1;
    if (st.firstImageAt === null) st.firstImageAt = now;
    st.lastImageAt = now;
    S.shown.push(now);
    while (S.shown.length && now - S.shown[0] > 2000) S.shown.shift();
    $("frame-id").textContent = head.frame_id === null ? "–" : String(head.frame_id);
    const idx = head.index ? Object.entries(head.index).map(([k, v]) => `${k}=${v}`).join(" ") : "";
    const src = head.source_shape ? `${head.source_shape[1]}×${head.source_shape[0]}` : "?";
    $("frame-meta").textContent =
      `frame ${head.frame_id} ${idx} · ${src} shown at ${w}×${h}` +
      (head.step > 1 ? ` (every ${head.step}th px)` : "") +
      ` · grey ${fmt(head.stretch[0])}–${fmt(head.stretch[1])} ADU` +
      (head.skipped ? " · skipped analysis (no outlines)" : head.outline ? "" : " · no labels");
  }

  function drawImage() {
    if (!S.image) return;
    const { head, grey, bits } = S.image;
    const canvas = $("frame");
    const w = head.width, h = head.height, npx = w * h;
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    const ctx = canvas.getContext("2d");
    if (!imageData || imageData.width !== w || imageData.height !== h) {
      imageData = ctx.createImageData(w, h);
    }
    const px = new Uint32Array(imageData.data.buffer);
    for (let i = 0; i < npx; i++) {
      const g = grey[i];
      px[i] = 0xff000000 | (g << 16) | (g << 8) | g;
    }
    if (bits && $("show-outlines").checked) {
      for (let b = 0; b < bits.length; b++) {
        const v = bits[b];
        if (v === 0) continue;
        const base = b << 3;
        for (let k = 0; k < 8; k++) {
          if (v & (0x80 >> k) && base + k < npx) px[base + k] = OUTLINE_RGBA;
        }
      }
    }
    ctx.putImageData(imageData, 0, 0);
  }

  // ------------------------------------------------------------ status and events
  // sizes are in the units the service publishes (status units): px where the pixel size is
  // not calibrated (its µm values are then pixel values)
  function lengthUnit() { return (S.status && S.status.length_unit) || "µm"; }
  function areaUnit() { return (S.status && S.status.area_unit) || "µm²"; }
  function calibrated() { return lengthUnit() !== "px"; }

  function setStatus(st, rates, dash, silent, waiting) {
    const units = `${lengthUnit()} ${areaUnit()}`;
    S.status = st; S.rates = rates || {}; if (dash) S.dashboard = dash;
    if (`${lengthUnit()} ${areaUnit()}` !== units) { S.dirty = true; schedule(); } // titles
    S.silent = silent === undefined ? null : silent;
    S.waiting = waiting === undefined ? null : waiting;
    showState();
    if (!st) return;
    // (while the service starts its status has no backend and no frame counts yet)
    const backend = st.backend ?? "loading", device = st.device ?? "–";
    $("model").textContent = `${st.model} · ${backend} (${device}) · ${st.mode}`;
    const q = st.queues || {};
    const rows = [
      ["state", `${st.state}${st.acquiring ? " (acquiring)" : ""}, ${st.mode}`],
      ["fps acquired / analysed",
       `${fmt(S.rates.acquired_fps, 1)} / ${fmt(S.rates.analysed_fps, 1)}`],
      ["frames acquired", st.frames_acquired ?? "–"],
      ["analysed / skipped / failed",
       `${st.frames_analysed ?? "–"} / ${st.frames_skipped ?? "–"} / ${st.frames_failed ?? "–"}`],
      ["queues infer / analyse / publish", `${q.infer ?? "–"} / ${q.analyse ?? "–"} / ${q.publish ?? "–"}`],
      ["model", `${st.model} (${backend}, ${device})`],
      ["pixel size", calibrated() ? `${fmt(st.pixel_size_um)} µm`
        : "not calibrated (sizes in px)"],
      ["uptime", `${fmt(st.uptime_s, 0)} s`],
    ];
    if (st.feedback) {
      rows.push(["feedback actions / refused", `${st.feedback.actions} / ${st.feedback.refused}`]);
    }
    if (S.dashboard) {
      const d = S.dashboard;
      rows.push(["dashboard", `${d.browsers} browser(s), ${d.images_encoded} images, ` +
                 `${fmt(d.encode_ms_p50, 1)} ms each`]);
      // PUB drops for a slow subscriber without telling the service: seen here as seq gaps
      rows.push(["messages missed (seq gaps)", sumValues(d.gaps)]);
    }
    if (st.last_error) rows.push(["last error", st.last_error]);
    fillKv($("status"), rows);
    const lat = st.latency_ms || {};
    const table = $("latency");
    table.replaceChildren();
    const head = table.insertRow();
    for (const t of ["latency ms", "p50", "p95", "p99"]) {
      const th = document.createElement("th"); th.textContent = t; head.appendChild(th);
    }
    for (const span of ["infer", "analyse", "publish", "end_to_end"]) {
      const v = lat[span] || {};
      const row = table.insertRow();
      for (const t of [span.replaceAll("_", " "), fmt(v.p50, 1), fmt(v.p95, 1), fmt(v.p99, 1)]) {
        row.insertCell().textContent = t;
      }
    }
  }

  // the state badge, the frame rate and the greying out: stale while the server is gone,
  // says nothing (quiet) or the service is silent
  function showState() {
    const st = S.status;
    const stale = S.offline ? "service unreachable"
      : S.quiet !== null ? `no data from the dashboard for ${S.quiet.toFixed(0)} s`
      : S.silent !== null ? `no status for ${S.silent.toFixed(0)} s`
      : S.waiting !== null ? `no status from ${S.config ? S.config.source : "the service"} ` +
        `yet (${S.waiting.toFixed(0)} s)` : null;
    document.body.classList.toggle("stale", stale !== null);
    const state = $("state");
    if (stale !== null) {  // no status for a while, or no server: the service may be gone
      state.textContent = stale;
      state.className = "badge stale";
    } else {
      state.textContent = !st ? "–" : st.acquiring ? "acquiring" : st.state;
      state.className = "badge" + (st && st.acquiring ? " running" : "");
    }
    // rates are null while the service is silent, and not live while the server is quiet
    const fps = stale === null ? S.rates.analysed_fps : null;
    $("fps").textContent = fps === null || fps === undefined ? "–" : fps.toFixed(1);
  }

  function renderEvents() {
    const list = $("events");
    list.replaceChildren();
    for (let i = S.events.length - 1; i >= 0 && i >= S.events.length - 50; i--) {
      const ev = S.events[i];
      const li = document.createElement("li");
      li.className = ev.level || "info";
      const time = document.createElement("span");
      time.className = "muted";
      time.textContent = new Date(ev.t * 1000).toLocaleTimeString();
      const kind = document.createElement("span");
      kind.className = "kind";
      kind.textContent = ev.kind;
      const text = document.createElement("span");
      text.textContent = ev.text;
      li.append(time, kind, text);
      list.appendChild(li);
    }
  }

  function fillKv(table, rows) {
    table.replaceChildren();
    for (const [k, v] of rows) {
      const row = table.insertRow();
      row.insertCell().textContent = k;
      row.insertCell().textContent = v === null || v === undefined ? "–" : String(v);
    }
  }

  // ------------------------------------------------------------ plots
  function fmt(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (digits !== undefined) return Number(v).toFixed(digits);
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    if (a >= 1000) return Number(v).toFixed(0);
    if (a >= 10) return Number(v).toFixed(1);
    return Number(v).toPrecision(3);
  }

  function sumValues(obj) {
    return obj ? Object.values(obj).reduce((a, b) => a + b, 0) : 0;
  }

  function niceTicks(lo, hi, n) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / n;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((f) => f * mag).find((s) => s >= raw) || 10 * mag;
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(v);
    return ticks;
  }

  function prepare(canvas) {
    const dpr = window.devicePixelRatio || 1;
    const cw = Math.max(50, canvas.clientWidth), ch = Math.max(40, canvas.clientHeight);
    const w = Math.round(cw * dpr), h = Math.round(ch * dpr);
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cw, ch);
    ctx.font = "11px system-ui, sans-serif";
    return { ctx, w: cw, h: ch };
  }

  // a series per stream (position, channel, plane: the point's 6th item), told apart by dashes
  const DASHES = [[], [5, 3], [1.5, 2.5], [8, 3, 2, 3]];

  function drawSeries(canvas, col, color, title) {
    const { ctx, w, h } = prepare(canvas);
    const L = 46, R = 8, T = 16, B = 16;
    const pts = S.points;
    const tLast = pts.length ? pts[pts.length - 1][1] : 0;
    const xs = [], ys = [], streams = new Map();
    for (const p of pts) {
      const x = p[1] - tLast;
      if (x < -PLOT_WINDOW_S || p[col] === null || p[col] === undefined) continue;
      xs.push(x); ys.push(p[col]);
      const key = p[5] || "";
      if (!streams.has(key)) streams.set(key, []);
      streams.get(key).push(xs.length - 1);
    }
    ctx.fillStyle = COLORS.axis;
    ctx.fillText(streams.size > 1 ? `${title} (${streams.size} series)` : title, L, 11);
    window.livemaskStats.series = streams.size;
    const last = ys.length ? ys[ys.length - 1] : null;
    ctx.textAlign = "right";
    ctx.fillStyle = color;
    ctx.fillText(last === null ? "no data" : fmt(last), w - R, 11);
    ctx.textAlign = "left";
    if (!ys.length) return;
    let ylo = Math.min(...ys), yhi = Math.max(...ys);
    if (ylo === yhi) { ylo -= 1; yhi += 1; }
    const pad = (yhi - ylo) * 0.08; ylo -= pad; yhi += pad;
    if (ylo < 0 && Math.min(...ys) >= 0) ylo = 0;
    const xlo = Math.min(-10, xs[0]), xhi = 0;
    const X = (x) => L + (x - xlo) / (xhi - xlo) * (w - L - R);
    const Y = (y) => T + (1 - (y - ylo) / (yhi - ylo)) * (h - T - B);
    ctx.strokeStyle = COLORS.grid; ctx.fillStyle = COLORS.axis; ctx.lineWidth = 1;
    ctx.textAlign = "right";
    const yt = niceTicks(ylo, yhi, 3);
    const yd = yt.length > 1 ? Math.max(0, -Math.floor(Math.log10(yt[1] - yt[0]) + 1e-9)) : 0;
    for (const v of yt) {
      ctx.beginPath(); ctx.moveTo(L, Y(v) + 0.5); ctx.lineTo(w - R, Y(v) + 0.5); ctx.stroke();
      ctx.fillText(v.toFixed(yd), L - 4, Y(v) + 4);
    }
    ctx.textAlign = "center";
    for (const v of niceTicks(xlo, xhi, 5)) ctx.fillText(`${fmt(v, 0)} s`, X(v), h - 3);
    ctx.textAlign = "left";
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 1.5;
    let k = 0;
    for (const idx of streams.values()) {
      ctx.setLineDash(DASHES[k % DASHES.length]);
      ctx.beginPath();
      idx.forEach((i, n) => {
        if (n === 0) ctx.moveTo(X(xs[i]), Y(ys[i])); else ctx.lineTo(X(xs[i]), Y(ys[i]));
      });
      ctx.stroke();
      if (idx.length === 1) ctx.fillRect(X(xs[idx[0]]) - 2, Y(ys[idx[0]]) - 2, 4, 4);
      k++;
    }
    ctx.setLineDash([]);
    if (streams.size < 2) return;
    // labels at the newest points of the (at most 8) most recently imaged series, where
    // those are in view past the axis ("t": the frames indexed by time alone)
    const newest = [...streams].map(([key, idx]) => [key, idx[idx.length - 1]])
      .sort((a, b) => xs[b[1]] - xs[a[1]]).slice(0, 8);
    ctx.textAlign = "right";
    for (const [key, i] of newest) {
      const x = X(xs[i]) - 3;
      if (x > L + 40) ctx.fillText(key || "t", x, Y(ys[i]) - 3);
    }
    ctx.textAlign = "left";
  }

  function drawHistogram(canvas, grains) {
    const { ctx, w, h } = prepare(canvas);
    const L = 40, R = 8, T = 16, B = 18;
    const cum = grains.cumulative || grains.tile;
    const tile = grains.tile;
    const edges = cum.histogram.edges_um, counts = cum.histogram.counts;
    const tcounts = tile ? tile.histogram.counts : null;
    let first = counts.findIndex((c) => c > 0), last = counts.length - 1;
    while (last >= 0 && counts[last] === 0) last--;
    ctx.fillStyle = COLORS.axis;
    ctx.fillText(`equivalent diameter (${lengthUnit()}), inside grains`, L, 11);
    if (first < 0) { ctx.fillText("no grains yet", L, h / 2); return; }
    first = Math.max(0, first - 1); last = Math.min(counts.length - 1, last + 1);
    const lx0 = Math.log10(edges[first]), lx1 = Math.log10(edges[last + 1]);
    const X = (e) => L + (Math.log10(e) - lx0) / (lx1 - lx0) * (w - L - R);
    const total = counts.reduce((a, b) => a + b, 0);
    const tileTotal = tcounts ? tcounts.reduce((a, b) => a + b, 0) : 0;
    let fmax = 0;
    for (let i = first; i <= last; i++) {
      fmax = Math.max(fmax, counts[i] / total, tileTotal ? tcounts[i] / tileTotal : 0);
    }
    const Y = (f) => T + (1 - f / (fmax * 1.05)) * (h - T - B);
    ctx.fillStyle = COLORS.hist;
    for (let i = first; i <= last; i++) {
      const x0 = X(edges[i]), x1 = X(edges[i + 1]);
      ctx.fillRect(x0 + 0.5, Y(counts[i] / total), Math.max(1, x1 - x0 - 1), Y(0) - Y(counts[i] / total));
    }
    if (tileTotal) {
      ctx.strokeStyle = COLORS.tile; ctx.lineWidth = 1.5; ctx.beginPath();
      ctx.moveTo(X(edges[first]), Y(0));
      for (let i = first; i <= last; i++) {
        const y = Y(tcounts[i] / tileTotal);
        ctx.lineTo(X(edges[i]), y); ctx.lineTo(X(edges[i + 1]), y);
      }
      ctx.lineTo(X(edges[last + 1]), Y(0)); ctx.stroke();
    }
    ctx.strokeStyle = COLORS.grid; ctx.beginPath(); ctx.moveTo(L, Y(0) + 0.5); ctx.lineTo(w - R, Y(0) + 0.5); ctx.stroke();
    ctx.fillStyle = COLORS.axis; ctx.textAlign = "center";
    const every = Math.max(1, Math.ceil((last - first + 2) / 6));
    for (let i = first; i <= last + 1; i += every) {
      const x = Math.min(Math.max(X(edges[i]), L + 10), w - R - 12);
      ctx.fillText(Number(edges[i].toPrecision(2)).toString(), x, h - 4);
    }
    ctx.textAlign = "right";
    ctx.fillText(`${fmt(fmax * 100, 0)}%`, L - 4, T + 8);
    ctx.fillText("0", L - 4, Y(0));
    ctx.textAlign = "left";
    ctx.textAlign = "right";
    ctx.fillStyle = COLORS.tile; ctx.fillText("— this tile", w - R, 11);
    ctx.fillStyle = COLORS.hist; ctx.fillText("■ all tiles", w - R - 70, 11);
    ctx.textAlign = "left";
  }

  function renderGrains() {
    const panel = $("grains-panel");
    const g = S.grains;
    panel.hidden = !g;
    if (!g) return;
    drawHistogram($("plot-hist"), g);
    const c = g.cumulative || {}, t = g.tile || {};
    const ci = (v) => (v ? ` (95% ${fmt(v[0])}–${fmt(v[1])})` : "");
    // G needs a real length scale: the service publishes none without a pixel size
    const G = (v) => (v === null && !calibrated() ? "– (no pixel size)" : fmt(v, 2));
    const len = lengthUnit(), area = areaUnit();
    const skipped = c.tiles_skipped ? ` (${c.tiles_skipped} skipped analysis: not in the statistics)` : "";
    fillKv($("astm"), [
      ["ASTM G planimetric (all tiles)", `${G(c.astm_g_planimetric)}${ci(c.astm_g_planimetric_ci95)}`],
      ["ASTM G intercept (all tiles)", G(c.astm_g_intercept)],
      ["ASTM G planimetric (this tile)", G(t.astm_g_planimetric)],
      ["tiles", `${c.tiles ?? "–"}${skipped}`],
      ["grains (inside / cut by edge)", `${c.count_inside ?? "–"} / ${c.count_edge ?? "–"}`],
      ["mean equivalent diameter", `${fmt(c.mean_equivalent_diameter_um)} ${len}${ci(c.mean_equivalent_diameter_ci95_um)}`],
      ["mean area", `${fmt(c.mean_area_um2)} ${area}`],
      ["mean intercept", `${fmt(c.mean_intercept_um)} ${len}`],
    ]);
  }

  // Drawing happens in animation frames, only for what changed: a browser that draws
  // nothing when nothing changed leaves the CPU to the acquisition PC's pipeline.
  let scheduled = false;
  function schedule() {
    if (!scheduled) { scheduled = true; requestAnimationFrame(render); }
  }

  function render() {
    scheduled = false;
    if (S.imageDirty) { S.imageDirty = false; drawImage(); }
    if (S.dirty) {
      S.dirty = false;
      drawSeries($("plot-count"), 2, COLORS.count, "object count");
      drawSeries($("plot-area"), 3, COLORS.area, `mean area (${areaUnit()})`);
      drawSeries($("plot-intensity"), 4, COLORS.intensity, "mean intensity (ADU)");
      renderGrains();
    }
  }

  setInterval(() => {
    const now = performance.now();
    while (S.shown.length && now - S.shown[0] > 2000) S.shown.shift();
    const text = (S.shown.length / 2).toFixed(1);
    if ($("view-fps").textContent !== text) $("view-fps").textContent = text;
    checkQuiet();
  }, 1000);
  $("show-outlines").addEventListener("change", () => { S.imageDirty = true; schedule(); });
  $("show-image").addEventListener("change", sendView);
  document.addEventListener("visibilitychange", sendView);
  window.addEventListener("resize", () => { S.dirty = true; schedule(); });
  connect();
})();
