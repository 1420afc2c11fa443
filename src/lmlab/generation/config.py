"""GenerationConfig: how to decode, kept apart from the model's own configuration.

A model config says what a network *is*; a generation config says how to *use* it for one request
(greedy or sampled, how many tokens, which filters). The fields and their meanings follow Hugging
Face's ``generation_config.json`` so a checkpoint's defaults can be read with ``from_hf``.
Every field is validated when the config is built: a bad value raises ``ConfigError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmlab.errors import ConfigError


@dataclass
class GenerationConfig:
    # --- length ------------------------------------------------------------------------------
    max_new_tokens: int = 64
    min_new_tokens: int = 0  # end-of-sequence tokens are suppressed until this many were generated

    # --- sampling ----------------------------------------------------------------------------
    do_sample: bool = False  # False: greedy (num_beams=1) or beam search (num_beams>1)
    temperature: float = 1.0  # logits / temperature; 0 means greedy
    top_k: int = 0  # keep the k most likely tokens (0: off)
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p (1: off)
    min_p: float = 0.0  # drop tokens with p < min_p * p_max (0: off)
    # seeds the sampler: an int seeds one torch.Generator for the batch (same seed -> same text); a list holds
    # one seed per batch row, each row drawing from its own generator, so a row's text does not depend on which
    # rows share its batch (the lab seeds each example from its id this way)
    seed: int | list[int] | None = None

    # --- repetition --------------------------------------------------------------------------
    repetition_penalty: float = 1.0  # CTRL's penalty on tokens already in the sequence (1: off)
    no_repeat_ngram_size: int = 0  # forbid repeating any n-gram of this size (0: off)

    # --- beam search -------------------------------------------------------------------------
    num_beams: int = 1
    length_penalty: float = 1.0  # finished beams are scored sum(log p) / length ** length_penalty
    early_stopping: bool | str = False  # True: stop at num_beams finished; False: HF heuristic; "never"

    # --- stopping and special tokens ---------------------------------------------------------
    eos_token_ids: list[int] | None = None  # None: the model's (or tokenizer's) eos ids; [] disables eos stopping
    stop_strings: list[str] = field(default_factory=list)  # stop when the text contains one (trimmed from output)
    pad_token_id: int | None = None  # fills finished rows; None: the model's pad id, else the first eos id, else 0

    # --- structured output -------------------------------------------------------------------
    # a compiled grammar (lmlab.generation.constrain.Constraint) the output must follow, or a list of one per
    # batch row (None for a free row); applied as the `grammar` step of the processor chain
    constraint: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_ids, int):
            self.eos_token_ids = [self.eos_token_ids]
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        for name in ("max_new_tokens", "num_beams"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        for name in ("min_new_tokens", "top_k", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an integer >= 0")
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(f"min_new_tokens={self.min_new_tokens} must not exceed max_new_tokens={self.max_new_tokens}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ConfigError(f"temperature={self.temperature!r} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p={self.min_p!r} must be in [0, 1]")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty!r} must be > 0 (1.0 disables it)")
        if self.early_stopping not in (True, False, "never"):
            raise ConfigError(f"early_stopping={self.early_stopping!r} is not valid; choose one of: True, False, 'never'")
        if self.do_sample and self.num_beams > 1:
            raise ConfigError(f"do_sample=True with num_beams={self.num_beams} (beam sampling) is not supported; "
                              "use num_beams=1 to sample or do_sample=False for beam search")
        if self.eos_token_ids is not None:
            bad = [t for t in self.eos_token_ids if not isinstance(t, int) or t < 0]
            if bad:
                raise ConfigError(f"eos_token_ids={self.eos_token_ids!r} must be non-negative integers (bad: {bad})")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ConfigError(f"stop_strings={self.stop_strings!r} must be non-empty strings")
        if self.constraint is not None:
            rows = self.constraint if isinstance(self.constraint, list) else [self.constraint]
            bad = [c for c in rows if c is not None and not hasattr(c, "new_matcher")]
            if bad or not rows:
                raise ConfigError(f"constraint={self.constraint!r} must be a Constraint (lmlab.generation.constrain) "
                                  "or a non-empty list of them, one per batch row")
            if self.num_beams > 1:
                raise ConfigError(f"constraint with num_beams={self.num_beams} is not supported; "
                                  "structured output works with greedy search and sampling (num_beams=1)")
        if isinstance(self.seed, tuple):
            self.seed = list(self.seed)
        seeds = self.seed if isinstance(self.seed, list) else [] if self.seed is None else [self.seed]
        if (isinstance(self.seed, list) and not seeds) or any(
                not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
            raise ConfigError(f"seed={self.seed!r} must be a non-negative integer, or a non-empty list of them "
                              "(one per batch row)")

    @property
    def sampling(self) -> bool:
        """Whether tokens are drawn at random (temperature 0 turns sampling into greedy search)."""
        return self.do_sample and self.temperature > 0

    def replace(self, **changes: Any) -> "GenerationConfig":
        """A copy with some fields changed (validated again); unknown names raise ConfigError."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown GenerationConfig field(s): {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def check_settings(cls, settings: Any, where: str) -> dict[str, Any]:
        """Decoding settings stored apart from a config (a recipe's ``generation``, a sweep's decodings):
        a mapping of GenerationConfig fields with valid values -> the mapping; else a ConfigError naming
        `where` and the bad key or value. ``constraint`` and ``seed`` belong to a request, not to stored
        settings, and are refused."""
        if not isinstance(settings, dict):
            raise ConfigError(f"{where} must be a mapping of GenerationConfig fields, not {settings!r}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"constraint", "seed"}
        bad = sorted(set(settings) - fields)
        if bad:
            raise ConfigError(f"{where}: {', '.join(bad)} are not decoding settings; valid: {', '.join(sorted(fields))}")
        try:
            cls(**settings)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return settings

    # Hugging Face names that differ from ours, and keys that carry no decoding behaviour.
    _HF_RENAMES = {"eos_token_id": "eos_token_ids"}
    _HF_IGNORED = {"_from_model_config", "transformers_version", "bos_token_id", "decoder_start_token_id",
                   "use_cache", "num_return_sequences", "return_dict_in_generate", "output_scores"}

    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict[str, Any]) -> "GenerationConfig":
        """Read a Hugging Face ``generation_config.json`` (a file, a directory holding one, or its dict).

        Keys we know are mapped; ``max_length`` (prompt + new tokens) cannot be mapped without the
        prompt, so it is listed with the other unknown keys in one warning and ignored.
        """
        if isinstance(path_or_dict, dict):
            data = dict(path_or_dict)
        else:
            path = Path(path_or_dict)
            if path.is_dir():
                path = path / "generation_config.json"
            if not path.exists():
                raise ConfigError(f"generation config {str(path)!r} does not exist")
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"generation config {str(path)!r} is not valid JSON: {exc}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            name = cls._HF_RENAMES.get(key, key)
            if name in known:
                if value is not None:
                    kwargs[name] = value
            elif key not in cls._HF_IGNORED:
                unknown.append(key)
        if isinstance(kwargs.get("stop_strings"), str):
            kwargs["stop_strings"] = [kwargs["stop_strings"]]
        if not kwargs.get("do_sample", False):  # HF files keep sampling knobs around even when greedy
            for name in ("temperature", "top_k", "top_p", "min_p"):
                kwargs.pop(name, None)
        if unknown:
            warnings.warn(f"GenerationConfig.from_hf ignored unknown key(s): {', '.join(sorted(unknown))}", stacklevel=2)
        return cls(**kwargs)
