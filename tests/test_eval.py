"""ltengine/eval: the shared-prefill harness against Engine.generate, and a short run of every command
(profile, eval passkey | niah | ppl) on the default model, checking the PNGs and the tables."""
from __future__ import annotations

import json
import random
import struct

import pytest

from ltengine import Engine, LazyConfig, cli
from ltengine.eval import cli as eval_cli
from ltengine.eval.grid import EvalConfig, make_grid
from ltengine.eval.harness import greedy, shared_prefill
from ltengine.eval.stats import wilson
from ltengine.eval.tasks import passkey_sample

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def engine(default_model):
    model, tokenizer = default_model
    return Engine(model, tokenizer, lazy=None)


@pytest.fixture
def cli_engine(engine, monkeypatch):
    """The eval commands get the session's model instead of loading their own."""
    monkeypatch.setattr(eval_cli, "_engine", lambda args: engine)
    return engine


def assert_png(path, min_bytes: int = 2000) -> tuple[int, int]:
    """A real, non-trivial PNG: signature, IHDR size, decodable by PIL when it is there."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) >= min_bytes, (path, len(data))
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 100 and height >= 100, (path, width, height)
    pil = pytest.importorskip("PIL.Image")
    with pil.open(path) as im:
        im.verify()
    return width, height


def md_rows(path) -> list[list[str]]:
    """Data rows of a one-table markdown file (header and separator checked, then dropped)."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    assert len(lines) >= 3 and lines[1].startswith("|---"), lines[:2]
    width = lines[0].count("|")
    assert all(ln.startswith("|") and ln.count("|") == width for ln in lines), lines
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


CONFIGS = [EvalConfig("lighttransfer", 0.5, 64), EvalConfig("topk", 0.5, 64), EvalConfig("random", 0.25, 64),
           EvalConfig("streaming", 1.0, 64), EvalConfig("lighttransfer", 0.5, 64, probe=16, score="peak")]


def test_shared_prefill_matches_engine_generate(engine):
    """One prefill shared by every config gives the engine's own lazy layers, ratios and tokens."""
    sample = passkey_sample(engine.tokenizer, 500, random.Random(3))
    sp = shared_prefill(engine.adapter, sample.ids, 64)
    try:
        for cfg in CONFIGS:
            lazy = cfg.lazy(index=0)
            out = engine.generate(sample.ids, 6, lazy=lazy)
            layers = cfg.lazy_layers(sp, index=0)
            assert layers == out.lazy_layers, cfg.name
            assert lazy.score == cfg.score
            assert sp.ratios(cfg.sink, cfg.window, cfg.probe, cfg.score) == pytest.approx(out.layer_scores, abs=1e-6)
            cache = sp.build_cache(layers, cfg.sink, cfg.window, len(sample.ids) + 6, engine.backend)
            tokens = greedy(engine.adapter, engine.backend, [cache], sp.logits, len(sample.ids), 6, engine.eos_ids)[0]
            assert tokens == out.token_ids, cfg.name
    finally:
        sp.release()


def test_peak_score_keeps_a_layer_with_one_retrieval_head():
    """peak_score: 1 - the best head's mass on its 8 most-attended distant keys; lazy_ratio averages heads."""
    torch = pytest.importorskip("torch")
    from ltengine.lazy import lazy_ratio, peak_score

    t, d = 200, 8
    k = torch.zeros(1, t, d)
    k[0, 50, 0] = 1.0  # one distant key ("the needle")
    q = torch.zeros(4, 1, d)  # 3 heads attend uniformly, one looks only at the needle
    q[3, 0, 0] = 60.0
    local = lazy_ratio(q, k, 4, 16, 1.0)
    assert local > 0.05 * 3 / 4 and peak_score(q, k, 4, 16, 1.0) == pytest.approx(0.0, abs=1e-6)
    uniform = peak_score(q[:3], k, 4, 16, 1.0)
    assert uniform == pytest.approx(1 - 8 / t, abs=1e-6)  # 8 of 200 equally likely keys
    with pytest.raises(ValueError, match="score must be one of"):
        LazyConfig(score="bogus")


def test_cover_score_counts_distinct_needles_across_probe_rows():
    """cover_score: 1 - the best head's summed 16 largest per-key maxima over the probe rows, / 16. A head
    that reads four needles on four rows covers four; one whose rows all read the same needle covers
    one, although peak_score (mean over rows) calls both equally retrieval-like."""
    torch = pytest.importorskip("torch")
    from ltengine.lazy import cover_score, distant_cover, peak_score

    t, d, p = 200, 8, 16
    k = torch.zeros(1, t, d)
    for j, pos in enumerate((50, 80, 110, 140)):
        k[0, pos, j] = 1.0
    four, same = torch.zeros(1, p, d), torch.zeros(1, p, d)
    for r, j in ((3, 0), (7, 1), (11, 2), (15, 3)):
        four[0, r, j] = 60.0
        same[0, r, 2] = 60.0
    assert float(distant_cover(four, k, 4, 16, 1.0)[0]) == pytest.approx(4.0 + 12 / 185, abs=1e-3)
    assert float(distant_cover(same, k, 4, 16, 1.0)[0]) == pytest.approx(1.0 + 15 / 185, abs=1e-3)
    assert peak_score(four, k, 4, 16, 1.0) == pytest.approx(peak_score(same, k, 4, 16, 1.0), abs=1e-6)
    assert cover_score(four, k, 4, 16, 1.0) < cover_score(same, k, 4, 16, 1.0)
    assert cover_score(same, k, 4, 16, 1.0) == pytest.approx(1 - (1 + 15 / 185) / 16, abs=1e-4)
    assert LazyConfig(score="cover").score == "cover"


def test_grid_names_and_wilson():
    grid = make_grid(["lighttransfer", "topk", "random", "streaming"], [0.25, 0.5], [256, 512])
    names = [c.name for c in grid]
    assert names[0] == "full" and len(names) == len(set(names)) == 1 + 2 * (3 * 2 + 1)
    assert "streaming w512" in names and "lighttransfer 25% w256" in names
    lo, hi = wilson(50, 50)
    assert hi == 1.0 and 0.92 < lo < 0.93  # 95% Wilson lower bound for 50/50
    lo, hi = wilson(25, 50)
    assert lo == pytest.approx(1 - hi) and 0.36 < lo < 0.37


def test_profile_command_writes_loadable_profile_and_chart(cli_engine, tmp_path, capsys):
    out = tmp_path / "profile"
    assert cli.main(["profile", "--n", "2", "--lengths", "300", "--fraction", "0.2", "--window", "64",
                     "--out", str(out)]) == 0
    data = json.loads((out / "profile.json").read_text())
    assert len(data["ratios_mean"]) == len(data["ratios_std"]) == 30 and len(data["prompts"]) == 2
    assert all(0 <= r <= 1 for r in data["ratios_mean"])
    assert len(data["lazy_layers"]) == 6
    assert_png(out / "profile.png")
    lazy = LazyConfig.from_profile(out / "profile.json")
    assert lazy.policy == tuple(data["lazy_layers"]) and (lazy.sink, lazy.window) == (4, 64)
    got = cli_engine.generate("The capital of France is", 2, lazy=lazy)
    assert got.lazy_layers == data["lazy_layers"]


def test_eval_passkey_command(cli_engine, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["eval", "passkey", "--n", "2", "--lengths", "300", "--policy", "lighttransfer,random,streaming",
                     "--fraction", "0.25", "--window", "64", "--out", str(out)]) == 0
    rows = md_rows(out / "passkey.md")
    assert [r[0] for r in rows] == ["full", "lighttransfer 25% w64", "random 25% w64", "streaming w64"]
    assert all(r[-1].endswith("/2)") for r in rows)  # N per cell
    assert rows[0][-1].startswith("100%")  # full attention finds the key at 300 tokens
    data = json.loads((out / "passkey.json").read_text())
    assert len(data["records"]) == 2 * 4 and data["rows"][0]["all"]["n"] == 2
    assert_png(out / "passkey.png")
    assert "| full |" in capsys.readouterr().out


def test_eval_niah_command_heatmaps(cli_engine, tmp_path):
    out = tmp_path / "eval"
    assert cli.main(["eval", "niah", "--n", "1", "--lengths", "300,400", "--depths", "0,1", "--policy",
                     "lighttransfer", "--fraction", "0.25", "--window", "64", "--out", str(out)]) == 0
    rows = md_rows(out / "niah.md")
    assert [r[0] for r in rows] == ["full", "lighttransfer 25% w64"] and all(r[-1].endswith("/4)") for r in rows)
    for name in ("niah.png", "niah_full.png", "niah_lighttransfer_25_w64.png"):
        assert_png(out / name)


def test_eval_ppl_command_at_equal_kv_bytes(cli_engine, tmp_path):
    out = tmp_path / "eval"
    assert cli.main(["eval", "ppl", "--n", "1", "--context", "300", "--scored", "32", "--policy",
                     "lighttransfer,streaming", "--fraction", "0.5", "--window", "32", "--equal-bytes",
                     "--out", str(out)]) == 0
    rows = md_rows(out / "ppl.md")
    # 15 lazy layers of 4 + 32 beside 15 full ones of 300 = 30 layers of 4 + 164
    assert [r[0] for r in rows] == ["full", "lighttransfer 50% w32", "streaming w164"]
    data = json.loads((out / "ppl.json").read_text())
    full, lt, st = data["rows"]
    assert full["ppl_ratio"] == pytest.approx(1.0) and full["tokens"] == 32
    assert 1 < full["ppl"] < 1000 and lt["lazy_layers_mean"] == 15 and st["lazy_layers_mean"] == 30
    assert lt["kv_bytes"] == st["kv_bytes"] == 30 * 168 * 2 * 3 * 64 * 4
    assert full["kv_bytes"] == 30 * 300 * 2 * 3 * 64 * 4
    assert_png(out / "ppl.png")


def test_eval_rejects_unknown_policy(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "passkey", "--policy", "bogus"])
    assert "unknown policies ['bogus']" in capsys.readouterr().err
