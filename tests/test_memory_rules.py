"""Equation-by-equation tests of the memory rules (float64, small tensors, no model downloads).

Every expected value is written from the paper's formula by hand (literal numbers) or computed with an
explicit loop in this file, never by calling the code under test on the same path.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_titans.config import MemoryConfig
from hf_titans.memory import (
    INNER_OPTIMIZERS, VARIANTS, DataDependentGates, NeuralMemory, GDOptimizer, M3Optimizer, MemoraOptimizer, MomentumOptimizer,
    MonetaOptimizer, TitansOptimizer, TTTLinear, YaadOptimizer, apply_gates, forgetting_closed_form, get_variant,
    huber_loss, kl_retention, kl_retention_update, l2_loss, l2_retention, l2_retention_update, lp_loss, lq_link,
    lq_link_inverse, lq_retention, momentum_closed_form, moneta_step, newton_schulz, segment_products,
    softmax_update, titans_chunked, to_simplex_, ttt_linear_dual, ttt_linear_minibatch, ttt_linear_online,
    ttt_minibatch,
)
from hf_titans.memory.optimizers import CUBIC_COEFFICIENTS, MUON_COEFFICIENTS

D = torch.float64


def T(x):
    return torch.tensor(x, dtype=D)


def close(a, b, tol=1e-12):
    a, b = torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a, b)


def linear_grad(loss_fn, w, k, v, **kw):
    """Gradient of ``loss_fn(W k, v)`` with respect to a linear memory ``W`` (autograd)."""
    w = w.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn((w @ k).unsqueeze(0), v.unsqueeze(0), **kw).sum(), w)
    return g


# ============================================================================ attentional biases (objectives.py)
def test_l2_loss_titans_eq12():
    # ||(1, -2) - (0.5, 1)||^2 = 0.25 + 9
    close(l2_loss(T([[1.0, -2.0]]), T([[0.5, 1.0]])), [9.25])
    # gradient for a linear memory: 2 (W k - v) k^T
    w, k, v = T([[0.5, -1.0], [2.0, 0.0]]), T([1.0, 2.0]), T([0.5, 1.0])
    close(linear_grad(l2_loss, w, k, v), [[-4.0, -8.0], [2.0, 4.0]])  # e = (-2, 1)


def test_lp_loss_miras_eqs_10_11():
    w, k, v = T([[0.5, -1.0], [2.0, 0.0]]), T([1.0, 2.0]), T([0.5, 1.0])
    # W k = (-1.5, 2.0), e = (-2, 1); ||e||_3^3 = 8 + 1
    close(lp_loss((w @ k).unsqueeze(0), v.unsqueeze(0), p=3), [9.0])
    # eq. 11: p (Sign(e) |e|^(p-1)) k^T = 3 * (-4, 1) k^T
    close(linear_grad(lp_loss, w, k, v, p=3), [[-12.0, -24.0], [3.0, 6.0]])
    # smooth |x| = sqrt(x^2 + eps)
    eps = 0.01
    close(lp_loss(T([[-2.0, 1.0]]), T([[0.0, 0.0]]), p=3, eps=eps), [(4 + eps) ** 1.5 + (1 + eps) ** 1.5])
    with pytest.raises(ValueError):
        lp_loss(T([[1.0]]), T([[0.0]]), p=0.5)


def test_huber_values_miras_eqs_13_to_16():
    pred, target = T([[0.3, -0.4], [3.0, -4.0]]), torch.zeros(2, 2, dtype=D)
    delta = T([1.0, 2.0])  # data-dependent, one per sample
    # coordinate (eq. 14): sample 1 all small: 0.045 + 0.08; sample 2: 2(3 - 1) + 2(4 - 1)
    close(huber_loss(pred, target, delta, "coordinate"), [0.125, 10.0])
    # norm (eq. 15): H(0.5) = 0.125; H(5) with delta 2 = 2 (5 - 1)
    close(huber_loss(pred, target, delta, "norm"), [0.125, 8.0])
    # mixture (eq. 16): l2/2 inside, delta (||e||_1 - delta/2) outside
    close(huber_loss(pred, target, delta, "mixture"), [0.125, 12.0])
    # per-channel delta for the coordinate variant: H_1(0.3) + H_0.5(0.4); H_2(3) + H_5(4)
    close(huber_loss(pred, target, T([[1.0, 0.5], [2.0, 5.0]]), "coordinate"), [0.125, 12.0])
    close(huber_loss(pred, target, 1.0, "norm"), [0.125, 4.5])  # a float delta: H_1(5) = 5 - 0.5
    with pytest.raises(ValueError):
        huber_loss(pred, target, 1.0, "bogus")


def test_huber_gradients_miras_eqs_14_to_16():
    w, v = torch.eye(2, dtype=D), torch.zeros(2, dtype=D)
    # inside delta: every variant is the l2 gradient e k^T (with the 1/2 of H)
    k = T([0.3, -0.4])
    for variant in ("coordinate", "norm", "mixture"):
        close(linear_grad(huber_loss, w, k, v, delta=1.0, variant=variant), [[0.09, -0.12], [-0.12, 0.16]])
    # e = k = (3, 0.5), ||e|| = sqrt(9.25) > delta = 2, coordinate 2 of e is below delta
    k, delta = T([3.0, 0.5]), 2.0
    # eq. 14: (e k^T) 1[|e| <= d] + (d Sign(e) k^T) 1[|e| > d]: psi = (2, 0.5)
    close(linear_grad(huber_loss, w, k, v, delta=delta, variant="coordinate"), [[6.0, 1.0], [1.5, 0.25]])
    # eq. 15: d e / ||e|| k^T
    n = math.sqrt(9.25)
    c = [delta * 3.0 / n, delta * 0.5 / n]
    close(linear_grad(huber_loss, w, k, v, delta=delta, variant="norm"),
          [[c[0] * 3.0, c[0] * 0.5], [c[1] * 3.0, c[1] * 0.5]])
    # eq. 16 (Yaad): d Sign(e) k^T
    close(linear_grad(huber_loss, w, k, v, delta=delta, variant="mixture"), [[6.0, 1.0], [6.0, 1.0]])


# ============================================================================ retention terms
def test_retention_terms_by_hand():
    w = T([[1.0, -2.0], [0.5, 0.0]])
    close(l2_retention(w), 0.5 * (1 + 4 + 0.25))
    close(l2_retention(w, T([[1.0, -1.0], [0.0, 0.0]])), 0.5 * (1 + 0.25))
    close(lq_retention(w, q=4), math.sqrt(1 + 16 + 0.0625) / 6.0)  # ||W||_4^2 / (2 (q - 1))
    close(lq_retention(w, q=2), (1 + 4 + 0.25) / 2.0)
    p, prev, eta, alpha = T([0.2, 0.8]), T([0.5, 0.5]), 0.5, 2.0
    expected = (0.2 * math.log(0.4) + 0.8 * math.log(1.6)) / eta + (0.2 * math.log(0.2) + 0.8 * math.log(0.8)) / alpha
    close(kl_retention(p, prev, eta, alpha), expected)


def test_l2_retention_update_is_the_forget_gate():
    prev, g, eta, beta = T([[1.0, -2.0], [0.5, 3.0]]), T([[0.4, 0.2], [-1.0, 0.0]]), 0.2, 0.6
    w = l2_retention_update(prev, g, eta, beta)
    lam = beta / (beta + eta)  # = 0.75
    close(w, [[lam * (1.0 - eta * 0.4), lam * (-2.0 - eta * 0.2)], [lam * (0.5 + eta), lam * 3.0]])
    # it minimises <W, g> + ||W - prev||^2 / (2 eta) + ||W||^2 / (2 beta): the gradient vanishes there
    x = w.clone().requires_grad_(True)
    obj = (x * g).sum() + (x - prev).pow(2).sum() / (2 * eta) + x.pow(2).sum() / (2 * beta)
    (gr,) = torch.autograd.grad(obj, x)
    close(gr, torch.zeros_like(gr))


def test_kl_retention_update_miras_eq21_minimises_on_simplex():
    prev = T([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    g = T([[1.0, -0.5, 0.0], [0.2, 0.4, -1.0]])
    eta, alpha = 0.5, 2.0
    w = kl_retention_update(prev, g, eta, alpha)
    # by hand: lam = (1/a)/(1/a + 1/eta), eta' = 1/(1/a + 1/eta); softmax((1 - lam) log prev - eta' g)
    inv = 1 / alpha + 1 / eta
    lam, eta_p = (1 / alpha) / inv, 1 / inv
    for r in range(2):
        logits = [(1 - lam) * math.log(prev[r, j]) - eta_p * g[r, j] for j in range(3)]
        z = sum(math.exp(x) for x in logits)
        close(w[r], [math.exp(x) / z for x in logits])
    # stationarity on each simplex row: g + (1/eta)(log W - log prev + 1) + (1/alpha)(log W + 1) is constant
    lagrange = g + (w.log() - prev.log() + 1) / eta + (w.log() + 1) / alpha
    close(lagrange - lagrange[:, :1], torch.zeros_like(lagrange), tol=1e-10)
    # and the objective is lower there than at other points of the simplex
    def objective(x):
        return (x * g).sum() + kl_retention(x, prev, eta, alpha)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        other = torch.softmax(torch.randn(2, 3, generator=gen, dtype=D), -1)
        assert objective(w) <= objective(other) + 1e-12
    # Memora's eq. 27 is eq. 21 reparametrised: retain = 1 - lam, lr = eta'
    close(softmax_update(prev, g, lr=eta_p, retain=1 - lam), w)


# ============================================================================ Titans eqs. 8, 13-14 (optimizers)
def _step_with(opt, param, grad):
    param.grad = grad.clone()
    assert opt.step() is True


def test_momentum_and_gd_optimizers_by_hand():
    # theta = 0.1, eta = 0.5, alpha = 0.2; g1 = (0.4, 0.2), g2 = (-0.2, 0.6)
    p = nn.Parameter(T([1.0, -2.0]))
    opt = MomentumOptimizer([p], lr=0.1, momentum=0.5, forget=0.2)
    _step_with(opt, p, T([0.4, 0.2]))
    close(p.data, [0.76, -1.62])  # S1 = (-0.04, -0.02); M1 = 0.8 M0 + S1
    _step_with(opt, p, T([-0.2, 0.6]))
    close(p.data, [0.608, -1.366])  # S2 = 0.5 S1 - 0.1 g2 = (0, -0.07); M2 = 0.8 M1 + S2
    # the same numbers through the existing TitansOptimizer without its preconditioner
    q = nn.Parameter(T([1.0, -2.0]))
    titans = TitansOptimizer([q], lr=0.1, momentum=0.5, forget=0.2, precondition=False)
    _step_with(titans, q, T([0.4, 0.2]))
    _step_with(titans, q, T([-0.2, 0.6]))
    close(q.data, [0.608, -1.366])
    # plain GD with the forget gate: (1 - 0.2) W - 0.1 g
    r = nn.Parameter(T([1.0, -2.0]))
    _step_with(GDOptimizer([r], lr=0.1, forget=0.2), r, T([0.4, 0.2]))
    close(r.data, [0.76, -1.62])
    # clipping to max_grad_norm: g = (3, 4) has norm 5 -> (0.6, 0.8)
    s = nn.Parameter(T([0.0, 0.0]))
    _step_with(GDOptimizer([s], lr=1.0, max_grad_norm=1.0), s, T([3.0, 4.0]))
    close(s.data, [-0.6, -0.8])


# ============================================================================ closed forms and the chunked form
def test_segment_products_by_hand():
    x = T([2.0, 3.0, 5.0])
    # P[t, i] = prod_{i < j <= t} x_j
    close(segment_products(x), [[1.0, 0.0, 0.0], [3.0, 1.0, 0.0], [15.0, 5.0, 1.0]])
    # with a zero factor (the exact masked-product path): P[1, 0] = 0, P[2, 0] = 0 * 0.25, P[2, 1] = 0.25
    close(segment_products(T([0.5, 0.0, 0.25])), [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.25, 1.0]])
    y = [0.9, 0.3, 0.7, 0.5]  # the log-space path, against explicit products
    close(segment_products(T(y)), [[math.prod(y[i + 1: t + 1]) if i <= t else 0.0 for i in range(4)] for t in range(4)])


def test_momentum_closed_form_eq14_vs_loop():
    gen = torch.Generator().manual_seed(1)
    n = 6
    u = torch.randn(n, 2, 3, generator=gen, dtype=D)
    eta = T([0.9, 0.0, 0.5, 1.0, 0.3, 0.7])  # an exact zero resets the momentum
    theta = torch.rand(n, generator=gen, dtype=D)
    s0 = torch.randn(2, 3, generator=gen, dtype=D)
    s, expected = s0.clone(), []
    for t in range(n):
        s = eta[t] * s - theta[t] * u[t]
        expected.append(s)
    close(momentum_closed_form(u, eta, theta, s0), torch.stack(expected))
    # S_t = (prod eta) S_0 - sum_i theta_i (prod_{i<j<=t} eta_j) u_i, written out for t = 3 (index 2)
    manual = 0.9 * 0.0 * 0.5 * s0 - (theta[0] * 0.0 * 0.5 * u[0] + theta[1] * 0.5 * u[1] + theta[2] * u[2])
    close(momentum_closed_form(u, eta, theta, s0)[2], manual)


def test_forgetting_closed_form_eq13_vs_loop():
    gen = torch.Generator().manual_seed(2)
    n = 5
    s = torch.randn(n, 3, generator=gen, dtype=D)
    alpha = T([0.1, 0.5, 1.0, 0.0, 0.25])  # alpha = 1 clears the memory
    m0 = torch.randn(3, generator=gen, dtype=D)
    m, expected = m0.clone(), []
    for t in range(n):
        m = (1 - alpha[t]) * m + s[t]
        expected.append(m)
    got = forgetting_closed_form(s, alpha, m0)
    close(got, torch.stack(expected))
    # M_2 = (1 - a1)(1 - a2) M_0 + (1 - a2) S_1 + S_2
    close(got[1], 0.9 * 0.5 * m0 + 0.5 * s[0] + s[1])
    close(got[2], s[2])  # everything before was forgotten


def _titans_reference(w0, keys, values, queries, theta, eta, alpha, chunk, online=False, before=False):
    """Step-by-step eqs. 13-14 with u_t = 2 (W_c k_t - v_t) k_t^T; W_c = chunk start (or M_{t-1} if online)."""
    m, s, outs = w0.clone(), torch.zeros_like(w0), []
    for t in range(keys.shape[0]):
        if t % chunk == 0:
            w_chunk = m.clone()
        base = m if online else w_chunk
        u = 2.0 * torch.outer(base @ keys[t] - values[t], keys[t])
        s = eta[t] * s - theta[t] * u
        if before:
            outs.append(m @ queries[t])
        m = (1 - alpha[t]) * m + s
        if not before:
            outs.append(m @ queries[t])
    return m, s, torch.stack(outs)


def _sequence(seed, n=10, dk=4, dv=3):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=D)
    gates = [0.3 * torch.rand(n, generator=gen, dtype=D), torch.rand(n, generator=gen, dtype=D),
             0.2 * torch.rand(n, generator=gen, dtype=D)]
    return r(dv, dk), r(n, dk) / 2, r(n, dv), r(n, dk), gates


def test_chunked_titans_equals_stepwise_with_chunk_start_gradients():
    w0, k, v, q, (theta, eta, alpha) = _sequence(3)
    for chunk in (3, 4, 16):  # 10 tokens: partial last chunk, and one chunk longer than the sequence
        res = titans_chunked(w0, k, v, theta, eta, alpha, chunk_size=chunk, queries=q)
        m, s, y = _titans_reference(w0, k, v, q, theta, eta, alpha, chunk)
        close(res.weight, m)
        close(res.momentum, s)
        close(res.outputs, y)
        before = titans_chunked(w0, k, v, theta, eta, alpha, chunk_size=chunk, queries=q, read="before")
        close(before.outputs, _titans_reference(w0, k, v, q, theta, eta, alpha, chunk, before=True)[2])


def test_chunk_size_one_is_online_and_larger_chunks_differ():
    w0, k, v, q, (theta, eta, alpha) = _sequence(4)
    m_online, s_online, y_online = _titans_reference(w0, k, v, q, theta, eta, alpha, 1, online=True)
    one = titans_chunked(w0, k, v, theta, eta, alpha, chunk_size=1, queries=q)
    close(one.weight, m_online)
    close(one.outputs, y_online)
    four = titans_chunked(w0, k, v, theta, eta, alpha, chunk_size=4, queries=q)
    assert (four.weight - m_online).abs().max() > 1e-3  # chunk-start gradients are an approximation


def test_chunked_without_momentum_is_eqs_16_17():
    w0, k, v, _, (theta, _, alpha) = _sequence(5, n=6)
    res = titans_chunked(w0, k, v, theta, 0.0, alpha, chunk_size=6)
    # eq. 16: M_b = beta_b M_0 - sum_i theta_i (beta_b / beta_i) grad l(M_0; x_i), beta_i = prod_{j<=i} (1 - alpha_j)
    beta = [math.prod(1 - float(a) for a in alpha[: i + 1]) for i in range(6)]
    expected = beta[-1] * w0
    for i in range(6):
        expected = expected - theta[i] * beta[-1] / beta[i] * 2.0 * torch.outer(w0 @ k[i] - v[i], k[i])
    close(res.weight, expected)
    # eq. 17's matmul form: Theta_b B_b (W_0 K - V) K^T with the factor 2 of eq. 12
    coef = torch.tensor([float(theta[i]) * beta[-1] / beta[i] for i in range(6)], dtype=D)
    close(res.weight, beta[-1] * w0 - 2.0 * ((k @ w0.T - v) * coef[:, None]).T @ k)
    # with eta = 0 the momentum holds only the last token's surprise: S_b = -theta_b u_b
    close(res.momentum, -theta[5] * 2.0 * torch.outer(w0 @ k[5] - v[5], k[5]))


def test_chunked_momentum_is_eq18_scan():
    # with alpha = 0 and one chunk, M_b - M_0 = sum_t S_t and S follows eq. 18 with u_t = grad l(M_0; x_t)
    w0, k, v, _, (theta, eta, _) = _sequence(6, n=5)
    s0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(7), dtype=D)
    res = titans_chunked(w0, k, v, theta, eta, 0.0, chunk_size=5, momentum=s0)
    s, total = s0.clone(), torch.zeros_like(w0)
    for t in range(5):
        s = eta[t] * s - theta[t] * 2.0 * torch.outer(w0 @ k[t] - v[t], k[t])
        total = total + s
    close(res.momentum, s)
    close(res.weight, w0 + total)


# ============================================================================ MIRAS: Moneta, Yaad, Memora
def _mirror_by_hand(a, q):
    norm = sum(abs(float(x)) ** q for x in a.flatten()) ** (1 / q)
    return [[math.copysign(abs(float(x)) ** (q - 1), float(x)) / norm ** (q - 2) for x in row] for row in a]


def test_moneta_step_miras_eq24_by_hand():
    a, g = T([[1.0, -2.0], [0.5, 0.0]]), T([[0.2, 0.4], [-1.0, 0.3]])
    new_a, w = moneta_step(a, g, lr=0.5, retain=0.9, q=4.0)
    close(new_a, [[0.8, -2.0], [0.95, -0.15]])  # A_t = 0.9 A - 0.5 g
    close(w, _mirror_by_hand(new_a, 4.0 / 3.0))  # W = Sign(A) |A|^(1/3) / ||A||_(4/3)^(-2/3)
    _, w_printed = moneta_step(a, g, lr=0.5, retain=0.9, q=4.0, link="printed")
    n2 = math.sqrt(0.8 ** 4 + 2.0 ** 4 + 0.95 ** 4 + 0.15 ** 4)  # ||A||_4^2
    close(w_printed, [[0.8 / n2, -2.0 / n2], [0.95 / n2, -0.15 / n2]])  # eq. 24 as printed: A / ||A||_4^(q-2)


def test_lq_links():
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(3, 4, generator=gen, dtype=D)
    for link in ("mirror", "printed"):
        close(lq_link(lq_link_inverse(w, 4.0, link), 4.0, link), w)
        close(lq_link(torch.zeros(2, 2, dtype=D), 4.0, link), torch.zeros(2, 2, dtype=D))
    # mirror descent with the retention R(W) = ||W||_q^2 / 2: A = grad R(W), W = grad R*(A), R* = ||A||_r^2 / 2
    wg = w.clone().requires_grad_(True)
    (a_of_w,) = torch.autograd.grad(0.5 * wg.abs().pow(4).sum().pow(0.5), wg)
    close(lq_link_inverse(w, 4.0), a_of_w)
    a = torch.randn(3, 4, generator=gen, dtype=D).requires_grad_(True)
    (g,) = torch.autograd.grad(0.5 * a.abs().pow(4.0 / 3.0).sum().pow(1.5), a)
    close(lq_link(a.detach(), 4.0), g)
    close(lq_link(0.7 * a.detach(), 4.0), 0.7 * lq_link(a.detach(), 4.0))  # 1-homogeneous: forgetting scales W
    close(lq_link(a.detach(), 2.0), a.detach())  # q = 2: no normalisation
    with pytest.raises(ValueError):
        lq_link_inverse(w, 3.0, "printed")


def test_moneta_optimizer_continues_from_the_current_memory():
    w0 = T([[0.5, -1.0], [2.0, 0.25]])
    p = nn.Parameter(w0.clone())
    opt = MonetaOptimizer([p], lr=0.5, forget=0.1, q=4.0)
    _step_with(opt, p, torch.zeros(2, 2, dtype=D))  # zero gradient: W only scaled by 1 - forget
    close(p.data, 0.9 * w0)
    p2 = nn.Parameter(w0.clone())
    opt2 = MonetaOptimizer([p2], lr=0.5, forget=0.1, q=4.0)
    g = T([[0.2, 0.4], [-1.0, 0.3]])
    _step_with(opt2, p2, g)
    n4 = sum(abs(float(x)) ** 4 for x in w0.flatten()) ** 0.25  # A_0 = Sign(W) |W|^3 / ||W||_4^2
    a0 = T([[math.copysign(abs(float(x)) ** 3, float(x)) / n4 ** 2 for x in row] for row in w0])
    close(p2.data, _mirror_by_hand(0.9 * a0 - 0.5 * g, 4.0 / 3.0))
    # a memory changed outside the optimizer (or a state saved under another link): A is derived again from W
    w1 = T([[1.0, 0.0], [0.0, -1.0]])
    p2.data.copy_(w1)
    _step_with(opt2, p2, torch.zeros(2, 2, dtype=D))
    close(p2.data, 0.9 * w1)


def test_moneta_makes_taught_keys_familiar():
    """Moneta's rule on the engine's associative memory: four unit keys become familiar in 40 steps, others not."""
    torch.manual_seed(0)
    mem = NeuralMemory(MemoryConfig(variant="moneta", assoc_lr=0.1), 64)
    keys = F.normalize(torch.randn(4, 64), dim=-1)
    others = F.normalize(torch.randn(16, 64), dim=-1)
    opt = VARIANTS["moneta"].make_optimizer(mem.assoc_net.parameters(), lr=0.1, max_grad_norm=1.0)
    for _ in range(40):
        opt.zero_grad()
        mem.assoc_losses(keys)[0].mean().backward()
        assert opt.step() is True
    with torch.no_grad():
        assert float(mem.familiarity(keys).min()) > 0.9
        assert float(mem.familiarity(others).abs().max()) < 0.2


def test_yaad_miras_eq26_by_hand():
    # one sample, linear memory, Huber-mixture bias with a data-dependent delta per step
    w0, k, v = T([[1.0, 0.0], [0.0, 1.0]]), T([3.0, 0.5]), T([0.0, 0.0])
    lin = nn.Linear(2, 2, bias=False).to(D)
    lin.weight.data.copy_(w0)
    opt = YaadOptimizer(lin.parameters(), lr=0.1, forget=0.2)
    for delta in (2.0, 10.0):
        w_before = lin.weight.detach().clone()
        e = w_before @ k - v
        norm = math.sqrt(float(e @ e))
        if norm <= delta:  # eta grad l2 (l2 = ||e||^2 / 2)
            step = [[float(e[i]) * float(k[j]) for j in range(2)] for i in range(2)]
        else:  # eta delta grad l1
            step = [[delta * math.copysign(1.0, float(e[i])) * float(k[j]) for j in range(2)] for i in range(2)]
        expected = [[0.8 * float(w_before[i, j]) - 0.1 * step[i][j] for j in range(2)] for i in range(2)]
        opt.zero_grad()
        huber_loss(lin(k.unsqueeze(0)), v.unsqueeze(0), T([delta]), "mixture").sum().backward()
        assert opt.step()
        close(lin.weight.data, expected)


def test_memora_miras_eq27_by_hand():
    w0 = T([[0.4, 0.6, 1.0], [0.1, 0.1, 0.8]])  # rows on simplices of mass 2 and 1
    g = T([[1.0, -0.5, 0.0], [0.0, 0.0, 1.0]])
    p = nn.Parameter(w0.clone())
    _step_with(MemoraOptimizer([p], lr=0.4, forget=0.25), p, g)
    for r, mass in ((0, 2.0), (1, 1.0)):
        logits = [0.75 * math.log(w0[r, j]) - 0.4 * g[r, j] for j in range(3)]
        z = sum(math.exp(x) for x in logits)
        close(p.data[r], [mass * math.exp(x) / z for x in logits])
    close(p.data.sum(-1), [2.0, 1.0])
    bad = nn.Parameter(T([[0.5, -0.5]]))
    bad.grad = T([[1.0, 1.0]])
    with pytest.raises(ValueError):
        MemoraOptimizer([bad], lr=0.1).step()
    assert torch.equal(bad.data, T([[0.5, -0.5]]))
    q = nn.Parameter(torch.zeros(2, 4, dtype=D))
    to_simplex_([q], mass=3.0)
    close(q.data, torch.full((2, 4), 0.75, dtype=D))


# ============================================================================ M3 (Nested Learning, Algorithm 1)
def _ns_by_hand(g, steps, coefficients):
    a, b, c = coefficients
    x = g / g.norm()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if tall else x


def test_newton_schulz():
    gen = torch.Generator().manual_seed(9)
    g = torch.randn(3, 5, generator=gen, dtype=D)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    close(newton_schulz(g, steps=60, coefficients=CUBIC_COEFFICIENTS, eps=0.0), u @ vh, tol=1e-10)
    close(newton_schulz(g.T, steps=60, coefficients=CUBIC_COEFFICIENTS, eps=0.0), (u @ vh).T, tol=1e-10)
    close(newton_schulz(g, steps=1, eps=0.0), _ns_by_hand(g, 1, MUON_COEFFICIENTS))
    close(newton_schulz(g.T, steps=5, eps=0.0), _ns_by_hand(g.T, 5, MUON_COEFFICIENTS))
    sv = torch.linalg.svdvals(newton_schulz(g, steps=5))
    assert float(sv.min()) > 0.5 and float(sv.max()) < 1.5  # Muon's quintic: near-orthogonal, not exact
    vec = T([1.0, -2.0])
    close(newton_schulz(vec), vec)


def test_m3_algorithm1_by_hand():
    gen = torch.Generator().manual_seed(10)
    w0 = torch.randn(2, 3, generator=gen, dtype=D)
    grads = [torch.randn(2, 3, generator=gen, dtype=D) for _ in range(7)]
    b1, b2, b3, alpha, lr, eps, f = 0.9, 0.99, 0.8, 0.5, 0.01, 1e-8, 3
    for decay in (1.0, 0.7):
        p = nn.Parameter(w0.clone())
        opt = M3Optimizer([p], lr=lr, betas=(b1, b2, b3), alpha=alpha, frequency=f, eps=eps, momentum_decay=decay)
        for g in grads:
            _step_with(opt, p, g)
        # reference: Algorithm 1, blocks k = 0, 1, 2 of f steps; M2 gets the previous block's gradient sum
        w, m1, m2, v, o2 = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0), torch.zeros_like(w0), 0.0
        for t in range(1, len(grads) + 1):
            k = (t - 1) // f
            if (t - 1) % f == 0 and k > 0:
                m2 = decay * m2 + b3 * sum(grads[i - 1] for i in range((k - 1) * f + 1, k * f + 1))
                o2 = _ns_by_hand(m2, 5, MUON_COEFFICIENTS)
            g = grads[t - 1]
            m1 = decay * m1 + b1 * g
            v = v + b2 * g * g
            o1 = _ns_by_hand(m1, 5, MUON_COEFFICIENTS)
            w = w - lr * (o1 + alpha * o2) / (v.sqrt() + eps)
        close(p.data, w, tol=1e-9)


# ============================================================================ TTT (Sun et al. 2024)
def _ttt_data(seed, n=9, d=4):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=D)
    return r(d, d) * 0.1, r(n, d) / 2, r(n, d), r(n, d), 0.2 + 0.3 * torch.rand(n, generator=gen, dtype=D)


def test_ttt_online_eq2_matches_autograd_loop():
    w0, k, v, q, lr = _ttt_data(11)
    w, z = w0.clone(), []
    for t in range(k.shape[0]):
        x = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(((x @ k[t] - v[t]) ** 2).sum(), x)  # eq. 4 with theta views applied
        w = w - lr[t] * g  # eq. 2
        z.append(w @ q[t])  # eq. 5
    res = ttt_linear_online(w0, k, v, q, lr)
    close(res.outputs, torch.stack(z))
    close(res.weight, w)


def test_ttt_minibatch_b1_is_online_and_b4_differs():
    w0, k, v, q, lr = _ttt_data(12)
    online = ttt_linear_online(w0, k, v, q, lr)
    for fn in (ttt_linear_minibatch, ttt_linear_dual):
        one = fn(w0, k, v, q, lr, batch_size=1)
        close(one.outputs, online.outputs)
        close(one.weight, online.weight)
        four = fn(w0, k, v, q, lr, batch_size=4)
        assert (four.outputs - online.outputs).abs().max() > 1e-3


def test_ttt_minibatch_eq6_by_loop_and_dual_equals_primal():
    w0, k, v, q, lr = _ttt_data(13)
    b = 4
    w, z = w0.clone(), []
    for t in range(k.shape[0]):
        if t % b == 0:
            w_start = w.clone()  # W_{t'}
        w = w - lr[t] * 2.0 * torch.outer(w_start @ k[t] - v[t], k[t])  # eq. 6: G_t at W_{t'}
        z.append(w @ q[t])
    primal, dual = ttt_linear_minibatch(w0, k, v, q, lr, b), ttt_linear_dual(w0, k, v, q, lr, b)
    for res in (primal, dual):
        close(res.outputs, torch.stack(z))
        close(res.weight, w)
    generic, params = ttt_minibatch(lambda p, x: p["w"] @ x, {"w": w0}, k, v, q, lr, b)
    close(generic, torch.stack(z))
    close(params["w"], w)


def test_ttt_theorem1_batch_gd_is_linear_attention():
    _, k, v, q, _ = _ttt_data(14, n=7)
    n = k.shape[0]
    res = ttt_linear_dual(torch.zeros(4, 4, dtype=D), k, v, q, 0.5, batch_size=n)  # W_0 = 0, eta = 1/2, b = T
    for t in range(n):
        close(res.outputs[t], sum(v[s] * float(k[s] @ q[t]) for s in range(t + 1)))  # sum_s v_s k_s^T q_t


def test_ttt_linear_layer():
    torch.manual_seed(0)
    layer = TTTLinear(6, 4, mini_batch=3).to(D)
    with torch.no_grad():
        layer.weight_init.normal_()
    x = torch.randn(7, 6, dtype=D)
    lr = torch.sigmoid(x @ layer.theta_lr.weight[0])  # eta(x) = eta_base sigmoid(theta_lr . x), eta_base = 1
    close(layer.learning_rate(x), lr)
    k, v, q = x @ layer.theta_k.weight.T, x @ layer.theta_v.weight.T, x @ layer.theta_q.weight.T
    close(layer(x), ttt_linear_minibatch(layer.weight_init.detach(), k, v, q, lr, 3).outputs, tol=1e-10)
    close(layer(x.unsqueeze(0))[0], layer(x))
    ln = TTTLinear(6, 4, mini_batch=3, ln_residual=True).to(D)
    out = ln(x)
    assert out.shape == (7, 4) and torch.isfinite(out).all()
    out.sum().backward()  # the outer loop trains the views through the inner updates
    assert ln.theta_k.weight.grad is not None and ln.theta_k.weight.grad.abs().sum() > 0


# ============================================================================ data-dependent gates
def test_data_dependent_gates():
    x = torch.randn(2, 6, 5, dtype=D)
    gates = DataDependentGates(5, {"theta": (0.1, 1.0), "eta": (0.9, 1.0), "alpha": (0.01, 0.5)}, dtype=D)
    out = gates(x)
    close(out["theta"], torch.full((2, 6), 0.1, dtype=D))
    close(out["eta"], torch.full((2, 6), 0.9, dtype=D))
    close(out["alpha"], torch.full((2, 6), 0.01, dtype=D))
    dep = DataDependentGates(5, {"theta": (0.1, 1.0)}, channels=3, init_std=1.0,
                             generator=torch.Generator().manual_seed(0), dtype=D)
    th = dep(x)["theta"]
    th = th.detach()
    assert th.shape == (2, 6, 3) and float(th.min()) > 0 and float(th.max()) < 1.0
    assert (th[0, 0] - th[0, 1]).abs().max() > 1e-6  # depends on the token
    w, b = dep.proj.weight, dep.proj.bias
    close(th, torch.sigmoid(x @ w.T + b))  # max * sigmoid(x w + b), max = 1
    chunked = DataDependentGates(5, {"theta": (0.1, 1.0)}, chunk_size=4, init_std=1.0, dtype=D)
    th = chunked(x)["theta"]
    close(th[:, 0], th[:, 3])
    close(th[:, 4], th[:, 5])
    close(th[:, 0], torch.sigmoid(x[:, :4].mean(1) @ chunked.proj.weight[0] + chunked.proj.bias[0]))
    with pytest.raises(ValueError):
        DataDependentGates(5, {"theta": (2.0, 1.0)})
    p = nn.Parameter(T([1.0]))
    opt = MomentumOptimizer([p], lr=0.1)
    apply_gates(opt, theta=T(0.3), eta=0.5, alpha=0.25)
    assert opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[0]["momentum"] == 0.5
    assert opt.param_groups[0]["forget"] == 0.25
    with pytest.raises(KeyError):
        apply_gates(MonetaOptimizer([p], lr=0.1), eta=0.5)


def test_gates_drive_the_rules():
    """Per-token gates from DataDependentGates feed the chunked Titans form and TTT, and train end to end."""
    w0, k, v, q, _ = _sequence(15)
    x = torch.randn(k.shape[0], 5, dtype=D)
    gates = DataDependentGates(5, {"theta": (0.2, 1.0), "eta": (0.8, 1.0), "alpha": (0.05, 1.0)}, init_std=0.5,
                               generator=torch.Generator().manual_seed(3), dtype=D)
    g = gates(x)
    res = titans_chunked(w0, k, v, g["theta"], g["eta"], g["alpha"], chunk_size=4, queries=q)
    detached = [g[n].detach() for n in ("theta", "eta", "alpha")]
    close(res.outputs, _titans_reference(w0, k, v, q, *detached, 4)[2])
    res.outputs.pow(2).sum().backward()  # the outer loop can learn the gates through the parallel form
    assert gates.proj.weight.grad is not None and gates.proj.weight.grad.abs().sum() > 0
    lr = DataDependentGates(5, {"theta": (0.3, 1.0)}, init_std=0.5, dtype=D)(x)["theta"].detach()
    close(ttt_linear_dual(w0, k, v, q, lr, 4).outputs, ttt_linear_minibatch(w0, k, v, q, lr, 4).outputs)


# ============================================================================ the step() -> bool contract
OPTIMIZERS = {
    "gd": lambda ps: GDOptimizer(ps, lr=0.1, forget=0.01),
    "momentum": lambda ps: MomentumOptimizer(ps, lr=0.1, momentum=0.9, forget=0.01),
    "titans_preconditioned": lambda ps: TitansOptimizer(ps, lr=0.1, momentum=0.9),
    "m3": lambda ps: M3Optimizer(ps, lr=0.01, frequency=2),
    "moneta": lambda ps: MonetaOptimizer(ps, lr=0.1, forget=0.01),
    "yaad": lambda ps: YaadOptimizer(ps, lr=0.1, forget=0.01),
    "memora": lambda ps: MemoraOptimizer(ps, lr=0.1, forget=0.01),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_writes_nothing(name, bad):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2)).to(D)
    if name == "memora":
        to_simplex_(net.parameters())
    opt = OPTIMIZERS[name](list(net.parameters()))
    x, y = torch.randn(5, 3, dtype=D), torch.randn(5, 2, dtype=D)
    for _ in range(3):  # build some optimizer state first (M3 crosses a block boundary)
        opt.zero_grad()
        l2_loss(net(x), y).mean().backward()
        assert opt.step() is True
    opt.zero_grad()
    l2_loss(net(x), y).mean().backward()
    net[2].bias.grad[0] = bad
    params = copy.deepcopy([p.detach() for p in net.parameters()])
    state = copy.deepcopy(opt.state_dict())
    assert opt.step() is False
    for before, p in zip(params, net.parameters()):
        assert torch.equal(before, p.detach())
    after = opt.state_dict()
    assert set(after["state"]) == set(state["state"])
    for key, st in state["state"].items():
        for name_, value in st.items():
            got = after["state"][key][name_]
            assert torch.equal(got, value) if torch.is_tensor(value) else got == value
    net[2].bias.grad[0] = 0.0
    assert opt.step() is True  # and it writes again once gradients are finite


# ============================================================================ each rule learns a toy association
def _toy(seed=0, n=6, d=8, hidden=16):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=D), dim=-1)
    values = torch.tanh(2.0 * keys @ torch.randn(d, d, generator=gen, dtype=D).T)
    net = nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, d)).to(D)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=D) / m.in_features ** 0.5)
                m.bias.zero_()
        net[2].weight.mul_(0.1)
    return net, keys, values


TOY = {  # variant, inner optimizer, lr, steps
    "titans": ("titans", None, 0.05, 80),
    "titans+gd": ("titans", "gd", 0.3, 80),
    "titans+m3": ("titans", "m3", 0.01, 80),  # Algorithm 1 as printed (no momentum decay)
    "moneta": ("moneta", None, 0.1, 80),
    "yaad": ("yaad", None, 0.3, 80),
    "yaad+momentum": ("yaad", "momentum", 0.05, 80),
    "ttt_linear": ("ttt_linear", None, 0.3, 80),
}


@pytest.mark.parametrize("case", sorted(TOY))
def test_each_rule_learns_a_toy_association(case):
    name, inner, lr, steps = TOY[case]
    spec = get_variant(name)
    net, keys, values = _toy()
    opt = spec.make_optimizer(net.parameters(), lr=lr, forget=0.0, inner=inner)
    before = float(l2_loss(net(keys), values).mean().detach())
    for _ in range(steps):
        opt.zero_grad()
        spec.loss(net(keys), values).mean().backward()
        assert opt.step()
    after = float(l2_loss(net(keys), values).mean().detach())
    assert after < 0.3 * before, (case, before, after)


def test_memora_learns_a_toy_association_on_the_simplex():
    gen = torch.Generator().manual_seed(1)
    d = 6
    target = torch.softmax(2.0 * torch.randn(d, d, generator=gen, dtype=D), -1)  # a reachable memory
    keys = torch.eye(d, dtype=D)
    values = keys @ target.T
    lin = nn.Linear(d, d, bias=False).to(D)
    with torch.no_grad():
        lin.weight.zero_()
    to_simplex_(lin.parameters())  # uniform rows: MIRAS's "empty" KL memory
    spec = get_variant("memora")
    assert spec.needs_simplex
    opt = spec.make_optimizer(lin.parameters(), lr=2.0)
    before = float(l2_loss(lin(keys), values).mean().detach())
    for _ in range(60):
        opt.zero_grad()
        spec.loss(lin(keys), values).mean().backward()
        assert opt.step()
    after = float(l2_loss(lin(keys), values).mean().detach())
    assert after < 0.3 * before
    close(lin.weight.sum(-1), torch.ones(d, dtype=D))


def test_registry():
    assert set(VARIANTS) == {"titans", "moneta", "yaad", "memora", "ttt_linear"}
    assert set(INNER_OPTIMIZERS) == {"gd", "momentum", "m3"}
    p = [nn.Parameter(torch.ones(2, 2, dtype=D))]
    assert isinstance(VARIANTS["titans"].make_optimizer(p, lr=0.1), MomentumOptimizer)
    assert isinstance(VARIANTS["titans"].make_optimizer(p, lr=0.1, inner="m3"), M3Optimizer)
    assert isinstance(VARIANTS["moneta"].make_optimizer(p, lr=0.1), MonetaOptimizer)
    assert VARIANTS["moneta"].make_optimizer(p, lr=0.1, link="printed").param_groups[0]["link"] == "printed"
    assert isinstance(VARIANTS["memora"].make_optimizer(p, lr=0.1), MemoraOptimizer)
    assert isinstance(VARIANTS["ttt_linear"].make_optimizer(p, lr=0.1), GDOptimizer)
    with pytest.raises(ValueError):
        VARIANTS["moneta"].make_optimizer(p, lr=0.1, inner="momentum")
    with pytest.raises(ValueError):
        get_variant("nope")
    # the Yaad loss takes a data-dependent delta
    pred, target = T([[3.0, -4.0]]), T([[0.0, 0.0]])
    close(VARIANTS["yaad"].loss(pred, target, delta=T([2.0])), [12.0])
    close(VARIANTS["moneta"].loss(pred, target), [27.0 + 64.0])
