"""Numerics, determinism and concurrency (issue 9, parts 2, 5 and 6).

tests/test_engine.py already checks that a NaN loss is skipped with a warning and that teaching twice in one
process gives equal weights. Here: a non-finite gradient behind a finite loss, an update that overflows the
weights (finite_step undoes it), long runs stay finite and bounded (scripts/stress_numerics.py runs 1000), bit
identical weights across fresh processes and through generate(learn=True) and read(), and one engine shared by
threads that teach, generate, learn and save at once.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from conftest import make_model, make_tokenizer
from hf_titans import HybridTitansEngine, MemoryConfig, hub
from hf_titans.reliability import finite_step, tensors_digest, weight_stats

REPO = Path(__file__).resolve().parents[1]
FACT = "The secret project code is Omega-99."
FACTS = ["The secret project code is Omega-99.", "The meeting is at 4:32 PM exactly.",
         "The CEO's favorite fruit is a apple.", "My shopping list is eggs, milk, bread"]


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    tokenizer = make_tokenizer()
    return make_model("llama", len(tokenizer)), tokenizer


from test_reliability_properties import flat_state  # noqa: E402


def state(engine: HybridTitansEngine):
    return copy.deepcopy(engine.memory.state_dict()), copy.deepcopy(engine.optimizer.state_dict())


def assert_same_state(engine: HybridTitansEngine, before) -> None:
    memory, optimizer = before
    for name, tensor in engine.memory.state_dict().items():
        assert torch.equal(tensor, memory[name]), name
    now, old_state = flat_state(engine.optimizer.state_dict()), flat_state(optimizer)
    assert set(now) == set(old_state)
    for key, value in now.items():
        old = old_state[key]
        assert torch.equal(value, old) if torch.is_tensor(value) else value == old


# ---------------------------------------------------------------------------------------------- numerics
def test_non_finite_gradient_behind_a_finite_loss_is_skipped_and_counted(base):
    model, tokenizer = base
    engine = HybridTitansEngine(model, tokenizer, MemoryConfig(max_steps=3))
    before = state(engine)
    handle = engine.memory.prompt_bias.register_hook(lambda g: torch.full_like(g, float("inf")))
    try:
        with pytest.warns(UserWarning, match="non-finite gradient"):
            report = engine.teach(FACT)
    finally:
        handle.remove()
    assert report.skipped_nonfinite == 3 and engine.skipped_nonfinite == 3 and engine.updates == 0
    assert_same_state(engine, before)
    assert weight_stats(engine.memory)["finite"]


def test_an_update_that_overflows_the_weights_is_undone(base):
    """lr at float32's largest: the gradient is finite, the update is not. finite_step undoes it."""
    model, tokenizer = base
    engine = HybridTitansEngine(model, tokenizer, MemoryConfig(max_steps=2, lr=3e38, assoc_lr=3e38,
                                                               precondition=False, max_grad_norm=3e38))
    before = state(engine)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = engine.teach(FACT)
    assert report.skipped_nonfinite >= 1 and engine.skipped_nonfinite == report.skipped_nonfinite
    assert any("non-finite" in str(w.message) for w in caught)
    assert weight_stats(engine.memory)["finite"]
    if engine.updates == 0:
        assert_same_state(engine, before)
    assert isinstance(engine.generate("The secret project code is", max_new_tokens=3), str)  # still answers


def test_finite_step_restores_weights_and_state_exactly():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    q = torch.nn.Parameter(torch.tensor([3.0]))
    opt = torch.optim.SGD([p, q], lr=1.0, momentum=0.9)
    p.grad, q.grad = torch.tensor([0.5, 0.5]), torch.tensor([1.0])
    assert finite_step(opt)
    kept_p, kept_q = p.detach().clone(), q.detach().clone()
    kept_state = {k: v.clone() for k, v in opt.state[p].items()}
    p.grad, q.grad = torch.tensor([3e38, 0.0]), torch.tensor([1.0])  # p overflows to -inf, q would be fine
    opt.param_groups[0]["lr"] = 10.0
    assert not finite_step(opt)
    assert torch.equal(p, kept_p) and torch.equal(q, kept_q)
    assert all(torch.equal(opt.state[p][k], v) for k, v in kept_state.items())


def test_long_runs_keep_every_weight_finite_and_bounded(base):
    """60 calls of the hardest case (every call takes every step; scripts/stress_numerics.py runs 1000:
    max |w| 0.89 -> 4.3 for the same fact 1000 times, 4.5 at most for 1000 different facts)."""
    model, tokenizer = base
    config = MemoryConfig(surprise_threshold=0.0, target_loss=0.0, max_steps=2)
    for texts in ([FACT] * 60, [f"Item {i} is stored in box {100 + 7 * i}." for i in range(60)]):
        engine = HybridTitansEngine(model, tokenizer, config)
        start = weight_stats(engine.memory)
        for text in texts:
            engine.teach(text)
        end = weight_stats(engine.memory)
        assert end["finite"] and end["non_finite"] == 0 and engine.skipped_nonfinite == 0
        assert end["max_abs"] < 4 * start["max_abs"] and end["norm"] < 15 * start["norm"], (start, end)
        assert engine.updates == 2 * len(texts)


# ---------------------------------------------------------------------------------------------- determinism
DETERMINISM = """
import sys, torch
torch.set_num_threads(1)
from conftest import make_model, make_tokenizer
from hf_titans import HybridTitansEngine, MemoryConfig
from hf_titans.reliability import tensors_digest
tok = make_tokenizer()
engine = HybridTitansEngine(make_model("llama", len(tok)), tok, MemoryConfig(max_steps=4, learn_steps=2, seed=7))
engine.teach({facts!r})
engine.generate("Remember: the vault code is 4471.", learn=True, max_new_tokens=3)
engine.read("A long note. The pass key is 90210. More filler text here.", chunk_tokens=16, progress=False)
from test_reliability_properties import flat_state
opt = {{k: torch.as_tensor(v) for k, v in flat_state(engine.optimizer.state_dict()).items() if torch.is_tensor(v) or isinstance(v, (int, float))}}
print(tensors_digest(engine.memory.state_dict()), tensors_digest(opt))
"""


def run_fresh(script: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_same_seed_same_facts_give_bit_identical_weights_across_processes(base):
    """teach, generate(learn=True) and read() in a fresh process and in this one: the same bytes."""
    model, tokenizer = base
    script = DETERMINISM.format(facts=FACTS[:3])
    first = run_fresh(script)
    engine = HybridTitansEngine(model, tokenizer, MemoryConfig(max_steps=4, learn_steps=2, seed=7))
    engine.teach(FACTS[:3])
    engine.generate("Remember: the vault code is 4471.", learn=True, max_new_tokens=3)
    engine.read("A long note. The pass key is 90210. More filler text here.", chunk_tokens=16, progress=False)
    opt = {k: torch.as_tensor(v) for k, v in flat_state(engine.optimizer.state_dict()).items()
           if torch.is_tensor(v) or isinstance(v, (int, float))}
    here = f"{tensors_digest(engine.memory.state_dict())} {tensors_digest(opt)}"
    assert first == here
    other = HybridTitansEngine(model, tokenizer, MemoryConfig(max_steps=4, learn_steps=2, seed=8))
    other.teach(FACTS[:3])
    assert tensors_digest(other.memory.state_dict()) != here.split()[0]  # the seed matters: the test can fail


# ---------------------------------------------------------------------------------------------- concurrency
def test_threads_teaching_generating_learning_and_saving_never_tear_the_memory(base, tmp_path):
    """One engine, four threads. Every update holds the engine's RLock, so every checkpoint saved meanwhile is
    one of the states between two whole updates (recorded under the same lock), and loads."""
    model, tokenizer = base
    engine = HybridTitansEngine(model, tokenizer, MemoryConfig(max_steps=2, learn_steps=2))
    consistent = {tensors_digest(engine.memory.state_dict())}
    errors: list[BaseException] = []
    done = threading.Event()
    saved: list[Path] = []

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as err:  # noqa: BLE001 - reported by the test
                errors.append(err)
        return run

    def teacher():
        for i in range(6):
            with engine._lock:  # re-entrant: teach takes it again; the digest is of this very update's result
                engine.teach(f"{FACTS[i % len(FACTS)]} Note {i}.")
                consistent.add(tensors_digest(engine.memory.state_dict()))
        done.set()

    def learner():
        for i in range(4):
            with engine._lock:
                engine.generate(f"Remember that box {i} holds {i * 17} marbles.", learn=True, max_new_tokens=2)
                consistent.add(tensors_digest(engine.memory.state_dict()))

    def reader():
        while not done.is_set():
            assert isinstance(engine.generate("The secret project code is", max_new_tokens=2), str)
            assert 0 <= engine.surprise(FACT) < 100

    def saver():
        i = 0
        while not done.is_set() or i < 2:
            saved.append(engine.save_pretrained(tmp_path / f"ckpt-{i}"))
            i += 1

    threads = [threading.Thread(target=guarded(f)) for f in (teacher, learner, reader, saver)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(saved) >= 2 and len(consistent) >= 5
    for folder in saved:
        checkpoint = hub.load_checkpoint(folder)
        loaded = tensors_digest(checkpoint.memory_state)
        assert loaded in consistent, f"{folder.name} holds a torn memory"
    assert weight_stats(engine.memory)["finite"]
