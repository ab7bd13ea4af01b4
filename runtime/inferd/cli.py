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
    return parser


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
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
