"""Finding a running ``rag serve`` (the start itself is tested with the real runtime:
tests/test_runtime_real.py)."""

from __future__ import annotations

import json
import os

from rag.config import Settings
from rag.launcher import find_running, state_path


def test_find_running_ignores_dead_or_silent_servers(settings: Settings) -> None:
    assert find_running(settings.data_dir) is None
    settings.data_dir.mkdir(parents=True)
    state_path(settings.data_dir).write_text(json.dumps({"pid": 2**22 + 12345, "url": "http://127.0.0.1:9/v1"}))
    assert find_running(settings.data_dir) is None
    state_path(settings.data_dir).write_text(json.dumps({"pid": os.getpid(), "url": "http://127.0.0.1:9/v1"}))
    assert find_running(settings.data_dir) is None
    state_path(settings.data_dir).write_text("{broken")
    assert find_running(settings.data_dir) is None
