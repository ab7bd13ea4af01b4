"""A results disk that fails mid-service: the caller still gets the answer, the audit record says
it was not stored, and the metrics that alert say so (issue 24: a plain 500 after the audit log
had recorded 200, and the answer lost)."""

from __future__ import annotations

import time

from inferd.server import metric_names as n


class FullDisk:
    """The store's database, failing every write as RocksDB does on a full disk. (ResultStore's
    own test fills a real disk; RocksDB's preallocated log makes the moment a real disk starts to
    fail too unpredictable for a test of the request path.)"""

    def __init__(self, db):
        self.db = db

    def write(self, *args, **kw):
        raise Exception("IO error: No space left on device: While appending to file: results/000004.log")

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_a_full_results_disk_still_returns_the_answer(llama_dir, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    import inferd.server.results as results_module
    from inferd.server.app import create_app
    from inferd.server.audit import read_records
    from inferd.server.auth import KeyStore
    from inferd.server.config import ServerConfig

    cfg = ServerConfig(
        model=str(llama_dir),
        served_model_name="tiny",
        data_dir=str(tmp_path / "data"),
        model_allow_unsigned=True,
        max_model_len=128,
    )
    user = {"Authorization": f"Bearer {KeyStore(cfg.keys_path).add('alice', 'user')}"}
    ops = {"Authorization": f"Bearer {KeyStore(cfg.keys_path).add('olivia', 'ops')}"}
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}
    with TestClient(create_app(cfg)) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        stored = client.post("/v1/completions", json=body, headers=user)
        assert stored.status_code == 200
        client.app.state.inferd.results.db = FullDisk(client.app.state.inferd.results.db)
        # The disk stays full when the store reopens after a failed write (at most every REOPEN_S: a
        # slow run reaches it between the two requests below).
        opened = results_module.Rdict
        monkeypatch.setattr(results_module, "Rdict", lambda *a, **kw: FullDisk(opened(*a, **kw)))
        for stream in (False, True):
            r = client.post("/v1/completions", json=body | {"stream": stream}, headers=user)
            assert r.status_code == 200, r.text
            assert ("data: [DONE]" in r.text) if stream else r.json()["choices"][0]["text"] is not None
        metrics = client.get("/metrics", headers=ops).text
        assert f"{n.RESULTS_STORE_DEGRADED} 1.0" in metrics
        errors = next(line for line in metrics.splitlines() if line.startswith(n.RESULTS_STORE_ERRORS))
        assert float(errors.split()[-1]) >= 2
        assert client.get(f"/v1/results/{stored.json()['id']}", headers=user).status_code == 200  # earlier ones still served
    records = read_records(cfg.audit_path)
    completions = {r["request_id"] for r in records if r.get("kind") == "begin" and r.get("route") == "/v1/completions"}
    served = [r for r in records if r.get("kind") == "end" and r["request_id"] in completions and r["status"] == 200]
    assert [r["result_stored"] for r in served] == [True, False, False]
