"""Memories on vLLM: offline generation with a ``vllm.LLM``, and starting ``vllm serve`` for the online front.

Offline, several memories at once on one base model:

    from vllm import LLM, SamplingParams
    from hf_titans import load_base_model
    from hf_titans.serving import MemoryBank, MemoryLLM, default_model_dir

    model, tokenizer = load_base_model()                 # the transformers side: keys and embeddings
    bank = MemoryBank(model, tokenizer)
    bank.add("omega", "memories/project-omega")
    bank.add("meeting", "memories/meeting")
    llm = LLM(model=str(default_model_dir()), dtype="float32", enable_prompt_embeds=True)   # same weights
    out = MemoryLLM(llm, bank).generate(
        ["The secret project code is", "The meeting is at", "The capital of France is"],
        memory=["omega", "meeting", "omega"], sampling_params=SamplingParams(max_tokens=16, temperature=0))
    out[0].text, out[0].speaks                            # ' Omega-99. ...', True

Each prompt goes to vLLM as ``{"prompt_embeds": ...}`` (the memory's soft prompt before the token embeddings) when
its memory speaks, and as ``{"prompt_token_ids": ...}`` (exactly the bare model's request) when the memory is silent.
This module imports vLLM only inside the functions that need it; the core package never imports it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .memories import MemoryBank, Prompt, PromptEmbeds

logger = logging.getLogger(__name__)


def default_model_dir() -> Path:
    """The safetensors folder of the embedded SmolLM2-135M-Instruct (converted once), which vLLM can load."""
    from ..base_model import default_model_dir as _default

    return _default()


def vllm_inputs(items: Sequence[PromptEmbeds], silent_as_tokens: bool = True) -> list[dict[str, Any]]:
    """vLLM prompt dicts: ``{"prompt_embeds": tensor}`` where the memory speaks, token ids where it is silent."""
    out = []
    for item in items:
        if item.speaks or not silent_as_tokens:
            out.append({"prompt_embeds": item.embeds})
        else:
            out.append({"prompt_token_ids": list(item.token_ids)})
    return out


@dataclass
class MemoryOutput:
    """One prompt's answer: vLLM's ``RequestOutput`` and what the memory did."""

    output: Any  # vllm.RequestOutput
    memory: Optional[str]
    speaks: bool
    familiarity: Optional[float]
    version: Optional[int]

    @property
    def text(self) -> str:
        """The first completion's text."""
        return self.output.outputs[0].text

    @property
    def texts(self) -> list[str]:
        return [o.text for o in self.output.outputs]


class MemoryLLM:
    """A ``vllm.LLM`` whose prompts each go through their own memory from a :class:`MemoryBank`.

    The LLM must serve the same weights as ``bank.model`` and be built with ``enable_prompt_embeds=True``.
    """

    def __init__(self, llm: Any, bank: MemoryBank, silent_as_tokens: bool = True) -> None:
        self.llm = llm
        self.bank = bank
        self.silent_as_tokens = silent_as_tokens

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]], memory: Union[None, str, Sequence[Optional[str]]] = None,
                 sampling_params: Any = None, *, add_special_tokens: bool = True, use_tqdm: bool = False,
                 **generate_kwargs: Any) -> list[MemoryOutput]:
        """Generate for ``prompts`` (strings or token-id lists), each with its memory: one name for all, a list
        with a name (or None) per prompt, or None for none. ``sampling_params`` is vLLM's ``SamplingParams`` (one,
        or one per prompt); other keywords go to ``LLM.generate``."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and all(isinstance(i, int) for i in prompts)):
            prompts = [prompts]
        items = self.bank.embed(list(prompts), memory, add_special_tokens=add_special_tokens)
        outputs = self.llm.generate(vllm_inputs(items, self.silent_as_tokens), sampling_params, use_tqdm=use_tqdm,
                                    **generate_kwargs)
        return [MemoryOutput(o, p.memory, p.speaks, p.familiarity, p.version) for o, p in zip(outputs, items)]


def make_llm(model: Union[str, os.PathLike, None] = None, **kwargs: Any) -> Any:
    """A ``vllm.LLM`` for memories: ``enable_prompt_embeds=True`` and, on CPU, ``dtype="float32"``,
    ``enforce_eager=True``, ``max_model_len=2048`` unless given. ``model`` defaults to the embedded SmolLM2 folder.

    On a CPU build set ``VLLM_CPU_KVCACHE_SPACE`` (GiB) first, and call this under ``if __name__ == "__main__":``.
    """
    from vllm import LLM

    options = {"enable_prompt_embeds": True, "dtype": "float32", "enforce_eager": True, "max_model_len": 2048}
    options.update(kwargs)
    return LLM(model=str(model if model is not None else default_model_dir()), **options)


# ---------------------------------------------------------------------------------------------- vllm serve
def vllm_serve_command(model: Union[str, os.PathLike], port: int, host: str = "127.0.0.1",
                       served_model_name: Optional[str] = None, dtype: str = "float32", max_model_len: int = 2048,
                       extra_args: Sequence[str] = (), executable: Optional[str] = None) -> list[str]:
    """The command line of vLLM's own OpenAI server with ``--enable-prompt-embeds``.

    By default ``python -m vllm.entrypoints.openai.api_server --model MODEL ...`` with this Python: the ``vllm``
    console script of the ``vllm-cpu`` 0.32.0 distribution fails at start (it asks for the version of a
    distribution named ``vllm``). ``executable="vllm"`` (or a path) runs ``vllm serve MODEL ...`` instead.
    """
    if executable:
        command = [executable, "serve", str(model)]
    else:
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    command += ["--enable-prompt-embeds", "--host", host, "--port", str(port), "--dtype", dtype,
                "--max-model-len", str(max_model_len)]
    if served_model_name:
        command += ["--served-model-name", served_model_name]
    return command + list(extra_args)


class VLLMServer:
    """vLLM's OpenAI server (``vllm serve --enable-prompt-embeds``) as a child process; a context manager that waits until it is ready.

        with VLLMServer(default_model_dir(), port=8001, extra_args=["--enforce-eager"]) as server:
            server.url   # http://127.0.0.1:8001
    """

    def __init__(self, model: Union[str, os.PathLike], port: int = 8001, host: str = "127.0.0.1",
                 served_model_name: Optional[str] = None, dtype: str = "float32", max_model_len: int = 2048,
                 extra_args: Sequence[str] = (), env: Optional[dict[str, str]] = None,
                 log_path: Union[str, os.PathLike, None] = None, startup_timeout: float = 600.0,
                 executable: Optional[str] = None) -> None:
        self.command = vllm_serve_command(model, port, host, served_model_name, dtype, max_model_len, extra_args,
                                          executable)
        self.url = f"http://{host}:{port}"
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.process: Optional[subprocess.Popen] = None
        self._log = None

    def start(self) -> "VLLMServer":
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")
        logger.info("starting %s", " ".join(self.command))
        self.process = subprocess.Popen(self.command, env=self.env, stdout=self._log or subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                where = f"; see {self.log_path}" if self.log_path else ""
                raise RuntimeError(f"vllm serve exited with code {self.process.returncode} while starting{where}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(2)
        self.stop()
        raise TimeoutError(f"vllm serve was not ready at {self.url} after {self.startup_timeout:.0f} s")

    def stop(self) -> None:
        # vllm serve starts its engine in child processes: signal the process group this server started.
        if self.process is not None and self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)  # its own session (start_new_session=True): only what it started
        except (ProcessLookupError, PermissionError):
            self.process.send_signal(sig)

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
