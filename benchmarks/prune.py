"""Pruning speed per CoT length: the reference call pattern vs score-once vs the forward-pass floor.

    flock /tmp/coord/heavy.lock python benchmarks/prune.py --json benchmarks/results/prune_buckets_cpu.json

Length buckets (lengths in the classifier's tokens):
  gsm8k_gold   GSM8K train gold solutions (~60 tokens);
  gsm8k_300    model-length GSM8K CoTs (~300 tokens): consecutive gold solutions joined by a
               line break until >= 300 tokens (synthesised: a fresh clone has no model CoTs;
               ``--cots FILE`` with a ``cot`` field, e.g. a generate stage's output, replaces them);
  math         MATH train solutions of <= 512 tokens (one classifier window);
  math_long    MATH train solutions of > 512 tokens (two or more windows).
Per bucket, in one process, on the same model and texts:
  (a) reference: llmlingua 0.2.2 ``compress_prompt(cot, rate=γ)`` per CoT per ratio (compressor
      built once) - LLMLingua-2 scorer only;
  (b) ours: ``prune_texts`` - one length-sorted batched scoring pass, every ratio cut from it;
  (c) floor: one batched forward pass over exactly the chunks (b) scored, same batches;
and where (b)'s time goes: the forward pass, tokenisation + chunking (the rest of ``score``),
word merge (sub-tokens to words, cl100k word weights), the cut (percentile, or the budget cut's
ranking), target-token counting (budget cut only), detokenisation / join, other.
The self-information scorer (SmolLM2, the prune stage's default, with the stage's default cut:
budget + number protection) gets the same table without (a): it has no reference implementation.
Model loading is outside every timing. Default classifier: the MiniLM encoder with a seeded
2-label head saved as ``minilm-as-bert-base-multilingual-cased`` (llmlingua checks the name).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUCKETS = ("gsm8k_gold", "gsm8k_300", "math", "math_long")
PHASES = ("forward", "tokenise+chunk", "word merge", "cut", "count target tokens", "detokenise/join", "other")


class Profile:
    """Exclusive wall time per phase of wrapped functions (a nested wrapped call is charged to its own phase)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = defaultdict(float)
        self._stack: list[float] = []
        self._undo: list = []

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            self._stack.append(0.0)
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                child = self._stack.pop()
                self.t[name] += dt - child
                if self._stack:
                    self._stack[-1] += dt

        return timed

    def patch(self, obj, attr: str, name: str, classmethod_: bool = False) -> None:
        if not hasattr(obj, attr):
            return
        orig = obj.__dict__.get(attr) if isinstance(obj, type) else getattr(obj, attr)
        fn = getattr(obj, attr)
        setattr(obj, attr, classmethod(self.wrap(name, fn.__func__)) if classmethod_ else self.wrap(name, fn))
        self._undo.append((obj, attr, orig))

    def restore(self) -> None:
        for obj, attr, orig in reversed(self._undo):
            setattr(obj, attr, orig)
        self._undo.clear()


def instrument(prof: Profile, scorer) -> None:
    import tokenskip.pruning as tp
    from tokenskip.pruning import pruner

    prof.patch(scorer, "score", "tokenise+chunk")
    prof.patch(scorer, "_forward", "forward")
    prof.patch(tp, "merge_words", "word merge")
    prof.patch(pruner.ChunkWords, "from_words", "word merge", classmethod_=True)
    prof.patch(pruner, "keep_masks", "cut")
    prof.patch(tp, "budget_masks", "cut")
    prof.patch(tp, "word_tiers", "cut")
    prof.patch(tp, "prune_chunks", "detokenise/join")
    prof.patch(tp, "join_offsets", "detokenise/join")
    prof.patch(pruner, "join_offsets", "detokenise/join")
    prof.patch(tp, "offset_pieces", "detokenise/join")
    prof.patch(pruner, "offset_pieces", "detokenise/join")


def buckets(n: dict[str, int], tok, cots_file: str | None) -> dict[str, list[str]]:
    from tokenskip.data import load_questions

    def ntok(texts):
        return [len(x) for x in tok(list(texts), add_special_tokens=False)["input_ids"]]

    gold = [r["solution"] for r in load_questions("gsm8k", "train").rows]
    out = {"gsm8k_gold": gold[: n["gsm8k_gold"]]}
    if cots_file:
        from tokenskip import artifacts

        out["gsm8k_300"] = [r["cot"] for r in artifacts.read_rows(cots_file) if r.get("cot")][: n["gsm8k_300"]]
    else:
        joined, cur, pool = [], [], iter(gold[1000:])
        while len(joined) < n["gsm8k_300"]:
            cur.append(next(pool))
            if ntok(["\n".join(cur)])[0] >= 300:
                joined.append("\n".join(cur))
                cur = []
        out["gsm8k_300"] = joined
    math = [r["solution"] for r in load_questions("math", "train", lenient=True).rows]
    lens = ntok(math)
    out["math"] = [t for t, k in zip(math, lens) if k <= 512][: n["math"]]
    out["math_long"] = [t for t, k in zip(math, lens) if k > 512][: n["math_long"]]
    return out


def measure(scorer, texts: list[str], ratios: list[float], repeat: int, **kw) -> dict:
    """(b) with its breakdown and (c) on the chunks (b) scored, interleaved; best of ``repeat`` each."""
    from tokenskip.pruning import prune_texts

    best, result, seqs, floor = None, None, [], None
    for _ in range(repeat):
        prof = Profile()
        instrument(prof, scorer)
        fwd = scorer._forward

        def recording(s, _fwd=fwd):
            seqs.append(s)
            return _fwd(s)

        scorer._forward = recording
        seqs.clear()
        run_kw = dict(kw)
        if kw.get("count_text") is not None:
            run_kw["count_text"] = prof.wrap("count target tokens", kw["count_text"])
        t = time.perf_counter()
        try:
            out = prune_texts(texts, ratios, scorer, **run_kw)
        finally:
            total = time.perf_counter() - t
            prof.restore()
            for attr in ("score", "_forward"):  # the instance attributes go, the class methods show again
                scorer.__dict__.pop(attr, None)
        if best is None or total < best[0]:
            best, result = (total, dict(prof.t)), out
        chunks = [s for batch in seqs for s in batch]
        t = time.perf_counter()
        scorer._forward(chunks)
        floor = min(floor or 1e9, time.perf_counter() - t)
    total, phases = best
    phases["other"] = total - sum(phases.values())
    # (b) runs exactly (c)'s batches inside it, so (b)/(c) is 1 + the rest of (b) over its own forward
    # pass; on a loaded machine this is steadier than dividing two separately timed runs.
    fwd = phases.get("forward", 0.0)
    return {
        "ours_s": total,
        "floor_s": floor,
        "ours_over_floor_from_phases": 1 + (total - fwd) / fwd if fwd else None,
        "phases_s": phases,
        "chunks": len(chunks),
        "mean_chunk_tokens": sum(map(len, chunks)) / max(1, len(chunks)),
        "outputs": result,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--n",
        type=int,
        nargs=4,
        default=[30, 12, 15, 6],
        metavar=("GOLD", "C300", "MATH", "LONG"),
        help="texts per bucket: gsm8k_gold gsm8k_300 math math_long",
    )
    p.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    p.add_argument(
        "--model",
        default=None,
        help="token-classifier dir whose path contains bert-base-multilingual-cased or xlm-roberta-large",
    )
    p.add_argument("--self-info-model", default="smollm2-135m-instruct")
    p.add_argument("--scorers", nargs="+", default=["llmlingua2", "self_info"], choices=["llmlingua2", "self_info"])
    p.add_argument("--buckets", nargs="+", default=list(BUCKETS), choices=BUCKETS)
    p.add_argument("--batch-size", type=int, default=16, help="chunks per forward pass for (b) and (c)")
    p.add_argument("--repeat", type=int, default=2, help="best of N for (b) and (c)")
    p.add_argument(
        "--self-info-frac", type=float, default=0.34, help="share of each bucket the self-info scorer runs on"
    )
    p.add_argument("--self-info-repeat", type=int, default=1, help="best of N for the self-info (b) and (c)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (every scorer and the reference)")
    p.add_argument("--cots", default=None, help="model CoTs (jsonl/parquet, field cot) for the gsm8k_300 bucket")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--force", action="store_true", help="LLaMA settings: force_tokens Step/:, digits, drop_consecutive")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)

    import torch

    from tokenskip import assets
    from tokenskip.pruning import TokenCounter, check_ratios, load_scorer, prune_texts
    from tokenskip.testing import build_tiny_bert_classifier

    ratios = check_ratios(args.ratios)
    if args.threads:
        torch.set_num_threads(args.threads)
    assets.ensure_tiktoken()
    model = args.model or str(
        build_tiny_bert_classifier(
            assets.tokenskip_home() / "test-fixtures" / "minilm-as-bert-base-multilingual-cased", from_minilm=True
        )
    )
    kw = dict(force_tokens=["Step", ":"], force_reserve_digit=True, drop_consecutive=True) if args.force else {}
    clf = load_scorer("llmlingua2", model, device=args.device, batch_size=args.batch_size)
    data = buckets(dict(zip(BUCKETS, args.n)), clf.tokenizer, args.cots)
    data = {b: data[b] for b in args.buckets}
    print(
        f"classifier {model}; torch threads {torch.get_num_threads()}; ratios {ratios}; "
        f"gsm8k_300 from {args.cots or 'concatenated gold solutions (synthesised)'}",
        flush=True,
    )
    res: dict = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
        "ratios": ratios,
        "model": model,
        "self_info_model": args.self_info_model,
        "repeat": args.repeat,
        "torch_threads": torch.get_num_threads(),
        "self_info_frac": args.self_info_frac,
        "gsm8k_300_source": args.cots or "synthesised: consecutive GSM8K gold solutions joined to >= 300 tokens",
        "llmlingua2": {},
        "self_info": {},
    }

    if "llmlingua2" in args.scorers:
        prune_texts(data[args.buckets[0]][:4], ratios, clf, **kw)  # warm-up (tiktoken, allocator)
        pc = None
        if not args.skip_reference:
            from llmlingua import PromptCompressor

            pc = PromptCompressor(model, device_map=args.device, use_llmlingua2=True)
        for b, texts in data.items():
            m = measure(clf, texts, ratios, args.repeat, **kw)
            row = {k: v for k, v in m.items() if k != "outputs"}
            row["n"] = len(texts)
            if pc is not None:
                t = time.perf_counter()
                same = sum(
                    pc.compress_prompt(c, rate=r, **kw)["compressed_prompt"] == m["outputs"][i][r]
                    for r in ratios
                    for i, c in enumerate(texts)
                )
                ref = time.perf_counter() - t
                row.update(reference_s=ref, speedup=ref / m["ours_s"], identical=f"{same}/{len(texts) * len(ratios)}")
            row["ours_over_floor"] = m["ours_s"] / m["floor_s"]
            res["llmlingua2"][b] = row
            print(b, json.dumps(_rounded(row)), flush=True)
        del pc

    if "self_info" in args.scorers:
        si = load_scorer("self_info", args.self_info_model, device=args.device)
        counter = TokenCounter(args.self_info_model)
        si_kw = dict(cut="budget", protect="numbers", count_text=lambda t: counter([t])[0])
        prune_texts(data[args.buckets[0]][:2], ratios, si, **si_kw)  # warm-up
        for b, texts in data.items():
            texts = texts[: max(1, round(len(texts) * args.self_info_frac))]
            m = measure(si, texts, ratios, args.self_info_repeat, **si_kw)
            row = {k: v for k, v in m.items() if k != "outputs"}
            row.update(n=len(texts), ours_over_floor=m["ours_s"] / m["floor_s"])
            res["self_info"][b] = row
            print(b, json.dumps(_rounded(row)), flush=True)

    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(_rounded(res), indent=2) + "\n")
    return 0


def _rounded(x):
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def table(res: dict) -> str:
    """Markdown tables: one per scorer, one row per bucket."""
    out = []
    for scorer, rows in (("llmlingua2", res["llmlingua2"]), ("self_info", res["self_info"])):
        if not rows:
            continue
        ref = any("reference_s" in r for r in rows.values())
        head = ["bucket", "n", "chunks x mean tokens"] + (
            ["reference s", "ours s", "speedup", "identical"] if ref else ["ours s"]
        )
        head += ["floor s", "ours/floor", "1 + rest/forward"] + [f"{p}" for p in PHASES]
        out += [f"\n{scorer}", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for b, r in rows.items():
            cells = [b, str(r["n"]), f"{r['chunks']} x {r['mean_chunk_tokens']:.0f}"]
            if ref:
                cells += [f"{r['reference_s']:.2f}", f"{r['ours_s']:.2f}", f"**{r['speedup']:.1f}x**", r["identical"]]
            else:
                cells += [f"{r['ours_s']:.2f}"]
            cells += [f"{r['floor_s']:.2f}", f"{r['ours_over_floor']:.2f}", f"{r['ours_over_floor_from_phases']:.3f}"]
            cells += [f"{r['phases_s'].get(p, 0.0):.3f}" for p in PHASES]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
