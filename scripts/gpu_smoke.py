"""A one-minute end-to-end check of the sweep paths on a device (a tiny random model, no real weights):
LoRA and full fine-tuning, a LoRA student distilled with teacher summaries, and lab evaluations with greedy
and beam decoding, all through `lmlab sweep run --device DEVICE`. Run before a long GPU sweep:

    python scripts/gpu_smoke.py cuda WORKDIR
"""

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

DEVICE, WORK = sys.argv[1], Path(sys.argv[2])
DEV = "../shared/data/dialogsum/dev.jsonl"


def tiny_model(path: Path) -> Path:
    """A random tiny decoder (lmlab format) with a BPE tokenizer trained by lmlab on the bundled dialogues."""
    from lmlab.checkpoints import save_model
    from lmlab.config import ModelConfig
    from lmlab.model import Transformer
    from lmlab.tasks.summarize.data import load_dialogues
    from lmlab.tokenizer import Tokenizer
    from lmlab.tokenizer_train import DEFAULT_SPECIAL_TOKENS, special_token_ids, train_tokenizer

    texts = [d.dialogue + "\n" + d.references[0] for d in load_dialogues().records]
    train_tokenizer(texts, kind="bpe", vocab_size=400, special_tokens=DEFAULT_SPECIAL_TOKENS,
                    out_dir=path.parent / "tokenizer", show_progress=False)
    tokenizer = Tokenizer.from_dir(path.parent / "tokenizer")
    ids = special_token_ids(path.parent / "tokenizer")
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-decoder", vocab_size=tokenizer.vocab_size, max_seq_len=2048,
                                pad_token_id=ids["pad"], eos_token_id=ids["eos"])
    save_model(Transformer(cfg).eval(), path, tokenizer)
    return path


WORK.mkdir(parents=True, exist_ok=True)
model = str(tiny_model(WORK / "tiny"))
ft = {"base_model": model, "method": "lora", "data": {"task": "dialogsum", "chat": False,
                                                     "train": [{"path": DEV, "records": "0:8"}], "max_seq_len": 256},
      "eval": {"rouge_examples": 0}, "train": {"steps": 2, "batch_size": 4, "eval_every": 0, "ckpt_every": 0}}
(WORK / "ft.yaml").write_text(yaml.safe_dump(ft))
ds = {"teacher": model, "teacher_adapter": None, "method": "sequence",
      "student": {"keep_layers": "every-other", "lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                                         "targets": ["q", "k", "v", "o", "gate", "up", "down"],
                                                         "rslora": False}},
      "data": {"train": [{"path": DEV, "records": "0:8"}, {"path": "../shared/data/dialogsum/hiddentest.jsonl"}],
               "label_field": "summary", "max_seq_len": 256},
      "pseudo": {"batch_size": 16, "max_new_tokens": 8},
      "eval": {"rouge_examples": 0, "select": None}, "train": {"steps": 2, "batch_size": 4, "epochs": None,
                                                              "eval_every": 0, "ckpt_every": 0}}
(WORK / "ds.yaml").write_text(yaml.safe_dump(ds))
sweep = {"out_dir": str(WORK / "sweep"), "workers": 3, "device": DEVICE, "model": model,
         "eval": {"data": DEV, "pool_size": 400, "limit": 4, "max_new_tokens": 8, "batch_size": 4,
                  "decodings": {"greedy": {}, "beam2": {"num_beams": 2, "no_repeat_ngram_size": 3}}},
         "runs": [{"id": "lora", "job": "finetune", "config": str(WORK / "ft.yaml")},
                  {"id": "full", "job": "finetune", "config": str(WORK / "ft.yaml"), "set": {"method": "full"}},
                  {"id": "student", "job": "distill", "config": str(WORK / "ds.yaml")}]}
(WORK / "sweep.yaml").write_text(yaml.safe_dump(sweep))
code = subprocess.run([sys.executable, "-m", "lmlab", "sweep", "run", "--config", str(WORK / "sweep.yaml")]).returncode
for f in (WORK / "sweep").rglob("*.log"):
    text = f.read_text()
    if "Error" in text:
        print(f"--- {f}\n" + "\n".join(text.splitlines()[-12:]))
print("SMOKE", "OK" if code == 0 else f"FAILED ({code})")
sys.exit(code)
