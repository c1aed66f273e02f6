"""The memory maths: Titans update (float64, hand-computed), NeuralMemory reads, config validation."""

from __future__ import annotations

import math

import pytest
import torch

from hf_titans import MemoryConfig, NeuralMemory
from hf_titans.memory import TitansOptimizer


def test_titans_update_matches_hand_computed_case():
    # Two steps of S_t = eta S_{t-1} - theta g_t ; M_t = (1 - alpha) M_{t-1} + S_t (eqs. 13-14), no preconditioning.
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = TitansOptimizer([w], lr=0.1, momentum=0.5, forget=0.2, precondition=False)
    w.grad = torch.tensor([0.4, 1.0], dtype=torch.float64)
    assert opt.step()
    # S1 = -0.1*[0.4, 1] = [-0.04, -0.1]; M1 = 0.8*[1, -2] + S1 = [0.76, -1.7]
    assert torch.allclose(w.detach(), torch.tensor([0.76, -1.7], dtype=torch.float64))
    w.grad = torch.tensor([-0.2, 0.0], dtype=torch.float64)
    assert opt.step()
    # S2 = 0.5*S1 - 0.1*[-0.2, 0] = [0.0, -0.05]; M2 = 0.8*M1 + S2 = [0.608, -1.41]
    assert torch.allclose(w.detach(), torch.tensor([0.608, -1.41], dtype=torch.float64))


def test_preconditioned_first_step_is_sign_sized():
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = TitansOptimizer([w], lr=0.01, momentum=0.9, precondition=True, eps=0.0)
    w.grad = torch.tensor([1e-6, -3.0, 50.0], dtype=torch.float64)
    opt.step()
    # v_hat = g^2 after bias correction, so u = g/|g| = sign(g): every coordinate moves by theta.
    assert torch.allclose(w.detach(), torch.tensor([-0.01, 0.01, -0.01], dtype=torch.float64))


def test_momentum_closed_form_with_constant_gradient():
    eta, theta, steps = 0.9, 0.05, 7
    w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = TitansOptimizer([w], lr=theta, momentum=eta, precondition=False)
    for _ in range(steps):
        w.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
    # M_T = -theta * sum_{t=1..T} (1 - eta^t) / (1 - eta)
    expected = -theta * sum((1 - eta ** t) / (1 - eta) for t in range(1, steps + 1))
    assert w.item() == pytest.approx(expected, rel=1e-12)


def test_forgetting_closed_form_with_zero_gradient():
    w = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = TitansOptimizer([w], lr=0.1, momentum=0.0, forget=0.1, precondition=False)
    for _ in range(5):
        w.grad = torch.zeros(1, dtype=torch.float64)
        opt.step()
    assert w.item() == pytest.approx(2.0 * 0.9 ** 5, rel=1e-12)


def test_non_finite_gradient_writes_nothing():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2))
    opt = TitansOptimizer([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad = torch.ones(2)
    b.grad = torch.tensor([1.0, math.inf])
    assert opt.step() is False
    assert torch.equal(a.detach(), torch.ones(2)) and torch.equal(b.detach(), torch.ones(2))
    assert len(opt.state) == 0


def test_gradient_clipping_per_group():
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = TitansOptimizer([w], lr=1.0, momentum=0.0, precondition=False, max_grad_norm=1.0)
    w.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([-0.6, -0.8], dtype=torch.float64))


def test_neural_memory_shapes_and_empty_familiarity():
    cfg = MemoryConfig(n_memory_tokens=3, memory_hidden=16, assoc_dim=8)
    mem = NeuralMemory(cfg, hidden_size=12)
    keys = mem.normalize_keys(torch.randn(5, 12))
    assert torch.allclose(keys.norm(dim=-1), torch.ones(5))
    soft, fam = mem.read(keys)
    assert soft.shape == (5, 3, 12) and fam.shape == (5,)
    assert torch.allclose(fam, torch.zeros(5))  # an empty memory finds nothing familiar
    assert (soft.abs().sum(-1) > 0).all()  # never an all-zero soft-prompt vector


def test_soft_prompt_reader_is_nonlinear_on_unit_norm_keys():
    """Keys are unit-norm, so the reader's first layer must give pre-activations of unit variance; at the
    fan-in default (variance 1/h) SiLU is nearly linear and sequential writes overwrite each other."""
    mem = NeuralMemory(MemoryConfig(), hidden_size=576)
    keys = mem.normalize_keys(torch.randn(2000, 576))
    with torch.no_grad():
        pre = mem.prompt_net[0](keys)
        act = mem.prompt_net[1](pre)
    assert 0.8 < float(pre.std()) < 1.25
    linear_part = torch.linalg.lstsq(torch.cat([pre, torch.ones(2000, 1)], 1), act).solution
    residual = act - torch.cat([pre, torch.ones(2000, 1)], 1) @ linear_part
    assert float(residual.var() / act.var()) > 0.1  # a tenth of the hidden signal is not linear in the key


def test_assoc_memory_learns_keys_it_is_shown():
    torch.manual_seed(0)
    cfg = MemoryConfig(memory_hidden=64, assoc_dim=32)
    mem = NeuralMemory(cfg, hidden_size=16)
    seen = mem.normalize_keys(torch.randn(4, 16))
    unseen = mem.normalize_keys(torch.randn(4, 16))
    opt = TitansOptimizer(mem.assoc_net.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        mem.assoc_loss(seen).mean().backward()
        opt.step()
    assert mem.familiarity(seen).min() > 0.9
    assert mem.familiarity(unseen).max() < 0.5


@pytest.mark.parametrize("changes, error, match", [
    ({"lr": -1.0}, ValueError, "lr"), ({"memory_depth": 1}, ValueError, "memory_depth"),
    ({"variant": "nope"}, ValueError, "variant"), ({"n_memory_tokens": "4"}, TypeError, "n_memory_tokens"),
    ({"momentum": 1.0}, ValueError, "momentum"), ({"precondition": 1}, TypeError, "precondition"),
    ({"max_steps": True}, TypeError, "max_steps"),
])
def test_config_validation_names_the_key(changes, error, match):
    with pytest.raises(error, match=match):
        MemoryConfig(**changes)


def test_config_round_trip_and_unknown_key(tmp_path):
    cfg = MemoryConfig(lr=0.01)
    assert MemoryConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown config key.*'bogus'"):
        MemoryConfig.from_dict({"bogus": 1})
    path = tmp_path / "x.yaml"
    path.write_text("lr: 0.02\nmax_steps: oops\n")
    with pytest.raises(TypeError, match=r"x\.yaml.*max_steps"):
        MemoryConfig.from_file(path)
    assert MemoryConfig(lr=1).lr == 1.0  # ints are accepted for floats
