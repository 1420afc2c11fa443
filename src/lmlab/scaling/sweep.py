"""`lmlab scaling sweep`: train a grid of small decoders through the one training loop, one line per run.

A sweep config (YAML) names a corpus, the model sizes and the token budgets::

    out_dir: runs/scaling
    corpus: stdlib              # the Python standard library's own source (PSF license); or
    # files: [my.jsonl]         # any lmlab pretrain corpus (.txt / .jsonl), with `field`
    vocab_size: 4096            # BPE trained once on the corpus, shared by every run
    seq_len: 128
    depths: [2, 3, 4, 5, 6]     # model sizes: n_layers, with d_model = width_per_layer * n_layers
    width_per_layer: 32         # the shape rule (head_dim 32, SwiGLU d_ff = 8/3 d_model rounded to 32)
    tokens_per_param: [2, 5, 10, 20]   # budgets: D = r * N (N = non-embedding parameters)
    train: {batch_size: 32, lr: 0.002, precision: auto}   # any `lmlab pretrain` train.* field
    max_epochs: 2               # refuse runs that would pass over the corpus more often (they overfit)
    workers: 2                  # runs at a time, each on its own core (threads_per_run torch threads)

The shape rule keeps the aspect ratio d_model / n_layers fixed (Kaplan et al. 2020 find loss depends on
it only weakly over a wide range) and every head 32 wide, so N = n_layers * (4 d^2 + 3 d d_ff + 2 d)
+ d grows about as 12 * 32^2 * n_layers^3.

Each run is ``lmlab pretrain`` in its own process and directory (``RUNS/<id>/``), reading the token
shards tokenized once into ``RUNS/data`` (the run's ``data`` folder links there) with the shared
tokenizer, and evaluated on the same held-out blocks (``data.val_fraction`` of the packed corpus). When a
run finishes its line is appended to ``RUNS/runs.jsonl`` (``params``, ``tokens``, ``loss`` and the rest,
see ``run_record``). A killed sweep continues where it stopped: recorded runs are never recomputed and an
unfinished run resumes from its checkpoint (``--resume``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from dataclasses import field as dc_field  # `field` is also a config key (the JSONL text field)
from pathlib import Path
from typing import Any

import yaml

from lmlab.config import ModelConfig
from lmlab.errors import ConfigError, DataError
from lmlab.scaling.chinchilla import training_flops
from lmlab.scaling.memory import training_memory
from lmlab.scaling.units import format_count

HEAD_DIM = 32


@dataclass
class SweepConfig:
    out_dir: str = "runs/scaling"
    corpus: str | None = "stdlib"  # "stdlib", or None with `files`
    files: list[str] = dc_field(default_factory=list)
    field: str = "text"
    vocab_size: int = 4096
    seq_len: int = 128
    depths: list[int] = dc_field(default_factory=lambda: [2, 3, 4, 5, 6])
    width_per_layer: int = 32
    tokens_per_param: list[float] = dc_field(default_factory=lambda: [2.0, 5.0, 10.0, 20.0])
    val_fraction: float = 0.02
    eval_batches: int = 16
    train: dict[str, Any] = dc_field(default_factory=lambda: {"batch_size": 32, "lr": 2e-3, "precision": "auto"})
    workers: int = 2
    threads_per_run: int = 1
    memory_budget: str | None = None  # e.g. "20GiB"; default: physical memory
    max_epochs: float = 2.0  # refuse runs that would see the training tokens more often than this

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "SweepConfig":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"sweep config {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"sweep config {str(path)!r} must be a mapping of keys to values")
        data.update(overrides or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown sweep key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        cfg = cls(**data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.corpus not in (None, "stdlib"):
            raise ConfigError(f"corpus={self.corpus!r}: use 'stdlib' or give `files`")
        if self.corpus is None and not self.files:
            raise ConfigError("give `files` (the corpus) or corpus: stdlib")
        for f in self.files:
            if not Path(f).exists():
                raise DataError(f"corpus file {f!r} does not exist")
        if not self.depths or any(not isinstance(d, int) or d < 1 for d in self.depths):
            raise ConfigError(f"depths={self.depths!r} must be a non-empty list of positive integers")
        if self.width_per_layer < 1 or (self.width_per_layer * min(self.depths)) % HEAD_DIM:
            raise ConfigError(f"width_per_layer={self.width_per_layer!r}: d_model = width_per_layer * n_layers must be "
                              f"a multiple of the head width {HEAD_DIM} (use a multiple of 32)")
        if not self.tokens_per_param or any(not (isinstance(r, (int, float)) and r > 0) for r in self.tokens_per_param):
            raise ConfigError(f"tokens_per_param={self.tokens_per_param!r} must be a non-empty list of positive numbers")
        for name in ("vocab_size", "seq_len", "workers", "threads_per_run", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if not (isinstance(self.max_epochs, (int, float)) and self.max_epochs > 0):
            raise ConfigError(f"max_epochs={self.max_epochs!r} must be a positive number")
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction={self.val_fraction!r} must be in (0, 0.5)")
        if not isinstance(self.train, dict):
            raise ConfigError(f"train={self.train!r} must be a mapping of `lmlab pretrain` train.* fields")


# --- the grid --------------------------------------------------------------------------------
def model_config(cfg: SweepConfig, depth: int) -> ModelConfig:
    """The decoder of `depth` layers under the shape rule (vocabulary from the sweep's tokenizer)."""
    d = cfg.width_per_layer * depth
    d_ff = max(HEAD_DIM, round(8 * d / 3 / HEAD_DIM) * HEAD_DIM)
    heads = d // HEAD_DIM
    return ModelConfig.from_name("decoder-10m", vocab_size=cfg.vocab_size, d_model=d, n_layers=depth, n_heads=heads,
                                 n_kv_heads=heads, d_ff=d_ff, max_seq_len=cfg.seq_len, tie_embeddings=True)


def embedding_parameters(mc: ModelConfig) -> int:
    """Parameters of the token embedding (tied with the output head, so counted once)."""
    return mc.vocab_size * mc.d_model


@dataclass(frozen=True)
class RunSpec:
    id: str
    depth: int
    d_model: int
    params: int  # non-embedding
    embedding_params: int
    tokens_per_param: float
    tokens: int  # steps * batch * seq_len (the budget rounded up to whole steps)
    steps: int
    flops: float


def grid(cfg: SweepConfig) -> list[RunSpec]:
    """Every (size, budget) run of the sweep, cheapest first."""
    batch = int(cfg.train.get("batch_size", 32))
    specs = []
    for depth in cfg.depths:
        mc = model_config(cfg, depth)
        emb = embedding_parameters(mc)
        n = mc.num_parameters() - emb
        for r in cfg.tokens_per_param:
            steps = max(1, math.ceil(r * n / (batch * cfg.seq_len)))
            tokens = steps * batch * cfg.seq_len
            specs.append(RunSpec(id=f"L{depth}-d{mc.d_model}-r{r:g}", depth=depth, d_model=mc.d_model, params=n,
                                 embedding_params=emb, tokens_per_param=float(r), tokens=tokens, steps=steps,
                                 flops=training_flops(n, tokens)))
    return sorted(specs, key=lambda s: s.flops)


def check_memory(cfg: SweepConfig) -> None:
    """Refuse, before anything trains, a sweep whose largest model would not fit `workers` at a time."""
    from lmlab.scaling.units import parse_bytes

    budget = parse_bytes(cfg.memory_budget, "memory_budget") if cfg.memory_budget else \
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    batch = int(cfg.train.get("batch_size", 32))
    for depth in cfg.depths:
        mc = model_config(cfg, depth)
        need = training_memory(mc, batch, cfg.seq_len, "fp32", "adamw", "single", 1, attention="eager").total
        if need * cfg.workers > budget:
            raise ConfigError(f"depth {depth} (d_model {mc.d_model}, {format_count(mc.num_parameters())} parameters) "
                              f"needs ~{need / 2**30:.1f} GiB to train at batch {batch} x {cfg.seq_len}; "
                              f"{cfg.workers} at a time exceed the {budget / 2**30:.1f} GiB available: "
                              "lower depths, batch_size or workers")


# --- the corpus and tokenizer, prepared once ---------------------------------------------------
def stdlib_corpus(out: Path) -> Path:
    """The Python standard library's .py files (the interpreter's own copy) as JSONL, one file a line.

    Files are ordered by a hash of their path, so the held-out tail (``val_fraction`` of the packed blocks)
    is a fixed random sample of modules rather than the alphabetically last packages.
    """
    path = out / "corpus.jsonl"
    if path.exists():
        return path
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts),
                   key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())
    if not files:
        raise DataError(f"no .py files under the standard library at {str(root)!r}")
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for p in files:
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            f.write(json.dumps({"text": text, "path": str(p.relative_to(root))}) + "\n")
    tmp.replace(path)
    return path


def prepare_data(cfg: SweepConfig, out: Path, show_progress: bool = True) -> tuple[list[str], str, Path]:
    """Corpus files, their field, and the tokenizer directory (trained once) -> shards in OUT/data."""
    from lmlab.corpus import iter_documents, tokenize_corpus
    from lmlab.tokenizer_train import DEFAULT_SPECIAL_TOKENS, special_token_ids, train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    files = [str(stdlib_corpus(out))] if cfg.corpus == "stdlib" else [str(Path(f).resolve()) for f in cfg.files]
    field_name = "text" if cfg.corpus == "stdlib" else cfg.field
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer(iter_documents(files, field_name), kind="bpe", vocab_size=cfg.vocab_size,
                        special_tokens=DEFAULT_SPECIAL_TOKENS, out_dir=tok_dir, show_progress=show_progress)
    ids = special_token_ids(tok_dir)
    tokenize_corpus(files, tok_dir / "tokenizer.json", out / "data", field=field_name, eos_token_id=ids.get("eos"),
                    show_progress=show_progress)
    return files, field_name, tok_dir


def run_config(cfg: SweepConfig, spec: RunSpec, files: list[str], field_name: str, tok_dir: Path, run_dir: Path) -> dict:
    """The `lmlab pretrain` config of one run."""
    mc = model_config(cfg, spec.depth)
    train = {"objective": "clm", "warmup_steps": max(1, min(100, spec.steps // 10)), "eval_every": 0,
             "eval_batches": cfg.eval_batches, "ckpt_every": max(50, spec.steps // 10), "log_every": min(50, spec.steps), "seed": 0,
             **cfg.train, "steps": spec.steps}
    return {"model": {"preset": "decoder-10m", "d_model": mc.d_model, "n_layers": mc.n_layers, "n_heads": mc.n_heads,
                      "n_kv_heads": mc.n_kv_heads, "d_ff": mc.d_ff, "max_seq_len": cfg.seq_len, "tie_embeddings": True},
            "data": {"files": files, "field": field_name, "tokenizer": str(tok_dir.resolve()), "seq_len": cfg.seq_len,
                     "val_fraction": cfg.val_fraction},
            "train": train, "out_dir": str(run_dir)}


def training_tokens(cfg: SweepConfig, out: Path) -> int:
    """Tokens in the training blocks of the sweep's corpus (the held-out tail excluded)."""
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    return int(manifest["n_tokens"] * (1 - cfg.val_fraction))


def check_epochs(cfg: SweepConfig, specs: list[RunSpec], available: int) -> None:
    """Refuse runs that would repeat the corpus more than `max_epochs` times: past about two epochs these
    small models memorise it and validation loss rises with D (measured: docs/scaling.md), which is no
    longer the law being fitted."""
    over = [s for s in specs if s.tokens > cfg.max_epochs * available]
    if over:
        worst = max(over, key=lambda s: s.tokens)
        raise ConfigError(f"{len(over)} run(s) need more than max_epochs={cfg.max_epochs:g} passes over the corpus's "
                          f"{format_count(available)} training tokens (e.g. {worst.id}: {format_count(worst.tokens)} tokens, "
                          f"{worst.tokens / available:.1f} epochs): use a larger corpus, fewer tokens_per_param or "
                          "smaller depths, or raise max_epochs")


def run_record(spec: RunSpec, summary: dict, run_cfg: dict, wall_s: float, available: int) -> dict:
    """One line of runs.jsonl. `lmlab scaling fit` reads `params`, `tokens` and `loss` only."""
    return {"id": spec.id, "params": spec.params, "tokens": spec.tokens, "loss": summary["val_loss"],
            "epochs": round(spec.tokens / available, 3), "corpus_train_tokens": available,
            "embedding_params": spec.embedding_params, "total_params": spec.params + spec.embedding_params,
            "flops": spec.flops, "flops_rule": "6ND (N non-embedding, D training tokens)",
            "tokens_per_param": spec.tokens_per_param, "train_loss": summary.get("train_loss"),
            "wall_s": round(wall_s, 1), "steps": spec.steps, "config": run_cfg}


def done_ids(runs_path: Path) -> set[str]:
    from lmlab.sweep.runner import done_ids as ids

    return ids(runs_path)


def _train_one(spec: RunSpec, run_cfg: dict, run_dir: Path, data_dir: Path, threads: int) -> tuple[dict, float]:
    run_dir.mkdir(parents=True, exist_ok=True)
    link = run_dir / "data"
    if not link.exists():
        link.symlink_to(os.path.relpath(data_dir, run_dir))  # the shards tokenized once for the whole sweep
    (run_dir / "sweep_run.yaml").write_text(yaml.safe_dump(run_cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "lmlab", "--threads", str(threads), "pretrain", "--config",
           str(run_dir / "sweep_run.yaml"), "--no-progress"]
    if (run_dir / "checkpoint.pt").exists():
        cmd.append("--resume")
    t0 = time.time()
    with (run_dir / "log.txt").open("a") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"run {spec.id} failed (exit {code}); see {run_dir / 'log.txt'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("val_loss") is None:
        raise RuntimeError(f"run {spec.id} reported no validation loss; raise val_fraction so that the corpus "
                           "has held-out blocks")
    return summary, time.time() - t0


def sweep(cfg: SweepConfig, show_progress: bool = True, echo=print) -> Path:
    """Run every run of `cfg` not yet in runs.jsonl -> the path of runs.jsonl."""
    cfg.validate()
    check_memory(cfg)
    out = Path(cfg.out_dir)
    specs = grid(cfg)
    runs_path = out / "runs.jsonl"
    todo = [s for s in specs if s.id not in done_ids(runs_path)]
    echo(f"sweep: {len(specs)} runs ({len(cfg.depths)} sizes x {len(cfg.tokens_per_param)} budgets), "
         f"{len(specs) - len(todo)} already done; {format_count(sum(s.flops for s in todo))} FLOPs to go; "
         f"{cfg.workers} at a time, {cfg.threads_per_run} thread(s) each")
    if not todo:
        return runs_path
    files, field_name, tok_dir = prepare_data(cfg, out, show_progress)
    available = training_tokens(cfg, out)
    check_epochs(cfg, todo, available)
    from lmlab.sweep.runner import Job, run_jobs

    def job(spec: RunSpec) -> Job:
        run_dir = out / spec.id
        rc = run_config(cfg, spec, files, field_name, tok_dir, run_dir)

        def work() -> dict:
            summary, wall = _train_one(spec, rc, run_dir, out / "data", cfg.threads_per_run)
            return run_record(spec, summary, rc, wall, available)

        return Job(spec.id, work, cost=spec.flops,
                   describe=lambda r: f"N={format_count(r['params'])} D={format_count(r['tokens'])} loss {r['loss']:.4f}")

    # the biggest first: the last runs to finish are the short ones
    run_jobs([job(s) for s in reversed(todo)], out, workers=cfg.workers, echo=echo, total=len(specs))
    return runs_path
