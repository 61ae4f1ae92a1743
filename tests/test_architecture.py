"""The layering of docs/architecture.md, checked over every module of the package.

Every import form counts: ``import t2t_vit.x``, ``from t2t_vit.x import y``, ``from t2t_vit import x``
(a submodule or a name the package re-exports from one), relative imports, lazy imports inside
functions, and ``import t2t_vit`` followed by ``t2t_vit.x`` attribute use.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "t2t_vit"

# Lower number = lower layer. A module may import its own layer and the layers below it.
# Modules not named here belong to the library ring; command modules sit on top.
BASE = {"errors", "runtime"}
CORE = {"layers", "t2t", "t2t_layers", "tokenizers", "blocks", "model", "switchboard", "precision", "table"}
LOADING = {"reading", "metadata", "adapting", "checkpoint", "hub", "pretrained", "storage", "variants",
           "modelguard", "interop", "modelsource"}
COMMANDS = {"cli", "cli_args", "__main__", "predict", "export", "visualize", "train.cli"}
LAYER_NAMES = ["base", "core", "loading", "library", "commands"]


def layer_of(module: str) -> int:
    """The layer of ``t2t_vit.x.y``; the package itself (``create_model`` and the re-exports of the
    model and loading layers) sits with loading."""
    inner = module.removeprefix("t2t_vit").removeprefix(".")
    if inner in COMMANDS:
        return LAYER_NAMES.index("commands")
    top = inner.split(".")[0]
    for index, members in enumerate((BASE, CORE, LOADING | {""})):
        if top in members:
            return index
    return LAYER_NAMES.index("library")


def module_name(file: Path) -> str:
    return ".".join(file.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")


def package_exports() -> dict[str, str]:
    """Names ``t2t_vit/__init__.py`` re-exports, mapped to the module they come from."""
    exports = {}
    for node in ast.walk(ast.parse((PACKAGE / "__init__.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("t2t_vit."):
            exports.update({alias.asname or alias.name: node.module for alias in node.names})
    return exports


def imported_modules(file: Path, exports: dict[str, str]) -> set[str]:
    return imports_in_source(file.read_text(), module_name(file), file.name == "__init__.py", exports)


def imports_in_source(source: str, here: str, is_package: bool, exports: dict[str, str]) -> set[str]:
    package = here if is_package else here.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("t2t_vit"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if not base.startswith("t2t_vit"):
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if (SRC / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                        (SRC / Path(*candidate.split("."))).is_dir():
                    found.add(candidate)
                elif base == "t2t_vit" and alias.name in exports:
                    found.add(exports[alias.name])
                else:
                    found.add(base)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "t2t_vit":
            candidate = f"t2t_vit.{node.attr}"
            found.add(candidate if candidate.replace("t2t_vit.", "") not in exports else exports[node.attr])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            found.add("t2t_vit")
    return {m for m in found if m != here}


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_checker_sees_every_import_form():
    """The rule rests on the parser: each form of import resolves to the module it reaches."""
    source = ("import t2t_vit.reading\nfrom t2t_vit.metadata import x\nfrom t2t_vit import hub\n"
              "from t2t_vit import load_checkpoint\ndef f():\n    from . import adapting\n"
              "    from .storage import y\n    import t2t_vit\n    return t2t_vit.inference\n")
    found = imports_in_source(source, "t2t_vit.layers", False, package_exports())
    assert found == {"t2t_vit.reading", "t2t_vit.metadata", "t2t_vit.hub", "t2t_vit.checkpoint",
                     "t2t_vit.adapting", "t2t_vit.storage", "t2t_vit", "t2t_vit.inference"}
    assert layer_of("t2t_vit.train.engine") == LAYER_NAMES.index("library")
    assert layer_of("t2t_vit") == LAYER_NAMES.index("loading")
    assert layer_of("t2t_vit.train.cli") == LAYER_NAMES.index("commands")


@pytest.mark.parametrize("file", all_modules(), ids=lambda f: module_name(f))
def test_no_module_imports_a_higher_layer(file):
    exports = package_exports()
    here = module_name(file)
    upward = sorted(m for m in imported_modules(file, exports) if layer_of(m) > layer_of(here))
    assert upward == [], (f"{here} ({LAYER_NAMES[layer_of(here)]}) imports higher layers: "
                          + ", ".join(f"{m} ({LAYER_NAMES[layer_of(m)]})" for m in upward))



def test_no_module_imports_a_module_that_imports_it_back():
    """No cycle: no module of the base, core or loading layers reaches itself through its imports
    (every form, lazy ones included). Higher layers import the package (``import t2t_vit``), which
    imports the loading layer, so a cycle there would show up as one through a lower layer."""
    exports = package_exports()
    graph = {module_name(f): imported_modules(f, exports) for f in all_modules()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for dep in graph.get(start, ()):
            if dep == goal or (dep not in seen and not seen.add(dep) and reaches(dep, goal, seen)):
                return True
        return False

    lower = [m for m in graph if layer_of(m) <= LAYER_NAMES.index("loading")]
    assert [m for m in lower if reaches(m, m, set())] == []
