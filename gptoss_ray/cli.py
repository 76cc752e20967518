"""`gptoss-ray` command line: one subcommand per job, each defined beside the code it runs.

Each subcommand module offers `add_arguments(parser)` and `run(args) -> int`; it is
imported only when chosen, so `gptoss-ray serve --help` does not import torch.
A user error (`GptOssError`) prints one line on stderr and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gptoss_ray.errors import GptOssError

SUBCOMMANDS = {
    "serve": ("gptoss_ray.serve.cli", "start a local Ray cluster and the OpenAI-compatible server"),
    "generate": ("gptoss_ray.generate", "render a harmony chat, generate offline and print the reply"),
    "make-checkpoint": ("gptoss_ray.checkpoint.write", "write a random-weight checkpoint in the HF layout"),
    "inspect": ("gptoss_ray.checkpoint.inspect", "validate a checkpoint and show what serving it takes"),
    "bench": ("gptoss_ray.bench.serve_load", "load-test any OpenAI-compatible endpoint"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss-ray", description="Serve gpt-oss models on Ray.")
    parser.add_argument("--log-level", default=None, type=str.upper,
                        help="logging level (default WARNING; `serve` also takes it after the command)")
    subs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen subcommand's module is imported
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=args.log_level or "WARNING", format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except GptOssError as e:
        print(f"gptoss-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
