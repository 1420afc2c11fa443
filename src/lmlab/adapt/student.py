"""Distilled students as small self-contained bundles: a layer subset of a base model plus two LoRA adapters.

A student cut from its teacher (``lmlab distill`` with ``student.lora`` and no ``student.model``) is the
base model with only some decoder layers (``keep_layers``), the teacher's own adapter on those layers
(merged into the student's starting weights), and the student's adapter trained on top. Shipping the
81M-parameter student itself would take 300+ MB; the bundle stores only what is not in the base::

    DIR/lmlab_student.json        {"format": 1, "base_model": "smollm2-135m-instruct", "keep_layers": [0, 2, ...],
                                   "teacher_adapter": "teacher_adapter" | null, "student_adapter": "."}
    DIR/teacher_adapter/          the teacher's PEFT adapter restricted to the kept layers, renumbered
                                  (teacher layer keep_layers[j] -> student layer j), its tensors' dtype kept
    DIR/adapter_config.json, DIR/adapter_model.safetensors   the student's adapter (PEFT format)
    DIR/lmlab_recipe.json         the prompt recipe (lmlab lab/summarize/serve build the teacher's prompt)
    DIR/output_ids.json           (optional, "output_ids" in lmlab_student.json) the token ids the student's output
                                  head keeps (lmlab.nn.subset_head): the head reads only those rows when it decodes

``load_student(DIR)`` (``lmlab.load_model(base, student=DIR)`` or ``lmlab.load_model(DIR)``) rebuilds
the student: load the base, keep the layers, load and merge the teacher's adapter, load and merge the
student's: a plain Transformer whose weights are the trained student's (merged), in eval mode; with
``output_ids``, its head trimmed to those tokens (``trim=False`` keeps the whole vocabulary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from lmlab.adapt.lora import LoraConfig, merge_lora
from lmlab.adapt.peft import CONFIG_FILE, PREFIX, WEIGHTS_FILE, hf_module_names, load_adapter, read_adapter_config
from lmlab.adapt.peft import save_adapter
from lmlab.errors import CheckpointError, ConfigError
from lmlab.model import Transformer
from lmlab.nn.subset_head import trim_output

STUDENT_FILE = "lmlab_student.json"
OUTPUT_IDS_FILE = "output_ids.json"
TEACHER_ADAPTER_DIR = "teacher_adapter"
FORMAT = 1
_LAYERS = "decoder.layers."


def keep_layers(model, indices: list[int]):
    """A new decoder-only Transformer holding only ``indices`` of `model`'s layers, their weights copied.

    Everything outside the stack (embeddings, final norm, head) is copied as is; layer ``indices[j]``
    becomes layer ``j``. RoPE positions and the KV cache are per layer, so nothing else changes.
    """
    if model.config.arch != "decoder":
        raise ConfigError(f"keep_layers builds students of decoder-only models; the teacher has "
                          f"arch={model.config.arch!r}")
    student = Transformer(model.config.replace(n_layers=len(indices)))
    source = model.state_dict()
    state = {}
    for key in student.state_dict():
        if key.startswith(_LAYERS):
            j, rest = key[len(_LAYERS):].split(".", 1)
            key_in_teacher = f"{_LAYERS}{indices[int(j)]}.{rest}"
        else:
            key_in_teacher = key
        state[key] = source[key_in_teacher].detach().clone()
    student.load_state_dict(state, strict=True)
    return student.to(model.dtype)


# --- the bundle's description ----------------------------------------------------------------------
@dataclass
class StudentBundle:
    """What ``lmlab_student.json`` says: the base model, its kept layers, where the two adapters are."""

    base_model: str
    keep_layers: list[int]
    teacher_adapter: str | None = TEACHER_ADAPTER_DIR  # a subdirectory, or None: the teacher had no adapter
    student_adapter: str = "."
    format: int = FORMAT
    output_ids: str | None = None  # a JSON list of the token ids the output head keeps (None: all of them)

    def to_dict(self) -> dict:
        data = {"format": self.format, "base_model": self.base_model, "keep_layers": list(self.keep_layers),
                "teacher_adapter": self.teacher_adapter, "student_adapter": self.student_adapter}
        if self.output_ids is not None:
            data["output_ids"] = self.output_ids
        return data


def is_student_dir(path: str | Path) -> bool:
    """Whether `path` is a directory holding ``lmlab_student.json``."""
    try:
        return (Path(path).expanduser() / STUDENT_FILE).is_file()
    except (OSError, ValueError):
        return False


def read_bundle(directory: str | Path) -> StudentBundle:
    """``DIR/lmlab_student.json`` read and checked (one-line CheckpointError naming the bad value)."""
    directory = Path(directory).expanduser()
    path = directory / STUDENT_FILE
    if not directory.is_dir():
        raise CheckpointError(f"student {str(directory)!r} is not a directory (a student bundle from lmlab distill "
                              f"with student.lora)")
    if not path.is_file():
        raise CheckpointError(f"student {str(directory)!r} has no {STUDENT_FILE} (not a student bundle: lmlab distill "
                              f"writes one with student.lora and a student cut from the teacher)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r}: format={data.get('format') if isinstance(data, dict) else data!r} "
                              f"is not a student bundle format this lmlab reads ({FORMAT})")
    base, layers = data.get("base_model"), data.get("keep_layers")
    if not isinstance(base, str) or not base:
        raise CheckpointError(f"{str(path)!r}: base_model={base!r} must name the base model")
    if (not isinstance(layers, list) or not layers or len(set(map(str, layers))) != len(layers)
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
        raise CheckpointError(f"{str(path)!r}: keep_layers={layers!r} must be distinct layer indices >= 0")
    for key in ("teacher_adapter", "student_adapter"):
        value = data.get(key)
        if value is None and key == "teacher_adapter":
            continue
        if not isinstance(value, str) or not (directory / value).is_dir():
            raise CheckpointError(f"{str(path)!r}: {key}={value!r} is not a directory inside {str(directory)!r}")
    output_ids = data.get("output_ids")
    if output_ids is not None and (not isinstance(output_ids, str) or not (directory / output_ids).is_file()):
        raise CheckpointError(f"{str(path)!r}: output_ids={output_ids!r} is not a file inside {str(directory)!r}")
    return StudentBundle(base, layers, data.get("teacher_adapter"), data.get("student_adapter", "."),
                         output_ids=output_ids)


def read_output_ids(directory: str | Path, bundle: StudentBundle) -> list[int] | None:
    """The bundle's kept output token ids (None: it keeps the whole vocabulary); one-line error if malformed."""
    if bundle.output_ids is None:
        return None
    path = Path(directory) / bundle.output_ids
    try:
        ids = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if (not isinstance(ids, list) or not ids
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
        raise CheckpointError(f"{str(path)!r} must hold a non-empty list of token ids >= 0")
    return ids


def output_vocabulary(texts, tokenizer, first: int) -> list[int]:
    """The token ids a task model's trimmed head keeps: the tokenizer's first `first` ids (byte-level BPE gives
    its bytes and most frequent merges the lowest ids, so any text can still be spelled), every special token,
    and every token of `texts` (its training prompts and responses: the words it copies and writes)."""
    vocab = tokenizer.vocab_size
    if not isinstance(first, int) or isinstance(first, bool) or not 0 <= first <= vocab:
        raise ConfigError(f"output vocabulary first={first!r} must be an integer in [0, {vocab}]")
    kept = set(range(first))
    kept.update(i for i in (tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id) if i is not None)
    kept.update(getattr(tokenizer, "special_ids", None) or ())
    for text in texts:
        kept.update(tokenizer.encode(text))
        kept.update(tokenizer.encode(" " + text))  # a word's other spelling: with its leading space
    return sorted(i for i in kept if 0 <= i < vocab)


def bundle_id(directory: str | Path) -> str:
    """A short hash of every file of the bundle (its weights, both adapters' configs, the kept layers, the recipe;
    not lmlab's output marker, which records when it was written): rows made with it are tied to it."""
    import hashlib

    from lmlab.checkpoints.save import MARKER_FILE

    directory = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER_FILE):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


# --- writing --------------------------------------------------------------------------------------
def restrict_adapter(adapter: str | Path, indices: list[int], teacher) -> tuple[dict, dict[str, torch.Tensor]]:
    """The teacher's PEFT adapter on the kept layers only, renumbered -> (adapter_config, tensors).

    `teacher` is any model with the teacher's structure (its linears name the HF module paths, so the
    key map is the checkpoint family's own). Layer ``indices[j]``'s tensors become layer ``j``'s;
    modules outside the layer stack keep their name; tensors are copied with their dtype unchanged.
    """
    adapter = Path(adapter)
    config = read_adapter_config(adapter)
    tensors = load_file(str(adapter / WEIGHTS_FILE))
    names = hf_module_names(teacher)  # lmlab module name -> HF module path
    to_lmlab = {hf: ours for ours, hf in names.items()}
    position = {i: j for j, i in enumerate(indices)}
    out = {}
    for key, tensor in tensors.items():
        body = key.removeprefix(PREFIX)
        module, sep, kind = body.rpartition(".lora_")
        clean = module.removesuffix(".default")
        ours = to_lmlab.get(clean)
        if not sep or ours is None:
            raise CheckpointError(f"adapter {str(adapter)!r}: tensor {key!r} names no linear of the teacher")
        if ours.startswith(_LAYERS):
            i, rest = ours[len(_LAYERS):].split(".", 1)
            if int(i) not in position:
                continue  # a dropped layer
            ours = f"{_LAYERS}{position[int(i)]}.{rest}"
        out[f"{PREFIX}{names[ours]}{module[len(clean):]}.lora_{kind}"] = tensor.clone().contiguous()
    return config, out


def write_bundle(directory: str | Path, student, lora: LoraConfig, *, base_model: str, keep: list[int],
                 teacher_adapter: tuple[dict, dict[str, torch.Tensor]] | None,
                 extra: Callable[[Path], None] | None = None, output_ids: list[int] | None = None) -> Path:
    """Write the student bundle (see the module docstring) atomically, replacing an earlier lmlab output.

    `student` holds its LoRA layers (unmerged); `teacher_adapter` is ``restrict_adapter``'s result (None:
    the teacher had none); ``extra(tmp)`` adds files (the prompt recipe); `output_ids`: the tokens its
    head keeps when it is loaded (``output_vocabulary``; None: every token).
    """
    from lmlab.checkpoints.save import atomic_dir  # lazy: lmlab.checkpoints.load imports this module lazily too

    bundle = StudentBundle(base_model, list(keep), TEACHER_ADAPTER_DIR if teacher_adapter is not None else None,
                           output_ids=OUTPUT_IDS_FILE if output_ids is not None else None)

    def write(tmp: Path) -> None:
        save_adapter(student, tmp, lora, base_model=base_model)
        if teacher_adapter is not None:
            config, tensors = teacher_adapter
            sub = tmp / TEACHER_ADAPTER_DIR
            sub.mkdir()
            save_file(tensors, str(sub / WEIGHTS_FILE), metadata={"format": "pt"})
            (sub / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if output_ids is not None:
            (tmp / OUTPUT_IDS_FILE).write_text(json.dumps(sorted(int(i) for i in output_ids)) + "\n")
        (tmp / STUDENT_FILE).write_text(json.dumps(bundle.to_dict(), indent=2) + "\n")
        if extra is not None:
            extra(tmp)

    return atomic_dir(directory, write, what="distill student", force=True)


def base_model_name(source: str) -> str:
    """How the bundle names its base: a registry name as is, a local path made absolute."""
    from lmlab.checkpoints import registry

    if registry.lookup(str(source)) is None and Path(source).expanduser().exists():
        return str(Path(source).expanduser().resolve())
    return str(source)


# --- reading --------------------------------------------------------------------------------------
def _same_source(a: str, b: str) -> bool:
    if str(a) == str(b):
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def load_student(directory: str | Path, base: str | Path | None = None, dtype: torch.dtype = torch.float32,
                 trim: bool = True):
    """The student of bundle `directory` with every adapter merged (a plain Transformer, eval mode).

    `base`: the base model source the caller expects (None: the bundle's ``base_model``); another base
    than the bundle's is refused. The merging happens in fp32; the result is then cast to `dtype`. A
    bundle with ``output_ids`` gets a trimmed output head (``trim=False``: the whole vocabulary's).
    """
    from lmlab.checkpoints.load import load_model  # lazy: load.py imports this module

    directory = Path(directory).expanduser()
    bundle = read_bundle(directory)
    if base is not None and not _same_source(str(base), bundle.base_model):
        raise CheckpointError(f"student {str(directory)!r} was distilled from base_model={bundle.base_model!r}, not "
                              f"{str(base)!r}; load it with that base (or without one)")
    model = load_model(bundle.base_model)
    n = model.config.n_layers
    bad = [i for i in bundle.keep_layers if i >= n]
    if bad:
        raise CheckpointError(f"student {str(directory)!r}: keep_layers={bundle.keep_layers} names layer {bad[0]}, "
                              f"but {bundle.base_model!r} has layers 0..{n - 1}")
    model = keep_layers(model, bundle.keep_layers)
    if bundle.teacher_adapter is not None:
        load_adapter(model, directory / bundle.teacher_adapter)
        merge_lora(model)  # the teacher's update first: the student's adapter was trained on the merged weights
    load_adapter(model, directory / bundle.student_adapter)
    merge_lora(model)
    ids = read_output_ids(directory, bundle) if trim else None
    if ids is not None:
        try:
            trim_output(model, ids)
        except ConfigError as exc:
            raise CheckpointError(f"student {str(directory)!r}: {exc}") from None
    return model.to(dtype).eval()
