"""The one resumable sweep runner: jobs in worker processes, one JSON line per finished job.

``lmlab scaling sweep`` (a grid of pre-training runs) and ``lmlab sweep`` (fine-tuning, distillation and
decoding recipes scored with ROUGE) both hand their jobs to ``run_jobs``. A job is an id and a function
that does the work (usually by starting ``python -m lmlab ...`` subprocesses in its own directory) and
returns its record. The runner

* skips every job whose id is already in ``runs.jsonl`` (a finished job is never recomputed),
* runs ``workers`` jobs at a time, each in its own thread driving its own processes,
* appends each record under a file lock and fsyncs it, so a kill loses at most the jobs in flight
  (they resume from their own checkpoints when the sweep is started again),
* reports progress: jobs done, the time left estimated from the cost of the finished ones,
* keeps going when one job fails (its error is recorded in ``failed.jsonl`` and reported at the end;
  the next invocation retries it).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lmlab.errors import LmlabError
from lmlab.scaling.units import format_duration

RUNS_FILE = "runs.jsonl"
FAILED_FILE = "failed.jsonl"


class SweepFailed(LmlabError):
    """Some jobs of a sweep failed (the others finished and are recorded); a re-run retries them."""


@dataclass
class Job:
    id: str
    run: Callable[[], dict[str, Any]]  # does the work -> the record (its "id" is set by the runner)
    cost: float = 1.0  # relative cost, for the time-left estimate (e.g. FLOPs)
    describe: Callable[[dict], str] | None = None  # the progress line's text for a finished record


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line under an exclusive lock, flushed to disk (workers finish concurrently).

    A last line cut by a kill (no newline) is ended first, so the new record gets a line of its own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        end = f.seek(0, os.SEEK_END)
        cut = False
        if end:
            f.seek(end - 1)
            cut = f.read(1) != b"\n"
        f.write((("\n" if cut else "") + json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
        fcntl.flock(f, fcntl.LOCK_UN)


def read_records(path: Path) -> list[dict]:
    """The records of a runs.jsonl; a line cut by a kill mid-write is skipped (that job is simply redone)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "id" in record:
            records.append(record)
    return records


def done_ids(path: Path) -> set[str]:
    return {r["id"] for r in read_records(path)}


def run_jobs(jobs: list[Job], out: Path, workers: int = 1, echo: Callable[[str], None] = print,
             total: int | None = None) -> list[dict]:
    """Run every job of `jobs` not yet recorded in ``OUT/runs.jsonl`` -> the records written now.

    A failing job does not stop the others; the failures are listed at the end and raised as one
    SweepFailed naming them (so a sweep with failures exits non-zero after finishing what it could).
    """
    if workers < 1:
        raise ValueError(f"workers={workers} must be >= 1")
    runs_path = out / RUNS_FILE
    done = done_ids(runs_path)
    todo = [j for j in jobs if j.id not in done]
    total = total if total is not None else len(jobs)
    finished = total - len(todo)
    if not todo:
        return []
    cost_left, cost_done, started = sum(j.cost for j in todo), 0.0, time.time()
    written, failures = [], []
    queue = list(todo)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        running: dict[Future, Job] = {}
        while queue or running:
            while queue and len(running) < workers:
                job = queue.pop(0)
                running[pool.submit(_timed, job)] = job
            complete, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in complete:
                job = running.pop(fut)
                cost_done += job.cost
                cost_left -= job.cost
                elapsed = time.time() - started
                left = elapsed * cost_left / cost_done if cost_done else float("nan")
                try:
                    record, wall = fut.result()
                except Exception as exc:  # recorded, reported, retried by the next invocation
                    failures.append((job.id, exc))
                    append_record(out / FAILED_FILE, {"id": job.id, "error": f"{type(exc).__name__}: {exc}",
                                                      "traceback": traceback.format_exc(limit=5)})
                    echo(f"[failed] {job.id}: {type(exc).__name__}: {exc}")
                    continue
                record = {"id": job.id, **{k: v for k, v in record.items() if k != "id"}}
                record.setdefault("wall_s", round(wall, 1))
                append_record(runs_path, record)
                written.append(record)
                finished += 1
                what = job.describe(record) if job.describe else "done"
                echo(f"[{finished}/{total}] {job.id}: {what} ({format_duration(wall)}); "
                     f"about {format_duration(left)} left")
    if failures:
        raise SweepFailed(f"{len(failures)} job(s) failed: " + "; ".join(f"{i} ({type(e).__name__}: {e})"
                                                                        for i, e in failures)
                           + f"; details in {out / FAILED_FILE}; run the sweep again to retry them")
    return written


def _timed(job: Job) -> tuple[dict, float]:
    t0 = time.time()
    record = job.run()
    return record, time.time() - t0
