"""`lmlab summarize [DIALOGUE | --file F | stdin]`: summarize one dialogue with zero/one/few-shot prompting."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmlab.commands.generate import add_generation_arguments, generation_config

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmlab.cli import add_engine_argument

    add_engine_argument(parser)
    parser.add_argument("dialogue", nargs="?", default=None,
                        help="the dialogue text (#Person1#: ... one turn per line); else --file, else stdin")
    parser.add_argument("--file", default=None, help="read the dialogue from this text file")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="summarize every dialogue of a file (DialogSum JSONL or CSV; --records START:STOP) into "
                             "--out OUT.jsonl (fname, dialogue, summary: lmlab finetune --data reads it back), "
                             "batched, resumable")
    parser.add_argument("--records", default=None, metavar="START:STOP", help="with --data: a slice of its records")
    parser.add_argument("--out", default=None, metavar="OUT.jsonl", help="with --data: where the summaries go")
    parser.add_argument("--batch-size", type=int, default=8, help="with --data: dialogues per batch (default 8)")
    parser.add_argument("--model", default=None,
                        help="default: smollm2-135m-instruct (with --student DIR: the bundle's own base model)")
    adapter = parser.add_mutually_exclusive_group()
    adapter.add_argument("--adapter", default=None, metavar="DIR",
                         help="LoRA adapter (PEFT format, e.g. from lmlab finetune); its prompt recipe is used. "
                              "Default without --shots, --template or --chat/--no-chat: the fine-tuned summarizer "
                              "lmlab ships for the default model")
    adapter.add_argument("--no-adapter", action="store_true", help="prompt the base model, no fine-tuned adapter")
    adapter.add_argument("--student", nargs="?", const="shipped", default=None, metavar="DIR",
                         help="summarize with a distilled student bundle (lmlab distill with student.lora) and its "
                              "prompt recipe; without DIR: the student lmlab ships for --model")
    parser.add_argument("--shots", type=int, default=0, help="number of examples in the prompt (default 0)")
    parser.add_argument("--shots-from", default=None, metavar="FILE",
                        help="DialogSum JSONL (fields dialogue, summary) to draw the shots from")
    parser.add_argument("--select", choices=["random", "nearest"], default="random",
                        help="random (seeded by --shot-seed) or nearest by MiniLM sentence embeddings")
    parser.add_argument("--shot-seed", type=int, default=0, help="seed of random shot selection")
    parser.add_argument("--template", choices=["instruction", "flan", "bare"], default=None,
                        help="prompt wording: an instruction, FLAN's dialogue template, or the dialogue alone")
    parser.add_argument("--chat", dest="chat", action="store_true", default=None,
                        help="use the chat template (default: when the tokenizer has one)")
    parser.add_argument("--no-chat", dest="chat", action="store_false", help="plain-text prompt")
    parser.add_argument("--show-prompt", action="store_true", help="print the prompt (and budget notes) to stderr")
    parser.add_argument("--best-of", type=int, default=None, metavar="N",
                        help="sample N summaries (needs --do-sample) and keep the one --reward scores highest, "
                             "or with --mbr the consensus. Default: the recipe's decoding (the shipped adapter's: "
                             "--best-of 8 --mbr at T=0.7); --best-of 1 or --greedy: one greedy summary")
    parser.add_argument("--reward", default=None, metavar="DIR", help="the reward model of --best-of (lmlab reward train)")
    parser.add_argument("--mbr", action="store_true",
                        help="--best-of keeps the sample with the highest mean ROUGE against the other samples "
                             "(minimum Bayes risk; no reward model)")
    add_generation_arguments(parser, max_new_tokens=96)


def run(args: argparse.Namespace) -> int:
    import lmlab
    from lmlab.errors import DataError
    from lmlab.prompting import Example, SentenceEmbedder, summarize
    from lmlab.precision import apply_precision

    config = generation_config(args)
    _check_best_of_flags(args)
    if args.data is not None or args.out is not None or args.records is not None:
        return _run_file(args, config)
    if args.dialogue is not None and args.file is not None:
        raise DataError("give the dialogue as an argument or with --file, not both")
    if args.file is not None:
        from lmlab.tasks.summarize.data import read_utf8

        dialogue = read_utf8(args.file)
    else:
        dialogue = args.dialogue if args.dialogue is not None else sys.stdin.read()
    if not dialogue.strip():
        raise DataError("the dialogue is empty")
    if args.shots and not args.shots_from:
        raise DataError(f"--shots {args.shots} needs --shots-from FILE (a DialogSum JSONL)")
    pool = []
    if args.shots_from:
        from lmlab.tasks.summarize.data import load_dialogues

        pool = [Example(d.dialogue, d.references[0]) for d in load_dialogues(args.shots_from).records if d.references]
    if args.student is not None:
        return _run_student(args, dialogue.strip(), config, pool)
    args.model = args.model or DEFAULT_MODEL
    adapter = args.adapter
    prompt_chosen = args.template is not None or args.chat is not None  # the user asked for a prompt style
    if adapter is None and not args.no_adapter and not args.shots and not prompt_chosen:
        from lmlab.adapt.recipe import shipped_adapter

        adapter = shipped_adapter(args.model)
    template, chat, instruction = args.template or "instruction", args.chat, None
    recipe = None
    if adapter is not None:
        from lmlab.adapt.recipe import Recipe

        recipe = Recipe.load(adapter)
        if recipe is not None:  # the prompt the adapter was trained on
            template, chat, instruction = recipe.template, recipe.chat, recipe.instruction
        print(f"fine-tuned summarizer: adapter {adapter} (--no-adapter prompts the base model)", file=sys.stderr)
    elif not args.shots and not prompt_chosen:
        from lmlab.adapt.recipe import Recipe

        recipe = Recipe.load(args.model) if Path(args.model).is_dir() else None
        if recipe is not None:  # a fully fine-tuned or distilled model: the prompt it was trained on
            template, chat, instruction = recipe.template, recipe.chat, recipe.instruction
    config = recipe_mbr(config, recipe, args)
    if args.best_of is not None or args.reward is not None or args.mbr:
        _check_best_of(args, config)
    config = recipe_decoding(config, recipe, args)
    model = lmlab.load_model(args.model, adapter=adapter, quantize=args.quantize)
    tokenizer = lmlab.load_tokenizer(args.model)
    print(f"precision: {apply_precision(model, args.precision)}", file=sys.stderr)
    embedder = SentenceEmbedder() if args.shots and args.select == "nearest" else None
    if (args.best_of or 1) > 1:
        summary, prompt = _summarize_best_of(args, dialogue.strip(), model, tokenizer, pool, template, chat, config,
                                             embedder, instruction)
    else:
        summary, prompt = summarize(dialogue.strip(), model, tokenizer, pool, args.shots, method=args.select,
                                    template=template, chat=chat, config=config, seed=args.shot_seed,
                                    embedder=embedder, instruction=instruction)
    if args.show_prompt:
        print(prompt.text, file=sys.stderr)
        print(f"--- {prompt.n_tokens} prompt tokens, {len(prompt.shots)} shots", file=sys.stderr)
    for note in prompt.notes:
        print(f"note: {note}", file=sys.stderr)
    if not summary:
        print("note: the model produced no summary text (it stopped at a stop string at once); "
              "try --chat or --template instruction", file=sys.stderr)
    print(summary)
    return 0


def _run_file(args: argparse.Namespace, config) -> int:
    """--data FILE --out OUT.jsonl: every dialogue of FILE summarized as the lab's fine-tuned experiment does it
    (the adapter's recipe and its decoding), into a resumable JSONL (``lmlab.tasks.summarize.batch``)."""
    import hashlib

    import lmlab
    from lmlab.adapt.peft import WEIGHTS_FILE
    from lmlab.adapt.recipe import Recipe, shipped_adapter
    from lmlab.errors import ConfigError, DataError
    from lmlab.precision import apply_precision
    from lmlab.tasks.summarize.batch import read_done, summarize_file
    from lmlab.tasks.summarize.data import load_dialogues
    from lmlab.tasks.summarize.experiments import INSTRUCTION

    if args.data is None or args.out is None:
        raise ConfigError("--data FILE and --out OUT.jsonl go together (and --records with them)")
    given = [flag for flag, value in (("a dialogue", args.dialogue), ("--file", args.file), ("--student", args.student),
                                      ("--shots", args.shots or None), ("--reward", args.reward),
                                      ("--template", args.template), ("--chat/--no-chat", args.chat)) if value is not None]
    if given:
        raise ConfigError(f"--data summarizes with the fine-tuned recipe (or --no-adapter's instruction prompt); drop "
                          f"{', '.join(given)}")
    records = load_dialogues(args.data).records
    if args.records is not None:
        start, _, stop = args.records.partition(":")
        try:
            records = records[int(start or 0):int(stop) if stop else None]
        except ValueError:
            raise ConfigError(f"--records {args.records!r} must be START:STOP, e.g. 0:400") from None
        if not records:
            raise DataError(f"--records {args.records!r} selects no dialogue of {args.data!r}")
    args.model = args.model or DEFAULT_MODEL
    adapter = args.adapter if args.adapter is not None or args.no_adapter else shipped_adapter(args.model)
    recipe = Recipe.load(adapter) if adapter is not None else None
    if recipe is None and adapter is None and Path(args.model).is_dir():
        recipe = Recipe.load(args.model)  # a fully fine-tuned model carries its recipe
    config = recipe_mbr(config, recipe, args)
    if args.best_of is not None or args.mbr:
        _check_best_of(args, config)
    config = recipe_decoding(config, recipe, args)
    weights = Path(adapter) / WEIGHTS_FILE if adapter is not None else None
    settings = {"model": str(args.model),
                "adapter": hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights is not None else None,
                "best_of": args.best_of or 1, "seed": args.seed or 0,
                "decoding": {k: v for k, v in config.to_dict().items() if k in (
                    "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "num_beams",
                    "length_penalty", "no_repeat_ngram_size", "min_new_tokens", "repetition_penalty")}}
    read_done(Path(args.out), settings)  # a file written with other settings is refused before the model loads
    model = lmlab.load_model(args.model, adapter=adapter, quantize=args.quantize)
    tokenizer = lmlab.load_tokenizer(args.model)
    print(f"precision: {apply_precision(model, args.precision)}", file=sys.stderr)
    chat = recipe.chat if recipe is not None else getattr(tokenizer, "chat_template", None) is not None
    budget = max(16, model.config.max_seq_len - config.max_new_tokens)  # as the lab fits its prompts
    if recipe is None:
        recipe = Recipe(template="instruction", instruction=INSTRUCTION, chat=chat, prompt_field="dialogue",
                        response_field="summary")
    written = summarize_file(model, tokenizer, lambda text: recipe.prompt(text, tokenizer, budget).text, records,
                             config, Path(args.out), settings, chat, best_of=args.best_of or 1, seed=args.seed or 0,
                             batch_size=args.batch_size, echo=lambda line: print(line, file=sys.stderr))
    print(f"{written} summaries written to {args.out}", file=sys.stderr)
    return 0


def _run_student(args: argparse.Namespace, dialogue: str, config, pool) -> int:
    """--student [DIR]: the bundle's merged student, prompted with the recipe it was distilled with."""
    import lmlab
    from lmlab.adapt.recipe import Recipe, resolve_student
    from lmlab.adapt.student import read_bundle
    from lmlab.errors import ConfigError
    from lmlab.precision import apply_precision
    from lmlab.prompting import summarize

    if args.shots or args.template is not None or args.chat is not None or args.best_of not in (None, 1) or args.mbr:
        raise ConfigError("--student uses the prompt recipe the student was distilled with; drop --shots, "
                          "--template, --chat/--no-chat, --best-of and --mbr")
    student = resolve_student(args.student, args.model or DEFAULT_MODEL)
    bundle = read_bundle(student)  # a clear error before any weights load
    recipe = Recipe.load(student)
    template, chat, instruction = ((recipe.template, recipe.chat, recipe.instruction) if recipe is not None
                                   else ("instruction", None, None))
    print(f"distilled student: {student} ({len(bundle.keep_layers)} layers of {bundle.base_model})", file=sys.stderr)
    config = recipe_decoding(config, recipe, args)
    model = lmlab.load_model(args.model, student=student, quantize=args.quantize) if args.model else \
        lmlab.load_model(student, quantize=args.quantize)
    tokenizer = lmlab.load_tokenizer(student)
    print(f"precision: {apply_precision(model, args.precision)}", file=sys.stderr)
    summary, prompt = summarize(dialogue, model, tokenizer, pool, 0, template=template, chat=chat, config=config,
                                instruction=instruction)
    if args.show_prompt:
        print(prompt.text, file=sys.stderr)
        print(f"--- {prompt.n_tokens} prompt tokens, 0 shots", file=sys.stderr)
    for note in prompt.notes:
        print(f"note: {note}", file=sys.stderr)
    print(summary)
    return 0


def recipe_mbr(config, recipe, args: argparse.Namespace):
    """The recipe's minimum Bayes risk decoding (its ``mbr``) where the command line chose no other.

    No --best-of, --reward, --do-sample/--greedy or --num-beams given: sample the recipe's n summaries with its
    sampling settings and keep the consensus (sets ``args.best_of`` and ``args.mbr``). --best-of N alone: N
    samples, the recipe's sampling settings, the consensus. Returns `config` with those sampling settings.
    """
    mbr = getattr(recipe, "mbr", None) if recipe is not None else None
    if not mbr or args.reward is not None or args.best_of == 1:
        return config
    if args.best_of is None and (args.do_sample is not None or args.num_beams is not None or args.mbr):
        return config  # the command line chose the decoding (--mbr without --best-of is refused later)
    n = args.best_of or recipe.mbr_samples
    args.best_of, args.mbr = n, True
    if args.do_sample is False:
        return config  # --best-of N --greedy: refused by _check_best_of (greedy samples are one text)
    sampling = {} if args.do_sample else recipe.mbr_sampling  # --do-sample: the flags' own sampling settings
    print(f"decoding from the recipe: minimum Bayes risk over {n} samples "
          f"({', '.join(f'{k}={v}' for k, v in sampling.items() if k != 'do_sample') or 'as the flags say'}); "
          f"--best-of 1 decodes one summary", file=sys.stderr)
    return config.replace(**sampling)


def recipe_decoding(config, recipe, args: argparse.Namespace):
    """`config` with the recipe's decoding settings (beams, length penalty, ...) for every flag not given.

    A sampled request keeps its own decoding: the recipe's settings were chosen for greedy or beam search."""
    if recipe is None or not recipe.generation or config.do_sample:
        return config
    chosen = {k: v for k, v in recipe.generation.items() if getattr(args, k, None) is None}
    if chosen:
        print("decoding from the recipe: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in chosen.items()),
              file=sys.stderr)
    return config.replace(**chosen)


def _check_best_of_flags(args: argparse.Namespace) -> None:
    """The --best-of mistakes any recipe leaves wrong, refused before the dialogue is read."""
    from lmlab.errors import ConfigError

    if args.best_of is not None and args.best_of < 1:
        raise ConfigError(f"--best-of {args.best_of} must be >= 1")
    if args.mbr and args.reward is not None:
        raise ConfigError("--best-of keeps either the reward model's pick (--reward DIR) or the consensus (--mbr); "
                          "choose one")
    if args.reward is not None and (args.best_of or 1) == 1:
        raise ConfigError("--reward is used by --best-of N (N > 1); add --best-of")


def _check_best_of(args: argparse.Namespace, config) -> None:
    """--best-of N needs a judge (--reward DIR or --mbr, or a recipe's mbr) and sampling; checked after the recipe
    is read (it may supply both) and before any model loads."""
    from lmlab.errors import ConfigError

    _check_best_of_flags(args)
    n = args.best_of or 1
    if n > 1 and args.reward is None and not args.mbr:
        raise ConfigError(f"--best-of {n} needs --reward DIR (a reward model from lmlab reward train) "
                          f"or --mbr (keep the consensus)")
    if args.mbr and n < 2:
        raise ConfigError(f"--mbr picks among --best-of N samples; N is {n}, give N >= 2")
    if n > 1 and not config.do_sample:
        raise ConfigError(f"--best-of {n} needs --do-sample: {n} greedy runs write the same text")


def _summarize_best_of(args, dialogue, model, tokenizer, pool, template, chat, config, embedder, instruction):
    """The prompt ``lmlab.prompting.summarize`` would build, then n samples and the reward model's (or MBR's) pick."""
    from lmlab.align.best_of_n import best_of_n
    from lmlab.prompting import DIALOGUE_STOP_STRINGS, build_prompt, select_shots

    if args.mbr:
        from lmlab.align.mbr import MBRScorer

        scorer, label = MBRScorer(), "mbr"
    else:
        from lmlab.align.reward import RewardScorer

        scorer, label = RewardScorer.load(args.reward), "reward"
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    if not chat and not config.stop_strings:
        config = config.replace(stop_strings=list(DIALOGUE_STOP_STRINGS))
    shots = select_shots(dialogue, pool, args.shots, method=args.select, seed=args.shot_seed,
                         embedder=embedder) if args.shots else []
    prompt = build_prompt(dialogue, shots, template=template, tokenizer=tokenizer, chat=chat, instruction=instruction,
                          embedder=embedder, context_window=model.config.max_seq_len,
                          max_new_tokens=config.max_new_tokens)

    def clean(text: str) -> str:
        text = text.strip()
        return text[len("summary:"):].strip() if text.lower().startswith("summary:") else text

    picked = best_of_n(model, tokenizer, [prompt.text], [dialogue], args.best_of, config, scorer, clean=clean)[0]
    for k, (text, score) in enumerate(zip(picked.candidates, picked.scores)):
        mark = "*" if k == picked.index else " "
        print(f"{mark} {label} {score:8.4f}  {text}", file=sys.stderr)
    return picked.text, prompt
