"""`lmlab tokenizer train`: flags -> ``lmlab.tokenizer_train.train_tokenizer``."""

from __future__ import annotations


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    p = sub.add_parser("train", help="train a byte-level BPE or Unigram tokenizer and save tokenizer.json")
    p.add_argument("--kind", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary, special tokens included")
    p.add_argument("--files", nargs="+", required=True, help=".txt (blank-line separated documents), .jsonl, hf:DATASET")
    p.add_argument("--field", default="text", help="JSONL/datasets field with the text (DialogSum: dialogue)")
    p.add_argument("--out", required=True, help="output directory (tokenizer.json + tokenizer_config.json)")
    p.add_argument("--special", nargs="*", default=[], metavar="ROLE=TOKEN",
                   help="special tokens by role (pad, bos, eos, unk, mask), e.g. eos='<|endoftext|>'; ROLE= drops one. "
                        "Default: pad=<pad> bos=<s> eos=</s> unk=<unk> mask=<mask>")
    p.add_argument("--sentinels", type=int, default=0, help="add T5's <extra_id_0..N-1> (for span corruption)")
    p.add_argument("--min-frequency", type=int, default=2, help="BPE: minimum pair count to merge")


def run(args) -> int:
    from tokenizers import Tokenizer

    from lmlab.corpus import iter_documents
    from lmlab.tokenizer_train import parse_special_tokens, train_tokenizer

    special = parse_special_tokens(args.special)
    train_tokenizer(iter_documents(args.files, args.field), kind=args.kind, vocab_size=args.vocab_size,
                    special_tokens=special, n_sentinels=args.sentinels, min_frequency=args.min_frequency,
                    out_dir=args.out)
    vocab = Tokenizer.from_file(f"{args.out}/tokenizer.json").get_vocab_size()
    print(f"saved {args.kind} tokenizer ({vocab} tokens) to {args.out}")
    return 0
