"""Imports point down only: a package may import from its own layer or a lower one, never a higher one.

The order is written in docs/ARCHITECTURE.md ("Layers"); function-level (lazy) imports count too, because a lazy
upward import is still an upward dependency."""
import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]



def documented_layers() -> list[set[str]]:
    """The ```layers block of docs/ARCHITECTURE.md: lowest first, one layer a line."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = text.split("```layers\n", 1)[1].split("```", 1)[0]
    return [set(line.split()) for line in block.splitlines() if line.strip()]


LAYERS = documented_layers()
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _package_of(path: pathlib.Path) -> str:
    if path.is_relative_to(ROOT / "kernels"):
        return "triton_kernels"
    rel = path.relative_to(ROOT / "megatrain")
    return rel.parts[0].removesuffix(".py")


def _imported_packages(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "megatrain" else [])
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "megatrain" and len(parts) > 1:
                yield node.lineno, parts[1]


def _sources():
    return sorted([*(ROOT / "megatrain").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])


def upward_imports() -> list[str]:
    bad = []
    for path in _sources():
        src = _package_of(path)
        for line, dst in _imported_packages(ast.parse(path.read_text(encoding="utf-8"))):
            if dst == "__version__":
                continue
            if src not in LEVEL or dst not in LEVEL:
                bad.append(f"{path.relative_to(ROOT)}:{line}: package {src if src not in LEVEL else dst!r} has no "
                           "layer; add it to LAYERS here and to docs/ARCHITECTURE.md")
            elif LEVEL[dst] > LEVEL[src]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {src} (layer {LEVEL[src]}) imports {dst} "
                           f"(layer {LEVEL[dst]})")
    return bad


def test_imports_point_down_only():
    bad = upward_imports()
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_every_package_has_a_layer():
    packages = {p.name.removesuffix(".py") for p in (ROOT / "megatrain").iterdir()
                if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert packages - set(LEVEL) == set()


def test_the_check_sees_a_lazy_upward_import(tmp_path):
    tree = ast.parse("def f():\n    from megatrain.train.trainer import Trainer\n")
    assert [dst for _, dst in _imported_packages(tree)] == ["train"]


def test_the_documented_order_is_the_known_one():
    # a guard against emptying the list: the layers the code was organised around are all there, in this order
    assert LAYERS[0] >= {"errors", "fsutil"} and LAYERS[-1] >= {"cli_args", "cli"}
    order = [LEVEL[p] for p in ("config", "distributed", "models", "parallelize", "checkpoint", "interop", "weights",
                                "train", "eval")]
    assert order == sorted(order) and len(set(order)) == len(order)


def test_importing_megatrain_changes_no_environment():
    code = ("import os; before = dict(os.environ); import megatrain, megatrain.config, megatrain.models.build; "
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())")
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
