"""The `inferd` command line."""

from __future__ import annotations

import argparse
import sys

from inferd import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferd",
        description="DeepSeek inference runtime: generate text from a Hugging Face model directory.",
    )
    parser.add_argument("--version", action="version", version=f"inferd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate a completion for one prompt (offline, no server)")
    gen.add_argument("--model", required=True, help="Hugging Face model directory (config.json, *.safetensors)")
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--device", default="cpu", help="cpu or cuda")
    gen.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: per device)")
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("--model", help="model directory (overrides the config's model)")
    serve.add_argument("--config", help="YAML config file (see runtime/README.md)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--device")
    serve.add_argument("--data-dir", help="where keys, the audit log and results live")

    keys = sub.add_parser("keys", help="manage API keys (stored only as sha256 digests)")
    keys.add_argument("action", choices=["add", "revoke", "list"])
    keys.add_argument("--config", help="YAML config file naming the keys file (data_dir / keys_file)")
    keys.add_argument("--keys-file", help="the keys file, instead of --config")
    keys.add_argument("--name", help="a name for the key's holder (add, revoke)")
    keys.add_argument("--role", choices=["admin", "ops", "user"], help="the key's role (add)")

    audit = sub.add_parser("audit", help="check an audit log")
    audit.add_argument("action", choices=["verify"])
    audit.add_argument("file", help="the audit log file")
    return parser


def _keys(args) -> int:
    from inferd.server.auth import KeyStore
    from inferd.server.config import load_config

    path = args.keys_file or load_config(args.config).keys_path
    store = KeyStore(path)
    if args.action == "list":
        for k in store.keys:
            print(f"{k.name}\t{k.role}\t{'revoked' if k.revoked else 'active'}\t{k.key_id}")
        return 0
    if not args.name:
        print("inferd: error: --name is required", file=sys.stderr)
        return 2
    if args.action == "add":
        if not args.role:
            print("inferd: error: --role is required (admin, ops or user)", file=sys.stderr)
            return 2
        key = store.add(args.name, args.role)
        print(key)
        print(f"# stored only as a sha256 digest in {path}: this is the only time the key is shown", file=sys.stderr)
        return 0
    store.revoke(args.name)
    print(f"revoked {args.name}", file=sys.stderr)
    return 0


def _audit(args) -> int:
    from inferd.server.audit import AuditVerifyError, scan

    try:
        result = scan(args.file)
    except AuditVerifyError as e:
        print(f"inferd: audit log {args.file} FAILED: {e}", file=sys.stderr)
        return 1
    torn = " (a torn last record from a crash was ignored)" if result.torn_tail else ""
    print(f"audit log {args.file}: {result.records} records, chain intact{torn}")
    return 0


def _serve(args) -> int:
    import uvicorn

    from inferd.server.app import create_app
    from inferd.server.config import load_config
    from inferd.server.logging import setup_json_logging

    cfg = load_config(args.config, model=args.model, host=args.host, port=args.port, device=args.device, data_dir=args.data_dir)
    if not cfg.model:
        print("inferd: error: no model: pass --model DIR or set model: in the config", file=sys.stderr)
        return 2
    setup_json_logging()
    app = create_app(cfg)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=None, timeout_graceful_shutdown=int(cfg.shutdown_timeout_s))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "generate":
        from inferd import LLM, SamplingParams

        try:
            params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
            llm = LLM(args.model, device=args.device, dtype=args.dtype)
            out = llm.generate([args.prompt], params)
        except (OSError, ValueError, RuntimeError) as e:
            print(f"inferd: error: {e}", file=sys.stderr)
            return 2
        print(out[0].text)
        return 0
    try:
        if args.command == "keys":
            return _keys(args)
        if args.command == "audit":
            return _audit(args)
        if args.command == "serve":
            return _serve(args)
    except (OSError, ValueError) as e:
        print(f"inferd: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
