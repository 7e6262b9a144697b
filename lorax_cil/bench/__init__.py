"""Benchmarks of the toolkit itself (``lorax-cil bench``; the scripts in benchmarks/).

The top of the import graph: these modules train runs and build networks, so they may import
every other package, and nothing in the library imports them. They write results only under
the output folder they are given and a results page only to an explicit path
(``benchmarks/speed.py --write-docs`` is what updates docs/performance.md).

- :mod:`lorax_cil.bench.speed`: cost and memory of T task adapters against one plain pass.
- :mod:`lorax_cil.bench.provenance`: the commit and machine a results page came from.
"""
