"""Training-data sources: named sets of UTF-8 text files, each with an epoch count.

The article's recipe mixes natural-language text (2 epochs) with code (4 epochs). We ship
Tiny Shakespeare as the text corpus and use the Python standard library's own `.py`
files, found on the running interpreter, as the code corpus, so no download is needed.
A file is one document; the dataset joins documents with the EOS token.
"""

from __future__ import annotations

import math
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CORPUS_DIR = Path(__file__).parent / "corpus"
SHAKESPEARE_FILE = "tinyshakespeare.txt"
# Directories of the stdlib that are not representative library code, or are huge test suites.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
# Names end up in cache file names and CLI specs, so keep them to filename-safe characters.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True, kw_only=True)
class Source:
    """A named set of text files, read `epochs` times per pass (fractions allowed)."""

    name: str
    epochs: float
    paths: tuple[Path, ...]

    def __post_init__(self) -> None:
        if not _NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"source name {self.name!r} must match [A-Za-z0-9_.-]+")
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"source {self.name!r} epochs {self.epochs!r} must be a positive finite number")
        if not self.paths:
            raise ValueError(f"source {self.name!r} has no files")


def files_signature(paths: Iterable[Path]) -> bytes:
    """What identifies a set of files for caching: each one's resolved path, size and mtime."""
    lines = []
    for path in paths:
        stat = path.stat()
        lines.append(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n")
    return "".join(lines).encode("utf-8", "surrogatepass")


def iter_documents(source: Source) -> Iterator[str]:
    """Yield each file of `source` as one document (UTF-8; undecodable bytes replaced)."""
    for path in source.paths:
        yield path.read_text(encoding="utf-8", errors="replace")


def shakespeare_source(epochs: float = 2.0, name: str = "text") -> Source:
    """The packaged Tiny Shakespeare corpus (~1.1 MB of plain English)."""
    path = CORPUS_DIR / SHAKESPEARE_FILE
    if not path.is_file():
        raise ValueError(f"packaged corpus missing: {path}")
    return Source(name=name, epochs=epochs, paths=(path,))


def stdlib_code_source(epochs: float = 4.0, max_bytes: int = 4_000_000, name: str = "code") -> Source:
    """The running Python's standard-library `.py` files, in sorted order, up to `max_bytes` in total.

    Files that would push the total past `max_bytes` are skipped, so the byte budget is a
    hard cap and the selection is the same on every run with the same Python install.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes {max_bytes} must be positive")
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"Python stdlib directory not found: {root}")
    chosen: list[Path] = []
    total = 0
    for relative in _stdlib_python_files(root):
        path = root / relative
        size = path.stat().st_size
        if size == 0 or total + size > max_bytes:
            continue
        chosen.append(path)
        total += size
    if not chosen:
        raise ValueError(f"no stdlib .py files fit in max_bytes {max_bytes} under {root}")
    return Source(name=name, epochs=epochs, paths=tuple(chosen))


def _stdlib_python_files(root: Path) -> list[str]:
    """Sorted POSIX-style relative paths of the `.py` files under `root`, skipping _STDLIB_SKIP_DIRS."""
    found: list[str] = []
    for directory, subdirs, files in os.walk(root):
        # Prune in place so os.walk never descends into skipped trees (site-packages is big).
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_SKIP_DIRS]
        rel_dir = Path(directory).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in files if f.endswith(".py"))
    return sorted(found)


def default_mixture() -> tuple[Source, ...]:
    """The article's recipe: text for 2 epochs, code for 4 epochs."""
    return (shakespeare_source(epochs=2.0), stdlib_code_source(epochs=4.0))


def files_source(name: str, path: str | Path, epochs: float) -> Source:
    """A user's own text: one file, or every non-hidden file under a directory (sorted)."""
    path = Path(path)
    if path.is_file():
        paths: tuple[Path, ...] = (path,)
    elif path.is_dir():
        paths = tuple(
            p
            for p in sorted(path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not paths:
            raise ValueError(f"source {name!r} directory {path} contains no files")
    else:
        raise ValueError(f"source {name!r} path {path} does not exist")
    return Source(name=name, epochs=epochs, paths=paths)


def parse_mixture(spec: str) -> tuple[Source, ...]:
    """Parse a CLI mixture such as "text:2,code:4" or "text:1,notes=docs/notes:0.5".

    Each comma-separated item is `text:EPOCHS`, `code:EPOCHS`, or `NAME=PATH:EPOCHS`.
    """
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ValueError(f"mixture spec {spec!r} has no sources")
    sources: list[Source] = []
    for item in items:
        # rsplit: a path may itself contain ':' (e.g. a Windows drive letter).
        head, sep, epochs_text = item.rpartition(":")
        if not sep or not head:
            raise ValueError(f"mixture item {item!r} must look like NAME:EPOCHS or NAME=PATH:EPOCHS")
        try:
            epochs = float(epochs_text)
        except ValueError:
            raise ValueError(f"mixture item {item!r} has non-numeric epochs {epochs_text!r}") from None
        if not (math.isfinite(epochs) and epochs > 0):
            raise ValueError(f"mixture item {item!r} epochs must be positive, got {epochs_text!r}")
        if "=" in head:
            name, _, path = head.partition("=")
            if not name or not path:
                raise ValueError(f"mixture item {item!r} must look like NAME=PATH:EPOCHS")
            if not _NAME_PATTERN.fullmatch(name):
                raise ValueError(f"mixture item {item!r} name {name!r} must match [A-Za-z0-9_.-]+")
            source = files_source(name, path, epochs)
        elif head == "text":
            source = shakespeare_source(epochs)
        elif head == "code":
            source = stdlib_code_source(epochs)
        else:
            raise ValueError(f"mixture item {item!r}: unknown source {head!r} (use text, code or NAME=PATH)")
        if any(existing.name == source.name for existing in sources):
            raise ValueError(f"mixture item {item!r} repeats source name {source.name!r}")
        sources.append(source)
    return tuple(sources)
