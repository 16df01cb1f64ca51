"""Parallelism is applied from outside: the model package never touches torch.distributed."""

import ast
from pathlib import Path

import moegpt.model


def test_model_package_never_imports_torch_distributed():
    offenders = []
    for path in Path(moegpt.model.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("torch.distributed")]
    assert offenders == []
