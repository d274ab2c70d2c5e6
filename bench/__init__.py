"""
broadcaster's fan-out benchmark: ``python -m bench`` (see bench/README.rst).

The harness starts each server in turn as a subprocess pinned to one CPU,
drives it with a compiled C load generator (:file:`bench/loadgen.c`) pinned
to another, and reports medians over interleaved repetitions, with the ratio
of each figure to the Autobahn reference server's.

Modules: :mod:`bench.cli` (options, the run order), :mod:`bench.servers`
(the servers and their processes), :mod:`bench.loadgen` (building and
driving the load generator), :mod:`bench.scenarios` (S1 to S5),
:mod:`bench.report` (medians, the table, the JSON file) and
:mod:`bench.machine` (what the results were measured on).
"""
