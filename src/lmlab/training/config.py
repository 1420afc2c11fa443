"""PretrainConfig: the whole description of a pre-training run, from a YAML/JSON file and overrides.

A run config has four sections; every field can be overridden on the command line with
``--set section.field=value`` (the value is parsed as YAML, so ``--set train.lr=3e-4`` gives a float
and ``--set data.files=[a.txt,b.jsonl]`` a list)::

    base: decoder-10m            # optional: start from a training preset (TRAIN_PRESETS, read from
                                 # lmlab/training/presets/NAME.yaml), then apply this file
    model: {preset: decoder-10m, dropout: 0.0}     # a lmlab.config.PRESETS name + ModelConfig overrides
    data:  {files: [corpus.jsonl], field: text, seq_len: 256, vocab_size: 8192}
    train: {objective: clm, steps: 2000, batch_size: 16, lr: 6e-4, ...}
    out_dir: runs/decoder-10m

Unknown keys are errors that name the key and list the valid ones. ``vocab_size`` and the special
token ids of the model come from the tokenizer, so the model and the data always agree.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from lmlab.config import PRESETS, ModelConfig
from lmlab.errors import ConfigError, choices_error


@dataclass
class ModelSection:
    preset: str = "tiny-decoder"  # a lmlab.config.PRESETS name
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (vocab_size comes from the tokenizer)


@dataclass
class DataSection:
    files: list[str] = field(default_factory=list)  # .txt / .jsonl paths, or hf:DATASET[:CONFIG]
    field: str = "text"  # JSONL / datasets field holding the document
    tokenizer: str | None = None  # a directory with tokenizer.json; None: train one into OUT/tokenizer
    tokenizer_kind: str = "bpe"  # bpe | unigram, when training one
    vocab_size: int | None = None  # tokenizer vocabulary when training one; None: the model preset's
    n_sentinels: int = 100  # <extra_id_k> tokens added for span corruption (T5 uses 100)
    seq_len: int | None = None  # model input length; None: the model's max_seq_len
    val_fraction: float = 0.05  # held-out fraction of the blocks


@dataclass
class TrainSection:
    objective: str | None = None  # clm | mlm | span; None: by architecture
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # blocks per micro-step, global (split over ranks)
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    mask_prob: float = 0.15  # mlm
    noise_density: float = 0.15  # span
    mean_span_length: float = 3.0  # span
    eval_every: int = 200  # steps between validation passes (0: only at the end)
    eval_batches: int = 8
    ckpt_every: int = 200  # steps between checkpoints (0: only at the end / on interrupt)
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16
    distributed: str = "none"  # none | ddp | fsdp (launch with torchrun)
    device: str = "auto"  # auto | cpu | cuda
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in this invocation
    sharded_checkpoint: bool = False  # fsdp: save model/optimizer as a DCP directory (no gather on rank 0)


@dataclass
class FinetuneSection(TrainSection):
    """The training section of jobs that count passes over their data (fine-tuning, alignment, distillation)."""

    epochs: float | None = None  # when set, steps = ceil(epochs * batches per epoch / grad_accum)
    label_smoothing: float = 0.0  # supervised fine-tuning: cross-entropy against smoothed targets (0: off)
    neftune_alpha: float = 0.0  # supervised fine-tuning: NEFTune embedding noise alpha (0: off; the paper uses 5)


@dataclass
class LoraSection:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    rslora: bool = False

    def to_lora(self):
        """The ``lmlab.adapt.lora.LoraConfig`` of this section."""
        from lmlab.adapt.lora import LoraConfig  # lazy: reading a config file does not import torch

        return LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                          rslora=self.rslora)


@dataclass
class EvalSection:
    rouge_examples: int = 24  # validation examples summarized with real generation at each evaluation (0: none)
    max_new_tokens: int = 64
    batch_size: int = 8
    select: str | None = "rouge1"  # metric that picks the best checkpoint; "-val_loss" for the lowest loss
    patience: int | None = None  # evaluations without improvement before stopping early


def check_eval(e: EvalSection) -> None:
    if e.rouge_examples < 0 or e.max_new_tokens < 1 or e.batch_size < 1:
        raise ConfigError(f"eval.rouge_examples={e.rouge_examples} must be >= 0, eval.max_new_tokens="
                          f"{e.max_new_tokens} and eval.batch_size={e.batch_size} >= 1")
    if e.patience is not None and e.patience < 1:
        raise ConfigError(f"eval.patience={e.patience!r} must be >= 1 (or null: never stop early)")


def check_lora(lora: LoraSection) -> None:
    if not isinstance(lora.r, int) or lora.r < 1 or not lora.alpha > 0 or not 0 <= lora.dropout < 1:
        raise ConfigError(f"lora.r={lora.r!r} must be an integer >= 1, lora.alpha={lora.alpha!r} > 0 and "
                          f"lora.dropout={lora.dropout!r} in [0, 1)")
    if not lora.targets:
        raise ConfigError("lora.targets is empty; name the linears to adapt, e.g. q,k,v,o,gate,up,down")


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    out_dir: str = "runs/pretrain"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = {"preset": self.model.preset, **self.model.overrides}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PretrainConfig":
        data = dict(data)
        base = data.pop("base", None)
        merged: dict[str, Any] = {}
        if base is not None:
            if base not in TRAIN_PRESETS:
                raise choices_error("base", base, sorted(TRAIN_PRESETS))
            merged = _deep_merge({}, TRAIN_PRESETS[base])
        merged = _deep_merge(merged, data)
        sections = {"model", "data", "train", "out_dir"}
        unknown = sorted(set(merged) - sections)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; valid keys: base, {', '.join(sorted(sections))}")
        model = dict(merged.get("model") or {})
        preset = model.pop("preset", ModelSection.preset)
        if preset not in PRESETS:
            raise choices_error("model.preset", preset, sorted(PRESETS))
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        bad = sorted(set(model) - model_fields)
        if bad:
            raise ConfigError(f"unknown key(s) model.{', model.'.join(bad)}; valid: preset and the ModelConfig fields")
        return cls(model=ModelSection(preset, model), data=_section(DataSection, merged.get("data"), "data"),
                   train=_section(TrainSection, merged.get("train"), "train"),
                   out_dir=str(merged.get("out_dir", cls.out_dir)))


def _section(cls, data: dict | None, name: str):
    data = dict(data or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"valid: {', '.join(f'{name}.{k}' for k in sorted(known))}")
    return cls(**data)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config dict."""
    data = _deep_merge({}, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
        value = yaml.safe_load(raw) if raw else None
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads "3e-4" as a string
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML (or .json) run config file -> its mapping; a one-line ConfigError when it is not one."""
    try:
        data = (json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())) or {}
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot parse config {str(path)!r}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {str(path)!r} must hold a mapping, not {type(data).__name__}")
    return data


def load_config(source: str | Path | None, overrides: list[str] | None = None) -> PretrainConfig:
    """A run config from a YAML/JSON file or a TRAIN_PRESETS name, with ``--set`` overrides applied."""

    data: dict[str, Any] = {}
    if source is not None:
        path = Path(source)
        if path.exists():
            data = read_config_file(path)
        elif str(source) in TRAIN_PRESETS:
            data = {"base": str(source)}
        else:
            raise ConfigError(f"config {str(source)!r} is neither a file nor a preset; presets: {', '.join(sorted(TRAIN_PRESETS))}")
    return PretrainConfig.from_dict(apply_overrides(data, overrides or []))


# --- training presets: a model preset plus batch / lr / steps -----------------------------------
def _read_presets() -> dict[str, dict[str, Any]]:
    """name -> raw config dict, one YAML file per preset in ``lmlab/training/presets/`` (package data).

    The YAML files are the only source: ``--config NAME``, ``base: NAME`` and this dict all read them.
    """
    presets = {}
    for entry in sorted(files("lmlab.training").joinpath("presets").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            presets[entry.name[: -len(".yaml")]] = yaml.safe_load(entry.read_text())
    return presets


# tiny (tests and smoke runs: seconds on one CPU thread), decoder-10m, encoder-10m, encoder-decoder-10m,
# and the reference shapes for users with accelerators: gpt2-124m, bert-base, t5-small
TRAIN_PRESETS: dict[str, dict[str, Any]] = _read_presets()
