"""Durable result retrieval: every completed response, kept for a retention period in an embedded
RocksDB (rocksdict), readable only by the key that made it."""

from __future__ import annotations

import json
import time

from rocksdict import Rdict


class ResultStore:
    def __init__(self, path: str, retention_s: float):
        self.db = Rdict(path)
        self.retention_s = retention_s
        self.purge()

    def put(self, result_id: str, owner: str, response: dict) -> None:
        self.db[result_id] = json.dumps({"owner": owner, "created": time.time(), "response": response})

    def get(self, result_id: str, owner: str) -> dict | None:
        raw = self.db.get(result_id)
        if raw is None:
            return None
        entry = json.loads(raw)
        if time.time() - entry["created"] > self.retention_s:
            del self.db[result_id]
            return None
        return entry["response"] if entry["owner"] == owner else None

    def purge(self) -> int:
        now, stale = time.time(), []
        for key, raw in self.db.items():
            if now - json.loads(raw)["created"] > self.retention_s:
                stale.append(key)
        for key in stale:
            del self.db[key]
        return len(stale)

    def close(self) -> None:
        self.db.close()
