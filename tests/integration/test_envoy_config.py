"""The rendered edge config is accepted by the real Envoy binary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from control.envoy_config import EdgeConfig, envoy_command, render


def test_envoy_validates_rendered_config(tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(
        render(EdgeConfig(listen_port=18080, admin_port=19901, gateways=(("127.0.0.1", 1), ("127.0.0.1", 2))))
    )
    envoy = str(Path(sys.executable).parent / "envoy")
    argv = [envoy, *envoy_command(config)[1:], "--mode", "validate"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr
