"""The summarization lab end to end: tiny random model on the bundled set, resume, bad input, real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.errors import ConfigError, DataError
from lmlab.tasks.summarize import lab as lab_mod
from lmlab.tasks.summarize.data import load_dialogues
from lmlab.tasks.summarize.experiments import EXPERIMENTS, generation_config, parse_experiments
from lmlab.tasks.summarize.lab import LabInterrupted, LabSettings, run_lab
from lmlab.tasks.summarize.rouge import score_example


FIVE = "zero-shot-bare,zero-shot-instruction,one-shot,few-shot,sample-t0.7"


@pytest.fixture
def generate_calls(monkeypatch) -> list[list[str]]:
    """Record the prompts of every batched generate call the lab makes."""
    calls: list[list[str]] = []
    real = lab_mod._generate

    def counting(model, tokenizer, prompts, config):
        calls.append(list(prompts))
        return real(model, tokenizer, prompts, config)

    monkeypatch.setattr(lab_mod, "_generate", counting)
    return calls


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


# --- experiments -----------------------------------------------------------------------------------
def test_experiment_registry():
    with pytest.raises(ConfigError, match=r"unknown experiment\(s\) 'zero-shot-magic'; valid experiments: zero-shot-bare"):
        parse_experiments("one-shot,zero-shot-magic")
    assert [e.name for e in parse_experiments("one-shot, one-shot,few-shot")] == ["one-shot", "few-shot"]
    assert EXPERIMENTS["few-shot"].n_shots(3) == 3 and EXPERIMENTS["one-shot"].n_shots(3) == 1
    greedy = generation_config(EXPERIMENTS["one-shot"], 48, seed=1, chat=True)
    assert not greedy.do_sample and greedy.max_new_tokens == 48 and greedy.stop_strings == ["#Person1#:", "#Person2#:"]
    hot = generation_config(EXPERIMENTS["sample-t0.7"], 48, seed=1, chat=False)
    assert hot.do_sample and hot.temperature == 0.7 and hot.seed == 1 and "#Person1#:" in hot.stop_strings
    assert generation_config(EXPERIMENTS["top-p-0.9"], 8, 0, True).top_p == 0.9
    assert generation_config(EXPERIMENTS["top-k-50"], 8, 0, True).top_k == 50


# --- end to end ------------------------------------------------------------------------------------
def test_lab_end_to_end_on_bundled_set(tiny_model_dir, tmp_path, capsys, generate_calls):
    out = tmp_path / "out"
    rc = main(["lab", "--model", str(tiny_model_dir), "--experiments", FIVE, "--max-new-tokens", "5",
               "--batch-size", "8", "--out", str(out), "--examples", "2"])
    assert rc == 0
    data = load_dialogues().records
    pool_ids, eval_ids = {d.id for d in data[:4]}, [d.id for d in data[4:]]  # default --pool-size 4
    rows = read_rows(out)
    assert len(rows) == 5 * len(eval_ids) and len(eval_ids) >= 20
    assert {(r["experiment"], r["id"]) for r in rows} == {(e, i) for e in FIVE.split(",") for i in eval_ids}
    assert sum(len(c) for c in generate_calls) == len(rows) and max(len(c) for c in generate_calls) == 8
    by_id = {d.id: d for d in data}
    for r in rows:
        assert by_id[r["id"]].dialogue in r["prompt"]  # the dialogue being summarized is in its prompt
        assert r["references"] == by_id[r["id"]].references
        assert set(r["scores"]["best"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
        assert r["prompt_tokens"] > 0 and 1 <= r["generated_tokens"] <= 5 and r["seconds"] >= 0
        want_shots = {"one-shot": 1, "few-shot": 2}.get(r["experiment"], 0)
        assert len(r["shots"]) == want_shots and set(r["shots"]) <= pool_ids and r["id"] not in r["shots"]
        if want_shots:  # the shot's dialogue and reference summary are in the prompt
            shot = by_id[r["shots"][0]]
            assert shot.dialogue in r["prompt"] and shot.references[0] in r["prompt"]
    bare = next(r for r in rows if r["experiment"] == "zero-shot-bare")
    instr = next(r for r in rows if r["experiment"] == "zero-shot-instruction" and r["id"] == bare["id"])
    assert "Summarize" not in bare["prompt"] and "Summarize" in instr["prompt"]

    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in FIVE.split(",")]
    assert [line.split("|")[1].strip() for line in table[:5]] == FIVE.split(",")
    assert "best reference" in report and str(tiny_model_dir) in report and "seed" in report
    assert (out / "rouge.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "human" in printed and data[4].references[0][:30] in printed  # human baseline beside the models
    assert "R1" in printed and "RLsum" in printed and "gen tok" in printed


def test_resume_generates_exactly_the_remaining_rows(tiny_model_dir, tmp_path, generate_calls):
    settings = LabSettings(model=str(tiny_model_dir), experiments="zero-shot-bare,one-shot", limit=5, batch_size=2,
                           max_new_tokens=4, out=tmp_path / "out", examples=0, max_rows=4)
    with pytest.raises(LabInterrupted, match="to resume"):
        run_lab(settings, echo=lambda s: None)
    assert len(read_rows(tmp_path / "out")) == 4
    first = [p for call in generate_calls for p in call]
    assert len(first) == 4
    generate_calls.clear()

    settings.max_rows = None
    result = run_lab(settings, echo=lambda s: None)
    second = [p for call in generate_calls for p in call]
    assert result.new_rows == 6 and len(second) == 6  # 2 experiments x 5 dialogues - 4 finished
    assert not set(first) & set(second)  # no finished row was generated again
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 10 and len({(r["experiment"], r["id"]) for r in rows}) == 10
    generate_calls.clear()

    # a third run has nothing to do
    assert run_lab(settings, echo=lambda s: None).new_rows == 0 and not generate_calls
    # a row cut short by a hard kill (no trailing newline) is dropped and generated again
    results = tmp_path / "out" / "results.jsonl"
    results.write_text(results.read_text()[:-40])
    assert run_lab(settings, echo=lambda s: None).new_rows == 1
    assert len(read_rows(tmp_path / "out")) == 10
    # adding an experiment generates only that one's rows
    settings.experiments = "zero-shot-bare,one-shot,zero-shot-flan"
    assert run_lab(settings, echo=lambda s: None).new_rows == 5


def test_ctrl_c_keeps_rows_and_exits_130(tiny_model_dir, tmp_path, monkeypatch, capsys):
    real, n = lab_mod._generate, []

    def interrupt_on_third_batch(*args):
        n.append(1)
        if len(n) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(lab_mod, "_generate", interrupt_on_third_batch)
    out = tmp_path / "out"
    argv = ["lab", "--model", str(tiny_model_dir), "--experiments", "zero-shot-bare", "--limit", "6",
            "--batch-size", "2", "--max-new-tokens", "3", "--out", str(out)]
    assert main(argv) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert len(read_rows(out)) == 4  # the two finished batches
    assert main(argv) == 0 and len(read_rows(out)) == 6


def test_sampled_experiments_are_reproducible(tiny_model_dir, tmp_path):
    def run(out: str, seed: int) -> list[str]:
        result = run_lab(LabSettings(model=str(tiny_model_dir), experiments="sample-t1.0,one-shot", limit=4,
                                     max_new_tokens=6, seed=seed, out=tmp_path / out, examples=0), echo=lambda s: None)
        return [r["output"] + "|" + ",".join(r["shots"]) for r in result.rows]

    first = run("a", 0)
    assert run("b", 0) == first  # same --seed: same samples and same random shots
    assert run("c", 1) != first


def test_sampled_summary_does_not_depend_on_batch_size_or_resume_point(tiny_model_dir, tmp_path):
    """Each example samples from its own generator seeded from (seed, example id), not from one seed per batch."""
    from lmlab.tasks.summarize.experiments import example_seed

    def settings(out: str, batch_size: int, max_rows=None) -> LabSettings:
        return LabSettings(model=str(tiny_model_dir), experiments="sample-t1.0", limit=7, batch_size=batch_size,
                           max_new_tokens=6, seed=3, out=tmp_path / out, examples=0, max_rows=max_rows)

    def outputs(out: str) -> dict[str, str]:
        return {r["id"]: r["output"] for r in read_rows(tmp_path / out)}

    run_lab(settings("b4", 4), echo=lambda s: None)
    assert len(set(outputs("b4").values())) >= 5  # really sampled: 7 examples, (almost) 7 different texts
    run_lab(settings("b1", 1), echo=lambda s: None)
    assert outputs("b1") == outputs("b4")
    # interrupted after the first batch of 3, resumed with batches of 2: rows restart at other batch positions
    with pytest.raises(LabInterrupted):
        run_lab(settings("resumed", 3, max_rows=1), echo=lambda s: None)
    assert len(read_rows(tmp_path / "resumed")) == 3
    run_lab(settings("resumed", 2), echo=lambda s: None)
    assert outputs("resumed") == outputs("b4")
    rows = read_rows(tmp_path / "resumed")  # each row records the seed it sampled with
    assert [r["generation"]["seed"] for r in rows] == [example_seed(3, r["id"]) for r in rows]


def test_changed_settings_are_refused(tiny_model_dir, tmp_path):
    settings = LabSettings(model=str(tiny_model_dir), experiments="zero-shot-bare", limit=2, max_new_tokens=3,
                           out=tmp_path / "out", examples=0)
    run_lab(settings, echo=lambda s: None)
    settings.max_new_tokens = 4
    with pytest.raises(ConfigError, match=r"different settings \(max_new_tokens: 3 -> 4\); pass a new --out"):
        run_lab(settings, echo=lambda s: None)
    settings.max_new_tokens, settings.seed = 3, 7
    with pytest.raises(ConfigError, match=r"seed: 0 -> 7"):
        run_lab(settings, echo=lambda s: None)


def test_changed_experiment_definition_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    from lmlab.tasks.summarize import experiments

    settings = LabSettings(model=str(tiny_model_dir), experiments="zero-shot-instruction", limit=2, max_new_tokens=3,
                           out=tmp_path / "out", examples=0)
    run_lab(settings, echo=lambda s: None)
    monkeypatch.setattr(experiments, "INSTRUCTION", "Summarize it.")  # e.g. a newer lmlab reworded the prompt
    with pytest.raises(ConfigError, match=r"'zero-shot-instruction' rows from an earlier definition"):
        run_lab(settings, echo=lambda s: None)


# --- bad input: clear errors before any generation --------------------------------------------------
def _dialogue(i: int, **extra) -> str:
    return json.dumps({"fname": f"d{i}", "dialogue": f"#Person1#: Hello {i}.\n#Person2#: Hi.", "summary": "Greeting.",
                       **extra})


@pytest.mark.parametrize("case, args, message", [
    ("unknown experiment", ["--experiments", "zero-shot,one-shot"], "unknown experiment(s) 'zero-shot'"),
    ("k > pool", ["--experiments", "few-shot", "--shots", "5"], "needs 5 shots but the shot pool"),
    ("pool too big", ["--pool-size", "100"], "--pool-size 100 leaves nothing to evaluate"),
    ("missing field", ["--data", "{tmp}/missing.jsonl"], "missing.jsonl:2: missing field 'dialogue'"),
    ("not utf-8", ["--data", "{tmp}/latin1.jsonl"], "latin1.jsonl is not valid UTF-8: byte 0xe9 at byte offset"),
    ("no summaries", ["--data", "{tmp}/hidden.jsonl"], "no reference summary"),
    ("missing shots file", ["--shots-from", "{tmp}/nope.jsonl"], "nope.jsonl' does not exist"),
])
def test_bad_input_fails_before_generation(case, args, message, tiny_model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "missing.jsonl").write_text(_dialogue(0) + "\n" + json.dumps({"fname": "x", "summary": "s"}) + "\n")
    (tmp_path / "latin1.jsonl").write_bytes(_dialogue(0).encode().replace(b"Hello", b"H\xe9llo"))
    (tmp_path / "hidden.jsonl").write_text("\n".join(json.dumps({"fname": f"h{i}", "dialogue": "#Person1#: Hi."})
                                                     for i in range(6)) + "\n")
    monkeypatch.setattr(lab_mod, "_generate", lambda *a: pytest.fail("generation started on bad input"))
    argv = ["lab", "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(argv) == 2, case
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_empty_dialogue_is_reported_and_skipped(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    lines = [_dialogue(i) for i in range(3)] + [json.dumps({"fname": "empty", "dialogue": " ", "summary": "s"})]
    path.write_text("\n".join(lines) + "\n")
    rc = main(["lab", "--model", str(tiny_model_dir), "--data", str(path), "--pool-size", "1",
               "--experiments", "zero-shot-bare,one-shot", "--max-new-tokens", "3", "--out", str(tmp_path / "out")])
    assert rc == 0
    assert "warning: " in capsys.readouterr().out and "empty: empty dialogue" in (tmp_path / "out" / "report.md").read_text()
    assert sorted(r["id"] for r in read_rows(tmp_path / "out")) == ["d1", "d1", "d2", "d2"]


def test_several_references_report_best_and_mean(tiny_model_dir, tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(json.dumps({"fname": f"t{i}", "dialogue": f"#Person1#: Hi {i}.\n#Person2#: Hello.",
                                         "summary1": "Greeting.", "summary2": "Two people say hello.",
                                         "summary3": "A greeting."}) for i in range(3)) + "\n")
    result = run_lab(LabSettings(model=str(tiny_model_dir), data=str(path), pool_size=0, experiments="zero-shot-bare",
                                 max_new_tokens=3, out=tmp_path / "out", examples=1), echo=lambda s: None)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Reference aggregation: **best**" in report and "Reference aggregation: **mean**" in report
    assert "mean over references" in result.text and "human3" in result.text
    (row,) = result.rows[:1]
    assert len(row["scores"]["per_reference"]) == 3 and row["references"][2] == "A greeting."


def test_shots_from_file_and_nearest_neighbours(tiny_model_dir, tmp_path, minilm_path):
    records = load_dialogues().records
    write = lambda path, recs: path.write_text("\n".join(
        json.dumps({"fname": d.id, "dialogue": d.dialogue, "summary": d.references[0]}) for d in recs) + "\n")
    write(tmp_path / "data.jsonl", records[6:])
    write(tmp_path / "shots.jsonl", records[:8])  # records 6 and 7 are also in --data: left out of the pool

    def run(seed: int, out: str):
        return run_lab(LabSettings(model=str(tiny_model_dir), data=str(tmp_path / "data.jsonl"), experiments="few-shot-nn",
                                   shots=2, limit=3, shots_from=str(tmp_path / "shots.jsonl"), max_new_tokens=3,
                                   seed=seed, out=tmp_path / out, examples=0), echo=lambda s: None)

    rows = run(0, "out").rows
    # with --shots-from, --data is evaluated from its first record; the pool is the shots file minus --data
    assert [r["id"] for r in rows] == [d.id for d in records[6:9]]
    pool_ids = {d.id for d in records[:6]}
    for r in rows:
        assert len(r["shots"]) == 2 and set(r["shots"]) <= pool_ids
    # nearest neighbours are chosen by meaning, not by the seed
    assert [r["shots"] for r in run(5, "out2").rows] == [r["shots"] for r in rows]
    # k larger than the pool (6 after leaving out the 2 overlapping dialogues) is refused up front
    with pytest.raises(DataError, match=r"needs 7 shots but the shot pool .*6 dialogues; 2 also in --data left out"):
        run_lab(LabSettings(model=str(tiny_model_dir), data=str(tmp_path / "data.jsonl"), experiments="few-shot",
                            shots=7, shots_from=str(tmp_path / "shots.jsonl"), out=tmp_path / "out3"))


# --- the real default model -------------------------------------------------------------------------
@pytest.mark.slow
def test_real_model_on_20_dev_dialogues(tmp_path, dialogsum_dev, smollm2_path):
    # fp32 pinned: the bounds below were measured in fp32, and "auto" is bf16 on a CPU with native bf16
    result = run_lab(LabSettings(data=str(dialogsum_dev), experiments="zero-shot-instruction,sample-t0.7", limit=20,
                                 batch_size=8, max_new_tokens=48, out=tmp_path / "out", examples=2, precision="fp32"))
    assert len(result.rows) == 40  # behaviour only: speed is measured by benchmarks, never asserted in tests
    assert [r["id"] for r in result.rows[:2]] == ["dev_4", "dev_5"]  # dev_0..dev_3 are the shot pool
    for s in result.summaries:
        assert s.n == 20 and 5 < s.words < 60 and s.generated_tokens <= 48
    assert sum(1 for r in result.rows if r["summary"]) >= 24  # SmolLM2-135M sometimes recites the dialogue
    # Summaries must be about *their* dialogue: scored against the reference of another dialogue they
    # must lose clearly (generic words like "the", "person1" give any English text some ROUGE-1).
    # Measured on this slice: zero-shot-instruction 13.3 matched vs 8.4 mismatched; sample-t0.7 11.1 vs 6.4.
    for name in ("zero-shot-instruction", "sample-t0.7"):
        rows = [r for r in result.rows if r["experiment"] == name]
        matched = sum(r["scores"]["best"]["rouge1"] for r in rows) / len(rows)
        mismatched = sum(score_example(r["summary"], rows[(i + 7) % len(rows)]["references"]).best["rouge1"]
                         for i, r in enumerate(rows)) / len(rows)
        assert matched > 0.09 and matched > mismatched + 0.025, (name, matched, mismatched)
