"""The gateway as its deployments run it: one command in its own process, stopped by SIGTERM.

Also drives `client play`, which writes the frames and a GIF.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from PIL import Image

from tests.services.helpers import MODEL_NAME, encoded, free_port, picture, wait_serving

pytestmark = pytest.mark.integration


def test_serve_gateway_command_serves_client_play_and_stops_on_sigterm(world_checkpoint, tmp_path):
    """With an API key from a secret file on both sides; the key never reaches the gateway's log."""
    port, metrics_port = free_port(), free_port()
    key = "process-test-key-8d1c4f"
    (tmp_path / "gateway-keys").write_text(f"tester {key}\n")
    (tmp_path / "client-key").write_text(key)
    env = os.environ | {"GENIE_GATEWAY_HOST": "127.0.0.1", "GENIE_GATEWAY_METRICS_PORT": str(metrics_port),
                        "GENIE_GATEWAY_AUTH": "api-key", "GENIE_GATEWAY_API_KEYS_FILE": str(tmp_path / "gateway-keys")}
    server = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "gateway", "--port", str(port),
                               "--model", f"{MODEL_NAME}={world_checkpoint}"], env=env, stderr=subprocess.PIPE)
    try:
        wait_serving(port)
        image = tmp_path / "prompt.jpg"
        image.write_bytes(encoded(picture(120, 90), "JPEG"))
        result = subprocess.run([sys.executable, "-m", "services.cli", "client", "play", "--address",
                                 f"127.0.0.1:{port}", "--image", str(image), "--actions", "0,1,2",
                                 "--api-key-file", str(tmp_path / "client-key"),
                                 "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["frames"] == 4
        assert Image.open(tmp_path / "out" / "play.gif").n_frames == 4
        assert Image.open(tmp_path / "out" / "frame_003.png").size == (32, 32)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    stderr = server.stderr.read().decode()
    assert key not in stderr
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert {"gateway serving", "gateway stopped"} <= {entry["message"] for entry in logs}
