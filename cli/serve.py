"""`kosmos-g serve`: run the HTTP service (Ray Serve) on the local stack's Ray or a local Ray.

    kosmos-g serve --preset tiny                 # demo model, no training needed
    kosmos-g serve                               # newest registered kosmos-g (tiny demo until one exists)
    kosmos-g serve --model models:/kosmos-g@current --set http.port=8001
    kosmos-g serve --serve-config infra/serve/kosmos-g.yaml --detach
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


def register(subparsers) -> None:
    from kosmos_g.serve.config import PRESETS

    parser = subparsers.add_parser(
        "serve", help="serve Kosmos-G over HTTP (Ray Serve)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    PRESETS.add_arguments(parser, default="local")
    parser.add_argument("--model", default=None, metavar="URI",
                        help="models:/kosmos-g@ALIAS, models:/kosmos-g/latest, s3://... or a local bundle "
                             "(default: the newest registered kosmos-g)")
    parser.add_argument("--serve-config", default=None, metavar="YAML",
                        help="a Serve config file (infra/serve/kosmos-g.yaml): its http_options, application "
                             "args and deployment settings; --model/--set/--host/--port apply on top")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    parser.add_argument("--detach", action="store_true",
                        help="return once the service is up; it keeps running on the Ray cluster")
    parser.add_argument("--stop", action="store_true",
                        help="delete the running application (and Serve, when no other application is left) and exit")
    parser.set_defaults(func=run)


def resolve_config(args: argparse.Namespace):
    """(ServeConfig, deployment overrides) from the preset or Serve YAML, then the flags."""
    from kosmos_g.platform.config import apply_overrides
    from kosmos_g.serve.app import config_from_args
    from kosmos_g.serve.config import PRESETS, with_model_uri

    overrides: dict[str, dict] = {}
    if args.serve_config:
        http, app_args, overrides = read_serve_config(args.serve_config)
        config = apply_overrides(config_from_args(app_args), args.overrides)
        config.http.host = http.get("host", config.http.host)
        config.http.port = int(http.get("port", config.http.port))
    else:
        config = PRESETS.from_args(args)
    config = with_model_uri(config, args.model)
    if args.host:
        config.http.host = args.host
    if args.port:
        config.http.port = args.port
    return config, overrides


def read_serve_config(path: str) -> tuple[dict, dict, dict[str, dict]]:
    """(http_options, args, {deployment name: options}) of the file's kosmos-g application."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    applications = data.get("applications") or []
    if len(applications) != 1:
        raise ValueError(f"{path}: expected exactly one application, found {len(applications)}")
    application = applications[0]
    deployments = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in application.get("deployments", [])}
    return data.get("http_options") or {}, application.get("args") or {}, deployments


def run(args: argparse.Namespace) -> int:
    from kosmos_g.platform.config import ConfigError, to_yaml

    try:
        config, overrides = resolve_config(args)
    except (ConfigError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    import ray
    from ray import serve

    from kosmos_g.platform.stack import cluster

    embedded = ray.is_initialized()  # e.g. tests: someone else owns this Ray
    on_cluster = embedded or cluster.ray_address() is not None
    cluster.connect()
    if args.stop:
        _stop(config.app_name)
        return 0
    if args.detach and not on_cluster:
        print("error: --detach needs a running Ray cluster (kosmos-g local up; eval \"$(kosmos-g local env)\"): "
              "a Ray started by this command ends with it", file=sys.stderr)
        return 2
    return _serve(config, overrides, args.detach, owns_ray=not on_cluster)


def _stop(app_name: str) -> None:
    """Delete the application; with no other application left, stop Serve itself. A Serve
    controller and HTTP proxy left idle keep polling (≈ 3% of a core on the local stack, taken
    from whatever trains next) and hold the HTTP port."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        serve.delete(app_name)
    except RayServeException:  # Serve is not running: nothing to stop
        print(f"{app_name} is not running (no Serve instance on this Ray cluster)", file=sys.stderr)
        return
    others = sorted(serve.status().applications)
    if others:
        print(f"stopped {app_name}; Serve keeps running for {', '.join(others)}", file=sys.stderr)
        return
    serve.shutdown()
    print(f"stopped {app_name} and Serve (no application left)", file=sys.stderr)


def _serve(config, overrides: dict, detach: bool, owns_ray: bool) -> int:
    from ray import serve

    from kosmos_g.platform.stack import cluster
    from kosmos_g.serve.app import build_app
    from kosmos_g.serve.model_source import ModelNotFound

    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    try:
        application = build_app(config, overrides)
    except ModelNotFound as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    serve.run(application, name=config.app_name, route_prefix=config.route_prefix)
    prefix = config.route_prefix.rstrip("/")
    url = f"http://{config.http.host}:{config.http.port}{prefix}"
    print(f"kosmos-g is serving at {url}  (API docs: {url}/docs)", file=sys.stderr, flush=True)
    if detach:
        print("detached; stop it with: kosmos-g serve --stop", file=sys.stderr)
        return 0
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        print("stopping...", file=sys.stderr, flush=True)
        _stop(config.app_name)
        if owns_ray:
            cluster.shutdown()
    return 0
