"""Beam search, as Hugging Face's ``generate(num_beams=N)`` does it.

It follows transformers' vectorised algorithm step for step (same candidate count, same length
normalisation, same early-stopping heuristic), so it returns the same tokens; the parity tests compare
them token for token.

Shapes: B batch (prompts), N beams, K candidates per prompt, V vocabulary, L tokens so far.
"""

from __future__ import annotations

import torch

from lmlab.generation.config import GenerationConfig
from lmlab.generation.driver import start_run
from lmlab.generation.processors import build_processors
from lmlab.generation.stopping import stop_checker


def beam_search(model, input_ids, attention_mask, config: GenerationConfig, tokenizer=None) -> list[list[int]]:
    """Beam search as Hugging Face's ``generate(num_beams=N)`` does it -> best hypothesis per prompt.

    Each step keeps K = max(2, 1 + n_eos) * N candidates over all beams of a prompt. Candidates ending
    in eos among the top N become finished hypotheses scored sum(log p) / new_len ** length_penalty;
    the best N others continue. A prompt stops when its finished hypotheses cannot be beaten
    (``early_stopping``: True = N finished; False = HF's heuristic with the current length;
    "never" = with the longest possible length) and all stop at max_new_tokens.
    """
    N = config.num_beams
    B = input_ids.shape[0]
    run, history = start_run(model, input_ids, attention_mask, config, expand=N)
    L0 = history.shape[1]
    device = history.device
    max_len = L0 + config.max_new_tokens
    eos_ids = config.eos_token_ids or []
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    K = max(2, 1 + len(eos_ids)) * N
    top_n = torch.arange(K, device=device) < N  # (K,) only these candidates may finish
    chain = build_processors(config, prompt_len=L0, eos_token_ids=eos_ids)
    stop_check = stop_checker(tokenizer, config.stop_strings)
    lp, early = config.length_penalty, config.early_stopping

    running = torch.full((B, N, max_len), config.pad_token_id, dtype=torch.long, device=device)
    running[:, :, :L0] = history.view(B, N, L0)
    running_scores = torch.zeros(B, N, device=device)
    running_scores[:, 1:] = -1e9  # only the first beam's continuations count at the first step
    done_seqs = running.clone()
    done_scores = torch.full((B, N), -1e9, device=device)
    done_len = torch.zeros(B, N, dtype=torch.long, device=device)  # new tokens of each finished hypothesis
    is_done = torch.zeros(B, N, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)[:, None]  # (B, 1)

    logits = run.prefill()
    cur = L0
    while True:
        logp = torch.log_softmax(logits.float(), -1)  # (B*N, V)
        if len(chain):
            logp = chain(running.view(B * N, max_len)[:, :cur], logp)
        V = logp.shape[-1]
        logp = (logp.view(B, N, V) + running_scores[:, :, None]).view(B, N * V)
        top_scores, top_idx = torch.topk(logp, K)  # (B, K)
        src = top_idx // V  # (B, K) beam each candidate extends
        cand = running[rows, src]  # (B, K, max_len)
        cand[:, :, cur] = top_idx % V
        if cur + 1 >= max_len:
            hits = torch.ones(B, K, dtype=torch.bool, device=device)
        else:
            hits = torch.isin(cand[:, :, cur], eos) if eos_ids else torch.zeros(B, K, dtype=torch.bool, device=device)
            if stop_check is not None:
                hits |= stop_check(cand[:, :, L0:cur + 1].reshape(B * K, -1), ~hits.view(-1)).view(B, K)

        # the best N unfinished candidates continue
        cont_scores = top_scores + hits.float() * -1e9
        keep = torch.topk(cont_scores, N).indices  # (B, N)
        running, running_scores, parent = cand[rows, keep], cont_scores.gather(1, keep), src.gather(1, keep)

        # finished candidates among the top N join the finished hypotheses if they beat them
        just = hits & top_n
        scores = top_scores / ((cur + 1 - L0) ** lp)
        scores = scores + (is_done.all(-1, keepdim=True) & (early is True)).float() * -1e9
        scores = scores + (~improvable).float() * -1e9
        scores = scores + (~just).float() * -1e9
        merged = torch.cat((done_scores, scores), 1)  # (B, N + K)
        best = torch.topk(merged, N).indices
        done_seqs = torch.cat((done_seqs, cand), 1)[rows, best]
        done_scores = merged.gather(1, best)
        is_done = torch.cat((is_done, just), 1).gather(1, best)
        new_len = torch.full((B, K), cur + 1 - L0, dtype=torch.long, device=device)
        done_len = torch.cat((done_len, new_len), 1).gather(1, best)

        cur += 1
        best_len = (max_len - L0) if (early == "never" and lp > 0) else (cur - L0)
        best_running = running_scores[:, :1] / (best_len ** lp)
        worst_done = torch.where(is_done, done_scores.min(1, keepdim=True).values, -1e9)
        improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
        if (not bool(improvable.any()) or (early is True and bool(is_done.all()))
                or bool(hits.all())):
            break
        run.reorder((parent + rows * N).view(-1))
        logits = run.step(running[:, :, cur - 1].reshape(-1))

    return [done_seqs[b, 0, L0:L0 + int(done_len[b, 0])].tolist() for b in range(B)]
