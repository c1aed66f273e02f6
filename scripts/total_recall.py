"""Total recall on the embedded SmolLM2-135M-Instruct: teach four facts, wipe the context, answer from memory.

    python scripts/total_recall.py
"""

import sys
import time

from hf_titans import HybridTitansEngine, load_base_model
from hf_titans.demo import run_total_recall


def main() -> int:
    start = time.perf_counter()
    model, tokenizer = load_base_model()
    print(f"loaded {model.config.name_or_path} in {time.perf_counter() - start:.1f} s")
    engine = HybridTitansEngine(model, tokenizer)
    result = run_total_recall(engine)
    print(result.report)
    print(result)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
