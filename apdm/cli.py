"""``apdm`` command line. Holds no logic: it parses, loads the config and calls the command's ``run(cfg)``.

Every command takes ``--config recipe.yaml``, positional ``key=value`` overrides (the output folder is
``output_dir=PATH``; ``out=PATH`` for ``toy upscaler``) and ``--print-config``. Heavy libraries are imported
inside the commands, so ``--help`` returns instantly.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

#: an override example per command that exists in its config (a test applies each)
OVERRIDE_EXAMPLES = {
    "protect-model": "protect.outer_steps=10 output_dir=out/",
    "protect-images": "steps=100 format=png",
    "train-perturber": "steps=100 output_dir=rho/",
    "evaluate": "label=aspl personalizations.0.steps=100 \"attacks=[none, 'jpeg:quality=75']\"",
    "personalize": "personalization.method=lora personalization.learning_rate=1e-4 output_dir=out/",
    "toy build": "train.unet_steps=100 output_dir=toy/",
    "toy upscaler": "steps=100 out=upscaler/",
}


def epilog(command: str) -> str:
    """The help's closing lines for ``command``: how overrides look, with an example valid for its config."""
    lists = " (a list is given whole)" if "[" in OVERRIDE_EXAMPLES[command] else ""
    return (f"Overrides: key=value pairs after the options, e.g.  {OVERRIDE_EXAMPLES[command]}{lists}\n"
            "--print-config shows every setting with its default; quiet=true hides the progress bars; --debug "
            "shows the full traceback of a failure.")

# command -> (config class name in apdm.config, "module:function" to run, help text)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "protect-model": ("ProtectModelRunConfig", "apdm.protect_model.run:run",
                      "fine-tune a protected checkpoint (APDM: DPO + L2P)"),
    "protect-images": ("ProtectImagesRunConfig", "apdm.protect_images.run:run",
                       "perturb photos so personalization on them fails"),
    "train-perturber": ("TrainPerturberRunConfig", "apdm.protect_images.run:train",
                        "train the LDU perturbation network for a model"),
    "evaluate": ("EvaluateRunConfig", "apdm.evaluation.run:run",
                 "personalize, attack and score a model/images; JSON + HTML report"),
    "personalize": ("PersonalizeRunConfig", "apdm.personalization.run:run",
                    ("run a personalization attack (DreamBooth/LoRA/TI/Custom Diffusion) on images; save model and "
                     "samples")),
}


#: protect-images methods, for --help (which must not import torch; a test keeps it equal to the engines' list)
PROTECT_METHODS = ("ldu", "aspl", "fsmg", "advdm", "photoguard", "sds", "mist", "pid", "caat", "metacloak", "simac")
#: protect-images flags that are shorthands for overrides: flag -> (config key, help). A flag's value is taken as
#: the text typed, not parsed as YAML as an override's is: ``--input "[2024] photos/"`` is that folder.
SHORTCUTS = {
    "--method": ("method", (f"one of {', '.join(PROTECT_METHODS)} (default ldu; docs/protect_images_guide.md says "
                            "which to use)")),
    "--budget": ("budget", ("largest change of any pixel, L-inf on [0,1]: 8/255 (default), 8 (= 8/255) or a "
                            "fraction (0.0314 = 8.007/255)")),
    "--input": ("input", ("a folder, an image file, a glob, or comma-separated files; the originals are never "
                          "modified")),
    "--output": ("output_dir", ("folder for the protected images (PNG unless format=jpeg) and manifest.json "
                                "(default outputs/protected)")),
    "--model": ("model.path", ("the model an attacker would use: diffusers folder or hub id (the default, tiny, is "
                               "a random-weight test pipeline that protects against nothing; toy is the toy world)")),
    "--rho": ("rho_path", ("folder of a trained LDU perturbation network, from apdm train-perturber (needed by ldu; "
                           "toy is the toy world's, shipped in assets/toy/rho, found from any folder)")),
    "--target": ("target", "PhotoGuard/Mist: image the latents are pulled towards (default: flat gray)"),
}
PROTECT_IMAGES_EPILOG = ("Example: apdm protect-images --method advdm --budget 8/255 --model ./sd15 --input photos/ "
                         "--output protected/\n" + epilog("protect-images"))


#: what a command interrupted with Ctrl-C does when run again (each keeps its finished work)
RESUME_HINT = {
    "protect-model": "The same command again continues from its checkpoint in output_dir (protect.resume=false "
                     "starts over).",
    "protect-images": "The same command again skips the photos already protected (manifest.json; resume=false "
                      "protects every photo again).",
    "train-perturber": "The same command again continues from its checkpoint in output_dir (resume=false starts "
                       "over).",
    "evaluate": "The same command again reuses the finished cells in output_dir/cells (resume=false recomputes).",
    "personalize": "Run the command again: it starts over (class images already generated are reused).",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apdm",
        description="Anti-personalization for diffusion models: protect a model, protect images, evaluate.",
        epilog="--debug anywhere on the line shows the full traceback of a failure. The commands with a config "
               "take --print-config (every setting with its default) and quiet=true (no progress bars).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=PROTECT_IMAGES_EPILOG if name == "protect-images" else epilog(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", help="YAML recipe (see recipes/)")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        if name == "protect-images":  # the one-command form: --method ldu --budget 8/255 --input DIR --output DIR
            for flag, (key, text) in SHORTCUTS.items():
                p.add_argument(flag, dest=key.replace(".", "_"), metavar=key.upper(),
                               help=f"{text} (same as {key}=..., the value taken as typed)")
    toy = sub.add_parser("toy", help="the toy world (our CPU-sized measuring instrument): build, sample, export, "
                                     "upscaler")
    toy_sub = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")
    tb = toy_sub.add_parser("build", epilog=epilog("toy build"),
                            help="pretrain the toy model and train its instruments (60-80 min on 2 cores; resumable)")
    tb.add_argument("--config", help="YAML recipe (default: recipes/toy-build.yaml values)")
    tb.add_argument("--print-config", action="store_true")
    tb.add_argument("overrides", nargs="*", metavar="key=value")
    ts = toy_sub.add_parser("sample", help="generate images from the toy model (or any model.path)")
    ts.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    ts.add_argument("--n", type=int, default=8, help="images per prompt")
    ts.add_argument("--steps", type=int, default=25)
    ts.add_argument("--guidance", type=float, default=3.0)
    ts.add_argument("--seed", type=int, default=0)
    ts.add_argument("--model", default="toy", help="model path (default: the toy model)")
    ts.add_argument("--out", default="toy_samples.png", help="grid PNG to write")
    tu = toy_sub.add_parser("upscaler", epilog=epilog("toy upscaler"),
                            help="train a toy x4 diffusion upscaler for the noisy_upscale purifier (about 15 min; "
                                 "resumable)")
    tu.add_argument("--config", help="YAML recipe (default: the ToyUpscalerConfig values)")
    tu.add_argument("--print-config", action="store_true")
    tu.add_argument("overrides", nargs="*", metavar="key=value")
    te = toy_sub.add_parser("export", help="write held-out toy subjects (and training identities) as image folders")
    te.add_argument("--out", required=True, help="destination folder")
    te.add_argument("--subjects", type=int, default=2)
    te.add_argument("--cls", default="person", choices=["person", "dog"])
    te.add_argument("--images", type=int, default=4,
                    help="photos per subject in train/ (default 4; a provider's encoder trap protects new photos "
                         "of a person better the more it holds: docs/protect_model.md)")
    te.add_argument("--training-identities", type=int, default=0, help="also export N pretraining identities")
    demo = sub.add_parser("demo", help="the toy-world demo: protect images and model, attack, evaluate, report")
    demo.add_argument("--out", default="outputs/demo", help="output folder (report.html inside)")
    demo.add_argument("--quick", action="store_true", help="fewer methods and samples (a few minutes)")
    demo.add_argument("--quiet", action="store_true", help="hide the progress bars (the step lines stay)")
    bench = sub.add_parser("bench", help="benchmarks that write JSON (speed, memory, efficacy on the toy world)")
    # one positional list: argparse cannot interleave two positionals with options (NAME --quick k=v)
    bench.add_argument("args", nargs="*", metavar="NAME [key=value ...]", help="benchmark name, then its options")
    bench.add_argument("--out", help="JSON file to write")
    bench.add_argument("--quick", action="store_true", help="the short version (minutes on 2 CPU cores)")
    return parser


def _resolve(target: str) -> Callable:
    import importlib

    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 success, 1 failure, 2 usage/config error)."""
    from apdm import config as C
    from apdm.utils import MissingDependency, setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # anywhere on the line: the full traceback of a failure
    argv = [a for a in argv if a != "--debug"]
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse consumes a '*' positional in one go, so key=value overrides written after a later option
        # ("protect-images --config F a=b --method ldu c=d", "bench NAME --quick k=v") arrive here; they join
        # the command's list in order. Anything else is an error as usual.
        target = "args" if args.command == "bench" else "overrides"
        if not hasattr(args, target) or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, target, list(getattr(args, target)) + extra)
    if isinstance(getattr(args, "out", None), str) and args.out.startswith("~"):  # a quoted "--out ~/x" too
        args.out = os.path.expanduser(args.out)
    setup_logging()
    if args.command is None:
        parser.print_help()
        return 2
    processes = os.environ.get("WORLD_SIZE", "1")
    if args.command != "protect-model" and processes.strip() not in ("", "0", "1"):
        # every process would do the whole job and write the same files (and on a GPU machine all on GPU 0)
        print(f"apdm {args.command} runs in one process (WORLD_SIZE={processes}: started by torchrun or accelerate "
              "launch?); only protect-model runs data parallel over several processes", file=sys.stderr)
        return 2
    if args.command == "toy":
        return _toy(args, debug)
    if args.command == "demo":
        from pathlib import Path

        if not args.out.strip():  # an unset shell variable (--out "$OUT") ran the demo in the current folder
            print("apdm demo: --out is empty; give a folder (default outputs/demo)", file=sys.stderr)
            return 2
        if Path(args.out).exists() and not Path(args.out).is_dir():
            print(f"apdm demo: --out {args.out} is a file, not a folder", file=sys.stderr)
            return 2
        from apdm.demo import run_demo
        from apdm.utils import set_progress

        set_progress(not args.quiet)
        try:
            print(f"report: {run_demo(args.out, args.quick, quiet=args.quiet)}")
        except KeyboardInterrupt:
            print(f"apdm demo: interrupted; outputs so far are in {args.out}", file=sys.stderr)
            return 130
        except MissingDependency as exc:  # an optional package a setting needs: one line, how to install it
            print(f"apdm demo failed: {exc}", file=sys.stderr)
            if debug:
                raise
            return 2
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"apdm demo failed: {exc}", file=sys.stderr)
            if debug:
                raise
            return 1
        return 0
    if args.command == "bench":
        from apdm.bench import BENCHMARKS, run_benchmark

        args.name, args.overrides = (args.args[0], args.args[1:]) if args.args else (None, [])
        if not args.name or args.name not in BENCHMARKS:
            names = ", ".join(BENCHMARKS) or "none yet"
            print(f"apdm bench: choose a benchmark: {names}", file=sys.stderr)
            return 2
        try:
            return run_benchmark(args.name, args.out, args.quick, args.overrides)
        except KeyboardInterrupt:
            print(f"apdm bench {args.name}: interrupted; nothing was written", file=sys.stderr)
            return 130
        except (ValueError, OSError, MissingDependency) as exc:
            print(f"apdm bench {args.name}: {exc}", file=sys.stderr)
            if debug:
                raise
            return 2
        except RuntimeError as exc:  # a model that does not load, a device that is not there
            print(f"apdm bench {args.name} failed: {exc}", file=sys.stderr)
            if debug:
                raise
            return 1

    cls_name, target, _ = COMMANDS[args.command]
    flags = []
    if args.command == "protect-images":  # set as typed, before the key=value overrides (which win)
        flags = [(flag, key, getattr(args, key.replace(".", "_"))) for flag, (key, _) in SHORTCUTS.items()
                 if getattr(args, key.replace(".", "_"), None) is not None]
    cfg = _load_config(args.command, getattr(C, cls_name), args, flags)
    if isinstance(cfg, int):
        return cfg
    from apdm.utils import set_progress

    set_progress(not getattr(cfg, "quiet", False))
    from apdm.utils import LOG

    try:
        _resolve(target)(cfg)
    except KeyboardInterrupt:  # Ctrl-C: one line, and how to go on
        LOG.error("%s interrupted. %s", args.command, RESUME_HINT.get(args.command, ""))
        return 130
    except MissingDependency as exc:  # an optional package a setting needs (impress:tie=lpips without lpips): one
        LOG.error("%s failed: %s", args.command, exc)  # line naming the pip extra, exit 2 as for a bad config
        if debug:
            raise
        return 2
    except (OSError, ValueError, RuntimeError) as exc:
        # user-facing failures (bad input folder, unloadable model, an output path that is a file, a full disk...):
        # one clear line, no traceback (--debug shows it)
        LOG.error("%s failed: %s", args.command, exc)
        if debug:
            raise
        return 1
    return 0


def _load_config(command: str, cls, args, flags=()):
    """The command's config from ``--config``, then the shortcut ``flags`` (``(flag, key, text)``: the text is set
    as typed, no YAML parsing), then the overrides; or an exit code (2 on a bad config, 0 after
    ``--print-config``)."""
    from apdm import config as C

    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        print(f"apdm {command}: '{bad[0]}' is not a key=value override", file=sys.stderr)
        return 2
    try:
        cfg = C.load_config(cls, args.config)
        for flag, key, text in flags:
            C.set_text(cfg, key, text, flag)
        for item in args.overrides:
            C.apply_override(cfg, item)
    except C.ConfigError as exc:
        print(f"apdm {command}: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(C.to_yaml(cfg), end="")
        return 0
    out = getattr(cfg, "output_dir", None)
    if isinstance(out, str) and out.strip():
        if out.strip().startswith("~"):  # a recipe's or a quoted "~/out": the home folder, not a folder named ~
            cfg.output_dir = out = os.path.expanduser(out.strip())
        if not command.startswith("toy") and os.path.exists(out) and not os.path.isdir(out):  # (toy: its own check)
            # said now, not after the model has loaded
            from apdm.utils import LOG

            LOG.error("%s failed: output_dir=%s is a file, not a folder", command, out)
            return 1
    return cfg


def _toy(args, debug: bool = False) -> int:
    """``apdm toy build`` / ``apdm toy sample`` / ``apdm toy upscaler`` / ``apdm toy export``."""
    if args.toy_command == "build":
        from apdm.toy.world import ToyBuildConfig, build

        cfg = _load_config("toy build", ToyBuildConfig, args)
        if isinstance(cfg, int):
            return cfg
        from apdm.utils import set_progress

        set_progress(not cfg.quiet)
        try:
            build(cfg)
        except KeyboardInterrupt:
            print("apdm toy build: interrupted; the same command again continues from the last checkpoint",
                  file=sys.stderr)
            return 130
        except (OSError, ValueError) as exc:  # an output_dir that is a file, a missing init_from, a bad stage, ...
            print(f"apdm toy build: {exc}", file=sys.stderr)
            if debug:
                raise
            return 2
        return 0
    if args.toy_command == "sample":
        from pathlib import Path

        bad = (f"--n must be at least 1, got {args.n}" if args.n < 1 else
               f"--steps must be between 1 and 1000, got {args.steps}" if not 1 <= args.steps <= 1000 else
               f"--guidance must be a finite number >= 0, got {args.guidance}" if not 0 <= args.guidance < 1e9 else
               f"--out {args.out}: give a .png or .jpg file name" if Path(args.out).suffix.lower() not in
               (".png", ".jpg", ".jpeg") or Path(args.out).is_dir() else "")
        if bad:
            print(f"apdm toy sample: {bad}", file=sys.stderr)
            return 2
        from apdm.core import diffusion as D
        from apdm.core.images import save_grid
        from apdm.core.models import load_sd

        try:
            sd = load_sd(args.model)
            images = D.generate(sd, args.prompt, args.n, args.steps, args.guidance, seed=args.seed)
            save_grid(images, args.out, nrow=args.n)
        except (OSError, ValueError, RuntimeError) as exc:
            print(f"apdm toy sample: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {len(images)} images to {args.out}")
        return 0
    if args.toy_command == "export":
        from apdm.toy.world import export

        try:
            written = export(args.out, args.subjects, args.cls, num_images=args.images,
                             training_identities=args.training_identities)
        except (OSError, ValueError) as exc:
            print(f"apdm toy export: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {len(written['subjects'])} subject folder(s) and {written['training_identities']} training "
              f"identities under {args.out}")
        return 0
    if args.toy_command == "upscaler":
        from apdm.toy.upscaler import ToyUpscalerConfig, build_upscaler

        cfg = _load_config("toy upscaler", ToyUpscalerConfig, args)
        if isinstance(cfg, int):
            return cfg
        try:
            out = build_upscaler(cfg)
        except (OSError, ValueError) as exc:  # an out= that is a file, a missing toy model, a full disk, ...
            print(f"apdm toy upscaler: {exc}", file=sys.stderr)
            if debug:
                raise
            return 2
        print(f"wrote the toy upscaler to {out} (use it as noisy_upscale:upscaler={out})")
        return 0
    print("apdm toy: choose build, sample, upscaler or export", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
