"""The tree keeps its shape: no import cycles (function-level imports included), layers that only look
down, plugins that do not import one another, and every public name the README shows still importable."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"noprop_bench": ROOT / "noprop_bench", "noprop_bench_plugins": ROOT / "plugins"}


def module_files():
    """``{module name: path}`` for every module of the two packages."""
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = module_files()


def imported_modules(name: str, path: Path):
    """The project's modules that ``name`` imports anywhere in its source, functions included."""
    is_package = path.name == "__init__.py"
    package_parts = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package_parts[:len(package_parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            # ``from pkg import module`` imports the module; ``from pkg import name`` imports pkg
            while candidate and candidate not in MODULES:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
                break
    return found


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_the_import_graph_is_found():
    assert "noprop_bench.run.worker" in GRAPH
    assert "noprop_bench.plugins" in GRAPH["noprop_bench.run.worker"]
    assert "noprop_bench.run.runner" in GRAPH["noprop_bench.run.worker"]


def test_find_cycle_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# the package re-exports the results API (load_trials, ...) from here, loaded on first use only
LAZY_RESULTS_MODULE = "noprop_bench.report.frames"


def test_layers_only_look_down():
    """The contract knows nothing of trials or reports; the trial run knows nothing of reports; the
    host's package imports no built-in plugin."""
    contract = {"noprop_bench", "noprop_bench.method", "noprop_bench.datasets", "noprop_bench.task",
                "noprop_bench.backbones", "noprop_bench.hookspecs", "noprop_bench.errors", "noprop_bench.paper_cnn"}
    for name, targets in GRAPH.items():
        if name in contract:
            allowed = {LAZY_RESULTS_MODULE} if name == "noprop_bench" else set()
            assert not {t for t in targets if t.startswith(("noprop_bench.run", "noprop_bench.report"))} - allowed, name
        if name.startswith("noprop_bench.run"):
            assert not {t for t in targets if t.startswith("noprop_bench.report")}, name
        if name.startswith("noprop_bench.") or name == "noprop_bench":
            assert not {t for t in targets if t.startswith("noprop_bench_plugins")}, name


def test_plugins_import_parts_not_each_other():
    for name, targets in GRAPH.items():
        kind = name.split(".")[1] if name.count(".") >= 2 else None
        if kind in ("methods", "datasets", "executors"):
            others = {t for t in targets if t.startswith("noprop_bench_plugins.")
                      and not t.startswith("noprop_bench_plugins.parts") and t != "noprop_bench_plugins"}
            assert not others, f"{name} imports the plugin module(s) {sorted(others)}; move shared code to parts/"
        if kind == "parts":
            assert not {t for t in targets if t.startswith(("noprop_bench_plugins.methods", "noprop_bench_plugins."
                                                             "datasets", "noprop_bench_plugins.executors"))}, name


def readme_imports():
    """``(module, name)`` for every ``from noprop_bench... import`` and dotted ``noprop_bench.x.Name`` the
    README shows."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    pairs = set()
    for module, names in re.findall(r"from (noprop_bench[\w.]*) import ([\w, ]+)", text):
        pairs.update((module, name.strip()) for name in names.split(",") if name.strip())
    for dotted in re.findall(r"`(noprop_bench(?:\.\w+)+)", text):
        module, _, name = dotted.rpartition(".")
        pairs.add((module, name))
    return sorted(pairs)


def test_readme_shows_public_names():
    assert ("noprop_bench", "Method") in readme_imports()
    assert ("noprop_bench.executor", "Executor") in readme_imports()


@pytest.mark.parametrize("module,name", readme_imports())
def test_every_name_the_readme_shows_imports(module, name):
    imported = importlib.import_module(module)
    if not hasattr(imported, name):  # a dotted module path, e.g. noprop_bench.testing
        importlib.import_module(f"{module}.{name}")


def test_the_public_api_is_unchanged():
    import noprop_bench
    from noprop_bench import Dataset, Method, Split, Task, UsageError, hookimpl  # noqa: F401
    from noprop_bench.executor import (ClusterExecutor, Executor, TrialJob, execute_job,  # noqa: F401
                                       failed_record, interrupted, require_engine)

    assert set(noprop_bench.__all__) >= {"hookimpl", "Method", "Dataset", "Split", "Task", "UsageError"}


def test_importing_the_contract_loads_no_report():
    """The package's names load on first use: importing it loads neither torch (so the command line can catch
    Ctrl-C while torch loads) nor the reports and pandas (a plugin importing the contract does not pay for
    them)."""
    code = ("import sys, noprop_bench; loaded = [m for m in sys.modules if m.startswith(('noprop_bench.', 'torch')) "
            "or m == 'pandas']; assert not loaded, loaded; from noprop_bench import Method; "
            "loaded = [m for m in sys.modules if m.startswith('noprop_bench.r') or m == 'pandas']; "
            "assert not loaded, loaded; from noprop_bench import load_trials; "
            "assert 'noprop_bench.report.frames' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_built_in_entry_points_keep_their_names():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="noprop_bench")}
    assert {"backprop", "backprop_dt", "noprop_ct", "noprop_dt", "noprop_fm", "adjoint", "mnist5k", "torchvision_datasets",
            "imagefolder", "local_executor", "submitit_executor", "ray_executor"} <= set(names)
    for name in ("backprop", "noprop_ct", "adjoint"):
        assert names[name] == f"noprop_bench_plugins.methods.{name}"
