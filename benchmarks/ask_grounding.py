"""How often `lmlab ask` says "not found in the indexed dialogues": on questions the indexed dialogues do
not answer (general knowledge, nothing DialogSum talks about) and on questions built from dev records
400..400+N-1 (the first sentence of a record's summary turned into "What happened when ...?").

    PYTHONPATH=src python benchmarks/ask_grounding.py INDEX --data ../shared/data/dialogsum/dev.jsonl -n 20

INDEX is ``lmlab index build INDEX --data dev.jsonl``. Prints, for each set: the share answered "not found",
the share whose own dialogue was among the sources (supported set), the share citing a retrieved source,
and the invented citations dropped.
"""

from __future__ import annotations

import argparse
import json
import re
import time

UNSUPPORTED = [
    "What is the melting point of tungsten?", "Who wrote The Brothers Karamazov?",
    "How many moons does Neptune have?", "What is the half-life of carbon-14?",
    "Which enzyme unwinds DNA during replication?", "What is the airspeed of an unladen swallow in km/h?",
    "Who won the 1954 FIFA World Cup final?", "What is the atomic number of osmium?",
    "Which river flows through Ulaanbaatar?", "What is the Schwarzschild radius of the Sun?",
    "Who composed the opera Rusalka?", "What year was the Treaty of Westphalia signed?",
    "What is the boiling point of liquid nitrogen?", "Which bone is the longest in a giraffe's neck?",
    "What is the chemical formula of quartz?", "Who painted The Garden of Earthly Delights?",
    "How deep is the Mariana Trench?", "What programming language was the Linux kernel first written in?",
    "What is the speed of sound in seawater?", "Which planet has the Great Red Spot?",
]


def supported_questions(path: str, n: int) -> list[tuple[str, str]]:
    records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()][400:400 + n]
    out = []
    for r in records:
        first = re.split(r"(?<=[.!?])\s", r["summary"].strip())[0].rstrip(".!? ")
        out.append((r["fname"], f"What happened when {first[0].lower() + first[1:]}?"))
    return out


def main() -> None:
    import lmlab
    from lmlab.generation import GenerationConfig
    from lmlab.index import Index, grounded_answer

    p = argparse.ArgumentParser()
    p.add_argument("index")
    p.add_argument("--data", required=True)
    p.add_argument("-n", type=int, default=20)
    p.add_argument("-k", type=int, default=4)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--show", action="store_true", help="print every answer")
    p.add_argument("--sets", default="unsupported,supported", help="which question sets to run (comma-separated)")
    args = p.parse_args()
    index = Index(args.index)
    model, tok = lmlab.load_model(args.model), lmlab.load_tokenizer(args.model)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    sets = {"unsupported": [(None, q) for q in UNSUPPORTED[:args.n]],
            "supported": supported_questions(args.data, args.n)}
    sets = {name: sets[name] for name in args.sets.split(",")}
    start = time.perf_counter()
    for name, questions in sets.items():
        not_found = own = cites = invented = 0
        for target, q in questions:
            answer, pieces = grounded_answer(model, tok, index, q, k=args.k, config=config)
            for _ in pieces:
                pass
            not_found += answer.not_found
            own += target is not None and target in {s.id for s in answer.sources}
            cites += bool(answer.cited)
            invented += len(answer.invented)
            if args.show:
                print(f"[{name}] {q}\n  -> {answer.text!r}  cited={answer.cited} invented={answer.invented}")
        n = len(questions)
        line = f"{name:12s} n={n}  not found {not_found}/{n} ({not_found / n:.0%})  cites a source {cites}/{n}"
        if name == "supported":
            line += f"  own dialogue among the sources {own}/{n}"
        print(line + f"  invented citations dropped {invented}", flush=True)
    print(f"({time.perf_counter() - start:.0f} s, k={args.k}, max_new_tokens={args.max_new_tokens}, greedy)")


if __name__ == "__main__":
    main()
