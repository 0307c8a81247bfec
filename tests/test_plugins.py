"""Third-party plugins through the real entry-point mechanism: a distribution built and pip-installed."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

PLUGIN_SOURCE = '''
import torch
from torch import nn
from noprop_bench import Method, hookimpl


class Centroid(Method):
    """Nearest class mean of the backbone-free pixels, learned by SGD on a linear layer."""
    name = "thirdparty_linear"
    label = "Third-party"
    family = "continuous-time"
    defaults = {"lr": 0.1}

    def __init__(self, task, **params):
        super().__init__(task, **params)
        self.layer = nn.Linear(task.image_dim, task.num_classes)
        self.optimizer = torch.optim.SGD(self.parameters(), lr=self.params["lr"])

    def train_step(self, x, y):
        loss = nn.functional.cross_entropy(self.layer(x.flatten(1)), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    def predict(self, x):
        return self.layer(x.flatten(1))


@hookimpl
def register_methods(register):
    register(Centroid)
'''


CLASHING_SOURCE = '''
from noprop_bench import hookimpl
from noprop_bench_plugins.methods.backprop import Backprop


class Imposter(Backprop):
    """Registers a built-in's name."""


class Renamed(Backprop):
    name = "clash_renamed"


@hookimpl
def register_methods(register):
    register(Imposter)
    register(Renamed)
'''


def _write_distribution(root, name, module, source, entry_name):
    (root / module).mkdir(parents=True)
    (root / module / "__init__.py").write_text(source)
    (root / "pyproject.toml").write_text(textwrap.dedent(f'''
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "0.0.1"

        [tool.setuptools]
        packages = ["{module}"]

        [project.entry-points.noprop_bench]
        {entry_name} = "{module}"
    '''))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two distributions pip-installed into a private directory: a working plugin and a broken one."""
    pytest.importorskip("setuptools")
    base = tmp_path_factory.mktemp("dists")
    target = base / "site"
    good, bad, clashing = base / "good", base / "bad", base / "clashing"
    _write_distribution(good, "nb-thirdparty", "nb_thirdparty", PLUGIN_SOURCE, "thirdparty")
    _write_distribution(bad, "nb-broken", "nb_broken", "raise ImportError('missing dependency xyz')\n", "broken")
    # the built-in backprop's entry-point name, and a method registered under the built-in's method name
    _write_distribution(clashing, "nb-clashing", "nb_clashing", CLASHING_SOURCE, "backprop")
    for source in (good, bad, clashing):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(source)], check=True, timeout=300)
    return target


def _cli(site, *args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "noprop_bench", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_installed_plugin_is_listed_and_runs(site, tmp_path):
    listed = _cli(site, "--list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "thirdparty_linear" in listed.stdout and "from plugin thirdparty" in listed.stdout
    # the broken distribution is reported by name, and the rest still works
    assert "plugin 'broken' failed to import: missing dependency xyz" in listed.stderr

    out = tmp_path / "run"
    done = _cli(site, "--methods", "thirdparty_linear,backprop", "--dataset", "mnist5k", "--budget", "256samples",
                "--seeds", "1", "--checkpoints", "0", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert {r["method"]: r["status"] for r in records} == {"thirdparty_linear": "ok", "backprop": "ok"}
    table = (out / "table1.md").read_text()
    assert "| Third-party " in table and "Third-party (" not in table and "Backprop with linear head" in table


def test_a_plugin_never_silently_replaces_another_plugins_name(site, tmp_path):
    listed = _cli(site, "--list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    # both distributions named their entry point "backprop": both load
    assert "clash_renamed" in listed.stdout and "from plugin backprop (nb_clashing)" in listed.stdout
    backprop = next(line for line in listed.stdout.splitlines() if line.strip().startswith("backprop "))
    assert "from plugin backprop" in backprop and "nb_clashing" not in backprop  # the built-in kept its name
    assert ("plugin 'backprop (nb_clashing)' registers method 'backprop', which plugin 'backprop' already "
            "provides") in listed.stderr


def test_asking_for_a_broken_plugin_names_it(site, tmp_path):
    done = _cli(site, "--methods", "broken", "--dataset", "mnist5k", cwd=tmp_path)
    assert done.returncode == 2
    assert "method 'broken' comes from plugin 'broken', which failed to load: ImportError: missing dependency xyz" \
        in done.stderr
    assert "Traceback" not in done.stderr


def test_a_method_without_an_embedding_parameter_gets_no_embedding_in_its_row_label():
    from noprop_bench import Method

    class Plain(Method):
        name, label, defaults = "plain", "Plain", {"lr": 1e-3}

    class Embedded(Plain):
        name, label, defaults = "embedded", "Embedded", {"lr": 1e-3, "embedding": "one-hot", "dim": 20}

    assert Plain.row_label(Plain.resolve_params({})) == "Plain"
    assert Embedded.row_label(Embedded.resolve_params({})) == "Embedded (one-hot)"
    assert Embedded.row_label(Embedded.resolve_params({"embedding": "learned"})) == "Embedded (dim=20)"


def test_a_row_label_names_every_parameter_that_differs_from_the_methods_defaults(fake_run):
    """A method run with 20 inference steps instead of 1000 must not sit in a table as if it were the default."""
    from noprop_bench import Method
    from noprop_bench.method import row_label_with_settings

    class Embedded(Method):
        name, label, defaults = "embedded", "Embedded", {"lr": 1e-3, "steps": 1000, "embedding": "one-hot", "dim": 20}

    def label(**given):
        return row_label_with_settings(Embedded, Embedded.resolve_params(given))

    assert label() == label(lr="0.001") == "Embedded (one-hot)"
    assert label(steps="20", lr="3e-3") == "Embedded (one-hot) [lr=0.003, steps=20]"
    assert label(embedding="learned", dim="64") == "Embedded (dim=64)"  # the embedding is in the label already
    assert label(dim="64") == "Embedded (one-hot) [dim=64]"

    code, out = fake_run("--methods", "linear[lr=0.2]", "--budget", "64samples", "--checkpoints", "0")
    assert code == 0
    assert "| Linear (one-hot) [lr=0.2] " in (out / "table1.md").read_text()  # alone, and still named


def test_a_row_label_comes_from_the_record_and_old_records_join_their_row():
    """Every output labels a trial that stored its defaults alike, whatever other records it is shown with; a
    record made before the defaults were stored shares the row of a newer one with the same parameters."""
    from noprop_bench.report.records import assign_rows

    base = {"method": "noprop_ct", "row_label": "NoProp-CT (one-hot)", "dataset": "mnist5k", "augment": "none",
            "val_split": 0.0}
    defaults = {"lr": 0.001, "steps": 1000, "embedding": "one-hot", "betas": (0.9, 0.999), "clip": float("nan")}
    old = {**base, "params": {**defaults, "steps": 20}}
    new = {**old, "param_defaults": defaults}
    default = {**base, "params": {**defaults, "betas": [0.9, 0.999]}, "param_defaults": defaults}
    assert assign_rows([new]) == ["NoProp-CT (one-hot) [steps=20]"]  # a tuple and its list, and NaNs, are equal
    assert assign_rows([old, new, default]) == ["NoProp-CT (one-hot) [steps=20]"] * 2 + ["NoProp-CT (one-hot)"]
    assert assign_rows([old, new]) == ["NoProp-CT (one-hot) [steps=20]"] * 2  # a run resumed across the change
    assert assign_rows([new, default]) == ["NoProp-CT (one-hot) [steps=20]", "NoProp-CT (one-hot)"]
    assert assign_rows([old]) == ["NoProp-CT (one-hot)"]  # no record says what the defaults were
    whole = {**default, "params": {**defaults, "steps": 1000.0}}  # a float that is a whole number
    assert assign_rows([whole]) == ["NoProp-CT (one-hot)"]


def test_a_plugin_that_fails_halfway_through_registering_leaves_no_names_behind(tmp_path, monkeypatch):
    source = textwrap.dedent("""
        from noprop_bench import hookimpl
        from noprop_bench_plugins.methods.backprop import Backprop

        class Shared(Backprop):
            name = "shared_name"

        @hookimpl
        def register_methods(register):
            register(Shared)
    """)
    (tmp_path / "working.py").write_text(source)
    failure = '    raise RuntimeError("broken after registering one class")\n'
    (tmp_path / "half_registered.py").write_text(source + failure)
    monkeypatch.syspath_prepend(str(tmp_path))
    import pluggy
    import half_registered
    import working
    from noprop_bench import hookspecs
    from noprop_bench.plugins import ENTRY_POINT_GROUP, PluginWarning, Registry, _add_plugin

    registry = Registry(pluggy.PluginManager(ENTRY_POINT_GROUP))
    registry.plugin_manager.add_hookspecs(hookspecs)
    with pytest.warns(PluginWarning, match="'half_registered' failed to load: broken after registering one class"):
        assert not _add_plugin(registry.plugin_manager, registry, half_registered, "half_registered")
    assert "shared_name" not in registry.methods and "method:shared_name" not in registry.provider
    assert _add_plugin(registry.plugin_manager, registry, working, "working")
    assert registry.methods["shared_name"] is working.Shared


def test_a_misspelt_hook_or_a_hook_not_marked_is_named_not_silently_ignored(tmp_path, monkeypatch):
    """A plugin author's most likely slip registers nothing: the host says why, not just 'unknown method'."""
    from noprop_bench.errors import UsageError
    from noprop_bench.plugins import PluginWarning, load_plugins

    body = textwrap.dedent("""
        from noprop_bench import hookimpl
        from noprop_bench_plugins.methods.backprop import Backprop

        class Mine(Backprop):
            name = "{name}"

        {marker}
        def {hook}(register):
            register(Mine)
    """)
    (tmp_path / "misspelt.py").write_text(body.format(name="mine_a", marker="@hookimpl", hook="register_method"))
    (tmp_path / "unmarked.py").write_text(body.format(name="mine_b", marker="", hook="register_methods"))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UsageError, match="--plugin misspelt: TypeError: it implements hook 'register_method', "
                                         "which noprop-bench does not define \\(did you mean register_methods\\?\\)"):
        load_plugins(["misspelt"])
    with pytest.warns(PluginWarning, match="plugin 'unmarked' implements no hook, so it provides nothing: mark "
                                           "register_methods with @hookimpl"):
        registry = load_plugins(["unmarked"])
    assert "mine_b" not in registry.methods
    (tmp_path / "hookless.py").write_text("import torch\n")
    with pytest.warns(PluginWarning, match="plugin 'hookless' implements no hook, so it provides nothing: it defines "
                                           "none of the hooks \\(register_datasets, register_executors, "
                                           "register_methods, trial_finished\\)"):
        load_plugins(["hookless"])
    (tmp_path / "returning.py").write_text(body.format(name="mine_c", marker="@hookimpl", hook="register_methods")
                                           + "    return [Mine]\n")
    with pytest.raises(UsageError, match="--plugin returning: TypeError: its register_methods returned \\[<class "
                                         "'returning.Mine'>\\]; call register\\(cls\\) for each class instead"):
        load_plugins(["returning"])
    (tmp_path / "registering.py").write_text(body.format(name="mine_d", marker="@hookimpl", hook="register_methods")
                                             + "    return [register(Mine)]  # [None]: registered all the same\n")
    assert "mine_d" in load_plugins(["registering"]).methods


HERE_PLUGIN = '''
from noprop_bench import hookimpl
from noprop_bench_plugins.methods.backprop import Backprop


class HereMethod(Backprop):
    name = "here_method"
    label = "A method from the working directory"


@hookimpl
def register_methods(register):
    register(HereMethod)
'''


def test_a_plugin_module_in_the_working_directory_loads_as_python_m_would_find_it(tmp_path, monkeypatch, capsys):
    """The installed console script does not put the working directory on sys.path (python -m does): a
    module written there, as the README's ad-hoc route has it, failed with ModuleNotFoundError."""
    from noprop_bench.cli import run
    from noprop_bench.errors import UsageError

    (tmp_path / "here_plugin.py").write_text(HERE_PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    try:
        assert run(["--plugin", "here_plugin", "--list"]) == 0
        assert "here_method" in capsys.readouterr().out
        from noprop_bench.run.jobs import import_root
        assert import_root("here_plugin") == str(tmp_path)  # what worker processes are told to import it from
        assert sys.path[-1] == str(tmp_path)  # searched last, so its files shadow no module imported later
    finally:
        sys.modules.pop("here_plugin", None)
    for path in ("./here_plugin.py", "here_plugin.py", str(tmp_path / "here_plugin")):
        with pytest.raises(UsageError, match=f"--plugin {path}: give the module's import name \\(here_plugin\\), "
                                             f"not a path"):
            run(["--plugin", path, "--list"])
    with pytest.raises(UsageError, match="--plugin not_here_plugin: cannot import it \\(ModuleNotFoundError"):
        run(["--plugin", "not_here_plugin", "--list"])


def test_a_progress_line_and_a_table_label_a_trial_alike():
    """Records store parameters sorted by name; a progress line (the parameters as resolved, in the defaults'
    order) must name them in the same order, or a log cannot be searched for a table's label."""
    import json

    from noprop_bench.method import row_label_with_settings
    from noprop_bench.run.jobs import trial_label
    from noprop_bench_plugins.methods.noprop_ct import NoPropCT

    params = NoPropCT.resolve_params({"steps": "10", "eval_steps": "5"})
    record = json.loads(json.dumps({"row_label": NoPropCT.row_label(params), "params": params,
                                    "param_defaults": NoPropCT.defaults}, sort_keys=True))
    assert row_label_with_settings(NoPropCT, params) == trial_label(record) == "NoProp-CT (one-hot) [eval_steps=5, steps=10]"


def test_a_list_parameter_takes_a_list_in_brackets_of_its_items_type():
    from noprop_bench import Method, UsageError
    from noprop_bench.specs import parse_method_spec

    class Widths(Method):
        name, label, defaults = "widths", "Widths", {"widths": [64, 32], "names": ("a",)}

    given = parse_method_spec("widths[widths=[16, 8, 4],names=[x,y]]")[1]
    assert Widths.resolve_params(given) == {"widths": [16, 8, 4], "names": ("x", "y")}
    with pytest.raises(UsageError, match=r"widths='garbage': expected a list in brackets, as its default \[64, 32\], "
                                         r"e.g. widths=\[64,32\]"):
        Widths.resolve_params({"widths": "garbage"})
    with pytest.raises(UsageError, match="widths item='x': expected a whole number"):
        Widths.resolve_params({"widths": "[16,x]"})


def test_a_list_parameter_is_labelled_as_the_command_line_takes_it():
    from noprop_bench.method import settings_suffix

    assert settings_suffix({"sweep_steps": "2,5", "widths": [16, 8], "lr": 0.1},
                           {"sweep_steps": "2,5,10", "widths": [64], "lr": 0.1}) == " [sweep_steps=[2,5], widths=[16,8]]"
