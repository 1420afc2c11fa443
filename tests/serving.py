"""Helpers for the `lmlab serve` tests: a tiny model with a real tokenizer and chat template, and a real
uvicorn server on 127.0.0.1 (a free port) running in a thread of the test process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import torch
import uvicorn
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmlab.config import ModelConfig
from lmlab.model import Transformer
from lmlab.serve import ServeSettings, create_app
from lmlab.tasks.summarize.data import load_sample
from lmlab.tokenizer import Tokenizer

# a plain-text chat template; "<eos>" is a special token, so a turn ends with one id
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<eos>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_tokenizer():
    """A byte-level BPE (400 tokens) trained here on the bundled dialogues, with pad/eos and a chat template."""
    texts = [d.dialogue + "\n" + d.references[0] for d in load_sample().records]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, special_tokens={"pad": "<pad>", "eos": "<eos>"}, chat_template=CHAT_TEMPLATE)


def tiny_model(vocab_size: int, max_seq_len: int = 512, seed: int = 0, **overrides) -> Transformer:
    """A random tiny LLaMA-style decoder with large weights, so its greedy output changes from token to token
    (a default-initialised random model repeats one token) and rarely hits a near-tie."""
    cfg = ModelConfig.from_name("tiny-decoder", vocab_size=vocab_size, max_seq_len=max_seq_len, pad_token_id=0,
                                eos_token_id=1, **overrides)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 1.5 / p.shape[-1] ** 0.5)
    return model.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} was not ready after {timeout} s")


SERVERS: dict[str, object] = {}  # base url -> the uvicorn.Server serving it (tests that watch its connections)


@contextlib.contextmanager
def running_server(loader, wait: bool = True, keep_alive: float = 5.0, **settings):
    """Start the app under uvicorn on a free loopback port -> (base url, the app's ServerState); the
    uvicorn server itself is ``SERVERS[url]`` while it runs. `keep_alive`: uvicorn's keep-alive timeout."""
    app = create_app(ServeSettings(**{"model_name": "tiny", **settings}), loader)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                           timeout_keep_alive=keep_alive))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    SERVERS[url] = server
    try:
        if wait:
            wait_ready(url)
        yield url, app.state.lmlab
    finally:
        SERVERS.pop(url, None)
        server.should_exit = True
        thread.join(30)


def slow_down(model, seconds: float):
    """Make every forward pass take at least `seconds` (a pre-hook that sleeps) -> the hook handle."""
    return model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))


class Gate:
    """Hold the model loop inside its next forward pass until ``open()`` (a pre-hook waiting on an event)."""

    def __init__(self, model):
        self.event = threading.Event()
        self.entered = threading.Event()
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.entered.set()
        self.event.wait(30)

    def open(self):
        self.event.set()
        self.handle.remove()
