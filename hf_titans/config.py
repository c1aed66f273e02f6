"""MemoryConfig: the one configuration object shared by the library, the CLI, ``configs/*.yaml`` and checkpoints."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

#: Memory variants (the registry :data:`hf_titans.memory.VARIANTS` holds their maths; a test keeps both equal).
VARIANTS = ("titans", "moneta", "yaad", "memora", "ttt_linear")
#: How the memory reaches the frozen model: memory as context, as gate, as layer (Titans sec. 4).
MODES = ("mac", "mag", "mal")
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class MemoryConfig:
    """Hyper-parameters of a :class:`~hf_titans.memory.NeuralMemory` and of how the engine uses it.

    Variant and integration (docs/variants.md):
        variant: how the associative memory is written: ``titans`` (l2 bias, momentum + forgetting, Titans
            eqs. 12-14), ``moneta`` / ``yaad`` / ``memora`` (MIRAS sec. 5.3, eqs. 24, 26, 27), ``ttt_linear``
            (a linear memory written by gradient descent, TTT eqs. 2-6).
        inner_optimizer: ``None`` (the variant's own rule) or a Nested-Learning inner optimizer ``"gd"``,
            ``"momentum"``, ``"m3"`` for the variants whose retention is l2 (titans, yaad, ttt_linear).
        mode: ``mac`` (soft prompt before the prompt), ``mag`` (a gated memory branch added to the residual
            stream after decoder layer ``memory_layer``) or ``mal`` (the memory transforms the hidden states
            entering decoder layer ``memory_layer``).
        memory_layer: the decoder layer ``mag`` and ``mal`` act on (ignored by ``mac``).
        n_persistent_tokens: learnable task tokens put in front of every prompt (Titans sec. 3.3); they change
            only through :meth:`~hf_titans.HybridTitansEngine.fit_persistent`, never at test time. 0 disables.

    Memory network (Titans, arXiv 2501.00663, sec. 3.1):
        n_memory_tokens: soft-prompt vectors the memory writes in front of a prompt (memory as context).
        memory_hidden: width of the deep memory MLPs.
        memory_depth: number of layers of each memory MLP (Titans uses deep memories, >= 2).
        key_layer: decoder layer whose hidden states (averaged over the prompt) form the memory key;
            0 uses the input embeddings. Only layers ``< key_layer`` are run to compute it.
        assoc_dim: size of the associative values ``v = W_V k`` the familiarity memory learns (eq. 12).

    Test-time update (eqs. 13-14): ``S_t = eta * S_{t-1} - theta * grad``, ``M_t = (1 - alpha) * M_{t-1} + S_t``.
        lr: theta, the step size on the surprise gradient of the soft-prompt memory.
        assoc_lr: theta for the associative (familiarity) memory.
        momentum: eta, how much past surprise carries over.
        forget: alpha, the forgetting (weight decay) per update.
        precondition: divide the surprise by the root of its running second moment (Adam-style) first.
        max_grad_norm: gradient clipping before the update.

    Teaching:
        surprise_threshold: texts whose surprise (mean token NLL, nats) is below this are not written.
        max_steps: update steps at most per taught text.
        target_loss: a text counts as written once its loss with the memory falls below this.
        min_prefix_tokens: the shortest prompt prefix (in tokens) the memory learns to answer from.
        prefixes_per_step: how many prefixes of a text one update step trains on (one batched LLM pass).
        learn_steps: update steps ``generate(..., learn=True)`` takes on a surprising prompt.
        verify_prefixes: a text counts as written only once the continuation of *every* one of its prefixes (not
            only the few an update step samples) is below ``target_loss``: one extra forward pass (no backward)
            over all its prefixes whenever the sampled ones pass. Off by default (the published benchmark figures
            were taken without it); on SmolLM2-135M, with ``max_steps=80``, a single taught pass key came back
            greedily from "The pass key is" for 12 of 12 keys, against 8 of 12 with the defaults, at 47.4 update
            steps per key against 36.3 (docs/reading.md).

    Locality gate:
        familiarity_threshold: the memory speaks for a prompt only when its familiarity
            ``1 - ||M(k) - v||^2 / ||v||^2`` is at least this; otherwise the prompt reaches the bare model untouched.
        rehearsal_keys: how many keys of written texts the memory keeps (a ring buffer, fp16) so that later
            writes rehearse their familiarity (no LLM pass) instead of overwriting it; 0 disables.
        rehearsal_weight: how strongly a write keeps the soft prompts of those earlier keys where they were
            (self-distillation: the squared drift of their soft prompts, in units of the embeddings' std, is
            added to the surprise with this weight). Too weak and sequential writes overwrite each other.
        rehearsal_neighbours: how many random neighbours of each stored key (cosine 0.8 to it, about a zsRE
            paraphrase's) are held in place the same way, so a write keeps what the memory says *around* earlier
            keys, not only at them; 0 (default) holds the stored keys alone. Measured on 40 sequential zsRE
            facts, 2 gave no gain in Gen (docs/benchmarks.md), so it is off.
        layer_rehearsal_states: ``mag`` / ``mal`` only: how many hidden states (at ``memory_layer``, 16 per written
            text) of earlier writes the memory keeps in a ring buffer and holds its layer output at while later
            texts are written, with ``rehearsal_weight`` (the layer memory's counterpart of the per-key anchors;
            without it sequential writes overwrite each other). 0 keeps none (memories saved before it existed).

    Answering:
        recite_tokens: ``mac`` only. When the memory recognises a prompt's last sentence and other words come
            before it ("What is the pass key? The pass key is"), it first *recites*: its soft prompt in front of
            that sentence alone, as the sentence was written, continued greedily to the end of the sentence (at
            most this many new tokens). The recitation goes into the prompt as text, right before the sentence,
            and the model answers from it in context (recitation-augmented LMs, Sun et al., ICLR 2023). A soft
            prompt placed after other words is derailed by them (docs/reading.md); read at the start of a text it
            is not. 0 turns recitation off: the soft prompt then goes right before the sentence.

    Reading long documents (:meth:`~hf_titans.HybridTitansEngine.read`, see docs/reading.md):
        read_surprise_threshold: a passage of a chunk is written only when its surprise (mean over its tokens of
            the reader's token surprise, nats; see ``read_cache_weight``) is at least this; a chunk with no such
            passage is not written at all.
        read_max_spans: the most passages written per chunk (the most surprising ones).
        read_passage_sentences: consecutive sentences per passage, the unit scored (a chosen passage is written
            as its sentences). Two keep a fact
            with the sentence that makes it notable ("The pass key is 71432. Remember it.") and average out
            one-sentence flukes of random names and numbers (docs/reading.md); 1 scores single sentences.
        read_cache_weight: how much of a token's surprise is measured against the document read so far: the
            surprise is ``-log((1 - w) p_model + w p_cache)``, where ``p_model`` is the frozen model's probability
            in the chunk's context and ``p_cache`` an n-gram model of the document's earlier chunks (a cache LM,
            Kuhn & De Mori 1990; Grave et al. 2017 mix one into a neural LM). Text the document keeps repeating
            (templates, boilerplate) stops being surprising even when the window cannot see its earlier
            occurrences. 0 measures surprise in context only.
        read_forget: alpha of eq. 13 during reading: the forgetting per update step, so older writes fade as
            newer ones arrive (forgetting follows what is written, not how much unsurprising text is read).
        read_rehearse: how many earlier written sentences (the most surprising so far) are rehearsed with each
            write while reading, so that a new write does not overwrite them; 0 turns rehearsal off.
    """

    variant: str = "titans"
    inner_optimizer: Optional[str] = None
    mode: str = "mac"
    memory_layer: int = 8
    n_persistent_tokens: int = 0
    n_memory_tokens: int = 8
    memory_hidden: int = 128
    memory_depth: int = 2
    key_layer: int = 2
    assoc_dim: int = 256
    lr: float = 3e-3
    assoc_lr: float = 1e-3
    momentum: float = 0.9
    forget: float = 0.0
    precondition: bool = True
    max_grad_norm: float = 1.0
    surprise_threshold: float = 0.5
    max_steps: int = 40
    target_loss: float = 0.1
    min_prefix_tokens: int = 3
    prefixes_per_step: int = 3
    learn_steps: int = 40
    verify_prefixes: bool = False
    familiarity_threshold: float = 0.5
    rehearsal_keys: int = 512
    rehearsal_weight: float = 30.0
    rehearsal_neighbours: int = 0
    layer_rehearsal_states: int = 1024
    recite_tokens: int = 32
    read_surprise_threshold: float = 4.0
    read_max_spans: int = 2
    read_passage_sentences: int = 2
    read_cache_weight: float = 0.8
    read_forget: float = 1e-4
    read_rehearse: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "MemoryConfig") -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            expected = hints[f.name]
            if get_origin(expected) is Union:  # Optional[str]
                allowed = get_args(expected)
                if not isinstance(value, allowed) or isinstance(value, bool):
                    names = " or ".join("None" if a is type(None) else a.__name__ for a in allowed)
                    raise TypeError(f"{source}: '{f.name}' must be {names}, got {type(value).__name__} ({value!r})")
                continue
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, f.name, value)
            if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                raise TypeError(
                    f"{source}: '{f.name}' must be {expected.__name__}, got {type(value).__name__} ({value!r})"
                )
        if self.variant not in VARIANTS:
            raise ValueError(f"{source}: unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.mode not in MODES:
            raise ValueError(f"{source}: unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.inner_optimizer is not None:
            from .memory.variants import INNER_OPTIMIZERS, get_variant

            allowed = get_variant(self.variant).inner_optimizers
            if self.inner_optimizer not in INNER_OPTIMIZERS:
                raise ValueError(f"{source}: unknown inner_optimizer {self.inner_optimizer!r}; choose one of "
                                 f"{', '.join(INNER_OPTIMIZERS)}, or null for the variant's own rule")
            if self.inner_optimizer not in allowed:
                hint = (f"choose one of {', '.join(allowed)} or null" if allowed else
                        "its update rule is its own geometry; set inner_optimizer to null (or use titans, yaad "
                        "or ttt_linear)")
                raise ValueError(f"{source}: variant {self.variant!r} does not take inner_optimizer "
                                 f"{self.inner_optimizer!r}; {hint}")
        positive_ints = ("n_memory_tokens", "memory_hidden", "assoc_dim", "max_steps", "min_prefix_tokens",
                         "prefixes_per_step", "read_max_spans", "read_passage_sentences")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"{source}: '{name}' must be >= 1, got {getattr(self, name)}")
        if self.memory_depth < 2:
            raise ValueError(f"{source}: 'memory_depth' must be >= 2 (a deep memory), got {self.memory_depth}")
        for name in ("key_layer", "learn_steps", "read_rehearse", "recite_tokens", "rehearsal_keys", "memory_layer",
                     "n_persistent_tokens", "rehearsal_neighbours", "layer_rehearsal_states"):
            if getattr(self, name) < 0:
                raise ValueError(f"{source}: '{name}' must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.rehearsal_weight <= FLOAT32_MAX):
            raise ValueError(f"{source}: 'rehearsal_weight' must be a finite number >= 0, got {self.rehearsal_weight}")
        for name in ("lr", "assoc_lr", "max_grad_norm"):
            v = getattr(self, name)
            if not (0 < v <= FLOAT32_MAX):  # the memory computes in float32: a larger value overflows there
                raise ValueError(f"{source}: '{name}' must be a positive finite number (at most {FLOAT32_MAX:.3g}, "
                                 f"float32's largest), got {v}")
        if not (0 <= self.seed < 2 ** 63):
            raise ValueError(f"{source}: 'seed' must be in [0, 2**63), got {self.seed}")
        for name in ("momentum", "forget", "read_forget", "read_cache_weight"):
            v = getattr(self, name)
            if not (0 <= v < 1):
                raise ValueError(f"{source}: '{name}' must be in [0, 1), got {v}")
        for name in ("surprise_threshold", "target_loss", "read_surprise_threshold"):
            v = getattr(self, name)
            if not (0 <= v < float("inf")):
                raise ValueError(f"{source}: '{name}' must be a finite number >= 0, got {v}")
        if not (-float("inf") < self.familiarity_threshold <= 1):
            raise ValueError(f"{source}: 'familiarity_threshold' must be <= 1, got {self.familiarity_threshold}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "MemoryConfig") -> "MemoryConfig":
        if not isinstance(data, dict):
            raise TypeError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown config key(s) {', '.join(map(repr, unknown))}; "
                             f"valid keys are {', '.join(sorted(known))}")
        obj = cls.__new__(cls)
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            object.__setattr__(obj, f.name, data.get(f.name, default))
        obj.validate(source)
        return obj

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "MemoryConfig":
        """Read a preset from ``configs/*.yaml`` (or a JSON file); unknown keys and wrong types name the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ValueError(f"{path}: not valid YAML ({err})") from err
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(data or {}, source=str(path))

    def replace(self, **changes: Any) -> "MemoryConfig":
        return MemoryConfig.from_dict({**self.to_dict(), **changes})
