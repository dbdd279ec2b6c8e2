"""The C extension only (pyproject.toml has everything else): the prefix index's hash ->
worker-bitmask table, see router/block_map.py. Optional: without a C compiler the install
still succeeds and the index falls back to dict probes."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("router._block_map", ["router/_block_map.c"], optional=True)])
