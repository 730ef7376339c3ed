"""trainer/triton_launch.py: which launches go through Triton and which straight to the
compiled kernel's launcher, with what arguments (a stand-in kernel records them; the real
kernels are checked bit for bit on a GPU by bench/check_fast_launch.py; on the CPU, Triton's
interpreter runs them through Triton's own path, in test_rms_norm, test_fp8_* and
test_lora_dropout*)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from kubetune.trainer import triton_launch


class Compiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "fn", "meta"

    def launch_metadata(self, grid, stream, *args):
        return ("md", grid)

    def run(self, *args):
        self.log.append(("direct", args))


class Param:
    def __init__(self, name, default=None, has_default=False):
        self.name, self.default, self.has_default = name, default, has_default
        self.is_constexpr = name.isupper()


class JITFunction:  # the name is what triton_launch recognises
    arg_names = ["x_ptr", "n", "scale", "BLOCK", "DROP"]
    params = [Param("x_ptr"), Param("n"), Param("scale"), Param("BLOCK"), Param("DROP", True, True)]

    def __init__(self):
        self.log, self.pre_run_hooks = [], []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return Compiled(self.log)
        return run


@pytest.fixture
def fake_triton(monkeypatch):
    runtime = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook="exit-hook")
    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 1234)
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(knobs=types.SimpleNamespace(runtime=runtime)))
    monkeypatch.setitem(sys.modules, "triton.runtime", types.SimpleNamespace(driver=types.SimpleNamespace(active=active)))
    monkeypatch.setattr(triton_launch, "ENABLED", True)


def test_the_first_launch_of_a_specialisation_goes_through_triton_later_ones_straight_to_the_launcher(fake_triton):
    k = JITFunction()
    x = torch.zeros(64)
    triton_launch.launch(k, (4,), x, 4096, 0.5, BLOCK=128, num_warps=8)
    assert k.log == [("triton", (4,), (x, 4096, 0.5), {"BLOCK": 128, "num_warps": 8})]
    triton_launch.launch(k, (8,), x, 8192, 0.25, BLOCK=128, num_warps=8)
    # every parameter in order, the default filled in, the grid padded to three, the hooks passed on
    assert k.log[-1] == ("direct", (8, 1, 1, 1234, "fn", "meta", ("md", (8,)), None, "exit-hook",
                                    x, 8192, 0.25, 128, True))
    assert len(k.log) == 2


@pytest.mark.parametrize("change", ["constexpr", "option", "alignment", "dtype", "one", "not_by_16", "wide_int"])
def test_a_launch_triton_would_specialise_differently_goes_through_triton_again(fake_triton, change):
    k = JITFunction()
    buf = torch.zeros(64)
    args, kwargs = [buf, 4096, 0.5], {"BLOCK": 128, "num_warps": 8}
    triton_launch.launch(k, (4,), *args, **kwargs)
    if change == "constexpr":
        kwargs["BLOCK"] = 256
    elif change == "option":
        kwargs["num_warps"] = 4
    elif change == "alignment":
        args[0] = buf[1:]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    elif change == "one":
        args[1] = 1
    elif change == "not_by_16":
        args[1] = 4095
    else:
        args[1] = 2**33
    triton_launch.launch(k, (4,), *args, **kwargs)
    assert [e[0] for e in k.log] == ["triton", "triton"]
    triton_launch.launch(k, (4,), *args, **kwargs)  # and that specialisation is kept in turn
    assert [e[0] for e in k.log] == ["triton", "triton", "direct"]


def test_values_triton_does_not_specialise_on_reuse_the_kernel(fake_triton):
    k = JITFunction()
    triton_launch.launch(k, (4,), torch.zeros(64), 4096, 0.5, BLOCK=128)
    triton_launch.launch(k, (4,), torch.zeros(128), 4096 * 3, 0.125, BLOCK=128)  # another buffer, n, float
    assert [e[0] for e in k.log] == ["triton", "direct"]


def test_triton_keeps_the_launch_where_the_fast_path_does_not_apply(fake_triton, monkeypatch):
    k = JITFunction()
    x = torch.zeros(64)
    for _ in range(2):
        triton_launch.launch(k, lambda meta: (4,), x, 4096, 0.5, BLOCK=128)  # a grid function
        triton_launch.launch(k, (4,), x, 4096, 0.5)  # BLOCK missing: Triton names it
    assert [e[0] for e in k.log] == ["triton"] * 4
    hooked = JITFunction()
    hooked.pre_run_hooks = [print]
    for _ in range(2):
        triton_launch.launch(hooked, (4,), x, 4096, 0.5, BLOCK=128)
    assert [e[0] for e in hooked.log] == ["triton", "triton"]
    monkeypatch.setattr(triton_launch, "ENABLED", False)  # KUBETUNE_FAST_LAUNCH=0
    off = JITFunction()
    for _ in range(2):
        triton_launch.launch(off, (4,), x, 4096, 0.5, BLOCK=128)
    assert [e[0] for e in off.log] == ["triton", "triton"]
