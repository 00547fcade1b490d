"""`python -m rlkit.run RECIPE.yaml [key=value ...] [--print-config] [--debug]`: run a recipe's stages.

Bad input (the recipe, an override, a file it names) ends in one `error:` line naming the key and the fix, exit
code 2; any other failure in one `error:` line too, exit code 1, with the full traceback under `--debug`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from rlkit.recipe import RecipeError, load_recipe, to_yaml
from rlkit.rollout.vllm_console import KnownNoise

# vLLM's processes re-import this module before vLLM configures their logging; what vLLM logs until then goes
# to Python's last-resort handler, which gets the same filter as every other handler (rollout/vllm_console.py)
logging.lastResort.addFilter(KnownNoise())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlkit.run", description=__doc__)
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.0.steps=10 trainer.lr=3e-4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    return parser.parse_intermixed_args(argv)  # flags may come before, between or after overrides


def exit_on_sigterm() -> None:
    """SIGTERM (a scheduler's stop, `timeout`, `kill`) ends the run as Ctrl-C does: by an exception, so the runner's
    cleanup closes the engines, the reward workers and the logger instead of leaving vLLM's processes behind."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_recipe(args.recipe, args.overrides)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        from rlkit.orchestration.runner import run  # heavy imports only once the recipe is known to be good

        run(cfg)
    except RecipeError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a failure the checks could not foresee: one line, the traceback under --debug
        if args.debug:
            raise
        message = (str(e).strip().splitlines() or [""])[0][:500]
        print(f"error: {type(e).__name__}: {message} (run again with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # vLLM spawns worker processes, which re-import this module
    sys.exit(main())
