"""The technique plug-in point: one method from one paper, applied to a run and able to estimate itself.

`base.py` is the protocol (`Technique`, its slots and hooks, `Context`, `ESTIMATE_ORDER`); `registry.py` the table
of every technique by slot and name. Import from those modules (this package re-exports nothing).
"""
