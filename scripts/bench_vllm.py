"""Throughput and latency of the memory path on vLLM versus plain vLLM, on the same prompts.

    # offline: one vllm.LLM in this process; plain = text prompts, memory = MemoryLLM (bank.embed + prompt_embeds)
    python scripts/bench_vllm.py --mode offline --memories 1 8 32 --requests 32 --max-tokens 16
    # online: starts `vllm serve --enable-prompt-embeds` and the memory front; plain = OpenAI client straight to
    # vLLM, memory = the same client through the front; all requests of a run are sent at once
    python scripts/bench_vllm.py --mode online --memories 1 8 32 --requests 32 --max-tokens 16

Each run sends ``--requests`` requests at once, request ``j`` naming memory ``j % k`` (k = 1, 8, 32 different
memories in flight) and prompt ``j`` (all prompts differ). Every memory speaks for every prompt (a fresh memory
with ``familiarity_threshold=-1``, seeds 0..k-1: its own random soft prompt), so every request takes the
prompt-embeds path: the worst case. (A silent memory sends the bare model's token ids, which is plain vLLM.)
Generation is greedy with ``ignore_eos`` so every request makes exactly ``--max-tokens`` tokens. A round runs every
path once, back to back; ``--repeat N`` runs N rounds and reports medians, the ratios to plain vLLM taken within
each round (on a shared machine, load comes in bursts that then hit all paths of a round alike), and every round's
wall time. Offline mode also checks vLLM's greedy text against ``engine.generate``. Results go to stdout and
``--out`` as JSON. Needs vLLM (the serve extra); run under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PROMPTS = [
    "The history of the printing press begins", "A good way to start the morning is", "The ocean covers most of",
    "My favourite book as a child was", "The train to the city leaves at", "In the middle of the forest there",
    "The most important rule of cooking is", "Our new office building has", "The weather forecast for tomorrow says",
    "She picked up the phone and said", "The museum's oldest painting shows", "To fix a flat bicycle tire you",
    "The first computers were built", "Every summer the village holds", "The recipe for bread calls for",
    "The old lighthouse on the hill", "Scientists studying bees found that", "The band's second album was",
    "He opened the letter and read", "The rules of chess say that", "A small cafe on the corner sells",
    "The mountain path becomes steep where", "Learning a new language is easier when", "The river freezes in",
    "Her garden is full of", "The stadium was built in", "The children in the park were playing",
    "A healthy breakfast usually includes", "The city council voted to", "The astronaut looked out of the window and",
    "The library is closed on", "When the storm finally passed,",
]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summarize(name: str, wall: float, latencies: list[float], tokens: int, extra: dict | None = None) -> dict:
    out = {"path": name, "wall_s": round(wall, 3), "requests": len(latencies), "output_tokens": tokens,
           "tokens_per_s": round(tokens / wall, 2), "latency_mean_s": round(statistics.mean(latencies), 3),
           "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_max_s": round(max(latencies), 3)}
    out.update(extra or {})
    return out


def make_memories(model, tokenizer, k: int):
    """k memories that speak for every prompt, each with its own soft prompt (seed)."""
    from hf_titans import HybridTitansEngine, MemoryConfig

    return {f"mem{i:02d}": HybridTitansEngine(model, tokenizer, MemoryConfig(seed=i, familiarity_threshold=-1.0))
            for i in range(k)}


def rounds_report(names: list[str], rounds: list[dict[str, dict]], plain: str) -> list[dict]:
    """Per path: the median over rounds of wall time, throughput, latencies, and of the ratio to the plain path
    measured in the same round (the paths of a round run back to back, so a burst of load on a shared machine hits
    them alike); every round's wall time is listed."""
    rows = []
    for name in names:
        runs = [r[name] for r in rounds]
        med = lambda key: round(statistics.median(run[key] for run in runs), 3)  # noqa: E731
        row = {"path": name, "requests": runs[0]["requests"], "output_tokens": runs[0]["output_tokens"],
               "wall_s": med("wall_s"), "tokens_per_s": med("tokens_per_s"), "latency_mean_s": med("latency_mean_s"),
               "latency_p50_s": med("latency_p50_s"), "latency_max_s": med("latency_max_s"),
               "rounds_wall_s": [run["wall_s"] for run in runs]}
        for key in ("memories", "embed_s", "generate_s"):
            if key in runs[0]:
                row[key] = med(key)
        if name != plain:
            row["throughput_ratio_vs_plain"] = round(statistics.median(
                r[name]["tokens_per_s"] / r[plain]["tokens_per_s"] for r in rounds), 3)
            row["latency_ratio_vs_plain"] = round(statistics.median(
                r[name]["latency_mean_s"] / r[plain]["latency_mean_s"] for r in rounds), 3)
        rows.append(row)
    return rows


def run_offline(args, model, tokenizer, ks) -> list[dict]:
    from vllm import SamplingParams

    from hf_titans.serving import MemoryBank, MemoryLLM, make_llm
    from hf_titans.serving.vllm import vllm_inputs

    started = time.perf_counter()
    llm = make_llm(max_num_seqs=max(args.requests, 8), disable_log_stats=False)
    print(f"vLLM LLM ready in {time.perf_counter() - started:.0f} s", flush=True)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = [PROMPTS[j % len(PROMPTS)] for j in range(args.requests)]
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up

    def latencies(outputs, wall):
        out = []
        for o in outputs:  # engine-core monotonic stamps, queued -> last token, when vLLM keeps them
            m = getattr(o, "metrics", None)
            queued, last = getattr(m, "queued_ts", None), getattr(m, "last_token_ts", None)
            out.append(last - queued if (last and queued and last > queued) else wall)
        return out

    def tokens(outputs):
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    banks = {}
    all_memories = make_memories(model, tokenizer, max(ks))
    for k in ks:
        banks[k] = MemoryBank(model, tokenizer)
        for name in list(all_memories)[:k]:
            banks[k].add(name, all_memories[name])
    bare_bank = MemoryBank(model, tokenizer)
    plain_name, bare_name = "plain vLLM (text prompts)", "vLLM, prompt_embeds of the bare tokens (no memory)"
    names = [plain_name, bare_name] + [f"memory, {k} memories" for k in ks]

    def plain():
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t
        return summarize(plain_name, wall, latencies(outs, wall), tokens(outs))

    def with_bank(name, bank, memories, silent_as_tokens=True, k=None):
        t = time.perf_counter()
        items = bank.embed(prompts, memories)
        embed_s = time.perf_counter() - t
        assert k is None or all(i.speaks for i in items)
        t = time.perf_counter()
        outs = llm.generate(vllm_inputs(items, silent_as_tokens), params, use_tqdm=False)
        gen_s = time.perf_counter() - t
        extra = {"embed_s": round(embed_s, 3), "generate_s": round(gen_s, 3)}
        if k is not None:
            extra["memories"] = k
        return summarize(name, embed_s + gen_s, [x + embed_s for x in latencies(outs, gen_s)], tokens(outs), extra)

    rounds = []
    for r in range(args.repeat):
        result = {plain_name: plain()}
        result[bare_name] = with_bank(bare_name, bare_bank, None, silent_as_tokens=False)
        for k in ks:
            name = f"memory, {k} memories"
            result[name] = with_bank(name, banks[k], [f"mem{j % k:02d}" for j in range(len(prompts))], k=k)
        print(f"round {r + 1}: " + json.dumps({n: v["wall_s"] for n, v in result.items()}), flush=True)
        rounds.append(result)
    rows = rounds_report(names, rounds, plain_name)
    # Correctness of the same path: vLLM's greedy answers from a memory's prompt embeddings (and from the bare
    # token ids) against the engine's own transformers generate().
    engine = all_memories["mem00"]
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    check = PROMPTS[:3]
    outs = MemoryLLM(llm, banks[ks[0]]).generate(check * 2, ["mem00"] * 3 + [None] * 3, greedy)
    same = [o.text == engine.generate(p, max_new_tokens=args.max_tokens, do_sample=False, use_memory=m is not None)
            for o, p, m in zip(outs, check * 2, ["mem00"] * 3 + [None] * 3)]
    rows.append({"path": "check: vLLM text == engine.generate text (greedy)",
                 "memory_speaks": f"{sum(same[:3])}/3", "no_memory": f"{sum(same[3:])}/3"})
    return rows


def run_online(args, model, tokenizer, ks) -> list[dict]:
    import asyncio

    import openai

    from hf_titans.serving import MemoryBank, VLLMServer, create_app, default_model_dir
    from hf_titans.serving.server import front_in_thread

    log = Path(args.vllm_log)
    server = VLLMServer(default_model_dir(), port=args.vllm_port, log_path=log,
                        extra_args=["--enforce-eager", "--max-num-seqs", str(max(args.requests, 8))])
    started = time.perf_counter()
    server.start()
    print(f"vllm serve ready in {time.perf_counter() - started:.0f} s (log {log})", flush=True)
    bank = MemoryBank(model, tokenizer)
    for name, engine in make_memories(model, tokenizer, max(ks)).items():
        bank.add(name, engine)
    try:
        with front_in_thread(create_app(bank, server.url), args.port):
            direct = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=3600)
            via = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="x", max_retries=0,
                                     timeout=3600)
            prompts = [PROMPTS[j % len(PROMPTS)] for j in range(args.requests)]
            extra = {"ignore_eos": True}

            async def one(client, model, prompt):
                t = time.perf_counter()
                r = await client.completions.create(model=model, prompt=prompt, max_tokens=args.max_tokens,
                                                    temperature=0, extra_body=extra)
                return time.perf_counter() - t, r.usage.completion_tokens

            async def burst(name, client, models, extra_fields=None):
                t = time.perf_counter()
                done = await asyncio.gather(*(one(client, m, p) for m, p in zip(models, prompts)))
                return summarize(name, time.perf_counter() - t, [d[0] for d in done], sum(d[1] for d in done),
                                 extra_fields)

            async def main():
                served = (await direct.models.list()).data[0].id
                await one(direct, served, "Hello")  # warm-up
                await one(via, "mem00", "Hello")
                plain_name = "plain vLLM server (OpenAI client, text prompts)"
                names = [plain_name] + [f"memory front, {k} memories" for k in ks]
                rounds = []
                for r in range(args.repeat):
                    result = {plain_name: await burst(plain_name, direct, [served] * len(prompts))}
                    for k in ks:
                        name = f"memory front, {k} memories"
                        result[name] = await burst(name, via, [f"mem{j % k:02d}" for j in range(len(prompts))],
                                                   {"memories": k})
                    print(f"round {r + 1}: " + json.dumps({n: v["wall_s"] for n, v in result.items()}), flush=True)
                    rounds.append(result)
                return rounds_report(names, rounds, plain_name)

            return asyncio.run(main())
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["offline", "online"], default="offline")
    p.add_argument("--memories", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=32, help="requests sent at once per run (default 32)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds; each runs every path back to back, medians over rounds are reported")
    p.add_argument("--port", type=int, default=8010)
    p.add_argument("--vllm-port", type=int, default=8011)
    p.add_argument("--vllm-log", default="/tmp/hf_titans_bench_vllm.log")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    from hf_titans import load_base_model

    model, tokenizer = load_base_model()
    ks = [k for k in args.memories if k <= args.requests]
    started = time.perf_counter()
    rows = (run_offline if args.mode == "offline" else run_online)(args, model, tokenizer, ks)
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    report = {"mode": args.mode, "requests": args.requests, "max_tokens": args.max_tokens, "repeat": args.repeat,
              "model": "SmolLM2-135M-Instruct (fp32)", "device": "CPU", "cpus": os.cpu_count(),
              "load_average_after": load, "torch": torch.__version__, "python": platform.python_version(),
              "seconds": round(time.perf_counter() - started, 1), "results": rows}
    try:
        import vllm

        report["vllm"] = vllm.__version__
    except ImportError:  # pragma: no cover
        pass
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
