/* lmlab inspect: the page behind `lmlab inspect --html` (and the playground's Inside tab).
 *
 * LmlabInspect.render(root, data, options) draws an Inspection in its page form (lmlab.inspect.html.page_data):
 * tokens (hover one: where the chosen head attends from it), the attention heatmap or all heads as small
 * multiples, per-head summaries, embedding neighbours and PCA, the positional scheme, the residual stream and
 * logit lens, feed-forward sparsity, and the next-token distribution with live temperature / top-k / top-p /
 * min-p filtering -- the four steps of lmlab.generation.processors, in its order, over the whole vocabulary.
 * options.endpoint (e.g. "/v1/inspect"): a server to ask for more decoding steps and for new texts;
 * options.headers(): extra request headers (the playground's API key); options.textBox: false leaves out the
 * page's own text box (the playground has its own).
 */
(function () {
  "use strict";

  function bytes(b64) {
    const bin = atob(b64), out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }
  const f32 = (b64) => new Float32Array(bytes(b64).buffer);
  const el = (tag, attrs, ...kids) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
    }
    for (const kid of kids) if (kid != null) e.append(kid);
    return e;
  };
  const SVG = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs) => {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  };
  const shown = (piece) => (piece == null ? "" : String(piece).replace(/Ġ/g, " ").replace(/Ċ/g, "\\n").replace(/▁/g, " "));

  /* --- attention blocks: (L, H, T, S) uint8, dense or top-k per row ------------------------------- */
  function decodeBlock(block) {
    const [L, H, T, S] = block.shape;
    let dense;
    if (block.format === "dense") {
      dense = bytes(block.data);
    } else {
      const idx = S < 32768 ? new Int16Array(bytes(block.index).buffer) : new Int32Array(bytes(block.index).buffer);
      const val = bytes(block.data), k = block.k;
      dense = new Uint8Array(L * H * T * S);
      for (let r = 0; r < L * H * T; r++)
        for (let j = 0; j < k; j++) dense[r * S + idx[r * k + j]] = val[r * k + j];
    }
    return { L, H, T, S, dense, sparse: block.format !== "dense", k: block.k };
  }

  /* --- the sampling filter: lmlab.generation.processors, same steps, same order ------------------ */
  function softmax(x) {
    let m = -Infinity;
    for (const v of x) if (v > m) m = v;
    const p = new Float64Array(x.length);
    let z = 0;
    for (let i = 0; i < x.length; i++) { p[i] = x[i] === -Infinity ? 0 : Math.exp(x[i] - m); z += p[i]; }
    for (let i = 0; i < x.length; i++) p[i] /= z;
    return p;
  }
  function filterLogits(logits, s) {
    const V = logits.length, x = Float64Array.from(logits);
    if (s.temperature !== 1) for (let i = 0; i < V; i++) x[i] = Math.fround(x[i] / s.temperature);
    if (s.top_k > 0) { // keep scores >= the k-th best (ties kept)
      const k = Math.min(s.top_k, V), kth = Float64Array.from(x).sort()[V - k];
      for (let i = 0; i < V; i++) if (x[i] < kth) x[i] = -Infinity;
    }
    if (s.top_p < 1) { // drop from the unlikely end while the dropped mass stays <= 1 - p; the best is never dropped
      const order = Array.from(x.keys()).sort((a, b) => x[a] - x[b]);
      const p = softmax(x);
      let cum = 0;
      const drop = [];
      for (let r = 0; r < V; r++) { cum += p[order[r]]; if (cum <= 1 - s.top_p && r < V - 1) drop.push(order[r]); }
      for (const i of drop) x[i] = -Infinity;
    }
    if (s.min_p > 0) {
      const p = softmax(x);
      let m = 0;
      for (const v of p) if (v > m) m = v;
      for (let i = 0; i < V; i++) if (p[i] < s.min_p * m) x[i] = -Infinity;
    }
    return x;
  }

  /* --- heatmaps on a canvas ----------------------------------------------------------------------- */
  function heat(canvas, rows, cols, value, opts) {
    opts = opts || {};
    const cell = Math.max(1, Math.min(opts.maxCell || 14, Math.floor((opts.size || 360) / Math.max(rows, cols))));
    canvas.width = cols * cell; canvas.height = rows * cell;
    const ctx = canvas.getContext("2d");
    const lo = opts.lo != null ? opts.lo : 0, hi = opts.hi != null ? opts.hi : 1;
    for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
      const v = value(r, c);
      if (opts.diverging) {
        const t = Math.max(-1, Math.min(1, v / Math.max(Math.abs(lo), Math.abs(hi), 1e-9)));
        ctx.fillStyle = t >= 0 ? `rgba(207,34,46,${t})` : `rgba(37,99,235,${-t})`;
      } else {
        const t = Math.max(0, Math.min(1, (v - lo) / (hi - lo || 1)));
        ctx.fillStyle = `rgba(37,99,235,${Math.sqrt(t)})`;
      }
      ctx.fillRect(c * cell, r * cell, cell, cell);
    }
    if (opts.highlightRow != null) {
      ctx.strokeStyle = "#cf222e"; ctx.lineWidth = Math.max(1, cell / 4);
      ctx.strokeRect(0, opts.highlightRow * cell, cols * cell, cell);
    }
    return canvas;
  }

  function barChart(items, opts) { // items: [{label, value, cut}]
    const w = opts.width || 420, rowH = opts.rowH || 16, lab = opts.labelWidth || 120;
    const s = svg("svg", { width: w, height: items.length * rowH + 4, class: opts.cls || "" });
    const max = Math.max(1e-12, ...items.map((d) => d.value));
    items.forEach((d, i) => {
      const y = i * rowH + 2;
      const t = svg("text", { x: lab - 4, y: y + rowH - 5, "text-anchor": "end", class: "barlabel" + (d.cut ? " cut" : "") });
      t.textContent = d.label;
      s.append(t);
      s.append(svg("rect", { x: lab, y, width: Math.max(1, (w - lab - 60) * d.value / max), height: rowH - 3,
                              class: "bar" + (d.cut ? " cut" : ""), "data-cut": d.cut ? "1" : "0" }));
      const v = svg("text", { x: w - 56, y: y + rowH - 5, class: "barlabel" });
      v.textContent = opts.format ? opts.format(d.value) : d.value >= 1e-3 ? d.value.toFixed(3) : d.value.toExponential(1);
      s.append(v);
    });
    return s;
  }

  /* --- the page ----------------------------------------------------------------------------------- */
  function render(root, data, options) {
    options = options || {};
    root.innerHTML = "";
    root.classList.add("lmi");
    if (!data) { root.append(el("p", { text: "no inspection data" })); return; }
    const encdec = data.arch === "encoder_decoder";
    const blocks = {};
    for (const [k, b] of Object.entries(data.attention)) blocks[k] = decodeBlock(b);
    const stackNames = Object.keys(blocks);
    const st = {
      stack: data.start.stack, layer: data.start.layer, head: data.start.head, query: null, nSteps: 0,
      sampling: Object.assign({ temperature: 1, top_k: 0, top_p: 1, min_p: 0 }, data.sampling || {}),
    };
    root.__lmi = st;
    const steps = () => data.steps.slice(0, st.nSteps);
    // token rows: "src" (the text) and, for encoder-decoders, "tgt" (the decoder's tokens); steps extend the
    // decoder side
    const srcTokens = () => data.tokens.map((t, i) => ({ t, special: data.special[i] }))
      .concat(encdec ? [] : steps().map((s) => ({ t: s.token, stepped: true })));
    const tgtTokens = () => (data.target_tokens || []).map((t) => ({ t }))
      .concat(steps().map((s) => ({ t: s.token, stepped: true })));
    const rowsOf = (stack) => (!encdec ? ["src", "src"] : stack === "encoder" ? ["src", "src"]
      : stack === "decoder" ? ["tgt", "tgt"] : ["tgt", "src"]);
    const layerIndex = () => data.layers[st.stack].indexOf(st.layer);

    function weight(stack, li, h, q, k) { // one attention weight, including the rows that steps added
      const b = blocks[stack];
      if (q < b.T) return k < b.S ? b.dense[((li * b.H + h) * b.T + q) * b.S + k] / 255 : 0;
      const step = data.steps[q - b.T];
      if (!step || !step.rows[stack]) return 0;
      if (!step._rows) step._rows = {};
      if (!step._rows[stack]) step._rows[stack] = bytes(step.rows[stack].data);
      const S = step.rows[stack].shape[2];
      return k < S ? step._rows[stack][(li * b.H + h) * S + k] / 255 : 0;
    }
    function headWeight(q, k) {
      const b = blocks[st.stack], li = layerIndex();
      if (st.head !== "all") return weight(st.stack, li, st.head, q, k);
      let s = 0;
      for (let h = 0; h < b.H; h++) s += weight(st.stack, li, h, q, k);
      return s / b.H;
    }

    /* header */
    root.append(el("h1", { text: `Inside ${data.model || "the model"}` }),
      el("div", { class: "sub", text: `${data.arch}; ${data.tokens.length} tokens; tokenizer ${data.tokenizer || "?"}; ` +
        `attention stored as uint8 (1/255 steps)` }));
    for (const n of data.notes || []) root.append(el("div", { class: "note", text: n }));
    if (options.endpoint && options.textBox !== false) {
      const box = el("textarea", { id: "text-input", rows: 3, cols: 80 });
      box.value = data.text || "";
      root.append(el("div", { class: "controls" }, box, el("button", { id: "inspect-run", text: "Inspect",
        onclick: () => ask({ text: box.value, steps: 3 }) })));
    }
    const grid = el("div", { class: "grid" });
    root.append(grid);

    /* tokens + attention controls */
    const tokCard = el("div", { class: "card", id: "tokens-card" });
    grid.append(tokCard);
    const stackSel = el("select", { id: "stack" }, ...stackNames.map((s) => el("option", { value: s, text: s })));
    stackSel.value = st.stack;
    const layerSel = el("select", { id: "layer" });
    const headSel = el("select", { id: "head" });
    const viewSel = el("select", { id: "view" }, el("option", { value: "one", text: "one head" }),
      el("option", { value: "multi", text: "all heads (small multiples)" }));
    const controls = el("div", { class: "controls" },
      el("label", {}, "stack ", stackSel), el("label", {}, "layer ", layerSel), el("label", {}, "head ", headSel),
      el("label", {}, "view ", viewSel));
    const tokRows = el("div", { id: "token-rows" });
    const attnBox = el("div", { id: "attn-box" });
    const summaryBox = el("div", { id: "head-summary" });
    tokCard.append(el("h2", { text: "Tokens and attention" }),
      el("div", { class: "sub", text: "hover a token: the keys it attends to light up (chosen layer and head)" }),
      controls, tokRows, attnBox, summaryBox);

    function fillLayerHead() {
      layerSel.innerHTML = "";
      for (const l of data.layers[st.stack]) layerSel.append(el("option", { value: l, text: l }));
      if (!data.layers[st.stack].includes(st.layer)) st.layer = data.layers[st.stack][data.layers[st.stack].length - 1];
      layerSel.value = st.layer;
      headSel.innerHTML = "";
      for (let h = 0; h < blocks[st.stack].H; h++) headSel.append(el("option", { value: h, text: h }));
      headSel.append(el("option", { value: "all", text: "mean of heads" }));
      headSel.value = st.head;
    }
    stackSel.addEventListener("change", () => { st.stack = stackSel.value; st.query = null; fillLayerHead(); drawAttention(); });
    layerSel.addEventListener("change", () => { st.layer = +layerSel.value; drawAttention(); });
    headSel.addEventListener("change", () => { st.head = headSel.value === "all" ? "all" : +headSel.value; drawAttention(); });
    viewSel.addEventListener("change", drawAttention);

    let tokSig = null;
    function drawTokens() { // rebuild the spans when the token rows change; otherwise only re-shade them
      const [qRow, kRow] = rowsOf(st.stack);
      const sig = `${st.stack}/${st.nSteps}`;
      if (sig !== tokSig) {
        tokSig = sig;
        tokRows.innerHTML = "";
        const lists = { src: srcTokens(), tgt: tgtTokens() };
        for (const row of encdec ? ["src", "tgt"] : ["src"]) {
          const div = el("div", { class: "toks", id: `tokens-${row}` });
          if (encdec) div.append(el("span", { class: "sub", text: row === "src" ? "input: " : "target: " }));
          lists[row].forEach((tok, i) => {
            const cls = "tok" + (tok.special ? " special" : "") + (tok.stepped ? " stepped" : "");
            const span = el("span", { class: cls, "data-i": i, "data-row": row, title: `#${i}`, text: shown(tok.t) });
            if (row === qRow) span.addEventListener("mouseenter", () => { st.query = i; drawAttention(); showNeighbours(i, row); });
            div.append(span);
          });
          tokRows.append(div);
        }
      }
      for (const span of tokRows.querySelectorAll(".tok")) {
        const i = +span.dataset.i, row = span.dataset.row;
        span.classList.toggle("query", row === qRow && st.query === i);
        if (row === kRow && st.query != null) {
          const w = headWeight(st.query, i);
          span.style.background = `rgba(37,99,235,${Math.sqrt(w).toFixed(3)})`;
          span.style.color = w > 0.35 ? "#fff" : "";
          span.dataset.w = w.toFixed(4);
        } else {
          span.style.background = ""; span.style.color = ""; delete span.dataset.w;
        }
      }
    }

    function drawAttention() {
      drawTokens();
      attnBox.innerHTML = "";
      const [qRow, kRow] = rowsOf(st.stack);
      const T = (qRow === "src" ? srcTokens() : tgtTokens()).length;
      const S = (kRow === "src" ? srcTokens() : tgtTokens()).length;
      const b = blocks[st.stack];
      if (b.sparse) attnBox.append(el("div", { class: "note", text: `long text: each query row keeps its ${b.k} strongest keys` }));
      if (viewSel.value === "multi") {
        const wrap = el("div", { class: "multi", id: "multiples" });
        for (let h = 0; h < b.H; h++) {
          const c = heat(el("canvas", {}), T, S, (q, k) => weight(st.stack, layerIndex(), h, q, k),
            { size: 140, maxCell: 6, highlightRow: st.query });
          wrap.append(el("figure", { onclick: () => { st.head = h; headSel.value = h; viewSel.value = "one"; drawAttention(); } },
            c, el("figcaption", { text: `head ${h}` })));
        }
        attnBox.append(wrap);
      } else {
        attnBox.append(heat(el("canvas", { id: "attn-canvas" }), T, S, headWeight, { size: 420, maxCell: 40, highlightRow: st.query }));
      }
      drawSummary();
    }

    function drawSummary() {
      const rows = data.head_summary[st.stack][layerIndex()] || [];
      const cross = st.stack === "cross";
      const table = el("table", { id: "summary-table" },
        el("tr", {}, el("th", { text: "head" }), el("th", { text: "entropy (nats)" }),
          cross ? null : el("th", { text: "mean distance" }), el("th", { text: "on first token" })));
      rows.forEach((r, h) => table.append(el("tr", {}, el("td", { text: h }), el("td", { text: r.entropy.toFixed(2) }),
        cross ? null : el("td", { text: r.distance.toFixed(1) }), el("td", { text: r.first.toFixed(2) }))));
      summaryBox.innerHTML = "";
      summaryBox.append(el("h2", { text: `Layer ${st.layer}: per-head summaries` }), table);
    }

    const outCard = el("div", { class: "card", id: "output" });
    grid.append(outCard);

    /* which turns a summary drew on (lmlab inspect --summarize) */
    if (data.summary_turns) {
      const t = data.summary_turns, card = el("div", { class: "card wide", id: "summary-turns" });
      grid.append(card);
      const top = Math.max(...t.share, 1e-9);
      card.append(el("h2", { text: "Which turns the summary drew on" }),
        el("div", { class: "sub", text: `summary (${t.adapter || "model"}): ${t.summary}` }),
        el("div", { class: "sub", text: `shading: ${t.averaging}; shares normalized over the turns` }),
        ...t.turns.map((turn, i) => el("div", { class: "turn", "data-share": t.share[i].toFixed(4),
          style: `background: rgba(37,99,235,${(0.6 * t.share[i] / top).toFixed(3)}); padding: 2px 6px; margin: 1px 0` },
          el("span", { class: "sub", text: `${(100 * t.share[i]).toFixed(1)}%  ` }), turn)));
    }

    /* embeddings */
    const embCard = el("div", { class: "card" });
    grid.append(embCard);
    const nbBox = el("div", { id: "neighbours" });
    embCard.append(el("h2", { text: "Embeddings" }),
      el("div", { class: "sub", text: "nearest neighbours in the embedding table (cosine); hover a token above" }), nbBox);
    function showNeighbours(i, row) {
      if (row !== "src" || i >= data.embeddings.neighbours.length) return;
      nbBox.innerHTML = "";
      nbBox.append(el("div", {}, el("b", { text: shown(data.tokens[i]) }), " \u2192 ",
        data.embeddings.neighbours[i].map((n) => `${shown(n.token)} (${n.cos.toFixed(2)})`).join(", ")));
    }
    showNeighbours(Math.min(1, data.tokens.length - 1), "src");
    {
      const pts = data.embeddings.pca, W = 400, Hh = 260, pad = 30;
      const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
      const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
      const s = svg("svg", { width: W, height: Hh, id: "pca" });
      pts.forEach((p, i) => {
        const x = pad + (W - 2 * pad) * (p[0] - x0) / ((x1 - x0) || 1), y = Hh - pad - (Hh - 2 * pad) * (p[1] - y0) / ((y1 - y0) || 1);
        s.append(svg("circle", { cx: x, cy: y, r: 3, fill: "#2563eb" }));
        const t = svg("text", { x: x + 4, y: y - 3, class: "barlabel" });
        t.textContent = shown(data.tokens[i]);
        s.append(t);
      });
      const ev = data.embeddings.pca_explained;
      embCard.append(el("div", { class: "sub", text: `PCA of the text's token embeddings (PC1 ${(100 * ev[0]).toFixed(0)}%, ` +
        `PC2 ${(100 * ev[1]).toFixed(0)}% of their variance)` }), s);
    }

    /* positions */
    const posCard = el("div", { class: "card", id: "positions" });
    grid.append(posCard);
    {
      const p = data.positions;
      posCard.append(el("h2", { text: `Positions: ${p.kind}` }));
      if (p.kind === "sinusoidal") {
        posCard.append(el("div", { class: "sub", text: "the sinusoidal table: position (rows) x dimension (columns)" }),
          heat(el("canvas", {}), p.sinusoidal.length, p.sinusoidal[0].length, (r, c) => p.sinusoidal[r][c], { diverging: true, lo: -1, hi: 1, size: 400 }));
      } else if (p.kind === "learned") {
        posCard.append(el("div", { class: "sub", text: "learned position embeddings: cosine similarity between positions" }),
          heat(el("canvas", {}), p.learned_similarity.length, p.learned_similarity.length,
            (r, c) => p.learned_similarity[r][c], { diverging: true, lo: -1, hi: 1, size: 320 }));
      } else if (p.kind === "rope") {
        posCard.append(el("div", { class: "sub", text: "RoPE: wavelength (tokens per turn) of each rotated dimension pair, log scale" }),
          barChart(p.rope_wavelength.map((w, i) => ({ label: `pair ${i}`, value: Math.log10(w) })),
            { width: 400, labelWidth: 60, rowH: 12, format: (v) => `10^${v.toFixed(1)}` }));
      } else if (p.kind === "t5_relative") {
        for (const which of ["encoder", "decoder"]) {
          if (!p[`${which}_bias`]) continue;
          const bias = p[`${which}_bias`], bk = p[`${which}_buckets`];
          let lo = 0, hi = 0;
          for (const r of bias) for (const v of r) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
          posCard.append(el("div", { class: "sub", text: `${which}: learned bias per head (rows) and bucket (columns)` }),
            heat(el("canvas", {}), bias.length, bias[0].length, (r, c) => bias[r][c], { diverging: true, lo, hi, size: 360 }),
            el("div", { class: "sub", text: `${which}: bucket of each (query, key) distance` }),
            heat(el("canvas", {}), bk.length, bk.length, (r, c) => bk[r][c], { lo: 0, hi: 31, size: 200 }));
        }
      } else {
        posCard.append(el("div", { class: "sub", text: "this model has no positional encoding" }));
      }
    }

    /* residual stream, logit lens, feed-forward */
    const resCard = el("div", { class: "card" });
    grid.append(resCard);
    resCard.append(el("h2", { text: "Residual stream and feed-forward" }));
    for (const [stack, norms] of Object.entries(data.residual_norms)) {
      const last = norms.map((row, l) => ({ label: l === 0 ? "embed" : `block ${l - 1}`, value: row[row.length - 1] }));
      resCard.append(el("div", { class: "sub", text: `${stack}: |x| of the last token after each block` }),
        barChart(last, { width: 400, labelWidth: 70, rowH: 12, format: (v) => v.toFixed(1) }));
      const ffn = data.ffn_near_zero[stack].map((v, l) => ({ label: `layer ${l}`, value: v }));
      resCard.append(el("div", { class: "sub", text: `${stack}: share of feed-forward activations with |a| < 0.01` }),
        barChart(ffn, { width: 400, labelWidth: 70, rowH: 12, format: (v) => `${(100 * v).toFixed(0)}%` }));
    }
    if (data.logit_lens) {
      const lens = data.logit_lens, card = el("div", { class: "card wide" });
      grid.append(card);
      const toks = encdec ? data.target_tokens : data.tokens;
      const table = el("table", { class: "lens", id: "lens" });
      table.append(el("tr", {}, el("th", { text: "layer \\ position" }), ...lens.positions.map((p) => el("th", { text: shown(toks[p]) }))));
      lens.tokens.forEach((row, l) => {
        table.append(el("tr", {}, el("th", { text: l }), ...row.map((cell, c) => {
          const p = lens.probs[l][c][0];
          return el("td", { text: shown(cell[0]), title: cell.map((t, n) => `${shown(t)} ${lens.probs[l][c][n].toFixed(3)}`).join("\n"),
            style: `background: rgba(37,99,235,${Math.sqrt(p).toFixed(3)}); color: ${p > 0.4 ? "#fff" : "inherit"}` });
        })));
      });
      card.append(el("h2", { text: "Logit lens" }),
        el("div", { class: "sub", text: "the most likely next token decoded from each block's output (final norm + head); hover a cell for the top 5" }),
        table);
    }

    /* the output distribution and the sampling filter */
    if (!data.output) {
      outCard.append(el("h2", { text: "Output" }), el("div", { class: "sub", text: "no LM head: no next-token distribution" }));
    } else {
      const slider = (id, label, min, max, step, value) => {
        const input = el("input", { type: "range", id, min, max, step });
        input.value = value;
        const out = el("span", { id: `${id}-value`, text: value });
        input.addEventListener("input", () => { out.textContent = input.value; drawOutput(); });
        return [el("label", {}, `${label} `, input, " ", out), input];
      };
      const [tL, tI] = slider("temperature", "temperature", 0.05, 2, 0.05, st.sampling.temperature);
      const [kL, kI] = slider("top-k", "top-k (0: off)", 0, 100, 1, st.sampling.top_k);
      const [pL, pI] = slider("top-p", "top-p", 0.01, 1, 0.01, st.sampling.top_p);
      const [mL, mI] = slider("min-p", "min-p", 0, 0.5, 0.01, st.sampling.min_p);
      const kept = el("div", { id: "kept-count" });
      const bars = el("div", { id: "bars" });
      const stepBtn = el("button", { id: "step", text: "generate one token (greedy)" });
      const stepInfo = el("span", { class: "sub", id: "step-info" });
      outCard.append(el("h2", { text: "Next token" }),
        el("div", { class: "sub", text: "the filters run in generate's order: temperature \u2192 top-k \u2192 top-p \u2192 min-p; grey bars are cut" }),
        el("div", { class: "controls" }, tL, kL, pL, mL), kept, bars, el("div", { class: "controls" }, stepBtn, stepInfo));
      const current = () => {
        const s = st.nSteps ? data.steps[st.nSteps - 1] : null;
        if (s && !s._logits) s._logits = f32(s.logits);
        if (!s && !data.output._logits) data.output._logits = f32(data.output.logits);
        return s ? { logits: s._logits, pieces: s.pieces } : { logits: data.output._logits, pieces: data.output.pieces };
      };
      function drawOutput() {
        st.sampling = { temperature: +tI.value, top_k: +kI.value, top_p: +pI.value, min_p: +mI.value };
        const { logits, pieces } = current();
        const x = filterLogits(logits, st.sampling);
        let nKept = 0;
        for (const v of x) if (v !== -Infinity) nKept++;
        const scaled = Float64Array.from(logits, (v) => v / st.sampling.temperature);
        const p = softmax(scaled);
        const top = Object.keys(pieces).map(Number).sort((a, b) => logits[b] - logits[a]).slice(0, 20);
        kept.textContent = `${nKept} of ${logits.length} tokens kept`;
        kept.dataset.kept = nKept;
        bars.innerHTML = "";
        bars.append(barChart(top.map((i) => ({ label: shown(pieces[i]), value: p[i], cut: x[i] === -Infinity })),
          { width: 520, labelWidth: 140 }));
        const more = st.nSteps < data.steps.length || options.endpoint;
        stepBtn.disabled = !more;
        stepInfo.textContent = more ? "" : (data.arch === "encoder" ? "an encoder does not generate" : "no more precomputed steps");
      }
      stepBtn.addEventListener("click", async () => {
        if (st.nSteps >= data.steps.length && options.endpoint) {
          const fresh = await post({ text: data.text, target: data.target, layers: data.layers[data.start.stack],
            steps: Math.min(16, data.steps.length + 3) });  // the route's limit: 16 steps
          if (!fresh) return;
          data.steps = fresh.steps;
        }
        if (st.nSteps < data.steps.length) st.nSteps++;
        drawAttention();
        drawOutput();
      });
      drawOutput();
      st.redrawOutput = drawOutput;
    }

    async function post(body) {
      try {
        const r = await fetch(options.endpoint, { method: "POST",
          headers: Object.assign({ "Content-Type": "application/json" }, options.headers ? options.headers() : {}),
          body: JSON.stringify(Object.assign({ format: "page" }, body, st.sampling)) });
        if (!r.ok) throw new Error(await r.text());
        return await r.json();
      } catch (e) {
        root.prepend(el("div", { class: "note", text: `inspect request failed: ${e.message}` }));
        return null;
      }
    }
    async function ask(body) {
      const fresh = await post(body);
      if (fresh) render(root, fresh, options);
    }

    fillLayerHead();
    drawAttention();
  }

  window.LmlabInspect = { render, filterLogits, decodeBlock };
})();
