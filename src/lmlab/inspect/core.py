"""The Inspection: everything one forward pass of a model computes on one text, in one object.

``inspect_model(model, tokenizer, text, target=None, ...)`` runs the model once with a ``Recorder`` and
returns an ``Inspection``; ``Inspection.to_json()`` is the contract shared by ``lmlab inspect --json``,
``--html`` and a server route (``inspect_json``)::

    {"tokens": [...], "ids": [...], "attentions": [layer][head][query][key],
     "next_token": [{"id", "token", "prob", "kept"}, ...] (sorted by prob), ...}

Encoder-decoders carry ``encoder_attentions``, ``decoder_attentions`` and ``cross_attentions`` instead of
``attentions`` (and the decoder's text as ``target_tokens`` / ``target_ids``).

What the output means per variant:

* decoder           the next-token distribution after the text;
* encoder-decoder   the decoder's next-token distribution after ``target`` (decoder start token + target);
* encoder with an MLM head  the prediction at the first [MASK] token, else at the last non-special token;
* encoder without a head (sentence encoders such as MiniLM): no distribution, ``next_token`` is [].

The sampling filter applies the chain ``lmlab.generation.processors.build_processors`` builds for
``GenerationConfig(do_sample=True, temperature, top_k, top_p, min_p)`` -- the chain ``generate`` samples
from -- so ``kept`` is exactly the set a sampler could draw from.

Shapes: T text tokens, S key length, L layers, H heads, C d_model, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmlab.errors import DataError
from lmlab.generation.config import GenerationConfig
from lmlab.generation.processors import build_processors
from lmlab.inspect.record import Recorder, check_layers, stacks_of
from lmlab.nn.positional import sinusoidal_table, t5_relative_bucket

LENS_TOP = 5  # tokens per logit-lens cell
NEXT_TOP = 50  # entries of next_token in the JSON


@dataclass
class Inspection:
    """What a model computed on one text. Tensors are fp32 on CPU; ``to_json()`` gives plain lists."""

    model: str
    arch: str
    tokens: list[str]
    ids: list[int]
    special: list[bool]
    attentions: dict[str, torch.Tensor]  # stack -> (L_rec, H, T_q, S)
    layers: dict[str, list[int]]  # stack -> recorded layer indices
    head_summary: dict[str, list[list[dict]]]  # stack -> [layer][head] {"entropy", "distance", "first"}
    residual_norms: dict[str, torch.Tensor]  # stack -> (L+1, T)
    ffn_zero: dict[str, list[float]]  # stack -> (L,)
    embeddings: dict[str, Any]
    positions: dict[str, Any]
    logit_lens: dict[str, Any] | None
    output: dict[str, Any] | None  # {"position", "logits" (V,), "probs" (V,), "kept" (V,) bool, "sampling"}
    target_tokens: list[str] = field(default_factory=list)
    target_ids: list[int] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tokenizer_name: str = ""
    n_layers: dict[str, int] = field(default_factory=dict)  # stack -> layers in the model
    text: str = ""
    target: str | None = None
    summary_turns: dict | None = None  # lmlab.inspect.turns: which dialogue turns a summary drew on

    def attention(self, layer: int, head: int, stack: str | None = None) -> torch.Tensor:
        """One head's weights (T_q, S); `layer` is the model's layer index (must have been recorded)."""
        stack = stack or self.main_stack
        if stack not in self.attentions:
            raise DataError(f"stack={stack!r} was not recorded; choose one of: {', '.join(self.attentions)}")
        layers = self.layers[stack]
        check_layers([layer], self.n_layers[stack])
        if layer not in layers:
            raise DataError(f"layer {layer} was not recorded; recorded layers: {layers}")
        weights = self.attentions[stack][layers.index(layer)]
        check_layers([head], weights.shape[0], "head")
        return weights[head]

    @property
    def main_stack(self) -> str:
        return "decoder" if "decoder" in self.attentions else "encoder"

    def summary(self, top: int = 5) -> str:
        """A few lines for the terminal: tokens, the next-token distribution, per-layer statistics."""
        lines = [f"{self.model} ({self.arch}): {len(self.ids)} tokens: {' | '.join(self.tokens)}"]
        if self.target_tokens:
            lines.append(f"target: {' | '.join(self.target_tokens)}")
        if self.output is not None:
            s = self.output["sampling"]
            kept = int(self.output["kept"].sum())
            best = ", ".join(f"{t['token']!r} {t['prob']:.3f}" for t in self.next_token(top))
            lines.append(f"next token: {best}")
            lines.append(f"sampling filter (temperature={s['temperature']}, top_k={s['top_k']}, top_p={s['top_p']}, "
                         f"min_p={s['min_p']}): {kept} of {self.output['kept'].numel()} tokens kept")
        for stack, summary in self.head_summary.items():
            for layer, heads in zip(self.layers[stack], summary):
                focused = min(range(len(heads)), key=lambda h: heads[h]["entropy"])
                extra = ""
                if stack != "cross":
                    norm = float(self.residual_norms[stack][layer + 1, -1])
                    extra = f"  |x| {norm:8.1f}  ffn near-zero {self.ffn_zero[stack][layer]:.2f}"
                lines.append(f"{stack:8s} layer {layer:2d}: sharpest head {focused} (entropy "
                             f"{heads[focused]['entropy']:.2f}){extra}")
        if self.summary_turns is not None:
            t = self.summary_turns
            lines.append(f"summary: {t['summary']}")
            lines.extend(f"  {share:6.1%}  {turn}" for turn, share in zip(t["turns"], t["share"]))
        lines.extend(self.notes)
        return "\n".join(lines)

    def next_token(self, top: int = NEXT_TOP) -> list[dict]:
        """The `top` most likely next tokens, sorted by probability, with whether the sampling filter keeps them."""
        if self.output is None:
            return []
        probs, kept = self.output["probs"], self.output["kept"]
        values, order = torch.topk(probs, min(top, probs.numel()))
        return [{"id": int(i), "token": self.output["pieces"][n], "prob": float(p), "kept": bool(kept[i])}
                for n, (i, p) in enumerate(zip(order.tolist(), values.tolist()))]

    # --- figures (lmlab.inspect.plots; matplotlib) ----------------------------------------------
    def plot_attention(self, layer: int | None = None, stack: str | None = None):
        from lmlab.inspect.plots import plot_attention

        return plot_attention(self, layer, stack)

    def plot_embeddings(self):
        from lmlab.inspect.plots import plot_embeddings

        return plot_embeddings(self)

    def plot_positions(self):
        from lmlab.inspect.plots import plot_positions

        return plot_positions(self)

    def plot_logit_lens(self):
        from lmlab.inspect.plots import plot_logit_lens

        return plot_logit_lens(self)

    def plot_sampling(self, top: int = 20):
        from lmlab.inspect.plots import plot_sampling

        return plot_sampling(self, top)

    def to_json(self, decimals: int = 4, attentions: bool = True) -> dict:
        """The JSON contract (see the module docstring); floats rounded to `decimals` places.
        ``attentions=False`` leaves the attention weights out (the page carries them in a compact form)."""
        r = lambda t: _rounded(t, decimals)  # noqa: E731
        out: dict[str, Any] = {
            "model": self.model, "arch": self.arch, "tokenizer": self.tokenizer_name, "text": self.text, "target": self.target,
            "tokens": self.tokens, "ids": self.ids, "special": self.special,
        }
        if self.arch == "encoder_decoder":
            out.update(target_tokens=self.target_tokens, target_ids=self.target_ids)
            for stack in ("encoder", "decoder", "cross") if attentions else ():
                out[f"{stack}_attentions"] = r(self.attentions[stack])
        elif attentions:
            out["attentions"] = r(self.attentions[self.main_stack])
        out["layers"] = self.layers
        out["head_summary"] = self.head_summary
        out["residual_norms"] = {k: r(v) for k, v in self.residual_norms.items()}
        out["ffn_near_zero"] = {k: [round(x, decimals) for x in v] for k, v in self.ffn_zero.items()}
        out["embeddings"] = _jsonable(self.embeddings, decimals)
        out["positions"] = _jsonable(self.positions, decimals)
        out["logit_lens"] = _jsonable(self.logit_lens, decimals)
        out["next_token"] = self.next_token()
        if self.output is not None:
            out["sampling"] = dict(self.output["sampling"], kept_count=int(self.output["kept"].sum()),
                                   position=self.output["position"])
        out["steps"] = [{k: v for k, v in s.items() if k != "logits"} for s in _jsonable(self.steps, decimals)]
        if self.summary_turns is not None:
            out["summary_turns"] = _jsonable(self.summary_turns, decimals)
        out["notes"] = self.notes
        return out


def _rounded(t: torch.Tensor, decimals: int):
    return torch.round(t.float(), decimals=decimals).tolist()


def _jsonable(value, decimals: int):
    if isinstance(value, torch.Tensor):
        return _rounded(value, decimals) if value.is_floating_point() else value.tolist()
    if isinstance(value, dict):
        return {k: _jsonable(v, decimals) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, decimals) for v in value]
    if isinstance(value, float):
        return round(value, decimals)
    return value


# --- the parts -------------------------------------------------------------------------------

def head_summary(weights: torch.Tensor) -> list[list[dict]]:
    """(L, H, T, S) -> [layer][head] {"entropy" (nats, mean over queries), "distance" (mean |q - k| attended,
    in tokens), "first" (mean weight on key 0)}. Queries are aligned to the last T keys (S >= T)."""
    L, H, T, S = weights.shape
    q_pos = torch.arange(S - T, S, dtype=torch.float32)[:, None]  # (T, 1)
    k_pos = torch.arange(S, dtype=torch.float32)[None, :]  # (1, S)
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean(-1)  # (L, H)
    distance = (weights * (q_pos - k_pos).abs()).sum(-1).mean(-1)  # (L, H)
    first = weights[..., 0].mean(-1)  # (L, H)
    return [[{"entropy": round(float(entropy[l, h]), 4), "distance": round(float(distance[l, h]), 3),
              "first": round(float(first[l, h]), 4)} for h in range(H)] for l in range(L)]


def cross_summary(weights: torch.Tensor) -> list[list[dict]]:
    """Cross-attention has no query/key distance; entropy and share on the first encoder token only."""
    entropy = -(weights * weights.clamp_min(1e-12).log()).sum(-1).mean(-1)
    first = weights[..., 0].mean(-1)
    L, H = entropy.shape
    return [[{"entropy": round(float(entropy[l, h]), 4), "first": round(float(first[l, h]), 4)}
             for h in range(H)] for l in range(L)]


def _float_embedding(model: nn.Module) -> torch.Tensor:
    embed = model.tok_embed
    if isinstance(embed, nn.Embedding):
        return embed.weight.detach().float()
    return embed.dequantize().float()  # a quantized embedding (lmlab.quant)


@torch.no_grad()
def embedding_view(model: nn.Module, ids: list[int], piece, k: int = 8) -> dict:
    """Each token's k nearest neighbours in the embedding table (cosine; itself excluded) and a 2-D PCA."""
    table = _float_embedding(model)  # (V, C)
    unit = table / table.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    unique = sorted(set(ids))
    cos = unit[unique] @ unit.T  # (U, V)
    cos[torch.arange(len(unique)), torch.tensor(unique)] = -2.0  # not its own neighbour
    top = torch.topk(cos, k, dim=-1)
    by_id = {i: [{"id": int(j), "token": piece(int(j)), "cos": round(float(c), 4)}
                 for j, c in zip(top.indices[n].tolist(), top.values[n].tolist())] for n, i in enumerate(unique)}
    x = table[ids]  # (T, C)
    x = x - x.mean(0, keepdim=True)
    if len(ids) >= 2:
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        pca = x @ vh[:2].T  # (T, 2)
        if pca.shape[1] < 2:
            pca = torch.cat([pca, torch.zeros(len(ids), 2 - pca.shape[1])], dim=1)
        var = (s ** 2) / (s ** 2).sum().clamp_min(1e-12)
        explained = [float(v) for v in var[:2]] + [0.0] * (2 - min(2, len(var)))
    else:
        pca, explained = torch.zeros(len(ids), 2), [0.0, 0.0]
    return {"neighbours": [by_id[i] for i in ids], "pca": pca, "pca_explained": explained}


@torch.no_grad()
def position_view(model: nn.Module, T: int, S_dec: int | None = None, n_show: int = 64) -> dict:
    """What the model's positional scheme looks like (kind in ``ModelConfig.positional``)."""
    cfg = model.config
    kind = cfg.positional
    out: dict[str, Any] = {"kind": kind}
    P = min(max(T, S_dec or 0, n_show), cfg.max_seq_len)
    if kind == "sinusoidal":
        out["sinusoidal"] = sinusoidal_table(P, cfg.d_model)  # (P, C)
    elif kind == "learned":
        pos = model.pos_embed.weight[:P].detach().float()
        unit = pos / pos.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        out["learned_similarity"] = unit @ unit.T  # (P, P) cosine between positions
    elif kind == "rope":
        stack = model.decoder if model.decoder is not None else model.encoder
        inv = stack.rotary.inv_freq.detach().float()  # (D/2,)
        out["rope_inv_freq"] = inv
        out["rope_wavelength"] = 2 * math.pi / inv  # tokens per full turn of each dimension pair
    elif kind == "t5_relative":
        for name, stack, n in (("encoder", model.encoder, T), ("decoder", model.decoder, S_dec or T)):
            if stack is None:
                continue
            rel = stack.rel_bias
            q = torch.arange(n)[:, None]
            buckets = t5_relative_bucket(torch.arange(n)[None, :] - q, rel.bidirectional, rel.num_buckets, rel.max_distance)
            out[f"{name}_buckets"] = buckets  # (n, n) bucket of key - query
            out[f"{name}_bias"] = rel.weight.detach().float().T  # (H, buckets) learned bias per head
    return out


def sampling_chain(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """The processors ``generate`` uses when sampling with these settings (validated by GenerationConfig)."""
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if temperature == 0:
        raise DataError("temperature=0 means greedy decoding: one token is kept; use a temperature > 0 to sample")
    return build_processors(config)


@torch.no_grad()
def filter_distribution(logits: torch.Tensor, ids: list[int], **sampling) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (V,) -> (probabilities after the sampling chain (V,), kept mask (V,)) for the next token."""
    chain = sampling_chain(**sampling)
    out = chain(torch.tensor([ids]), logits[None].float())[0]
    kept = torch.isfinite(out)
    return out.softmax(-1), kept


# --- the run ---------------------------------------------------------------------------------

def _window(model: nn.Module, n: int, what: str) -> None:
    cfg = model.config
    if n > cfg.max_seq_len:
        raise DataError(f"{what} is {n} tokens, longer than the model's window of {cfg.max_seq_len} tokens")


def _piece_fn(tokenizer):
    cache: dict[int, str] = {}

    def piece(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.id_to_token(i) or f"<{i}>"
        return cache[i]
    return piece


@torch.no_grad()
def _forward(model, enc_ids, dec_ids, layers, verify) -> tuple[Recorder, torch.Tensor]:
    """One recorded forward pass -> (recorder, last hidden states (T_out, C), final norm applied).

    The head runs later on the one position whose distribution is shown (``model.logits``), not on all T."""
    with Recorder(model, layers, verify=verify) as rec:
        if model.config.arch == "encoder_decoder":
            out = model(torch.tensor([enc_ids]), decoder_input_ids=torch.tensor([dec_ids]), return_hidden=True)
        else:
            out = model(torch.tensor([enc_ids]), return_hidden=True)
    return rec, out[0]


def _logits_at(model, hidden: torch.Tensor, position: int) -> torch.Tensor:
    """The output head on one position: (T, C) -> (V,) fp32."""
    return model.logits(hidden[position][None, None])[0, 0].float()


@torch.no_grad()
def logit_lens(model: nn.Module, residual: list[torch.Tensor], positions: list[int], piece) -> dict:
    """Decode each block's output at `positions` with the model's own final norm and head -> top-5 tokens."""
    stack = model.decoder if model.decoder is not None else model.encoder
    dtype = model.dtype
    ids, probs = [], []
    for h in residual[1:]:  # each block's output, (T, C)
        x = h[positions].to(dtype)[None]  # (1, P, C)
        if stack.final_norm is not None:
            x = stack.final_norm(x)
        p = model.logits(x)[0].float().softmax(-1)  # (P, V)
        top = torch.topk(p, LENS_TOP, dim=-1)
        ids.append(top.indices)
        probs.append(top.values)
    ids_t, probs_t = torch.stack(ids), torch.stack(probs)  # (L, P, 5)
    return {"positions": positions, "ids": ids_t,
            "tokens": [[[piece(int(i)) for i in cell] for cell in row] for row in ids_t.tolist()], "probs": probs_t}


def _output_position(model, tokenizer, ids: list[int], special: list[bool]) -> int:
    if model.config.arch != "encoder":
        return len(ids) - 1
    mask_id = tokenizer.mask_token_id
    if mask_id is not None and mask_id in ids:
        return ids.index(mask_id)
    real = [i for i, s in enumerate(special) if not s]
    return real[-1] if real else len(ids) - 1


@torch.no_grad()
def inspect_model(model: nn.Module, tokenizer, text: str, target: str | None = None, *,
                  layers: list[int] | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  min_p: float = 0.0, steps: int = 0, lens_positions: int = 16, neighbours: int = 8,
                  verify: bool = False, name: str = "") -> Inspection:
    """Run `model` once on `text` (and `target` for an encoder-decoder's decoder) and record every part.

    ``layers``: record attention for these layer indices only (None: all). ``steps``: also record that many
    greedy decoding steps (each appends the most likely token and re-runs; decoders and encoder-decoders).
    ``lens_positions``: the logit lens covers the last this-many positions. ``verify``: check that the
    recorded weights rebuild each attention output (``Inspection.notes`` gets the largest difference).
    """
    cfg = model.config
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    sampling_chain(**sampling)  # bad settings fail before the model runs
    if not isinstance(text, str) or not text:
        raise DataError(f"text={text!r}: give a non-empty text to inspect")
    if target is not None and cfg.arch != "encoder_decoder":
        raise DataError(f"target={target!r} is for an encoder-decoder's decoder; this model has arch={cfg.arch!r} "
                        "(put the whole text in --text)")
    for stack in stacks_of(model).values():
        check_layers(layers, len(stack.layers))
    piece = _piece_fn(tokenizer)
    special_ids = set(tokenizer.special_ids)
    ids = tokenizer.encode(text, add_special_tokens=True)
    _window(model, len(ids), "text")
    dec_ids: list[int] = []
    if cfg.arch == "encoder_decoder":
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else (cfg.pad_token_id or 0)
        dec_ids = [start] + (tokenizer.encode(target, add_special_tokens=False) if target else [])
        _window(model, len(dec_ids), "target")
    model.eval()
    rec, out = _forward(model, ids, dec_ids or None, layers, verify)
    attentions = rec.stacked()
    recorded = dict(rec.layers)
    if "cross" in attentions:
        recorded["cross"] = rec.layers["decoder"]
    summary = {k: (cross_summary(w) if k == "cross" else head_summary(w)) for k, w in attentions.items()}
    norms = {k: torch.stack([h.norm(dim=-1) for h in hs]) for k, hs in rec.residual.items()}  # (L+1, T)
    special = [i in special_ids for i in ids]
    notes = []
    if verify:
        notes.append(f"max |o(w v) - attention output| = {rec.reconstruction:.3g}")

    lens = output = None
    out_ids = dec_ids if cfg.arch == "encoder_decoder" else ids
    top_stack = "decoder" if cfg.has_decoder else "encoder"
    if model.lm_head is not None:
        n = len(out_ids)
        lens = logit_lens(model, rec.residual[top_stack], list(range(max(0, n - lens_positions), n)), piece)
        position = _output_position(model, tokenizer, ids, special) if cfg.arch == "encoder" else n - 1
        logits = _logits_at(model, out, position)
        probs, kept = filter_distribution(logits, out_ids, **sampling)
        output = {"position": position, "logits": logits, "probs": logits.softmax(-1), "filtered": probs,
                  "kept": kept, "sampling": sampling, "pieces": None}
        top = torch.topk(output["probs"], min(NEXT_TOP, logits.numel())).indices.tolist()
        output["pieces"] = [piece(i) for i in top]
    else:
        notes.append("this checkpoint has no LM head (a sentence encoder): no next-token distribution or logit lens")

    insp = Inspection(
        model=name, arch=cfg.arch, tokens=[piece(i) for i in ids], ids=ids, special=special,
        attentions=attentions, layers=recorded, head_summary=summary, residual_norms=norms, ffn_zero=rec.ffn_zero,
        embeddings=embedding_view(model, ids, piece, neighbours),
        positions=position_view(model, len(ids), len(dec_ids) or None),
        logit_lens=lens, output=output, target_tokens=[piece(i) for i in dec_ids], target_ids=dec_ids,
        notes=notes, text=text, target=target, tokenizer_name=str(getattr(tokenizer, "name_or_path", "") or "").rstrip("/").rsplit("/", 1)[-1],
        n_layers={**{k: len(v.layers) for k, v in stacks_of(model).items()},
                  **({"cross": len(model.decoder.layers)} if "cross" in attentions else {})},
    )
    if steps and cfg.has_decoder and output is not None:
        insp.steps = _greedy_steps(model, ids, dec_ids, layers, steps, piece, sampling, output["logits"])
    return insp


@torch.no_grad()
def _greedy_steps(model, ids, dec_ids, layers, n, piece, sampling, logits) -> list[dict]:
    """Append the most likely token n times; each step keeps what it adds: the token, the new query's
    attention rows (L_rec, H, S) per decoder stack (a causal row never changes once written), and the
    next-token logits after it."""
    enc_dec = model.config.arch == "encoder_decoder"
    seq = list(dec_ids if enc_dec else ids)
    out_steps = []
    for _ in range(n):
        token = int(logits.argmax())
        seq.append(token)
        _window(model, len(seq), "text plus steps")
        rec, out = _forward(model, ids, seq, layers, False) if enc_dec else _forward(model, seq, None, layers, False)
        att = rec.stacked()
        rows = {k: w[:, :, -1] for k, w in att.items() if k in ("decoder", "cross")}  # (L_rec, H, S)
        logits = _logits_at(model, out, -1)
        probs, kept = filter_distribution(logits, seq, **sampling)
        p = logits.softmax(-1)
        top = torch.topk(p, NEXT_TOP)
        out_steps.append({"id": token, "token": piece(token), "rows": rows, "logits": logits,
                          "next_token": [{"id": int(i), "token": piece(int(i)), "prob": float(v), "kept": bool(kept[i])}
                                         for i, v in zip(top.indices.tolist(), top.values.tolist())]})
    return out_steps


def inspect_json(model: nn.Module, tokenizer, text: str, target: str | None = None, **options) -> dict:
    """``inspect_model(...).to_json()``: the dict a route such as ``POST /v1/inspect`` returns."""
    return inspect_model(model, tokenizer, text, target, **options).to_json()
