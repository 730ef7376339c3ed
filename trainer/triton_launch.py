"""Launching this trainer's Triton kernels with less host work per launch.

Why: the host launches about 2,000 Triton kernels in an 8B QLoRA step, and the forward
of a step is host-bound: the GPU idled about 45 ms a 0.78 s step waiting for launches
(bench/RESULTS.md, issue 16, eleventh round). Triton's launch path binds the arguments,
specialises each one (dtype and 16-byte alignment of a pointer; an integer's value
being 1, its divisibility by 16, its width), hashes that into the cache key, checks the
kernel's globals and only then calls the compiled kernel's launcher: about 70-90 us of
host time a launch in a profiled step, most of a LoRA projection's forward on the host.

`launch(kernel, grid, *args, **kwargs)` is `kernel[grid](*args, **kwargs)`. It keys the
compiled kernel on a key at least as fine as Triton's own specialisation (`_spec`), so
a compiled kernel is only reused for arguments Triton would have given the same one;
the first launch of each key goes through Triton (which compiles and returns the
kernel), later ones call the compiled kernel's launcher directly, with the same
arguments and hooks Triton passes it. Triton's interpreter (the CPU tests), a kernel
with pre-run hooks, a Triton without the pieces used here, and KUBETUNE_FAST_LAUNCH=0
all take Triton's own path. bench/check_fast_launch.py checks the results bit for bit
against Triton's path on a GPU and times both.
"""

from __future__ import annotations

import os

from kubetune.contract import facts

ENABLED = os.environ.get(facts.ENV_FAST_LAUNCH, "1").strip() != "0"


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, through the compiled kernel's launcher when it
    has been launched before with arguments of the same specialisation."""
    launcher = _launcher(kernel) if ENABLED and isinstance(grid, tuple) else None
    if launcher is None:
        kernel[grid](*args, **kwargs)
    else:
        launcher(grid, args, kwargs)


def _spec(value):
    """What Triton's specialisation of one argument (not a constexpr: those by value) depends
    on, or finer: a tensor's dtype,
    device and pointer alignment; an int's value where it is 0 or 1, its divisibility by
    16 and its width; a float only as a float; anything else (a constexpr, None) itself."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return (int, value if value in (0, 1) else 2, value % 16 == 0, -2**31 <= value < 2**31, value < 2**63)
    if isinstance(value, float):
        return float
    ptr = getattr(value, "data_ptr", None)
    if ptr is not None:
        return (value.dtype, value.device, ptr() % 16 == 0)
    return (type(value), value)


class _Launcher:
    def __init__(self, kernel, knobs, driver) -> None:
        self.kernel, self.knobs, self.driver = kernel, knobs, driver
        self.names = list(kernel.arg_names)
        self.defaults = {p.name: p.default for p in kernel.params if p.has_default}
        self.constexpr = [p.is_constexpr for p in kernel.params]
        self.compiled: dict = {}

    def __call__(self, grid: tuple, args: tuple, kwargs: dict) -> None:
        full = list(args)
        for name in self.names[len(args):]:
            if name in kwargs:
                full.append(kwargs[name])
            elif name in self.defaults:
                full.append(self.defaults[name])
            else:  # Triton names what is missing
                self.kernel[grid](*args, **kwargs)
                return
        options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in self.names))
        key = (tuple((type(v), v) if c else _spec(v) for v, c in zip(full, self.constexpr)), options)
        try:
            compiled = self.compiled.get(key)
        except TypeError:  # an unhashable constexpr: Triton's path
            self.kernel[grid](*args, **kwargs)
            return
        if compiled is None:
            compiled = self.kernel[grid](*args, **kwargs)  # compiles or finds it, and launches it
            if all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata", "launch_metadata")):
                self.compiled[key] = compiled
            return
        device = self.driver.active.get_current_device()
        stream = self.driver.active.get_current_stream(device)
        g = tuple(grid) + (1, 1)
        runtime = self.knobs.runtime
        compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid, stream, *full), runtime.launch_enter_hook,
                     runtime.launch_exit_hook, *full)


def _launcher(kernel):
    launcher = getattr(kernel, "_kubetune_launcher", None)
    if launcher is None:
        launcher = False
        if type(kernel).__name__ == "JITFunction" and not getattr(kernel, "pre_run_hooks", None):
            try:
                from triton import knobs
                from triton.runtime import driver

                launcher = _Launcher(kernel, knobs, driver)
            except (ImportError, AttributeError):
                pass
        kernel._kubetune_launcher = launcher
    return launcher or None
