"""How the memory reaches the frozen model: keys from its early layers, soft prompts through ``inputs_embeds``.

Memory as context (MAC, Titans sec. 4.1): the memory's vectors are placed in front of the prompt's token
embeddings (or of its last sentence, when that is what the memory recognised), and the frozen model attends to
them like ordinary tokens. Prompts the memory does not speak for
get no vectors at all (their rows are left-padded instead), so they reach the model unchanged.
"""

from __future__ import annotations

import re

import torch
from torch import nn


class _StopForward(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks (Llama ``model.layers``, GPT-2 ``transformer.h``, ...)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and len(module) > 0:
            if best is None or name.count(".") < best[0].count("."):
                best = (name, module)
    if best is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; set key_layer=0 "
                         "to key the memory on input embeddings")
    return best[1]


def input_embeddings(model: nn.Module) -> nn.Module:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if emb is None:
        raise TypeError(f"{type(model).__name__} has no input embeddings (get_input_embeddings() is None); "
                        "hf_titans needs a causal LM that accepts inputs_embeds")
    return emb


def keep_gradients_flowing(model: nn.Module) -> None:
    """Keep gradients flowing to the soft prompt through bitsandbytes 4-bit layers on the CPU.

    On a CPU with AVX512-BF16, bitsandbytes (seen with 0.50.1 and 0.50.2) repacks a ``Linear4bit``'s weights for
    an inference-only kernel the first time it runs in eval mode without gradients, and from then on uses that
    kernel even when the input needs a gradient: nothing flows back, and a write leaves the memory unchanged
    (measured on a tiny 4-bit Llama: surprise 8.60 nats before a write, 8.73 after). Turn the repacking off on
    every such layer and undo it where it happened (the original packed weights come back exactly)."""
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


@torch.no_grad()
def hidden_at_layer(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    layer: int) -> torch.Tensor:
    """Hidden states ``(B, T, H)`` entering decoder layer ``layer``; runs only the layers before it.

    Positions count each row's real tokens only, so a left-padded row gets the hidden states it has alone (models
    with absolute position embeddings, e.g. GPT-2, would otherwise see its tokens shifted by the padding)."""
    if layer == 0:
        return input_embeddings(model)(input_ids)
    blocks = decoder_layers(model)
    if layer > len(blocks):
        raise ValueError(f"key_layer={layer} but the model has only {len(blocks)} layers")
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _StopForward

    handle = blocks[layer - 1].register_forward_hook(hook)
    try:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["h"]


def prefix_means(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Causal running mean of hidden states over each row's real tokens, skipping the first one.

    The first position of a causal LM is an attention sink with outsized activations; leaving it out keeps
    the key about the prompt's content. Returns ``(B, T, H)``: entry ``t`` is the key of the prefix ending
    at ``t``, so a prompt's key equals the key of the same prefix inside a longer taught text.
    """
    mask = attention_mask.to(hidden.dtype).clone()
    first = mask.argmax(dim=1)
    counts_all = mask.sum(dim=1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    mask[rows[counts_all > 1], first[counts_all > 1]] = 0  # keep the first token only if it is alone
    summed = torch.cumsum(hidden.float() * mask.unsqueeze(-1), dim=1)
    counts = torch.cumsum(mask, dim=1).clamp_min(1).unsqueeze(-1)
    return summed / counts


def join_prefix(token_embeds: torch.Tensor, attention_mask: torch.Tensor, prefix: torch.Tensor,
                prefix_mask: torch.Tensor, insert_at: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``inputs_embeds`` with each row's real prefix vectors (``prefix_mask``) placed among its tokens.

    ``prefix`` is ``(B, n, H)``; a row gets the vectors its ``prefix_mask`` row marks, in order, right before its
    token at position ``insert_at[b]`` (default: its first real token, i.e. in front of the prompt); the tokens
    before that point move left into the padding. A row with no slot marked (the memory is silent) gets ``n``
    extra left pads, so every row of a batch keeps the bare model's view of its prompt.

    Returns ``(embeds (B, n + T, H), mask (B, n + T), positions (B, T))``: ``positions[b, j]`` is where token ``j``
    of row ``b`` now sits, so the logits predicting it are at ``positions[b, j] - 1``.
    """
    b, t, h = token_embeds.shape
    n = prefix.shape[1]
    out = token_embeds.new_zeros(b, n + t, h)
    mask = attention_mask.new_zeros(b, n + t)
    out[:, n:] = token_embeds
    mask[:, n:] = attention_mask
    positions = torch.arange(n, n + t, device=token_embeds.device).repeat(b, 1)
    for i in range(b):
        real = prefix[i][prefix_mask[i].bool()]
        m = real.shape[0]
        if m == 0:
            continue
        first = int(attention_mask[i].argmax())  # first real token (left padding)
        at = first if insert_at is None else int(insert_at[i])
        if not first <= at < t:
            raise ValueError(f"insert_at[{i}]={at} is not a token of row {i} (its tokens are {first}..{t - 1})")
        out[i, n + first - m:n + at - m] = token_embeds[i, first:at]  # the tokens before the insertion point
        out[i, n + at - m:n + at] = real.to(token_embeds.dtype)
        mask[i, n + first - m:] = 1
        positions[i, :at] -= m
    return out, mask, positions


class LayerMemoryHook:
    """Puts the memory inside decoder layer ``layer`` for the rows of a batch where it speaks (MAG / MAL).

    ``mode="mal"`` (memory as layer): a forward pre-hook replaces the hidden states ``x`` entering the layer by
    ``x + delta(x)``. ``mode="mag"`` (memory as gate): a forward hook adds ``delta(x)`` (a gated branch that reads
    the same input ``x``) to the layer's output. ``delta`` is :meth:`NeuralMemory.layer_delta`. Rows where the
    memory is silent are left bit-for-bit untouched. Works with ``generate()`` and the KV cache: the delta is a
    function of each position's own hidden state, so a cached position is never recomputed differently; a batch
    that ``generate`` expands (beams, several return sequences) repeats each row's flag.
    """

    def __init__(self, model: nn.Module, layer: int, mode: str, delta, speaks: torch.Tensor) -> None:
        blocks = decoder_layers(model)
        if not 0 <= layer < len(blocks):
            raise ValueError(f"memory_layer={layer} but the model has {len(blocks)} decoder layers; "
                             f"choose 0..{len(blocks) - 1}")
        if mode not in ("mag", "mal"):
            raise ValueError(f"LayerMemoryHook is for modes 'mag' and 'mal', got {mode!r}")
        self.block, self.mode, self.delta, self.speaks = blocks[layer], mode, delta, speaks.bool()
        self.handle = None

    def _rows(self, hidden: torch.Tensor) -> torch.Tensor:
        b, n = hidden.shape[0], self.speaks.shape[0]
        rows = self.speaks if b == n else self.speaks.repeat_interleave(b // n) if b % n == 0 else None
        if rows is None:
            raise RuntimeError(f"batch of {b} rows does not match the {n} prompts the memory was read for")
        return rows.to(hidden.device).view(b, *([1] * (hidden.dim() - 1)))

    def _mix(self, hidden: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return torch.where(self._rows(base), base + self.delta(hidden), base)

    def _pre(self, _module, args, kwargs):
        if args:
            return (self._mix(args[0], args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = self._mix(kwargs["hidden_states"], kwargs["hidden_states"])
        return args, kwargs

    def _post(self, _module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        if isinstance(output, tuple):
            return (self._mix(x, output[0]), *output[1:])
        return self._mix(x, output)

    def __enter__(self) -> "LayerMemoryHook":
        if self.mode == "mal":
            self.handle = self.block.register_forward_pre_hook(self._pre, with_kwargs=True)
        else:
            self.handle = self.block.register_forward_hook(self._post, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


#: Where a sentence of running text ends: ``.``, ``!`` or ``?`` (closing quotes or brackets after it) before white
#: space, or a line break. The reader cuts documents into sentences with it; the engine ends a recitation with it.
SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)|\n")


def _ends_sentence(text: str) -> bool:
    return "\n" in text or text.rstrip().rstrip("\"')]").endswith((".", "!", "?"))


def last_sentence_starts(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         max_tokens: int = 256) -> list[int]:
    """Per row, the position of the first token of the prompt's last sentence.

    A token whose text ends in ``.``, ``!`` or ``?`` (or holds a line break) ends a sentence; the prompt's own last
    token does not count, so "What is the pass key? The pass key is" gives the position of "The" and a
    one-sentence prompt gives its first real token. Only the last ``max_tokens`` tokens are searched. Works for
    left- and right-padded rows."""
    starts = []
    for row, m in zip(input_ids.tolist(), attention_mask.tolist()):
        real = [p for p, v in enumerate(m) if v]
        start = real[0]
        for p in reversed(real[max(0, len(real) - 1 - max_tokens):-1]):
            if _ends_sentence(tokenizer.decode([row[p]])):
                start = p + 1
                break
        starts.append(start)
    return starts


def last_sentences(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's last sentence (its tokens from ``starts[b]``) as a text of its own, in a new left-padded batch
    ``(ids, mask)``: decoded, stripped of leading whitespace and tokenised again as a taught text is.

    Keyed on their own, they give the key the same sentence gets when it is written as a text of its own. Keyed
    inside the prompt, the sentence before would move it (cosine 0.75 between the two keys of "The pass key is" on
    SmolLM2-135M); and its tokens as cut from the prompt start with a space (" Howard" where the taught text had
    "Howard"), which on SmolLM2-135M dropped a taught CounterFact prompt's familiarity from 0.62 to 0.17."""
    rows = []
    for b, start in enumerate(starts):
        tail = input_ids[b, start:][attention_mask[b, start:].bool()]
        text = tokenizer.decode(tail).lstrip()
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] if text else []
        rows.append(torch.tensor(ids, dtype=input_ids.dtype) if len(ids) else tail.cpu())
    width = max(len(r) for r in rows)
    ids = input_ids.new_zeros(len(rows), width)
    mask = attention_mask.new_zeros(len(rows), width)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = row.to(ids.device)
        mask[b, width - len(row):] = 1
    return ids, mask


def prompt_key_candidates(model: nn.Module, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The raw keys ``(B, H)`` a prompt can be read with, and where each candidate text starts ``(B,)``: its whole
    text (from its first real token), then, when some row has more than one sentence, its last sentence keyed on
    its own tokens (a one-sentence row gets its whole text again). Rows may be left- or right-padded. The engine
    and the vLLM bank both read prompts through this, and put the soft prompt in front of the candidate read."""
    whole = prefix_means(hidden_at_layer(model, input_ids, attention_mask, layer), attention_mask)[:, -1]
    firsts = attention_mask.argmax(1)
    starts = last_sentence_starts(tokenizer, input_ids, attention_mask)
    if all(start == int(first) for start, first in zip(starts, firsts)):
        return [whole], [firsts]
    tail, tail_mask = last_sentences(tokenizer, input_ids, attention_mask, starts)
    sentence = prefix_means(hidden_at_layer(model, tail, tail_mask, layer), tail_mask)[:, -1]
    return [whole, sentence], [firsts, torch.tensor(starts, device=firsts.device)]
