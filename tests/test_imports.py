"""Pure torch/diffusers modules stay importable without Ray (a bare GPU box, a notebook, a unit test)."""

import subprocess
import sys

PURE = (
    "realfake_ray.losses", "realfake_ray.guidance", "realfake_ray.prompts", "realfake_ray.sampler",
    "realfake_ray.classifier", "realfake_ray.metrics", "realfake_ray.plots", "realfake_ray.flops",
    "realfake_ray.seeds", "realfake_ray.lora", "realfake_ray.models.tiny", "realfake_ray.models.pretrain",
    "realfake_ray.models.base_quality", "realfake_ray.data.corpus", "realfake_ray.data.imagefolder",
    "realfake_ray.accelerators", "realfake_ray.tuning", "realfake_ray._internal.faults", "realfake_ray.privacy",
    "realfake_ray.quick_classifier", "realfake_ray.layout", "realfake_ray.bank", "realfake_ray.embeddings",
    "realfake_ray.devices", "realfake_ray.bench", "realfake_ray.classifier_data", "realfake_ray.storage",
    "realfake_ray.config", "realfake_ray._internal.trainer", "realfake_ray._internal.checkpoints",
    "realfake_ray.generate_plan", "realfake_ray.synthesis", "realfake_ray.finetune_step", "realfake_ray.finetune_plan",
)


def test_pure_modules_do_not_import_ray():
    code = "import sys\n" + "".join(
        f"import {m}\nassert 'ray' not in sys.modules, '{m} imported ray'\n" for m in PURE
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
