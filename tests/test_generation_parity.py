"""Generation parity with transformers' ``generate``: greedy and beam search, token for token.

Tiny random models are built offline from the real configs of gpt2, HuggingFaceTB/SmolLM2-135M,
t5-small and google/flan-t5-base (values copied from their config.json), shrunk to a few layers and
a small vocabulary, with weights re-drawn large enough that the output varies from token to token.
They are converted with ``lmlab.checkpoints.from_hf_model``. The real SmolLM2-135M-Instruct is
compared for 64 greedy tokens.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmlab.checkpoints import from_hf_model  # noqa: E402
from lmlab.generation import GenerationConfig, generate, generate_tokens, stream  # noqa: E402

V = 160  # tiny vocabulary
PAD = V - 2  # not 0: HF's beam search fills finished rows with eos instead of a pad id of 0
SHRINK = dict(layers=2, heads=4, width=64)

# real config.json values; the shape fields are shrunk below
GPT2 = dict(model_type="gpt2", activation_function="gelu_new", layer_norm_epsilon=1e-5, n_ctx=1024, n_embd=768,
            n_head=12, n_layer=12, n_positions=1024, vocab_size=50257, bos_token_id=50256, eos_token_id=50256,
            resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, initializer_range=0.02)
SMOLLM2 = dict(model_type="llama", hidden_act="silu", hidden_size=576, intermediate_size=1536, num_attention_heads=9,
               num_hidden_layers=30, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
               max_position_embeddings=8192, tie_word_embeddings=True, vocab_size=49152, bos_token_id=0,
               eos_token_id=0, attention_bias=False, mlp_bias=False, initializer_range=0.041666666666666664)
T5_SMALL = dict(model_type="t5", d_ff=2048, d_kv=64, d_model=512, num_heads=8, num_layers=6, dropout_rate=0.1,
                feed_forward_proj="relu", layer_norm_epsilon=1e-6, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, vocab_size=32128, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0, tie_word_embeddings=True, is_encoder_decoder=True)
FLAN_T5_BASE = dict(T5_SMALL, d_ff=2048, d_model=768, num_heads=12, num_layers=12, num_decoder_layers=12,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False)


def build(family: str, seed: int = 0, eos: int | None = None):
    """-> (hf_model, lmlab_model) with identical, lively weights."""
    w, L, H = SHRINK["width"], SHRINK["layers"], SHRINK["heads"]
    if family == "gpt2":
        cfg = transformers.GPT2Config(**dict(GPT2, n_embd=w, n_head=H, n_layer=L, n_positions=128, n_ctx=128,
                                             vocab_size=V, bos_token_id=V - 1, eos_token_id=V - 1))
        hf = transformers.GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = transformers.LlamaConfig(**dict(SMOLLM2, hidden_size=w, intermediate_size=3 * w // 2, num_attention_heads=H,
                                              num_key_value_heads=2, num_hidden_layers=L, vocab_size=V))
        hf = transformers.LlamaForCausalLM(cfg)
    else:
        base = T5_SMALL if family == "t5" else FLAN_T5_BASE
        cfg = transformers.T5Config(**dict(base, d_model=w, d_kv=w // H, d_ff=2 * w, num_heads=H, num_layers=L,
                                           num_decoder_layers=L, vocab_size=V))
        hf = transformers.T5ForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 2.0 / p.shape[-1] ** 0.5)
    hf.eval()
    hf.generation_config.eos_token_id = eos
    return hf, from_hf_model(hf)


FAMILIES = ["gpt2", "llama", "t5", "flan-t5"]
PROMPTS = [[5, 9, 14, 3, 22, 31, 7, 8], [40, 41, 2], [77, 12, 19, 23, 50]]


def left_pad(prompts, pad=PAD):
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    return ids, mask


def hf_new_tokens(hf, ids, mask, pad, **kw):
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, pad_token_id=pad, do_sample=False, **kw)
    start = 1 if hf.config.is_encoder_decoder else ids.shape[1]  # T5 outputs start with decoder_start_token_id
    return out[:, start:].tolist()


def assert_same(ours, theirs, pad):
    """Our rows stop at eos; HF pads finished rows to a common length with `pad`."""
    for mine, ref in zip(ours, theirs):
        assert mine == ref[:len(mine)], (mine, ref)
        assert all(t == pad for t in ref[len(mine):]), (mine, ref)


def pick_eos(hf, ids, mask):
    """A token the model emits a few steps in for row 0, so that eos really ends some beams."""
    free = hf_new_tokens(hf, ids, mask, pad=PAD, max_new_tokens=12, eos_token_id=None)
    return free[0][4]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(family):
    hf, ours = build(family)
    ids, mask = left_pad(PROMPTS)
    kw = dict(max_new_tokens=16)
    eos = pick_eos(hf, ids, mask)
    for eos_ids in ([], [eos]):
        theirs = hf_new_tokens(hf, ids, mask, pad=PAD, eos_token_id=eos_ids or None, **kw)
        mine = generate_tokens(ours, ids, mask, GenerationConfig(eos_token_ids=eos_ids, pad_token_id=PAD, **kw))
        assert_same(mine, theirs, pad=PAD)
    assert len(mine[0]) < 16 and len(set(map(tuple, theirs))) == 3  # eos ended row 0; rows differ


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("beam_kw", [
    dict(num_beams=3),
    dict(num_beams=4, length_penalty=0.5, early_stopping=True),
    dict(num_beams=2, length_penalty=2.0, early_stopping="never"),
])
def test_beam_search_matches_transformers(family, beam_kw):
    hf, ours = build(family, seed=1)
    ids, mask = left_pad(PROMPTS)
    eos = pick_eos(hf, ids, mask)
    theirs = hf_new_tokens(hf, ids, mask, pad=PAD, eos_token_id=eos, max_new_tokens=12, **beam_kw)
    mine = generate_tokens(ours, ids, mask, GenerationConfig(eos_token_ids=[eos], pad_token_id=PAD, max_new_tokens=12,
                                                             **beam_kw))
    assert_same(mine, theirs, pad=PAD)
    greedy = generate_tokens(ours, ids, mask, GenerationConfig(eos_token_ids=[eos], pad_token_id=PAD, max_new_tokens=12))
    assert mine != greedy  # beam search found something greedy did not (the test is not vacuous)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_processors_in_the_loop_match_transformers(family):
    hf, ours = build(family, seed=2)
    ids, mask = left_pad(PROMPTS)
    kw = dict(max_new_tokens=14, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=6)
    eos = pick_eos(hf, ids, mask)
    theirs = hf_new_tokens(hf, ids, mask, pad=PAD, eos_token_id=eos, **kw)
    mine = generate_tokens(ours, ids, mask, GenerationConfig(eos_token_ids=[eos], pad_token_id=PAD, **kw))
    assert_same(mine, theirs, pad=PAD)
    for beams in (3,):
        theirs = hf_new_tokens(hf, ids, mask, pad=PAD, eos_token_id=eos, num_beams=beams, **kw)
        mine = generate_tokens(ours, ids, mask, GenerationConfig(eos_token_ids=[eos], pad_token_id=PAD, num_beams=beams, **kw))
        assert_same(mine, theirs, pad=PAD)


# --- the real SmolLM2-135M-Instruct --------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    import lmlab

    model = lmlab.load_model("smollm2-135m-instruct")
    tok = lmlab.load_tokenizer("smollm2-135m-instruct")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                           dtype=torch.float32).eval()
    return model, tok, hf


@pytest.mark.slow
def test_smollm2_greedy_64_tokens_matches_transformers(smollm2):
    model, tok, hf = smollm2
    prompts = [tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? Explain briefly."}]),
               "The three most important inventions of the nineteenth century were"]
    ids, mask = tok.encode_batch(prompts)
    eos = [tok.eos_token_id]
    theirs = hf_new_tokens(hf, ids, mask, pad=tok.pad_token_id, eos_token_id=eos, max_new_tokens=64)
    mine = generate_tokens(model, ids, mask, GenerationConfig(max_new_tokens=64, eos_token_ids=eos,
                                                              pad_token_id=tok.pad_token_id))
    assert_same(mine, theirs, pad=tok.pad_token_id)
    assert len(mine[1]) == 64  # the continuation prompt runs the full 64 tokens
    # batched (left-padded) equals each prompt alone, and text/streaming agree
    alone = generate(model, tok, prompts[0], max_new_tokens=64)
    assert alone == tok.decode(mine[0]) and "Paris" in alone
    assert "".join(stream(model, tok, prompts[0], max_new_tokens=64)) == alone


# --- prompts carry the special tokens each tokenizer's configuration asks for -------------------
def tokenizer_dir(path, family: str):
    """A word-level tokenizer over the tiny vocabulary ("w3" ... "w159"), saved the way the real ones are:

    * llama: tokenizer.json whose post-processor prepends ``<s>``, tokenizer_config.json with
      ``add_bos_token: true`` (LLaMA-2 / Mistral);
    * t5: tokenizer.json whose post-processor appends ``</s>`` (t5-small; no add_*_token keys).
    """
    import json

    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    specials = ["<unk>", "<s>", "</s>"] if family == "llama" else ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), V)}
    backend = Backend(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if family == "llama":
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                               special_tokens=[("<s>", 1)])
        config = dict(add_bos_token=True, add_eos_token=False, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    else:
        backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                               special_tokens=[("</s>", 1)])
        config = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(dict(config, tokenizer_class="PreTrainedTokenizerFast")))
    return path


TEXT_PROMPTS = ["w5 w9 w14 w3 w22 w31 w7 w8", "w40 w41 w12", "w77 w12 w19 w23 w50"]


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_prompts_get_the_special_tokens_transformers_adds_and_greedy_matches(family, tmp_path):
    from lmlab.generation import encode_prompts
    from lmlab.tokenizer import Tokenizer

    path = tokenizer_dir(tmp_path / "tok", family)
    tok = Tokenizer.from_dir(path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
    if hf_tok.pad_token is None:
        hf_tok.pad_token = hf_tok.eos_token  # what lmlab's Tokenizer falls back to
    hf, ours = build(family)
    special = 1  # <s> for llama, </s> for t5
    kw = dict(max_new_tokens=10)

    # the prompt ids: a batch (left-padded) and a single prompt, as transformers' tokenizer makes them
    ids, mask = encode_prompts(tok, TEXT_PROMPTS)
    theirs = hf_tok(TEXT_PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    assert ids.tolist() == theirs["input_ids"].tolist() and mask.tolist() == theirs["attention_mask"].tolist()
    rows = ids[mask.bool()].view(-1).tolist()
    assert rows.count(special) == len(TEXT_PROMPTS)  # one BOS / one </s> per prompt
    one, _ = encode_prompts(tok, TEXT_PROMPTS[:1])
    assert one.tolist() == hf_tok(TEXT_PROMPTS[:1])["input_ids"]

    # the generated text: lmlab's text-level generate() against transformers.generate on the same ids
    new = hf_new_tokens(hf, theirs["input_ids"], theirs["attention_mask"], pad=hf_tok.pad_token_id,
                        eos_token_id=None, **kw)
    assert generate(ours, tok, TEXT_PROMPTS, eos_token_ids=[], **kw) == [tok.decode(r) for r in new]
    alone = hf_new_tokens(hf, one, torch.ones_like(one), pad=hf_tok.pad_token_id, eos_token_id=None, **kw)
    assert generate(ours, tok, TEXT_PROMPTS[0], eos_token_ids=[], **kw) == tok.decode(alone[0])
    # not vacuous: without the special token the model continues differently
    plain = [tok.encode(p) for p in TEXT_PROMPTS]
    assert generate_tokens(ours, plain, eos_token_ids=[], pad_token_id=PAD, **kw) != new


def test_a_chat_template_that_writes_bos_does_not_get_a_second_one(tmp_path):
    from lmlab.generation import encode_prompts
    from lmlab.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir(tmp_path / "tok", "llama"))
    tok.chat_template = "{{ bos_token }}{% for m in messages %}w10 {{ m['content'] }} w11 {% endfor %}"
    text = tok.apply_chat_template([{"role": "user", "content": "w5 w6"}])
    assert text.startswith("<s>")
    ids, _ = encode_prompts(tok, [text])
    assert ids.tolist() == [[1, 10, 5, 6, 11]]
    assert encode_prompts(tok, ["w5 w6"])[0].tolist() == [[1, 5, 6]]  # without it, the tokenizer adds BOS
