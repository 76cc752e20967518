"""`gptoss-ray serve`: start a local Ray cluster and the OpenAI-compatible app; block.

`gptoss-ray serve [MODEL]` as `vllm serve MODEL` (or `--model`); no model: the built-in tiny demo checkpoint (written on first run to a cache dir).
The API key comes from --api-key, --api-key-file or $GPTOSS_RAY_API_KEY (in that order).
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from gptoss_ray.errors import ConfigError, GptOssError
from gptoss_ray.serve.config import API_KEY_ENV, DEFAULT_ENGINE_CLS, ServeConfig, serve_logging

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="checkpoint directory or hub id, as vLLM's `serve MODEL` (same as --model)")
    parser.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the tiny demo)")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="the `model` names clients may send, all listed in /v1/models; the first names "
                        "responses and metrics (default: from MODEL)")
    parser.add_argument("--ep-size", type=int, default=1, help="expert-parallel workers per model instance")
    parser.add_argument("--num-replicas", type=int, default=1, help="model instances")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + output (beyond the model's context only with "
                        "GPTOSS_RAY_ALLOW_LONG_MAX_MODEL_LEN=1)")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="most sequences running at once")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=None,
                        help="KV cache budget per GPU (default 1 unless --gpu-memory-utilization is given)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="FRACTION",
                        help="fraction of each GPU's memory (CPU: of the host's RAM, shared by the workers) for "
                        "weights, activations and KV; the KV cache gets the rest (not with --kv-cache-memory-gb)")
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks per GPU (overrides the budget)")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 16)")
    parser.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                        help="do not reuse KV blocks of shared prompt prefixes")
    parser.add_argument("--dequantize-experts", action=argparse.BooleanOptionalAction, default=None,
                        help="unpack MXFP4 experts at load to float32: faster on CPU, 8x their memory "
                        "(default: on CPU when they fit in a quarter of free memory, never on GPUs)")
    parser.add_argument("--enforce-eager", action="store_true", default=None,
                        help="no CUDA graphs: every decode step runs eagerly (vLLM's flag)")
    parser.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None, metavar="N",
                        help="decode batch sizes to pad to and capture (default 1 2 4 8 16 24 ... up to max-num-seqs)")
    parser.add_argument("--worker-num-cpus", type=float, default=None, help="logical CPUs per worker actor")
    parser.add_argument("--max-queued-requests", type=int, default=None,
                        help="requests waiting beyond max-num-seqs before 429 (bounded queue)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help=f"require this bearer key (or set ${API_KEY_ENV})")
    parser.add_argument("--api-key-file", default=None, help="read the bearer key from this file")
    parser.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                        help="CORS: browser origins allowed to call the API ('*' = any; default none)")
    parser.add_argument("--log-level", default=argparse.SUPPRESS, type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        help="level of gptoss-ray's and Ray Serve's loggers here and in every replica "
                        "(INFO shows one line per request; default: Ray Serve's own levels)")
    parser.add_argument("--disable-log-requests", action="store_true",
                        help="no per-request log lines (Ray Serve's access logs, the ingress's request lines)")
    parser.add_argument("--responses-store", default=None,
                        help="stored /v1/responses: sqlite:///PATH (default: under the cache dir), "
                        "postgresql://... (shared by replicas) or none")
    parser.add_argument("--responses-ttl", type=_duration, default=None,
                        help="how long stored responses are kept: seconds, or with a unit (90m, 12h, 30d; default 30d)")
    parser.add_argument("--engine-cls", default=None, help="module:Class of the engine (testing)")
    parser.add_argument("--num-cpus", type=float, default=None, help="logical CPUs of the local Ray cluster")


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    scale = units.get(text[-1:].lower(), 1) if text else 1
    number = text[:-1] if text[-1:].lower() in units else text
    try:
        value = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 3600, 90m, 12h, 30d)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the duration must be positive")
    return value


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    if args.model_tag and args.model and args.model_tag != args.model:
        raise ConfigError(f"MODEL {args.model_tag!r} and --model {args.model!r} disagree; give one")
    model = args.model_tag or args.model
    engine = {"model": model, "ep_size": args.ep_size, "dtype": args.dtype, "device": args.device}
    for name in ("max_model_len", "max_num_seqs", "worker_num_cpus", "max_num_batched_tokens",
                 "kv_cache_memory_gb", "gpu_memory_utilization", "num_kv_blocks", "block_size",
                 "enable_prefix_caching", "dequantize_experts", "enforce_eager", "cuda_graph_sizes"):
        if getattr(args, name) is not None:
            engine[name] = getattr(args, name)
    serve_args = {"engine": engine, "served_model_name": args.served_model_name, "api_key": args.api_key,
                  "api_key_file": args.api_key_file, "num_replicas": args.num_replicas,
                  "host": args.host, "port": args.port, "allowed_origins": args.allowed_origins or [],
                  "log_level": getattr(args, "log_level", None), "disable_log_requests": args.disable_log_requests}
    if args.max_queued_requests is not None:
        serve_args["max_queued_requests"] = args.max_queued_requests
    if args.engine_cls:
        serve_args["engine_cls"] = args.engine_cls
    if args.responses_store is not None:
        serve_args["responses_store"] = args.responses_store
    if args.responses_ttl is not None:
        serve_args["responses_ttl_s"] = args.responses_ttl
    return ServeConfig.from_args(serve_args)


def check_listen_address(host: str, port: int) -> None:
    """The HTTP address is usable and free, or a ConfigError saying why. Ray's proxy binds
    with SO_REUSEPORT, so a second server on a taken port would start and share the
    traffic with the first; this plain bind (no SO_REUSEPORT) fails instead."""
    if host.replace(".", "").isdigit():  # dotted numbers: an IPv4 address or a typo, never a name to resolve
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"--host {host}: not a valid IPv4 address") from None
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError):
        raise ConfigError(f"--host {host}: not an address or a known host name") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are not a conflict
        try:
            sock.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is taken (another server listens there); "
                                  "stop it or choose another --port") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"--host {host}: not an address of this machine") from None
            if e.errno == errno.EACCES:
                raise ConfigError(f"port {port} needs privileges; choose one above 1023") from None
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def preflight(config: ServeConfig) -> None:
    """What `serve` can find wrong in seconds, before Ray starts and a replica fails three
    times with a long traceback: the listen address, the checkpoint (located and its
    tensor shapes checked without loading them) and max_model_len against its context."""
    check_listen_address(config.host, config.port)
    if config.engine_cls != DEFAULT_ENGINE_CLS:  # another engine: its model field is its own business
        return
    from gptoss_ray.checkpoint import CheckpointReader, default_demo_checkpoint, locate
    from gptoss_ray.config import check_max_model_len

    path = locate(config.engine.model) if config.engine.model else default_demo_checkpoint()
    check_max_model_len(config.engine, CheckpointReader(path).config)


class HeldOutput:
    """Everything this process writes to stdout/stderr (Ray's start-up lines and the
    replicas' logs Ray forwards, tracebacks of a failed load included) goes to a file
    while held. `release()` replays it to stderr and removes the file; `drop()` keeps the
    file, so `serve` can say one line and where the details are."""

    def __init__(self) -> None:
        self._log = tempfile.NamedTemporaryFile(prefix="gptoss-ray-serve-", suffix=".log", delete=False)
        self.path = Path(self._log.name)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved: tuple[int, int] | None = (os.dup(1), os.dup(2))
        os.dup2(self._log.fileno(), 1)
        os.dup2(self._log.fileno(), 2)

    def drop(self) -> None:
        if self._saved is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        self._saved = None
        self._log.close()

    def release(self) -> None:
        if self._saved is None:
            return
        self.drop()
        sys.stderr.write(self.path.read_text(errors="replace"))
        sys.stderr.flush()
        self.path.unlink(missing_ok=True)


def deploy_failure(error: Exception) -> str:
    """The replica's own error, one line: the last line of the failed deployment's message
    (its traceback's exception line), else the first line of Serve's error."""
    from ray import serve

    try:
        app = serve.status().applications.get("gptoss")
        messages = [d.message for d in app.deployments.values() if d.message] if app else []
    except Exception:  # the controller may be gone: Serve's own error is all there is
        messages = []
    for message in messages:
        lines = [x.strip() for x in message.strip().splitlines() if x.strip()]
        if lines:
            return lines[-1][:300]
    return str(error).strip().splitlines()[0][:300]


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    preflight(config)
    import ray
    from ray import serve

    from gptoss_ray.serve.app import build_app

    init = {"include_dashboard": False}
    if args.num_cpus is not None:
        init["num_cpus"] = args.num_cpus
    print(f"gptoss-ray: starting Ray and loading '{config.model_name}' (Ctrl-C stops)", flush=True)
    # Until the app serves, Ctrl-C raises KeyboardInterrupt here (Python's default handler),
    # which stops Ray and with it a model still loading; afterwards it ends the wait below.
    stop = threading.Event()
    deployed = False
    # A replica that fails to load is retried by Serve, each failure a long traceback Ray
    # forwards here: hold the output while deploying, stop Ray (and the forwarding) before
    # letting go of it, and say one line.
    held = HeldOutput()
    try:
        ray.init(**init)
        serve.start(http_options={"host": config.host, "port": config.port}, logging_config=serve_logging(config))
        try:
            serve.run(build_app(config), name="gptoss", route_prefix="/")
        except RuntimeError as e:  # the replica failed to start
            failure = deploy_failure(e)
            ray.shutdown()
            held.drop()
            raise GptOssError(f"the model failed to start: {failure} (full log: {held.path})") from None
        deployed = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        held.release()
        auth = "API key required" if config.api_key else "no API key"
        print(f"gptoss-ray: serving '{config.model_name}' at http://{config.host}:{config.port}/v1 ({auth}); "
              "Ctrl-C stops", flush=True)
        stop.wait()
    except KeyboardInterrupt:
        if not deployed:
            ray.shutdown()  # while held: the loading replica's last words stay in the log
            held.drop()
            print(f"gptoss-ray: interrupted while starting; stopping (log: {held.path})", file=sys.stderr, flush=True)
            raise
        held.release()  # Ctrl-C in the instant between deploying and waiting: a normal stop
    except BaseException:
        ray.shutdown()
        held.drop()
        raise
    finally:
        held.release()
        if deployed:  # a graceful stop drains replicas; while loading there is nothing to drain
            serve.shutdown()
        ray.shutdown()
    return 0
