"""Sources: the default text/code recipe, stdlib discovery, and CLI mixture parsing."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from moegpt.data import Source, default_mixture, iter_documents, parse_mixture, shakespeare_source, stdlib_code_source


def test_default_mixture_is_text_two_epochs_and_code_four_epochs() -> None:
    text, code = default_mixture()
    assert (text.name, text.epochs) == ("text", 2.0)
    assert (code.name, code.epochs) == ("code", 4.0)


def test_shakespeare_source_reads_packaged_corpus() -> None:
    (document,) = list(iter_documents(shakespeare_source()))
    assert document.startswith("First Citizen:")
    assert len(document) > 1_000_000


def test_code_source_finds_stdlib_python_files_within_budget() -> None:
    source = stdlib_code_source(max_bytes=300_000)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert len(source.paths) > 5
    assert all(p.suffix == ".py" and p.is_relative_to(stdlib) for p in source.paths)
    assert sum(p.stat().st_size for p in source.paths) <= 300_000
    skipped = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    assert not any(skipped & set(p.relative_to(stdlib).parts) for p in source.paths)


def test_code_source_order_is_sorted_and_deterministic() -> None:
    first = stdlib_code_source(max_bytes=200_000)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    relative = [p.relative_to(stdlib).as_posix() for p in first.paths]
    assert relative == sorted(relative)
    assert stdlib_code_source(max_bytes=200_000).paths == first.paths


def test_parse_mixture_builtin_names() -> None:
    text, code = parse_mixture("text:2, code:0.5")
    assert (text.name, text.epochs) == ("text", 2.0)
    assert (code.name, code.epochs) == ("code", 0.5)


def test_parse_mixture_user_files_and_directories(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "docs" / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "docs" / ".hidden").write_text("no", encoding="utf-8")
    single = tmp_path / "one.txt"
    single.write_text("one", encoding="utf-8")
    notes, one = parse_mixture(f"notes={tmp_path / 'docs'}:3,one={single}:1.5")
    assert notes == Source(name="notes", epochs=3.0, paths=(tmp_path / "docs" / "a.txt", tmp_path / "docs" / "b.txt"))
    assert one == Source(name="one", epochs=1.5, paths=(single,))
    assert list(iter_documents(notes)) == ["ay", "bee"]


@pytest.mark.parametrize(
    ("spec", "bad"),
    [
        ("", "''"),
        ("text", "'text'"),
        ("text:two", "'two'"),
        ("text:0", "'text:0'"),
        ("text:-1", "'text:-1'"),
        ("text:nan", "'text:nan'"),
        ("poetry:1", "'poetry'"),
        ("text:1,text:2", "'text'"),
        ("x=/definitely/not/here:1", "/definitely/not/here"),
        ("bad name=somewhere:1", "'bad name'"),
    ],
)
def test_parse_mixture_rejects_bad_items_naming_them(spec: str, bad: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_mixture(spec)
    assert bad in str(info.value)
    assert "\n" not in str(info.value)


def test_source_rejects_non_positive_epochs() -> None:
    with pytest.raises(ValueError, match="epochs"):
        Source(name="text", epochs=0.0, paths=(Path("x"),))
