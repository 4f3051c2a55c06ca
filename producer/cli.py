"""The ``pixelrelay`` command line.

Every command exits with a code from ``pixelrelay.exitcodes.ExitCode`` (0 every item done,
1 some items failed, 2 usage or configuration error, 3 gave up waiting, 4 cancelled,
5 a ``run`` worker exited early, 6 a model missing, 7 a storage error, 130 interrupted).
``cancel`` and ``jobs`` are job control (``producer.control``). ``report``, ``gc`` and the
``--report`` / ``--notify`` flags of ``submit --wait`` and ``run`` live in ``producer.report``, ``producer.gc`` and
``producer.notify``. ``submit``, ``status``, ``cancel`` and ``jobs`` never import torch. ``models``, ``train`` and
``bench`` keep their parsers with their code; ``--help`` works at every level.

Usage errors (``Parser``) are one line, ``pixelrelay CMD: error: --flag: why``, exit 2; a
mistyped option, command or choice names the nearest one (``did you mean --scale?``). Only a
missing argument also prints the usage.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import re
import sys
import textwrap
from typing import NoReturn

from pixelrelay import __version__
from pixelrelay.exitcodes import DESCRIPTIONS, ExitCode
from pixelrelay.pipeline.messages import DEFAULT_QUALITY, MAX_INSTRUCTION_CHARS, MAX_SCALE, MAX_SIDE
from pixelrelay.pipeline.settings import ConfigError, Settings

_CHOICE_RE = re.compile(r"^argument (?P<arg>\S+): invalid choice: (?P<value>'.*?') \(choose from (?P<choices>.*)\)$")
_ARGUMENT_RE = re.compile(r"^argument (\S+): ")


def nearest(word: str, candidates) -> str | None:
    """The candidate closest to a mistyped ``word``, if any is close."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


class _Formatter(argparse.HelpFormatter):
    """Help text wrapped at spaces only (``hf-caption`` stays whole)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors and the nearest option, command or choice to a
    mistyped one (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required"):
            self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {_reworded(message)}\n")

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = _chosen(self, parsed)
            parser.error(_unrecognized(extras, parser))
        return parsed


def _reworded(message: str) -> str:
    """argparse's ``argument --x: ...`` as ``--x: ...``; an invalid choice names the nearest."""
    choice = _CHOICE_RE.match(message)
    if choice is None:
        return _ARGUMENT_RE.sub(r"\1: ", message)
    value = choice["value"][1:-1]
    choices = re.findall(r"'([^']*)'", choice["choices"])
    near = nearest(value, choices)
    hint = f"did you mean {near!r}?" if near else "choose from " + ", ".join(choices)
    if choice["arg"] == "COMMAND":
        return f"unknown command {value!r}; {hint}"
    return f"{choice['arg']}: invalid choice {value!r}; {hint}"


def _chosen(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command parser that ``parsed`` went through last."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(getattr(parsed, action.dest, None) or "")
            return _chosen(sub, parsed) if sub is not None else parser
    return parser


def _unrecognized(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """argparse's 'unrecognized arguments', naming the nearest option to a mistyped one."""
    for extra in extras:
        if extra.startswith("--"):
            options = {option.lstrip("-"): option for option in parser._option_string_actions}
            near = nearest(extra.partition("=")[0].lstrip("-"), options)
            if near:
                return f"unrecognized option {extra}; did you mean {options[near]}?"
    return "unrecognized arguments: " + " ".join(extras)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", metavar="URL", help="broker Redis URL (env PIXELRELAY_REDIS_URL)")
    parser.add_argument(
        "--insecure-no-signing",
        action="store_true",
        default=None,
        help="run without a signing key (env PIXELRELAY_INSECURE_NO_SIGNING=1): anyone who can write to "
        "Redis then controls what workers read and write. The key: env PIXELRELAY_SIGNING_KEY or "
        "PIXELRELAY_SIGNING_KEY_FILE",
    )
    parser.add_argument(
        "--s3-endpoint-url", metavar="URL", help="S3 endpoint for MinIO/Ceph/R2 (env PIXELRELAY_S3_ENDPOINT_URL)"
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="log lines as text or one JSON object each (env PIXELRELAY_LOG_FORMAT; default text)",
    )


def _backend_flags(parser: argparse.ArgumentParser, job: bool = False) -> None:
    """``--encoder/--planner/--decoder`` with their kinds (from the registry, plugins included)
    and defaults; ``job``: the flags of ``submit`` (a job's backends: default the workers' own)."""
    from pixelrelay.pipeline import constants as C
    from pixelrelay.pipeline.stages.registry import known_backends

    defaults = {"encoder": C.DEFAULT_ENCODER, "planner": C.DEFAULT_PLANNER, "decoder": C.DEFAULT_DECODER}
    for stage, default in defaults.items():
        when = "default: the workers' own" if job else f"default {default}; env PIXELRELAY_{stage.upper()}"
        parser.add_argument(
            f"--{stage}",
            metavar="KIND[:MODEL]",
            help=f"{stage} backend, KIND one of {', '.join(known_backends(stage))} ({when}); MODEL: a hub id "
            "or local folder (see `pixelrelay models list`)",
        )


def _job_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="the images: a local folder, s3://bucket/prefix, or a manifest file")
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument(
        "--task",
        choices=["restore", "upscale", "edit", "style"],
        default="restore",
        help="what to do (default restore): restore, upscale, or edit / style: grade (and, with a "
        "generative decoder, edit) as --instruction says",
    )
    parser.add_argument(
        "--scale",
        type=_scale,
        metavar="S",
        help=f"output scale, any factor in (0, {MAX_SCALE}] (e.g. 2, 1.5, 3, 0.5; default: "
        "1 for restore, 2 for upscale); the decoder runs its native scale at or above it "
        "and resamples to the exact size",
    )
    parser.add_argument(
        "--width",
        type=_side,
        metavar="PX",
        help="output width; with --height, fit inside WIDTHxHEIGHT; keeps the aspect ratio (not with --scale)",
    )
    parser.add_argument("--height", type=_side, metavar="PX", help="output height (see --width)")
    parser.add_argument(
        "--instruction",
        default="",
        type=_instruction,
        help=f"free-text instruction for the planner (at most {MAX_INSTRUCTION_CHARS} characters)",
    )
    parser.add_argument("--format", choices=["png", "jpg", "webp"], help="output format (default: keep)")
    parser.add_argument(
        "--quality",
        type=_quality,
        default=DEFAULT_QUALITY,
        metavar="1..100",
        help=f"JPEG and lossy WebP quality (default {DEFAULT_QUALITY})",
    )
    parser.add_argument("--lossless", action="store_true", help="write WebP outputs lossless (ignores --quality)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="re-process every item, even where the output already answers the same request and models",
    )
    parser.add_argument(
        "--strip-metadata",
        action="store_true",
        help="outputs carry no EXIF (GPS included) or other metadata; an RGB colour profile stays",
    )
    parser.add_argument(
        "--job-id", metavar="ID", help="job id (default: a new one); re-submitting an id resumes that job"
    )
    parser.add_argument(
        "--incremental",
        action="store_true",
        help="send only inputs new or changed (ETag, size+mtime, request) since the last jobs into --out "
        "(index in OUT/_state/incremental/); nothing new: no job, exit 0",
    )
    parser.add_argument(
        "--follow-symlinks",
        action="store_true",
        help=(
            "list and read symlinked files and folders in a folder input (default: a symlinked image, "
            "or one swapped for a link after the listing, fails its item)"
        ),
    )
    parser.add_argument("--chunk-size", type=int, metavar="N", help="items per chain (env PIXELRELAY_CHUNK_SIZE)")
    parser.add_argument("--window", type=int, metavar="N", help="chains in flight per job (env PIXELRELAY_WINDOW)")
    _common(parser)


def _instruction(text: str) -> str:
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise argparse.ArgumentTypeError(f"at most {MAX_INSTRUCTION_CHARS} characters, got {len(text)}")
    return text


def _scale(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, {MAX_SCALE}], got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_SCALE:
        raise argparse.ArgumentTypeError(f"expected a number in (0, {MAX_SCALE}], got {text}")
    return int(value) if value.is_integer() else value


def _side(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels 1..{MAX_SIDE}, got {text!r}") from None
    if not 1 <= value <= MAX_SIDE:
        raise argparse.ArgumentTypeError(f"expected 1..{MAX_SIDE} pixels, got {value}")
    return value


def _quality(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number 1..100, got {text!r}") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"expected 1..100, got {value}")
    return value


def _seconds(text: str, positive: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value < 0 or (positive and value == 0):
        raise argparse.ArgumentTypeError(
            f"expected {'a positive number of' if positive else '0 or more'} seconds, got {text}"
        )
    return value


def _positive_seconds(text: str) -> float:
    return _seconds(text, positive=True)


def _wait_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--wait", action="store_true", help=f"wait for the job and {what}")
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="S",
        help="with --wait: give up after S seconds with exit code 3; the job goes on",
    )


def _end_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--report",
        action="store_true",
        help="when the job ends, write report.html and contact-sheet.jpg beside its manifest",
    )
    parser.add_argument(
        "--notify",
        action="store_true",
        help="when waiting ends, POST a JSON summary to $PIXELRELAY_NOTIFY_URL (or the URL in the "
        "file $PIXELRELAY_NOTIFY_URL_FILE); never fails the job",
    )


def _worker_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, metavar="N", help="items per model call (env PIXELRELAY_BATCH_SIZE)")
    parser.add_argument("--device", help="cpu (default), cuda, cuda:N or mps (env PIXELRELAY_DEVICE)")


JOB_ID_HELP = "the job's id (what submit or run printed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="pixelrelay",
        description="Batch image restoration and upscaling.",
        epilog="exit codes: " + "; ".join(f"{int(code)} {text}" for code, text in DESCRIPTIONS.items()),
    )
    parser.add_argument("--version", action="version", version=f"pixelrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    what = "enqueue a job and print its id (task restore unless --task)"
    p = sub.add_parser("submit", help=what, description=what[0].upper() + what[1:] + ".")
    _job_flags(p)
    _backend_flags(p, job=True)
    _wait_flags(p, "exit 0/1 by its outcome")
    _end_flags(p)

    p = sub.add_parser("status", help="show a job's progress")
    p.add_argument("job_id", help=JOB_ID_HELP)
    p.add_argument("--out", help="the job's output: rebuild the job from its files there if Redis lost it")
    _wait_flags(p, "exit 0/1 by its outcome")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout, for machines (no progress)")
    _common(p)

    p = sub.add_parser("cancel", help="cancel a job: no new chains, chains in flight end; manifest written")
    p.add_argument("job_id", help=JOB_ID_HELP)
    p.add_argument(
        "--grace",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="wait up to S seconds for the chains in flight to end, then write the manifest (default 30)",
    )
    _common(p)

    p = sub.add_parser("jobs", help="list recent jobs, newest first, with their state and counts")
    p.add_argument("--limit", type=int, default=20, metavar="N", help="at most this many jobs (default 20)")
    p.add_argument("--json", action="store_true", help="one JSON array, for machines")
    _common(p)

    p = sub.add_parser("worker", help="run one stage's worker pool")
    p.add_argument("--stage", required=True, choices=["encode", "plan", "decode"], help="the stage this worker runs")
    p.add_argument("--concurrency", type=int, default=1, metavar="N", help="worker processes (default 1: solo pool)")
    p.add_argument("--loglevel", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (env PIXELRELAY_LOG_LEVEL)")
    p.add_argument(
        "--remote-control",
        action="store_true",
        help="accept Celery remote control (celery inspect/control, Flower's control panel); off by default",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve Prometheus /metrics on port N (env PIXELRELAY_METRICS_PORT; 0: off)",
    )
    p.add_argument(
        "--metrics-addr",
        metavar="ADDR",
        help="listen for /metrics on ADDR (env PIXELRELAY_METRICS_ADDR; default 127.0.0.1; 0.0.0.0: every interface)",
    )
    p.add_argument(
        "--no-events",
        action="store_true",
        help="send no Celery task events or worker heartbeats (Flower, celery events); on by default",
    )
    _worker_flags(p)
    _backend_flags(p)
    _common(p)

    p = sub.add_parser("exporter", help="serve the true backlog per stage (Prometheus /metrics) from Redis")
    p.add_argument(
        "--port",
        type=int,
        default=None,
        metavar="N",
        help="listen on port N (env PIXELRELAY_METRICS_PORT; default 9808)",
    )
    p.add_argument(
        "--addr",
        dest="metrics_addr",
        metavar="ADDR",
        help="listen on ADDR (env PIXELRELAY_METRICS_ADDR; default 127.0.0.1; 0.0.0.0: every interface)",
    )
    _common(p)
    p = sub.add_parser("health", help="exit 0 when this container's worker is alive and consuming (health checks)")
    p.add_argument(
        "--max-age",
        type=_positive_seconds,
        default=60.0,
        metavar="S",
        help="unhealthy when the worker's heartbeat file (env PIXELRELAY_HEALTH_FILE) is older (default 60)",
    )
    p.add_argument(
        "--stage",
        choices=["encode", "plan", "decode"],
        help="check this stage's worker (its own heartbeat file); default: every worker started here",
    )
    p.add_argument(
        "--file",
        metavar="PATH",
        help="check this heartbeat file (default: the stage's, from $PIXELRELAY_HEALTH_FILE "
        "or <tmp>/pixelrelay-worker.health: <tmp>/pixelrelay-worker-decode.health for decode)",
    )

    what = "run the whole system on this machine for one job (task restore unless --task)"
    p = sub.add_parser(
        "run", help=what, description=what[0].upper() + what[1:] + ": Redis, one worker per stage, the job."
    )
    _job_flags(p)
    _worker_flags(p)
    _backend_flags(p)
    p.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the workers' log folder after a successful run (it is always kept on failure)",
    )
    _end_flags(p)

    p = sub.add_parser("report", help="write a job's report.html and contact-sheet.jpg beside its manifest")
    p.add_argument("job_id", help=JOB_ID_HELP)
    p.add_argument("--out", help="the job's output (default: the one Redis records for the job)")
    p.add_argument("--sample", type=int, default=48, metavar="N", help="done items shown with pictures (default 48)")
    _common(p)

    p = sub.add_parser("gc", help="remove old jobs' parts, listings and reports from an output (manifests stay)")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument(
        "--older-than", required=True, metavar="AGE", help="jobs last written more than AGE ago: 30d, 12h, 90m"
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be removed, with sizes; remove nothing")
    p.add_argument(
        "--include-manifests", action="store_true", help="remove the whole job folder, manifest and job.json too"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="without Redis: also remove jobs with no manifest, or with parts newer than it",
    )
    _common(p)

    for name, help_text in DELEGATED_HELP.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER, help=f"the arguments of `pixelrelay {name}` (see its --help)")

    p = sub.add_parser("demo", help="write generated sample images to a folder")
    p.add_argument("folder", help="where to write them (made if missing)")
    p.add_argument("--count", type=int, default=24, metavar="N", help="how many images (default 24)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed: the same seed, the same images")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    fields = (
        "redis_url",
        "s3_endpoint_url",
        "chunk_size",
        "window",
        "batch_size",
        "device",
        "encoder",
        "planner",
        "decoder",
        "insecure_no_signing",
        "metrics_port",
        "metrics_addr",
    )
    return Settings.from_env(**{name: getattr(args, name, None) for name in fields})


def _job_options(args: argparse.Namespace):
    from pixelrelay.pipeline.messages import EDIT_TASKS, JobOptions

    if args.task in EDIT_TASKS and not args.instruction.strip():
        raise ConfigError(f'--task {args.task}: needs --instruction (what to change), e.g. "make it warmer"')
    if args.scale is not None and (args.width is not None or args.height is not None):
        raise ConfigError("--scale: not with --width/--height (give a scale, or a size to fit inside)")

    return JobOptions(
        task=args.task,
        scale=args.scale,
        width=args.width,
        height=args.height,
        instruction=args.instruction,
        format=args.format,
        quality=args.quality,
        lossless=args.lossless,
        overwrite=args.overwrite,
        strip_metadata=args.strip_metadata,
    )


def _check_wait_flags(args: argparse.Namespace) -> None:
    if args.timeout is not None and not args.wait:
        raise ConfigError("--timeout: only with --wait")


def _end_hooks(args: argparse.Namespace):
    """What ``--report``/``--notify`` need, checked before the job starts (the notify URL is
    read now, so a bad setting fails fast); None when neither is given."""
    if not (args.report or args.notify):
        return None
    if getattr(args, "wait", True) is False:
        raise ConfigError("--report and --notify: only with --wait")
    from pixelrelay.producer.notify import after_wait, notify_url

    url = notify_url() if args.notify else None
    return lambda settings, job_id, output, code: after_wait(
        settings, job_id, output, code, report=args.report, url=url
    )


def _cmd_submit(args: argparse.Namespace) -> int:
    from pixelrelay.pipeline.messages import Backends
    from pixelrelay.producer.status import show_status
    from pixelrelay.producer.submit import submit

    _check_wait_flags(args)
    on_end = _end_hooks(args)
    settings = _settings(args)
    backends = Backends(encoder=args.encoder, planner=args.planner, decoder=args.decoder)
    submission = submit(
        settings,
        args.input,
        args.out,
        _job_options(args),
        backends,
        args.job_id,
        follow_symlinks=args.follow_symlinks,
        incremental=args.incremental,
    )
    if submission.incremental:
        print(submission.incremental, file=sys.stderr, flush=True)
    if submission.nothing_new:
        return ExitCode.OK
    print(submission.job_id, flush=True)
    if submission.resumed:
        print(f"resuming: {submission.already_done} of {submission.total} items already done", file=sys.stderr)
    if args.wait:
        code = show_status(
            settings, submission.job_id, wait=True, stream=sys.stderr, timeout_s=args.timeout, output=submission.output
        )
        if on_end is not None:
            on_end(settings, submission.job_id, submission.output, code)
        return code
    return ExitCode.OK


def _cmd_status(args: argparse.Namespace) -> int:
    from pixelrelay.producer.status import show_status

    _check_wait_flags(args)
    from pixelrelay.producer.submit import normalize_location

    output = normalize_location(args.out) if args.out else None
    return show_status(
        _settings(args), args.job_id, args.wait, timeout_s=args.timeout, output=output, as_json=args.json
    )


def _cmd_cancel(args: argparse.Namespace) -> int:
    from pixelrelay.jobs.state import JobState
    from pixelrelay.producer.control import CancelOutcome, cancel_job
    from pixelrelay.producer.status import summarize
    from pixelrelay.producer.submit import redis_client

    settings = _settings(args)
    client = redis_client(settings)
    outcome = cancel_job(client, settings, args.job_id, grace_s=args.grace)
    if outcome == CancelOutcome.FORCED:
        print(f"chains still in flight after {args.grace:g} s: manifest written anyway", file=sys.stderr)
    summarize(JobState(client, args.job_id, settings.signer()), settings, sys.stdout)
    return ExitCode.OK


def _cmd_jobs(args: argparse.Namespace) -> int:
    import json

    from pixelrelay.producer.control import jobs_table, recent_jobs
    from pixelrelay.producer.submit import redis_client

    settings = _settings(args)
    if args.limit < 1:
        raise ConfigError("--limit: at least 1")
    rows = recent_jobs(redis_client(settings), args.limit, settings.stall_s)
    print(json.dumps([r.to_json() for r in rows]) if args.json else jobs_table(rows))
    return ExitCode.OK


def _cmd_worker(args: argparse.Namespace) -> int:
    from pixelrelay.workers.main import export_settings, run_worker

    _settings(args)  # validate flags before exporting them
    export_settings(
        redis_url=args.redis_url,
        s3_endpoint_url=args.s3_endpoint_url,
        batch_size=args.batch_size,
        device=args.device,
        encoder=args.encoder,
        planner=args.planner,
        decoder=args.decoder,
        insecure_no_signing=args.insecure_no_signing,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
        log_format=args.log_format,
    )
    return run_worker(
        args.stage, args.concurrency, args.loglevel, remote_control=args.remote_control, events=not args.no_events
    )


def _cmd_health(args: argparse.Namespace) -> int:
    from pixelrelay.health import problem, stage_problem

    why = problem(args.file, args.max_age) if args.file else stage_problem(args.stage, args.max_age)
    if why:
        print(f"pixelrelay health: {why}", file=sys.stderr)
        return 1  # unhealthy
    return ExitCode.OK


def _cmd_exporter(args: argparse.Namespace) -> int:
    from pixelrelay.producer import exporter

    settings = _settings(args)
    exporter.serve(settings, args.port or settings.metrics_port or exporter.DEFAULT_PORT, addr=settings.metrics_addr)
    return ExitCode.OK


def _cmd_run(args: argparse.Namespace) -> int:
    from pixelrelay.producer.run import RunOptions, run_local

    settings = _settings(args)
    on_end = _end_hooks(args)
    worker_args: list[str] = []
    for flag in ("batch_size", "device", "encoder", "planner", "decoder", "s3_endpoint_url"):
        value = getattr(args, flag, None)
        if value is not None:
            worker_args += ["--" + flag.replace("_", "-"), str(value)]
    # The workers load the chosen backends at start-up; the job itself uses their defaults.
    run = RunOptions(
        input=args.input,
        output=args.out,
        options=_job_options(args),
        job_id=args.job_id,
        worker_args={stage: worker_args for stage in ("encode", "plan", "decode")},
        keep_logs=args.keep_logs,
        follow_symlinks=args.follow_symlinks,
        incremental=args.incremental,
        on_end=on_end,
    )
    return run_local(settings, run)


def _cmd_report(args: argparse.Namespace) -> int:
    from pixelrelay.producer.report import ReportError, write_report

    settings = _settings(args)
    if args.sample < 0:
        raise ConfigError("--sample: 0 or more")
    spec = None
    if args.out:
        from pixelrelay.producer.submit import normalize_location

        output = normalize_location(args.out)
    else:
        from pixelrelay.jobs.state import JobState
        from pixelrelay.producer.submit import redis_client

        state = JobState(redis_client(settings), args.job_id, settings.signer())
        if not state.exists():
            raise ConfigError(f"unknown job {args.job_id} (give --out OUTPUT to read it from storage)")
        spec = state.spec()
        output = spec.output
    try:
        written = write_report(settings, output, args.job_id, sample_cap=args.sample, signed_spec=spec)
    except ReportError as exc:
        raise ConfigError(str(exc)) from None
    print(written.html)
    print(written.contact_sheet)
    return ExitCode.OK


def _cmd_gc(args: argparse.Namespace) -> int:
    from pixelrelay.producer.gc import collect, parse_age
    from pixelrelay.producer.submit import normalize_location

    age = parse_age(args.older_than)
    collect(
        _settings(args),
        normalize_location(args.out),
        age,
        dry_run=args.dry_run,
        include_manifests=args.include_manifests,
        force=args.force,
    )
    return ExitCode.OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from pixelrelay.producer.demo import write_demo_images

    paths = write_demo_images(args.folder, args.count, args.seed)
    print(f"wrote {len(paths)} sample images to {args.folder}")
    return ExitCode.OK


def _unreachable(args: argparse.Namespace, exc: Exception) -> str:
    """Why a command could not reach Redis, naming the URL (its password hidden)."""
    from pixelrelay.pipeline.settings import redact_url

    try:
        where = " at " + redact_url(_settings(args).redis)
    except ConfigError:
        where = ""
    return f"cannot reach Redis{where} ({exc}): is PIXELRELAY_REDIS_URL (--redis-url) right, and Redis running?"


# Commands whose own parser lives with their code: ``pixelrelay NAME ...`` -> module.main(argv).
DELEGATED = {
    "models": "pixelrelay.producer.models_cli",
    "train": "pixelrelay.training.train",
    "bench": "pixelrelay.training.quality",
}
DELEGATED_HELP = {
    "models": "list the backends and their weights; pull weights into the cache",
    "train": "train the builtin encoder or decoder: train encoder|decoder --data DIR --out PATH",
    "bench": "benchmarks: bench quality --data DIR [--scale 2|4] [--degradation bicubic|realistic|mild]; "
    "bench figure --data DIR --out PNG",
}


BENCH_SUBCOMMANDS = {
    "quality": "restoration quality of the shipped pipelines on a folder of images",
    "figure": "a before/after PNG of the pipelines on validation crops",
}
BENCH_MODULES = {"figure": "pixelrelay.training.figure"}  # the others: DELEGATED["bench"]


def _bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixelrelay bench", description="Benchmarks.")
    sub = parser.add_subparsers(dest="bench", metavar="{" + ",".join(BENCH_SUBCOMMANDS) + "}")
    for name, help_text in BENCH_SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _bench_argv(rest: list[str]) -> list[str]:
    """The arguments for ``bench quality``; else bench's own help (exit 0) or usage error (exit 2)."""
    if rest and rest[0] in BENCH_SUBCOMMANDS:
        return rest[1:]
    parser = _bench_parser()
    if rest and rest[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(ExitCode.OK)
    parser.print_usage(sys.stderr)
    what = f"unknown benchmark {rest[0]!r}" if rest else "name a benchmark"
    print(f"pixelrelay bench: error: {what} (choose from {', '.join(BENCH_SUBCOMMANDS)})", file=sys.stderr)
    raise SystemExit(ExitCode.USAGE)


def _delegate(argv: list[str]) -> int:
    import importlib

    name, rest = argv[0], argv[1:]
    module = DELEGATED[name]
    if name == "bench":
        module = BENCH_MODULES.get(rest[0], module) if rest else module
        rest = _bench_argv(rest)
    try:
        return int(importlib.import_module(module).main(rest))
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


COMMANDS = {
    "submit": _cmd_submit,
    "status": _cmd_status,
    "cancel": _cmd_cancel,
    "jobs": _cmd_jobs,
    "worker": _cmd_worker,
    "exporter": _cmd_exporter,
    "health": _cmd_health,
    "run": _cmd_run,
    "report": _cmd_report,
    "gc": _cmd_gc,
    "demo": _cmd_demo,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return _delegate(argv)
    args = build_parser().parse_args(argv)
    from pixelrelay import logs

    try:
        logs.configure(getattr(args, "log_format", None), logging.INFO)
    except logs.LogFormatError as exc:
        print(f"pixelrelay {args.command}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    from redis.exceptions import ConnectionError as RedisConnectionError

    from pixelrelay.pipeline.signing import SignatureError
    from pixelrelay.pipeline.storage import StorageError
    from pixelrelay.producer.listing import InputError

    try:
        return COMMANDS[args.command](args)
    except StorageError as exc:
        print(f"pixelrelay {args.command}: storage error: {exc}", file=sys.stderr)
        return ExitCode.STORAGE
    except (ConfigError, InputError, SignatureError) as exc:
        print(f"pixelrelay {args.command}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except RedisConnectionError as exc:
        print(f"pixelrelay {args.command}: {_unreachable(args, exc)}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
