"""The `inferd` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

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
    _add_eval_parser(sub)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    serve.add_argument("--model", help="model directory (overrides the config's model)")
    serve.add_argument("--config", help="YAML config file (see runtime/README.md)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--device")
    serve.add_argument(
        "--tensor-parallel-size",
        type=int,
        help="GPUs to split the model over, one process each (overrides the config's tensor_parallel_size)",
    )
    serve.add_argument("--data-dir", help="where keys, the audit log and results live")
    spec = serve.add_argument_group(
        "speculative decoding", "these flags replace the config's `speculative` block (runtime/README.md)"
    )
    spec.add_argument("--speculative-method", choices=["ngram", "draft_model"], help="how drafts are made")
    spec.add_argument("--num-speculative-tokens", type=int, help="drafts verified per step (default 4)")
    spec.add_argument("--speculative-ngram-min", type=int, help="shortest n-gram prompt lookup matches (default 1)")
    spec.add_argument("--speculative-ngram-max", type=int, help="longest n-gram prompt lookup matches (default 4)")
    spec.add_argument("--speculative-draft-model", help="the draft model's directory (method draft_model)")
    spec.add_argument(
        "--speculative-adaptive",
        action=argparse.BooleanOptionalAction,
        help="pause speculation while it measures slower than plain decoding (default on)",
    )
    serve.add_argument(
        "--host-kv-cache-gb", type=float, help="pinned host memory for KV blocks the GPU evicts (overrides host_kv_cache_gb)"
    )
    serve.add_argument("--compile-cache-dir", help="where compiled kernels persist across restarts (overrides compile_cache_dir)")
    serve.add_argument(
        "--allow-unsigned",
        action="store_true",
        default=None,
        help="serve a model whose signature is not checked (only when no model_public_key_file is set)",
    )

    keys = sub.add_parser("keys", help="manage API keys (stored only as sha256 digests)")
    keys.add_argument("action", choices=["add", "revoke", "list"])
    keys.add_argument("--config", help="YAML config file naming the keys file (data_dir / keys_file)")
    keys.add_argument("--keys-file", help="the keys file, instead of --config")
    keys.add_argument("--name", help="a name for the key's holder (add, revoke)")
    keys.add_argument("--role", choices=["admin", "ops", "user"], help="the key's role (add)")
    keys.add_argument(
        "--priority",
        choices=["low", "normal", "high"],
        default="normal",
        help="the key's class under load: higher classes are scheduled first (add; default normal)",
    )
    keys.add_argument(
        "--tenant",
        default="",
        help="the key's tenant (add): keys of one tenant share prefix-cache entries and a fair share; "
        "default: the key is its own tenant",
    )

    pack = sub.add_parser(
        "pack",
        help="pack a model directory: chunked, zstd-compressed, AES-256-GCM encrypted, signed",
        description="Pack a Hugging Face model directory into the inferd store format. Every file is cut into "
        "chunks; each chunk is compressed and sealed on its own, so packing and loading take constant memory "
        "whatever the model size. The manifest lists every file with its size and sha256, and can be signed.",
        epilog="example: inferd keygen --out keys/ && inferd pack ./DeepSeek-R1-Distill-Llama-8B ./packed "
        "--compress zstd --encrypt --key-file keys/model.key --sign-key keys/signing.pem",
    )
    pack.add_argument("src", metavar="HF_DIR", help="the model directory to pack")
    pack.add_argument("out", metavar="OUT_DIR", help="the new packed directory (must not exist or be empty)")
    pack.add_argument("--compress", choices=["zstd", "none"], default="zstd", help="chunk compression (default zstd)")
    pack.add_argument(
        "--encrypt", action="store_true", help="encrypt with the master key (needs --key-file or $INFERD_MODEL_KEY_FILE)"
    )
    pack.add_argument("--key-file", help="file holding the 256-bit master key (from 'inferd keygen')")
    pack.add_argument("--sign-key", help="Ed25519 private key (PEM) that signs the manifest")
    pack.add_argument("--model-id", help="model id bound into every chunk (default: the directory name)")
    pack.add_argument("--model-version", default="1", help="version recorded in the manifest")
    pack.add_argument("--chunk-kib", type=int, default=8192, help="chunk size in KiB (default 8192: 8 MiB)")

    verify = sub.add_parser("verify", help="check a packed model: signature, chunks, and with the key every digest")
    verify.add_argument("dir", metavar="DIR")
    verify.add_argument("--key-file", help="master key: also decrypt and check every plaintext digest")
    verify.add_argument("--public-key", help="signer's Ed25519 public key (PEM): the manifest must be signed by it")
    verify.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="without --public-key, check only chunks and digests and still exit 0 (no signature is checked)",
    )

    unpack = sub.add_parser("unpack", help="write a packed model back to plain files (each renamed into place when verified)")
    unpack.add_argument("dir", metavar="DIR")
    unpack.add_argument("out", metavar="OUT")
    unpack.add_argument("--key-file", help="master key (if the model is encrypted)")
    unpack.add_argument("--public-key", help="signer's public key: refuse a manifest it did not sign")

    keygen = sub.add_parser("keygen", help="make a 256-bit master key (mode 0600) and an Ed25519 signing key pair")
    keygen.add_argument("--out", default=".", help="directory for model.key, signing.pem, signing.pub (default: .)")

    audit = sub.add_parser(
        "audit",
        help="check an audit log: every kept segment, with its key and against its anchor",
        description="Exit 0: intact (requests killed mid-way, disk-full outages and retention are listed, "
        "as the log explains them); 1: a record is altered or missing, or the log is shorter than its anchor; "
        "2: bad arguments or no key; 3: a v1 log (unkeyed: only checksums and the chain could be checked).",
    )
    audit.add_argument("action", choices=["verify"])
    audit.add_argument("file", nargs="?", help="the active audit log (default: the config's audit_file)")
    audit.add_argument("--config", help="the server's YAML config: the log, key and anchor it names")
    audit.add_argument("--key-file", help="the audit key (default: the config's audit_key_file)")
    audit.add_argument("--anchor-file", help="the anchor holding the log's head (default: the config's audit_anchor_file)")
    return parser


def _add_eval_parser(sub) -> None:
    from inferd.config import KV_CACHE_DTYPES, QUANTIZATIONS

    quantizations = ["none", *QUANTIZATIONS]
    ev = sub.add_parser(
        "eval",
        help="accuracy of a quantization: perplexity of a text file and agreement with the unquantized model",
        description="Perplexity of a text file (teacher-forced in windows of --max-model-len - 1 moved by "
        "--stride), and agreement with a reference run of the same model (default: unquantized, auto KV "
        "cache): top-1 teacher-forced, and greedy continuations of prompts cut from the text. JSON on "
        "stdout (or --out). Exit 2: bad arguments, an unreadable or too short text.",
        epilog="example: inferd eval ./SmolLM2 --text runtime/bench/data/eval.txt --quantization int8",
    )
    ev.add_argument("model", metavar="MODEL", help="model directory (Hugging Face or packed)")
    ev.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to score")
    ev.add_argument("--quantization", choices=quantizations, default="none")
    ev.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default="auto")
    ev.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: per device)")
    ev.add_argument("--reference-quantization", choices=quantizations, default="none")
    ev.add_argument("--reference-kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default="auto")
    ev.add_argument("--reference-dtype", default=None, help="default: --dtype")
    ev.add_argument("--no-reference", action="store_true", help="perplexity only: no reference run, no agreement")
    ev.add_argument("--device", default="cpu", help="cpu or cuda")
    ev.add_argument("--max-model-len", type=int, default=1024, help="context of each scoring window, plus one (default 1024)")
    ev.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: half the window)")
    ev.add_argument("--greedy-prompts", type=int, default=8, help="prompts cut from the text for greedy agreement (default 8)")
    ev.add_argument("--prompt-tokens", type=int, default=64, help="tokens per greedy prompt (default 64)")
    ev.add_argument("--greedy-tokens", type=int, default=64, help="greedy tokens generated per prompt (default 64)")
    ev.add_argument("--out", metavar="FILE", help="write the JSON here as well as to stdout")


def _eval(args) -> int:
    from inferd.eval import EvalSettings, run_eval

    def engine(quantization, kv_cache_dtype, dtype) -> dict:
        q = None if quantization == "none" else quantization
        return dict(device=args.device, dtype=dtype, quantization=q, kv_cache_dtype=kv_cache_dtype)

    settings = EvalSettings(
        max_model_len=args.max_model_len,
        stride=args.stride,
        greedy_prompts=args.greedy_prompts,
        prompt_tokens=args.prompt_tokens,
        greedy_tokens=args.greedy_tokens,
    )
    candidate = engine(args.quantization, args.kv_cache_dtype, args.dtype)
    reference = None
    if not args.no_reference:
        reference = engine(args.reference_quantization, args.reference_kv_cache_dtype, args.reference_dtype or args.dtype)
    result = run_eval(args.model, args.text, candidate, reference, settings)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


def _keys(args) -> int:
    from inferd.server.auth import KeyStore
    from inferd.server.config import load_config

    path = args.keys_file or load_config(args.config).keys_path
    store = KeyStore(path)
    store.require_valid()  # a corrupt file is named and never written over (main prints it, exit 2)
    if args.action == "list":
        for k in store.keys:
            print(f"{k.name}\t{k.role}\t{k.priority}\t{k.tenant or '-'}\t{'revoked' if k.revoked else 'active'}\t{k.key_id}")
        return 0
    if not args.name:
        print("inferd: error: --name is required", file=sys.stderr)
        return 2
    if args.action == "add":
        if not args.role:
            print("inferd: error: --role is required (admin, ops or user)", file=sys.stderr)
            return 2
        key = store.add(args.name, args.role, args.priority, args.tenant)
        print(key)
        print(f"# stored only as a sha256 digest in {path}: this is the only time the key is shown", file=sys.stderr)
        return 0
    store.revoke(args.name)
    print(f"revoked {args.name}", file=sys.stderr)
    return 0


def _store(args) -> int:
    import os
    import shutil
    from pathlib import Path

    from inferd.store import crypto
    from inferd.store.packed import PackedModel, pack

    progress = sys.stderr.isatty()
    if args.command == "keygen":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        private, public = crypto.new_signing_key()
        crypto.write_secret(out / "model.key", crypto.new_master_key().hex().encode())
        crypto.write_secret(out / "signing.pem", private)
        (out / "signing.pub").write_bytes(public)
        print(f"wrote {out / 'model.key'} (0600), {out / 'signing.pem'} (0600), {out / 'signing.pub'}")
        return 0
    public = Path(args.public_key).read_bytes() if getattr(args, "public_key", None) else None
    if args.command == "pack":
        master = crypto.read_master_key(args.key_file) if args.encrypt else None
        if args.key_file and not args.encrypt:
            print("inferd: error: --key-file given without --encrypt: add --encrypt, or drop the key", file=sys.stderr)
            return 2
        signing = Path(args.sign_key).read_bytes() if args.sign_key else None
        t = time.perf_counter()
        m = pack(
            args.src,
            args.out,
            model_id=args.model_id,
            model_version=args.model_version,
            compress=args.compress == "zstd",
            master=master,
            signing_key=signing,
            chunk_size=args.chunk_kib << 10,
            progress=progress,
        )
        plain = sum(f["size"] for f in m["files"])
        stored = sum(c["stored"] for f in m["files"] for c in f["chunks"])
        took = time.perf_counter() - t
        print(
            f"packed {len(m['files'])} files, {plain / 1e6:.1f} MB -> {stored / 1e6:.1f} MB "
            f"(ratio {plain / max(stored, 1):.3f}) in {took:.1f}s ({plain / 1e6 / max(took, 1e-9):.0f} MB/s)"
        )
        return 0
    encrypted = (
        json.loads((Path(args.dir) / "manifest.json").read_text()).get("encryption")
        if (Path(args.dir) / "manifest.json").exists()
        else None
    )
    master = crypto.read_master_key(args.key_file) if (args.key_file or (encrypted and args.command == "unpack")) else None
    pm = PackedModel(args.dir, master=master, public_key=public)
    t = time.perf_counter()
    if args.command == "verify":
        deep = master is not None or not encrypted
        n = pm.verify(deep=deep, progress=progress)
        what = "every plaintext digest checked" if deep else "chunks match the manifest (no key: plaintext not checked)"
        if public is None and not args.allow_unsigned:
            # Without the signer's key anyone's package, or a re-signed one, passes every other check.
            print(
                f"inferd: error: {args.dir}: {n} files, {what}, but NO signature checked: pass --public-key "
                "(the signer's signing.pub), or --allow-unsigned if an unchecked origin is acceptable",
                file=sys.stderr,
            )
            return 3
        sig = "signature verified" if pm.signed else "signature not checked (--allow-unsigned)"
        print(f"{args.dir}: OK: {n} files, {what}, {sig} ({time.perf_counter() - t:.1f}s)")
        return 0
    # The whole directory is staged beside OUT and renamed into place at the end: a file refused
    # half-way leaves no earlier file in plaintext under OUT.
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"inferd: error: {out} exists and is not an empty directory: unpack into a new one", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        pm.unpack(staging, progress=progress)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"unpacked {len(pm.files)} files into {out} ({time.perf_counter() - t:.1f}s)")
    return 0


def _audit(args) -> int:
    from pathlib import Path

    from inferd.server.audit_format import AuditVerifyError, OldFormatError, load_key, open_segment
    from inferd.server.audit_verify import verify

    cfg = None
    if args.config:
        from inferd.server.config import load_config

        cfg = load_config(args.config)
    log = Path(args.file or (cfg and cfg.audit_path) or "")
    key_file = args.key_file or (cfg and cfg.audit_key_path)
    anchor = args.anchor_file or (cfg and cfg.audit_anchor_path)
    if not str(log) or log == Path():
        print("inferd: error: name the log: FILE, or --config SERVER.yaml", file=sys.stderr)
        return 2
    try:
        os.close(open_segment(log)[0])
    except OldFormatError:
        return _audit_v1(log)
    except (OSError, AuditVerifyError):
        pass  # a missing active file (rotated segments only) or a damaged one: verify names it
    try:
        key = load_key(Path(key_file)) if key_file else None
    except AuditVerifyError as e:
        key, key_error = None, str(e)
    else:
        key_error = "name the log's key: --key-file KEY, or --config SERVER.yaml"
    if key is None:
        print(f"inferd: error: {key_error}", file=sys.stderr)
        return 2
    try:
        report = verify(log, key, anchor and Path(anchor))
    except AuditVerifyError as e:
        print(f"inferd: audit log {log} FAILED: {e}", file=sys.stderr)
        return 1
    for line in report.damage + report.interrupted + report.notes:
        print(f"  {line}")
    if not anchor:
        print("  no anchor checked (--anchor-file or --config): records cut off the end cannot be detected")
    torn = " (a torn last record from a crash was ignored)" if report.torn_tail else ""
    print(
        f"audit log {log}: {report.records} records in {len(report.segments)} segments, chain intact{torn}; "
        f"{len(report.interrupted)} requests interrupted"
        + (f"; {len(report.damage)} damaged segments moved aside (explained above)" if report.damage else "")
    )
    return 0


def _audit_v1(log) -> int:
    from inferd.server.audit_format import AuditVerifyError
    from inferd.server.audit_verify import scan_v1

    try:
        v1 = scan_v1(log)
    except AuditVerifyError as e:
        print(f"inferd: audit log {log} FAILED: {e}", file=sys.stderr)
        return 1
    print(f"audit log {log}: v1 format, {v1.records} records, chain intact as far as v1 can tell", file=sys.stderr)
    print("inferd: a v1 log has no key nor anchor: an edited last record or a cut-off end goes unseen", file=sys.stderr)
    return 3


def _speculative_flags(args) -> dict | None:
    """The --speculative-* flags as the config's `speculative` block; None when none is given."""
    given = {
        "method": args.speculative_method,
        "num_speculative_tokens": args.num_speculative_tokens,
        "ngram_min": args.speculative_ngram_min,
        "ngram_max": args.speculative_ngram_max,
        "draft_model": args.speculative_draft_model,
        "adaptive": args.speculative_adaptive,
    }
    given = {k: v for k, v in given.items() if v is not None}
    return given or None


def _serve(args) -> int:
    import uvicorn

    from inferd.server.app import create_app
    from inferd.server.config import load_config
    from inferd.server.logging import setup_json_logging

    cfg = load_config(
        args.config,
        model=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        tensor_parallel_size=args.tensor_parallel_size,
        data_dir=args.data_dir,
        host_kv_cache_gb=args.host_kv_cache_gb,
        compile_cache_dir=args.compile_cache_dir,
        model_allow_unsigned=args.allow_unsigned,
        speculative=_speculative_flags(args),
    )
    if not cfg.model:
        print("inferd: error: no model: pass --model DIR or set model: in the config", file=sys.stderr)
        return 2
    setup_json_logging()
    server: uvicorn.Server | None = None

    def stop(reason: str) -> None:
        # The start-up load failed or the engine died: shut down as on SIGTERM (listeners close,
        # in-flight requests end, the audit is flushed), then exit 1 for systemd to restart us.
        server.should_exit = True

    app = create_app(cfg, on_fatal=stop)
    server = uvicorn.Server(
        uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None, timeout_graceful_shutdown=int(cfg.shutdown_timeout_s))
    )
    server.run()
    if not server.started:
        return 3  # the application failed to start (uvicorn exits 1 by itself for a port already taken)
    state = getattr(app.state, "inferd", None)
    return 1 if state is not None and state.fatal else 0


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
        if args.command == "eval":
            return _eval(args)
        if args.command == "serve":
            return _serve(args)
        if args.command in ("pack", "verify", "unpack", "keygen"):
            return _store(args)
    except (OSError, ValueError) as e:
        print(f"inferd: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
