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
    band: +(state["b" + (i + 1)] || (L.bands && L.bands.length > 1 ? 1 : 0)), item: null, features: [], total: 0,
    visible: state["v" + (i + 1)] !== "0", failed: 0 }));
  const base = { id: 0, L: Object.assign({ kind: "image" }, info.image), opacity: state.o0 !== undefined ? +state.o0 : 1,
    visible: state.v0 !== "0", item: null, failed: 0 };  // the image: a layer that can be hidden too
  const shown = ly => ly.visible ? ly.opacity : 0;
  document.getElementById("title").textContent = info.image.name;
  document.title = "tilerseg view: " + info.image.name;

  function source(id, L, extra) {
    return { width: L.width, height: L.height, tileSize: 256, tileOverlap: 0, minLevel: L.minLevel,
      maxLevel: L.maxLevel, getTileUrl: (l, x, y) => `tiles/${id}/${l}/${x}_${y}?v=${L.version}${extra}` };
  }
  function extra(ly) { return ly.L.kind === "labels" ? "&hide=" + ly.hide.join(",") : "&band=" + ly.band; }

  const viewer = OpenSeadragon({ id: "osd", drawer: "canvas", tileSources: source(0, info.image, ""),
    showNavigationControl: false, showNavigator: true, navigatorPosition: "TOP_LEFT", navigatorSizeRatio: 0.16, navigatorAutoFade: false,
    imageSmoothingEnabled: false, maxZoomPixelRatio: 16, visibilityRatio: 0.2,
    gestureSettingsMouse: { clickToZoom: false }, animationTime: 0.4, immediateRender: false });
  const pending = new Set();
  function addRaster(ly, replace) {
    const opts = { tileSource: source(ly.id, ly.L, extra(ly)), x: 0, y: 0, width: 1, opacity: shown(ly),
      success: e => { ly.item = e.item; pending.delete(ly.id); }, error: () => pending.delete(ly.id) };
    pending.add(ly.id);
    if (replace && ly.item) { opts.index = viewer.world.getIndexOfItem(ly.item); opts.replace = true; }
    viewer.addTiledImage(opts);
  }
  viewer.addOnceHandler("open", () => {
    base.item = viewer.world.getItemAt(0); base.item.setOpacity(shown(base));
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
  function refresh(ly) {  // opacity or visibility changed
    if (ly.item) ly.item.setOpacity(shown(ly));
    if (ly.L.kind === "polygons") drawVectors();
    saveState();
  }
  function controls(ly, box) {  // "show" and a labelled opacity slider, for every layer
    const show = document.createElement("label");
    show.className = "show";
    show.innerHTML = `<input type="checkbox" class="visible" ${ly.visible ? "checked" : ""}> show`;
    show.querySelector("input").addEventListener("change", ev => { ly.visible = ev.target.checked; refresh(ly); });
    const op = document.createElement("label");
    op.className = "opacity-label";
    op.innerHTML = `opacity <input type="range" class="opacity" min="0" max="1" step="0.05" value="${ly.opacity}" ` +
      `aria-label="opacity of ${esc(ly.L.name)}"> <output>${Math.round(ly.opacity * 100)}%</output>`;
    const slider = op.querySelector("input");
    slider.addEventListener("input", () => {
      ly.opacity = +slider.value; op.querySelector("output").textContent = Math.round(ly.opacity * 100) + "%";
      refresh(ly);
    });
    box.append(show, op);
  }
  function imageFacts() {
    const parts = [`${W.toLocaleString()} × ${H.toLocaleString()} px`];
    if (info.mpp) parts.push(`${+info.mpp.toPrecision(4)} µm/px`);
    if (info.crs) parts.push((info.crs.epsg ? `EPSG:${info.crs.epsg} ` : "") + `(${info.crs.name})`,
      `${+info.pixelSize.toPrecision(4)} ${info.unit}/px`);
    if (!info.mpp && !info.crs) parts.push("no pixel size recorded");
    return parts.join(" · ");
  }
  {
    const box = document.createElement("div");
    box.className = "layer"; box.dataset.layer = 0;
    box.innerHTML = `<div class="name">image</div><div class="note facts">${esc(imageFacts())}</div>`;
    controls(base, box);
    box.insertAdjacentHTML("beforeend", '<div class="note failed" hidden></div>');
    panel.appendChild(box);
  }
  function area(px) {  // level-0 pixels to the image's units, one unit for all rows
    if (info.mpp) { const a = px * info.mpp * info.mpp; return a >= 1e6 ? `${+(a / 1e6).toPrecision(3)} mm²` : `${+a.toPrecision(3)} µm²`; }
    if (info.unit === "m") { const a = px * info.pixelSize * info.pixelSize; return a >= 1e6 ? `${+(a / 1e6).toPrecision(3)} km²` : `${+a.toPrecision(3)} m²`; }
    return `${Math.round(px).toLocaleString()} px`;
  }
  for (const ly of layers) {
    const box = document.createElement("div");
    box.className = "layer"; box.dataset.layer = ly.id;
    box.innerHTML = `<div class="name">${esc(ly.L.name)}</div>`;
    controls(ly, box);
    if (ly.L.kind === "labels") {
      const rows = ly.L.classes.filter(c => ly.L.areas.px[c.value]).map(c => `<tr><td>${esc(c.name)}</td>` +
        `<td>${(ly.L.areas.exact ? "" : "≈ ") + area(ly.L.areas.px[c.value])}</td></tr>`).join("");
      box.insertAdjacentHTML("beforeend", `<table class="stats areas"><tr><th>class</th><th>area</th></tr>${rows}</table>`);
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
      const rows = ly.L.perClass.map(c => `<tr><td>${esc(c.class === null ? "?" : className(c.class))}</td>` +
        `<td>${c.count.toLocaleString()}</td><td>${area(c.area_px)}</td></tr>`).join("");
      box.insertAdjacentHTML("beforeend", `<table class="stats"><tr><th>class</th><th>polygons</th><th>area</th></tr>${rows}</table>`);
      const skipped = Object.entries(ly.L.skipped);
      if (skipped.length) box.insertAdjacentHTML("beforeend", `<div class="note skipped">skipped ` +
        `${skipped.reduce((a, [, n]) => a + n, 0).toLocaleString()} features that are not polygons: ` +
        esc(skipped.map(([why, n]) => `${n} ${why}`).join(", ")) + "</div>");
    } else if (ly.L.kind === "instances") {
      const o = ly.L.objects || {};
      const rows = (o.per_class || []).map(c => `<tr><td>${esc(c.name)}</td><td>${c.count.toLocaleString()}</td>` +
        `<td>${c.median_area_px} px</td></tr>`).join("");
      box.insertAdjacentHTML("beforeend", `<div class="note objects">${(o.count || 0).toLocaleString()} objects, a colour ` +
        `each${ly.L.table ? "; click one for its row of " + esc(ly.L.table) : "; no object table beside it"}</div>` +
        `<table class="stats"><tr><th>class</th><th>objects</th><th>median area</th></tr>${rows}</table>`);
    }
    box.insertAdjacentHTML("beforeend", '<div class="note failed" hidden></div>');
    panel.appendChild(box);
  }

  // -- view state in the URL -----------------------------------------------------------------
  function saveState() {
    const vp = viewer.viewport, c = vp.getCenter(true);
    const p = new URLSearchParams();
    p.set("x", (c.x * W).toFixed(1)); p.set("y", (c.y * W).toFixed(1));
    p.set("s", (vp.getZoom(true) * vp.getContainerSize().x / W).toPrecision(6));
    p.set("o0", base.opacity); if (!base.visible) p.set("v0", "0");
    if (selected) { p.set("sel", selected.layer); p.set("sid", selected.own); }  // the feature's own id
    for (const ly of layers) {
      p.set("o" + ly.id, ly.opacity);
      if (!ly.visible) p.set("v" + ly.id, "0");
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
      if (shown(ly) <= 0) continue;
      ctx.globalAlpha = ly.opacity;
      for (const f of ly.features) {  // a dark halo under the class colour: told from a mask of that colour
        const isSel = selected && selected.layer === ly.id && selected.id === f[0];
        ctx.beginPath();
        for (const ring of f[2]) {
          for (let k = 0; k < ring.length; k += 2) {
            const X = ring[k] * t.s + t.ox, Y = ring[k + 1] * t.s + t.oy;
            if (k === 0) ctx.moveTo(X, Y); else ctx.lineTo(X, Y);
          }
          ctx.closePath();
        }
        ctx.strokeStyle = "#000000"; ctx.lineWidth = isSel ? 5 : 3.5; ctx.stroke();
        ctx.strokeStyle = isSel ? "#ffffff" : PALETTE[(f[1] || 0) % PALETTE.length];
        ctx.lineWidth = isSel ? 2.5 : 1.5; ctx.stroke();
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
    for (const ly of layers.filter(l => l.L.kind === "polygons" && shown(l) > 0)) {
      const hit = ly.features.find(f => inside(f, x, y));
      if (hit) {
        e.preventDefaultAction = true;
        await select(ly, hit[0], hit[3]);
        return;
      }
    }
    for (const ly of layers.filter(l => l.L.kind === "instances" && shown(l) > 0)) {
      const d = await (await fetch(`api/point?x=${x}&y=${y}`)).json();
      const v = d.inside && d.layers.find(v => v.layer === ly.id);
      if (v && v.object > 0) {
        e.preventDefaultAction = true;
        selected = null; drawVectors();
        const r = await fetch(`api/object/${ly.id}/${v.object}`);
        box.textContent = `${ly.L.name} object #${v.object}\n` + (r.ok ? JSON.stringify(await r.json(), null, 1) :
          await r.text());
        box.hidden = false;
        return;
      }
    }
    selected = null; box.hidden = true; drawVectors(); saveState();
  });
  async function select(ly, position, own) {  // a polygon: highlighted, its properties shown, its own id in the URL
    const box = document.getElementById("props");
    selected = { layer: ly.id, id: position, own: own };
    const props = await (await fetch(`api/properties/${ly.id}/${position}`)).json();
    box.textContent = `${ly.L.name} #${own}\n` + JSON.stringify(props, null, 1);
    box.hidden = false; drawVectors(); saveState();
  }
  if (state.sel !== undefined && state.sid !== undefined) {  // a copied URL names a feature by its own id
    const ly = layers.find(l => l.id === +state.sel && l.L.kind === "polygons");
    const r = ly && await fetch(`api/find/${ly.id}?id=${encodeURIComponent(state.sid)}`);
    if (r && r.ok) { const f = await r.json(); await select(ly, f.position, f.id); }
  }

  // -- the readout under the cursor ----------------------------------------------------------
  const readout = document.getElementById("readout");
  let want = null, busy = false;
  async function read() {
    if (busy || !want) return;
    busy = true;
    const [x, y] = want; want = null;
    try {
      const r = await fetch(`api/point?x=${x}&y=${y}`);
      if (!r.ok) { readout.textContent = await r.text(); return; }  // a damaged place of a file: its one line
      const d = await r.json();
      readout.textContent = d.inside ? describe(d) : "outside the image";
      readout.dataset.col = d.col; readout.dataset.row = d.row;
    } finally { busy = false; read(); }
  }
  function describe(d) {
    const parts = [`x ${d.col}, y ${d.row} px`];
    if (d.um) parts.push(`${fmt(d.um[0])}, ${fmt(d.um[1])} µm`);
    if (d.map) parts.push(`${fmt(d.map[0])}, ${fmt(d.map[1])} ${info.unit}`);
    if (d.lonlat) parts.push(`${Math.abs(d.lonlat[1]).toFixed(5)}° ${d.lonlat[1] < 0 ? "S" : "N"}, ` +
      `${Math.abs(d.lonlat[0]).toFixed(5)}° ${d.lonlat[0] < 0 ? "W" : "E"}`);
    for (const v of d.layers) {
      if (v.layer === 0) continue;
      const ly = layers[v.layer - 1];
      if (v.name !== undefined) parts.push(`${ly.L.name}: ${v.name}`);
      else if (v.object !== undefined) parts.push(`${ly.L.name}: ${v.object ? "object " + v.object : "no object"}`);
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
  viewer.addHandler("tile-load-failed", e => {  // a damaged file's tiles: 422 with its line; say it in the panel
    const ly = [base, ...layers].find(l => l.item === e.tiledImage);
    if (!ly) return;
    ly.failed += 1;
    const note = document.querySelector(`.layer[data-layer="${ly.id}"] .failed`);
    note.textContent = `${ly.failed} tile${ly.failed === 1 ? "" : "s"} could not be read: the file is damaged there`;
    note.hidden = false;
  });
  document.getElementById("zoomin").addEventListener("click", () => viewer.viewport.zoomBy(2));
  document.getElementById("zoomout").addEventListener("click", () => viewer.viewport.zoomBy(0.5));
  document.getElementById("home").addEventListener("click", () => viewer.viewport.goHome());
  window.addEventListener("resize", () => { drawVectors(); fetchFeatures(); });

  function className(k) {
    const lab = layers.find(l => l.L.kind === "labels");
    return lab && lab.L.classes[k] ? lab.L.classes[k].name : `class ${k}`;
  }
  function esc(s) { return String(s).replace(/[&<>"]/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]); }

  // for tests and the console: the viewer, the layers, and "everything drawn"
  window.tilerseg = { viewer, layers, base, info, toScreen, toImage, saveState,
    loaded: () => pending.size === 0 && viewer.world.getItemCount() === 1 + layers.filter(l => l.L.kind !== "polygons").length &&
      [...Array(viewer.world.getItemCount()).keys()].map(i => viewer.world.getItemAt(i))
        .every(it => it.getOpacity() === 0 || it.getFullyLoaded() || [base, ...layers].some(l => l.item === it && l.failed)) && fetchSeq > 0 && fetchDone === fetchSeq };
})();
