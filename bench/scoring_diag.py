"""Why does 50% lazy ``peak`` lose RULER's multi-query / UUID tasks? A per-sample dump (CPU, default model).

For each sample: the prompt prefilled once (``harness.shared_prefill``); every layer's peak score
(probe 16) and the layers peak50 demotes; full attention's and peak50's greedy answers; then full's
own answer teacher-forced through a second prefill of prompt + answer, whose hook gives every layer's
rotated q and k, so the attention of each *answer* row over the prompt is exact full-attention decode.
Per needle (the value's token span in the context) it lists the layers with a head putting >= ``--thr``
of its mass on that needle at some answer row ("the layers that read needle i"), and the same for the
16 probe rows (what the score sees). Also: which keys of the question lie inside the last 16 rows.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python bench/scoring_diag.py --task niah_multiquery --n 6
"""
from __future__ import annotations

import argparse
import json

import torch

from ltengine import Engine
from ltengine.eval.harness import shared_prefill
from ltengine.eval.ruler import make_samples
from ltengine.eval.ruler_decode import Job, batched_greedy
from ltengine.eval.ruler_prompt import string_match_all
from ltengine.eval.ruler_configs import parse_config
from ltengine.eval.scoring import layer_scores
from ltengine.lazy import probe_probs
from ltengine.models import load_model


def token_spans(tok, ids: list[int], needle: str, start_tok: int = 0) -> list[tuple[int, int]]:
    """Token ranges [a, b) of ``ids`` covering each occurrence of ``needle`` in their decoded text."""
    pieces = [tok.decode([i]) for i in ids]
    offs, pos = [], 0
    for p in pieces:
        offs.append(pos)
        pos += len(p)
    text = "".join(pieces)
    out, at = [], text.find(needle, offs[start_tok] if start_tok < len(offs) else 0)
    while at >= 0:
        a = max(i for i, o in enumerate(offs) if o <= at)
        b = max(i for i, o in enumerate(offs) if o < at + len(needle)) + 1
        out.append((a, b))
        at = text.find(needle, at + 1)
    return out


def row_mass(q: torch.Tensor, k: torch.Tensor, rows: int, spans: list[tuple[int, int]], scale: float) -> torch.Tensor:
    """Mass ``[n_spans, H_q, rows]`` that the last ``rows`` queries put on each key span (causal)."""
    probs, _, _ = probe_probs(q[-rows:].transpose(0, 1), k.transpose(0, 1), scale)  # [H_kv, G, P, T]
    probs = probs.reshape(-1, rows, probs.shape[-1])
    return torch.stack([probs[:, :, a:b].sum(-1) for a, b in spans])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="niah_multiquery")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thr", type=float, default=0.3)
    ap.add_argument("--configs", default="peak50", help="lazy RULER configs (ruler_configs names) decoded and listed")
    ap.add_argument("--out", default=None, help="JSON dump of everything printed")
    args = ap.parse_args()
    model, tok = load_model(None, dtype=torch.float32)
    engine = Engine(model, tok, lazy=None)
    ad = engine.adapter
    dump = []
    for s in make_samples(tok, [args.task], [args.length], args.n, args.seed):
        sp = shared_prefill(ad, s.ids, 64)
        n_layers, t = sp.num_layers, len(s.ids)
        peak = sp.ratios(4, 256, 16, "peak")
        cfgs = {c: parse_config(c) for c in args.configs.split(",")}
        lazy = {c: cfg.eval_config(t, n_layers).lazy_layers(sp) for c, cfg in cfgs.items()}
        scores = {c: layer_scores(sp, cfg.sink, cfg.window, cfg.probe, cfg.score) for c, cfg in cfgs.items()}
        jobs = [Job(sp.full, frozenset(ls), 4, 256, sp.logits, t, s.max_new_tokens, s.answers)
                for ls in [[], *lazy.values()]]
        outs = batched_greedy(ad, jobs, engine.eos_ids, lambda x: tok.decode(x, skip_special_tokens=True))
        texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
        sp.release()
        # needles: each answer's span in the context; keys: their spans inside the question tail
        vals = [token_spans(tok, s.ids, v)[0] for v in s.answers]
        tail0 = t - s.question_tokens
        keys = [sp_ for k in _keys(s) for sp_ in token_spans(tok, s.ids, k, tail0)[-1:]] if _keys(s) else []
        in_probe = [k for k, (a, b) in zip(_keys(s), keys) if b > t - 16]
        # teacher-force full's answer: rows t-1 .. t+M-2 are the decode rows of the answer tokens
        ans = outs[0][:-1] if outs[0][-1] in engine.eos_ids else outs[0]
        m = len(ans)
        qk = {}
        shared_prefill(ad, s.ids + ans[:-1], 1, hook=lambda i, q, k: qk.__setitem__(i, row_mass(
            q, k, m + 16 - 1, vals, ad.scale))).release()
        # rows: [0, 16) probe rows (t-16 .. t-1); the last m rows (t-1 .. t+m-2) answer rows; overlap at t-1
        readers, seen = [], []
        for v in range(len(vals)):
            dec = [i for i in range(n_layers) if float(qk[i][v, :, 15:].max()) >= args.thr]
            prb = [i for i in range(n_layers) if float(qk[i][v, :, :16].max()) >= args.thr]
            readers.append(dec)
            seen.append(prb)
        union = sorted(set().union(*map(set, readers)))
        auc = {c: reader_auc(sc, union) for c, sc in scores.items()}
        rec = dict(index=s.index, prompt_tokens=t, answers=s.answers,
                   full=texts[0], answers_by_rule={r: tx for r, tx in zip(lazy, texts[1:])},
                   full_score=string_match_all(texts[0], s.answers),
                   scores={r: string_match_all(tx, s.answers) for r, tx in zip(lazy, texts[1:])},
                   keys_in_probe16=in_probe, needle_tokens=vals,
                   peak_scores=[round(x, 3) for x in peak], layer_scores=scores, reader_auc=auc, lazy=lazy, readers=readers, probe_sees=seen,
                   max_mass=[[round(float(qk[i][v, :, 15:].max()), 2) for i in range(n_layers)] for v in range(len(vals))])
        dump.append(rec)
        print(f"\n=== {args.task} #{s.index}: {t} tokens; answers {s.answers}")
        print(f"full ({rec['full_score']:.2f}): {texts[0]!r}")
        for r, tx in zip(lazy, texts[1:]):
            print(f"{r} ({string_match_all(tx, s.answers):.2f}): {tx!r}   lazy {lazy[r]}  reader AUC {auc[r]}")
        print(f"keys inside the last 16 rows: {in_probe} of {_keys(s)}")
        print("peak score per layer:", " ".join(f"{i}:{x:.2f}" for i, x in enumerate(peak)))
        for v, (dec, prb) in enumerate(zip(readers, seen)):
            lost = {c: [i for i in dec if i in ls] for c, ls in lazy.items()}
            print(f"needle {v} ({s.answers[v]} at tokens {vals[v]}): read during decode by layers {dec}; "
                  f"seen by the last 16 rows in {prb}; demoted readers: {lost}")
    for c in args.configs.split(","):
        ok = [r["reader_auc"][c] for r in dump if r["full_score"] == 1.0 and r["reader_auc"][c] is not None]
        dem = [len(set(r["lazy"][c]) & set().union(*map(set, r["readers"]))) for r in dump if r["full_score"] == 1.0]
        print(f"{c}: over the {len(ok)} samples full answers right, reader AUC {sum(ok) / max(1, len(ok)):.2f}, "
              f"readers demoted {sum(dem) / max(1, len(dem)):.1f} on average")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dump, f, indent=1)


def reader_auc(scores: list[float], readers: list[int]) -> float | None:
    """P(a non-reader layer scores lazier than a reader layer), ties half: 1 = the rule ranks every
    reader below every non-reader (keeps readers first), 0.5 = no better than chance."""
    rd = [scores[i] for i in readers]
    nr = [x for i, x in enumerate(scores) if i not in readers]
    if not rd or not nr:
        return None
    return sum((a > b) + 0.5 * (a == b) for a in nr for b in rd) / (len(rd) * len(nr))


def _keys(s) -> list[str]:
    """The queried keys, parsed back from the question ("... for A, B, C, and D mentioned ...")."""
    q = s.question.split(" for ", 1)[1].rsplit(" mentioned", 1)[0]
    return [k.strip() for k in q.replace(", and ", ", ").split(", ")] if "magic" in s.question else []


if __name__ == "__main__":
    main()
