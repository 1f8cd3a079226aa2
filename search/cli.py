"""The ``lensnas`` command line: launch, status (and the commands built on them)."""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import warnings
from collections.abc import Sequence

import optuna

from lensnas.search.spec import SpecError
from lensnas.search.storage import default_storage_url, open_storage, redact
from lensnas.spaces.errors import LensnasError, OptionError

EXIT_STOPPED = 1
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
    launch.add_argument(
        "--warm-start", action="append", default=[], metavar="STUDY",
        help="start from the fitting trials of an earlier study in the same storage "
             "(repeatable; added to the file's warm_start)",
    )
    launch.add_argument("--cache-dir", default=None, help="dataset cache (default: $LENSNAS_CACHE_DIR or ~/.cache/lensnas)")
    launch.add_argument("--max-failures", type=int, default=3, help="stop after this many consecutive failed trials (0: never)")
    launch.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    launch.add_argument("--executor", choices=("local", "ray"), default="local", help="where trials run")
    ray = launch.add_argument_group("ray executor")
    ray.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial (fractions allowed)")
    ray.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial")
    ray.add_argument("--max-concurrent", type=int, default=None, help="trials running at once")
    ray.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS") or None,
        help="Ray cluster to join: host:port, or 'auto' for the one running here "
             "(default: $RAY_ADDRESS; unset: a new local Ray)",
    )

    status = commands.add_parser("status", help="table of the trials of a study")
    status.add_argument("study_name")
    _storage_argument(status)
    status_format = status.add_mutually_exclusive_group()
    status_format.add_argument(
        "--wide", action="store_true", help="every column, however wide (default: fit the terminal)"
    )
    status_format.add_argument(
        "--json", action="store_true",
        help="JSON for scripts: each trial's number, state, values, params and metrics",
    )

    baseline = commands.add_parser("baseline", help="baseline estimators on a study's test set")
    baseline.add_argument("study_file")
    baseline.add_argument("--noise", default=None, help="comma-separated noise levels, e.g. 1e-5,1e-3,1e-2")
    baseline.add_argument("--cache-dir", default=None, help="dataset and reference cache")
    baseline.add_argument("--quiet", action="store_true", help="no progress bars")

    dashboard = commands.add_parser("dashboard", help="optuna-dashboard on the storage, with artifacts")
    _storage_argument(dashboard)
    dashboard.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    dashboard.add_argument("--port", type=int, default=8080, help="port (default: 8080)")

    report = commands.add_parser("report", help="self-contained HTML report of a study")
    report.add_argument("study_name")
    _storage_argument(report)
    report.add_argument("-o", "--output", default=None, help="HTML file (default: <study>-report.html)")

    export = commands.add_parser("export", help="export the best trials as reloadable networks")
    export.add_argument("study_name")
    _storage_argument(export)
    export.add_argument("--top", type=int, default=3, help="how many of the best trials (default: 3)")
    export.add_argument("-o", "--output", default="best", help="folder (default: best/)")
    uncertainty = export.add_argument_group(
        "uncertainty (one network returning each output's mean and sigma, calibrated on the "
        "test set)").add_mutually_exclusive_group()
    uncertainty.add_argument("--ensemble", type=int, default=None, metavar="K",
                             help="a deep ensemble of the top K trials")
    uncertainty.add_argument("--seeds", type=int, default=None, metavar="K",
                             help="the best trial (or --trial) and K-1 copies retrained with "
                                  "other training seeds")
    uncertainty.add_argument("--mc-dropout", type=int, default=None, metavar="N",
                             help="N fixed dropout masks of the best trial (or --trial); needs "
                                  "a network trained with dropout > 0")
    export.add_argument("--trial", type=int, default=None,
                        help="the trial of --seeds or --mc-dropout (default: the best)")
    export.add_argument("--cache-dir", default=None,
                        help="dataset cache, for --ensemble/--seeds/--mc-dropout (default: "
                             "$LENSNAS_CACHE_DIR or ~/.cache/lensnas)")

    inspect = commands.add_parser(
        "inspect", help="a trial's layers (receptive fields), feature maps and where shape "
                        "information is lost"
    )
    inspect.add_argument("study_name")
    _storage_argument(inspect)
    inspect.add_argument("--trial", type=int, default=None, help="trial number (default: the best)")
    inspect.add_argument("-o", "--output", default=None,
                         help="HTML file (default: <study>-trial-<N>-inspect.html)")
    inspect.add_argument("--cache-dir", default=None,
                         help="dataset cache (default: $LENSNAS_CACHE_DIR or ~/.cache/lensnas)")

    predict = commands.add_parser(
        "predict", help="apply an exported network to images (.npy, FITS, folders, .zip)"
    )
    predict.add_argument("exported_folder", help="a folder written by lensnas export")
    predict.add_argument("inputs", nargs="+", help=".npy or FITS files, folders of them, .zip")
    predict.add_argument(
        "-o", "--output", required=True,
        help="a CSV for networks that return numbers; for networks that return images, a file, "
             "folder or .zip like the input (a folder of them for several inputs)",
    )
    predict.add_argument("--hdu", type=int, default=0, help="FITS HDU to read (default: 0)")
    predict.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    predict.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    predict.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    psf = predict.add_argument_group("networks that take a PSF, and response calibration")
    psf.add_argument(
        "--psf", default=None, metavar="FILE",
        help="PSF image(s) on the stamps' grid, pixel included (.npy or FITS): one (H, W) for all "
             "stamps or one per stamp (N, H, W), normalised to unit sum; the second input "
             "channel of networks that take the PSF (required for them), and metacal's PSF",
    )
    psf.add_argument(
        "--calibrate", default=None, metavar="metacal",
        help="metacal: calibrate the network by its response to metacal's images distorted by "
             "+-0.01 (needs --psf); the CSV gets g1_raw, g2_raw (the network on metacal's "
             "undistorted image), R11, R12, R21, R22 and g1, g2 = <R>^-1 (g1_raw, g2_raw) by "
             "the mean response",
    )
    psf.add_argument("--pixel-scale", type=float, default=None, metavar="ARCSEC",
                     help="the stamps' arcsec per pixel, for --calibrate when the export "
                          "stores none (default: the export's)")
    psf.add_argument("--noise-sigma", type=float, default=None, metavar="SIGMA",
                     help="the stamps' pixel noise, for metacal's noise correction with "
                          "--calibrate (default: the export's training noise)")

    serve = commands.add_parser(
        "serve", help="local web page: choose an exported network, drop files, get results"
    )
    serve.add_argument(
        "--storage", default=None,
        help="SQLAlchemy URL of a study storage: its studies' best trials can be exported from "
             "the page into --export-dir (default: none)",
    )
    serve.add_argument("--export-dir", default="best",
                       help="folder of exported networks (default: best/)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free)")
    serve.add_argument("--max-upload-mb", type=float, default=200.0,
                       help="largest upload in MiB (default: 200); a .zip may unpack to 4 times it")
    serve.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    serve.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    return parser


def _launch(args: argparse.Namespace) -> int:
    from lensnas.search.launch import LaunchStopped, launch

    try:
        launch(
            args.study_file, args.storage, n_trials=args.n_trials, seed=args.seed,
            warm_start=args.warm_start, quiet=args.quiet,
            cache_dir=args.cache_dir, max_failures=args.max_failures, executor=args.executor,
            **(
                {"gpus_per_trial": args.gpus_per_trial, "cpus_per_trial": args.cpus_per_trial,
                 "max_concurrent": args.max_concurrent, "address": args.address}
                if args.executor == "ray" else {}
            ),
        )
    except LaunchStopped as stopped:
        print(f"lensnas launch: {stopped}", file=sys.stderr)
        return EXIT_STOPPED
    return 0


def load_study(name: str, storage_url: str | None) -> optuna.Study:
    """Load a stored study by name; a clear error lists the stored names otherwise."""
    url = storage_url or default_storage_url()
    storage = open_storage(url, must_exist=True)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    if name not in names:
        known = ", ".join(names) if names else "none"
        raise SpecError(f"study '{name}' not found in {redact(url)}; stored studies: {known}")
    return optuna.load_study(study_name=name, storage=storage)


def _status(args: argparse.Namespace) -> int:
    from lensnas.search.summary import output_console, print_status, status_json

    study = load_study(args.study_name, args.storage)
    if args.json:
        print(status_json(study))
    else:
        print_status(study, output_console(), wide=args.wide)
    return 0


def _baseline(args: argparse.Namespace) -> int:
    from rich.table import Table

    from lensnas.search.results.comparison import comparison_rows
    from lensnas.search.spec import load_spec
    from lensnas.search.summary import output_console

    spec = load_spec(args.study_file)
    noise_levels = None
    if args.noise:
        try:
            noise_levels = [float(x) for x in args.noise.split(",")]
        except ValueError:
            raise OptionError(f"--noise: expected comma-separated numbers, got {args.noise!r}") from None
        if any(not 0 <= x < 1e3 for x in noise_levels):
            raise OptionError(f"--noise: noise levels must be in [0, 1000), got {args.noise!r}")
    objective = spec.make_objective(args.cache_dir, progress=not args.quiet)
    baselines = objective.baseline_table(noise_levels)
    header, rows = comparison_rows(
        type(objective), baselines, extra=objective.BASELINE_COLUMNS, describe=False
    )
    table = Table(title=f"Baselines of {spec.name} on its test set ({spec.objective})",
                  caption="± values: 1-sigma errors (jackknife)")
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = output_console()
    console.print(table)
    for name, description in {b.name: b.description for b in baselines}.items():
        console.print(f"{name}: {description}", highlight=False)
    for line in objective.baseline_notes():
        console.print(f"[dim]{line}[/dim]")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    from lensnas.search.results.dashboard import serve

    serve(args.storage or default_storage_url(), host=args.host, port=args.port)
    return 0


def _report(args: argparse.Namespace) -> int:
    from lensnas.search.results.report import write_report

    url = args.storage or default_storage_url()
    path = write_report(load_study(args.study_name, url), args.output or f"{args.study_name}-report.html", url)
    print(f"report of {args.study_name} written to {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from lensnas.search.results.export import export_study

    url = args.storage or default_storage_url()
    study = load_study(args.study_name, url)
    if any(count is not None for count in (args.ensemble, args.seeds, args.mc_dropout)):
        from lensnas.search.results.uncertainty import export_uncertainty

        folder = export_uncertainty(
            study, url, args.output, ensemble=args.ensemble, seeds=args.seeds,
            mc_dropout=args.mc_dropout, trial_number=args.trial, cache_dir=args.cache_dir)
        print(f"exported {folder} (calibration in {folder / 'MODEL_CARD.md'})")
        return 0
    if args.trial is not None:
        raise OptionError("--trial: goes with --seeds or --mc-dropout")
    for folder in export_study(study, url, args.output, args.top):
        print(f"exported {folder}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from lensnas.search.results.inspector import write_inspection

    url = args.storage or default_storage_url()
    study = load_study(args.study_name, url)
    path, inspections = write_inspection(study, url, args.output, args.trial, args.cache_dir)
    for inspection in inspections:
        probe = inspection.probe
        blocks = ", ".join(f"{b} {v:.3g}" for b, v in zip(probe.get("blocks", []), probe.get("rmse", [])))
        print(f"{inspection.label}: {len(inspection.layers)} layers; probe RMSE by block: {blocks or 'none'}")
    print(f"layers, feature maps and probe written to {path}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from lensnas.search.results.predict import predict

    responses = []
    count = predict(
        args.exported_folder, args.inputs, args.output, hdu=args.hdu, device=args.device,
        batch_size=args.batch_size, quiet=args.quiet, psf=args.psf, calibrate=args.calibrate,
        pixel_scale=args.pixel_scale, noise_sigma=args.noise_sigma,
        on_response=lambda *response: responses.append(response),
    )
    if not args.quiet:
        for response, used, total in responses:
            (r11, r12), (r21, r22) = response
            print(f"mean response over {used} of {total} stamp(s): R11 {r11:.6g}, R12 {r12:.6g}, "
                  f"R21 {r21:.6g}, R22 {r22:.6g}")
        print(f"{count} image(s) -> {args.output}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from lensnas.search.results.serve import serve

    serve(args.export_dir, args.storage, host=args.host, port=args.port,
          max_upload_mb=args.max_upload_mb, device=args.device, batch_size=args.batch_size)
    return 0


COMMANDS = {
    "launch": _launch, "status": _status, "baseline": _baseline, "dashboard": _dashboard, "report": _report,
    "export": _export, "predict": _predict, "inspect": _inspect, "serve": _serve,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lensnas`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Failed trials are reported by lensnas with their reason, without Optuna's tracebacks.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        return COMMANDS[args.command](args)
    except LensnasError as error:
        print(f"lensnas {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # a folder that cannot be written (--cache-dir, -o), a full disk
        where = f"{error.filename}: " if error.filename else ""
        print(f"lensnas {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(
            f"lensnas {args.command}: interrupted; finished trials are kept, running ones were "
            "recorded as FAIL; run the same command again to continue",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def run() -> None:
    """The console script: ``main``; SIGTERM (a batch scheduler's stop) is handled as Ctrl-C, and
    after either the process ends by SIGINT.

    Ending by the signal (after the exit handlers ran) is the Unix convention that lets a calling
    shell loop stop too (the shell shows status 130). It is also the only deterministic way out:
    CPython 3.11 ends a process by SIGINT anyway when the interrupt landed inside an ``exec``
    (as in a lazy import), even after the KeyboardInterrupt was handled.
    """
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    code = main()
    if code != EXIT_INTERRUPTED:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    run()
