"""Document sessions: one long document prefilled once, many questions answered on its KV.

``engine.document(text)`` prefills the document layer-major into the paged block pool (the paged
runner's pool on an engine that decodes with it; on the reference runner, a paged runner of the
sessions' own under the same ``kv_budget``). Every question then prefills only its own tokens on
top of the cached document (``runners/prefix.py``) and decodes from its own copy-on-write view: the
document's whole blocks are shared (reference-counted in ``KVPool``), each question has its own
tail blocks and its own ring per lazy layer. The budget holds the document once plus each
question's own part. Questions decode as one batch: on CUDA through the paged runner (Triton, CUDA
graphs), elsewhere by cascade attention that reads the shared blocks once per step for the batch
(``runners/cascade.py``). Two ways to choose the lazy layers:

- ``mode="context"`` (context-scored): the document is scored and demoted once on its own last
  ``probe`` queries; every question runs on that hybrid cache (the least memory: the shared
  document holds its lazy layers as sink + window; a question's prefill attends there by the
  streaming rule).
- ``mode="question"`` (question-scored, the default): the document stays full in every layer; each
  question is scored on its own last ``probe`` queries over document + question keys, as
  LightTransfer-Test scores any prompt, and decodes its lazy layers from its own ring of sink +
  window of (document + question) while its full layers share the document's blocks. The choice
  follows the question, which is what the paper's test-time selection does; the RULER evaluation
  (issue 13, part 3) measures both.

Many documents at once (``engine.documents``: prefilled together, questions decoded as one batch
across them) and ``context_view`` (context mode on a question-mode prefill): ``session_batch.py``.
"""
from __future__ import annotations

import itertools
import secrets
import time

import torch

from .config import FULL, LazyConfig, SamplingParams
from .kernels.fp8 import is_fp8
from .lazy import FullPolicy, make_policy, needs_scores, plan_full_layers
from .memory.pool import PoolExhausted
from .prompts import QA_TEMPLATE
from .runners.base import PrefillRequest
from .runners.cascade import SharedPrefixDecode
from .runners.prefix import fork, fork_blocks, prefill_on_prefix
from .sequence import GenerationOutput, RequestOutput, Sequence, SequenceStatus
from .session_batch import answer_all, prefill_documents, step_sessions
from .stepper import _sample, append_token

MODES = ("context", "question")
DEFAULT_MODE = "question"


class DocumentSession:
    """A prefilled document and the questions decoding on it (``Engine.document`` makes one).

    ``ask`` / ``ask_many`` answer and return ``GenerationOutput`` as ``Engine.answer`` does; the
    step-level ``add`` / ``step`` / ``abort`` drive questions one decode step at a time. ``close()``
    (or leaving a ``with`` block) gives the document's memory back: at once for what no question
    reads, and a shared block once the last question reading it finishes. Attributes:
    ``doc_tokens``, ``mode``, ``lazy`` (the session's LazyConfig), ``lazy_layers`` (the document's, in
    context mode), ``layer_scores`` (every layer's score on the document's own tail, both modes),
    ``prefill_s``, ``kv_bytes`` (the document's); a question's ``stats.prefill_s`` is its own prefill on
    top of the document. ``context_view()`` turns a question-mode session into a context-mode one
    without a second prefill.
    """

    def __init__(self, engine, document, lazy: LazyConfig, mode: str | None, template: bool, prefill: bool = True):
        mode = DEFAULT_MODE if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} (or None for {DEFAULT_MODE!r}), got {mode!r}")
        if not isinstance(template, bool):
            raise ValueError(f"template must be True or False, got {template!r}")
        if is_fp8(engine.adapter.kv_dtype):
            raise ValueError("document sessions do not support kv_dtype='fp8' yet (their prefix prefill and "
                             "forks read the pool unscaled); use an engine with the model's KV dtype")
        self.engine, self.lazy, self.mode, self.template = engine, lazy, mode, template
        self.runner = engine._session_runner()
        self._ids = itertools.count()
        self._live: dict[str, Sequence] = {}
        self._outbox: list[RequestOutput] = []
        self.closed = False
        self._prefix_text, ids = self._document_ids(document)
        self.doc_tokens = len(ids)
        engine.prompts.check_length(len(ids), 1, "document")
        self.doc = None
        self.request = self._plan(ids)
        if prefill:
            prefill_documents([self])

    # ------------------------------------------------------------------ the document
    def _document_ids(self, document) -> tuple[str | None, list[int]]:
        prompts = self.engine.prompts
        if not self.template:
            batch, single = prompts.normalize(document)
            if not single:
                raise ValueError("document() takes one document (text or token ids), not a batch")
            return None, batch[0]
        if not isinstance(document, str) or not document.strip():
            raise ValueError("document() with template=True needs the document as non-empty text; pass "
                             "template=False for token ids or raw text without the QA chat template")
        tok = prompts.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise ValueError("template=True needs a tokenizer with a chat template; pass template=False")
        doc = self._doc = document.strip()
        head = QA_TEMPLATE.split("{document}")[0] + doc + "\n</document>"
        full = self._chat_text(doc, "?")
        start = full.find(QA_TEMPLATE.format(document=doc, question="?"))
        if start < 0:
            raise ValueError("the tokenizer's chat template does not hold the message text verbatim; "
                             "pass template=False and build the prompt yourself")
        prefix = full[:start + len(head)]  # ends with '</document>': a pre-token boundary in BPE tokenizers
        return prefix, tok(prefix, add_special_tokens=False)["input_ids"]

    def _chat_text(self, doc: str, question: str) -> str:
        content = QA_TEMPLATE.format(document=doc, question=question)
        return self.engine.prompts.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                                 tokenize=False, add_generation_prompt=True)

    def _plan(self, ids: list[int]) -> PrefillRequest:
        """The document's prefill request; ``self.need``: the KV bytes it will hold."""
        e, lazy, r = self.engine, self.lazy, self.runner
        n_layers = e.num_layers
        if lazy.enabled and needs_scores(lazy) and not e.config.score_layers:
            raise ValueError(f"policy {lazy.policy!r} needs layer scores; construct the Engine with score_layers=True")
        # both modes score the document's tail (question mode keeps the scores for context_view)
        scorer = e.backend.scorer(lazy.score) if lazy.enabled and e.config.score_layers else None
        if self.mode == "context":
            n_full = plan_full_layers(lazy, n_layers, r.capacity, len(ids), 0,
                                      lambda n: r.footprint(len(ids), n, lazy.sink, lazy.window))
            policy = make_policy(lazy, n_layers, n_full)
        else:  # question-scored: the document stays full in every layer
            n_full = n_layers
            policy = make_policy(FULL, n_layers, n_layers)
            self.n_full = plan_full_layers(lazy, n_layers, None, len(ids), 0, lambda n: 0)
        self.need = r.footprint(len(ids), n_full, lazy.sink, lazy.window)
        self.doc_ids = ids
        return PrefillRequest(torch.tensor(ids, dtype=torch.long, device=e.adapter.device), policy, lazy.sink,
                              lazy.window, lazy.probe, scorer, 0)

    def _prefilled(self, res, seconds: float) -> None:
        """Take in the document's prefill result (``PrefillResult``); choose the decode once: on CUDA
        the paged runner's (Triton, CUDA graphs), elsewhere cascade attention that reads the shared
        document once per step for all its questions."""
        self.prefill_s, self.request = seconds, None
        self.doc = res.handle
        self.layer_scores, self.lazy_layers, self.kv_bytes = res.scores, res.lazy_layers, res.kv_bytes
        cuda = self.engine.adapter.device.type == "cuda"
        self._cascade = None if cuda else SharedPrefixDecode(self.runner, self.doc, self.doc_tokens)

    def context_view(self) -> "DocumentSession":
        """This question-scored document as a context-scored session, without a second prefill.

        Prefill attends fully in every layer in both modes, so the document's hidden states, K/V and
        own tail scores (kept in ``layer_scores``) are those a ``mode="context"`` prefill computes; the
        view replays the context-scored queue over those scores and demotes its choice by giving those
        layers rings of their own, sharing every other layer's blocks. The view is a session of its
        own (ask, close); it equals ``engine.document(same, mode="context")`` (tested). ValueError for
        a context-mode or closed session, or ``streaming_prefill`` (its context prefill differs)."""
        from .session_batch import context_view

        return context_view(self)

    # ------------------------------------------------------------------ questions
    def _question_ids(self, question) -> list[int]:
        prompts = self.engine.prompts
        if self.template:
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"a question must be a non-empty string, got {question!r:.80}")
            text = self._chat_text(self._doc, question.strip())
            if not text.startswith(self._prefix_text):
                raise ValueError("the chat template puts question-dependent text before the document; "
                                 "pass template=False")
            return prompts.tokenizer(text[len(self._prefix_text):], add_special_tokens=False)["input_ids"]
        if isinstance(question, str):
            if not question.strip() or prompts.tokenizer is None:
                raise ValueError(f"a question must be non-empty text (with a tokenizer) or token ids, got {question!r:.80}")
            return prompts.normalize(prompts.tokenizer(question, add_special_tokens=False)["input_ids"])[0][0]
        batch, single = prompts.normalize(question)
        if not single:
            raise ValueError("a question is one text or one list of token ids; use ask_many for several")
        return batch[0]

    def add(self, question, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Prefill one question on the document and sample its first token; returns its id (its tokens
        come from ``step``). ValueError, with the session unchanged, for a bad question or one whose
        own KV does not fit the free budget."""
        if self.closed:
            raise ValueError("this document session is closed; open a new one with engine.document(...)")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        e, r, lazy = self.engine, self.runner, self.lazy
        ids = self._question_ids(question)
        total = self.doc_tokens + len(ids)
        e.prompts.check_length(total, params.max_new_tokens, "document + question")
        rid = request_id if request_id is not None else f"q-{next(self._ids)}"
        if not isinstance(rid, str) or not rid or rid in self._live:
            raise ValueError(f"request_id must be a new non-empty string, got {rid!r}")
        room = total + params.max_new_tokens
        n_layers = e.num_layers
        if self.mode == "context":
            policy, scorer, n_full = FullPolicy(n_layers, n_layers), None, n_layers - len(self.lazy_layers)
            self._check_fits(set(self.lazy_layers), room, len(ids))  # known before the prefill
        else:
            n_full = self.n_full
            policy = make_policy(lazy, n_layers, n_full)
            scorer = e.backend.scorer(lazy.score) if lazy.enabled and e.config.score_layers else None
        dev = e.adapter.device
        t0 = e._timed()
        res = prefill_on_prefix(r, self.doc, self.doc_tokens, torch.tensor(ids, dtype=torch.long, device=dev),
                                policy, scorer, lazy.probe)
        self._check_fits(res.lazy, room, len(ids))
        try:
            handle = fork(r, self.doc, self.doc_tokens, res, room)
        except PoolExhausted as err:
            raise ValueError(f"question {rid!r}: its KV does not fit the pool ({err})") from None
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=dev)
            generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        seq = Sequence(rid, self.doc_ids + ids, params, lazy, n_full, generator, SequenceStatus.RUNNING, handle)
        seq.scores = res.scores if self.mode == "question" else list(self.layer_scores)
        seq.lazy_layers = sorted(res.lazy)
        s = seq.stats
        s.prefill_s = e._timed() - t0
        s.kv_bytes_after_prefill = sum(len(b) for b in handle.blocks) * r.pool.bytes_per_block
        s.full_kv_bytes = e.adapter.kv_bytes_per_token_layer * n_layers * total
        self._live[rid] = seq
        out = RequestOutput(rid, [])
        seq.decode_start = time.perf_counter()
        s.first_token_s = seq.decode_start - seq.arrival
        self._accept(seq, int(_sample(res.logits.unsqueeze(0), [seq])[0]), out)
        self._outbox.append(out)
        return rid

    def _check_fits(self, lazy: set[int], room: int, q_len: int) -> None:
        r = self.runner
        if r.free is None:
            return
        blocks = sum(fork_blocks(r, self.doc_tokens, room, i in lazy, self.lazy.sink, self.lazy.window)
                     for i in range(self.engine.num_layers))
        need = blocks * r.pool.bytes_per_block
        if need > r.free:
            raise ValueError(f"this question ({q_len} tokens + max_new_tokens) needs {need} KV bytes of its own "
                             f"beyond the shared document, {r.free} are free (kv_budget {self.engine.kv_budget}); "
                             "lower max_new_tokens, let running questions finish, or raise kv_budget")

    def step(self) -> list[RequestOutput]:
        """One decode step of every question in flight, as one batch; what each gained (finished
        ones carry their ``GenerationOutput``), first tokens of questions added since included."""
        return step_sessions([self])

    def _accept(self, seq: Sequence, token: int, out: RequestOutput) -> None:
        e = self.engine
        append_token(e, seq, token)
        out.new_token_ids.append(token)
        if seq.finish_reason is not None:
            seq.stats.decode_s = time.perf_counter() - seq.decode_start
            seq.stats.peak_kv_bytes = self.runner.peak
            self._finish(seq)
            out.finished, out.output = True, seq.output(e.num_layers)

    def _finish(self, seq: Sequence) -> None:
        self._live.pop(seq.request_id, None)
        self.runner.release(seq.handle)  # its own blocks back; shared ones lose one reference
        seq.handle, seq.status = None, SequenceStatus.FINISHED

    def abort(self, request_id: str) -> bool:
        """Stop a question now and give its own KV back; False if unknown or finished."""
        return self.stop(request_id) is not None

    def stop(self, request_id: str) -> GenerationOutput | None:
        """Like ``abort``, but return what the question generated so far (``finish_reason="abort"``);
        None if unknown or finished. For a caller that has what it needs (the RULER harness stops a
        question once every answer is in its text)."""
        seq = self._live.get(request_id)
        if seq is None:
            return None
        seq.finish_reason, seq.text = "abort", self.engine.prompts.decode(seq.tokens)
        seq.stats.decode_s = time.perf_counter() - seq.decode_start
        self._finish(seq)
        return seq.output(self.engine.num_layers)

    def has_unfinished(self) -> bool:
        return bool(self._live or self._outbox)

    def ask_many(self, questions, max_new_tokens: int = 128, *, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop=None, ignore_eos: bool = False) -> list[GenerationOutput]:
        """Answer several questions decoded together as one batch; outputs in question order. A
        question that does not fit raises ValueError and the others of this call are dropped."""
        if isinstance(questions, str) or not isinstance(questions, (list, tuple)) or not questions:
            raise ValueError(f"ask_many() needs a non-empty list of questions, got {questions!r:.80}")
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, stop if stop is not None else (),
                                ignore_eos)
        return answer_all(self, [(q,) for q in questions], params, "ask_many")

    def ask(self, question, max_new_tokens: int = 128, **kwargs) -> GenerationOutput:
        """Answer one question (text; token ids with template=False) on the document."""
        return self.ask_many([question], max_new_tokens, **kwargs)[0]

    def close(self) -> None:
        """No more questions. The document's blocks that no question reads go back now; the rest as
        the questions still decoding (drive them with ``step``) finish or are aborted."""
        if not self.closed:
            self.closed = True
            if self.doc is not None:
                self.runner.release(self.doc)

    def __enter__(self) -> "DocumentSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        for rid in list(self._live):  # nobody steps them after the block
            self.abort(rid)
