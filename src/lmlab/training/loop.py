"""The one pre-training loop: corpus -> tokenizer -> token shards -> objective -> model -> checkpoints.

``pretrain(config)`` runs a whole job described by a ``PretrainConfig``; the objective (clm, mlm,
span), the model (any ``ModelConfig``) and the data plug in, the loop knows none of their details.
Per optimizer step it:

1. takes `grad_accum` global batches of blocks from the resumable sampler (this rank's slice),
2. turns each into model inputs with ``objective.prepare`` (a generator seeded by seed/step/micro-step/
   rank, so no hidden RNG state needs saving),
3. scales each micro-batch's mean loss by its share of the step's counted tokens *over all ranks*, so
   the gradient is the token-mean over the whole global batch whatever the accumulation or world size,
4. clips the global gradient norm, steps AdamW and the warm-up + cosine schedule.

It evaluates on the held-out blocks, checkpoints atomically (``checkpoint.py``), aborts on a
non-finite loss naming the step, saves and exits on SIGINT/SIGTERM, and at the end writes the final
model + tokenizer in lmlab's format into the run directory (so ``lmlab generate OUT_DIR`` loads it).

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

import contextlib
import json
import math
import shutil
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmlab.config import ModelConfig
from lmlab.corpus import BlockSampler, PackedBlocks, TokenStore, iter_documents, tokenize_corpus
from lmlab.errors import CheckpointError, ConfigError, DataError, LmlabError, choices_error
from lmlab.model import Transformer
from lmlab.objectives import build_objective
from lmlab.objectives.base import ARCH_OBJECTIVE, IGNORE_INDEX, OBJECTIVES, Objective
from lmlab.tokenizer_train import DEFAULT_SPECIAL_TOKENS, special_token_ids, train_tokenizer, with_sentinels
from lmlab.training import distributed as D
from lmlab.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from lmlab.training.config import PretrainConfig
from lmlab.training.metrics import MetricsLog, matmul_params, measure_peak_flops, plot_loss_curve
from lmlab.training.optim import build_optimizer, build_scheduler

PRECISIONS = ("auto", "fp32", "bf16")
CHECKPOINT_FORMAT = 1


class TrainingError(LmlabError):
    """Training cannot go on (e.g. the loss became NaN/inf)."""


# --- set-up ----------------------------------------------------------------------------------
def _validate(cfg: PretrainConfig) -> None:
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


def _precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on CUDA that supports it (auto/bf16), None (fp32) otherwise."""
    if name == "fp32":
        return None
    capable = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if name == "bf16" and not capable:
        if device.type == "cpu":
            return torch.bfloat16  # explicit request: CPU autocast supports bf16 (slow on most CPUs)
        raise ConfigError(f"precision='bf16' is not supported on {device}")
    return torch.bfloat16 if capable else None


def _prepare_tokenizer(cfg: PretrainConfig, out: Path, model_vocab: int, n_sentinels: int, env: D.DistEnv) -> Path:
    tok_dir = out / "tokenizer"
    if cfg.data.tokenizer is not None:
        given = Path(cfg.data.tokenizer)
        if not n_sentinels or special_token_ids(given)["sentinels"]:
            return given
        # span corruption needs sentinels the given tokenizer lacks: use a copy with them added
        if env.is_main and not (tok_dir / "tokenizer.json").exists():
            with_sentinels(given, tok_dir, n_sentinels)
        D.barrier(env)
        return tok_dir
    if env.is_main and not (tok_dir / "tokenizer.json").exists():
        vocab = cfg.data.vocab_size or model_vocab
        train_tokenizer(iter_documents(cfg.data.files, cfg.data.field), kind=cfg.data.tokenizer_kind,
                        vocab_size=vocab, special_tokens=DEFAULT_SPECIAL_TOKENS, n_sentinels=n_sentinels,
                        out_dir=tok_dir, show_progress=False)
    D.barrier(env)
    return tok_dir


def build_model_config(cfg: PretrainConfig, vocab_size: int, ids: dict) -> ModelConfig:
    """The model preset + overrides, with the vocabulary and special ids taken from the tokenizer."""
    base = ModelConfig.from_name(cfg.model.preset)
    fields = dict(cfg.model.overrides)
    fields.update(vocab_size=vocab_size, pad_token_id=ids.get("pad"), bos_token_id=ids.get("bos"),
                  eos_token_id=ids.get("eos"), mask_token_id=ids.get("mask"))
    if base.arch == "encoder_decoder":
        fields["decoder_start_token_id"] = ids.get("pad", 0)
    return base.replace(**fields)


def build_objective_for(name: str, model_cfg: ModelConfig, ids: dict, cfg: PretrainConfig) -> Objective:
    """Construct objective `name` from the tokenizer's special ids; check it fits the architecture."""
    obj_cls_arch = {"clm": "decoder", "mlm": "encoder", "span": "encoder_decoder"}[name]
    if obj_cls_arch != model_cfg.arch:
        raise ConfigError(f"objective {name!r} trains arch={obj_cls_arch!r} models; the model preset "
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


def _step_generator(*keys: int) -> torch.Generator:
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _counted(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())


class _Signals:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (then it saves and returns)."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict = {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# --- the loop --------------------------------------------------------------------------------
def pretrain(cfg: PretrainConfig, resume: bool = False, show_progress: bool = True) -> dict:
    """Run (or resume) the pre-training job `cfg` -> summary dict (steps, losses, throughput, paths)."""
    _validate(cfg)
    t = cfg.train
    env = D.setup(t.distributed, t.device)
    try:
        return _pretrain(cfg, env, resume, show_progress)
    finally:
        D.cleanup(env)


def _pretrain(cfg: PretrainConfig, env: D.DistEnv, resume: bool, show_progress: bool) -> dict:
    from tqdm.auto import tqdm

    t, out = cfg.train, Path(cfg.out_dir)
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not resume:
        raise ConfigError(f"{str(out)!r} already holds a checkpoint; pass --resume to continue it or choose another out_dir")
    if resume and not ckpt_path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {str(ckpt_path)!r}")
    state = load_checkpoint(ckpt_path) if resume else None  # read early: a bad file fails before any work

    base_model = ModelConfig.from_name(cfg.model.preset, **{k: v for k, v in cfg.model.overrides.items()})
    objective_name = t.objective or ARCH_OBJECTIVE[base_model.arch]
    seq_len = cfg.data.seq_len or base_model.max_seq_len
    if seq_len > base_model.max_seq_len and base_model.positional in ("learned", "sinusoidal"):
        raise ConfigError(f"data.seq_len={seq_len} exceeds the model's max_seq_len={base_model.max_seq_len}")
    n_sentinels = cfg.data.n_sentinels if objective_name == "span" else 0

    # 1. tokenizer and model config -----------------------------------------------------------
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    tok_dir = _prepare_tokenizer(cfg, out, base_model.vocab_size, n_sentinels, env)
    ids = special_token_ids(tok_dir)
    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    model_cfg = build_model_config(cfg, vocab_size, ids)
    objective = build_objective_for(objective_name, model_cfg, ids, cfg)
    if state is not None and state["model_config"] != model_cfg.to_dict():
        diff = sorted(k for k, v in model_cfg.to_dict().items() if state["model_config"].get(k) != v)
        raise CheckpointError(f"checkpoint {str(ckpt_path)!r} is for another model (differs in: {', '.join(diff)}); "
                              f"it cannot be resumed with this config")
    block_len = objective.block_length(seq_len)

    # 2. data ---------------------------------------------------------------------------------
    data_dir = out / "data"
    if env.is_main:
        tokenize_corpus(cfg.data.files, tok_dir / "tokenizer.json", data_dir, field=cfg.data.field,
                        eos_token_id=ids.get("eos"), show_progress=show_progress)
    D.barrier(env)
    store = TokenStore(data_dir)
    train_blocks = PackedBlocks(store, block_len, "train", cfg.data.val_fraction)
    val_blocks = PackedBlocks(store, block_len, "validation", cfg.data.val_fraction)
    sampler = BlockSampler(len(train_blocks), t.batch_size, t.seed, env.rank, env.world_size)

    # 3. model, optimizer, schedule -------------------------------------------------------------
    torch.manual_seed(t.seed)
    model = Transformer(model_cfg).to(env.device)
    flop_params, n_params = matmul_params(model), model.num_parameters()
    # wrap first: FSDP2 replaces the parameters by sharded ones, and the optimizer must hold those
    wrapped = D.wrap(model, env)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2))
    scheduler = build_scheduler(optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)
    step, tokens_seen = 0, 0
    sharded, dcp_root = t.sharded_checkpoint and env.mode == "fsdp", out / "checkpoint_dcp"
    if state is not None:
        if "sharded" in state:
            if env.mode != "fsdp":
                raise CheckpointError(f"{str(ckpt_path)!r} points to a sharded (DCP) checkpoint; resume it with "
                                      f"--distributed fsdp")
            D.load_sharded(wrapped, optimizer, dcp_root / state["sharded"])
        else:
            D.load_model_state(wrapped, state["model"], env)
            D.load_optimizer_state(wrapped, optimizer, state["optimizer"], env)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        del state
    autocast_dtype = _precision(t.precision, env.device)
    peak = measure_peak_flops(env.device, autocast_dtype or torch.float32) * env.world_size
    if env.is_main:
        (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    log = MetricsLog(out / "metrics.jsonl", fresh=not resume) if env.is_main else None

    def autocast():
        return torch.autocast(env.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    def evaluate() -> float | None:
        """Token-mean loss over up to eval_batches global batches of validation blocks."""
        n_batches = min(t.eval_batches, len(val_blocks) // t.batch_size) or (1 if len(val_blocks) >= env.world_size else 0)
        if n_batches == 0:
            return None
        per = min(t.batch_size, len(val_blocks))
        wrapped.eval()
        loss_sum = count = 0.0
        with torch.no_grad():
            for i in range(n_batches):
                idx = list(range(i * per, (i + 1) * per))[env.rank::env.world_size]
                batch = _to(objective.prepare(val_blocks.batch(idx), _step_generator(t.seed, 2**31, i, env.rank)), env.device)
                with autocast():
                    loss, n = objective.loss(wrapped, batch)
                loss_sum += loss.item() * int(n)
                count += int(n)
        wrapped.train()
        loss_sum, count = D.all_reduce_sum(loss_sum, env), D.all_reduce_sum(count, env)
        return loss_sum / max(count, 1)

    def checkpoint() -> None:
        """Full state dicts in checkpoint.pt; or, sharded, a DCP directory per step that checkpoint.pt points to."""
        payload = {"format": CHECKPOINT_FORMAT, "step": step, "tokens_seen": tokens_seen,
                   "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(), "rng": rng_state(),
                   "model_config": model_cfg.to_dict(), "run_config": cfg.to_dict(), "world_size": env.world_size}
        if sharded:
            # each rank writes its shards into a fresh step directory; checkpoint.pt is replaced only once
            # the directory is complete, so it always names a whole DCP checkpoint
            name = f"step_{step:08d}"
            D.save_sharded(wrapped, optimizer, dcp_root / name)
            D.barrier(env)
            payload["sharded"] = name
        else:
            payload["model"] = D.model_state_dict(wrapped, env)
            payload["optimizer"] = D.optimizer_state_dict(wrapped, optimizer, env)
        if env.is_main:
            save_checkpoint(payload, ckpt_path)
            if sharded:
                for old in dcp_root.glob("step_*"):
                    if old.name != payload["sharded"]:
                        shutil.rmtree(old, ignore_errors=True)
        D.barrier(env)

    def plot() -> None:
        if env.is_main:
            plot_loss_curve(log.read(), out / "loss.png", title=f"{cfg.model.preset} · {objective_name}")

    # 4. train --------------------------------------------------------------------------------
    wrapped.train()
    stop_at = t.steps if t.stop_after is None else min(t.steps, step + t.stop_after)
    bar = tqdm(total=t.steps, initial=step, desc=f"pretrain {objective_name}", unit="step",
               disable=not (show_progress and env.is_main), dynamic_ncols=True)
    window_tokens, window_time, last = 0, 0.0, {}
    val_loss = None
    interrupted = None
    with _Signals() as signals:
        while step < stop_at:
            t0 = time.perf_counter()
            micro = [objective.prepare(train_blocks.batch(sampler.next()), _step_generator(t.seed, step, m, env.rank))
                     for m in range(t.grad_accum)]
            counts = [_counted(b) for b in micro]
            total = D.all_reduce_sum(sum(counts), env)  # counted tokens in the global batch
            step_loss = torch.zeros((), device=env.device)  # summed on the device: one sync per step
            for m, (batch, n) in enumerate(zip(micro, counts)):
                batch = _to(batch, env.device)
                sync_ctx = (wrapped.no_sync() if env.mode == "ddp" and m < t.grad_accum - 1 else contextlib.nullcontext())
                with sync_ctx:
                    with autocast():
                        loss, _ = objective.loss(wrapped, batch)
                    # DDP/FSDP average gradients over ranks; the world_size factor turns that into a sum
                    (loss * (n * env.world_size / max(total, 1))).backward()
                step_loss += loss.detach().float() * n
            step_loss = D.all_reduce_sum(step_loss.item(), env) / max(total, 1)
            if not math.isfinite(step_loss):
                raise TrainingError(f"loss became {step_loss} at step {step + 1}; the weights were not updated and "
                                    f"the last checkpoint is intact (try a lower train.lr={t.lr} or check the data)")
            grad_norm = (torch.nn.utils.clip_grad_norm_(wrapped.parameters(), t.grad_clip)
                         if t.grad_clip > 0 else None)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # no device synchronize here: the loss .item() above already bounds how far the host runs
            # ahead (under one step), so window-averaged tokens/s stay right while the host prepares the
            # next batch during the optimizer kernels
            elapsed = time.perf_counter() - t0
            step_tokens = sum(b["input_ids"].numel() for b in micro) * env.world_size
            tokens_seen += step_tokens
            window_tokens += step_tokens
            window_time += elapsed
            if step % t.log_every == 0 or step == stop_at:
                tps = window_tokens / window_time
                mfu = 6 * flop_params * tps / peak
                last = {"loss": step_loss, "lr": lr, "tokens_per_s": tps, "mfu": mfu}
                if env.is_main:
                    log.write(kind="train", step=step, loss=step_loss, lr=lr, tokens=tokens_seen, tokens_per_s=tps,
                              mfu=mfu, grad_norm=float(grad_norm) if grad_norm is not None else None)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", mfu=f"{100 * mfu:.1f}%")
                window_tokens, window_time = 0, 0.0
            bar.update(1)
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                val_loss = evaluate()
                if env.is_main and val_loss is not None:
                    log.write(kind="eval", step=step, val_loss=val_loss)
                    bar.write(f"step {step}: validation loss {val_loss:.4f}")
                plot()
            if t.ckpt_every and step % t.ckpt_every == 0 and step < stop_at:
                checkpoint()
            if signals.received is not None:
                interrupted = signals.received
                break
    bar.close()

    # 5. finish: checkpoint, final eval + model, plot -------------------------------------------
    checkpoint()
    finished = step >= t.steps
    if finished:
        val_loss = evaluate()
        if env.is_main and val_loss is not None:
            log.write(kind="eval", step=step, val_loss=val_loss)
    final_model_state = D.model_state_dict(wrapped, env) if finished else None
    if finished and env.is_main:
        final = Transformer(model_cfg)
        final.load_state_dict(final_model_state)
        save_final_model(final, tok_dir, out)
    plot()
    summary = {"step": step, "finished": finished, "interrupted": interrupted, "train_loss": last.get("loss"),
               "val_loss": val_loss, "tokens_seen": tokens_seen, "tokens_per_s": last.get("tokens_per_s"),
               "mfu": last.get("mfu"), "peak_flops": peak, "n_params": n_params,
               "objective": objective_name, "out_dir": str(out), "checkpoint": str(ckpt_path),
               "rank": env.rank, "world_size": env.world_size}
    if env.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    D.barrier(env)  # ranks leave together: one tearing down gloo while another still writes can abort it
    return summary


def save_final_model(model: Transformer, tokenizer_dir: Path, out: Path) -> None:
    """config.json + model.safetensors (lmlab format, tied weights once) + tokenizer files into `out`.

    Files are written into a temporary sibling directory and moved in one by one with os.replace, so
    the run's other files (checkpoint, metrics) are untouched and no file is ever half-written.
    """
    try:
        from lmlab.checkpoints.native import write
    except ImportError:  # the checkpoints package is optional for training; same format, written here
        write = _write_native
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


def _write_native(model: Transformer, directory: Path) -> None:
    from safetensors.torch import save_file

    cfg = model.config
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings and "lm_head.weight" in state:
        del state["lm_head.weight"]
    (directory / "config.json").write_text(json.dumps({"lmlab_format": 1, **cfg.to_dict()}, indent=2, sort_keys=True) + "\n")
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt", "lmlab_format": "1"})
