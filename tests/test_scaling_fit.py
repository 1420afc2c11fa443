"""lmlab.scaling.fit and sweep: the law recovered from runs drawn from a known one; the sweep's grid,
resume and refusals; the CLI's JSON contract."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from lmlab.errors import ConfigError, DataError
from lmlab.scaling.fit import ScalingLaw, fit_law, fit_power_law, fit_runs, plan_with_law, read_runs
from lmlab.scaling.sweep import SweepConfig, grid, model_config, sweep

TRUE = ScalingLaw(E=1.9, A=250.0, B=700.0, alpha=0.35, beta=0.30)


def synthetic_runs(law: ScalingLaw, noise: float, seed: int = 0) -> list[dict]:
    """A 5 x 5 sweep drawn from `law`, each loss times exp(noise * standard normal)."""
    rng = np.random.default_rng(seed)
    runs = []
    for n in (1e5, 3e5, 1e6, 3e6, 1e7):
        for r in (2, 5, 10, 20, 50):
            runs.append({"params": n, "tokens": n * r, "loss": float(law.loss(n, n * r) * np.exp(noise * rng.normal()))})
    return runs


def test_the_fit_recovers_a_known_law_exactly_without_noise():
    runs = synthetic_runs(TRUE, noise=0.0)
    N, D, L = (np.array([r[k] for r in runs]) for k in ("params", "tokens", "loss"))
    law = fit_law(N, D, L)
    for name in ("E", "alpha", "beta"):
        assert getattr(law, name) == pytest.approx(getattr(TRUE, name), rel=2e-3), name
    assert law.A == pytest.approx(TRUE.A, rel=3e-2) and law.B == pytest.approx(TRUE.B, rel=3e-2)


def test_the_fit_recovers_a_known_law_with_noise_and_its_intervals_cover_it():
    runs = synthetic_runs(TRUE, noise=0.01, seed=3)
    result = fit_runs(runs, n_boot=30, confidence=0.9)
    assert result.law.alpha == pytest.approx(TRUE.alpha, abs=0.05)
    assert result.law.beta == pytest.approx(TRUE.beta, abs=0.05)
    assert result.law.E == pytest.approx(TRUE.E, abs=0.25)
    for name in ("alpha", "beta", "E"):
        lo, hi = result.intervals[name]
        assert lo < hi, name
    # the compute-optimal ratio follows from the law (eq. 4), stated at the largest run's compute
    assert result.compute == pytest.approx(6 * 1e7 * 5e8)
    assert result.tokens_per_param == pytest.approx(TRUE.tokens_per_param(result.compute), rel=0.5)
    # the one-variable laws decrease with N and with D
    assert result.law_n.alpha > 0 and result.law_d.alpha > 0
    assert result.law_n(1e7) < result.law_n(1e5)


def test_compute_optimal_allocation_satisfies_its_definition():
    """N_opt from eq. 4 minimises L(N, C/6N): nearby sizes at the same compute do worse."""
    c = 1e18
    n, d = TRUE.optimal(c)
    assert 6 * n * d == pytest.approx(c)
    best = TRUE.loss(n, d)
    for f in (0.8, 1.25):
        assert TRUE.loss(n * f, c / (6 * n * f)) > best
    plan = plan_with_law(TRUE, n_params=float(n))  # from N back to the same plan
    assert plan["flops"] == pytest.approx(c, rel=1e-9) and plan["n_tokens"] == pytest.approx(d, rel=1e-9)
    plan = plan_with_law(TRUE, n_tokens=float(d))
    assert plan["n_params"] == pytest.approx(n, rel=1e-9)


def test_a_pure_power_law_is_recovered():
    x = np.array([1e5, 1e6, 1e7, 1e8])
    law = fit_power_law(x, 2.0 + 50.0 * x ** -0.4)
    assert law.E == pytest.approx(2.0, rel=1e-2) and law.alpha == pytest.approx(0.4, rel=2e-2)


def test_isoflop_minima_fall_near_the_law_optimum():
    law = ScalingLaw(E=1.5, A=400.0, B=400.0, alpha=0.34, beta=0.34)  # equal exponents: D_opt/N_opt constant
    runs = []
    for n in np.geomspace(1e5, 1e7, 7):
        for r in np.geomspace(1, 400, 9):
            runs.append({"params": float(n), "tokens": float(n * r), "loss": float(law.loss(n, n * r))})
    iso = [p for p in fit_runs(runs, n_boot=0).isoflops if p.n_opt is not None]
    assert iso, "no IsoFLOP minimum found"
    for p in iso:
        n_opt, _ = law.optimal(p.compute)
        assert abs(np.log(p.n_opt / n_opt)) < np.log(1.6), (p.compute, p.n_opt, n_opt)


def test_bad_runs_are_refused_with_their_line(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text('{"params": 1e6, "tokens": 2e7, "loss": 3.1}\n{"params": 0, "tokens": 2e7, "loss": 3.0}\n')
    with pytest.raises(DataError, match=r"runs.jsonl:2: params=0 must be a positive"):
        read_runs(path)
    path.write_text('{"params": 1e6, "tokens": 2e7}\n')
    with pytest.raises(DataError, match=r":1: loss=None"):
        read_runs(path)
    with pytest.raises(DataError, match="does not exist"):
        read_runs(tmp_path / "missing.jsonl")
    runs = synthetic_runs(TRUE, 0.0)[:4]
    with pytest.raises(DataError, match="4 run\\(s\\) cannot determine a law with 5 parameters"):
        fit_runs(runs)
    one_size = [{"params": 1e6, "tokens": 1e6 * r, "loss": 3.0 + 1 / r} for r in range(1, 8)]
    with pytest.raises(DataError, match="at least 2 model sizes"):
        fit_runs(one_size)


def test_fit_cli_prints_the_json_contract_and_a_plot(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_runs(TRUE, 0.005, seed=1)))
    png = tmp_path / "fit.png"
    out = subprocess.run([sys.executable, "-m", "lmlab", "scaling", "fit", str(path), "--json", "--bootstrap", "20",
                          "--png", str(png)], capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    for key in ("E", "A", "B", "alpha", "beta", "tokens_per_param"):
        assert isinstance(data[key], float), key
    assert data["alpha"] == pytest.approx(TRUE.alpha, abs=0.05)
    assert png.stat().st_size > 10_000
    plan = subprocess.run([sys.executable, "-m", "lmlab", "plan", "chinchilla", "--compute", "1e18", "--fit", str(path),
                           "--json"], capture_output=True, text=True, check=True).stdout
    plan = json.loads(plan)
    assert plan["flops"] == pytest.approx(1e18) and plan["tokens_per_param"] == pytest.approx(
        ScalingLaw(**{k: data[k] for k in ("E", "A", "B", "alpha", "beta")}).tokens_per_param(1e18), rel=1e-6)


# --- the sweep ----------------------------------------------------------------------------------
def tiny_sweep(tmp_path, **over) -> SweepConfig:
    corpus = tmp_path / "corpus.jsonl"
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "None", "value", "name"]
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 60))}) + "\n" for _ in range(300)))
    cfg = dict(out_dir=str(tmp_path / "sweep"), corpus=None, files=[str(corpus)], vocab_size=128, seq_len=16,
               depths=[1, 2], width_per_layer=32, tokens_per_param=[0.02, 0.05], val_fraction=0.1, eval_batches=2,
               train={"batch_size": 4, "lr": 3e-3, "precision": "fp32"}, workers=2)
    cfg.update(over)
    return SweepConfig(**cfg)


def test_the_grid_follows_the_shape_rule():
    cfg = SweepConfig(depths=[2, 4], tokens_per_param=[5, 20])
    specs = grid(cfg)
    assert len(specs) == 4 and specs == sorted(specs, key=lambda s: s.flops)
    for s in specs:
        mc = model_config(cfg, s.depth)
        assert mc.d_model == 32 * s.depth and mc.head_dim == 32
        assert s.params == mc.num_parameters() - mc.vocab_size * mc.d_model  # non-embedding
        assert s.tokens >= s.tokens_per_param * s.params and s.flops == 6 * s.params * s.tokens


def test_sweep_records_every_run_and_never_recomputes_one(tmp_path):
    cfg = tiny_sweep(tmp_path)
    lines = []
    runs_path = sweep(cfg, show_progress=False, echo=lines.append)
    runs = read_runs(runs_path)
    assert sorted(r["id"] for r in runs) == sorted(s.id for s in grid(cfg))
    for r in runs:
        assert r["loss"] > 0 and r["embedding_params"] == 128 * 32 * int(r["id"][1]) and r["flops"] > 0
        assert r["epochs"] == pytest.approx(r["tokens"] / r["corpus_train_tokens"], abs=1e-3) and r["epochs"] <= 2
    assert any("left" in line for line in lines)  # progress with the time left
    before = runs_path.read_text()
    # a killed sweep: the last run's line never written; re-running does that run only
    kept = before.splitlines()[:-1]
    runs_path.write_text("\n".join(kept) + "\n")
    lines.clear()
    sweep(cfg, show_progress=False, echo=lines.append)
    assert "3 already done" in lines[0]
    assert len(read_runs(runs_path)) == 4 and sum(1 for line in lines if line.startswith("[")) == 1


def test_a_sweep_that_cannot_fit_in_memory_is_refused_before_training(tmp_path):
    cfg = tiny_sweep(tmp_path, memory_budget="1MiB")
    t = time.time()
    with pytest.raises(ConfigError, match="exceed the 0.0 GiB available"):
        sweep(cfg, show_progress=False, echo=lambda s: None)
    assert time.time() - t < 5 and not (tmp_path / "sweep" / "runs.jsonl").exists()


def test_bad_sweep_configs_name_the_value(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("depths: [2, 0]\n")
    with pytest.raises(ConfigError, match=r"depths=\[2, 0\]"):
        SweepConfig.from_file(path)
    path.write_text("widths: 3\n")
    with pytest.raises(ConfigError, match="unknown sweep key\\(s\\) widths"):
        SweepConfig.from_file(path)
    path.write_text("width_per_layer: 20\n")
    with pytest.raises(ConfigError, match="width_per_layer=20"):
        SweepConfig.from_file(path)


def test_runs_that_would_repeat_the_corpus_too_often_are_refused_before_training(tmp_path):
    cfg = tiny_sweep(tmp_path, tokens_per_param=[0.02, 50.0])
    t = time.time()
    with pytest.raises(ConfigError, match=r"2 run\(s\) need more than max_epochs=2 passes over the corpus's"):
        sweep(cfg, show_progress=False, echo=lambda s: None)
    assert time.time() - t < 30  # the tokenizer and shards only: no run started
    assert not (tmp_path / "sweep" / "runs.jsonl").exists() and not list((tmp_path / "sweep").glob("L*"))
