"""HybridTitansEngine: a frozen causal LM with a NeuralMemory beside it that learns at test time.

    model, tokenizer = load_base_model()
    engine = HybridTitansEngine(model, tokenizer)
    engine.teach(["The secret project code is Omega-99."])
    engine.generate("The secret project code is")

The base model is never part of the memory's module tree and never changes; only the memory learns.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import MemoryConfig
from .injection import (SENTENCE_END, LayerMemoryHook, decoder_layers, hidden_at_layer, input_embeddings, join_prefix,
                        keep_gradients_flowing, last_sentences, prefix_means, prompt_key_candidates)
from .memory import NeuralMemory, build_optimizer
from .reliability import check_config_fits, check_count, check_flag, check_generate_kwargs, check_unicode, finite_step

logger = logging.getLogger(__name__)

# Neutral text used once to centre and scale prompt keys (stored in the memory, so checkpoints keep it).
CALIBRATION_TEXTS = (
    "Hello, how are you today?", "The quick brown fox jumps over the lazy dog.",
    "In 1990, the city had a population of", "She opened the door and looked outside.",
    "The results of the study show that", "import numpy as np", "Please write a short poem about the sea.",
    "The price of the house was", "Once upon a time there was a king", "What is the best way to learn",
    "The train leaves the station at noon.", "He said that he would call back later.",
    "Our team won the game last night.", "The recipe needs two cups of flour.",
    "Scientists discovered a new species of frog.", "I think that the weather will change.",
    "The book was published in 1887 by", "Can you help me with my homework?",
    "The river flows through the valley to the sea.", "My brother works as an engineer in",
    "The museum is open every day except Monday.", "Water is made of hydrogen and oxygen.",
    "The company reported strong sales this quarter.", "They walked along the beach at sunset.",
    "The first step is to preheat the oven.", "Which team won the world cup in",
    "The song was written by a young artist from", "Her favourite colour has always been",
    "The mountain is covered with snow in winter.", "def add(a, b):\n    return a + b",
    "The doctor told him to rest for a week.", "Tomorrow we will visit our grandparents.",
)


@dataclass
class FactReport:
    text: str
    surprise_before: float
    surprise_after: float
    steps: int
    written: bool
    familiarity: float = float("nan")
    history: list[float] = field(default_factory=list)  # loss with the memory at each update step


@dataclass
class TeachReport:
    """What :meth:`HybridTitansEngine.teach` did: per-text surprise before and after, update steps, seconds."""

    facts: list[FactReport] = field(default_factory=list)
    seconds: float = 0.0
    skipped_nonfinite: int = 0

    @property
    def written(self) -> int:
        return sum(f.written for f in self.facts)

    @property
    def skipped(self) -> int:
        return len(self.facts) - self.written

    @property
    def steps(self) -> int:
        return sum(f.steps for f in self.facts)

    def to_dict(self) -> dict[str, Any]:
        return {"facts": [asdict(f) for f in self.facts], "seconds": self.seconds, "written": self.written,
                "skipped": self.skipped, "steps": self.steps, "skipped_nonfinite": self.skipped_nonfinite}

    def __str__(self) -> str:
        lines = [f"taught {self.written}/{len(self.facts)} texts in {self.seconds:.1f} s ({self.steps} steps)"]
        for f in self.facts:
            tag = "written" if f.written else "skipped"
            lines.append(f"  {f.surprise_before:6.3f} -> {f.surprise_after:6.3f} nats  {f.steps:3d} steps  "
                         f"{tag:7s}  {f.text[:60]!r}")
        return "\n".join(lines)


class HybridTitansEngine:
    """Wraps a frozen ``AutoModelForCausalLM`` with a :class:`NeuralMemory` that it writes at test time.

    Args:
        model: any causal LM that accepts ``inputs_embeds`` (Llama, GPT-2, Qwen2 families, ...). It is put in
            eval mode and its parameters are frozen; it is never part of the memory's module tree.
        tokenizer: the model's tokenizer.
        config: a :class:`MemoryConfig`; the default when omitted.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: MemoryConfig | None = None) -> None:
        if not isinstance(model, nn.Module) or not hasattr(model, "generate"):
            raise TypeError(f"model must be a transformers causal LM (with .generate), got {type(model).__name__}")
        if config is None:
            config = MemoryConfig()
        if not isinstance(config, MemoryConfig):
            raise TypeError(f"config must be a MemoryConfig, got {type(config).__name__}")
        if tokenizer is None or not callable(tokenizer):
            raise TypeError(f"tokenizer must be the model's tokenizer (e.g. AutoTokenizer.from_pretrained(...)), "
                            f"got {type(tokenizer).__name__}")
        embeddings = input_embeddings(model)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        model.eval()
        model.requires_grad_(False)
        keep_gradients_flowing(model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        weight = embeddings.weight
        self.hidden_size = weight.shape[1]
        self.device = weight.device
        check_config_fits(config, model, self.hidden_size, self.device)
        self._lock = threading.RLock()
        self.skipped_nonfinite = 0
        self.updates = 0
        self.taught: list[str] = []
        # Set by each generate() call: per prompt, its surprise (learn=True only, else None) and familiarity.
        self.last_surprise: list[float] | None = None
        self.last_familiarity: list[float] | None = None
        self.last_recitations: list[str | None] | None = None  # per prompt: what the memory recited (None: nothing)
        self._hooked = False  # a LayerMemoryHook is active (mag / mal): do not stack a second one
        if config.mode != "mac":
            n_layers = len(decoder_layers(model))
            if config.memory_layer >= n_layers:
                raise ValueError(f"memory_layer={config.memory_layer} but {type(model).__name__} has {n_layers} "
                                 f"decoder layers; set memory_layer to 0..{n_layers - 1} for mode {config.mode!r}")
        self._build_memory()

    # ------------------------------------------------------------------ memory lifecycle
    def _build_memory(self) -> None:
        cfg = self.config
        weight = input_embeddings(self.model).weight.detach()
        g = torch.Generator().manual_seed(cfg.seed)
        rows = torch.randint(0, weight.shape[0], (cfg.n_memory_tokens,), generator=g)
        prompt_init = weight[rows.to(weight.device)].float().cpu()
        embed_scale = weight.float().std(dim=0).cpu().clamp_min(1e-4)
        persistent_init = None
        if cfg.n_persistent_tokens:  # task tokens start as embeddings of random vocabulary rows too
            rows = torch.randint(0, weight.shape[0], (cfg.n_persistent_tokens,), generator=g)
            persistent_init = weight[rows.to(weight.device)].float().cpu()
        memory = NeuralMemory(cfg, self.hidden_size, prompt_init=prompt_init, embed_scale=embed_scale,
                              persistent_init=persistent_init)
        self.memory = memory.to(self.device)
        self._calibrate_keys()
        self._build_optimizer()

    def _build_optimizer(self) -> None:
        """The variant's rule for the associative memory, Titans' for the reader (:func:`build_optimizer`)."""
        self.optimizer = build_optimizer(self.memory, self.config)

    @torch.no_grad()
    def _calibrate_keys(self) -> None:
        ids, mask = self._encode(list(CALIBRATION_TEXTS), check_length=False)
        raw = self._raw_keys(ids, mask)[:, -1]
        self.memory.key_center.copy_(raw.mean(0))
        self.memory.key_scale.copy_(raw.std(0).clamp_min(1e-3 * float(raw.std(0).mean()) + 1e-8))
        if self.config.mode != "mac":  # the scale of the hidden states the layer memory writes into
            hidden = hidden_at_layer(self.model, ids, mask, self.config.memory_layer).float()
            real = mask.bool().clone()
            real[torch.arange(len(mask)), mask.argmax(1)] = False  # leave out each row's first (sink) token
            std = hidden[real].std(0)
            self.memory.layer_scale.copy_(std.clamp_min(1e-3 * float(std.mean()) + 1e-8))

    def reset_memory(self) -> None:
        """Forget everything: a fresh memory with the same config (and seed), momentum cleared."""
        with self._lock:
            self._build_memory()
            self.taught.clear()
            self.updates = 0
            self.skipped_nonfinite = 0

    def _snapshot(self) -> tuple[dict, dict]:
        return copy.deepcopy(self.memory.state_dict()), copy.deepcopy(self.optimizer.state_dict())

    def _restore(self, snapshot: tuple[dict, dict]) -> None:
        self.memory.load_state_dict(snapshot[0])
        self.optimizer.load_state_dict(snapshot[1])

    # ------------------------------------------------------------------ text -> tensors
    def _max_tokens(self) -> int:
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 10 ** 9
        return int(limit) - self.memory.prefix_tokens

    def _encode(self, texts: Sequence[str], check_length: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left",
                               add_special_tokens=True)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        if check_length and ids.shape[1] > self._max_tokens():
            longest = int(mask.sum(1).argmax())
            raise ValueError(f"text {longest} is {int(mask[longest].sum())} tokens, longer than the context "
                             f"window left beside the memory ({self._max_tokens()} tokens); split it or use read()")
        if (mask.sum(1) == 0).any():
            raise ValueError("a text tokenizes to nothing; give it some content")
        return ids, mask

    @staticmethod
    def _check_texts(texts: Union[str, Sequence[str]], what: str) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"{what} must be a string or a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise ValueError(f"{what} is empty; give at least one text")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"{what}[{i}] must be a string, got {type(t).__name__}")
            if not t.strip():
                raise ValueError(f"{what}[{i}] is empty or whitespace; give it some content")
            check_unicode(t, f"{what}[{i}]")
        return list(texts)

    def _raw_keys(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden_at_layer(self.model, ids, mask, self.config.key_layer)
        return prefix_means(hidden.to(self.device), mask)

    def _keys(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised memory keys of every prefix ``(B, T, H)``; ``[:, -1]`` is each whole prompt's key."""
        return self.memory.normalize_keys(self._raw_keys(ids, mask))

    def _prompt_keys(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The key the memory is read with for each prompt ``(B, H)``, and the token its soft prompt goes in front
        of ``(B,)``: the whole prompt or its last sentence, whichever the memory finds more familiar. A fact
        written as a sentence is then found, and its soft prompt put right before that sentence as when it was
        written, when a question comes before it ("What is the pass key? The pass key is")."""
        candidates, starts = prompt_key_candidates(self.model, self.tokenizer, ids, mask, self.config.key_layer)
        keys, choice = self.memory.most_familiar_keys(*(c.to(self.device) for c in candidates))
        insert_at = torch.stack(starts).to(choice.device)[choice, torch.arange(len(choice), device=choice.device)]
        return keys, insert_at

    # ------------------------------------------------------------------ the language-model loss
    def _joined(self, ids: torch.Tensor, mask: torch.Tensor, soft: torch.Tensor | None,
                speaks: torch.Tensor | None, persistent: bool = True, insert_at: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``inputs_embeds`` for ``ids`` with the memory's vectors: the soft prompt before token ``insert_at[b]``
        (default: in front) of each row that speaks, persistent tokens in front of every row.

        Returns ``(embeds, attention_mask, positions)`` as :func:`join_prefix` (``positions[b, j]``: where token ``j``
        sits); a row nothing goes into keeps the bare model's view of its prompt behind left pads."""
        embeds, full_mask = input_embeddings(self.model)(ids), mask
        positions = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
        if soft is not None and soft.shape[1] > 0 and speaks is not None and bool(speaks.any()):
            slots = speaks.bool().view(-1, 1).expand(ids.shape[0], soft.shape[1]).to(soft.device)
            embeds, full_mask, positions = join_prefix(embeds, full_mask, soft, slots, insert_at)
        n_p = self.config.n_persistent_tokens
        if persistent and n_p:
            tokens = self.memory.persistent_tokens.unsqueeze(0).expand(ids.shape[0], -1, -1)
            every = torch.ones(ids.shape[0], n_p, dtype=torch.bool, device=tokens.device)
            embeds, full_mask, _ = join_prefix(embeds, full_mask, tokens, every)
            positions = positions + n_p
        return embeds, full_mask, positions

    def _layer_memory(self, speaks: torch.Tensor | None):
        """MAG / MAL: the layer memory acts inside ``memory_layer`` for the rows that speak (a context manager).

        Nothing is hooked for ``mac``, when no row speaks, or when a hook is already active."""
        if self.config.mode == "mac" or speaks is None or not bool(speaks.any()) or self._hooked:
            return contextlib.nullcontext()
        hook = LayerMemoryHook(self.model, self.config.memory_layer, self.config.mode, self.memory.layer_delta,
                               speaks)

        @contextlib.contextmanager
        def active():
            self._hooked = True
            try:
                with hook:
                    yield
            finally:
                self._hooked = False

        return active()

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, soft: torch.Tensor | None,
                 speaks: torch.Tensor | None, persistent: bool = True, insert_at: torch.Tensor | None = None,
                 **kwargs: Any):
        """The frozen model on ``ids`` with the memory where it speaks (``soft`` is None where no row does).

        Returns ``(output, positions)``: ``positions[b, j]`` is where token ``j`` of row ``b`` sits in the output."""
        embeds, full_mask, positions = self._joined(ids, mask, soft, speaks, persistent, insert_at)
        position_ids = (full_mask.long().cumsum(-1) - 1).clamp_min(0)
        with self._layer_memory(speaks if soft is not None else None):
            out = self.model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=position_ids, **kwargs)
        return out, positions

    @staticmethod
    def _next_token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                        after: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row mean NLL of tokens ``1..T-1`` of ``ids``, each predicted by the logits right before it
        (``positions``: where each token sits among ``logits``; a soft prompt may stand between two tokens).
        ``after`` (per row) keeps only the tokens after that position."""
        t = ids.shape[1]
        where = (positions[:, 1:] - 1).clamp_min(0)
        picked = logits.gather(1, where.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()
        targets = ids[:, 1:]
        valid = (mask[:, 1:] * mask[:, :-1]).float()
        if after is not None:
            index = torch.arange(1, t, device=ids.device)
            valid = valid * (index.unsqueeze(0) > after.unsqueeze(1)).float()
        nll = torch.nn.functional.cross_entropy(picked.reshape(-1, picked.shape[-1]), targets.reshape(-1),
                                                reduction="none").view_as(valid)
        return (nll * valid).sum(1) / valid.sum(1).clamp_min(1)

    def _token_nll(self, ids: torch.Tensor, mask: torch.Tensor, soft: torch.Tensor | None = None,
                   speaks: torch.Tensor | None = None, after: torch.Tensor | None = None,
                   insert_at: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row mean next-token NLL of each text's tokens after its first (surprise, in nats).

        ``after`` (per row) restricts the loss to the tokens after that position: the continuation of a prefix.
        ``insert_at``: the token each row's soft prompt goes in front of (default: the first).
        """
        out, positions = self._forward(ids, mask, soft, speaks, insert_at=insert_at, use_cache=False)
        return self._next_token_nll(out.logits, ids, mask, positions, after)

    def _gated_nll(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, insert_at = self._prompt_keys(ids, mask)
        soft, familiarity = self.memory.read(keys)
        speaks = familiarity >= self.config.familiarity_threshold
        nll = self._token_nll(ids, mask, soft if speaks.any() else None, speaks, insert_at=insert_at)
        return nll, familiarity

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def surprise(self, text: Union[str, Sequence[str]]) -> Union[float, list[float]]:
        """Mean next-token NLL (nats) of ``text`` under the memory-augmented model.

        The memory takes part exactly as it would when generating: only if it finds the text familiar.
        """
        texts = self._check_texts(text, "text")
        with self._lock:
            ids, mask = self._encode(texts)
            nll, _ = self._gated_nll(ids, mask)
        values = [float(v) for v in nll]
        return values[0] if isinstance(text, str) else values

    def familiarity(self, text: Union[str, Sequence[str]]) -> Union[float, list[float]]:
        """How familiar the memory finds a prompt (1: stored, ~0: never seen); it speaks above the threshold."""
        texts = self._check_texts(text, "text")
        with self._lock, torch.no_grad():
            ids, mask = self._encode(texts)
            values = [float(v) for v in self.memory.familiarity(self._prompt_keys(ids, mask)[0])]
        return values[0] if isinstance(text, str) else values

    def teach(self, facts: Union[str, Sequence[str]], max_steps: int | None = None,
              progress: bool = False) -> TeachReport:
        """Write texts into the memory by test-time gradient descent through the frozen model.

        Each text whose surprise is at least ``config.surprise_threshold`` is written with the Titans update
        (momentum over surprise, forgetting; eqs. 13-14) until its loss with the memory falls below
        ``config.target_loss`` or ``max_steps`` (default ``config.max_steps``) steps are taken. Texts of one
        call are interleaved, so later ones do not overwrite earlier ones. If anything fails, the memory is
        left exactly as it was before the call. ``progress=True`` shows a tqdm bar over update rounds; each
        fact's loss per step is in ``report.facts[i].history``.
        """
        texts = self._check_texts(facts, "facts")
        steps = self.config.max_steps if max_steps is None else check_count(max_steps, "max_steps")
        with self._lock:
            return self._write(texts, steps, progress=progress)

    def read(self, document: str, chunk_tokens: int = 512, **kwargs: Any):
        """Read a document longer than the context window, chunk by chunk, and write what surprises it.

        One forward pass per chunk gives each token's surprise (against the model in context and an n-gram cache
        of the document read so far); the chunk's most surprising passages (at least
        ``config.read_surprise_threshold``) are written into the memory, the rest is only read. Returns a
        :class:`~hf_titans.reading.ReadStats`; keywords go to :func:`hf_titans.reading.read_document`
        (``context_tokens``, ``max_steps``, ``max_span_tokens``, ``progress``). See docs/reading.md.
        """
        from .reading import read_document

        with self._lock:
            return read_document(self, document, chunk_tokens=chunk_tokens, **kwargs)

    def fit_persistent(self, texts: Union[str, Sequence[str]], steps: int = 100, lr: float = 0.05) -> list[float]:
        """Fit the persistent memory (Titans sec. 3.3): ``n_persistent_tokens`` task vectors in front of every prompt.

        Trains only the persistent tokens (Adam, ``lr`` in units of the embeddings' per-channel std) to lower the
        mean next-token NLL of ``texts`` with the long-term memory silent: examples of the task or format they
        should carry. It is the training-time step of the persistent memory; :meth:`teach` and learning while
        generating never change it. Returns the loss before each step. On any failure the memory is left as it
        was.
        """
        if not self.config.n_persistent_tokens:
            raise ValueError("this memory has no persistent tokens (config.n_persistent_tokens is 0); build the "
                             "engine with MemoryConfig(n_persistent_tokens=4), for example")
        texts = self._check_texts(texts, "texts")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if not (0 < lr < float("inf")):
            raise ValueError(f"lr must be a positive finite number, got {lr}")
        with self._lock:
            snapshot = self._snapshot()
            tokens = self.memory.persistent_tokens
            history: list[float] = []
            try:
                ids, mask = self._encode(texts)
                tokens.requires_grad_(True)
                opt = torch.optim.Adam([tokens], lr=lr * float(self.memory.embed_scale.mean()))
                for _ in range(steps):
                    opt.zero_grad(set_to_none=True)
                    loss = self._token_nll(ids, mask).mean()
                    if not torch.isfinite(loss):
                        warnings.warn("non-finite loss while fitting the persistent tokens; the step was skipped")
                        continue
                    loss.backward()
                    if not torch.isfinite(tokens.grad).all():
                        warnings.warn("non-finite gradient while fitting the persistent tokens; the step was skipped")
                        continue
                    history.append(float(loss.detach()))
                    opt.step()
            except BaseException:
                self._restore(snapshot)
                raise
            finally:
                tokens.requires_grad_(False)
                tokens.grad = None
        return history

    def _write(self, texts: list[str], max_steps: int, progress: bool = False) -> TeachReport:
        cfg = self.config
        start = time.perf_counter()
        snapshot = self._snapshot()
        report = TeachReport()
        try:
            ids, mask = self._encode(texts)
            with torch.no_grad():
                keys = self._keys(ids, mask)
                before, _ = self._gated_nll(ids, mask)
            t = ids.shape[1]
            prefixes = []  # per text: the prefix end positions it learns to answer from
            for i in range(len(texts)):
                first = int(mask[i].argmax())
                lo = min(first + cfg.min_prefix_tokens - 1, t - 1)
                prefixes.append(torch.arange(lo, t, device=self.device))
            # Self-distillation rehearsal: keys written by earlier calls keep the soft prompts the memory gave them
            # before this call (targets from the memory itself, nothing stored); keys this call rewrites are free.
            bank = self.memory.rehearsal_keys()
            if len(bank):
                near = (bank @ keys[mask.bool()].float().T).max(dim=1).values > 0.95
                bank = bank[~near]
            stored = len(bank)
            if stored and cfg.rehearsal_neighbours:  # and around them, where their paraphrases' keys fall
                around = self.memory.neighbours(bank, cfg.rehearsal_neighbours, cfg.seed + self.updates)
                bank = torch.cat([bank, around.to(bank.dtype)])
            with torch.no_grad():
                if cfg.mode == "mac":
                    anchors = (bank, self.memory.read(bank)[0], stored) if stored else None
                else:  # mag / mal: the layer memory's output is held at hidden states of earlier writes instead
                    states = self.memory.rehearsal_states()
                    anchors = (states, self.memory.layer_delta(states.unsqueeze(0))[0], len(states)) \
                        if len(states) else None
            todo = [i for i in range(len(texts)) if float(before[i]) >= cfg.surprise_threshold]
            steps = [0] * len(texts)
            histories: list[list[float]] = [[] for _ in texts]
            gen = torch.Generator().manual_seed(cfg.seed + self.updates)
            bar = tqdm(total=max_steps if todo else 0, desc="teaching", unit="round", disable=not progress)
            # Rounds over all surprising texts until every one is written: a text that finished early keeps
            # being rehearsed, so the updates for the others do not overwrite it.
            with bar:
                for _ in range(max_steps if todo else 0):
                    finished: list[int] = []
                    for group_start in range(0, len(todo), 4):
                        group = todo[group_start:group_start + 4]
                        applied = self._step(ids, mask, keys, prefixes, group, gen, report, histories, anchors)
                        if applied is None:  # skipped (non-finite): nothing was written
                            continue
                        finished += applied
                        for i in group:
                            steps[i] += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{max(histories[i][-1] for i in todo):.3f}" if histories[todo[0]] else "-",
                                    written=f"{len(finished)}/{len(todo)}")
                    if len(finished) == len(todo):
                        bar.total = bar.n  # finished early: the bar ends full
                        bar.refresh()
                        break
            with torch.no_grad():
                after, familiarity = self._gated_nll(ids, mask)
        except BaseException:
            self._restore(snapshot)
            raise
        for i in range(len(texts)):
            if steps[i] > 0:  # keep a few of its keys: the whole text and prefixes spread over it
                ends = prefixes[i]
                pick = torch.linspace(0, len(ends) - 1, min(4, len(ends))).round().long()
                self.memory.remember_keys(keys[i, ends[pick]])
        wrote = [i for i in range(len(texts)) if steps[i] > 0]
        if wrote and cfg.mode != "mac" and cfg.layer_rehearsal_states:  # 16 states per text, spread over it
            hidden = hidden_at_layer(self.model, ids[wrote], mask[wrote], cfg.memory_layer)
            for row, i in enumerate(wrote):
                real = hidden[row][mask[i].bool()]
                self.memory.remember_states(real[torch.linspace(0, len(real) - 1, min(16, len(real))).round().long()])
        for i, text in enumerate(texts):
            written = steps[i] > 0
            report.facts.append(FactReport(text, float(before[i]), float(after[i]), steps[i], written,
                                           float(familiarity[i]), histories[i]))
            if written:
                self.taught.append(text)
        report.seconds = time.perf_counter() - start
        return report

    def _step(self, ids, mask, keys, prefixes, group, gen, report, histories, anchors=None) -> list[int] | None:
        """One Titans update on a group of texts, each read from a few of its prefixes in one batched pass.

        Returns the texts of the group that are now written, or ``None`` if the update was skipped."""
        cfg = self.config
        rows, row_keys, owners, after = [], [], [], []
        for i in group:
            ends = prefixes[i]
            # The whole text (learns what the text is: its surprise) and a few prefixes (learn what follows).
            others = torch.randperm(len(ends) - 1, generator=gen)[: cfg.prefixes_per_step - 1].tolist()
            for j in [len(ends) - 1, *others]:
                rows.append(i)
                row_keys.append(keys[i, ends[j]])
                owners.append(i)
                after.append(-1 if j == len(ends) - 1 else int(ends[j]))
        row_ids, row_mask = ids[rows], mask[rows]
        soft, _ = self.memory.read(torch.stack(row_keys))
        nll = self._token_nll(row_ids, row_mask, soft, torch.ones(len(rows), dtype=torch.bool),
                              torch.tensor(after, device=self.device))
        # The familiarity memory rehearses every prefix key of the call (no LLM pass, so it is cheap), which
        # keeps texts that finished early familiar while the others are still being written.
        # Keys of texts written by earlier calls are rehearsed the same way (the memory's rehearsal buffer).
        call_keys = torch.cat([keys[i, prefixes[i]] for i in range(len(prefixes))])
        owner_of_key = torch.cat([torch.full((len(p),), i) for i, p in enumerate(prefixes)])
        # The associative memory is written with the variant's attentional bias (Titans eq. 12 / MIRAS eqs. 10,
        # 16); whether a text is done is judged on the l2 familiarity either way.
        bias, assoc = self.memory.assoc_losses(call_keys)
        earlier = self.memory.rehearsal_keys()
        rehearsal = self.memory.assoc_losses(earlier)[0].mean() if len(earlier) else bias.new_zeros(())
        if anchors is not None:
            if cfg.mode == "mac":
                drift = (self.memory.read(anchors[0])[0] - anchors[1]) / self.memory.embed_scale
            else:
                drift = (self.memory.layer_delta(anchors[0].unsqueeze(0))[0] - anchors[1]) / self.memory.layer_scale
            drift = drift.pow(2).flatten(1).mean(1)
            stored = anchors[2]  # the stored keys, then their neighbours: each set held with the full weight
            held = drift[:stored].mean() + (drift[stored:].mean() if len(drift) > stored else 0.0)
            rehearsal = rehearsal + cfg.rehearsal_weight * held
        loss = nll.mean() + bias.mean() + rehearsal
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            self.skipped_nonfinite += 1
            report.skipped_nonfinite += 1
            warnings.warn("non-finite surprise; the update was skipped and the memory left unchanged")
            return None
        loss.backward()
        if not finite_step(self.optimizer):
            self.skipped_nonfinite += 1
            report.skipped_nonfinite += 1
            warnings.warn("non-finite gradient or update; the update was skipped and the memory left unchanged")
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        for i in group:  # the whole-text row comes first for each text
            histories[i].append(float(nll.detach()[owners.index(i)]))
        finished = []
        owner_t = torch.tensor(owners)
        for i in group:
            worst_nll = float(nll.detach()[owner_t == i].max())
            worst_assoc = float(assoc.detach()[owner_of_key == i].max())
            if worst_nll < cfg.target_loss and 1 - worst_assoc >= min(1.0, cfg.familiarity_threshold + 0.15):
                finished.append(i)
        if cfg.verify_prefixes and finished:
            finished = self._every_prefix_below_target(ids, mask, keys, prefixes, finished)
        return finished

    @torch.no_grad()
    def _every_prefix_below_target(self, ids, mask, keys, prefixes, texts: list[int]) -> list[int]:
        """The texts of ``texts`` whose continuation after every one of their prefixes, each read with its own
        prefix's key, is below ``target_loss`` (``MemoryConfig.verify_prefixes``): one batched forward pass."""
        rows = torch.tensor([i for i in texts for _ in prefixes[i]])
        ends = torch.cat([prefixes[i] for i in texts])
        soft, _ = self.memory.read(keys[rows, ends])
        nll = self._token_nll(ids[rows], mask[rows], soft, torch.ones(len(rows), dtype=torch.bool), ends)
        return [i for i in texts if float(nll[rows == i].max()) < self.config.target_loss]

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def prepare_inputs(self, prompt: Union[str, Sequence[str]], use_memory: bool = True) -> dict[str, torch.Tensor]:
        """What the frozen model sees for ``prompt``: the memory is read once per prompt (eq. 15).

        Returns ``input_ids`` and ``attention_mask`` (left-padded), ``speaks`` (per prompt: does the memory speak),
        ``familiarity``, ``recitations`` (per prompt: the sentence the memory recited into it, or None), and, when
        anything goes in front of a prompt (mac: the soft prompts of the prompts the memory speaks for and did not
        recite for; persistent tokens: every prompt), ``inputs_embeds`` with those vectors in front (other rows get
        left pads instead) and the matching ``embeds_attention_mask``. A prompt the memory recited for carries the
        recitation as text in ``input_ids`` (``MemoryConfig.recite_tokens``). In ``mag`` / ``mal`` mode the
        memory also acts inside decoder layer ``memory_layer`` for the rows that speak, which these tensors do not
        carry: :meth:`generate` installs it. ``use_memory=False`` is the bare model (no persistent tokens either).
        """
        texts = self._check_texts(prompt, "prompt")
        with self._lock:
            ids, mask = self._encode(texts)
            keys, insert_at = self._prompt_keys(ids, mask)
            soft, familiarity = self.memory.read(keys)
            speaks = familiarity >= self.config.familiarity_threshold
            if not use_memory:
                speaks = torch.zeros_like(speaks)
            recitations: list[str | None] = [None] * len(texts)
            behind = speaks & (insert_at.to(speaks.device) > mask.argmax(1).to(speaks.device))
            if self.config.mode == "mac" and self.config.recite_tokens and bool(behind.any()):
                ids, mask, insert_at, recitations = self._with_recitations(ids, mask, keys, insert_at,
                                                                           behind.nonzero().flatten().tolist())
            # Where the memory recited, the recitation speaks for it as text: no soft prompt goes in as well.
            soft_rows = speaks & torch.tensor([r is None for r in recitations], device=speaks.device)
            inputs = {"input_ids": ids, "attention_mask": mask, "speaks": speaks, "familiarity": familiarity,
                      "soft_prompts": soft, "insert_at": insert_at, "use_memory": use_memory,
                      "recitations": recitations}
            if (bool(soft_rows.any()) and soft.shape[1] > 0) or (use_memory and self.config.n_persistent_tokens):
                embeds, full_mask, positions = self._joined(ids, mask, soft, soft_rows, use_memory, insert_at)
                inputs["inputs_embeds"] = embeds
                inputs["embeds_attention_mask"] = full_mask
                inputs["token_positions"] = positions
        return inputs

    def _recite(self, ids: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor, insert_at: torch.Tensor,
                rows: list[int]) -> list[str]:
        """Recitation (Sun et al., "Recitation-augmented language models", ICLR 2023): for each of ``rows``, the
        memory's soft prompt in front of the prompt's last sentence alone (its tokens from ``insert_at``, as the
        sentence was written), continued greedily for at most ``recite_tokens`` tokens and cut where the
        sentence ends. Returns the recited sentences ("" where the memory added nothing)."""
        sentences, sentence_mask = last_sentences(self.tokenizer, ids[rows], mask[rows], insert_at[rows].tolist())
        sentences, sentence_mask = sentences.to(self.device), sentence_mask.to(self.device)
        soft, _ = self.memory.read(keys[rows])
        every = torch.ones(len(rows), dtype=torch.bool, device=self.device)
        embeds, full_mask, _ = self._joined(sentences, sentence_mask, soft, every)
        out = self.model.generate(inputs_embeds=embeds, attention_mask=full_mask, do_sample=False, num_beams=1,
                                  max_new_tokens=self.config.recite_tokens, stop_strings=[". ", "! ", "? ", "\n"],
                                  tokenizer=self.tokenizer, pad_token_id=self.tokenizer.pad_token_id)
        recited = []
        for sentence, sentence_real, new in zip(sentences, sentence_mask, out):
            said = self.tokenizer.decode(new, skip_special_tokens=True)
            end = SENTENCE_END.search(said + " ")
            said = (said[:end.end()] if end else said).rstrip()
            text = self.tokenizer.decode(sentence[sentence_real.bool()], skip_special_tokens=True)
            recited.append(text + said if said.strip() else "")
        return recited

    def _with_recitations(self, ids: torch.Tensor, mask: torch.Tensor, keys: torch.Tensor, insert_at: torch.Tensor,
                          rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str | None]]:
        """``ids`` (left-padded) with each of ``rows``' recitation put in as text right before the sentence it
        recites, and ``insert_at`` moved to match. A row whose recitation is empty, or would not fit the window,
        gets none (its soft prompt goes before the sentence instead)."""
        recited = dict(zip(rows, self._recite(ids, mask, keys, insert_at, rows)))
        sequences, ats, recitations = [], [], []
        for b in range(ids.shape[0]):
            first = int(mask[b].argmax())
            real, at = ids[b, first:], int(insert_at[b]) - first
            text = recited.get(b, "")
            if text:
                before = "" if self.tokenizer.decode(real[at - 1:at])[-1:].isspace() else " "
                after = "" if self.tokenizer.decode(real[at:at + 1])[:1].isspace() else "\n"
                words = self.tokenizer(before + text + after, add_special_tokens=False,
                                       return_tensors="pt")["input_ids"][0].to(ids.device)
                if len(real) + len(words) <= self._max_tokens():
                    real, at = torch.cat([real[:at], words, real[at:]]), at + len(words)
                else:
                    text = ""
            sequences.append(real)
            ats.append(at)
            recitations.append(text or None)
        width = max(len(r) for r in sequences)
        new_ids = ids.new_full((len(sequences), width), self.tokenizer.pad_token_id)
        new_mask = mask.new_zeros(len(sequences), width)
        for b, real in enumerate(sequences):
            new_ids[b, width - len(real):] = real
            new_mask[b, width - len(real):] = 1
        new_at = torch.tensor([width - len(r) + a for r, a in zip(sequences, ats)], device=insert_at.device)
        return new_ids, new_mask, new_at, recitations

    @torch.no_grad()
    def prompt_embeds(self, prompt: str, use_memory: bool = True) -> torch.Tensor:
        """The ``(sequence, hidden)`` prompt embeddings the frozen model gets for ``prompt`` (e.g. for vLLM's
        ``{"prompt_embeds": ...}``): the token embeddings with the soft prompt in front of the prompt when the memory
        speaks, with the memory's recitation before the last sentence it recognised behind other words
        (``MemoryConfig.recite_tokens``), else the plain token embeddings."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if self.config.mode != "mac" and use_memory:
            raise ValueError(f"prompt_embeds carries the memory only in mode 'mac'; in mode {self.config.mode!r} "
                             "the memory acts inside a decoder layer: use engine.generate(), or a mac memory")
        inputs = self.prepare_inputs(prompt, use_memory=use_memory)
        if "inputs_embeds" in inputs:
            return inputs["inputs_embeds"][0]
        return input_embeddings(self.model)(inputs["input_ids"])[0]

    def generate(self, prompt: Union[str, Sequence[str]], learn: bool = False, use_memory: bool = True,
                 **generate_kwargs: Any) -> Union[str, list[str]]:
        """Complete ``prompt`` (a string or a batch) with transformers' own ``generate()``.

        The memory is read once per prompt; where it finds the prompt familiar its soft prompt goes in front
        of the prompt through ``inputs_embeds`` (or, where it recognised the last sentence behind other words, its
        recitation of that sentence goes before it as text: ``last_recitations``), otherwise the prompt reaches the
        bare model untouched. Any
        ``generate`` keyword works (``max_new_tokens``, ``do_sample``, ``num_beams``, ``generation_config``,
        ``streamer``, ``stopping_criteria``, ...). With ``learn=True`` the prompt's surprise is read from the
        prefill, and a prompt that is surprising and not already familiar is written into the memory after
        answering.

        Returns the completion (new text only); a list for a batch or several return sequences.
        """
        texts = self._check_texts(prompt, "prompt")
        check_flag(learn, "learn")
        check_flag(use_memory, "use_memory")
        with self._lock:
            inputs = self.prepare_inputs(texts, use_memory=use_memory)
            ids, mask, speaks = inputs["input_ids"], inputs["attention_mask"], inputs["speaks"]
            kwargs = dict(generate_kwargs)
            if "max_new_tokens" not in kwargs and "max_length" not in kwargs and "generation_config" not in kwargs:
                kwargs["max_new_tokens"] = 32
            prefix = inputs["inputs_embeds"].shape[1] - ids.shape[1] if "inputs_embeds" in inputs else 0
            check_generate_kwargs(kwargs, ids.shape[1], prefix, self._max_tokens() + self.memory.prefix_tokens)
            kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
            surprises = None
            with torch.no_grad(), self._layer_memory(speaks):
                if learn:
                    out, surprises = self._generate_learning(inputs, kwargs)
                elif "inputs_embeds" in inputs:
                    out = self.model.generate(inputs_embeds=inputs["inputs_embeds"],
                                              attention_mask=inputs["embeds_attention_mask"], **kwargs)
                else:  # the memory is silent: exactly the bare model's call
                    out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:]
            completions = self.tokenizer.batch_decode(out, skip_special_tokens=True)
            self.last_familiarity = [float(f) for f in inputs["familiarity"]]
            self.last_recitations = inputs["recitations"]
            self.last_surprise = surprises
            if learn:
                # Write what is new: surprising, and not already something the memory speaks for (a question
                # about a stored fact is familiar; writing it as a fact of its own would overwrite the answer).
                surprising = [t for t, s, known in zip(texts, surprises, speaks.tolist())
                              if s >= self.config.surprise_threshold and not known]
                if surprising and self.config.learn_steps > 0:
                    self._write(surprising, self.config.learn_steps)
        if isinstance(prompt, str) and len(completions) == 1:
            return completions[0]
        return completions

    def _generate_learning(self, inputs: dict[str, torch.Tensor], kwargs: dict[str, Any]):
        """Prefill all but the last prompt token ourselves (its logits give the prompt's surprise), then hand the
        KV cache to ``generate()``, which continues from the last token: no token is run twice."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if "inputs_embeds" in inputs:
            embeds, full_mask, positions = (inputs["inputs_embeds"], inputs["embeds_attention_mask"],
                                            inputs["token_positions"])
        else:
            embeds, full_mask = input_embeddings(self.model)(ids), mask
            positions = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
        if ids.shape[1] < 2:  # a one-token prompt has nothing to be surprised by
            return self.model.generate(inputs_embeds=embeds, attention_mask=full_mask, **kwargs), [0.0] * len(ids)
        # The memory's vectors always stand before some token, so the last position is the prompt's last token.
        position_ids = (full_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self.model(inputs_embeds=embeds[:, :-1], attention_mask=full_mask[:, :-1],
                         position_ids=position_ids[:, :-1], use_cache=True)
        nll = self._next_token_nll(out.logits, ids, mask, positions)
        generated = self.model.generate(inputs_embeds=embeds, attention_mask=full_mask,
                                        past_key_values=out.past_key_values, **kwargs)
        return generated, [float(v) for v in nll]

    # ------------------------------------------------------------------ persistence (hub.py)
    def save_pretrained(self, save_directory: Any, save_taught_log: bool = False,
                        base_model_revision: str | None = None) -> Any:
        """Save the memory (weights, optimizer state, config, model card) to a folder, atomically.

        ``save_taught_log=True`` also writes ``taught.jsonl`` with the taught texts (off by default: they can be
        private). See :mod:`hf_titans.hub` for the layout. Returns the folder's path.
        """
        from . import hub

        return hub.save_pretrained(self, save_directory, save_taught_log=save_taught_log,
                                   base_model_revision=base_model_revision)

    @classmethod
    def from_pretrained(cls, model: nn.Module, name_or_path: Any, tokenizer: Any = None, revision: str | None = None,
                        ignore_base_mismatch: bool = False, token: str | bool | None = None,
                        cache_dir: Any = None, local_files_only: bool = False) -> "HybridTitansEngine":
        """An engine around ``model`` with a saved memory: a local folder or a Hub repo id (``revision=...``).

        Fails if ``model`` is not the base model the memory was written through (hidden size, embedding
        fingerprint) unless ``ignore_base_mismatch=True``. ``tokenizer`` defaults to the model's own, if found.
        """
        from . import hub

        return hub.from_pretrained(cls, model, name_or_path, tokenizer=tokenizer, revision=revision,
                                   ignore_base_mismatch=ignore_base_mismatch, token=token, cache_dir=cache_dir,
                                   local_files_only=local_files_only)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str = "Upload hf_titans memory", revision: str | None = None,
                    create_pr: bool = False, save_taught_log: bool = False) -> Any:
        """Upload the memory to the Hub model repo ``repo_id`` (created if needed); returns the ``CommitInfo``."""
        from . import hub

        return hub.push_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message,
                               revision=revision, create_pr=create_pr, save_taught_log=save_taught_log)

    def load_memory(self, name_or_path: Any, revision: str | None = None, ignore_base_mismatch: bool = False,
                    token: str | bool | None = None, cache_dir: Any = None, local_files_only: bool = False) -> None:
        """Swap in a saved memory (folder or Hub repo id) without reloading the base model.

        Takes the engine lock; if anything fails the engine keeps its current memory unchanged.
        """
        from . import hub

        hub.load_memory(self, name_or_path, revision=revision, ignore_base_mismatch=ignore_base_mismatch,
                        token=token, cache_dir=cache_dir, local_files_only=local_files_only)
