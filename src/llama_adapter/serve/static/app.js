// The chat page: streams answers from /v1/chat/completions (OpenAI's SSE chunks), keeps the conversation,
// sends images as data: URLs in image_url parts. Plain JS, no build step, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "llama-adapter.api-key";
const MODEL_STORE = "llama-adapter.model";
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp"];

const state = { messages: [], models: [], image: null, controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

// The server answers errors as {"error": {"message": ...}}; anything else falls back to the status line.
async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return `${res.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `${res.status} ${res.statusText}`.trim();
}

function currentModel() {
  return state.models.find((m) => m.id === $("model").value);
}

async function loadModels() {
  const select = $("model");
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) throw new Error(await errorMessage(res));
    state.models = (await res.json()).data || [];
  } catch (e) {
    state.models = [];
    showError(`Could not list the models: ${e.message}`);
  }
  select.replaceChildren(...state.models.map((m) => {
    const method = m.method && m.method !== m.id ? ` (${m.method})` : "";
    const option = new Option(`${m.id}${method}${m.images ? " \u00b7 images" : ""}`, m.id);
    option.dataset.images = m.images ? "true" : "false";
    return option;
  }));
  const saved = localStorage.getItem(MODEL_STORE);
  if (state.models.some((m) => m.id === saved)) select.value = saved;
  if (state.models.length) showError("");
  updateImageSupport();
}

// Image upload is only offered for a model that takes images; a pending image is dropped on a switch.
function updateImageSupport() {
  const model = currentModel();
  const takesImages = Boolean(model && model.images);
  $("image").disabled = !takesImages;
  $("attach").classList.toggle("disabled", !takesImages);
  const hasImages = state.messages.some((m) => typeof m.content !== "string");
  $("model-note").textContent = !model || takesImages ? ""
    : `${model.id} takes no images${hasImages ? " (the conversation's images are not sent)" : ""}`;
  if (!takesImages && state.image) {
    setImage(null);
    showError(`${model ? model.id : "This model"} takes no images: the attached image was removed.`);
  }
}

function setImage(dataUrl) {
  state.image = dataUrl;
  $("pending").hidden = !dataUrl;
  if (dataUrl) $("pending-img").src = dataUrl;
  else $("pending-img").removeAttribute("src");
  if (!dataUrl) $("image").value = "";
}

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function onImagePicked() {
  const file = $("image").files[0];
  if (!file) return;
  if (!IMAGE_TYPES.includes(file.type)) {
    setImage(null);
    showError(`${file.name}: only PNG, JPEG and WebP images are accepted.`);
    return;
  }
  showError("");
  setImage(await readImage(file));
}

// One message on the page: role label, text, and the images of an image_url part.
function addMessage(role, content) {
  const box = document.createElement("div");
  box.className = `message ${role}`;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role === "user" ? "You" : $("model").value || "assistant";
  const text = document.createElement("div");
  text.className = "text";
  box.append(who);
  const parts = typeof content === "string" ? [{ type: "text", text: content }] : content;
  for (const part of parts) {
    if (part.type === "image_url") {
      const img = document.createElement("img");
      img.src = part.image_url.url;
      img.alt = "uploaded image";
      box.append(img);
    } else {
      text.textContent += part.text;
    }
  }
  box.append(text);
  const list = $("messages");
  list.querySelector(".empty")?.remove();
  list.append(box);
  box.scrollIntoView({ block: "end" });
  return { box, text };
}

// Server-sent events: `data: {chunk}` lines until `data: [DONE]`; yields each chunk's first choice.
async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.choices && chunk.choices.length) yield chunk.choices[0];
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("messages").setAttribute("aria-busy", String(busy));
}

// A text-only model gets the conversation without its images (the server refuses images for it).
function textOnly(message) {
  if (typeof message.content === "string") return message;
  const text = message.content.filter((p) => p.type === "text").map((p) => p.text).join("\n");
  return { role: message.role, content: text };
}

function requestBody() {
  const model = currentModel();
  const messages = model && !model.images ? state.messages.map(textOnly) : state.messages;
  const body = { model: $("model").value, messages, stream: true };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  return body;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  const image = state.image;
  if (state.controller || (!text && !image) || !$("model").value) return;
  showError("");
  const content = image ? [{ type: "text", text }, { type: "image_url", image_url: { url: image } }] : text;
  state.messages.push({ role: "user", content });
  const user = addMessage("user", content);
  $("prompt").value = "";
  setImage(null);
  const answer = addMessage("assistant", "");
  answer.box.classList.add("streaming");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let reply = "";
  let failed = false;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    for await (const choice of readEvents(res.body)) {
      if (choice.delta && choice.delta.content) {
        reply += choice.delta.content;
        answer.text.textContent = reply;
        answer.box.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason === "length") answer.box.dataset.note = "cut at max tokens";
    }
  } catch (e) {
    if (e.name === "AbortError") {
      answer.box.classList.add("stopped");
      answer.box.dataset.note = "stopped";
    } else {
      failed = true;
      showError(e.message);
    }
  } finally {
    state.controller = null;
    answer.box.classList.remove("streaming");
    setBusy(false);
  }
  if (reply) {
    state.messages.push({ role: "assistant", content: reply });
  } else if (failed) {
    // Nothing came back: take the turn out of the conversation and give the input back to retry.
    state.messages.pop();
    answer.box.remove();
    user.box.classList.add("failed");
    $("prompt").value = text;
    if (image && currentModel() && currentModel().images) setImage(image);
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("messages").replaceChildren();
  showError("");
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModels();
  });
  $("model").addEventListener("change", () => {
    localStorage.setItem(MODEL_STORE, $("model").value);
    updateImageSupport();
  });
  $("image").addEventListener("change", onImagePicked);
  $("remove-image").addEventListener("click", () => setImage(null));
  $("composer").addEventListener("submit", send);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || e.shiftKey || e.isComposing) return;
    e.preventDefault();
    $("composer").requestSubmit();
  });
  loadModels();
});
