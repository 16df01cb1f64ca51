"""The package's dependencies point one way, and configs are keyword-only.

Layers, from the bottom: config / vision_config / counts / hardware / atomic / kernels -> model -> quant -> data, checkpoint -> parallel
-> train, infer -> serve, planner -> cli. ``ALLOWED`` is the table of what each package may import
from moegpt; an arrow not in it (upward or sideways) fails here, so a new one is a design change
made on purpose, in this table. Every import counts, at module level or inside a function.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moegpt"

BOTTOM = {"config", "vision_config", "counts", "hardware", "atomic", "kernels"}
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "vision_config": {"config"},
    "counts": {"config", "vision_config"},
    "hardware": set(),
    "atomic": set(),
    "kernels": set(),  # C++ ops and their references: torch only
    "model": BOTTOM,
    "quant": BOTTOM | {"model"},  # quantized weights in a plain model, applied from outside
    "data": BOTTOM,
    # the one sideways arrow: a model directory holds its tokenizer
    "checkpoint": BOTTOM | {"model", "quant", "data"},
    "parallel": BOTTOM | {"model", "quant", "checkpoint"},
    "train": BOTTOM | {"model", "quant", "data", "checkpoint", "parallel"},
    "infer": BOTTOM | {"model", "quant", "data", "checkpoint", "parallel"},
    "serve": BOTTOM | {"model", "quant", "data", "checkpoint", "infer"},
    "planner": BOTTOM | {"model", "quant", "checkpoint"},  # arithmetic: the CLI hands it the engine's measurers
    "cli": BOTTOM | {"model", "quant", "data", "checkpoint", "parallel", "train", "infer", "serve", "planner"},
    "__main__": {"cli"},
    "__init__": set(),  # public names resolve lazily (importlib), nothing imported up front
}

# Pure Python: the engine's bookkeeping is testable, and reusable, without torch.
TORCH_FREE = ("moegpt.infer.scheduler", "moegpt.infer.block_manager", "moegpt.infer.sequence")


def unit_of(module: str) -> str:
    """moegpt.train.trainer -> train; moegpt.cli -> cli; moegpt -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def moegpt_imports(path: Path, package: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, imported moegpt module) for every import in the file, relative ones resolved."""
    found, here = [], module_name(path, package)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                found.append((node.lineno, f"{base}.{node.module}" if node.module else base))
            elif node.module:
                found.append((node.lineno, node.module))
    return [(line, m) for line, m in found if m == "moegpt" or m.startswith("moegpt.")]


def files(package: Path = PACKAGE) -> list[Path]:
    return sorted(package.rglob("*.py"))


def arrows_outside_the_table(package: Path = PACKAGE) -> list[str]:
    wrong = []
    for path in files(package):
        src = unit_of(module_name(path, package))
        for line, target in moegpt_imports(path, package):
            dst = unit_of(target)
            if dst != src and dst not in ALLOWED.get(src, set()):
                wrong.append(f"{path.relative_to(package.parent)}:{line}: {src} -> {dst} ({target})")
    return wrong


def test_every_package_is_in_the_table():
    units = {unit_of(module_name(p)) for p in files()}
    assert units <= set(ALLOWED), f"packages missing from ALLOWED: {sorted(units - set(ALLOWED))}"


def test_imports_point_one_way():
    wrong = arrows_outside_the_table()
    assert not wrong, "imports outside the table:\n" + "\n".join(wrong)


def test_the_table_itself_has_no_cycle():
    def reaches(a: str, b: str, seen: set[str]) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen | {n})) for n in ALLOWED.get(a, ()))

    cycles = [u for u in ALLOWED if reaches(u, u, {u})]
    assert not cycles, f"the table allows a cycle through {cycles}"


def test_the_checker_catches_upward_sideways_and_relative_imports(tmp_path):
    package = tmp_path / "moegpt"
    (package / "model").mkdir(parents=True)
    (package / "parallel").mkdir()
    (package / "model" / "layer.py").write_text("def f():\n    from moegpt.infer.engine import LLMEngine\n")
    (package / "parallel" / "step.py").write_text("from ..train import step\nfrom . import dims\n")
    (package / "parallel" / "dims.py").write_text("import moegpt.config\n")
    wrong = arrows_outside_the_table(package)
    assert len(wrong) == 2
    assert "model/layer.py:2: model -> infer" in wrong[0] and "parallel/step.py:1: parallel -> train" in wrong[1]


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    return set(out.split())


def test_importing_the_config_loads_no_engine_tokenizer_or_safetensors():
    loaded = _loaded_after("import moegpt.config")
    heavy = {m for m in loaded if m.startswith(("moegpt.infer", "moegpt.model", "moegpt.checkpoint", "tokenizers",
                                                "safetensors", "moegpt.serve"))}
    assert not heavy, sorted(heavy)


def test_public_names_resolve_lazily_and_all_exist():
    import moegpt

    for name in moegpt.__all__:
        assert getattr(moegpt, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        moegpt.nope  # noqa: B018


@pytest.mark.parametrize("module", TORCH_FREE)
def test_the_engine_bookkeeping_imports_no_torch(module):
    assert "torch" not in _loaded_after(f"import {module}")


# ---- keyword-only configs --------------------------------------------------------------------------

CONFIGS = {
    "moegpt.config": ["ModelConfig"],
    "moegpt.train.config": ["TrainConfig"],
    "moegpt.train.schedule": ["LRSchedule", "BatchRamp"],
    "moegpt.train.step": ["LossWeights", "StepMetrics"],
    "moegpt.parallel.dims": ["ParallelDims"],
    "moegpt.data.sources": ["Source"],
    "moegpt.planner.inputs": ["Layout", "Workload", "Precision", "Efficiency", "MeasuredEfficiency", "Options",
                              "PlanInputs"],
    "moegpt.planner.hardware": ["PeakFlops", "Hardware"],
    "moegpt.planner.local": ["Measurers"],
    "moegpt.planner.local_decode": ["DecodeMeasurers"],
    "moegpt.infer.engine": ["EngineConfig"],
    "moegpt.infer.scheduler": ["SchedulerConfig"],
    "moegpt.infer.sampling": ["SamplingParams"],
}


def config_classes() -> list[type]:
    found = []
    for module, names in CONFIGS.items():
        mod = importlib.import_module(module)
        found += [getattr(mod, n) for n in names]
    # and any dataclass named like a config, wherever it is
    for path in files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Config", "Params", "Dims")):
                cls = getattr(importlib.import_module(module_name(path)), node.name)
                if dataclasses.is_dataclass(cls) and cls not in found:
                    found.append(cls)
    return found


def test_every_config_dataclass_is_keyword_only():
    positional = [f"{c.__module__}.{c.__qualname__}.{f.name}" for c in config_classes()
                  for f in dataclasses.fields(c) if f.init and not f.kw_only]
    assert not positional, f"fields a caller could pass by position: {positional}"


def test_no_caller_builds_a_config_by_position():
    names = {c.__name__ for c in config_classes()}
    root = PACKAGE.parent
    calls = []
    for path in [*files(), *sorted((root / "tests").rglob("*.py")), *sorted((root / "bench").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args:
                fn = node.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
                if name in names:
                    calls.append(f"{path.relative_to(root)}:{node.lineno}: {name}(...)")
    assert not calls, "configs built by position:\n" + "\n".join(calls)
