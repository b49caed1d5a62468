"""Training, evaluation, generation and serving give the model the same token ids for the same
(question, γ): one prompt rendered through each path, for the SmolLM2 template and for tiny
tokenizers carrying Llama-3's and Qwen2.5's chat templates.

Llama-3's template writes ``<|begin_of_text|>`` itself and its tokenizer also adds BOS, so a
text prompt tokenized with special tokens (what ``vllm.LLM.generate`` does with a string)
starts with two BOS tokens that training never saw."""

from __future__ import annotations

import copy

import pytest

from tokenskip import prompt

LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QUESTION = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?"


@pytest.fixture(scope="module")
def base_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _llama3(tok):
    t = copy.deepcopy(tok)
    t.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        }
    )
    t.chat_template = LLAMA3_TEMPLATE
    t.add_bos_token = True
    return t


def _qwen(tok):
    t = copy.deepcopy(tok)
    t.chat_template = QWEN25_TEMPLATE
    return t


def _training_ids(tok, ratio):
    from tokenskip.sft import sft_row
    from tokenskip.training import tokenize_pair

    row = sft_row({"id": "q", "question": QUESTION, "gold": "72"}, ratio, "48/2 = 24. 48+24 = 72.", cot_tokens=12)
    ex = tokenize_pair(tok, row["user"], row["completion"], cutoff_len=1024)
    n_prompt = sum(1 for x in ex["labels"] if x == -100)
    return ex["input_ids"][:n_prompt]


def _generation_ids(tok):
    from pipelines.generate import PromptUDF

    udf = PromptUDF.__new__(PromptUDF)  # the UDF's own __call__, with this tokenizer
    udf.tok, udf.limit = tok, 10_000
    frame = udf({"id": ["q"], "question": [QUESTION], "gold": ["72"], "kind": ["gsm8k"]})
    return [int(x) for x in frame["prompt_token_ids"].iloc[0]]


def _serving_ids(tok, ratio):
    from serving import protocol

    req = {"kind": "chat", "messages": [{"role": "user", "content": QUESTION}]}
    text, special = protocol.render_text(tok, req, ratio)
    return prompt.encode_prompt(tok, text) if not special else tok(text)["input_ids"]


@pytest.mark.parametrize("family", ["smollm2", "llama3", "qwen2.5"])
@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_same_prompt_ids_everywhere(base_tokenizer, family, ratio):
    tok = {"smollm2": lambda t: t, "llama3": _llama3, "qwen2.5": _qwen}[family](base_tokenizer)
    evaluation = prompt.prompt_token_ids(tok, QUESTION, ratio)
    assert _training_ids(tok, ratio) == evaluation
    assert _serving_ids(tok, ratio) == evaluation
    if ratio == 1.0:  # generation renders the plain prompt (no marker)
        assert _generation_ids(tok) == evaluation
    if family == "llama3":
        bos = tok.bos_token_id
        assert evaluation[0] == bos and evaluation[1] != bos  # exactly one BOS
        text = prompt.render_prompt(tok, QUESTION, ratio)
        assert tok(text)["input_ids"][:2] == [bos, bos]  # what a text prompt would have given the engine
    if family == "qwen2.5":
        assert "You are Qwen" in tok.decode(evaluation)


def test_split_answer_cuts_a_llama_style_output_before_it_becomes_a_cot():
    from tokenskip.sft import sft_row

    llama_output = (
        "Janet's ducks lay 16 eggs per day. She eats 3 and bakes 4, so 16 - 3 - 4 = 9 are sold. "
        "9 * $2 = $18.\n\nThe final answer is: $\\boxed{18}$"
    )
    cot, answer = prompt.split_answer(llama_output)
    assert cot.endswith("9 * $2 = $18.") and answer == "The final answer is: $\\boxed{18}$"
    target = sft_row({"id": "q", "question": "Q", "gold": "18"}, 1.0, cot, cot_tokens=30)["completion"]
    assert target.count("The final answer is") == 1
