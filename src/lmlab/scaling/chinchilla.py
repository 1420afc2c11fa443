"""Compute-optimal training (Hoffmann et al. 2022, "Chinchilla"): C = 6*N*D, D ~ 20*N, the fitted loss
L(N, D), and how long C FLOPs take on given hardware. Notation: see ``lmlab.scaling``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lmlab.errors import ConfigError
from lmlab.scaling.units import check_positive_int

# Hoffmann et al. 2022, eq. (10): the parametric loss fitted in "approach 3"
CHINCHILLA_E, CHINCHILLA_A, CHINCHILLA_B = 1.69, 406.4, 410.7
CHINCHILLA_ALPHA, CHINCHILLA_BETA = 0.34, 0.28


def training_flops(n_params: float, n_tokens: float) -> float:
    """C = 6*N*D: 2 FLOPs per parameter per token forward, 4 backward (Kaplan et al. 2020; Hoffmann et al. 2022)."""
    return 6.0 * n_params * n_tokens


def chinchilla_loss(n_params: float, n_tokens: float) -> float:
    """L(N, D) = E + A/N^alpha + B/D^beta with E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28 (nats/token on
    the paper's MassiveText; a guide to trends, not a prediction for another data set or tokenizer)."""
    if not n_params > 0 or not n_tokens > 0:
        raise ConfigError(f"chinchilla_loss needs positive N and D; got N={n_params!r}, D={n_tokens!r}")
    return (CHINCHILLA_E + CHINCHILLA_A / n_params ** CHINCHILLA_ALPHA
            + CHINCHILLA_B / n_tokens ** CHINCHILLA_BETA)


def one_of(compute_flops: float | None, n_params: float | None, n_tokens: float | None) -> tuple[str, float]:
    """The one of C, N, D a plan starts from -> (its name, its value); an error unless exactly one is a
    positive finite number."""
    given = {k: v for k, v in (("compute_flops", compute_flops), ("n_params", n_params), ("n_tokens", n_tokens))
             if v is not None}
    if len(given) != 1:
        raise ConfigError(f"give exactly one of compute_flops, n_params, n_tokens; got {sorted(given) or 'none'}")
    (name, value), = given.items()
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"{name}={value!r} must be a positive finite number")
    return name, value


@dataclass(frozen=True)
class ChinchillaPlan:
    n_params: float
    n_tokens: float
    flops: float
    loss: float
    tokens_per_param: float

    def as_dict(self) -> dict:
        return asdict(self)


def chinchilla_optimal(compute_flops: float | None = None, n_params: float | None = None,
                       n_tokens: float | None = None, tokens_per_param: float = 20.0) -> ChinchillaPlan:
    """Compute-optimal N, D and C from exactly one of them, with the rule of thumb D = r*N (r = 20).

    Hoffmann et al. 2022 find N_opt and D_opt both grow as ~C^0.5, with about 20 tokens per parameter
    (Table 3; Chinchilla itself: 70B parameters, 1.4T tokens). With C = 6*N*D and D = r*N:
        from C:  N = sqrt(C / (6r)),  D = r*N
        from N:  D = r*N,             C = 6*N*D
        from D:  N = D / r,           C = 6*N*D
    The loss is ``chinchilla_loss(N, D)``.
    """
    one_of(compute_flops, n_params, n_tokens)
    if not tokens_per_param > 0:
        raise ConfigError(f"tokens_per_param={tokens_per_param!r} must be > 0")
    r = float(tokens_per_param)
    if compute_flops is not None:
        n = math.sqrt(compute_flops / (6.0 * r))
    elif n_params is not None:
        n = float(n_params)
    else:
        n = n_tokens / r
    d = r * n
    return ChinchillaPlan(n_params=n, n_tokens=d, flops=training_flops(n, d), loss=chinchilla_loss(n, d),
                          tokens_per_param=r)


def chinchilla_loss_optimal(compute_flops: float) -> ChinchillaPlan:
    """N and D minimising ``chinchilla_loss`` under C = 6*N*D (Hoffmann et al. 2022, approach 3, eq. 4):

        N_opt = G * (C/6)^(beta/(alpha+beta)),  D_opt = (C/6)^(alpha/(alpha+beta)) / G,
        G = (alpha*A / (beta*B))^(1/(alpha+beta))

    With the paper's rounded constants this favours smaller models than D = 20N (about 32B parameters
    for Chinchilla's 5.76e23 FLOPs); ``chinchilla_optimal`` follows the 20-tokens-per-parameter rule.
    """
    if not compute_flops > 0 or math.isinf(compute_flops):
        raise ConfigError(f"compute_flops={compute_flops!r} must be a positive finite number")
    a, b = CHINCHILLA_ALPHA, CHINCHILLA_BETA
    g = (a * CHINCHILLA_A / (b * CHINCHILLA_B)) ** (1 / (a + b))
    n = g * (compute_flops / 6) ** (b / (a + b))
    d = (compute_flops / 6) ** (a / (a + b)) / g
    return ChinchillaPlan(n_params=n, n_tokens=d, flops=training_flops(n, d), loss=chinchilla_loss(n, d),
                          tokens_per_param=d / n)


def training_time(flops: float, peak_flops: float, mfu: float = 0.4, n_devices: int = 1) -> float:
    """Wall-clock seconds: C / (peak FLOP/s per device * model-FLOPs utilisation * devices)."""
    if not peak_flops > 0:
        raise ConfigError(f"peak_flops={peak_flops!r} must be > 0 (FLOP/s per device, e.g. 989e12 for an H100 bf16)")
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu={mfu!r} must be in (0, 1]")
    check_positive_int("n_devices", n_devices)
    if not flops > 0:
        raise ConfigError(f"flops={flops!r} must be > 0")
    return flops / (peak_flops * mfu * n_devices)
