"""InstructionCollator: prompt/completion pairs and chat conversations -> padded training batches.

Every real token is a label (the loss decides what it weighs); ``instruction_mask`` marks the tokens
that are not the answer, so patch_causal_lm(model, instruction_weight=w) trains prompts with weight
w: 0 masks them, 1 is Instruction Modelling, values in between are a prompt-loss weight.

- {"prompt": str, "completion": str}: the prompt is tokenized with the tokenizer's special tokens
  (e.g. BOS), the completion without them, then EOS is appended when the tokenizer has one. The two
  are tokenized separately and concatenated, which is how a model sees them at generation time.
- {"messages": [{"role", "content"}, ...]}: rendered with the tokenizer's chat template. The
  assistant spans are found by rendering the conversation prefix by prefix: before assistant turn
  i, the template of messages[:i] with the generation prompt; after it, the template of
  messages[:i + 1]. Each boundary must be a prefix of the full rendering (templates that rewrite
  earlier turns are rejected). The text between boundaries is tokenized piece by piece without
  added special tokens (the template writes them); a piece inside an assistant turn (its content
  and the template's end-of-turn text) is the answer, everything else is instruction. (A chat that
  opens with an assistant turn has no rendered prefix, so its role header counts as answer.)
"""

from __future__ import annotations

import numbers

import torch


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    if not messages:  # transformers refuses to render an empty conversation
        return ""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"InstructionCollator: apply_chat_template(tokenize=False) returned "
                        f"{type(text).__name__}, expected str")
    return text


class InstructionCollator:
    """Collate instruction examples into input_ids, attention_mask, labels and instruction_mask.

    Args:
        tokenizer: a transformers tokenizer; needs a pad token (or an EOS, used for padding) and, for
            chat examples, a chat_template. ``tokenizer.padding_side`` ("right"/"left") and
            ``tokenizer.truncation_side`` are respected.
        max_length: if given, each example keeps at most this many tokens (cut on the truncation side).
        pad_to_multiple_of: if given, the padded length is rounded up to a multiple of it.

    ``collator(examples)`` takes a list of dicts, each {"prompt", "completion"} or {"messages"}, and
    returns a dict of tensors, all [batch, seq]: input_ids int64, attention_mask int64 (1 on real
    tokens), labels int64 (the token id on every real token, -100 on padding) and instruction_mask
    bool (True on prompt / non-assistant tokens, False on completions and padding).

    With transformers.Trainer set ``remove_unused_columns=False``: otherwise the Trainer drops the
    raw "prompt"/"completion"/"messages" fields before they reach the collator.
    """

    def __init__(self, tokenizer, max_length: int | None = None, pad_to_multiple_of: int | None = None):
        where = "fusedpeft.InstructionCollator"
        if not callable(tokenizer) or not hasattr(tokenizer, "padding_side"):
            raise TypeError(f"{where}: tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        for name, value in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{where}: {name} must be None or an int >= 1, got {value!r}")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError(f"{where}: the tokenizer has neither a pad token nor an EOS token to pad with; "
                             f"set tokenizer.pad_token")
        if tokenizer.padding_side not in ("right", "left"):
            raise ValueError(f"{where}: tokenizer.padding_side must be 'right' or 'left', got "
                             f"{tokenizer.padding_side!r}")
        self.tokenizer, self.max_length, self.pad_to_multiple_of, self.pad_id = (
            tokenizer, max_length, pad_to_multiple_of, pad)

    # ------------------------------------------------------------------ one example

    def _prompt_completion(self, example: dict) -> tuple[list[int], list[bool]]:
        prompt, completion = example["prompt"], example["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise TypeError(f"fusedpeft.InstructionCollator: 'prompt' and 'completion' must be str, got "
                            f"{type(prompt).__name__} and {type(completion).__name__}")
        prompt_ids = _ids(self.tokenizer, prompt, special=True)
        completion_ids = _ids(self.tokenizer, completion, special=False)
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not completion_ids or completion_ids[-1] != eos):
            completion_ids.append(eos)
        return prompt_ids + completion_ids, [True] * len(prompt_ids) + [False] * len(completion_ids)

    def _chat(self, example: dict) -> tuple[list[int], list[bool]]:
        messages = example["messages"]
        if not isinstance(messages, (list, tuple)) or not messages or not all(
                isinstance(m, dict) and "role" in m for m in messages):
            raise TypeError("fusedpeft.InstructionCollator: 'messages' must be a non-empty list of "
                            "{'role': ..., 'content': ...} dicts")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("fusedpeft.InstructionCollator: chat examples need tokenizer.chat_template to be set")
        full = _render(self.tokenizer, messages, generation_prompt=False)
        # (end offset of a piece in `full`, whether the piece is answer text)
        cuts: list[tuple[int, bool]] = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = _render(self.tokenizer, messages[:i], generation_prompt=True)
            end = _render(self.tokenizer, messages[: i + 1], generation_prompt=False)
            if not full.startswith(start) or not full.startswith(end) or len(end) < len(start):
                raise ValueError(f"fusedpeft.InstructionCollator: the chat template does not render message {i} "
                                 f"as an extension of the messages before it (the rendering of a prefix is not "
                                 f"a prefix of the full rendering), so the assistant span cannot be located")
            cuts += [(len(start), False), (len(end), True)]
        cuts.append((len(full), False))
        ids: list[int] = []
        mask: list[bool] = []
        position = 0
        for end, is_answer in cuts:
            if end < position:
                raise ValueError("fusedpeft.InstructionCollator: assistant spans of the chat template overlap")
            piece = _ids(self.tokenizer, full[position:end], special=False) if end > position else []
            ids += piece
            mask += [not is_answer] * len(piece)
            position = end
        return ids, mask

    def _encode(self, example) -> tuple[list[int], list[bool]]:
        if not isinstance(example, dict):
            raise TypeError(f"fusedpeft.InstructionCollator: each example must be a dict, got {type(example).__name__}")
        if "messages" in example and ("prompt" in example or "completion" in example):
            raise ValueError(f"fusedpeft.InstructionCollator: an example has both 'messages' and "
                             f"'prompt'/'completion' (keys {sorted(example)}); give one format per example")
        if "messages" in example:
            ids, mask = self._chat(example)
        elif "prompt" in example and "completion" in example:
            ids, mask = self._prompt_completion(example)
        else:
            hint = (" (it is empty: with transformers.Trainer pass TrainingArguments(remove_unused_columns=False) so "
                    "the raw fields reach the collator)") if not example else ""
            raise ValueError(f"fusedpeft.InstructionCollator: an example needs keys 'prompt' and 'completion', or "
                             f"'messages'; got keys {sorted(example)}{hint}")
        if self.max_length is not None and len(ids) > self.max_length:
            keep = self.max_length
            if getattr(self.tokenizer, "truncation_side", "right") == "left":
                ids, mask = ids[-keep:], mask[-keep:]
            else:
                ids, mask = ids[:keep], mask[:keep]
        return ids, mask

    # ------------------------------------------------------------------ the batch

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        if not isinstance(examples, (list, tuple)) or not examples:
            raise ValueError("fusedpeft.InstructionCollator: expected a non-empty list of examples")
        encoded = [self._encode(example) for example in examples]
        length = max(len(ids) for ids, _ in encoded)
        if self.pad_to_multiple_of is not None:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(encoded)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        instruction_mask = torch.zeros(batch, length, dtype=torch.bool)
        left = self.tokenizer.padding_side == "left"
        for row, (ids, mask) in enumerate(encoded):
            span = slice(length - len(ids), length) if left else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            labels[row, span] = input_ids[row, span]
            attention_mask[row, span] = 1
            instruction_mask[row, span] = torch.tensor(mask, dtype=torch.bool)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "instruction_mask": instruction_mask}
