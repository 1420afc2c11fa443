"""Preference pairs: the JSONL reader/writer, `lmlab prefs build` and `lmlab prefs label`."""

from __future__ import annotations

import json

import pytest

from lmlab.align.prefs import PreferencePair, append_preference, read_preferences
from lmlab.errors import DataError


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_read_round_trip_keeps_source_and_line_numbers(tmp_path):
    path = tmp_path / "p.jsonl"
    pairs = [PreferencePair("d1", "good", "bad", "dev_0 human>base"), PreferencePair("d2", "yes", "no", None)]
    for pair in pairs:
        append_preference(path, pair)
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n")  # a blank line is skipped but still counts for later line numbers
    append_preference(path, PreferencePair("d3", "a", "b"))
    back = read_preferences(path)
    assert [(p.prompt, p.chosen, p.rejected, p.source) for p in back] == [
        ("d1", "good", "bad", "dev_0 human>base"), ("d2", "yes", "no", None), ("d3", "a", "b", None)]
    assert [p.line for p in back] == [1, 2, 4]
    assert "source" not in json.loads(path.read_text().splitlines()[1])


def test_append_after_a_partial_last_line_starts_a_new_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}', encoding="utf-8")  # no newline
    append_preference(path, PreferencePair("q", "c2", "r2"))
    assert [p.prompt for p in read_preferences(path)] == ["p", "q"]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "rejected": "r"}, "missing 'chosen'"),
    ({"prompt": "p", "chosen": "c"}, "missing 'rejected'"),
    ({"chosen": "c", "rejected": "r"}, "missing 'prompt'"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are the same"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "'chosen' must be a string"),
    ({"prompt": "p", "chosen": "c", "rejected": "  "}, "'rejected' is empty"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "source": 5}, "'source' must be a string"),
])
def test_bad_records_name_the_line(tmp_path, record, message):
    path = tmp_path / "p.jsonl"
    _write(path, [json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}), "", json.dumps(record)])
    with pytest.raises(DataError) as err:
        read_preferences(path)
    assert f"{path}:3:" in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_preferences(tmp_path / "nope.jsonl")
    path = tmp_path / "p.jsonl"
    _write(path, ["{not json"])
    with pytest.raises(DataError, match=r"p\.jsonl:1: not valid JSON"):
        read_preferences(path)


def test_append_refuses_an_invalid_pair(tmp_path):
    with pytest.raises(DataError, match="same text"):
        append_preference(tmp_path / "p.jsonl", PreferencePair("p", "x", "x"))
    assert not (tmp_path / "p.jsonl").exists()


# --- lmlab prefs build ---------------------------------------------------------------------------
from lmlab.align.build import BuildSettings, build_preferences, log_path  # noqa: E402
from lmlab.cli import main  # noqa: E402
from lmlab.errors import ConfigError  # noqa: E402


@pytest.fixture
def dialogsum_like(tmp_path):
    """The bundled dialogues written as a DialogSum JSONL file (fname, dialogue, summary)."""
    from lmlab.tasks.summarize.data import load_dialogues

    path = tmp_path / "dev.jsonl"
    records = load_dialogues().records
    _write(path, [json.dumps({"fname": d.id, "dialogue": d.dialogue, "summary": d.references[0]}) for d in records])
    return path, records


def _settings(model, data, out, **kw):
    return BuildSettings(out=out, data=str(data), records=kw.pop("records", "0:6"), model=str(model),
                         max_new_tokens=kw.pop("max_new_tokens", 6), batch_size=kw.pop("batch_size", 4),
                         precision="fp32", **kw)


def test_build_pairs_chosen_is_the_reference_and_drops_follow_the_threshold(tiny_model_dir, dialogsum_like, tmp_path):
    data, records = dialogsum_like
    by_id = {r.id: r for r in records}
    # a first run keeps every non-empty output (threshold 1.0) and logs each one's ROUGE-1 against its reference
    probe = tmp_path / "probe.jsonl"
    build_preferences(_settings(tiny_model_dir, data, probe, rouge_threshold=1.0, records="0:12", max_new_tokens=12),
                      echo=lambda s: None, progress=False)
    scored = {item["id"]: item["rouge1"] for item in map(json.loads, log_path(probe).read_text().splitlines()[1:])
              if item["output"]}
    values = sorted(set(scored.values()))
    assert len(values) >= 2, f"the tiny model's outputs all score {values}: no threshold could split them"
    # a threshold between two observed scores: the outputs below it are kept, the others dropped
    threshold = (values[0] + values[1]) / 2
    expected = sorted(i for i, r1 in scored.items() if r1 < threshold)
    out = tmp_path / "pairs.jsonl"
    result = build_preferences(_settings(tiny_model_dir, data, out, rouge_threshold=threshold, records="0:12",
                                         max_new_tokens=12), echo=lambda s: None, progress=False)
    log = [json.loads(line) for line in log_path(out).read_text().splitlines()[1:]]
    assert [item["id"] for item in log] == [r.id for r in records[:12]]
    pairs = read_preferences(out)
    kept = [item for item in log if item["kept"]]
    assert sorted(item["id"] for item in kept) == expected and 0 < len(kept) < len(scored)
    assert len(pairs) == len(kept) == result.kept
    for pair, item in zip(pairs, kept):
        record = by_id[item["id"]]
        assert pair.prompt == record.dialogue and pair.chosen == record.references[0] and pair.rejected == item["output"]
        assert pair.source == f"{record.id} human>base@T1"
    dropped = [item for item in log if not item["kept"]]
    assert all(item["reason"] == "empty output" if not item["output"] else item["rouge1"] >= threshold
               for item in dropped)
    assert sum(result.dropped.values()) == len(dropped)


def test_build_resumes_to_the_same_pairs_as_one_run(tiny_model_dir, dialogsum_like, tmp_path):
    data, _ = dialogsum_like
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    build_preferences(_settings(tiny_model_dir, data, whole, rouge_threshold=1.0), echo=lambda s: None, progress=False)
    first = build_preferences(_settings(tiny_model_dir, data, parts, rouge_threshold=1.0, max_items=4, batch_size=2),
                              echo=lambda s: None, progress=False)
    assert first.new_items == 4
    second = build_preferences(_settings(tiny_model_dir, data, parts, rouge_threshold=1.0, batch_size=3),
                               echo=lambda s: None, progress=False)
    assert second.new_items == 2  # only what the first call left; the batch size is not part of the signature
    assert log_path(whole).read_text().splitlines()[1:] == log_path(parts).read_text().splitlines()[1:]
    assert (whole.read_text() if whole.exists() else "") == (parts.read_text() if parts.exists() else "")
    assert build_preferences(_settings(tiny_model_dir, data, parts, rouge_threshold=1.0), echo=lambda s: None,
                             progress=False).new_items == 0
    with pytest.raises(ConfigError, match=r"temperature: 1\.0 -> 0\.7"):
        build_preferences(_settings(tiny_model_dir, data, parts, rouge_threshold=1.0, temperature=0.7),
                          echo=lambda s: None, progress=False)


def test_build_refuses_held_out_records_unless_asked(tiny_model_dir, dialogsum_like, tmp_path):
    data = tmp_path / "big.jsonl"
    src = dialogsum_like[0].read_text().splitlines()
    _write(data, [json.dumps({**json.loads(src[i % len(src)]), "fname": f"d{i}"}) for i in range(405)])
    with pytest.raises(ConfigError, match=r"--records 398:403 includes records 400-402, the held-out evaluation"):
        build_preferences(_settings(tiny_model_dir, data, tmp_path / "p.jsonl", records="398:403"),
                          echo=lambda s: None, progress=False)
    result = build_preferences(_settings(tiny_model_dir, data, tmp_path / "p.jsonl", records="400:402", held_out=True,
                                         rouge_threshold=1.0), echo=lambda s: None, progress=False)
    assert result.new_items == 2


@pytest.mark.parametrize("argv, message", [
    (["--records", "5"], "must look like 'start:stop'"),
    (["--records", "a:b"], "must look like 'start:stop'"),
    (["--temperature", "0"], "--temperature 0.0 must be > 0"),
    (["--rouge-threshold", "1.5"], "--rouge-threshold 1.5 must be in (0, 1]"),
    (["--policy", "finetuned"], "--policy finetuned needs --adapter DIR"),
])
def test_build_bad_flags_are_one_line_errors(tiny_model_dir, dialogsum_like, tmp_path, capsys, argv, message):
    rc = main(["prefs", "build", "--out", str(tmp_path / "p.jsonl"), "--data", str(dialogsum_like[0]),
               "--model", str(tiny_model_dir), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1


def test_build_will_not_append_to_a_file_it_did_not_start(tiny_model_dir, dialogsum_like, tmp_path):
    out = tmp_path / "mine.jsonl"
    append_preference(out, PreferencePair("p", "a", "b"))
    with pytest.raises(ConfigError, match="has no build log"):
        build_preferences(_settings(tiny_model_dir, dialogsum_like[0], out), echo=lambda s: None, progress=False)


# --- lmlab prefs label ---------------------------------------------------------------------------
def _candidates(tmp_path):
    path = tmp_path / "cand.jsonl"
    for i in range(4):
        append_preference(path, PreferencePair(f"dialogue {i}", f"human summary {i}", f"model summary {i}", f"dev_{i}"))
    return path


def _shown(text: str) -> list[tuple[str, str]]:
    """(summary [1], summary [2]) of each pair in the terminal output."""
    shown = []
    for block in text.split("=== pair ")[1:]:
        lines = [line for line in block.splitlines() if line.startswith("[1] ") or line.startswith("[2] ")]
        shown.append((lines[0][4:], lines[1][4:]))
    return shown


def test_label_from_piped_stdin_appends_the_picked_summary(tmp_path, monkeypatch, capsys):
    import io

    cand, out = _candidates(tmp_path), tmp_path / "labels.jsonl"
    monkeypatch.setattr("sys.stdin", io.StringIO("2\nmaybe\n1\ns\nq\n"))
    assert main(["prefs", "label", str(cand), "--out", str(out), "--seed", "3"]) == 0
    text = capsys.readouterr().out
    shown = _shown(text)
    assert len(shown) == 4  # pair 3 skipped, pair 4 shown and answered q
    assert "'maybe' is not an answer" in text and "dev_" not in text  # sources are hidden
    assert {frozenset(s) for s in shown} == {frozenset((f"human summary {i}", f"model summary {i}")) for i in range(4)}
    labels = read_preferences(out)
    assert [(p.chosen, p.rejected) for p in labels] == [(shown[0][1], shown[0][0]), (shown[1][0], shown[1][1])]
    assert labels[0].source == "human label (dev_0)"
    # both orders occur across pairs for some seed: the order is not always chosen-first
    orders = set()
    for seed in range(8):
        from lmlab.align.label import shown_order

        orders |= {shown_order(p, seed)[0].startswith("human") for p in read_preferences(cand)}
    assert orders == {True, False}

    # a second session shows only what was not labeled (the skipped pair and the last one)
    monkeypatch.setattr("sys.stdin", io.StringIO("1\n1\n"))
    assert main(["prefs", "label", str(cand), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 pair(s) to label (2 already in" in text
    assert len(read_preferences(out)) == 4


def test_label_piped_into_head_exits_quietly(tmp_path):
    """`lmlab prefs label ... | head -n 3`: the closed pipe ends the session without a traceback."""
    import subprocess
    import sys

    cand, out = tmp_path / "cand.jsonl", tmp_path / "labels.jsonl"
    long = "\n".join(f"#Person1#: line {j} of a long dialogue" for j in range(3000))  # > a pipe's 64 KiB buffer
    for i in range(4):
        append_preference(cand, PreferencePair(f"{long}\n#Person2#: {i}", f"human {i}", f"model {i}", f"dev_{i}"))
    script = (f"printf '1\\n1\\n1\\n1\\n' | {sys.executable} -m lmlab prefs label {cand} --out {out} | head -n 3; "
              f"echo rc=${{PIPESTATUS[1]}}")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.count("\n") == 4 and done.stdout.endswith("rc=0\n"), done.stdout
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_label_refuses_to_write_into_its_candidates(tmp_path, capsys):
    cand = _candidates(tmp_path)
    assert main(["prefs", "label", str(cand), "--out", str(cand)]) == 2
    assert "is the candidates file" in capsys.readouterr().err


# --- POST /v1/preferences (the playground's compare tab) -----------------------------------------
def test_preferences_endpoint_appends_and_rejects_bad_records(tmp_path):
    import httpx
    from serving import running_server, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size)
    prefs = tmp_path / "prefs.jsonl"
    with running_server(lambda: (model, tok), prefs_out=str(prefs)) as (url, _):
        ok = httpx.post(f"{url}/v1/preferences", json={"prompt": "d", "chosen": "a", "rejected": "b", "source": "s"})
        assert ok.status_code == 200 and ok.json()["records"] == 1
        for body, param in [({"prompt": "d", "chosen": "a"}, "rejected"), ({"prompt": "d", "chosen": "a", "rejected": "a"},
                            "rejected"), ({"prompt": " ", "chosen": "a", "rejected": "b"}, "prompt"),
                            ({"prompt": "d", "chosen": "a", "rejected": "b", "source": 3}, "source")]:
            bad = httpx.post(f"{url}/v1/preferences", json=body)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param
        assert httpx.get(f"{url}/v1/summarize/dialogues").json()["preferences"] is True
    assert [(p.prompt, p.chosen, p.rejected, p.source) for p in read_preferences(prefs)] == [("d", "a", "b", "s")]
    with running_server(lambda: (model, tok)) as (url, _):  # no --prefs-out: nothing is written anywhere
        refused = httpx.post(f"{url}/v1/preferences", json={"prompt": "d", "chosen": "a", "rejected": "b"})
        assert refused.status_code == 400 and "--prefs-out FILE" in refused.json()["error"]["message"]


def test_build_finetuned_policy_samples_with_the_adapter_on_and_base_with_it_off(tiny_model_dir, dialogsum_like,
                                                                                 tmp_path):
    """Each policy's rejected text is exactly what that model writes from its prompt with its per-item seed."""
    import lmlab
    from lmlab.adapt.lora import lora_disabled
    from lmlab.generation import GenerationConfig
    from lmlab.prompting import build_prompt
    from lmlab.tasks.summarize.experiments import INSTRUCTION, clean_summary, example_seed
    from lmlab.tasks.summarize.lab import _generate
    from test_reward import _tiny_adapter

    data, records = dialogsum_like
    adapter = _tiny_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "p.jsonl"
    build_preferences(_settings(tiny_model_dir, data, out, records="0:3", policies=["base", "finetuned"],
                                adapter=str(adapter), rouge_threshold=1.0, temperature=0.05),
                      echo=lambda s: None, progress=False)
    log = {(i["id"], i["policy"]): i for i in map(json.loads, log_path(out).read_text().splitlines()[1:])}
    assert len(log) == 6
    model = lmlab.load_model(tiny_model_dir, adapter=adapter)
    tokenizer = lmlab.load_tokenizer(tiny_model_dir)
    budget = model.config.max_seq_len - 6
    for record in records[:3]:
        prompt = build_prompt(record.dialogue, [], template="instruction", tokenizer=tokenizer, chat=False,
                              instruction=INSTRUCTION, max_prompt_tokens=budget).text  # no recipe saved: the lab's
        for policy in ("base", "finetuned"):
            # T=0.05: near-greedy, so adapter on and off write different texts from the same seed (at T=1 the
            # tiny random model's flat distributions make the same draws whatever the adapter does)
            config = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.05, stop_strings=["\n\n"],
                                      seed=[example_seed(0, f"{record.id}/{policy}")])
            with lora_disabled(model):
                off = clean_summary(_generate(model, tokenizer, [prompt], config)[0][0])
            on = clean_summary(_generate(model, tokenizer, [prompt], config)[0][0])
            assert on != off
            assert log[(record.id, policy)]["output"] == (off if policy == "base" else on)
