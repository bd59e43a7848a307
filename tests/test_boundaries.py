"""Package boundaries (docs/architecture.md): ``arbiter.heads`` imports neither the service, the training code nor
transformers; ``arbiter.service`` never imports ``arbiter.training``, and neither training nor ``arbiter.generation``
imports the service; vLLM is imported only when the vLLM engine is chosen. Checked twice: in fresh interpreters (what actually gets imported) and statically (every
import statement, so a lazy import inside a function that is not exercised here is caught too).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import arbiter

PKG = Path(arbiter.__file__).resolve().parent
SERVICE = PKG / "service"
HEADS = PKG / "heads"
GENERATION = PKG / "generation"
TRAINING = PKG / "training"


def _run(code: str) -> None:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert r.returncode == 0, f"boundary violated:\n{r.stdout}\n{r.stderr[-3000:]}"


def test_heads_imports_no_transformers_service_or_training():
    _run(
        "import arbiter.heads, sys\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('transformers', 'arbiter.service', 'arbiter.training', 'vllm')))\n"
        "assert not bad, bad\n"
    )


def test_service_app_imports_no_training_and_no_vllm():
    _run(
        "import sys\n"
        "import arbiter.service.app as app\n"
        "from arbiter.service.settings import Settings\n"
        "app.create_app(Settings(_env_file=None))\n"
        "import arbiter.generation.hf, arbiter.cli\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('arbiter.training', 'vllm')) or m == 'arbiter.service.engine.vllm')\n"
        "assert not bad, bad\n"
    )


# --- static: every import statement --------------------------------------------------------------------


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, source: str | None = None) -> list[tuple[str, bool, int]]:
    """(absolute module name, at module level?, line) for every import in the file."""
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"), filename=str(path))
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)  # runs only when called: a lazy import
                continue
            if isinstance(child, ast.Import):
                out.extend((a.name, top, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = child.module or ""
                out.append((name, top, child.lineno))
                # `from . import vllm` imports a submodule named by the alias
                out.extend((f"{name}.{a.name}", top, child.lineno) for a in child.names if a.name != "*")
            visit(child, top)

    visit(tree, True)
    return out


def _is(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _files(root: Path) -> list[Path]:
    files = sorted(root.rglob("*.py"))
    assert files, root
    return files


def test_static_service_never_imports_training_and_vllm_only_lazily():
    """vLLM is imported lazily by the engine (engine/vllm.py) and the plugin hook (engine/vllm_plugin.py); the reward
    model class (engine/vllm_model.py) imports it at module level, and only vLLM's own processes import that module
    (by the name the plugin registers), never Arbiter's code."""
    engine = SERVICE / "engine"
    lazy, inside_vllm = {engine / "vllm.py", engine / "vllm_plugin.py"}, engine / "vllm_model.py"
    problems = []
    for f in _files(PKG):
        for name, top, line in _imports(f):
            where = f"{f.relative_to(PKG.parent)}:{line} imports {name}"
            if SERVICE in f.parents and _is(name, "arbiter.training"):
                problems.append(where + " (the service never imports training)")
            if _is(name, "vllm"):
                if f not in lazy and f != inside_vllm:
                    problems.append(where + " (only the vLLM engine, its plugin and its model class may import vllm)")
                elif top and f in lazy:
                    problems.append(where + " at module level (must be lazy)")
            if _is(name, "arbiter.service.engine.vllm") and top:
                problems.append(where + " at module level (the vLLM engine is imported only when chosen)")
            if _is(name, "arbiter.service.engine.vllm_model"):
                problems.append(where + " (vllm_model is imported by vLLM's processes only)")
    assert not problems, "\n".join(problems)


def test_static_training_and_generation_never_import_the_service():
    """The one-way rule: generation (engine, jobs, adapter set) sits under both halves; training stands on it and
    on selection, never on the service; generation imports neither half."""
    problems = []
    for root, banned in ((TRAINING, ("arbiter.service",)), (GENERATION, ("arbiter.service", "arbiter.training", "vllm"))):
        for f in _files(root):
            for name, _top, line in _imports(f):
                problems += [f"{f.relative_to(PKG.parent)}:{line} imports {name}" for b in banned if _is(name, b)]
    assert not problems, "\n".join(problems)


def test_static_heads_imports_only_torch_safetensors_pydantic():
    problems = []
    for f in _files(HEADS):
        for name, _top, line in _imports(f):
            for banned in ("transformers", "arbiter.service", "arbiter.training", "arbiter.backbone", "vllm",
                           "fastapi", "peft", "datasets"):
                if _is(name, banned):
                    problems.append(f"{f.relative_to(PKG.parent)}:{line} imports {name}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source,expect", [
    ("from vllm import LLM\n", [("vllm", True)]),
    ("def f():\n    from vllm import LLM\n", [("vllm", False)]),
    ("try:\n    import vllm\nexcept ImportError:\n    pass\n", [("vllm", True)]),
    ("class A:\n    import vllm\n", [("vllm", True)]),
])
def test_the_static_checker_sees_top_level_and_lazy_imports(source, expect):
    # Guard against a checker that silently finds nothing: feed it known cases.
    got = [(n, top) for n, top, _ in _imports(SERVICE / "probe.py", source) if n == "vllm"]
    assert got == expect
    # Relative imports resolve to absolute names (load_engine's lazy `from .vllm import VLLMEngine`).
    rel = [(n, t) for n, t, _ in _imports(GENERATION / "hf.py")]
    assert ("arbiter.generation.base", True) in rel
    factory = [(n, t) for n, t, _ in _imports(SERVICE / "engine" / "__init__.py")]
    assert ("arbiter.service.engine.vllm", False) in factory
    app = [(n, t) for n, t, _ in _imports(SERVICE / "app.py")]
    assert ("arbiter.service.routes", True) in app


def test_static_recipes_import_the_library_never_each_other():
    recipes = PKG / "training" / "recipes"
    problems = []
    for f in _files(recipes):
        for name, _, line in _imports(f):
            if _is(name, "arbiter.training.recipes") and name != "arbiter.training.recipes":
                problems.append(f"{f.relative_to(PKG.parent)}:{line} imports {name} (recipes import library modules only)")
    assert not problems, "\n".join(problems)


def test_static_recipe_check_catches_a_recipe_import(tmp_path):
    """The check above is not vacuous: a recipe importing another recipe is seen, lazily or not."""
    src = "from arbiter.training.recipes.adapter import run\n\ndef f():\n    from .head import load_tokenized\n"
    found = [n for n, _, _ in _imports(PKG / "training" / "recipes" / "joint.py", source=src)]
    assert "arbiter.training.recipes.adapter" in found and "arbiter.training.recipes.head" in found


def test_static_the_library_never_imports_its_test_support():
    """``arbiter.testing`` (fake engines, in-process servers, the fuzzer) is for tests and benchmarks only: no
    module outside it imports it, so no fake can stand in for a real part of a running server."""
    testing = PKG / "testing"
    problems = [f"{f.relative_to(PKG.parent)}:{line} imports {name}"
                for f in _files(PKG) if testing not in f.parents
                for name, _top, line in _imports(f) if _is(name, "arbiter.testing")]
    assert not problems, "\n".join(problems)
    assert {p.name for p in testing.glob("*.py")} >= {"fakes.py", "served.py", "fuzz.py"}
