// lmlab playground: plain JavaScript, no build step, no CDN. Talks to the same server's /v1 API and
// reads its Server-Sent Events with fetch() (EventSource cannot POST).
"use strict";

const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// POST `body` to `path` with stream: true; call onEvent(json) for every `data:` event until [DONE].
async function streamPost(path, body, onEvent, signal) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {       // one SSE event per blank-line-terminated block
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        onEvent(event);
      }
    }
  }
}

function numberField(id, integer) {
  const value = integer ? parseInt($(id).value, 10) : parseFloat($(id).value);
  if (Number.isNaN(value)) throw new Error($(id).closest("label").firstChild.textContent.trim() + " is not a number");
  return value;
}

function knobs(prefix) {
  return {
    temperature: numberField(prefix + "-temperature", false),
    top_k: numberField(prefix + "-top-k", true),
    top_p: numberField(prefix + "-top-p", false),
    max_tokens: numberField(prefix + "-max-tokens", true),
  };
}

// tokens/s from the first token on (prefill time is the time to first token, shown separately); when every
// token arrived in one network read there is no spread to measure, so fall back to the whole request
function rate(tokens, firstAt, endAt, started) {
  const seconds = (endAt - firstAt) / 1000;
  if (tokens > 1 && seconds > 0.001) return ((tokens - 1) / seconds).toFixed(1);
  const total = (endAt - started) / 1000;
  return tokens > 0 && total > 0 ? (tokens / total).toFixed(1) : "–";
}

// --- tabs ---------------------------------------------------------------------------------------------
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const other of document.querySelectorAll(".tab")) {
      other.classList.toggle("active", other === tab);
      other.setAttribute("aria-selected", String(other === tab));
      $(other.dataset.panel).hidden = other !== tab;
    }
  });
}

// --- start-up: model, health, bundled dialogues --------------------------------------------------------
let dialogues = [];

async function init() {
  const info = $("model-info");
  for (;;) {
    const health = await fetch("/health").then((r) => r.json()).catch(() => ({ status: "unreachable" }));
    if (health.status === "ok") { info.textContent = health.model; info.className = "ready"; break; }
    info.textContent = "model " + health.status + "…"; info.className = "loading";
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  try {
    const listing = await fetch("/v1/summarize/dialogues", { headers: headers() }).then((r) => r.json());
    dialogues = listing.dialogues || [];
    for (const d of dialogues) {
      const option = document.createElement("option");
      option.value = d.id;
      option.textContent = d.id + (d.topic ? " — " + d.topic : "");
      $("dialogue-pick").appendChild(option);
    }
    for (const recipe of listing.recipes || []) {
      const option = document.createElement("option");
      option.value = recipe;
      option.textContent = recipe;
      option.selected = recipe === listing.default_recipe;
      $("recipe").appendChild(option);
      for (const side of ["cmp-recipe-a", "cmp-recipe-b"]) $(side).appendChild(option.cloneNode(true));
    }
    for (const option of $("dialogue-pick").options) {
      if (option.value) $("cmp-pick").appendChild(option.cloneNode(true));
    }
    if (listing.finetuned_mbr) {   // the fine-tuned recipe decodes by minimum Bayes risk unless unticked
      const m = listing.finetuned_mbr;
      $("sum-mbr-what").textContent = "the consensus of " + m.n + " samples" +
        (m.temperature !== undefined ? " at T=" + m.temperature : "") + " (minimum Bayes risk)";
      $("sum-mbr-row").hidden = false;
    }
    if (!listing.index) {
      $("ask").disabled = true;
      $("ask-stats").textContent = "this server has no index (start it with lmlab serve MODEL --index INDEX)";
    }
    if (!listing.preferences) {
      $("cmp-stats").textContent = "this server records no choices (start it with lmlab serve --prefs-out FILE)";
    }
  } catch (err) {
    $("sum-stats").innerHTML = '<span class="error">' + err.message + "</span>";
  }
}

$("dialogue-pick").addEventListener("change", () => {
  const chosen = dialogues.find((d) => d.id === $("dialogue-pick").value);
  if (chosen) $("dialogue").value = chosen.dialogue;
});

// --- summarize ----------------------------------------------------------------------------------------
$("summarize").addEventListener("click", async () => {
  const out = $("summary"), stats = $("sum-stats"), button = $("summarize");
  out.textContent = "";
  stats.textContent = "";
  let body;
  try {
    body = { dialogue: $("dialogue").value, recipe: $("recipe").value, stream: true };
    if (body.recipe === "fine-tuned" && !$("sum-mbr-row").hidden && $("sum-mbr").checked) {
      body.max_tokens = numberField("sum-max-tokens", true);   // the recipe's decoding: the server fills it in
    } else {
      Object.assign(body, knobs("sum"), { best_of: 1 });
    }
  } catch (err) { stats.innerHTML = '<span class="error">' + err.message + "</span>"; return; }
  button.disabled = true;
  out.classList.add("streaming");
  const started = performance.now();
  let firstAt = null, chunks = 0;
  try {
    await streamPost("/v1/summarize", body, (event) => {
      const now = performance.now();
      if (event.delta !== undefined) {
        if (firstAt === null) firstAt = now;
        chunks += 1;
        out.textContent += event.delta;
        stats.innerHTML = "<b>" + chunks + "</b> tokens · " + rate(chunks, firstAt, now, started) + " tokens/s";
      } else if (event.summary !== undefined) {   // the final event: cleaned summary and exact usage
        out.textContent = event.summary;
        const u = event.usage;
        stats.innerHTML = "prompt <b>" + u.prompt_tokens + "</b> tokens · generated <b>" + u.completion_tokens +
          "</b> tokens · <b>" + rate(u.completion_tokens, firstAt ?? now, now, started) + "</b> tokens/s · first token " +
          ((firstAt ?? now) - started).toFixed(0) + " ms · " + event.recipe + " (" + event.shots + " shots) · " +
          event.finish_reason + (event.best_of > 1 ? " · consensus of " + event.best_of + " samples" : "");
      }
    });
  } catch (err) {
    stats.innerHTML = '<span class="error">' + err.message + "</span>";
  } finally {
    out.classList.remove("streaming");
    button.disabled = false;
  }
});

// --- compare: two summaries of one dialogue, shuffled and unlabeled; the person's choice is appended ------
let pair = null;   // {dialogue, texts: [shown 1, shown 2], sources: [...]} while a choice is pending

$("cmp-pick").addEventListener("change", () => {
  const chosen = dialogues.find((d) => d.id === $("cmp-pick").value);
  if (chosen) $("cmp-dialogue").value = chosen.dialogue;
});

function setChoosing(on) {
  for (const id of ["cmp-choose-1", "cmp-choose-2", "cmp-skip"]) $(id).disabled = !on;
}

async function summarizeOnce(dialogue, recipe, temperature, maxTokens) {
  const response = await fetch("/v1/summarize", { method: "POST", headers: headers(), body: JSON.stringify(
    { dialogue, recipe, temperature, max_tokens: maxTokens }) });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error.message);
  return body.summary;
}

$("cmp-generate").addEventListener("click", async () => {
  const stats = $("cmp-stats"), button = $("cmp-generate");
  const dialogue = $("cmp-dialogue").value;
  let temperature, maxTokens;
  try {
    temperature = numberField("cmp-temperature", false);
    maxTokens = numberField("cmp-max-tokens", true);
  } catch (err) { stats.innerHTML = '<span class="error">' + err.message + "</span>"; return; }
  const recipes = [$("cmp-recipe-a").value, $("cmp-recipe-b").value];
  pair = null;
  setChoosing(false);
  $("cmp-1").textContent = $("cmp-2").textContent = "";
  stats.textContent = "generating…";
  button.disabled = true;
  try {
    const texts = await Promise.all(recipes.map((r) => summarizeOnce(dialogue, r, temperature, maxTokens)));
    const sources = recipes.map((r, i) => "recipe " + r + " (" + "AB"[i] + ") T=" + temperature);
    if (texts[0] === texts[1]) {
      stats.textContent = "both summaries are the same text: nothing to choose between (raise the temperature or pick two recipes)";
      $("cmp-1").textContent = $("cmp-2").textContent = texts[0];
      return;
    }
    const order = Math.random() < 0.5 ? [0, 1] : [1, 0];   // which of A/B is shown first
    pair = { dialogue, texts: order.map((i) => texts[i]), sources: order.map((i) => sources[i]) };
    $("cmp-1").textContent = pair.texts[0];
    $("cmp-2").textContent = pair.texts[1];
    stats.textContent = "which summary is better?";
    setChoosing(true);
  } catch (err) {
    stats.innerHTML = '<span class="error">' + err.message + "</span>";
  } finally {
    button.disabled = false;
  }
});

async function choose(k) {   // k: 0 or 1, the shown summary the person prefers
  const stats = $("cmp-stats");
  if (!pair) return;
  setChoosing(false);
  const record = { prompt: pair.dialogue, chosen: pair.texts[k], rejected: pair.texts[1 - k],
                   source: "playground compare: " + pair.sources[k] + " > " + pair.sources[1 - k] };
  try {
    const response = await fetch("/v1/preferences", { method: "POST", headers: headers(), body: JSON.stringify(record) });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error.message);
    stats.innerHTML = "saved: record <b>" + body.records + "</b> of " + body.file + " · 1 was " + pair.sources[0] +
      ", 2 was " + pair.sources[1];
    pair = null;
  } catch (err) {
    stats.innerHTML = '<span class="error">' + err.message + "</span>";
    setChoosing(true);
  }
}

$("cmp-choose-1").addEventListener("click", () => choose(0));
$("cmp-choose-2").addEventListener("click", () => choose(1));
$("cmp-skip").addEventListener("click", () => {
  pair = null;
  setChoosing(false);
  $("cmp-stats").textContent = "skipped";
});

// --- chat ---------------------------------------------------------------------------------------------
const history = [];

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

async function send() {
  const text = $("chat-input").value.trim();
  const stats = $("chat-stats");
  if (!text) return;
  let settings;
  try { settings = knobs("chat"); } catch (err) { stats.innerHTML = '<span class="error">' + err.message + "</span>"; return; }
  $("chat-input").value = "";
  history.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant", "");
  reply.classList.add("streaming");
  $("send").disabled = true;
  const started = performance.now();
  let firstAt = null, answer = "";
  try {
    await streamPost("/v1/chat/completions", Object.assign({ messages: history, stream: true }, settings), (event) => {
      const now = performance.now();
      if (event.choices && event.choices.length && event.choices[0].delta.content) {
        if (firstAt === null) firstAt = now;
        answer += event.choices[0].delta.content;
        reply.textContent = answer;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
      if (event.usage) {
        const u = event.usage;
        stats.innerHTML = "prompt <b>" + u.prompt_tokens + "</b> tokens · generated <b>" + u.completion_tokens +
          "</b> tokens · <b>" + rate(u.completion_tokens, firstAt ?? now, now, started) + "</b> tokens/s · first token " +
          ((firstAt ?? now) - started).toFixed(0) + " ms";
      }
    });
    history.push({ role: "assistant", content: answer });
  } catch (err) {
    history.pop();
    reply.remove();
    stats.innerHTML = '<span class="error">' + err.message + "</span>";
  } finally {
    reply.classList.remove("streaming");
    $("send").disabled = false;
  }
}

$("send").addEventListener("click", send);
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
$("clear").addEventListener("click", () => { history.length = 0; $("messages").textContent = ""; $("chat-stats").textContent = ""; });

// --- ask: a question answered from the served index, streamed, with its sources --------------------------
async function openSource(id, button) {
  for (const b of document.querySelectorAll("#ask-sources button")) b.classList.toggle("open", b === button);
  $("ask-doc-title").textContent = "Dialogue " + id;
  try {
    const response = await fetch("/v1/documents/" + encodeURIComponent(id), { headers: headers() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error.message);
    const meta = Object.entries(body.meta || {}).map(([k, v]) => k + "=" + v).join(" · ");
    $("ask-doc-title").textContent = "Dialogue " + id + (meta ? " (" + meta + ")" : "");
    $("ask-doc").textContent = body.text;
  } catch (err) {
    $("ask-doc").innerHTML = '<span class="error">' + err.message + "</span>";
  }
}

function showSources(sources, answer) {
  const list = $("ask-sources");
  list.textContent = "";
  for (const s of sources) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.className = "source" + (answer.includes("[" + s.id + "]") ? " cited" : "");
    button.dataset.id = s.id;
    button.textContent = s.id + " ";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = "score " + s.score.toFixed(3);
    button.appendChild(score);
    button.addEventListener("click", () => openSource(s.id, button));
    item.appendChild(button);
    list.appendChild(item);
  }
}

$("ask").addEventListener("click", async () => {
  const question = $("ask-input").value.trim();
  const out = $("ask-answer"), stats = $("ask-stats"), button = $("ask");
  if (!question) return;
  let k, maxTokens;
  try {
    k = numberField("ask-k", true);
    maxTokens = numberField("ask-max-tokens", true);
  } catch (err) { stats.innerHTML = '<span class="error">' + err.message + "</span>"; return; }
  out.textContent = "";
  stats.textContent = "";
  $("ask-sources").textContent = "";
  $("ask-doc").textContent = "";
  button.disabled = true;
  out.classList.add("streaming");
  const started = performance.now();
  let firstAt = null, answer = "";
  try {
    const body = { messages: [{ role: "user", content: question }], stream: true, temperature: 0,
                   max_tokens: maxTokens, retrieval: { k } };
    await streamPost("/v1/chat/completions", body, (event) => {
      const now = performance.now();
      if (event.choices && event.choices.length && event.choices[0].delta.content) {
        if (firstAt === null) firstAt = now;
        answer += event.choices[0].delta.content;
        out.textContent = answer;
      }
      if (event.sources) showSources(event.sources, answer);   // the final chunk: the retrieved sources
      if (event.usage) {
        const u = event.usage;
        stats.innerHTML = "prompt <b>" + u.prompt_tokens + "</b> tokens (" + (event.sources || []).length +
          " sources) · generated <b>" + u.completion_tokens + "</b> tokens · first token " +
          ((firstAt ?? now) - started).toFixed(0) + " ms";
      }
    });
  } catch (err) {
    stats.innerHTML = '<span class="error">' + err.message + "</span>";
  } finally {
    out.classList.remove("streaming");
    button.disabled = false;
  }
});
$("ask-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").click(); }
});

init();
