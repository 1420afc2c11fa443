"""Scaling laws fitted to your own runs: L(N, D) = E + A/N^alpha + B/D^beta, as Hoffmann et al. (2022) fit it.

A *run* is one finished training job: ``params`` N (non-embedding parameters), ``tokens`` D (training tokens)
and ``loss`` L (final validation loss, nats/token). ``lmlab scaling sweep`` writes them, one JSON object a
line, to ``runs.jsonl``; runs made anywhere else fit the same way if they carry those three keys.

What is fitted (notation of ``lmlab.scaling``: N parameters, D tokens, C = 6ND FLOPs):

* **The parametric law** (Hoffmann et al. 2022, approach 3, eq. 2 and appendix D.2). With A = e^a, B = e^b,
  E = e^e the model's log-loss is ``LSE(a - alpha log N, b - beta log D, e)`` and the fit minimises the
  Huber loss (delta = 1e-3) of its difference from log L over all runs, with L-BFGS. The paper starts
  L-BFGS from every point of a grid (alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
  a, b in {0, 5, ..., 25}); here the objective is evaluated on that whole grid at once and L-BFGS starts
  from its 16 best points, which finds the same minimum for a fraction of the time.
* **Intervals**: the fit repeated on bootstrap resamples of the runs (percentile intervals, 90% by default).
* **Single-variable power laws** L(N) = E_N + A_N/N^alpha_N over each size's longest run (Kaplan et al.'s
  "trained to the largest D"), and L(D) = E_D + B_D/D^beta_D over the largest model's runs.
* **IsoFLOP minima** (approach 2): for a compute level C, each model size's loss at C is interpolated
  (log-log, between its runs); a parabola in log N through those points has its minimum at N_opt(C).
* **Compute-optimal allocation** from the parametric law (eq. 4): N_opt = G (C/6)^(beta/(alpha+beta)),
  D_opt = (C/6)^(alpha/(alpha+beta)) / G with G = (alpha A / (beta B))^(1/(alpha+beta)); the tokens per
  parameter D_opt/N_opt is constant only when alpha = beta, so it is reported at a stated C.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from lmlab.errors import ConfigError, DataError
from lmlab.jsonl import iter_objects
from lmlab.scaling.chinchilla import one_of

HUBER_DELTA = 1e-3
N_STARTS = 16  # L-BFGS starts: the best points of the initialisation grid
RUN_KEYS = ("params", "tokens", "loss")


# --- runs ----------------------------------------------------------------------------------
def read_runs(path: str | Path) -> list[dict]:
    """The runs in a runs.jsonl file; each must have positive finite `params`, `tokens` and `loss`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"runs file {str(path)!r} does not exist")
    runs = []
    for i, run in iter_objects(path.read_text().splitlines(), str(path)):
        for key in RUN_KEYS:
            value = run.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(f"{path}:{i}: {key}={value!r}; every run needs numeric {', '.join(RUN_KEYS)}")
            if not (value > 0 and math.isfinite(value)):
                raise DataError(f"{path}:{i}: {key}={value!r} must be a positive finite number")
        runs.append(run)
    return runs


def _arrays(runs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.array([float(r[k]) for r in runs]) for k in RUN_KEYS)  # type: ignore[return-value]


# --- the parametric law --------------------------------------------------------------------
@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A/N^alpha + B/D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, n_params, n_tokens):
        return self.E + self.A / np.power(n_params, self.alpha) + self.B / np.power(n_tokens, self.beta)

    def optimal(self, compute_flops):
        """(N_opt, D_opt) minimising L under 6ND = C (Hoffmann et al. 2022, eq. 4)."""
        a, b = self.alpha, self.beta
        if a <= 0 or b <= 0:
            raise ConfigError(f"the fitted law has alpha={a:.3g}, beta={b:.3g}: no compute-optimal trade-off "
                              "exists unless both exponents are positive (the runs do not show one)")
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        c6 = np.asarray(compute_flops, dtype=float) / 6.0
        return g * c6 ** (b / (a + b)), c6 ** (a / (a + b)) / g

    def tokens_per_param(self, compute_flops) -> float:
        n, d = self.optimal(compute_flops)
        return float(d / n)

    def frontier(self, compute_flops):
        """The lowest loss reachable with C FLOPs: L(N_opt(C), D_opt(C))."""
        n, d = self.optimal(compute_flops)
        return self.loss(n, d)

    def as_dict(self) -> dict:
        return asdict(self)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Huber loss of the log-space residuals and its gradient; theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    t = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, R)
    top = t.max(0)
    w = np.exp(t - top)
    s = w.sum(0)
    r = top + np.log(s) - log_l  # (R,) residuals
    w = w / s  # softmax: d LSE / d t
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
    g = np.where(small, r, delta * np.sign(r))  # d huber / d r
    grad = np.array([(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(),
                     -(g * w[0] * log_n).sum(), -(g * w[1] * log_d).sum()])
    return loss, grad


def _grid_objective(grid: np.ndarray, log_n, log_d, log_l, delta: float) -> np.ndarray:
    """The objective at every grid point at once: grid (P, 5) -> (P,)."""
    a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))  # each (P, 1)
    t = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(grid), len(log_n)))])  # (3, P, R)
    top = t.max(0)
    r = top + np.log(np.exp(t - top).sum(0)) - log_l  # (P, R)
    return np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum(1)


def _init_grid() -> np.ndarray:
    steps = np.arange(0.0, 2.01, 0.5)
    mesh = np.meshgrid(np.arange(0.0, 26.0, 5.0), np.arange(0.0, 26.0, 5.0), np.arange(-1.0, 1.01, 0.5), steps, steps,
                       indexing="ij")
    return np.stack([m.ravel() for m in mesh], 1)  # (P, 5): a, b, e, alpha, beta


_GRID = _init_grid()


def _check_enough(log_n: np.ndarray, log_d: np.ndarray, n_params: int) -> None:
    if len(log_n) < n_params:
        raise DataError(f"{len(log_n)} run(s) cannot determine a law with {n_params} parameters: "
                        f"give at least {n_params} runs")
    if len(np.unique(log_n)) < 2 or len(np.unique(log_d)) < 2:
        raise DataError(f"the runs need at least 2 model sizes and 2 token budgets; got {len(np.unique(log_n))} "
                        f"size(s) and {len(np.unique(log_d))} budget(s)")


def fit_law(n_params, n_tokens, losses, delta: float = HUBER_DELTA, starts: np.ndarray | None = None) -> ScalingLaw:
    """Fit E, A, B, alpha, beta to runs (arrays N, D, L) as Hoffmann et al. do (see the module docstring)."""
    log_n, log_d, log_l = (np.log(np.asarray(x, dtype=float)) for x in (n_params, n_tokens, losses))
    _check_enough(log_n, log_d, 5)
    if starts is None:
        scores = _grid_objective(_GRID, log_n, log_d, log_l, delta)
        starts = _GRID[np.argsort(scores)[:N_STARTS]]
    best = None
    for x0 in starts:
        res = minimize(_objective, x0, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
                       options={"maxiter": 2000})
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return ScalingLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha), beta=float(beta))


def _theta(law: ScalingLaw) -> np.ndarray:
    return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


def bootstrap_laws(n_params, n_tokens, losses, law: ScalingLaw, n_boot: int = 200, seed: int = 0) -> list[ScalingLaw]:
    """The law refitted on `n_boot` resamples (with replacement) of the runs, started from the full fit
    and the best grid point of each resample; resamples with fewer than 2 sizes or budgets are skipped."""
    N, D, L = (np.asarray(x, dtype=float) for x in (n_params, n_tokens, losses))
    rng = np.random.default_rng(seed)
    laws = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(N), len(N))
        if len(np.unique(N[idx])) < 2 or len(np.unique(D[idx])) < 2:
            continue
        scores = _grid_objective(_GRID, np.log(N[idx]), np.log(D[idx]), np.log(L[idx]), HUBER_DELTA)
        starts = np.vstack([_theta(law), _GRID[np.argsort(scores)[:1]]])
        laws.append(fit_law(N[idx], D[idx], L[idx], starts=starts))
    return laws


# --- one-variable laws and IsoFLOP minima ---------------------------------------------------------
@dataclass(frozen=True)
class PowerLaw:
    """L(x) = E + A/x^alpha over the points it was fitted to."""

    E: float
    A: float
    alpha: float
    points: int

    def __call__(self, x):
        return self.E + self.A / np.power(x, self.alpha)


def fit_power_law(x, losses) -> PowerLaw:
    """L(x) = E + A/x^alpha with the same Huber-on-log-loss objective (B's term held at zero);
    with 3 points the law passes through them, with 2 it is a pure power law (E = 0)."""
    log_x, log_l = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(losses, dtype=float))
    if len(log_x) < 2 or len(np.unique(log_x)) < 2:
        raise DataError(f"a power law needs at least 2 distinct points; got {len(np.unique(log_x))}")
    if len(log_x) == 2:
        slope = (log_l[1] - log_l[0]) / (log_x[1] - log_x[0])
        return PowerLaw(E=0.0, A=float(math.exp(log_l[0] - slope * log_x[0])), alpha=float(-slope), points=2)
    zeros = np.zeros_like(log_x)
    floor = float(log_l.min())
    best = None
    for a0 in (0.0, 5.0, 10.0):
        for alpha0 in (0.1, 0.5, 1.0):
            for e0 in (floor - 0.5, floor - 0.05):
                res = minimize(_reduced, np.array([a0, e0, alpha0]), args=(log_x, zeros, log_l), jac=True,
                               method="L-BFGS-B", options={"maxiter": 2000})
                if best is None or res.fun < best.fun:
                    best = res
    a, e, alpha = best.x
    return PowerLaw(E=float(np.exp(e)), A=float(np.exp(a)), alpha=float(alpha), points=len(log_x))


def _reduced(th, log_x, zeros, log_l):
    """The two-term objective with the D term switched off (b = -50 makes B/D^beta vanish): th = (a, e, alpha)."""
    loss, grad = _objective(np.array([th[0], -50.0, th[1], th[2], 0.0]), log_x, zeros, log_l, HUBER_DELTA)
    return loss, grad[[0, 2, 3]]


@dataclass(frozen=True)
class IsoFlop:
    """One IsoFLOP profile: the loss of each size at compute C, a parabola in log N, and its minimum."""

    compute: float
    sizes: list[float]
    losses: list[float]
    coefficients: list[float]  # loss = c0 * x^2 + c1 * x + c2, x = log N
    n_opt: float | None
    loss_opt: float | None


def isoflop_profiles(runs: list[dict], levels: int = 5) -> list[IsoFlop]:
    """IsoFLOP profiles at `levels` compute values spread (geometrically) over where 3+ sizes have runs."""
    by_size: dict[float, list[tuple[float, float]]] = {}
    for r in runs:
        by_size.setdefault(float(r["params"]), []).append((6.0 * r["params"] * r["tokens"], float(r["loss"])))
    curves = {n: sorted(pts) for n, pts in by_size.items() if len(pts) >= 2}
    if len(curves) < 3:
        return []
    ranges = sorted(((pts[0][0], pts[-1][0]) for pts in curves.values()), key=lambda x: x[0])
    # the compute span covered by at least 3 sizes
    lows, highs = sorted(lo for lo, _ in ranges), sorted((hi for _, hi in ranges), reverse=True)
    lo, hi = lows[2], highs[2]
    if not lo < hi:
        return []
    out = []
    for c in np.geomspace(lo, hi, levels):
        sizes, losses = [], []
        for n, pts in sorted(curves.items()):
            cs = np.log([p[0] for p in pts])
            if cs[0] <= math.log(c) <= cs[-1]:
                sizes.append(n)
                losses.append(float(np.exp(np.interp(math.log(c), cs, np.log([p[1] for p in pts])))))
        if len(sizes) < 3:
            continue
        x = np.log(sizes)
        c2, c1, c0 = np.polyfit(x, losses, 2)
        n_opt = loss_opt = None
        if c2 > 0:
            x_opt = -c1 / (2 * c2)
            if x.min() <= x_opt <= x.max():  # a minimum inside the sizes measured, not an extrapolation
                n_opt, loss_opt = float(np.exp(x_opt)), float(c2 * x_opt ** 2 + c1 * x_opt + c0)
        out.append(IsoFlop(compute=float(c), sizes=sizes, losses=losses, coefficients=[float(c2), float(c1), float(c0)],
                           n_opt=n_opt, loss_opt=loss_opt))
    return out


# --- the whole report ---------------------------------------------------------------------------
@dataclass
class FitResult:
    law: ScalingLaw
    intervals: dict[str, tuple[float, float]]
    confidence: float
    compute: float  # the C at which tokens_per_param is stated (the largest run's)
    tokens_per_param: float
    tokens_per_param_interval: tuple[float, float] | None
    law_n: PowerLaw | None
    law_d: PowerLaw | None
    isoflops: list[IsoFlop]
    n_runs: int
    bootstrap: list[ScalingLaw] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = {**self.law.as_dict(), "tokens_per_param": self.tokens_per_param, "tokens_per_param_at_flops": self.compute,
             "tokens_per_param_interval": self.tokens_per_param_interval, "chinchilla_tokens_per_param": 20.0,
             "intervals": {k: list(v) for k, v in self.intervals.items()}, "confidence": self.confidence,
             "runs": self.n_runs, "bootstrap_fits": len(self.bootstrap),
             "L_of_N": None if self.law_n is None else asdict(self.law_n),
             "L_of_D": None if self.law_d is None else asdict(self.law_d),
             "isoflops": [asdict(p) for p in self.isoflops]}
        return d


def fit_runs(runs: list[dict], n_boot: int = 200, confidence: float = 0.9, seed: int = 0) -> FitResult:
    """Everything `lmlab scaling fit` reports, from a list of runs (dicts with params, tokens, loss)."""
    if not runs:
        raise DataError("no runs to fit")
    N, D, L = _arrays(runs)
    law = fit_law(N, D, L)
    boots = bootstrap_laws(N, D, L, law, n_boot, seed) if n_boot > 0 else []
    q = ((1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100)
    intervals = {}
    for name in ("E", "A", "B", "alpha", "beta"):
        values = [getattr(b, name) for b in boots]
        intervals[name] = tuple(float(v) for v in np.percentile(values, q)) if values else (math.nan, math.nan)
    compute = float((6 * N * D).max())
    tpp = law.tokens_per_param(compute) if law.alpha > 0 and law.beta > 0 else math.nan
    tpps = [b.tokens_per_param(compute) for b in boots if b.alpha > 0 and b.beta > 0]
    tpp_interval = tuple(float(v) for v in np.percentile(tpps, q)) if tpps else None
    longest = {}
    for r in runs:  # each size's longest run
        if r["params"] not in longest or r["tokens"] > longest[r["params"]]["tokens"]:
            longest[r["params"]] = r
    law_n = fit_power_law([r["params"] for r in longest.values()], [r["loss"] for r in longest.values()]) \
        if len(longest) >= 2 else None
    biggest = [r for r in runs if r["params"] == N.max()]
    law_d = fit_power_law([r["tokens"] for r in biggest], [r["loss"] for r in biggest]) \
        if len({r["tokens"] for r in biggest}) >= 2 else None
    return FitResult(law=law, intervals=intervals, confidence=confidence, compute=compute, tokens_per_param=tpp,
                     tokens_per_param_interval=tpp_interval, law_n=law_n, law_d=law_d,
                     isoflops=isoflop_profiles(runs), n_runs=len(runs), bootstrap=boots)


def fit_report(result: FitResult) -> str:
    """The table `lmlab scaling fit` prints."""
    law, iv = result.law, result.intervals
    pct = f"{result.confidence:.0%}"
    lines = [f"L(N, D) = E + A/N^alpha + B/D^beta fitted to {result.n_runs} runs (Huber on log-loss, L-BFGS; "
             f"{pct} bootstrap intervals from {len(result.bootstrap)} resamples)"]
    for name in ("E", "A", "B", "alpha", "beta"):
        lo, hi = iv[name]
        lines.append(f"  {name:<6} {getattr(law, name):>10.4g}   [{lo:.4g}, {hi:.4g}]")
    interval = "" if result.tokens_per_param_interval is None else \
        " [{:.3g}, {:.3g}]".format(*result.tokens_per_param_interval)
    lines.append(f"compute-optimal tokens per parameter at C = {result.compute:.3g} FLOPs: "
                 f"{result.tokens_per_param:.3g}{interval} (Chinchilla: 20)")
    if result.law_n is not None:
        p = result.law_n
        lines.append(f"L(N) over each size's longest run ({p.points} points): {p.E:.3f} + {p.A:.4g}/N^{p.alpha:.3f}")
    if result.law_d is not None:
        p = result.law_d
        lines.append(f"L(D) over the largest model's runs ({p.points} points): {p.E:.3f} + {p.A:.4g}/D^{p.alpha:.3f}")
    for iso in result.isoflops:
        where = "no minimum inside the sizes run" if iso.n_opt is None else \
            f"N_opt {iso.n_opt:.3g}, D_opt {iso.compute / 6 / iso.n_opt:.3g}, loss {iso.loss_opt:.3f}"
        lines.append(f"IsoFLOP C = {iso.compute:.3g}: {len(iso.sizes)} sizes, {where}")
    return "\n".join(lines)


def plot_fit(result: FitResult, runs: list[dict], out: str | Path) -> Path:
    """Loss vs compute (log-log, one curve per model size), the fitted frontier and its extrapolation
    with the bootstrap interval; beside it the IsoFLOP parabolas and their minima."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    N, D, L = _arrays(runs)
    C = 6 * N * D
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    sizes = sorted(set(N))
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(sizes):
        sel = N == n
        order = np.argsort(C[sel])
        ax.plot(C[sel][order], L[sel][order], "o-", color=cmap(i / max(len(sizes) - 1, 1)), ms=4,
                label=f"N = {n:.3g}")
    law = result.law
    if law.alpha > 0 and law.beta > 0:
        grid = np.geomspace(C.min(), C.max() * 100, 200)
        ax.plot(grid, law.frontier(grid), "k--", lw=1.2, label="fitted frontier L(N_opt(C), D_opt(C))")
        band = [b.frontier(grid) for b in result.bootstrap if b.alpha > 0 and b.beta > 0]
        if band:
            lo, hi = np.percentile(band, [(1 - result.confidence) / 2 * 100, (1 + result.confidence) / 2 * 100], 0)
            ax.fill_between(grid, lo, hi, color="k", alpha=0.12, label=f"{result.confidence:.0%} bootstrap interval")
        ax.axvline(C.max(), color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C = 6ND (FLOPs)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("loss vs compute; right of the dotted line: extrapolation")
    ax.legend(fontsize=7)
    for i, iso in enumerate(result.isoflops):
        color = plt.get_cmap("plasma")(i / max(len(result.isoflops) - 1, 1))
        ax2.plot(iso.sizes, iso.losses, "o", color=color, ms=4, label=f"C = {iso.compute:.2g}")
        xs = np.linspace(np.log(min(iso.sizes)), np.log(max(iso.sizes)), 50)
        c2, c1, c0 = iso.coefficients
        ax2.plot(np.exp(xs), c2 * xs ** 2 + c1 * xs + c0, "-", color=color, lw=1)
        if iso.n_opt is not None:
            ax2.plot([iso.n_opt], [iso.loss_opt], "k*", ms=9)
    if not result.isoflops:
        ax2.text(0.5, 0.5, "no compute level is covered by 3 or more sizes:\nwiden tokens_per_param or add sizes",
                 ha="center", va="center", transform=ax2.transAxes)
    else:
        ax2.set_xscale("log")
    ax2.set_xlabel("non-embedding parameters N")
    ax2.set_ylabel("loss at that compute (interpolated)")
    ax2.set_title("IsoFLOP profiles (stars: minima)")
    if result.isoflops:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plan_with_law(law: ScalingLaw, compute_flops: float | None = None, n_params: float | None = None,
                  n_tokens: float | None = None) -> dict:
    """Compute-optimal N, D, C and the predicted loss under a fitted law, from exactly one of C, N or D.

    From C: eq. 4 directly. From N (or D): the compute at which N (or D) is optimal, inverting
    N_opt = G (C/6)^(beta/(alpha+beta)) (or D_opt = (C/6)^(alpha/(alpha+beta)) / G), then the other from C = 6ND.
    """
    one_of(compute_flops, n_params, n_tokens)
    a, b = law.alpha, law.beta
    if a <= 0 or b <= 0:
        raise ConfigError(f"the fitted law has alpha={a:.3g}, beta={b:.3g}: it implies no compute-optimal size")
    g = (a * law.A / (b * law.B)) ** (1.0 / (a + b))
    if compute_flops is not None:
        c6 = compute_flops / 6.0
    elif n_params is not None:
        c6 = (n_params / g) ** ((a + b) / b)
    else:
        c6 = (n_tokens * g) ** ((a + b) / a)
    n, d = (float(x) for x in law.optimal(6.0 * c6))
    return {"n_params": n, "n_tokens": d, "flops": 6.0 * n * d, "loss": float(law.loss(n, d)), "tokens_per_param": d / n,
            "law": law.as_dict()}
