import pytest

from tokenskip import prompt as P


def test_marker_only_below_one():
    q = "Tom has 3 apples. How many?"
    assert P.SEPARATOR not in P.user_content(q, 1.0)
    assert P.SEPARATOR not in P.user_content(q, None)
    assert P.user_content(q, 0.7).endswith(f"{q}<|eot_id|>0.7<|eot_id|>")
    assert P.user_content(q, 0.7).startswith(P.INSTRUCTION + "\n")


def test_bad_ratio_rejected():
    with pytest.raises(ValueError, match="1.2"):
        P.user_content("q", 1.2)
    with pytest.raises(ValueError):
        P.user_content("q", 0)


def test_target_and_split_roundtrip():
    t = P.build_target("a\nb  ", "\\frac{1}{2}")
    assert t == "a\nb\n\nThe final answer is: $\\boxed{\\frac{1}{2}}$"
    for r in (0.9, 0.8, 0.7, 0.6, 0.5):
        q, got = P.split_marker(P.user_content("Q?", r))
        assert got == r and q.endswith("Q?")


def test_chat_template_rendering(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    plain = P.render_prompt(tok, "What is 2+3?")
    marked = P.render_prompt(tok, "What is 2+3?", 0.5)
    assert plain != marked and "<|eot_id|>0.5<|eot_id|>" in marked
    assert marked.startswith("<|im_start|>system") and marked.endswith("<|im_start|>assistant\n")
    user, target = P.user_content("What is 2+3?", 0.5), P.build_target("2+3=5", "5")
    prompt, completion = P.render_user_completion(tok, user, target)
    assert prompt == marked
    assert completion.startswith("2+3=5\n\nThe final answer is: $\\boxed{5}$") and completion.rstrip().endswith(
        "<|im_end|>"
    )


def test_baseline_prompts_are_the_four_from_the_paper():
    assert len(P.BASELINE_PROMPTS) == 4
    assert "Be concise." in P.BASELINE_PROMPTS.values()
    assert P.user_content("Q", extra_instruction="Be concise.").startswith(P.INSTRUCTION + " Be concise.\n")
