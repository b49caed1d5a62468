"""``tokenskip serve --config serving/serve_config.yaml [key=value ...]``: run the Serve app locally.

Reads a Serve config file (the same one ``serve run`` / ``serve deploy`` take), starts
(or connects to, with RAY_ADDRESS) Ray, starts Serve with the file's ``http_options``,
runs each application through its builder with its ``args`` (``key=value`` overrides
apply to the first application's args), and blocks until Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from tokenskip.config import ConfigError, apply_overrides, read_yaml

log = logging.getLogger("tokenskip.serving")


def _builder(import_path: str):
    """``pkg.mod:attr`` (or ``pkg.mod.attr``) -> the object."""
    mod, sep, attr = import_path.partition(":")
    if not sep:
        mod, _, attr = import_path.rpartition(".")
    return getattr(importlib.import_module(mod), attr)


def load_serve_config(path: str, overrides: list[str] = ()) -> dict:
    """The Serve config file with ``overrides`` applied to the first application's args."""
    data = read_yaml(path)
    apps = data.get("applications")
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"{path}: a Serve config needs a non-empty 'applications' list")
    for i, app in enumerate(apps):
        if not isinstance(app, dict) or not app.get("import_path"):
            raise ConfigError(f"{path}: applications[{i}] needs an import_path")
    apps[0]["args"] = apply_overrides(apps[0].get("args") or {}, overrides)
    return data


def check_apps(conf: dict, host: str) -> list[str]:
    """Refuse what must not start, before Ray does: a tokenskip app whose configured API-key
    source yields no keys (``ConfigError`` naming the variable). Returns the warnings to print
    (an endpoint beyond loopback without keys, a configured local adapter that is not there)."""
    from serving.adapters import adapter_start_warnings
    from serving.app import build_app, open_endpoint_warning
    from serving.config import ServeAppConfig

    warnings = []
    for i, app in enumerate(conf["applications"]):
        if _builder(app["import_path"]) is not build_app:
            continue
        try:
            cfg = ServeAppConfig.from_dict(app.get("args") or {})
            keys = cfg.valid_api_keys()
        except ConfigError as e:
            raise ConfigError(f"applications[{i}] ({app.get('name', 'default')}): {e}") from None
        warning = open_endpoint_warning(host, keys is not None)
        if warning:
            warnings.append(warning)
        warnings += adapter_start_warnings(cfg)
    return warnings


def start_ray(num_cpus: float | None = None, runtime_env: dict | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS, else start a local single-node Ray on 127.0.0.1
    (its workers inherit this process's environment: offline caches, vLLM-CPU settings)."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"include_dashboard": False, "log_to_driver": True}
    if runtime_env:
        kwargs["runtime_env"] = runtime_env
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
        ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)
    log.info("ray resources: %s", ray.cluster_resources())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tokenskip serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "-c", default="serving/serve_config.yaml", help="Serve config YAML")
    p.add_argument("--host", default=None, help="override http_options.host")
    p.add_argument("--port", type=int, default=None, help="override http_options.port")
    p.add_argument("--num-cpus", type=float, default=None, help="local Ray only: CPUs to declare")
    p.add_argument("overrides", nargs="*", help="app args overrides, e.g. model=smollm2-135m-instruct")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        conf = load_serve_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"tokenskip serve: error: {e}", file=sys.stderr)
        return 2
    http = dict(conf.get("http_options") or {})
    http.setdefault("host", "127.0.0.1")
    if args.host:
        http["host"] = args.host
    if args.port:
        http["port"] = args.port
    try:
        warnings = check_apps(conf, http["host"])
    except ConfigError as e:
        print(f"tokenskip serve: error: {e}", file=sys.stderr)
        return 2
    for warning in warnings:
        log.warning(warning)
        print(warning, file=sys.stderr, flush=True)

    from ray import serve

    stop = threading.Event()  # SIGTERM stops cleanly from here on (also while Ray and the apps start)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    start_ray(args.num_cpus, conf["applications"][0].get("runtime_env"))
    serve.start(http_options=http)
    for app in conf["applications"]:
        target = _builder(app["import_path"])(app.get("args") or {})
        serve.run(target, name=app.get("name", "default"), route_prefix=app.get("route_prefix", "/"), blocking=False)
    print(
        f"tokenskip serve: OpenAI API at http://{http['host']}:{http.get('port', 8000)}/v1 (Ctrl-C stops)", flush=True
    )
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # again: ray.init may have installed its own handler
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
