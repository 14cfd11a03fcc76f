"""Quick device probe of the paged path: kernel GB/s vs copy bandwidth, engine decode tok/s at 1x8k.

    python3 bench/paged_probe.py            # on a CUDA machine
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltengine import Engine, LazyConfig  # noqa: E402
from ltengine.kernels.paged import paged_decode_triton  # noqa: E402


def copy_bandwidth() -> float:
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        y.copy_(x)
    e.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (s.elapsed_time(e) / 1e3)


def kernel_point(name, b, tokens, layers, bw, bs=64, h_kv=8, h_q=32, d=128, **knobs):
    blocks = -(-tokens // bs)
    nb = b * blocks * layers + 1
    k = torch.randn(nb, bs, h_kv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    tables = (torch.randperm(nb - 1, device="cuda")[: layers * b * blocks] + 1).int().view(layers, b, blocks)
    n = torch.full((b,), tokens, dtype=torch.int32, device="cuda")
    q = torch.randn(b, h_q, d, device="cuda", dtype=torch.bfloat16)
    for i in range(layers):
        paged_decode_triton(q, k, v, tables[i], n, 0.1, **knobs)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 5
    s.record()
    for _ in range(reps):
        for i in range(layers):
            paged_decode_triton(q, k, v, tables[i], n, 0.1, **knobs)
    e.record()
    torch.cuda.synchronize()
    sec = s.elapsed_time(e) / 1e3 / reps
    read = 2 * b * tokens * h_kv * d * 2 * layers
    name = f"{name} {knobs}" if knobs else name
    print(f"{name:60s} KV read {read / 1e9:6.2f} GB  {sec * 1e3:7.2f} ms  {read / sec / 1e9:7.0f} GB/s "
          f"= {100 * read / sec / bw:5.1f}% of copy")
    del k, v
    torch.cuda.empty_cache()
    return read / sec


def main():
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    kernel_point("sink+window B=64 W=1024", 64, 1024, 32, bw)
    kernel_point("full B=8 T=32k", 8, 32768, 32, bw)
    kernel_point("full B=1 T=8k", 1, 8192, 32, bw)
    if "--sweep" in sys.argv:  # each setting three times: block placement in the pool is random
        for knobs in ({}, {"block_n": 32, "num_stages": 3}, {"block_n": 32, "num_stages": 4},
                      {"block_n": 64, "num_stages": 3, "num_warps": 8}, {"block_n": 32, "num_stages": 3, "splits": 1}):
            for point in (("sink+window B=64 W=1024", 64, 1024), ("full B=8 T=32k", 8, 32768)):
                for _ in range(3):
                    kernel_point(*point, 32, bw, **knobs)
    import transformers as tf

    cfg = json.loads((Path(__file__).parent / "llama3_8b_config.json").read_text())
    config = tf.LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    t0 = time.time()
    torch.manual_seed(0)
    with torch.device("cuda"):
        config.dtype = torch.bfloat16
        model = tf.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    print(f"model built in {time.time() - t0:.1f} s, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, 128000, (8192,)).tolist()
    for name, lazy in (("full", None), ("lazy 50%", LazyConfig(fraction=0.5, window=1020))):
        eng = Engine(model, tokenizer=None, lazy=lazy, kv_budget="20GiB")
        eng.generate(ids[:512], max_new_tokens=8, ignore_eos=True)  # warm-up: compile + capture
        out = eng.generate(ids, max_new_tokens=128, ignore_eos=True)
        st = eng.last_stats
        kv = 2 * 8 * 128 * 2 * (8192 + 64) * (32 - len(out.lazy_layers)) + 2 * 8 * 128 * 2 * 1024 * len(out.lazy_layers)
        floor = (weights + kv) / bw
        print(f"engine 1x8k {name:9s} prefill {st['prefill_s']:.2f} s  decode {st['decode_tokens_per_s']:.1f} tok/s "
              f"(floor {1 / floor:.0f} tok/s, {100 * st['decode_tokens_per_s'] * floor:.0f}%)  attention={st['attention']}")


if __name__ == "__main__":
    main()
