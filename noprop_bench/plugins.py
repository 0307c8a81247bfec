"""The plugin host: entry-point group ``noprop_bench``, modules named with ``--plugin``, and a registry."""

import difflib
import importlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Type

import pluggy

from . import hookspecs
from .datasets import Dataset
from .errors import UsageError
from .run.executor_base import Executor
from .method import FAMILIES, Method

ENTRY_POINT_GROUP = "noprop_bench"
BUILT_IN_DISTRIBUTION = "noprop-bench"


class PluginWarning(UserWarning):
    """A plugin could not be loaded; the host goes on without it."""


@dataclass
class Registry:
    """Every method, dataset and executor the loaded plugins provide, with the plugin that provided each."""

    plugin_manager: pluggy.PluginManager
    methods: Dict[str, Type[Method]] = field(default_factory=dict)
    datasets: Dict[str, Type[Dataset]] = field(default_factory=dict)
    executors: Dict[str, Type[Executor]] = field(default_factory=dict)
    provider: Dict[str, str] = field(default_factory=dict)
    broken: Dict[str, str] = field(default_factory=dict)

    def _missing(self, kind: str, name: str, known: Iterable[str]) -> UsageError:
        message = f"unknown {kind} {name!r}; available: {', '.join(sorted(known)) or 'none'}"
        if name in self.broken:
            message = f"{kind} {name!r} comes from plugin {name!r}, which failed to load: {self.broken[name]}"
        elif self.broken:
            message += f" (plugins that failed to load: {', '.join(sorted(self.broken))})"
        return UsageError(message)

    def table(self, kind: str) -> Dict[str, type]:
        """The names and classes of one kind: ``method``, ``dataset`` or ``executor``."""
        return {"method": self.methods, "dataset": self.datasets, "executor": self.executors}[kind]

    def method(self, name: str) -> Type[Method]:
        if name not in self.methods:
            raise self._missing("method", name, self.methods)
        return self.methods[name]

    def dataset(self, name: str) -> Type[Dataset]:
        if name not in self.datasets:
            raise self._missing("dataset", name, self.datasets)
        return self.datasets[name]

    def executor(self, name: str) -> Type[Executor]:
        if name not in self.executors:
            raise self._missing("executor", name, self.executors)
        return self.executors[name]

    @property
    def hook(self):
        return self.plugin_manager.hook


def _register_from(pm: pluggy.PluginManager, registry: Registry, plugin, plugin_name: str):
    def claim(kind: str, cls: type) -> None:
        """The first plugin to register a name keeps it: a later one with another class is warned about
        and left out, so no plugin silently replaces a built-in (or another plugin's) method."""
        table = registry.table(kind)
        known = table.get(cls.name)
        if known is not None and known is not cls:
            warnings.warn(f"plugin {plugin_name!r} registers {kind} {cls.name!r}, which plugin "
                          f"{registry.provider[f'{kind}:{cls.name}']!r} already provides; the one from "
                          f"{plugin_name!r} is left out (rename it)", PluginWarning, stacklevel=2)
            return
        table[cls.name] = cls
        registry.provider.setdefault(f"{kind}:{cls.name}", plugin_name)

    def register_method(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
            raise TypeError(f"plugin {plugin_name!r} registered {cls!r}, which is not a named Method subclass")
        if cls.family not in FAMILIES:
            raise TypeError(f"method {cls.name!r}: family must be one of {FAMILIES}, not {cls.family!r}")
        claim("method", cls)

    def register_dataset(cls):
        if not (isinstance(cls, type) and issubclass(cls, Dataset)) or not cls.name:
            raise TypeError(f"plugin {plugin_name!r} registered {cls!r}, which is not a named Dataset subclass")
        claim("dataset", cls)

    def register_executor(cls):
        if not (isinstance(cls, type) and issubclass(cls, Executor)) or not cls.name:
            raise TypeError(f"plugin {plugin_name!r} registered {cls!r}, which is not a named Executor subclass")
        claim("executor", cls)

    _check_hook_names(pm, plugin, plugin_name)
    hooks = pm.subset_hook_caller  # call each hook on this plugin alone, so provenance is exact
    others = [p for p in pm.get_plugins() if p is not plugin]
    for hook, register in (("register_methods", register_method), ("register_datasets", register_dataset),
                           ("register_executors", register_executor)):
        for value in hooks(hook, others)(register=register):
            # classes handed back instead of registered: nothing would be registered, and nothing said
            if any(isinstance(item, type) for item in (value if isinstance(value, (list, tuple, set)) else [value])):
                raise TypeError(f"its {hook} returned {value!r}; call register(cls) for each class instead "
                                f"(the return value is ignored)")


def _check_hook_names(pm: pluggy.PluginManager, plugin, plugin_name: str) -> None:
    """Refuse a hook implementation the host does not define (a misspelt name would register nothing, and
    say nothing); warn about a plugin that implements no hook (functions not marked ``@hookimpl``)."""
    defined = sorted(name for name in dir(hookspecs) if getattr(getattr(hookspecs, name), "noprop_bench_spec", None))
    callers = pm.get_hookcallers(plugin) or []
    for caller in callers:
        if caller.spec is None:
            close = difflib.get_close_matches(caller.name, defined, n=1)
            hint = f"did you mean {close[0]}?" if close else f"the hooks are {', '.join(defined)}"
            raise TypeError(f"it implements hook {caller.name!r}, which noprop-bench does not define ({hint})")
    if not callers:
        unmarked = [name for name in defined if callable(getattr(plugin, name, None))]
        fix = (f"mark {', '.join(unmarked)} with @hookimpl (from noprop_bench import hookimpl)" if unmarked else
               f"it defines none of the hooks ({', '.join(defined)})")
        warnings.warn(f"plugin {plugin_name!r} implements no hook, so it provides nothing: {fix}",
                      PluginWarning, stacklevel=4)


def _add_plugin(pm: pluggy.PluginManager, registry: Registry, plugin, plugin_name: str) -> bool:
    try:
        pm.register(plugin, name=plugin_name)
        _register_from(pm, registry, plugin, plugin_name)
    except Exception as error:  # a broken plugin must not take the host down
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        for key, provider in list(registry.provider.items()):  # nor keep names for the classes it did register
            if provider == plugin_name:
                kind, name = key.split(":", 1)
                registry.table(kind).pop(name, None)
                del registry.provider[key]
        registry.broken[plugin_name] = f"{type(error).__name__}: {error}"
        warnings.warn(f"plugin {plugin_name!r} failed to load: {error}", PluginWarning, stacklevel=3)
        return False
    return True


def _not_built_in(entry_point) -> bool:
    """Sort key: this distribution's own plugins first, so their names are never taken by another's."""
    distribution = getattr(entry_point, "dist", None)
    return getattr(distribution, "name", None) != BUILT_IN_DISTRIBUTION


def _import_plugin_module(module_name: str):
    """Import a ``--plugin`` module as ``python -m`` would find it: from the current directory too, which an
    installed console script leaves off ``sys.path`` (workers get the directory with the job)."""
    if os.sep in module_name or "/" in module_name or (module_name.endswith(".py") and Path(module_name).is_file()):
        name = Path(module_name).stem if module_name.endswith(".py") else Path(module_name).name
        raise UsageError(f"--plugin {module_name}: give the module's import name ({name}), not a path; run from the "
                         f"directory that holds it, or add that directory to PYTHONPATH")
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        top, here = module_name.split(".")[0], os.getcwd()
        if error.name != top or here in sys.path or not (Path(f"{top}.py").is_file() or Path(top).is_dir()):
            raise
        sys.path.append(here)  # last: a file here must not shadow a module imported later (submitit, timm, ...)
        return importlib.import_module(module_name)


def load_plugins_saying(modules: Optional[List[str]], say: Callable[[str], None]) -> Registry:
    """:func:`load_plugins`, each warning raised meanwhile passed to ``say`` as one ``warning: ...`` line, as the
    command lines print their warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = load_plugins(modules)
    for warning in caught:
        say(f"warning: {warning.message}")
    return registry


def load_plugins(modules: Optional[List[str]] = None) -> Registry:
    """Load every installed plugin of the ``noprop_bench`` entry-point group (the built-ins first), then
    ``modules``.

    A plugin that fails to import or to register is reported as a :class:`PluginWarning` and left
    out; asking for one of its methods later names it and its error. A method, dataset or executor name
    belongs to the first plugin that registers it; another plugin's class of that name is left out with a
    :class:`PluginWarning`.
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    registry = Registry(pm)
    seen, names = set(), set()
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=_not_built_in):
        if (entry_point.name, entry_point.value) in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add((entry_point.name, entry_point.value))
        # two distributions may pick one entry-point name: both load, the second under a longer name
        plugin_name = entry_point.name if entry_point.name not in names else \
            f"{entry_point.name} ({entry_point.value})"
        names.add(entry_point.name)
        try:
            plugin = entry_point.load()
        except Exception as error:
            registry.broken[plugin_name] = f"{type(error).__name__}: {error}"
            warnings.warn(f"plugin {plugin_name!r} failed to import: {error}", PluginWarning, stacklevel=2)
            continue
        if not pm.is_registered(plugin):
            _add_plugin(pm, registry, plugin, plugin_name)
    for module_name in modules or []:
        try:
            module = _import_plugin_module(module_name)
        except UsageError:
            raise
        except Exception as error:
            raise UsageError(f"--plugin {module_name}: cannot import it ({type(error).__name__}: {error})") from None
        if not pm.is_registered(module):
            if not _add_plugin(pm, registry, module, module_name):
                raise UsageError(f"--plugin {module_name}: {registry.broken[module_name]}")
    return registry
