"""``lmlab serve``: an OpenAI-compatible HTTP server with continuous batching, and a web playground.

Split the way vLLM splits it:

* ``scheduler.Scheduler`` decides: admission, the prefill budget, chunked prefill, timeouts and
  cancellation, in the one thread that owns the model.
* ``runner.ModelRunner`` executes the model: prefill and decode forwards over a slot KV cache
  (``lmlab.nn.slot_cache``); its decode step is pluggable (a compiled engine can replace it).
* ``output.SequenceOutput`` samples (each sequence's own processor chain and seed), detokenizes
  and applies stop strings.
* ``app.create_app``: Starlette routes (completions, chat, summarize, SSE streaming, health, metrics),
  module-level handlers with one SSE helper.
* ``static/``: the playground (plain HTML/CSS/JS, no build step, no CDN).
* ``serve(...)``: run it all under uvicorn (what the CLI calls).
"""

from __future__ import annotations

import signal
import socket

import uvicorn

from lmlab.serve.app import ServeSettings, create_app
from lmlab.serve.scheduler import Event, Scheduler, Sequence

__all__ = ["Event", "Scheduler", "Sequence", "ServeSettings", "create_app", "serve"]


class _Server(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM drain exits normally (status 0): uvicorn's own default
    re-raises the signal, which would report the orderly shutdown as a death by SIGTERM."""

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM and sig in self._captured_signals:
            self._captured_signals.remove(sig)


def serve(loader, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          sock: socket.socket | None = None) -> None:
    """Run the server until SIGTERM or SIGINT. Either one drains: uvicorn stops accepting connections,
    lets the requests in flight finish (at most ``settings.timeout`` seconds), then the model loop stops.

    ``sock``: a socket already bound and listening (the CLI binds before it loads the model, so a port
    in use fails at once); without it uvicorn binds `host`:`port` itself.
    """
    app = create_app(settings, loader)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=settings.timeout)
    _Server(config).run(sockets=[sock] if sock is not None else None)
