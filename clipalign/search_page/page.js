// The search page: the query lives in the URL's fragment (#q=...&k=20, or #key=... after a click), so the back button
// and links work; every search reads it from there. Text from the server is set as text, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let serial = 0; // the latest search: an answer to an earlier one arrives late and is dropped

async function getJSON(url) {
  let response;
  try {
    response = await fetch(url, {headers: {Accept: "application/json"}});
  } catch (error) {
    throw new Error("the server does not answer: is clipalign-search --serve still running?");
  }
  if (!(response.headers.get("Content-Type") || "").startsWith("application/json")) {
    throw new Error(`the server answered ${response.status} ${response.statusText}`);
  }
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || `the server answered ${response.status}`);
  return data;
}

function showMessage(text) {
  $("message").textContent = text || "";
  $("message").hidden = !text;
}

async function loadInfo() {
  const info = await getJSON("/api/info");
  $("model-name").textContent = info.model.name;
  $("model-name").title = info.model.path;
  $("index-name").textContent = info.index;
  $("index-name").title = `embeddings: ${info.embeddings}`;
  $("index-detail").textContent = Object.entries(info.indexes).map(([modality, index]) => {
    const recall = index.recall_at_10 == null ? "" : `, recall@10 ${index.recall_at_10.toFixed(3)}`;
    return `(${modality}: ${index.index_key}, ${index.vectors.toLocaleString("en")} vectors${recall})`;
  }).join(" ");
  for (const option of $("modality").options) option.disabled = !(option.value in info.indexes);
  document.title = `clipalign search · ${info.model.name}`;
}

function wanted() {
  const params = new URLSearchParams(location.hash.slice(1));
  return {q: params.get("q"), key: params.get("key"), k: params.get("k") || $("k").value,
          modality: params.get("modality") || $("modality").value};
}

function go(query) {
  const params = new URLSearchParams();
  if (query.key != null) params.set("key", query.key); else params.set("q", query.q);
  params.set("k", $("k").value);
  params.set("modality", $("modality").value);
  const hash = "#" + params.toString();
  if (location.hash === hash) search(); else location.hash = hash; // hashchange searches
}

async function search() {
  const query = wanted();
  if (query.q == null && query.key == null) return;
  if (query.q != null) $("query").value = query.q;
  $("k").value = query.k;
  $("modality").value = query.modality;
  const mine = ++serial;
  const params = new URLSearchParams({k: query.k, modality: query.modality});
  if (query.key != null) params.set("key", query.key); else params.set("q", query.q);
  $("status").textContent = "searching…";
  try {
    const data = await getJSON("/api/search?" + params.toString());
    if (mine !== serial) return;
    showMessage("");
    render(data);
  } catch (error) {
    if (mine !== serial) return;
    showMessage(error.message);
    $("status").textContent = "";
  }
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
}

function thumbnail(result) {
  if (!result.image) return element("div", "no-image", "no image");
  const img = element("img");
  img.src = result.image;
  img.alt = result.caption || result.key;
  img.loading = "lazy";
  img.addEventListener("error", () => img.replaceWith(element("div", "no-image", "image unavailable")));
  return img;
}

function render(data) {
  const what = data.modality === "text" ? "captions" : "images";
  const status = $("status");
  status.replaceChildren();
  if (data.query.key != null) {
    status.append(`${data.results.length} ${what} like `);
    const shown = data.results.find((r) => r.key === data.query.key);
    if (shown && shown.image) status.append(thumbnail({...shown, caption: null}));
    status.append(element("code", null, data.query.key));
  } else {
    status.append(`${data.results.length} ${what} for `, element("q", null, data.query.text));
  }
  status.append(element("span", "time", ` in ${(1000 * data.seconds).toFixed(0)} ms`));
  const cards = data.results.map((result) => {
    const card = element("figure", "card");
    card.dataset.key = result.key;
    const open = element("button", "thumb");
    open.type = "button";
    open.title = "find images like this one";
    open.append(thumbnail(result));
    open.addEventListener("click", () => go({key: result.key}));
    const caption = element("figcaption");
    caption.append(element("p", "caption", result.caption || "(no caption)"),
                   element("p", "meta", `#${result.rank} · ${result.score.toFixed(3)} · ${result.key}`));
    card.append(open, caption);
    return card;
  });
  $("grid").replaceChildren(...cards);
  if (!cards.length) $("grid").append(element("p", "empty", "nothing found"));
}

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("submit", (event) => {
    event.preventDefault();
    go({q: $("query").value});
  });
  window.addEventListener("hashchange", search);
  loadInfo().then(search).catch((error) => showMessage(error.message));
});
