"""trainer/lazy_compile.py: bitsandbytes imported without TorchInductor, and
torch.compile's behaviour unchanged apart from when its wrapper is built."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from kubetune.trainer.lazy_compile import deferred


def test_a_function_is_compiled_on_its_first_call_only():
    built = []

    def real(fn, **kwargs):
        built.append((fn.__name__, kwargs))
        return lambda *a, **k: ("compiled", fn(*a, **k))

    compile_later = deferred(real)

    def square(x):
        return x * x

    fast = compile_later(square, dynamic=False)
    assert built == [] and fast.__name__ == "square"
    assert fast(3) == ("compiled", 9) and fast(4) == ("compiled", 16)
    assert built == [("square", {"dynamic": False})]

    @compile_later(fullgraph=True)  # the decorator form with arguments
    def cube(x):
        return x ** 3

    assert cube(2) == ("compiled", 8) and built[-1] == ("cube", {"fullgraph": True})


def test_anything_but_a_plain_function_goes_to_torch_compile_at_once():
    seen = []
    compile_later = deferred(lambda m, **k: seen.append(m) or "wrapped")

    class Model:
        def forward(self, x):
            return x

    m = Model()
    assert compile_later(m) == "wrapped" and compile_later(m.forward) == "wrapped"
    assert seen == [m, m.forward]


def test_bitsandbytes_imports_without_inductor_and_torch_compile_is_restored():
    script = textwrap.dedent("""
        import sys
        import torch
        real = torch.compile
        from kubetune.trainer.lazy_compile import import_bitsandbytes
        assert import_bitsandbytes() is True
        assert "bitsandbytes" in sys.modules
        assert "torch._inductor.compile_fx" not in sys.modules, "inductor imported"
        assert torch.compile is real
        assert import_bitsandbytes() is False  # once
        import peft  # what imported bitsandbytes before: it finds it imported
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
