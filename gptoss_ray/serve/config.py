"""ServeConfig: what a user sets for the OpenAI-compatible app (CLI flags, Serve YAML
`args`, Helm values). It embeds the EngineConfig of the model instance behind it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gptoss_ray.config import EngineConfig
from gptoss_ray.errors import ConfigError

DEFAULT_ENGINE_CLS = "gptoss_ray.engine.async_engine:AsyncLLMEngine"
API_KEY_ENV = "GPTOSS_RAY_API_KEY"
DEMO_MODEL_NAME = "gpt-oss-tiny-demo"


class ServeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig, description="The model instance behind the API.")
    engine_cls: str = Field(
        DEFAULT_ENGINE_CLS,
        description="`module:Class` of the engine the LLMServer builds from `engine` (tests inject a scripted one).",
    )
    served_model_name: str | list[str] | None = Field(
        None, description="The `model` clients send (one name or several, all accepted and listed in /v1/models; "
        "the first is the one responses and metrics name); default: the checkpoint's name or hub id."
    )
    api_key: str | None = Field(
        None, description=f"Bearer key every route but /health requires; default: ${API_KEY_ENV}, else none."
    )
    api_key_file: str | None = Field(None, description="Read the API key from this file (first line).")
    max_queued_requests: int = Field(
        256, ge=0, description="Sequences (prompts x n) admitted beyond engine.max_num_seqs before answering 429 "
        "with Retry-After; a request larger than both together gets 400."
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    default_reasoning_effort: Literal["low", "medium", "high"] = Field(
        "medium", description="reasoning_effort of requests that do not set it."
    )
    grammar_timeout_s: float = Field(
        5.0, gt=0, le=60, description="Compile limit of a structured-output grammar; beyond it the request gets 400."
    )
    structured_max_string_length: int | None = Field(
        None, ge=1, le=1 << 20, description="Steering for constrained JSON: strings without a maxLength get this "
        "one (and json_object keys and values are bounded by it); None = strings are unbounded. Only narrows the "
        "valid outputs; useful for models that do not close strings by themselves (the random-weight demo)."
    )
    num_replicas: int = Field(1, ge=1, description="Model instances (LLMServer replicas), each with ep_size workers.")
    ingress_num_cpus: float = Field(0.1, ge=0, description="Logical CPUs of each ingress replica.")
    server_num_cpus: float = Field(
        1.0, ge=0, description="Logical CPUs of each LLMServer replica (the engine loop); bundle 0 of its placement group."
    )
    health_timeout_s: float = Field(10.0, gt=0, description="/health answers 503 when the engine takes longer.")
    allowed_origins: list[str] = Field(
        default_factory=list, description="CORS: browser origins allowed to call the API ('*' = any); default none."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = Field(
        None, description="Level of this app's loggers and of Ray Serve's in every replica (access logs are "
        "INFO); None = leave them as Ray Serve sets them."
    )
    disable_log_requests: bool = Field(
        False, description="No per-request log lines: Ray Serve's access logs and the ingress's request lines."
    )
    responses_store: str | None = Field(
        None, description="Where /v1/responses keeps stored responses: sqlite:///PATH (default: "
        "responses.sqlite3 under the cache directory), postgresql://USER:PASS@HOST/DB (shared by replicas), or none; "
        "default: $GPTOSS_RAY_RESPONSES_STORE (read by each ingress replica, so a password in it never enters "
        "the Serve config), else the SQLite file.")
    responses_ttl_s: float = Field(
        30 * 24 * 3600.0, gt=0, description="Stored responses expire (and are deleted) this many seconds after creation.")
    host: str = Field("127.0.0.1", description="HTTP bind address of the Serve proxy.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of the Serve proxy.")

    @field_validator("served_model_name")
    @classmethod
    def _names(cls, v: str | list[str] | None) -> list[str] | None:
        names = [v] if isinstance(v, str) else v
        if names is not None and (not names or any(not n for n in names)):
            raise ValueError("served_model_name must be one or more non-empty names")
        return list(dict.fromkeys(names)) if names is not None else None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _resolve_key(self) -> ServeConfig:
        key = self.api_key
        if key is None and self.api_key_file:
            path = Path(self.api_key_file).expanduser()
            try:
                key = path.read_text().splitlines()[0].strip() if path.stat().st_size else ""
            except OSError as e:
                raise ValueError(f"api_key_file {path}: {e.strerror}") from None
            if not key:
                raise ValueError(f"api_key_file {path} is empty")
        if key is None:
            key = os.environ.get(API_KEY_ENV) or None
        object.__setattr__(self, "api_key", key)
        return self

    @model_validator(mode="after")
    def _check_store(self) -> ServeConfig:
        url = self.responses_store
        if url is not None and url != "none" and not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError(f"responses_store {url!r}: expected sqlite:///PATH, postgresql://... or none")
        return self

    @property
    def model_names(self) -> list[str]:
        """Every name clients may send; the first is the primary one."""
        return list(self.served_model_name) if self.served_model_name else [self._default_name()]

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    def _default_name(self) -> str:
        if not self.engine.model:
            return DEMO_MODEL_NAME
        model = self.engine.model.rstrip("/")
        return model if not Path(model).exists() else Path(model).name

    @property
    def max_inflight(self) -> int:
        return self.engine.max_num_seqs + self.max_queued_requests

    @classmethod
    def from_args(cls, args: dict) -> ServeConfig:
        """From a Serve YAML's `args` (engine fields may sit at top level or under `engine`)."""
        from pydantic import ValidationError

        args = dict(args or {})
        engine = dict(args.pop("engine", None) or {})
        for name in EngineConfig.model_fields:
            if name in args:
                engine[name] = args.pop(name)
        try:
            return cls.model_validate({**args, "engine": engine})
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "(config)"
            raise ConfigError(f"serve config: field '{field}': {err['msg'].removeprefix('Value error, ')}") from None


def serve_logging(config: ServeConfig) -> dict:
    """Ray Serve's logging config (proxy and every deployment of the app): the level, and
    whether each request gets an access-log line."""
    out: dict = {"enable_access_log": not config.disable_log_requests}
    if config.log_level:
        out["log_level"] = config.log_level
    return out


def install_log_level(level: str | None) -> None:
    """In a replica (its own process): gptoss-ray's loggers at `level`, printed on the
    replica's stderr (which Ray sends to its log file and to the driver)."""
    if not level:
        return
    import logging

    root = logging.getLogger("gptoss_ray")
    root.setLevel(level)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.propagate = False
