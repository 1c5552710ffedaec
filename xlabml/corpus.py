"""Built-in offline corpora: text that ships with Python itself, so a fresh machine needs no network and no files.

``python-docs`` (the default data of ``./xlab.py fit``) is Python's bundled reference documentation
(``pydoc_data.topics``: 79 topics such as "if", "class", "formatstrings") followed by the docstrings of the
standard library's public modules, one document per topic or module: about 4 MB of English prose and code.
``python-topics`` is the topics alone (about 0.5 MB), handy for quick experiments and tests.

The content is deterministic for a given Python build. The docstrings are collected in a separate, isolated
interpreter (``python -I -S``: standard library only, no site-packages, no environment variables), so importing
some hundred modules has no side effects on the caller and third-party packages cannot change the text.

In a data config a built-in source is written ``{builtin: python-docs}``.
"""

from __future__ import annotations

import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator

__all__ = ["BUILTIN_CORPORA", "load_builtin_corpus", "iter_builtin_texts"]

DEFAULT_CORPUS = "python-docs"

# Modules that act when imported (print, open a browser, start a GUI, hook the terminal), test suites, the
# codec zoo, and modules whose content depends on what else is installed (setuptools patches distutils).
_SKIP_MODULES = frozenset({
    "antigravity", "this", "tkinter", "turtle", "turtledemo", "idlelib", "test", "lib2to3", "readline",
    "rlcompleter", "curses", "distutils", "ensurepip", "venv", "pydoc_data", "encodings", "site", "sitecustomize",
    "usercustomize", "msilib", "winreg", "winsound", "msvcrt", "nt",
})
_SKIP_PARTS = frozenset({"test", "tests", "idle_test", "__main__"})
# Reprs of objects in docstrings (rare) carry memory addresses; keep the text independent of the run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _python_topics() -> Iterator[str]:
    """Python's bundled reference documentation (the text behind ``help('if')``), one document per topic."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def _python_docs() -> Iterator[str]:
    """The bundled topics, then one document per public standard-library module (its docstrings)."""
    yield from _python_topics()
    yield from _stdlib_docstrings()


BUILTIN_CORPORA: dict[str, Callable[[], Iterator[str]]] = {
    "python-docs": _python_docs,
    "python-topics": _python_topics,
}


def iter_builtin_texts(name: str = DEFAULT_CORPUS) -> Iterator[str]:
    """Yield the documents of the built-in corpus ``name`` (one str per document), in a fixed order."""
    return BUILTIN_CORPORA[_check_name(name)]()


def load_builtin_corpus(name: str = DEFAULT_CORPUS, cache_dir: str | None = None) -> "datasets.Dataset":  # noqa: F821
    """Load a built-in corpus as a ``datasets.Dataset`` with one column ``text``, one document per row.

    Args:
        name: one of ``BUILTIN_CORPORA`` (``python-docs``, ``python-topics``).
        cache_dir: the Hugging Face datasets cache to use (default: the library's default cache).
    Returns:
        a Dataset backed by an Arrow file in the cache, so that later ``.map`` calls are cached too. The cache key
        includes the corpus name and the Python version, so another interpreter builds its own copy.
    Raises:
        ValueError: ``name`` is not a built-in corpus (the message lists the valid names).
    """
    import datasets

    name = _check_name(name)
    return datasets.Dataset.from_generator(
        _generate,
        features=datasets.Features({"text": datasets.Value("string")}),
        cache_dir=cache_dir,
        gen_kwargs={"name": name, "python": f"{sys.version} {sys.platform}"},
    )


def _generate(name: str, python: str) -> Iterator[dict]:
    # `python` is unused here: it is part of the datasets cache key (gen_kwargs are hashed).
    for text in iter_builtin_texts(name):
        yield {"text": text}


def _check_name(name: str) -> str:
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown built-in corpus {name!r}: expected one of {sorted(BUILTIN_CORPORA)}")
    return name


def _stdlib_docstrings() -> Iterator[str]:
    """Run this file in an isolated interpreter and read back its documents (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "docs.json")
        proc = subprocess.run(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), out],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600,
        )
        if proc.returncode != 0:
            error = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
            raise RuntimeError(f"collecting standard-library docstrings with {sys.executable} failed "
                               f"(exit {proc.returncode}): {error[0]}")
        with open(out, encoding="utf-8") as f:
            docs = json.load(f)
    yield from docs


# ----------------------------------------------------------------------------------------------------------------
# Everything below runs inside the isolated interpreter (standard library only).

def _collect_module_docs() -> list[str]:
    """One document per public standard-library module: its docstring and those of the classes, methods and
    functions it defines, in sorted order. Modules that fail to import (not built here, platform-specific) are
    skipped."""
    import importlib

    docs = []
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in _SKIP_MODULES)
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules warn on import
        stack = list(reversed(names))
        while stack:
            modname = stack.pop()
            if modname in seen:
                continue
            seen.add(modname)
            try:
                module = importlib.import_module(modname)
            except BaseException:  # noqa: BLE001 - ImportError, platform errors, even SystemExit
                continue
            doc = _module_document(modname, module)
            if doc:
                docs.append(doc)
            if hasattr(module, "__path__"):  # a package: its public submodules follow it, sorted
                subs = sorted(
                    f"{modname}.{info.name}" for info in pkgutil.iter_modules(module.__path__)
                    if not info.name.startswith("_") and info.name not in _SKIP_PARTS
                )
                stack.extend(reversed(subs))
    return docs


def _module_document(modname: str, module) -> str:
    parts = []
    if isinstance(module.__doc__, str) and module.__doc__.strip():
        parts.append(f"Module {modname}\n\n{inspect.cleandoc(module.__doc__)}")
    for name in sorted(vars(module)):
        obj = vars(module)[name]
        if name.startswith("_") or getattr(obj, "__module__", None) != modname:
            continue  # private, or re-exported from elsewhere (documented there)
        if inspect.isclass(obj):
            entry = _doc_entry(f"class {modname}.{name}", obj)
            members = [
                _doc_entry(f"{modname}.{name}.{attr}", member)
                for attr, member in sorted(vars(obj).items())
                if not attr.startswith("_") and (inspect.isroutine(member) or isinstance(member, property))
            ]
            parts.extend(p for p in [entry, *members] if p)
        elif inspect.isroutine(obj):
            entry = _doc_entry(f"{modname}.{name}", obj)
            if entry:
                parts.append(entry)
    if not parts:
        return ""
    if not parts[0].startswith("Module "):
        parts.insert(0, f"Module {modname}")
    return _ADDRESS.sub("", "\n\n".join(parts)) + "\n"


def _doc_entry(title: str, obj) -> str:
    doc = getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return ""
    return f"{title}\n{inspect.cleandoc(doc)}"


if __name__ == "__main__":
    # Invoked by _stdlib_docstrings as `python -I -S corpus.py OUT.json`. Modules may print on import: keep
    # stdout out of the way and write the result to the file.
    out_path = sys.argv[1]
    with open(os.devnull, "w") as devnull:
        sys.stdout = devnull
        documents = _collect_module_docs()
        sys.stdout = sys.__stdout__
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(documents, f, ensure_ascii=False)
