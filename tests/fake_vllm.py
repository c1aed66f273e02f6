"""A stand-in for ``vllm serve --enable-prompt-embeds`` for tests without vLLM: the part of its OpenAI Completions API
that the memory front uses, answered greedily by a transformers model.

``prompt`` (token ids or text) or ``prompt_embeds`` (base64 ``torch.save`` bytes of a ``(sequence, hidden)`` tensor, as
vLLM decodes them), ``max_tokens``, ``n``, ``stream``; ``/v1/models`` and ``/health``. Every request body is kept in
``app.state.requests``. The real server is exercised by tests/test_serving_vllm.py.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import time

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def create_fake_vllm(model, tokenizer, served_name: str = "fake-base") -> FastAPI:
    app = FastAPI()
    app.state.requests = []

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "vllm"}]}

    def generate(body: dict) -> tuple[list[int], torch.Tensor]:
        max_tokens = int(body.get("max_tokens") or 16)
        with torch.no_grad():
            if body.get("prompt_embeds") is not None:
                embeds = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True)
                assert embeds.dim() == 2, embeds.shape
                out = model.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0],
                                     dtype=torch.long), max_new_tokens=max_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or 0)[0]
                return list(range(embeds.shape[0])), out
            prompt = body["prompt"]
            ids = torch.tensor([prompt if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)[0, ids.shape[1]:]
            return ids[0].tolist(), out

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.requests.append(body)
        if body.get("model") != served_name:
            return JSONResponse({"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                           "type": "NotFoundError", "param": None, "code": 404}}, status_code=404)
        if body.get("prompt") is None and body.get("prompt_embeds") is None:
            return JSONResponse({"error": {"message": "prompt or prompt_embeds is required", "type": "BadRequestError",
                                           "param": None, "code": 400}}, status_code=400)
        try:
            prompt, out = generate(body)
        except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:  # as vLLM: 400, not 500
            return JSONResponse({"error": {"message": f"`prompt_embeds` could not be deserialized: {err}"[:300],
                                           "type": "BadRequestError", "param": "prompt_embeds", "code": 400}},
                                status_code=400)
        n = int(body.get("n") or 1)
        new = out.tolist()
        eos = tokenizer.eos_token_id
        finish = "stop" if eos in new else "length"
        if eos in new:
            new = new[:new.index(eos)]
        text = tokenizer.decode(new, skip_special_tokens=True)
        created = int(time.time())
        if body.get("stream"):
            def events():
                for i in range(n):
                    for j, token in enumerate(new):
                        piece = tokenizer.decode(new[:j + 1], skip_special_tokens=True)[
                            len(tokenizer.decode(new[:j], skip_special_tokens=True)):]
                        yield "data: " + json.dumps({"id": "cmpl-fake", "object": "text_completion", "created": created,
                                                     "model": served_name, "choices": [
                                                         {"index": i, "text": piece, "finish_reason": None}]}) + "\n\n"
                    yield "data: " + json.dumps({"id": "cmpl-fake", "object": "text_completion", "created": created,
                                                 "model": served_name, "choices": [
                                                     {"index": i, "text": "", "finish_reason": finish}]}) + "\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield "data: " + json.dumps({"id": "cmpl-fake", "object": "text_completion", "created": created,
                                                 "model": served_name, "choices": [], "usage": {
                                                     "prompt_tokens": len(prompt), "completion_tokens": n * len(new),
                                                     "total_tokens": len(prompt) + n * len(new)}}) + "\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"id": "cmpl-fake", "object": "text_completion", "created": created, "model": served_name,
                "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": None} for i in range(n)],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": n * len(new),
                          "total_tokens": len(prompt) + n * len(new)}}

    return app
