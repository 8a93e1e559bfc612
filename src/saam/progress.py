"""Progress bars for the loops a person waits for, on the terminal that runs them.

Inside a notebook kernel, ``sys.stderr`` is captured into the chapter; progress belongs on the
terminal that runs ``make`` (the kernel's own stderr, ``sys.__stderr__``), not in the report.
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def bar(iterable=None, desc: str = "", disable: bool = False, **kw):
    return tqdm(iterable, desc=desc, file=sys.__stderr__, leave=False, dynamic_ncols=True,
                disable=disable, **kw)
