"""Self-information scorer (Selective Context / LLMLingua-1 style) on any causal LM.

Importance of token t = −log p(t | prefix). The pruner wants a keep-probability-like
score in [0, 1] (higher = keep), so the score is ``1 − p(t | prefix) = 1 − exp(−I)``:
monotone in the self-information, 1.0 for a token the model could not predict, 0 for
one it was certain of. Works with the embedded SmolLM2 (``smollm2-135m-instruct``),
so the offline default prunes without any LLMLingua-2 checkpoint.

Tokens are handed to the pruner as their text pieces (family ``text``) with character
offsets, so words are split at whitespace/punctuation whatever the tokenizer (byte-level
BPE included) and the pruned text is cut from the original.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tokenskip.pruning.scorers import ScoredChunk, ScoredText, batched_scores, chunk_bounds, resolve_device


class SelfInfoScorer:
    family = "text"
    use_spans = True
    detok = None

    def __init__(self, model: str = "smollm2-135m-instruct", device: str = "auto", batch_size: int = 8,
                 max_seq_len: int = 1024, max_batch_tokens: int = 4096, dtype: str | None = None,
                 chunk_end_tokens: Sequence[str] = (".", "\n")) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tokenskip import assets

        path = assets.resolve_model(model)
        self.model_name = model
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        self.max_batch_tokens = max_batch_tokens
        self.chunk_end_tokens = tuple(chunk_end_tokens)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        torch_dtype = getattr(torch, dtype) if dtype else (torch.float32 if self.device == "cpu" else torch.bfloat16)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(self.device).eval()
        tok = self.tokenizer
        self.bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (self.bos_id or 0)

    def score(self, texts: Sequence[str], force_tokens: Sequence[str] = ()) -> list[ScoredText]:
        out = [ScoredText(text=t) for t in texts]
        if not texts:
            return out
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        chunks = []
        for i, t in enumerate(texts):
            ids = enc["input_ids"][i]
            offs = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
            pieces = [t[a:b] for a, b in offs]
            ends = [p.rstrip(" ").endswith(self.chunk_end_tokens) for p in pieces]
            for a, b in chunk_bounds(ends, self.max_seq_len - 2):
                chunks.append((i, pieces[a:b], ids[a:b], offs[a:b]))
        seqs = [[self.bos_id] + c[2] for c in chunks]
        probs = self._forward(seqs)
        for (i, pieces, _, offs), p in zip(chunks, probs):
            t = texts[i]
            out[i].chunks.append(ScoredChunk(tokens=pieces, probs=p, offsets=offs, text=t[offs[0, 0]:offs[-1, 1]]))
        return out

    def _forward(self, seqs: list[list[int]]) -> list[np.ndarray]:
        def keep_prob(ids, mask):  # 1 - p(token | prefix); the first token has no prefix
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
            return (1.0 - logp.exp()).clamp_(0.0, 1.0).cpu().numpy().astype(np.float32)

        return batched_scores(seqs, self.batch_size, self.max_batch_tokens, self.pad_id, self.device, keep_prob, trim=1)
