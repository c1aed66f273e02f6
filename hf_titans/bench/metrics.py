"""Teacher-forced scoring (Rel / Gen / Loc as in EasyEdit, WISE, GRACE) that sees what generation sees.

Every scored row is ``[soft prompt] + prompt tokens + target tokens`` (the soft prompt before the prompt's last
sentence instead when that is what the memory recognised, as in ``generate``), left-padded, run once through the model;
the prediction for target token ``j`` is the argmax of the logits at the position before it. The prompt is
tokenised exactly as :class:`~hf_titans.HybridTitansEngine` tokenises it for ``generate`` and the target as
``" " + target`` without special tokens, so the first target prediction is the token greedy generation would
produce next. The memory's key and gate come from the **prompt only** (:func:`memory_soft_prompts`), never from
the target, exactly as at generation time.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from ..injection import input_embeddings


class SoftPrompt(NamedTuple):
    """Vectors ``(n, hidden)`` put into a scored row right before prompt token ``at`` (0: in front of the prompt)."""

    vectors: torch.Tensor
    at: int = 0


Soft = Optional[SoftPrompt]  # what goes into a row, or None


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's ids as the engine encodes them (special tokens added, no padding)."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_target(tokenizer, target: str) -> list[int]:
    """The target's ids when it follows a prompt: ``" " + target`` without special tokens."""
    ids = list(tokenizer(" " + target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return ids


def memory_soft_prompts(engine, prompts: Sequence[str], batch_size: int = 1) -> tuple[list[Soft], list[float]]:
    """Per prompt: the soft prompt the memory puts into it at generation time, with the prompt token it stands in
    front of (``None`` when it is silent), and its familiarity. Uses :meth:`HybridTitansEngine.prepare_inputs`, so
    gate and key are computed from the prompt alone. Where the memory recites (``MemoryConfig.recite_tokens``) the
    vectors are the token embeddings of the recitation, before the sentence it recites, as ``generate`` sees them.

    ``batch_size=1`` (the default) gives what ``engine.generate(prompt)`` sees for each prompt on its own. With
    larger batches it gives what a batched ``generate`` sees; for models that take absolute positions from
    the left-padded sequence when the key is computed (GPT-2), a prompt's key then depends on its batch-mates.
    """
    softs: list[Soft] = []
    familiarity: list[float] = []
    embed = input_embeddings(engine.model)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        inputs = engine.prepare_inputs(chunk)
        for i, prompt in enumerate(chunk):
            first = int(inputs["attention_mask"][i].argmax())  # the engine left-pads
            at = int(inputs["insert_at"][i]) - first
            if inputs["recitations"][i] is not None:
                recited = len(inputs["input_ids"][i]) - first - len(encode_prompt(engine.tokenizer, prompt))
                words = inputs["input_ids"][i, first + at - recited:first + at]
                softs.append(SoftPrompt(embed(words).detach(), at - recited))
            elif bool(inputs["speaks"][i]):
                softs.append(SoftPrompt(inputs["soft_prompts"][i].detach(), at))
            else:
                softs.append(None)
            familiarity.append(float(inputs["familiarity"][i]))
    return softs, familiarity


def build_rows(model: nn.Module, rows: Sequence[tuple[Soft, Sequence[int], Sequence[int]]],
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``inputs_embeds``, ``attention_mask`` and ``position_ids`` for ``(soft, prompt_ids,
    target_ids)`` rows, positions counted over real tokens only (as the engine and ``generate`` do)."""
    emb = input_embeddings(model)
    weight = emb.weight
    pieces = []
    for soft, prompt_ids, target_ids in rows:
        ids = torch.tensor(list(prompt_ids) + list(target_ids), dtype=torch.long, device=weight.device)
        e = emb(ids)
        if soft is not None:
            e = torch.cat([e[:soft.at], soft.vectors.to(device=e.device, dtype=e.dtype), e[soft.at:]], dim=0)
        pieces.append(e)
    length = max(p.shape[0] for p in pieces)
    embeds = weight.new_zeros(len(pieces), length, weight.shape[1])
    mask = torch.zeros(len(pieces), length, dtype=torch.long, device=weight.device)
    for i, p in enumerate(pieces):
        embeds[i, length - p.shape[0]:] = p
        mask[i, length - p.shape[0]:] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return embeds, mask, position_ids


def teacher_forced_logits(model: nn.Module, rows: Sequence[tuple[Soft, Sequence[int], Sequence[int]]],
                          ) -> list[torch.Tensor]:
    """Per row, the logits ``(len(target), vocab)`` predicting each target token (one forward pass). A soft prompt
    always stands before some prompt token, so the target is each row's last ``len(target)`` positions."""
    embeds, mask, position_ids = build_rows(model, rows)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False)
    length = embeds.shape[1]
    result = []
    for i, (_, _, target_ids) in enumerate(rows):
        k = len(target_ids)
        result.append(out.logits[i, length - k - 1:length - 1])
    return result


@torch.no_grad()
def target_predictions(model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                       softs: Sequence[Soft] | None = None, batch_size: int = 16) -> list[list[int]]:
    """Argmax token at each target position of ``prompt + " " + target`` (teacher forcing), per row."""
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    softs = list(softs) if softs is not None else [None] * len(prompts)
    preds: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        rows = [(softs[i], encode_prompt(tokenizer, prompts[i]), encode_target(tokenizer, targets[i]))
                for i in range(start, min(start + batch_size, len(prompts)))]
        for logits in teacher_forced_logits(model, rows):
            preds.append(logits.argmax(-1).tolist())
    return preds


def token_accuracy(preds: Sequence[Sequence[int]], refs: Sequence[Sequence[int]]) -> list[float]:
    """Per row, the fraction of positions where the prediction equals the reference token."""
    out = []
    for p, r in zip(preds, refs):
        if len(p) != len(r):
            raise ValueError("prediction and reference lengths differ")
        out.append(sum(int(a == b) for a, b in zip(p, r)) / len(r))
    return out


def target_ids(tokenizer, targets: Sequence[str]) -> list[list[int]]:
    return [encode_target(tokenizer, t) for t in targets]


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")
