"""A user sees nothing from optional libraries' imports (torchao's CUDA kernels, bitsandbytes' `kernels`, torch's
pytree notice), while anything else those libraries log still shows."""

import importlib.util
import logging
import os
import subprocess
import sys

import memfit  # noqa: F401  (installs the filters)
from memfit.compat import IMPORT_NOISE


def test_importing_the_noisy_libraries_prints_nothing():
    """transformers imports torchao with any model class and peft imports bitsandbytes: import those two (where
    installed) the way they arrive, after memfit, in a fresh interpreter."""
    libs = [name for name in ("torchao", "bitsandbytes") if importlib.util.find_spec(name) is not None]
    code = "import memfit\n" + "".join(f"import {name}\n" for name in libs)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "" and out.stdout == ""


def test_only_the_known_messages_are_dropped(caplog):
    for name, prefixes in IMPORT_NOISE.items():
        logger = logging.getLogger(name)
        with caplog.at_level(logging.WARNING, logger=name):
            logger.warning(prefixes[0] + " something expected")
            logger.warning("something the user must see")
    assert [r.getMessage() for r in caplog.records] == ["something the user must see"] * len(IMPORT_NOISE)
