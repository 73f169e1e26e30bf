"""hica-bench: a method-agnostic harness for few-shot medical image classification.

The core (this package) never imports a concrete method, encoder or dataset: those are plugins found
through the ``hica_bench`` entry-point group. Plugin authors need :mod:`hica_bench.hookspecs` (the hooks),
:mod:`hica_bench.interfaces` (what the hooks return) and :class:`hica_bench.errors.UserError`; they may use
:mod:`hica_bench.files` (atomic writes, digests), :mod:`hica_bench.data` (preprocessing, lazy arrays) and
:mod:`hica_bench.testing` (the conformance kit).
"""

import pluggy

__version__ = "0.1.0"

#: Decorator for plugin hook implementations: ``@hookimpl def hica_bench_methods(): ...``
hookimpl = pluggy.HookimplMarker("hica_bench")
