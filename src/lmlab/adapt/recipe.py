"""The prompt recipe a fine-tuned model was trained with, and the adapters that ship inside lmlab.

A fine-tune writes ``lmlab_recipe.json`` beside its weights (PEFT ignores the extra file): the prompt
template, instruction and chat setting it trained on. The lab's ``finetuned`` experiment and
``lmlab summarize`` read it back, so inference builds exactly the prompt the model learned from.

``shipped_adapter(model)`` finds the adapter packaged with lmlab for a registry model: today the
DialogSum summarizer for SmolLM2-135M-Instruct (``lmlab/adapters/``, CC BY-NC-SA 4.0 like its data).
``shipped_student(model)`` finds the distilled student bundle (``lmlab.adapt.student``) packaged for a
registry model in ``lmlab/students/``; ``resolve_student`` turns ``--student``'s value (a directory, or
"shipped") into a bundle directory.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from lmlab.errors import ConfigError
from lmlab.prompting import build_prompt

RECIPE_FILE = "lmlab_recipe.json"
MBR_SAMPLING = ("temperature", "top_k", "top_p", "min_p")  # the settings a recipe's `mbr` may give its samples
ADAPTERS_DIR = Path(__file__).resolve().parents[1] / "adapters"
# registry model name -> the adapter directory shipped for it
SHIPPED_ADAPTERS = {"smollm2-135m-instruct": "smollm2-135m-instruct-dialogsum-lora"}
STUDENTS_DIR = Path(__file__).resolve().parents[1] / "students"
# registry model name -> the distilled student bundle shipped for it (its base model is that model)
SHIPPED_STUDENTS = {"smollm2-135m-instruct": "smollm2-135m-instruct-dialogsum-student"}
SHIPPED = "shipped"  # the value of --student / student= that names the shipped bundle


@dataclass
class Recipe:
    """How a prompt is written for this fine-tune: stored beside the weights so inference repeats it."""

    template: str
    instruction: str | None
    chat: bool
    prompt_field: str
    response_field: str
    max_new_tokens: int = 64
    # how to decode with this fine-tune: GenerationConfig fields (num_beams, length_penalty, no_repeat_ngram_size,
    # min_new_tokens, ...) that the lab's adapter experiments, `lmlab summarize` and `lmlab serve` apply by default;
    # empty: greedy. A decoding sweep (`lmlab sweep`) picks them on validation data.
    generation: dict = dataclasses.field(default_factory=dict)
    # minimum Bayes risk decoding (lmlab.align.mbr), which replaces `generation` where set: {"n": 8, "temperature": 0.7}
    # samples n summaries (with these sampling settings: temperature, top_k, top_p, min_p) and keeps the one the
    # others agree with most. Empty: one summary. `--best-of 1` (summarize), `"best_of": 1` (serve) and the lab's
    # `finetuned-greedy` experiment decode one summary as `generation` says instead.
    mbr: dict = dataclasses.field(default_factory=dict)

    def prompt(self, text: str, tokenizer, max_prompt_tokens: int | None = None):
        """The lmlab.prompting Prompt for one input (cut in the middle to fit `max_prompt_tokens`)."""
        return build_prompt(text, [], template=self.template, tokenizer=tokenizer, chat=self.chat,
                            instruction=self.instruction, max_prompt_tokens=max_prompt_tokens)

    def save(self, directory: Path) -> None:
        (directory / RECIPE_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "Recipe | None":
        path = Path(directory) / RECIPE_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{str(path)!r}: unknown recipe field(s) {', '.join(unknown)}; valid: "
                              f"{', '.join(sorted(known))}")
        recipe = cls(**data)
        recipe.check_generation(str(path))
        return recipe

    def check_generation(self, where: str = "recipe") -> None:
        """Refuse decoding settings that are not GenerationConfig fields (or are invalid), in one line."""
        from lmlab.generation.config import GenerationConfig  # lazy: reading a recipe does not import torch

        GenerationConfig.check_settings(self.generation, f"{where}: generation")
        if not isinstance(self.mbr, dict):
            raise ConfigError(f"{where}: mbr={self.mbr!r} must be a mapping like {{\"n\": 8, \"temperature\": 0.7}}")
        if self.mbr:
            n = self.mbr.get("n")
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise ConfigError(f"{where}: mbr.n={n!r} must be an integer >= 2 (the number of sampled summaries)")
            bad = sorted(set(self.mbr) - {"n"} - set(MBR_SAMPLING))
            if bad:
                raise ConfigError(f"{where}: mbr: {', '.join(bad)} are not MBR settings; valid: n, "
                                  f"{', '.join(MBR_SAMPLING)}")
            GenerationConfig.check_settings(self.mbr_sampling, f"{where}: mbr")

    @property
    def mbr_samples(self) -> int:
        """How many summaries the recipe samples per input: 1 unless it decodes by minimum Bayes risk."""
        return int(self.mbr.get("n", 1))

    @property
    def mbr_sampling(self) -> dict:
        """The GenerationConfig settings of the recipe's MBR samples (sampling on, then its settings)."""
        return {"do_sample": True, **{k: v for k, v in self.mbr.items() if k != "n"}}

    def generation_config(self, base, **overrides):
        """`base` (a GenerationConfig) with this recipe's decoding settings, then `overrides` (not None) on top."""
        settings = {**self.generation, **{k: v for k, v in overrides.items() if v is not None}}
        return base.replace(**settings) if settings else base



def shipped_adapter(model: str) -> Path | None:
    """The adapter lmlab ships for registry model `model`, or None when there is none (or it is not installed)."""
    name = SHIPPED_ADAPTERS.get(str(model))
    path = ADAPTERS_DIR / name if name else None
    return path if path is not None and (path / "adapter_model.safetensors").exists() else None


def shipped_student(model: str) -> Path | None:
    """The student bundle lmlab ships for registry model `model`, or None when there is none (or not installed)."""
    name = SHIPPED_STUDENTS.get(str(model))
    path = STUDENTS_DIR / name if name else None
    return path if path is not None and (path / "lmlab_student.json").exists() else None


def resolve_student(student: str | Path, model: str | Path | None) -> Path:
    """``--student`` / ``student=``: "shipped" -> the bundle shipped for `model`; anything else: that directory.

    One-line ConfigError when nothing is shipped for `model`.
    """
    from lmlab.errors import ConfigError  # lazy, like the rest of this module's light imports

    if str(student) != SHIPPED:
        return Path(student)
    path = shipped_student(str(model)) if model is not None else None
    if path is None:
        raise ConfigError(f"lmlab ships no student for {str(model)!r}; pass --student DIR (a bundle from lmlab "
                          f"distill with student.lora)")
    return path
