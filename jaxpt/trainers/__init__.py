"""How a run of each algorithm is assembled: one trainer module per algorithm.

``jaxpt/trainers/<name>.py`` builds the run of ``jaxpt.algorithms.<name>`` from a
``RunConfig``: the model bundle and mesh (``jaxpt.engine.build``), the data and its batch
source, the jitted programs (train step, reference / rollout scorers, eval step) and the
``Trainer`` the engine's loop runs; it registers the entry point with
``registry.register_builder`` (or ``register_trainer`` when a run is more than one loop, as
RFT's sample-then-train) and lists its programs for ``jaxpt plan --compile``
(``aot_programs``). What the algorithm is (section, typed batch, loss, statistics) lives in
``jaxpt.algorithms``; nothing there jits or reads files.
"""
