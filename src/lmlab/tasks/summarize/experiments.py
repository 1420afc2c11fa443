"""Named experiments of the summarization lab: a prompt recipe plus a GenerationConfig.

Each experiment is one row of the lab's report. Two families:

* prompt recipes, all greedy:
    ``zero-shot-bare``         the dialogue alone, no instruction (what the model does unprompted)
    ``zero-shot-instruction``  an instruction, then the dialogue
    ``zero-shot-flan``         FLAN's "dialogue / what was going on?" template
    ``one-shot``               instruction + 1 worked example (dialogue -> summary) from the shot pool
    ``few-shot``               instruction + K examples (``--shots K``, default 2), drawn at random
    ``few-shot-nn``            instruction + the K pool dialogues nearest to the query (all-MiniLM-L6-v2)
    ``finetuned``              no shots, the fine-tuned LoRA adapter switched on, and the prompt recipe
                               it was trained with (``lmlab_recipe.json`` beside the adapter), decoded as the
                               recipe says: the shipped recipe samples 8 summaries at T=0.7 and keeps the
                               consensus (its ``mbr``); a recipe without ``mbr``: one greedy (or beam) summary
    ``finetuned-greedy``       the same adapter and prompt, one summary as the recipe's ``generation`` says
                               (greedy for the shipped adapter), never its ``mbr``
    ``finetuned-best-of-4``    the same, sampling 4 summaries at T=0.7; the reward model given with
                               ``--reward DIR`` keeps the one it scores highest (``lmlab.align.best_of_n``)
    ``finetuned-mbr-8``        the same, sampling 8 (``-16``: 16) summaries at T=0.7; minimum Bayes risk keeps the
                               one with the highest mean ROUGE against the others (``lmlab.align.mbr``)
    ``student``                the distilled student (a bundle from ``lmlab distill`` with ``student.lora``:
                               the shipped one or ``--student DIR``), loaded beside the lab's model, with
                               the prompt recipe it was distilled with, greedy
* decoding variants, all on the ``zero-shot-instruction`` recipe (the cheapest prompt that asks for a
  summary) so they differ from it only in how tokens are chosen; ``greedy`` is that recipe itself,
  named as the baseline of a decoding sweep:
    ``greedy``, ``sample-t0.7``, ``sample-t1.0``, ``top-k-50``, ``top-p-0.9``, ``rep-penalty-1.2``

Shots always come from a separate pool (never the dialogue being summarized); the lab builds the pool.
Everything random is seeded per example from ``--seed`` and the example id (``example_seed``): the random
shots, and the tokens of the sampled experiments, which each example draws from its own generator. A
sampled summary is therefore the same whatever the batch size, the example's place in its batch, or
where a resumed run restarted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

from lmlab.errors import ConfigError, DataError

INSTRUCTION = (
    "Summarize the following dialogue in one or two sentences. "
    "Refer to the speakers as #Person1# and #Person2#."
)
# Without a chat template a plain-text continuation runs on into a new dialogue: stop at a blank line or
# a new turn. With one, the model ends its turn itself; we only stop it reciting the dialogue (a blank
# line there may just follow "Here is a summary:").
STOP_STRINGS = ["\n\n", "#Person1#:", "#Person2#:"]
CHAT_STOP_STRINGS = ["#Person1#:", "#Person2#:"]


@dataclass(frozen=True)
class Experiment:
    name: str
    description: str
    template: str = "instruction"  # lmlab.prompting template: "bare" | "instruction" | "flan"
    shots: int | None = 0  # number of shots; None: the run's --shots K
    shot_method: str = "random"  # lmlab.prompting.select_shots method: "random" | "nearest"
    generation: dict[str, Any] = field(default_factory=dict)  # GenerationConfig overrides
    adapter: bool = False  # run with the LoRA adapter on (its own prompt recipe); every other experiment runs without
    best_of: int = 1  # >1: sample this many summaries and keep the one `select` picks
    select: str = "reward"  # best-of-n's judge: "reward" (the reward model, --reward DIR) | "mbr" (consensus, lmlab.align.mbr)
    student: bool = False  # run on the distilled student bundle (its own model and prompt recipe), not the lab's model
    single: bool = False  # one summary decoded as the recipe's `generation` says, even where its `mbr` samples several

    def n_shots(self, k: int) -> int:
        return k if self.shots is None else self.shots

    def instruction(self) -> str | None:
        return INSTRUCTION if self.template == "instruction" else None

    @property
    def samples(self) -> bool:
        """Whether this experiment draws its tokens at random (and so needs per-example seeds)."""
        return bool(self.generation.get("do_sample"))


_SAMPLE = dict(do_sample=True)
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in [
    Experiment("zero-shot-bare", "the dialogue alone, no instruction", template="bare"),
    Experiment("zero-shot-instruction", "instruction + dialogue"),
    Experiment("zero-shot-flan", "FLAN dialogue-summary template", template="flan"),
    Experiment("one-shot", "instruction + 1 random example from the pool", shots=1),
    Experiment("few-shot", "instruction + K random examples from the pool", shots=None),
    Experiment("few-shot-nn", "instruction + K nearest pool examples (MiniLM embeddings)", shots=None,
               shot_method="nearest"),
    Experiment("finetuned", "the fine-tuned summarizer: LoRA adapter (the shipped one or --adapter), its own "
               "prompt recipe and decoding (the shipped one: minimum Bayes risk over 8 samples at T=0.7)", adapter=True),
    Experiment("finetuned-greedy", "the fine-tuned summarizer, one summary decoded as its recipe's `generation` says "
               "(greedy for the shipped adapter), without the recipe's MBR", adapter=True, single=True),
    Experiment("finetuned-best-of-4", "the fine-tuned summarizer sampling 4 summaries at T=0.7; the reward model "
               "(--reward DIR) keeps the best", adapter=True, generation=dict(_SAMPLE, temperature=0.7), best_of=4),
    Experiment("finetuned-mbr-8", "the fine-tuned summarizer sampling 8 summaries at T=0.7; minimum Bayes risk keeps "
               "the one closest (mean ROUGE) to the other 7", adapter=True, generation=dict(_SAMPLE, temperature=0.7),
               best_of=8, select="mbr"),
    Experiment("finetuned-mbr-16", "the same with 16 samples", adapter=True, generation=dict(_SAMPLE, temperature=0.7),
               best_of=16, select="mbr"),
    Experiment("student", "the distilled student (the shipped bundle or --student DIR), its own prompt recipe, greedy",
               student=True),
    Experiment("greedy", "zero-shot-instruction recipe, greedy (decoding baseline)"),
    Experiment("sample-t0.7", "zero-shot-instruction recipe, sampling at temperature 0.7",
               generation=dict(_SAMPLE, temperature=0.7)),
    Experiment("sample-t1.0", "zero-shot-instruction recipe, sampling at temperature 1.0",
               generation=dict(_SAMPLE, temperature=1.0)),
    Experiment("top-k-50", "zero-shot-instruction recipe, top-k 50 sampling (T=1)", generation=dict(_SAMPLE, top_k=50)),
    Experiment("top-p-0.9", "zero-shot-instruction recipe, nucleus p=0.9 sampling (T=1)",
               generation=dict(_SAMPLE, top_p=0.9)),
    Experiment("rep-penalty-1.2", "zero-shot-instruction recipe, greedy with repetition penalty 1.2",
               generation=dict(repetition_penalty=1.2)),
]}

# Fits the 10-minute budget of `lmlab lab` on the bundled set with the default model on 2 CPU cores.
DEFAULT_EXPERIMENTS = ("zero-shot-bare", "zero-shot-instruction", "one-shot", "few-shot", "sample-t0.7", "finetuned")


def spec_hash(experiment: Experiment, adapter: str | None = None, reward: str | None = None,
              student: str | None = None, decoding: dict | None = None) -> str:
    """A short hash of everything an experiment's rows depend on (recipe, instruction text, stop strings,
    for adapter experiments the adapter's identity, `adapter`, and for student experiments the hash of the
    student bundle's files, `student`).

    Stored in every results row, so rows generated before an experiment's definition changed are
    detected on resume instead of being mixed with new ones.
    """
    spec = dict(dataclasses.asdict(experiment), instruction_text=experiment.instruction(),
                stop_strings=STOP_STRINGS, chat_stop_strings=CHAT_STOP_STRINGS)
    if experiment.best_of == 1:  # the field came later: rows of experiments without it keep their hash
        del spec["best_of"]
    elif experiment.select == "reward":  # which summary is kept depends on the reward model (`reward`: its identity)
        spec["reward"] = reward
    if experiment.select == "reward":  # the field came later: rows of reward experiments keep their hash
        del spec["select"]
    if experiment.adapter:
        spec["adapter"] = adapter
    if not experiment.single:  # the field came later: rows of the other experiments keep their hash
        del spec["single"]
    if experiment.student:  # the student's weights (both adapters, the kept layers, the base) and recipe
        spec["student_weights"] = student
    else:  # the field came later: rows of the other experiments keep their hash
        del spec["student"]
    if decoding:  # beams, length penalty, ... (the adapter recipe's or --num-beams): other rows
        spec["decoding"] = decoding
    if experiment.samples:  # rows sampled before per-example seeding (one seed per batch) are not reused
        spec["sampling_seed"] = "per example: example_seed(seed, id)"
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]


def parse_experiments(spec: str | list[str] | tuple[str, ...] | None) -> list[Experiment]:
    """``"a,b,c"`` (or a list of names) -> experiments, in order; unknown names raise ConfigError."""
    if spec is None:
        names = list(DEFAULT_EXPERIMENTS)
    elif isinstance(spec, str):
        names = [n.strip() for n in spec.split(",") if n.strip()]
    else:
        names = list(spec)
    if not names:
        raise ConfigError(f"--experiments {spec!r} names no experiment; choose from: {', '.join(EXPERIMENTS)}")
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ConfigError(f"unknown experiment(s) {', '.join(map(repr, unknown))}; "
                          f"valid experiments: {', '.join(EXPERIMENTS)}")
    seen: list[str] = []
    for n in names:  # drop repeats, keep order
        if n not in seen:
            seen.append(n)
    return [EXPERIMENTS[n] for n in seen]


def check_shots(experiments: list[Experiment], k: int, pool_size: int, pool_source: str) -> None:
    """Every experiment's shot count must fit the pool (checked before any generation starts)."""
    if k < 0:
        raise ConfigError(f"--shots {k} must be >= 0")
    for e in experiments:
        need = e.n_shots(k)
        if need > pool_size:
            raise DataError(f"experiment {e.name!r} needs {need} shots but the shot pool ({pool_source}) "
                            f"holds only {pool_size} dialogues; lower --shots or grow --pool-size/--shots-from")


def generation_config(experiment: Experiment, max_new_tokens: int, seed: int, chat: bool,
                      example_ids: list[str] | None = None):
    """The GenerationConfig of an experiment: greedy unless it samples; seeded; with dialogue stop strings.

    Given the ``example_ids`` of a batch, a sampled experiment gets one seed per row,
    ``example_seed(seed, id)``, so each example samples from its own stream: the same tokens whatever
    else is in its batch. (One seed for the whole batch would make row j of every batch share a stream
    and tie each summary to the batch size.)
    """
    # imported here: lmlab.generation imports torch, and `lmlab lab --help` reads EXPERIMENTS from this module
    # (building a command's parser imports no torch: tests/test_cli.py)
    from lmlab.generation import GenerationConfig

    stop = list(CHAT_STOP_STRINGS if chat else STOP_STRINGS)
    if experiment.samples and example_ids is not None:
        seed = [example_seed(seed, example_id) for example_id in example_ids]
    return GenerationConfig(max_new_tokens=max_new_tokens, seed=seed, stop_strings=stop, **experiment.generation)


def example_seed(seed: int, example_id: str) -> int:
    """Per-example seed from the run's ``--seed`` and the example id: stable across runs, batch sizes and resumes.

    Seeds the example's random shots and, in sampled experiments, its tokens.
    """
    return (seed * 1_000_003 + zlib.crc32(example_id.encode("utf-8"))) % (2**31)


def clean_summary(text: str) -> str:
    """The summary we score: the generated text, stripped, without a leading "Summary:" label."""
    text = text.strip()
    for label in ("Summary:", "summary:", "SUMMARY:"):
        if text.startswith(label):
            text = text[len(label):].strip()
    return text
