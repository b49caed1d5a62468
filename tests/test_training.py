"""Pure parts of the train stage: tokenisation + masking, collator, LoRA / DeepSpeed configs,
schedule, data checks (bad input fails before any worker starts), memory plan, shipped YAMLs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenskip import artifacts, prompt
from tokenskip.config import ConfigError, TrainConfig, load_any, load_config
from tokenskip.training import (
    IGNORE_INDEX,
    Collator,
    TrainDataError,
    build_deepspeed_config,
    build_example,
    build_lora_config,
    completion_loss_module,
    epoch_order,
    lr_factor,
    tokenize_pair,
    validate_rows,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _row(i: int, ratio: float = 0.5, cot: str = "3 + 4 = 7. Then 7 * 2 = 14.") -> dict:
    q = f"Tom has {i} apples and buys 3 more. How many?"
    return {
        "id": f"q{i}",
        "question": q,
        "gold": str(i + 3),
        "ratio": ratio,
        "user": prompt.user_content(q, ratio),
        "completion": prompt.build_target(cot, str(i + 3)),
    }


def test_tokenize_pair_masks_prompt_and_matches_chat_template(tok):
    row = _row(1, 0.6)
    ex = tokenize_pair(tok, row["user"], row["completion"], cutoff_len=1024)
    n_masked = sum(1 for x in ex["labels"] if x == IGNORE_INDEX)
    p_text, c_text = prompt.render_user_completion(tok, row["user"], row["completion"])
    # the prompt is exactly the template's generation prompt (with the γ marker), masked
    assert tok.decode(ex["input_ids"][:n_masked]) == p_text
    assert "<|eot_id|>0.6<|eot_id|>" in p_text and p_text.rstrip().endswith("assistant")
    # the supervised tokens are exactly the assistant turn, ending with the end-of-turn token
    target = [x for x in ex["labels"] if x != IGNORE_INDEX]
    assert tok.decode(target) == c_text and c_text.startswith(row["completion"])
    assert ex["labels"][n_masked:] == ex["input_ids"][n_masked:]
    full = tok.apply_chat_template(
        [{"role": "user", "content": row["user"]}, {"role": "assistant", "content": row["completion"]}], tokenize=False
    )
    assert p_text + c_text == full
    assert ex["overlong"] is False


def test_overlong_rows_truncated_or_dropped(tok):
    row = _row(2, 1.0, cot="step. " * 400)
    full = tokenize_pair(tok, row["user"], row["completion"], cutoff_len=100_000)
    n = len(full["input_ids"])
    cut = tokenize_pair(tok, row["user"], row["completion"], cutoff_len=n - 10, overlong="truncate")
    assert (
        cut["overlong"] is True and len(cut["input_ids"]) == n - 10 and cut["input_ids"] == full["input_ids"][: n - 10]
    )
    assert tokenize_pair(tok, row["user"], row["completion"], cutoff_len=n - 10, overlong="drop") is None
    assert tokenize_pair(tok, row["user"], row["completion"], cutoff_len=n, overlong="drop")["overlong"] is False
    # a cutoff inside the prompt leaves nothing to learn: dropped even in truncate mode
    assert tokenize_pair(tok, row["user"], row["completion"], cutoff_len=5, overlong="truncate") is None


def test_tokenize_rows_counts_overlong(tiny_llama):
    from pipelines.train import tokenize_rows

    rows = [_row(0), _row(1, cot="word " * 500), _row(2)]
    kept, counts = tokenize_rows(tiny_llama, rows, 200, "drop")
    assert [ex["idx"] for ex in kept] == [0, 2]  # the row numbers the worker's step order is built on
    assert counts == {
        "rows": 3,
        "kept": 2,
        "dropped_overlong": 1,
        "truncated": 0,
        "train_tokens": sum(len(ex["input_ids"]) for ex in kept),
    }
    kept, counts = tokenize_rows(tiny_llama, rows, 200, "truncate")
    assert [ex["idx"] for ex in kept] == [0, 1, 2] and counts["truncated"] == 1 and counts["dropped_overlong"] == 0
    assert max(len(ex["input_ids"]) for ex in kept) == 200
    for ex in kept:
        assert len(ex["labels"]) == len(ex["input_ids"]) and ex["input_ids"].dtype.name == "int64"
        assert (ex["labels"] == -100).any() and (ex["labels"] != -100).any()  # prompt masked, target learned


def test_collator_pads_per_batch():
    c = Collator(pad_id=7)
    b = c([build_example([1, 2], [3], 10), build_example([1], [2, 3, 4, 5], 10)])
    assert b["input_ids"].shape == (2, 5)  # the longest row of this batch, not the cutoff
    assert b["input_ids"][0].tolist() == [1, 2, 3, 7, 7]
    assert b["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX]
    assert b["attention_mask"].sum().item() == 8


def test_lora_config_targets_linear_projections_only(tiny_llama):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = build_lora_config(8, 16, 0.0, "all-linear")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n or "embed" in n for n in trainable)
    targets = {n.split(".")[-4] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert cfg.modules_to_save is None
    with pytest.raises(ValueError, match="lm_head"):
        build_lora_config(target_modules=["q_proj", "lm_head"])


def _tiny_causal_lm(kind: str):
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128)
    cfg = {
        "llama": lambda: LlamaConfig(**common, tie_word_embeddings=True),
        "qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=False),
        "gemma2": lambda: Gemma2Config(**common, head_dim=16, final_logit_softcapping=0.05),
    }[kind]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(torch.float32)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2"])
def test_completion_loss_matches_transformers_loss_and_gradients(kind):
    """The LM head on the labelled positions only gives transformers' loss and the same LoRA
    gradients (right padding, a prompt of different length per row); soft-capped Gemma-2
    logits keep transformers' own loss."""
    import torch
    from peft import get_peft_model

    def build():
        torch.manual_seed(1)
        m = get_peft_model(_tiny_causal_lm(kind), build_lora_config(4, 8, 0.0, "all-linear"))
        m.config.use_cache = False
        for n, p in m.named_parameters():  # LoRA B starts at zero: give the adapter a real effect
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        return m

    rows = [
        build_example([5, 6, 7, 8, 9], [10, 11, 12, 13], cutoff_len=64),
        build_example([5, 6], [20, 21, 22, 23, 24, 25, 26], cutoff_len=64),
        build_example([5, 6, 7], [30, 31], cutoff_len=64),
    ]
    batch = Collator(pad_id=0)(rows)
    ref_model, ours_model = build(), build()
    ref = ref_model(**batch).loss
    wrapped = completion_loss_module(ours_model)
    assert wrapped.labelled_head is (kind != "gemma2")
    ours = wrapped(**batch)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (float(ours), float(ref))
    ref.backward()
    ours.backward()
    grads = {n: p.grad for n, p in ref_model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for n, p in ours_model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-7), n
    # the labelled path really skips the prompt: forcing it on a model whose logits are
    # soft-capped gives a different loss, so the check above can tell the two paths apart
    if kind == "gemma2":
        forced = completion_loss_module(build(), labelled_head=True)(**batch)
        assert not torch.allclose(forced, ref.detach(), rtol=1e-3)


def test_deepspeed_config_builder():
    c2 = build_deepspeed_config(2, micro_batch=2, grad_accum=4, precision="fp32", on_gpu=False)
    assert c2["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in c2["zero_optimization"]
    assert c2["optimizer"]["params"]["torch_adam"] is True and c2["zero_allow_untested_optimizer"] is True
    assert "bf16" not in c2 and "fp16" not in c2
    c3 = build_deepspeed_config(
        3,
        1,
        1,
        "bf16",
        offload_optimizer=True,
        offload_params=True,
        on_gpu=True,
        extra={"zero_optimization": {"stage3_max_live_parameters": 5}},
    )
    z = c3["zero_optimization"]
    assert c3["bf16"] == {"enabled": True} and z["offload_optimizer"]["pin_memory"] is True
    assert z["stage3_max_live_parameters"] == 5 and z["stage3_gather_16bit_weights_on_model_save"] is False
    with pytest.raises(ValueError, match="stage 3"):
        build_deepspeed_config(2, offload_params=True)


def test_schedule_and_order():
    f = [lr_factor(s, 20, 0.1) for s in range(20)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[-1] < 0.01 and all(a >= b for a, b in zip(f[1:], f[2:]))
    assert epoch_order(16, 0, 42) != epoch_order(16, 1, 42) and epoch_order(16, 2, 42) == epoch_order(16, 2, 42)


@pytest.mark.parametrize(
    "rows, match",
    [
        ([], "empty"),
        ([{"user": "u", "ratio": 0.5}], r"missing column\(s\) \['completion'\]"),
        (
            [{"user": "u", "completion": "c", "ratio": 0.5}, {"user": "", "completion": "c", "ratio": 0.5}],
            "row 1 .*'user'",
        ),
        ([{"user": "u", "completion": "c", "ratio": 3}], "row 0 .*ratio"),
    ],
)
def test_validate_rows_errors(rows, match):
    with pytest.raises(TrainDataError, match=match):
        validate_rows(rows, "train.parquet")


@pytest.mark.parametrize("case", ["empty", "missing_column", "no_file", "unfinished_dir"])
def test_bad_input_fails_before_any_worker(tmp_path, monkeypatch, case):
    import pipelines.common
    from pipelines import train as train_mod

    def no_ray(*a, **k):  # would start Ray / workers
        raise AssertionError("Ray started despite bad input")

    monkeypatch.setattr(pipelines.common, "init_ray", no_ray)
    data = tmp_path / "sft"
    if case == "empty":
        artifacts.write_rows(data / "train.parquet", [])
        artifacts.write_manifest(data, "build_sft")
        match = "empty"
    elif case == "missing_column":
        artifacts.write_rows(data / "train.jsonl", [{"user": "u", "ratio": 1.0, "id": "a"}])
        artifacts.write_manifest(data, "build_sft")
        match = "completion"
    elif case == "no_file":
        data = tmp_path / "nope.parquet"
        match = "not found"
    else:
        artifacts.write_rows(data / "train.parquet", [_row(0)])
        match = "not finished"
    cfg = load_config(TrainConfig, data={"dataset": str(data), "output_dir": str(tmp_path / "out")})
    with pytest.raises((TrainDataError, artifacts.StageError), match=match) as ei:
        train_mod.run_train(cfg)
    assert str(data) in str(ei.value) or case == "unfinished_dir"


def test_train_config_validation():
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        load_config(TrainConfig, data={"global_batch_size": 6, "micro_batch_size": 2, "scaling": {"num_workers": 2}})
    with pytest.raises(ConfigError, match="zero_stage 3"):
        load_config(TrainConfig, data={"strategy": "deepspeed", "zero_stage": 2, "offload_params": True})
    with pytest.raises(ConfigError, match="lm_head"):
        load_config(TrainConfig, data={"lora": {"target_modules": ["q_proj", "lm_head"]}})
    with pytest.raises(ConfigError, match="unknown key 'lora.rank'"):
        load_config(TrainConfig, data={"lora": {"rank": 4}})


def test_shipped_train_configs_load():
    paths = sorted((ROOT / "configs" / "train").glob("*.yaml"))
    assert len(paths) >= 5
    for p in paths:
        cfg = load_any(p)
        assert isinstance(cfg, TrainConfig), p
        assert "ray job submit" in p.read_text().split("kind:")[0], f"{p}: launch command missing from the header"
    names = {load_any(p).model for p in paths}
    assert {
        "smollm2-135m-instruct",
        "Qwen/Qwen2.5-7B-Instruct",
        "Qwen/Qwen2.5-14B-Instruct",
        "Qwen/Qwen2.5-32B-Instruct",
        "meta-llama/Llama-3.1-8B-Instruct",
    } <= names


def test_memory_plan(tiny_llama, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from tokenskip import memory

    # the architecture formula counts exactly what transformers builds
    arch = memory.arch_for(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert memory.count_params(arch) == sum(p.numel() for p in model.parameters())
    assert memory.lora_params(arch, 8) == 34816  # what PEFT adds on all linear layers (see the adapter test)
    assert memory.main(["-c", str(ROOT / "configs/train/qwen2.5-32b-zero3.yaml")]) == 0
    out = capsys.readouterr().out
    assert "ZeRO-3 x 8 GPUs" in out and "FITS on 80 GiB" in out
    p32 = memory.plan(memory.arch_for("Qwen/Qwen2.5-32B-Instruct"), zero_stage=3, num_gpus=8)
    assert p32["fits"] and 7 < p32["weights_gib"] < 8.5
    # without sharding the frozen base, the 32B model does not fit one 80 GB GPU
    assert not memory.plan(memory.arch_for("Qwen/Qwen2.5-32B-Instruct"), zero_stage=2, num_gpus=1, micro_batch=4)[
        "fits"
    ]
    assert memory.main(["--model", "Qwen/Qwen2.5-7B-Instruct", "--zero", "2", "--gpus", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["zero_stage"] == 2


def test_plan_memory_fails_closed_and_reads_a_hub_id_from_the_hub_cache(tmp_path, tiny_llama, monkeypatch, capsys):
    """A bad argument, config or model name is one line on stderr and exit 2, never a traceback; a hub
    id outside the built-in table is read from its config.json (here: the local Hub cache, offline)."""
    import huggingface_hub.constants as hub

    from tokenskip import memory

    not_json = tmp_path / "notes.txt"
    not_json.write_text("hello")
    no_sizes = tmp_path / "config.json"
    no_sizes.write_text(json.dumps({"model_type": "llama"}))
    bad = {
        ("--model", "Qwen/Qwen2.5-7B-Nonexistent"): "could not be read from the Hugging Face Hub",
        ("--model", str(tmp_path / "missing")): "not a file or directory",
        ("--model", str(Path(tiny_llama).parent)): "a directory without config.json",
        ("--model", str(not_json)): "not a readable JSON model config",
        ("--model", str(no_sizes)): "has no 'num_attention_heads'",
        ("--config", str(tmp_path / "none.yaml")): "config file not found",
        ("-c", str(ROOT / "configs/train/qwen2.5-7b-zero2.yaml"), "micro_batch_size=0"): "micro_batch_size",
    }
    for argv, msg in bad.items():
        assert memory.main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("tokenskip plan-memory: ") and msg in err and "Traceback" not in err, (argv, err)
    for flag, value in [("--gpus", "0"), ("--micro-batch", "-1"), ("--seq-len", "x"), ("--gpu-gib", "nan")]:
        with pytest.raises(SystemExit) as exc:
            memory.main(["--model", "Qwen/Qwen2.5-7B-Instruct", flag, value])
        assert exc.value.code == 2 and f"argument {flag}" in capsys.readouterr().err

    # someorg/tiny in the Hub cache's layout (what a first online call leaves there)
    cache = tmp_path / "hub"
    snap = cache / "models--someorg--tiny" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text((Path(tiny_llama) / "config.json").read_text())
    (cache / "models--someorg--tiny" / "refs").mkdir()
    (cache / "models--someorg--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    assert memory.arch_for("someorg/tiny") == memory.arch_for(tiny_llama)
    assert memory.main(["--model", "someorg/tiny", "--gpus", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params_b"] == memory.plan(memory.arch_for(tiny_llama))["params_b"]


# Peak GPU memory of one LoRA step measured on an H100 (benchmarks/gpu_lora_memory.py, 1 GPU, no ZeRO,
# bf16, r 8, cutoff 2048): (model, micro-batch, grad-ckpt, peak GiB or None for out-of-memory on 79 GiB).
H100_MEASURED = [
    ("Qwen/Qwen2.5-7B-Instruct", 1, True, 18.99),
    ("Qwen/Qwen2.5-7B-Instruct", 1, False, 35.72),
    ("Qwen/Qwen2.5-14B-Instruct", 4, True, 48.25),
    ("Qwen/Qwen2.5-32B-Instruct", 1, True, 67.19),
    ("Qwen/Qwen2.5-32B-Instruct", 4, True, None),
    ("Qwen/Qwen2.5-32B-Instruct", 1, False, None),
]


@pytest.mark.parametrize("model, micro, ckpt, peak", H100_MEASURED)
def test_memory_plan_matches_measured_h100_peaks(model, micro, ckpt, peak):
    from tokenskip import memory

    p = memory.plan(
        memory.arch_for(model),
        zero_stage=0,
        num_gpus=1,
        micro_batch=micro,
        seq_len=2048,
        gradient_checkpointing=ckpt,
        gpu_gib=79.18,
        overhead_gib=1.0,
    )
    if peak is None:
        assert not p["fits"], p
    else:
        assert p["fits"] and abs(p["total_gib"] - peak) / peak < 0.10, (p["total_gib"], peak)


def test_length_grouped_batches_cut_padding_below_ten_percent():
    """Rows at every γ differ in length by 2x: a shuffled micro-batch of 4 pads a quarter of its
    positions, a length-grouped one under a tenth; every row is still seen once per epoch."""
    import random

    from tokenskip.training import epoch_order, length_grouped_order, padding_share

    rng = random.Random(0)
    lengths = []
    for _ in range(300):  # a question: prompt ~90 tokens, CoT ~40-140 tokens at γ 1.0 … 0.5
        prompt, cot = rng.randint(60, 120), rng.randint(40, 140)
        lengths += [prompt + int(cot * g) + 15 for g in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)]
    shuffled = epoch_order(len(lengths), 0, 42)
    grouped = length_grouped_order(lengths, 0, 42, micro_batch=4)
    assert sorted(grouped) == list(range(len(lengths)))
    assert (
        grouped
        == length_grouped_order(lengths, 0, 42, micro_batch=4)
        != length_grouped_order(lengths, 1, 42, micro_batch=4)
    )
    assert padding_share(lengths, shuffled, 4) > 0.15
    assert padding_share(lengths, grouped, 4) < 0.10
