"""The command-line tools the deploy tests run (kubectl, promtool, prometheus, openssl), installed with apt-get
when missing."""

from __future__ import annotations

import shutil
import subprocess

# Debian packages that ship each tool (ENVIRONMENT.md): kubectl renders kustomize offline; prometheus has promtool.
PACKAGES = {"kubectl": "kubectl", "promtool": "prometheus", "prometheus": "prometheus", "openssl": "openssl"}


def tool(name: str) -> str:
    """The path of `name`, installing its Debian package first on a fresh machine (needs root, as CI has)."""
    found = shutil.which(name)
    if found is None:
        package = PACKAGES[name]
        for command in (["apt-get", "install", "-y", package], ["apt-get", "update"], ["apt-get", "install", "-y", package]):
            result = subprocess.run(command, capture_output=True, text=True)
            if command[1] == "install" and result.returncode == 0:
                break
        found = shutil.which(name)
    assert found, f"{name} is missing and `apt-get install -y {PACKAGES[name]}` did not provide it: install it by hand"
    return found


def run(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([tool(name), *args], capture_output=True, text=True, timeout=timeout)
