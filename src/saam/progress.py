"""Progress bars for the loops a person waits for, on the terminal that runs them.

Inside a notebook kernel everything written to stdout or stderr (file descriptors included) lands
in the chapter, so there the bars go to the controlling terminal (``/dev/tty``: the one running
``make`` or ``jupyter lab``) and are off where there is none (CI, a detached server). Outside a
kernel they go to stderr as usual.
"""
from __future__ import annotations

import sys
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
