"""Markdown for bench/RESULTS.md from bench/throughput.py JSON files (the fp8 device run).

    python3 bench/fp8_report.py $OUT/fp8_budget.json $OUT/fp8_longest.json > $OUT/fp8_results.md

One table row per measured run (point, mode, batch x prompt, prefill s, decode tok/s, floor tok/s,
% of floor, peak KV, lazy layers, status, note), then every target with its measured value, as
``throughput.py`` computed them.
"""
from __future__ import annotations

import json
import sys


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def main(paths: list[str]) -> int:
    runs = [json.load(open(p)) for p in paths]
    info = runs[0]["info"]
    print(f"{info.get('device')}, {info.get('dtype')} weights, copy {info.get('copy_bw_GBps', 0):.0f} GB/s, "
          f"KV bytes per token and layer: bf16 {info.get('kv_bytes_per_token_layer')}, fp8 "
          f"{info.get('kv_bytes_per_token_layer_fp8')} (scales included); commit {info.get('commit')}\n")
    print("| point | mode | batch x prompt | prefill s | decode tok/s | floor tok/s | % floor | peak KV GiB | lazy | status | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        for r in run["records"]:
            kv = r.get("peak_kv_bytes")
            lazy = ",".join(map(str, sorted(set(r.get("lazy_counts_ok") or [])))) or "-"
            print(f"| {r['point']} | {r['mode']} | {r.get('batch', '?')} x {r.get('prompt_tokens', '?')} | "
                  f"{_f(r.get('prefill_s'), '.2f')} | {_f(r.get('decode_tok_s'), '.1f')} | {_f(r.get('floor_tok_s'), '.1f')} | "
                  f"{_f(r.get('floor_pct'), '.0f')} | {_f(kv / 2**30 if kv else None, '.2f')} | {lazy} | "
                  f"{r.get('status')} | {(r.get('note') or '') + (' ' + r['error'][:120] if r.get('error') else '')} |")
    print("\n| target | measured | |\n|---|---|---|")
    for run in runs:
        for t in run.get("targets") or []:
            if t["holds"] is None:
                continue
            v = t["value"]
            print(f"| {t['target']} | {_f(v, '.2f') if isinstance(v, (int, float)) else v} | "
                  f"{'holds' if t['holds'] else '**missed**'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
