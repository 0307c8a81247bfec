"""Built-in method plugins: one module per method, each with a ``register_methods`` hook."""
