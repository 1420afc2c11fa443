"""Text generation: a decoding config, a chain of logits processors, and the decoding loops.

Where to look: ``config.py`` (GenerationConfig), ``processors.py`` (the logits-processor chain),
``decode.py`` (the entry points and the greedy / sampling loop), ``beam_search.py``, ``driver.py``
(prefill and steps over the KV cache), ``stopping.py`` (stop strings), ``streaming.py`` (text deltas).
"""

from lmlab.generation.config import GenerationConfig
from lmlab.generation.decode import encode_prompts, generate, generate_tokens
from lmlab.generation.processors import build_processors
from lmlab.generation.streaming import stream

__all__ = ["GenerationConfig", "build_processors", "encode_prompts", "generate", "generate_tokens", "stream"]
