"""One small module per algorithm: what the algorithm is, not how a run is assembled.

Each module holds its config section (``@register_section``), its loss and batch
statistics (pure functions of params and a batch), and how it gets batches; it registers
its trainer with ``registry.register_builder`` (or ``register_trainer`` when a run is more
than one loop). ``jaxpt train`` finds ``jaxpt.algorithms.<cfg.algorithm>`` by name, and an
algorithm outside jaxpt by its module's import path (``algorithm: mypkg.my_algo``).
Nothing here jits or does I/O beyond what it hands to the engine.

``docs/adding_an_algorithm.md`` walks through adding one (the parts above, what the engine
does for it, and a worked example in ``tests/algorithms_example/``).
"""
