"""A recipe that decodes by minimum Bayes risk (Recipe.mbr): the shipped adapter's default decoding, applied
by the lab's `finetuned` experiment, `lmlab summarize` and `/v1/summarize`, with a one-summary opt-out in each."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from lmlab.adapt.recipe import RECIPE_FILE, Recipe, shipped_adapter
from lmlab.align.mbr import MBRScorer
from lmlab.cli import main
from lmlab.errors import ConfigError
from lmlab.tasks.summarize.data import load_sample
from lmlab.tasks.summarize.experiments import EXPERIMENTS, INSTRUCTION, spec_hash
from lmlab.tasks.summarize.lab import LabSettings, run_lab
from serving import running_server, tiny_model, tiny_tokenizer

QUIET = {"echo": lambda text: None, "progress": False}
MBR = {"n": 3, "temperature": 0.9}


def recipe(**mbr) -> Recipe:
    return Recipe(template="instruction", instruction=INSTRUCTION, chat=False, prompt_field="dialogue",
                  response_field="summary", mbr=mbr)


# --- the recipe ----------------------------------------------------------------------------------
def test_mbr_round_trip_and_its_sampling_settings(tmp_path):
    recipe(**MBR).save(tmp_path)
    loaded = Recipe.load(tmp_path)
    assert loaded.mbr == MBR and loaded.mbr_samples == 3
    assert loaded.mbr_sampling == {"do_sample": True, "temperature": 0.9}
    assert recipe().mbr_samples == 1  # no mbr: one summary


def test_the_shipped_recipe_decodes_by_mbr_over_8_samples():
    path = shipped_adapter("smollm2-135m-instruct")
    if path is None:
        pytest.skip("the shipped adapter is not installed")
    assert Recipe.load(path).mbr == {"n": 8, "temperature": 0.7}  # measured: +2.47 ROUGE-1 on dev 400-499


@pytest.mark.parametrize("mbr, message", [
    ({"n": 1}, r"mbr.n=1 must be an integer >= 2"),
    ({"n": "8"}, r"mbr.n='8' must be an integer >= 2"),
    ({"temperature": 0.7}, r"mbr.n=None must be an integer >= 2"),
    ({"n": 4, "num_beams": 2}, r"mbr: num_beams are not MBR settings; valid: n, temperature"),
    ({"n": 4, "temperature": -1}, r"mbr: temperature=-1"),
    ([8], r"mbr=\[8\] must be a mapping"),
])
def test_bad_mbr_settings_name_the_bad_value(tmp_path, mbr, message):
    recipe().save(tmp_path)
    data = {**json.loads((tmp_path / RECIPE_FILE).read_text()), "mbr": mbr}
    (tmp_path / RECIPE_FILE).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        Recipe.load(tmp_path)


# --- the lab -------------------------------------------------------------------------------------
@pytest.fixture
def mbr_model(tiny_model_dir, tmp_path):
    """The tiny model as a fully fine-tuned model whose recipe decodes by MBR over 3 samples."""
    path = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, path)
    recipe(**MBR).save(path)
    return path


def lab_rows(model, out, **kw) -> dict[str, list[dict]]:
    run_lab(LabSettings(model=str(model), experiments="finetuned,finetuned-greedy", limit=2, batch_size=2,
                        max_new_tokens=6, precision="fp32", out=out, examples=0, turns=False, device="cpu", **kw),
            **QUIET)
    rows: dict[str, list[dict]] = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["experiment"], []).append(row)
    return rows


def test_lab_finetuned_decodes_by_the_recipes_mbr_and_finetuned_greedy_does_not(mbr_model, tmp_path):
    rows = lab_rows(mbr_model, tmp_path / "lab")
    for row in rows["finetuned"]:
        candidates = row["candidates"]
        assert len(candidates) == 3 and row["generation"]["do_sample"] and row["generation"]["temperature"] == 0.9
        texts = [c["summary"] for c in candidates]
        expected = MBRScorer().score_candidates("", texts)
        assert [c["mbr"] for c in candidates] == pytest.approx(expected)
        best = max(range(3), key=lambda k: (expected[k], -k))
        assert row["summary"] == texts[best]
    for row in rows["finetuned-greedy"]:
        assert "candidates" not in row and not row["generation"]["do_sample"]
    # --num-beams & co. choose the decoding: `finetuned` is then one summary too
    beams = lab_rows(mbr_model, tmp_path / "beams", decoding={"num_beams": 2})
    assert all("candidates" not in r for r in beams["finetuned"])


def test_lab_rows_of_the_mbr_and_the_greedy_decoding_are_never_mixed():
    e = EXPERIMENTS["finetuned"]
    mbr = e.__class__(**{**e.__dict__, "generation": recipe(**MBR).mbr_sampling, "best_of": 3, "select": "mbr"})
    assert spec_hash(mbr, "ad") != spec_hash(e, "ad")
    assert spec_hash(EXPERIMENTS["finetuned-greedy"], "ad") != spec_hash(e, "ad")


# --- lmlab summarize -----------------------------------------------------------------------------
DIALOGUE = "#Person1#: Hi, how are you?\n#Person2#: Fine, thanks. And you?\n#Person1#: Tired."


@pytest.mark.parametrize("flags, samples", [
    ([], 3),                                   # the recipe's decoding
    (["--best-of", "2"], 2),                   # N samples, the recipe's sampling and MBR
    (["--best-of", "1"], 0),                   # one summary, greedy
    (["--greedy"], 0),
    (["--do-sample", "--temperature", "0.5"], 0),  # one sample, as asked
])
def test_summarize_decodes_by_the_recipes_mbr_unless_told_otherwise(mbr_model, capsys, flags, samples):
    assert main(["summarize", DIALOGUE, "--model", str(mbr_model), "--max-new-tokens", "5"] + flags) == 0
    err = capsys.readouterr().err
    candidates = [line for line in err.splitlines() if line[:1] in "* " and " mbr " in line]
    assert len(candidates) == samples
    assert ("minimum Bayes risk over" in err) == (samples > 0)
    if samples:
        assert sum(line.startswith("*") for line in candidates) == 1


def test_summarize_mbr_errors_stay_one_line(mbr_model, capsys):
    assert main(["summarize", DIALOGUE, "--model", str(mbr_model), "--best-of", "2", "--greedy"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--best-of 2 needs --do-sample" in err and len(err.splitlines()) == 1


# --- /v1/summarize -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mbr_server():
    tok = tiny_tokenizer()
    model = tiny_model(tok.vocab_size, max_seq_len=2048)
    with running_server(lambda: (model, tok), finetuned=recipe(**MBR)) as (url, _):
        yield url


def shared_prefills(url: str) -> int:
    metrics = httpx.get(f"{url}/metrics").text
    return int(next(line.split()[1] for line in metrics.splitlines() if line.startswith("lmlab_shared_prefills_total")))


def post(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/summarize", json={"dialogue": load_sample().records[3].dialogue,
                                                    "max_tokens": 6, **body}, timeout=120)


def test_serve_summarize_defaults_to_the_recipes_mbr(mbr_server):
    listing = httpx.get(f"{mbr_server}/v1/summarize/dialogues").json()
    assert listing["finetuned_mbr"] == MBR
    shared = shared_prefills(mbr_server)
    r = post(mbr_server).json()
    assert shared_prefills(mbr_server) == shared + 2  # queued at once, the 3 samples share one prefill
    assert r["best_of"] == 3 and len(r["candidates"]) == 3
    texts = [c["summary"] for c in r["candidates"]]
    scores = MBRScorer().score_candidates("", texts)
    assert [c["mbr"] for c in r["candidates"]] == pytest.approx(scores, abs=1e-6)
    assert r["summary"] == texts[max(range(3), key=lambda k: (scores[k], -k))]
    assert r["usage"]["completion_tokens"] >= 3  # every sample's tokens count
    assert post(mbr_server).json() == r  # seeded: the same candidates again


@pytest.mark.parametrize("body, best_of", [({"best_of": 1}, 1), ({"temperature": 0}, 1),
                                           ({"temperature": 0.8}, 1), ({"best_of": 2}, 2),
                                           ({"recipe": "zero-shot"}, 1),
                                           ({"recipe": "zero-shot", "best_of": 2, "temperature": 1.0}, 2)])
def test_serve_summarize_best_of(mbr_server, body, best_of):
    r = post(mbr_server, **body)
    assert r.status_code == 200 and r.json()["best_of"] == best_of
    assert len(r.json().get("candidates", [])) == (best_of if best_of > 1 else 0)


@pytest.mark.parametrize("body, param", [({"best_of": 2, "temperature": 0}, "temperature"),
                                         ({"best_of": 0}, "best_of"), ({"best_of": 17}, "best_of"),
                                         ({"best_of": "8"}, "best_of")])
def test_serve_summarize_bad_best_of_is_a_400_naming_it(mbr_server, body, param):
    r = post(mbr_server, **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_serve_summarize_mbr_streams_the_pick_once_every_sample_ended(mbr_server):
    body = {"dialogue": load_sample().records[3].dialogue, "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{mbr_server}/v1/summarize", json=body, timeout=120) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line and line != "data: [DONE]"]
    deltas = [e for e in events if "delta" in e]
    final = events[-1]
    assert len(deltas) == 1 and deltas[0]["delta"] == final["summary"] and final["best_of"] == 3
    assert final == post(mbr_server).json() | {"usage": final["usage"]}


# --- lmlab summarize --data: a whole file, as the lab summarizes it -------------------------------
@pytest.fixture
def dialogues_file(tmp_path):
    path = tmp_path / "dialogues.jsonl"
    path.write_text("".join(json.dumps({"fname": d.id, "dialogue": d.dialogue, "summary": d.references[0]}) + "\n"
                            for d in load_sample().records[:7]))
    return path


def test_summarize_data_writes_the_labs_summaries_and_resumes(mbr_model, dialogues_file, tmp_path, capsys):
    out = tmp_path / "labels.jsonl"
    argv = ["summarize", "--model", str(mbr_model), "--data", str(dialogues_file), "--records", "4:7",
            "--out", str(out), "--max-new-tokens", "6", "--batch-size", "2", "--precision", "fp32"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["fname"] for r in rows) == [d.id for d in load_sample().records[4:7]]
    assert all(len(r["candidates"]) == 3 and r["settings"]["best_of"] == 3 for r in rows)
    # the lab's `finetuned` rows of the same dialogues, same seeds: the same summaries
    run_lab(LabSettings(model=str(mbr_model), data=str(dialogues_file), pool_size=4, experiments="finetuned",
                        batch_size=3, max_new_tokens=6, precision="fp32", out=tmp_path / "lab", examples=0,
                        turns=False, device="cpu"), **QUIET)
    lab = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "lab" / "results.jsonl").read_text().splitlines()}
    assert {r["fname"]: r["summary"] for r in rows} == {i: r["summary"] for i, r in lab.items()}
    # resumed: nothing new; a torn last line is redone; other settings are refused in one line
    capsys.readouterr()
    assert main(argv) == 0 and "0 summaries written" in capsys.readouterr().err
    text = out.read_text()
    out.write_text(text[:-20])
    assert main(argv) == 0 and "1 summaries written" in capsys.readouterr().err
    assert out.read_text() == text
    assert main(argv + ["--best-of", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds summaries written with other settings" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--data", "x.jsonl"], "--data FILE and --out OUT.jsonl go together"),
    (["--out", "o.jsonl"], "--data FILE and --out OUT.jsonl go together"),
    (["--data", "{data}", "--out", "o.jsonl", "--shots", "2"], "drop --shots"),
    (["--data", "{data}", "--out", "o.jsonl", "--records", "x"], "--records 'x' must be START:STOP"),
    (["--data", "{data}", "--out", "o.jsonl", "--records", "50:60"], "selects no dialogue"),
])
def test_summarize_data_bad_flags_are_one_line_errors(mbr_model, dialogues_file, tmp_path, capsys, flags, message):
    flags = [f.replace("{data}", str(dialogues_file)) for f in flags]
    assert main(["summarize", "--model", str(mbr_model)] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# --- lmlab lab --best-of N / --temperature T ------------------------------------------------------
@pytest.fixture
def plain_model(tiny_model_dir, tmp_path):
    """The tiny model as a fully fine-tuned model whose recipe has no mbr (one greedy summary)."""
    path = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, path)
    recipe().save(path)
    return path


def test_lab_best_of_asks_for_mbr_or_one_summary(plain_model, mbr_model, tmp_path):
    rows = lab_rows(plain_model, tmp_path / "a", best_of=3)["finetuned"]
    assert all(len(r["candidates"]) == 3 and r["generation"]["temperature"] == 0.7 for r in rows)
    rows = lab_rows(plain_model, tmp_path / "b", best_of=2, temperature=0.5)["finetuned"]
    assert all(len(r["candidates"]) == 2 and r["generation"]["temperature"] == 0.5 for r in rows)
    rows = lab_rows(mbr_model, tmp_path / "c", best_of=1)["finetuned"]  # the recipe's MBR, turned off
    assert all("candidates" not in r and not r["generation"]["do_sample"] for r in rows)
    rows = lab_rows(mbr_model, tmp_path / "d", best_of=2)["finetuned"]  # the recipe's temperature, 2 samples
    assert all(len(r["candidates"]) == 2 and r["generation"]["temperature"] == 0.9 for r in rows)


@pytest.mark.parametrize("flags, message", [
    (["--best-of", "0"], "--best-of 0 must be an integer >= 1"),
    (["--best-of", "2", "--num-beams", "2"], "--num-beams & co. decode one: choose one"),
    (["--best-of", "1", "--temperature", "0.5"], "--best-of 1 writes one greedy summary"),
    (["--best-of", "2", "--temperature", "0"], "--temperature 0.0 must be > 0"),
    (["--temperature", "0.5"], "none of these experiments samples: add --best-of N"),
])
def test_lab_bad_best_of_is_a_one_line_error(plain_model, tmp_path, capsys, flags, message):
    rc = main(["lab", "--model", str(plain_model), "--experiments", "finetuned", "--limit", "1",
               "--max-new-tokens", "3", "--no-turns", "--out", str(tmp_path / "o")] + flags)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err
