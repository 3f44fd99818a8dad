"""``apdm`` command line. Holds no logic: it parses, loads the config and calls the command's ``run(cfg)``.

Every command takes ``--config recipe.yaml``, positional ``key=value`` overrides (``output_dir=PATH`` is
always accepted) and ``--print-config``. Heavy libraries are imported inside the commands, so ``--help``
returns instantly.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

EPILOG = "Overrides: key=value pairs after the options, e.g.  personalization.steps=10 output_dir=out/"

# command -> (config class name in apdm.config, "module:function" to run, help text, issue if not built yet)
COMMANDS: dict[str, tuple[str, str, str, str | None]] = {
    "protect-model": ("PlaceholderRunConfig", "", "fine-tune a protected checkpoint (APDM: DPO + L2P)", "#5"),
    "protect-images": ("PlaceholderRunConfig", "", "perturb photos so personalization on them fails", "#6"),
    "evaluate": ("PlaceholderRunConfig", "", "personalize, attack and score a model/images; JSON + HTML report", "#4"),
    "personalize": ("PersonalizeRunConfig", "apdm.personalization.run:run",
                    "run a personalization attack (DreamBooth/LoRA/TI) on images; save model and samples", None),
}


class CommandNotBuilt(RuntimeError):
    """The command exists in the CLI but its engine has not been implemented yet."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apdm",
        description="Anti-personalization for diffusion models: protect a model, protect images, evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG)
        p.add_argument("--config", help="YAML recipe (see recipes/)")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    bench = sub.add_parser("bench", help="benchmarks that write JSON (speed, memory, efficacy on the toy world)")
    bench.add_argument("name", nargs="?", help="benchmark name")
    bench.add_argument("--out", help="JSON file to write")
    bench.add_argument("--quick", action="store_true", help="the short version (minutes on 2 CPU cores)")
    bench.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def _resolve(target: str) -> Callable:
    import importlib

    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 success, 1 failure, 2 usage/config error)."""
    from apdm import config as C
    from apdm.utils import setup_logging

    parser = _parser()
    args = parser.parse_args(argv)
    setup_logging()
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "bench":
        from apdm.bench import BENCHMARKS, run_benchmark

        if not args.name or args.name not in BENCHMARKS:
            names = ", ".join(BENCHMARKS) or "none yet"
            print(f"apdm bench: choose a benchmark: {names}", file=sys.stderr)
            return 2
        return run_benchmark(args.name, args.out, args.quick, args.overrides)

    cls_name, target, _, issue = COMMANDS[args.command]
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        print(f"apdm {args.command}: '{bad[0]}' is not a key=value override", file=sys.stderr)
        return 2
    try:
        cfg = C.load_config(getattr(C, cls_name), args.config, args.overrides)
    except C.ConfigError as exc:
        print(f"apdm {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(C.to_yaml(cfg), end="")
        return 0
    if issue is not None:
        print(f"apdm {args.command}: not built yet (tracked in issue {issue}); nothing was done.", file=sys.stderr)
        return 3
    from apdm.utils import set_progress

    set_progress(not getattr(cfg, "quiet", False))
    try:
        _resolve(target)(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        # user-facing failures (bad input folder, unloadable model, ...): one clear line, no traceback
        from apdm.utils import LOG

        LOG.error("%s failed: %s", args.command, exc)
        if "--debug" in (argv or sys.argv):
            raise
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
