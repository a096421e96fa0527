"""The admin API's generated modules are what grpcio-tools makes of protos/ today."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
GENERATED = ROOT / "src" / "authz_service" / "admin" / "v1"


def test_the_generated_modules_are_up_to_date(tmp_path: Path) -> None:
    """Run scripts/protos into a scratch directory: the committed files must match."""
    subprocess.run(
        [str(ROOT / "scripts" / "protos"), str(tmp_path)],
        check=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    fresh = tmp_path / "authz_service" / "admin" / "v1"
    names = ["admin_pb2.py", "admin_pb2.pyi", "admin_pb2_grpc.py"]
    for name in names:
        assert (fresh / name).read_text() == (GENERATED / name).read_text(), (
            f"{name} is stale: run scripts/protos"
        )
