"""A plugin module that raises while being imported (tests of plugin import failures)."""

raise RuntimeError("deliberately broken plugin module")
