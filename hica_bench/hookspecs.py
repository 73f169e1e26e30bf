"""The plugin contract: one hook per kind of plugin.

A plugin is a module (or object) registered under the ``hica_bench`` entry-point group, e.g. in its
``pyproject.toml``::

    [project.entry-points.hica_bench]
    my_methods = "my_package.plugin"

and implementing any of the hooks below with :data:`hica_bench.hookimpl`. Every hook takes no
arguments and returns a list of :class:`hica_bench.interfaces.PluginSpec` of its kind; what each
spec's ``factory`` must build is the interface documented in :mod:`hica_bench.interfaces`. There is one
hook per kind (:data:`hica_bench.interfaces.KINDS`), named ``hica_bench_<kind>s``.

A spec is declared once, next to what it builds (scikit-learn style): its ``factory`` (a class or function, or
``"package.module:Attr"`` imported on first use) and **the factory's signature give the options and their
defaults**; the spec adds only what each option accepts (``constraints``: :class:`~hica_bench.interfaces.Option`
ranges and choices), which options name other plugins (``components``), and whether it belongs to the default suite
(``in_default_suite``). The fixed arguments each hook below lists are passed by the core and are not options. Where
a signature cannot give a default (a parameter without one, a name taken through ``**options``) the spec's
``defaults`` gives it, and only there; a spec whose declarations do not fit its factory (a constraint for something
that is not an option, a parameter left without a default) is left out with a warning naming the plugin. The rules
are on :class:`~hica_bench.interfaces.PluginSpec`; :func:`hica_bench.testing.check_spec` checks a spec against them.

Every result records the plugin's distribution, version and resolved options in its identity: bump your version
when a change moves numbers. First-party plugins (``plugins/``) use exactly this contract; the core has no built-in
names.
"""

from __future__ import annotations

import pluggy

from hica_bench.interfaces import PluginSpec

hookspec = pluggy.HookspecMarker("hica_bench")


@hookspec
def hica_bench_datasets() -> list[PluginSpec]:
    """Datasets. ``factory(root, size, download, cache_dir, **options)`` returns a
    :class:`~hica_bench.interfaces.FewShotDataset`; the four fixed arguments are passed by name. ``root`` is the data
    root (``--data-root``, ``$HICA_BENCH_DATA`` or None); a spec may offer a fixed argument as an option by giving its
    default in ``defaults`` (the ``folder`` dataset's ``root=``): the option's value then replaces it. Every dataset also takes ``prompts=FILE``, which the core reads (:mod:`hica_bench.prompts`), and
    ``corruption=NAME:severity=S``, which the core applies to its test split (:mod:`hica_bench.corruptions`); neither
    is passed to the factory. A dataset of 3D volumes sets ``volumetric = True`` (:mod:`hica_bench.volumes`). Long
    work while building (decoding a folder) may report through :func:`hica_bench.data.progress`."""


@hookspec
def hica_bench_encoders() -> list[PluginSpec]:
    """Image/text encoder pairs. ``factory(device, **options)`` returns an
    :class:`~hica_bench.interfaces.EncoderPair` whose models already live on ``device`` (passed by name; not an
    option). Optional, and worth it for a pair that is slow to build: ``describe(device, **options)``, taking the same
    options as the factory, returns its
    :class:`~hica_bench.interfaces.EncoderCard` (identities, input spec, aligned) without building the models, so a
    run whose features are all cached never builds them; it must agree with the built pair (the run checks)."""


@hookspec
def hica_bench_methods() -> list[PluginSpec]:
    """Few-shot methods. ``factory(**options)`` returns a :class:`~hica_bench.interfaces.Method`; the components it
    uses it builds in ``fit`` through ``task.components`` (:class:`~hica_bench.interfaces.Components`). A method may
    adapt a private copy of the encoder in ``fit`` and expose it as ``encoder_``: it then predicts on the test images
    encoded through it (the contract is on :class:`~hica_bench.interfaces.Method`; helpers in
    :mod:`hica_bench.adapting`)."""


@hookspec
def hica_bench_roi_extractors() -> list[PluginSpec]:
    """ROI extractors (a component). ``factory(**options)`` returns a
    :class:`~hica_bench.interfaces.ROIExtractor`; options declared in ``components`` arrive as built objects."""


@hookspec
def hica_bench_descriptor_generators() -> list[PluginSpec]:
    """Class-text descriptor generators (a component). ``factory(**options)`` returns a
    :class:`~hica_bench.interfaces.DescriptorGenerator`; options declared in ``components`` arrive as built objects
    (``noisy``'s ``base``)."""


@hookspec
def hica_bench_losses() -> list[PluginSpec]:
    """Training losses (a component). ``factory(**options)`` returns a :class:`~hica_bench.interfaces.Loss`."""


@hookspec
def hica_bench_protocols() -> list[PluginSpec]:
    """Evaluation protocols. ``factory(**options)`` returns an :class:`~hica_bench.interfaces.EvaluationProtocol`:
    for each (dataset, k, seed) it draws the cell's :class:`~hica_bench.interfaces.Episode` (the support, an optional
    validation set) and says how the method's options are chosen from its search space
    (:attr:`~hica_bench.interfaces.PluginSpec.search`). The protocol and its options are part of the identity of every
    cell whose episode is not a plain k-shot one. The rules the built-in protocols draw with are public:
    :func:`hica_bench.protocol.sample_support`, :func:`hica_bench.protocol.sample_validation`."""

