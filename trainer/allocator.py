"""PyTorch's CUDA allocator set for training: expandable segments, unless the
environment already says otherwise.

Why: with fixed-size segments the caching allocator keeps blocks it cannot
merge, so the memory a run reserves exceeds what it uses. On 70B QLoRA at the
planner's 48 GiB budget the allocator reserved 49.41 GiB for 47.65 GiB in use;
with expandable segments (one virtual range per stream that grows and shrinks
in place) 47.27 GiB for 46.69 (bench/RESULTS.md, issue 16, third round). The
memory plan budgets allocated memory, so the reserve over it is what would
make a planned run fail on a card the size of its budget.

Imports nothing: it must run before torch's allocator reads the variable (the
first CUDA allocation); `kubetune train` calls it at its start.
"""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

VARIABLE = "PYTORCH_CUDA_ALLOC_CONF"
EXPANDABLE = "expandable_segments:True"


def use_expandable_segments(environ: Optional[MutableMapping[str, str]] = None) -> str:
    """Add expandable segments to PYTORCH_CUDA_ALLOC_CONF unless it sets them already
    (either way); other options in it are kept. Returns the value in force."""
    env = os.environ if environ is None else environ
    current = env.get(VARIABLE, "").strip()
    if "expandable_segments" in current:
        return current
    value = f"{current},{EXPANDABLE}" if current else EXPANDABLE
    env[VARIABLE] = value
    return value
