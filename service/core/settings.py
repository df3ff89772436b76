"""Runtime settings: CLI flags and SOWA_* environment variables (pydantic-settings). Model hyper-parameters
never live here: they come from the bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.compiled_vision import COMPILE_MODES

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOWA_", extra="forbid")

    bundle: Path = Field(description="bundle directory to serve")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int | None = Field(None, ge=1, le=65535, description="the Open Inference Protocol v2 over gRPC on "
                                  "this port (off when unset); it runs where the model is (docs/service.md)")
    data_dir: Path = Field(Path("sowa-data"), description="where class shots and banks persist")
    store: SecretStr | None = Field(None, description="class store URL: a directory or file://DIR (default: "
                                    "data_dir), or postgresql://user:pass@host/db (a secret: it may hold a password)")
    device: str = "auto"
    dtype: str = "fp32"
    max_batch_size: int = Field(16, ge=1, le=1024, description="images per device batch")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="how long a batch waits to fill up")
    max_queue: int = Field(256, ge=1, description="images waiting for the device before 429")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of a prediction request")
    api_key: SecretStr | None = Field(None, description="an admin key, required as X-API-Key on all but health and "
                                      "metrics; stored keys (`sowa keys add`) are required too once one exists")
    auth_failures_per_minute: int = Field(20, ge=1, description="wrong API keys one client address may send in a "
                                          "minute; beyond, its requests answer 429 until the minute has passed")
    # NoDecode: SOWA_ALLOWED_HOSTS is a comma-separated list, not JSON (split by _allowed_hosts)
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        ["localhost", "127.0.0.1", "::1"], description="names clients may reach the service by (the Host header, "
        "port aside; `*.example.com` for subdomains, `*` for any): another name is refused with 400, so a DNS "
        "rebinding page cannot reach it. An IP address is always accepted: rebinding needs a name")
    metrics_need_key: bool = Field(False, description="/metrics needs a key (any role) instead of being open")
    audit_retention_days: float = Field(730, gt=0, description="audit events older than this are removed")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb guard, per image")
    max_request_pixels: int = Field(160_000_000, ge=1, description="decoded pixels of all images of a request")
    decode_memory_mb: float = Field(1024, gt=0, description="host memory that image decodes in flight may hold "
                                    "together (16 bytes per header pixel each, docs/service.md); more wait")
    max_images_per_request: int = Field(64, ge=1)
    max_shots_per_class: int = Field(32, ge=1)
    max_classes: int = Field(10_000, ge=1, description="registered classes at most; a new one beyond it is "
                             "refused (409 too_many_classes), an existing one can still be changed")
    bank_device_budget_mb: float | None = Field(None, ge=0, description="device memory for class banks; the "
                                                "least recently used beyond it wait in host memory (default: 40% "
                                                "of a GPU's memory, no limit on the CPU)")
    compile_mode: str | None = Field(None, description="torch.compile mode for the vision pass: default, "
                                     "reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs; "
                                     "unset or off: eager")
    image_decoder: Literal["pil", "torchvision"] = Field("pil", description="pil: the reference preprocessing, "
                                                         "bit for bit; torchvision: JPEGs decoded and resized on "
                                                         "the device (within 2 grey levels of it)")
    workers: int | None = Field(None, ge=1, le=64, description="HTTP worker processes in front of the one engine "
                                "process that owns the device (unset: 1 on a CPU, on a GPU half the cores, 2 to 8)")
    results_per_class: int = Field(500, ge=1, description="a class's recent records the threshold page shows")
    results_max_image_mb: float = Field(4.0, ge=0, description="a recorded upload larger than this is recorded "
                                        "without its image (it cannot become a shot by its id)")
    # inspection records (service/core/records/, docs/records.md)
    records: bool = Field(True, description="record every image scored against a class (record=false on /predict "
                          "skips one request; keep=true records it whatever this says)")
    records_dir: Path | None = Field(None, description="where the record database, images and spool live (default: "
                                     "data_dir/records; with a PostgreSQL store only the spool and it holds records "
                                     "in its database)")
    record_sample_passed: int = Field(100, ge=0, description="keep the image and thumbnail of 1 in N passed parts "
                                      "(0: none); flagged parts' are always kept")
    record_images_max_mb: float = Field(2048.0, ge=0, description="bytes of kept images and thumbnails; the oldest "
                                        "go first beyond it (their records stay)")
    record_images_max_age_days: float = Field(30.0, gt=0, description="kept images older than this go")
    records_max_age_days: float = Field(365.0, gt=0, description="records older than this go")
    records_max_count: int = Field(10_000_000, ge=1, description="records at most; the oldest go first")
    record_spool_max_mb: float = Field(256.0, gt=0, description="bytes the local spool may hold while the record "
                                       "store cannot be written; past it a record is not kept (see unrecordable)")
    records_sweep_s: float = Field(60.0, gt=0, description="how often retention runs")
    unrecordable: Literal["answer", "503"] = Field("answer", description="a prediction whose record cannot be kept "
                                                  "(spool full, store unreachable): answer anyway, saying "
                                                  "record_kept=false, or refuse it with 503")
    # the HTTP server's own limits (service/http/server_config.py, service/http/guard.py): the service faces
    # clients directly when nothing sits in front of it
    header_timeout_s: float = Field(10.0, gt=0, description="time a request has to send its request line and "
                                    "headers (408 after)")
    body_timeout_s: float = Field(60.0, gt=0, description="longest pause within a request body before the "
                                  "connection is closed")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="idle keep-alive connections close after this")
    max_header_bytes: int = Field(65536, ge=1024, description="request line and headers, in bytes (431 over it)")
    max_connections: int = Field(512, ge=1, description="open connections; more are answered 503 and closed at "
                                 "once (keep it under the file-descriptor limit)")
    # model versions (service/core/models/, docs/deployment.md)
    models_memory_mb: float | None = Field(None, gt=0, description="memory the loaded models may take together "
                                           "(the serving one, one being activated, a shadow); an activation or "
                                           "shadow beyond it is refused (default: what the device has free)")
    shadow_share: float = Field(0.05, ge=0, le=1, description="share of the answered requests a shadow model "
                                "scores when POST /models/{version}/shadow names none")
    warmup: bool = True
    sync_interval_s: float = Field(1.0, ge=0, description="directory store: how often to pick up classes changed by "
                                   "other replicas sharing data_dir; PostgreSQL pushes changes (0: never follow)")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v.lower() not in ("fp32", "float32", "fp16", "float16", "bf16", "bfloat16"):
            raise ValueError(f"dtype must be fp32, fp16 or bf16, got '{v}'")
        return v.lower()

    @field_validator("api_key", "bank_device_budget_mb", "compile_mode", "workers", "store", "records_dir",
                     "models_memory_mb", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        return None if v in ("", None) else v  # compose passes SOWA_X="" when none is configured

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _allowed_hosts(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, list):
            v = [str(h).strip().lower().removeprefix("[").removesuffix("]") for h in v if str(h).strip()]
            if not v:
                raise ValueError("allowed_hosts needs at least one name (`*` for any)")
        return v

    @field_validator("store")
    @classmethod
    def _store(cls, v: SecretStr | None) -> SecretStr | None:
        text = "" if v is None else v.get_secret_value()
        if "://" in text and not text.startswith(("file://", "postgresql://", "postgres://")):
            raise ValueError(f"store must be a directory, file://DIR or postgresql://..., not {text.split(':')[0]}://")
        return v

    @field_validator("compile_mode")
    @classmethod
    def _compile_mode(cls, v: str | None) -> str | None:
        if v is None or v.lower() == "off":
            return None
        if v not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be off or one of {', '.join(COMPILE_MODES)}, got '{v}'")
        return v

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 8:
            raise ValueError("api_key must be at least 8 characters (or unset)")
        return v

    def resolved_workers(self) -> int:
        """The HTTP worker processes to run: one event loop parses about 600 requests/s (docs/service.md), so a
        GPU host needs several to feed the device; a CPU host's device is its cores, which workers would take."""
        if self.workers is not None:
            return self.workers
        import os

        import torch

        if self.device == "cpu" or not torch.cuda.is_available():
            return 1
        return max(2, min(8, (os.cpu_count() or 2) // 2))

    @property
    def records_path(self) -> Path:
        """Where the records live on this host: `records_dir`, or data_dir/records."""
        return self.records_dir if self.records_dir is not None else self.data_dir / "records"

    @property
    def store_url(self) -> str:
        """Where classes persist: `store`, or data_dir when it is unset."""
        return str(self.data_dir) if self.store is None else self.store.get_secret_value()

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.max_queue < self.max_batch_size:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= max_batch_size ({self.max_batch_size})")
        if (self.workers or 1) > 1 and self.port == 0:
            raise ValueError("workers > 1 need a fixed port: each worker binds it (SO_REUSEPORT)")
        if self.max_queue < self.max_images_per_request:  # such a request could never be queued
            raise ValueError(f"max_queue ({self.max_queue}) must be >= max_images_per_request "
                             f"({self.max_images_per_request})")
        if self.compile_mode is not None and not self.warmup:  # else live requests would wait for the compiles
            raise ValueError(f"compile_mode '{self.compile_mode}' needs the warm-up, which compiles every batch-size "
                             "bucket before the server reports ready; without it the first request of each bucket "
                             "waits for a compile (tens of seconds, minutes with max-autotune). Set SOWA_WARMUP=true "
                             "(the default) or turn compilation off (--compile off / SOWA_COMPILE_MODE=off)")
        return self
