"""The Inspection as one self-contained HTML page (no network, no server): static/inspect.{html,css,js} with the
data inlined.

The page's data is the JSON contract in a compact form for the browser (``page_data``): attention weights as
uint8 (w * 255, rounded: 1/510 resolution, the heatmaps cannot show finer) base64 per stack; when a text is so
long that the dense bytes would pass ``max_attention_bytes``, each query row keeps its ``row_top`` strongest keys
(the page says so). The next-token logits are inlined whole (float32), so the page re-filters the distribution
over the full vocabulary with the same four steps, in the same order, as ``lmlab.generation.processors``
(temperature -> top_k -> top_p -> min_p); a test checks the page's kept counts against the Python processors.

Stepping: the page appends tokens from ``Inspection.steps`` (greedy steps recorded by ``inspect_model(steps=N)``).
A page served by ``lmlab serve`` can instead pass ``{"endpoint": "/v1/inspect"}`` to ``LmlabInspect.render``;
then the step button and the text box POST there (see docs/inspect.md).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch

from lmlab.inspect.core import Inspection

STATIC = Path(__file__).parent / "static"
PIECES = 50  # pieces named in the page's bar chart data (the most likely tokens; core.NEXT_TOP of them)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.detach().contiguous().numpy().tobytes()).decode("ascii")


def _u8(w: torch.Tensor) -> torch.Tensor:
    return (w.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _attention_block(w: torch.Tensor, max_bytes: int, row_top: int) -> dict:
    """(L, H, T, S) weights -> {"shape", "format": "dense" | "top", ...} for the page."""
    L, H, T, S = w.shape
    if w.numel() <= max_bytes or S <= row_top:
        return {"shape": [L, H, T, S], "format": "dense", "data": _b64(_u8(w))}
    top = torch.topk(w, row_top, dim=-1)  # the strongest keys of each query row
    return {"shape": [L, H, T, S], "format": "top", "k": row_top,
            "index": _b64(top.indices.to(torch.int16 if S < 32768 else torch.int32)), "data": _b64(_u8(top.values))}


def page_data(insp: Inspection, max_attention_bytes: int = 12_000_000, row_top: int = 32,
              layer: int | None = None, head: int = 0) -> dict:
    """The compact form of the Inspection the page reads (see the module docstring)."""
    j = insp.to_json(decimals=4, attentions=False)
    for key in ("steps", "next_token"):
        j.pop(key, None)
    budget = max_attention_bytes // max(1, len(insp.attentions))
    j["attention"] = {k: _attention_block(w, budget, row_top) for k, w in insp.attentions.items()}
    j["n_layers"] = insp.n_layers
    j["start"] = {"stack": insp.main_stack, "layer": layer if layer is not None else insp.layers[insp.main_stack][-1],
                  "head": head}
    if insp.output is not None:
        logits = insp.output["logits"]
        j["output"] = {"logits": _b64(logits.float()), "vocab": logits.numel(), "position": insp.output["position"],
                       "pieces": {str(t["id"]): t["token"] for t in insp.next_token(PIECES)}}
    j["steps"] = []
    for s in insp.steps:
        step = {"id": s["id"], "token": s["token"], "logits": _b64(s["logits"].float()),
                "pieces": {str(t["id"]): t["token"] for t in s["next_token"]},
                "rows": {k: {"shape": list(r.shape), "data": _b64(_u8(r))} for k, r in s["rows"].items()}}
        j["steps"].append(step)
    return j


def inspect_page(model, tokenizer, text: str, target: str | None = None, *, layer: int | None = None, head: int = 0,
                 **options) -> dict:
    """``page_data(inspect_model(...))``: what a route returns for the page's ``render`` (format "page")."""
    from lmlab.inspect.core import inspect_model

    return page_data(inspect_model(model, tokenizer, text, target, **options), layer=layer, head=head)


def render_html(insp: Inspection, **kwargs) -> str:
    """The whole page as one string: template + css + js + data."""
    template = (STATIC / "inspect.html").read_text()
    data = json.dumps(page_data(insp, **kwargs), separators=(",", ":")).replace("</", "<\\/")
    return (template.replace("/*INSPECT_CSS*/", (STATIC / "inspect.css").read_text())
            .replace("/*INSPECT_JS*/", (STATIC / "inspect.js").read_text())
            .replace("/*INSPECT_DATA*/null", data))


def write_html(insp: Inspection, path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(insp, **kwargs))
    return path
