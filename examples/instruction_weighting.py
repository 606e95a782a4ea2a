"""Prompt-loss weight on a small instruction set: instruction_weight 0 vs 0.1 vs 1, on CPU.

A generated instruction set with long prompts and one-token answers (the regime where Instruction
Modelling and prompt-loss-weight studies report that loss on the prompt helps): "continue the
sequence : a0 a1 ... a(L-1) next :" -> "aL", an arithmetic progression of numbers below 100
(start 0-49, step 1-5, 6-9 terms shown). Each number is one token. A few hundred examples train a
randomly initialised tiny Llama with transformers.Trainer, InstructionCollator and
patch_causal_lm(model, instruction_weight=w); held-out progressions (start, step, length unseen
together) measure the answer accuracy (greedy next token after the prompt) and the answer loss.

Outputs under --out (default examples/results/; with --quick a new temporary folder, printed, so
a smoke run never overwrites the committed results): instruction_weighting.png (training
objective, held-out answer loss, held-out accuracy), instruction_weighting.json.

    python examples/instruction_weighting.py            # ~3-5 minutes on a 2-core CPU
    python examples/instruction_weighting.py --quick    # ~20 seconds, a smoke run
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fusedpeft as fp  # noqa: E402
from example_utils import EvalCurve, answer_metrics, output_dir, plot, save_json, tiny_llama, train, word_tokenizer  # noqa: E402

WORDS = ["continue", "the", "sequence", ":", "next"] + [str(i) for i in range(100)]


def progressions(seed: int) -> list[dict]:
    """Every (start, step, length) progression as a prompt/completion pair, shuffled."""
    items = []
    for start in range(50):
        for step in range(1, 6):
            for length in range(6, 10):
                terms = [str(start + i * step) for i in range(length + 1)]
                items.append({"prompt": "continue the sequence : " + " ".join(terms[:-1]) + " next :",
                              "completion": terms[-1]})
    random.Random(seed).shuffle(items)
    return items


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: examples/results; with --quick a new temporary folder)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (~20 s)")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    parser.add_argument("--train-size", type=int, default=300)
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out = output_dir(args.out, args.quick, "instruction_weighting")
    if args.quick:
        args.train_size, args.test_size, args.steps = 64, 64, 40
    tokenizer = word_tokenizer(WORDS)
    collator = fp.InstructionCollator(tokenizer)
    data = progressions(args.seed)
    train_set, test_set = data[:args.train_size], data[args.train_size:args.train_size + args.test_size]
    every = max(1, args.steps // 20)
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "runs": {}}
    for weight in args.weights:
        model = fp.patch_causal_lm(tiny_llama(len(tokenizer), hidden=args.hidden, layers=args.layers, seed=args.seed),
                                   instruction_weight=weight)
        curve = EvalCurve(answer_metrics(collator, test_set, tokenizer.eos_token_id), every)
        run = train(model, train_set, collator, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    callback=curve, warmup_steps=args.steps // 20, weight_decay=0.01, seed=args.seed)
        run["train_answer"] = answer_metrics(collator, train_set, tokenizer.eos_token_id)(model.eval())
        label = f"instruction_weight={weight:g}"
        results["runs"][label] = run
        final = run["eval"][-1]
        print(f"{label:24s} held-out accuracy {final['accuracy']:.3f}  answer loss {final['answer_loss']:.3f}  "
              f"(train accuracy {run['train_answer']['accuracy']:.3f}, {run['seconds']:.0f} s)", flush=True)
    save_json(args.out / "instruction_weighting.json", results)
    runs = results["runs"]
    plot(args.out / "instruction_weighting.png", [
        ("training objective (weighted loss)", "loss", {k: v["train_loss"] for k, v in runs.items()}),
        ("held-out answer loss", "cross-entropy", {k: [(r["step"], r["answer_loss"]) for r in v["eval"]]
                                                   for k, v in runs.items()}),
        ("held-out answer accuracy", "accuracy", {k: [(r["step"], r["accuracy"]) for r in v["eval"]]
                                                  for k, v in runs.items()}),
    ])
    return results


if __name__ == "__main__":
    main()
