"""Reading documents longer than the context window: surprise-gated memorisation, chunk by chunk (issue 8).

    stats = engine.read(document, chunk_tokens=512)   # == read_document(engine, document, 512)
    engine.generate("What is the pass key? The pass key is")

The document is tokenised once and read in chunks of ``chunk_tokens`` tokens, each preceded by the last
``context_tokens`` tokens of the one before (so its first tokens are not judged without context). Per chunk:

1. **One forward pass** of the frozen model over ``[context + chunk]`` (with the memory's soft prompt in front
   when the memory finds the chunk familiar, as everywhere else in the engine) gives the probability of every
   chunk token in context. Nothing else is run to decide.
2. **What is surprising.** A token's surprise is measured against the model *and the document read so far*:
   ``-log((1 - w) p_model + w p_cache)``, with ``w = config.read_cache_weight`` and ``p_cache`` an interpolated
   n-gram model (Witten-Bell, up to trigrams) of the earlier chunks that backs off to ``p_model`` itself (a cache
   LM, Kuhn & De Mori 1990, mixed into a neural LM as in Grave et al. 2017; with nothing read yet, the surprise is
   the model's NLL). The window sees one chunk; the cache remembers what kind of text the
   document keeps saying, so its templates and boilerplate stop being surprising while a sentence unlike anything
   before stays surprising (measured on the needle's template filler: the needle went from rank 75 of 641
   sentences to the first after the first chunk; docs/reading.md). The cache is hashed into fixed-size count
   tables, so it does not grow with the document. Tokens are grouped into sentences (``.``, ``!``, ``?`` or a line
   break end one) and sentences into **passages** of ``config.read_passage_sentences`` consecutive sentences; a
   passage's surprise is the mean of its tokens'. Passages at or above ``config.read_surprise_threshold`` are
   candidates; the ``config.read_max_spans`` most surprising ones that do not overlap are written, each as its
   sentences that carry at least half its surprise. A chunk without a candidate is not written at all. A soft
   prompt of ``n_memory_tokens`` vectors cannot hold a 512-token chunk, so the unit written is a sentence (cut to
   ``max_span_tokens`` around its most surprising token if longer), which is what a later question can ask about.
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
state kept across chunks is the memory itself (fixed size), the n-gram cache (fixed-size tables, 12 MiB), the
bounded rehearsal set, and a few numbers per chunk in the returned :class:`ReadStats`. If anything fails
(including Ctrl-C), the memory is restored to what it was before the call.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .injection import SENTENCE_END

if TYPE_CHECKING:  # pragma: no cover
    from .engine import HybridTitansEngine

_SEARCH_CHARS = 600  # how far around a chunk sentence ends are looked for
_CARRIES = 0.5  # a sentence of a chosen passage is written if its surprise is at least this share of the passage's


@dataclass
class ChunkStats:
    """One chunk: where it is, how surprising it was, and what was written from it."""

    index: int
    start_token: int
    n_tokens: int
    surprise: float            # mean surprise of the chunk's tokens (nats; read_cache_weight mixes in the cache)
    max_passage_surprise: float
    familiarity: float         # of the chunk's key; the memory spoke for the chunk if >= familiarity_threshold
    candidates: int            # passages at or above read_surprise_threshold
    spans: list[str] = field(default_factory=list)  # what was written into the memory
    steps: int = 0
    written: bool = False
    rehearsed: int = 0         # earlier sentences rehearsed with this chunk's write
    surprises: dict[str, float] = field(default_factory=dict, repr=False)  # candidate sentence -> its passage's surprise


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
                lines.append(f"  chunk {c.index:4d}  surprise {c.surprise:5.2f}  max passage "
                             f"{c.max_passage_surprise:5.2f}  {c.steps:3d} steps  " +
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


class DocumentCache:
    """The document read so far as an interpolated n-gram model (Witten-Bell smoothing, orders 1 to ``order``):
    the cache LM of Kuhn & De Mori (1990). Counts are hashed into three fixed tables of ``buckets`` int32 each, so
    its size does not depend on the document's length (a collision mixes two n-grams' counts; 100k tokens fill at
    most 30% of 2**20 buckets).

    ``probability(ids, start, base)`` gives ``p_cache`` of ``ids[start:]`` (each token after the ones before it) from
    the counts so far; ``add(ids, start)`` then counts the n-grams ending at ``ids[start:]``. Below the unigram the
    cache backs off to ``base``: the frozen model's probability of each of those tokens in context (uniform over the
    vocabulary when not given). So a cache that has read nothing claims nothing: ``p_cache = p_model`` and the
    reader's surprise is the model's NLL, instead of every token of the first chunk looking new to an empty cache.
    """

    _MODULUS = 2_147_483_629  # a prime below 2**31: the rolling hash stays exact in int64
    _BASE = 1_000_003

    def __init__(self, vocab_size: int, order: int = 3, buckets: int = 2 ** 20) -> None:
        self.vocab_size, self.order, self.buckets = vocab_size, order, buckets
        self.grams = torch.zeros(buckets, dtype=torch.int32)     # c(h, t)
        self.contexts = torch.zeros(buckets, dtype=torch.int32)  # c(h)
        self.types = torch.zeros(buckets, dtype=torch.int32)     # distinct t seen after h

    def _hashes(self, ids: torch.Tensor, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Buckets of the context (n - 1 tokens) and of the n-gram ending at each of ``ids[start:]``, and which
        of those positions have n - 1 tokens before them."""
        positions = torch.arange(start, len(ids))
        context = torch.full_like(positions, 2 * n)
        for back in range(n - 1, 0, -1):  # oldest token first
            context = (context * self._BASE + ids[(positions - back).clamp(min=0)] + 1) % self._MODULUS
        gram = ((context + 1) * self._BASE + ids[positions] + 1) % self._MODULUS
        return context % self.buckets, gram % self.buckets, positions >= n - 1

    def probability(self, ids: torch.Tensor, start: int, base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            p = torch.full((len(ids) - start,), 1.0 / self.vocab_size, dtype=torch.float64)
        else:
            if base.shape != (len(ids) - start,):
                raise ValueError(f"base must give one probability per token of ids[start:] ({len(ids) - start}), "
                                 f"got shape {tuple(base.shape)}")
            p = base.double()
        for n in range(1, self.order + 1):
            context, gram, valid = self._hashes(ids, start, n)
            c_h = self.contexts[context].double()
            types = self.types[context].double()
            c_ht = torch.minimum(self.grams[gram].double(), c_h)
            seen = valid & (c_h > 0)
            p = torch.where(seen, (c_ht + types * p) / (c_h + types).clamp(min=1), p)  # Witten-Bell
        return p

    def add(self, ids: torch.Tensor, start: int) -> None:
        for n in range(1, self.order + 1):
            context, gram, valid = self._hashes(ids, start, n)
            context, gram = context[valid], gram[valid]
            unique, inverse = torch.unique(gram, return_inverse=True)
            unique_context = torch.zeros_like(unique).scatter_(0, inverse, context)
            new = self.grams[unique] == 0
            self.types.index_add_(0, unique_context[new], torch.ones(int(new.sum()), dtype=torch.int32))
            self.grams.index_add_(0, gram, torch.ones(len(gram), dtype=torch.int32))
            self.contexts.index_add_(0, context, torch.ones(len(context), dtype=torch.int32))


def token_surprise(nll: torch.Tensor, p_cache: torch.Tensor, cache_weight: float) -> torch.Tensor:
    """``-log((1 - w) p_model + w p_cache)`` per token, from the model's NLL in context (``w = 0``: the NLL)."""
    if cache_weight == 0:
        return nll.double()
    return -torch.log((1 - cache_weight) * torch.exp(-nll.double()) + cache_weight * p_cache)


# ---------------------------------------------------------------------------------------------- the loop
def read_document(engine: "HybridTitansEngine", document: str, chunk_tokens: int = 512, *,
                  context_tokens: int = 64, max_steps: int | None = None, max_span_tokens: int = 48,
                  progress: bool = True, desc: str = "reading") -> ReadStats:
    """Read ``document`` chunk by chunk and write its surprising passages into ``engine``'s memory.

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
    cache = DocumentCache(max(len(engine.tokenizer), max(ids) + 1))
    rehearsal: list[tuple[float, int, str]] = []  # (surprise, chunk, text): the most surprising written so far
    bar = tqdm(total=len(ids), desc=desc, unit="tok", disable=not progress, dynamic_ncols=True, leave=False)
    try:
        for g in groups:
            g["forget"] = cfg.read_forget
        for index, begin in enumerate(range(0, len(ids), chunk_tokens)):
            chunk = _read_chunk(engine, document, ids, offsets, prefix, index, begin, chunk_tokens, context_tokens,
                                max_span_tokens, recent, cache, stats)
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
                recent: deque, cache: DocumentCache, stats: ReadStats) -> ChunkStats:
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
    chunk = ChunkStats(index=index, start_token=begin, n_tokens=end - begin, surprise=0.0, max_passage_surprise=0.0,
                       familiarity=float(familiarity[0]), candidates=0)
    if not len(nll):
        return chunk
    # Each token's surprise against the model in context and the document before this chunk; then this chunk's
    # n-grams join the cache.
    lo = max(0, doc0 - cache.order + 1)
    window = torch.tensor(ids[lo: doc0 + len(nll)])
    surprise = token_surprise(nll, cache.probability(window, doc0 - lo, base=torch.exp(-nll.double())),
                              cfg.read_cache_weight)
    cache.add(window, doc0 - lo)
    chunk.surprise = float(surprise.mean())
    # Sentences: cut the text around the chunk after every sentence end; a token belongs to the piece its first
    # character is in. Passages: read_passage_sentences consecutive sentences.
    lo_char = max(0, offsets[doc0][0] - _SEARCH_CHARS)
    hi_char = min(len(document), offsets[doc0 + len(nll) - 1][1] + _SEARCH_CHARS)
    cuts = [lo_char] + [m.end() for m in SENTENCE_END.finditer(document, lo_char, hi_char)] + [hi_char]
    pieces: dict[int, list[int]] = {}
    for i in range(len(nll)):
        k = bisect.bisect_right(cuts, offsets[doc0 + i][0]) - 1
        pieces.setdefault(min(k, len(cuts) - 2), []).append(i)
    sentences = [(cuts[k], cuts[k + 1], members) for k, members in sorted(pieces.items())
                 if document[cuts[k]:cuts[k + 1]].strip()]
    width = min(cfg.read_passage_sentences, len(sentences))
    scored = []
    for j in range(len(sentences) - width + 1 if sentences else 0):
        group = sentences[j: j + width]
        passage = float(surprise[[i for _, _, m in group for i in m]].mean())
        chunk.max_passage_surprise = max(chunk.max_passage_surprise, passage)
        if passage >= cfg.read_surprise_threshold:
            scored.append((passage, group))
    chunk.candidates = len(scored)
    scored.sort(key=lambda x: -x[0])
    # The most surprising passages that do not overlap one another or one chosen lately (e.g. by the chunk before),
    # a few more than can be written. A passage is written as its sentences, each a text of its own: the memory is
    # read with a prompt's last sentence as key (engine._prompt_keys), so a fact must not be written behind the
    # unrelated sentence that shared its passage; and a sentence that carries less than half the passage's
    # surprise (a predictable neighbour of the surprising one) is not written at all.
    chosen: list[list[str]] = []
    for passage, group in scored:
        if len(chosen) >= 4 * cfg.read_max_spans:
            break
        a, b = group[0][0], group[-1][1]
        if any(a < rb and ra < b for ra, rb in recent):
            continue
        recent.append((a, b))
        texts = []
        for sa, sb, members in group:
            if float(surprise[members].mean()) < _CARRIES * passage:
                continue
            text = _span_text(document, ids, offsets, doc0, surprise, members, sa, sb, max_span_tokens)
            if len(text.split()) >= 2 and text not in chunk.surprises:
                chunk.surprises[text] = passage
                texts.append(text)
        if texts:
            chosen.append(texts)
    # Surprising here, but maybe already in the memory or predictable on its own: ask the memory's own gate (as
    # teach does) before spending a slot; the read_max_spans best passages with a novel sentence are written.
    if chosen:
        novel = iter(_novel(engine, [t for texts in chosen for t in texts]))
        kept = [[t for t in texts if next(novel)] for texts in chosen]
        chunk.spans = [t for texts in [k for k in kept if k][: cfg.read_max_spans] for t in texts]
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


def _span_text(document: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]], doc0: int,
               surprise: torch.Tensor, members: list[int], a: int, b: int, max_span_tokens: int) -> str:
    """The sentence ``document[a:b]``, cut to ``max_span_tokens`` tokens around its most surprising token."""
    # Document tokens of the whole sentence (it may start in the previous chunk or end in the next).
    lo = doc0 + members[0]
    while lo > 0 and offsets[lo - 1][1] > a:
        lo -= 1
    hi = doc0 + members[-1]
    while hi + 1 < len(offsets) and offsets[hi + 1][0] < b:
        hi += 1
    if hi - lo + 1 > max_span_tokens:
        peak = doc0 + members[int(surprise[members].argmax())]
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
