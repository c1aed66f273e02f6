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
Generation is greedy with ``ignore_eos`` so every request makes exactly ``--max-tokens`` tokens. One run of each
(``--repeat N``: N runs, the median reported, all wall times listed); results go to stdout and ``--out`` as JSON. Needs vLLM (the serve extra); run under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
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


def median_run(runs: list) -> tuple:
    """The run with the median wall time (runs are ``(wall, data)``)."""
    return sorted(runs, key=lambda r: r[0])[len(runs) // 2]


def make_memories(model, tokenizer, k: int):
    """k memories that speak for every prompt, each with its own soft prompt (seed)."""
    from hf_titans import HybridTitansEngine, MemoryConfig

    return {f"mem{i:02d}": HybridTitansEngine(model, tokenizer, MemoryConfig(seed=i, familiarity_threshold=-1.0))
            for i in range(k)}


def run_offline(args, model, tokenizer, ks) -> list[dict]:
    from vllm import SamplingParams

    from hf_titans.serving import MemoryBank, MemoryLLM, make_llm

    started = time.perf_counter()
    llm = make_llm(max_num_seqs=max(args.requests, 8), disable_log_stats=False)
    print(f"vLLM LLM ready in {time.perf_counter() - started:.0f} s", flush=True)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = [PROMPTS[j % len(PROMPTS)] for j in range(args.requests)]
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    results = []

    def timed(fn):
        t = time.perf_counter()
        outputs = fn()
        return time.perf_counter() - t, outputs

    def latencies(outputs, wall):
        out = []
        for o in outputs:  # vLLM's per-request timings when it keeps them, else the batch's wall time
            m = getattr(o, "metrics", None)  # engine-core monotonic stamps: queued -> last token
            queued, last = getattr(m, "queued_ts", None), getattr(m, "last_token_ts", None)
            out.append(last - queued if (last and queued and last > queued) else wall)
        return out

    runs = [timed(lambda: llm.generate(prompts, params, use_tqdm=False)) for _ in range(args.repeat)]
    wall, outs = median_run(runs)
    plain = summarize("plain vLLM (text prompts)", wall, latencies(outs, wall),
                      sum(len(o.outputs[0].token_ids) for o in outs), {"runs_wall_s": [round(r[0], 3) for r in runs]})
    print(json.dumps(plain), flush=True)
    # The prompt-embeds path without a memory: the prompts' own token embeddings (isolates the path's cost from
    # the soft prompt's extra positions).
    from hf_titans.serving.vllm import vllm_inputs

    bare = MemoryBank(model, tokenizer).embed(prompts, None)
    runs = [timed(lambda: llm.generate(vllm_inputs(bare, silent_as_tokens=False), params, use_tqdm=False))
            for _ in range(args.repeat)]
    wall, outs = median_run(runs)
    row = summarize("vLLM, prompt_embeds of the bare tokens (no memory)", wall, latencies(outs, wall),
                    sum(len(o.outputs[0].token_ids) for o in outs), {"runs_wall_s": [round(r[0], 3) for r in runs]})
    row["throughput_ratio_vs_plain"] = round(row["tokens_per_s"] / plain["tokens_per_s"], 3)
    print(json.dumps(row), flush=True)
    extra_rows = [row]
    for k in ks:
        bank = MemoryBank(model, tokenizer)
        for name, engine in make_memories(model, tokenizer, k).items():
            bank.add(name, engine)
        memories = [f"mem{j % k:02d}" for j in range(args.requests)]
        runner = MemoryLLM(llm, bank)
        def once():
            t = time.perf_counter()
            items = bank.embed(prompts, memories)
            embed_s = time.perf_counter() - t
            assert all(i.speaks for i in items)
            gen_s, outs = timed(lambda: llm.generate(vllm_inputs(items), params, use_tqdm=False))
            return embed_s + gen_s, (outs, embed_s, gen_s)

        runs = [once() for _ in range(args.repeat)]
        wall, (outs, embed_s, gen_s) = median_run(runs)
        row = summarize(f"memory, {k} memories", wall, [x + embed_s for x in latencies(outs, gen_s)],
                        sum(len(o.outputs[0].token_ids) for o in outs),
                        {"memories": k, "embed_s": round(embed_s, 3), "generate_s": round(gen_s, 3),
                         "runs_wall_s": [round(r[0], 3) for r in runs]})
        row["throughput_ratio_vs_plain"] = round(row["tokens_per_s"] / plain["tokens_per_s"], 3)
        row["latency_ratio_vs_plain"] = round(row["latency_mean_s"] / plain["latency_mean_s"], 3)
        print(json.dumps(row), flush=True)
        results.append(row)
        del runner
    # Correctness of the same path: vLLM's greedy answers from a memory's prompt embeddings (and from the bare
    # token ids) against the engine's own transformers generate(), token for token.
    engine = make_memories(model, tokenizer, 1)["mem00"]
    bank = MemoryBank(model, tokenizer)
    bank.add("mem00", engine)
    check = PROMPTS[:3]
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    outs = MemoryLLM(llm, bank).generate(check * 2, ["mem00"] * 3 + [None] * 3, greedy)
    same = [o.text == engine.generate(p, max_new_tokens=args.max_tokens, do_sample=False, use_memory=m is not None)
            for o, p, m in zip(outs, check * 2, ["mem00"] * 3 + [None] * 3)]
    results.append({"path": "check: vLLM text == engine.generate text (greedy)",
                    "memory_speaks": f"{sum(same[:3])}/3", "no_memory": f"{sum(same[3:])}/3"})
    print(json.dumps(results[-1]), flush=True)
    return [plain, *extra_rows, *results]


def run_online(args, model, tokenizer, ks) -> list[dict]:
    import asyncio

    import openai
    import uvicorn

    from hf_titans.serving import MemoryBank, VLLMServer, create_app, default_model_dir

    log = Path(args.vllm_log)
    server = VLLMServer(default_model_dir(), port=args.vllm_port, log_path=log,
                        extra_args=["--enforce-eager", "--max-num-seqs", str(max(args.requests, 8))])
    started = time.perf_counter()
    server.start()
    print(f"vllm serve ready in {time.perf_counter() - started:.0f} s (log {log})", flush=True)
    bank = MemoryBank(model, tokenizer)
    for name, engine in make_memories(model, tokenizer, max(ks)).items():
        bank.add(name, engine)
    front = uvicorn.Server(uvicorn.Config(create_app(bank, server.url), host="127.0.0.1", port=args.port,
                                          log_level="warning"))
    thread = threading.Thread(target=front.run, daemon=True)
    thread.start()
    while not front.started:
        time.sleep(0.1)
    try:
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

        async def burst(client, models):
            t = time.perf_counter()
            done = await asyncio.gather(*(one(client, m, p) for m, p in zip(models, prompts)))
            return time.perf_counter() - t, [d[0] for d in done], sum(d[1] for d in done)

        async def main():
            served = (await direct.models.list()).data[0].id
            await one(direct, served, "Hello")  # warm-up
            await one(via, "mem00", "Hello")
            runs = [await burst(direct, [served] * len(prompts)) for _ in range(args.repeat)]
            wall, lat, tokens = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            plain = summarize("plain vLLM server (OpenAI client, text prompts)", wall, lat, tokens,
                              {"runs_wall_s": [round(r[0], 3) for r in runs]})
            print(json.dumps(plain), flush=True)
            rows = [plain]
            for k in ks:
                runs = [await burst(via, [f"mem{j % k:02d}" for j in range(len(prompts))])
                        for _ in range(args.repeat)]
                wall, lat, tokens = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
                row = summarize(f"memory front, {k} memories", wall, lat, tokens,
                                {"memories": k, "runs_wall_s": [round(r[0], 3) for r in runs]})
                row["throughput_ratio_vs_plain"] = round(row["tokens_per_s"] / plain["tokens_per_s"], 3)
                row["latency_ratio_vs_plain"] = round(row["latency_mean_s"] / plain["latency_mean_s"], 3)
                print(json.dumps(row), flush=True)
                rows.append(row)
            return rows

        return asyncio.run(main())
    finally:
        front.should_exit = True
        thread.join(30)
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["offline", "online"], default="offline")
    p.add_argument("--memories", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=32, help="requests sent at once per run (default 32)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the median run is reported")
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
