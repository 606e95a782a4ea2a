"""LoRA learns less and forgets less (Biderman et al. 2024) on a tiny Llama, on CPU, with transformers.Trainer.

Tasks (generated locally; each symbol is one token). Sequences of 4-8 symbols over 16 letters a-p
and 10 digits 0-9:

- source task A, "copy x1 .. xL :" -> "x1 .. xL" and "reverse x1 .. xL :" -> "xL .. x1";
- target task B, "increment x1 .. xL :" -> the same sequence with every digit d replaced by
  (d + 1) mod 10 and every letter kept.

Why these: both have held-out structure (the held-out sequences never occur in training, so
accuracy on them measures a learnt rule, not memory) and a small model learns A to ~100% held-out
accuracy in about a minute of CPU. B reuses A's machinery (attend to the i-th input symbol, emit
it) and adds one new skill (a 10-way permutation of the digits, a full-rank change of the digit
readout), the way the paper's targets (code, math) reuse a base model's language ability and add
a domain. Forgetting is not forced: the instruction word tells A and B apart, so a model could do
both; what fine-tuning on B alone breaks of A is the forgetting. Forgetting here is measured on A's
own held-out data, as the paper measures its source domain on held-out benchmarks.

Steps: (1) pretrain a randomly initialised tiny Llama on A (full training) until its held-out A
accuracy is high; (2) fine-tune copies on B alone with full fine-tuning, LoRA r in --ranks (alpha
2r), MoRA types 1 and 6 at the parameter count of LoRA r = --mora-rank, and full fine-tuning with
strong weight decay (--wd) and with attention dropout (--dropout), the paper's regularisation
baselines; (3) every --every steps record learning (B held-out token accuracy) and forgetting (A
held-out token accuracy and loss, relative to the base); (4) fold every run's update into the
weights and take the singular values of ΔW = W_after - W_base of every attention / MLP projection:
the rank needed to explain 90% of its variance (sum of squared singular values), next to the LoRA
ranks and to a random Gaussian matrix of the same shape.

The layers are fusedpeft's (apply_lora / apply_mora, folded by merge_adapters), the loss fusedpeft's
(patch_causal_lm, prompt masked: instruction_weight 0). Outputs under --out (default
examples/results/; with --quick a new temporary folder, printed, so a smoke run never overwrites the
committed results): learning_forgetting.json (every number) and four PNGs: _tradeoff (forgetting
against learning over training, the paper's trade-off figure), _curves (both against the step),
_final (per method at the last step), _spectra (ΔW spectra and 90%-variance ranks).

    python examples/learning_forgetting.py            # ~3-4 minutes on a loaded 2-core CPU
    python examples/learning_forgetting.py --quick    # ~10-20 seconds, a smoke run
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fusedpeft as fp  # noqa: E402
from example_utils import (EvalCurve, answer_metrics, output_dir, plot, save_json, tiny_llama, train,  # noqa: E402
                           trainable_parameters, word_tokenizer)

SYMBOLS = [chr(ord("a") + i) for i in range(16)] + [str(d) for d in range(10)]
WORDS = ["copy", "reverse", "increment", ":"] + SYMBOLS
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def task(name: str, n: int, seed: int, exclude: frozenset = frozenset()) -> list[dict]:
    """``n`` distinct prompt/completion pairs of task "A" (copy or reverse) or "B" (increment digits)."""
    rng, items, seen = random.Random(seed), [], set(exclude)
    while len(items) < n:
        xs = [rng.choice(SYMBOLS) for _ in range(rng.randint(4, 8))]
        op = rng.choice(["copy", "reverse"]) if name == "A" else "increment"
        ys = xs if op == "copy" else xs[::-1] if op == "reverse" else [
            str((int(x) + 1) % 10) if x.isdigit() else x for x in xs]
        prompt = f"{op} {' '.join(xs)} :"
        if prompt not in seen:
            seen.add(prompt)
            items.append({"prompt": prompt, "completion": " ".join(ys)})
    return items


def variance_rank(delta: torch.Tensor, fraction: float = 0.9) -> int:
    """The smallest k such that the top k singular values of ``delta`` [m, n] hold ``fraction`` of
    its variance, sum(s_i^2) (0 for a zero matrix). Computed in float64."""
    if not isinstance(delta, torch.Tensor) or delta.dim() != 2:
        raise ValueError(f"variance_rank: delta must be a 2-D tensor, got {getattr(delta, 'shape', type(delta))}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"variance_rank: fraction must be in (0, 1], got {fraction}")
    energy = torch.linalg.svdvals(delta.double()).square()
    if energy.sum() == 0:
        return 0
    cumulative = energy.cumsum(0) / energy.sum()
    return min(int((cumulative < fraction - 1e-12).sum().item()) + 1, energy.numel())


def update_spectra(model, base_state: dict) -> dict:
    """{"layer i proj": {"shape", "rank90", "singular_values"}} of W - W_base for every projection."""
    out = {}
    for name, weight in model.state_dict().items():
        parts = name.split(".")
        if name.endswith(".weight") and parts[-2] in PROJECTIONS:
            delta = (weight.double() - base_state[name].double())
            out[f"layer {parts[2]} {parts[-2]}"] = {"shape": list(delta.shape), "rank90": variance_rank(delta),
                                                     "singular_values": torch.linalg.svdvals(delta).tolist()}
    return out


def at_learning(rows: list[dict], level: float) -> dict:
    """Task A accuracy and loss increase where B accuracy first reaches ``level`` (linear interpolation
    between the two checkpoints around it); None when it never does."""
    if rows[0]["B_accuracy"] >= level:
        return {k: rows[0][k] for k in ("step", "A_accuracy", "forgetting_loss")}
    for before, after in zip(rows, rows[1:]):
        if before["B_accuracy"] < level <= after["B_accuracy"]:
            t = (level - before["B_accuracy"]) / (after["B_accuracy"] - before["B_accuracy"])
            return {"step": before["step"] + t * (after["step"] - before["step"]),
                    **{k: before[k] + t * (after[k] - before[k]) for k in ("A_accuracy", "forgetting_loss")}}
    return None


def summary(results: dict) -> dict:
    """One row per method: final learning and forgetting, forgetting at equal learning (the lowest
    final B accuracy of all methods), and the 90%-variance rank of ΔW (median and max over matrices)."""
    runs = results["runs"]
    level = min(run["eval"][-1]["B_accuracy"] for run in runs.values())
    rows = {}
    for label, run in runs.items():
        final, ranks = run["eval"][-1], sorted(s["rank90"] for s in run["delta_w"].values())
        rows[label] = {"trainable_parameters": run["trainable_parameters"], "B_accuracy": final["B_accuracy"],
                       "A_accuracy": final["A_accuracy"], "A_loss_increase": final["forgetting_loss"],
                       "at_equal_learning": at_learning(run["eval"], level),
                       "rank90_median": ranks[len(ranks) // 2], "rank90_max": ranks[-1]}
    return {"equal_learning_B_accuracy": level, "methods": rows}


def methods(args) -> dict:
    """label -> (adapter, rank, learning rate, weight decay, attention dropout)."""
    runs = {"full fine-tuning": ("full", 0, args.full_lr, 0.0, 0.0),
            f"full, weight decay {args.wd:g}": ("full", 0, args.full_lr, args.wd, 0.0),
            f"full, attention dropout {args.dropout:g}": ("full", 0, args.full_lr, 0.0, args.dropout)}
    runs.update({f"LoRA r={r}": ("lora", r, args.lr, 0.0, 0.0) for r in args.ranks})
    runs.update({f"MoRA type {t} (r={args.mora_rank} budget)": (f"mora{t}", args.mora_rank, args.lr, 0.0, 0.0)
                 for t in (1, 6)})
    return runs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: examples/results; with --quick a new temporary folder)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (~20 s)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pretrain-steps", type=int, default=800)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps on task B")
    parser.add_argument("--every", type=int, default=10, help="evaluate every this many fine-tuning steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 8, 32], help="LoRA ranks")
    parser.add_argument("--mora-rank", type=int, default=8, help="the LoRA rank whose parameter count MoRA gets")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the adapters")
    parser.add_argument("--full-lr", type=float, default=3e-4, help="learning rate of full fine-tuning")
    parser.add_argument("--wd", type=float, default=1.0, help="AdamW weight decay of the regularised full run")
    parser.add_argument("--dropout", type=float, default=0.1, help="attention dropout of the regularised full run")
    parser.add_argument("--train-size", type=int, default=8000)
    parser.add_argument("--test-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out = output_dir(args.out, args.quick, "learning_forgetting")
    if args.quick:
        args.hidden, args.pretrain_steps, args.steps, args.every = 64, 40, 8, 4
        args.train_size, args.test_size = 512, 32
    start = time.perf_counter()
    tokenizer = word_tokenizer(WORDS)
    collator = fp.InstructionCollator(tokenizer)
    test_a, test_b = task("A", args.test_size, args.seed + 1), task("B", args.test_size, args.seed + 2)
    train_a = task("A", args.train_size, args.seed + 3, frozenset(x["prompt"] for x in test_a))
    train_b = task("B", args.train_size, args.seed + 4, frozenset(x["prompt"] for x in test_b))
    eval_a = answer_metrics(collator, test_a, tokenizer.eos_token_id)
    eval_b = answer_metrics(collator, test_b, tokenizer.eos_token_id)

    def both(model) -> dict:
        return {f"{t}_{k}": v for t, e in (("A", eval_a), ("B", eval_b)) for k, v in e(model).items()}

    base = fp.patch_causal_lm(tiny_llama(len(tokenizer), hidden=args.hidden, layers=args.layers, seed=args.seed),
                              instruction_weight=0.0)
    pretrain = train(base, train_a, collator, steps=args.pretrain_steps, batch_size=args.batch_size,
                     lr=args.pretrain_lr, callback=EvalCurve(eval_a, max(1, args.pretrain_steps // 16)),
                     warmup_steps=args.pretrain_steps // 20, weight_decay=0.01, seed=args.seed)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    base.eval()
    with torch.no_grad():
        base_metrics = both(base)
    print(f"base after pretraining on A: A held-out accuracy {base_metrics['A_accuracy']:.3f}, "
          f"B held-out accuracy {base_metrics['B_accuracy']:.3f} ({pretrain['seconds']:.0f} s)", flush=True)

    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "pretrain": {**pretrain, "base": base_metrics}, "runs": {}}
    for label, (adapter, rank, lr, wd, dropout) in methods(args).items():
        model = tiny_llama(len(tokenizer), hidden=args.hidden, layers=args.layers, attention_dropout=dropout)
        model.load_state_dict(base_state)
        if adapter == "lora":
            fp.apply_lora(model, r=rank, alpha=2.0 * rank)
        elif adapter.startswith("mora"):
            fp.apply_mora(model, r=rank, mora_type=int(adapter[-1]))
        fp.patch_causal_lm(model, instruction_weight=0.0)
        params = trainable_parameters(model)
        curve = EvalCurve(both, args.every)
        run = train(model, train_b, collator, steps=args.steps, batch_size=args.batch_size, lr=lr, callback=curve,
                    warmup_steps=args.steps // 20, weight_decay=wd, seed=args.seed)
        for row in run["eval"]:
            row["forgetting_accuracy"] = base_metrics["A_accuracy"] - row["A_accuracy"]
            row["forgetting_loss"] = row["A_answer_loss"] - base_metrics["A_answer_loss"]
        if adapter != "full":
            fp.merge_adapters(model)
        spectra = update_spectra(model, base_state)
        results["runs"][label] = {"adapter": adapter, "rank": rank, "lr": lr, "weight_decay": wd,
                                  "attention_dropout": dropout, "trainable_parameters": params, **run,
                                  "delta_w": spectra}
        final = run["eval"][-1]
        print(f"{label:34s} {params:8d} params  B acc {final['B_accuracy']:.3f}  A acc {final['A_accuracy']:.3f}  "
              f"A loss {final['forgetting_loss']:+.2f}  median ΔW rank90 "
              f"{sorted(s['rank90'] for s in spectra.values())[len(spectra) // 2]}  ({run['seconds']:.0f} s)",
              flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    shapes = {tuple(s["shape"]) for s in next(iter(results["runs"].values()))["delta_w"].values()}
    results["random_gaussian_rank90"] = {f"{m}x{n}": variance_rank(torch.randn(m, n, generator=generator))
                                         for m, n in sorted(shapes)}
    results["summary"] = summary(results)
    results["seconds"] = time.perf_counter() - start
    save_json(args.out / "learning_forgetting.json", results)
    figures(args.out, results)
    level = results["summary"]["equal_learning_B_accuracy"]
    for label, row in results["summary"]["methods"].items():
        at = row["at_equal_learning"]
        print(f"at B accuracy {level:.3f}: {label:34s} A accuracy {at['A_accuracy']:.3f}  A loss "
              f"{at['forgetting_loss']:+.2f}  (step {at['step']:.0f})" if at else f"{label}: never reached", flush=True)
    print(f"total {results['seconds']:.0f} s", flush=True)
    return results


def figures(out: Path, results: dict) -> None:
    """The four PNGs (see the module docstring) from the results dict."""
    runs, ranks = results["runs"], results["config"]["ranks"]
    points = lambda key_x, key_y: {k: [(r[key_x], r[key_y]) for r in v["eval"]] for k, v in runs.items()}  # noqa: E731
    learning = "task B held-out token accuracy (learning; fraction)"
    plot(out / "learning_forgetting_tradeoff.png", [
        ("forgetting vs learning (checkpoints every few steps)", "task A held-out token accuracy (fraction)",
         points("B_accuracy", "A_accuracy"), {"xlabel": learning}),
        ("forgetting vs learning: source loss", "task A held-out loss - base (nats/token)",
         points("B_accuracy", "forgetting_loss"), {"xlabel": learning}),
    ])
    plot(out / "learning_forgetting_curves.png", [
        ("learning: target task B", "B held-out token accuracy (fraction)", points("step", "B_accuracy")),
        ("forgetting: source task A", "A held-out token accuracy (fraction)", points("step", "A_accuracy")),
        ("forgetting: source task A loss", "A held-out loss - base (nats/token)", points("step", "forgetting_loss")),
    ])
    final = lambda key: {"final step": {k: v["eval"][-1][key] for k, v in runs.items()}}  # noqa: E731
    plot(out / "learning_forgetting_final.png", [
        ("learning at the last step", "B held-out token accuracy (fraction)", final("B_accuracy"),
         {"bar": True, "xlabel": "method"}),
        ("forgetting at the last step", "A accuracy drop vs base (fraction)", final("forgetting_accuracy"),
         {"bar": True, "xlabel": "method"}),
        ("forgetting at the last step: loss", "A loss increase vs base (nats/token)", final("forgetting_loss"),
         {"bar": True, "xlabel": "method"}),
    ])
    full = runs["full fine-tuning"]["delta_w"]
    lora_lines = {f"LoRA r={r}": r for r in ranks}
    cumulative = {}
    for name, spec in full.items():
        energy = torch.tensor(spec["singular_values"]).square()
        cumulative[name] = [(i + 1, c) for i, c in enumerate((energy.cumsum(0) / energy.sum()).tolist())]
    full_runs = {k: v for k, v in runs.items() if v["adapter"] == "full"}
    rank90 = {k: {m: s["rank90"] for m, s in v["delta_w"].items()} for k, v in full_runs.items()}
    rank90["random Gaussian, same shape"] = {m: results["random_gaussian_rank90"]["x".join(map(str, s["shape"]))]
                                             for m, s in full.items()}
    plot(out / "learning_forgetting_spectra.png", [
        ("full fine-tuning ΔW: cumulative variance", "fraction of ΔW variance (sum of s_i^2)", cumulative,
         {"xlabel": "rank k (top k singular values)", "hlines": {"90%": 0.9}, "vlines": lora_lines}),
        ("full fine-tuning ΔW: singular values", "s_i / s_1 (log scale)",
         {k: [(i + 1, s / v["singular_values"][0]) for i, s in enumerate(v["singular_values"])]
          for k, v in full.items()}, {"xlabel": "index i", "yscale": "log", "vlines": lora_lines}),
        ("rank explaining 90% of ΔW's variance", "rank (number of singular values)", rank90,
         {"bar": True, "xlabel": "weight matrix", "hlines": lora_lines}),
    ])


if __name__ == "__main__":
    main()
