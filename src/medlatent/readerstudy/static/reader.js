// medlatent reader study: one pair at a time, original left, reconstruction right.
// The token comes from the link (/r/TOKEN) and goes with every API call as a bearer token.
// Images arrive as raw 16-bit values linear in the original's intensity units; window/level is applied here.
"use strict";

const token = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");
const $ = (id) => document.getElementById(id);
const canvases = [$("left"), $("right")];

const S = {
  me: null, item: null, scores: {}, active: 0, editing: true, shownAt: 0, busy: false,
  images: [null, null],            // {rows, cols, data: Uint16Array, canvas: offscreen}
  view: { zoom: 1, cx: 0, cy: 0 }, // shared by both canvases: synchronised zoom and pan
  win: { center: 0, width: 1 },    // window in original intensity units, shared
};

async function api(path, opts = {}) {
  const res = await fetch(path, {
    ...opts,
    headers: { Authorization: "Bearer " + token, "Content-Type": "application/json", ...(opts.headers || {}) },
  });
  if (!res.ok) {
    let detail = res.statusText;
    try { const j = await res.json(); detail = typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail); } catch (e) { /* not JSON */ }
    const err = new Error(detail); err.status = res.status; throw err;
  }
  return res;
}

function status(msg) { $("status").textContent = msg || ""; }

function fail(msg) {
  $("study").hidden = true;
  $("error").hidden = false;
  $("error").textContent = msg;
}

// ------------------------------------------------------------------ rendering
function range() { return S.item.range; }

function applyWindow() {
  const [lo, hi] = range();
  const c = S.win.center, w = Math.max(S.win.width, 1e-12);
  // 65536-entry lookup table: stored value → display grey
  const lut = new Uint8ClampedArray(65536);
  const step = (hi - lo) / 65535;
  for (let v = 0; v < 65536; v++) lut[v] = ((lo + v * step - (c - w / 2)) / w) * 255;
  for (const im of S.images) {
    if (!im) continue;
    const ctx = im.canvas.getContext("2d");
    const out = ctx.createImageData(im.cols, im.rows);
    const px = out.data, d = im.data;
    for (let i = 0, j = 0; i < d.length; i++, j += 4) {
      const g = lut[d[i]];
      px[j] = g; px[j + 1] = g; px[j + 2] = g; px[j + 3] = 255;
    }
    ctx.putImageData(out, 0, 0);
  }
  const lv = $("level"), wd = $("width");
  lv.value = c; wd.value = w;
  $("wl").textContent = `W ${fmt(w)} / L ${fmt(c)}`;
  draw();
}

function fmt(x) { return Math.abs(x) >= 100 ? x.toFixed(0) : x.toPrecision(3); }

function fitScale(cv) {
  const im = S.images[0];
  return Math.min(cv.width / im.cols, cv.height / im.rows);
}

function draw() {
  for (let k = 0; k < 2; k++) {
    const cv = canvases[k], im = S.images[k];
    const r = cv.getBoundingClientRect();
    if (cv.width !== Math.round(r.width) || cv.height !== Math.round(r.height)) {
      cv.width = Math.round(r.width); cv.height = Math.round(r.height);
    }
    const ctx = cv.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000"; ctx.fillRect(0, 0, cv.width, cv.height);
    if (!im) continue;
    const s = fitScale(cv) * S.view.zoom;
    ctx.imageSmoothingEnabled = s < 1;
    ctx.setTransform(s, 0, 0, s, cv.width / 2 - S.view.cx * s, cv.height / 2 - S.view.cy * s);
    ctx.drawImage(im.canvas, 0, 0);
    cv.dataset.zoom = S.view.zoom.toFixed(4);
    cv.dataset.cx = S.view.cx.toFixed(2);
    cv.dataset.cy = S.view.cy.toFixed(2);
    cv.dataset.wc = S.win.center.toPrecision(6);
    cv.dataset.ww = S.win.width.toPrecision(6);
  }
}

function resetView() {
  const im = S.images[0];
  S.view = { zoom: 1, cx: im.cols / 2, cy: im.rows / 2 };
  S.win = { ...S.item.window };
  const [lo, hi] = range(), span = hi - lo || 1;
  Object.assign($("level"), { min: lo - span / 2, max: hi + span / 2 });
  Object.assign($("width"), { min: span / 1000, max: span * 2 });
  applyWindow();
}

function zoomAt(cv, mx, my, factor) {
  const s = fitScale(cv) * S.view.zoom;
  const ix = (mx - cv.width / 2) / s + S.view.cx, iy = (my - cv.height / 2) / s + S.view.cy;
  S.view.zoom = Math.min(64, Math.max(0.25, S.view.zoom * factor));
  const s2 = fitScale(cv) * S.view.zoom;
  S.view.cx = ix - (mx - cv.width / 2) / s2;
  S.view.cy = iy - (my - cv.height / 2) / s2;
  draw();
}

for (const cv of canvases) {
  cv.addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = cv.getBoundingClientRect();
    zoomAt(cv, e.clientX - r.left, e.clientY - r.top, Math.exp(-e.deltaY * 0.0015));
  }, { passive: false });
  cv.addEventListener("contextmenu", (e) => e.preventDefault());
  cv.addEventListener("pointerdown", (e) => {
    const windowing = e.button === 2 || e.shiftKey;
    let x0 = e.clientX, y0 = e.clientY;
    cv.setPointerCapture(e.pointerId);
    const move = (ev) => {
      const dx = ev.clientX - x0, dy = ev.clientY - y0;
      x0 = ev.clientX; y0 = ev.clientY;
      if (windowing) { // horizontal: width, vertical: level (as in PACS viewers)
        const span = range()[1] - range()[0] || 1;
        S.win.width = Math.max(span / 1000, S.win.width * Math.exp(dx * 0.005));
        S.win.center += dy * span * 0.002;
        applyWindow();
      } else {
        const s = fitScale(cv) * S.view.zoom;
        S.view.cx -= dx / s; S.view.cy -= dy / s;
        draw();
      }
    };
    const up = () => { cv.removeEventListener("pointermove", move); cv.removeEventListener("pointerup", up); };
    cv.addEventListener("pointermove", move);
    cv.addEventListener("pointerup", up);
  });
}
$("level").addEventListener("input", (e) => { S.win.center = parseFloat(e.target.value); applyWindow(); });
$("width").addEventListener("input", (e) => { S.win.width = parseFloat(e.target.value); applyWindow(); });
$("reset").addEventListener("click", resetView);
window.addEventListener("resize", draw);

// ------------------------------------------------------------------ questions
function buildQuestions() {
  const box = $("questions");
  box.innerHTML = "";
  S.me.questions.forEach((q, i) => {
    const row = document.createElement("div");
    row.className = "question"; row.dataset.q = q.key;
    row.setAttribute("data-testid", "q-" + q.key);
    const p = document.createElement("span"); p.className = "prompt"; p.textContent = `${i + 1}. ${q.prompt}`;
    row.appendChild(p);
    for (const sc of S.me.scores) {
      const b = document.createElement("button");
      b.textContent = `${sc.value > 0 ? "+" : ""}${sc.value} ${sc.label}`;
      b.dataset.value = sc.value;
      b.setAttribute("data-testid", `score-${q.key}-${sc.value}`);
      b.addEventListener("click", () => { setScore(i, sc.value); });
      row.appendChild(b);
    }
    row.addEventListener("click", () => { S.active = i; renderQuestions(); });
    box.appendChild(row);
  });
}

function setScore(i, value) {
  if (!S.editing) { status("This pair is answered. Use “Revise answer” to change it."); return; }
  S.scores[S.me.questions[i].key] = value;
  S.active = Math.min(i + 1, S.me.questions.length - 1);
  status("");
  renderQuestions();
}

function complete() { return S.me.questions.every((q) => Number.isInteger(S.scores[q.key])); }

function renderQuestions() {
  document.querySelectorAll(".question").forEach((row, i) => {
    row.classList.toggle("active", i === S.active);
    row.querySelectorAll("button").forEach((b) => {
      b.classList.toggle("selected", S.scores[row.dataset.q] === Number(b.dataset.value));
      b.disabled = !S.editing;
    });
  });
  const answered = !!S.item.answer;
  $("save").disabled = !S.editing || !complete() || S.busy;
  $("save").textContent = answered ? "Save revision" : "Save & next";
  $("revise").hidden = !answered || S.editing || !S.me.allow_revision;
  $("prev").disabled = S.item.position <= 1;
  $("next").disabled = S.item.position >= S.item.total;
  $("finish").hidden = S.me.answered < S.me.total;
}

function renderProgress() {
  $("reader").textContent = S.me.reader;
  $("bar").max = S.me.total; $("bar").value = S.me.answered;
  $("progress").textContent = `${S.me.answered} / ${S.me.total} answered`;
  if (S.item) $("pos").textContent = `Pair ${S.item.position} of ${S.item.total}`;
}

// ------------------------------------------------------------------ navigation and saving
async function loadImage(id) {
  const res = await api(`/api/images/${id}`);
  const rows = +res.headers.get("X-Rows"), cols = +res.headers.get("X-Cols");
  const data = new Uint16Array(await res.arrayBuffer());
  const canvas = document.createElement("canvas");
  canvas.width = cols; canvas.height = rows;
  return { rows, cols, data, canvas };
}

async function show(position) {
  S.busy = true;
  try {
    const item = await (await api(`/api/items/${position}`)).json();
    const imgs = await Promise.all([loadImage(item.left.image_id), loadImage(item.right.image_id)]);
    S.item = item; S.images = imgs;
    S.scores = item.answer ? Object.fromEntries(S.me.questions.map((q) => [q.key, item.answer[q.key]])) : {};
    S.editing = !item.answer;
    S.active = 0; S.shownAt = performance.now();
    history.replaceState(null, "", location.pathname + "#" + position);
    resetView();
    renderProgress();
  } catch (e) {
    status(`Could not load pair ${position}: ${e.message}`);
  } finally {
    S.busy = false;
    if (S.item) renderQuestions();
  }
}

async function refreshMe() { S.me = await (await api("/api/me")).json(); renderProgress(); }

async function save() {
  if (!S.editing || !complete() || S.busy) return;
  S.busy = true; renderQuestions();
  const body = Object.fromEntries(S.me.questions.map((q) => [q.key, S.scores[q.key]]));
  const revising = !!S.item.answer;
  let next = null;
  try {
    if (revising) {
      await api(`/api/answers/${S.item.pair_id}`, { method: "PUT", body: JSON.stringify(body) });
    } else {
      body.pair_id = S.item.pair_id;
      body.seconds = Math.round((performance.now() - S.shownAt) / 100) / 10;
      const r = await (await api("/api/answers", { method: "POST", body: JSON.stringify(body) })).json();
      next = r.next_position;
    }
    await refreshMe();
    status(revising ? "Revision saved." : "Saved.");
  } catch (e) {
    status(`Not saved: ${e.message}`);
    S.busy = false; renderQuestions();
    return;
  }
  S.busy = false;
  if (revising) { S.item.answer = body; S.editing = false; renderQuestions(); return; }
  if (next) await show(next);
  else { S.item.answer = body; S.editing = false; renderQuestions(); status("All pairs answered. Review them or finish the study."); }
}

async function finish() {
  try {
    await api("/api/finish", { method: "POST" });
    $("study").hidden = true; $("done").hidden = false;
  } catch (e) { status(`Cannot finish: ${e.message}`); }
}

$("save").addEventListener("click", save);
$("finish").addEventListener("click", finish);
$("prev").addEventListener("click", () => S.item.position > 1 && show(S.item.position - 1));
$("next").addEventListener("click", () => S.item.position < S.item.total && show(S.item.position + 1));
$("revise").addEventListener("click", () => { S.editing = true; status("Revising: change the scores and save."); renderQuestions(); });

document.addEventListener("keydown", (e) => {
  if (!S.item || $("study").hidden || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.target instanceof HTMLInputElement) return; // sliders keep their own keys
  const n = S.me.questions.length;
  if (e.key >= "1" && e.key <= "5") { setScore(S.active, S.me.scores[+e.key - 1].value); }
  else if (e.key === "ArrowDown") { S.active = (S.active + 1) % n; renderQuestions(); }
  else if (e.key === "ArrowUp") { S.active = (S.active + n - 1) % n; renderQuestions(); }
  else if (e.key === "Enter") { save(); }
  else if (e.key === "ArrowLeft") { if (S.item.position > 1) show(S.item.position - 1); }
  else if (e.key === "ArrowRight") { if (S.item.position < S.item.total) show(S.item.position + 1); }
  else if (e.key === "r" || e.key === "R") { resetView(); }
  else return;
  e.preventDefault();
});

// ------------------------------------------------------------------ start: resume where the reader left off
(async () => {
  try {
    await refreshMe();
  } catch (e) { fail(`This link does not open a study (${e.message}).`); return; }
  $("title").textContent = S.me.title || "Reader study";
  if (S.me.locked) { $("done").hidden = false; return; }
  $("study").hidden = false;
  buildQuestions();
  const fromHash = parseInt(location.hash.slice(1), 10);
  const start = S.me.next_position || (fromHash >= 1 && fromHash <= S.me.total ? fromHash : 1);
  await show(start);
  if (!S.me.next_position) status("All pairs answered. Review them or finish the study.");
})();
