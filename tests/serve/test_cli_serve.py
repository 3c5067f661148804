"""``mmembed serve`` as a process (API key from the environment), ``mmembed index build / search``, and the
serving path's imports (no deepspeed, no training code, no torch.distributed of mmembed's own)."""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import mmembed
from mmembed.cli import build_parser, main
from tests.conftest import ROOT
from tests.serve.conftest import client, data_url, png_bytes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command(model_dir, model, tmp_path) -> None:
    port = _free_port()
    env = {**os.environ, "MMEMBED_API_KEY": "env-key", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mmembed.cli", "serve", str(model_dir), "--port", str(port)]
    cmd += ["--served-model-name", "served", "--batch-window-ms", "0", "--torch-threads", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "x"}).status_code == 401
        c = client(url, "env-key")
        assert [m.id for m in c.models.list().data] == ["served"]
        raw = png_bytes(4)
        r = c.embeddings.create(model="served", input=[{"text": "a photo", "image": data_url(raw)}, "text"])
        want = model.encode(texts=["a photo", "text"], images=[raw, None])
        np.testing.assert_allclose([d.embedding for d in r.data], want, atol=1e-5, rtol=0)
        c.close()  # no keep-alive connection left for the shutdown to wait on
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"model 'served' on http://127.0.0.1:{port}/v1" in out


def test_serve_help_names_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for opt in ("--index", "--host", "--port", "--api-key", "--batch-window-ms", "--max-batch", "--max-queue"):
        assert opt in text
    for opt in ("--max-request-bytes", "--timeout-s", "--served-model-name", "127.0.0.1", "MMEMBED_API_KEY"):
        assert opt in text


def test_index_build_and_search_commands(model_dir, model, tmp_path, capsys) -> None:
    (tmp_path / "a.png").write_bytes(png_bytes(7))
    rows = [{"id": "r1", "text": "a red circle"}, {"id": "r2", "text": "a blue square"}, {"id": 3, "image": "a.png"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    idx = tmp_path / "idx"
    args = ["index", "build", str(model_dir), "--input", str(tmp_path / "rows.jsonl"), "--index", str(idx)]
    assert main(args) == 0
    assert "indexed 3 rows" in capsys.readouterr().err
    assert main(args) == 2 and "overwrite" in capsys.readouterr().err  # never replaced silently
    assert main(["index", "search", str(idx), "--text", "a blue square", "-k", "2", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    q = model.encode(texts=["a blue square"])
    docs = model.encode(texts=["a red circle", "a blue square", None], images=[None, None, png_bytes(7)])
    order = np.argsort(-(docs @ q[0]))[:2]
    assert [h["id"] for h in hits] == [["r1", "r2", 3][i] for i in order]
    np.testing.assert_allclose([h["score"] for h in hits], (docs @ q[0])[order], atol=1e-5)
    assert main(["index", "search", str(idx), "--image", str(tmp_path / "a.png"), "-k", "1"]) == 0
    assert "  3  " in capsys.readouterr().out  # the image finds itself
    assert main(["index", "search", str(idx)]) == 2 and "--text" in capsys.readouterr().err


def test_the_serving_path_imports_no_training_code(model_dir) -> None:
    """The serve modules import neither deepspeed nor torch.distributed (nor mmembed.dist / mmembed.train), and
    serving a request does not load deepspeed."""
    banned = ("deepspeed", "torch.distributed", "mmembed.dist", "mmembed.train")
    for path in (Path(mmembed.__file__).parent / "serve").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not [n for n in names if n.startswith(banned)], f"{path.name} imports {names}"
    code = (
        "import sys, torch, mmembed\n"
        "from fastapi.testclient import TestClient\n"
        "from mmembed.serve import create_app\n"
        f"m = mmembed.load({str(model_dir)!r})\n"
        "with TestClient(create_app(m)) as c:\n"
        "    assert c.post('/v1/embeddings', json={'input': 'x'}).status_code == 200\n"
        "print(sorted(k for k in sys.modules if k.startswith(('deepspeed', 'mmembed.train'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
