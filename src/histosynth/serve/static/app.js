// histosynth serve: the page. Vanilla JS, no dependencies; every request goes to this server only.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null, side: 256, base: null, nuclei: [], maskId: null, shape: 0,
  drag: null, maskPicture: null, inFlight: false, again: false, painted: 0,
};

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
  document.body.dataset.error = message;
}

function clearError() {
  $("error").hidden = true;
  delete document.body.dataset.error;
}

async function call(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error(`the server did not answer (${err.message})`);
  }
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

function postJSON(url, payload) {
  return call(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload) });
}

function checkpoint() {
  return state.info.checkpoints.find((c) => c.name === $("checkpoint").value) || state.info.checkpoints[0];
}

function fillSelect(select, values, keep) {
  const old = keep ? select.value : null;
  select.innerHTML = "";
  for (const [value, text] of values) {
    const opt = document.createElement("option");
    opt.value = value;
    opt.textContent = text;
    select.appendChild(opt);
  }
  if (old !== null && values.some(([v]) => String(v) === old)) select.value = old;
}

function fillCheckpointChoices() {
  const c = checkpoint();
  fillSelect($("style"), c.styles.map((s) => [s, s]), true);
  fillSelect($("side"), c.sides.map((s) => [s, String(s)]), true);
}

// -- the drawing surface ---------------------------------------------------------------------------------
function canvasPoint(event) {
  const canvas = $("canvas");
  const r = canvas.getBoundingClientRect();
  return [(event.clientX - r.left) * canvas.width / r.width, (event.clientY - r.top) * canvas.height / r.height];
}

function redraw() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (state.maskPicture) ctx.drawImage(state.maskPicture, 0, 0, canvas.width, canvas.height);
  if (state.drag) {
    const [x0, y0] = state.drag.start;
    const [x1, y1] = state.drag.end;
    ctx.strokeStyle = "#e07b00";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    ctx.ellipse((x0 + x1) / 2, (y0 + y1) / 2, Math.max(1, Math.abs(x1 - x0) / 2), Math.max(1, Math.abs(y1 - y0) / 2), 0, 0, 2 * Math.PI);
    ctx.stroke();
  }
}

function setSide(side) {
  state.side = side;
  $("canvas").width = side;
  $("canvas").height = side;
  $("image").width = side; $("image").height = side;
  $("overlay").width = side; $("overlay").height = side;
}

function addNucleus(start, end) {
  const type = parseInt($("type").value, 10);
  const r = parseFloat($("radius").value);
  const tool = document.querySelector("input[name=tool]:checked").value;
  const [x0, y0] = start;
  const [x1, y1] = end;
  const moved = Math.hypot(x1 - x0, y1 - y0) >= 3;
  if (tool === "shape" && state.info.shapes.length) {
    state.nuclei.push({ kind: "shape", shape: state.shape, cx: x1, cy: y1, r, angle: 0, type });
  } else if (moved) {
    state.nuclei.push({ kind: "ellipse", cx: (x0 + x1) / 2, cy: (y0 + y1) / 2, rx: Math.max(1, Math.abs(x1 - x0) / 2),
      ry: Math.max(1, Math.abs(y1 - y0) / 2), angle: 0, type });
  } else {
    state.nuclei.push({ kind: "ellipse", cx: x0, cy: y0, rx: r, ry: r * 0.8, angle: 0, type });
  }
  paint();
}

function bindCanvas() {
  const canvas = $("canvas");
  canvas.addEventListener("mousedown", (e) => {
    const p = canvasPoint(e);
    state.drag = { start: p, end: p };
    e.preventDefault();
  });
  canvas.addEventListener("mousemove", (e) => {
    if (!state.drag) return;
    state.drag.end = canvasPoint(e);
    redraw();
  });
  window.addEventListener("mouseup", (e) => {
    if (!state.drag) return;
    const { start } = state.drag;
    const end = canvasPoint(e);
    state.drag = null;
    redraw();
    addNucleus(start, end);
  });
}

// -- requests ---------------------------------------------------------------------------------------------
function setBusy(busy) {
  document.body.dataset.busy = busy ? "1" : "0";
}

async function paint() {
  if (state.inFlight) { state.again = true; return; }
  state.inFlight = true;
  setBusy(true);
  const started = performance.now();
  try {
    const out = await postJSON("/api/paint", {
      side: state.side, base: state.base, nuclei: state.nuclei, style: $("style").value,
      checkpoint: $("checkpoint").value, seed: parseInt($("seed").value, 10) || 0,
    });
    state.maskId = out.mask_id;
    const picture = new Image();
    picture.onload = () => { state.maskPicture = picture; redraw(); };
    picture.src = out.mask;
    $("image").src = out.image;
    $("overlay").src = out.overlay;
    const ms = Math.round(performance.now() - started);
    $("status").textContent = `${out.n_nuclei} nuclei (${out.origin}) painted in style “${out.style}” by ${out.checkpoint} ` +
      `(${out.generator}, step ${out.step}, seed ${out.seed}) of run ${out.run} — ${ms} ms`;
    const q = new URLSearchParams({ mask: out.mask_id, style: out.style, checkpoint: out.checkpoint, seed: out.seed });
    const link = $("download");
    link.href = `/api/download?${q}`;
    link.setAttribute("download", `histosynth-pair-${out.mask_id}.zip`);
    link.classList.remove("disabled");
    clearError();
    state.painted += 1;
    document.body.dataset.painted = String(state.painted);
    document.body.dataset.mask = out.mask_id;
  } catch (err) {
    showError(err.message);
    state.painted += 1;  // a finished request all the same: tests wait on it
    document.body.dataset.painted = String(state.painted);
  } finally {
    state.inFlight = false;
    setBusy(false);
    if (state.again) { state.again = false; paint(); }
  }
}

async function sample() {
  const mix = {};
  for (const box of document.querySelectorAll("#mix input[type=checkbox]")) {
    if (box.checked) mix[box.dataset.name] = parseFloat($(`share-${box.dataset.type}`).value);
  }
  await paintNewMask(() => postJSON("/api/sample", {
    side: state.side, type_mix: mix, density: parseFloat($("density").value),
    seed: parseInt($("seed").value, 10) || 0, method: $("method").value,
  }));
}

// A mask made by the server (sampled or uploaded) becomes the base, without drawn nuclei, and is painted.
async function paintNewMask(request) {
  setBusy(true);
  try {
    const out = await request();
    state.base = out.mask_id;
    state.nuclei = [];
    clearError();
    await paint();
  } catch (err) {
    showError(err.message);
    setBusy(false);
  }
}

async function upload() {
  const file = $("upload-file").files[0];
  if (!file) { showError("choose a label image or a GeoJSON first"); return; }
  const form = new FormData();
  form.append("file", file);
  const types = $("upload-types").files[0];
  if (types) form.append("types", types);
  form.append("side", String(state.side));
  form.append("type", $("type").value);
  await paintNewMask(() => call("/api/upload", { method: "POST", body: form }));
}

// -- start ------------------------------------------------------------------------------------------------
async function start() {
  let info;
  try {
    info = await call("/api/info");
  } catch (err) {
    showError(err.message);
    return;
  }
  state.info = info;
  $("run").textContent = `run ${info.run} — ${info.checkpoints.length} generator checkpoint(s); ` +
    `sampling ${info.sampling ? "on (" + info.shape_source + " shapes)" : "off (no stats.json)"}; ` +
    `drawing shapes from ${info.shapes_from}; uploads up to ${info.max_upload_mb} MB`;
  fillSelect($("checkpoint"), info.checkpoints.map((c) => [c.name, `${c.name} (step ${c.step}, ${c.generator}${c.ema ? ", EMA" : ""})`]), false);
  $("checkpoint").value = info.default;
  fillCheckpointChoices();
  fillSelect($("type"), Object.entries(info.classes).map(([id, name]) => [id, `${id} ${name}`]), false);
  fillSelect($("method"), info.methods.map((m) => [m, m]), false);
  const shapes = $("shapes");
  info.shapes.forEach((url, k) => {
    const img = document.createElement("img");
    img.src = url;
    img.id = `shape-${k}`;
    img.alt = `shape ${k}`;
    if (k === 0) img.classList.add("selected");
    img.addEventListener("click", () => {
      state.shape = k;
      for (const other of shapes.children) other.classList.toggle("selected", other === img);
      $("tool-shape").checked = true;
    });
    shapes.appendChild(img);
  });
  if (!info.shapes.length) $("tool-shape").disabled = true;
  const mix = $("mix");
  for (const [id, name] of Object.entries(info.classes)) {
    const label = document.createElement("label");
    label.innerHTML = `<input type="checkbox" id="fix-${id}"> <span></span>` +
      `<input type="range" id="share-${id}" min="0" max="1" step="0.05" value="0.5"> <output id="share-${id}-out">50%</output>`;
    label.querySelector("span").textContent = name;
    const box = label.querySelector("input[type=checkbox]");
    box.dataset.name = name;
    box.dataset.type = id;
    const range = label.querySelector("input[type=range]");
    range.addEventListener("input", () => { $(`share-${id}-out`).textContent = `${Math.round(range.value * 100)}%`; });
    mix.appendChild(label);
  }
  if (!info.sampling) for (const el of $("sampler").querySelectorAll("input, select, button")) el.disabled = true;
  $("radius").addEventListener("input", () => { $("radius-out").textContent = $("radius").value; });
  $("density").addEventListener("input", () => { $("density-out").textContent = parseFloat($("density").value).toFixed(2); });
  $("side").addEventListener("change", () => { setSide(parseInt($("side").value, 10)); state.base = null; state.nuclei = []; paint(); });
  $("style").addEventListener("change", paint);
  $("seed").addEventListener("change", paint);
  $("checkpoint").addEventListener("change", () => { fillCheckpointChoices(); paint(); });
  $("paint").addEventListener("click", paint);
  $("undo").addEventListener("click", () => { state.nuclei.pop(); paint(); });
  $("clear").addEventListener("click", () => { state.base = null; state.nuclei = []; paint(); });
  $("sample").addEventListener("click", sample);
  $("upload").addEventListener("click", upload);
  bindCanvas();
  setSide(parseInt($("side").value, 10));
  redraw();
  document.body.dataset.ready = "1";
  paint();
}

start();
