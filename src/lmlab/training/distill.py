"""Knowledge distillation with unlabeled data: a teacher's knowledge into a smaller student, in the one loop.

``distill(config)`` loads the teacher (with its LoRA adapter folded in: by default the DialogSum
summarizer lmlab ships), builds a student, and trains it through ``lmlab.training.job.run_job`` — the
same outline, loop, schedule, checkpoints, exact resume and metrics as pre-training and fine-tuning.
Everything that can be checked without weights (files, ranges, the student's layers and vocabulary
against the model configs) is checked before the teacher loads. Two methods:

* ``sequence`` (Kim & Rush, 2016): the teacher summarizes every unlabeled input once (greedy, the
  prompt of its recipe; ``lmlab.training.pseudo_labels`` caches them in ``OUT/pseudo_labels.jsonl``,
  resumable), and the student is fine-tuned on (input, teacher summary) with the supervised
  fine-tuning objective. Where ``data.label_field`` gives a human label, the input also gives
  (input, label) — with ``pseudo.label_labeled: false`` only that pair, so a fully labelled set needs
  no teacher generation at all (DistilBART's "shrink and fine-tune").
* ``token`` (Hinton et al., 2015): ``lmlab.objectives.distill.TokenDistillation``: on every response
  token the student matches the teacher's softened distribution (KL at temperature τ, scaled by τ²),
  mixed with the cross-entropy on human labels where ``data.label_field`` gives them (weight α).
  Inputs without a label take the teacher's summary as their response (so they need pseudo-labels too).

The student (``student``):

* ``keep_layers: every-other`` (or ``[0, 2, 5]``): the teacher with only those decoder layers,
  initialised from the teacher's (adapter-merged) weights, as DistilBERT was built from BERT;
* ``model: SOURCE``: any model ``lmlab.load_model`` reads (its weights), or ``model: PRESET`` /
  ``model: config.json``: a ``ModelConfig`` initialised at random. An explicit ``keep_layers`` applies
  on top (unset, such a student keeps all its layers).
  Either way it uses the teacher's tokenizer; a vocabulary of another size is refused.
* ``lora: {r, alpha, ...}``: only LoRA adapters on the frozen student train. A student cut from the
  teacher is then saved as a *bundle* (``lmlab.adapt.student``): the teacher's adapter on the kept
  layers plus the student's adapter, a few MB that ``lmlab.load_model(teacher, student=DIR)`` merges
  over the teacher's base weights; a student ``model`` gets a PEFT adapter over that model.

Evaluation data stays out of training: ``data.holdout`` (default: DialogSum ``dev.jsonl`` records
400:500, the lab's evaluation range) is checked against every training source — by index for a file of
that name, by dialogue text for every file — and an overlap is an error that names the records.

Run directory::

    OUT/pseudo_labels.jsonl   the teacher's summaries (resumable cache)
    OUT/best/, OUT/final/     the student (lmlab format, or the bundle / adapter with student.lora; + the prompt
                              recipe: lmlab lab/summarize/serve use it)
    OUT/checkpoint.pt, OUT/metrics.jsonl, OUT/loss.png, OUT/run_config.json, OUT/summary.json

Config (YAML or JSON; every field can be overridden with ``--set section.key=value``)::

    teacher: smollm2-135m-instruct
    teacher_adapter: shipped          # shipped | null (no adapter) | a PEFT adapter directory
    method: sequence                  # sequence | token
    student: {keep_layers: every-other, model: null, lora: null}
                                      # keep_layers null: every-other of the teacher, all of a model;
                                      # lora: {r: 16, alpha: 32, dropout: 0.05, targets: [q, k, ...], rslora: false}
                                      # output_vocab: {first: 16384} trims a bundle's head (null: whole vocabulary)
    data:
      train: [{path: ../shared/data/dialogsum/hiddentest.jsonl}, {path: ../shared/data/dialogsum/dev.jsonl, records: "0:400"}]
      field: dialogue                 # the input field
      label_field: null               # human labels (e.g. summary): token: the hard-label loss; sequence: pairs
      holdout: {path: dev.jsonl, records: "400:500"}   # never trained on; null disables the guard
      validation: null                # {path, records}: val loss + ROUGE on human labels (not the holdout!)
      max_seq_len: 768
    token: {temperature: 2.0, alpha: 0.5, positions: response, hard_pseudo_labels: false}
                                      # positions: all = the KL on the prompt's positions too (decoder-only);
                                      # hard_pseudo_labels: the CE term on teacher summaries too (Kim & Rush's
                                      # sequence- plus word-level mix)
    pseudo: {batch_size: 8, max_new_tokens: 64, label_labeled: true}   # label_labeled: sequence: teacher
                                      # summaries of labelled inputs too
    eval: {rouge_examples: 24, max_new_tokens: 64, batch_size: 8, select: rouge1, patience: null}
    train: {epochs: 1, batch_size: 4, grad_accum: 2, lr: 2e-4, ...}   # epochs (default 1) sets the steps; null: train.steps
    out_dir: runs/distill
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lmlab
from lmlab.adapt.lora import apply_lora, merge_lora
from lmlab.adapt.peft import WEIGHTS_FILE, check_savable, save_adapter
from lmlab.adapt.student import base_model_name, keep_layers, output_vocabulary, restrict_adapter, write_bundle
from lmlab.adapt.recipe import Recipe, shipped_adapter
from lmlab.checkpoints import load_config, save_model
from lmlab.config import PRESETS, ModelConfig
from lmlab.errors import ConfigError, DataError, choices_error
from lmlab.jsonl import iter_objects
from lmlab.model import Transformer
from lmlab.objectives.distill import TokenDistillation
from lmlab.objectives.sft import SupervisedFineTuning
from lmlab.tasks.summarize.experiments import INSTRUCTION
from lmlab.training import distributed as dist
from lmlab.training.config import (EvalSection, FinetuneSection, LoraSection, _deep_merge, _section, apply_overrides,
                                   check_eval, check_lora, read_config_file)
from lmlab.training.job import Built, JobSpec, run_job
from lmlab.training.pseudo_labels import CACHE_FILE, generate_pseudo_labels, read_cache, text_key
from lmlab.training.sft_data import (SFTBatches, Tokenized, check_source, eval_set, evaluate_sft, read_pairs,
                                     record_range, tokenize_pairs)

METHODS = ("sequence", "token")
DEFAULT_HOLDOUT = {"path": "dev.jsonl", "records": "400:500"}  # the lab's DialogSum evaluation range


# --- config ----------------------------------------------------------------------------------
@dataclass
class StudentSection:
    keep_layers: str | list[int] | None = None  # every-other | [i, j, ...] | "0,2,4" | all; null: every-other
    # of the teacher, or all of another student model
    model: str | None = None  # null: the teacher; a model source (weights) or a ModelConfig preset / JSON (random)
    lora: dict | None = None  # {r, alpha, dropout, targets, rslora} (lmlab.training.config.LoraSection): train
    # LoRA adapters on the frozen student instead of every weight; a student cut from the teacher is then saved
    # as a bundle (lmlab.adapt.student): the kept layers' teacher adapter + the student's adapter
    output_vocab: dict | None = None  # {first: 16384}: the bundle's output head keeps only the tokenizer's first
    # ids, its specials and every token of the training dialogues and summaries (lmlab.nn.subset_head; the
    # student trains with the whole head, and decodes reading a third of it); null: the whole vocabulary


@dataclass
class DistillData:
    train: list[dict] = field(default_factory=list)  # [{path, records: "a:b" | null, weight: 1.0}]
    field: str = "dialogue"
    label_field: str | None = None  # human labels: token: the hard-label loss; sequence: (input, label) pairs
    holdout: dict | None = dataclasses.field(default_factory=lambda: dict(DEFAULT_HOLDOUT))  # (`field` is taken)
    validation: dict | None = None  # {path, records}; scored against its label_field (default: summary)
    max_seq_len: int = 768


@dataclass
class TokenSection:
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the hard-label cross-entropy where human labels exist
    positions: str = "response"  # response | all: the KL on response tokens only, or on the prompt's too
    hard_pseudo_labels: bool = False  # the cross-entropy also on the teacher's summaries (sequence-level KD mixed in)


@dataclass
class PseudoSection:
    batch_size: int = 8
    max_new_tokens: int = 64
    label_labeled: bool = True  # sequence with data.label_field: the teacher also summarizes labelled inputs, and
    # both pairs train ((input, human label) and (input, teacher summary)); false: labelled inputs give only theirs


@dataclass
class DistillConfig:
    teacher: str = "smollm2-135m-instruct"
    teacher_adapter: str | None = "shipped"
    method: str = "sequence"
    student: StudentSection = field(default_factory=StudentSection)
    data: DistillData = field(default_factory=DistillData)
    token: TokenSection = field(default_factory=TokenSection)
    pseudo: PseudoSection = field(default_factory=PseudoSection)
    eval: EvalSection = field(default_factory=EvalSection)
    train: FinetuneSection = field(default_factory=lambda: FinetuneSection(
        epochs=1, lr=2e-4, warmup_steps=10, weight_decay=0.0, beta2=0.999, eval_every=0, ckpt_every=50,
        log_every=1, batch_size=4, grad_accum=2, min_lr_ratio=0.1))
    out_dir: str = "runs/distill"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DistillConfig":
        default = cls().to_dict()
        merged = _deep_merge(default, data)
        unknown = sorted(set(merged) - set(default))
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; valid keys: {', '.join(sorted(default))}")
        return cls(teacher=str(merged["teacher"]), teacher_adapter=merged["teacher_adapter"], method=merged["method"],
                   student=_section(StudentSection, merged["student"], "student"),
                   data=_section(DistillData, merged["data"], "data"),
                   token=_section(TokenSection, merged["token"], "token"),
                   pseudo=_section(PseudoSection, merged["pseudo"], "pseudo"),
                   eval=_section(EvalSection, merged["eval"], "eval"),
                   train=_section(FinetuneSection, merged["train"], "train"), out_dir=str(merged["out_dir"]))


def load_distill_config(source: str | Path | None, overrides: list[str] | None = None) -> DistillConfig:
    """A DistillConfig from a YAML/JSON file with ``--set`` overrides applied."""
    data: dict[str, Any] = {}
    if source is not None:
        if not Path(source).exists():
            raise ConfigError(f"distillation config {str(source)!r} does not exist")
        data = read_config_file(Path(source))
    return DistillConfig.from_dict(apply_overrides(data, overrides or []))


def validate(cfg: DistillConfig) -> None:
    """Every setting, file and shape that can be checked without loading weights (``run_job`` checks ``train``):
    above all the student's layers, which would otherwise fail only after the teacher labelled every input."""
    if cfg.method not in METHODS:
        raise choices_error("method", cfg.method, METHODS)
    if not cfg.data.train:
        raise ConfigError("data.train is empty; give the unlabeled inputs, e.g. --data unlabeled.jsonl")
    for i, source in enumerate(cfg.data.train):
        check_source(source, f"data.train[{i}]")
        weight = source.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"data.train[{i}].weight={weight!r} must be a number > 0")
    if cfg.data.validation:
        check_source(cfg.data.validation, "data.validation")
    if cfg.data.max_seq_len < 16:
        raise ConfigError(f"data.max_seq_len={cfg.data.max_seq_len} is too small (at least 16)")
    if cfg.pseudo.batch_size < 1 or cfg.pseudo.max_new_tokens < 1:
        raise ConfigError(f"pseudo.batch_size={cfg.pseudo.batch_size} and pseudo.max_new_tokens="
                          f"{cfg.pseudo.max_new_tokens} must be >= 1")
    check_eval(cfg.eval)
    if cfg.method == "token":  # the objective's own checks, before the teacher loads
        if not cfg.token.temperature > 0:
            raise ConfigError(f"token.temperature={cfg.token.temperature!r} must be > 0")
        if not 0.0 <= cfg.token.alpha <= 1.0:
            raise ConfigError(f"token.alpha={cfg.token.alpha!r} must be in [0, 1] (the weight of the hard-label loss)")
        if cfg.token.positions not in ("response", "all"):
            raise choices_error("token.positions", cfg.token.positions, ("response", "all"))
    t = cfg.train
    if cfg.method == "token" and (t.label_smoothing or t.neftune_alpha):
        raise ConfigError(f"train.label_smoothing={t.label_smoothing!r} / train.neftune_alpha={t.neftune_alpha!r}: "
                          "these apply to method=sequence only (token distillation learns the teacher's distribution)")
    SupervisedFineTuning("decoder", 0, label_smoothing=t.label_smoothing, neftune_alpha=t.neftune_alpha)  # the values
    if not isinstance(cfg.pseudo.label_labeled, bool):
        raise ConfigError(f"pseudo.label_labeled={cfg.pseudo.label_labeled!r} must be true or false")
    teacher_adapter(cfg)
    student_lora(cfg.student)
    output_vocab_first(cfg.student)
    check_student(cfg.student, cfg.teacher)


# --- the student -----------------------------------------------------------------------------
def _spec_text(spec) -> str:
    """keep_layers as the user wrote it: 9 (not 9.0, as --set reads a number), "0,2,4", [0, 2]."""
    def one(i):
        return str(int(i)) if isinstance(i, float) and i.is_integer() else str(i)

    if isinstance(spec, (list, tuple)):
        return ",".join(one(i) for i in spec)
    return one(spec)


def _student_config(section: StudentSection) -> ModelConfig | None:
    """The config of a student built from a preset or a config.json (None: the student is a model source)."""
    if section.model in PRESETS:
        return ModelConfig.from_name(section.model)
    if str(section.model).endswith(".json") and not Path(section.model).is_dir():
        if not Path(section.model).is_file():
            raise ConfigError(f"student.model={section.model!r}: no such ModelConfig JSON file")
        return ModelConfig.from_json(section.model)
    return None


def check_student(section: StudentSection, teacher: str) -> None:
    """The student's vocabulary and ``keep_layers`` checked against the model configs (no weights are read)."""
    teacher_config = load_config(teacher)[0]
    if section.model is None:
        config = teacher_config
    else:
        config = _student_config(section) or load_config(section.model)[0]
    check_vocabulary(config.vocab_size, teacher_config.vocab_size, section.model)
    spec = section.keep_layers if section.keep_layers is not None else ("every-other" if section.model is None
                                                                         else "all")
    if parse_keep_layers(spec, config.n_layers) is not None and config.arch != "decoder":
        raise ConfigError(f"student.keep_layers builds students of decoder-only models; the student has "
                          f"arch={config.arch!r} (set student.keep_layers: all)")


def student_lora(section: StudentSection) -> LoraSection | None:
    """``student.lora`` as a checked LoraSection (None: every weight of the student trains)."""
    if section.lora is None:
        return None
    if not isinstance(section.lora, dict):
        raise ConfigError(f"student.lora={section.lora!r} must be a mapping like {{r: 16, alpha: 32}} (or null)")
    lora = _section(LoraSection, section.lora, "student.lora")
    try:
        check_lora(lora)
    except ConfigError as exc:
        raise ConfigError(f"student.{exc}") from None
    if section.model is not None and _student_config(section) is not None:
        raise ConfigError(f"student.lora trains adapters on a frozen student, but student.model={section.model!r} "
                          f"is initialised at random; give a model with weights, or set student.lora to null")
    return lora


def output_vocab_first(section: StudentSection) -> int | None:
    """``student.output_vocab``'s ``first`` (None: no trimming), checked; only a student bundle carries it."""
    spec = section.output_vocab
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) != {"first"}:
        raise ConfigError(f"student.output_vocab={spec!r} must be a mapping like {{first: 16384}} (or null)")
    first = spec["first"]
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise ConfigError(f"student.output_vocab.first={first!r} must be an integer >= 0 (the tokenizer's first ids "
                          f"to keep)")
    if section.lora is None or section.model is not None:
        raise ConfigError("student.output_vocab trims the head of a student bundle: it needs student.lora and a "
                          "student cut from the teacher (student.model: null)")
    return first


def student_layers(section: StudentSection, n_layers: int) -> list[int] | None:
    """The layers a student keeps of a model with `n_layers` (None: all), as ``build_student`` keeps them."""
    spec = section.keep_layers if section.keep_layers is not None else ("every-other" if section.model is None
                                                                         else "all")
    return parse_keep_layers(spec, n_layers)


# --- the student -----------------------------------------------------------------------------
def parse_keep_layers(spec, n_layers: int | None) -> list[int] | None:
    """``every-other`` | ``"0,2,4"`` | [0, 2, 4] | None -> sorted layer indices (None: keep all).

    ``every-other`` keeps layers 0, 2, 4, ... (DistilBERT's choice): 15 of SmolLM2's 30.
    """
    if spec is None or spec == "all":
        return None
    if spec == "every-other":
        return None if n_layers is None else list(range(0, n_layers, 2))
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):  # one layer; --set parses "1" as a number
        spec = [spec]
    items = spec.split(",") if isinstance(spec, str) else spec
    try:
        indices = [int(i) if isinstance(i, (int, float)) and float(i).is_integer() else int(str(i).strip())
                   for i in items]
    except (TypeError, ValueError):
        raise ConfigError(f"student.keep_layers={_spec_text(spec)!r} must be every-other or layer indices like "
                          f"0,2,4") from None
    if not indices or len(set(indices)) != len(indices):
        raise ConfigError(f"student.keep_layers={_spec_text(spec)!r} must name distinct layers")
    if n_layers is not None and not all(0 <= i < n_layers for i in indices):
        bad = next(i for i in indices if not 0 <= i < n_layers)
        raise ConfigError(f"student.keep_layers={_spec_text(spec)!r}: layer {bad} does not exist; the model has "
                          f"layers 0..{n_layers - 1}")
    return sorted(indices)


def build_student(cfg: StudentSection, teacher, seed: int = 0):
    """The student model (train mode, every weight trainable); its vocabulary must be the teacher's."""
    if cfg.model is None:
        student = teacher
    else:
        config = _student_config(cfg)
        if config is not None:
            torch.manual_seed(seed)
            student = Transformer(config)
        else:
            student = lmlab.load_model(cfg.model)
    check_vocabulary(student.config.vocab_size, teacher.config.vocab_size, cfg.model)
    indices = student_layers(cfg, student.config.n_layers)
    if indices is not None:
        student = keep_layers(student, indices)
    elif student is teacher:  # a copy through the state dict (deepcopy would also copy an engine's packed weights)
        student = keep_layers(teacher, list(range(teacher.config.n_layers)))
    return student.float().train().requires_grad_(True)


def check_vocabulary(student_vocab: int, teacher_vocab: int, student_name: str | None = None) -> None:
    """The student must read and predict the teacher's tokens: same vocabulary size (one-line error otherwise)."""
    if student_vocab != teacher_vocab:
        named = f"student {student_name!r}" if student_name else "the student"
        raise ConfigError(f"{named} has a vocabulary of {student_vocab} tokens, the teacher {teacher_vocab}: "
                          f"distillation needs a student that shares the teacher's tokenizer")


# --- data ------------------------------------------------------------------------------------
@dataclass
class Input:
    id: str
    text: str
    label: str | None  # a human label when data.label_field gives one


def read_inputs(source: dict, text_field: str, label_field: str | None, where: str) -> list[Input]:
    """Inputs (and optional labels) from one JSONL source ({path, records}); an empty input is an error."""
    path = Path(source.get("path", ""))
    if not path.exists():
        raise DataError(f"{where}: data file {str(path)!r} does not exist")
    records = [obj for _, obj in iter_objects(path.read_text(encoding="utf-8").splitlines(), str(path))]
    out = []
    for i in record_range(source.get("records"), len(records), where):
        obj = records[i]
        text = obj.get(text_field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{i + 1}: field {text_field!r} is missing or empty")
        label = obj.get(label_field) if label_field else None
        label = label.strip() if isinstance(label, str) and label.strip() else None
        out.append(Input(str(obj.get("fname", obj.get("id", f"{path.name}:{i + 1}"))), text.strip(), label))
    if not out:
        raise DataError(f"{where}: {str(path)!r} (records {source.get('records')!r}) holds no records")
    return out


def check_holdout(sources: list[dict], holdout: dict | None, text_field: str) -> None:
    """Refuse training sources that include held-out evaluation records (one line naming them).

    A training file with the holdout's file name (``dev.jsonl``) must not select records of the
    holdout range; and where the holdout file can be read (the training file of that name, or the
    holdout path itself), no training file may contain one of its dialogues, whatever its name.
    """
    if not holdout:
        return
    records = _Records()
    name, spec = Path(str(holdout.get("path", ""))).name, holdout.get("records")
    held_texts: set[str] = set()
    candidates = [Path(str(holdout.get("path", "")))] + [Path(s.get("path", "")) for s in sources
                                                        if Path(s.get("path", "")).name == name]
    for path in candidates:
        if path.is_file():
            for i in record_range(spec, len(records(path)), "data.holdout"):
                text = records.text(path, i, text_field)
                if text:
                    held_texts.add(text_key(text))
            break
    for k, source in enumerate(sources):
        path = Path(source.get("path", ""))
        if not path.is_file():
            continue
        n = len(records(path))
        chosen = record_range(source.get("records"), n, f"data.train[{k}]")
        if path.name == name:
            held = record_range(spec, n, "data.holdout")
            overlap = sorted(set(chosen) & set(held))
            if overlap:
                raise DataError(f"data.train[{k}] {str(path)!r} records {source.get('records') or 'all'} include "
                                f"{len(overlap)} held-out evaluation records ({overlap[0]}..{overlap[-1]}; data.holdout "
                                f"{name} {spec}); train on records outside {spec}, e.g. {path}:0:{held.start}, "
                                f"or set data.holdout to null to train on them anyway")
        if held_texts:
            leaked = [i for i in chosen if (t := records.text(path, i, text_field)) and text_key(t) in held_texts]
            if leaked:
                raise DataError(f"data.train[{k}] {str(path)!r} holds {len(leaked)} dialogue(s) of the held-out "
                                f"evaluation set ({name} records {spec}), e.g. record {leaked[0]}; remove them, or set "
                                f"data.holdout to null to train on them anyway")


class _Records:
    """The records of JSONL files, each read at most once per ``check_holdout`` call (never kept longer:
    a file edited between two calls is read again)."""

    def __init__(self):
        self._files: dict[Path, list[dict]] = {}

    def __call__(self, path: Path) -> list[dict]:
        key = path.resolve()
        if key not in self._files:
            self._files[key] = [obj for _, obj in iter_objects(path.read_text(encoding="utf-8").splitlines(), str(path))]
        return self._files[key]

    def text(self, path: Path, i: int, text_field: str) -> str | None:
        value = self(path)[i].get(text_field)
        return value.strip() if isinstance(value, str) else None


class DistillBatches(SFTBatches):
    """SFTBatches whose micro-batches also mark the rows with human labels (for the hard-label loss)."""

    def collate_examples(self, batch):
        return self.objective.collate_hard([(e.prompt, e.response) for e in batch], [e.hard for e in batch])


@dataclass
class DistillExample(Tokenized):
    hard: bool = False  # the response is a human label (else the teacher's summary)


# --- the job ---------------------------------------------------------------------------------
def distill(cfg: DistillConfig, resume: bool = False, show_progress: bool = True, pseudo_only: bool = False,
            pseudo_stop_after: int | None = None) -> dict:
    """Run (or resume) the distillation job `cfg` -> summary dict (steps, losses, paths, pseudo-label counts).

    ``pseudo_only``: generate (or complete) the teacher's pseudo-labels and stop before training.
    ``pseudo_stop_after`` (a testing knob): stop generating after that many new labels, as a kill would.
    """
    validate(cfg)
    identity = {"distill_config": {k: v for k, v in cfg.to_dict().items() if k != "train"},
                "train": {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in ("stop_after", "device")}}
    spec = JobSpec(cfg.out_dir, cfg.train, cfg.to_dict(), identity, resume, show_progress)
    return run_job(spec, lambda env: build(cfg, env, show_progress, pseudo_only, pseudo_stop_after))


def teacher_adapter(cfg: DistillConfig) -> Path | None:
    """The teacher's adapter directory: ``shipped`` -> the one lmlab ships for the teacher; None: no adapter."""
    adapter = cfg.teacher_adapter
    if adapter in (None, "", "none", "null"):
        return None
    if adapter == "shipped":
        path = shipped_adapter(cfg.teacher)
        if path is None:
            raise ConfigError(f"teacher_adapter=shipped: lmlab ships no adapter for {cfg.teacher!r}; pass "
                              f"--teacher-adapter DIR or --no-teacher-adapter")
        return Path(path)
    if not Path(adapter).is_dir():
        raise ConfigError(f"teacher_adapter {adapter!r} is not a directory (a PEFT LoRA adapter, e.g. from lmlab "
                          f"finetune)")
    return Path(adapter)


def load_teacher(cfg: DistillConfig):
    """(teacher with its adapter merged, eval mode, frozen; tokenizer; prompt recipe; adapter identity)."""
    adapter = teacher_adapter(cfg)
    tokenizer = lmlab.load_tokenizer(cfg.teacher)
    teacher = lmlab.load_model(cfg.teacher, adapter=adapter)
    adapter_id = None
    if adapter is not None:
        merge_lora(teacher)  # W + scale * B A: one matmul per linear when the teacher generates and scores
        adapter_id = hashlib.sha256((adapter / WEIGHTS_FILE).read_bytes()).hexdigest()[:12]
    teacher.eval().requires_grad_(False)
    recipe = Recipe.load(adapter) if adapter is not None else None
    if recipe is None:  # a teacher without a recipe gets the lab's instruction prompt
        recipe = Recipe(template="instruction", instruction=INSTRUCTION,
                        chat=getattr(tokenizer, "chat_template", None) is not None,
                        prompt_field=cfg.data.field, response_field=cfg.data.label_field or "summary")
    recipe = dataclasses.replace(recipe, max_new_tokens=cfg.pseudo.max_new_tokens)
    return teacher, tokenizer, recipe, (str(adapter) if adapter is not None else None, adapter_id)


def build(cfg: DistillConfig, env: dist.DistEnv, show_progress: bool, pseudo_only: bool,
          pseudo_stop_after: int | None) -> Built | dict:
    """The teacher's pseudo-labels, the student, its objective and batches (or, pseudo_only, the labels alone)."""
    t, out = cfg.train, Path(cfg.out_dir)
    echo = print if (env.is_main and show_progress) else (lambda *_: None)

    # 1. data first (a bad file or a leak of evaluation records fails before any model is loaded)
    check_holdout(cfg.data.train, cfg.data.holdout, cfg.data.field)
    if cfg.data.validation:
        check_holdout([cfg.data.validation], cfg.data.holdout, cfg.data.field)
    sources = [(read_inputs(source, cfg.data.field, cfg.data.label_field, f"data.train[{i}]"),
                float(source.get("weight", 1.0))) for i, source in enumerate(cfg.data.train)]
    # sequence: labelled inputs give (input, label) and, with pseudo.label_labeled, (input, teacher summary) too
    both = cfg.method == "sequence" and cfg.pseudo.label_labeled

    # 2. the teacher, and its summaries of every input that has no human label
    teacher, tokenizer, recipe, (adapter, adapter_id) = load_teacher(cfg)
    teacher.to(env.device)
    unlabeled = [(x.id, x.text) for inputs, _ in sources for x in inputs if x.label is None or both]
    pseudo: dict[str, str] = {}
    if unlabeled:
        signature = {"teacher": cfg.teacher, "adapter": adapter_id, "recipe": dataclasses.asdict(recipe),
                     "generation": "greedy, the lab's finetuned experiment", "precision": "fp32"}
        if env.is_main:
            pseudo = generate_pseudo_labels(teacher, tokenizer, recipe, unlabeled, out / CACHE_FILE, signature,
                                            cfg.pseudo.batch_size, cfg.pseudo.max_new_tokens, echo=echo,
                                            progress=show_progress, stop_after=pseudo_stop_after)
        dist.barrier(env)
        if not env.is_main:
            pseudo = {k: r["summary"] for k, r in read_cache(out / CACHE_FILE, signature).items()}
    missing = sum(text_key(text) not in pseudo for _, text in unlabeled)
    if missing or pseudo_only:  # stopped during generation (the testing knob), or asked to stop here
        return {"finished": False, "pseudo_only": True, "pseudo_labels": len(pseudo), "pseudo_missing": missing,
                "step": 0, "rank": env.rank, "interrupted": None, "cache": str(out / CACHE_FILE)}

    # 3. (input, response) pairs: the human label, the teacher's summary, or (sequence, label_labeled) both
    train_sources, n_train, n_empty, n_hard, n_hard_rows, n_truncated = [], 0, 0, 0, 0, 0
    texts: list[str] = []  # every dialogue and summary the student trains on (its output vocabulary's words)
    for inputs, weight in sources:
        pairs, human = [], []
        for x in inputs:
            if x.label is not None:
                pairs.append((x.id, x.text, x.label))
                human.append(True)
            if x.label is None or both:
                response = pseudo[text_key(x.text)]
                if not response.strip():
                    n_empty += 1  # the teacher said nothing: nothing to learn from this input
                    continue
                pairs.append((x.id, x.text, response))
                human.append(False)
        hard = [h or cfg.token.hard_pseudo_labels for h in human]  # rows the cross-entropy term covers
        texts.extend(text for pair in pairs for text in pair[1:])
        examples = tokenize_pairs(pairs, recipe, tokenizer, cfg.data.max_seq_len)
        examples = [DistillExample(**vars(e), hard=h) for e, h in zip(examples, hard)]
        n_train += len(examples)
        n_hard += sum(human)
        n_hard_rows += sum(hard)
        n_truncated += sum(e.truncated for e in examples)
        if examples:
            train_sources.append((examples, weight))
    if not n_train:
        raise DataError("no training pairs: the teacher produced an empty summary for every input")

    # 4. the student (LoRA adapters on it when student.lora), the objective and the batches
    lora_section = student_lora(cfg.student)
    student = build_student(cfg.student, teacher, seed=t.seed).to(env.device)
    lora = bundle = None
    if lora_section is not None:
        lora = lora_section.to_lora()
        torch.manual_seed(t.seed)
        echo(apply_lora(student, lora))
        check_savable(student)  # refused now, not after training, if the adapter could not be written
        if cfg.student.model is None:  # cut from the teacher: saved as a bundle over the teacher's own base
            kept = student_layers(cfg.student, teacher.config.n_layers) or list(range(teacher.config.n_layers))
            restricted = restrict_adapter(adapter, kept, teacher) if adapter is not None else None
            first = output_vocab_first(cfg.student)
            output_ids = output_vocabulary(texts, tokenizer, first) if first is not None else None
            if output_ids is not None:
                echo(f"output vocabulary: the student's bundle keeps {len(output_ids):,} of "
                     f"{student.config.vocab_size:,} tokens in its head (student.output_vocab.first={first})")
            bundle = (kept, restricted, output_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    arch, start_id = student.config.arch, student.config.decoder_start_token_id
    smoothing = {"label_smoothing": t.label_smoothing, "neftune_alpha": t.neftune_alpha} if cfg.method == "sequence" else {}
    sft = SupervisedFineTuning(arch, pad, start_id, **smoothing)  # token: refused in validate
    if cfg.method == "token":
        objective = TokenDistillation(teacher, arch, pad, cfg.token.temperature, cfg.token.alpha, start_id,
                                      positions=cfg.token.positions)
    else:
        objective = sft
        del teacher  # the sequence method is done with the teacher: free its memory for training
    batches = (DistillBatches if cfg.method == "token" else SFTBatches)(train_sources, objective, t.batch_size,
                                                                        t.seed, env)
    validation = None
    if cfg.data.validation:
        val_recipe = dataclasses.replace(recipe, response_field=cfg.data.label_field or "summary")
        validation = eval_set(read_pairs(cfg.data.validation, val_recipe, "data.validation"), recipe, tokenizer,
                              cfg.data.max_seq_len, cfg.eval.max_new_tokens)
    torch.manual_seed(t.seed)

    # the teacher's prompt, not its minimum Bayes risk: the student's decoding is measured on its own
    saved_recipe = dataclasses.replace(recipe, prompt_field=cfg.data.field, mbr={})

    def save(directory: Path, metrics: dict | None = None) -> None:
        """A student bundle (LoRA on layers of the teacher), an adapter (LoRA on another model), or the whole
        model (lmlab format); each with the prompt recipe."""
        if bundle is not None:
            write_bundle(directory, student, lora, base_model=base_model_name(cfg.teacher), keep=bundle[0],
                         teacher_adapter=bundle[1], extra=saved_recipe.save, output_ids=bundle[2])
            return
        if lora is not None:
            save_adapter(student, directory, lora, base_model=cfg.student.model)
        else:
            was_training = student.training
            save_model(student, directory, tokenizer)
            student.train(was_training)
        saved_recipe.save(directory)

    n_layers = student.config.n_layers
    trainable = sum(p.numel() for p in {id(p): p for p in student.parameters()}.values() if p.requires_grad)
    return Built(
        name=f"distill {cfg.method} · {n_layers}-layer student", model=student, objective=objective, batches=batches,
        save=save, evaluate=(lambda m: evaluate_sft(m, sft, validation, tokenizer, cfg.eval, env)) if validation else None,
        select=cfg.eval.select, patience=cfg.eval.patience, trainable_only=lora is not None,
        announce=lambda: (f"distill ({cfg.method}) {cfg.teacher}{' + ' + adapter if adapter else ''} -> student with "
                          f"{n_layers} layers, {student.num_parameters():,} parameters ({trainable:,} trainable"
                          f"{', LoRA' if lora else ''}): {n_train} training pairs "
                          f"({n_hard} human labels, {n_train - n_hard} teacher summaries, {n_empty} empty teacher "
                          f"summaries skipped, {n_truncated} prompts cut), {t.steps} steps of {t.batch_size} x "
                          f"{t.grad_accum}"),
        summary={"method": cfg.method, "student_layers": n_layers, "student_parameters": student.num_parameters(),
                 "trainable_parameters": trainable, "train_pairs": n_train, "human_labels": n_hard,
                 "teacher_summaries": n_train - n_hard, "student_bundle": bundle is not None,
                 "hard_label_rows": n_hard_rows if cfg.method == "token" else 0, "empty_teacher_summaries": n_empty,
                 "truncated_prompts": n_truncated, "pseudo_labels": str(out / CACHE_FILE)})
