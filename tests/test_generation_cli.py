"""`lmlab generate` and `lmlab summarize`: flags map to the library, bad input exits 2 with the value named."""

import json

import pytest

from lmlab.cli import main

DIALOGUE = ("#Person1#: Are you coming to the party on Friday?\n#Person2#: I can't, I have to work late.\n"
            "#Person1#: That's a pity. Maybe next time.")


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    import lmlab

    return lmlab.load_model("smollm2-135m-instruct"), lmlab.load_tokenizer("smollm2-135m-instruct")


@pytest.fixture()
def shots_file(tmp_path):
    rows = [{"fname": "a", "dialogue": "#Person1#: Can I book a table for two tonight?\n#Person2#: Sure, at 7 pm?",
             "summary": "#Person1# books a table for two at 7 pm."},
            {"fname": "b", "dialogue": "#Person1#: My laptop will not start.\n#Person2#: Did you charge it?",
             "summary": "#Person1#'s laptop is not charged."}]
    path = tmp_path / "shots.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("argv,match", [
    (["generate", "smollm2-135m-instruct", "hi", "--top-p", "2"], "top_p=2.0"),
    (["generate", "smollm2-135m-instruct", "hi", "--temperature", "-1"], "temperature=-1.0"),
    (["generate", "smollm2-135m-instruct", "hi", "--do-sample", "--num-beams", "2"], "num_beams=2"),
    (["generate", "smollm2-135m-instruct", "hi", "--system", "be brief"], "--system needs --chat"),
    (["summarize", DIALOGUE, "--shots", "2"], "--shots 2 needs --shots-from"),
])
def test_bad_flags_exit_2_naming_the_value(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("native", ["0", "1"])
def test_generate_streams_the_same_text_as_the_library(native, smollm2_path, monkeypatch, capsys):
    """On both classes of machine (LMLAB_NATIVE_BF16 plays the hardware probe), ``--precision auto`` and the
    library's ``apply_precision(model, "auto")`` take the one decision, so they print the same text."""
    import torch

    import lmlab
    from lmlab.generation import generate
    from lmlab.precision import apply_precision
    from lmlab.prompting import chat_prompt

    monkeypatch.setenv("LMLAB_NATIVE_BF16", native)
    model, tok = lmlab.load_model("smollm2-135m-instruct"), lmlab.load_tokenizer("smollm2-135m-instruct")
    line = apply_precision(model, "auto")  # a fresh model: the module's fixture stays fp32
    assert line.startswith("bf16" if native == "1" else "fp32")
    assert model.dtype is (torch.bfloat16 if native == "1" else torch.float32)
    # the precision must show in the text, or a CLI that ignored it would pass: take the first question whose
    # text differs between fp32 and bf16 on this CPU (which one does depends on the CPU's summation order)
    other = lmlab.load_model("smollm2-135m-instruct")
    apply_precision(other, "fp32" if native == "1" else "bf16")
    # (on some CPUs the two agree for 24 tokens on the first questions: more questions, 48 tokens)
    for question in ("What is the capital of France?", "Name three colours of the rainbow.",
                     "Write one sentence about the sea.", "Why is the sky blue?",
                     "Describe a busy train station in the morning.", "Give two tips for learning to cook.",
                     "What do bees do in winter?", "Tell me a short story about a lost key."):
        prompt = chat_prompt(tok, question, "Answer briefly.")
        expected = generate(model, tok, prompt, max_new_tokens=48)
        if expected != generate(other, tok, prompt, max_new_tokens=48):
            break
    else:
        pytest.fail("fp32 and bf16 give the same 48 tokens for every question: the test cannot tell them apart")
    assert main(["generate", "smollm2-135m-instruct", question, "--chat", "--system", "Answer briefly.",
                 "--max-new-tokens", "48"]) == 0
    out, err = capsys.readouterr()
    assert f"precision: {line}\n" in err
    assert out == expected + "\n" and out.strip()


def test_generate_sampling_flags_change_the_text(smollm2, monkeypatch, capsys):
    """Each sampling flag must reach the sampler: a test that only compared two runs with the same seed would
    pass if the flags were ignored (greedy twice is also the same text twice)."""
    import lmlab

    model, tok = smollm2
    monkeypatch.setattr(lmlab, "load_model", lambda source, **options: model)  # load once, not once per command
    monkeypatch.setattr(lmlab, "load_tokenizer", lambda source: tok)

    def run(*flags: str) -> str:
        assert main(["generate", "smollm2-135m-instruct", "Once upon a time", "--max-new-tokens", "12", *flags]) == 0
        return capsys.readouterr().out

    greedy = run()
    hot = {seed: run("--do-sample", "--temperature", "1.5", "--seed", str(seed)) for seed in (1, 2, 3)}
    assert run("--do-sample", "--temperature", "1.5", "--seed", "1") == hot[1]  # same seed, same text
    assert len(set(hot.values())) == 3 and greedy not in hot.values()  # --do-sample and --seed change it
    # each filter, at its extreme, leaves only the most likely token, so the same seed now gives the greedy text
    for flag, value in (("--top-k", "1"), ("--top-p", "0.001"), ("--min-p", "1.0")):
        assert run("--do-sample", "--temperature", "1.5", "--seed", "1", flag, value) == greedy, flag
    assert run("--do-sample", "--temperature", "0.001", "--seed", "1") == greedy  # temperature reaches the sampler


def test_summarize_one_shot_prints_the_summary(smollm2, shots_file, capsys):
    from lmlab.generation import GenerationConfig
    from lmlab.prompting import Example, summarize

    model, tok = smollm2
    assert main(["summarize", DIALOGUE, "--shots", "1", "--shots-from", str(shots_file), "--max-new-tokens", "24",
                 "--show-prompt"]) == 0
    out = capsys.readouterr()
    pool = [Example("#Person1#: Can I book a table for two tonight?\n#Person2#: Sure, at 7 pm?",
                    "#Person1# books a table for two at 7 pm."),
            Example("#Person1#: My laptop will not start.\n#Person2#: Did you charge it?",
                    "#Person1#'s laptop is not charged.")]
    expected, prompt = summarize(DIALOGUE, model, tok, pool, 1, config=GenerationConfig(max_new_tokens=24))
    assert out.out == expected + "\n" and expected
    assert "<|im_start|>assistant" in out.err and "1 shots" in out.err  # chat template on by default
    assert prompt.shots[0].output in out.err


def test_summarize_reads_file_without_chat_and_too_many_shots_is_an_error(smollm2, shots_file, tmp_path, capsys):
    f = tmp_path / "d.txt"
    f.write_text(DIALOGUE)
    assert main(["summarize", "--file", str(f), "--no-chat", "--template", "instruction", "--max-new-tokens", "24",
                 "--show-prompt"]) == 0
    out = capsys.readouterr()
    assert f"Summarize the following conversation.\n\n{DIALOGUE}\n\nSummary:" in out.err
    assert "<|im_start|>" not in out.err and out.out.strip() and "\n\n" not in out.out  # stopped at a blank line
    assert main(["summarize", "--file", str(f), "--shots", "5", "--shots-from", str(shots_file)]) == 2
    assert "k=5" in capsys.readouterr().err
