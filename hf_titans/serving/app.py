"""An OpenAI-compatible front that puts memories in front of a ``vllm serve --enable-prompt-embeds`` server.

    bank = MemoryBank(model, tokenizer); bank.add("omega", "memories/project-omega")
    app = create_app(bank, "http://127.0.0.1:8001")      # vLLM's own OpenAI server, started separately
    uvicorn.run(app, port=8000)

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="omega", prompt="The secret project code is", max_tokens=16)
    client.chat.completions.create(model="omega", messages=[...])
    client.completions.create(model="base", prompt="...", extra_headers={"X-Memory": "omega"})

A request names its memory with the ``model`` field (a memory name; the base model's name means no memory) or an
``X-Memory`` header (``none`` for no memory). The front computes the prompt embeddings on the transformers side
(:class:`MemoryBank`), sends them base64-encoded as ``prompt_embeds`` to vLLM's ``/v1/completions`` (or the token
ids when the memory is silent for that prompt, which is the bare model's request exactly), and hands vLLM's answer
back with ``model`` set to what was asked and an extra ``hf_titans`` field telling what the memory did. Chat requests
are templated here with the tokenizer's chat template (the memory keys on the whole templated prompt, as the engine
would) and sent as completions; the answer comes back as a chat completion. All parsing is FastAPI/pydantic; the
streamed answers are vLLM's server-sent events, re-emitted one JSON document at a time.
"""

# No `from __future__ import annotations`: FastAPI reads the route functions' annotations (Request is imported
# inside create_app, so it must be resolved when the functions are defined).

import asyncio
import base64
import io
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Optional, Union

import torch

from .memories import MemoryBank, PromptEmbeds, UnknownMemoryError

logger = logging.getLogger(__name__)

MEMORY_HEADER = "X-Memory"
NO_MEMORY = ("none", "base", "")
# Chat fields handled here, not forwarded to the completions endpoint.
_CHAT_LOCAL = {"model", "messages", "max_completion_tokens", "add_generation_prompt", "continue_final_message",
               "chat_template_kwargs", "chat_template", "documents", "parallel_tool_calls", "store", "metadata",
               "modalities", "reasoning_effort", "web_search_options", "prediction", "service_tier",
               "include_reasoning"}
_CHAT_UNSUPPORTED = ("tools", "functions", "function_call", "logprobs", "top_logprobs", "audio")


def encode_prompt_embeds(embeds: torch.Tensor) -> str:
    """A ``(sequence, hidden)`` tensor as vLLM's ``prompt_embeds`` field takes it: ``torch.save`` bytes, base64."""
    if embeds.dim() != 2:
        raise ValueError(f"prompt embeddings must be (sequence, hidden), got shape {tuple(embeds.shape)}")
    buffer = io.BytesIO()
    torch.save(embeds.detach().to("cpu").contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_prompt_embeds(data: Union[str, bytes]) -> torch.Tensor:
    """The inverse of :func:`encode_prompt_embeds` (tensors only: ``weights_only=True``)."""
    return torch.load(io.BytesIO(base64.b64decode(data)), weights_only=True, map_location="cpu")


class FrontError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def route(model: Optional[str], header: Optional[str], memories: Any, base_names: set[str]) -> Optional[str]:
    """Which memory a request uses: the ``X-Memory`` header if given (``none`` for no memory), else ``model`` when
    it names a memory; the base model's name means no memory. ``memories`` supports ``in``. Raises FrontError."""
    if not isinstance(model, str) or not model:
        raise FrontError(400, "'model' is required: a memory name or the base model's name", "model")
    model_is_base = model in base_names
    if header is not None:
        wanted = header.strip()
        if wanted.lower() in NO_MEMORY:
            if not model_is_base and model in memories:
                raise FrontError(400, f"the {MEMORY_HEADER} header says no memory but 'model' names memory "
                                      f"{model!r}", "model")
            if not model_is_base and model not in memories:
                raise FrontError(404, f"the model {model!r} does not exist", "model", "model_not_found")
            return None
        if wanted not in memories:
            raise FrontError(404, f"no memory named {wanted!r} (from the {MEMORY_HEADER} header)", MEMORY_HEADER,
                             "memory_not_found")
        if not model_is_base and model != wanted:
            raise FrontError(400, f"'model' names {model!r} but the {MEMORY_HEADER} header names {wanted!r}; use the "
                                  f"base model's name or the same memory", "model")
        return wanted
    if model_is_base:
        return None
    if model in memories:
        return model
    raise FrontError(404, f"the model {model!r} does not exist: name a memory or the base model "
                          f"({', '.join(sorted(base_names))})", "model", "model_not_found")


def completion_prompts(body: dict[str, Any]) -> list[Union[str, list[int]]]:
    """The prompts of a completions request (a string, strings, token ids, or lists of token ids)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [list(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
               for p in prompt):
            return [list(p) for p in prompt]
    raise FrontError(400, "'prompt' must be a non-empty string, list of strings, list of token ids or list of "
                          "lists of token ids", "prompt")


def chat_text(content: Any) -> str:
    """The text of a chat message's content (a string, or a list of text parts)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise FrontError(400, f"only text content is supported through the memory front, got {kind!r}",
                                 "messages")
        return "".join(texts)
    raise FrontError(400, f"a message's content must be a string or a list of parts, got {type(content).__name__}",
                     "messages")


def chat_token_ids(tokenizer: Any, body: dict[str, Any]) -> list[int]:
    """Apply the tokenizer's chat template to a chat request's messages; the token ids of the templated prompt."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FrontError(400, "'messages' must be a non-empty list", "messages")
    plain = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise FrontError(400, "each message must be an object with a 'role'", "messages")
        plain.append({"role": message["role"], "content": chat_text(message.get("content"))})
    if getattr(tokenizer, "chat_template", None) is None and body.get("chat_template") is None:
        raise FrontError(400, "the base model's tokenizer has no chat template; use /v1/completions", "messages")
    continue_final = bool(body.get("continue_final_message", False))
    kwargs = dict(body.get("chat_template_kwargs") or {})
    try:
        text = tokenizer.apply_chat_template(
            plain, tokenize=False, chat_template=body.get("chat_template"),
            add_generation_prompt=bool(body.get("add_generation_prompt", not continue_final)),
            continue_final_message=continue_final, **kwargs)
    except Exception as err:  # jinja and template errors come in many kinds
        raise FrontError(400, f"could not apply the chat template: {type(err).__name__}: {err}", "messages") from err
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise FrontError(400, "the templated chat is empty", "messages")
    return list(ids)


def chat_to_completion_body(body: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields of a chat request as a completions request (without prompt or model)."""
    for key in _CHAT_UNSUPPORTED:
        if body.get(key) not in (None, False, [], {}):
            raise FrontError(400, f"{key!r} is not supported through the memory front (it sends completions to vLLM)",
                             key)
    if body.get("tool_choice") not in (None, "none"):
        raise FrontError(400, "'tool_choice' is not supported through the memory front", "tool_choice")
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") not in (None, "text"):
        raise FrontError(400, "'response_format' other than text is not supported through the memory front",
                         "response_format")
    out = {k: v for k, v in body.items() if k not in _CHAT_LOCAL and k not in _CHAT_UNSUPPORTED
           and k not in ("tool_choice", "response_format")}
    if body.get("max_completion_tokens") is not None:
        out["max_tokens"] = body["max_completion_tokens"]
    return out


def hf_titans_info(items: list[PromptEmbeds]) -> dict[str, Any]:
    return {"memory": items[0].memory if items else None,
            "version": items[0].version if items else None,
            "speaks": [p.speaks for p in items],
            "familiarity": [p.familiarity for p in items],
            "memory_tokens": [p.n_soft for p in items]}


class EmbedBatcher:
    """Computes the prompt embeddings of concurrent requests together: one pass through the base model's early
    layers for all of them (and one read per memory), instead of one per request.

    Requests queue up; a single worker takes everything queued (waiting ``window`` seconds for more after the first)
    and runs :meth:`MemoryBank.embed` once in a worker thread. If that fails, each request of the batch is computed
    alone so that an error reaches only the request that caused it.
    """

    def __init__(self, bank: MemoryBank, run_in_thread: Any, window: float = 0.002, max_prompts: int = 256) -> None:
        self.bank, self.run_in_thread = bank, run_in_thread
        self.window, self.max_prompts = float(window), int(max_prompts)
        self.queue: Optional[asyncio.Queue] = None
        self.task: Optional[asyncio.Task] = None
        self.batches = 0  # how many bank.embed calls were made (for tests and stats)

    async def embed(self, prompts: list, memory: Optional[str]) -> list[PromptEmbeds]:
        if self.task is None or self.task.done():
            self.queue = asyncio.Queue()
            self.task = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((prompts, memory, future))
        return await future

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            count = len(batch[0][0])
            deadline = loop.time() + self.window
            while count < self.max_prompts:
                try:
                    item = self.queue.get_nowait() if loop.time() >= deadline else await asyncio.wait_for(
                        self.queue.get(), deadline - loop.time())
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                batch.append(item)
                count += len(item[0])
            await self._compute(batch)

    async def _compute(self, batch: list) -> None:
        prompts = [p for item in batch for p in item[0]]
        memories = [item[1] for item in batch for _ in item[0]]
        try:
            self.batches += 1
            items = await self.run_in_thread(self.bank.embed, prompts, memories)
        except Exception:
            for item_prompts, memory, future in batch:  # find which request failed
                try:
                    self.batches += 1
                    result = await self.run_in_thread(self.bank.embed, item_prompts, memory)
                except Exception as err:
                    if not future.done():
                        future.set_exception(err)
                else:
                    if not future.done():
                        future.set_result(result)
            return
        start = 0
        for item_prompts, _memory, future in batch:
            if not future.done():
                future.set_result(items[start:start + len(item_prompts)])
            start += len(item_prompts)


def create_app(bank: MemoryBank, upstream: Any, *, base_name: str = "base", upstream_model: Optional[str] = None,
               api_key: Optional[str] = None, upstream_api_key: Optional[str] = None,
               silent_as_tokens: bool = True, timeout: float = 600.0, batch_window: float = 0.002):
    """The FastAPI app of the memory front.

    Args:
        bank: the memories (and the base model on the transformers side).
        upstream: the vLLM server's URL (``http://host:port``), or an ``httpx.AsyncClient`` for it.
        base_name: the name a request gives as ``model`` for no memory (vLLM's own served name works too).
        upstream_model: the name vLLM serves the model under; asked from its ``/v1/models`` when left out.
        api_key: when set, requests need ``Authorization: Bearer <api_key>``.
        upstream_api_key: the key vLLM was started with (``--api-key``), if any.
        silent_as_tokens: where the memory is silent, send vLLM the token ids (exactly the bare model's request)
            rather than their embeddings.
        batch_window: seconds to wait for more requests before computing embeddings; requests that arrive
            while a batch is being computed join the next one (see :class:`EmbedBatcher`).
    """
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    if isinstance(upstream, str):
        headers = {"Authorization": f"Bearer {upstream_api_key}"} if upstream_api_key else None
        client = httpx.AsyncClient(base_url=upstream.rstrip("/"), timeout=timeout, headers=headers)
        owns_client = True
    else:
        client, owns_client = upstream, False

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()
        if owns_client:
            await client.aclose()

    app = FastAPI(title="hf_titans memory front", lifespan=lifespan)
    state = {"upstream_model": upstream_model}
    app.state.bank = bank

    @app.exception_handler(FrontError)
    async def _front_error(_request: Request, err: FrontError):
        return JSONResponse(err.body(), status_code=err.status)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise FrontError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")

    async def served_model() -> str:
        if state["upstream_model"] is None:
            try:
                response = await client.get("/v1/models")
                response.raise_for_status()
                state["upstream_model"] = response.json()["data"][0]["id"]
            except Exception as err:
                raise FrontError(502, f"the vLLM server did not say which model it serves: {err}") from err
        return state["upstream_model"]

    async def base_names() -> set[str]:
        return {base_name, await served_model()}

    async def read_body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as err:
            raise FrontError(400, f"the request body is not valid JSON: {err}") from err
        if not isinstance(body, dict):
            raise FrontError(400, "the request body must be a JSON object")
        return body

    async def memory_for(request: Request, body: dict[str, Any]) -> Optional[str]:
        names = await run_in_threadpool(bank.names)
        return route(body.get("model"), request.headers.get(MEMORY_HEADER), set(names), await base_names())

    batcher = EmbedBatcher(bank, run_in_threadpool, window=batch_window)
    app.state.batcher = batcher

    async def embed(prompts: list, memory: Optional[str]) -> list[PromptEmbeds]:
        try:
            return await batcher.embed(prompts, memory)
        except UnknownMemoryError as err:
            raise FrontError(404, str(err), "model", "memory_not_found") from err
        except (ValueError, TypeError) as err:
            raise FrontError(400, str(err), "prompt") from err

    def upstream_body(body: dict[str, Any], item: PromptEmbeds, model: str) -> dict[str, Any]:
        out = {k: v for k, v in body.items() if k not in ("prompt", "prompt_embeds", "model")}
        out["model"] = model
        if item.speaks or not silent_as_tokens:
            out["prompt_embeds"] = encode_prompt_embeds(item.embeds)
        else:
            out["prompt"] = item.token_ids
        return out

    def upstream_error(response: Any) -> JSONResponse:
        try:
            content = response.json()
        except ValueError:
            content = FrontError(response.status_code, response.text or "error from the vLLM server").body()
        return JSONResponse(content, status_code=response.status_code)

    async def post_all(bodies: list[dict[str, Any]]) -> list[Any]:
        try:
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
        except httpx.HTTPError as err:
            raise FrontError(502, f"the vLLM server could not be reached: {type(err).__name__}: {err}") from err

    def merge(responses: list[dict[str, Any]], n: int) -> dict[str, Any]:
        result = dict(responses[0])
        choices, usage = [], {}
        for i, response in enumerate(responses):
            for choice in response.get("choices", []):
                choice = dict(choice)
                choice["index"] = i * n + int(choice.get("index", 0))
                choices.append(choice)
            for key, value in (response.get("usage") or {}).items():
                if isinstance(value, int):
                    usage[key] = usage.get(key, 0) + value
        result["choices"] = choices
        if usage:
            result["usage"] = usage
        return result

    async def open_streams(bodies: list[dict[str, Any]]):
        """Start the first upstream stream now (so an error is answered with its status), the rest lazily."""
        first = client.build_request("POST", "/v1/completions", json=bodies[0])
        try:
            response = await client.send(first, stream=True)
        except httpx.HTTPError as err:
            raise FrontError(502, f"the vLLM server could not be reached: {type(err).__name__}: {err}") from err
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
            return None, upstream_error(response)
        return response, None

    async def upstream_events(first: Any, bodies: list[dict[str, Any]]) -> AsyncIterator[tuple[int, dict]]:
        """(prompt index, event) for every server-sent event of every prompt's stream, in prompt order."""
        for i, body in enumerate(bodies):
            response = first if i == 0 else None
            if response is None:
                try:
                    response = await client.send(client.build_request("POST", "/v1/completions", json=body),
                                                 stream=True)
                except httpx.HTTPError as err:
                    yield i, FrontError(502, f"the vLLM server could not be reached: {err}").body()
                    return
                if response.status_code != 200:
                    await response.aread()
                    await response.aclose()
                    yield i, json.loads(upstream_error(response).body)
                    return
            try:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    try:
                        yield i, json.loads(data)
                    except ValueError:
                        yield i, FrontError(502, f"the vLLM server sent an unreadable event: {data[:200]}").body()
                        return
            finally:
                await response.aclose()

    def sse(data: Any) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        try:
            response = await client.get("/health")
            ok = response.status_code == 200
        except httpx.HTTPError:
            ok = False
        return JSONResponse({"status": "ok" if ok else "vLLM server unreachable"}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        served = await served_model()
        created = int(time.time())
        data = [{"id": base_name, "object": "model", "created": created, "owned_by": "vllm", "root": served,
                 "parent": None}]
        for name in await run_in_threadpool(bank.names):
            if name != base_name:
                data.append({"id": name, "object": "model", "created": created, "owned_by": "hf_titans",
                             "root": served, "parent": base_name})
        return {"object": "list", "data": data}

    @app.get("/v1/memories")
    async def memories(request: Request):
        check_key(request)
        return {"object": "list", "data": await run_in_threadpool(bank.info)}

    @app.post("/v1/memories/refresh")
    async def refresh_all(request: Request):
        check_key(request)
        return {"result": await run_in_threadpool(bank.refresh)}

    @app.post("/v1/memories/{name:path}/reload")
    async def reload(name: str, request: Request):
        check_key(request)
        try:
            result = await run_in_threadpool(bank.refresh, name, True)
        except UnknownMemoryError as err:
            raise FrontError(404, str(err), "name", "memory_not_found") from err
        return {"result": result, "memory": await run_in_threadpool(bank.info, name)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        body = await read_body(request)
        memory = await memory_for(request, body)
        model = await served_model()
        if body.get("prompt_embeds") is not None:
            if memory is not None or body.get("prompt") is not None:
                raise FrontError(400, "send either 'prompt' (the memory computes the embeddings) or, without a "
                                      "memory, 'prompt_embeds'", "prompt_embeds")
            passthrough = dict(body, model=model)
            if body.get("stream"):
                first, error = await open_streams([passthrough])
                if error is not None:
                    return error
                return StreamingResponse(_completion_stream(first, [passthrough], body, []),
                                         media_type="text/event-stream")
            (response,) = await post_all([passthrough])
            if response.status_code != 200:
                return upstream_error(response)
            return dict(response.json(), model=body["model"])
        prompts = completion_prompts(body)
        items = await embed(prompts, memory)
        bodies = [upstream_body(body, item, model) for item in items]
        if body.get("stream"):
            first, error = await open_streams(bodies)
            if error is not None:
                return error
            return StreamingResponse(_completion_stream(first, bodies, body, items), media_type="text/event-stream",
                                     headers=_info_headers(items))
        responses = await post_all(bodies)
        for response in responses:
            if response.status_code != 200:
                return upstream_error(response)
        n = int(body.get("n") or 1)
        result = merge([r.json() for r in responses], n)
        result["model"] = body["model"]
        result["hf_titans"] = hf_titans_info(items)
        return JSONResponse(result, headers=_info_headers(items))

    async def _completion_stream(first, bodies, body, items) -> AsyncIterator[str]:
        n = int(body.get("n") or 1)
        usage: dict[str, int] = {}
        last: Optional[dict] = None
        async for i, event in upstream_events(first, bodies):
            if "error" in event and "choices" not in event:
                yield sse(event)
                break
            event["model"] = body["model"]
            if not event.get("choices") and event.get("usage"):
                for key, value in event["usage"].items():
                    if isinstance(value, int):
                        usage[key] = usage.get(key, 0) + value
                last = event
                continue
            for choice in event.get("choices", []):
                choice["index"] = i * n + int(choice.get("index", 0))
            yield sse(event)
        if last is not None:
            last["usage"] = usage
            yield sse(last)
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await read_body(request)
        memory = await memory_for(request, body)
        model = await served_model()
        completion = chat_to_completion_body(body)
        ids = await run_in_threadpool(chat_token_ids, bank.tokenizer, body)
        items = await embed([ids], memory)  # token ids of the templated chat: no special tokens added
        upstream = upstream_body(completion, items[0], model)
        chat_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            first, error = await open_streams([upstream])
            if error is not None:
                return error
            return StreamingResponse(_chat_stream(first, upstream, body, chat_id), media_type="text/event-stream",
                                     headers=_info_headers(items))
        (response,) = await post_all([upstream])
        if response.status_code != 200:
            return upstream_error(response)
        data = response.json()
        choices = [{"index": c.get("index", 0), "message": {"role": "assistant", "content": c.get("text", "")},
                    "finish_reason": c.get("finish_reason"), "logprobs": None, "stop_reason": c.get("stop_reason")}
                   for c in data.get("choices", [])]
        result = {"id": chat_id, "object": "chat.completion", "created": data.get("created", int(time.time())),
                  "model": body["model"], "choices": choices, "usage": data.get("usage"),
                  "hf_titans": hf_titans_info(items)}
        return JSONResponse(result, headers=_info_headers(items))

    async def _chat_stream(first, upstream, body, chat_id) -> AsyncIterator[str]:
        started: set[int] = set()
        created = int(time.time())

        def chunk(choices: list, usage: Any = None) -> dict:
            out = {"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": body["model"],
                   "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        async for _i, event in upstream_events(first, [upstream]):
            if "error" in event and "choices" not in event:
                yield sse(event)
                break
            if not event.get("choices") and event.get("usage"):
                yield sse(chunk([], event["usage"]))
                continue
            for choice in event.get("choices", []):
                index = int(choice.get("index", 0))
                if index not in started:
                    started.add(index)
                    yield sse(chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                      "finish_reason": None, "logprobs": None}]))
                delta = {"content": choice["text"]} if choice.get("text") else {}
                yield sse(chunk([{"index": index, "delta": delta, "finish_reason": choice.get("finish_reason"),
                                  "logprobs": None}]))
        yield "data: [DONE]\n\n"

    return app


def _info_headers(items: list[PromptEmbeds]) -> dict[str, str]:
    if not items or items[0].memory is None:
        return {"X-Memory": "none"}
    return {"X-Memory": items[0].memory, "X-Memory-Version": str(items[0].version),
            "X-Memory-Speaks": ",".join("1" if p.speaks else "0" for p in items)}
