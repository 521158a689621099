"""ditopt creates its tensors on the model's device: the runtime of every method runs a model whose weights and
inputs live on the meta device (not the process default), and any op that makes a tensor elsewhere fails the
test.  The host reads a decision needs (the timestep, a metric) cannot read meta tensors: the guard answers
them (the loop's timestep; a metric of 0, which the forced codebook skips on)."""

from __future__ import annotations

import sys
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ditopt.runtime as runtime
from ditopt.harness import models

STEPS = 6


class MetaGuard(TorchDispatchMode):
    """Records every op that makes a tensor off the meta device; answers host reads of meta tensors."""

    def __init__(self):
        super().__init__()
        self.t = 999.0
        self.offenders: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            asker = {f.name for f in traceback.extract_stack(sys._getframe(1), limit=12)}
            return self.t if "read_timestep" in asker else 0.0
        target = (kwargs or {}).get("device")
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "meta" and target is not None \
                and torch.device(target).type == "cpu":  # a host read of several values (a decision's metric sums)
            return torch.zeros(args[0].shape, dtype=(kwargs or {}).get("dtype") or args[0].dtype)
        out = func(*args, **(kwargs or {}))
        if any(isinstance(a, torch.Generator) for a in tree_flatten((args, kwargs))[0]):
            return out  # a draw from a seeded CPU generator (the same numbers on every device), moved at once
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                where = [f"{f.filename.split('/')[-2]}/{f.filename.split('/')[-1]}:{f.lineno}"
                         for f in traceback.extract_stack(limit=14) if "ditopt" in f.filename or "/passes/" in f.filename]
                self.offenders.append(f"{func} -> {value.device} at {where[-3:]}")
        return out


OPTIONS = {
    "lossless": {"preset": "lossless"},
    "adacache": {"preset": "fast", "adacache": {"codebook": {1e9: 3}}},
    "teacache": {"preset": "lossless", "teacache": {"threshold": 1e9}},
    "toca": {"preset": "lossless", "toca": {"interval": 3}},
    "asymrnr": {"preset": "lossless", "asymrnr": True},
}


@pytest.mark.parametrize("method", list(OPTIONS))
def test_every_method_keeps_its_tensors_on_the_model_device(method, monkeypatch):
    case = models.build("wan")
    model = case.model.to("meta")
    inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in case.inputs().items()}
    guard = MetaGuard()
    forward = runtime.Runtime._forward

    def guarded(self, *args):
        with guard:
            return forward(self, *args)

    monkeypatch.setattr(runtime.Runtime, "_forward", guarded)
    torch._dynamo.reset()
    fn = torch.compile(model, backend="ditopt", options={"lowering": "eager", **OPTIONS[method]})
    with torch.no_grad():
        for t in torch.linspace(999, 0, STEPS).tolist():
            guard.t = t
            out = models.call(fn, {**inputs, "timestep": torch.full(inputs["timestep"].shape, t, device="meta")})
    assert out.device.type == "meta"
    import ditopt

    s = ditopt.stats(model)
    assert s["fallbacks"] == [], s["fallbacks"]
    assert not guard.offenders, "\n".join(dict.fromkeys(guard.offenders))
    if method in ("adacache", "teacache"):
        assert s["generations"][-1]["blocks_skipped"] > 0
