"""How long BPETokenizer takes to encode Shakespeare (~1.3 MB), beside Hugging Face's GPT-2 tokenizers.

    python benchmarks/bench_bpe.py                      # a 512-token BPE trained on the plays
    python benchmarks/bench_bpe.py --files DIR          # a folder's vocab.json + merges.txt (GPT-2's own)

Ours runs twice on the whole corpus: cold (empty pre-token cache, every distinct word merged once)
and warm (every word found in the cache). When `transformers` is installed, its GPT2Tokenizer
(in transformers 5, the Rust `tokenizers` backend) encodes the same text from the same files, and the
ids are compared: they must be equal.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from minirlhf.datasets import load_text  # noqa: E402
from minirlhf.tokenizer import BPETokenizer, pretokenize  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--files", help="a folder with vocab.json and merges.txt")
    parser.add_argument("--vocab-size", type=int, default=512, help="when training (default 512)")
    parser.add_argument("--train-chars", type=int, default=200_000, help="characters to train on")
    args = parser.parse_args()

    text = load_text()
    scratch = tempfile.TemporaryDirectory()      # where a trained tokenizer's files go; removed at exit
    _, seconds = timed(lambda: pretokenize(""))
    print(f"corpus: {len(text):,} characters, {len(text.encode()):,} bytes; "
          f"building the pre-token pattern: {seconds:.2f} s")
    folder = args.files
    if folder is None:
        tok, seconds = timed(lambda: BPETokenizer.train(text[:args.train_chars], args.vocab_size))
        print(f"train: {len(tok.merges)} merges on {args.train_chars:,} characters in {seconds:.1f} s")
        folder = tok.save(scratch.name)
    tok = BPETokenizer.from_files(Path(folder) / "vocab.json", Path(folder) / "merges.txt")

    _, seconds = timed(lambda: pretokenize(text))
    print(f"pre-tokenise only: {seconds:.2f} s")
    ids, cold = timed(lambda: tok.encode(text))
    _, warm = timed(lambda: tok.encode(text))
    print(f"BPETokenizer.encode: cold {cold:.2f} s, warm {warm:.2f} s ({len(ids):,} tokens, "
          f"{len(text.encode()) / cold / 1e6:.2f} MB/s cold); round trip exact: {tok.decode(ids) == text}")

    try:
        from transformers import GPT2Tokenizer
    except ImportError:
        print("transformers is not installed: no comparison")
        return
    theirs = GPT2Tokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"))
    for round in ("first", "second"):
        their_ids, seconds = timed(lambda: theirs(text)["input_ids"])
        print(f"transformers GPT2Tokenizer, {round} call: {seconds:.2f} s "
              f"(ours cold / theirs = {cold / seconds:.2f}); same ids: {their_ids == ids}")


if __name__ == "__main__":
    main()
