"""Incremental detokenization for streams, in O(new tokens) per step.

``sequence.TextStream`` decodes a request's whole output every step: 0.2 ms at 400 tokens, 0.6 ms at
1000 on SmolLM2's tokenizer, per request, on the engine thread between steps. A server with 64 streams
would spend more time there than in a GPU decode step. This decodes a sliding window instead (vLLM's
prefix / read offsets): the text of ``ids[prefix:]`` minus the text of ``ids[prefix:read]`` is what
the new tokens add, once it no longer ends in an unfinished multi-byte character."""
from __future__ import annotations


class IncrementalText:
    """``push(new_ids)`` -> new text safe to show (a possible start of a stop string held back);
    ``finish(final_text)`` -> the rest of the final text, so that all pieces join to ``final_text``."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] was decoded last time; ids[read:] is new
        self.text = ""  # all text decoded so far
        self.sent = 0  # characters of it already returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        if self.tokenizer is None or not token_ids:
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
        safe = len(self.text) - self.holdback
        if safe <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:safe], safe
        return piece

    def finish(self, final_text: str) -> str:
        piece = final_text[self.sent:] if len(final_text) > self.sent else ""
        self.sent = max(self.sent, len(final_text))
        return piece
