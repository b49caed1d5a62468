"""What makes γ learnable for a small model: marker form, epochs, rank, learning rate, data.

Each *variant* trains a fresh LoRA adapter on the same SFT rows (a build_sft stage's
``train.parquet``: question, γ, pruned target) with the quickstart's recipe unless the variant
changes it, then measures, on the same held-out questions:

* **adherence by generation** - greedy outputs for GSM8K test questions at every trained γ:
  mean and median CoT tokens (the tokens before the final-answer sentence, in the model's
  tokenizer), actual ratio (mean CoT tokens(γ) / mean CoT tokens(γ = 1)), |actual − γ|, the
  runaway share (outputs that hit ``--max-new-tokens``) and accuracy;
* **the γ probe** (benchmarks/gamma_probe.py) - whether the adapter gives a held-out target
  pruned to γ' its best likelihood when the prompt says γ' (discrimination; chance = 1/#γ);
* **training throughput** - processed tokens/s (real + padding) and real tokens/s.

The ``trunc`` variant is a control, not a recipe: its targets are each question's γ = 1 CoT
cut after round(γ × its tokens) tokens (then the answer sentence), so the marker's value is the
only thing that says where the CoT stops, and no pruning style hides it. If a model can't follow
γ even there, it can't read the value at all; if it can, the pruned targets are what blur it.

The ``solo`` variants train one adapter per γ on that γ's rows only (the same rows the shared
adapter sees for it) and ask each at its own γ: the adapter never has to read the value, so they
show whether the model can produce γ × the tokens at all once the value is not its job;
``trunc_solo_ep3`` does both at once (per-γ adapters on truncated targets).

The ``ctr`` variants add a *prompt-contrast* term to the SFT loss (not in the paper): each row
is also scored under the prompt of another trained γ, same target, and the term
−log σ(log p(target | own γ) − log p(target | other γ)) (sequence log-likelihoods, mean over
rows) is added with weight ``contrast``. The two prompts differ only in the marker, so the term
has no minimum that ignores the value: it asks directly what SFT asks only through a few stop
tokens per row.

The ``full`` variants train every weight of the model (no LoRA, lr 1e-4): whether the adapter's
capacity is what keeps the value from being read. ``--eval-on train`` asks the SFT set's own
questions instead of test ones: whether the value was learned where it was taught, before asking
whether it generalises.

The training loop is the Ray Train worker's step without Ray (plain PyTorch + PEFT: AdamW,
warm-up + cosine, clipping 1.0, length-grouped micro-batches, one device, global batch =
``--batch``), so a sweep runs where only torch, transformers and peft are installed (a GPU
box without Ray). Its figures say which recipe to make the default; the default itself is
then checked by the real pipeline (``make quickstart``).

    python -m benchmarks.gamma_sweep --sft runs/quickstart/build_sft/train.parquet \
        --variants base ep3 x3 --eval-n 100 --json benchmarks/results/gamma_sweep.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# marker templates (tokenskip.prompt.marker_text fields: {sep}, {ratio}, {pct})
MARKERS = {
    "eot": None,  # tokenskip.prompt.MARKER, the shipped one
    "x3": "{sep}{ratio}{sep}{ratio}{sep}{ratio}{sep}",
    "words": "{sep}Compress the reasoning to {pct}% of its usual length.{sep}",
}
QUICKSTART = dict(
    marker="eot",
    lr=1e-3,
    epochs=1.0,
    rank=8,
    group=True,
    sft=None,
    targets="pruned",
    per_gamma=False,
    contrast=0.0,
    full=False,
    fork_weight=None,
    fork_on="fork",  # what fork_weight weights: "fork" (every fork) or "value_fork" (those the value decides)
    fork_from=0.0,  # share of the steps trained unweighted before fork_weight applies (0: from the start)
)
VARIANTS: dict[str, dict] = {
    "base": {},
    "nogroup": {"group": False},
    "ep3": {"epochs": 3.0},
    "ep6": {"epochs": 6.0},
    "lr3e-3": {"lr": 3e-3},
    "ep3_lr3e-3": {"epochs": 3.0, "lr": 3e-3},
    "ep3_r32": {"epochs": 3.0, "rank": 32},
    "x3": {"marker": "x3"},
    "x3_ep3": {"marker": "x3", "epochs": 3.0},
    "words": {"marker": "words"},
    "words_ep3": {"marker": "words", "epochs": 3.0},
    "adh": {"sft": "adherence"},
    "adh_ep3": {"sft": "adherence", "epochs": 3.0},
    "trunc": {"targets": "truncated"},
    "trunc_ep3": {"targets": "truncated", "epochs": 3.0},
    # one adapter per γ, each trained on that γ's rows only and asked at its own γ: no value to read
    "solo": {"per_gamma": True},
    "solo_ep3": {"per_gamma": True, "epochs": 3.0},
    # both controls at once: one adapter per γ on truncated targets - no value to read, no pruned style to loop
    "trunc_solo_ep3": {"targets": "truncated", "per_gamma": True, "epochs": 3.0},
    # a prompt-contrast term beside the SFT loss: each target must be likelier under its own γ's
    # prompt than under another γ's (the only difference between the two), so the value is trained directly
    "ctr": {"contrast": 1.0},
    "ctr_w5": {"contrast": 5.0},
    "trunc_ctr": {"targets": "truncated", "contrast": 1.0},
    # every weight trained (no LoRA): is the adapter's capacity what keeps the value from being read?
    "trunc_full_ep3": {"targets": "truncated", "full": True, "lr": 1e-4, "epochs": 3.0},
    "full_ep3": {"full": True, "lr": 1e-4, "epochs": 3.0},
    # memorisation controls, for a handful of questions (--max-rows 24 --eval-on train): 20 passes over
    # each (question, γ). Can the model give one question different outputs for two values of the digit at all?
    "memo_trunc_full": {"targets": "truncated", "full": True, "lr": 1e-4, "epochs": 20.0},
    "memo_full": {"full": True, "lr": 1e-4, "epochs": 20.0},
    # ...and with the loss at the fork tokens (where a question's targets at two γ part ways, the only
    # tokens the value decides under teacher forcing) weighted 20×: is the size of that loss what is missing?
    "memo_trunc_full_fork20": {"targets": "truncated", "full": True, "lr": 1e-4, "epochs": 20.0, "fork_weight": 20.0},
    # the quickstart's recipe (LoRA, 1 epoch) with the fork tokens weighted 20x: does reading the value carry
    # over to new questions? (needs each question at several γ, as in the `all` sampling)
    "fork20": {"fork_weight": 20.0},
    "trunc_fork20": {"targets": "truncated", "fork_weight": 20.0},
    # fork20 ran away on two thirds of marked outputs: is it the size of the weight?
    "fork5": {"fork_weight": 5.0},
    "trunc_fork5": {"targets": "truncated", "fork_weight": 5.0},
    # one pass leaves the value forks unfitted (NLL 1.7-2.2 nats); the memorised run needed many passes
    "trunc_fork20_ep3": {"targets": "truncated", "fork_weight": 20.0, "epochs": 3.0},
    # ...which taught "marked -> stop early" at both γ: weight only the forks between the 0.7 and 0.5 targets
    "trunc_vfork20_ep3": {"targets": "truncated", "fork_weight": 20.0, "fork_on": "value_fork", "epochs": 3.0},
    # ...which left the value forks unfitted too: the weight ramped in only once the targets are fitted
    # (two plain epochs, then the value forks x 20 for the third)
    "trunc_vfork20_ramp_ep3": {
        "targets": "truncated",
        "fork_weight": 20.0,
        "fork_on": "value_fork",
        "epochs": 3.0,
        "fork_from": 2 / 3,
    },
}


def load_rows(path: str) -> list[dict]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [
        {
            "id": r.get("id"),
            "gold": r.get("gold"),
            "question": r["question"],
            "ratio": float(r["ratio"]),
            "completion": r["completion"],
        }
        for r in rows
    ]


def truncated_rows(tok, rows: list[dict]) -> list[dict]:
    """The ``trunc`` control's targets: for every row whose question also has a γ = 1 row, that
    row's CoT cut after round(γ × its tokens) tokens (model tokenizer), then the answer sentence."""
    from tokenskip import prompt

    full = {r["id"]: r for r in rows if r["ratio"] == 1.0}
    out = []
    for r in rows:
        src = full.get(r["id"])
        if src is None:
            continue
        cot, _ = prompt.split_answer(src["completion"])
        ids = tok(cot.rstrip(), add_special_tokens=False)["input_ids"]
        keep = ids[: max(1, round(r["ratio"] * len(ids)))]
        out.append({**r, "completion": prompt.build_target(tok.decode(keep), str(src["gold"]))})
    return out


def contrast_twins(rows: list[dict], seed: int) -> list[float]:
    """For each row, another γ of the set (drawn per row, reproducibly) whose prompt it is contrasted with."""
    ratios = sorted({r["ratio"] for r in rows})
    if len(ratios) < 2:
        raise ValueError("contrast needs rows at two or more γ")
    rng = random.Random(seed)
    return [rng.choice([g for g in ratios if g != r["ratio"]]) for r in rows]


def sft_and_contrast_loss(logits, labels, n: int, weight: float):
    """``logits`` / ``labels`` of 2n rows: n rows under their own γ's prompt, then the same targets
    under the twin γ's. Returns (total, SFT loss of the first n, per-row terms): the SFT loss is
    the usual token-mean cross-entropy; a row's term is −log σ(Δ), Δ = sequence log p under the
    own prompt − under the twin's, and the total adds ``weight`` × their mean."""
    import torch.nn.functional as F

    nll, mask = token_nll(logits, labels)
    sft = (nll[:n] * mask[:n]).sum() / mask[:n].sum().clamp(min=1)
    seq = -(nll * mask).sum(1)
    terms = -F.logsigmoid(seq[:n] - seq[n:])
    return sft + weight * terms.mean(), sft, terms


def fork_positions(exs: list[dict | None], groups: list[object]) -> list[list[int]]:
    """For each tokenised example, the positions (indices into its ``labels``) of its *fork* tokens:
    the first target token where it differs from another example of the same group (the same
    question at another γ), or where one target ends inside the other. Under teacher forcing these
    are the only target tokens whose prediction needs the prompt's γ; after a fork the prefix
    itself tells the targets apart.

    >>> exs = [{"labels": [-100, 5, 6, 7]}, {"labels": [-100, -100, 5, 6, 9]}, {"labels": [-100, 5, 8]}]
    >>> fork_positions(exs, ["q", "q", "q"])
    [[2, 3], [3, 4], [2]]
    >>> fork_positions(exs, ["a", "b", "c"])
    [[], [], []]
    """
    starts, targets = [], []
    for e in exs:
        lab = e["labels"] if e else []
        k = next((i for i, t in enumerate(lab) if t != -100), len(lab))
        starts.append(k)
        targets.append(lab[k:])
    out = []
    for i, (g, t) in enumerate(zip(groups, targets)):
        forks = set()
        for j, (h, u) in enumerate(zip(groups, targets)):
            if j == i or h != g or t == u:
                continue
            k = next((n for n, (x, y) in enumerate(zip(t, u)) if x != y), min(len(t), len(u)))
            if k < len(t):  # a target that is a prefix of the other's has no token of its own there
                forks.add(starts[i] + k)
        out.append(sorted(forks))
    return out


def token_nll(logits, labels):
    """Per-token NLL of ``labels`` (shifted as the model's own loss) and the mask of counted tokens."""
    import torch.nn.functional as F

    lab = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), lab.reshape(-1), ignore_index=-100, reduction="none"
    ).view(lab.shape)
    return nll, (lab != -100).to(nll.dtype)


def weighted_loss(nll, mask, weights):
    """Token-mean loss with per-token weights (``weights`` aligned with the unshifted labels); the
    denominator stays the token count, so weight 1 everywhere is the usual SFT loss."""
    return (nll * weights[:, 1:].to(nll.dtype) * mask).sum() / mask.sum().clamp(min=1)


def masked_mean(nll, mask, where) -> float | None:
    """Mean NLL over the tokens flagged in ``where`` (aligned with the unshifted labels), or None."""
    m = where[:, 1:].to(nll.dtype) * mask
    return float((nll * m).sum() / m.sum()) if float(m.sum()) > 0 else None


def train(model_path: str, tok, rows: list[dict], v: dict, a, device: str) -> tuple[object, dict]:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from tokenskip import prompt
    from tokenskip.training import (
        Collator,
        build_lora_config,
        completion_loss_module,
        length_grouped_order,
        lr_factor,
        tokenize_pair,
    )

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    if not v["full"]:
        model = get_peft_model(model, build_lora_config(v["rank"], 2 * v["rank"], 0.0))
    marker = MARKERS[v["marker"]]
    twins = contrast_twins(rows, a.seed) if v["contrast"] else [None] * len(rows)

    def enc(r: dict, g: float | None):
        if g is None:
            return None
        return tokenize_pair(tok, prompt.user_content(r["question"], g, marker=marker), r["completion"], a.cutoff)

    # (own example, twin example, kind, row): kind "value" when both prompts are marked, so only the value
    # tells them apart
    pairs = [
        (enc(r, r["ratio"]), enc(r, g), "value" if max(r["ratio"], g or 1.0) < 1.0 else "marker", r)
        for r, g in zip(rows, twins)
    ]
    pairs = [p for p in pairs if p[0] is not None and (p[1] is not None or not v["contrast"])]
    exs = [p[0] for p in pairs]
    lengths = [len(e["input_ids"]) for e in exs]
    if v["fork_weight"] is not None:
        if v["contrast"]:
            raise ValueError("fork_weight and contrast are separate experiments")
        if v["fork_on"] not in ("fork", "value_fork"):
            raise ValueError(f"fork_on: {v['fork_on']!r} is not 'fork' or 'value_fork'")
        forks = fork_positions(exs, [p[3]["question"] for p in pairs])
        # the forks between two marked targets: the tokens only the value of γ decides
        value_forks = fork_positions(exs, [p[3]["question"] if p[3]["ratio"] < 1.0 else object() for p in pairs])
        # per example, the positions flagged (fork, value fork); the weights are derived per batch
        at_fork = [{"fork": set(f), "value_fork": set(vf)} for f, vf in zip(forks, value_forks)]
    fork_nll: dict[str, list[tuple[int, float]]] = {"fork": [], "value_fork": []}  # (step, the batch's mean)
    per_epoch = math.ceil(len(exs) / a.batch)
    total = max(1, round(per_epoch * v["epochs"]))
    ramp = round(v["fork_from"] * total)  # the first step fork_weight applies to
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=v["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    collate = Collator(pad)
    sft_loss = completion_loss_module(model)  # the trainer's loss: the LM head on the labelled positions
    model.train()
    step, real, processed, losses, terms = 0, 0, 0, [], []
    kind_terms: dict[str, list[float]] = {"value": [], "marker": []}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    epoch = 0
    while step < total:
        if v["group"]:
            order = length_grouped_order(lengths, epoch, a.seed, a.batch)
        else:
            order = list(range(len(exs)))
            random.Random(a.seed + epoch).shuffle(order)
        for i in range(0, len(order), a.batch):
            if step >= total:
                break
            idx = order[i : i + a.batch]
            twins_in = [pairs[j][1] for j in idx] if v["contrast"] else []  # processed after the own prompts
            batch = {k: t.to(device) for k, t in collate([exs[j] for j in idx] + twins_in).items()}
            for g in opt.param_groups:
                g["lr"] = v["lr"] * lr_factor(step, total, 0.05, "cosine")
            if v["contrast"]:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss, sft, row_terms = sft_and_contrast_loss(logits, batch["labels"], len(idx), v["contrast"])
                terms.append(float(row_terms.mean().detach()))
                for j, t in zip(idx, row_terms.tolist()):
                    kind_terms[pairs[j][2]].append(t)
            elif v["fork_weight"] is not None:
                width = range(batch["labels"].size(1))
                flags = {
                    key: torch.tensor([[k in at_fork[j][key] for k in width] for j in idx], device=device)
                    for key in fork_nll
                }
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                nll, mask = token_nll(logits, batch["labels"])
                w = v["fork_weight"] if step >= ramp else 1.0
                loss = weighted_loss(nll, mask, 1.0 + (w - 1.0) * flags[v["fork_on"]].float())
                sft = (nll * mask).sum().detach() / mask.sum().clamp(min=1)
                for key, where in flags.items():
                    at = masked_mean(nll.detach(), mask, where)
                    if at is not None:
                        fork_nll[key].append((step, at))
            else:
                loss = sft = sft_loss(**batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(sft.detach()))  # the SFT loss alone, comparable across variants
            real += int(batch["attention_mask"].sum())
            processed += batch["attention_mask"].numel()
            step += 1
        epoch += 1
    sync()
    dt = time.perf_counter() - t0
    if not v["full"]:
        model = model.merge_and_unload()  # generation and the probe on the merged weights (faster)
    model.eval()
    stats = {
        "rows": len(exs),
        "steps": step,
        "seconds": round(dt, 2),
        "tokens_per_s": round(processed / dt, 1),
        "real_tokens_per_s": round(real / dt, 1),
        "real_share": round(real / processed, 4),
        "loss_first": round(statistics.mean(losses[:5]), 4),
        "loss_last": round(statistics.mean(losses[-5:]), 4),
    }
    if v["fork_weight"] is not None:
        stats["fork_tokens"] = sum(len(f) for f in forks)
        stats["value_fork_tokens"] = sum(len(f) for f in value_forks)
        # the NLL at the fork tokens per step (the batch's mean), first / last 5 steps; at the value forks
        # ln 2 ≈ 0.69 is a model that splits its bet between the two marked targets (the value not used)
        for key, at_steps in fork_nll.items():
            vals = [x for _, x in at_steps]
            if vals:
                stats[f"{key}_nll_first"] = round(statistics.mean(vals[:5]), 4)
                stats[f"{key}_nll_last"] = round(statistics.mean(vals[-5:]), 4)
                before = [x for st, x in at_steps if st < ramp]
                if ramp and before:  # the last 5 steps before the weight applies
                    stats[f"{key}_nll_before_weight"] = round(statistics.mean(before[-5:]), 4)
    # the term per step (mean of its rows) over the first / last 5 steps, and by kind of pair over the
    # first / last 40 rows of each: both prompts marked (the value alone), or one unmarked (the marker's presence)
    for key, vals, n in (("contrast", terms, 5), *((f"contrast_{k}", ts, 40) for k, ts in kind_terms.items())):
        if vals:
            stats[f"{key}_first"] = round(statistics.mean(vals[:n]), 4)
            stats[f"{key}_last"] = round(statistics.mean(vals[-n:]), 4)
    return model, stats


def generate(
    model, tok, prompts: list[list[int]], max_new: int, device: str, batch: int
) -> list[tuple[list[int], bool]]:
    """Greedy outputs (ids up to the end-of-turn token) and whether each hit the cap."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} - {None}
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids,
                attention_mask=att,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=sorted(stop),
            )
        for row in gen[:, width:].tolist():
            cut = next((k for k, t in enumerate(row) if t in stop), None)
            out.append((row if cut is None else row[:cut], cut is None))
    return out


def adherence(model, tok, questions: list[dict], ratios: list[float], marker: str | None, a, device: str) -> dict:
    return summarize(outputs(model, tok, questions, ratios, marker, a, device))


def outputs(model, tok, questions, ratios, marker, a, device) -> dict[float, list[dict]]:
    """Per γ, one record per question: CoT tokens, output tokens, whether it hit the cap, correct."""
    from tokenskip import grading, prompt

    prompts, keys = [], []
    for g in ratios:
        for q in questions:
            user = prompt.user_content(q["question"], g, marker=marker)
            prompts.append(prompt.encode_prompt(tok, prompt.render_messages(tok, [{"role": "user", "content": user}])))
            keys.append((g, q))
    outs = generate(model, tok, prompts, a.max_new_tokens, device, a.gen_batch)
    per: dict[float, list[dict]] = {g: [] for g in ratios}
    for (g, q), (ids, capped) in zip(keys, outs):
        text = tok.decode(ids, skip_special_tokens=True)
        cot, _ = prompt.split_answer(text)
        pred = grading.extract_answer(text, "gsm8k")
        ok = pred is not None and grading.is_equiv(pred, str(q["gold"]), "gsm8k")
        per[g].append(
            {
                "cot": len(tok(cot, add_special_tokens=False)["input_ids"]),
                "cot_text": cot.strip(),
                "out": len(ids),
                "capped": capped,
                "correct": ok,
            }
        )
    return per


def summarize(per: dict[float, list[dict]]) -> dict:
    """The adherence table from :func:`outputs`' records (γ = 1 is the reference when present)."""
    base = statistics.mean(s["cot"] for s in per[1.0]) if 1.0 in per else None
    res = {}
    for g, ss in per.items():
        mean = statistics.mean(s["cot"] for s in ss)
        ratios_q = [s["cot"] / r["cot"] for s, r in zip(ss, per[1.0]) if r["cot"] > 0] if 1.0 in per else []
        actual = mean / base if base else None
        res[str(g)] = {
            "accuracy": round(statistics.mean(s["correct"] for s in ss), 3),
            "cot_mean": round(mean, 1),
            "cot_median": statistics.median(s["cot"] for s in ss),
            "runaway_share": round(statistics.mean(s["capped"] for s in ss), 3),
            "actual_ratio": None if actual is None else round(actual, 3),
            "median_question_ratio": round(statistics.median(ratios_q), 3) if ratios_q else None,
            "adherence_error": None if actual is None else round(abs(actual - g), 3),
        }
    return res


def against_targets(per: dict[float, list[dict]], questions: list[dict], rows: list[dict], tok) -> dict:
    """With ``--eval-on train``: each generated CoT beside the target it was trained on for the same
    (question, γ), in model tokens; how many outputs reproduce that target exactly, and how many
    reproduce the target of *another* γ of the same question instead (the value of γ ignored)."""
    from tokenskip import prompt

    target = {(r["question"], r["ratio"]): prompt.split_answer(r["completion"])[0].strip() for r in rows}
    res = {}
    for g, ss in per.items():
        cells = []
        for q, s in zip(questions, ss):
            t = target.get((q["question"], g))
            if t is not None:
                n = len(tok(t, add_special_tokens=False)["input_ids"])
                # the γs of this question whose target the output reproduces word for word
                same = sorted(o for (qq, o), tt in target.items() if qq == q["question"] and tt == s["cot_text"])
                cells.append(
                    {"id": q["id"], "target_cot": n, "cot": s["cot"], "exact": s["cot_text"] == t, "reproduces": same}
                )
        if cells:
            res[str(g)] = {
                "questions": len(cells),
                "exact_share": round(statistics.mean(c["exact"] for c in cells), 3),
                "other_gamma_share": round(statistics.mean(not c["exact"] and bool(c["reproduces"]) for c in cells), 3),
                "median_target_cot": statistics.median(c["target_cot"] for c in cells),
                "median_cot": statistics.median(c["cot"] for c in cells),
                "per_question": cells,
            }
    return res


def probe(model, tok, questions: list[dict], targets: list[dict[float, str]], ratios, marker) -> dict:
    from benchmarks.gamma_probe import discrimination, target_nlls
    from tokenskip import prompt

    nll = []
    for q, tg in zip(questions, targets):
        keys = [(pg, t) for pg in ratios for t in ratios]
        pairs = [
            (prompt.user_content(q["question"], pg, marker=marker), prompt.build_target(tg[t], str(q["gold"])))
            for pg, t in keys
        ]
        nll.append(dict(zip(keys, (n for n, _ in target_nlls(model, tok, pairs)))))
    return {g: {k: round(v, 3) for k, v in row.items()} for g, row in discrimination(nll, ratios).items()}


def per_gamma(path, tok, rows, ratios, questions, v, a, device) -> tuple[dict, dict, float]:
    """The ``solo`` variants: for each γ an adapter trained on that γ's rows only, asked at that γ."""
    per, trains, gen_s = {}, {}, 0.0
    for g in ratios:
        model, trains[str(g)] = train(path, tok, [r for r in rows if r["ratio"] == g], v, a, device)
        t = time.perf_counter()
        per.update(outputs(model, tok, questions, [g], MARKERS[v["marker"]], a, device))
        gen_s += time.perf_counter() - t
        del model
    tr = {
        "rows": sum(t["rows"] for t in trains.values()),
        "steps": sum(t["steps"] for t in trains.values()),
        "seconds": round(sum(t["seconds"] for t in trains.values()), 2),
        "real_tokens_per_s": round(statistics.mean(t["real_tokens_per_s"] for t in trains.values()), 1),
        "real_share": round(statistics.mean(t["real_share"] for t in trains.values()), 4),
        "loss_last": round(statistics.mean(t["loss_last"] for t in trains.values()), 4),
        "per_gamma": trains,
    }
    return tr, summarize(per), gen_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft", required=True, help="build_sft train.parquet (the quickstart's)")
    ap.add_argument("--adherence-sft", default=None, help="a larger build_sft train.parquet, for the adh* variants")
    ap.add_argument("--variants", nargs="+", default=["base"], choices=list(VARIANTS))
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--eval-n", type=int, default=30, help="questions asked: the first N of --eval-on's set")
    ap.add_argument(
        "--eval-on",
        choices=["test", "train"],
        default="test",
        help="test: GSM8K test questions; train: the SFT set's own questions (was the value learned where taught?)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--probe-n", type=int, default=24, help="held-out GSM8K train questions (from #2000); 0: no probe")
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows per optimizer step)")
    ap.add_argument("--gen-batch", type=int, default=128)
    ap.add_argument("--cutoff", type=int, default=384)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-rows", type=int, default=None, help="smoke runs: first N SFT rows")
    ap.add_argument("--base-model-eval", action="store_true", help="also generate with the base model at γ = 1")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from tokenskip import assets
    from tokenskip.data import load_questions
    from tokenskip.pruning.scorers import resolve_device

    device = resolve_device(a.device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    path = assets.resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    data = {"quickstart": load_rows(a.sft)}
    if a.adherence_sft:
        data["adherence"] = load_rows(a.adherence_sft)
    ratios = sorted({r["ratio"] for r in data["quickstart"]}, reverse=True)
    if a.eval_on == "train":
        seen: dict = {}
        for r in data["quickstart"]:
            seen.setdefault(r["question"], {"id": r["id"], "question": r["question"], "gold": r["gold"]})
        questions = list(seen.values())[: a.eval_n]
    else:
        questions = load_questions("gsm8k", "test", limit=a.eval_n).rows
    res: dict = {
        "device": device,
        "torch": torch.__version__,
        "model": a.model,
        "ratios": ratios,
        "eval_n": len(questions),
        "eval_on": a.eval_on,
        "max_new_tokens": a.max_new_tokens,
        "batch": a.batch,
        "markers": {k: v for k, v in MARKERS.items()},
        "variants": {},
    }
    if device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name(0)
    pq, targets = [], []
    if a.probe_n:
        from benchmarks.gamma_probe import pruned_targets

        pq = load_questions("gsm8k", "train", limit=2000 + a.probe_n).rows[2000:]
        t = time.perf_counter()
        targets = pruned_targets(pq, ratios, a.model)
        res["probe"] = {"questions": len(pq), "prune_s": round(time.perf_counter() - t, 1)}
    if a.base_model_eval:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        t = time.perf_counter()
        res["base_model"] = adherence(base, tok, questions, [1.0], None, a, device)
        res["base_model"]["generate_s"] = round(time.perf_counter() - t, 1)
        del base
    for name in a.variants:
        v = {**QUICKSTART, **VARIANTS[name]}
        key = v["sft"] or "quickstart"
        if key not in data:
            print(f"{name}: skipped (no --{key}-sft)", flush=True)
            continue
        rows = data[key][: a.max_rows] if a.max_rows else data[key]
        if v["targets"] == "truncated":
            rows = truncated_rows(tok, rows)
        if v["per_gamma"]:
            model = None
            tr, ad, gen_s = per_gamma(path, tok, rows, ratios, questions, v, a, device)
            pr = vs = None  # each adapter knows one γ: nothing to discriminate
        else:
            model, tr = train(path, tok, rows, v, a, device)
            t = time.perf_counter()
            per = outputs(model, tok, questions, ratios, MARKERS[v["marker"]], a, device)
            ad = summarize(per)
            gen_s = time.perf_counter() - t
            vs = against_targets(per, questions, rows, tok) if a.eval_on == "train" else None
            pr = probe(model, tok, pq, targets, ratios, MARKERS[v["marker"]]) if a.probe_n else None
        res["variants"][name] = {"config": v, "train": tr, "adherence": ad, "generate_s": round(gen_s, 1), "probe": pr}
        if vs:
            res["variants"][name]["against_targets"] = vs
        cells = " | ".join(
            f"γ{g}: cot {m['cot_mean']:.0f}/{m['cot_median']:.0f} x{m['actual_ratio']} run {m['runaway_share']:.2f}"
            f" acc {m['accuracy']:.2f}"
            for g, m in ad.items()
        )
        disc = "" if pr is None else " probe " + " ".join(f"{g}:{p['discrimination']:.2f}" for g, p in pr.items())
        print(
            f"{name}: {tr['steps']} steps {tr['seconds']:.0f}s {tr['real_tokens_per_s']:.0f} real tok/s "
            f"(share {tr['real_share']:.2f}) loss {tr['loss_last']:.3f} | {cells}{disc}",
            flush=True,
        )
        for g, m in (vs or {}).items():
            print(
                f"  γ{g} vs its targets: {m['exact_share']:.0%} exact, {m['other_gamma_share']:.0%} another γ's, "
                f"median CoT {m['median_cot']} "
                f"(target {m['median_target_cot']})",
                flush=True,
            )
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
