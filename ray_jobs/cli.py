"""``tokenskip`` command line: one subcommand per stage, each ``--config FILE`` + overrides.

The entry layer: subcommands dispatch to the same ``main(argv)`` the ``ray job submit``
entrypoints use (all of them run through :mod:`ray_jobs.runner`), so ``tokenskip prune -c X``
and ``python -m ray_jobs.prune -c X`` are the same run.
"""

from __future__ import annotations

import importlib
import json
import sys

# subcommand -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("ray_jobs.generate", "generate CoTs with the target model (Ray Data + vLLM)"),
    "cots": ("ray_jobs.cots", "select the CoTs to prune (correct generations within max_cot_tokens, or gold)"),
    "prune": ("ray_jobs.prune", "prune CoTs at every ratio γ from one scoring pass (Ray Data actors)"),
    "build-sft": ("ray_jobs.build_dataset", "generate -> cots -> prune -> build the SFT set from one YAML"),
    "train": ("ray_jobs.train", "LoRA SFT on Ray Train (+ DeepSpeed ZeRO)"),
    "eval": ("ray_jobs.evaluate", "accuracy / tokens / latency / actual ratio per γ, with baselines"),
    "serve": ("serving.run", "start the OpenAI-compatible γ-routed Serve app locally"),
    "pipeline": ("ray_jobs.pipeline", "the whole experiment: generate -> cots -> prune -> build -> train -> evaluate"),
    "plan-memory": ("tokenskip.memory", "per-GPU memory estimate for a model / ZeRO stage / GPU count"),
    "assets": ("ray_jobs.cli", "list (and with `prepare`, convert) the embedded offline assets"),
}


def _usage() -> str:
    lines = ["usage: tokenskip <command> [--config FILE] [key.sub=value ...]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`tokenskip <command> --help` for a command's options."]
    return "\n".join(lines)


def assets_main(argv: list[str] | None = None) -> int:
    import argparse

    from tokenskip import assets

    p = argparse.ArgumentParser(
        prog="tokenskip assets",
        description="List the embedded offline assets; `prepare` converts SmolLM2 and places the tiktoken file.",
    )
    p.add_argument("action", nargs="?", choices=["list", "prepare"], default="list")
    args = p.parse_args(argv)
    if args.action == "prepare":
        print(f"smollm2-135m-instruct -> {assets.ensure_smollm2()}")
        print(f"minilm-l6 -> {assets.minilm_path()}")
        print(f"tiktoken cl100k_base -> {assets.ensure_tiktoken()}")
    for row in assets.list_assets():
        print(json.dumps(row))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"tokenskip: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if cmd == "assets":
        return assets_main(rest)
    module = importlib.import_module(COMMANDS[cmd][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
