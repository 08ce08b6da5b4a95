"""Every pinned estimate (techniques × shapes, see `estimate_pins.py`) is reproduced to the byte.

A failure lists the cases that moved. If the change is intended, regenerate and commit the pins:
`PYTHONPATH=src python tests/memory/estimate_pins.py --write`.
"""

from __future__ import annotations

from . import estimate_pins


def test_every_pinned_estimate_is_reproduced_to_the_byte():
    pinned = estimate_pins.load()
    assert len(pinned) > 300, "the pin file is missing or nearly empty; regenerate it"
    moved = estimate_pins.diff(pinned, estimate_pins.compute())
    assert not moved, f"{len(moved)} estimates changed:\n" + "\n".join(moved[:40])
