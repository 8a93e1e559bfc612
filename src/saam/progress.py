"""What a person sees while things run: progress bars for the loops they wait for, on the
terminal that runs them, and quiet model loading.

Inside a notebook kernel everything written to stdout or stderr (file descriptors included) lands
in the chapter, so there the bars go to the controlling terminal (``/dev/tty``: the one running
``make`` or ``jupyter lab``) and are off where there is none (CI, a detached server). Outside a
kernel they go to stderr as usual.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from functools import lru_cache

from tqdm import tqdm


@lru_cache(maxsize=1)
def _stream():
    if "ipykernel" not in sys.modules:
        return sys.stderr
    try:
        return open("/dev/tty", "w")
    except OSError:
        return None


def bar(iterable=None, desc: str = "", disable: bool = False, **kw):
    stream = _stream()
    return tqdm(iterable, desc=desc, file=stream, leave=False, dynamic_ncols=True,
                disable=disable or stream is None, **kw)


@contextmanager
def quiet():
    """Silence diffusers' and transformers' loading chatter (progress bars, info and warnings
    such as "CLIPImageProcessor requires torchvision", which concerns a safety checker we never
    load); errors still surface."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog
    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error(); tlog.set_verbosity_error()
    dlog.disable_progress_bar(); tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0]); tlog.set_verbosity(levels[1])
        dlog.enable_progress_bar(); tlog.enable_progress_bar()
