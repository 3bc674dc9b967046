"""The fake server as its own process stops when its parent goes away."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_exits_when_its_stdin_closes() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLING_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "kling_async.testing", "--port", "0", "--exit-with-stdin"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    assert json.loads(process.stdout.readline())["url"].startswith("http://127.0.0.1:")
    process.stdin.close()  # what the kernel does when the parent is killed
    assert process.wait(timeout=10) == 0
    process.stdout.close()
