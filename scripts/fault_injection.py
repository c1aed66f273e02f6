"""Fault injection: SIGKILL a process at random points while it saves, teaches (with periodic saves) and chats
(``generate(learn=True)`` + save), then check that the last good checkpoint loads and answers exactly as before.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/fault_injection.py               # 50 kills on a tiny model
    python scripts/fault_injection.py --kills 200 --seed 3 --work /tmp/faults      # more, elsewhere

How: the parent builds a tiny model and a first checkpoint, then forks a child per kill (fork: no import cost, the
child shares the parent's model). The child loops over one scenario; before every save it appends to a journal
(fsynced) the checksum of the memory it is about to save and what that memory answers (greedy completions and
surprise of fixed prompts). The parent sleeps a random time, SIGKILLs the child and loads the folder: it must load
(a save killed between its two renames is recovered, see ``hf_titans.reliability.recover_interrupted_save``),
its memory must be one the journal knows, and it must answer exactly what the journal says. A shared byte tells
in which phase the child was killed. One extra kill per run lands deterministically between the two renames of
a save. Prints the counts; the last line is one JSON object. Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_titans import HybridTitansEngine, MemoryConfig  # noqa: E402
from hf_titans.reliability import tensors_digest  # noqa: E402

PROMPTS = ["The secret project code is", "The meeting is at", "Hello world, how"]
FACTS = ["The secret project code is Omega-99.", "The meeting is at 4:32 PM exactly.",
         "The CEO's favorite fruit is a apple.", "My shopping list is eggs, milk, bread",
         "The capital of France is Paris.", "Water boils at one hundred degrees."]
PHASES = {0: "starting", 1: "teaching", 2: "chatting", 3: "journaling", 4: "saving", 5: "restoring"}
SCENARIOS = ("save", "teach", "chat")


def answers(engine: HybridTitansEngine) -> dict:
    return {"completions": [engine.generate(p, max_new_tokens=5, do_sample=False) for p in PROMPTS],
            "surprise": engine.surprise(FACTS[:3]), "familiarity": engine.familiarity(PROMPTS)}


def digest(engine: HybridTitansEngine) -> str:
    return tensors_digest(engine.memory.state_dict())


def journal(path: Path, engine: HybridTitansEngine) -> None:
    record = {"digest": digest(engine), "updates": engine.updates, "answers": answers(engine)}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_journal(path: Path) -> dict[str, dict]:
    known = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # the child was killed while writing this line
            continue
        known[record["digest"]] = record
    return known


def child(scenario: str, engine: HybridTitansEngine, folder: Path, journal_path: Path, phase: mmap.mmap,
          seed: int, states: list) -> None:
    """Runs until killed."""
    rng = random.Random(seed)
    warnings.simplefilter("ignore")

    def set_phase(p: int) -> None:
        phase[0] = p

    journaled: set[int] = set()

    def save(state: int | None = None) -> None:
        if state is None or state not in journaled:  # a precomputed memory is journaled once per child
            set_phase(3)
            journal(journal_path, engine)
            if state is not None:
                journaled.add(state)
        set_phase(4)
        engine.save_pretrained(folder)

    i = 0
    while True:
        i += 1
        if scenario == "save":  # nearly all the time in save_pretrained: switch between precomputed memories
            set_phase(5)
            engine._restore(states[i % len(states)][0])
            engine.updates = states[i % len(states)][1]
            save(i % len(states))
        elif scenario == "teach":
            set_phase(1)
            engine.teach(f"{rng.choice(FACTS)} Note {seed}-{i}.", max_steps=2)
            if i % 2 == 0:
                save()
        else:
            set_phase(2)
            engine.generate(f"Remember that item {seed}-{i} is in box {rng.randint(10, 99)}.", learn=True,
                            max_new_tokens=3)
            save()


def kill_between_renames(engine: HybridTitansEngine, folder: Path, journal_path: Path, phase: mmap.mmap) -> None:
    """In a child: teach, journal, then save with os.replace patched to SIGKILL the process right after the old
    checkpoint was moved aside (the one moment the folder does not exist)."""
    from hf_titans import hub

    warnings.simplefilter("ignore")
    engine.teach("The rename window is a narrow place.", max_steps=2)
    journal(journal_path, engine)
    real_replace = os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        if ".old-" in str(dst):
            os.kill(os.getpid(), signal.SIGKILL)

    hub.os.replace = replace_then_die
    phase[0] = 4
    engine.save_pretrained(folder)
    os._exit(3)  # not reached


def check(model, tokenizer, folder: Path, journal_path: Path) -> tuple[bool, str]:
    known = read_journal(journal_path)
    try:
        engine = HybridTitansEngine.from_pretrained(model, folder, tokenizer=tokenizer)
    except Exception as err:  # noqa: BLE001 - any failure to load is what we count
        return False, f"does not load: {type(err).__name__}: {err}"
    key = digest(engine)
    if key not in known:
        return False, f"holds a memory that was never saved whole (digest {key[:19]}...)"
    got = answers(engine)
    if got != known[key]["answers"]:
        return False, f"answers differ: {got} != {known[key]['answers']}"
    return True, f"updates {engine.updates}"


def tiny_model():
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_model, make_tokenizer

    tokenizer = make_tokenizer()
    return make_model("llama", len(tokenizer)), tokenizer


def run(kills: int = 50, seed: int = 0, work: Path | None = None, max_delay: float = 1.2,
        verbose: bool = True) -> dict:
    torch.set_num_threads(1)
    rng = random.Random(seed)
    work = Path(work or "/tmp/hf_titans_faults")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    folder, journal_path = work / "memory", work / "journal.jsonl"
    model, tokenizer = tiny_model()
    engine = HybridTitansEngine(model, tokenizer, MemoryConfig(max_steps=2, learn_steps=2, seed=seed))
    engine.teach(FACTS[:2])
    journal(journal_path, engine)
    engine.save_pretrained(folder)
    states = []
    for fact in FACTS[2:5]:
        engine.teach(fact)
        states.append((engine._snapshot(), engine.updates))
    phase = mmap.mmap(-1, 1)
    counts = {"kills": 0, "loads_ok": 0, "failures": 0, "recovered_rename_window": 0, "leftover_temp_folders": 0,
              "by_scenario": {s: 0 for s in SCENARIOS}, "by_phase": {name: 0 for name in PHASES.values()}}
    failures = []
    start = time.perf_counter()
    plan = [SCENARIOS[i % len(SCENARIOS)] for i in range(kills)] + ["rename-window"]
    for n, scenario in enumerate(plan, 1):
        phase[0] = 0
        pid = os.fork()
        if pid == 0:  # the child: never returns
            try:
                if scenario == "rename-window":
                    kill_between_renames(engine, folder, journal_path, phase)
                else:
                    child(scenario, engine, folder, journal_path, phase, seed * 1000 + n, states)
            finally:
                os._exit(2)
        if scenario != "rename-window":
            time.sleep(rng.uniform(0.05, max_delay))
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        where = PHASES.get(phase[0], "?")
        counts["kills"] += killed
        if scenario != "rename-window":
            counts["by_scenario"][scenario] += 1
            counts["by_phase"][where] += 1
        missing = not folder.exists()
        ok, detail = check(model, tokenizer, folder, journal_path)
        if scenario == "rename-window":
            counts["recovered_rename_window"] += int(missing and ok)
            ok = ok and missing and killed
            detail += f" (folder missing after the kill: {missing})"
        leftovers = [p for p in work.iterdir() if p.name.startswith(".memory.")]
        counts["leftover_temp_folders"] += len(leftovers)
        for p in leftovers:  # a killed save leaves its temporary folder; remove it like a janitor would
            shutil.rmtree(p, ignore_errors=True)
        counts["loads_ok"] += ok
        if not ok:
            counts["failures"] += 1
            failures.append(f"kill {n} ({scenario}, {where}): {detail}")
        if verbose:
            print(f"kill {n:3d}  {scenario:13s} in {where:10s}  {'ok  ' if ok else 'FAIL'}  {detail}", flush=True)
    counts["seconds"] = round(time.perf_counter() - start, 1)
    counts["journal_records"] = len(read_journal(journal_path))
    counts["failure_details"] = failures
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="random kills (plus one between the renames)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-delay", type=float, default=1.2, help="longest wait before a kill, seconds")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hf_titans_faults"))
    args = parser.parse_args(argv)
    counts = run(args.kills, args.seed, args.work, args.max_delay)
    print(f"{counts['kills']} kills ({counts['by_scenario']}; by phase {counts['by_phase']}), "
          f"{counts['loads_ok']} loads answered as journaled, {counts['failures']} failures, "
          f"{counts['recovered_rename_window']} recovered rename-window kill(s), "
          f"{counts['leftover_temp_folders']} leftover temp folder(s), {counts['seconds']} s")
    print(json.dumps(counts))
    return 0 if counts["failures"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
