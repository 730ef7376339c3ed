"""Import bitsandbytes without importing torch's compiler stack with it.

Why: bitsandbytes wraps its fallback ops (the pure-PyTorch versions of its
kernels, for devices it has no library for) in `torch.compile` when it is
imported, and `torch.compile` imports TorchInductor to build its backend. That
took 1.7 s of the trainer's 17.6 s of imports on an H200 machine
(bench/profiles/h200_trainer_importtime.txt), for ops a CUDA run never calls,
and about 3 s of 12-15 s on a 2-core CPU machine. `torch.compile` compiles
nothing until the function is first called anyway; here only building its
wrapper waits for that call too, and only for plain functions.

Call `import_bitsandbytes()` first thing, before anything imports peft or
transformers (which import bitsandbytes when it is installed).
"""

from __future__ import annotations

import functools
import sys
import types


def deferred(real):
    """A stand-in for `torch.compile` (`real`) that builds the compiled function on
    its first call. Anything but a plain function (a module, a method) is passed to
    `real` at once, so what `torch.compile` returns for those is unchanged."""

    def compile_later(model=None, **kwargs):
        if model is None:  # @torch.compile(dynamic=False) -> a decorator
            return lambda fn: compile_later(fn, **kwargs)
        if not isinstance(model, types.FunctionType):
            return real(model, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **kwargs)
            return compiled(*args, **kw)

        return call

    return compile_later


def import_bitsandbytes() -> bool:
    """Imports bitsandbytes (when installed and not imported yet) with `torch.compile`
    deferred; True when it is imported now. An import that fails is left to whoever
    imports it next (peft reports a broken install in its own words)."""
    if "bitsandbytes" in sys.modules:
        return False
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    import torch

    real = torch.compile
    torch.compile = deferred(real)
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    finally:
        torch.compile = real
    return True
