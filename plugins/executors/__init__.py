"""Built-in executor plugins: one module per executor, each with a ``register_executors`` hook."""
