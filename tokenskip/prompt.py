"""The one place that knows the TokenSkip prompt format.

Training data, evaluation and serving all call these functions, so the γ marker is
placed identically everywhere (docs/method.md §3-4):

* user turn, γ < 1: ``{INSTRUCTION}\\n{question}{SEPARATOR}{γ}{SEPARATOR}``
* user turn, γ = 1 (or no γ): ``{INSTRUCTION}\\n{question}`` (no marker)
* target: ``{cot}\\n\\nThe final answer is: $\\boxed{answer}$``

The separator is the literal text ``<|eot_id|>`` for every model family. Chat formatting
goes through the tokenizer's own chat template (which adds e.g. Qwen's default system
prompt), never a hand-written per-family format.

>>> user_content("What is 2+3?", 0.5)
'Please reason step by step, and put your final answer within \\\\boxed{}.\\nWhat is 2+3?<|eot_id|>0.5<|eot_id|>'
>>> user_content("What is 2+3?", 1.0) == user_content("What is 2+3?")
True
>>> build_target("2+3=5", "5")
'2+3=5\\n\\nThe final answer is: $\\\\boxed{5}$'
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from tokenskip import gamma

# Bump when the prompt layout below changes: adapter cards record it, and an adapter
# trained with another layout is refused rather than prompted wrongly.
FORMAT_VERSION = 1
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
SEPARATOR = "<|eot_id|>"
# The γ marker appended to the user turn (γ < 1); {sep} is SEPARATOR, {ratio} is format_ratio(γ).
# benchmarks/gamma_sweep.py measures other forms (its ``marker`` setting) against this one.
MARKER = "{sep}{ratio}{sep}"
ANSWER_PREFIX = "The final answer is: "

# Prompt-based compression baselines (docs/method.md §4), keyed by a short name.
BASELINE_PROMPTS: dict[str, str] = {
    "concise": "Be concise.",
    "numbers_only": "Only use numbers or equations.",
    "abbreviate": "Abbreviate words as much as possible.",
    "reduce_50": "Please reduce 50% of the words in your Chain-of-Thought process.",
}

_MARKER_RE = re.compile(re.escape(SEPARATOR) + r"\s*([0-9]*\.?[0-9]+)\s*" + re.escape(SEPARATOR) + r"\s*$")


def format_ratio(ratio: float) -> str:
    """γ as it appears in the marker: its :func:`tokenskip.gamma.key` (``0.5``, ``0.75``).

    >>> format_ratio(0.5), format_ratio(0.70000001), format_ratio(1)
    ('0.5', '0.7', '1.0')
    """
    return gamma.key(ratio)


def has_marker(ratio: float | None) -> bool:
    """Whether a γ gets a marker (only γ < 1 does)."""
    if ratio is None:
        return False
    return gamma.canonical(ratio) < 1.0


def format_spec() -> dict:
    """What an adapter card records about the prompt format it was trained with.

    >>> format_spec()["marker"]
    '{question}<|eot_id|>{ratio}<|eot_id|>'
    """
    return {
        "format_version": FORMAT_VERSION,
        "separator": SEPARATOR,
        "marker": "{question}" + MARKER.format(sep=SEPARATOR, ratio="{ratio}", pct="{pct}"),
        "instruction": INSTRUCTION,
    }


def marker_text(ratio: float, template: str | None = None) -> str:
    """The marker for γ: :data:`MARKER` (or an experiment's ``template``, with the same fields
    plus ``{pct}``, γ in percent).

    >>> marker_text(0.5), marker_text(0.7, "{sep}{ratio}{sep}{ratio}{sep}")
    ('<|eot_id|>0.5<|eot_id|>', '<|eot_id|>0.7<|eot_id|>0.7<|eot_id|>')
    """
    return (template or MARKER).format(sep=SEPARATOR, ratio=format_ratio(ratio), pct=round(100 * ratio))


def user_content(
    question: str, ratio: float | None = None, extra_instruction: str | None = None, marker: str | None = None
) -> str:
    """The user turn for a question at compression ratio γ (``marker``: an experiment's
    template instead of :data:`MARKER`, see :func:`marker_text`).

    ``extra_instruction`` appends a prompting baseline (e.g. "Be concise.") to the
    instruction; it is used only by the prompt-compression baselines.

    >>> user_content("Q", extra_instruction="Be concise.")
    'Please reason step by step, and put your final answer within \\\\boxed{}. Be concise.\\nQ'
    """
    if question is None:
        raise ValueError("question must be a string, got None")
    instruction = INSTRUCTION if not extra_instruction else f"{INSTRUCTION} {extra_instruction.strip()}"
    text = f"{instruction}\n{question}"
    if has_marker(ratio):
        text += marker_text(ratio, marker)
    return text


def build_messages(
    question: str, ratio: float | None = None, extra_instruction: str | None = None
) -> list[dict[str, str]]:
    """Chat messages (one user turn) for a question and γ.

    >>> build_messages("Q", 0.6)[0]["role"]
    'user'
    """
    return [{"role": "user", "content": user_content(question, ratio, extra_instruction)}]


def answer_sentence(answer: str) -> str:
    """>>> answer_sentence("18")
    'The final answer is: $\\\\boxed{18}$'
    """
    return f"{ANSWER_PREFIX}$\\boxed{{{answer}}}$"


# The answer sentence up to its answer: what a forced answer (budget forcing, a hard
# reasoning budget) appends after a cut CoT so that the model writes only the answer.
ANSWER_OPENING = f"{ANSWER_PREFIX}$\\boxed{{"


def forced_answer_suffix(cot: str) -> str:
    """What follows a CoT cut at a budget, as text to append to it unchanged (a server cannot
    take back generated tokens): a blank line, as :func:`build_target` lays out the target
    (only what is missing of it), then the answer sentence's opening :data:`ANSWER_OPENING`.

    >>> forced_answer_suffix("2+3=5")
    '\\n\\nThe final answer is: $\\\\boxed{'
    >>> forced_answer_suffix("2+3=5\\n") == "\\n" + ANSWER_OPENING
    True
    >>> forced_answer_suffix("") == forced_answer_suffix("2+3=5\\n\\n") == ANSWER_OPENING
    True
    """
    if not cot.strip() or cot.endswith("\n\n"):
        return ANSWER_OPENING
    return ("\n" if cot.endswith("\n") else "\n\n") + ANSWER_OPENING


def forced_answer_text(cot: str) -> str:
    """A cut CoT (trailing space dropped) followed by :func:`forced_answer_suffix`, laid out as
    :func:`build_target` lays out the whole target (an empty CoT gets no blank line).

    >>> forced_answer_text("2+3=5 ")
    '2+3=5\\n\\nThe final answer is: $\\\\boxed{'
    >>> forced_answer_text("") == ANSWER_OPENING
    True
    """
    cot = (cot or "").rstrip()
    return cot + forced_answer_suffix(cot)


def build_target(cot: str, answer: str) -> str:
    """Training completion: the (possibly pruned) CoT, then the answer sentence."""
    return f"{cot.rstrip()}\n\n{answer_sentence(answer)}"


_ANSWER_RE = re.compile(r"the final answer is\s*:?|\n#### ", re.IGNORECASE)


def split_answer(output: str) -> tuple[str, str]:
    """(CoT, answer part) of a model output: the CoT is everything before the first final-answer
    sentence ("The final answer is: ..." or GSM8K's "#### ..."); an output without one is all CoT.
    TokenSkip counts CoT tokens this way (the fixed-size answer sentence is not reasoning), and
    a generated output that already ends with the sentence (LLaMA-3.1 style) is cut here before
    it becomes a training CoT, so the target does not carry the sentence twice.

    >>> split_answer("Janet has 16 - 3 = 13 eggs.\\n\\nThe final answer is: $\\\\boxed{13}$")
    ('Janet has 16 - 3 = 13 eggs.', 'The final answer is: $\\\\boxed{13}$')
    >>> split_answer("2+3=5\\n#### 5")
    ('2+3=5', '#### 5')
    >>> split_answer("no sentence, just \\\\boxed{5}")
    ('no sentence, just \\\\boxed{5}', '')
    """
    m = _ANSWER_RE.search(output or "")
    if not m:
        return output or "", ""
    return output[: m.start()].rstrip(), output[m.start() :].strip()


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt. A chat template already wrote every special token (BOS
    included), so none is added again; training, evaluation, generation and serving all
    tokenize prompts here, so the model sees the same ids for the same (question, γ)."""
    return list(tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"])


def prompt_token_ids(
    tokenizer: Any, question: str, ratio: float | None = None, extra_instruction: str | None = None
) -> list[int]:
    """:func:`render_prompt` then :func:`encode_prompt`: what an engine should be given."""
    return encode_prompt(tokenizer, render_prompt(tokenizer, question, ratio, extra_instruction))


def split_marker(text: str) -> tuple[str, float | None]:
    """Inverse of the marker: (question text, γ or None).

    >>> split_marker("Q<|eot_id|>0.6<|eot_id|>")
    ('Q', 0.6)
    >>> split_marker("Q")
    ('Q', None)
    """
    m = _MARKER_RE.search(text)
    if not m:
        return text, None
    return text[: m.start()], float(m.group(1))


def render_prompt(
    tokenizer: Any, question: str, ratio: float | None = None, extra_instruction: str | None = None
) -> str:
    """The full prompt string through the model's own chat template."""
    return render_messages(tokenizer, build_messages(question, ratio, extra_instruction))


def render_messages(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    # A tokenizer without a template (a bare base model): plain text, still one place.
    body = "\n\n".join(m["content"] for m in messages)
    return body + ("\n\n" if add_generation_prompt else "")


def render_user_completion(tokenizer: Any, user: str, completion: str) -> tuple[str, str]:
    """(prompt, completion) for an already built user turn and target (an SFT row's
    ``user`` / ``completion``), exactly as the chat template lays out the whole
    conversation: the completion is the template's rendering of the assistant turn (so it
    ends with the template's end-of-turn token), found as the suffix after the generation
    prompt."""
    messages = [{"role": "user", "content": user}]
    prompt = render_messages(tokenizer, messages)
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
    eos = getattr(tokenizer, "eos_token", None) or ""
    return prompt, completion + eos
