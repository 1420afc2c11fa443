"""The body of a ``POST /v1/inspect`` route: a plain function from the request's JSON to the response's JSON.

Request: ``{"text": str, "target"?: str, "format"?: "json" | "page", "layers"?: [int], "steps"?: int,
"temperature"?, "top_k"?, "top_p"?, "min_p"?}``. ``format="json"`` (default) returns the JSON contract
(``Inspection.to_json``); ``"page"`` the compact form ``static/inspect.js`` renders (``LmlabInspect.render``),
which the page itself posts when it was rendered with ``{endpoint: "/v1/inspect"}``. A bad field raises
``DataError`` naming it (a route answers 400 with the message).
"""

from __future__ import annotations

from lmlab.errors import DataError

FIELDS = {"text", "target", "format", "layers", "steps", "temperature", "top_k", "top_p", "min_p"}
MAX_STEPS = 16


def inspect_request(model, tokenizer, body: dict, name: str = "") -> dict:
    from lmlab.inspect.core import inspect_model
    from lmlab.inspect.html import page_data

    if not isinstance(body, dict):
        raise DataError(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise DataError(f"unknown field(s) {unknown}; valid: {', '.join(sorted(FIELDS))}")
    fmt = body.get("format", "json")
    if fmt not in ("json", "page"):
        raise DataError(f"format={fmt!r} is not valid; choose one of: json, page")
    steps = body.get("steps", 0)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= MAX_STEPS:
        raise DataError(f"steps={steps!r} must be an integer in [0, {MAX_STEPS}]")
    layers = body.get("layers")
    if layers is not None and (not isinstance(layers, list) or not all(isinstance(i, int) for i in layers)):
        raise DataError(f"layers={layers!r} must be a list of layer indices")
    sampling = {k: body[k] for k in ("temperature", "top_k", "top_p", "min_p") if body.get(k) is not None}
    insp = inspect_model(model, tokenizer, body.get("text"), body.get("target"), layers=layers, steps=steps,
                         name=name, **sampling)
    return page_data(insp) if fmt == "page" else insp.to_json()
