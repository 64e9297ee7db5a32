"""diffusers' and transformers' console output, hidden in nova3d's entry points (the CLI, the demo).

Loading or saving a pipeline prints their progress bars ("Loading weights", "Loading pipeline
components...", "Writing model shards") and warnings that are no action of the user's: that
`accelerate` is not installed (it is not needed on CPU), and "There are modules in GTAUNet that
should be kept in float32: []" (an empty list) when a model is cast. nova3d's own progress bar and
one-line summary say what happened. Errors stay visible (verbosity ERROR), as does everything
nova3d prints itself.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def quiet_hub_libraries() -> Iterator[None]:
    """Inside: diffusers and transformers log only errors and show no progress bars; restored after."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = (dlog.get_verbosity(), tlog.get_verbosity(), dlog.is_progress_bar_enabled(),
             tlog.is_progress_bar_enabled())
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(saved[0])
        tlog.set_verbosity(saved[1])
        (dlog.enable_progress_bar if saved[2] else dlog.disable_progress_bar)()
        (tlog.enable_progress_bar if saved[3] else tlog.disable_progress_bar)()
