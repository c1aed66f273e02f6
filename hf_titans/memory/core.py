"""NeuralMemory: a deep memory network whose weights are the memory (Titans, arXiv 2501.00663).

It holds two deep MLPs that read the same key, the normalised representation of a prompt:

* ``prompt_net`` retrieves (eq. 15, ``y = M*(q)``) ``n_memory_tokens`` soft-prompt vectors in the base
  model's embedding space: memory as context (MAC). It is written through the frozen language model.
* ``assoc_net`` is the associative memory of eq. 12: it learns ``M(k) ~ v`` with ``v`` a fixed random
  projection of the key (``W_V``). Its own loss ``||M(k) - v||^2`` is the memory's surprise about a key;
  ``familiarity = 1 - ||M(k) - v||^2 / ||v||^2`` is near 1 for keys it has stored and near 0 for others,
  which is the gate that decides whether the memory speaks for a prompt at all.

No transformers imports here: keys come in as tensors, soft prompts go out as tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MemoryConfig


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
                 embed_scale: torch.Tensor | float = 1.0) -> None:
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

        self.prompt_net = _mlp(h, config.memory_hidden, n * h, config.memory_depth)
        self.assoc_net = _mlp(h, config.memory_hidden, config.assoc_dim, config.memory_depth)
        if prompt_init is None:
            prompt_init = torch.randn(n, h, generator=g) * scale
        if prompt_init.shape != (n, h):
            raise ValueError(f"prompt_init must have shape {(n, h)}, got {tuple(prompt_init.shape)}")
        self.prompt_bias = nn.Parameter(prompt_init.detach().clone().float())
        self._init_weights(g)

    @torch.no_grad()
    def _init_weights(self, g: torch.Generator) -> None:
        for net in (self.prompt_net, self.assoc_net):
            for m in net:
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
                    m.bias.zero_()
        # An empty memory: retrieval adds nothing to the soft-prompt bias, and every key is unfamiliar.
        self.prompt_net[-1].weight.mul_(1e-3)
        self.assoc_net[-1].weight.zero_()

    # ------------------------------------------------------------------ keys
    def normalize_keys(self, raw: torch.Tensor) -> torch.Tensor:
        """Centre, scale and L2-normalise raw prompt representations ``(..., hidden)``."""
        k = (raw.float() - self.key_center) / self.key_scale
        return k / k.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    def values(self, keys: torch.Tensor) -> torch.Tensor:
        """``v = tanh(2 W_V k)``, the associative target of eq. 12 (fixed, never learned)."""
        return torch.tanh(2.0 * keys @ self.value_proj.T)

    @torch.no_grad()
    def remember_keys(self, keys: torch.Tensor) -> None:
        """Store normalised keys in the rehearsal ring buffer (oldest overwritten first)."""
        capacity = self.rehearsal_bank.shape[0]
        if capacity == 0:
            return
        for key in keys[-capacity:]:
            self.rehearsal_bank[int(self.rehearsal_count) % capacity] = key.to(self.rehearsal_bank.dtype)
            self.rehearsal_count += 1

    def rehearsal_keys(self) -> torch.Tensor:
        """The stored keys (float32, normalised), oldest first once the ring has wrapped or not."""
        n = min(int(self.rehearsal_count), self.rehearsal_bank.shape[0])
        return self.rehearsal_bank[:n].float()

    # ------------------------------------------------------------------ read / surprise
    def read(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieve (eq. 15) soft prompts ``(B, n, hidden)`` and familiarity ``(B,)`` for normalised keys."""
        b = keys.shape[0]
        delta = self.prompt_net(keys).view(b, self.config.n_memory_tokens, self.hidden_size)
        soft = self.prompt_bias + delta * self.embed_scale
        return soft, self.familiarity(keys)

    def assoc_loss(self, keys: torch.Tensor) -> torch.Tensor:
        """The associative surprise ``||M(k) - v||^2 / ||v||^2`` of eq. 12, per key."""
        v = self.values(keys)
        return (self.assoc_net(keys) - v).pow(2).sum(-1) / v.pow(2).sum(-1).clamp_min(1e-6)

    def familiarity(self, keys: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.assoc_loss(keys)
