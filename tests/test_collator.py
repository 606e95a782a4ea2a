"""InstructionCollator: prompt/completion and chat examples, padding sides, truncation, errors.

The tokenizer is built in-process (a word-level `tokenizers` model in PreTrainedTokenizerFast with
a ChatML-like chat template), so every expected id sequence can be written by hand."""

import pytest
import torch

import fusedpeft as fp

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
WORDS = "system user assistant be brief what is two plus two four and three six thanks ok".split()


def word_tokenizer(words=WORDS, chat_template=CHATML, pad=True):
    """Word-level fast tokenizer: ids 0-5 are SPECIALS, then ``words`` in order; BOS prepended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(dict.fromkeys(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>" if pad else None,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = chat_template
    return fast


def ids_of(tokenizer, text):
    return tokenizer.convert_tokens_to_ids(text.split())


def test_prompt_completion_right_padding():
    tok = word_tokenizer()
    batch = fp.InstructionCollator(tok)([{"prompt": "what is two plus two", "completion": "four"},
                                         {"prompt": "be brief", "completion": "ok thanks"}])
    bos, eos, pad = 2, 3, 0
    row0 = [bos] + ids_of(tok, "what is two plus two four") + [eos]
    row1 = [bos] + ids_of(tok, "be brief ok thanks") + [eos]
    assert batch["input_ids"].tolist() == [row0, row1 + [pad] * (len(row0) - len(row1))]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 6 + [0, 0]]
    assert batch["labels"].tolist() == [row0, row1 + [-100, -100]]
    assert batch["instruction_mask"].tolist() == [[True] * 6 + [False] * 2, [True] * 3 + [False] * 3 + [False] * 2]
    assert {k: v.dtype for k, v in batch.items()} == {"input_ids": torch.long, "attention_mask": torch.long,
                                                      "labels": torch.long, "instruction_mask": torch.bool}


def test_left_padding_and_multiple_of():
    tok = word_tokenizer()
    tok.padding_side = "left"
    batch = fp.InstructionCollator(tok, pad_to_multiple_of=4)([{"prompt": "two", "completion": "ok"},
                                                               {"prompt": "two plus two", "completion": "four"}])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]]
    assert batch["labels"][0].tolist() == [-100] * 4 + [2] + ids_of(tok, "two ok") + [3]
    assert batch["instruction_mask"][1].tolist() == [False, False, True, True, True, True, False, False]


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_side(side):
    tok = word_tokenizer()
    tok.truncation_side = side
    batch = fp.InstructionCollator(tok, max_length=4)([{"prompt": "what is two plus two", "completion": "four"}])
    full = [2] + ids_of(tok, "what is two plus two four") + [3]
    assert batch["input_ids"][0].tolist() == (full[:4] if side == "right" else full[-4:])
    assert batch["instruction_mask"][0].tolist() == ([True] * 4 if side == "right" else [True, True, False, False])


def test_chat_assistant_spans():
    tok = word_tokenizer()
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "what is two plus two"},
                {"role": "assistant", "content": "four"},
                {"role": "user", "content": "and three plus three"},
                {"role": "assistant", "content": "six"}]
    batch = fp.InstructionCollator(tok)([{"messages": messages}, {"messages": messages[:3]}])
    s, e = "<|im_start|>", "<|im_end|>"
    pieces = [(f"{s} system be brief {e} {s} user what is two plus two {e} {s} assistant", True),
              (f"four {e}", False),
              (f"{s} user and three plus three {e} {s} assistant", True),
              (f"six {e}", False)]
    ids = [i for text, _ in pieces for i in ids_of(tok, text)]
    mask = [m for text, m in pieces for _ in text.split()]
    assert batch["input_ids"][0].tolist() == ids
    assert batch["instruction_mask"][0].tolist() == mask
    assert batch["labels"][0].tolist() == ids
    short = len(ids_of(tok, pieces[0][0] + " " + pieces[1][0]))
    assert batch["instruction_mask"][1, :short].tolist() == mask[:short]
    assert batch["labels"][1, short:].eq(-100).all() and batch["attention_mask"][1, short:].eq(0).all()


def test_chat_without_assistant_is_all_instruction():
    tok = word_tokenizer()
    batch = fp.InstructionCollator(tok)([{"messages": [{"role": "user", "content": "two plus two"}]}])
    assert batch["instruction_mask"].all() and batch["labels"].ne(-100).all()


def test_chat_template_that_rewrites_history_is_rejected():
    template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }}{% if loop.last %} </s>{% endif %} "
                "{% endfor %}{% if add_generation_prompt %}assistant {% endif %}")
    tok = word_tokenizer(chat_template=template)
    messages = [{"role": "user", "content": "two"}, {"role": "assistant", "content": "four"},
                {"role": "user", "content": "thanks"}]
    with pytest.raises(ValueError, match="prefix is not a prefix of the full rendering"):
        fp.InstructionCollator(tok)([{"messages": messages}])


def test_bad_input():
    tok = word_tokenizer()
    collate = fp.InstructionCollator(tok)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        collate([{}])
    with pytest.raises(ValueError, match="needs keys 'prompt' and 'completion'"):
        collate([{"prompt": "two"}])
    with pytest.raises(TypeError, match="must be str"):
        collate([{"prompt": "two", "completion": 4}])
    with pytest.raises(TypeError, match="non-empty list of"):
        collate([{"messages": "two"}])
    with pytest.raises(ValueError, match="max_length must be None or an int >= 1, got 0"):
        fp.InstructionCollator(tok, max_length=0)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be None or an int >= 1"):
        fp.InstructionCollator(tok, pad_to_multiple_of=2.5)
    no_template = word_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="chat_template"):
        fp.InstructionCollator(no_template)([{"messages": [{"role": "user", "content": "two"}]}])


def test_pads_with_eos_without_pad_token():
    tok = word_tokenizer(pad=False)
    examples = [{"prompt": "two", "completion": "four"}, {"prompt": "two two", "completion": "four"}]
    batch = fp.InstructionCollator(tok)(examples)
    assert batch["input_ids"][0, -1].item() == tok.eos_token_id and batch["labels"][0, -1].item() == -100

