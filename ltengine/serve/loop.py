"""The engine loop: ONE background thread owns the engine and drives ``Engine.step()``.

HTTP handlers (on the asyncio loop) never touch the engine. They put commands into a thread-safe queue
(add a request, abort one); the engine thread runs them between steps and hands each request's events
back to its own ``asyncio.Queue`` through ``loop.call_soon_threadsafe``. Detokenization
(``sequence.TextStream``) runs on the engine thread too, so the tokenizer is only ever used by one thread.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

from ..config import LazyConfig, SamplingParams
from ..sequence import TextStream

log = logging.getLogger("ltengine.serve")


class Overloaded(Exception):
    """The waiting queue is at ``max_waiting``: the server answers 503 with Retry-After."""


class ShuttingDown(Exception):
    """The server is draining (SIGTERM): new requests are refused."""


@dataclass
class Event:
    """What a handler receives: new text for the client, and the final output once finished."""

    text: str
    num_tokens: int  # tokens behind this event
    finished: bool = False
    output: object = None  # GenerationOutput when finished


@dataclass
class _Request:
    rid: str
    prompt: str | list[int] | None
    messages: list[dict] | None
    params: SamplingParams
    max_tokens: int | None  # None: the rest of the context (chat's OpenAI default)
    lazy: LazyConfig | None
    aio: asyncio.AbstractEventLoop
    events: asyncio.Queue
    admitted: asyncio.Future  # result: prompt tokens; exception: ValueError from add_request
    arrival: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    stream: TextStream | None = None  # on the engine thread
    last_token_t: float = 0.0


class RequestHandle:
    """A request accepted by the engine: ``async for event in handle`` until the finished event;
    ``close()`` aborts it unless it finished (call it in a ``finally``)."""

    def __init__(self, loop: "EngineLoop", req: "_Request"):
        self.loop, self.rid, self.prompt_tokens = loop, req.rid, req.prompt_tokens
        self._events = req.events
        self.finished = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self.finished:
            raise StopAsyncIteration
        ev = await self._events.get()
        self.finished = ev.finished
        return ev

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.loop.abort(self.rid)


class EngineLoop:
    """Runs ``engine.step()`` on its own thread while requests are unfinished.

    ``submit`` (async, on the HTTP side) validates through ``engine.add_request`` on the engine thread
    and returns the request id and its event stream; ``abort`` frees the request's KV at once.
    ``max_waiting``: requests accepted but not yet running beyond which ``submit`` raises ``Overloaded``.
    """

    def __init__(self, engine, metrics=None, max_waiting: int | None = None, max_model_len: int | None = None,
                 idle_poll_s: float = 0.05):
        self.engine = engine
        self.max_model_len = min(engine.max_model_len, max_model_len or engine.max_model_len)
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.idle_poll_s = idle_poll_s
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Request] = {}  # engine thread only
        self._lock = threading.Lock()
        self._queued = 0  # submitted, add_request not yet run (guarded by _lock)
        self._snapshot: dict = {}  # engine.metrics() as of the last step (taken on the engine thread only)
        self.peak_kv_bytes = 0  # most KV seen in use after a step (the engine's own peak when it reports one)
        self.peak_running = 0
        self._accepting = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ltengine-engine-loop", daemon=True)
        self.error: BaseException | None = None  # set if the loop thread died

    # ------------------------------------------------------------------ HTTP side (asyncio thread)
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def snapshot(self) -> dict:
        """The engine's metrics after the last step (and the loop's own counts)."""
        with self._lock:
            snap = dict(self._snapshot)
            snap["queued"] = self._queued
        snap["peak_kv_bytes"] = self.peak_kv_bytes
        snap["peak_running"] = self.peak_running
        return snap

    def waiting(self) -> int:
        with self._lock:
            return self._queued + int(self._snapshot.get("waiting", 0))

    async def submit(self, prompt=None, messages=None, *, params: SamplingParams, max_tokens: int | None,
                     lazy: LazyConfig | None = None) -> "RequestHandle":
        """Queue one request; returns its handle once the engine has accepted it.
        Raises ValueError (a client error), Overloaded or ShuttingDown."""
        if not self._accepting or not self.alive:
            raise ShuttingDown("the server is shutting down")
        with self._lock:
            if self.max_waiting is not None and self._queued + int(self._snapshot.get("waiting", 0)) >= self.max_waiting:
                raise Overloaded(f"{self.max_waiting} requests are already waiting")
            self._queued += 1
        aio = asyncio.get_running_loop()
        req = _Request(uuid.uuid4().hex, prompt, messages, params, max_tokens, lazy, aio, asyncio.Queue(),
                       aio.create_future())
        self._cmds.put(("add", req))
        try:
            await req.admitted
        except asyncio.CancelledError:  # the client left before the engine took the request
            self.abort(req.rid)
            raise
        return RequestHandle(self, req)

    def abort(self, rid: str) -> None:
        """Abort a request (its client went away); thread-safe, returns at once."""
        self._cmds.put(("abort", rid))

    def stop_accepting(self) -> None:
        self._accepting = False

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is left, stop the thread and wait for it."""
        self._accepting = False
        self._stop.set()
        self._cmds.put(("wake", None))
        self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            snap = self.engine.metrics()
            with self._lock:
                self._snapshot = snap
            while not self._stop.is_set():
                busy = self.engine.has_unfinished()
                self._drain(block=not busy)
                if self._stop.is_set():
                    break
                if self.engine.has_unfinished():
                    self._step()
        except BaseException as e:  # noqa: BLE001 - a dead loop must not leave handlers hanging
            log.exception("engine loop died")
            self.error = e
        finally:
            why = "the server is shutting down" if self.error is None else f"engine loop died: {self.error}"
            for rid in list(self._live):
                self._abort_quietly(rid)
            self._fail_live(why)
            self._reject_queued(why)

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._cmds.get(timeout=self.idle_poll_s) if block else self._cmds.get_nowait()
        except queue.Empty:
            return
        added = aborted = 0
        while True:
            kind, arg = cmd
            if kind == "add":
                self._add(arg)
                added += 1
            elif kind == "abort":
                req = self._live.pop(arg, None)
                if req is not None:
                    self.engine.abort(arg)
                    aborted += 1
                    if self.metrics is not None:
                        self.metrics.finished("abort")
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
        if added or aborted:
            snap = self.engine.metrics()
            with self._lock:  # added requests move from "queued" to the engine's waiting count at once
                self._snapshot = snap
                self._queued -= added

    def _add(self, req: _Request) -> None:
        try:
            prompt = self.engine.encode_chat(req.messages) if req.messages is not None else req.prompt
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise ValueError("empty prompt: give at least one token of text")
                prompt = self.engine.tokenizer(prompt)["input_ids"]
            params, limit = req.params, self.max_model_len
            if req.max_tokens is None:  # the rest of the context (OpenAI's chat default)
                params = replace(params, max_new_tokens=max(1, limit - len(prompt)))
            if len(prompt) + params.max_new_tokens > limit:
                raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_new_tokens}) = "
                                 f"{len(prompt) + params.max_new_tokens} exceeds the maximum context length of "
                                 f"{limit} tokens; shorten the prompt or lower max_tokens")
            kwargs = {} if req.lazy is None else {"lazy": req.lazy}
            self.engine.add_request(prompt, params, request_id=req.rid, **kwargs)
        except Exception as e:  # noqa: BLE001 - ValueError is the client's; anything else is reported as one too
            req.aio.call_soon_threadsafe(_set_exception, req.admitted, e)
            return
        req.prompt_tokens = len(prompt)
        req.stream = TextStream(self.engine.tokenizer, stop=params.stop)
        self._live[req.rid] = req
        req.aio.call_soon_threadsafe(_set_result, req.admitted, None)

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
            log.exception("engine.step() failed")
            for rid in list(self._live):
                self._abort_quietly(rid)
            self._fail_live(f"engine error: {type(e).__name__}: {e}")
            return
        now = time.perf_counter()
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            req = self._live.get(out.request_id)
            if req is None:
                continue  # aborted meanwhile
            n = len(out.new_token_ids)
            if n and self.metrics is not None:
                if req.last_token_t == 0.0:
                    self.metrics.ttft.observe(now - req.arrival)
                else:
                    self.metrics.itl.observe((now - req.last_token_t) / n)
            if n:
                req.last_token_t = now
            if out.finished:
                text = req.stream.finish(out.output.text)
                del self._live[out.request_id]
                if self.metrics is not None:
                    self.metrics.request_done(out.output, now - req.arrival)
                ev = Event(text, n, True, out.output)
            else:
                ev = Event(req.stream.push(out.new_token_ids), n)
                if not ev.text and not n:
                    continue
            batches.setdefault(req.aio, []).append((req.events, ev))
        for aio, events in batches.items():  # one wake-up of the HTTP side per step, not one per request
            aio.call_soon_threadsafe(_deliver, events)
        snap = self.engine.metrics()
        self.peak_kv_bytes = max(self.peak_kv_bytes, int(snap.get("kv_bytes_used") or 0),
                                 int(snap.get("kv_bytes_peak") or snap.get("peak_kv_bytes") or 0))
        self.peak_running = max(self.peak_running, int(snap.get("running") or 0))
        with self._lock:
            self._snapshot = snap

    def _abort_quietly(self, rid: str) -> None:
        try:
            self.engine.abort(rid)
        except Exception:  # noqa: BLE001 - best effort while failing or shutting down
            log.exception("engine.abort(%s) failed", rid)

    def _fail_live(self, message: str) -> None:
        from ..sequence import GenerationOutput, GenerationStats

        for rid, req in list(self._live.items()):
            out = GenerationOutput(text="", token_ids=[], finish_reason="error", lazy_layers=[], layer_scores=[],
                                   stats=GenerationStats(prompt_tokens=req.prompt_tokens), error=message,
                                   request_id=rid)
            req.aio.call_soon_threadsafe(req.events.put_nowait, Event("", 0, True, out))
        self._live.clear()

    def _reject_queued(self, message: str) -> None:
        """Requests still in the command queue never reached the engine."""
        while True:
            try:
                kind, arg = self._cmds.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                arg.aio.call_soon_threadsafe(_set_exception, arg.admitted, ShuttingDown(message))
                with self._lock:
                    self._queued -= 1


def _deliver(events: list) -> None:
    for q, ev in events:
        q.put_nowait(ev)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
