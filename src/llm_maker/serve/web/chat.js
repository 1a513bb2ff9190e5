// The web chat: streams replies from /v1/chat/completions (OpenAI's server-sent events),
// keeps the multi-turn history, and marks the turns the server dropped to fit the context.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null, model: null, context: null };

function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = `message ${role}`;
  el.innerHTML = '<span class="role"></span><span class="text"></span>';
  el.querySelector(".role").textContent = role;
  el.querySelector(".text").textContent = text;
  $("messages").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function settings() {
  const topK = parseInt($("top-k").value, 10);
  return {
    temperature: parseFloat($("temperature").value),
    top_k: topK > 0 ? topK : null,
    top_p: parseFloat($("top-p").value),
    repetition_penalty: parseFloat($("repetition-penalty").value),
    max_tokens: parseInt($("max-tokens").value, 10),
  };
}

function requestMessages() {
  const system = $("system").value.trim();
  const turns = state.history.filter((m) => !m.dropped).map((m) => ({ role: m.role, content: m.content }));
  return system ? [{ role: "system", content: system }, ...turns] : turns;
}

// The server dropped the `n` oldest turns it was sent: grey them out and say so.
function markDropped(n) {
  if (n <= 0) return;
  const live = state.history.filter((m) => !m.dropped);
  live.slice(0, n).forEach((m) => { m.dropped = true; m.el.classList.add("dropped"); });
  const total = state.history.filter((m) => m.dropped).length;
  const note = $("context-note");
  note.textContent = `Dropped the ${n} oldest message${n === 1 ? "" : "s"} to fit the model's ` +
    `${state.context}-token context (${total} dropped so far); the model no longer sees them.`;
  note.hidden = false;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

// Yields the parsed JSON of each `data:` event of a server-sent event stream until [DONE].
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(text) {
  showError("");
  const user = { role: "user", content: text, dropped: false };
  user.el = addMessage("user", text);
  state.history.push(user);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  reply.dataset.state = "waiting";
  reply.dataset.chunks = "0";
  const textEl = reply.querySelector(".text");
  state.controller = new AbortController();
  setBusy(true);
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages: requestMessages(), stream: true, rolling_window: true, ...settings() }),
      signal: state.controller.signal,
    });
    if (!response.ok) {
      const message = await errorText(response);
      state.history.pop();
      user.el.remove();
      reply.remove();
      $("input").value = text;
      showError(message);
      return;
    }
    markDropped(parseInt(response.headers.get("X-Dropped-Messages") || "0", 10));
    reply.dataset.state = "streaming";
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        // A reply usually opens with the space the tokenizer glued to its first word.
        textEl.textContent = (textEl.textContent + choice.delta.content).trimStart();
        reply.dataset.chunks = String(parseInt(reply.dataset.chunks, 10) + 1);
        reply.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else showError(`error: ${e.message}`);
  } finally {
    state.controller = null;
    setBusy(false);
  }
  reply.classList.remove("streaming");
  reply.dataset.state = "done";
  reply.dataset.finish = finish || "";
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = finish === "length" ? "cut at max new tokens" : finish === "stopped" ? "stopped" : "";
  if (meta.textContent) reply.appendChild(meta);
  state.history.push({ role: "assistant", content: textEl.textContent, el: reply, dropped: false });
}

function clearConversation() {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").innerHTML = "";
  $("context-note").hidden = true;
  showError("");
  $("input").focus();
}

async function loadInfo() {
  try {
    const info = await (await fetch("/health")).json();
    state.model = info.model;
    state.context = info.context_length;
    const scaled = info.rope_scaling ? ` (RoPE ×${info.rope_scaling})` : "";
    $("model-info").textContent = `${info.model} · ${info.parameters.toLocaleString("en-US")} parameters · ` +
      `${info.context_length}-token context${scaled} · ${info.template} template`;
    // The reply budget must leave room for the conversation: at most half the context.
    const maxTokens = Math.min(info.max_tokens_limit, Math.floor(info.context_length / 2));
    $("max-tokens").max = maxTokens;
    $("max-tokens").value = Math.min(parseInt($("max-tokens").value, 10), maxTokens);
    if (info.stage !== "sft") {
      showError("This is a base (pretrained) model: it continues text and does not follow chat.");
    }
  } catch (e) {
    showError(`cannot reach the server: ${e.message}`);
  }
}

for (const id of ["temperature", "top-p", "repetition-penalty"]) {
  const sync = () => { $(`${id}-value`).textContent = $(id).value; };
  $(id).addEventListener("input", sync);
  sync();
}
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", clearConversation);
loadInfo();
