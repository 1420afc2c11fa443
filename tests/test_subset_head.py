"""A trimmed output head (``lmlab.nn.subset_head``): the kept tokens' logits are the full head's, every other
token is -inf, and every decode path (eager, native, the serving step, sampling, beams) keeps to the kept
tokens; a student bundle carries its kept ids and loads trimmed; bad ids and bad configs are one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import lmlab
from lmlab.adapt.student import STUDENT_FILE, output_vocabulary
from lmlab.engine import build
from lmlab.errors import CheckpointError, ConfigError
from lmlab.generation import GenerationConfig, generate_tokens
from lmlab.nn.subset_head import SubsetHead, trim_output
from serving import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(400, max_seq_len=256)


def kept_ids(vocab: int = 400) -> torch.Tensor:
    return torch.cat([torch.arange(0, 4), torch.arange(7, vocab, 3)])  # specials + every third token


def prompts() -> torch.Tensor:
    return torch.randint(4, 400, (3, 11), generator=torch.Generator().manual_seed(0))


def test_kept_logits_are_the_full_heads_and_the_rest_is_minus_inf(model):
    trimmed = copy.deepcopy(model)
    ids = kept_ids()
    head = trim_output(trimmed, ids)
    assert isinstance(trimmed.lm_head, SubsetHead) and head.proj.out_features == len(ids)
    with torch.no_grad():
        full, sub = model(prompts()), trimmed(prompts())
    assert sub.shape == full.shape
    assert torch.equal(sub[..., ids], full[..., ids])
    outside = torch.ones(400, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(sub[..., outside]).all() and torch.isfinite(sub[..., ids]).all()
    # the tied embedding is untouched: the input side still reads every token
    assert torch.equal(trimmed.tok_embed.weight, model.tok_embed.weight)
    assert trimmed.lm_head.proj.weight.data_ptr() != trimmed.tok_embed.weight.data_ptr()


def _engines():
    engines = ["eager"]
    if build.compiler() is not None and build.cpu_isa() not in ("none", "unknown"):
        engines.append("native")
    return engines


@pytest.mark.parametrize("engine", _engines())
def test_every_decoding_keeps_to_the_kept_tokens(model, engine, monkeypatch):
    monkeypatch.setenv("LMLAB_ENGINE", engine)
    trimmed = copy.deepcopy(model)
    ids = kept_ids()
    trim_output(trimmed, ids)
    allowed = set(ids.tolist())
    configs = [GenerationConfig(max_new_tokens=12),
               GenerationConfig(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, seed=3),
               GenerationConfig(max_new_tokens=12, do_sample=True, top_k=50, repetition_penalty=1.3, seed=4),
               GenerationConfig(max_new_tokens=8, num_beams=3, length_penalty=0.8)]
    for config in configs:
        out = generate_tokens(trimmed, prompts(), None, config)
        assert out and all(t in allowed for row in out for t in row), config
    # greedy: the trimmed model's tokens are the full model's argmax over the kept tokens, step by step
    greedy = generate_tokens(trimmed, prompts(), None, GenerationConfig(max_new_tokens=10))
    for row, prompt in zip(greedy, prompts()):
        seq = prompt.tolist()
        for token in row:
            with torch.no_grad():
                logits = model(torch.tensor([seq]))[0, -1]
            assert token == int(ids[logits[ids].argmax()])
            seq.append(token)


def test_native_and_eager_agree_on_a_trimmed_model(model):
    if "native" not in _engines():
        pytest.skip("no C++ compiler or no AVX2 here: the native engine cannot build")
    trimmed = copy.deepcopy(model)
    trim_output(trimmed, kept_ids())
    runs = {}
    for engine in ("eager", "native"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LMLAB_ENGINE", engine)
            runs[engine] = generate_tokens(trimmed, prompts(), None, GenerationConfig(max_new_tokens=16))
    assert runs["eager"] == runs["native"]


def test_the_serving_step_returns_full_width_logits(model):
    if "native" not in _engines():
        pytest.skip("no C++ compiler or no AVX2 here: the native engine cannot build")
    from test_engine_serve import lockstep

    trimmed = copy.deepcopy(model)
    ids = kept_ids()
    trim_output(trimmed, ids)
    steps = lockstep(trimmed)
    assert steps
    for mine, eager, _, _ in steps:
        assert mine.shape[-1] == 400 and torch.equal(torch.isneginf(mine), torch.isneginf(eager))
        assert torch.isneginf(mine[:, 4:7]).all()  # 4, 5, 6 are not kept
        assert (mine[:, ids] - eager[:, ids]).abs().max() < 1e-4 * eager[:, ids].abs().max()
        assert torch.equal(mine.argmax(-1), eager.argmax(-1))


def test_quantizing_a_trimmed_model_quantizes_its_projection(model):
    """int8 has one scale per output row: the trimmed head's quantized rows are exactly the full head's
    quantized rows at the kept ids, and the logits outside them stay -inf."""
    from lmlab.quant.linear import Int8Linear, QuantizedLinear, float_linear
    from lmlab.quant.model import quantize_model

    trimmed = copy.deepcopy(model)
    ids = kept_ids()
    trim_output(trimmed, ids)
    quantize_model(trimmed, bits=8)
    assert isinstance(trimmed.lm_head, SubsetHead) and isinstance(trimmed.lm_head.proj, QuantizedLinear)
    want = float_linear(Int8Linear.from_float(model.lm_head)).weight[ids]
    assert torch.equal(float_linear(trimmed.lm_head.proj).weight, want)
    with torch.no_grad():
        got = trimmed(prompts())
    assert torch.isneginf(got).sum() == got[..., 0].numel() * (400 - len(ids))
    assert torch.isfinite(got[..., ids]).all()


def test_bad_ids_and_bad_heads_are_one_line(model):
    trimmed = copy.deepcopy(model)
    with pytest.raises(ConfigError, match="output id 400 is outside the vocabulary"):
        trim_output(trimmed, [0, 5, 400])
    with pytest.raises(ConfigError, match="output id -1 is outside"):
        trim_output(trimmed, [-1, 5])
    with pytest.raises(ConfigError, match="repeat a token"):
        trim_output(trimmed, [3, 5, 5])
    with pytest.raises(ConfigError, match="non-empty list"):
        trim_output(trimmed, [])
    with pytest.raises(ConfigError, match="non-empty list"):
        trim_output(trimmed, [0.5, 2.0])
    assert type(trimmed.lm_head) is nn.Linear  # nothing changed by a refused call
    trim_output(trimmed, [1, 2, 3])
    with pytest.raises(ConfigError, match="already trimmed"):
        trim_output(trimmed, [1, 2])


def test_output_vocabulary_keeps_the_first_ids_the_specials_and_every_training_token(tiny_model_dir):
    tokenizer = lmlab.load_tokenizer(tiny_model_dir)
    texts = ["#Person1#: Where is the zoo?", "They talk about a zoo."]
    ids = output_vocabulary(texts, tokenizer, first=40)
    assert ids == sorted(set(ids))
    assert set(range(40)) <= set(ids) and tokenizer.eos_token_id in ids
    for text in texts:
        assert set(tokenizer.encode(text)) <= set(ids) and set(tokenizer.encode(" " + text)) <= set(ids)
    assert len(ids) < tokenizer.vocab_size
    with pytest.raises(ConfigError, match=r"first=-3 must be an integer in \[0, "):
        output_vocabulary(texts, tokenizer, first=-3)


def test_a_student_bundle_with_output_vocab_loads_trimmed(tiny_model_dir, tmp_path):
    from test_distill_student import _config, _ids

    from lmlab.tasks.summarize.data import load_dialogues
    from lmlab.training.distill import distill

    data = tmp_path / "dialogues.jsonl"
    data.write_text("".join(json.dumps({"fname": d.id, "dialogue": d.dialogue, "summary": d.references[0]}) + "\n"
                            for d in load_dialogues().records[:4]))
    cfg = _config(tiny_model_dir, None, [{"path": str(data)}], tmp_path / "run", train__steps=2,
                  data__label_field="summary", student__output_vocab={"first": 30})
    distill(cfg, show_progress=False)
    final = tmp_path / "run" / "final"
    meta = json.loads((final / STUDENT_FILE).read_text())
    assert meta["output_ids"] == "output_ids.json"
    ids = json.loads((final / "output_ids.json").read_text())
    tokenizer = lmlab.load_tokenizer(tiny_model_dir)
    assert ids == output_vocabulary([t for d in load_dialogues().records[:4] for t in (d.dialogue, d.references[0])]
                                    + _teacher_summaries(tmp_path / "run"), tokenizer, 30)

    student = lmlab.load_model(final)
    assert isinstance(student.lm_head, SubsetHead) and student.lm_head.ids.tolist() == ids
    full = lmlab.adapt.student.load_student(final, trim=False)
    assert type(full.lm_head) is nn.Linear
    x = _ids(tokenizer.vocab_size)
    with torch.no_grad():
        assert torch.equal(student(x)[..., ids], full(x)[..., ids])
        q = lmlab.load_model(final, quantize="int8")
    assert isinstance(q.lm_head, SubsetHead)

    # a trimmed model is not a checkpoint: saving it is refused in one line, the whole student saves
    with pytest.raises(CheckpointError, match="output head is trimmed to"):
        lmlab.save_model(student, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    lmlab.save_model(full, tmp_path / "saved")

    # a damaged id list is one line naming the file
    (final / "output_ids.json").write_text(json.dumps([0, 1, 10 ** 6]))
    with pytest.raises(CheckpointError, match="output id 1000000 is outside the vocabulary"):
        lmlab.load_model(final)
    (final / "output_ids.json").write_text("[1, 2,")
    with pytest.raises(CheckpointError, match="output_ids.json' is not valid JSON"):
        lmlab.load_model(final)
    (final / "output_ids.json").unlink()
    with pytest.raises(CheckpointError, match="output_ids='output_ids.json' is not a file"):
        lmlab.load_model(final)


def _teacher_summaries(run) -> list[str]:
    from lmlab.training.distill import CACHE_FILE

    rows = [json.loads(line) for line in (run / CACHE_FILE).read_text().splitlines() if line.strip()]
    return [row["summary"] for row in rows if row.get("summary", "").strip()]  # an empty one trains nothing


def test_output_vocab_needs_a_bundle_and_a_first(tiny_model_dir, tmp_path):
    from test_distill_student import _config

    from lmlab.training.distill import validate

    (tmp_path / "x.jsonl").write_text(json.dumps({"dialogue": "#Person1#: Hi.", "summary": "A greeting."}) + "\n")
    data = [{"path": str(tmp_path / "x.jsonl")}]
    with pytest.raises(ConfigError, match="must be a mapping like {first: 16384}"):
        validate(_config(tiny_model_dir, None, data, tmp_path, student__output_vocab=16384))
    with pytest.raises(ConfigError, match="first=-1 must be an integer >= 0"):
        validate(_config(tiny_model_dir, None, data, tmp_path, student__output_vocab={"first": -1}))
    with pytest.raises(ConfigError, match="needs student.lora"):
        validate(_config(tiny_model_dir, None, data, tmp_path, student__output_vocab={"first": 8},
                         student__lora=None))


def test_the_18_layer_student_config_is_valid():
    from pathlib import Path

    from lmlab.training.distill import load_distill_config, output_vocab_first, parse_keep_layers, validate

    cfg = load_distill_config(Path(__file__).resolve().parents[1] / "configs" / "distill-smollm2-dialogsum-student18.yaml")
    validate(cfg)
    layers = parse_keep_layers(cfg.student.keep_layers, 30)
    assert len(layers) == 18 and layers[0] == 0 and layers[-1] == 29
    assert output_vocab_first(cfg.student) == 8192
    assert [s.get("records") for s in cfg.data.train] == ["0:400", None]  # never 400:500
