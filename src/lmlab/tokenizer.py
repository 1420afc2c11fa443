"""Tokenizer: a thin wrapper over a Hugging Face `tokenizers.Tokenizer` with the bits a model needs.

What it adds on top of the `tokenizers` backend:

* special tokens by role (bos/eos/pad/unk/mask/cls/sep) read from ``tokenizer_config.json`` /
  ``special_tokens_map.json`` (or from GGUF metadata), and their ids;
* ``encode_batch`` -> padded ``(ids, attention_mask)`` tensors, left-padded by default for generation;
* ``apply_chat_template``: the model's Jinja chat template rendered the way ``transformers`` renders it
  (sandboxed environment, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, special-token variables);
* constructors for a tokenizer directory (``tokenizer.json``, or a BERT ``vocab.txt``) and for the
  tokenizer embedded in a GGUF file (rebuilt from its vocabulary and merges);
* ``IncrementalDecoder`` for streaming generated text token by token.

Sources of truth: the files themselves. ``add_bos_token`` / ``add_eos_token``, when the config states them,
replace the backend's post-processor by ``[bos] $A [eos]`` (as ``transformers`` does); otherwise the
backend's own post-processor (e.g. BERT's ``[CLS] $A [SEP]``) decides what ``add_special_tokens=True`` adds.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from lmlab.errors import CheckpointError, ConfigError, DataError

SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "mask", "cls", "sep")

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


def _token_str(value: Any) -> str | None:
    """A special-token entry from a tokenizer config: a string, or an AddedToken dict with 'content'."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A `tokenizers` backend plus special-token roles, padding and chat templating.

    ``pad_token_id`` falls back to ``eos_token_id`` when the tokenizer defines no pad token (GPT-2,
    LLaMA): padded positions are masked out, so any id works, and eos is always in the vocabulary.
    """

    def __init__(self, backend: Backend, special_tokens: dict[str, str | None] | None = None,
                 chat_template: str | None = None, model_max_length: int | None = None,
                 add_bos_token: bool | None = None, add_eos_token: bool | None = None, name_or_path: str = ""):
        self.backend = backend
        # padding/truncation are done here, per call; a tokenizer.json may carry fixed ones (MiniLM pads to 128)
        self.backend.no_padding()
        self.backend.no_truncation()
        special_tokens = special_tokens or {}
        unknown = sorted(set(special_tokens) - set(SPECIAL_ROLES))
        if unknown:
            raise ConfigError(f"unknown special token role(s) {unknown}; valid: {', '.join(SPECIAL_ROLES)}")
        self.special_tokens: dict[str, str] = {}
        for role, token in special_tokens.items():
            if token is None:
                continue
            if backend.token_to_id(token) is None:
                raise ConfigError(f"{role}_token={token!r} is not in the vocabulary")
            self.special_tokens[role] = token
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        self.name_or_path = name_or_path
        if add_bos_token is not None or add_eos_token is not None or backend.post_processor is None:
            self._set_bos_eos_post_processor()

    def _set_bos_eos_post_processor(self) -> None:
        """`[bos] $A [eos]` (each only when its flag is on), replacing the backend's post-processor."""
        if self.add_bos_token and "bos" not in self.special_tokens:
            raise ConfigError("add_bos_token=True but the tokenizer defines no bos_token")
        if self.add_eos_token and "eos" not in self.special_tokens:
            raise ConfigError("add_eos_token=True but the tokenizer defines no eos_token")
        bos, eos = self.special_tokens.get("bos"), self.special_tokens.get("eos")
        single = (f"{bos}:0 " if self.add_bos_token else "") + "$A:0" + (f" {eos}:0" if self.add_eos_token else "")
        pair = single + (f" {bos}:1" if self.add_bos_token else "") + " $B:1" + (f" {eos}:1" if self.add_eos_token else "")
        specials = [(tok, self.backend.token_to_id(tok)) for tok, on in ((bos, self.add_bos_token), (eos, self.add_eos_token)) if on]
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    # --- constructors ----------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> "Tokenizer":
        """A tokenizer from a single ``tokenizer.json`` (special tokens may be passed as keyword arguments)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer file not found: {path}")
        try:
            backend = Backend.from_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path} is not a valid tokenizer.json ({exc})") from None
        return cls(backend, name_or_path=str(path), **kwargs)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """A tokenizer from a Hugging Face-style directory.

        Reads ``tokenizer.json`` (or, without it, a WordPiece ``vocab.txt`` as BERT ships it), then
        ``special_tokens_map.json`` and ``tokenizer_config.json`` (the latter wins) for special tokens,
        ``chat_template`` (also from ``chat_template.jinja``), ``model_max_length`` and ``add_bos/eos_token``.
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"tokenizer directory not found: {path}")
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (path / name).is_file():
                try:
                    config.update(json.loads((path / name).read_text()))
                except json.JSONDecodeError as exc:
                    raise CheckpointError(f"{path / name} is not valid JSON ({exc})") from None
        if (path / "tokenizer.json").is_file():
            backend = Backend.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.txt").is_file():
            backend = _wordpiece_from_vocab(path / "vocab.txt", config)
        else:
            raise CheckpointError(f"{path} has neither tokenizer.json nor vocab.txt")

        special = {role: _token_str(config.get(f"{role}_token")) for role in SPECIAL_ROLES}
        if not (path / "tokenizer.json").is_file():  # BERT defaults when only vocab.txt is there
            for role, token in (("unk", "[UNK]"), ("sep", "[SEP]"), ("pad", "[PAD]"), ("cls", "[CLS]"), ("mask", "[MASK]")):
                special[role] = special[role] or token
        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t["name"]: t["template"] for t in chat_template}
            chat_template = named.get("default", next(iter(named.values()), None))
        if (path / "chat_template.jinja").is_file():
            chat_template = (path / "chat_template.jinja").read_text()
        max_len = config.get("model_max_length")
        max_len = int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None
        return cls(backend, special, chat_template=chat_template, model_max_length=max_len,
                   add_bos_token=config.get("add_bos_token"), add_eos_token=config.get("add_eos_token"),
                   name_or_path=str(path))

    @classmethod
    def from_gguf(cls, path: str | Path, metadata: dict[str, Any] | None = None) -> "Tokenizer":
        """The tokenizer embedded in a GGUF file, rebuilt from ``tokenizer.ggml.*`` metadata.

        Supports ``tokenizer.ggml.model`` ``"gpt2"`` (byte-level BPE: tokens + merges, with the split pattern
        of ``tokenizer.ggml.pre``) and ``"llama"`` (sentencepiece BPE with byte fallback; merges rebuilt from
        the token scores when the file has none). Tokens typed CONTROL are special (matched whole, skipped
        when decoding); USER_DEFINED ones are matched whole but decoded. `metadata` may be passed if already read.
        """
        if metadata is None:
            from lmlab.checkpoints.gguf import read_gguf_metadata

            metadata = read_gguf_metadata(path)
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
            backend = _byte_level_bpe(tokens, types, metadata.get("tokenizer.ggml.merges") or [],
                                      str(metadata.get("tokenizer.ggml.pre", "default")))
            default_add_bos = False
        else:
            scores = metadata.get("tokenizer.ggml.scores")
            if scores is None and "tokenizer.ggml.merges" not in metadata:
                raise CheckpointError(f"{path}: a sentencepiece GGUF tokenizer needs tokenizer.ggml.scores or merges")
            backend = _sentencepiece_bpe(tokens, types, scores, metadata.get("tokenizer.ggml.merges"),
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
        special = {role: tok if tok is None or backend.token_to_id(tok) is not None else _respell(tok)
                   for role, tok in special.items()}
        return cls(backend, special, chat_template=metadata.get("tokenizer.chat_template"),
                   model_max_length=None,
                   add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos)),
                   add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)), name_or_path=str(path))

    # --- vocabulary ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding table needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.backend.id_to_token(int(index))

    def _role_id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._role_id("bos")

    @property
    def eos_token_id(self) -> int | None:
        return self._role_id("eos")

    @property
    def pad_token_id(self) -> int | None:
        """The pad id, or eos's when no pad token is defined (see the class docstring)."""
        pad = self._role_id("pad")
        return pad if pad is not None else self.eos_token_id

    @property
    def unk_token_id(self) -> int | None:
        return self._role_id("unk")

    @property
    def mask_token_id(self) -> int | None:
        return self._role_id("mask")

    @property
    def cls_token_id(self) -> int | None:
        return self._role_id("cls")

    @property
    def sep_token_id(self) -> int | None:
        return self._role_id("sep")

    @property
    def special_ids(self) -> set[int]:
        """Ids of every special token: the role tokens and the backend's special added tokens."""
        ids = {i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special}
        ids |= {self.backend.token_to_id(t) for t in self.special_tokens.values()}
        return ids

    # --- encoding / decoding ---------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids. Special-token strings in `text` (e.g. ``<|im_start|>``) map to their single ids.

        ``add_special_tokens=True`` adds what this tokenizer's configuration says a model input carries
        (LLaMA's BOS with ``add_bos_token``, T5's trailing ``</s>``, BERT's ``[CLS] ... [SEP]``; see the
        module docstring), except a token the text already has at that end: a chat template that writes
        ``{{ bos_token }}`` itself does not get a second BOS. Generation encodes prompts this way.
        """
        if not isinstance(text, str):
            raise DataError(f"encode() needs a str, got {type(text).__name__}")
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return _without_doubled_specials(encoding) if add_special_tokens else encoding.ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_batch(self, texts: Sequence[str], padding_side: str = "left", add_special_tokens: bool = False,
                     max_length: int | None = None, truncation_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (ids, attention_mask), both LongTensor (B, T) with T the longest sequence.

        Left padding (the default) keeps every prompt's last token in the last column, which is what
        batched generation needs. With `max_length`, longer sequences drop tokens from `truncation_side`
        (left by default, keeping the end of a prompt).
        """
        for name, value in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if value not in ("left", "right"):
                raise ConfigError(f"{name}={value!r} is not valid; choose one of: left, right")
        if isinstance(texts, str):
            raise DataError("encode_batch() needs a list of str; got a single str (wrap it in a list)")
        if len(texts) == 0:
            raise DataError("encode_batch() got an empty list of texts")
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        seqs = [_without_doubled_specials(e) if add_special_tokens else e.ids for e in encodings]
        if max_length is not None:
            if max_length < 1:
                raise ConfigError(f"max_length={max_length} must be a positive integer")
            seqs = [s[-max_length:] if truncation_side == "left" else s[:max_length] for s in seqs]
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (B, T)
        for row, seq in enumerate(seqs):
            if not seq:
                continue
            cols = slice(T - len(seq), T) if padding_side == "left" else slice(0, len(seq))
            ids[row, cols] = torch.tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
        return ids, mask

    # --- chat ------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, chat_template: str | None = None,
                            **kwargs: Any) -> str | list[int]:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the chat template.

        Rendered like ``transformers``: a sandboxed Jinja environment with ``trim_blocks`` and
        ``lstrip_blocks``, the ``raise_exception`` and ``strftime_now`` helpers, a ``tojson`` that does not
        escape HTML, and ``bos_token``/``eos_token``/... as variables. With ``tokenize=True`` the text is
        encoded without adding special tokens (the template writes them itself). A template that calls
        ``raise_exception`` (e.g. roles not alternating) raises ``DataError`` with its message.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ConfigError(f"tokenizer {self.name_or_path or '(unnamed)'} has no chat_template; pass chat_template=")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise DataError(f"messages[{i}]={message!r} must be a dict with 'role' and 'content'")
        variables = {f"{role}_token": token for role, token in self.special_tokens.items()}
        variables.update(kwargs)
        import jinja2

        try:
            text = _compile_template(template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as exc:  # raise_exception() in the template, or a sandbox violation
            raise DataError(f"the chat template rejected these messages: {exc}") from None
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # --- saving ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (loadable by ``from_dir`` and transformers)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {f"{role}_token": token for role, token in self.special_tokens.items()}
        config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=self.add_bos_token,
                      add_eos_token=self.add_eos_token)
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return directory

    def __repr__(self) -> str:
        roles = ", ".join(f"{r}={t!r}" for r, t in self.special_tokens.items())
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, {roles})"


def _without_doubled_specials(encoding) -> list[int]:
    """The ids of an encoding made with special tokens, minus a special token the post-processor put
    next to the text when the text already has that same token at that end (e.g. BOS written by a chat
    template, then BOS from ``add_bos_token``).

    The post-processor's own tokens are the ones with no sequence id; the text's tokens have id 0.
    """
    ids, sequence = encoding.ids, encoding.sequence_ids
    from_text = [i for i, s in enumerate(sequence) if s is not None]
    if not from_text:
        return ids
    first, last = from_text[0], from_text[-1]
    prefix, body, suffix = ids[:first], ids[first:last + 1], ids[last + 1:]
    if prefix and prefix[-1] == body[0]:
        prefix = prefix[:-1]
    if suffix and suffix[0] == body[-1]:
        suffix = suffix[1:]
    return prefix + body + suffix


# --- builders --------------------------------------------------------------------------------------
def _respell(token: str) -> str:
    """A token written in plain text, spelled in the byte-level alphabet (its UTF-8 bytes, one char each)."""
    alphabet = byte_alphabet()
    return "".join(alphabet[b] for b in token.encode("utf-8"))


def _byte_level_bpe(tokens: list[str], types: list[int], merges: Iterable[str], pre: str) -> Backend:
    """Byte-level BPE (GPT-2 family) from a GGUF vocabulary, merges and `pre` split name."""
    alphabet = set(byte_alphabet().values())
    # Byte-level vocabularies spell every token in the byte alphabet; control tokens like
    # "<|endoftext|>" happen to be spelled the same either way. Respell the few that are not.
    vocab = {tok if set(tok) <= alphabet else _respell(tok): i for i, tok in enumerate(tokens)}
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


def _merges_from_scores(tokens: list[str], scores: Sequence[float]) -> list[tuple[str, str]]:
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


def _sentencepiece_bpe(tokens: list[str], types: list[int], scores: Sequence[float] | None,
                       merges: Sequence[str] | None, add_space_prefix: bool) -> Backend:
    """LLaMA-1/2-style sentencepiece BPE: '▁' marks spaces, unknown characters fall back to <0xXX> bytes."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = _merges_from_scores(tokens, scores)
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


def _wordpiece_from_vocab(vocab_file: Path, config: dict[str, Any]) -> Backend:
    """BERT's WordPiece tokenizer from ``vocab.txt`` (one token per line, id = line number)."""
    vocab = {}
    for index, line in enumerate(vocab_file.read_text(encoding="utf-8").splitlines()):
        vocab.setdefault(line.rstrip("\r"), index)
    tokens = {role: _token_str(config.get(f"{role}_token")) or default
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


@lru_cache(maxsize=16)
def _compile_template(template: str):
    """A chat template compiled in a sandboxed Jinja environment set up like transformers'."""
    import datetime

    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & for HTML; chat templates want the raw JSON
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ConfigError(f"chat_template has a Jinja syntax error at line {exc.lineno}: {exc.message}") from None


# --- streaming -------------------------------------------------------------------------------------
class IncrementalDecoder:
    """Turn a stream of token ids into a stream of text pieces, for printing while generating.

    Decoding one token at a time is wrong in two ways: a multi-byte UTF-8 character can be split across
    tokens (each half decodes to U+FFFD), and some decoders drop a leading space when a token is decoded
    alone. So we decode a short window of recent ids and emit only the text past what was already emitted;
    text ending in U+FFFD is held back until the character completes. ``"".join(pushes) + flush()`` equals
    ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: ids before it are settled
        self.read_offset = 0  # ids[:read_offset] have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token id; return the newly completed text (possibly "")."""
        self.ids.append(int(token_id))
        emitted = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            new = text[len(emitted):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD) and reset."""
        emitted = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.ids, self.prefix_offset, self.read_offset = [], 0, 0
        return text[len(emitted):]
