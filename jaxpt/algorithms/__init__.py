"""One small module per algorithm: what the algorithm is, not how a run is assembled.

Each module holds its config section (``@register_section``), its typed batch, its loss and
batch statistics (pure functions of params and a batch), and how it gets batches (its batch
source); nothing here jits, builds a model or reads files. The run around it (model, data,
jitted programs, the ``Trainer``) is assembled by ``jaxpt.trainers.<name>``, which
registers the entry point that ``jaxpt train`` finds by ``cfg.algorithm``; an algorithm
outside jaxpt is named by its module's import path (``algorithm: mypkg.my_algo``).

``docs/adding_an_algorithm.md`` walks through adding one (the parts above, what the engine
does for it, and a worked example in ``tests/algorithms_example/``).
"""
