"""Run by tests/test_parallel.py under ``torchrun --nproc-per-node 2``: every rank runs this script,
``Engine(..., tensor_parallel=2)`` makes rank 1 serve rank 0 and exit, and rank 0 prints one JSON line
comparing its batch with the single-process engine's."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import SpacedIds, random_prompts, tiny_model  # noqa: E402

from ltengine import Engine, LazyConfig  # noqa: E402

if __name__ == "__main__":
    lazy = LazyConfig(fraction=0.5, sink=4, window=16, probe=8)
    family = sys.argv[1]
    engine = Engine(tiny_model(family, layers=6), SpacedIds(), lazy=lazy, tensor_parallel=2)
    prompts = random_prompts(4, (80, 70, 66))
    got = engine.generate(prompts, max_new_tokens=10)
    want = Engine(tiny_model(family, layers=6), SpacedIds(), lazy=lazy).generate(prompts, max_new_tokens=10)
    engine.close()
    print("RESULT " + json.dumps({"tokens": [g.token_ids == w.token_ids for g, w in zip(got, want)],
                                  "lazy": [g.lazy_layers == w.lazy_layers for g, w in zip(got, want)],
                                  "kv": [g.stats.kv_bytes_after_prefill == w.stats.kv_bytes_after_prefill
                                         for g, w in zip(got, want)],
                                  "demoted": sum(len(w.lazy_layers) for w in want)}), flush=True)
