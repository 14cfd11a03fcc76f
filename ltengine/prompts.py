"""Prompts in and text out: tokenizing and checking prompts, chat and QA templates, detokenizing,
and finding a loaded model's tokenizer and end-of-sequence ids."""
from __future__ import annotations

import warnings

import torch

from .models import DecoderAdapter

QA_TEMPLATE = ("Read the document and answer the question.\n\n<document>\n{document}\n</document>\n\n"
               "Question: {question}")


class Prompts:
    def __init__(self, tokenizer, adapter: DecoderAdapter):
        self.tokenizer, self.adapter = tokenizer, adapter

    def normalize(self, prompt) -> tuple[list[list[int]], bool]:
        """Text / ids / a batch of either -> list of token-id lists, and whether it was one prompt."""
        def is_ids(x):
            return isinstance(x, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, str):
            batch, single = [prompt], True
        elif is_ids(prompt) and len(prompt) > 0:
            batch, single = [list(prompt)], True
        elif isinstance(prompt, (list, tuple)) and len(prompt) > 0:
            batch, single = list(prompt), False
            kinds = {"text" if isinstance(p, str) else "ids" if is_ids(p) else "other" for p in batch}
            if "other" in kinds:
                raise ValueError("prompt must be a string, a list of int token ids, or a batch (list) of "
                                 f"those; got {prompt!r:.80}")
            if len(kinds) > 1:
                raise ValueError("a batch mixes text prompts and token-id prompts; pass one kind per call")
        else:
            raise ValueError(f"prompt must be a non-empty string, a list of token ids, or a list of those; got {prompt!r:.80}")
        out = []
        for n, p in enumerate(batch):
            if isinstance(p, str) and self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token ids, or Engine(model, tokenizer)")
            ids = self.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
            where = "" if single else f" (batch item {n})"
            if len(ids) == 0 or (isinstance(p, str) and not p.strip()):
                raise ValueError(f"empty prompt{where}: give at least one token of text")
            vocab = self.adapter.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"token ids {bad[:5]} out of range{where}; the vocabulary is 0..{vocab - 1}")
            out.append(ids)
        return out, single

    def check_length(self, prompt_len: int, max_new: int, where: str = "prompt") -> None:
        shape = self.adapter.shape
        total = prompt_len + max_new
        if prompt_len > shape.max_context:
            raise ValueError(f"{where} has {prompt_len} tokens, longer than the model's context of {shape.max_context}")
        if total > shape.max_context:
            raise ValueError(f"{where} ({prompt_len} tokens) + max_new_tokens ({max_new}) = {total} "
                             f"exceeds the model's context of {shape.max_context}; lower max_new_tokens")
        if shape.sliding_window is not None and total > shape.sliding_window:
            raise ValueError(f"the model config uses a {shape.sliding_window}-token sliding window and {where} "
                             f"needs {total} tokens; ltengine supports full-attention configs only")

    def chat(self, messages: list[dict]) -> list[int]:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; use generate() with raw text")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def qa(self, document: str, question: str) -> list[int]:
        """Long-document QA as one chat turn: the document first, the question last."""
        if not isinstance(document, str) or not document.strip():
            raise ValueError("answer() needs a non-empty document string")
        if not isinstance(question, str) or not question.strip():
            raise ValueError("answer() needs a non-empty question string")
        content = QA_TEMPLATE.format(document=document.strip(), question=question.strip())
        return self.chat([{"role": "user", "content": content}])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""


def find_tokenizer(model):
    """The model's tokenizer from where it was loaded, or None (then only token ids go in and out)."""
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not source:
        return None
    kwargs = {}
    quant = getattr(model.config, "quantization_config", None)
    gguf = quant.get("gguf_file") if isinstance(quant, dict) else getattr(quant, "gguf_file", None)
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as e:  # noqa: BLE001 - a model without a findable tokenizer still runs on token ids
        warnings.warn(f"ltengine: no tokenizer found at {source!r} ({type(e).__name__}); "
                      "pass token ids, or Engine(model, tokenizer)")
        return None


def eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if not ids and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
