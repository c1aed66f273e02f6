"""The edit benchmark: teach knowledge-editing facts with several methods on one frozen model, score Rel/Gen/Loc.

Methods (all share one frozen base model, which none of them changes):

* ``memory``: :class:`~hf_titans.HybridTitansEngine` (default config unless one is given); teaches
  ``prompt + " " + target``.
* ``none``: the bare model (the floor).
* ``in_context``: the taught texts are written before every scored prompt, newest first, as many as fit in
  ``context_budget`` tokens.
* ``lora``: peft LoRA on a deep copy of the base, trained on the same texts with the same number of
  forward+backward passes on each fact as ``memory`` used; ``lora_to_rel`` trains until it reaches the memory's
  Rel or a cap.
* ``seed``: the original design, as a reference point: one soft token from an MLP on the mean input embedding
  of the prompt, always injected, trained with SGD with momentum.

Schedules: ``sequential`` teaches one fact after another (streams of ``stream`` facts, default all ``n``; the
method is reset between streams and each stream is scored when it ends) and ``batch`` teaches all facts in one
call.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..config import MemoryConfig
from ..engine import HybridTitansEngine
from ..injection import decoder_layers, input_embeddings
from .data import EditRecord
from .metrics import (Soft, SoftPrompt, build_rows, encode_prompt, encode_target, mean, memory_soft_prompts,
                      target_predictions, token_accuracy)

METHODS = ("memory", "none", "in_context", "lora", "seed")
SCHEDULES = ("sequential", "batch")


# ---------------------------------------------------------------------------------------------- accounting
class PassCounter:
    """Counts passes through a model's decoder while active, by hooks on its first and last decoder layers.

    ``fwd_bwd``: passes with autograd on (each is followed by a backward in the methods here);
    ``fwd``: full forward passes without autograd; ``partial``: forward passes that stopped early (the memory's
    key computation runs only the first ``key_layer`` layers); ``rows``: sequences in the ``fwd_bwd`` passes.
    """

    def __init__(self, model: nn.Module) -> None:
        layers = decoder_layers(model)
        self.first, self.last = layers[0], layers[-1]
        self.fwd_bwd = self.fwd = self.partial = self.rows = 0
        self._first_nograd = 0
        self._handles: list[Any] = []

    @staticmethod
    def _batch(args, kwargs) -> int:
        h = args[0] if args else kwargs.get("hidden_states")
        return int(h.shape[0]) if isinstance(h, torch.Tensor) else 1

    def _on_first(self, _module, args, kwargs):
        if torch.is_grad_enabled():
            self.fwd_bwd += 1
            self.rows += self._batch(args, kwargs)
        else:
            self._first_nograd += 1

    def _on_last(self, _module, args, kwargs):
        if not torch.is_grad_enabled():
            self.fwd += 1

    def __enter__(self) -> "PassCounter":
        self._handles = [self.first.register_forward_pre_hook(self._on_first, with_kwargs=True),
                         self.last.register_forward_pre_hook(self._on_last, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.partial = self._first_nograd - self.fwd

    def to_dict(self) -> dict[str, int]:
        return {"fwd_bwd": self.fwd_bwd, "fwd": self.fwd, "partial": self.partial, "rows": self.rows}


class PeakRSS:
    """Peak resident memory of this process (MB) while active, sampled from /proc every 10 ms."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak = self.start = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def current_mb() -> float:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current_mb())

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = self.current_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.current_mb())


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def state_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


# ---------------------------------------------------------------------------------------------- losses
def lm_loss_and_accuracy(model: nn.Module, rows: Sequence[tuple[Soft, Sequence[int], Sequence[int]]],
                         ) -> tuple[torch.Tensor, list[float]]:
    """Per row, the mean next-token NLL of ``prompt + target`` tokens after the first (the
    engine's surprise), differentiable; and each row's teacher-forced target accuracy from the same pass. Soft
    prompts must stand in front of their rows (``at == 0``), so every row's tokens are its last positions."""
    if any(soft is not None and soft.at != 0 for soft, _, _ in rows):
        raise ValueError("lm_loss_and_accuracy needs soft prompts in front of their rows (at=0)")
    embeds, mask, position_ids = build_rows(model, rows)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False)
    length = embeds.shape[1]
    losses, accs = [], []
    for i, (_, p, t) in enumerate(rows):
        ids = torch.tensor(list(p) + list(t), device=embeds.device)
        k = len(ids)
        logits = out.logits[i, length - k:length - 1].float()
        losses.append(nn.functional.cross_entropy(logits, ids[1:]))
        pred = logits[-len(t):].argmax(-1).tolist()
        accs.append(sum(int(a == b) for a, b in zip(pred, t)) / len(t))
    return torch.stack(losses), accs


# ---------------------------------------------------------------------------------------------- methods
class Method:
    """A way of teaching facts to the frozen model and of presenting prompts to it for scoring."""

    name = "method"

    def __init__(self, model: nn.Module, tokenizer) -> None:
        self.model = model  # the model scored (and counted)
        self.tokenizer = tokenizer

    def reset(self) -> None:
        pass

    def teach(self, records: Sequence[EditRecord]) -> None:
        pass

    def prompts(self, prompts: Sequence[str]) -> list[str]:
        return list(prompts)

    def softs(self, prompts: Sequence[str]) -> Optional[list[Soft]]:
        return None

    def artifact_bytes(self) -> int:
        return 0

    def extra(self) -> dict[str, Any]:
        return {}

    def predict(self, prompts: Sequence[str], targets: Sequence[str]) -> list[list[int]]:
        shown = self.prompts(prompts)
        return target_predictions(self.model, self.tokenizer, shown, targets, self.softs(shown))


class NoneMethod(Method):
    name = "none"


class MemoryMethod(Method):
    name = "memory"

    def __init__(self, model, tokenizer, config: MemoryConfig | None = None) -> None:
        super().__init__(model, tokenizer)
        self.engine = HybridTitansEngine(model, tokenizer, config)
        self.fact_steps: list[int] = []
        self.written = 0
        self.speaks: dict[str, list[bool]] = {}
        self.familiarity: dict[str, list[float]] = {}
        self._scoring = "rel"

    def reset(self) -> None:
        self.engine.reset_memory()

    def teach(self, records) -> None:
        report = self.engine.teach([r.text for r in records])
        self.fact_steps += [f.steps for f in report.facts]
        self.written += report.written

    def predict(self, prompts: Sequence[str], targets: Sequence[str]) -> list[list[int]]:
        if self.engine.config.mode == "mac":
            return super().predict(prompts, targets)
        # mag / mal: the memory acts inside decoder layer memory_layer, not through a soft prompt, so each prompt
        # is scored with the engine's layer memory hooked in where the gate opens, as generate() runs it.
        shown = self.prompts(prompts)
        preds: list[list[int]] = []
        for prompt, target, soft in zip(shown, targets, self.softs(shown)):
            with self.engine._layer_memory(torch.tensor([soft is not None], device=self.engine.device)):
                preds += target_predictions(self.model, self.tokenizer, [prompt], [target])
        return preds

    def softs(self, prompts):
        softs, fam = memory_soft_prompts(self.engine, prompts)
        self.speaks.setdefault(self._scoring, []).extend(s is not None for s in softs)
        self.familiarity.setdefault(self._scoring, []).extend(fam)
        return softs

    def artifact_bytes(self) -> int:
        return state_bytes(self.engine.memory.state_dict().values())

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {"written": self.written, "steps_per_fact": mean(self.fact_steps),
                               "fact_steps": self.fact_steps, "config": self.engine.config.to_dict()}
        for key in self.speaks:
            out[f"speaks_{key}"] = mean([float(s) for s in self.speaks[key]])
            out[f"familiarity_{key}"] = mean(self.familiarity[key])
        out["per_record_familiarity"] = {k: [round(f, 4) for f in v] for k, v in self.familiarity.items()}
        return out


class InContextMethod(Method):
    """The taught texts before the prompt, newest first, one per line, as many as fit in ``budget`` tokens."""

    name = "in_context"

    def __init__(self, model, tokenizer, budget: int = 1024) -> None:
        super().__init__(model, tokenizer)
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        if limit:
            budget = min(budget, int(limit) - 96)  # room for the prompt and its target
        self.budget = max(budget, 0)
        self.facts: list[tuple[str, int]] = []
        self.used: list[int] = []

    def reset(self) -> None:
        self.facts = []

    def teach(self, records) -> None:
        for r in records:
            n = len(self.tokenizer(r.text + "\n", add_special_tokens=False)["input_ids"])
            self.facts.append((r.text, n))

    def context(self) -> str:
        chosen, used = [], 0
        for text, n in reversed(self.facts):
            if used + n > self.budget:
                break
            chosen.append(text)
            used += n
        self.used.append(len(chosen))
        return "".join(t + "\n" for t in chosen)

    def prompts(self, prompts):
        ctx = self.context()
        return [ctx + p for p in prompts]

    def artifact_bytes(self) -> int:
        return len(self.context().encode("utf-8"))

    def extra(self):
        return {"budget_tokens": self.budget, "facts_in_context": self.used[-1] if self.used else 0}


class LoRAMethod(Method):
    """peft LoRA on a deep copy of the base model (the shared base is never touched).

    ``steps``: per taught fact, the number of forward+backward passes (sequential), or the total number of
    passes over minibatches of 4 texts (batch): set by the runner from what ``memory`` used. With ``to_rel``
    it trains instead until the taught facts reach that Rel (sequential: each fact until its own accuracy
    does; batch: epochs until the mean does), at most ``cap`` passes containing each fact.
    """

    name = "lora"

    def __init__(self, model, tokenizer, r: int = 8, alpha: int = 16, lr: float = 1e-3, seed: int = 0,
                 to_rel: float | None = None, cap: int = 100) -> None:
        from peft import LoraConfig, get_peft_model

        base = copy.deepcopy(model)
        torch.manual_seed(seed)
        self.peft = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM"))
        self.peft.eval()  # no dropout; gradients still flow to the adapters
        super().__init__(self.peft, tokenizer)
        self.counted = base
        self.lr, self.seed, self.to_rel, self.cap = lr, seed, to_rel, cap
        if to_rel is not None:
            self.name = "lora_to_rel"
        self.params = [p for p in self.peft.parameters() if p.requires_grad]
        self.initial = [p.detach().clone() for p in self.params]
        self.schedule_steps: list[int] | int | None = None  # set by the runner
        self.fact_passes: list[int] = []
        self.stopped_at: list[float] = []
        self.reset()

    def reset(self) -> None:
        with torch.no_grad():
            for p, p0 in zip(self.params, self.initial):
                p.copy_(p0)
        self.optimizer = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=0.0)
        self.rng = random.Random(self.seed)

    def _rows(self, records):
        return [(None, encode_prompt(self.tokenizer, r.prompt), encode_target(self.tokenizer, r.target))
                for r in records]

    def _step(self, rows, stop_at: float | None = None) -> list[float]:
        with torch.enable_grad():
            loss, accs = lm_loss_and_accuracy(self.peft, rows)
            if stop_at is not None and min(accs) >= stop_at:
                return accs
            self.optimizer.zero_grad(set_to_none=True)
            loss.mean().backward()
            self.optimizer.step()
        return accs

    def teach(self, records) -> None:
        rows = self._rows(records)
        if len(records) == 1:  # sequential
            i = len(self.fact_passes)
            if self.to_rel is None:
                steps = self.schedule_steps[i] if isinstance(self.schedule_steps, list) else int(self.schedule_steps or 0)
                for _ in range(steps):
                    self._step(rows)
                self.fact_passes.append(steps)
            else:
                passes = 0
                while True:  # a pass that finds the fact learned does no backward and ends the loop
                    accs = self._step(rows, stop_at=self.to_rel)
                    passes += 1
                    if min(accs) >= self.to_rel or passes >= self.cap:
                        break
                self.fact_passes.append(passes)
            return
        order = list(range(len(rows)))
        if self.to_rel is None:
            total = int(self.schedule_steps or 0)
            done = 0
            while done < total:
                self.rng.shuffle(order)
                for start in range(0, len(order), 4):
                    if done >= total:
                        break
                    self._step([rows[j] for j in order[start:start + 4]])
                    done += 1
            self.fact_passes.append(done)
            return
        epochs = 0
        while epochs < self.cap:
            self.rng.shuffle(order)
            for start in range(0, len(order), 4):
                self._step([rows[j] for j in order[start:start + 4]])
            epochs += 1
            preds = target_predictions(self.peft, self.tokenizer, [r.prompt for r in records],
                                       [r.target for r in records])
            rel = mean(token_accuracy(preds, [t for _, _, t in rows]))
            if rel >= self.to_rel:
                break
        self.stopped_at.append(epochs)

    def artifact_bytes(self) -> int:
        return state_bytes(self.params)

    def extra(self):
        out: dict[str, Any] = {"lr": self.lr, "rank": self.peft.peft_config["default"].r,
                               "target_modules": sorted(self.peft.peft_config["default"].target_modules)}
        if self.to_rel is not None:
            out.update(target_rel=self.to_rel, cap=self.cap)
            if self.stopped_at:
                out["epochs"] = self.stopped_at
        if self.fact_passes:
            out["passes"] = self.fact_passes
        return out


class SeedNet(nn.Module):
    """The original design: one soft token = bias + MLP(mean input embedding of the prompt)."""

    def __init__(self, hidden_size: int, width: int, init_token: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.fc1 = nn.Linear(hidden_size, width)
        self.fc2 = nn.Linear(width, hidden_size)
        self.bias = nn.Parameter(init_token.clone())
        with torch.no_grad():
            self.fc2.weight.mul_(1e-2)
            self.fc2.bias.zero_()

    def forward(self, mean_embeds: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, 1, H)
        x = mean_embeds / self.scale
        return (self.bias + self.fc2(nn.functional.silu(self.fc1(x))) * self.scale).unsqueeze(1)


class SeedMethod(Method):
    """Reference point: the soft token is always injected; its key is the mean input embedding of the text it
    sees (the whole taught text while teaching, the prompt when scored); SGD with momentum, per fact up to
    ``max_steps`` steps until the text's loss is below ``target_loss`` (the memory's defaults)."""

    name = "seed"

    def __init__(self, model, tokenizer, lr: float = 0.05, momentum: float = 0.9, width: int = 128,
                 max_steps: int = 40, target_loss: float = 0.1, seed: int = 0) -> None:
        super().__init__(model, tokenizer)
        self.lr, self.momentum, self.width, self.seed = lr, momentum, width, seed
        self.max_steps, self.target_loss = max_steps, target_loss
        self.fact_steps: list[int] = []
        self.reset()

    def reset(self) -> None:
        weight = input_embeddings(self.model).weight.detach()
        g = torch.Generator().manual_seed(self.seed)
        row = int(torch.randint(0, weight.shape[0], (1,), generator=g))
        torch.manual_seed(self.seed)
        self.net = SeedNet(weight.shape[1], self.width, weight[row].float(),
                           weight.float().std(0).clamp_min(1e-4)).to(weight.device)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=self.lr, momentum=self.momentum)

    def _mean_embed(self, ids: Sequence[int]) -> torch.Tensor:
        emb = input_embeddings(self.model)
        with torch.no_grad():
            return emb(torch.tensor(list(ids), device=emb.weight.device)).float().mean(0)

    def teach(self, records) -> None:
        rows = [(encode_prompt(self.tokenizer, r.prompt), encode_target(self.tokenizer, r.target)) for r in records]
        keys = torch.stack([self._mean_embed(list(p) + list(t)) for p, t in rows])  # the taught text is its prompt
        todo = list(range(len(rows)))
        steps = [0] * len(rows)
        for _ in range(self.max_steps):
            if not todo:
                break
            still = []
            for start in range(0, len(todo), 4):
                group = todo[start:start + 4]
                with torch.enable_grad():
                    soft = self.net(keys[group])
                    placed = [(SoftPrompt(soft[j]), *rows[i]) for j, i in enumerate(group)]
                    loss, _ = lm_loss_and_accuracy(self.model, placed)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.mean().backward()
                    nn.utils.clip_grad_norm_(self.net.parameters(), 1.0)
                    self.optimizer.step()
                for j, i in enumerate(group):
                    steps[i] += 1
                    if float(loss[j].detach()) >= self.target_loss:
                        still.append(i)
            todo = still
        self.fact_steps += steps

    def softs(self, prompts):
        keys = torch.stack([self._mean_embed(encode_prompt(self.tokenizer, p)) for p in prompts])
        with torch.no_grad():
            soft = self.net(keys)
        return [SoftPrompt(soft[i]) for i in range(len(prompts))]

    def artifact_bytes(self) -> int:
        return state_bytes(self.net.state_dict().values())

    def extra(self):
        return {"lr": self.lr, "momentum": self.momentum, "width": self.width, "steps_per_fact": mean(self.fact_steps)}


# ---------------------------------------------------------------------------------------------- runner
@dataclass
class EditSettings:
    schedule: str = "sequential"
    stream: Optional[int] = None  # sequential: facts per stream (T); None = all n
    seed: int = 0
    config: Optional[MemoryConfig] = None
    context_budget: int = 1024
    lora_r: int = 8
    lora_alpha: int = 16
    lora_lr: float = 1e-3
    lora_cap: int = 100
    lora_default_passes: int = 10  # passes per fact for lora when memory is not run
    seed_lr: float = 0.05
    check_base: bool = True
    reference: Optional[dict] = None  # a memory entry of an earlier results.json, for lora without memory
    save_memory: Optional[str] = None  # memory: save the last stream's memory here (HybridTitansEngine checkpoint)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["config"] = (self.config or MemoryConfig()).to_dict()
        if self.reference is not None:
            d["reference"] = {k: self.reference.get(k) for k in ("rel", "llm_passes_per_fact", "source")}
        return d


def _expand(methods: Sequence[str]) -> list[str]:
    out = []
    for m in methods:
        if m not in METHODS and m != "lora_to_rel":
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        out += ["lora", "lora_to_rel"] if m == "lora" else [m]
    # memory first: lora copies its pass counts and Rel
    return sorted(dict.fromkeys(out), key=lambda m: (m != "memory", m != "none"))


def _age_buckets(values: Sequence[float], order_in_stream: Sequence[int], stream: int, buckets: int = 10):
    """Mean of ``values`` by how many facts were taught after each one in its stream (its age), oldest first."""
    if stream <= 1:
        return None
    k = min(buckets, stream)
    sums, counts = [0.0] * k, [0] * k
    for v, pos in zip(values, order_in_stream):
        b = min(pos * k // stream, k - 1)
        sums[b] += v
        counts[b] += 1
    return [s / c if c else None for s, c in zip(sums, counts)]


def run_edit(model: nn.Module, tokenizer, records: Sequence[EditRecord], methods: Sequence[str],
             settings: EditSettings | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Teach ``records`` with every method on ``model`` and score them; returns the results dictionary."""
    s = settings or EditSettings()
    if s.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {s.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    n = len(records)
    if n == 0:
        raise ValueError("no records to teach")
    stream = n if s.schedule == "batch" or not s.stream else min(int(s.stream), n)
    streams = [list(range(i, min(i + stream, n))) for i in range(0, n, stream)]
    order_in_stream = [i % stream for i in range(n)]
    names = _expand(methods)
    digest = weights_digest(model) if s.check_base else None

    prompts = [r.prompt for r in records]
    rephrases = [r.rephrase for r in records]
    targets = [r.target for r in records]
    loc_prompts = [r.loc_prompt for r in records]
    loc_answers = [r.loc_answer for r in records]
    target_refs = [encode_target(tokenizer, t) for t in targets]
    t0 = time.perf_counter()
    base_loc = target_predictions(model, tokenizer, loc_prompts, loc_answers)
    log(f"base locality predictions for {n} records in {time.perf_counter() - t0:.1f} s")

    results: dict[str, Any] = {}
    memory_rel: Optional[float] = None
    memory_steps: Optional[list[int]] = None
    memory_passes_total: Optional[int] = None
    if s.reference is not None and "memory" not in names:  # lora matched to a memory run of another process
        ref = s.reference
        if len(ref["extra"]["fact_steps"]) != n and s.schedule == "sequential":
            raise ValueError("the reference memory run taught a different number of facts")
        memory_rel = ref["rel"]
        memory_steps = list(ref["extra"]["fact_steps"])
        memory_passes_total = int(ref["passes"]["fwd_bwd"])
    cuda = next(model.parameters()).device.type == "cuda"
    for name in names:
        torch.manual_seed(s.seed)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            if name == "memory":
                method: Method = MemoryMethod(model, tokenizer, s.config)
            elif name == "none":
                method = NoneMethod(model, tokenizer)
            elif name == "in_context":
                method = InContextMethod(model, tokenizer, s.context_budget)
            elif name in ("lora", "lora_to_rel"):
                method = LoRAMethod(model, tokenizer, r=s.lora_r, alpha=s.lora_alpha, lr=s.lora_lr, seed=s.seed,
                                    to_rel=None if name == "lora" else (memory_rel if memory_rel is not None else 1.0),
                                    cap=s.lora_cap)
                if name == "lora":
                    if s.schedule == "sequential":
                        method.schedule_steps = memory_steps if memory_steps is not None else [s.lora_default_passes] * n
                    else:
                        method.schedule_steps = (memory_passes_total if memory_passes_total is not None
                                                 else math.ceil(s.lora_default_passes * n / 4))
            else:
                method = SeedMethod(model, tokenizer, lr=s.seed_lr, seed=s.seed,
                                    max_steps=(s.config or MemoryConfig()).max_steps,
                                    target_loss=(s.config or MemoryConfig()).target_loss)
            counted = method.counted if isinstance(method, LoRAMethod) else model
            rel = [0.0] * n
            gen = [0.0] * n
            loc = [0.0] * n
            teach_seconds = score_seconds = 0.0
            counter = PassCounter(counted)
            for idx in streams:
                method.reset()
                t = time.perf_counter()
                with counter:
                    if name != "none":
                        if s.schedule == "sequential":
                            for k, i in enumerate(idx):
                                method.teach([records[i]])
                                if (k + 1) % 10 == 0 and len(idx) >= 20:
                                    log(f"  {name}: taught {k + 1}/{len(idx)} ({time.perf_counter() - t:.0f} s)")
                        else:
                            method.teach([records[i] for i in idx])
                teach_seconds += time.perf_counter() - t
                t = time.perf_counter()
                sub = lambda xs: [xs[i] for i in idx]  # noqa: E731
                if isinstance(method, MemoryMethod):
                    method._scoring = "rel"
                pr = method.predict(sub(prompts), sub(targets))
                if isinstance(method, MemoryMethod):
                    method._scoring = "gen"
                pg = method.predict(sub(rephrases), sub(targets))
                if isinstance(method, MemoryMethod):
                    method._scoring = "loc"
                pl = method.predict(sub(loc_prompts), sub(loc_answers))
                for j, i in enumerate(idx):
                    rel[i] = token_accuracy([pr[j]], [target_refs[i]])[0]
                    gen[i] = token_accuracy([pg[j]], [target_refs[i]])[0]
                    loc[i] = token_accuracy([pl[j]], [base_loc[i]])[0]
                score_seconds += time.perf_counter() - t
            if isinstance(method, MemoryMethod) and s.save_memory:  # the last stream's memory, to inspect or rescore
                method.engine.save_pretrained(s.save_memory)
        entry = {
            "rel": mean(rel), "gen": mean(gen), "loc": mean(loc),
            "teach_seconds": teach_seconds, "score_seconds": score_seconds,
            "llm_passes_per_fact": counter.fwd_bwd / n,
            "llm_forward_only_per_fact": counter.fwd / n,
            "llm_key_passes_per_fact": counter.partial / n,
            "llm_rows_per_fact": counter.rows / n,
            "passes": counter.to_dict(),
            "peak_rss_mb": rss.peak, "rss_before_mb": rss.start, "rss_growth_mb": rss.peak - rss.start,
            **({"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if cuda else {}),
            "artifact_bytes": method.artifact_bytes(),
            "rel_by_age": _age_buckets(rel, order_in_stream, stream),
            "extra": method.extra(),
            "per_record": {"rel": rel, "gen": gen, "loc": loc},
        }
        results[name] = entry
        log(f"{name:12s} rel {entry['rel']:.3f}  gen {entry['gen']:.3f}  loc {entry['loc']:.3f}  "
            f"teach {teach_seconds:.1f} s  passes/fact {entry['llm_passes_per_fact']:.1f}")
        if name == "memory":
            memory_rel = entry["rel"]
            memory_steps = list(method.fact_steps)
            memory_passes_total = counter.fwd_bwd
        del method
        gc.collect()
    base_unchanged = None
    if digest is not None:
        base_unchanged = weights_digest(model) == digest
        if not base_unchanged:
            raise RuntimeError("the base model's weights changed during the benchmark")
    return {"n": n, "schedule": s.schedule, "stream": stream, "seed": s.seed, "methods": results,
            "settings": s.to_dict(), "base_unchanged": base_unchanged}


# ---------------------------------------------------------------------------------------------- reporting
def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| method | Rel | Gen | Loc | teach s | s/fact | fwd+bwd passes/fact | fwd-only/fact | peak RSS MB | artifact KB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    n = results["n"]
    for name, e in results["methods"].items():
        lines.append(f"| {name} | {e['rel']:.3f} | {e['gen']:.3f} | {e['loc']:.3f} | {e['teach_seconds']:.1f} | "
                     f"{e['teach_seconds'] / n:.2f} | {e['llm_passes_per_fact']:.1f} | "
                     f"{e['llm_forward_only_per_fact'] + e['llm_key_passes_per_fact']:.1f} | {e['peak_rss_mb']:.0f} | "
                     f"{e['artifact_bytes'] / 1024:.1f} |")
    return "\n".join(lines)


def diagnostics(results: dict[str, Any]) -> str:
    """Markdown: Rel by teaching order (sequential) and, for the memory, how often its gate opened."""
    lines = []
    aged = {k: v["rel_by_age"] for k, v in results["methods"].items() if v.get("rel_by_age")}
    if aged:
        k = max(len(v) for v in aged.values())
        lines += [f"Rel by teaching order (stream of {results['stream']} facts, {k} buckets, oldest first):", "",
                  "| method | " + " | ".join(str(i + 1) for i in range(k)) + " |",
                  "| --- |" + " ---: |" * k]
        for name, vals in aged.items():
            lines.append(f"| {name} | " + " | ".join("" if v is None else f"{v:.2f}" for v in vals) + " |")
        lines.append("")
    mem = results["methods"].get("memory")
    if mem:
        ex = mem["extra"]
        lines += ["Memory gate (fraction of prompts it speaks for; mean familiarity; threshold "
                  f"{ex.get('config', {}).get('familiarity_threshold', '?')}):", "",
                  "| prompts | speaks | mean familiarity |", "| --- | ---: | ---: |"]
        for key, label in (("rel", "taught prompts"), ("gen", "paraphrases"), ("loc", "unrelated prompts")):
            if f"speaks_{key}" in ex:
                lines.append(f"| {label} | {ex[f'speaks_{key}']:.2f} | {ex[f'familiarity_{key}']:.2f} |")
        fam = ex.get("per_record_familiarity", {})
        thr = ex.get("config", {}).get("familiarity_threshold")
        if fam.get("rel") and thr is not None:
            rel = mem["per_record"]["rel"]
            on = [r for r, f in zip(rel, fam["rel"]) if f >= thr]
            off = [r for r, f in zip(rel, fam["rel"]) if f < thr]
            lines += ["", f"Rel where the memory speaks: {mean(on):.3f} ({len(on)} records); "
                      f"where it is silent: {mean(off):.3f} ({len(off)} records)."]
        lines += ["", f"Update steps per fact: {ex.get('steps_per_fact', float('nan')):.1f} "
                  f"(max_steps {ex.get('config', {}).get('max_steps', '?')}); written {ex.get('written')}/{results['n']}."]
    return "\n".join(lines)


def plot(results: dict[str, Any], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    aged = {k: v["rel_by_age"] for k, v in results["methods"].items() if v.get("rel_by_age")}
    fig, axes = plt.subplots(1, 3 if aged else 2, figsize=(15 if aged else 10, 4))
    ax = axes[0]
    width = 0.27
    for j, metric in enumerate(("rel", "gen", "loc")):
        vals = [results["methods"][m][metric] for m in names]
        ax.bar([i + (j - 1) * width for i in range(len(names))], vals, width, label=metric.capitalize())
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("teacher-forced token accuracy")
    ax.legend()
    ax.set_title(title or f"{results['schedule']}, n={results['n']}")
    ax = axes[1]
    secs = [max(results["methods"][m]["teach_seconds"] / results["n"], 1e-3) for m in names]
    ax.bar(range(len(names)), secs, color="gray")
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("teach seconds per fact (log)")
    if aged:
        ax = axes[2]
        for m, vals in aged.items():
            ax.plot(range(1, len(vals) + 1), vals, marker="o", label=m)
        ax.set_xlabel("age bucket (1 = taught first, last = taught last)")
        ax.set_ylabel("Rel")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"Rel by teaching order (stream of {results['stream']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
