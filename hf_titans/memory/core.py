"""NeuralMemory: a deep memory network whose weights are the memory (Titans, arXiv 2501.00663).

It holds two deep MLPs that read the same key, the normalised representation of a prompt:

* ``prompt_net`` retrieves (eq. 15, ``y = M*(q)``) ``n_memory_tokens`` soft-prompt vectors in the base
  model's embedding space: memory as context (MAC). It is written through the frozen language model.
* ``assoc_net`` is the associative memory of eq. 12: it learns ``M(k) ~ v`` with ``v`` a fixed random
  projection of the key (``W_V``). Its own loss ``||M(k) - v||^2`` is the memory's surprise about a key;
  ``familiarity = 1 - ||M(k) - v||^2 / ||v||^2`` is near 1 for keys it has stored and near 0 for others,
  which is the gate that decides whether the memory speaks for a prompt at all.

How the associative memory is built and written depends on ``config.variant`` (see
:data:`~hf_titans.memory.variants.VARIANTS`): a deep MLP for titans, moneta and yaad; a linear map ``W k``
(TTT-Linear's hidden state) for ttt_linear; a deep MLP with its weights on the simplex and a LayerNorm head
for memora (MIRAS writes Memora's memory through a softmax, so its entries stay > 0). The attentional bias
it is written with is the variant's (:meth:`assoc_losses`); familiarity always reads the l2 error.

How the memory reaches the model depends on ``config.mode``: ``mac`` reads soft prompts from ``prompt_net``;
``mag`` and ``mal`` replace it by ``layer_net``, a per-token deep MLP on the hidden states at decoder layer
``memory_layer`` (:meth:`layer_delta`), with a learned gate ``gate_net`` for ``mag``. Both output exactly 0
until written (zero last layer), so an unwritten memory changes nothing.

Persistent memory (Titans sec. 3.3): ``persistent_tokens``, ``n_persistent_tokens`` learnable vectors put in
front of every prompt, fitted once (the engine's ``fit_persistent``) and never written at test time.

No transformers imports here: keys come in as tensors, soft prompts go out as tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MemoryConfig
from .miras import to_simplex_
from .objectives import l2_loss
from .variants import get_variant


def _unit_rms(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) scaled to unit RMS over its last dimension: the ``x~`` the layer memory reads."""
    x = x.float()
    return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


@torch.no_grad()
def _ring_append(bank: torch.Tensor, count: torch.Tensor, rows: torch.Tensor) -> None:
    """Write ``rows`` into the ring buffer ``bank`` (oldest overwritten first); ``count`` counts every write."""
    capacity = bank.shape[0]
    if capacity == 0:
        return
    for row in rows[-capacity:]:
        bank[int(count) % capacity] = row.to(bank.dtype)
        count += 1


def _ring_rows(bank: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The rows a ring buffer holds so far (float32)."""
    return bank[:min(int(count), bank.shape[0])].float()


def _mlp(d_in: int, hidden: int, d_out: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, hidden), nn.SiLU()]
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class NeuralMemory(nn.Module):
    """Key -> soft prompt (``prompt_net``) and key -> familiarity (``assoc_net``).

    Args:
        config: the memory's hyper-parameters.
        hidden_size: the base model's embedding width (keys and soft prompts live there).
        prompt_init: ``(n_memory_tokens, hidden_size)`` starting soft prompt, e.g. embeddings of random
            vocabulary rows; never all zeros (a zero soft prompt gives NaN gradients through some models).
        embed_scale: per-dimension scale of the base model's embeddings, so the MLP works in unit scale.
    """

    def __init__(self, config: MemoryConfig, hidden_size: int, prompt_init: torch.Tensor | None = None,
                 embed_scale: torch.Tensor | float = 1.0, persistent_init: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        g = torch.Generator().manual_seed(config.seed)
        n, h = config.n_memory_tokens, hidden_size
        # Key normalisation (centre and scale of prompt representations, calibrated by the engine).
        self.register_buffer("key_center", torch.zeros(h))
        self.register_buffer("key_scale", torch.ones(h))
        # Fixed value projection W_V of eq. 11; its sharp nonlinearity keeps unrelated keys' values apart.
        self.register_buffer("value_proj", torch.randn(config.assoc_dim, h, generator=g))
        scale = torch.as_tensor(embed_scale, dtype=torch.float32).expand(h).clone()
        self.register_buffer("embed_scale", scale)
        # Keys of written texts (ring buffer), rehearsed by later writes so they stay familiar.
        self.register_buffer("rehearsal_bank", torch.zeros(config.rehearsal_keys, h, dtype=torch.float16))
        self.register_buffer("rehearsal_count", torch.zeros((), dtype=torch.int64))

        self.spec = get_variant(config.variant)
        self.mode = config.mode
        if config.mode == "mac":
            self.prompt_net = _mlp(h, config.memory_hidden, n * h, config.memory_depth)
        else:  # mag / mal: a per-token memory on the hidden states of decoder layer memory_layer
            self.layer_net = _mlp(h, config.memory_hidden, h, config.memory_depth)
            self.register_buffer("layer_scale", torch.ones(h))  # std of those hidden states (calibrated)
            if config.layer_rehearsal_states:  # unit-RMS hidden states of earlier writes, held in place
                self.register_buffer("layer_bank", torch.zeros(config.layer_rehearsal_states, h, dtype=torch.float16))
                self.register_buffer("layer_bank_count", torch.zeros((), dtype=torch.int64))
            if config.mode == "mag":
                self.gate_net = nn.Linear(h, 1)  # the learned gate g_t = sigmoid(w . x_t + b)
        if config.variant == "ttt_linear":  # TTT-Linear's hidden state: f(k) = W k (TTT sec. 2.3), W_0 = 0
            self.assoc_net = nn.Sequential(nn.Linear(h, config.assoc_dim, bias=False))
        elif config.variant == "memora":  # MIRAS: M(x) = LN(W1 sigma(W2 x)), W on the simplex
            self.assoc_net = nn.Sequential(*_mlp(h, config.memory_hidden, config.assoc_dim, config.memory_depth),
                                           nn.LayerNorm(config.assoc_dim, elementwise_affine=False))
        else:
            self.assoc_net = _mlp(h, config.memory_hidden, config.assoc_dim, config.memory_depth)
        if config.mode == "mac":
            if prompt_init is None:
                prompt_init = torch.randn(n, h, generator=g) * scale
            if prompt_init.shape != (n, h):
                raise ValueError(f"prompt_init must have shape {(n, h)}, got {tuple(prompt_init.shape)}")
            self.prompt_bias = nn.Parameter(prompt_init.detach().clone().float())
        self._init_weights(g)
        if config.n_persistent_tokens:
            p = config.n_persistent_tokens
            if persistent_init is None:
                persistent_init = torch.randn(p, h, generator=g) * scale
            if persistent_init.shape != (p, h):
                raise ValueError(f"persistent_init must have shape {(p, h)}, got {tuple(persistent_init.shape)}")
            # Task knowledge, not test-time memory: no gradient unless fit_persistent asks for one.
            self.persistent_tokens = nn.Parameter(persistent_init.detach().clone().float(), requires_grad=False)

    @torch.no_grad()
    def _init_weights(self, g: torch.Generator) -> None:
        reader = self.prompt_net if self.mode == "mac" else self.layer_net
        for net in (reader, self.assoc_net):
            for m in net:
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
                    if m.bias is not None:
                        m.bias.zero_()
        # An empty memory: retrieval adds nothing to the soft-prompt bias, and every key is unfamiliar.
        if self.mode == "mac":
            # Keys are unit-norm (entries of variance 1/h), so fan-in scaling leaves the first layer's
            # pre-activations at variance 1/h, where SiLU is nearly linear: the reader then behaves as one
            # linear map and every write moves every key's soft prompt (measured on SmolLM2: the first 10 zsRE
            # facts fell to 0.70 Rel after 10 later writes). Unit-variance pre-activations make it a deep memory.
            self.prompt_net[0].weight.mul_(self.hidden_size ** 0.5)
            self.prompt_net[-1].weight.mul_(1e-3)
        else:  # the layer memory outputs exactly 0 until written: MAG and MAL start as exact no-ops
            self.layer_net[-1].weight.zero_()
            if self.mode == "mag":
                self.gate_net.weight.zero_()
                self.gate_net.bias.zero_()
        linears = [m for m in self.assoc_net if isinstance(m, nn.Linear)]
        linears[-1].weight.zero_()
        if self.spec.needs_simplex:
            # Memora's memory lives on the (scaled) simplex (MIRAS eq. 27): the random first layer becomes
            # near-uniform rows, the zero last layer uniform rows, so M(k) is constant before any write and its LayerNorm
            # head outputs ~0 for every key (every key unfamiliar).
            # MIRAS leaves the mass c of each slice free; c = sqrt(fan-in) per weight row gives pre-activations of
            # the scale a standard initialisation has (c = 1 leaves them ~1/sqrt(d) and the memory barely learns).
            for m in linears:
                to_simplex_([m.weight], mass=m.in_features ** 0.5)
                if m.bias is not None:
                    to_simplex_([m.bias])

    # ------------------------------------------------------------------ parameters by role
    def reader_parameters(self) -> list[nn.Parameter]:
        """What the language-model loss writes: the soft-prompt memory (mac) or the layer memory (mag, mal)."""
        if self.mode == "mac":
            return [self.prompt_bias, *self.prompt_net.parameters()]
        params = list(self.layer_net.parameters())
        if self.mode == "mag":
            params += list(self.gate_net.parameters())
        return params

    @property
    def prefix_tokens(self) -> int:
        """Vectors this memory can put in front of a prompt (persistent + soft prompt)."""
        return self.config.n_persistent_tokens + (self.config.n_memory_tokens if self.mode == "mac" else 0)

    # ------------------------------------------------------------------ keys
    def normalize_keys(self, raw: torch.Tensor) -> torch.Tensor:
        """Centre, scale and L2-normalise raw prompt representations ``(..., hidden)``."""
        k = (raw.float() - self.key_center) / self.key_scale
        return k / k.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    def most_familiar_keys(self, *raw_candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise each ``(B, hidden)`` candidate representation of a prompt (e.g. its whole text and its last
        sentence) and keep, per prompt, the key the memory finds most familiar (the first on ties).

        Returns ``(keys (B, hidden), choice (B,))``: ``choice[b]`` is the index of the candidate kept for row ``b``."""
        keys = torch.stack([self.normalize_keys(c) for c in raw_candidates])  # (C, B, H)
        rows = torch.arange(keys.shape[1], device=keys.device)
        if len(raw_candidates) == 1:
            return keys[0], torch.zeros_like(rows)
        choice = self.familiarity(keys.flatten(0, 1)).view(keys.shape[:2]).argmax(0)
        return keys[choice, rows], choice

    @staticmethod
    def neighbours(keys: torch.Tensor, count: int, seed: int, cosine: float = 0.8) -> torch.Tensor:
        """``count`` random unit keys per key of ``keys`` ``(N, H)``, each at ``cosine`` to it: ``(N * count, H)``.

        ``c k + sqrt(1 - c^2) u`` with ``u`` a random unit direction orthogonal to ``k`` (seeded). The engine holds
        the soft prompts there too when it rehearses (``rehearsal_neighbours``), so a write keeps the memory's
        answer around an earlier key (where its paraphrases fall), not only at the key itself."""
        g = torch.Generator().manual_seed(seed)
        k = keys.float().repeat_interleave(count, dim=0)
        u = torch.randn(k.shape, generator=g).to(k.device)
        u = u - (u * k).sum(-1, keepdim=True) * k
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return cosine * k + (1.0 - cosine ** 2) ** 0.5 * u

    def values(self, keys: torch.Tensor) -> torch.Tensor:
        """``v = tanh(2 W_V k)``, the associative target of eq. 12 (fixed, never learned)."""
        return torch.tanh(2.0 * keys @ self.value_proj.T)

    def remember_keys(self, keys: torch.Tensor) -> None:
        """Store normalised keys in the rehearsal ring buffer (oldest overwritten first)."""
        _ring_append(self.rehearsal_bank, self.rehearsal_count, keys)

    def remember_states(self, hidden: torch.Tensor) -> None:
        """Store hidden states ``(N, hidden)`` at ``memory_layer`` (scaled to unit RMS, as :meth:`layer_delta`
        reads them) in the layer rehearsal ring buffer (oldest overwritten first); mag / mal only."""
        if hasattr(self, "layer_bank"):
            _ring_append(self.layer_bank, self.layer_bank_count, _unit_rms(hidden))

    def rehearsal_states(self) -> torch.Tensor:
        """The stored layer states ``(N, hidden)`` (float32); empty in mac mode or with none stored."""
        if not hasattr(self, "layer_bank"):
            return torch.zeros(0, self.hidden_size, device=self.key_center.device)
        return _ring_rows(self.layer_bank, self.layer_bank_count)

    def rehearsal_keys(self) -> torch.Tensor:
        """The stored keys (float32, normalised), in buffer order."""
        return _ring_rows(self.rehearsal_bank, self.rehearsal_count)

    # ------------------------------------------------------------------ read / surprise
    def read(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieve (eq. 15) soft prompts ``(B, n, hidden)`` and familiarity ``(B,)`` for normalised keys.

        In ``mag`` / ``mal`` mode the memory speaks inside the model (:meth:`layer_delta`), so the soft prompt
        has no vectors: ``(B, 0, hidden)``."""
        b = keys.shape[0]
        if self.mode != "mac":
            return keys.new_zeros(b, 0, self.hidden_size), self.familiarity(keys)
        delta = self.prompt_net(keys).view(b, self.config.n_memory_tokens, self.hidden_size)
        soft = self.prompt_bias + delta * self.embed_scale
        return soft, self.familiarity(keys)

    def layer_delta(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the memory adds to the residual stream at ``memory_layer`` for hidden states ``(B, T, H)``.

        ``mal`` (memory as layer, Titans sec. 4.3): ``x' = x + M(x~)``, the layer then reads ``x'``.
        ``mag`` (memory as gate, Titans sec. 4.2): ``y = layer(x) + g(x~) * M(x~)`` with the learned gate
        ``g(x~) = sigmoid(w . x~ + b)``. ``x~`` is ``x`` scaled to unit RMS per token; ``M``'s output is scaled
        by the calibrated per-channel std of those hidden states. Exactly 0 before the memory is written.
        """
        x = _unit_rms(hidden)
        delta = self.layer_net(x) * self.layer_scale
        if self.mode == "mag":
            delta = delta * torch.sigmoid(self.gate_net(x))
        return delta.to(hidden.dtype)

    def assoc_losses(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per key: the variant's attentional bias and the l2 error, both relative to an empty memory.

        ``bias = l(M(k), v) / l(0, v)`` with ``l`` the variant's loss (l2: Titans eq. 12; l_p, p = 3: MIRAS
        eq. 10; Huber: MIRAS eq. 16), a per-key weight like a data-dependent ``theta_t``; ``l2 = ||M(k) - v||^2
        / ||v||^2`` (eq. 12), which gives familiarity. For the l2 variants both are the same tensor.
        """
        v = self.values(keys)
        pred = self.assoc_net(keys)
        l2 = (pred - v).pow(2).sum(-1) / v.pow(2).sum(-1).clamp_min(1e-6)
        if self.spec.objective is l2_loss:
            return l2, l2
        bias = self.spec.loss(pred, v) / self.spec.loss(torch.zeros_like(v), v).clamp_min(1e-6)
        return bias, l2

    def assoc_loss(self, keys: torch.Tensor) -> torch.Tensor:
        """The associative surprise ``||M(k) - v||^2 / ||v||^2`` of eq. 12, per key."""
        return self.assoc_losses(keys)[1]

    def familiarity(self, keys: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.assoc_loss(keys)
