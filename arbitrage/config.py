"""The one typed configuration: a TOML file, checked at start.

Unknown keys are an error that names the key (``Object contains unknown field
`x` - at `$.gateway```). With no file at all the gateway still runs: one
upstream from ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``, data in
``./arbitrage-data``.

Example::

    [gateway]
    port = 8080
    data_dir = "/var/lib/arbitrage"

    [[upstreams]]
    name = "openai"
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"
    models = ["gpt-*", "o*"]

    [prices."my-private-model"]
    input_per_mtok = 0.5
    output_per_mtok = 1.5
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import msgspec

from arbitrage.errors import ConfigError

if TYPE_CHECKING:
    from router.policy import RoutePolicy

DEFAULT_UPSTREAM_URL = "https://api.openai.com/v1"
_S3_URL = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^?#]*)?")


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A config table: unknown keys are rejected."""


class GatewaySettings(_Section):
    """The HTTP edge."""

    host: str = "127.0.0.1"
    """Address to bind; anything but loopback needs gateway keys."""
    port: int = 8080
    """TCP port to listen on."""
    data_dir: str = "./arbitrage-data"
    """Where captured calls, keys and the schema record live."""
    dev: bool = False
    """Accept any bearer key (only allowed on a loopback address)."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest request body accepted; larger ones get a 413."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log verbosity."""
    max_header_bytes: int = 16384
    """Largest request line plus headers accepted; larger ones get a 431 and the connection is closed."""
    header_timeout_s: float = 10.0
    """A client must send a request's line and headers within this many seconds of its first byte,
    else the connection is closed (slow-loris defence; uvicorn has no such timeout)."""
    workers: int = 1
    """Worker processes serving the port: each writes its own capture journal, /metrics from any
    of them shows the sum over all, and a key's rpm and budgets hold for all of them together."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"gateway.port must be 1-65535, got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError("gateway.max_body_bytes must be at least 1024")
        if self.max_header_bytes < 1024 or self.header_timeout_s <= 0:
            raise ValueError("gateway.max_header_bytes must be at least 1024 and gateway.header_timeout_s > 0")
        if not 1 <= self.workers <= 64:
            raise ValueError(f"gateway.workers must be 1-64, got {self.workers}")
        if "://" in self.data_dir and not _S3_URL.fullmatch(self.data_dir):
            raise ValueError(f"gateway.data_dir must be a local folder or s3://BUCKET[/PREFIX], got {self.data_dir!r}")


class UpstreamSettings(_Section):
    """One OpenAI-compatible upstream API."""

    name: str
    """Short name, used in records and metrics."""
    base_url: str
    """Base URL including the version prefix, e.g. https://api.openai.com/v1."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Environment variable holding this upstream's key (keys never go in the file)."""
    models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    """Glob patterns of model names this upstream serves; the first match wins."""
    provider: str | None = None
    """Provider id for price lookup (e.g. "openai"); guessed from the model when unset."""
    timeout_s: float = 600.0
    """Read timeout for one upstream call."""
    connect_timeout_s: float = 5.0
    """Connect timeout."""
    max_retries: int = 2
    """Retries on connect errors, 429 and 5xx, only before anything reached the client."""
    retry_max_wait_s: float = 20.0
    """Longest wait between retries, Retry-After included."""
    max_connections: int = 256
    """Pooled keep-alive connections to this upstream."""

    def __post_init__(self) -> None:
        if urlsplit(self.base_url).scheme not in ("http", "https") or not urlsplit(self.base_url).netloc:
            raise ValueError(f"upstream {self.name!r}: base_url must be an http(s) URL, got {self.base_url!r}")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError(f"upstream {self.name!r}: timeouts must be > 0 and max_retries >= 0")

    def api_key(self) -> str | None:
        """The upstream key, read from the environment at use."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class PriceOverride(_Section):
    """A private or discounted price, in dollars per million tokens."""

    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None
    """Price of cached prompt tokens; the input price when unset."""


class S3Settings(_Section):
    """The bucket of ``gateway.data_dir = "s3://BUCKET/PREFIX"`` (any S3-compatible store).

    Compacted Parquet files go to the bucket; journals, keys and the schema record stay in
    ``spool_dir``. Credentials come only from the environment (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, or the AWS SDK's other usual sources),
    never from this file.
    """

    spool_dir: str = "./arbitrage-spool"
    """Local folder for what stays on this machine: journals not yet compacted, keys, schema record."""
    endpoint_url: str | None = None
    """S3 API endpoint, e.g. http://127.0.0.1:9000 [default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS]."""
    region: str | None = None
    """Bucket region [default: $AWS_REGION, $AWS_DEFAULT_REGION, else us-east-1]."""
    connect_timeout_s: float = 5.0
    """Connect timeout of one S3 request."""
    request_timeout_s: float = 60.0
    """Timeout of one S3 request."""

    def __post_init__(self) -> None:
        if self.endpoint_url is not None and urlsplit(self.endpoint_url).scheme not in ("http", "https"):
            raise ValueError(f"capture.s3.endpoint_url must be an http(s) URL, got {self.endpoint_url!r}")
        if self.connect_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("capture.s3: timeouts must be > 0")


class CaptureSettings(_Section):
    """How calls are recorded."""

    segment_max_records: int = 20_000
    """Records per journal segment before it is sealed for compaction."""
    segment_max_age_s: float = 30.0
    """Seal a non-empty journal segment after this many seconds."""
    compact_interval_s: float = 5.0
    """How often sealed segments are compacted into Parquet."""
    fsync: Literal["never", "interval", "always"] = "interval"
    """When the journal is flushed to the disk (not just the OS): a process kill never loses
    a record in any mode; "always" also survives power loss, at a cost per request."""
    redact: bool | list[Literal["email", "phone", "card"]] = False
    """Replace personal data in captured request and response bodies before they are written:
    true for every kind, or a list of kinds. The upstream still gets the real text."""
    s3: S3Settings = msgspec.field(default_factory=S3Settings)
    """Where Parquet goes when ``gateway.data_dir`` is an s3:// URL."""


class MetricsSettings(_Section):
    """Prometheus metrics."""

    max_paths: int = 100
    """Distinct call paths used as label values; later ones are counted as "other"."""


class EconomicsSettings(_Section):
    """Prices of your own compute, for ``arbitrage roi`` (unset prices are reported as missing, never guessed)."""

    training_usd_per_hour: float | None = None
    """Dollars per hour of the machine that trains adapters (times the measured training time)."""
    serving_usd_per_hour: float | None = None
    """Dollars per hour of the always-on local model server (GPU or CPU machine)."""
    serving_usd_per_mtok: float | None = None
    """Dollars per million tokens served locally (instead of serving_usd_per_hour)."""

    def __post_init__(self) -> None:
        if self.serving_usd_per_hour is not None and self.serving_usd_per_mtok is not None:
            raise ValueError("economics: set serving_usd_per_hour or serving_usd_per_mtok, not both")
        prices = (self.training_usd_per_hour, self.serving_usd_per_hour, self.serving_usd_per_mtok)
        if any(p is not None and p < 0 for p in prices):
            raise ValueError("economics: prices must be >= 0")


class LocalSettings(_Section):
    """The local model server (vLLM): started by ``arbitrage local up`` or run by someone else (``url``)."""

    url: str | None = None
    """Base URL of a vLLM that someone else runs (``http://host:8000/v1``); unset: ``arbitrage local up`` starts one."""
    api_key_env: str | None = None
    """Environment variable holding that server's API key, if it wants one."""
    base: str = "smollm2-135m-instruct"
    """Base model the server loads: the packaged default, or a Hugging Face model folder."""
    served_model_name: str = "base"
    """Name the base model is served under (adapters are served under their own names)."""
    host: str = "127.0.0.1"
    port: int = 8000
    python: str | None = None
    """Interpreter with vLLM installed [default: $ARBITRAGE_VLLM_PYTHON, else .venv-vllm/bin/python beside
    this installation's environment, else this interpreter]."""
    max_model_len: int = 2048
    max_lora_rank: int = 64
    max_loras: int = 4
    """Adapters in one batch (vLLM's --max-loras)."""
    kv_cache_gib: int = 1
    """KV cache of the CPU build (VLLM_CPU_KVCACHE_SPACE), in GiB."""
    preload: bool = True
    """Without a GPU: preload Intel OpenMP and tcmalloc into vLLM where found, as its CPU build asks."""
    reserved_cpus: int | None = None
    """Without a GPU: cores vLLM keeps for its API server (VLLM_CPU_NUM_OF_RESERVED_CPU) [0 on machines of
    up to 4 cores, else vLLM's default]."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations of the served model (vLLM's --dtype). auto: vLLM's own choice (the model's,
    bfloat16 for SmolLM2) on a GPU or on a CPU with bfloat16 instructions (avx512_bf16, amx_bf16, Arm bf16);
    float32 on a CPU without them, where bfloat16 serves several times slower (bench/vllm_cpu.py)."""
    draft_answers: bool | None = None
    """Speculative decoding from the answers given before (deploy/vllm_cpu_lora/arbitrage_vllm_answers.py): the
    same answers and log-probs in fewer passes over the model, for a path whose answers repeat. Unset: on
    without a GPU, where ``scripts/install`` puts the proposer into vLLM's environment and each answer token
    costs a pass over the weights (one answer at a time, the same answers: on 2 AVX2 cores 729 ms against
    2,192 ms; on 2 avx512_bf16 cores with a 77-label adapter 262-295 ms against 772-912 ms;
    bench/RESULTS-distill.md)."""
    draft_tokens: int = 8
    """Longest draft checked in one pass, with ``draft_answers``. 15 drafted more tokens a pass but fewer were
    right, and served no faster one at a time and 15 % slower at 32 in flight (bench/RESULTS-distill.md); above
    15, vLLM's CPU defaults with LoRA refuse to start (max_num_seqs x (draft_tokens + 1) must fit in
    max_num_batched_tokens, 128 x 16 = 2048)."""
    extra_args: list[str] = msgspec.field(default_factory=list)
    """More vLLM server arguments, as given (after arbitrage's own, so they win)."""
    startup_timeout_s: float = 600.0
    """Longest wait for the server to become healthy after ``arbitrage local up``."""
    timeout_s: float = 30.0
    """Longest wait for one local answer (the route falls back upstream after a shorter per-path timeout)."""
    shadow_concurrency: int = 4
    """Shadow and audit comparisons running at once, per gateway worker (in the background: a client's
    request never waits for them)."""
    shadow_queue: int = 256
    """Shadow and audit comparisons waiting at most, per worker; what arrives beyond is dropped and counted
    (``arbitrage_shadow_dropped_total``, reason queue_full)."""

    def __post_init__(self) -> None:
        if min(self.shadow_concurrency, self.shadow_queue) < 1:
            raise ValueError("local: shadow_concurrency and shadow_queue must be at least 1")
        if self.url is not None and (urlsplit(self.url).scheme not in ("http", "https") or not urlsplit(self.url).netloc):
            raise ValueError(f"local.url must be an http(s) URL, got {self.url!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"local.port must be 1-65535, got {self.port}")
        if min(self.max_model_len, self.max_lora_rank, self.max_loras, self.kv_cache_gib, self.draft_tokens) < 1:
            raise ValueError("local: max_model_len, max_lora_rank, max_loras, kv_cache_gib and draft_tokens must be "
                             "at least 1")
        if self.reserved_cpus is not None and self.reserved_cpus < 0:
            raise ValueError(f"local.reserved_cpus must be 0 or more, got {self.reserved_cpus}")

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL of the server."""
        return (self.url or f"http://{self.host}:{self.port}/v1").rstrip("/")


class Config(_Section):
    """The whole configuration."""

    gateway: GatewaySettings = msgspec.field(default_factory=GatewaySettings)
    upstreams: list[UpstreamSettings] = msgspec.field(default_factory=list)
    prices: dict[str, PriceOverride] = msgspec.field(default_factory=dict)
    capture: CaptureSettings = msgspec.field(default_factory=CaptureSettings)
    metrics: MetricsSettings = msgspec.field(default_factory=MetricsSettings)
    economics: EconomicsSettings = msgspec.field(default_factory=EconomicsSettings)
    local: LocalSettings = msgspec.field(default_factory=LocalSettings)
    routes: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    """Routing policy per call path (``[routes."<path>"]`` tables, fields in router/policy.py); edits made
    through the admin API are kept in ``<data_dir>/routes.json`` and override these, path by path."""

    def __post_init__(self) -> None:
        names = [u.name for u in self.upstreams]
        if len(names) != len(set(names)):
            raise ValueError(f"upstream names must be unique, got {names}")
        for path, raw in self.routes.items():
            try:
                route_policy(path, raw)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None

    @property
    def data_dir(self) -> Path:
        """The local data folder (``capture.s3.spool_dir`` when data_dir is an s3:// URL)."""
        return Path(self.capture.s3.spool_dir if self.capture_url else self.gateway.data_dir)

    @property
    def capture_url(self) -> str | None:
        """The s3:// URL compacted Parquet goes to; None when it stays under data_dir."""
        return self.gateway.data_dir if self.gateway.data_dir.startswith("s3://") else None


def route_policy(path: str, raw: Any) -> RoutePolicy:
    """Decode and check one path's policy (ConfigError naming the route and the field): its fields,
    the path name (it becomes folders), and the adapter, a version of this path's adapter ("v3",
    which vLLM serves as "<path>/v3")."""
    from router.policy import RoutePolicy

    check_route_path(path)
    policy = RoutePolicy.from_dict(raw, where=f'routes."{path}"')
    check_route_adapter(path, policy)
    return policy


def check_route_adapter(path: str, policy: RoutePolicy) -> None:
    """The policy's adapter, if any, must be a version name like "v3" (ConfigError otherwise)."""
    if policy.adapter is not None and not re.fullmatch(r"v[0-9]+", policy.adapter):
        raise ConfigError(f'routes."{path}": adapter must be a version of this path\'s adapter like "v3" '
                          f'(served as "{path}/v3"), got {policy.adapter!r}')


def check_route_path(path: str) -> None:
    """A call path name becomes folders (adapters, evals): ConfigError unless it is a usable one."""
    from distill.dataset.config import check_path_name

    try:
        check_path_name(path)
    except ConfigError as exc:
        raise ConfigError(f"routes: {exc}") from None


def load_config(path: str | Path | None = None, **overrides) -> Config:
    """Read the TOML file (if any), apply flag overrides, fill defaults from the environment."""
    raw = _read_toml(Path(path)) if path else {}
    flags = {k: v for k, v in overrides.items() if v is not None and k != "upstream_url"}
    if flags:
        if not isinstance(raw.setdefault("gateway", {}), dict):
            raise ConfigError(f"{path}: `gateway` must be a table ([gateway]), not {type(raw['gateway']).__name__}")
        raw["gateway"].update(flags)
    if overrides.get("upstream_url"):
        raw["upstreams"] = [{"name": "default", "base_url": overrides["upstream_url"]}]
    config = _convert(raw, source=str(path or "defaults"))
    if not config.upstreams:
        url = os.environ.get("OPENAI_BASE_URL") or DEFAULT_UPSTREAM_URL
        config.upstreams.append(_convert_upstream(url))
    return config


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _convert(raw: dict, source: str) -> Config:
    try:
        return msgspec.convert(raw, Config, strict=True)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _convert_upstream(url: str) -> UpstreamSettings:
    try:
        return UpstreamSettings(name="default", base_url=url)
    except ValueError as exc:
        raise ConfigError(f"OPENAI_BASE_URL: {exc}") from None
