"""UUID memorization (the MoRA paper's memory task) on a tiny Llama, on CPU, with transformers.Trainer.

Random uuid4 key -> value pairs are generated locally; each example is "<key>:<value>" at the
character level, with the loss on every token (the paper's labels = input_ids: instruction_weight
1.0). The same randomly initialised tiny Llama is fine-tuned four ways:

- LoRA rank r (alpha 2r) on every attention and MLP projection,
- MoRA type 1 (sharing) and type 6 (RoPE) with the same rank r, i.e. the same trainable parameter
  count per layer (r_hat^2 ~= (in + out) r),
- full fine-tuning (every parameter),

and the character accuracy of the values (teacher forced, given the key) is recorded during
training. Outputs under --out (default examples/results/; with --quick a new temporary folder,
printed, so a smoke run never overwrites the committed results): uuid_memorization.png (accuracy
curves), uuid_memorization.json.
The loss is fusedpeft's (patch_causal_lm), the layers fusedpeft's (apply_lora / apply_mora).

    python examples/uuid_memorization.py            # ~3-5 minutes on a 2-core CPU
    python examples/uuid_memorization.py --quick    # ~30 seconds, a smoke run
"""

from __future__ import annotations

import argparse
import random
import sys
import uuid
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fusedpeft as fp  # noqa: E402
from example_utils import EvalCurve, output_dir, plot, save_json, tiny_llama, train, trainable_parameters, word_tokenizer  # noqa: E402

HEX = "0123456789abcdef-:"


def uuid_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    make = lambda: str(uuid.UUID(int=rng.getrandbits(128), version=4))  # noqa: E731
    return [{"prompt": make() + ":", "completion": make()} for _ in range(n)]


def value_accuracy(collator, pairs, eos_id: int, batch_size: int = 128):
    """Character accuracy of the values given their keys: argmax at each value position (teacher forced)."""
    def evaluate(model) -> dict:
        correct = total = 0
        for i in range(0, len(pairs), batch_size):
            batch = collator(pairs[i:i + batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            target = batch["labels"][:, 1:]
            scored = ~batch["instruction_mask"][:, 1:] & target.ne(-100) & target.ne(eos_id)
            correct += (logits[:, :-1].argmax(-1).eq(target) & scored).sum().item()
            total += scored.sum().item()
        return {"accuracy": correct / total}
    return evaluate


def build(method: str, rank: int, vocab: int, hidden: int, layers: int):
    model = tiny_llama(vocab, hidden=hidden, layers=layers)
    if method == "lora":
        fp.apply_lora(model, r=rank, alpha=2.0 * rank)
    elif method.startswith("mora"):
        fp.apply_mora(model, r=rank, mora_type=int(method[-1]))
    return fp.patch_causal_lm(model, instruction_weight=1.0)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: examples/results; with --quick a new temporary folder)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (~30 s)")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3, help="learning rate of the adapters")
    parser.add_argument("--full-lr", type=float, default=1e-3, help="learning rate of full fine-tuning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out = output_dir(args.out, args.quick, "uuid_memorization")
    if args.quick:
        args.pairs, args.steps, args.hidden = 32, 24, 64
    torch.manual_seed(args.seed)
    tokenizer = word_tokenizer(HEX, split_chars=True)
    collator = fp.InstructionCollator(tokenizer)
    pairs = uuid_pairs(args.pairs, args.seed)
    every = max(1, args.steps // 16)
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "runs": {}}
    methods = {"lora": f"LoRA r={args.rank}", "mora1": f"MoRA type 1 r={args.rank}",
               "mora6": f"MoRA type 6 r={args.rank}", "full": "full fine-tuning"}
    for method, label in methods.items():
        model = build(method, args.rank, len(tokenizer), args.hidden, args.layers)
        params = trainable_parameters(model)
        curve = EvalCurve(value_accuracy(collator, pairs, tokenizer.eos_token_id), every)
        run = train(model, pairs, collator, steps=args.steps, batch_size=args.batch_size,
                    lr=args.full_lr if method == "full" else args.lr, callback=curve,
                    warmup_steps=args.steps // 20, seed=args.seed)
        results["runs"][label] = {"trainable_parameters": params, **run}
        print(f"{label:24s} trainable {params:8d}  final value accuracy {run['eval'][-1]['accuracy']:.3f}  "
              f"({run['seconds']:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    save_json(args.out / "uuid_memorization.json", results)
    runs = results["runs"]
    plot(args.out / "uuid_memorization.png", [
        ("UUID value accuracy (teacher forced)", "character accuracy",
         {f"{k} ({v['trainable_parameters']:,} params)": [(r["step"], r["accuracy"]) for r in v["eval"]]
          for k, v in runs.items()}),
        ("training loss", "loss", {k: v["train_loss"] for k, v in runs.items()}),
    ])
    return results


if __name__ == "__main__":
    main()
