"""Inside the model: record what each part of a Transformer computes on one text, then show it.

``inspect_model(model, tokenizer, text)`` -> ``Inspection`` (tokens, embeddings, positions, attention per layer
and head, residual stream and logit lens, feed-forward sparsity, the output distribution and the sampling
filter); ``Inspection.to_json()`` is the JSON contract, ``write_html`` a self-contained page, ``write_pngs``
matplotlib figures. Recording uses hooks that exist only during the recorded pass (``lmlab.inspect.record``).
See docs/inspect.md.
"""

from lmlab.inspect.api import inspect_request
from lmlab.inspect.core import Inspection, filter_distribution, inspect_json, inspect_model, sampling_chain
from lmlab.inspect.load import load_for_inspection
from lmlab.inspect.record import Recorder, attention_weights

__all__ = ["Inspection", "Recorder", "attention_weights", "filter_distribution", "inspect_json", "inspect_model", "inspect_request",
           "load_for_inspection", "sampling_chain", "write_html", "write_pngs"]


def write_html(inspection, path, **kwargs):
    from lmlab.inspect.html import write_html as _write

    return _write(inspection, path, **kwargs)


def write_pngs(inspection, directory, **kwargs):
    from lmlab.inspect.plots import write_pngs as _write

    return _write(inspection, directory, **kwargs)
