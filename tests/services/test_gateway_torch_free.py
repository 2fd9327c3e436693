"""The gateway with the `triton` backend loads no torch (issue 10): its image carries none.

A fresh interpreter imports what `genie serve gateway --backend triton` runs; the full serving path without
torch (start-up, prompts, steps, new versions) runs in test_model_versions.py, with torch made unimportable.
"""

from __future__ import annotations

import subprocess
import sys

GATEWAY_MODULES = ("genie_models.cli", "services.cli", "services.gateway.server", "services.backends.triton",
                   "services.stores.catalog", "services.stores.s3", "services.worldstore.redis_store")


def test_gateway_with_the_triton_backend_imports_no_torch():
    code = (f"import importlib, sys\nfor name in {GATEWAY_MODULES!r}:\n    importlib.import_module(name)\n"
            "from services import registry\nregistry.get('backends', 'triton')\n"
            "print(sorted(name for name in sys.modules if name == 'torch' or name.startswith('torch.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"torch was imported: {result.stdout[:300]}"

