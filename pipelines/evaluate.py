"""Evaluation stage: the paper's Table 1 for a model and (optionally) a TokenSkip adapter.

One vLLM engine serves every condition (original, TokenSkip γ, prompting baselines);
the adapter is attached per request (LoRARequest). Per condition: all questions in one
``llm.generate`` call (batched throughput), then the first ``latency_samples`` questions
one at a time (latency at batch size 1, the paper's measure). Truncation rows cut the
original's saved greedy token ids; no generation is needed because a greedy run with a
smaller ``max_tokens`` returns a prefix of the longer run. Budget-forcing rows cut the
original's CoT the same way, append the answer sentence's opening and generate only the
answer (one batched call per γ, ``force_answer_tokens`` new tokens at most). Hard budgets
(``hard_budgets``) cap TokenSkip (routed to the γ that fits) and the base model at B tokens,
again from the saved greedy outputs, and force an answer wherever the cap fired (one batched
call per model over every budget).

Outputs (``cfg.output_dir``): ``samples/<dataset>/<condition>.jsonl`` (and
``hard_budget-<B>-<tokenskip|base>.jsonl``), ``results.json``,
``table.md``, ``accuracy_vs_tokens.png``, ``ratio_adherence.png``, then ``manifest.json``.
Every figure in results.json is recomputed by :mod:`tokenskip.evaluation` from the
sample rows that are saved. Each generated condition (not the derived truncation, budget
forcing and hard-budget rows, which are rebuilt from it) also gets ``<condition>.meta.json``
(question ids, prompt hash, budget, latencies), written after its samples: a run restarted
into the same directory (same fingerprint) reuses every condition saved so, and generates
only the rest. ``--force`` wipes only a directory this stage owns.

Inputs are checked before any model loads (:func:`validate`). Placement: on the driver,
or, with ``placement: ray`` / ``num_gpus > 0`` / a cluster address, inside one Ray task
holding ``num_gpus`` (so that on a cluster the engine lands on a GPU node; the output dir
must then be storage that the driver can read too).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines import progress
from tokenskip import artifacts, assets, card, evaluation, gamma
from tokenskip.config import EvalConfig

log = logging.getLogger("tokenskip.evaluate")

RESULTS = "results.json"
TABLE = "table.md"
PLOTS = ("accuracy_vs_tokens.png", "ratio_adherence.png")


class EvalInputError(ValueError):
    """A bad evaluation input (adapter, ratio, dataset); raised before any model loads."""


# --------------------------------------------------------------------------- validation

_LOCAL_HINTS = ("/", "./", "../", "~")


def _looks_local(name: str) -> bool:
    """A string that means a local path rather than a hub id ``owner/name``."""
    return (
        name.startswith(_LOCAL_HINTS)
        or name.lower().endswith((".jsonl", ".json", ".parquet"))
        or name.count("/") > 1
        or os.sep == "\\"
        and "\\" in name
    )


def check_adapter(path: str) -> dict:
    """The adapter's ``adapter_config.json``, or :class:`EvalInputError` saying what is wrong."""
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalInputError(f"eval.adapter: {p} does not exist")
    if not p.is_dir():
        raise EvalInputError(f"eval.adapter: {p} is not a directory (expected a PEFT adapter folder)")
    cfg_file = p / "adapter_config.json"
    if not cfg_file.is_file():
        raise EvalInputError(f"eval.adapter: {p} is not a PEFT adapter (no adapter_config.json)")
    if not any((p / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise EvalInputError(f"eval.adapter: {p} has no adapter weights (adapter_model.safetensors / .bin)")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise EvalInputError(f"eval.adapter: {cfg_file} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or str(meta.get("peft_type", "LORA")).upper() != "LORA":
        raise EvalInputError(
            f"eval.adapter: {cfg_file}: peft_type {meta.get('peft_type')!r} is not LORA (vLLM serves LoRA only)"
        )
    try:
        card.read_card(p, missing_ok=True)  # evaluate adds its figures to this card: a broken one fails now
    except card.CardError as e:
        raise EvalInputError(f"eval.adapter: {e}") from None
    return meta


def check_dataset(name: str, split: str) -> str:
    """'embedded' | 'file' | 'hub' for a dataset name, or :class:`EvalInputError`."""
    if assets.is_embedded_dataset(name):
        splits = assets.EMBEDDED_DATASETS[name]
        if split not in splits:
            raise EvalInputError(
                f"eval.datasets: embedded dataset {name!r} has no split {split!r} (splits: {', '.join(splits)})"
            )
        return "embedded"
    p = Path(name).expanduser()
    if p.is_file():
        return "file"
    if _looks_local(name) or p.exists():
        raise EvalInputError(f"eval.datasets: dataset file not found: {name}")
    if "/" in name:
        return "hub"
    raise EvalInputError(
        f"eval.datasets: unknown dataset {name!r} (embedded: {', '.join(assets.EMBEDDED_DATASETS)}; "
        "or give a .jsonl/.json/.parquet path or a Hugging Face id owner/name)"
    )


def validate(cfg: EvalConfig) -> None:
    """Every check that needs no model: adapter folder, γ grid, dataset names, model path."""
    for i, r in enumerate(cfg.ratios):
        try:
            gamma.check(r, f"eval.ratios[{i}]")
        except ValueError as e:
            raise EvalInputError(str(e)) from None
    if cfg.adapter:
        check_adapter(cfg.adapter)
        from tokenskip.memory import adapter_mismatch

        wrong_base = adapter_mismatch(cfg.adapter, cfg.model)
        if wrong_base:  # it would fail at the merge, after the base model's conditions ran
            raise EvalInputError(f"eval.adapter: {wrong_base}")
    if not cfg.datasets:
        raise EvalInputError("eval.datasets must not be empty")
    for name in cfg.datasets:
        check_dataset(name, cfg.split)
    if (
        not assets.is_embedded_model(cfg.model)
        and _looks_local(cfg.model)
        and not Path(cfg.model).expanduser().exists()
    ):
        raise EvalInputError(f"eval.model: {cfg.model} does not exist")
    if not cfg.output_dir:
        raise EvalInputError("eval.output_dir must be set")


# --------------------------------------------------------------------------- entry


def _use_ray(cfg: EvalConfig) -> bool:
    if cfg.placement != "auto":
        return cfg.placement == "ray"
    return bool(os.environ.get("RAY_ADDRESS")) or cfg.num_gpus > 0


def _task_options(cfg: EvalConfig) -> dict:
    """Ray options of the evaluation task: its resources, and for a small CPU model (whose engine runs
    in the task's process) the threads vLLM's Worker would have (``engine.in_process_threads_env``)."""
    from pipelines.common import runtime_env_with
    from tokenskip.engine import engine_kwargs_for, in_process_threads_env

    opts: dict = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    kw = None if cfg.num_gpus else engine_kwargs_for(cfg.model, cfg.engine_kwargs, seed=cfg.seed)
    env = runtime_env_with(in_process_threads_env(kw)) if kw else None
    if env:
        opts["runtime_env"] = env
    return opts


def run_evaluate(cfg: EvalConfig, force: bool = False) -> dict:
    """Evaluate and return the manifest (an existing finished run is returned as is)."""
    validate(cfg)
    out = Path(cfg.output_dir)
    with artifacts.stage_lock(out):  # one writer per output directory
        return _run_evaluate(cfg, out, force)


def _run_evaluate(cfg: EvalConfig, out: Path, force: bool) -> dict:
    # The stages' common prologue (the lock is already held, so it stays held): a finished run is
    # returned, one with another config refused; --force wipes only a directory this stage owns.
    # An unfinished run with the same config reuses the conditions whose samples are saved
    # (_saved_condition).
    finished = artifacts.skip_if_finished(out, force, cfg)
    if finished is not None:
        return finished
    if _use_ray(cfg):
        import ray  # joins the Ray the caller started (ray_jobs.runner), or the job's cluster

        task = ray.remote(**_task_options(cfg))(evaluate_body)
        log.info("running the evaluation in a Ray task (num_gpus=%s, num_cpus=%s)", cfg.num_gpus, cfg.num_cpus)
        return ray.get(task.remote(cfg))
    return evaluate_body(cfg)


# --------------------------------------------------------------------------- body


def _load_datasets(cfg: EvalConfig) -> list[dict]:
    from tokenskip.data import default_max_new_tokens, infer_kind, load_questions

    out = []
    for name in cfg.datasets:
        kind = infer_kind(name)
        rows = load_questions(name, cfg.split, kind=kind, limit=cfg.limit).rows
        if not rows:
            raise EvalInputError(f"eval.datasets: {name!r} ({cfg.split}) has no questions")
        max_len = cfg.max_new_tokens or default_max_new_tokens(kind)
        over = [b for b in cfg.hard_budgets if b > max_len]
        if over:
            raise EvalInputError(
                f"eval.hard_budgets: {over} exceed the {max_len} new tokens {name!r} is generated with "
                "(set eval.max_new_tokens at least as large as the largest budget)"
            )
        out.append(
            {
                "name": name,
                "kind": kind,
                "rows": rows,
                "max_new_tokens": max_len,
            }
        )
    return out


def _max_lora_rank(adapter_meta: dict | None) -> int:
    r = int((adapter_meta or {}).get("r", 8) or 8)
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):
        if r <= allowed:
            return max(16, allowed)
    return r


def _generate(
    llm: Any, prompts: list[str], max_tokens: int, seed: int, lora: Any, stop: list[str] | None = None
) -> list[dict]:
    from tokenskip.engine import sampling_params
    from tokenskip.prompt import encode_prompt

    tok = llm.get_tokenizer()  # token ids, as training saw them (a text prompt could get a second BOS)
    inputs = [{"prompt_token_ids": encode_prompt(tok, p)} for p in prompts]
    extra = {"stop": stop, "include_stop_str_in_output": True} if stop else {}
    outs = llm.generate(inputs, sampling_params(max_tokens, 0.0, seed, **extra), lora_request=lora, use_tqdm=False)
    return [
        {
            "output": o.outputs[0].text,
            "token_ids": list(o.outputs[0].token_ids),
            "finish_reason": o.outputs[0].finish_reason,
        }
        for o in outs
    ]


def _time_single(
    llm: Any, prompts: list[str], max_tokens: int, seed: int, lora: Any, label: str, stop: list[str] | None = None
) -> list[float]:
    times = []
    for i, p in enumerate(prompts):
        t0 = time.perf_counter()
        _generate(llm, [p], max_tokens, seed, lora, stop)
        times.append(time.perf_counter() - t0)
        log.info("  %s latency %d/%d: %.2f s", label, i + 1, len(prompts), times[-1])
    return times


def _sample_rows(
    cond: evaluation.Condition,
    rows: list[dict],
    prompts: list[str],
    gens: list[dict],
    kind: str,
    grader: str | None = None,
) -> list[dict]:
    from tokenskip.grading import grade_many

    out = []
    grades = grade_many([g["output"] for g in gens], [row["gold"] for row in rows], kind, grader)
    for row, prompt, g, gr in zip(rows, prompts, gens, grades):
        out.append(
            {
                "id": row["id"],
                "condition": cond.id,
                "ratio": cond.ratio,
                "question": row["question"],
                "gold": row["gold"],
                "prompt": prompt,
                "output": g["output"],
                "extracted": gr.extracted,
                "correct": gr.correct,
                "output_tokens": len(g["token_ids"]),
                "finish_reason": g["finish_reason"],
                "token_ids": g["token_ids"],
                **({"grader_verdicts": gr.verdicts} if gr.verdicts else {}),
            }
        )
    return out


def _add_cot_tokens(samples: list[dict], tokenizer: Any) -> None:
    """``cot_tokens``: the output's tokens before its final-answer sentence (what the paper counts)."""
    from tokenskip.prompt import split_answer

    cots = [split_answer(x["output"])[0] for x in samples]
    counts = [len(ids) for ids in tokenizer(cots, add_special_tokens=False)["input_ids"]] if cots else []
    for x, n in zip(samples, counts):
        x["cot_tokens"] = min(n, int(x["output_tokens"]))


def _prompts_sha(prompts: list[str]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(prompts).encode("utf-8")).hexdigest()


def _meta_path(out: Path, dataset: str, cond_id: str) -> Path:
    return out / "samples" / dataset / f"{cond_id}.meta.json"


def _save_condition_meta(
    out: Path,
    dataset: str,
    cond_id: str,
    rows: list[dict],
    prompts: list[str],
    budget: int,
    lat: list[float],
    thr: dict | None,
    reused: str | None,
) -> None:
    """Written after the condition's samples: with it, a restarted run reuses them."""
    artifacts.atomic_write_json(
        _meta_path(out, dataset, cond_id),
        {
            "ids": [r["id"] for r in rows],
            "prompts_sha256": _prompts_sha(prompts),
            "max_new_tokens": budget,
            "latency_each_s": lat,
            "throughput": thr,
            "reused_from": reused,
        },
    )


def _saved_condition(
    out: Path, dataset: str, cond_id: str, rows: list[dict], prompts: list[str], budget: int
) -> tuple[list[dict], list[float], dict | None, str | None] | None:
    """(generations, latencies, throughput, reused_from) saved by an earlier run of this
    directory for exactly these questions, prompts and token budget; else None. (Model,
    adapter and the rest are the fingerprint's: a changed config is refused before this.)"""
    meta_file, samples_file = _meta_path(out, dataset, cond_id), out / "samples" / dataset / f"{cond_id}.jsonl"
    if not (meta_file.is_file() and samples_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        saved = artifacts.read_rows(samples_file)
    except (OSError, ValueError, artifacts.StageError) as e:
        log.warning("%s: saved samples unreadable (%s); generating them again", samples_file, e)
        return None
    if (
        meta.get("ids") != [r["id"] for r in rows]
        or meta.get("prompts_sha256") != _prompts_sha(prompts)
        or meta.get("max_new_tokens") != budget
        or [s.get("id") for s in saved] != meta["ids"]
    ):
        return None
    gens = [
        {"output": s["output"], "token_ids": list(s["token_ids"]), "finish_reason": s["finish_reason"]} for s in saved
    ]
    return gens, list(meta.get("latency_each_s") or []), meta.get("throughput"), meta.get("reused_from")


def _outputs_sha(samples: list[dict]) -> str:
    """What a derived result (budget forcing, hard budgets) is built from: its source's outputs."""
    return _prompts_sha([[x["id"], x["prompt"], list(x["token_ids"]), x["finish_reason"]] for x in samples])


def _saved_derived(meta_file: Path, key: dict, sample_files: list[Path]) -> tuple[dict, list[list[dict]]] | None:
    """(meta, each file's rows) of a derived result an earlier run of this directory finished
    from exactly ``key`` (its sources' outputs and settings); else None."""
    if not (meta_file.is_file() and all(f.is_file() for f in sample_files)):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("key") != key:
            return None
        return meta, [artifacts.read_rows(f) for f in sample_files]
    except (OSError, ValueError, artifacts.StageError) as e:
        log.warning("%s: saved result unreadable (%s); computing it again", meta_file, e)
        return None


def _truncate(
    cond: evaluation.Condition, original: list[dict], tokenizer: Any, kind: str, grader: str | None = None
) -> list[dict]:
    from tokenskip.grading import grade

    out = []
    for s in original:
        ids = evaluation.truncate_ids(s["token_ids"], cond.ratio)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        gr = grade(text, s["gold"], kind, grader)
        out.append(
            {
                **s,
                **({"grader_verdicts": gr.verdicts} if gr.verdicts else {}),
                "condition": cond.id,
                "ratio": cond.ratio,
                "output": text,
                "extracted": gr.extracted,
                "correct": gr.correct,
                "output_tokens": len(ids),
                "source_tokens": s["output_tokens"],
                "finish_reason": "truncated" if len(ids) < s["output_tokens"] else s["finish_reason"],
                "token_ids": ids,
            }
        )
    return out


def _forced_answers(
    llm: Any, req: Any, prompts: list[str], cots: list[str], cap: int, seed: int
) -> tuple[list[str], list[dict], float]:
    """(forced prompts, answers, batch wall s): one batched call continuing each prompt + cut CoT +
    the answer sentence's opening for at most ``cap`` tokens; each answer is cut where its box closes."""
    forced = [evaluation.forced_prompt(p, c) for p, c in zip(prompts, cots)]
    if not forced:
        return forced, [], 0.0
    tok = llm.get_tokenizer()
    t0 = time.perf_counter()
    gens = _generate(llm, forced, cap, seed, req, list(evaluation.ANSWER_STOP))
    wall = time.perf_counter() - t0
    answers = []
    for g in gens:
        ids, text, closed = evaluation.trim_answer_ids(
            g["token_ids"], lambda x: tok.decode(x, skip_special_tokens=True)
        )
        answers.append(
            {
                "text": text,
                "ids": ids,
                "closed": closed,
                "finish_reason": g["finish_reason"],
                "generated": len(g["token_ids"]),
            }
        )
    return forced, answers, wall


def _forced_output(cot: str, cot_ids: list[int], answer: dict, tokenizer: Any) -> tuple[str, list[int]]:
    """(output text, token ids) of a forced answer: the CoT, the answer opening, the answer."""
    from tokenskip.prompt import forced_answer_text

    head = forced_answer_text(cot)
    opening = head[len(cot.rstrip()) :]
    opening_ids = list(tokenizer(opening, add_special_tokens=False)["input_ids"])
    return head + answer["text"], list(cot_ids) + opening_ids + list(answer["ids"])


def _budget_force(
    cond: evaluation.Condition,
    original: list[dict],
    original_latency: list[float],
    llm: Any,
    cfg: EvalConfig,
    kind: str,
    n_lat: int,
    label: str,
) -> tuple[list[dict], list[float], dict]:
    """Budget forcing at γ: the original's first ⌊γ × CoT tokens⌋ tokens, the answer opening, and
    the answer written by the base model. Returns (samples, latency per timed question, forcing pass)."""
    from tokenskip.grading import grade_many

    tok = llm.get_tokenizer()
    kept = [evaluation.budget_cut_ids(s["token_ids"], s.get("cot_tokens"), cond.ratio) for s in original]
    cots = [tok.decode(ids, skip_special_tokens=True) for ids in kept]
    forced, answers, wall = _forced_answers(
        llm, None, [s["prompt"] for s in original], cots, cfg.force_answer_tokens, cfg.seed
    )
    outputs = [_forced_output(c, k, a, tok) for c, k, a in zip(cots, kept, answers)]
    grades = grade_many([o[0] for o in outputs], [s["gold"] for s in original], kind, cfg.grader)
    samples = []
    for s, ids, a, (text, all_ids), gr in zip(original, kept, answers, outputs, grades):
        base = {k: v for k, v in s.items() if k != "grader_verdicts"}
        samples.append(
            {
                **base,
                **({"grader_verdicts": gr.verdicts} if gr.verdicts else {}),
                "condition": cond.id,
                "ratio": cond.ratio,
                "output": text,
                "extracted": gr.extracted,
                "correct": gr.correct,
                "output_tokens": len(all_ids),
                "cot_tokens": len(ids),
                "source_tokens": s["output_tokens"],
                "source_cot_tokens": s.get("cot_tokens"),
                "finish_reason": "forced",
                "answer_tokens": len(a["ids"]),
                "answer_closed": a["closed"],
                "answer_finish_reason": a["finish_reason"],
                "token_ids": all_ids,
            }
        )
    timed = min(n_lat, len(original_latency), len(forced))
    force_lat = _time_single(
        llm, forced[:timed], cfg.force_answer_tokens, cfg.seed, None, label, list(evaluation.ANSWER_STOP)
    )
    lat = [
        evaluation.latency_share(original_latency[i], len(kept[i]), original[i]["output_tokens"]) + force_lat[i]
        for i in range(timed)
    ]
    n_tok = sum(a["generated"] for a in answers)
    thr = {
        "pass": "forced answers only (the cut CoT is the original's)",
        "wall_s": wall,
        "output_tokens": n_tok,
        "tokens_per_s": n_tok / wall if wall else None,
        "samples_per_s": len(answers) / wall if wall else None,
        "batch_size": len(answers),
        "forcing_latency_each_s": force_lat,
    }
    return samples, lat, thr


def _hard_budget(
    model: str, routes: dict[int, dict], engines: "_Engines", cfg: EvalConfig, kind: str
) -> dict[int, tuple[list[dict], dict]]:
    """Every budget for one model (``tokenskip`` routed per budget, or ``base``): capped at B
    tokens (from the saved greedy outputs when they were generated with at least B, else
    generated), then one batched forcing call over every budget's capped outputs.
    ``routes``: budget -> {"ratio", "source": (condition id, its samples, the budget it was generated with)}."""
    from tokenskip.grading import grade_many
    from tokenskip.prompt import split_answer

    llm, req = engines.get(model == "tokenskip")
    tok = llm.get_tokenizer()
    capped: dict[int, list[dict]] = {}
    for b, rt in routes.items():
        src_id, src, src_budget = rt["source"]
        if src_budget >= b:
            items = []
            for s in src:
                ids, fired = evaluation.capped_ids(s["token_ids"], s["finish_reason"], b)
                text = s["output"] if len(ids) == len(s["token_ids"]) else tok.decode(ids, skip_special_tokens=True)
                items.append({"s": s, "ids": ids, "text": text, "fired": fired, "from": "saved greedy outputs"})
        else:  # the source row was generated with fewer tokens than B: generate with max_tokens = B
            gens = _generate(llm, [s["prompt"] for s in src], b, cfg.seed, req)
            items = [
                {"s": s, "ids": g["token_ids"], "text": g["output"], "fired": g["finish_reason"] == "length",
                 "from": "generated"}
                for s, g in zip(src, gens)
            ]  # fmt: skip
        for it in items:
            cot = split_answer(it["text"])[0]
            it["cot"] = cot
            n = len(tok(cot, add_special_tokens=False)["input_ids"]) if cot else 0
            it["cot_tokens"] = min(n, len(it["ids"]))
            it["src_id"] = src_id
        capped[b] = items
    fired = [(b, i) for b, items in capped.items() for i, it in enumerate(items) if it["fired"]]
    _, answers, wall = _forced_answers(
        llm,
        req,
        [capped[b][i]["s"]["prompt"] for b, i in fired],
        [capped[b][i]["cot"] for b, i in fired],
        cfg.force_answer_tokens,
        cfg.seed,
    )
    for (b, i), a in zip(fired, answers):
        it = capped[b][i]
        cot_ids = list(tok(it["cot"].rstrip(), add_special_tokens=False)["input_ids"]) if it["cot"].strip() else []
        it["text"], it["ids"] = _forced_output(it["cot"], cot_ids[: it["cot_tokens"]], a, tok)
        it["answer"] = a
    out: dict[int, tuple[list[dict], dict]] = {}
    for b, items in capped.items():
        grades = grade_many([it["text"] for it in items], [it["s"]["gold"] for it in items], kind, cfg.grader)
        rows = []
        for it, gr in zip(items, grades):
            s, a = it["s"], it.get("answer")
            rows.append(
                {
                    "id": s["id"],
                    "budget": b,
                    "model": model,
                    "ratio": routes[b].get("ratio"),
                    "source_condition": it["src_id"],
                    "capped_from": it["from"],
                    "question": s["question"],
                    "gold": s["gold"],
                    "prompt": s["prompt"],
                    "output": it["text"],
                    "extracted": gr.extracted,
                    "correct": gr.correct,
                    "output_tokens": len(it["ids"]),
                    "cot_tokens": it["cot_tokens"],
                    "uncapped_cot_tokens": s.get("cot_tokens"),
                    "forced": it["fired"],
                    "finish_reason": "forced" if it["fired"] else "stop",
                    **({"answer_closed": a["closed"], "answer_finish_reason": a["finish_reason"]} if a else {}),
                    **({"grader_verdicts": gr.verdicts} if gr.verdicts else {}),
                    "token_ids": it["ids"],
                }
            )
        out[b] = (rows, {"forcing_pass": {"wall_s": wall, "size": len(fired), "budgets": list(routes)}})
    return out


class _Engines:
    """One vLLM engine at a time. With the adapter merged (CPU default), the base model
    and the merged model are two engines used one after the other; otherwise a single
    engine serves both, the adapter attached per request."""

    def __init__(self, cfg: EvalConfig, adapter_meta: dict | None) -> None:
        from tokenskip.engine import on_gpu

        self.cfg, self.meta = cfg, adapter_meta
        self.merge = bool(cfg.adapter) and (
            cfg.merge_adapter == "true" or (cfg.merge_adapter == "auto" and not on_gpu())
        )
        self.key: str | None = None
        self.llm: Any = None
        self.lora: Any = None
        self.start_s = 0.0

    def get(self, uses_adapter: bool) -> tuple[Any, Any]:
        from tokenskip.engine import build_llm, lora_request, merged_model_dir
        from tokenskip.prompt import render_prompt

        cfg = self.cfg
        key = "merged" if (self.merge and uses_adapter) else "base"
        if self.llm is None or key != self.key:
            self.close()
            t0 = time.perf_counter()
            if key == "merged":
                model = merged_model_dir(cfg.model, os.path.abspath(cfg.adapter))
                log.info(
                    "adapter merged into %s (vLLM-CPU LoRA kernels are slow; merge_adapter=false to keep LoRA)", model
                )
                self.llm = build_llm(model, cfg.engine_kwargs, seed=cfg.seed)
            else:
                lora = cfg.adapter is not None and not self.merge
                self.llm = build_llm(
                    cfg.model,
                    cfg.engine_kwargs,
                    enable_lora=lora,
                    max_lora_rank=_max_lora_rank(self.meta),
                    seed=cfg.seed,
                )
                self.lora = lora_request(os.path.abspath(cfg.adapter), "tokenskip", 1) if lora else None
            self.key = key
            # Warm-up (graph capture, first LoRA load) so the first timed request is not penalised.
            warm = render_prompt(self.llm.get_tokenizer(), "What is 1 + 1?")
            _generate(self.llm, [warm], 4, cfg.seed, None)
            if self.lora is not None:
                _generate(self.llm, [warm], 4, cfg.seed, self.lora)
            self.start_s += time.perf_counter() - t0
            log.info("engine (%s) ready in %.1f s", key, time.perf_counter() - t0)
        return self.llm, (self.lora if (uses_adapter and key == "base") else None)

    def close(self) -> None:
        if self.llm is not None:
            import gc

            from tokenskip.engine import close_llm

            close_llm(self.llm)
            self.llm = None
            gc.collect()


def _run_hard_budgets_base(
    cfg: EvalConfig, name: str, samples: dict[str, list[dict]], by_id: dict[str, dict], engines: _Engines, kind: str
) -> dict[int, tuple[list[dict], dict]]:
    """The base model (plain prompt) at every hard budget, from the original's greedy outputs."""
    t0 = time.perf_counter()
    budget = by_id["original"]["max_new_tokens"]
    routes = {b: {"ratio": None, "source": ("original", samples["original"], budget)} for b in cfg.hard_budgets}

    def compute() -> dict[int, tuple[list[dict], dict]]:
        res = _hard_budget("base", routes, engines, cfg, kind)
        log.info("[%s] hard budgets %s, base model: %.1f s", name, cfg.hard_budgets, time.perf_counter() - t0)
        return res

    return _cached_hard_budgets(cfg, name, "base", routes, compute)


def _run_hard_budgets_tokenskip(
    cfg: EvalConfig, name: str, samples: dict[str, list[dict]], by_id: dict[str, dict], engines: _Engines, kind: str
) -> dict[int, tuple[list[dict], dict]]:
    """TokenSkip at every hard budget, each routed to the largest γ whose measured CoT fits it."""
    t0 = time.perf_counter()
    ts_rows = [r for r in by_id.values() if r["method"] == "tokenskip"]
    routes = {}
    for b in cfg.hard_budgets:
        rt = evaluation.route_budget(ts_rows, b)
        cid = evaluation.condition_id("tokenskip", rt["ratio"])
        routes[b] = {**rt, "source": (cid, samples[cid], by_id[cid]["max_new_tokens"])}

    def compute() -> dict[int, tuple[list[dict], dict]]:
        res = _hard_budget("tokenskip", routes, engines, cfg, kind)
        log.info(
            "[%s] hard budgets %s, TokenSkip routed to γ %s: %.1f s",
            name,
            cfg.hard_budgets,
            [routes[b]["ratio"] for b in cfg.hard_budgets],
            time.perf_counter() - t0,
        )
        for b in res:  # the route's figures go with the entry
            res[b][1].update({k: routes[b][k] for k in ("ratio", "expected_cot_tokens", "fits")})
        return res

    return _cached_hard_budgets(cfg, name, "tokenskip", routes, compute)


def _hard_budget_file(cfg: EvalConfig, name: str, b: int, model: str) -> Path:
    return Path(cfg.output_dir) / "samples" / name / f"hard_budget-{b}-{model}.jsonl"


def _hard_budget_key(cfg: EvalConfig, model: str, routes: dict[int, dict]) -> dict:
    return {
        "model": model,
        "force_answer_tokens": cfg.force_answer_tokens,
        "routes": [
            [b, rt.get("ratio"), rt["source"][0], rt["source"][2], _outputs_sha(rt["source"][1])]
            for b, rt in routes.items()
        ],
    }


def _cached_hard_budgets(
    cfg: EvalConfig,
    name: str,
    model: str,
    routes: dict[int, dict],
    compute: Callable[[], dict[int, tuple[list[dict], dict]]],
) -> dict[int, tuple[list[dict], dict]]:
    """One model's hard-budget cells: saved by an earlier run of this directory from the same
    sources (a restart does not cap and force them again), else ``compute()``d and saved, each
    cell's samples first, then the meta that lets a restarted run reuse them."""
    files = [_hard_budget_file(cfg, name, b, model) for b in routes]
    meta_file = Path(cfg.output_dir) / "samples" / name / f"hard_budget-{model}.meta.json"
    key = _hard_budget_key(cfg, model, routes)
    saved = _saved_derived(meta_file, key, files)
    if saved is not None:
        meta, rows = saved
        log.info("[%s] hard budgets %s, %s: saved by an earlier run, reused", name, list(routes), model)
        return {b: (r, meta["info"][str(b)]) for b, r in zip(routes, rows)}
    res = compute()
    for b, (rows, _) in res.items():
        artifacts.write_rows(_hard_budget_file(cfg, name, b, model), rows, "jsonl")
    artifacts.atomic_write_json(meta_file, {"key": key, "info": {str(b): info for b, (_, info) in res.items()}})
    return res


def _hard_budget_entries(cfg: EvalConfig, name: str, hard: dict) -> list[dict]:
    """Each (budget, model) cell's figures in results.json's order (per B: TokenSkip, then the
    base model); its samples were written by :func:`_cached_hard_budgets`."""
    entries = []
    for b in cfg.hard_budgets:
        for model in ("tokenskip", "base"):
            rows, info = hard[model][b]
            rel = f"samples/{name}/hard_budget-{b}-{model}.jsonl"
            entry = {
                "budget": b,
                "model": model,
                "ratio": info.get("ratio"),
                "fits": info.get("fits"),
                "expected_cot_tokens": info.get("expected_cot_tokens"),
                "source_condition": rows[0]["source_condition"] if rows else None,
                "capped_from": rows[0]["capped_from"] if rows else None,
                **evaluation.summarize_hard_budget(rows, b),
                "forcing_pass": info["forcing_pass"],  # this model's one forcing call, every budget's answers
                "samples_file": rel,
            }
            entries.append(entry)
    return entries


def evaluate_body(cfg: EvalConfig) -> dict:
    """Generate, grade and write everything; returns the manifest. Runs where it is called."""
    from tokenskip import grading as _grading
    from tokenskip.prompt import BASELINE_PROMPTS, render_prompt

    t_start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter_meta = check_adapter(cfg.adapter) if cfg.adapter else None
    datasets = _load_datasets(cfg)
    conditions = evaluation.plan_conditions(
        cfg.ratios, cfg.baselines, BASELINE_PROMPTS, need_original=bool(cfg.hard_budgets)
    )
    gen_conds = [c for c in conditions if c.method not in evaluation.DERIVED]
    total = len(gen_conds) * sum(len(d["rows"]) for d in datasets)
    log.info(
        "evaluate %s%s on %s: %d conditions, %d generations",
        cfg.model,
        f" + {cfg.adapter}" if cfg.adapter else "",
        ", ".join(f"{d['name']}({len(d['rows'])})" for d in datasets),
        len(conditions),
        total,
    )

    engines = _Engines(cfg, adapter_meta)
    llm, _ = engines.get(False)
    tokenizer = llm.get_tokenizer()
    results: dict[str, Any] = {
        "model": cfg.model,
        "adapter": cfg.adapter,
        "ratios": list(cfg.ratios),
        "split": cfg.split,
        "baselines": list(cfg.baselines),
        "budget_scales_with_ratio": cfg.budget_scales_with_ratio,
        "force_answer_tokens": cfg.force_answer_tokens,
        "hard_budgets": list(cfg.hard_budgets),
        "engine_start_s": engines.start_s,
        "adapter_merged": engines.merge,
        "datasets": {},
    }
    done = 0
    for ds in datasets:
        name, kind, rows, max_len = ds["name"], ds["kind"], ds["rows"], ds["max_new_tokens"]
        n_lat = min(cfg.latency_samples, len(rows))
        samples: dict[str, list[dict]] = {}
        cond_rows: list[dict] = []
        cache: dict[tuple, tuple[str, list[dict], list[float], dict]] = {}
        # base-model conditions first (the derived ones need the original, budget forcing and the
        # base model's hard budgets its engine), then the adapter's: one engine switch at most
        order = sorted(conditions, key=lambda c: (c.uses_adapter, c.method in evaluation.DERIVED))
        by_id: dict[str, dict] = {}
        hard: dict[str, dict[int, tuple[list[dict], dict]]] = {}
        extra_fields: dict[str, dict] = {}
        for cond in order:
            if cfg.hard_budgets and "base" not in hard and cond.uses_adapter:
                hard["base"] = _run_hard_budgets_base(cfg, name, samples, by_id, engines, kind)
            if cond.method == "truncation":
                s = _truncate(cond, samples["original"], tokenizer, kind, cfg.grader)
                lat, thr, reused = [], None, None
            elif cond.method == "budget_forcing":
                reused = None
                extra_fields[cond.id] = {"force_answer_tokens": cfg.force_answer_tokens}
                bf_key = {
                    "ratio": cond.ratio,
                    "force_answer_tokens": cfg.force_answer_tokens,
                    "latency_samples": n_lat,
                    "source": _outputs_sha(samples["original"]),
                }
                bf_file = out / "samples" / name / f"{cond.id}.jsonl"
                saved_bf = _saved_derived(_meta_path(out, name, cond.id), bf_key, [bf_file])
                if saved_bf is not None:  # a restarted run: forced before from the same outputs
                    (bf_meta, (s,)) = saved_bf
                    lat, thr = list(bf_meta["latency_each_s"]), bf_meta["throughput"]
                    log.info("[%s] %s: forced answers saved by an earlier run reused", name, cond.id)
                else:
                    llm, _ = engines.get(False)
                    t0 = time.perf_counter()
                    s, lat, thr = _budget_force(
                        cond,
                        samples["original"],
                        by_id["original"]["latency_each_s"],
                        llm,
                        cfg,
                        kind,
                        n_lat,
                        f"[{name}] {cond.id}",
                    )
                    log.info(
                        "[%s] %s: answers forced after the cut CoT for %d questions in %.1f s",
                        name,
                        cond.id,
                        len(s),
                        time.perf_counter() - t0,
                    )
            else:
                extra = BASELINE_PROMPTS[cond.prompt_name] if cond.method == "prompt" else None
                ratio = cond.ratio if cond.method == "tokenskip" else None
                prompts = [render_prompt(tokenizer, r["question"], ratio, extra) for r in rows]
                budget = (
                    evaluation.scaled_budget(max_len, cond.ratio)
                    if (cfg.budget_scales_with_ratio and cond.method == "tokenskip")
                    else max_len
                )
                # (prompts, engine, LoRA attached, budget): what engines.get(cond.uses_adapter) would give
                key = (
                    tuple(prompts),
                    "merged" if (engines.merge and cond.uses_adapter) else "base",
                    bool(cfg.adapter) and cond.uses_adapter and not engines.merge,
                    budget,
                )
                saved = _saved_condition(out, name, cond.id, rows, prompts, budget)
                if saved is not None:  # a restarted run: this condition finished before
                    gens, lat, thr, reused = saved
                    cache.setdefault(key, (cond.id, gens, lat, thr))
                    done += len(rows)
                    log.info(
                        "[%s] %s: samples saved by an earlier run reused; %d/%d generations", name, cond.id, done, total
                    )
                    progress.report(done, total, "generations")
                elif key in cache:  # e.g. TokenSkip γ=1.0 without an adapter is exactly the original
                    reused, gens, lat, thr = cache[key]
                    done += len(rows)
                    log.info(
                        "[%s] %s: same prompts, model and budget as %s; outputs reused; %d/%d generations",
                        name,
                        cond.id,
                        reused,
                        done,
                        total,
                    )
                    progress.report(done, total, "generations")
                else:
                    reused = None
                    llm, req = engines.get(cond.uses_adapter)
                    t0 = time.perf_counter()
                    gens = _generate(llm, prompts, budget, cfg.seed, req)
                    wall = time.perf_counter() - t0
                    n_tok = sum(len(g["token_ids"]) for g in gens)
                    thr = {
                        "wall_s": wall,
                        "output_tokens": n_tok,
                        "tokens_per_s": n_tok / wall if wall else None,
                        "samples_per_s": len(gens) / wall if wall else None,
                        "batch_size": len(gens),
                    }
                    done += len(rows)
                    log.info(
                        "[%s] %s: %d questions in %.1f s (%.0f tok/s); %d/%d generations, %.0f s elapsed",
                        name,
                        cond.id,
                        len(rows),
                        wall,
                        thr["tokens_per_s"] or 0,
                        done,
                        total,
                        time.perf_counter() - t_start,
                    )
                    progress.report(done, total, "generations")
                    lat = _time_single(llm, prompts[:n_lat], budget, cfg.seed, req, f"[{name}] {cond.id}")
                    cache[key] = (cond.id, gens, lat, thr)
                s = _sample_rows(cond, rows, prompts, gens, kind, cfg.grader)
            if cond.method != "budget_forcing":  # budget forcing's CoT tokens are the kept tokens
                _add_cot_tokens(s, tokenizer)
            samples[cond.id] = s
            artifacts.write_rows(out / "samples" / name / f"{cond.id}.jsonl", s, "jsonl")
            if cond.method not in evaluation.DERIVED:
                _save_condition_meta(out, name, cond.id, rows, prompts, budget, lat, thr, reused)
            elif cond.method == "budget_forcing":  # after its samples: a restarted run reuses them
                artifacts.atomic_write_json(
                    _meta_path(out, name, cond.id), {"key": bf_key, "latency_each_s": lat, "throughput": thr}
                )
            fig = evaluation.summarize(s)
            by_id[cond.id] = {
                "id": cond.id,
                "method": cond.method,
                "label": cond.label(adapter=cfg.adapter is not None),
                "ratio": cond.ratio,
                "prompt_name": cond.prompt_name,
                **fig,
                "latency_s": evaluation.mean_or_none(lat),
                "latency_samples": len(lat),
                "latency_each_s": lat,
                "throughput": thr,
                "reused_from": reused,
                "max_new_tokens": None if cond.method in evaluation.DERIVED else budget,
                "samples_file": f"samples/{name}/{cond.id}.jsonl",
                **extra_fields.get(cond.id, {}),
                **_grading.disagreements(s),
            }  # grader: both
        cond_rows = [by_id[c.id] for c in conditions]
        if "original" not in cfg.baselines:  # it ran only as the source of the derived rows
            used_by = [
                what
                for what, on in (
                    ("truncation", "truncation" in cfg.baselines),
                    ("budget forcing", "budget_forcing" in cfg.baselines),
                    ("hard budgets", bool(cfg.hard_budgets)),
                )
                if on
            ]
            for r in cond_rows:
                if r["id"] == "original":
                    r["label"] = f"Original ({' / '.join(used_by)} source)"
        evaluation.attach_actual_ratios(cond_rows, samples)
        results["datasets"][name] = {
            "kind": kind,
            "split": cfg.split,
            "n": len(rows),
            "max_new_tokens": max_len,
            "latency_samples": n_lat,
            "conditions": cond_rows,
        }
        if cfg.hard_budgets:
            if "base" not in hard:
                hard["base"] = _run_hard_budgets_base(cfg, name, samples, by_id, engines, kind)
            hard["tokenskip"] = _run_hard_budgets_tokenskip(cfg, name, samples, by_id, engines, kind)
            results["datasets"][name]["hard_budget"] = _hard_budget_entries(cfg, name, hard)

    results["wall_s"] = time.perf_counter() - t_start
    results["engine_start_s"] = engines.start_s
    artifacts.atomic_write_json(out / RESULTS, results)
    if cfg.adapter:  # the adapter's card gets what was measured per γ (or a copy beside results.json)
        card.record_evaluation(cfg.adapter, results, os.path.abspath(out / RESULTS), out)
    artifacts.atomic_write_text(out / TABLE, evaluation.render_markdown(results))
    from tokenskip import plots

    plots.accuracy_vs_tokens(results, out / PLOTS[0])
    plots.ratio_adherence(results, out / PLOTS[1])
    from tokenskip import tracking

    tracking.log_evaluation(cfg, results, out, (TABLE, *PLOTS))  # MLflow (tracking: none turns it off)
    engines.close()
    counts = {
        f"{name}/{r['id']}": {"n": r["n"], "correct": r["correct"]}
        for name, ds in results["datasets"].items()
        for r in ds["conditions"]
    }
    log.info("evaluation finished in %.1f s -> %s", results["wall_s"], out)
    return artifacts.write_manifest(
        out,
        "evaluate",
        cfg,
        inputs={"model": cfg.model, "adapter": cfg.adapter, "datasets": cfg.datasets},
        counts=counts,
        outputs=[RESULTS, TABLE, *PLOTS, "samples/"],
        wall_s=results["wall_s"],
        pid=os.getpid(),
    )


__all__ = ["EvalInputError", "check_adapter", "check_dataset", "evaluate_body", "run_evaluate", "validate"]
