"""The server never imports torch or onnx (only numpy, onnxruntime, grpc, protobuf, prometheus)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_every_server_module_pulls_in_neither_torch_nor_onnx():
    code = (
        "import sys\n"
        "import server.app, server.batch, server.cli, server.client, server.dataplane\n"
        "import server.errors, server.metrics, server.runtime, server.sampling\n"
        "import server.engine, server.servicer, server.sessions, server.settings\n"
        "import server.frontend, server.engine_host, server.supervisor, server.ipc\n"
        "import contract.model, contract.text, contract.repository, contract.files\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "", f"server imported: {out.stdout.strip()}"
