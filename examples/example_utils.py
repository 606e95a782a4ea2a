"""Shared pieces of the examples: an in-process tokenizer, a tiny Llama, a Trainer run that records
an evaluation curve, and plotting. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
import transformers

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
RESULTS = Path(__file__).resolve().parent / "results"  # the committed full-run results


def output_dir(out: Path | None, quick: bool, name: str) -> Path:
    """Where a run writes: ``out``, else RESULTS for a full run and a new temporary folder for --quick.

    A --quick run never writes into RESULTS (a smoke run must not overwrite the committed full-run
    results): ``out`` inside RESULTS with ``quick`` raises ValueError. The folder is created and printed."""
    if quick and out is not None and Path(out).resolve().is_relative_to(RESULTS):
        raise ValueError(f"--out: a --quick run must not write into {RESULTS} (the committed full-run results), "
                         f"got {out}; omit --out for a temporary folder")
    path = Path(out) if out is not None else (Path(tempfile.mkdtemp(prefix=f"{name}_quick_")) if quick else RESULTS)
    path.mkdir(parents=True, exist_ok=True)
    print(f"{name}: writing results to {path}", flush=True)
    return path


def word_tokenizer(words, chat_template: str | None = None, split_chars: bool = False):
    """A PreTrainedTokenizerFast over a fixed vocabulary: SPECIALS (ids 0-3), then ``words``.

    Text is split on whitespace, or into single characters with ``split_chars``; BOS is prepended
    when special tokens are added; pad = <pad>, eos = </s>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in dict.fromkeys(words) if w not in SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if split_chars:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Split(Regex(r"\S"), behavior="isolated")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = chat_template
    return fast


def tiny_llama(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int | None = None,
               seed: int = 0, attention_dropout: float = 0.0) -> transformers.LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM built from a config (fp32, eager attention)."""
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=heads,
                                      intermediate_size=intermediate or 2 * hidden, max_position_embeddings=512,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
                                      attention_dropout=attention_dropout, attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def answer_metrics(collator, examples, eos_id: int, batch_size: int = 256):
    """``evaluate(model) -> {"accuracy", "answer_loss"}`` over the completion tokens of ``examples``.

    Teacher forced: the greedy next-token accuracy and the mean cross-entropy (nats per token) at
    every completion position (prompt, padding and the closing EOS excluded)."""
    def evaluate(model) -> dict:
        correct = total = 0
        loss = 0.0
        for i in range(0, len(examples), batch_size):
            batch = collator(examples[i:i + batch_size])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            target = batch["labels"][:, 1:]
            answer = ~batch["instruction_mask"][:, 1:] & target.ne(-100) & target.ne(eos_id)
            correct += (logits.argmax(-1).eq(target) & answer).sum().item()
            loss += torch.nn.functional.cross_entropy(logits[answer].float(), target[answer], reduction="sum").item()
            total += answer.sum().item()
        return {"accuracy": correct / total, "answer_loss": loss / total}
    return evaluate


class EvalCurve(transformers.TrainerCallback):
    """Calls ``evaluate(model) -> dict`` at step 0 and every ``every`` steps; keeps (step, dict) rows."""

    def __init__(self, evaluate, every: int):
        self.evaluate, self.every, self.rows = evaluate, every, []

    def _record(self, model, step):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.rows.append({"step": step, **self.evaluate(model)})
        model.train(was_training)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._record(model, state.global_step)


def train(model, dataset, collator, *, steps: int, batch_size: int, lr: float, callback, weight_decay: float = 0.0,
          warmup_steps: int = 0, seed: int = 0) -> dict:
    """Run transformers.Trainer for ``steps`` optimizer steps on CPU; return the logged losses and time.

    Nothing is saved (the Trainer's output_dir is a temporary directory)."""
    with tempfile.TemporaryDirectory() as scratch:
        args = transformers.TrainingArguments(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            weight_decay=weight_decay, warmup_steps=warmup_steps, lr_scheduler_type="linear",
            logging_steps=max(1, steps // 50), save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
            remove_unused_columns=False, dataloader_num_workers=0, seed=seed, data_seed=seed)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                       callbacks=[callback])
        trainer.remove_callback(transformers.PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    losses = [(row["step"], row["loss"]) for row in trainer.state.log_history if "loss" in row]
    return {"train_loss": losses, "eval": callback.rows, "seconds": seconds}


def save_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def plot(path: Path, panels) -> None:
    """panels: list of (title, y label, {curve name: [(x, y), ...]}[, options]); one subplot each, saved to a PNG.

    options (a dict, optional): "xlabel" (default "optimizer step"), "xscale" / "yscale" ("log"),
    "hlines" / "vlines" ({label: position}: dashed reference lines), "bar": True for a grouped bar
    chart, where the curves are {series name: {category: value}}."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for ax, (title, ylabel, curves, *rest) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        options = rest[0] if rest else {}
        if options.get("bar"):
            categories = list(dict.fromkeys(c for series in curves.values() for c in series))
            width = 0.8 / len(curves)
            for i, (name, series) in enumerate(curves.items()):
                ax.bar([j + (i - (len(curves) - 1) / 2) * width for j, c in enumerate(categories) if c in series],
                       [series[c] for c in categories if c in series], width, label=name)
            ax.set_xticks(range(len(categories)), categories, rotation=35, ha="right", fontsize=8)
        else:
            for name, points in curves.items():
                ax.plot([p[0] for p in points], [p[1] for p in points], label=name,
                        marker="." if len(points) < 40 else None)
        for name, y in options.get("hlines", {}).items():
            ax.axhline(y, ls="--", lw=0.8, color="gray")
            ax.annotate(name, (0.01, y), xycoords=("axes fraction", "data"), fontsize=7, color="gray", va="bottom")
        for name, x in options.get("vlines", {}).items():
            ax.axvline(x, ls=":", lw=0.8, color="gray")
            ax.annotate(name, (x, 0.02), xycoords=("data", "axes fraction"), fontsize=7, color="gray", rotation=90)
        for axis, scale in (("x", options.get("xscale")), ("y", options.get("yscale"))):
            if scale:  # set only when asked: setting a scale resets the bar chart's category ticks
                getattr(ax, f"set_{axis}scale")(scale)
        ax.set_title(title)
        ax.set_xlabel(options.get("xlabel", "optimizer step"))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6 if len(curves) > 8 else 7 if len(curves) > 5 else None, ncol=2 if len(curves) > 8 else 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
