// tilerseg view: the image (layer 0) and each output over it, from the server's /api/info.
// The view state (centre, scale, opacity, hidden classes, band) lives in the URL's hash.
"use strict";
(async function () {
  const info = await (await fetch("api/info")).json();
  const W = info.image.width, H = info.image.height;
  const PALETTE = info.palette;
  const state = Object.fromEntries(new URLSearchParams(location.hash.slice(1)));
  const layers = info.layers.map((L, i) => ({ id: i + 1, L: L,
    opacity: state["o" + (i + 1)] !== undefined ? +state["o" + (i + 1)] : (L.kind === "polygons" ? 1 : 0.6),
    hide: state["h" + (i + 1)] !== undefined ? state["h" + (i + 1)].split(",").filter(s => s !== "").map(Number)
      : (L.kind === "labels" ? [0] : []),
    band: +(state["b" + (i + 1)] || (L.bands && L.bands.length > 1 ? 1 : 0)), item: null, features: [], total: 0 }));
  document.getElementById("title").textContent = info.image.name;
  document.title = "tilerseg view: " + info.image.name;

  function source(id, L, extra) {
    return { width: L.width, height: L.height, tileSize: 256, tileOverlap: 0, minLevel: L.minLevel,
      maxLevel: L.maxLevel, getTileUrl: (l, x, y) => `tiles/${id}/${l}/${x}_${y}?v=${L.version}${extra}` };
  }
  function extra(ly) { return ly.L.kind === "labels" ? "&hide=" + ly.hide.join(",") : "&band=" + ly.band; }

  const viewer = OpenSeadragon({ id: "osd", drawer: "canvas", tileSources: source(0, info.image, ""),
    showNavigationControl: false, imageSmoothingEnabled: false, maxZoomPixelRatio: 16, visibilityRatio: 0.2,
    gestureSettingsMouse: { clickToZoom: false }, animationTime: 0.4, immediateRender: false });
  const pending = new Set();
  function addRaster(ly, replace) {
    const opts = { tileSource: source(ly.id, ly.L, extra(ly)), x: 0, y: 0, width: 1, opacity: ly.opacity,
      success: e => { ly.item = e.item; pending.delete(ly.id); }, error: () => pending.delete(ly.id) };
    pending.add(ly.id);
    if (replace && ly.item) { opts.index = viewer.world.getIndexOfItem(ly.item); opts.replace = true; }
    viewer.addTiledImage(opts);
  }
  viewer.addOnceHandler("open", () => {
    layers.filter(ly => ly.L.kind !== "polygons").forEach(ly => addRaster(ly, false));
    if (state.x !== undefined) {
      const vp = viewer.viewport;
      vp.zoomTo(+state.s * W / vp.getContainerSize().x, null, true);
      vp.panTo(new OpenSeadragon.Point(+state.x / W, +state.y / W), true);
    }
    fetchFeatures();
  });

  // -- the panel: a block per layer ------------------------------------------------------
  const panel = document.getElementById("layers");
  for (const ly of layers) {
    const box = document.createElement("div");
    box.className = "layer"; box.dataset.layer = ly.id;
    box.innerHTML = `<div class="name">${esc(ly.L.name)}</div>`;
    const slider = document.createElement("input");
    Object.assign(slider, { type: "range", min: 0, max: 1, step: 0.05, value: ly.opacity, title: "opacity" });
    slider.className = "opacity";
    slider.addEventListener("input", () => {
      ly.opacity = +slider.value;
      if (ly.item) ly.item.setOpacity(ly.opacity);
      if (ly.L.kind === "polygons") drawVectors();
      saveState();
    });
    box.appendChild(slider);
    if (ly.L.kind === "labels") {
      for (const c of ly.L.classes) {
        const row = document.createElement("label");
        row.className = "cls";
        row.innerHTML = `<input type="checkbox" data-class="${c.value}" ${ly.hide.includes(c.value) ? "" : "checked"}>` +
          `<span class="swatch" style="background:${c.colour}"></span><span>${esc(c.name)}</span>`;
        row.querySelector("input").addEventListener("change", ev => {
          ly.hide = ly.hide.filter(k => k !== c.value);
          if (!ev.target.checked) ly.hide.push(c.value);
          addRaster(ly, true); saveState();
        });
        box.appendChild(row);
      }
    } else if (ly.L.kind === "probabilities") {
      if (ly.L.bands.length > 1) {
        const sel = document.createElement("select");
        sel.className = "band";
        ly.L.bands.forEach((b, k) => sel.add(new Option(b, k, false, k === ly.band)));
        sel.addEventListener("change", () => {
          ly.band = +sel.value; addRaster(ly, true); saveState();
          box.querySelector(".bandname").textContent = ly.L.bands[ly.band];
        });
        box.appendChild(sel);
      }
      const ramp = document.createElement("div");
      ramp.className = "ramp";
      ramp.style.background = `linear-gradient(to right, ${ly.L.ramp.join(", ")})`;
      box.appendChild(ramp);
      box.insertAdjacentHTML("beforeend", '<div class="ticks"><span>0</span><span>0.25</span><span>0.5</span>' +
        '<span>0.75</span><span>1</span></div><div class="note">probability of ' +
        `<span class="bandname">${esc(ly.L.bands[ly.band] || "")}</span></div>`);
    } else if (ly.L.kind === "polygons") {
      box.insertAdjacentHTML("beforeend", `<div class="note count">${ly.L.count.toLocaleString()} polygons</div>`);
    }
    panel.appendChild(box);
  }

  // -- view state in the URL -----------------------------------------------------------------
  function saveState() {
    const vp = viewer.viewport, c = vp.getCenter(true);
    const p = new URLSearchParams();
    p.set("x", (c.x * W).toFixed(1)); p.set("y", (c.y * W).toFixed(1));
    p.set("s", (vp.getZoom(true) * vp.getContainerSize().x / W).toPrecision(6));
    for (const ly of layers) {
      p.set("o" + ly.id, ly.opacity);
      if (ly.L.kind === "labels") p.set("h" + ly.id, ly.hide.join(","));
      if (ly.L.kind === "probabilities") p.set("b" + ly.id, ly.band);
    }
    history.replaceState(null, "", "#" + p.toString());
  }
  viewer.addHandler("animation-finish", () => { saveState(); fetchFeatures(); });

  // -- image pixels <-> element pixels (no rotation: an affine map) ----------------------
  function toScreen() {
    const vp = viewer.viewport;
    const a = vp.pixelFromPoint(new OpenSeadragon.Point(0, 0), true);
    const b = vp.pixelFromPoint(new OpenSeadragon.Point(1, 1), true);
    return { s: (b.x - a.x) / W, ox: a.x, oy: a.y };
  }
  function toImage(ex, ey) { const t = toScreen(); return [(ex - t.ox) / t.s, (ey - t.oy) / t.s]; }

  // -- scale bar -----------------------------------------------------------------------------
  function drawScale() {
    const per = info.pixelSize / toScreen().s;  // units per screen pixel
    const want = 120 * per, p10 = Math.pow(10, Math.floor(Math.log10(want)));
    const nice = [1, 2, 5, 10].map(m => m * p10).filter(v => v <= want).pop() || p10;
    document.getElementById("scalebar").style.width = (nice / per).toFixed(1) + "px";
    document.getElementById("scaletext").textContent = fmtLength(nice, info.unit);
  }
  function fmtLength(v, unit) {
    if (unit === "µm" && v >= 1000) return +(v / 1000).toPrecision(3) + " mm";
    if (unit === "m" && v >= 1000) return +(v / 1000).toPrecision(3) + " km";
    return +v.toPrecision(3) + " " + unit;
  }

  // -- polygons: fetched per view, drawn as outlines ------------------------------------------
  const vec = document.getElementById("vec");
  let selected = null, fetchSeq = 0, fetchDone = 0;
  async function fetchFeatures() {
    const seq = ++fetchSeq;
    const osd = viewer.element.getBoundingClientRect();
    const [x0, y0] = toImage(0, 0), [x1, y1] = toImage(osd.width, osd.height);
    for (const ly of layers.filter(l => l.L.kind === "polygons")) {
      const r = await fetch(`api/features/${ly.id}?x0=${x0}&y0=${y0}&x1=${x1}&y1=${y1}`);
      if (seq !== fetchSeq) return;
      const d = await r.json();
      ly.features = d.features; ly.total = d.total;
      const note = document.querySelector(`.layer[data-layer="${ly.id}"] .count`);
      note.textContent = `${ly.L.count.toLocaleString()} polygons; ${d.total.toLocaleString()} in view` +
        (d.total > d.features.length ? `, the largest ${d.features.length.toLocaleString()} drawn: zoom in for all` : "");
    }
    fetchDone = seq;
    drawVectors();
  }
  function drawVectors() {
    const osd = viewer.element.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    if (vec.width !== Math.round(osd.width * dpr) || vec.height !== Math.round(osd.height * dpr)) {
      vec.width = Math.round(osd.width * dpr); vec.height = Math.round(osd.height * dpr);
      vec.style.width = osd.width + "px"; vec.style.height = osd.height + "px";
    }
    const ctx = vec.getContext("2d"), t = toScreen();
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, osd.width, osd.height);
    for (const ly of layers.filter(l => l.L.kind === "polygons")) {
      if (ly.opacity <= 0) continue;
      ctx.globalAlpha = ly.opacity;
      for (const f of ly.features) {
        const isSel = selected && selected.layer === ly.id && selected.id === f[0];
        ctx.strokeStyle = isSel ? "#ffffff" : PALETTE[(f[1] || 0) % PALETTE.length];
        ctx.lineWidth = isSel ? 3 : 1.5;
        ctx.beginPath();
        for (const ring of f[2]) {
          for (let k = 0; k < ring.length; k += 2) {
            const X = ring[k] * t.s + t.ox, Y = ring[k + 1] * t.s + t.oy;
            if (k === 0) ctx.moveTo(X, Y); else ctx.lineTo(X, Y);
          }
          ctx.closePath();
        }
        ctx.stroke();
      }
    }
    ctx.globalAlpha = 1;
  }
  function inside(f, x, y) {  // even-odd over every ring
    let c = false;
    for (const r of f[2]) {
      for (let i = 0, j = r.length - 2; i < r.length; j = i, i += 2) {
        const yi = r[i + 1], yj = r[j + 1];
        if ((yi > y) !== (yj > y) && x < (r[j] - r[i]) * (y - yi) / (yj - yi) + r[i]) c = !c;
      }
    }
    return c;
  }
  viewer.addHandler("canvas-click", async e => {
    if (!e.quick) return;
    const [x, y] = toImage(e.position.x, e.position.y);
    const box = document.getElementById("props");
    for (const ly of layers.filter(l => l.L.kind === "polygons" && l.opacity > 0)) {
      const hit = ly.features.find(f => inside(f, x, y));
      if (hit) {
        e.preventDefaultAction = true;
        selected = { layer: ly.id, id: hit[0] };
        const props = await (await fetch(`api/properties/${ly.id}/${hit[0]}`)).json();
        box.textContent = `${ly.L.name} #${hit[3]}\n` + JSON.stringify(props, null, 1);
        box.hidden = false; drawVectors();
        return;
      }
    }
    selected = null; box.hidden = true; drawVectors();
  });

  // -- the readout under the cursor ----------------------------------------------------------
  const readout = document.getElementById("readout");
  let want = null, busy = false;
  async function read() {
    if (busy || !want) return;
    busy = true;
    const [x, y] = want; want = null;
    try {
      const d = await (await fetch(`api/point?x=${x}&y=${y}`)).json();
      readout.textContent = d.inside ? describe(d) : "outside the image";
      readout.dataset.col = d.col; readout.dataset.row = d.row;
    } finally { busy = false; read(); }
  }
  function describe(d) {
    const parts = [`x ${d.col}, y ${d.row} px`];
    if (d.um) parts.push(`${fmt(d.um[0])}, ${fmt(d.um[1])} µm`);
    if (d.map) parts.push(`${fmt(d.map[0])}, ${fmt(d.map[1])} ${info.unit}`);
    for (const v of d.layers) {
      if (v.layer === 0) continue;
      const ly = layers[v.layer - 1];
      if (v.name !== undefined) parts.push(`${ly.L.name}: ${v.name}`);
      else if (v.probabilities !== undefined) parts.push(v.probabilities === null ? `${ly.L.name}: nodata` :
        `${ly.L.name}: ${v.bands[ly.band]} ${v.probabilities[ly.band].toFixed(3)}`);
    }
    return parts.join(" · ");
  }
  function fmt(v) { return Math.abs(v) >= 1e4 ? v.toFixed(1) : v.toFixed(2); }
  viewer.element.addEventListener("mousemove", ev => {
    const r = viewer.element.getBoundingClientRect();
    want = toImage(ev.clientX - r.left, ev.clientY - r.top);
    read();
  });

  viewer.addHandler("update-viewport", () => { drawScale(); drawVectors(); });
  window.addEventListener("resize", () => { drawVectors(); fetchFeatures(); });

  function esc(s) { return String(s).replace(/[&<>"]/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]); }

  // for tests and the console: the viewer, the layers, and "everything drawn"
  window.tilerseg = { viewer, layers, info, toScreen, toImage, saveState,
    loaded: () => pending.size === 0 && viewer.world.getItemCount() === 1 + layers.filter(l => l.L.kind !== "polygons").length &&
      [...Array(viewer.world.getItemCount()).keys()].map(i => viewer.world.getItemAt(i))
        .every(it => it.getOpacity() === 0 || it.getFullyLoaded()) && fetchSeq > 0 && fetchDone === fetchSeq };
})();
