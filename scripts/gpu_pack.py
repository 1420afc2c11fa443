"""Pack the winners of the GPU sweeps for the trip back (scripts/gpu-sweeps.sh): bf16 adapters, a size cap.

python scripts/gpu_pack.py OUT_DIR  -> OUT_DIR/weights.tar with the best shippable run of each sweep:
issue #22's adapter (<= 25 MB in bf16) and issue #20's student bundle (<= 40 MB in bf16), chosen by the
ROUGE-1 of their best decoding on dev records 400-499. Also writes OUT_DIR/winners.json.
"""

import json
import shutil
import sys
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OUT = Path(sys.argv[1])
LIMITS = {"runs/sweep-dialogsum": 25e6, "runs/sweep-student": 40e6}


def bf16_size(d: Path) -> float:
    """Bytes once the run's own adapter is bf16 (a student bundle's teacher_adapter/ is kept as it is)."""
    return sum(f.stat().st_size / (2 if f.parent == d and f.suffix == ".safetensors" else 1)
               for f in d.rglob("*") if f.is_file())


def best(sweep: str, limit: float):
    runs = Path(sweep) / "runs.jsonl"
    if not runs.exists():
        return None
    rows = [json.loads(l) for l in runs.read_text().splitlines() if l.strip()]
    ranked = []
    for r in rows:
        d = Path(sweep) / r["id"] / "train" / "best"
        if not r.get("job") or not d.exists() or not (d / "adapter_config.json").exists():
            continue  # only adapters and student bundles can ship
        name, score = max(((n, s["rouge1"]) for n, s in r["evals"].items()), key=lambda x: x[1])
        if bf16_size(d) <= limit:
            ranked.append((score, r["id"], name, d))
    return max(ranked) if ranked else None


winners = {}
stage = OUT / "stage"
for sweep, limit in LIMITS.items():
    hit = best(sweep, limit)
    if hit is None:
        continue
    score, run_id, decoding, d = hit
    dest = stage / Path(sweep).name / run_id
    shutil.copytree(d, dest)
    for f in dest.glob("*.safetensors"):  # the run's own adapter; teacher_adapter/ keeps its dtype
        tensors = load_file(str(f))
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}, str(f))
    winners[sweep] = {"id": run_id, "rouge1": score, "decoding": decoding, "dir": str(dest.relative_to(stage))}
(OUT / "winners.json").write_text(json.dumps(winners, indent=2))
if winners:
    with tarfile.open(OUT / "weights.tar", "w") as tar:
        tar.add(stage, arcname="weights")
print(json.dumps(winners, indent=2))
