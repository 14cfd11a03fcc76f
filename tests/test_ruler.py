"""ltengine eval ruler: the task generators (answers in the context, lengths, seeds), RULER's scoring,
config names, the batched decode against the harness's, and a short end-to-end run on the default model."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from ltengine import Engine, cli
from ltengine.eval import cli as eval_cli
from ltengine.eval.harness import greedy, shared_prefill
from ltengine.eval.ruler import make_samples, run_sessions
from ltengine.eval.ruler_decode import Job, batched_greedy
from ltengine.eval.ruler_configs import parse_config
from ltengine.eval.ruler_tasks import TASKS, make_sample, string_match_all, string_match_part, tolerance
from ltengine.eval.stats import mean_interval, wilson

from test_eval import assert_png


@pytest.fixture(scope="module")
def engine(default_model):
    model, tokenizer = default_model
    return Engine(model, tokenizer, lazy=None)


@pytest.fixture(scope="module")
def tok(engine):
    return engine.tokenizer


@pytest.mark.parametrize("length", [512, 1536])
@pytest.mark.parametrize("task", TASKS)
def test_sample_holds_its_answers_and_fits_the_length(tok, task, length):
    s = make_sample(tok, task, length, seed=3, index=1)
    room = length - s.max_new_tokens
    assert room - tolerance(length) <= len(s.ids) <= room, (len(s.ids), room)
    prompt = tok.decode(s.ids, skip_special_tokens=True)
    assert s.answers and all(a in s.context and a in prompt for a in s.answers), s.answers
    assert s.context in prompt and s.question in prompt and prompt.rstrip().endswith(s.answer_prefix.strip())
    assert s.document.startswith(s.instruction) and s.document.endswith(s.context)


def test_samples_are_fixed_by_seed_and_independent_of_the_grid(tok):
    a = make_samples(tok, ["niah_single_2", "cwe"], [512], 2, seed=7)
    b = make_samples(tok, ["cwe"], [512], 2, seed=7)
    assert [s.ids for s in a[2:]] == [s.ids for s in b]  # cwe's samples do not depend on niah's
    assert make_sample(tok, "niah_single_2", 512, 7, 0).ids == a[0].ids
    assert make_sample(tok, "niah_single_2", 512, 8, 0).ids != a[0].ids
    assert a[0].ids != a[1].ids and a[0].answers != a[1].answers
    forked = make_samples(tok, ["niah_single_2", "cwe"], [512], 2, seed=7, workers=2)
    assert [s.ids for s in forked] == [s.ids for s in a] and [s.answers for s in forked] == [s.answers for s in a]


def test_task_structure(tok):
    """Each family's defining property holds in the text the model reads."""
    cwe = make_sample(tok, "cwe", 2048, 0, 0)
    counts = Counter(re.findall(r"\d+\. (\S+)", cwe.context))
    top = [w for w, _ in counts.most_common(10)]
    assert set(top) == set(cwe.answers) and min(counts[w] for w in top) > max(c for w, c in counts.items() if w not in top)
    fwe = make_sample(tok, "fwe", 2048, 0, 0)
    counts = Counter(fwe.context.split())
    ranked = [w for w, _ in counts.most_common() if w != "...."]
    assert ranked[:3] == fwe.answers and counts[ranked[2]] > counts[ranked[3]]
    vt = make_sample(tok, "vt", 2048, 0, 0)
    chain = re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", vt.context)
    assert [c[0] for c in chain] == vt.answers and chain[0][1].isdigit()
    assert all(b == a for (_, b), (a, _) in zip(chain[1:], chain[:-1]))  # each hop reads the previous variable
    for task, keys in [("niah_multikey_2", 1), ("niah_multivalue", 1), ("niah_multiquery", 4)]:
        s = make_sample(tok, task, 2048, 0, 0)
        assert len(s.answers) == (4 if task != "niah_multikey_2" else 1)
        assert all(s.context.count(a) == 1 for a in s.answers)
    mk = make_sample(tok, "niah_multikey_2", 2048, 0, 0)
    assert mk.context.count("One of the special magic numbers for") > 50  # a haystack of distractor needles


def test_string_match_scores_and_intervals():
    assert string_match_all("the numbers are 12 and 34.", ["12", "34", "56"]) == pytest.approx(2 / 3)
    assert string_match_all("ABC", ["abc"]) == 1.0 and string_match_all("", ["x"]) == 0.0
    assert string_match_part("the numbers are 12 and 34.", ["99", "34"]) == 1.0
    assert string_match_part("nothing", ["99", "34"]) == 0.0
    assert mean_interval([1.0, 0.0, 1.0]) == wilson(2, 3)
    vals = [0.2, 0.4, 1.0, 0.6, 0.0, 0.8]
    lo, hi = mean_interval(vals)
    assert 0 <= lo < sum(vals) / len(vals) < hi <= 1
    assert mean_interval(vals) == (lo, hi)  # seeded


def test_config_names():
    c = parse_config("peak50")
    assert (c.policy, c.fraction, c.score, c.probe) == ("lighttransfer", 0.5, "peak", 16)
    assert parse_config("ratio25").probe == 64 and parse_config("peak3250").score == "peak32"
    assert parse_config("peak50-p64").probe == 64 and parse_config("random50").policy == "random"
    st = parse_config("streaming", sink=4, window=256).eval_config(1000, 30)
    assert st.policy == "streaming" and st.window == (15 * 1000 + 15 * 260) // 30 - 4  # KV of 50% lazy
    assert parse_config("session-question").mode == "question" and parse_config("session-full").fraction == 0
    for bad in ("bogus", "ratio0", "peak101", "streaming-x"):
        with pytest.raises(ValueError, match="ratio50|percentage"):
            parse_config(bad)


def test_batched_decode_equals_the_harness(engine, tok):
    """Full, lazy and all-streaming sequences of two prompts decoded as one padded batch give the tokens
    harness.greedy gives each one alone through the backend's kernels (sink + window eviction included:
    the prompts are longer than sink + window and 20 tokens are decoded)."""
    samples = [make_sample(tok, t, 512, 0, 0) for t in ("niah_single_1", "vt")]
    sps = [shared_prefill(engine.adapter, s.ids, 16) for s in samples]
    n = sps[0].num_layers
    sets = [[], parse_config("peak50").eval_config(512, n).lazy_layers(sps[0]), list(range(n))]
    jobs, want = [], []
    for s, sp in zip(samples, sps):
        for layers in sets:
            cache = sp.build_cache(layers, 4, 64, len(s.ids) + 20, engine.backend)
            want.append(greedy(engine.adapter, engine.backend, [cache], sp.logits, len(s.ids), 20, set())[0])
            jobs.append(Job(sp.full, frozenset(layers), 4, 64, sp.logits, len(s.ids), 20, ["\x00never"]))
    got = batched_greedy(engine.adapter, jobs, set(), lambda t: tok.decode(t))
    assert got == want
    with pytest.raises(ValueError, match="window 8 is shorter than the 20 decoded tokens"):
        batched_greedy(engine.adapter, [Job(sps[0].full, frozenset([0]), 4, 8, sps[0].logits, len(samples[0].ids), 20,
                                            ["x"])], set(), lambda t: "")
    for sp in sps:
        sp.release()


@pytest.fixture
def cli_engine(engine, monkeypatch):
    monkeypatch.setattr(eval_cli, "_engine", lambda args: engine)
    return engine


def test_merge_puts_other_configs_beside_and_refuses_overlaps(tmp_path):
    from ltengine.eval.ruler_report import merge, write

    def run(name, configs, lengths, n=2, tasks=("vt", "cwe")):
        recs = [dict(config=c, task=t, length=L, all=float(i % 2), part=float(i % 2)) for c in configs
                for t in tasks for L in lengths for i in range(n)]
        return write(tmp_path / name, recs, configs, list(tasks), lengths, n, {}, {})["json"]

    main = [run("m1", ["full", "peak50"], [1024]), run("m8", ["full", "peak50"], [8192])]
    sess = run("s", ["session-context", "session-question"], [1024, 8192])
    out = merge(main + [sess], tmp_path / "all")
    data = json.loads(out["json"].read_text())
    assert data["configs"] == ["full", "peak50", "session-context", "session-question"]
    assert data["summary"]["relative_to_full"]["session-question"]["8192"] == pytest.approx(1.0)
    assert "| session-context | 50 [" in out["md"].read_text()
    with pytest.raises(ValueError, match="both hold config 'full' at length 1024"):
        merge([main[0], main[0]], tmp_path / "dup")
    with pytest.raises(ValueError, match="merge joins runs of the same tasks and N"):
        merge([main[0], run("n3", ["x"], [1024], n=3)], tmp_path / "n")


def test_batched_sessions_equal_one_session_per_sample(engine, tok):
    """The harness's sessions (the documents of a chunk prefilled together, context mode on the
    question-mode prefill through ``context_view``, a question stopped once its answers are all in)
    against one ``Engine.document`` + ``ask`` per sample and mode: the same lazy layers, the batched
    text a prefix of the full answer, the same score."""
    samples = make_samples(tok, ["niah_single_1", "fwe"], [512], 1, seed=5)
    configs = [parse_config("session-context"), parse_config("session-question")]
    batched = run_sessions(engine, samples, configs, chunk_tokens=1000)  # both documents in one batch
    assert len(batched) == 4 and all(r["chunk_size"] == 2 for r in batched)
    assert {r["config"]: r["prefill_shared_with"] for r in batched} == {"session-context": "session-question",
                                                                         "session-question": None}
    for cfg in configs:
        recs = {r["task"]: r for r in batched if r["config"] == cfg.key}
        for s in samples:
            rec = recs[s.task]
            with engine.document(s.document_ids, lazy=cfg.lazy(), mode=cfg.mode, template=False) as doc:
                out = doc.ask(s.question_ids, max_new_tokens=s.max_new_tokens)
            assert rec["lazy_layers"] == out.lazy_layers and len(out.lazy_layers) == 15
            assert out.text.startswith(rec["output"]) and rec["all"] == string_match_all(out.text, s.answers)


def test_eval_ruler_end_to_end(cli_engine, tmp_path):
    """2 tasks x 1 length on the default model: every harness config, a session config (its documents
    prefilled and decoded together through ``Engine.documents``), the tables and the heatmap."""
    out = tmp_path / "ruler"
    configs = "full,peak50,random50,streaming,session-question"
    assert cli.main(["eval", "ruler", "--lengths", "512", "--n", "2", "--tasks", "niah_single_1,vt",
                     "--configs", configs, "--chunk", "2", "--out", str(out)]) == 0
    data = json.loads((out / "ruler.json").read_text())
    assert len(data["records"]) == 2 * 2 * 5 and data["skipped"] == {}
    full = [r for r in data["records"] if r["config"] == "full"]
    assert all(r["lazy_layers"] == [] for r in full)
    assert all(len(r["lazy_layers"]) == 15 for r in data["records"] if r["config"] in ("peak50", "random50"))
    assert all(len(r["lazy_layers"]) == 30 for r in data["records"] if r["config"] == "streaming")
    sessions = [r for r in data["records"] if r["config"] == "session-question"]
    assert len(sessions) == 4 and all(r["chunk_size"] == 4 and len(r["lazy_layers"]) == 15 for r in sessions)
    assert all(0 <= r["all"] <= r["part"] <= 1 for r in data["records"])
    cell = data["summary"]["cells"]["full"]["niah_single_1"]["512"]
    assert cell["n"] == 2 and cell["lo"] <= cell["score"] <= cell["hi"]
    assert set(data["summary"]["average"]["peak50"]) == {"512", "all"}
    md = (out / "ruler.md").read_text()
    assert "| full |" in md and "### 512 tokens" in md and "| **average** |" in md
    assert_png(out / "ruler.png")


def test_eval_ruler_reports_missing_sessions_as_skipped(cli_engine, tmp_path, monkeypatch):
    monkeypatch.setattr("ltengine.eval.ruler.sessions_missing", lambda e: "no sessions here")
    out = tmp_path / "ruler"
    assert cli.main(["eval", "ruler", "--lengths", "300", "--n", "1", "--tasks", "niah_single_1",
                     "--configs", "full,session-context", "--out", str(out)]) == 0
    data = json.loads((out / "ruler.json").read_text())
    assert data["skipped"] == {"session-context": "no sessions here"} and len(data["records"]) == 1
    assert "| session-context | skipped |" in (out / "ruler.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--configs", "full,bogus"], "unknown RULER config 'bogus'"),
    (["--configs", "full,full"], "repeats a name"),
    (["--n", "0"], "--n must be >= 1"),
    (["--lengths", "100"], "at least 256 tokens"),
    (["--lengths", "1x"], "comma-separated token counts"),
    (["--tasks", "niah"], "unknown ['niah']"),
])
def test_eval_ruler_rejects_bad_arguments_before_loading(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(eval_cli, "_engine", lambda args: pytest.fail("loaded the model before validating"))
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "ruler", *argv])
    assert message in (str(e.value.code) + capsys.readouterr().err)
