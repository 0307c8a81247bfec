"""The plugin host: entry-point group ``noprop_bench``, modules named with ``--plugin``, and a registry."""

import importlib
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Dict, Iterable, List, Optional, Type

import pluggy

from . import hookspecs
from .datasets import Dataset
from .errors import UsageError
from .run.executor_base import Executor
from .method import FAMILIES, Method

ENTRY_POINT_GROUP = "noprop_bench"


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
    def register_method(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
            raise TypeError(f"plugin {plugin_name!r} registered {cls!r}, which is not a named Method subclass")
        if cls.family not in FAMILIES:
            raise TypeError(f"method {cls.name!r}: family must be one of {FAMILIES}, not {cls.family!r}")
        registry.methods[cls.name] = cls
        registry.provider[f"method:{cls.name}"] = plugin_name

    def register_dataset(cls):
        if not (isinstance(cls, type) and issubclass(cls, Dataset)) or not cls.name:
            raise TypeError(f"plugin {plugin_name!r} registered {cls!r}, which is not a named Dataset subclass")
        registry.datasets[cls.name] = cls
        registry.provider[f"dataset:{cls.name}"] = plugin_name

    def register_executor(cls):
        if not (isinstance(cls, type) and issubclass(cls, Executor)) or not cls.name:
            raise TypeError(f"plugin {plugin_name!r} registered {cls!r}, which is not a named Executor subclass")
        registry.executors[cls.name] = cls
        registry.provider[f"executor:{cls.name}"] = plugin_name

    hooks = pm.subset_hook_caller  # call each hook on this plugin alone, so provenance is exact
    others = [p for p in pm.get_plugins() if p is not plugin]
    hooks("register_methods", others)(register=register_method)
    hooks("register_datasets", others)(register=register_dataset)
    hooks("register_executors", others)(register=register_executor)


def _add_plugin(pm: pluggy.PluginManager, registry: Registry, plugin, plugin_name: str) -> bool:
    try:
        pm.register(plugin, name=plugin_name)
        _register_from(pm, registry, plugin, plugin_name)
    except Exception as error:  # a broken plugin must not take the host down
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        registry.broken[plugin_name] = f"{type(error).__name__}: {error}"
        warnings.warn(f"plugin {plugin_name!r} failed to load: {error}", PluginWarning, stacklevel=3)
        return False
    return True


def load_plugins(modules: Optional[List[str]] = None) -> Registry:
    """Load every installed plugin of the ``noprop_bench`` entry-point group, then ``modules``.

    A plugin that fails to import or to register is reported as a :class:`PluginWarning` and left
    out; asking for one of its methods later names it and its error.
    """
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    registry = Registry(pm)
    seen = set()
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if entry_point.name in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(entry_point.name)
        try:
            plugin = entry_point.load()
        except Exception as error:
            registry.broken[entry_point.name] = f"{type(error).__name__}: {error}"
            warnings.warn(f"plugin {entry_point.name!r} failed to import: {error}", PluginWarning, stacklevel=2)
            continue
        _add_plugin(pm, registry, plugin, entry_point.name)
    for module_name in modules or []:
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise UsageError(f"--plugin {module_name}: cannot import it ({type(error).__name__}: {error})") from None
        if not pm.is_registered(module):
            if not _add_plugin(pm, registry, module, module_name):
                raise UsageError(f"--plugin {module_name}: {registry.broken[module_name]}")
    return registry
