// The page of serve.py: pick or drop images, send each to POST /v1/classify, show the top artists with bars; with a
// gallery loaded, POST /v1/similar too and show the most similar works' thumbnails (fetched with the API key), and
// manage the gallery: add an artist from reference images (shown in the similar-works view), list and remove artists.
"use strict";

const KEY_STORAGE = "artist-service-api-key";
const PARALLEL_REQUESTS = 4;
const SIMILAR_WORKS = 6;
const state = { limits: null, multiLabel: false, gallery: null };

const $ = (id) => document.getElementById(id);

function authHeaders() {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: "Bearer " + key } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error || response.statusText;
  } catch (err) {
    return response.status + " " + response.statusText;
  }
}

async function loadModelInfo() {
  const response = await fetch("v1/model", { headers: authHeaders() });
  if (response.status === 401) {
    $("key-box").open = true;
    $("model-info").textContent = "This service needs an API key: enter it below.";
    return;
  }
  if (!response.ok) {
    $("model-info").textContent = "Model information unavailable: " + (await errorText(response));
    return;
  }
  const info = await response.json();
  state.limits = info.limits;
  state.multiLabel = info.multi_label;
  state.gallery = info.gallery;
  const classes = info.num_classes === null ? "features only" : info.num_classes + " artists";
  $("model-info").textContent = `${info.model} · ${classes}${info.multi_label ? " (multi-label)" : ""} · ` +
    `${info.input_size} px · version ${info.version}` +
    (info.gallery ? ` · gallery of ${info.gallery.artists} artists, ${info.gallery.works} works` : "");
  $("gallery-panel").hidden = !info.gallery;
  if (info.gallery) await loadArtists();
}

function thresholdText(entry) {
  if (entry.threshold === null) return "no threshold (gallery not calibrated)";
  return `threshold ${entry.threshold.toFixed(3)}${entry.calibrated ? "" : " (the gallery's)"}`;
}

async function loadArtists() {
  const response = await fetch("v1/gallery/artists", { headers: authHeaders() });
  if (!response.ok) return;
  const body = await response.json();
  $("artists-summary").textContent = `Gallery artists (${body.total})`;
  const list = $("artist-list");
  list.replaceChildren();
  for (const entry of body.artists) {
    const item = element("li", "artist");
    item.dataset.artist = entry.artist;
    const remove = element("button", "remove", "Remove");
    remove.type = "button";
    remove.addEventListener("click", () => removeArtist(entry.artist));
    item.append(element("span", "name", entry.artist),
                element("span", "muted", `${entry.references} references · ${thresholdText(entry)}`), remove);
    list.append(item);
  }
}

async function removeArtist(artist) {
  if (!confirm(`Remove ${artist} and its references from the gallery?`)) return;
  const response = await fetch("v1/gallery/artists/" + encodeURIComponent(artist),
                               { method: "DELETE", headers: authHeaders() });
  if (!response.ok) {
    setStatus(`${artist} was not removed: ` + (await errorText(response)), true);
    return;
  }
  const removed = (await response.json()).removed;
  await loadModelInfo();
  setStatus(`Removed ${artist} (${removed} references).`);
}

async function enrollArtist(event) {
  event.preventDefault();
  const name = $("enroll-name").value.trim();
  const files = Array.from($("enroll-files").files);
  if (!name || !files.length) {
    setStatus("Give the artist a name and pick reference images.", true);
    return;
  }
  const form = new FormData();
  form.append("artist", name);
  for (const file of files) form.append("files", file, file.name);
  $("enroll-button").disabled = true;
  setStatus(`Adding ${name}…`);
  try {
    const response = await fetch("v1/gallery/artists", { method: "POST", body: form, headers: authHeaders() });
    if (!response.ok) {
      setStatus(`${name} was not added: ` + (await errorText(response)), true);
      if (response.status === 401) $("key-box").open = true;
      return;
    }
    const added = await response.json();
    setStatus(`Added ${added.artist}: ${added.references} references, ${thresholdText(added)}.`);
    $("enroll-form").reset();
    await loadModelInfo();
    // The result in the similar-works view: the first reference's closest artist and nearest works.
    const cards = document.createDocumentFragment();
    const body = newCard(files[0], cards);
    $("results").prepend(cards);
    body.querySelector(".pending").replaceWith(element("p", "enrolled", `Enrolled as ${added.artist}`));
    await showSimilar(files[0], body);
  } catch (err) {
    setStatus("The service cannot be reached: " + err.message, true);
  } finally {
    $("enroll-button").disabled = false;
  }
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function newCard(file, container) {
  const card = element("article", "card");
  card.dataset.file = file.name;
  const image = element("img", "thumb");
  image.alt = "";  // the file name is written beside it
  image.src = URL.createObjectURL(file);
  image.onload = () => URL.revokeObjectURL(image.src);
  image.onerror = () => {  // not an image the browser can show: an empty frame instead of a broken-image icon
    URL.revokeObjectURL(image.src);
    image.replaceWith(element("div", "thumb"));
  };
  const body = element("div", "body");
  body.append(element("p", "file", file.name), element("p", "muted pending", "Waiting…"));
  card.append(image, body);
  container.append(card);
  return body;
}

function scoreRow(name, value, label) {
  const item = element("li");
  const head = element("div", "row-head");
  head.append(element("span", "name", name), element("span", "value", label));
  const bar = element("div", "bar");
  const fill = element("span");
  fill.style.width = Math.max(0, Math.min(100, value * 100)).toFixed(1) + "%";
  bar.append(fill);
  item.append(head, bar);
  return item;
}

function showResult(body, result) {
  const list = element("ol", "scores");
  const percent = (v) => (v * 100).toFixed(1) + "%";
  if (result.labels) {
    for (const e of result.labels) {
      list.append(scoreRow(e.label, e.confidence, `${percent(e.confidence)} · ratio ${percent(e.ratio)}`));
    }
  } else {
    for (const e of result.classification) list.append(scoreRow(e.class_name, e.probability, percent(e.probability)));
  }
  if (!list.children.length) list.append(element("li", "muted", "No artist reaches the threshold."));
  body.querySelector(".pending").replaceWith(list);
}

function showError(body, text) {
  const pending = body.querySelector(".pending");
  pending.className = "error";
  pending.textContent = text;
}

async function classifyOne(file, body) {
  const limits = state.limits;
  if (limits && file.size > limits.max_upload_mb * 1024 * 1024) {
    showError(body, `${file.name} is over the ${limits.max_upload_mb} MB upload limit`);
    return false;
  }
  const form = new FormData();
  form.append("files", file, file.name);
  const topK = Math.max(1, parseInt($("top-k").value, 10) || 5);
  try {
    const response = await fetch("v1/classify?top_k=" + topK, { method: "POST", body: form, headers: authHeaders() });
    if (!response.ok) {
      showError(body, await errorText(response));
      if (response.status === 401) $("key-box").open = true;
      return false;
    }
    showResult(body, (await response.json()).results[0]);
    if (state.gallery) await showSimilar(file, body);
    return true;
  } catch (err) {
    showError(body, "The service cannot be reached: " + err.message);
    return false;
  }
}

async function showSimilar(file, body) {
  const form = new FormData();
  form.append("files", file, file.name);
  const response = await fetch("v1/similar?top_k=" + SIMILAR_WORKS, { method: "POST", body: form,
                                                                        headers: authHeaders() });
  if (!response.ok) {
    body.append(element("p", "error", "Similar works unavailable: " + (await errorText(response))));
    return;
  }
  const result = (await response.json()).results[0];
  const best = result.artists[0];
  const verdict = result.unknown ? "Not like any gallery artist (unknown)"
    : `Closest gallery artist: ${best.artist} (${best.score.toFixed(3)})`;
  const section = element("div", "similar");
  section.append(element("p", result.unknown ? "gallery-artist unknown" : "gallery-artist", verdict));
  const strip = element("ul", "works");
  section.append(strip);
  body.append(section);
  for (const work of result.works) {
    const item = element("li", "work");
    item.title = `${work.artist} · ${work.name} · ${work.score.toFixed(3)}`;
    const image = element("img");
    image.alt = `${work.artist}: ${work.name}`;
    item.append(image, element("span", "work-artist", work.artist));
    strip.append(item);
    const thumb = await fetch(work.thumbnail, { headers: authHeaders() });  // the key travels as a header
    if (thumb.ok) image.src = URL.createObjectURL(await thumb.blob());
  }
}

async function classifyFiles(files) {
  const images = Array.from(files).filter((f) => f.type.startsWith("image/") || f.type === "");
  if (!images.length) {
    setStatus("Pick image files (JPEG, PNG, WebP, …).", true);
    return;
  }
  const cards = document.createDocumentFragment();  // this selection's cards, in order, above earlier ones
  const jobs = images.map((file) => [file, newCard(file, cards)]);
  $("results").prepend(cards);
  setStatus(`Classifying ${jobs.length} image${jobs.length > 1 ? "s" : ""}…`);
  let failed = 0;
  const worker = async () => {
    while (jobs.length) {
      const [file, body] = jobs.shift();
      if (!(await classifyOne(file, body))) failed += 1;
    }
  };
  await Promise.all(Array.from({ length: PARALLEL_REQUESTS }, worker));
  setStatus(failed ? `Done; ${failed} image${failed > 1 ? "s" : ""} could not be classified.` : "Done.", failed > 0);
}

function setUp() {
  const zone = $("drop-zone");
  $("file-input").addEventListener("change", (event) => {
    classifyFiles(event.target.files);
    event.target.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("dragging"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    classifyFiles(event.dataTransfer.files);
  });
  $("enroll-form").addEventListener("submit", enrollArtist);
  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("save-key").addEventListener("click", () => {
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
    loadModelInfo();
  });
  loadModelInfo();
}

setUp();
