"""Data pipeline: tokenizer training, token shards + manifest, packed blocks, the resumable sampler."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from lmlab.corpus import BlockSampler, PackedBlocks, TokenStore, iter_documents, tokenize_corpus
from lmlab.errors import ConfigError, DataError
from lmlab.tokenizer_train import parse_special_tokens, special_token_ids, train_tokenizer

WORDS = "the cat sat on a mat while dogs ran in the park and birds sang songs about summer rain".split()


def _docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(5, 30))) for _ in range(n)]


@pytest.fixture
def corpus_files(tmp_path):
    docs = _docs(120)
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"dialogue": d, "other": 1}) + "\n" for d in docs[:80]))
    txt = tmp_path / "b.txt"
    txt.write_text("\n\n".join(docs[80:]) + "\n")
    return jsonl, txt, docs


@pytest.fixture
def bpe_dir(tmp_path, corpus_files):
    jsonl, txt, _ = corpus_files
    out = tmp_path / "tok"
    train_tokenizer(iter_documents([jsonl], "dialogue"), kind="bpe", vocab_size=300, out_dir=out, show_progress=False)
    return out


def test_iter_documents_reads_jsonl_field_and_text_paragraphs(corpus_files):
    jsonl, txt, docs = corpus_files
    assert list(iter_documents([jsonl, txt], field="dialogue")) == docs


def test_iter_documents_errors_name_the_problem(tmp_path, corpus_files):
    with pytest.raises(DataError, match="missing.txt"):
        list(iter_documents([tmp_path / "missing.txt"]))
    with pytest.raises(DataError, match="no field 'text'"):
        list(iter_documents([corpus_files[0]], field="text"))
    with pytest.raises(DataError, match="hf:some/dataset"):
        list(iter_documents(["hf:some/dataset"]))  # datasets missing or offline: a clear DataError either way


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_train_tokenizer_round_trips_and_places_special_tokens(tmp_path, corpus_files, kind):
    jsonl, _, docs = corpus_files
    out = tmp_path / kind
    vocab_size = 300 if kind == "bpe" else 120  # byte-level BPE starts from 256 byte tokens
    tok = train_tokenizer(iter_documents([jsonl], "dialogue"), kind=kind, vocab_size=vocab_size, n_sentinels=4,
                          out_dir=out, show_progress=False)
    loaded = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert loaded.get_vocab_size() == tok.get_vocab_size() <= vocab_size
    ids = special_token_ids(out)
    assert [ids[r] for r in ("pad", "bos", "eos", "unk", "mask")] == [0, 1, 2, 3, 4]
    V = loaded.get_vocab_size()
    assert ids["sentinels"] == [V - 1, V - 2, V - 3, V - 4]  # <extra_id_0> is the highest id
    text = docs[0]
    decoded = loaded.decode(loaded.encode(text).ids)
    assert decoded.strip() == text
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "</s>" and config["additional_special_tokens"][0] == "<extra_id_0>"


def test_special_tokens_are_configurable(tmp_path, corpus_files):
    special = parse_special_tokens(["eos=<|endoftext|>", "mask="])
    out = tmp_path / "t"
    train_tokenizer(iter_documents([corpus_files[0]], "dialogue"), vocab_size=300, special_tokens=special,
                    out_dir=out, show_progress=False)
    ids = special_token_ids(out)
    assert "mask" not in ids and Tokenizer.from_file(str(out / "tokenizer.json")).id_to_token(ids["eos"]) == "<|endoftext|>"
    with pytest.raises(ConfigError, match="cls=<cls>"):
        parse_special_tokens(["cls=<cls>"])


def test_tokenize_corpus_shards_manifest_and_reuse(tmp_path, corpus_files, bpe_dir):
    jsonl, txt, docs = corpus_files
    tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    out = tmp_path / "shards"
    manifest = tokenize_corpus([jsonl, txt], bpe_dir, out, field="dialogue", eos_token_id=2, shard_tokens=500,
                               show_progress=False)
    assert manifest["dtype"] == "uint16" and len(manifest["shards"]) > 1
    assert manifest["n_documents"] == len(docs)
    expected = [i for d in docs for i in tok.encode(d, add_special_tokens=False).ids + [2]]
    store = TokenStore(out)
    assert manifest["n_tokens"] == store.n_tokens == len(expected)
    assert store.read(0, store.n_tokens).tolist() == expected  # reads across shard boundaries
    # unchanged sources + tokenizer: the manifest is reused, the shards are not rewritten
    mtime = (out / "shard_00000.bin").stat().st_mtime_ns
    assert tokenize_corpus([jsonl, txt], bpe_dir, out, field="dialogue", eos_token_id=2, show_progress=False) == manifest
    assert (out / "shard_00000.bin").stat().st_mtime_ns == mtime


def test_uint32_shards_for_large_vocabularies():
    from lmlab.corpus import token_dtype

    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


def test_packed_blocks_split_and_too_small_corpus(tmp_path, corpus_files, bpe_dir):
    out = tmp_path / "shards"
    tokenize_corpus([corpus_files[0]], bpe_dir, out, field="dialogue", eos_token_id=2, show_progress=False)
    store = TokenStore(out)
    train = PackedBlocks(store, 16, "train", val_fraction=0.1)
    val = PackedBlocks(store, 16, "validation", val_fraction=0.1)
    total = store.n_tokens // 16
    assert len(train) + len(val) == total and len(val) == int(np.ceil(0.1 * total))
    stream = store.read(0, store.n_tokens)
    assert train[3].tolist() == stream[48:64].tolist()
    assert val[0].tolist() == stream[len(train) * 16:(len(train) + 1) * 16].tolist()
    assert train.batch([0, 1]).shape == (2, 16)
    with pytest.raises(DataError, match="fewer than one block"):
        PackedBlocks(store, store.n_tokens + 1)


def test_sampler_is_deterministic_resumable_and_covers_each_epoch():
    s = BlockSampler(10, 3, seed=5)
    first = [s.next() for _ in range(3)]
    assert len({i for b in first for i in b}) == 9  # 3 full batches, no repeats within an epoch
    state = s.state_dict()
    rest = [s.next() for _ in range(4)]
    s2 = BlockSampler(10, 3, seed=999)
    s2.load_state_dict(state)
    assert [s2.next() for _ in range(4)] == rest
    assert s.epoch == 2  # 3 batches per epoch (the 10th block of each epoch is the skipped tail)
    assert BlockSampler(10, 3, seed=6).next() != BlockSampler(10, 3, seed=5).next()


def test_sampler_ranks_take_disjoint_slices_of_the_global_batch():
    single = BlockSampler(20, 4, seed=1)
    ranks = [BlockSampler(20, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):
        glob = single.next()
        parts = [r.next() for r in ranks]
        assert not set(parts[0]) & set(parts[1])
        assert sorted(parts[0] + parts[1]) == sorted(glob)
    with pytest.raises(DataError, match="batch_size=3"):
        BlockSampler(20, 3, world_size=2)
