"""LLMLingua-2 scorer: a Hugging Face token classifier, keep probability = softmax[..., 1].

Any token-classification checkpoint works (``microsoft/llmlingua-2-xlm-roberta-large-meetingbank``,
``microsoft/llmlingua-2-bert-base-multilingual-cased-meetingbank``, or a local one).
Chunks of all texts go through the model together, sorted by length and padded to the
longest in each batch (llmlingua pads every chunk to 512 and runs one text at a time).

``reference_quirks=True`` (default) reproduces ``llmlingua==0.2.2`` output exactly:

* the text is tokenized, cut into windows, each window turned back into a string with
  ``convert_tokens_to_string`` and tokenized again (so the model sees what llmlingua's
  ``TokenClfDataset`` feeds it, truncated to 512 with [CLS]/[SEP]);
* 100 ``[NEWi]`` special tokens are added and the embeddings resized under seed 42,
  as ``init_llmlingua2`` does; a force token the tokenizer splits is replaced by one of
  them before scoring;
* the output is the tokenizer's ``convert_tokens_to_string`` of the kept words.

``reference_quirks=False`` scores the original token ids once (no round trip), keeps
unknown-token words, matches force tokens on the original text (case-sensitive even
with an uncased model) and joins kept words by their original character offsets, so
case, spacing (``48/2`` rather than ``48 / 2``) and line breaks survive.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from tokenskip.pruning.scorers import ScoredChunk, ScoredText, batched_scores, chunk_bounds, resolve_device

log = logging.getLogger("tokenskip.pruning")

DEFAULT_CHECKPOINT = "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"
SMALL_CHECKPOINT = "microsoft/llmlingua-2-bert-base-multilingual-cased-meetingbank"


def tokenizer_family(tokenizer) -> str:
    """wordpiece (BERT), sentencepiece (XLM-R / ``▁`` pieces) or text (byte-level BPE)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = type(getattr(backend, "model", None)).__name__ if backend is not None else ""
    if model == "WordPiece":
        return "wordpiece"
    if model == "Unigram":
        return "sentencepiece"
    probe = tokenizer.tokenize("hello world")
    if any(t.startswith("##") for t in tokenizer.tokenize("unbelievably")):
        return "wordpiece"
    if any(t.startswith("▁") for t in probe):
        return "sentencepiece"
    return "text"


class LLMLingua2Scorer:
    """Token-classifier scorer (LLMLingua-2)."""

    def __init__(
        self,
        model: str = DEFAULT_CHECKPOINT,
        device: str = "auto",
        batch_size: int = 16,
        reference_quirks: bool = True,
        max_seq_len: int = 512,
        chunk_end_tokens: Sequence[str] = (".", "\n"),
        dtype: str | None = None,
        max_force_token: int = 100,
        max_batch_tokens: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        from tokenskip import assets

        path = assets.resolve_model(model)
        self.model_name = model
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.reference_quirks = reference_quirks
        self.max_seq_len = max_seq_len
        self.chunk_end_tokens = tuple(chunk_end_tokens)
        tok = AutoTokenizer.from_pretrained(path)
        torch_dtype = getattr(torch, dtype) if dtype else (torch.float32 if self.device == "cpu" else "auto")
        mdl = AutoModelForTokenClassification.from_pretrained(path, dtype=torch_dtype)
        self.family = tokenizer_family(tok)
        # llmlingua's special-token set (it drops these when merging words) plus padding.
        self.special = {
            v for k, v in tok.special_tokens_map.items() if k != "additional_special_tokens" and isinstance(v, str)
        }
        self.cls = tok.cls_token or tok.bos_token
        self.sep = tok.sep_token or tok.eos_token
        self.pad = tok.pad_token
        self.special |= {t for t in (self.cls, self.sep, self.pad) if t}
        self.added_tokens: list[str] = []
        if reference_quirks:
            # init_llmlingua2: seed_everything(42), add [NEWi], resize embeddings.
            torch.manual_seed(42)
            self.added_tokens = [f"[NEW{i}]" for i in range(max_force_token)]
            tok.add_special_tokens({"additional_special_tokens": self.added_tokens})
            mdl.resize_token_embeddings(len(tok))
        self.tokenizer = tok
        self.model = mdl.to(self.device).eval()
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.use_spans = not reference_quirks
        self.detok = tok.convert_tokens_to_string if reference_quirks else None

    # ------------------------------------------------------------------ scoring

    def token_map(self, force_tokens: Sequence[str]) -> dict[str, str]:
        """Force tokens the tokenizer splits -> an added single token (llmlingua's token_map)."""
        if not self.reference_quirks:
            return {}
        if len(force_tokens) > len(self.added_tokens):
            raise ValueError(f"at most {len(self.added_tokens)} force tokens, got {len(force_tokens)}")
        return {t: self.added_tokens[i] for i, t in enumerate(force_tokens) if len(self.tokenizer.tokenize(t)) != 1}

    def score(self, texts: Sequence[str], force_tokens: Sequence[str] = ()) -> list[ScoredText]:
        tok = self.tokenizer
        tmap = self.token_map(force_tokens)
        ends = set(self.chunk_end_tokens) | {tmap[c] for c in self.chunk_end_tokens if c in tmap}
        src = []
        for t in texts:
            for ori, new in tmap.items():
                t = t.replace(ori, new)
            src.append(t)
        out = [ScoredText(text=t, token_map=tmap) for t in texts]
        # (text index, token strings, ids, offsets, chunk text)
        chunks: list[tuple[int, list[str], list[int], np.ndarray | None, str]] = []
        if self.reference_quirks:
            enc = tok(src, add_special_tokens=False) if src else None
            pieces: list[tuple[int, str]] = []
            for i in range(len(src)):
                toks = enc.tokens(i)
                for a, b in chunk_bounds([x in ends for x in toks], self.max_seq_len - 2):
                    pieces.append((i, tok.convert_tokens_to_string(toks[a:b])))
            if pieces:
                enc2 = tok([p for _, p in pieces], add_special_tokens=False)
                for k, (i, ctext) in enumerate(pieces):
                    toks = [self.cls] + enc2.tokens(k) + [self.sep]
                    ids = (
                        [tok.convert_tokens_to_ids(self.cls)]
                        + enc2["input_ids"][k]
                        + [tok.convert_tokens_to_ids(self.sep)]
                    )
                    chunks.append((i, toks[: self.max_seq_len], ids[: self.max_seq_len], None, ctext))
        else:
            enc = tok(list(texts), add_special_tokens=False, return_offsets_mapping=True) if texts else None
            cls_id, sep_id = tok.convert_tokens_to_ids(self.cls), tok.convert_tokens_to_ids(self.sep)
            for i, t in enumerate(texts):
                toks, ids = enc.tokens(i), enc["input_ids"][i]
                offs = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
                for a, b in chunk_bounds([x in ends for x in toks], self.max_seq_len - 3):
                    body = t[offs[a, 0] : offs[b - 1, 1]]
                    chunks.append(
                        (
                            i,
                            [self.cls] + toks[a:b] + [self.sep],
                            [cls_id] + ids[a:b] + [sep_id],
                            np.concatenate([[[0, 0]], offs[a:b], [[0, 0]]]),
                            body,
                        )
                    )
        probs = self._forward([c[2] for c in chunks])
        # llmlingua drops [UNK] words too; without quirks they are kept (spelled from the text).
        drop = self.special if self.reference_quirks else {t for t in (self.cls, self.sep, self.pad) if t}
        for (i, toks, _, offs, ctext), p in zip(chunks, probs):
            keep = [k for k, x in enumerate(toks) if x not in drop]
            out[i].chunks.append(
                ScoredChunk(
                    tokens=[toks[k] for k in keep],
                    probs=p[keep],
                    offsets=offs[keep] if offs is not None else None,
                    text=ctext,
                )
            )
        return out

    def _forward(self, seqs: list[list[int]]) -> list[np.ndarray]:
        import torch

        def keep_prob(ids, mask):
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            return torch.softmax(logits, dim=-1)[..., 1].float().cpu().numpy()

        return batched_scores(seqs, self.batch_size, self.max_batch_tokens, self.pad_id, self.device, keep_prob)
