"""``python -m hf_titans.bench edit|generate|needle``: the benchmarks of docs/benchmarks.md (needle: docs/reading.md)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import MemoryConfig
from .data import FORMATS, load_records
from .edit import METHODS, SCHEDULES, EditSettings


def load_model(name: str | None, device: str | None = None):
    """The frozen base (default: the embedded SmolLM2-135M), moved to ``device`` (``cuda``, ``cuda:1``) if given."""
    from ..base_model import load_base_model

    model, tokenizer = load_base_model(name)
    if device:
        model.to(device)
    return model, tokenizer


def config_from_args(args) -> MemoryConfig:
    """``--config FILE`` (or the default) with each ``--set key=value`` applied (values read as YAML)."""
    import yaml

    config = MemoryConfig.from_file(args.config) if args.config else MemoryConfig()
    changes: dict[str, Any] = {}
    for item in args.set or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        changes[key.strip()] = yaml.safe_load(value)
    return config.replace(**changes) if changes else config


def _environment(model, tokenizer) -> dict[str, Any]:
    import transformers

    return {"model": getattr(model.config, "name_or_path", type(model).__name__),
            "model_class": type(model).__name__, "dtype": str(next(model.parameters()).dtype),
            "device": str(next(model.parameters()).device), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **_accelerator(model), **_git()}


def _accelerator(model) -> dict[str, Any]:
    device = next(model.parameters()).device
    if device.type != "cuda":
        return {}
    return {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}


def _git() -> dict[str, Any]:
    """The code the run used: commit and the files that differed from it (runs are only as clean as this)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_modified": [line[3:] for line in dirty if line.strip()]}


def _write(out: Path, results: dict, table: str, plot_fn=None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    written[1].write_text(table + "\n", encoding="utf-8")
    if plot_fn is not None:
        written.append(out / "results.png")
        plot_fn(results, written[-1])
    print(table)
    print("\nwrote " + ", ".join(map(str, written)))


def cmd_edit(args) -> None:
    from .edit import diagnostics, markdown_table, plot, run_edit

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    records = load_records(args.data, args.format, n=args.n, seed=args.seed if args.sample else None)
    model, tokenizer = load_model(args.model, args.device)
    settings = EditSettings(schedule=args.schedule, stream=args.stream, seed=args.seed, config=config_from_args(args),
                            context_budget=args.context_budget, lora_r=args.lora_r, lora_lr=args.lora_lr,
                            lora_cap=args.lora_cap, seed_lr=args.seed_lr, reference=_reference(args.reference),
                            save_memory=args.save_memory)
    env = _environment(model, tokenizer)
    start = time.perf_counter()
    results = run_edit(model, tokenizer, records, methods, settings)
    results = {"benchmark": "edit", **env, "data": str(args.data), "data_file": Path(args.data).name,
               "format": args.format, "sampled": bool(args.sample), "config": settings.to_dict()["config"],
               "wall_seconds": time.perf_counter() - start,
               "command": "python -m hf_titans.bench " + " ".join(sys.argv[1:]), **results}
    _write(Path(args.out), results, markdown_table(results) + "\n\n" + diagnostics(results),
           lambda r, p: plot(r, p, f"{Path(args.data).name}, {args.schedule}, n={results['n']}"))


def _reference(path: str | None) -> dict | None:
    if not path:
        return None
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if "memory" not in data.get("methods", {}):
        raise SystemExit(f"{path} has no memory entry to match lora to")
    return {**data["methods"]["memory"], "source": str(path)}


def cmd_merge(args) -> None:
    """Combine edit runs of the same data, n, seed, schedule and model made by separate processes."""
    from .edit import diagnostics, markdown_table, plot

    parts = [json.loads(Path(p).read_text(encoding="utf-8")) for p in args.results]
    if parts[0].get("benchmark") == "needle":
        from . import needle

        try:
            merged = needle.merge(parts, args.results)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        _write(Path(args.out), merged, needle.markdown_table(merged))
        return
    keys = ("data_file", "n", "seed", "schedule", "stream", "model")
    for p, part in zip(args.results[1:], parts[1:]):
        for k in keys:
            if part.get(k) != parts[0].get(k):
                raise SystemExit(f"{p}: {k} differs from {args.results[0]} ({part.get(k)!r} != {parts[0].get(k)!r})")
    # the memory config matters only to the memory (lora copies its passes from the --reference file)
    memory_parts = [p for p in parts if "memory" in p["methods"]]
    if len(memory_parts) > 1:
        raise SystemExit("more than one file has a memory entry")
    first = memory_parts[0] if memory_parts else parts[0]
    merged = {k: v for k, v in first.items() if k not in ("methods", "wall_seconds", "command", "started")}
    merged["methods"] = {}
    for part in parts:
        for name, entry in part["methods"].items():
            if name in merged["methods"]:
                raise SystemExit(f"method {name} appears in more than one file")
            merged["methods"][name] = entry
    order = ["memory", "none", "in_context", "lora", "lora_to_rel", "seed"]
    merged["methods"] = dict(sorted(merged["methods"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))
    merged["merged_from"] = [{"file": str(p), "command": part.get("command"), "started": part.get("started"),
                              "wall_seconds": part.get("wall_seconds"), "methods": list(part["methods"]),
                              "git_commit": part.get("git_commit"), "git_modified": part.get("git_modified")}
                             for p, part in zip(args.results, parts)]
    merged["base_unchanged"] = all(part.get("base_unchanged") for part in parts)
    _write(Path(args.out), merged, markdown_table(merged) + "\n\n" + diagnostics(merged),
           lambda r, p: plot(r, p, f"{merged['data_file']}, {merged['schedule']}, n={merged['n']}"))


def cmd_generate(args) -> None:
    from .generate import markdown_table, plot, run_generate

    model, tokenizer = load_model(args.model, args.device)
    env = _environment(model, tokenizer)
    lengths = [int(x) for x in str(args.max_new_tokens).split(",")]
    batches = [int(x) for x in str(args.batch_sizes).split(",")]
    start = time.perf_counter()
    results = run_generate(model, tokenizer, lengths, batches, repeats=args.repeats, config=config_from_args(args))
    results = {"benchmark": "generate", **env, "wall_seconds": time.perf_counter() - start,
               "command": "python -m hf_titans.bench " + " ".join(sys.argv[1:]), **results}
    _write(Path(args.out), results, markdown_table(results), plot)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hf_titans.bench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=None, help="model folder or cached Hub id (default: embedded SmolLM2-135M)")
    common.add_argument("--out", required=True, help="output folder (results.json, results.md, results.png)")
    common.add_argument("--config", default=None, help="MemoryConfig YAML/JSON file (default: MemoryConfig())")
    common.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a MemoryConfig field")
    common.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    common.add_argument("--device", default=None, help="put the base (and so the memory) on this device, e.g. cuda")

    e = sub.add_parser("edit", parents=[common], help="Rel/Gen/Loc and cost of teaching edits, per method")
    e.add_argument("--data", required=True, help="zsRE or CounterFact JSONL file (read by path)")
    e.add_argument("--format", choices=FORMATS, default=None, help="default: detected from the fields")
    e.add_argument("--n", type=int, default=100, help="number of records (the first n, or --sample)")
    e.add_argument("--sample", action="store_true", help="a seeded random sample of n records instead of the first n")
    e.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma list of {', '.join(METHODS)} (lora also runs lora_to_rel; name lora_to_rel alone "
                        "to run only that)")
    e.add_argument("--schedule", choices=SCHEDULES, default="sequential")
    e.add_argument("--stream", type=int, default=None,
                   help="sequential: facts per stream T (reset between streams); default n")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--context-budget", type=int, default=1024, help="in_context: tokens of facts before a prompt")
    e.add_argument("--lora-r", type=int, default=8)
    e.add_argument("--lora-lr", type=float, default=1e-3)
    e.add_argument("--lora-cap", type=int, default=100,
                   help="lora_to_rel: at most this many passes per fact (sequential) or epochs (batch)")
    e.add_argument("--seed-lr", type=float, default=EditSettings.seed_lr)
    e.add_argument("--reference", default=None,
                   help="results.json of a memory run on the same data: lora without memory in --methods matches it")
    e.add_argument("--save-memory", default=None, metavar="DIR",
                   help="memory: save the memory of the last stream (all n facts unless --stream) to DIR, loadable "
                        "with HybridTitansEngine.from_pretrained")
    e.set_defaults(func=cmd_edit)

    m = sub.add_parser("merge", help="combine results.json files of one edit or needle benchmark run in separate "
                                     "processes")
    m.add_argument("results", nargs="+")
    m.add_argument("--out", required=True)
    m.set_defaults(func=cmd_merge)

    g = sub.add_parser("generate", parents=[common], help="tokens/s with the memory versus bare model.generate")
    g.add_argument("--max-new-tokens", default="64,256", help="comma list of generation lengths")
    g.add_argument("--batch-sizes", default="1,8", help="comma list of batch sizes")
    g.add_argument("--repeats", type=int, default=3)
    g.set_defaults(func=cmd_generate)

    from .needle import add_parser as add_needle_parser  # issue 8: pass-key retrieval beyond the window

    add_needle_parser(sub, common, config=config_from_args, environment=_environment, load_model=load_model)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
