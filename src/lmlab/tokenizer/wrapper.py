"""``Tokenizer``: a thin wrapper over a Hugging Face ``tokenizers.Tokenizer`` with the bits a model needs.

What it adds on top of the backend: special tokens by role and their ids; the special tokens the
tokenizer's own configuration puts around a model input (``add_special_tokens=True``); padded batches;
chat templates; constructors for a directory, a single ``tokenizer.json`` and a GGUF file; saving.
See ``lmlab.tokenizer`` for the map of the package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import jinja2
import torch
from tokenizers import processors
from tokenizers import Tokenizer as Backend

from lmlab.errors import CheckpointError, ConfigError, DataError
from lmlab.tokenizer.chat_template import compile_template
from lmlab.tokenizer.sources import gguf_tokenizer_parts, special_token_text, wordpiece_from_vocab

SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "mask", "cls", "sep")


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
        # whether the flags wrote the post-processor; otherwise the backend's own one (BERT's [CLS] $A [SEP])
        # is kept, and save() leaves the flags out so that from_dir keeps it too
        self._flags_set_post_processor = (add_bos_token is not None or add_eos_token is not None
                                          or backend.post_processor is None)
        if self._flags_set_post_processor:
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
            backend = wordpiece_from_vocab(path / "vocab.txt", config)
        else:
            raise CheckpointError(f"{path} has neither tokenizer.json nor vocab.txt")

        special = {role: special_token_text(config.get(f"{role}_token")) for role in SPECIAL_ROLES}
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
            # imported here: lmlab.checkpoints is the floor above (its loaders build tokenizers with this class);
            # at the top, the tokenizer would load every checkpoint format, and a circle once they import it there
            from lmlab.checkpoints.gguf import read_gguf_metadata

            metadata = read_gguf_metadata(path)
        backend, special, options = gguf_tokenizer_parts(path, metadata)
        return cls(backend, special, name_or_path=str(path), **options)

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
        try:
            text = compile_template(template).render(
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
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if self._flags_set_post_processor:  # else tokenizer.json's own post-processor says what encode adds
            config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
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
