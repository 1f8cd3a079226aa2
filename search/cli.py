"""The ``lensnas`` command line: launch, status (and the commands built on them)."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Sequence

import optuna
from rich.console import Console

from search.spec import SpecError
from search.storage import StorageError, default_storage_url, open_storage, redact

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _storage_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage", default=None,
        help="SQLAlchemy URL of the Optuna storage (default: $LENSNAS_STORAGE or sqlite:///lensnas.db)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lensnas", description="Architecture search for lensing CNNs.")
    commands = parser.add_subparsers(dest="command", required=True)

    launch = commands.add_parser("launch", help="run or resume the study of a study file")
    launch.add_argument("study_file")
    _storage_argument(launch)
    launch.add_argument("--n-trials", type=int, default=None, help="total trials (overrides the file)")
    launch.add_argument("--seed", type=int, default=None, help="study seed (overrides the file)")
    launch.add_argument("--cache-dir", default=None, help="dataset cache (default: $LENSNAS_CACHE_DIR or ~/.cache/lensnas)")
    launch.add_argument("--max-failures", type=int, default=3, help="stop after this many consecutive failed trials (0: never)")
    launch.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    launch.add_argument("--executor", choices=("local", "ray"), default="local", help="where trials run")
    ray = launch.add_argument_group("ray executor")
    ray.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial (fractions allowed)")
    ray.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial")
    ray.add_argument("--max-concurrent", type=int, default=None, help="trials running at once")
    ray.add_argument("--address", default=None, help="Ray cluster to join ('auto' for a running one)")

    status = commands.add_parser("status", help="table of the trials of a study")
    status.add_argument("study_name")
    _storage_argument(status)
    return parser


def _launch(args: argparse.Namespace) -> int:
    from search.launch import launch

    launch(
        args.study_file, args.storage, n_trials=args.n_trials, seed=args.seed, quiet=args.quiet,
        cache_dir=args.cache_dir, max_failures=args.max_failures, executor=args.executor,
        **(
            dict(gpus_per_trial=args.gpus_per_trial, cpus_per_trial=args.cpus_per_trial,
                 max_concurrent=args.max_concurrent, address=args.address)
            if args.executor == "ray" else {}
        ),
    )
    return 0


def load_study(name: str, storage_url: str | None) -> optuna.Study:
    """Load a stored study by name; a clear error lists the stored names otherwise."""
    url = storage_url or default_storage_url()
    storage = open_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name not in names:
        known = ", ".join(names) if names else "none"
        raise SpecError(f"study '{name}' not found in {redact(url)}; stored studies: {known}")
    return optuna.load_study(study_name=name, storage=storage)


def _status(args: argparse.Namespace) -> int:
    from search.summary import print_status

    print_status(load_study(args.study_name, args.storage), Console())
    return 0


COMMANDS = {"launch": _launch, "status": _status}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lensnas`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    error_console = Console(stderr=True)
    try:
        return COMMANDS[args.command](args)
    except (SpecError, StorageError) as error:
        error_console.print(f"lensnas {args.command}: error: {error}", markup=False, highlight=False)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        error_console.print(
            f"lensnas {args.command}: interrupted; finished trials are kept, the running trial "
            "was recorded as FAIL; run the same command again to continue"
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
