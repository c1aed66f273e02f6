"""Behaviour of HybridTitansEngine on tiny random Llama, GPT-2 and Qwen2 models (seconds, no files)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from conftest import weights_hash
from hf_titans import HybridTitansEngine, MemoryConfig
from hf_titans.injection import hidden_at_layer
from hf_titans.memory import NeuralMemory

FACT = "alpha beta gamma delta epsilon zeta eta theta"
PROMPT = "alpha beta gamma"
UNRELATED = ["The capital of France is", "Once upon a time there was", "Water boils at"]
# Random tiny models are harder to steer than a trained LM: give them more steps.
TINY = MemoryConfig(max_steps=80, learn_steps=80)


@pytest.fixture
def taught(tiny_lm):
    model, tok = tiny_lm
    engine = HybridTitansEngine(model, tok, TINY)
    bare = {p: engine.generate(p, max_new_tokens=6, use_memory=False) for p in [PROMPT, *UNRELATED]}
    report = engine.teach([FACT])
    return engine, report, bare


def test_teach_lowers_surprise_and_recalls(taught):
    engine, report, bare = taught
    fact = report.facts[0]
    assert fact.written and fact.steps > 0
    assert fact.surprise_after < 0.5 * fact.surprise_before
    assert engine.surprise(FACT) == pytest.approx(fact.surprise_after, abs=1e-5)
    out = engine.generate(PROMPT, max_new_tokens=6)
    assert out.strip().startswith("delta"), out
    assert out != bare[PROMPT]


def test_unrelated_prompts_answer_exactly_as_bare_model(taught):
    engine, _, bare = taught
    for prompt in UNRELATED:
        assert engine.familiarity(prompt) < engine.config.familiarity_threshold
        assert engine.generate(prompt, max_new_tokens=6) == bare[prompt]


def test_base_model_never_changes_and_is_outside_memory(tiny_llama):
    model, tok = tiny_llama
    before = weights_hash(model)
    engine = HybridTitansEngine(model, tok, TINY)
    engine.teach([FACT])
    engine.generate(PROMPT, max_new_tokens=4, learn=True)
    engine.generate(["Hello world", PROMPT], max_new_tokens=4)
    assert weights_hash(model) == before
    base_params = {id(p) for p in model.parameters()}
    assert not any(id(p) in base_params for p in engine.memory.parameters())
    assert all(not p.requires_grad for p in model.parameters())


def test_memory_read_once_per_prompt(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, TINY)
    engine.teach([FACT])
    calls = []
    original = engine.memory.read
    monkeypatch.setattr(engine.memory, "read", lambda keys: calls.append(keys.shape[0]) or original(keys))
    engine.generate(PROMPT, max_new_tokens=12)
    assert calls == [1]


def test_generation_features(tiny_llama):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, TINY)
    engine.teach([FACT])
    greedy = engine.generate(PROMPT, max_new_tokens=5)
    # GenerationConfig, beams, sampling (seeded), several return sequences
    assert engine.generate(PROMPT, generation_config=GenerationConfig(max_new_tokens=5, do_sample=False,
                                                                     pad_token_id=0)) == greedy
    beams = engine.generate(PROMPT, max_new_tokens=5, num_beams=3, num_return_sequences=2)
    assert isinstance(beams, list) and len(beams) == 2
    torch.manual_seed(0)
    s1 = engine.generate(PROMPT, max_new_tokens=5, do_sample=True, top_k=5)
    torch.manual_seed(0)
    assert engine.generate(PROMPT, max_new_tokens=5, do_sample=True, top_k=5) == s1

    # streamer receives the generated tokens
    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens += value.flatten().tolist()

        def end(self):
            pass

    streamer = Collect()
    out = engine.generate(PROMPT, max_new_tokens=5, streamer=streamer)
    assert tok.decode(streamer.tokens, skip_special_tokens=True).endswith(out)

    # stopping criteria stop early
    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 2, dtype=torch.bool)

    short = engine.generate(PROMPT, max_new_tokens=10, stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert len(tok(short).input_ids) <= 3


def test_batch_with_left_padding_matches_single_prompts(tiny_llama):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, TINY)
    engine.teach([FACT])
    prompts = [PROMPT, "The capital of France is", "Hello"]
    batch = engine.generate(prompts, max_new_tokens=5)
    assert batch[0] == engine.generate(PROMPT, max_new_tokens=5)
    bare_batch = engine.generate(prompts, max_new_tokens=5, use_memory=False)
    direct = model.generate(**tok(prompts, return_tensors="pt", padding=True, padding_side="left"),
                            max_new_tokens=5, pad_token_id=tok.pad_token_id, do_sample=False)
    assert bare_batch == tok.batch_decode(direct[:, -5:], skip_special_tokens=True)


def test_learn_while_generating_recalls_in_a_later_call(tiny_lm):
    model, tok = tiny_lm
    engine = HybridTitansEngine(model, tok, TINY)
    assert engine.last_surprise is None and engine.last_familiarity is None  # nothing generated yet
    engine.generate(FACT, learn=True, max_new_tokens=3)
    assert len(engine.last_familiarity) == 1
    first = engine.last_surprise[0]
    assert first > engine.config.surprise_threshold
    assert engine.updates > 0
    assert engine.generate(PROMPT, max_new_tokens=3).strip().startswith("delta")
    engine.generate(FACT, learn=True, max_new_tokens=3)
    assert engine.last_surprise[0] < 0.5 * first  # the prefill now sees the memory's soft prompt
    # asking about a stored fact does not write the question over the answer
    updates = engine.updates
    engine.generate(PROMPT, learn=True, max_new_tokens=3)
    assert engine.updates == updates
    assert engine.generate(PROMPT, max_new_tokens=3).strip().startswith("delta")
    # a prompt below the surprise threshold is not written
    calm = HybridTitansEngine(model, tok, TINY.replace(surprise_threshold=1e6))
    calm.generate(FACT, learn=True, max_new_tokens=3)
    assert calm.updates == 0 and calm.familiarity(PROMPT) < calm.config.familiarity_threshold


def test_unsurprising_text_is_not_written(tiny_llama):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, MemoryConfig(surprise_threshold=1e6))
    report = engine.teach([FACT])
    assert report.written == 0 and report.facts[0].steps == 0 and engine.updates == 0


def test_reset_memory_forgets(tiny_llama):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, TINY)
    fresh = copy.deepcopy(engine.memory.state_dict())
    engine.teach([FACT])
    engine.reset_memory()
    for name, tensor in engine.memory.state_dict().items():
        assert torch.equal(tensor, fresh[name]), name
    assert engine.familiarity(PROMPT) < engine.config.familiarity_threshold


def test_teaching_is_deterministic(tokenizer):
    from conftest import make_model

    states = []
    for _ in range(2):
        engine = HybridTitansEngine(make_model("llama", len(tokenizer)), tokenizer)
        engine.teach([FACT, "Hello world, how are you?"])
        states.append(engine.memory.state_dict())
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name


@pytest.mark.parametrize("bad, error", [
    ("", ValueError), ("   \n", ValueError), ([], ValueError), (["ok", 3], TypeError), (42, TypeError),
    (None, TypeError), ("word " * 400, ValueError),
])
def test_bad_input_is_refused_and_memory_unchanged(tiny_llama, bad, error):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, TINY)
    before = copy.deepcopy(engine.memory.state_dict())
    with pytest.raises(error):
        engine.teach(bad)
    with pytest.raises(error):
        engine.generate(bad)
    with pytest.raises(error):
        engine.surprise(bad)
    for name, tensor in engine.memory.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_non_finite_update_is_skipped_with_warning(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, TINY)
    before = copy.deepcopy(engine.memory.state_dict())
    original = engine._token_nll
    monkeypatch.setattr(engine, "_token_nll",
                        lambda *a, **k: original(*a, **k) * (float("nan") if torch.is_grad_enabled() else 1.0))
    with pytest.warns(UserWarning, match="non-finite"):
        report = engine.teach([FACT], max_steps=3)
    assert report.skipped_nonfinite == 3
    for name, tensor in engine.memory.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_failed_teach_restores_memory(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, TINY)
    engine.teach([FACT])
    before = copy.deepcopy(engine.memory.state_dict())
    calls = {"n": 0}
    original = engine._step

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "_step", failing)
    with pytest.raises(RuntimeError, match="boom"):
        engine.teach(["Hello world, how are you?"])
    for name, tensor in engine.memory.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_model_without_input_embeddings_is_refused(tiny_llama):
    model, tok = tiny_llama

    class NoEmbeddings(torch.nn.Module):
        config = model.config

        def generate(self):
            pass

        def get_input_embeddings(self):
            return None

    with pytest.raises(TypeError, match="input embeddings"):
        HybridTitansEngine(NoEmbeddings(), tok)
    with pytest.raises(TypeError, match="causal LM"):
        HybridTitansEngine("gpt2", tok)
    with pytest.raises(TypeError, match="MemoryConfig"):
        HybridTitansEngine(model, tok, config={"lr": 1})


def test_prompt_embeds_match_generate_inputs(tiny_llama):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, TINY)
    plain = engine.prompt_embeds("Hello world")
    assert torch.equal(plain, model.get_input_embeddings()(tok("Hello world", return_tensors="pt").input_ids)[0])
    engine.teach([FACT])
    embeds = engine.prompt_embeds(PROMPT)
    n_tokens = len(tok(PROMPT).input_ids)
    assert embeds.shape == (engine.config.n_memory_tokens + n_tokens, model.config.hidden_size)
    out = model.generate(inputs_embeds=embeds[None], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert tok.decode(out[0], skip_special_tokens=True) == engine.generate(PROMPT, max_new_tokens=5)


def test_a_later_write_keeps_earlier_facts(tiny_llama):
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, TINY)
    engine.teach([FACT])
    first = engine.generate(PROMPT, max_new_tokens=3)
    assert first.strip().startswith("delta")
    engine.teach(["Once upon a time there was a king who lived in a castle."])
    assert engine.familiarity(PROMPT) >= engine.config.familiarity_threshold
    assert engine.generate(PROMPT, max_new_tokens=3) == first


def test_rehearsal_weight_keeps_earlier_soft_prompts_in_place(tiny_llama):
    """The self-distillation term is what holds an earlier fact's soft prompt while a later one is written:
    with weight 0 the second write moves it; with a large weight it moves far less."""
    model, tok = tiny_llama
    drift = {}
    for weight in (0.0, 1000.0):
        engine = HybridTitansEngine(model, tok, TINY.replace(rehearsal_weight=weight))
        engine.teach([FACT])
        before = engine.prepare_inputs(PROMPT)["soft_prompts"].clone()
        engine.teach(["Once upon a time there was a king who lived in a castle."])
        after = engine.prepare_inputs(PROMPT)["soft_prompts"]
        drift[weight] = float(((after - before) / engine.memory.embed_scale).pow(2).mean())
    assert drift[1000.0] < 0.25 * drift[0.0], drift


def test_key_neighbours_are_unit_keys_at_the_given_cosine():
    keys = torch.nn.functional.normalize(torch.randn(5, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    around = NeuralMemory.neighbours(keys, 3, seed=1)
    assert around.shape == (15, 64)
    assert torch.allclose(around.norm(dim=-1), torch.ones(15), atol=1e-5)
    assert torch.allclose((around * keys.repeat_interleave(3, dim=0)).sum(-1), torch.full((15,), 0.8), atol=1e-5)
    assert torch.equal(around, NeuralMemory.neighbours(keys, 3, seed=1))  # seeded
    assert not torch.allclose(around[0], around[1])  # distinct neighbours of one key


def test_rehearsal_neighbours_hold_the_soft_prompt_around_an_earlier_key(tiny_llama):
    """With ``rehearsal_neighbours`` a later write also keeps what the memory says near an earlier key (where its
    paraphrases fall), not only at the key itself."""
    model, tok = tiny_llama
    drift = {}
    for count in (0, 8):
        engine = HybridTitansEngine(model, tok, TINY.replace(rehearsal_neighbours=count))
        engine.teach([FACT])
        stored = engine.memory.rehearsal_keys()
        probes = NeuralMemory.neighbours(stored, 2, seed=123)  # not the neighbours the engine draws
        with torch.no_grad():
            before = engine.memory.read(probes)[0].clone()
        engine.teach(["Once upon a time there was a king who lived in a castle."])
        with torch.no_grad():
            after = engine.memory.read(probes)[0]
        drift[count] = float(((after - before) / engine.memory.embed_scale).pow(2).mean())
    assert drift[8] < 0.7 * drift[0], drift  # measured: 0.115 against 0.213


@pytest.mark.parametrize("mode", ["mag", "mal"])
def test_layer_rehearsal_holds_the_layer_memory_at_earlier_writes(tiny_llama, mode):
    """mag / mal keep hidden states of written texts (16 per text) and hold the layer memory's output there while
    a later text is written; without them the second write moves it freely."""
    model, tok = tiny_llama
    drift, kept = {}, {}
    for states in (0, 64):
        engine = HybridTitansEngine(model, tok, TINY.replace(mode=mode, memory_layer=1, rehearsal_weight=1000.0,
                                                             layer_rehearsal_states=states))
        engine.teach([FACT])
        probe = engine.memory.rehearsal_states() if states else None
        kept[states] = len(engine.memory.rehearsal_states())
        ids, mask = engine._encode([FACT])
        hidden = hidden_at_layer(model, ids, mask, 1)[mask.bool()]
        with torch.no_grad():
            before = engine.memory.layer_delta(hidden.unsqueeze(0)).clone()
        engine.teach(["Once upon a time there was a king who lived in a castle."])
        with torch.no_grad():
            after = engine.memory.layer_delta(hidden.unsqueeze(0))
        drift[states] = float(((after - before) / engine.memory.layer_scale).pow(2).mean())
        if probe is not None:  # the bank holds unit-RMS states of the first text, then of the second
            assert torch.allclose(probe.pow(2).mean(-1), torch.ones(len(probe)), atol=1e-2)
            assert len(engine.memory.rehearsal_states()) > kept[states]
    assert kept == {0: 0, 64: min(16, int(ids.shape[1]))}
    assert drift[64] < 0.5 * drift[0], drift


def test_a_sentence_before_a_taught_prompt_does_not_hide_it(tiny_llama):
    """The memory is read with the key of the whole prompt or of its last sentence, whichever is more familiar."""
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, TINY)
    engine.teach([FACT])
    prompt = "Once upon a time there was a king.\n" + PROMPT
    ids, mask = engine._encode([prompt])
    with torch.no_grad():
        whole = float(engine.memory.familiarity(engine._keys(ids, mask)[:, -1]))
    assert whole < engine.config.familiarity_threshold  # the whole prompt's key alone would stay silent
    assert engine.familiarity(prompt) == pytest.approx(engine.familiarity(PROMPT), abs=1e-5)
    assert engine.prepare_inputs(prompt)["speaks"].all()
    assert max(engine.familiarity(UNRELATED)) < engine.config.familiarity_threshold


def test_last_sentence_starts_left_and_right_padded(tokenizer):
    from hf_titans.injection import last_sentence_starts

    texts = ["Once upon a time. alpha beta gamma", "Is it? Yes! And now\nalpha beta", "alpha beta gamma?"]
    for side in ("left", "right"):
        batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side=side)
        starts = last_sentence_starts(tokenizer, batch["input_ids"], batch["attention_mask"])
        tails = [tokenizer.decode(batch["input_ids"][b, s:][batch["attention_mask"][b, s:].bool()]).strip()
                 for b, s in enumerate(starts)]
        assert tails == ["alpha beta gamma", "alpha beta", "alpha beta gamma?"], (side, tails)


def test_join_prefix_puts_vectors_before_the_chosen_token():
    from hf_titans.injection import join_prefix

    tokens = torch.arange(2 * 5 * 1, dtype=torch.float).view(2, 5, 1) + 1  # token j of row b: 5 * b + j + 1
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    prefix = torch.full((2, 2, 1), -1.0)
    embeds, full, positions = join_prefix(tokens, mask, prefix, torch.ones(2, 2, dtype=torch.bool),
                                          insert_at=torch.tensor([3, 0]))
    assert embeds[0, :, 0].tolist() == [0, 2, 3, -1, -1, 4, 5]  # row 0: tokens 1, 2 | soft | tokens 3, 4
    assert full[0].tolist() == [0, 1, 1, 1, 1, 1, 1]
    assert embeds[1, :, 0].tolist() == [-1, -1, 6, 7, 8, 9, 10]  # row 1: soft in front
    for b in range(2):
        for j in range(5):
            if mask[b, j]:
                assert embeds[b, positions[b, j], 0] == tokens[b, j, 0]
    with pytest.raises(ValueError, match="insert_at"):
        join_prefix(tokens, mask, prefix, torch.ones(2, 2, dtype=torch.bool), insert_at=torch.tensor([0, 0]))


def test_soft_prompt_goes_before_the_recognised_sentence(tiny_llama):
    """Read by its last sentence, a prompt gets the soft prompt right before that sentence (where it stood when the
    sentence was written) when recitation is off; surprise, learn-while-generating and a hand-built pass agree on
    every token's NLL."""
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, TINY.replace(recite_tokens=0))
    engine.teach([FACT])
    prompt = "Once upon a time there was a king.\n" + PROMPT
    inputs = engine.prepare_inputs([prompt, PROMPT])
    assert inputs["speaks"].all()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    at = int(inputs["insert_at"][0])
    assert tok.decode(ids[0, at:]).strip() == PROMPT  # row 0: before its last sentence
    assert int(inputs["insert_at"][1]) == int(mask[1].argmax())  # row 1: in front of the whole prompt
    n = engine.config.n_memory_tokens
    soft = inputs["soft_prompts"][0]
    embeds = inputs["inputs_embeds"][0]
    token_embeds = model.get_input_embeddings()(ids[0])
    first = int(mask[0].argmax())
    assert torch.equal(embeds[n + at - n:n + at], soft)
    assert torch.equal(embeds[first:at], token_embeds[first:at])  # moved left by n
    assert torch.equal(embeds[n + at:], token_embeds[at:])

    # Surprise by hand: token j is predicted by the position right before it, the last soft vector for token `at`.
    alone = model.get_input_embeddings()(ids[0, first:])
    k = at - first
    seq = torch.cat([alone[:k], soft, alone[k:]]).unsqueeze(0)
    with torch.no_grad():
        logits = model(inputs_embeds=seq).logits[0]
    where = [j - 1 if j < k else j - 1 + n if j > k else k + n - 1 for j in range(1, len(alone))]
    nll = torch.nn.functional.cross_entropy(logits[where], ids[0, first + 1:])
    assert engine.surprise(prompt) == pytest.approx(float(nll), abs=1e-4)
    engine.generate(prompt, learn=True, max_new_tokens=2)  # familiar: read, not written
    assert engine.last_surprise[0] == pytest.approx(float(nll), abs=1e-4)


def test_recitation_goes_before_the_recognised_sentence_as_text(tiny_llama):
    """Words before a recognised sentence: the memory first recites the sentence (its soft prompt in front of the
    sentence alone, greedy), and the recitation goes into the prompt as text, with no soft prompt. Prompts read
    whole and prompts the memory is silent for are untouched."""
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, TINY)
    engine.teach([FACT])
    alone = engine.generate(PROMPT, max_new_tokens=engine.config.recite_tokens)  # the memory on the sentence alone
    lead = "Once upon a time there was a king.\n"
    inputs = engine.prepare_inputs([lead + PROMPT, PROMPT, UNRELATED[0]])
    recited, _, _ = inputs["recitations"]
    assert inputs["recitations"][1:] == [None, None]
    assert recited.startswith(FACT)  # the memory recalls the taught text
    assert recited == (PROMPT + alone).rstrip()  # no sentence end in the tiny model's output: all its tokens
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert tok.decode(ids[0][mask[0].bool()]) == lead + recited + "\n" + PROMPT
    assert inputs["speaks"].tolist() == [True, True, False]
    # Row 0 reaches the model as plain tokens (the recitation speaks for the memory), row 1 with its soft prompt.
    n, embed = engine.config.n_memory_tokens, model.get_input_embeddings()
    embeds, full = inputs["inputs_embeds"], inputs["embeds_attention_mask"]
    assert torch.equal(embeds[0][full[0].bool()], embed(ids[0][mask[0].bool()]))
    assert torch.equal(embeds[1, -len(ids[1][mask[1].bool()]) - n:][:n], inputs["soft_prompts"][1])
    bare = engine.generate(UNRELATED[0], max_new_tokens=6, use_memory=False)
    assert engine.generate([lead + PROMPT, UNRELATED[0]], max_new_tokens=6)[1] == bare
    assert engine.last_recitations == [recited, None]

    silent = HybridTitansEngine(model, tok, TINY.replace(recite_tokens=0))
    silent.memory.load_state_dict(engine.memory.state_dict())
    assert silent.prepare_inputs(lead + PROMPT)["recitations"] == [None]


def test_a_recitation_ends_with_its_sentence(tiny_llama, monkeypatch):
    """A recitation is cut where the sentence ends; one that adds nothing is dropped (the soft prompt is used)."""
    model, tok = tiny_llama
    engine = HybridTitansEngine(model, tok, TINY)
    engine.teach([FACT])
    said = {"text": " delta epsilon. zeta eta"}

    def fake_generate(**kwargs):  # what the model "says" after the soft prompt and the sentence
        words = tok(said["text"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        return words.repeat(kwargs["inputs_embeds"].shape[0], 1)

    monkeypatch.setattr(model, "generate", fake_generate)
    prompt = "Once upon a time there was a king.\n" + PROMPT
    assert engine.prepare_inputs(prompt)["recitations"] == [PROMPT + " delta epsilon."]
    said["text"] = "\nOnce upon"
    inputs = engine.prepare_inputs(prompt)
    assert inputs["recitations"] == [None]
    assert tok.decode(inputs["input_ids"][0]) == prompt and "inputs_embeds" in inputs


def test_last_sentence_is_keyed_as_the_same_text_on_its_own(tiny_lm):
    """The sentence candidate of a two-sentence prompt gets exactly the key of that sentence as a prompt of its own,
    although inside the prompt its first token carries a space (" alpha" where the text alone has "alpha")."""
    from hf_titans.injection import hidden_at_layer, prefix_means, prompt_key_candidates

    model, tok = tiny_lm
    prompt = "Once upon a time there was a king. " + PROMPT
    batch = tok([prompt], return_tensors="pt")
    (_, sentence), (_, start) = prompt_key_candidates(model, tok, batch["input_ids"], batch["attention_mask"], 1)
    cut = batch["input_ids"][0, int(start[0]):]
    alone = tok([PROMPT], return_tensors="pt")
    assert tok.decode(cut) == " " + PROMPT and cut.tolist() != alone["input_ids"][0].tolist()
    key = prefix_means(hidden_at_layer(model, alone["input_ids"], alone["attention_mask"], 1), alone["attention_mask"])
    torch.testing.assert_close(sentence, key[:, -1])


def _worst_prefix_nll(engine, text: str) -> float:
    """The largest continuation NLL over a text's prefixes (from ``min_prefix_tokens`` on), each prefix read with
    its own key, the text encoded alone."""
    ids, mask = engine._encode([text])
    ends = torch.arange(engine.config.min_prefix_tokens - 1, ids.shape[1])
    with torch.no_grad():
        soft, _ = engine.memory.read(engine._keys(ids, mask)[0, ends])
        nll = engine._token_nll(ids.expand(len(ends), -1), mask.expand(len(ends), -1), soft,
                                torch.ones(len(ends), dtype=torch.bool), ends)
    return float(nll.max())


def test_verify_prefixes_writes_until_every_prefix_is_below_target(tiny_llama):
    """Without it a text counts as written when the few prefixes of the last step are below target_loss, which
    leaves others above; with it every prefix's continuation is below target_loss when teach() returns."""
    model, tok = tiny_llama
    texts = ["Once upon a time there was a king who lived in a castle.", FACT]
    worst, steps = {}, {}
    for verify in (False, True):
        torch.manual_seed(0)
        engine = HybridTitansEngine(model, tok, MemoryConfig(max_steps=120, target_loss=1.0, verify_prefixes=verify))
        report = engine.teach(texts)
        steps[verify] = report.steps
        worst[verify] = max(_worst_prefix_nll(engine, t) for t in texts)
    assert worst[False] >= 1.0, worst  # the sampled check alone stops early here
    assert worst[True] < 1.0, worst
    assert steps[True] > steps[False]


def test_keys_of_a_left_padded_text_equal_its_keys_alone(tiny_lm):
    """Keys are computed with positions that skip the padding, so absolute-position models (GPT-2) key a text the
    same in a batch as alone."""
    model, tok = tiny_lm
    engine = HybridTitansEngine(model, tok, TINY)
    ids, mask = engine._encode(["Once upon a time there was a king who lived in a castle.", FACT])
    alone_ids, alone_mask = engine._encode([FACT])
    with torch.no_grad():
        batch = engine._keys(ids, mask)[1, -alone_ids.shape[1]:]
        alone = engine._keys(alone_ids, alone_mask)[0]
    torch.testing.assert_close(batch, alone, atol=1e-4, rtol=1e-4)
