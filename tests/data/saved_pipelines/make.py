"""Writes the tiny saved pipelines of ``tests/test_saved_pipelines.py``: every diffusion pipeline built from its test
class's ``get_dummy_components()`` and ``save_pretrained`` into ``<version>/<class name>/``. What the test protects is
the folder's layout (``model_index.json``, subfolders, configs, weight names and shapes), not the values: the floating
point weights are zeroed and stored in fp16, so git stores them in almost nothing. Run once per release whose folders
we promise to keep loading (never rewrite an existing version's folders):

    .venv/bin/python tests/data/saved_pipelines/make.py 0.1.0
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for the test modules' tiny builders

#: (test module, test class): the class's pipeline_class and get_dummy_components()
CASES = [
    ("test_pipeline_sr3", "TestSR3Pipeline"),
    ("test_pipeline_srdiff", "TestSRDiffPipeline"),
    ("test_pipeline_ldm_sr", "TestLDMSRPipeline"),
    ("test_pipeline_resshift", "TestResShiftLatentSpace"),
    ("test_pipeline_stablesr", "TestStableSRPipeline"),
    ("test_pipeline_pasd", "TestPASDPipeline"),
    ("test_pipeline_seesr", "TestSeeSRPipeline"),
]


def main(version: str) -> None:
    out = HERE / version
    if out.exists():
        raise SystemExit(f"{out} exists: a released version's folders are never rewritten")
    for module, name in CASES:
        tester = getattr(importlib.import_module(module), name)()
        pipe = tester.pipeline_class(**tester.get_dummy_components())
        with torch.no_grad():
            for component in pipe.components.values():
                if isinstance(component, torch.nn.Module):
                    for tensor in [*component.parameters(), *component.buffers()]:
                        if tensor.is_floating_point():
                            tensor.zero_()
        pipe.to(dtype=torch.float16)
        pipe.save_pretrained(out / tester.pipeline_class.__name__)
        print(f"wrote {out / tester.pipeline_class.__name__}")


if __name__ == "__main__":
    main(sys.argv[1])
