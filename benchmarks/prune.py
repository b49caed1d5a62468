"""Pruning speed: the reference call pattern vs score-once vs the forward-pass floor.

    flock /tmp/tokenskip-heavy.lock python benchmarks/prune.py --n 200 --ratios 0.9 0.8 0.7 0.6 0.5

In one process, on the same model and the same GSM8K gold CoTs:
  (a) reference: llmlingua 0.2.2 ``compress_prompt(cot, rate=γ)`` per CoT per ratio
      (compressor built once; the TokenSkip script even rebuilds it per ratio);
  (b) ours: ``prune_texts`` - one length-sorted batched scoring pass, every ratio cut
      from the same probabilities;
  (c) floor: one forward pass of the classifier over all CoTs, length-sorted batches,
      padded to the longest in each batch (what any score-once design must pay).
Model loading is outside every timing. Default model: the MiniLM encoder with a seeded
2-label head saved as ``minilm-as-bert-base-multilingual-cased`` (llmlingua checks the name).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="number of GSM8K train CoTs")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    p.add_argument("--model", default=None, help="token-classifier dir whose path contains bert-base-multilingual-cased or xlm-roberta-large")
    p.add_argument("--batch-size", type=int, default=16, help="chunks per forward pass for (b) and (c)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--force", action="store_true", help="LLaMA settings: force_tokens Step/:, digits, drop_consecutive")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)

    import torch

    from tokenskip import assets
    from tokenskip.data import load_questions
    from tokenskip.pruning import check_ratios, load_scorer, prune_texts
    from tokenskip.testing import build_tiny_bert_classifier

    ratios = check_ratios(args.ratios)
    assets.ensure_tiktoken()
    model = args.model or str(build_tiny_bert_classifier(assets.tokenskip_home() / "test-fixtures" / "minilm-as-bert-base-multilingual-cased", from_minilm=True))
    cots = [r["solution"] for r in load_questions("gsm8k", "train").rows[: args.n]]
    kw = dict(force_tokens=["Step", ":"], force_reserve_digit=True, drop_consecutive=True) if args.force else {}
    print(f"model {model}\n{len(cots)} CoTs x {len(ratios)} ratios, torch threads {torch.get_num_threads()}", flush=True)

    scorer = load_scorer("llmlingua2", model, device="cpu", batch_size=args.batch_size)
    prune_texts(cots[:4], ratios, scorer, **kw)  # warm-up (tiktoken, allocator)

    # (c) floor: one batched forward pass over every CoT (length-sorted, padded per batch)
    tok = scorer.tokenizer
    seqs = [[tok.cls_token_id] + ids[:510] + [tok.sep_token_id] for ids in tok(cots, add_special_tokens=False)["input_ids"]]
    t = time.perf_counter()
    scorer._forward(seqs)
    floor = time.perf_counter() - t

    # (b) ours
    t = time.perf_counter()
    mine = prune_texts(cots, ratios, scorer, **kw)
    ours = time.perf_counter() - t

    res = {"n": len(cots), "ratios": ratios, "model": model, "floor_s": round(floor, 3), "ours_s": round(ours, 3)}
    if not args.skip_reference:
        from llmlingua import PromptCompressor

        pc = PromptCompressor(model, device_map="cpu", use_llmlingua2=True)
        t = time.perf_counter()
        same = 0
        for r in ratios:
            for i, c in enumerate(cots):
                same += pc.compress_prompt(c, rate=r, **kw)["compressed_prompt"] == mine[i][r]
        ref = time.perf_counter() - t
        res.update(reference_s=round(ref, 3), reference_ms_per_call=round(1000 * ref / (len(cots) * len(ratios)), 1),
                   speedup=round(ref / ours, 1), identical=f"{same}/{len(cots) * len(ratios)}")
    res["ours_over_floor"] = round(ours / floor, 2)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
