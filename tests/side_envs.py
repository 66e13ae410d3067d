"""Test-only tools that cannot share the project's environment, each in a virtual
environment of its own under ``KAPPAMASK_TEST_TOOLS`` (default ~/.cache/kappamask-tests):
Label Studio and datumaro need numpy 2, the bundled tritonserver numpy < 2.

The tests create them on first use (``side_env``); .ci/run runs this file beforehand, in
the background, while the project installs. Standard library only.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

#: name -> pinned requirements
SIDE_ENVS = {
    "label-studio": ["label-studio==1.23.2"],
    "datumaro": ["datumaro==1.13.12"],
}


def tools_root() -> Path:
    return Path(os.environ.get("KAPPAMASK_TEST_TOOLS", Path.home() / ".cache" / "kappamask-tests"))


def side_env(name: str) -> Path:
    """The ``bin`` folder of side environment ``name``, installed if it is not yet (one
    installer at a time: a file lock)."""
    requirements = SIDE_ENVS[name]
    root = tools_root() / name
    marker = root / "kappamask-requirements.txt"
    wanted = "\n".join(requirements)
    root.parent.mkdir(parents=True, exist_ok=True)
    with (root.parent / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (marker.exists() and marker.read_text() == wanted):
            python = os.environ.get("KAPPAMASK_SIDE_PYTHON", "python3.11")
            subprocess.run([python, "-m", "venv", "--clear", str(root)], check=True)
            pip = [str(root / "bin" / "pip"), "install", "-q", *requirements]
            done = subprocess.run(pip, capture_output=True, text=True, timeout=1800, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"pip install {requirements} failed:\n{done.stderr[-3000:]}")
            marker.write_text(wanted)
    return root / "bin"


if __name__ == "__main__":
    for env in sys.argv[1:] or SIDE_ENVS:
        print(side_env(env))
