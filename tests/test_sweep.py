"""lmlab sweep: the resumable job runner (lmlab.sweep.runner) and recipe sweeps (lmlab.sweep.recipes)."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from lmlab.errors import ConfigError, DataError, LmlabError
from lmlab.sweep import recipes
from lmlab.sweep.recipes import RecipeSweep, RunSpec, expand_grid, paired, score_rows, table, weights_args
from lmlab.sweep.runner import FAILED_FILE, RUNS_FILE, Job, SweepFailed, append_record, done_ids, read_records, run_jobs


# --- the runner ----------------------------------------------------------------------------------
def counting_jobs(ids, calls):
    def make(i):
        def run():
            calls.append(i)
            return {"value": i.upper()}
        return run
    return [Job(i, make(i)) for i in ids]


def test_finished_jobs_are_never_run_again(tmp_path):
    calls, lines = [], []
    written = run_jobs(counting_jobs(["a", "b"], calls), tmp_path, echo=lines.append)
    assert calls == ["a", "b"] and [r["id"] for r in written] == ["a", "b"]
    assert [r["value"] for r in read_records(tmp_path / RUNS_FILE)] == ["A", "B"]
    assert all("wall_s" in r for r in written)
    assert lines[0].startswith("[1/2] a: done") and lines[1].startswith("[2/2] b: done")
    # a second call with one more job runs only the new one, and counts the finished ones in its progress
    lines.clear()
    assert [r["id"] for r in run_jobs(counting_jobs(["a", "b", "c"], calls), tmp_path, echo=lines.append)] == ["c"]
    assert calls == ["a", "b", "c"] and len(lines) == 1 and lines[0].startswith("[3/3] c: done")
    assert run_jobs(counting_jobs(["a", "b", "c"], calls), tmp_path, echo=lines.append) == []
    assert calls == ["a", "b", "c"] and done_ids(tmp_path / RUNS_FILE) == {"a", "b", "c"}


def test_a_line_cut_by_a_kill_is_ignored_and_its_job_redone(tmp_path):
    runs = tmp_path / RUNS_FILE
    append_record(runs, {"id": "a", "x": 1})
    append_record(runs, {"id": "b", "x": 2})
    runs.write_text(runs.read_text()[:-6])  # the last record cut mid-write
    assert done_ids(runs) == {"a"} and read_records(runs) == [{"id": "a", "x": 1}]
    calls = []
    run_jobs(counting_jobs(["a", "b"], calls), tmp_path, echo=lambda s: None)
    assert calls == ["b"] and done_ids(runs) == {"a", "b"}
    assert read_records(tmp_path / "missing.jsonl") == []


def test_a_failing_job_does_not_stop_the_others(tmp_path):
    calls, lines = [], []

    def broken():
        raise RuntimeError("out of disk on purpose")

    jobs = counting_jobs(["a"], calls) + [Job("bad", broken)] + counting_jobs(["c"], calls)
    with pytest.raises(SweepFailed, match=r"1 job\(s\) failed: bad \(RuntimeError: out of disk on purpose\)") as info:
        run_jobs(jobs, tmp_path, echo=lines.append)
    assert isinstance(info.value, LmlabError) and FAILED_FILE in str(info.value)
    assert calls == ["a", "c"] and done_ids(tmp_path / RUNS_FILE) == {"a", "c"}
    failed = read_records(tmp_path / FAILED_FILE)
    assert [f["id"] for f in failed] == ["bad"] and "out of disk on purpose" in failed[0]["error"]
    assert any(line.startswith("[failed] bad") for line in lines)
    # the next invocation retries only the failed job
    fixed = counting_jobs(["a", "bad", "c"], calls)
    assert [r["id"] for r in run_jobs(fixed, tmp_path, echo=lambda s: None)] == ["bad"]
    assert calls == ["a", "c", "bad"]


def test_workers_run_jobs_at_the_same_time(tmp_path):
    barrier = threading.Barrier(2, timeout=10)  # one worker at a time would break it (BrokenBarrierError)

    def meet():
        barrier.wait()
        return {}

    written = run_jobs([Job("x", meet), Job("y", meet)], tmp_path, workers=2, echo=lambda s: None)
    assert sorted(r["id"] for r in written) == ["x", "y"]
    with pytest.raises(ValueError, match="workers=0"):
        run_jobs([Job("z", meet)], tmp_path, workers=0)


def test_one_worker_runs_jobs_one_after_the_other(tmp_path):
    barrier = threading.Barrier(2, timeout=0.5)

    def meet():
        barrier.wait()
        return {}

    with pytest.raises(SweepFailed, match="BrokenBarrierError"):
        run_jobs([Job("x", meet), Job("y", meet)], tmp_path, workers=1, echo=lambda s: None)


# --- recipe sweep configs ------------------------------------------------------------------------
@pytest.fixture
def base(tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "ft.yaml").write_text("base_model: x\n")
    return {"out_dir": str(tmp_path / "out"), "eval": {"data": str(tmp_path / "data.jsonl")},
            "runs": [{"id": "shipped", "adapter": "shipped"},
                     {"id": "lr-2e-3", "job": "finetune", "config": "ft.yaml", "set": {"train.lr": 2.0e-3}}]}


def test_a_valid_sweep_config_loads(base, tmp_path):
    cfg = RecipeSweep.from_dict({**base, "baseline": "shipped"})
    assert [r.id for r in cfg.runs] == ["shipped", "lr-2e-3"] and cfg.runs[1].set == {"train.lr": 2.0e-3}
    assert cfg.eval.decodings == {"greedy": {}} and cfg.baseline == "shipped"
    import yaml

    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(base))
    assert RecipeSweep.from_file(tmp_path / "sweep.yaml", {"workers": 3, "device": None}).workers == 3


@pytest.mark.parametrize("change, error, message", [
    ({"epochs": 3}, ConfigError, r"unknown sweep key\(s\) epochs"),
    ({"runs": [{"id": "a", "job": "pretrain", "config": "ft.yaml"}]}, ConfigError, r"job='pretrain' must be one of"),
    ({"runs": [{"id": "a", "job": "finetune", "config": "nope.yaml"}]}, ConfigError, r"config 'nope.yaml' does not exist"),
    ({"runs": [{"id": "a", "adapter": "shipped"}, {"id": "a", "model": "m"}]}, ConfigError, r"run id\(s\) a appear more"),
    ({"runs": [{"id": "a/b", "adapter": "shipped"}]}, ConfigError, r"run id 'a/b' may hold only"),
    ({"runs": [{"id": "a", "adapter": "shipped", "lr": 1}]}, ConfigError, r"unknown key\(s\) lr in runs\[0\]"),
    ({"runs": ["a"]}, ConfigError, r"runs\[0\] must be a mapping"),
    ({"runs": [{"id": "a", "adapter": "x", "model": "m"}]}, ConfigError, r"run a: give one of adapter, model"),
    ({"eval": {"decodings": {"beam": {"num_beam": 4}}}}, ConfigError, r"decoding beam: num_beam are not decoding settings"),
    ({"eval": {"decodings": {"beam": {"num_beams": 0}}}}, ConfigError, r"num_beams=0 must be an integer >= 1"),
    ({"baseline": "nobody"}, ConfigError, r"baseline='nobody' is not a run id; runs: shipped, lr-2e-3"),
    ({"eval": {"data": "gone.jsonl"}}, DataError, r"eval.data 'gone.jsonl' does not exist"),
    ({"workers": 0}, ConfigError, r"workers=0 must be a positive integer"),
    ({"eval": {"experiment": "few-shot"}}, ConfigError, r"eval.experiment='few-shot'"),
    ({"eval": {"decodings": {"m": {"best_of": 0}}}}, ConfigError, r"decoding m: best_of=0 must be an integer >= 1"),
    ({"eval": {"decodings": {"m": {"best_of": 2, "num_beams": 2}}}}, ConfigError, r"takes only temperature beside it"),
    ({"eval": {"decodings": {"m": {"temperature": 0.5}}}}, ConfigError, r"temperature sets the samples of best_of N"),
    ({"runs": [], "grid": []}, ConfigError, r"no runs"),
])
def test_bad_sweep_configs_name_the_bad_value(base, change, error, message):
    data = {**base, **change}
    if "eval" in change and "data" not in change["eval"]:
        data["eval"] = {**base["eval"], **change["eval"]}
    with pytest.raises(error, match=message):
        RecipeSweep.from_dict(data)


def test_missing_or_broken_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RecipeSweep.from_file(tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        RecipeSweep.from_file(tmp_path / "list.yaml")


def test_a_grid_expands_to_the_product_with_ids_from_the_template(base):
    runs = expand_grid({"id": "r{lora.r}-lr{train.lr}", "job": "finetune", "config": "ft.yaml",
                        "set": {"train.steps": 5}, "vary": {"lora.r": [16, 64], "train.lr": [5.0e-4, 2.0e-3]}}, "grid[0]")
    assert [r.id for r in runs] == ["r16-lr0.0005", "r16-lr0.002", "r64-lr0.0005", "r64-lr0.002"]
    assert runs[1].set == {"train.steps": 5, "lora.r": 16, "train.lr": 2.0e-3}
    assert all(r.job == "finetune" and r.config == "ft.yaml" for r in runs)
    # through from_dict, beside the plain runs
    cfg = RecipeSweep.from_dict({**base, "grid": [{"id": "r{lora.r}", "job": "finetune", "config": "ft.yaml",
                                                   "vary": {"lora.r": [4, 8]}}]})
    assert [r.id for r in cfg.runs] == ["shipped", "lr-2e-3", "r4", "r8"]
    # no template: the values joined
    assert [r.id for r in expand_grid({"job": "finetune", "config": "ft.yaml", "vary": {"a": [1], "b": ["x"]}}, "g")] \
        == ["1-x"]
    with pytest.raises(ConfigError, match=r"grid\[0\].id='r\{lora.rank\}'.*\{lora.rank\} is not a varied setting"):
        expand_grid({"id": "r{lora.rank}", "vary": {"lora.r": [4]}}, "grid[0]")
    with pytest.raises(ConfigError, match=r"grid\[1\].vary must map each setting to a non-empty list"):
        expand_grid({"id": "x", "vary": {"lora.r": []}}, "grid[1]")


# --- scores and the table ------------------------------------------------------------------------
def row(i, r1, summary="A short summary.", words=3):
    return {"id": i, "experiment": "finetuned", "summary": summary, "words": words,
            "scores": {"best": {"rouge1": r1, "rouge2": r1 / 2, "rougeL": r1 / 4}}}


def test_score_rows():
    loop = "he buys a car. he buys a car. he buys a car."
    s = score_rows([row("c", 0.3, loop, 12), row("a", 0.5, "", 0), row("b", 0.4, words=6)])
    assert s["n"] == 3 and s["rouge1"] == 40.0 and s["rouge2"] == 20.0 and s["rougeL"] == 10.0
    assert s["empty"] == 1 and s["looping"] == 1 and s["words"] == 6.0
    assert s["ids"] == ["a", "b", "c"] and s["per_example_rouge1"] == [50.0, 40.0, 30.0]
    with pytest.raises(RuntimeError, match="no rows"):
        score_rows([])


def test_paired_mean_and_standard_error_by_hand():
    a, b = [50.0, 40.0, 30.0, 20.0], [45.0, 41.0, 25.0, 20.0]
    # differences 5, -1, 5, 0: mean 2.25; sample variance ((2.75)^2 + (3.25)^2 + (2.75)^2 + (2.25)^2) / 3
    var = (2.75 ** 2 + 3.25 ** 2 + 2.75 ** 2 + 2.25 ** 2) / 3
    m, se = paired(a, b)
    assert m == pytest.approx(2.25) and se == pytest.approx(math.sqrt(var / 4))


def record(run_id, per_example, job="finetune", set_=None, decodings=None):
    ids = [f"e{i}" for i in range(len(per_example))]
    s = {"rouge1": sum(per_example) / len(per_example), "rouge2": 1.0, "rougeL": 2.0, "empty": 0, "looping": 0,
         "words": 20.0, "ids": ids, "per_example_rouge1": per_example}
    decodings = decodings or {"greedy": {}}
    return {"id": run_id, "job": job, "set": set_ or {}, "weights": None if job else "shipped", "train_s": 12.0,
            "evals": {name: dict(s) for name in decodings}, "decodings": decodings}


def test_table_paired_differences_and_the_two_se_mark():
    base = record("base", [30.0, 40.0, 50.0, 35.0], job=None)
    same = record("same", [31.0, 39.0, 51.0, 34.0], set_={"train.lr": 1e-3, "eval_every": 50})  # Δ 0 ± 0.58
    better = record("better", [40.0, 49.0, 61.0, 44.0], set_={"train.lr": 2e-3, "eval_every": 50},
                    decodings={"greedy": {}, "beam4": {"num_beams": 4}})
    text = table([base, same, better], baseline="base")
    lines = {(line.split("|")[1].strip(), line.split("|")[3].split(":")[0].strip()): line
             for line in text.splitlines()[2:]}
    assert "Δ R-1 ± SE vs base" in text.splitlines()[0]
    m, se = paired([31.0, 39.0, 51.0, 34.0], [30.0, 40.0, 50.0, 35.0])
    assert f"{m:+.2f} ± {se:.2f} |" in lines[("same", "greedy")] and "2 SE" not in lines[("same", "greedy")]
    m, se = paired([40.0, 49.0, 61.0, 44.0], [30.0, 40.0, 50.0, 35.0])
    assert f"{m:+.2f} ± {se:.2f} **(≥ 2 SE)**" in lines[("better", "beam4")]
    assert "num_beams=4" in lines[("better", "beam4")] and "2 SE" not in lines[("base", "greedy")]
    # settings every trained run shares (eval_every) are left out; the varied one stays
    assert "| train.lr=0.002 |" in lines[("better", "greedy")] and "eval_every" not in text
    assert "| shipped |" in lines[("base", "greedy")]
    assert "Δ" in table([base, same]) and "± " not in table([base, same])  # no baseline: no differences
    with pytest.raises(ConfigError, match="baseline 'gone' is not in the records; runs: base"):
        table([base], baseline="gone")


def test_weights_args_for_each_kind_of_run(base, tmp_path):
    cfg = RecipeSweep.from_dict(base)
    cfg.model = "tiny-base"
    run_dir = tmp_path / "out" / "run"
    job = RunSpec(id="run", job="finetune", config="ft.yaml")
    best = run_dir / "train" / "best"
    best.mkdir(parents=True)
    (best / "adapter_config.json").write_text("{}")
    assert weights_args(cfg, job, run_dir) == ["--model", "tiny-base", "--adapter", str(best)]
    (best / "lmlab_student.json").write_text("{}")
    assert weights_args(cfg, job, run_dir) == ["--model", str(best)]  # a student bundle is a model of its own
    final = tmp_path / "out" / "full" / "train" / "final"  # no best/: final/, a full fine-tune is a model
    final.mkdir(parents=True)
    assert weights_args(cfg, job, final.parent.parent) == ["--model", str(final)]
    assert weights_args(cfg, RunSpec(id="a", adapter="shipped"), run_dir) == ["--model", "tiny-base"]
    assert weights_args(cfg, RunSpec(id="a", adapter="ad"), run_dir) == ["--model", "tiny-base", "--adapter", "ad"]
    assert weights_args(cfg, RunSpec(id="a", model="m2"), run_dir) == ["--model", "m2"]
    assert weights_args(cfg, RunSpec(id="a", student="shipped"), run_dir) == ["--model", "tiny-base", "--student"]
    assert weights_args(cfg, RunSpec(id="a", student="st"), run_dir) == ["--model", "tiny-base", "--student", "st"]


# --- end to end on the tiny model --------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_trains_evaluates_each_decoding_and_never_repeats_a_run(tiny_model_dir, tmp_path, monkeypatch):
    """One LoRA fine-tune (1 step) scored greedy and with 2 beams by `lmlab lab`, in subprocesses on the CPU."""
    import yaml

    from lmlab.tasks.summarize.data import load_dialogues

    data = tmp_path / "dialogues.jsonl"
    data.write_text("".join(json.dumps({"fname": d.id, "dialogue": d.dialogue, "summary": d.references[0]}) + "\n"
                            for d in load_dialogues().records))
    ft = {"base_model": str(tiny_model_dir), "method": "lora", "lora": {"r": 2},
          "data": {"task": "dialogsum", "chat": False, "train": [{"path": str(data), "records": "0:4"}],
                   "max_seq_len": 256},
          "eval": {"rouge_examples": 0}, "train": {"steps": 1, "batch_size": 2, "eval_every": 0, "ckpt_every": 0}}
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(ft))
    cfg = RecipeSweep.from_dict({
        "out_dir": str(tmp_path / "sweep"), "device": "cpu", "model": str(tiny_model_dir),
        "eval": {"data": str(data), "pool_size": 4, "limit": 2, "max_new_tokens": 4, "batch_size": 2,
                 "decodings": {"greedy": {}, "beam2": {"num_beams": 2}, "mbr2": {"best_of": 2}}},
        "runs": [{"id": "lora", "job": "finetune", "config": str(tmp_path / "ft.yaml"), "set": {"train.lr": 1e-3}}]})
    lines = []
    runs = recipes.sweep(cfg, echo=lines.append)
    [rec] = read_records(runs)
    assert rec["id"] == "lora" and rec["train"]["step"] == 1 and rec["set"] == {"train.lr": 1e-3}
    assert set(rec["evals"]) == {"greedy", "beam2", "mbr2"} and rec["decodings"]["beam2"] == {"num_beams": 2}
    for s in rec["evals"].values():
        assert s["n"] == 2 and len(s["per_example_rouge1"]) == 2 and 0 <= s["rouge1"] <= 100
    assert (tmp_path / "sweep" / "lora" / "train" / "final" / "adapter_config.json").exists()
    assert "--num-beams 2" in (tmp_path / "sweep" / "lora" / "eval-beam2.log").read_text()
    # a sweep decoding is one summary per dialogue: the lab's finetuned-greedy, never a recipe's MBR
    assert "--experiments finetuned-greedy" in (tmp_path / "sweep" / "lora" / "eval-greedy.log").read_text()
    mbr_log = (tmp_path / "sweep" / "lora" / "eval-mbr2.log").read_text()  # best_of: the MBR of the lab's finetuned
    assert "--experiments finetuned " in mbr_log and "--best-of 2" in mbr_log
    assert any(line.startswith("[1/1] lora: greedy R1") for line in lines)
    # a second invocation starts no process and writes nothing
    before = runs.read_text()
    monkeypatch.setattr(recipes.subprocess, "run", lambda *a, **k: pytest.fail("a finished run was started again"))
    recipes.sweep(cfg, echo=lines.append)
    assert runs.read_text() == before and "1 already done" in lines[-1]
    assert "| lora |" in table(read_records(runs), baseline="lora")


def test_cli_sweep_table_and_bad_input(tmp_path, capsys):
    from lmlab.cli import main

    runs = tmp_path / RUNS_FILE
    append_record(runs, record("base", [30.0, 40.0, 50.0], job=None))
    append_record(runs, record("tuned", [40.0, 49.0, 61.0], set_={"train.lr": 2e-3}))
    assert main(["sweep", "table", str(runs), "--baseline", "base"]) == 0
    out = capsys.readouterr().out
    assert "Δ R-1 ± SE vs base" in out and "| tuned | train.lr=0.002 |" in out and "(≥ 2 SE)" in out
    for argv, message in [(["sweep", "table", str(tmp_path / "none.jsonl")], "none.jsonl' does not exist"),
                          (["sweep", "run", "--config", str(tmp_path / "none.yaml")], "none.yaml' does not exist")]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
