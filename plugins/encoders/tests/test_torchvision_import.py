"""torchvision imported without torch._dynamo (hica_bench_encoders.torchvision_import), in a fresh interpreter: the
compiler stack stays out until something asks for it, roi_align's check (the one name torchvision binds from it at
import) answers as the real one, and torch.compile works afterwards; a torchvision that needs more of torch._dynamo
while importing gets it, imported plainly."""

from __future__ import annotations

import json
import subprocess
import sys

CHECKS = """
import json, sys
from hica_bench_encoders.openclip_encoders import import_open_clip
import_open_clip()  # open_clip imports torchvision through it
out = {"after_import": "torch._dynamo" in sys.modules}
import torch, torchvision
from torchvision.ops import roi_align
ramp = torch.arange(8.0).repeat(8, 1)[None, None]  # value = x
pooled = roi_align(ramp, [torch.tensor([[1.0, 0.0, 5.0, 4.0]])], output_size=1, aligned=True)
out["roi_align"] = pooled.item()  # the box's mean x, 3 - 0.5 (aligned: pixel centres at +0.5)
out["after_use"] = "torch._dynamo" in sys.modules
stand_in = sys.modules["torchvision.ops.roi_align"].is_compile_supported("cpu")
import torch._dynamo.utils
out["is_compile_supported"] = [stand_in, torch._dynamo.utils.is_compile_supported("cpu")]
out["dynamo_is_real"] = torch._dynamo.__file__.endswith("__init__.py") and hasattr(torch._dynamo, "optimize")
compiled = torch.compile(lambda x: x * 2 + 1, backend="eager")
out["compiled"] = compiled(torch.ones(4)).tolist()
from torchvision import tv_tensors  # imports the real compiler itself (torch.compiler.disable)
like = tv_tensors.Image(torch.zeros(1, 4, 4))
out["wrap"] = type(tv_tensors.wrap(torch.ones(1, 4, 4), like=like)).__name__
print(json.dumps(out))
"""


def test_torchvision_without_dynamo_until_asked():
    run = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["after_import"] is False and out["after_use"] is False
    assert out["roi_align"] == 2.5
    assert out["is_compile_supported"][0] == out["is_compile_supported"][1]
    assert out["dynamo_is_real"] is True
    assert out["compiled"] == [3.0] * 4 and out["wrap"] == "Image"


#: torchvision as a version that imports a submodule of torch._dynamo while it is imported would be: a finder that
#: does so before torchvision.ops.roi_align is found (it fails beside the placeholders, then works)
NEEDS_MORE = """
import json, sys
attempts = []

class NeedsConfig:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision.ops.roi_align":
            try:
                import torch._dynamo.config
                attempts.append("ok")
            except ImportError as exc:
                attempts.append(type(exc).__name__)
                raise
        return None

sys.meta_path.insert(0, NeedsConfig())
from hica_bench_encoders.torchvision_import import import_torchvision
import torch
torchvision = import_torchvision()
from torchvision.ops import roi_align
ramp = torch.arange(8.0).repeat(8, 1)[None, None]
value = roi_align(ramp, [torch.tensor([[1.0, 0.0, 5.0, 4.0]])], output_size=1, aligned=True).item()
dynamo = sys.modules["torch._dynamo"]
print(json.dumps({"attempts": attempts, "roi_align": value, "real": getattr(dynamo, "__file__", None) is not None
                  and sys.modules["torch._dynamo.utils"].__file__.endswith("utils.py"),
                  "stand_in_gone": sys.modules["torchvision.ops.roi_align"].is_compile_supported.__module__}))
"""


def test_a_torchvision_needing_more_of_the_compiler_is_imported_plainly():
    run = subprocess.run([sys.executable, "-c", NEEDS_MORE], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["attempts"] == ["ModuleNotFoundError", "ok"]  # beside the placeholders, then plainly
    assert out["roi_align"] == 2.5 and out["real"] is True
    assert out["stand_in_gone"] == "torch._dynamo.utils"  # roi_align holds the real function, not the stand-in
