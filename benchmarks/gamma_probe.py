"""Does an adapter read γ? A likelihood probe on held-out questions, without generation.

Greedy lengths (the evaluate stage) answer "does the adapter follow γ" only through a long,
noisy generation run. This probe asks a narrower question cheaply: for a *fixed* target —
a held-out question's gold CoT pruned to γ' exactly as the training data is (self-information,
budget cut in target tokens, numbers kept) — does the adapter give it a higher likelihood
when the prompt's marker says γ' than when it says another trained γ? Only the marker differs
between the prompts, so any difference is what the model reads from γ.

Per (prompt γ, target γ') it prints the mean negative log-likelihood per target token, and
per target γ' the share of questions whose matching prompt gives the lowest NLL
(*discrimination*; chance = 1 / number of γ) and the mean margin in nats per target over the
best non-matching prompt. An adapter that learned "marker present → shorter" but not the
value of γ shows γ=1 separated from the rest and chance-level discrimination among γ < 1.

    python -m benchmarks.gamma_probe --adapter runs/quickstart/train/adapter --ratios 1.0 0.7 0.5 \
        --offset 2000 --questions 48

Questions come from GSM8K train from ``--offset`` on (the experiment configs train on the
first few hundred, so the default offset keeps them out).
"""

from __future__ import annotations

import argparse
import json
import math
import time


def pruned_targets(questions: list[dict], ratios: list[float], scorer_model: str) -> list[dict[float, str]]:
    """Each question's gold CoT at every γ, pruned as the quickstart's prune stage does."""
    from tokenskip.pruning import TokenCounter, load_scorer, prune_rows

    counter = TokenCounter(scorer_model)
    scorer = load_scorer("self_info", scorer_model, device="cpu")
    below = [r for r in ratios if r < 1.0]
    rows = prune_rows(
        [q["id"] for q in questions],
        [q["solution"] for q in questions],
        below,
        scorer,
        counter,
        cut="budget",
        protect="numbers",
    )
    by_id: dict[str, dict[float, str]] = {str(q["id"]): {1.0: q["solution"]} for q in questions}
    for r in rows:
        by_id[str(r["id"])][float(r["ratio"])] = r["pruned"]
    return [by_id[str(q["id"])] for q in questions]


def target_nlls(model, tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[float, int]]:
    """Total NLL (nats) and token count of each (user, completion) pair's completion given its
    prompt, tokenized as training tokenizes it; one padded forward pass for all pairs."""
    import torch

    from tokenskip.training import tokenize_pair

    exs = [tokenize_pair(tokenizer, u, c, cutoff_len=4096) for u, c in pairs]
    width = max(len(e["input_ids"]) for e in exs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in exs])
    att = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in exs])
    labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in exs])
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits[:, :-1].float().cpu()
    tgt = labels[:, 1:]
    mask = tgt != -100
    logp = torch.log_softmax(logits, dim=-1).gather(2, tgt.clamp(min=0).unsqueeze(2)).squeeze(2)
    nll = -(logp * mask).sum(dim=1)
    return [(float(n), int(m)) for n, m in zip(nll, mask.sum(dim=1))]


def discrimination(nll: list[dict[tuple[float, float], float]], ratios: list[float]) -> dict[str, dict]:
    """Per target γ' (keyed by :func:`tokenskip.gamma.key`): the share of questions whose own-γ
    prompt gives the target the lowest total NLL, and the mean margin (nats per target) over the
    best other prompt. ``nll``: per question, total NLL by (prompt γ, target γ').

    >>> discrimination([{(1.0, 1.0): 1.0, (0.5, 1.0): 3.0, (1.0, 0.5): 2.0, (0.5, 0.5): 2.5}], [1.0, 0.5])
    {'1.0': {'discrimination': 1.0, 'margin_nats': 2.0}, '0.5': {'discrimination': 0.0, 'margin_nats': -0.5}}
    """
    from tokenskip import gamma

    out = {}
    for t in ratios:
        margins = [min(c[(pg, t)] for pg in ratios if pg != t) - c[(t, t)] for c in nll]
        out[gamma.key(t)] = {
            "discrimination": sum(m > 0 for m in margins) / len(nll),
            "margin_nats": sum(margins) / len(nll),
        }
    return out


def load_model(model_name: str, adapter: str | None, checkpoint: str | None):
    """The base model, with the adapter, or with the LoRA weights of a training checkpoint
    (``checkpoint_step_*/trainer_state.pt``: only the trainable tensors) on the adapter's config."""
    import torch
    from transformers import AutoModelForCausalLM

    from tokenskip import assets

    model = AutoModelForCausalLM.from_pretrained(assets.resolve_model(model_name), dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if checkpoint:
            state = torch.load(f"{checkpoint}/trainer_state.pt", map_location="cpu", weights_only=True)["model"]
            res = model.load_state_dict(state, strict=False)
            if res.unexpected_keys:
                raise SystemExit(f"{checkpoint}: keys the adapter does not have: {res.unexpected_keys[:3]}")
    elif checkpoint:
        raise SystemExit("--checkpoint needs --adapter (the adapter's config and shapes)")
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", default=None, help="LoRA adapter directory (none: the base model)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.7, 0.5])
    ap.add_argument("--offset", type=int, default=2000, help="first GSM8K train question used")
    ap.add_argument("--questions", type=int, default=48)
    ap.add_argument("--checkpoint", nargs="*", default=None,
                    help="training checkpoint directories (checkpoint_step_*): probe each, on --adapter's config")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    a = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from tokenskip import assets, gamma, prompt
    from tokenskip.data import load_questions

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ratios = sorted(gamma.check_list(a.ratios, "--ratios", unique=True), reverse=True)
    qs = load_questions("gsm8k", "train", limit=a.offset + a.questions).rows[a.offset :]
    t0 = time.perf_counter()
    targets = pruned_targets(qs, ratios, a.model)
    t_prune = time.perf_counter() - t0

    tok = AutoTokenizer.from_pretrained(assets.resolve_model(a.model))
    t0 = time.perf_counter()
    results = []  # per checkpoint: nll[question][(prompt γ, target γ')] = (total nats, target tokens)
    for ck in a.checkpoint or [None]:
        model = load_model(a.model, a.adapter, ck)
        nll: list[dict[tuple[float, float], tuple[float, int]]] = []
        for q, tg in zip(qs, targets):
            keys = [(pg, tgam) for pg in ratios for tgam in ratios]
            pairs = [(prompt.user_content(q["question"], pg), prompt.build_target(tg[tgam], str(q["gold"])))
                     for pg, tgam in keys]
            nll.append(dict(zip(keys, target_nlls(model, tok, pairs))))
        results.append((ck, nll))
    t_score = time.perf_counter() - t0

    out = []
    for ck, nll in results:
        n = len(qs)
        label = a.adapter or "base model"
        if ck:
            label += f" + {ck}"
        print(f"γ probe: {label} on {n} held-out GSM8K train questions "
              f"(from #{a.offset}); prune {t_prune:.0f} s, score {t_score:.0f} s")
        print("mean NLL per target token (nats); rows = γ in the prompt, columns = γ the target was pruned to")
        print("prompt \\ target | " + " | ".join(f"{g:g}" for g in ratios))
        matrix = {}
        for pg in ratios:
            vals = []
            for tgam in ratios:
                tot = sum(c[(pg, tgam)][0] for c in nll)
                cnt = sum(c[(pg, tgam)][1] for c in nll)
                vals.append(tot / cnt)
            matrix[gamma.key(pg)] = dict(zip((gamma.key(t) for t in ratios), vals))
            print(f"{pg:g} | " + " | ".join(f"{v:.4f}" for v in vals))
        print("target γ' | matching prompt best (share) | mean margin (nats per target) | chance")
        summary = discrimination([{k: v[0] for k, v in c.items()} for c in nll], ratios)
        for tgam in ratios:
            row = summary[gamma.key(tgam)]
            print(f"{tgam:g} | {row['discrimination']:.2f} | {row['margin_nats']:+.3f} | {1 / len(ratios):.2f}")
        mean_disc = sum(s["discrimination"] for s in summary.values()) / len(summary)
        print(f"mean discrimination {mean_disc:.2f} (chance {1 / len(ratios):.2f})")
        out.append({"checkpoint": ck, "nll_per_token": matrix, "per_target": summary, "mean_discrimination": mean_disc})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"adapter": a.adapter, "questions": len(qs), "offset": a.offset, "ratios": ratios,
                       "runs": out}, f, indent=1)
    if not all(math.isfinite(r["mean_discrimination"]) for r in out):
        raise SystemExit("probe produced no numbers")


if __name__ == "__main__":
    main()
