"""`lmlab inspect` and the Inspection: the JSON contract for the three variants, the figures, the page data,
the recorded greedy steps, and one-line errors that name the bad value."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from serving import tiny_tokenizer
from lmlab.checkpoints import save_model
from lmlab.cli import main
from lmlab.config import ModelConfig
from lmlab.inspect import filter_distribution, inspect_model
from lmlab.inspect.html import page_data
from lmlab.model import Transformer

TEXT = "#Person1#: Did you book the train tickets for Saturday?"


def _save(tmp_path, preset, **overrides):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = ModelConfig.from_name(preset, vocab_size=tok.vocab_size, pad_token_id=0, eos_token_id=1, **overrides)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # large weights: sharp attention and a peaked next-token distribution
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.5 / p.shape[-1] ** 0.5)
    path = tmp_path / preset
    save_model(model, path, tok)
    return path


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("inspect"), "tiny-decoder", max_seq_len=64)


@pytest.fixture(scope="module")
def encdec_dir(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("inspect"), "tiny-encoder-decoder", decoder_start_token_id=0)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_decoder_json_png_html(decoder_dir, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert main(["inspect", str(decoder_dir), "--text", TEXT, "--top-k", "5", "--json", str(out),
                 "--png", str(tmp_path / "png"), "--html", str(tmp_path / "page.html"), "--steps", "2"]) == 0
    j = json.loads(out.read_text())
    T = len(j["ids"])
    assert len(j["tokens"]) == T and T > 5
    att = torch.tensor(j["attentions"])  # [layer][head][query][key]
    assert att.shape == (2, 4, T, T)
    assert torch.allclose(att.sum(-1), torch.ones(2, 4, T), atol=5e-4 * T)  # rows are distributions (rounded)
    assert torch.all(att.triu(1) == 0)  # causal
    probs = [t["prob"] for t in j["next_token"]]
    assert probs == sorted(probs, reverse=True) and len(probs) == 50
    assert [t["kept"] for t in j["next_token"]] == [True] * 5 + [False] * 45
    assert j["sampling"]["kept_count"] == 5 and j["sampling"]["top_k"] == 5
    assert len(j["residual_norms"]["decoder"]) == 3 and len(j["ffn_near_zero"]["decoder"]) == 2
    assert j["positions"]["kind"] == "rope" and len(j["positions"]["rope_inv_freq"]) == 8
    assert len(j["embeddings"]["neighbours"]) == T and len(j["embeddings"]["pca"]) == T
    assert len(j["logit_lens"]["tokens"]) == 2 and len(j["logit_lens"]["tokens"][0][0]) == 5
    assert len(j["steps"]) == 2 and all("rows" in s for s in j["steps"])
    assert {p.name for p in (tmp_path / "png").iterdir()} == {
        "attention.png", "embeddings.png", "positions.png", "logit_lens.png", "sampling.png"}
    html = (tmp_path / "page.html").read_text()
    assert "/*INSPECT_" not in html and "src=" not in html and "href=" not in html  # filled in, self-contained
    assert "sharpest head" in capsys.readouterr().out


def test_cli_encoder_decoder_uses_three_attention_kinds(encdec_dir, tmp_path):
    out = tmp_path / "out.json"
    assert main(["inspect", str(encdec_dir), "--text", TEXT, "--target", "Person1 booked",
                 "--json", str(out), "--png", str(tmp_path / "png")]) == 0
    j = json.loads(out.read_text())
    assert "attentions" not in j
    T, U = len(j["ids"]), len(j["target_ids"])
    assert j["target_ids"][0] == 0 and U >= 3  # the decoder start token, then the target's tokens
    assert torch.tensor(j["encoder_attentions"]).shape == (2, 4, T, T)
    assert torch.tensor(j["decoder_attentions"]).shape == (2, 4, U, U)
    assert torch.tensor(j["cross_attentions"]).shape == (2, 4, U, T)
    assert j["positions"]["kind"] == "t5_relative"
    assert torch.tensor(j["positions"]["encoder_bias"]).shape == (4, 32)
    assert "cross_attention.png" in {p.name for p in (tmp_path / "png").iterdir()}


def test_encoder_with_mlm_head_predicts_at_the_mask():
    cfg = ModelConfig.from_name("tiny-encoder", vocab_size=400)
    model = Transformer(cfg).eval()

    class Tok:
        special_ids, mask_token_id, name_or_path = {3}, 3, "ids"

        def encode(self, text, add_special_tokens=False):
            return [int(t) for t in text.split()]

        def id_to_token(self, i):
            return f"t{i}"

    insp = inspect_model(model, Tok(), "10 11 3 12 13")
    assert insp.output["position"] == 2 and insp.steps == [] and insp.special == [False, False, True, False, False]
    assert insp.positions["kind"] == "learned" and insp.positions["learned_similarity"].shape == (64, 64)


@torch.no_grad()
def test_steps_append_the_greedy_token_and_earlier_rows_stay(decoder_dir):
    """The page grows the attention matrix by the steps' rows: that is exact because a causal row never
    changes when tokens are appended -- checked against a full re-run on the longer text."""
    import lmlab

    model, tok = lmlab.load_model(decoder_dir), lmlab.load_tokenizer(decoder_dir)
    insp = inspect_model(model, tok, TEXT, steps=2)
    ids = insp.ids + [s["id"] for s in insp.steps]
    assert insp.steps[0]["id"] == int(insp.output["logits"].argmax())

    class Ids:
        special_ids, mask_token_id, name_or_path = set(), None, "ids"

        def encode(self, text, add_special_tokens=False):
            return ids

        def id_to_token(self, i):
            return str(i)

    full = inspect_model(model, Ids(), "x")
    T = len(insp.ids)
    assert torch.allclose(full.attentions["decoder"][:, :, :T, :T], insp.attentions["decoder"], atol=1e-6)
    for n, step in enumerate(insp.steps):
        assert torch.allclose(step["rows"]["decoder"], full.attentions["decoder"][:, :, T + n, :T + n + 1], atol=1e-6)
    assert torch.allclose(insp.steps[1]["logits"], model(torch.tensor([ids]))[0, -1], atol=1e-4)


def test_sampling_filter_is_the_generation_chain():
    from lmlab.generation import GenerationConfig
    from lmlab.generation.processors import build_processors

    logits = torch.randn(300) * 3
    for s in (dict(top_k=7), dict(top_p=0.6, temperature=0.7), dict(min_p=0.1, temperature=1.3)):
        chain = build_processors(GenerationConfig(do_sample=True, **s))
        expected = torch.isfinite(chain(torch.tensor([[1, 2]]), logits[None]))[0]
        assert torch.equal(filter_distribution(logits, [1, 2], **s)[1], expected)


def test_page_data_switches_to_top_keys_for_long_texts():
    w = torch.rand(2, 3, 40, 40).softmax(-1)
    from lmlab.inspect.html import _attention_block

    dense = _attention_block(w, max_bytes=10**6, row_top=8)
    assert dense["format"] == "dense" and len(base64.b64decode(dense["data"])) == w.numel()
    top = _attention_block(w, max_bytes=1000, row_top=8)
    assert top["format"] == "top" and len(base64.b64decode(top["data"])) == 2 * 3 * 40 * 8
    idx = torch.frombuffer(bytearray(base64.b64decode(top["index"])), dtype=torch.int16).view(2, 3, 40, 8)
    assert torch.equal(idx.long(), torch.topk(w, 8, dim=-1).indices)


def test_page_data_carries_full_logits_and_steps(decoder_dir):
    import lmlab

    model, tok = lmlab.load_model(decoder_dir), lmlab.load_tokenizer(decoder_dir)
    insp = inspect_model(model, tok, TEXT, steps=1)
    data = page_data(insp)
    logits = torch.frombuffer(bytearray(base64.b64decode(data["output"]["logits"])), dtype=torch.float32)
    assert torch.equal(logits, insp.output["logits"])
    assert data["steps"][0]["id"] == insp.steps[0]["id"] and "attentions" not in data
    assert json.dumps(data)  # plain JSON


@pytest.mark.parametrize("flags, named", [
    (["--layers", "0,7"], "layer 7 is out of range: this model has 2 layers (0-1)"),
    (["--head", "4"], "head 4 is out of range: this model has 4 heads (0-3)"),
    (["--layer", "-1"], "layer -1 is out of range"),
    (["--target", "hello"], "target='hello'"),
    (["--top-p", "0"], "top_p=0.0"),
])
def test_bad_input_is_one_line_naming_the_value(decoder_dir, flags, named, capsys):
    assert main(["inspect", str(decoder_dir), "--text", TEXT, *flags]) == 2
    assert named in one_line_error(capsys)


def test_text_longer_than_the_window(decoder_dir, capsys):
    assert main(["inspect", str(decoder_dir), "--text", "Saturday " * 80]) == 2
    assert "longer than the model's window of 64 tokens" in one_line_error(capsys)


@pytest.mark.parametrize("model, named", [("no-such-model", "'no-such-model'"),
                                          ("random:no-such-preset", "'no-such-preset'")])
def test_unknown_model(model, named, capsys):
    assert main(["inspect", model, "--text", "hi"]) == 2
    assert named in one_line_error(capsys)


DIALOGUE = ("#Person1#: Did you book the train tickets for Saturday?\n"
            "#Person2#: Yes, two seats at nine in the morning, near the window.\n"
            "#Person1#: Great, I will bring the sandwiches.")


def test_turn_attention_finds_the_turn_a_copied_summary_repeats(smollm2_path):
    """A summary that repeats a turn word for word: SmolLM2's copying (induction) heads attend to that turn. (Averaged
    over all 30 layers the signal is modest: the long turn 2 collects the most attention in total, so turn 1's copy
    shows in the per-token share.)"""
    import lmlab
    from lmlab.inspect.turns import turn_attention

    model, tok = lmlab.load_model("smollm2-135m-instruct"), lmlab.load_tokenizer("smollm2-135m-instruct")
    prompt = "Summarize the dialogue.\n" + DIALOGUE + "\nSummary:"
    copied = turn_attention(model, tok, prompt, " Person2 says: two seats at nine in the morning, near the window.",
                            DIALOGUE)
    assert copied["turns"] == DIALOGUE.split("\n")
    assert abs(sum(copied["share"]) - 1) < 1e-6 and 0 < sum(copied["mass"]) < 1
    assert max(range(3), key=lambda i: copied["share"][i]) == 1
    first = turn_attention(model, tok, prompt, " Did you book the train tickets for Saturday?", DIALOGUE)
    assert max(range(3), key=lambda i: first["per_token_share"][i]) == 0
    assert max(range(3), key=lambda i: copied["per_token_share"][i]) == 1


def test_summarize_turns_with_the_shipped_summarizer(smollm2_path):
    from lmlab.inspect.turns import summarize_turns

    out = summarize_turns("smollm2-135m-instruct", DIALOGUE, max_new_tokens=24)
    assert out["summary"] and out["summary_tokens"] > 0 and out["adapter"].endswith("dialogsum-lora")
    assert len(out["share"]) == 3 and abs(sum(out["share"]) - 1) < 1e-6


def test_summarize_needs_a_shipped_summarizer(decoder_dir, capsys):
    assert main(["inspect", str(decoder_dir), "--text", DIALOGUE, "--summarize"]) == 2
    assert str(decoder_dir) in one_line_error(capsys)


def test_inspect_request_for_a_route(decoder_dir):
    import lmlab
    from lmlab.errors import DataError
    from lmlab.inspect import inspect_request

    model, tok = lmlab.load_model(decoder_dir), lmlab.load_tokenizer(decoder_dir)
    j = inspect_request(model, tok, {"text": TEXT, "top_k": 3})
    assert j["sampling"]["kept_count"] == 3 and len(j["attentions"]) == 2
    page = inspect_request(model, tok, {"text": TEXT, "format": "page", "steps": 2, "layers": [1]})
    assert len(page["steps"]) == 2 and page["attention"]["decoder"]["shape"][0] == 1 and "attentions" not in page
    for body, named in (({"text": TEXT, "steps": 99}, "steps=99"), ({"text": TEXT, "format": "xml"}, "format='xml'"),
                        ({"text": TEXT, "top_kk": 3}, "top_kk"), ({"text": ""}, "text=''"),
                        ({"text": TEXT, "layers": [5]}, "layer 5")):
        with pytest.raises(DataError, match=named):
            inspect_request(model, tok, body)
