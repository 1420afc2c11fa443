"""``lmlab serve``: an OpenAI-compatible HTTP server with continuous batching, and a web playground.

* ``scheduler.Scheduler``: the one thread that owns the model; continuous batching over a slot cache
  (``lmlab.nn.slot_cache``), each request with its own processor chain and seed.
* ``app.create_app``: Starlette routes (completions, chat, summarize, SSE streaming, health, metrics).
* ``static/``: the playground (plain HTML/CSS/JS, no build step, no CDN).
* ``serve(...)``: run it all under uvicorn (what the CLI calls).
"""

from __future__ import annotations

from lmlab.serve.app import ServeSettings, create_app
from lmlab.serve.scheduler import Event, Request, Scheduler

__all__ = ["Event", "Request", "Scheduler", "ServeSettings", "create_app", "serve"]


def serve(loader, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until SIGTERM or SIGINT. Either one drains: uvicorn stops accepting connections,
    lets the requests in flight finish (at most ``settings.timeout`` seconds), then the model loop stops.
    After a SIGTERM drain the process exits normally (status 0); uvicorn's own default re-raises the
    signal, which would report the orderly shutdown as a death by SIGTERM."""
    import signal

    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM and sig in self._captured_signals:
                self._captured_signals.remove(sig)

    app = create_app(settings, loader)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=settings.timeout)
    _Server(config).run()
