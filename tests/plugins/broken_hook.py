"""A plugin whose method hook raises, beside a hook that works (tests of plugin failures)."""

from hica_bench import hookimpl
from hica_bench.interfaces import PluginSpec


class StillHere:
    def __call__(self, **tensors):
        raise NotImplementedError


@hookimpl
def hica_bench_methods():
    raise RuntimeError("deliberately broken hook")


@hookimpl
def hica_bench_losses():
    return [PluginSpec("loss", "still-here", "a loss from the plugin whose method hook is broken (tests)", StillHere)]
