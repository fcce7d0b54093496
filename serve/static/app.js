// The uniret search page. Every piece of data is put into the page with textContent or as an
// attribute value set through the DOM: never innerHTML, so a path or domain cannot become markup.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.appendChild(child);
  return node;
}

function setStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "meta error" : "meta";
}

function score(value) {
  return Math.max(-1, Math.min(1, value)).toFixed(3);  // fp16 vectors can give 1.0001
}

function image(src, alt) {
  const img = el("img", { src: src, alt: alt, loading: "lazy" });
  img.addEventListener("error", () => { img.replaceWith(el("div", { class: "noimg", text: "no image" })); });
  return img;
}

async function loadInfo() {
  const response = await fetch("/info");
  const info = await response.json();
  if (!response.ok) { setStatus(info.error || "cannot read /info", true); return; }
  const model = (info.model.backbone || "an unnamed model").replace(/^timm:|^open_clip:/, "");
  $("info").textContent = `${info.count.toLocaleString()} pictures, compared by the ${model} model.`;
  $("tech").textContent = `${info.dim}-number embeddings · Faiss index ${info.key} · model ` +
    `${info.model.backbone || "?"} (${info.model.config_hash || "?"}) · index version ${info.version}`;
  for (const name of info.rerankers) $("rerank").appendChild(el("option", { value: name, text: name }));
  for (const name of info.domains) $("domain").appendChild(el("option", { value: name, text: name }));
  $("k").max = String(info.max_k);
}

function showQuery(src, label) {
  const box = $("query");
  box.replaceChildren(image(src, label), el("div", {}, el("div", { text: "query" }),
    el("div", { class: "path", text: label })));
}

function showResults(payload) {
  const grid = $("results");
  const first = payload.results[0];
  grid.replaceChildren();
  grid.dataset.query = first.query;
  for (const row of first.results) {
    const card = el("div", { class: "card", title: row.path || "", dataset: { id: String(row.id), rank: String(row.rank) } },
      image(row.image_url, row.path || String(row.id)),
      el("div", { class: "score", text: `#${row.rank}  ${score(row.score)}` }),
      el("div", { text: `id ${row.id}` + (row.domain ? ` · ${row.domain}` : "") + (row.label ? ` · ${row.label}` : "") }),
      el("div", { class: "path", text: row.path || "" }));
    card.addEventListener("click", () => searchId(row.id));
    grid.appendChild(card);
  }
  setStatus(`${first.results.length} results for ${first.query} (version ${payload.version}, ${payload.took_ms} ms)`);
}

function params() {
  return { k: Number($("k").value) || 10, rerank: $("rerank").value || "none", domain: $("domain").value || null,
           where: $("where").value.trim() || null };
}

async function run(request) {
  setStatus("searching…");
  try {
    const response = await fetch("/search", request);
    const payload = await response.json();
    if (!response.ok) { setStatus(payload.error || `HTTP ${response.status}`, true); return; }
    showResults(payload);
  } catch (err) {
    setStatus(`search failed: ${err}`, true);
  }
}

function searchFile(file) {
  showQuery(URL.createObjectURL(file), file.name);
  const form = new FormData();
  form.append("file", file, file.name);
  for (const [key, value] of Object.entries(params())) if (value !== null) form.append(key, String(value));
  return run({ method: "POST", body: form });
}

function searchId(id) {
  const text = String(id).trim();
  if (!/^[0-9]+$/.test(text)) { setStatus("an id is a non-negative integer", true); return; }
  $("id").value = text;
  showQuery(`/items/${text}/image`, `id:${text}`);
  return run({ method: "POST", headers: { "Content-Type": "application/json" },
               body: JSON.stringify({ ids: [Number(text)], ...params() }) });
}

function setup() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => { if (event.target.files[0]) searchFile(event.target.files[0]); });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files[0]) searchFile(event.dataTransfer.files[0]);
  });
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if ($("id").value.trim()) searchId($("id").value);
    else if ($("file").files[0]) searchFile($("file").files[0]);
    else setStatus("drop or pick an image, or type an id", true);
  });
  loadInfo().catch((err) => setStatus(`cannot reach the server: ${err}`, true));
}

document.addEventListener("DOMContentLoaded", setup);
