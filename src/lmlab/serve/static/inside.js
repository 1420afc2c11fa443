// The playground's Inside tab: POST /v1/inspect (format "page") and draw the answer with lmlab inspect's own
// page script (LmlabInspect.render from /static/inspect/inspect.js, the file behind lmlab inspect --html).
// "Trace the summary" sends the dialogue: the server's fine-tuned summarizer writes the summary and the page
// shades each turn by the attention the summary paid to it (lmlab.inspect.turns).
"use strict";

(function () {
  const root = $("inside-root"), stats = $("inside-stats");
  let listing = null, busy = false;

  async function loadListing() {
    if (listing) return;
    listing = await fetch("/v1/summarize/dialogues", { headers: headers() }).then((r) => r.json());
    for (const d of listing.dialogues || []) {
      const option = document.createElement("option");
      option.value = d.id;
      option.textContent = d.id + (d.topic ? " — " + d.topic : "");
      $("inside-pick").appendChild(option);
    }
    const tuned = (listing.recipes || []).includes("fine-tuned");
    $("inside-trace").disabled = !tuned;
    if (!tuned) $("inside-trace").title = "needs a server with a fine-tuned summarizer (the shipped adapter or --adapter)";
  }

  function layers() {
    const raw = $("inside-layers").value.trim();
    if (!raw) return undefined;
    const out = raw.split(/[\s,]+/).filter(Boolean).map((v) => Number(v));
    if (out.some((v) => !Number.isInteger(v))) throw new Error("layers: " + JSON.stringify(raw) + " is not a list of integers");
    return out;
  }

  async function inspect(extra) {
    if (busy) return;
    let body;
    try { body = Object.assign({ format: "page", layers: layers() }, extra); } catch (err) {
      stats.innerHTML = '<span class="error"></span>'; stats.firstChild.textContent = err.message; return;
    }
    busy = true;
    $("inside-run").disabled = true;
    stats.textContent = body.dialogue ? "summarizing and tracing…" : "inspecting…";
    const started = performance.now();
    try {
      const response = await fetch("/v1/inspect", { method: "POST", headers: headers(), body: JSON.stringify(body) });
      const data = await response.json();
      if (!response.ok) throw new Error(data.error ? data.error.message : response.status + " " + response.statusText);
      LmlabInspect.render(root, data, { endpoint: "/v1/inspect", headers, textBox: false });
      stats.textContent = data.tokens.length + " tokens in " + ((performance.now() - started) / 1000).toFixed(2) + " s";
      stats.dataset.done = String(Number(stats.dataset.done || 0) + 1);
    } catch (err) {
      stats.innerHTML = '<span class="error"></span>';
      stats.firstChild.textContent = err.message;
    } finally {
      busy = false;
      $("inside-run").disabled = false;
    }
  }

  $("tab-inside").addEventListener("click", async () => {
    try { await loadListing(); } catch (err) { stats.textContent = "could not list the dialogues: " + err.message; }
    if (!root.childElementCount) inspect({ text: $("inside-text").value });
  });
  $("inside-pick").addEventListener("change", () => {
    const chosen = ((listing && listing.dialogues) || []).find((d) => d.id === $("inside-pick").value);
    if (chosen) $("inside-text").value = chosen.dialogue;
  });
  $("inside-run").addEventListener("click", () => inspect({ text: $("inside-text").value }));
  $("inside-trace").addEventListener("click", () => inspect({ dialogue: $("inside-text").value }));
})();
