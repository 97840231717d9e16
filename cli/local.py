"""`kosmos-g local up|down|status|env`: the embedded local stack."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("local", help="run the local stack (S3, MLflow, Ray head) on 127.0.0.1")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, help_text in [
        ("up", "start SeaweedFS, MLflow and a Ray head (idempotent)"),
        ("down", "stop what `up` started"),
        ("status", "tell what runs"),
        ("env", "print `export` lines: eval \"$(kosmos-g local env)\""),
    ]:
        action = actions.add_parser(name, help=help_text)
        action.add_argument("--state-dir", default=None, help="state directory (default: <repo>/.kosmos)")
        action.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override the stack config, e.g. --set ports.mlflow=5001")
        if name == "status":
            action.add_argument("--json", action="store_true")
        if name == "up":
            action.add_argument("--worker-nodes", type=int, default=None, metavar="N",
                                help="also start N Ray worker nodes on this machine (a multi-node cluster "
                                     "on one host; same as --set worker_nodes=N)")
        action.set_defaults(func=run)


def _stack(args: argparse.Namespace):
    from kosmos_g.platform.config import apply_overrides
    from kosmos_g.platform.stack.localstack import LocalStack, LocalStackConfig

    overrides = list(args.overrides)
    if getattr(args, "worker_nodes", None) is not None:
        overrides.append(f"worker_nodes={args.worker_nodes}")
    return LocalStack(args.state_dir, apply_overrides(LocalStackConfig(), overrides))


def run(args: argparse.Namespace) -> int:
    from kosmos_g.platform.config import ConfigError
    from kosmos_g.platform.stack.localstack import describe_failure, export_lines

    try:
        stack = _stack(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.action == "env":
        print(export_lines(stack.env()))
        return 0
    if args.action == "status":
        report = stack.status()
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for name, item in report.items():
                state = "ready" if item["ready"] else ("running, not ready" if item["running"] else "stopped")
                where = f" at {item['url']} (pid {item['pid']})" if item["running"] else ""
                print(f"{name:12s} {state}{where}")
        return 0 if all(item["ready"] for item in report.values()) else 1
    if args.action == "down":
        stack.down()
        return 0
    try:
        stack.up(log=lambda line: print(line, file=sys.stderr, flush=True))
    except Exception as error:  # one clear line instead of a traceback
        print(f"error: local stack failed to start: {describe_failure(error)}", file=sys.stderr)
        return 1
    print('local stack is up; prepare a shell with:  eval "$(kosmos-g local env)"', file=sys.stderr)
    return 0
