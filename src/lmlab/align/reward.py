"""A reward model: any lmlab model with a scalar head, trained on preference pairs in the one loop.

``RewardModel(backbone)`` pools the backbone's last hidden states into one vector per sequence and maps
it to a score with ``head = Linear(C, 1)``. The pooling follows the architecture:

* decoder           the hidden state of the final real token. Under the causal mask it is the only
                    position that has read the whole prompt and response (every earlier one sees a prefix).
* encoder           the mean over real tokens (padding masked out): every position sees everything, and
                    the mean is what sentence encoders such as all-MiniLM-L6-v2 were trained to use.
* encoder_decoder   the mean of the encoder's output over real tokens (the decoder is not run).

``response_mean`` (any architecture, ``--pooling response_mean``) averages only the response's positions
(its tokens and end token): they have read the dialogue (all of it in an encoder), and the score is not
diluted by the dialogue's positions, which are most of the input and nearly the same in both rows of a pair.

What it reads: the prompt the policy sees, built with ``lmlab.prompting`` from the pair's ``prompt`` (the
dialogue), then the response and an end token (eos; [SEP] for BERT-style encoders, whose prompt
encoding already starts with [CLS] and ends with [SEP]). A long dialogue is cut in the middle to fit
``max_len``, as fine-tuning cuts it. The recipe (template, instruction, chat) is saved with the model so
scoring writes the input exactly as training did.

``train_reward(RewardSettings)`` runs its ``build`` through ``lmlab.training.job.run_job`` and the one
loop (AdamW, warm-up + cosine, checkpoints, exact resume, progress, metrics.jsonl), optionally through
LoRA, evaluating pairwise accuracy on held-out pairs and keeping the best. Run directory::

    OUT/best/, OUT/final/   the reward model: reward_config.json, reward_head.safetensors and either
                            backbone/ (every weight, lmlab format, with its tokenizer) or adapter/ (LoRA)
    OUT/checkpoint.pt, OUT/metrics.jsonl, OUT/loss.png, OUT/run_config.json, OUT/summary.json

``load_reward(DIR)`` reads one back; ``RewardScorer`` scores (prompt, response) texts in batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from safetensors.torch import load_file, save_file

from lmlab.adapt.lora import LoraConfig, apply_lora, linear_names
from lmlab.adapt.peft import check_savable, save_adapter
from lmlab.adapt.recipe import Recipe
from lmlab.align.prefs import PreferencePair, read_preferences
from lmlab.checkpoints import load_model, load_tokenizer, save_model
from lmlab.errors import CheckpointError, ConfigError, DataError, LmlabError
from lmlab.objectives.reward import PairwiseReward, bradley_terry_loss, pad_rows, response_mask
from lmlab.tasks.summarize.experiments import INSTRUCTION
from lmlab.training.config import TrainSection
from lmlab.training.job import Built, JobSpec, run_job
from lmlab.training.sft_data import SFTBatches

CONFIG_FILE, HEAD_FILE = "reward_config.json", "reward_head.safetensors"
POOLING = {"decoder": "last", "encoder": "mean", "encoder_decoder": "mean"}  # the default per architecture
POOLINGS = ("last", "mean", "response_mean")


class RewardModel(nn.Module):
    """backbone (any lmlab Transformer) -> pooled hidden state (B, C) -> Linear(C, 1) -> scores (B,)."""

    def __init__(self, backbone: nn.Module, pooling: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.arch = backbone.config.arch
        self.pooling = pooling or POOLING[self.arch]
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling {self.pooling!r}: choose one of {', '.join(POOLINGS)}")
        C = backbone.config.d_model
        self.head = nn.Linear(C, 1)
        # small initial scores: std 1/sqrt(C+1) keeps the first margins O(1) whatever the width
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(C + 1))
        nn.init.zeros_(self.head.bias)
        self.head.to(dtype=backbone.dtype, device=backbone.device)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               pool_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) right-padded ids and mask -> (B, C) one vector per sequence. ``response_mean`` needs
        `pool_mask` (B, T), 1 on each row's response positions."""
        if self.pooling == "response_mean":
            if pool_mask is None:
                raise ValueError("response_mean pooling needs a pool_mask (1 on the response's positions)")
            hidden = (self.backbone(input_ids, return_hidden=True) if self.arch == "decoder"
                      else self.backbone.encode(input_ids, attention_mask))  # (B, T, C)
            weights = (pool_mask * attention_mask).to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, C)
        if self.pooling == "last":
            # right padding never reaches a real token under the causal mask, so no mask is passed
            # (SDPA's fused causal kernel then runs, as in fine-tuning)
            hidden = self.backbone(input_ids, return_hidden=True)  # (B, T, C)
            last = attention_mask.sum(1) - 1  # (B,) index of each row's final real token
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, C)
        hidden = self.backbone.encode(input_ids, attention_mask)  # (B, T, C)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, C)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pool_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.pooled(input_ids, attention_mask, pool_mask)).squeeze(-1).float()  # (B,)


# --- the input a reward model reads ------------------------------------------------------------------
@dataclass
class RewardConfig:
    """What a saved reward model needs to rebuild itself and to write its input as it was trained."""

    base: str  # the backbone's source (registry name or path)
    arch: str
    pooling: str
    template: str
    instruction: str | None
    chat: bool
    max_len: int
    tokenizer: str  # fingerprint of the vocabulary (see tokenizer_fingerprint)
    lora: dict | None = None  # the LoRA config when the backbone is base + adapter/
    trained_on: dict = field(default_factory=dict)  # pairs files, counts, held-out accuracy

    def save(self, directory: Path) -> None:
        (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "RewardConfig":
        path = directory / CONFIG_FILE
        if not path.exists():
            raise CheckpointError(f"{str(directory)!r} is not a reward model: it has no {CONFIG_FILE} "
                                  f"(lmlab reward train writes OUT/best and OUT/final)")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a valid reward config ({exc})") from None


PROBE = "#Person1#: Hello, Ann!\n#Person2#: Hi."


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary (token -> id) and of how a probe text is encoded with special tokens.

    Equal fingerprints mean the same ids for the same text, [CLS]/[SEP] or BOS included: two tokenizers
    with one vocabulary but different special-token handling would feed the model different inputs.
    """
    vocab = tokenizer.backend.get_vocab() if hasattr(tokenizer, "backend") else {}
    probe = tokenizer.encode(PROBE, add_special_tokens=True)
    return hashlib.sha256(json.dumps([sorted(vocab.items()), probe]).encode()).hexdigest()[:16]


def check_same_tokenizer(config: RewardConfig, policy_tokenizer, policy: str) -> None:
    """Token ids pass from a policy to the reward model only when both read text the same way."""
    theirs = tokenizer_fingerprint(policy_tokenizer)
    if theirs != config.tokenizer:
        raise ConfigError(f"the reward model (base {config.base!r}) uses another tokenizer than the policy {policy!r} "
                          f"(vocabulary {config.tokenizer} vs {theirs}), so the policy's token ids cannot be scored; "
                          f"score the decoded text instead, or train the reward model on {policy!r}")


def end_token(tokenizer, arch: str) -> int:
    """The token that closes a response: eos for generative models, [SEP] for BERT-style encoders."""
    end = tokenizer.eos_token_id if arch != "encoder" else (tokenizer.sep_token_id or tokenizer.eos_token_id)
    if end is None:
        raise ConfigError("the tokenizer has neither an end-of-sequence nor a [SEP] token to close a response")
    return end


def encode_example(prompt: str, response: str, tokenizer, config: RewardConfig, where: str = "") -> list[int]:
    """Prompt (cut in the middle to fit) + response + end token -> one row of ids, at most max_len long."""
    return encode_parts(prompt, response, tokenizer, config, where)[0]


def encode_parts(prompt: str, response: str, tokenizer, config: RewardConfig, where: str = "") -> tuple[list[int], int]:
    """``encode_example``'s row and how many of its last ids are the response (with its end token).

    Only the dialogue is ever cut to fit: the response keeps up to half of max_len (a summary is far
    shorter; only a long recitation reaches that) and the prompt gets the rest."""
    lead = "" if config.chat else " "  # plain templates end at "Summary:"; the response follows a space
    body = tokenizer.encode(lead + response.strip())[: config.max_len // 2]  # never more than half the budget
    body = body + [end_token(tokenizer, config.arch)]
    recipe = Recipe(config.template, config.instruction, config.chat, "prompt", "response")
    try:
        text = recipe.prompt(prompt, tokenizer, max_prompt_tokens=config.max_len - len(body)).text
    except DataError as exc:
        raise DataError(f"{where or 'example'}: does not fit max_len={config.max_len} even with the prompt cut "
                        f"({exc}); raise --max-len") from None
    return tokenizer.encode(text, add_special_tokens=True) + body, len(body)


def default_recipe(arch: str, tokenizer) -> dict[str, Any]:
    """The prompt the summarization policy is given: the lab's instruction, in the chat template for decoders."""
    chat = arch == "decoder" and bool(getattr(tokenizer, "chat_template", None))
    return {"template": "instruction", "instruction": INSTRUCTION, "chat": chat}


# --- saving and loading ------------------------------------------------------------------------------
def save_reward(model: RewardModel, directory: Path, config: RewardConfig, tokenizer, lora=None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if lora is not None:
        save_adapter(model.backbone, directory / "adapter", lora, base_model=config.base)
    else:
        was_training = model.training
        save_model(model.backbone, directory / "backbone", tokenizer)
        model.train(was_training)
    head = {k: v.detach().float().cpu().contiguous() for k, v in model.head.state_dict().items()}
    save_file(head, str(directory / HEAD_FILE))
    config.save(directory)


def load_reward(directory: str | Path) -> tuple[RewardModel, Any, RewardConfig]:
    """A saved reward model -> (model in eval mode, its tokenizer, its config)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"--reward {str(directory)!r} is not a directory (pass OUT/best from lmlab reward train)")
    config = RewardConfig.load(directory)
    if config.lora is not None:
        backbone = load_model(config.base, adapter=directory / "adapter")
        tokenizer = load_tokenizer(config.base)
    else:
        backbone = load_model(directory / "backbone")
        tokenizer = _trained_tokenizer(config, directory / "backbone")
    model = RewardModel(backbone, config.pooling)
    head = load_file(str(directory / HEAD_FILE))
    model.head.load_state_dict({k: v.to(model.head.weight.dtype) for k, v in head.items()})
    if tokenizer_fingerprint(tokenizer) != config.tokenizer:
        raise CheckpointError(f"{directory}: the tokenizer found for {config.base!r} is not the one the reward model "
                              f"was trained with (fingerprint {tokenizer_fingerprint(tokenizer)} vs {config.tokenizer})")
    return model.eval(), tokenizer, config


def _trained_tokenizer(config: RewardConfig, saved: Path):
    """The tokenizer that encodes exactly as in training: the base's own where it still loads, else the copy
    saved beside the weights. (A saved copy can encode differently: a BERT tokenizer written by
    ``Tokenizer.save`` and read back by ``from_dir`` loses its [CLS] ... [SEP] post-processor.)"""
    candidates = []
    try:
        candidates.append(load_tokenizer(config.base))
    except (LmlabError, OSError):
        pass
    candidates.append(load_tokenizer(saved))
    for tokenizer in candidates:
        if tokenizer_fingerprint(tokenizer) == config.tokenizer:
            return tokenizer
    return candidates[-1]  # load_reward names the mismatch


class RewardScorer:
    """Scores (prompt, response) texts with a reward model, in batches sorted by length (little padding)."""

    def __init__(self, model: RewardModel, tokenizer, config: RewardConfig, batch_size: int = 8):
        self.model, self.tokenizer, self.config, self.batch_size = model, tokenizer, config, batch_size

    @classmethod
    def load(cls, directory: str | Path, batch_size: int = 8) -> "RewardScorer":
        return cls(*load_reward(directory), batch_size=batch_size)

    @torch.inference_mode()
    def score_ids(self, rows: Sequence[Sequence[int]], response_lengths: Sequence[int] | None = None) -> list[float]:
        """Scores of rows of ids; `response_lengths` (each row's response ids, end token included) are
        needed by ``response_mean`` pooling."""
        if self.model.pooling == "response_mean" and response_lengths is None:
            raise ValueError("a response_mean reward model needs each row's response length")

        was_training = self.model.training
        self.model.eval()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        scores = [0.0] * len(rows)
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                ids, mask = pad_rows([rows[i] for i in idx], pad)  # (b, T) each
                device = self.model.head.weight.device
                pool = (response_mask([rows[i] for i in idx], [response_lengths[i] for i in idx]).to(device)
                        if response_lengths is not None else None)  # (b, T)
                for i, s in zip(idx, self.model(ids.to(device), mask.to(device), pool).tolist()):
                    scores[i] = s
        finally:
            self.model.train(was_training)
        return scores

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One score per (prompt, response); higher is preferred."""
        if len(prompts) != len(responses):
            raise DataError(f"{len(prompts)} prompts but {len(responses)} responses to score")
        parts = [encode_parts(p, r, self.tokenizer, self.config, f"example {i + 1}")
                 for i, (p, r) in enumerate(zip(prompts, responses))]
        return self.score_ids([row for row, _ in parts], [n for _, n in parts])

    def accuracy(self, pairs: Sequence[PreferencePair]) -> dict[str, float]:
        """Pairwise accuracy (chosen scored above rejected), the mean margin and the Bradley–Terry loss."""
        chosen = self.score([p.prompt for p in pairs], [p.chosen for p in pairs])
        rejected = self.score([p.prompt for p in pairs], [p.rejected for p in pairs])
        return pair_metrics(torch.tensor(chosen), torch.tensor(rejected))


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    margin = chosen - rejected
    return {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()),
            "val_loss": float(bradley_terry_loss(chosen, rejected)), "pairs": int(margin.numel())}


# --- training ----------------------------------------------------------------------------------------
@dataclass
class RewardSettings:
    base: str
    prefs: str
    out: str = "runs/reward"
    eval_prefs: str | None = None  # held-out pairs: accuracy at each evaluation; the best is kept
    lora: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] | None = None  # None: every attention and feed-forward linear the model has
    epochs: float = 2.0
    batch_size: int = 8  # pairs per micro-batch
    grad_accum: int = 1
    lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.01
    max_len: int = 512  # prompt + response tokens (capped at the model's context)
    pooling: str | None = None  # None: the architecture's (POOLING); "response_mean": the response's positions
    eval_every: int = 50
    ckpt_every: int = 50
    seed: int = 0
    precision: str = "fp32"
    stop_after: int | None = None


@dataclass
class TokenizedPreference:
    """A pair as rows of ids. ``prompt``/``response`` are the chosen row's parts (SFTBatches sorts by them)."""

    id: str
    prompt: list[int]
    response: list[int]
    rejected: list[int]  # the whole rejected row
    truncated: bool = False
    chosen_n: int = 0  # response ids (end token included) at the end of the chosen row
    rejected_n: int = 0  # ... of the rejected row

    @property
    def chosen(self) -> list[int]:
        return self.prompt + self.response


def tokenize_preferences(pairs: Sequence[PreferencePair], tokenizer, config: RewardConfig, name: str
                         ) -> list[TokenizedPreference]:
    out = []
    for p in pairs:
        where = f"{name}:{p.line}"
        chosen, chosen_n = encode_parts(p.prompt, p.chosen, tokenizer, config, where)
        rejected, rejected_n = encode_parts(p.prompt, p.rejected, tokenizer, config, where)
        out.append(TokenizedPreference(where, chosen, [], rejected, chosen_n=chosen_n, rejected_n=rejected_n))
    return out


def _lora_targets(model, requested) -> tuple[str, ...]:
    if requested:
        return tuple(requested)
    short = set(linear_names(model))  # short name -> full names
    wanted = [t for t in ("q", "k", "v", "o", "gate", "up", "down") if t in short]
    return tuple(wanted) or ("q", "v")


def train_reward(s: RewardSettings, resume: bool = False, show_progress: bool = True) -> dict:
    """Train (or resume) a reward model -> summary (steps, held-out accuracy, paths)."""
    for name in ("batch_size", "grad_accum", "max_len"):
        if getattr(s, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(s, name)} must be >= 1")
    if not s.epochs > 0:
        raise ConfigError(f"--epochs {s.epochs} must be > 0")
    if not s.lr > 0:
        raise ConfigError(f"--lr {s.lr} must be > 0")
    if s.pooling is not None and s.pooling not in POOLINGS:
        raise ConfigError(f"--pooling {s.pooling!r}: choose one of {', '.join(POOLINGS)}")
    train_pairs = read_preferences(s.prefs)
    eval_pairs = read_preferences(s.eval_prefs) if s.eval_prefs else []
    if not train_pairs:
        raise DataError(f"--prefs {s.prefs!r} holds no preference pairs")
    if s.eval_prefs and not eval_pairs:
        raise DataError(f"--eval-prefs {s.eval_prefs!r} holds no preference pairs")
    # the schedule's length is set by build, once the batches per epoch are known
    t = TrainSection(steps=1, batch_size=s.batch_size, grad_accum=s.grad_accum, lr=s.lr,
                     warmup_steps=s.warmup_steps, weight_decay=s.weight_decay,
                     eval_every=s.eval_every if eval_pairs else 0, ckpt_every=s.ckpt_every, log_every=1, seed=s.seed,
                     precision=s.precision, stop_after=s.stop_after, min_lr_ratio=0.1)
    identity = {"reward": {k: v for k, v in dataclasses.asdict(s).items() if k not in ("stop_after", "out")}}
    spec = JobSpec(s.out, t, dataclasses.asdict(s), identity, resume, show_progress)
    return run_job(spec, lambda env: build(s, t, train_pairs, eval_pairs, env, show_progress))


def build(s: RewardSettings, t: TrainSection, train_pairs, eval_pairs, env, show_progress: bool = True) -> Built:
    """The backbone with its scalar head (LoRA or every weight trainable), the tokenized pairs and how to save."""
    tokenizer = load_tokenizer(s.base)
    backbone = load_model(s.base).to(env.device)
    arch = backbone.config.arch
    config = RewardConfig(base=s.base, arch=arch, pooling=s.pooling or POOLING[arch], **default_recipe(arch, tokenizer),
                          max_len=min(s.max_len, backbone.config.max_seq_len), tokenizer=tokenizer_fingerprint(tokenizer))
    torch.manual_seed(s.seed)
    model = RewardModel(backbone, config.pooling)
    lora = None
    if s.lora:
        lora = LoraConfig(r=s.lora_r, alpha=s.lora_alpha, targets=_lora_targets(backbone, s.lora_targets))
        report = apply_lora(backbone, lora)
        check_savable(backbone)
        config.lora = dataclasses.asdict(lora)
        if show_progress:
            print(report)
    else:
        model.requires_grad_(True)
    model.head.requires_grad_(True)
    model.train()
    train = tokenize_preferences(train_pairs, tokenizer, config, str(s.prefs))
    held_out = tokenize_preferences(eval_pairs, tokenizer, config, str(s.eval_prefs)) if eval_pairs else []

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    objective = PairwiseReward(pad)
    batches = RewardBatches([(train, 1.0)], objective, s.batch_size, s.seed, env,
                            with_lengths=config.pooling == "response_mean")
    t.steps = max(1, math.ceil(s.epochs * batches.batches_per_epoch / s.grad_accum))
    t.warmup_steps = min(s.warmup_steps, t.steps // 2)

    def evaluate(m) -> dict[str, float]:
        scorer = RewardScorer(model, tokenizer, config, batch_size=max(8, 2 * s.batch_size))
        chosen = torch.tensor(scorer.score_ids([e.chosen for e in held_out], [e.chosen_n for e in held_out]))
        rejected = torch.tensor(scorer.score_ids([e.rejected for e in held_out], [e.rejected_n for e in held_out]))
        metrics = pair_metrics(chosen, rejected)
        metrics.pop("pairs")
        return metrics

    def save(directory: Path, metrics: dict | None = None) -> None:
        config.trained_on = {"prefs": str(s.prefs), "pairs": len(train), "eval_prefs": s.eval_prefs,
                             "eval_pairs": len(held_out), **({"held_out": metrics} if metrics else {})}
        save_reward(model, directory, config, tokenizer, lora)

    return Built(
        name=f"reward · {s.base}", model=model, objective=objective, batches=batches, save=save,
        evaluate=evaluate if held_out else None, select="accuracy", trainable_only=lora is not None,
        announce=lambda: (f"reward model on {s.base} ({arch}, {config.pooling} pooling{', LoRA' if lora else ''}): "
                          f"{len(train)} training pairs, {len(held_out)} held-out pairs, {t.steps} steps of "
                          f"{s.batch_size} x {s.grad_accum} pairs"),
        summary={"train_pairs": len(train), "eval_pairs": len(held_out)})


class RewardBatches(SFTBatches):
    """SFTBatches' shuffled, length-bucketed, resumable order over tokenized preferences; pairs per batch."""

    def __init__(self, sources, objective, batch_size: int, seed: int, env, with_lengths: bool = False):
        super().__init__(sources, objective, batch_size, seed, env)
        self.with_lengths = with_lengths  # response_mean pooling needs each row's response length

    def collate_examples(self, batch):
        lengths = [(e.chosen_n, e.rejected_n) for e in batch] if self.with_lengths else None
        return self.objective.collate([(e.chosen, e.rejected) for e in batch], lengths)
