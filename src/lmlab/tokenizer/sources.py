"""Where a tokenizer comes from when a checkpoint ships no ``tokenizer.json``: GGUF metadata and BERT's ``vocab.txt``.

A GGUF file carries its tokenizer as ``tokenizer.ggml.*`` metadata: the vocabulary, each token's type,
and either BPE merges (``gpt2``: byte-level BPE, split by the pattern named in ``tokenizer.ggml.pre``) or
token scores (``llama``: sentencepiece BPE with byte fallback, merges rebuilt from the scores). BERT
checkpoints often ship only ``vocab.txt`` (WordPiece). Each is rebuilt here as a Hugging Face
``tokenizers`` backend that encodes exactly as the reference does (tested against ``transformers``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from lmlab.errors import CheckpointError

# GGUF token_type values (llama.cpp's llama_token_type)
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4

# Pre-tokenizer split patterns for byte-level BPE vocabularies, by GGUF `tokenizer.ggml.pre`.
# The split must match the one the merges were learned with, or rare strings tokenize differently.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# pre name -> list of patterns applied in order, each isolating its matches
GGUF_PRE_SPLITS: dict[str, list[str]] = {
    "default": [_GPT2_SPLIT],
    "gpt2": [_GPT2_SPLIT],
    "smollm": [r"\p{N}", _GPT2_SPLIT],  # digits one by one (StarCoder-style), then GPT-2's split
    "starcoder": [r"\p{N}", _GPT2_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT],
    "llama3": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
}


# --- byte-level alphabet ---------------------------------------------------------------------------
@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others (control chars, space, ...) to U+0100 onwards
    in byte order, so a space is 'Ġ' (U+0120) and a newline 'Ċ' (U+010A).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def special_token_text(value: Any) -> str | None:
    """A special-token entry from a tokenizer config: a string, or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


# --- GGUF metadata -> backend, special tokens, settings ----------------------------------------------
def gguf_tokenizer_parts(path: str | Path, metadata: dict[str, Any]
                         ) -> tuple[Backend, dict[str, str | None], dict[str, Any]]:
    """-> (backend, special tokens by role, the Tokenizer's other keyword arguments) from GGUF metadata.

    ``add_bos_token`` follows ``tokenizer.ggml.add_bos_token``; without it, llama.cpp's default: on for a
    sentencepiece vocabulary, off for byte-level BPE.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in metadata:
        raise CheckpointError(f"{path} has no tokenizer metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    if kind not in ("gpt2", "llama"):
        raise CheckpointError(
            f"GGUF tokenizer.ggml.model={kind!r} in {path} is not supported; "
            "supported: gpt2 (byte-level BPE), llama (sentencepiece BPE)"
        )
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
    if kind == "gpt2":
        backend = byte_level_bpe(tokens, types, metadata.get("tokenizer.ggml.merges") or [],
                                  str(metadata.get("tokenizer.ggml.pre", "default")))
        default_add_bos = False
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None and "tokenizer.ggml.merges" not in metadata:
            raise CheckpointError(f"{path}: a sentencepiece GGUF tokenizer needs tokenizer.ggml.scores or merges")
        backend = sentencepiece_bpe(tokens, types, scores, metadata.get("tokenizer.ggml.merges"),
                                     bool(metadata.get("tokenizer.ggml.add_space_prefix", True)))
        default_add_bos = True  # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says not to

    def token_for(key: str) -> str | None:
        index = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if index is None:
            return None
        if not 0 <= int(index) < len(tokens):
            raise CheckpointError(f"tokenizer.ggml.{key}_token_id={index} in {path} is outside the vocabulary")
        return tokens[int(index)]

    special = {"bos": token_for("bos"), "eos": token_for("eos"), "unk": token_for("unknown"),
               "pad": token_for("padding"), "sep": token_for("seperator"), "mask": token_for("mask")}
    # a token was respelled into the byte alphabet if it was not in it; look the special ones up that way
    special = {role: tok if tok is None or backend.token_to_id(tok) is not None else respell(tok)
               for role, tok in special.items()}
    options = dict(chat_template=metadata.get("tokenizer.chat_template"), model_max_length=None,
                   add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos)),
                   add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)))
    return backend, special, options


# --- builders --------------------------------------------------------------------------------------
def respell(token: str) -> str:
    """A token written in plain text, spelled in the byte-level alphabet (its UTF-8 bytes, one char each)."""
    alphabet = byte_alphabet()
    return "".join(alphabet[b] for b in token.encode("utf-8"))


def byte_level_bpe(tokens: list[str], types: list[int], merges: Iterable[str], pre: str) -> Backend:
    """Byte-level BPE (GPT-2 family) from a GGUF vocabulary, merges and `pre` split name."""
    alphabet = set(byte_alphabet().values())
    # Byte-level vocabularies spell every token in the byte alphabet; control tokens like
    # "<|endoftext|>" happen to be spelled the same either way. Respell the few that are not.
    vocab = {tok if set(tok) <= alphabet else respell(tok): i for i, tok in enumerate(tokens)}
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise CheckpointError(f"GGUF merge {merge!r} is not of the form 'left right'")
        pairs.append((left, right))
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    splits = GGUF_PRE_SPLITS.get(pre, GGUF_PRE_SPLITS["default"])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [AddedToken(tok, special=True, normalized=False)
                for tok, kind in zip(tokens, types) if kind == _TOKEN_CONTROL and set(tok) <= alphabet]
    user = [AddedToken(tok, special=False, normalized=False)
            for tok, kind in zip(tokens, types) if kind == _TOKEN_USER_DEFINED and tok in vocab]
    backend.add_special_tokens(specials)
    backend.add_tokens(user)
    return backend


def merges_from_scores(tokens: list[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Sentencepiece BPE merges implied by a vocabulary: every split of a token into two vocabulary
    pieces is a merge, ranked by the merged token's score (higher first), longer left/right pieces first
    on ties -- the order transformers uses for GGUF files without merges."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    candidates = []
    for tok, score in zip(tokens, scores):
        splits = [(tok[:k], tok[k:]) for k in range(1, len(tok)) if tok[:k] in vocab and tok[k:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        candidates += [(left, right, score) for left, right in splits]
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


def sentencepiece_bpe(tokens: list[str], types: list[int], scores: Sequence[float] | None,
                       merges: Sequence[str] | None, add_space_prefix: bool) -> Backend:
    """LLaMA-1/2-style sentencepiece BPE: '▁' marks spaces, unknown characters fall back to <0xXX> bytes."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = merges_from_scores(tokens, scores)
    unk = next((tok for tok, kind in zip(tokens, types) if kind == 2), None)  # 2 is UNKNOWN
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False)
                                for tok, kind in zip(tokens, types) if kind == _TOKEN_CONTROL])
    backend.add_tokens([AddedToken(tok, special=False, normalized=False)
                        for tok, kind in zip(tokens, types) if kind == _TOKEN_USER_DEFINED])
    return backend


def wordpiece_from_vocab(vocab_file: Path, config: dict[str, Any]) -> Backend:
    """BERT's WordPiece tokenizer from ``vocab.txt`` (one token per line, id = line number)."""
    vocab = {}
    for index, line in enumerate(vocab_file.read_text(encoding="utf-8").splitlines()):
        vocab.setdefault(line.rstrip("\r"), index)
    tokens = {role: special_token_text(config.get(f"{role}_token")) or default
              for role, default in (("unk", "[UNK]"), ("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]"), ("mask", "[MASK]"))}
    missing = [t for t in tokens.values() if t not in vocab]
    if missing:
        raise CheckpointError(f"{vocab_file} lacks the special token(s) {missing}")
    backend = Backend(models.WordPiece(vocab=vocab, unk_token=tokens["unk"], max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"), lowercase=config.get("do_lower_case", True))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tokens["cls"], tokens["sep"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens.values()])
    return backend
