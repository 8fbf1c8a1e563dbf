"""`maskbit-run serve --ray-serve`: the HTTP server scaled out as Ray Serve replicas (extras `[serve]` and
`[distributed]`); imported only when Ray Serve is asked for.

Each replica loads the bundle itself and runs its own Engine (its own slot scheduler) behind the same FastAPI app
as the plain server (`serve_app.create_app`, built on the replica through Ray Serve's late-bound ingress, so the
app's lifespan warms the engine up before the replica takes traffic). Ray Serve's proxy routes requests to the
replicas and restarts a replica whose process dies or whose health check (the engine's loop thread) fails. A
request in flight on a replica that dies ends with Ray Serve's 5xx; the client retries (images depend only on
(seed, index), so a retry gives the same images on any replica).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from .errors import InputError, MaskbitError, require

APP_NAME = "maskbit"                 # the Serve application
DEPLOYMENT = "MaskbitReplica"        # its one deployment
HEALTH_PERIOD_S = 5.0                # Ray Serve calls `check_health` this often ...
HEALTH_TIMEOUT_S = 30.0              # ... and restarts a replica that fails it or does not answer within this


class RayServeError(MaskbitError, RuntimeError):
    """Ray Serve could not start the application (the first replica failure's reason is in the message)."""


def require_serve():
    require("ray", "distributed", "maskbit-run serve --ray-serve")
    return require("ray.serve", "distributed", "maskbit-run serve --ray-serve")


class ReplicaApp:
    """One Ray Serve replica: its Pipelines, loaded from the bundles on this replica's node, their Engines and the
    app. Wrapped by `serve.ingress()` (late-bound: Ray Serve calls `__serve_build_asgi_app__` after `__init__`,
    then runs the app's lifespan, which warms the engines up and starts them, before the replica takes traffic)."""

    def __init__(self, bundles: dict[str, str], backend: str, load_options: dict, engine_options: dict):
        from .pipeline import Pipeline
        self.pipelines = {}
        for name, path in bundles.items():
            self.pipelines[name] = Pipeline.load(path, backend=backend, **load_options)
            # One 1-step image opens every session here: a bundle that cannot run fails the constructor, whose
            # error Ray Serve reports; a failure in the app's warm-up (lifespan) would reach only the replica log.
            self.pipelines[name].generate([0], num_steps=1)
        self.backend, self.engine_options = backend, engine_options
        self.engines: list = []

    def __serve_build_asgi_app__(self):
        from .serve_app import create_app
        one = len(self.pipelines) == 1           # one bundle: the app the plain server makes of one pipeline
        app = create_app(next(iter(self.pipelines.values())) if one else self.pipelines, self.backend,
                         **self.engine_options)
        models = getattr(app.state, "models", None)
        self.engines = [model.engine for model in models.values()] if models else [app.state.engine]
        return app

    def check_health(self) -> None:
        """Ray Serve's health check: every engine started and its loop thread alive (a failure restarts the
        replica)."""
        for engine in self.engines or [None]:
            if engine is None or not engine.alive:
                raise RuntimeError("the serving engine is not running")

    def pid(self) -> int:
        """This replica's process id (for operators and the SIGKILL test; through a deployment handle)."""
        return os.getpid()

    def __del__(self):
        for pipeline in getattr(self, "pipelines", {}).values():
            pipeline.close()


def _bundles(bundle) -> dict[str, str]:
    """One bundle path, or {name: path}: absolute paths (replicas do not share this process's directory), each
    manifest checked here so a bad bundle fails in one line before any replica starts."""
    from .manifest import Manifest
    named = dict(bundle) if isinstance(bundle, Mapping) else {Path(bundle).name or "bundle": bundle}
    if not named:
        raise InputError("no bundle to serve")
    for path in named.values():
        Manifest.load(path)
    return {name: str(Path(path).resolve()) for name, path in named.items()}


def deployment(bundle, *, replicas: int = 1, backend: str = "ort", gpus_per_replica: float = 0.0,
               cpus_per_replica: float = 1.0, threads: int | None = None, grace: float = 30.0,
               load_options: dict | None = None, **engine_options):
    """The bound Serve application: `replicas` copies of ReplicaApp over `bundle` (a path, or {name: path}), each
    reserving `cpus_per_replica` CPUs (0 is allowed) and `gpus_per_replica` GPUs; ONNX Runtime gets `threads`
    intra-op threads per replica (default: cpus_per_replica rounded, at least 1). A replica takes as many
    concurrent requests as its engines can hold or queue, so its own queue (503 when full) decides, not Ray
    Serve's default of 5 per replica."""
    serve = require_serve()
    from .manifest import Manifest
    from .specs import STEP
    if replicas < 1:
        raise InputError(f"--replicas must be at least 1, got {replicas}")
    bundles = _bundles(bundle)
    load_options = dict(load_options or {})
    if backend == "ort":
        load_options.setdefault("threads", threads or max(1, round(cpus_per_replica)))
    slots = engine_options.get("max_batch") or max(Manifest.load(path).max_batch(STEP.name)
                                                   for path in bundles.values())
    ongoing = len(bundles) * (slots + engine_options.get("max_queue", 256))
    options = dict(name=DEPLOYMENT, num_replicas=replicas, max_ongoing_requests=ongoing,
                   health_check_period_s=HEALTH_PERIOD_S, health_check_timeout_s=HEALTH_TIMEOUT_S,
                   graceful_shutdown_timeout_s=max(grace, 1.0), graceful_shutdown_wait_loop_s=1.0,
                   ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica})
    ingress = serve.ingress()(ReplicaApp)
    return serve.deployment(**options)(ingress).bind(bundles, backend, load_options, engine_options)


def start(bundle, address: str | None = None, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning",
          **options) -> bool:
    """Join Ray at `address` ('auto', ray://host:port; None or 'local': start one here), start Serve's HTTP
    proxy on host:port and run the application until every replica is warmed up. True when this call started
    Ray (`stop` then ends it). Serve already running on a cluster keeps its own host and port."""
    from .runs_ray import connect
    serve = require_serve()
    if not 0 < port < 65536:
        raise InputError(f"--port {port}: Ray Serve needs a fixed port (1-65535)")
    application = deployment(bundle, **options)  # checks the bundles and options before Ray starts
    started_ray = connect(address or None)
    logs = {"log_level": log_level.upper()}
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config=logs)
        serve.run(application, name=APP_NAME, route_prefix="/", logging_config=logs)
    except BaseException as exc:
        if not isinstance(exc, Exception):      # Ctrl-C while replicas start: leave no Ray behind
            stop(started_ray)
            raise
        reason = _failure(serve) or str(exc)
        stop(started_ray)
        lines = [line for line in reason.strip().splitlines() if line.strip()]
        raise RayServeError(f"Ray Serve could not start {APP_NAME}: {lines[-1] if lines else type(exc).__name__}") \
            from None
    return started_ray


def _failure(serve) -> str | None:
    """The deployment's own failure message (the replica's exception), which serve.run's error leaves out."""
    try:
        app = serve.status().applications.get(APP_NAME)
        return app.deployments[DEPLOYMENT].message if app and DEPLOYMENT in app.deployments else None
    except Exception:                            # Serve itself failed: the caller's message stands
        return None


def stop(started_ray: bool) -> None:
    """Delete the application (its replicas drain for up to their grace period); when this process started Ray,
    shut Serve and Ray down too."""
    import ray
    serve = require_serve()
    if not ray.is_initialized():
        return
    try:
        serve.delete(APP_NAME)
    finally:
        if started_ray:
            serve.shutdown()
            ray.shutdown()


def replica_states() -> dict[str, int]:
    """Ray Serve's count of this application's replicas by state ({"RUNNING": 2}, ...)."""
    serve = require_serve()
    app = serve.status().applications.get(APP_NAME)
    if app is None or DEPLOYMENT not in app.deployments:
        return {}
    return {str(state): count for state, count in app.deployments[DEPLOYMENT].replica_states.items()}


def replica_pid(timeout: float = 30.0) -> int:
    """The process id of one replica (whichever Ray Serve routes the call to)."""
    serve = require_serve()
    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP_NAME)
    return handle.pid.remote().result(timeout_s=timeout)


def serve_on_ray(bundle, address: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                 on_ready: Callable[[str], None] | None = None, **options) -> None:
    """Serve on Ray Serve until SIGTERM or SIGINT (`on_ready(url)` once every replica is up), then delete the
    application, its replicas draining for `grace` seconds (and shut down the Ray this call started)."""
    started_ray = start(bundle, address, host, port, **options)
    # After ray.init, which installs its own SIGTERM handlers (Python's sys.exit and a C++ one that aborts the
    # process 3 s later): ours replace both, so the shutdown below may take its time.
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if on_ready is not None:
            on_ready(f"http://{host}:{port}")
        while not stopping.wait(1.0):
            pass
    finally:
        try:
            stop(started_ray)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
