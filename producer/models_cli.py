"""``pixelrelay models list|pull``: see and fetch the weights the stage backends need.

``list`` never touches the network; ``pull`` fills the Hugging Face cache so that workers
start offline. What a backend loads comes from its class (``default_model``, ``extra``,
``models_for``), so plugins are listed like built-ins; listing imports no torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable

from pixelrelay.exitcodes import ExitCode
from pixelrelay.pipeline import constants as C
from pixelrelay.pipeline import hf
from pixelrelay.pipeline.stages import registry
from pixelrelay.pipeline.stages.base import StageSpec

STAGES = ("encoder", "planner", "decoder")
DEFAULTS = {"encoder": C.DEFAULT_ENCODER, "planner": C.DEFAULT_PLANNER, "decoder": C.DEFAULT_DECODER}


def _missing_extra(cls: type) -> str | None:
    """The extra a backend class needs when it is not installed, else None."""
    extra = getattr(cls, "extra", None)
    if not extra:
        return None
    return None if importlib.util.find_spec(extra) is not None else extra  # found, not imported


def configured_specs(args: argparse.Namespace) -> dict[str, str]:
    out = {}
    for stage in STAGES:
        flag = getattr(args, stage, None)
        out[stage] = flag or os.environ.get(f"PIXELRELAY_{stage.upper()}") or DEFAULTS[stage]
    return out


def _status(cls: type, model: str, settings=None) -> str:
    """A backend's own ``model_status(model, max_bytes)`` (single-file checkpoints: present
    with architecture, scale and size), else the hub / folder check."""
    own = getattr(cls, "model_status", None)
    if own is not None:
        return own(model, settings.checkpoint_max_bytes) if settings is not None else own(model)
    folder = hf.local_snapshot(model)
    if folder is None:
        return "missing"
    return "present" if hf.model_present(model) else "incomplete"


def _settings():
    """The environment's settings, or None when they do not validate (listing still works)."""
    from pixelrelay.pipeline.settings import Settings

    try:
        return Settings.from_env()
    except ValueError:
        return None


def cmd_list(args: argparse.Namespace) -> int:
    configured = configured_specs(args)
    settings = _settings()
    rows: list[tuple[str, str, str, str, str]] = []
    missing_configured: list[str] = []
    for stage in STAGES:
        conf = StageSpec.parse(configured.get(stage, DEFAULTS.get(stage, "")))
        for kind in registry.known_backends(stage):
            mark = "*" if conf.kind == kind else ""
            cls = registry.backend_class(stage, kind)
            default_models = cls.models_for(None)
            conf_models = cls.models_for(conf.model) if conf.kind == kind else []
            if not default_models and not conf_models:
                what = (
                    "names its checkpoints in the spec" if hasattr(cls, "model_status") else "built-in, nothing to pull"
                )
                rows.append((stage, kind + mark, "-", what, ""))
                continue
            needs = _missing_extra(cls)
            for model in dict.fromkeys(default_models + conf_models):
                status = _status(cls, model, settings) + (f" (needs {needs})" if needs else "")
                tags = [
                    t for t, hit in (("default", model in default_models), ("configured", model in conf_models)) if hit
                ]
                rows.append((stage, kind + mark, model, status, ", ".join(tags)))
                if model in conf_models and (needs or not status.startswith("present")):
                    missing_configured.append(f"{stage} {kind}:{model}")
    for line in table(rows, _width()):
        print(line)
    print()
    print("configured (*): " + "  ".join(f"{s}={configured[s]}" for s in STAGES))
    print(f"hub cache: {hf.hub_cache_dir()}{'  (HF_HUB_OFFLINE=1)' if hf.hub_offline() else ''}")
    if missing_configured:
        print("missing: " + "; ".join(missing_configured) + " -- fetch with `pixelrelay models pull SPEC`")
        if args.check:
            return ExitCode.MODELS_MISSING
    return ExitCode.OK


HEADER = ("stage", "backend", "model", "status", "")


def _width() -> int | None:
    """The width to fit the table in: ``COLUMNS``, else the terminal's; None (one line per
    row, for scripts) when stdout is not a terminal and ``COLUMNS`` is not set."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def table(rows: list[tuple[str, str, str, str, str]], width: int | None) -> list[str]:
    """``rows`` as aligned columns; wider than ``width``, each model goes on a line of its
    own under its row (stage, backend, status, tags)."""
    widths = [max(len(r[i]) for r in [*rows, HEADER]) for i in range(4)]
    wide = [
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:<{widths[3]}}  {r[4]}".rstrip()
        for r in [HEADER, *rows]
    ]
    if width is None or max(map(len, wide)) <= width:
        return wide
    lines = [f"{'stage':<{widths[0]}}  {'backend':<{widths[1]}}  status"]
    indent = " " * (widths[0] + 4)
    for r in rows:
        lines.append(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {'  '.join(x for x in (r[3], r[4]) if x)}".rstrip())
        if r[2] != "-":
            lines.append(f"{indent}model {r[2]}")
    return lines


def cmd_pull(args: argparse.Namespace) -> int:
    status = ExitCode.OK
    for raw in args.specs:
        try:
            spec = StageSpec.parse(raw)
        except ValueError as exc:
            print(f"pixelrelay models pull: {exc}", file=sys.stderr)
            return ExitCode.USAGE
        stage = registry.stage_of(spec.kind)
        if stage is None:
            known = ", ".join(sorted({k for st in STAGES for k in registry.known_backends(st)}))
            print(f"pixelrelay models pull: unknown backend {spec.kind!r}; known: {known}", file=sys.stderr)
            return ExitCode.USAGE
        cls = registry.backend_class(stage, spec)
        models = cls.models_for(spec.model)
        if not models:
            print(f"{stage} {spec.kind}: built-in, nothing to pull")
            continue
        needs = _missing_extra(cls)
        if needs:
            print(f"note: {spec.kind} also needs the {needs} package (pip install 'pixelrelay[{needs}]')")
        pull_own = getattr(cls, "pull_model", None)  # a backend that fetches its own (single-file checkpoints)
        for model in models:
            if pull_own is not None:
                status = max(status, _pull_own(pull_own, stage, spec.kind, model))
                continue
            if hf.model_present(model):
                print(f"{stage} {spec.kind}:{model}: present at {hf.local_snapshot(model)}")
                continue
            if hf.is_local_model(model):
                print(f"{stage} {spec.kind}:{model}: local folder missing or incomplete", file=sys.stderr)
                status = ExitCode.MODELS_MISSING
                continue
            if hf.hub_offline():
                print(
                    f"{stage} {spec.kind}:{model}: missing, and HF_HUB_OFFLINE=1 forbids downloading", file=sys.stderr
                )
                status = ExitCode.MODELS_MISSING
                continue
            try:
                path = hf.pull_model(model)
            except Exception as exc:  # network, auth, unknown repo: report and go on
                print(f"{stage} {spec.kind}:{model}: download failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                status = ExitCode.MODELS_MISSING
                continue
            print(f"{stage} {spec.kind}:{model}: pulled to {path}")
    return status


def _pull_own(pull_model: Callable[[str], str], stage: str, kind: str, model: str) -> ExitCode:
    try:
        path = pull_model(model)
    except Exception as exc:  # network, auth, unknown repo or file: report and go on
        print(f"{stage} {kind}:{model}: not pulled: {type(exc).__name__}: {exc}", file=sys.stderr)
        return ExitCode.MODELS_MISSING
    print(f"{stage} {kind}:{model}: present at {path}")
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    from pixelrelay.producer.cli import Parser

    parser = Parser(prog="pixelrelay models", description="List and fetch backend model weights.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_list = sub.add_parser("list", help="backends, configured specs and which models are present")
    for stage in STAGES:
        kinds = ", ".join(registry.known_backends(stage))
        p_list.add_argument(
            f"--{stage}",
            metavar="SPEC",
            help=f"{stage} spec KIND[:MODEL], KIND one of {kinds} "
            f"(default: env PIXELRELAY_{stage.upper()}, else {DEFAULTS[stage]})",
        )
    p_list.add_argument("--check", action="store_true", help="exit 6 when a configured model is missing")
    p_pull = sub.add_parser("pull", help="download models into the Hugging Face cache")
    p_pull.add_argument("specs", nargs="+", metavar="SPEC", help="KIND[:MODEL], e.g. hf-llm:Qwen/Qwen2.5-0.5B-Instruct")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"list": cmd_list, "pull": cmd_pull}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
