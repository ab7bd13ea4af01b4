"""Structured JSON logs, one object per line."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from inferd.server.auth import KEY_PREFIX

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


# Query parameters whose values the access log keeps when they are plain numbers; every other value
# is redacted, since a client may put a key in any of them (issue 24: `?api_key=sk-...` was logged in
# clear).
LOGGED_QUERY_PARAMS = frozenset({"limit"})
REDACTED = "[redacted]"
_KEY = re.compile(re.escape(KEY_PREFIX) + r"[^/?&=;]*")


def redact_target(target: str) -> str:
    """A request target safe to log: key-like path segments and query values redacted."""
    path, sep, query = target.partition("?")
    path = _KEY.sub(REDACTED, path)
    if not sep:
        return path
    params = []
    for param in query.split("&"):
        name, eq, value = param.partition("=")
        name = _KEY.sub(REDACTED, name)
        if name in LOGGED_QUERY_PARAMS and value.isdigit():
            params.append(param)
        else:  # a bare `?sk-...` has only a name
            params.append(f"{name}={REDACTED}" if eq else REDACTED)
    return f"{path}?{'&'.join(params)}"


class RedactAccessLog(logging.Filter):
    """uvicorn's access record: args (client, method, target, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, target, version, status = record.args
            record.args = (client, method, redact_target(str(target)), version, status)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_json_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactAccessLog) for f in access.filters):
        access.addFilter(RedactAccessLog())
