"""Prompt building: exact template texts, chat wrapping, shot selection, and the token budget."""

import pytest
import torch

from lmlab.errors import ConfigError, DataError
from lmlab.prompting import TRUNCATION_MARKER, Example, _middle_cut, build_prompt, select_shots
from parity import fp32_bound

DIALOGUE = "#Person1#: Hi, Tom.\n#Person2#: Hello, Ann."


class WordTokenizer:
    """Counts whitespace-separated words as tokens; a toy chat template with <user>/<assistant> turns."""

    chat_template = "toy"

    def encode(self, text, add_special_tokens=False):
        return list(range(len(text.split())))

    def apply_chat_template(self, messages, add_generation_prompt=True):
        out = "".join(f"<{m['role']}>\n{m['content']}\n</{m['role']}>\n" for m in messages)
        return out + ("<assistant>\n" if add_generation_prompt else "")


class StubEmbedder:
    """Embeds a text as the unit vector of its counts of the letters a, b, c (similarity is then easy to predict)."""

    def embed(self, texts):
        v = torch.tensor([[t.count("a"), t.count("b"), t.count("c")] for t in texts], dtype=torch.float) + 1e-6
        return torch.nn.functional.normalize(v, dim=-1)


SHOTS = [Example("d1", "s1"), Example("d2", "s2")]


# --- templates: exact text -----------------------------------------------------------------------
def test_bare_template():
    assert build_prompt(DIALOGUE, template="bare").text == DIALOGUE
    assert build_prompt("q", SHOTS, template="bare").text == "d1\ns1\n\n\nd2\ns2\n\n\nq"


def test_instruction_template():
    p = build_prompt(DIALOGUE)
    assert p.text == f"Summarize the following conversation.\n\n{DIALOGUE}\n\nSummary:"
    assert build_prompt("q", SHOTS).text == (
        "Summarize the following conversation.\n\nd1\n\nSummary: s1\n\n\nd2\n\nSummary: s2\n\n\nq\n\nSummary:")
    assert build_prompt("q", instruction="Briefly summarize.").text == "Briefly summarize.\n\nq\n\nSummary:"
    assert p.shots == [] and p.dropped_shots == [] and not p.truncated_query and p.notes == [] and p.n_tokens is None


def test_flan_template():
    assert build_prompt(DIALOGUE, template="flan").text == f"Dialogue:\n\n{DIALOGUE}\n\nWhat was going on?\n"
    assert build_prompt("q", SHOTS[:1], template="flan").text == (
        "Dialogue:\n\nd1\n\nWhat was going on?\ns1\n\n\nDialogue:\n\nq\n\nWhat was going on?\n")


def test_chat_variant_uses_turns_per_shot():
    p = build_prompt("q", SHOTS[:1], template="instruction", tokenizer=WordTokenizer(), chat=True, system="Be brief.")
    assert p.text == ("<system>\nBe brief.\n</system>\n"
                      "<user>\nSummarize the following conversation.\n\nd1\n</user>\n<assistant>\ns1\n</assistant>\n"
                      "<user>\nSummarize the following conversation.\n\nq\n</user>\n<assistant>\n")
    assert p.n_tokens == len(p.text.split())
    flan = build_prompt("q", template="flan", tokenizer=WordTokenizer(), chat=True).text
    assert flan == "<user>\nDialogue:\n\nq\n\nWhat was going on?\n</user>\n<assistant>\n"


def test_chat_needs_a_chat_template_and_unknown_template_is_named():
    with pytest.raises(ConfigError, match="chat_template"):
        build_prompt("q", chat=True)
    with pytest.raises(ConfigError, match="template='haiku'"):
        build_prompt("q", template="haiku")


def test_chat_with_the_real_smollm2_template(smollm2_path):
    import lmlab

    tok = lmlab.load_tokenizer("smollm2-135m-instruct")
    p = build_prompt("q?", SHOTS[:1], tokenizer=tok, chat=True)
    assert p.text.count("<|im_start|>user") == 2 and p.text.count("<|im_start|>assistant") == 2
    assert p.text.endswith("<|im_start|>assistant\n") and "s1<|im_end|>" in p.text
    assert p.n_tokens == len(tok.encode(p.text))


# --- shot selection ---------------------------------------------------------------------------------
POOL = [Example(f"dialogue {i}", f"summary {i}") for i in range(10)]


def test_select_by_indices():
    assert select_shots("x", POOL, 3, method="indices", indices=[4, 0, 7]) == [POOL[4], POOL[0], POOL[7]]
    with pytest.raises(DataError, match="index 12"):
        select_shots("x", POOL, 1, method="indices", indices=[12])
    with pytest.raises(DataError, match="query itself"):
        select_shots("dialogue 3", POOL, 1, method="indices", indices=[3])


def test_random_is_seeded_reproducible_and_never_the_query():
    a = select_shots("dialogue 2", POOL, 4, seed=5)
    assert a == select_shots("dialogue 2", POOL, 4, seed=5)
    assert a != select_shots("dialogue 2", POOL, 4, seed=6)
    assert len(set(e.input for e in a)) == 4
    for seed in range(30):
        assert POOL[2] not in select_shots("dialogue 2", POOL, 9, seed=seed)


def test_k_larger_than_pool_names_k_and_size():
    with pytest.raises(DataError, match="k=11 .* only 10"):
        select_shots("x", POOL, 11)
    with pytest.raises(DataError, match="k=10 .* only 9"):
        select_shots("dialogue 0", POOL, 10)  # the query is not a candidate
    with pytest.raises(ConfigError, match="method='best'"):
        select_shots("x", POOL, 1, method="best")


def test_nearest_with_stub_embedder_most_similar_first():
    pool = [Example("ccc"), Example("aab"), Example("aaa"), Example("bbb"), Example("aaaa")]
    got = select_shots("aaaa", pool, 3, method="nearest", embedder=StubEmbedder())
    assert got == [pool[2], pool[1], pool[3]] or got == [pool[2], pool[1], pool[0]]
    assert got[:2] == [pool[2], pool[1]] and pool[4] not in got  # "aaaa" is the query itself
    with pytest.raises(ConfigError, match="embedder"):
        select_shots("aaaa", pool, 2, method="nearest")


def test_sentence_embedder_matches_transformers_mean_pooling(minilm_path):
    from transformers import AutoModel, AutoTokenizer

    from lmlab.prompting import SentenceEmbedder

    texts = ["A man is eating food.", "Someone is having a meal.", "The stock market fell sharply today."]
    emb = SentenceEmbedder("all-minilm-l6-v2")
    ours = emb.embed(texts)
    tok, hf = AutoTokenizer.from_pretrained(str(minilm_path)), AutoModel.from_pretrained(str(minilm_path)).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    # unit vectors from 6 fp32 layers: rounding relative to the norm (1), see tests/parity.py
    bound = fp32_bound(ref, emb.model.config, seq_len=batch["input_ids"].shape[1], scale=1.0)
    assert (ours - ref).abs().max() <= bound
    sims = ours @ ours.T
    assert sims[0, 1] > 0.5 > sims[0, 2]  # paraphrases are close, unrelated sentences are not
    assert select_shots(texts[0], [Example(t) for t in texts[1:]], 1, method="nearest", embedder=emb)[0].input == texts[1]


# --- the token budget -----------------------------------------------------------------------------
def _dialogue(turns):
    return "\n".join(f"#Person{1 + i % 2}#: turn {i} words words" for i in range(turns))


def test_budget_fits_everything_untouched():
    tok = WordTokenizer()
    p = build_prompt("a b c", SHOTS, tokenizer=tok, max_prompt_tokens=100)
    assert p.shots == SHOTS and p.notes == [] and p.n_tokens == len(p.text.split())


def test_budget_counts_the_special_tokens_the_prompt_will_carry():
    """Generation encodes prompts with the tokenizer's special tokens (e.g. LLaMA's BOS): the budget counts them."""

    class WithBos(WordTokenizer):
        def encode(self, text, add_special_tokens=False):
            return [1] * add_special_tokens + super().encode(text)

    p = build_prompt("a b c", tokenizer=WithBos())
    assert p.n_tokens == len(p.text.split()) + 1

def test_budget_drops_shots_from_the_end_without_embedder():
    tok = WordTokenizer()
    shots = [Example("x " * 10, "y"), Example("z " * 10, "w"), Example("v " * 10, "u")]
    full = build_prompt("q", shots, tokenizer=tok).n_tokens
    p = build_prompt("q", shots, tokenizer=tok, max_prompt_tokens=full - 5)
    assert p.shots == shots[:2] and p.dropped_shots == [shots[2]] and p.n_tokens <= full - 5
    assert not p.truncated_query and "dropped 1 of 3 shots" in p.notes[0]


def test_budget_drops_least_similar_shots_first_with_embedder():
    tok = WordTokenizer()
    shots = [Example("aaa " * 5, "s"), Example("ccc " * 5, "s"), Example("aab " * 5, "s")]
    full = build_prompt("aaaa", shots, tokenizer=tok).n_tokens
    p = build_prompt("aaaa", shots, tokenizer=tok, max_prompt_tokens=full - 3, embedder=StubEmbedder())
    assert p.dropped_shots == [shots[1]] and p.shots == [shots[0], shots[2]]
    assert "least similar" in p.notes[0]


def test_budget_truncates_the_query_from_the_middle():
    tok = WordTokenizer()
    query = _dialogue(40)
    p = build_prompt(query, SHOTS, tokenizer=tok, max_prompt_tokens=60)
    assert p.n_tokens <= 60 and p.truncated_query and p.shots == [] and len(p.dropped_shots) == 2
    lines = query.split("\n")
    assert lines[0] in p.text and lines[-1] in p.text and TRUNCATION_MARKER in p.text and lines[20] not in p.text
    assert any("cut the query" in n for n in p.notes)
    # the most turns that fit were kept: one more turn would not fit
    kept = p.text.count("#Person")
    assert kept >= 6 and p.text.count(TRUNCATION_MARKER) == 1
    one_more = _middle_cut(query, kept + 1)[0]
    assert build_prompt(one_more, tokenizer=tok).n_tokens > 60


def test_budget_from_context_window_and_max_new_tokens():
    tok = WordTokenizer()
    p = build_prompt(_dialogue(40), tokenizer=tok, context_window=100, max_new_tokens=40)
    assert p.n_tokens <= 60 and p.truncated_query


def test_prompt_that_cannot_fit_at_all_is_a_clear_error():
    tok = WordTokenizer()
    with pytest.raises(DataError, match=r"alone takes 5 tokens .* max_prompt_tokens=3"):
        build_prompt("q", tokenizer=tok, max_prompt_tokens=3)  # "Summarize the following conversation.\n\n\n\nSummary:"
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        build_prompt("q", max_prompt_tokens=3)
