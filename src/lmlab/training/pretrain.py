"""Pre-training: corpus -> tokenizer -> token shards -> objective -> model, trained by the one loop.

``pretrain(config)`` runs a whole job described by a ``PretrainConfig`` through
``lmlab.training.job.run_job``; ``build`` prepares the objective (clm, mlm, span), the model (any
``ModelConfig``) and the data, which plug into ``loop.fit``, which knows none of their details. At the end the final model + tokenizer are written in lmlab's format into the run directory
(so ``lmlab generate OUT_DIR`` loads it).

Run directory layout::

    OUT/tokenizer/          tokenizer.json + tokenizer_config.json (trained unless data.tokenizer is given)
    OUT/data/               manifest.json + shard_*.bin (token ids, numpy.memmap)
    OUT/checkpoint.pt       latest training checkpoint (resume with --resume)
    OUT/checkpoint_dcp/     with train.sharded_checkpoint under fsdp: model/optimizer shards (DCP), per step
    OUT/metrics.jsonl       train / eval records;   OUT/loss.png  loss curve
    OUT/config.json, OUT/model.safetensors, OUT/tokenizer.json, OUT/tokenizer_config.json   final model
    OUT/run_config.json     the resolved PretrainConfig
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from lmlab.config import ModelConfig
from lmlab.checkpoints.native import write
from lmlab.corpus import BlockSampler, PackedBlocks, TokenStore, iter_documents, tokenize_corpus
from lmlab.errors import ConfigError, DataError, choices_error
from lmlab.model import Transformer
from lmlab.objectives import build_objective
from lmlab.objectives.base import ARCH_OBJECTIVE, OBJECTIVES, Objective
from lmlab.tokenizer_train import DEFAULT_SPECIAL_TOKENS, special_token_ids, train_tokenizer, with_sentinels
from lmlab.training import distributed as dist
from lmlab.training.config import PretrainConfig
from lmlab.training.job import Built, JobSpec, run_job
from lmlab.training.loop import PRECISIONS


def pretrain(cfg: PretrainConfig, resume: bool = False, show_progress: bool = True) -> dict:
    """Run (or resume) the pre-training job `cfg` -> summary dict (steps, losses, throughput, paths)."""
    validate(cfg)
    # the model config depends on the tokenizer, so the identity (model_config) is checked once built
    spec = JobSpec(cfg.out_dir, cfg.train, cfg.to_dict(), {}, resume, show_progress)
    return run_job(spec, lambda env: build(cfg, env, show_progress))


def build(cfg: PretrainConfig, env: dist.DistEnv, show_progress: bool = True) -> Built:
    """Tokenizer (trained or given), token shards, the objective, a fresh model; the final save from every rank."""
    t, out = cfg.train, Path(cfg.out_dir)
    base_model = ModelConfig.from_name(cfg.model.preset, **dict(cfg.model.overrides))
    objective_name = t.objective or ARCH_OBJECTIVE[base_model.arch]
    seq_len = cfg.data.seq_len or base_model.max_seq_len
    if seq_len > base_model.max_seq_len and base_model.positional in ("learned", "sinusoidal"):
        raise ConfigError(f"data.seq_len={seq_len} exceeds the model's max_seq_len={base_model.max_seq_len}")

    # 1. tokenizer, model config and objective
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    n_sentinels = cfg.data.n_sentinels if objective_name == "span" else 0
    tokenizer_dir = prepare_tokenizer(cfg, out, base_model.vocab_size, n_sentinels, env)
    ids = special_token_ids(tokenizer_dir)
    vocab_size = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    model_cfg = build_model_config(cfg, vocab_size, ids)
    objective = build_objective_for(objective_name, model_cfg, ids, cfg)

    # 2. data: token shards -> fixed-length blocks -> this rank's batches
    data_dir = out / "data"
    if env.is_main:
        tokenize_corpus(cfg.data.files, tokenizer_dir / "tokenizer.json", data_dir, field=cfg.data.field,
                        eos_token_id=ids.get("eos"), show_progress=show_progress)
    dist.barrier(env)
    store = TokenStore(data_dir)
    block_len = objective.block_length(seq_len)
    train_blocks = PackedBlocks(store, block_len, "train", cfg.data.val_fraction)
    val_blocks = PackedBlocks(store, block_len, "validation", cfg.data.val_fraction)
    batches = BlockBatches(train_blocks, objective, t.batch_size, t.seed, env)

    # 3. the model
    torch.manual_seed(t.seed)
    model = Transformer(model_cfg).to(env.device)

    def finish(summary: dict, wrapped) -> dict:
        """The final model + tokenizer in lmlab's format, into OUT itself (gathered from every rank's shards)."""
        final_state = dist.model_state_dict(wrapped, env)
        if env.is_main:
            final = Transformer(model_cfg)
            final.load_state_dict(final_state)
            save_final_model(final, tokenizer_dir, out)
        return {}

    return Built(name=f"{cfg.model.preset} · {objective_name}", model=model, objective=objective, batches=batches,
                 evaluate=lambda m: validation_loss(m, objective, val_blocks, t, env),
                 identity={"model_config": model_cfg.to_dict()}, finish=finish,
                 summary={"objective": objective_name, "n_params": model.num_parameters()})


# --- set-up ----------------------------------------------------------------------------------
def validate(cfg: PretrainConfig) -> None:
    t = cfg.train
    if t.precision not in PRECISIONS:
        raise choices_error("train.precision", t.precision, PRECISIONS)
    if t.objective is not None and t.objective not in OBJECTIVES:
        raise choices_error("train.objective", t.objective, sorted(OBJECTIVES))
    for name in ("steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)!r} must be >= 1")
    if t.lr <= 0:
        raise ConfigError(f"train.lr={t.lr!r} must be > 0")
    if not cfg.data.files:
        raise ConfigError("data.files is empty; give the training files (e.g. --set data.files=[corpus.jsonl])")
    for f in cfg.data.files:
        if not str(f).startswith("hf:") and not Path(f).exists():
            raise DataError(f"data file {str(f)!r} does not exist")
    if cfg.data.tokenizer is not None and not (Path(cfg.data.tokenizer) / "tokenizer.json").exists():
        raise DataError(f"data.tokenizer={cfg.data.tokenizer!r} has no tokenizer.json")


def prepare_tokenizer(cfg: PretrainConfig, out: Path, model_vocab: int, n_sentinels: int, env: dist.DistEnv) -> Path:
    """The tokenizer directory: the given one (with sentinels added if the objective needs them) or one trained on the data."""
    tokenizer_dir = out / "tokenizer"
    if cfg.data.tokenizer is not None:
        given = Path(cfg.data.tokenizer)
        if not n_sentinels or special_token_ids(given)["sentinels"]:
            return given
        # span corruption needs sentinels the given tokenizer lacks: use a copy with them added
        if env.is_main and not (tokenizer_dir / "tokenizer.json").exists():
            with_sentinels(given, tokenizer_dir, n_sentinels)
        dist.barrier(env)
        return tokenizer_dir
    if env.is_main and not (tokenizer_dir / "tokenizer.json").exists():
        vocab = cfg.data.vocab_size or model_vocab
        train_tokenizer(iter_documents(cfg.data.files, cfg.data.field), kind=cfg.data.tokenizer_kind,
                        vocab_size=vocab, special_tokens=DEFAULT_SPECIAL_TOKENS, n_sentinels=n_sentinels,
                        out_dir=tokenizer_dir, show_progress=False)
    dist.barrier(env)
    return tokenizer_dir


def build_model_config(cfg: PretrainConfig, vocab_size: int, ids: dict) -> ModelConfig:
    """The model preset + overrides, with the vocabulary and special ids taken from the tokenizer."""
    base = ModelConfig.from_name(cfg.model.preset)
    fields = dict(cfg.model.overrides)
    fields.update(vocab_size=vocab_size, pad_token_id=ids.get("pad"), bos_token_id=ids.get("bos"),
                  eos_token_id=ids.get("eos"), mask_token_id=ids.get("mask"))
    if base.arch == "encoder_decoder":
        fields["decoder_start_token_id"] = ids.get("pad", 0)
    return base.replace(**fields)


OBJECTIVE_ARCH = {"clm": "decoder", "mlm": "encoder", "span": "encoder_decoder"}  # the arch each objective trains


def build_objective_for(name: str, model_cfg: ModelConfig, ids: dict, cfg: PretrainConfig) -> Objective:
    """Construct objective `name` from the tokenizer's special ids; check it fits the architecture."""
    trains_arch = OBJECTIVE_ARCH[name]
    if trains_arch != model_cfg.arch:
        raise ConfigError(f"objective {name!r} trains arch={trains_arch!r} models; the model preset "
                          f"{cfg.model.preset!r} has arch={model_cfg.arch!r} (use {ARCH_OBJECTIVE[model_cfg.arch]!r})")
    if name == "clm":
        return build_objective("clm", pad_token_id=ids.get("pad"))
    if name == "mlm":
        if "mask" not in ids:
            raise ConfigError("the mlm objective needs a mask token; the tokenizer has none")
        specials = [ids[r] for r in ("pad", "bos", "eos", "unk", "mask") if r in ids]
        return build_objective("mlm", mask_token_id=ids["mask"], vocab_size=model_cfg.vocab_size,
                               special_ids=specials, pad_token_id=ids.get("pad"), mask_prob=cfg.train.mask_prob)
    if not ids.get("sentinels"):
        raise ConfigError("the span objective needs <extra_id_k> sentinel tokens; the tokenizer has none "
                          "(train it with data.n_sentinels > 0)")
    if "eos" not in ids:
        raise ConfigError("the span objective needs an eos token; the tokenizer has none")
    return build_objective("span", sentinel_ids=ids["sentinels"], eos_token_id=ids["eos"],
                           decoder_start_token_id=model_cfg.decoder_start_token_id or 0,
                           noise_density=cfg.train.noise_density, mean_span_length=cfg.train.mean_span_length)


def step_generator(*keys: int) -> torch.Generator:
    """A generator seeded from a tuple of integers (seed, step, micro-step, rank): no RNG state to save."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


class BlockBatches:
    """This rank's micro-batches of packed blocks, each prepared by the objective (masking, spans, shifts)."""

    def __init__(self, blocks: PackedBlocks, objective: Objective, batch_size: int, seed: int, env: dist.DistEnv):
        self.blocks, self.objective, self.seed, self.rank = blocks, objective, seed, env.rank
        self.sampler = BlockSampler(len(blocks), batch_size, seed, env.rank, env.world_size)

    def next_micro_batches(self, step: int, n: int) -> list[dict[str, torch.Tensor]]:
        return [self.objective.prepare(self.blocks.batch(self.sampler.next()), step_generator(self.seed, step, m, self.rank))
                for m in range(n)]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def validation_loss(model, objective: Objective, val_blocks: PackedBlocks, t, env: dist.DistEnv) -> dict[str, float]:
    """Token-mean loss over up to eval_batches global batches of validation blocks ({} when there are none)."""
    n_batches = min(t.eval_batches, len(val_blocks) // t.batch_size) or (1 if len(val_blocks) >= env.world_size else 0)
    if n_batches == 0:
        return {}
    per = min(t.batch_size, len(val_blocks))
    loss_sum = count = 0.0
    for i in range(n_batches):
        idx = list(range(i * per, (i + 1) * per))[env.rank::env.world_size]
        batch = objective.prepare(val_blocks.batch(idx), step_generator(t.seed, 2**31, i, env.rank))
        batch = {k: v.to(env.device) for k, v in batch.items()}
        loss, n = objective.loss(model, batch)
        loss_sum += loss.item() * int(n)
        count += int(n)
    loss_sum, count = dist.all_reduce_sum(loss_sum, env), dist.all_reduce_sum(count, env)
    return {"val_loss": loss_sum / max(count, 1)}


# --- the final model -------------------------------------------------------------------------
def save_final_model(model: Transformer, tokenizer_dir: Path, out: Path) -> None:
    """config.json + model.safetensors (lmlab format, tied weights once) + tokenizer files into `out`.

    Files are written into a temporary sibling directory and moved in one by one with os.replace, so
    the run's other files (checkpoint, metrics) are untouched and no file is ever half-written.
    """
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=out))
    try:
        write(model, tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tokenizer_dir / name).exists():
                shutil.copyfile(tokenizer_dir / name, tmp / name)
        for f in tmp.iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
