"""The hooks a noprop-bench plugin may implement."""

import pluggy

hookspec = pluggy.HookspecMarker("noprop_bench")
hookimpl = pluggy.HookimplMarker("noprop_bench")


@hookspec
def register_methods(register):
    """Register Method subclasses: call ``register(MethodClass)`` for each."""


@hookspec
def register_datasets(register):
    """Register Dataset subclasses: call ``register(DatasetClass)`` for each."""


@hookspec
def register_executors(register):
    """Register Executor subclasses (``noprop_bench.executor.Executor``): call ``register(ExecutorClass)``."""


@hookspec
def trial_finished(record, out_dir):
    """Observe a finished trial: ``record`` is the dict just written to ``trials.jsonl``."""
