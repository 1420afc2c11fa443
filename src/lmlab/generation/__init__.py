"""Text generation: a decoding config, a chain of logits processors, and the decoding loops."""

from lmlab.generation.config import GenerationConfig
from lmlab.generation.decode import encode_prompts, generate, generate_tokens, stream
from lmlab.generation.processors import build_processors

__all__ = ["GenerationConfig", "build_processors", "encode_prompts", "generate", "generate_tokens", "stream"]
