"""The package layout: a module imports only from its own layer or below (README,
"Layout"), and no module outside the kernels grows past 450 lines."""
import ast
import importlib
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Longest prefix wins; the applications sit on top.
LAYERS = {
    "alter_kernels": 0, "alter.config": 1, "alter.files": 1, "alter.adapters": 2, "alter.data": 3, "alter.tiny": 3,
    "alter.evaluation": 4, "alter.methods": 5, "alter.training": 6,
    "alter.quality": 7, "alter.demo": 7, "alter.cli": 7, "alter.cli_parser": 7, "alter.bench": 7, "alter.__main__": 7,
    "alter": 7,
}
# Old module paths kept as re-exports of the new ones.
SHIMS = {"alter.train", "alter.eval", "alter.model", "alter.layers", "alter.tracker", "alter.scenarios",
         "alter.distributed", "alter.methods.args"}


def layer(module: str) -> int:
    owner = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[owner]


def modules():
    for package in ("alter", "alter_kernels"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            yield name, path


def imported(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def test_no_module_imports_from_a_layer_above_it():
    upward = [
        f"{name} imports {target}"
        for name, path in modules() if name not in SHIMS and name != "alter"
        for target in imported(path)
        if target.split(".")[0] in ("alter", "alter_kernels") and layer(target) > layer(name)
    ]
    assert not upward, upward


def test_modules_outside_the_kernels_stay_readable():
    long = {name: n for name, path in modules()
            if name.startswith("alter.") and (n := len(path.read_text().splitlines())) > 450}
    assert not long, long


def test_old_module_paths_only_re_export_and_import():
    for name, path in modules():
        if name in SHIMS:
            tree = ast.parse(path.read_text())
            body = [node for node in tree.body if not isinstance(node, ast.Expr)]  # the docstring
            assert all(isinstance(node, (ast.Import, ast.ImportFrom)) for node in body), name
            importlib.import_module(name)  # every name it re-exports still exists


def test_tests_import_public_names_only():
    private = [
        f"{path.name}: from {node.module} import {alias.name}"
        for path in sorted((ROOT / "tests").glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("alter", "alter_kernels")
        for alias in node.names if alias.name.startswith("_")
    ]
    assert not private, private


def test_benchmark_scripts_import_names_that_exist():
    """The scripts under benchmarks/ run by hand (the studies, the zoo): what they import
    from the packages must still exist after a move (routing_study once imported a name
    from a module it had left)."""
    missing = []
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("alter", "alter_kernels"):
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert not missing, missing
