"""``hf-titans serve`` / ``python -m hf_titans.serving``: vLLM's OpenAI server for the base model plus the memory front.

    python -m hf_titans.serving --memory omega=memories/project-omega --memories-dir memories/ --port 8000

starts ``vllm serve <base model> --enable-prompt-embeds`` on ``--vllm-port`` (or uses ``--upstream URL``, a vLLM
server started elsewhere), loads the base model on the transformers side for keys and embeddings, and serves the
OpenAI-compatible front on ``--port``. Memories are read from folders (rechecked every ``--check-interval``
seconds), a folder of memory folders, or the Hub, and swapped in without restarting vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import threading
import time
from typing import Any, Iterator, Optional, Sequence

logger = logging.getLogger("hf_titans.serving")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-titans serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model: a local folder or Hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--memory", action="append", default=[], metavar="NAME=SOURCE",
                   help="serve a memory folder or Hub repo (SOURCE[@REVISION]) as NAME; repeatable")
    p.add_argument("--memories-dir", action="append", default=[], metavar="DIR",
                   help="serve every memory folder in DIR by its folder name (rescanned); repeatable")
    p.add_argument("--host", default="127.0.0.1", help="the front's address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="the front's port (default 8000)")
    p.add_argument("--base-name", default="base", help="the 'model' name that means no memory (default: base)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' at the front")
    p.add_argument("--upstream", help="a running `vllm serve --enable-prompt-embeds` URL; else one is started")
    p.add_argument("--upstream-api-key", help="the API key of the vLLM server, if it has one")
    p.add_argument("--vllm-port", type=int, default=8001, help="port of the vLLM server started here (default 8001)")
    p.add_argument("--vllm-dtype", default="float32", help="vLLM --dtype (default float32, as the CPU build needs)")
    p.add_argument("--max-model-len", type=int, default=2048, help="vLLM --max-model-len (default 2048)")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for vllm serve (repeat; e.g. --vllm-arg=--enforce-eager)")
    p.add_argument("--vllm-log", help="file for the vLLM server's output (default: discarded)")
    p.add_argument("--vllm-executable", help="run `EXECUTABLE serve MODEL ...` (e.g. vllm) instead of "
                                             "`python -m vllm.entrypoints.openai.api_server --model MODEL ...`")
    p.add_argument("--check-interval", type=float, default=1.0, help="seconds between checks of memory folders")
    p.add_argument("--hub-check-interval", type=float, default=60.0, help="seconds between Hub revision checks")
    p.add_argument("--ignore-base-mismatch", action="store_true", help="load memories written through another base")
    p.add_argument("--log-level", default="info")
    return p


def _memory_specs(values: Sequence[str]) -> list[tuple[str, str, Optional[str]]]:
    specs = []
    for value in values:
        name, sep, source = value.partition("=")
        if not sep or not name or not source:
            raise SystemExit(f"--memory takes NAME=SOURCE, got {value!r}")
        revision = None
        if "@" in source and not source.startswith((".", "/", "~")):
            source, revision = source.rsplit("@", 1)
        specs.append((name, source, revision))
    return specs


@contextlib.contextmanager
def front_in_thread(app: Any, port: int, host: str = "127.0.0.1") -> Iterator[Any]:
    """Run the memory front ``app`` with uvicorn in a background thread until the block ends (benchmarks, tests)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the memory front did not start on {host}:{port}")
        time.sleep(0.1)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(30)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    specs = _memory_specs(args.memory)
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise SystemExit(f"the memory front needs the serve extra: pip install 'hf_titans[serve]' ({err})")

    from ..base_model import load_base_model
    from .app import create_app
    from .memories import MemoryBank
    from .vllm import VLLMServer, default_model_dir

    model, tokenizer = load_base_model(args.model) if args.model else load_base_model()
    bank = MemoryBank(model, tokenizer, ignore_base_mismatch=args.ignore_base_mismatch,
                      check_interval=args.check_interval, hub_check_interval=args.hub_check_interval)
    for name, source, revision in specs:
        bank.add(name, source, revision=revision)
    for root in args.memories_dir:
        bank.add_directory(root)
    logger.info("memories: %s", ", ".join(bank.names()) or "none yet")
    server = None
    upstream = args.upstream
    if upstream is None:
        served = args.model or str(default_model_dir())
        server = VLLMServer(served, port=args.vllm_port, dtype=args.vllm_dtype, max_model_len=args.max_model_len,
                            extra_args=args.vllm_arg, log_path=args.vllm_log, executable=args.vllm_executable)
        logger.info("starting vLLM on %s (%s)", server.url, " ".join(server.command))
        server.start()
        upstream = server.url
    try:
        app = create_app(bank, upstream, base_name=args.base_name, api_key=args.api_key,
                         upstream_api_key=args.upstream_api_key)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
