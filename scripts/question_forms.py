"""Words before a taught sentence: does the memory still answer? Teach-only, no document (docs/reading.md).

    python scripts/question_forms.py --keys 12 --threads 1

Per key, a fresh memory is written with the needle's two sentences ("The pass key is NNNNN." and "Remember it.",
as the reader writes them; ``verify_prefixes`` on, ``max_steps=80``, as in the needle benchmark). Then each prompt
is answered greedily (8 new tokens) twice: with the soft prompt right before the sentence the memory recognises
(``recite_tokens=0``) and with recitation (the default: the memory recites the sentence alone, and the recitation
goes into the prompt as text). A prompt is answered when its completion contains the key.
"""

from __future__ import annotations

import argparse
import random

import torch

from hf_titans import HybridTitansEngine, MemoryConfig, load_base_model

PROMPTS = ("The pass key is", "What is the pass key? The pass key is",
           "Do you remember the pass key? The pass key is", "I forgot something. The pass key is")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_base_model()
    engine = HybridTitansEngine(model, tokenizer, MemoryConfig(verify_prefixes=True, max_steps=80))
    recite_tokens = engine.config.recite_tokens
    rng = random.Random(args.seed)
    hits = {(prompt, mode): 0 for prompt in PROMPTS for mode in ("soft prompt", "recitation")}
    for _ in range(args.keys):
        key = str(rng.randint(10000, 99999))
        engine.reset_memory()
        engine.teach([f"The pass key is {key}.", "Remember it."])
        line = [key]
        for mode, tokens in (("soft prompt", 0), ("recitation", recite_tokens)):
            engine.config.recite_tokens = tokens
            for prompt in PROMPTS:
                answer = engine.generate(prompt, max_new_tokens=8, do_sample=False)
                hits[(prompt, mode)] += key in answer
                line.append(f"{mode}|{prompt[:-16] or '(cloze)'}: {answer!r}")
        print(" ; ".join(line), flush=True)
    print(f"\n| prompt ({args.keys} keys) | soft prompt before the sentence | recitation |\n| --- | ---: | ---: |")
    for prompt in PROMPTS:
        print(f"| `{prompt}` | {hits[(prompt, 'soft prompt')]}/{args.keys} | {hits[(prompt, 'recitation')]}/{args.keys} |")


if __name__ == "__main__":
    main()
