"""Tokenization: lmlab's ``Tokenizer`` over Hugging Face ``tokenizers``, and where its parts live.

* ``wrapper.py``        ``Tokenizer``: special tokens by role (bos/eos/pad/unk/mask/cls/sep) read from
                        ``tokenizer_config.json`` / ``special_tokens_map.json`` or GGUF metadata, and their
                        ids; ``encode`` / ``encode_batch`` (left-padded ``(ids, attention_mask)`` for
                        generation); ``apply_chat_template``; constructors for a directory, a single
                        ``tokenizer.json`` and a GGUF file; ``save``.
* ``sources.py``        backends rebuilt from what a checkpoint ships when it has no ``tokenizer.json``:
                        GGUF vocabularies (byte-level BPE with the split of ``tokenizer.ggml.pre``,
                        sentencepiece BPE with byte fallback) and BERT's ``vocab.txt``.
* ``chat_template.py``  the Jinja chat template compiled the way ``transformers`` compiles it.
* ``incremental.py``    ``IncrementalDecoder``: token ids to text pieces for streaming, correct across
                        characters split between tokens.

Sources of truth: the files themselves. ``add_bos_token`` / ``add_eos_token``, when the config states them,
replace the backend's post-processor by ``[bos] $A [eos]`` (as ``transformers`` does); otherwise the
backend's own post-processor (e.g. BERT's ``[CLS] $A [SEP]``, T5's ``$A </s>``) decides what
``add_special_tokens=True`` adds -- which is how generation encodes prompts.
"""

from lmlab.tokenizer.incremental import IncrementalDecoder
from lmlab.tokenizer.sources import GGUF_PRE_SPLITS, byte_alphabet
from lmlab.tokenizer.wrapper import SPECIAL_ROLES, Tokenizer

__all__ = ["GGUF_PRE_SPLITS", "SPECIAL_ROLES", "IncrementalDecoder", "Tokenizer", "byte_alphabet"]
