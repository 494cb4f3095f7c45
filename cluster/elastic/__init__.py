"""Elastic prefill/decode: a controller that switches instance roles, and adds and removes
instances, to keep the SLO.

`policy.py` decides (plain data in, decisions out; no Ray, no torch); `slo_window.py` keeps the
attainment of recently finished requests; `switching.py` and `scaling.py` carry switches, adds
and removes out on a Ray deployment; `sim/` drives the real policy, router choice and
engine schedulers with a discrete-event clock (benchmarks/simulate.py).
"""
