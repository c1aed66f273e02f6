"""Reading documents longer than the context window: surprise-gated memorisation, chunk by chunk (issue 8).

    stats = engine.read(document, chunk_tokens=512)   # == read_document(engine, document, 512)
    engine.generate("What is the pass key? The pass key is")

The document is tokenised once and read in chunks of ``chunk_tokens`` tokens, each preceded by the last
``context_tokens`` tokens of the one before (so its first tokens are not judged without context). Per chunk:

1. **One forward pass** of the frozen model over ``[context + chunk]`` (with the memory's soft prompt in front
   when the memory finds the chunk familiar, as everywhere else in the engine) gives the NLL of every chunk
   token. Nothing else is run to decide.
2. **What is surprising.** Tokens are grouped into sentences (``.``, ``!``, ``?`` or a line break end one); a
   sentence's surprise is the mean NLL of its tokens *in context*. Sentences at or above
   ``config.read_surprise_threshold`` are candidates; the ``config.read_max_spans`` most surprising are written.
   A chunk without a candidate is not written at all. A soft prompt of ``n_memory_tokens`` vectors cannot hold
   a 512-token chunk, so the unit written is the surprising sentence (cut to ``max_span_tokens`` around its most
   surprising token if longer), which is what a later question can ask about.
3. **Writing** is :meth:`HybridTitansEngine._write` on those sentences: the Titans update through the frozen
   model, after the memory's own surprise gate (a sentence the memory already holds is not written again).
   **Rehearsal:** one write overwrites earlier ones (measured on SmolLM2-135M: after one more ``teach`` call a
   stored pass key's familiarity fell from 0.88 to 0.10, and with only its familiarity rehearsed it answered
   another number; docs/reading.md). So each write is one interleaved ``_write`` call with the
   ``config.read_rehearse`` most surprising sentences written so far, as ``teach`` interleaves the texts of one
   call. That set is bounded, and it is not used to answer: answers come from the memory's weights only.
   The momentum ``S`` of eq. 14 is kept from one written chunk to the next, so a surprising passage spread over
   consecutive chunks is written along one direction. A chunk that is not written has no momentary surprise
   (``theta_t = 0``); the carried surprise decays by ``eta`` per such chunk (``S <- eta S``) but is not applied
   to the memory (no coasting on an old direction after the context has moved on; Titans' ``eta_t -> 0`` at a
   context change). Forgetting (eq. 13) uses ``config.read_forget`` per update step: the memory fades as new
   content is written, not as unsurprising text is read, so a long stretch of filler does not erase a needle.

Memory stays flat: one chunk's tensors live at a time, no KV cache is carried between chunks, and the only
state kept across chunks is the memory itself (fixed size), the bounded rehearsal set, and a few numbers per
chunk in the returned :class:`ReadStats`. If anything fails (including Ctrl-C), the memory is restored to what it was before the call.
"""

from __future__ import annotations

import bisect
import re
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .engine import HybridTitansEngine

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)|\n")
_SEARCH_CHARS = 600  # how far around a chunk sentence ends are looked for


@dataclass
class ChunkStats:
    """One chunk: where it is, how surprising it was, and what was written from it."""

    index: int
    start_token: int
    n_tokens: int
    surprise: float            # mean NLL of the chunk's tokens in context (nats)
    max_sentence_surprise: float
    familiarity: float         # of the chunk's key; the memory spoke for the chunk if >= familiarity_threshold
    candidates: int            # sentences at or above read_surprise_threshold
    spans: list[str] = field(default_factory=list)  # what was written into the memory
    steps: int = 0
    written: bool = False
    rehearsed: int = 0         # earlier sentences rehearsed with this chunk's write
    surprises: dict[str, float] = field(default_factory=dict, repr=False)  # candidates' surprise in context


@dataclass
class ReadStats:
    """What :meth:`HybridTitansEngine.read` did."""

    tokens: int = 0
    chunk_tokens: int = 0
    context_tokens: int = 0
    chunks: list[ChunkStats] = field(default_factory=list)
    seconds: float = 0.0
    forward_seconds: float = 0.0
    write_seconds: float = 0.0

    @property
    def chunks_read(self) -> int:
        return len(self.chunks)

    @property
    def chunks_written(self) -> int:
        return sum(c.written for c in self.chunks)

    @property
    def fraction_written(self) -> float:
        return self.chunks_written / self.chunks_read if self.chunks else 0.0

    @property
    def spans_written(self) -> list[str]:
        return [s for c in self.chunks if c.written for s in c.spans]

    @property
    def steps(self) -> int:
        return sum(c.steps for c in self.chunks)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def chunk_surprise(self) -> list[float]:
        return [c.surprise for c in self.chunks]

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "chunk_tokens": self.chunk_tokens, "context_tokens": self.context_tokens,
                "chunks_read": self.chunks_read, "chunks_written": self.chunks_written,
                "fraction_written": self.fraction_written, "steps": self.steps, "seconds": self.seconds,
                "forward_seconds": self.forward_seconds, "write_seconds": self.write_seconds,
                "tokens_per_second": self.tokens_per_second, "chunks": [asdict(c) for c in self.chunks]}

    def __str__(self) -> str:
        lines = [f"read {self.tokens} tokens in {self.chunks_read} chunks of {self.chunk_tokens}: "
                 f"{self.chunks_written} written ({100 * self.fraction_written:.1f}%), {self.steps} update steps, "
                 f"{self.seconds:.1f} s ({self.tokens_per_second:.0f} tokens/s; forward {self.forward_seconds:.1f} s, "
                 f"writing {self.write_seconds:.1f} s)"]
        for c in self.chunks:
            if c.written:
                lines.append(f"  chunk {c.index:4d}  surprise {c.surprise:5.2f}  max sentence "
                             f"{c.max_sentence_surprise:5.2f}  {c.steps:3d} steps  " +
                             "; ".join(repr(s[:60]) for s in c.spans))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- helpers
def _check(document: Any, chunk_tokens: Any, context_tokens: Any, max_span_tokens: Any) -> None:
    if not isinstance(document, str):
        raise TypeError(f"document must be a string, got {type(document).__name__}")
    if not document.strip():
        raise ValueError("document is empty or whitespace; give it some content")
    from .reliability import check_unicode

    check_unicode(document, "document")
    for name, value, lo in (("chunk_tokens", chunk_tokens, 1), ("context_tokens", context_tokens, 0),
                            ("max_span_tokens", max_span_tokens, 2)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
        if value < lo:
            raise ValueError(f"{name} must be >= {lo}, got {value}")


def _special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of a text (e.g. BOS), so each chunk starts like a text does."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if plain and with_special[len(with_special) - len(plain):] == plain:
        return list(with_special[: len(with_special) - len(plain)])
    return []


def _tokenize(tokenizer, document: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the whole document and each token's character span in it."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    # Slow tokenizers have no offsets: rebuild the text from the tokens and read sentences from that.
    ids = tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"]
    offsets, pos = [], 0
    for i in ids:
        piece = tokenizer.decode([i])
        offsets.append((pos, pos + len(piece)))
        pos += len(piece)
    return list(ids), offsets


class _MomentumDecay:
    """``S <- eta S`` on the optimizer's surprise momentum for a chunk that is not written (eq. 14, theta = 0)."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    @torch.no_grad()
    def __call__(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                s = self.optimizer.state.get(p, {}).get("surprise_momentum")
                if s is not None:
                    s.mul_(group.get("momentum", 0.0))


# ---------------------------------------------------------------------------------------------- the loop
def read_document(engine: "HybridTitansEngine", document: str, chunk_tokens: int = 512, *,
                  context_tokens: int = 64, max_steps: int | None = None, max_span_tokens: int = 48,
                  progress: bool = True, desc: str = "reading") -> ReadStats:
    """Read ``document`` chunk by chunk and write its surprising sentences into ``engine``'s memory.

    Args:
        engine: a :class:`~hf_titans.HybridTitansEngine` (call it as ``engine.read(...)``, which takes its lock).
        document: the text, of any length.
        chunk_tokens: tokens per chunk (one forward pass each).
        context_tokens: tokens of the previous chunk in front of each chunk, seen but not scored again.
        max_steps: update steps at most per written chunk (default ``config.max_steps``).
        max_span_tokens: a surprising sentence longer than this is cut to this many tokens around its most
            surprising token before it is written.
        progress: show a tqdm progress bar (tokens) on stderr.

    Returns:
        :class:`ReadStats`: chunks read and written, per-chunk surprise, what was written, tokens/s, seconds.

    Raises:
        TypeError / ValueError on a non-string or empty document or bad sizes, before the memory is touched.
        If anything fails while reading, the memory and its optimizer are restored to what they were.
    """
    _check(document, chunk_tokens, context_tokens, max_span_tokens)
    cfg = engine.config
    from .reliability import check_count

    steps = cfg.max_steps if max_steps is None else check_count(max_steps, "max_steps")
    prefix = _special_prefix(engine.tokenizer)
    window = len(prefix) + context_tokens + chunk_tokens
    if window > engine._max_tokens():
        raise ValueError(f"a chunk with its context is {window} tokens, more than the model's window beside the "
                         f"memory ({engine._max_tokens()} tokens); use a smaller chunk_tokens or context_tokens")
    ids, offsets = _tokenize(engine.tokenizer, document)
    if not ids:
        raise ValueError("document tokenizes to nothing; give it some content")

    from tqdm.auto import tqdm

    stats = ReadStats(tokens=len(ids), chunk_tokens=chunk_tokens, context_tokens=context_tokens)
    start_time = time.perf_counter()
    snapshot = engine._snapshot()
    groups = engine.optimizer.param_groups
    saved_forget = [g["forget"] for g in groups]
    decay = _MomentumDecay(engine.optimizer)
    recent: deque[tuple[int, int]] = deque(maxlen=16)  # char ranges written lately (a sentence spans two chunks)
    rehearsal: list[tuple[float, int, str]] = []  # (surprise, chunk, text): the most surprising written so far
    bar = tqdm(total=len(ids), desc=desc, unit="tok", disable=not progress, dynamic_ncols=True, leave=False)
    try:
        for g in groups:
            g["forget"] = cfg.read_forget
        for index, begin in enumerate(range(0, len(ids), chunk_tokens)):
            chunk = _read_chunk(engine, document, ids, offsets, prefix, index, begin, chunk_tokens, context_tokens,
                                max_span_tokens, recent, stats)
            if chunk.spans and steps > 0:
                t = time.perf_counter()
                _write_with_rehearsal(engine, chunk, rehearsal, steps)
                stats.write_seconds += time.perf_counter() - t
            if not chunk.written:
                decay()
            stats.chunks.append(chunk)
            bar.update(chunk.n_tokens)
            bar.set_postfix(written=stats.chunks_written, refresh=False)
    except BaseException:
        engine._restore(snapshot)
        raise
    finally:
        for g, f in zip(groups, saved_forget):
            g["forget"] = f
        bar.close()
    stats.seconds = time.perf_counter() - start_time
    return stats


@torch.no_grad()
def _read_chunk(engine, document: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]], prefix: list[int],
                index: int, begin: int, chunk_tokens: int, context_tokens: int, max_span_tokens: int,
                recent: deque, stats: ReadStats) -> ChunkStats:
    cfg = engine.config
    end = min(begin + chunk_tokens, len(ids))
    ctx_begin = max(0, begin - context_tokens)
    row = prefix + list(ids[ctx_begin:end])
    lead = len(prefix) + (begin - ctx_begin)  # positions before the chunk's first token
    t = time.perf_counter()
    tokens = torch.tensor([row], device=engine.device)
    mask = torch.ones_like(tokens)
    key = engine._keys(tokens, mask)[:, -1]
    soft, familiarity = engine.memory.read(key)
    speaks = familiarity >= cfg.familiarity_threshold
    out, _ = engine._forward(tokens, mask, soft if speaks.any() else None, speaks, use_cache=False)
    n = tokens.shape[1]
    # NLL of the chunk's tokens: token j (j >= max(lead, 1)) is predicted at position j - 1; the soft prompt,
    # when there is one, sits in front, so count from the end.
    first = max(lead, 1)
    length = out.logits.shape[1]
    logits = out.logits[0, length - (n - first) - 1: length - 1]
    del out
    nll = torch.nn.functional.cross_entropy(logits.float(), tokens[0, first:], reduction="none").cpu()
    del logits, tokens, mask, soft
    stats.forward_seconds += time.perf_counter() - t
    doc0 = begin + (first - lead)  # nll[i] belongs to document token doc0 + i
    chunk = ChunkStats(index=index, start_token=begin, n_tokens=end - begin,
                       surprise=float(nll.mean()) if len(nll) else 0.0, max_sentence_surprise=0.0,
                       familiarity=float(familiarity[0]), candidates=0)
    if not len(nll):
        return chunk
    # Sentences: cut the text around the chunk after every sentence end; a token belongs to the piece its first
    # character is in.
    lo_char = max(0, offsets[doc0][0] - _SEARCH_CHARS)
    hi_char = min(len(document), offsets[doc0 + len(nll) - 1][1] + _SEARCH_CHARS)
    cuts = [lo_char] + [m.end() for m in _SENTENCE_END.finditer(document, lo_char, hi_char)] + [hi_char]
    sentences: dict[int, list[int]] = {}
    for i in range(len(nll)):
        k = bisect.bisect_right(cuts, offsets[doc0 + i][0]) - 1
        sentences.setdefault(min(k, len(cuts) - 2), []).append(i)
    scored = []
    for k, members in sentences.items():
        a, b = cuts[k], cuts[k + 1]
        surprise = float(nll[members].mean())
        chunk.max_sentence_surprise = max(chunk.max_sentence_surprise, surprise)
        if surprise >= cfg.read_surprise_threshold and document[a:b].strip():
            scored.append((surprise, a, b, members))
    chunk.candidates = len(scored)
    scored.sort(key=lambda x: -x[0])
    # The most surprising candidates, a few more than can be written, as texts (a sentence split between two
    # chunks was judged by the chunk before if that one wrote it).
    texts: list[str] = []
    for surprise, a, b, members in scored:
        if len(texts) >= 4 * cfg.read_max_spans:
            break
        if any(a < rb and ra < b for ra, rb in recent):
            continue
        text = _span_text(document, ids, offsets, doc0, nll, members, a, b, max_span_tokens)
        if len(text.split()) < 2 or text in texts:
            continue
        texts.append(text)
        chunk.surprises[text] = surprise
        recent.append((a, b))
    # Surprising in context, but maybe already in the memory: ask the memory's own gate before spending a slot.
    if texts:
        novel = _novel(engine, texts)
        chunk.spans = [t for t, keep in zip(texts, novel) if keep][: cfg.read_max_spans]
    return chunk


def _write_with_rehearsal(engine, chunk: ChunkStats, rehearsal: list, steps: int) -> None:
    """Write the chunk's new sentences together with the rehearsal set (interleaved in one ``_write`` call, as
    ``teach`` does for the texts of one call), then update the set: it keeps the ``read_rehearse`` most surprising
    sentences written so far. The memory's surprise gate was already applied by :func:`_novel`; inside this
    call every text is trained until it is held, which is what keeps the rehearsed ones from being overwritten."""
    cfg = engine.config
    new = list(chunk.spans)
    old = [text for _, _, text in rehearsal if text not in new]
    taught = len(engine.taught)
    threshold = cfg.surprise_threshold
    cfg.surprise_threshold = 0.0
    try:
        report = engine._write(new + old, steps)
    finally:
        cfg.surprise_threshold = threshold
    written = [f.text for f in report.facts[: len(new)] if f.written]
    del engine.taught[taught:]  # the engine's log: the new sentences once, not every rehearsal
    engine.taught.extend(written)
    chunk.spans, chunk.steps, chunk.written, chunk.rehearsed = written, report.steps, bool(written), len(old)
    if cfg.read_rehearse:
        for text in written:
            rehearsal.append((chunk.surprises.get(text, 0.0), chunk.index, text))
        rehearsal.sort(key=lambda r: (-r[0], -r[1]))
        del rehearsal[cfg.read_rehearse:]


@torch.no_grad()
def _novel(engine, texts: list[str]) -> list[bool]:
    """The memory's own gate, as in ``teach``: which texts the model with the memory does not predict yet
    (surprise on their own, with the soft prompt where the memory finds them familiar, at least
    ``config.surprise_threshold``). One batched pass over these few short sentences."""
    ids, mask = engine._encode(texts)
    nll, _ = engine._gated_nll(ids, mask)
    return [float(v) >= engine.config.surprise_threshold for v in nll]


def _span_text(document: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]], doc0: int, nll: torch.Tensor,
               members: list[int], a: int, b: int, max_span_tokens: int) -> str:
    """The sentence ``document[a:b]``, cut to ``max_span_tokens`` tokens around its most surprising token."""
    # Document tokens of the whole sentence (it may start in the previous chunk or end in the next).
    lo = doc0 + members[0]
    while lo > 0 and offsets[lo - 1][1] > a:
        lo -= 1
    hi = doc0 + members[-1]
    while hi + 1 < len(offsets) and offsets[hi + 1][0] < b:
        hi += 1
    if hi - lo + 1 > max_span_tokens:
        peak = doc0 + members[int(nll[members].argmax())]
        first, last = lo, hi
        lo = max(lo, min(peak - (3 * max_span_tokens) // 4, hi - max_span_tokens + 1))
        hi = lo + max_span_tokens - 1
        # whole words only: a word cut in half would be surprising for the wrong reason
        while lo < hi and lo > first and not _word_start(document, offsets[lo][0]):
            lo += 1
        while hi > lo and hi < last and not _word_start(document, offsets[hi + 1][0]):
            hi -= 1
        a, b = max(a, offsets[lo][0]), min(b, offsets[hi][1])
    return document[a:b].strip()


def _word_start(text: str, pos: int) -> bool:
    return pos <= 0 or pos >= len(text) or text[pos - 1].isspace() or text[pos].isspace()
