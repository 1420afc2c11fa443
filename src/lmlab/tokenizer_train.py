"""Train a byte-level BPE or a Unigram tokenizer with Hugging Face `tokenizers`.

The result is a directory in the layout Hugging Face tools read:

* ``tokenizer.json``         the full tokenizer (model, pre-tokenizer, decoder, special tokens)
* ``tokenizer_config.json``  which token plays which role (pad/bos/eos/unk/mask, sentinels)

Byte-level BPE (GPT-2's scheme) never needs an unknown token: every byte is in the base alphabet.
Unigram (SentencePiece's scheme) uses the metaspace pre-tokenizer, as T5 and ALBERT do.

Both are deterministic: the same texts and settings give a byte-identical ``tokenizer.json``. For
Unigram that rules out the `tokenizers` trainer: it collects the words in a Rust ``HashMap``, whose
iteration order is randomised per process, and sums the EM statistics in that order, so the scores
(and near ties in pruning, hence the pieces) change from run to run even on one thread. The pieces
and scores are therefore learnt by SentencePiece's trainer on one thread (the order of its sums is
fixed) and loaded into a `tokenizers` Unigram model, which encodes with them.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from lmlab.errors import ConfigError, DataError, choices_error

KINDS = ("bpe", "unigram")
ROLES = ("pad", "bos", "eos", "unk", "mask")
DEFAULT_SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}


def sentinel_token(k: int) -> str:
    return f"<extra_id_{k}>"


def train_tokenizer(texts: Iterable[str], kind: str = "bpe", vocab_size: int = 8192,
                    special_tokens: dict[str, str] | None = None, n_sentinels: int = 0, min_frequency: int = 2,
                    out_dir: str | Path | None = None, show_progress: bool = True):
    """Train a tokenizer on `texts` -> ``tokenizers.Tokenizer`` (saved to `out_dir` when given).

    `special_tokens` maps roles (pad, bos, eos, unk, mask) to strings; they get the lowest ids, in that
    order. `n_sentinels` > 0 appends T5's ``<extra_id_k>`` tokens at the top of the vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind not in KINDS:
        raise choices_error("kind", kind, KINDS)
    special = dict(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
    unknown = sorted(set(special) - set(ROLES))
    if unknown:
        raise ConfigError(f"unknown special-token role(s) {', '.join(unknown)}; valid roles: {', '.join(ROLES)}")
    specials = [special[r] for r in ROLES if r in special]
    if vocab_size <= len(specials) + n_sentinels:
        raise ConfigError(f"vocab_size={vocab_size} must exceed the {len(specials) + n_sentinels} special tokens")
    base_size = vocab_size - n_sentinels  # sentinels are added on top, so the total is vocab_size
    documents = iter(texts)
    first = next(documents, None)
    if first is None:
        raise DataError("the tokenizer training corpus is empty (no documents read)")
    documents = itertools.chain([first], documents)

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=base_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=show_progress)
        tok.train_from_iterator(documents, trainer=trainer)
    else:
        pieces = _train_unigram_pieces(documents, base_size - len(specials), vocab_size)
        vocab = [(s, 0.0) for s in specials] + pieces  # specials first (ids 0, 1, ...), then by score
        unk_id = specials.index(special["unk"]) if "unk" in special else None
        tok = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=False))
        tok.add_special_tokens(specials)  # matched whole in the text, never split into pieces
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    if n_sentinels:
        add_sentinels(tok, n_sentinels)
    if out_dir is not None:
        save_tokenizer(tok, out_dir, special)
    return tok


def _train_unigram_pieces(texts: Iterable[str], n_pieces: int, vocab_size: int) -> list[tuple[str, float]]:
    """Learn up to `n_pieces` Unigram pieces with their log-probabilities -> [(piece, score)], best first.

    SentencePiece's trainer with the settings that match the Metaspace pre-tokenizer (``▁`` marks a
    word start, a ``▁`` is prepended, whitespace is kept and splits pieces, no normalisation), every
    character kept (coverage 1.0), all documents read in order (no sampling, so no seed to fix) and
    one thread, so the result depends on nothing but the texts.
    """
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, model_type="unigram",
            vocab_size=n_pieces + 1, hard_vocab_limit=False,  # +1: SentencePiece's own <unk>, dropped below
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
            split_by_whitespace=True, character_coverage=1.0, byte_fallback=False,
            input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=1 << 24,
            num_threads=1, minloglevel=2)
    except RuntimeError as exc:
        if "vocab" in str(exc).lower():
            raise ConfigError(f"vocab_size={vocab_size} is too small for this corpus ({str(exc).splitlines()[0]})") from None
        raise DataError(f"Unigram training failed: {str(exc).splitlines()[0]}") from None
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())
            if not (processor.is_unknown(i) or processor.is_control(i))]


def add_sentinels(tok, n: int) -> list[int]:
    """Make sure ``<extra_id_0..n-1>`` exist, with <extra_id_0> the highest id (T5) -> their ids in k order.

    Tokens already present keep their ids; missing ones are added as special tokens, from
    <extra_id_{n-1}> up to <extra_id_0>, so a fresh set is descending like T5's.
    """
    from tokenizers import AddedToken

    missing = [sentinel_token(k) for k in reversed(range(n)) if tok.token_to_id(sentinel_token(k)) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return [tok.token_to_id(sentinel_token(k)) for k in range(n)]


def save_tokenizer(tok, out_dir: str | Path, special: dict[str, str]) -> Path:
    """Write tokenizer.json and tokenizer_config.json (roles + sentinels) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    sentinels = [t for t in sorted(tok.get_added_tokens_decoder().values(), key=lambda a: a.content)
                 if t.content.startswith("<extra_id_")]
    config = {f"{role}_token": tokstr for role, tokstr in special.items()}
    config.update(tokenizer_class="PreTrainedTokenizerFast",
                  additional_special_tokens=sorted((t.content for t in sentinels), key=lambda s: int(s[10:-1])))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def special_token_ids(tokenizer_dir: str | Path) -> dict[str, int]:
    """Role -> id (pad, bos, eos, unk, mask present in tokenizer_config.json) plus ``sentinels`` list."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir)
    if not (path / "tokenizer.json").exists():
        raise DataError(f"no tokenizer.json in {str(path)!r}")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    ids: dict = {}
    for role in ROLES:
        text = config.get(f"{role}_token")
        if isinstance(text, dict):
            text = text.get("content")
        if text is not None and tok.token_to_id(text) is not None:
            ids[role] = tok.token_to_id(text)
    ids["sentinels"] = [i for i in (tok.token_to_id(sentinel_token(k)) for k in range(1000)) if i is not None]
    return ids


def parse_special_tokens(items: Sequence[str] | None) -> dict[str, str]:
    """``["pad=<pad>", "eos=</s>"]`` -> {"pad": "<pad>", ...}, on top of the defaults; ``role=`` drops a role."""
    special = dict(DEFAULT_SPECIAL_TOKENS)
    for item in items or ():
        role, sep, text = item.partition("=")
        if not sep or role not in ROLES:
            raise ConfigError(f"special token {item!r} must be ROLE=TOKEN with ROLE one of: {', '.join(ROLES)}")
        if text:
            special[role] = text
        else:
            special.pop(role, None)
    return special


def with_sentinels(src_dir: str | Path, out_dir: str | Path, n: int) -> Path:
    """Copy the tokenizer in `src_dir` to `out_dir` with T5's ``<extra_id_0..n-1>`` added (vocabulary grows by n)."""
    from tokenizers import Tokenizer

    src = Path(src_dir)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    add_sentinels(tok, n)
    config_path = src / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    special = {}
    for role in ROLES:
        text = config.get(f"{role}_token")
        text = text.get("content") if isinstance(text, dict) else text
        if text is not None:
            special[role] = text
    return save_tokenizer(tok, out_dir, special)
