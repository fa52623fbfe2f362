"""Runtime configuration: configs/*.toml plus `--set section.key=value` overrides, loaded into
frozen, validated dataclasses. Standard library only: the scheduler, client and CLI import this,
so it must never import torch.
"""
import dataclasses
import difflib
import hashlib
import json
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

_TUPLE_OF_INT = tuple[int, ...]
_TUPLE_OF_STR = tuple[str, ...]
_RESOURCES = dict[str, float]  # a table of Ray resources, e.g. {GPU = 1} or {"node:10.0.0.2" = 0.01}
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class ConfigError(ValueError):
    """Bad configuration; the message names the section.key and the problem."""


def _check(is_ok: bool, key: str, problem: str) -> None:
    if not is_ok:
        raise ConfigError(f"{key}: {problem}")


def _type_name(typ) -> str:
    return {_TUPLE_OF_INT: "list of int", _TUPLE_OF_STR: "list of strings",
            _RESOURCES: "table of name = number"}.get(typ) or typ.__name__


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_type(key: str, typ, value):
    """Type-check a TOML / dict value against a field type; returns it in the field's type."""
    if typ is bool:
        is_ok = isinstance(value, bool)
    elif typ is int:
        is_ok = _is_int(value)
    elif typ is float:
        is_ok = _is_int(value) or isinstance(value, float)
        value = float(value) if is_ok else value
    elif typ is str:
        is_ok = isinstance(value, str)
    elif typ == _RESOURCES:
        is_ok = isinstance(value, dict) and all(
            isinstance(k, str) and k and (_is_int(v) or isinstance(v, float)) for k, v in value.items())
        value = {k: float(v) for k, v in value.items()} if is_ok else value
    elif typ == _TUPLE_OF_STR:
        is_ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = tuple(value) if is_ok else value
    else:
        assert typ == _TUPLE_OF_INT, f"unsupported config field type {typ}"
        is_ok = isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)
        value = tuple(value) if is_ok else value
    _check(is_ok, key, f"expected {_type_name(typ)}, got {value!r}")
    return value


def parse_text(key: str, typ, text: str):
    """Parse the value of a `--set section.key=value` override into the field's type."""
    stripped = text.strip()
    try:
        if typ is bool:
            return _BOOL_WORDS[stripped.lower()]
        if typ is int:
            return int(stripped)
        if typ is float:
            return float(stripped)
        if typ is str:
            is_quoted = len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "\"'"
            return stripped[1:-1] if is_quoted else text
        if typ == _RESOURCES:  # a TOML inline table: {GPU = 1} or {"accelerator_type:H100" = 1}
            value = tomllib.loads(f"v = {stripped}")["v"]
            if not isinstance(value, dict):
                raise ValueError
            return value
        if typ == _TUPLE_OF_STR:  # a TOML array of strings, or names separated by commas
            if stripped.startswith("["):
                value = tomllib.loads(f"v = {stripped}")["v"]
                if not all(isinstance(v, str) for v in value):
                    raise ValueError
                return tuple(value)
            return tuple(part.strip() for part in stripped.split(",")) if stripped else ()
        if stripped.startswith("[") and stripped.endswith("]"):
            stripped = stripped[1:-1].strip()
        return tuple(int(part) for part in stripped.split(",")) if stripped else ()
    except (KeyError, ValueError, tomllib.TOMLDecodeError):
        raise ConfigError(f"{key}: expected {_type_name(typ)}, got {text!r}") from None


def _check_field_types(section) -> None:
    for f in dataclasses.fields(section):
        value = _check_type(f.name, f.type, getattr(section, f.name))
        object.__setattr__(section, f.name, value)  # int -> float, list -> tuple


@dataclass(frozen=True)
class ModelSection:
    target: str = "tiny-llama"  # HF folder, .gguf, known name, random-qwen2.5-coder-1.5b/-0.5b, tiny-llama / tiny-qwen2
    draft: str = "tiny-llama"  # same forms; must share the target's vocabulary
    dtype: str = "float32"  # float32 | bfloat16
    linear_path: str = "auto"  # auto (per shape, the faster of the CPU kernel and F.linear, timed at load) | plain (F.linear) | packed (the kernel everywhere)
    draft_weights: str = "float32"  # float32 | bfloat16: the draft's linear weights rounded to bfloat16 (half the bytes a draft step reads; proposals may change, outputs do not)
    cache_dir: str = "~/.cache/minedraft"  # where prepared real models are kept
    tiny_seed: int = 0  # weight seed of tiny-* and random-* models
    tiny_draft_noise: float = 0.0  # std of noise added to a tiny draft's weights (draft = target + noise)
    tiny_vocab_size: int = 512  # vocabulary size of tiny-* models
    tiny_hidden_size: int = 64  # hidden size of tiny-* models
    tiny_intermediate_size: int = 128  # MLP inner size of tiny-* models
    tiny_num_layers: int = 2  # decoder layers of tiny-* models
    tiny_num_heads: int = 4  # attention heads of tiny-* models
    tiny_num_kv_heads: int = 2  # key/value heads of tiny-* models (grouped-query attention)

    def __post_init__(self):
        _check_field_types(self)
        for key in ("target", "draft", "cache_dir"):
            _check(getattr(self, key) != "", key, "must not be empty")
        _check(self.dtype in ("float32", "bfloat16"), "dtype", f"expected float32 or bfloat16, got {self.dtype!r}")
        _check(self.linear_path in ("auto", "plain", "packed"), "linear_path",
               f"expected auto, plain or packed, got {self.linear_path!r}")
        _check(self.draft_weights in ("float32", "bfloat16"), "draft_weights",
               f"expected float32 or bfloat16, got {self.draft_weights!r}")
        _check(self.tiny_draft_noise >= 0, "tiny_draft_noise", f"must be >= 0, got {self.tiny_draft_noise}")
        for key in ("tiny_vocab_size", "tiny_hidden_size", "tiny_intermediate_size", "tiny_num_layers",
                    "tiny_num_heads", "tiny_num_kv_heads"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        _check(self.tiny_hidden_size % self.tiny_num_heads == 0, "tiny_hidden_size",
               f"must be a multiple of tiny_num_heads ({self.tiny_num_heads}), got {self.tiny_hidden_size}")
        _check(self.tiny_num_heads % self.tiny_num_kv_heads == 0, "tiny_num_heads",
               f"must be a multiple of tiny_num_kv_heads ({self.tiny_num_kv_heads}), got {self.tiny_num_heads}")


MODES = ("auto", "psd", "sd", "ar")
# scheduler.max_batch = 0 takes what memory holds, up to this many requests per batch. The cap is a
# cost: a verify step's time grows with its rows once it is compute-bound (on a CPU core from about
# 8 positions, docs/performance.md), so past 16 rows per batch (32 live with two batches, the most
# rows a one-batch plan then steps) every request's step time grows with no gain in tokens/s.
MAX_BATCH_FROM_MEMORY = 16


def batch_from_memory(request_bytes: int, budget_bytes: int, num_batches: int) -> int:
    """scheduler.max_batch = 0: the most requests per batch whose KV cache and buffers
    (request_bytes each) fit in budget_bytes with num_batches batches, in 1..MAX_BATCH_FROM_MEMORY."""
    return max(1, min(MAX_BATCH_FROM_MEMORY, budget_bytes // max(1, request_bytes * num_batches)))


@dataclass(frozen=True)
class SchedulerSection:
    mode: str = "auto"  # auto (the plan measured fastest at the load: ar, sd or psd, and cores per worker) | psd (two overlapped batches) | sd (one batch, standard SD) | ar (target only)
    num_draft: int = 4  # k: draft tokens per request per step
    max_batch: int = 8  # requests per batch (psd keeps two batches; auto holds 2 x max_batch, in one batch or two); 0 = what kv_cache_memory holds, at most MAX_BATCH_FROM_MEMORY
    kv_cache_memory: float = 0.15  # max_batch = 0: share of its device's memory each worker's KV cache and draft buffers may take
    max_len: int = 512  # prompt + output tokens per request (KV cache length)
    max_tokens_cap: int = 256  # largest max_tokens a request may ask for
    max_queued_requests: int = 256  # admission queue bound; beyond it requests get "overloaded"
    max_request_bytes: int = 1048576  # largest client frame accepted
    job_timeout_s: float = 60.0  # a worker job not answered within this is a hung worker
    restart_workers: bool = False  # on a dead or hung worker: restart both workers (else the daemon exits 1)
    prefill_ahead: bool = True  # sd/psd: an idle verifier caches new prompts while the drafter drafts them
    extra_draft: int = 0  # e: TETRIS drafts k + e tokens per row and verifies the likeliest k x rows of them
    predraft: bool = True  # sd/psd with one batch: the drafter drafts the next step's drafts while the verifier checks this one's
    draft_policy: str = "fixed"  # fixed (k, e as set) | adaptive (depth and verify capacity from measured costs)
    plan_rotate_steps: int = 0  # auto, for tests and diagnosis: go through every plan in turn, this many steps each (0 = choose)
    calibrate: bool = True  # auto: time every plan at every batch size at start (cached per machine and models) instead of exploring on the first requests

    def __post_init__(self):
        _check_field_types(self)
        _check(self.mode in MODES, "mode", f"expected auto, psd, sd or ar, got {self.mode!r}")
        _check(1 <= self.num_draft <= 16, "num_draft", f"must be in 1..16, got {self.num_draft}")
        _check(0 <= self.extra_draft <= 16, "extra_draft", f"must be in 0..16, got {self.extra_draft}")
        _check(self.draft_policy in ("fixed", "adaptive"), "draft_policy",
               f"expected fixed or adaptive, got {self.draft_policy!r}")
        _check(self.max_batch >= 0, "max_batch", f"must be >= 0 (0 = from kv_cache_memory), got {self.max_batch}")
        _check(0.0 < self.kv_cache_memory <= 0.9, "kv_cache_memory", f"must be in (0, 0.9], got {self.kv_cache_memory}")
        _check(self.max_len >= 16, "max_len", f"must be >= 16, got {self.max_len}")
        _check(1 <= self.max_tokens_cap < self.max_len, "max_tokens_cap",
               f"must be >= 1 and < max_len ({self.max_len}), got {self.max_tokens_cap}")
        _check(self.max_queued_requests >= 1, "max_queued_requests", f"must be >= 1, got {self.max_queued_requests}")
        _check(self.max_request_bytes >= 1024, "max_request_bytes", f"must be >= 1024, got {self.max_request_bytes}")
        _check(self.job_timeout_s > 0, "job_timeout_s", f"must be > 0, got {self.job_timeout_s}")
        _check(self.plan_rotate_steps >= 0, "plan_rotate_steps", f"must be >= 0, got {self.plan_rotate_steps}")

    @property
    def is_auto(self) -> bool:
        """The mode is chosen at run time among plans (runtime/plans.py)."""
        return self.mode == "auto"

    @property
    def speculates(self) -> bool:
        """The daemon has a drafter (every mode but ar)."""
        return self.mode != "ar"

    def max_rows(self, max_batch: int) -> int:
        """Most requests one batch holds (the draft buffers' rows) for max_batch resolved (never
        0): auto's one-batch plans hold both of psd's batches in one."""
        return 2 * max_batch if self.is_auto else max_batch

    @property
    def num_batches(self) -> int:
        """Batches the scheduler keeps: psd's two (auto may run psd), else one."""
        return 2 if self.mode == "psd" or self.is_auto else 1

    @property
    def max_depth(self) -> int:
        """Most draft tokens a row gets in one step: the draft buffers' depth."""
        return self.num_draft + self.extra_draft


@dataclass(frozen=True)
class ServerSection:
    endpoint: str = "tcp://127.0.0.1:7475"  # client endpoint: loopback tcp or ipc:// path
    run_dir: str = ""  # "" = <tmp>/minedraft-<uid>/<name derived from endpoint>
    startup_timeout_s: float = 120.0  # how long `start` waits for the daemon to serve
    client_timeout_s: float = 30.0  # a client that leaves its outputs unread this long has its requests aborted
    dead_linger_s: float = 5.0  # after a worker dies: answer "runtime_dead" this long, then exit 1
    allow_remote: bool = False  # required to bind a non-loopback tcp address
    curve_dir: str = ""  # CURVE keys (`minedraft-runtime keys`); required with allow_remote
    http: str = ""  # HOST:PORT of the OpenAI-compatible HTTP front end ("" = off; port 0 = any free port)
    api_key: str = ""  # Bearer key of the HTTP /v1 routes ("" = none, or $MINEDRAFT_API_KEY); required off loopback
    served_model_names: tuple[str, ...] = ()  # HTTP: the names /v1/models lists and `model` may give, the first in answers ([] = the target as given)

    def __post_init__(self):
        _check_field_types(self)
        _check(re.fullmatch(r"(tcp|ipc)://.+", self.endpoint) is not None, "endpoint",
               f"expected tcp://HOST:PORT or ipc://PATH, got {self.endpoint!r}")
        _check(self.startup_timeout_s > 0, "startup_timeout_s", f"must be > 0, got {self.startup_timeout_s}")
        _check(self.client_timeout_s > 0, "client_timeout_s", f"must be > 0, got {self.client_timeout_s}")
        _check(self.dead_linger_s >= 0, "dead_linger_s", f"must be >= 0, got {self.dead_linger_s}")
        _check(is_loopback(self.endpoint) or (self.allow_remote and self.curve_dir), "endpoint",
               f"refusing to bind the non-loopback address {self.endpoint!r}: set server.allow_remote=true "
               "and server.curve_dir (CURVE keys from `minedraft-runtime keys`) to serve remote clients")
        names = self.served_model_names
        _check(all(name.strip() == name != "" for name in names), "served_model_names",
               f"names must be non-empty, without surrounding spaces, got {list(names)}")
        _check(len(set(names)) == len(names), "served_model_names", f"names must differ, got {list(names)}")
        if self.http:
            host, port = parse_listen(self.http)
            _check(host != "" and port is not None and 0 <= port <= 65535, "http",
                   f"expected HOST:PORT (port 0..65535), got {self.http!r}")
            _check(is_loopback(f"tcp://{self.http}") or api_key(self) != "", "http",
                   f"refusing to serve HTTP on the non-loopback address {self.http!r} without an API key: "
                   f"give --api-key, server.api_key or ${API_KEY_ENV}")


API_KEY_ENV = "MINEDRAFT_API_KEY"  # where the HTTP API key may come from instead of the config


def api_key(server: "ServerSection") -> str:
    """The HTTP API key: server.api_key, else $MINEDRAFT_API_KEY, else "" (no key)."""
    return server.api_key or os.environ.get(API_KEY_ENV, "")


def parse_listen(listen: str) -> tuple[str, int | None]:
    """"HOST:PORT" or "[V6]:PORT" -> (host, port); port None when it is not a number."""
    host, _, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port) if port.isdigit() else None


def is_loopback(endpoint: str) -> bool:
    """True for ipc:// paths and tcp:// on 127.0.0.0/8, ::1 or localhost."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "ipc":
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host == "::1" or re.fullmatch(r"127(\.\d{1,3}){3}", host) is not None


@dataclass(frozen=True)
class WorkerSection:
    device: str = "cpu"  # cpu | cuda | cuda:N (existence is checked at worker start)
    cpu_cores: tuple[int, ...] = ()  # cores to pin the process to (empty = no pinning)
    num_threads: int = 1  # torch intra-op threads

    def __post_init__(self):
        _check_field_types(self)
        _check(re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None, "device",
               f"expected cpu, cuda or cuda:N, got {self.device!r}")
        _check(all(core >= 0 for core in self.cpu_cores), "cpu_cores", f"must be >= 0, got {list(self.cpu_cores)}")
        _check(self.num_threads >= 1, "num_threads", f"must be >= 1, got {self.num_threads}")


DRAFT_TRANSPORTS = ("auto", "shared", "frames")
BACKENDS = ("local", "ray")
MAX_REPLICAS = 64


@dataclass(frozen=True)
class ClusterSection:
    backend: str = "local"  # where the workers run: local (processes on this host) | ray (Ray actors where their resources are; pip install 'minedraft-runtime[cluster]')
    ray_address: str = ""  # ray: the cluster to join ("auto" = the one `ray start` made on this machine, or HEAD_IP:PORT; the daemon runs as a Ray driver, not a Ray Client); "" = start a private one-node Ray
    replicas: int = 1  # independent groups of scheduler, drafter and verifier behind the one endpoint
    drafter_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})  # ray: what each drafter actor needs, e.g. {GPU = 1} or a custom resource
    verifier_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})  # ray: what each verifier actor needs
    worker_ports: tuple[int, ...] = ()  # ray: [FIRST, LAST], the ports the tcp:// worker sockets bind in (3 per replica on the daemon's machine, 1 per drafter); [] = any free port
    draft_transport: str = "auto"  # how drafts reach the verifier: auto (shared memory or CUDA IPC on one host, frames across hosts) | shared | frames (ZeroMQ frames: workers that share no memory; CPU devices)

    def __post_init__(self):
        _check_field_types(self)
        _check(self.backend in BACKENDS, "backend", f"expected local or ray, got {self.backend!r}")
        _check(1 <= self.replicas <= MAX_REPLICAS, "replicas", f"must be in 1..{MAX_REPLICAS}, got {self.replicas}")
        _check(self.backend == "ray" or not self.ray_address, "ray_address", "is only used with backend = ray")
        for key in ("drafter_resources", "verifier_resources"):
            bad = {name: amount for name, amount in getattr(self, key).items() if not amount >= 0}
            _check(not bad, key, f"amounts must be >= 0, got {bad}")
            _check(any(getattr(self, key).values()), key, "needs at least one resource with an amount > 0 "
                   "(Ray places each actor by them), e.g. {CPU = 1}")
        _check(self.worker_ports == () or (len(self.worker_ports) == 2 and
                                           1024 <= self.worker_ports[0] <= self.worker_ports[1] <= 65535),
               "worker_ports", f"expected [] or [FIRST, LAST] with 1024 <= FIRST <= LAST <= 65535, got "
               f"{list(self.worker_ports)}")
        _check(self.draft_transport in DRAFT_TRANSPORTS, "draft_transport",
               f"expected one of {', '.join(DRAFT_TRANSPORTS)}, got {self.draft_transport!r}")


def draft_transport(config: "Config") -> str:
    """"shared" (one host: shared memory or CUDA IPC) or "frames" (ZeroMQ frames). Local workers
    share the daemon's host, so auto means shared there; the Ray backend resolves auto from where
    its actors landed and hands the workers a config that names the choice."""
    return "frames" if config.cluster.draft_transport == "frames" else "shared"


@dataclass(frozen=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)  # draft and target models
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)  # batching and limits
    server: ServerSection = field(default_factory=ServerSection)  # client endpoint and run directory
    drafter: WorkerSection = field(default_factory=lambda: WorkerSection(cpu_cores=(0,)))  # draft worker
    verifier: WorkerSection = field(default_factory=lambda: WorkerSection(cpu_cores=(1,)))  # verify worker
    cluster: ClusterSection = field(default_factory=ClusterSection)  # how the workers reach each other

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check(isinstance(getattr(self, f.name), f.type), f.name, f"expected {f.type.__name__}")
        _check(draft_transport(self) == "shared" or (self.drafter.device == "cpu" and self.verifier.device == "cpu"),
               "cluster.draft_transport", "frames carries CPU buffers only so far; use it with "
               f"drafter.device = verifier.device = cpu (got {self.drafter.device}, {self.verifier.device})")

    def worker(self, role: str) -> WorkerSection:
        """The section of the worker with this role ("drafter" or "verifier")."""
        assert role in ("drafter", "verifier"), role
        return getattr(self, role)


def cpu_pool(config: Config, all_cores: list[int] | None = None) -> list[int] | None:
    """The cores the two workers share when both run on the CPU (their configured cores, or
    `all_cores` when either is unpinned: by default every core this process may use); None when
    either is on a GPU."""
    if config.drafter.device != "cpu" or config.verifier.device != "cpu":
        return None
    if config.drafter.cpu_cores and config.verifier.cpu_cores:
        return sorted(set(config.drafter.cpu_cores) | set(config.verifier.cpu_cores))
    return sorted(os.sched_getaffinity(0) if all_cores is None else all_cores)


def workers_share_a_device(config: Config) -> bool:
    """Whether the two workers' jobs would run on the same hardware: overlapping cores on the
    CPU (an unpinned worker may use every core), or the same CUDA device."""
    drafter, verifier = config.drafter, config.verifier
    if drafter.device == "cpu" and verifier.device == "cpu":
        if not drafter.cpu_cores or not verifier.cpu_cores:
            return True
        return bool(set(drafter.cpu_cores) & set(verifier.cpu_cores))
    if drafter.device == "cpu" or verifier.device == "cpu":
        return False
    index = lambda device: device.partition(":")[2] or "0"  # noqa: E731  cuda == cuda:0
    return index(drafter.device) == index(verifier.device)


def core_splits(pool: list[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """How auto's plans place the workers on a pool of cores (runtime/plans.py; the workers time
    their linears at the same thread counts): the drafter's half, the verifier's half (the whole
    pool when it has one core) and every core."""
    pool = tuple(sorted(set(pool)))
    half = max(1, len(pool) // 2)
    return pool[:half], pool[half:] if len(pool) > 1 else pool, pool


_SECTION_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_DEFAULTS = {"drafter": {"cpu_cores": (0,)}, "verifier": {"cpu_cores": (1,)}}


def _field_types(section: str) -> dict:
    return {f.name: f.type for f in dataclasses.fields(_SECTION_TYPES[section])}


def _unknown(kind: str, name: str, choices: Sequence[str], prefix: str = "") -> ConfigError:
    message = f"unknown {kind} '{prefix}{name}'"
    close = difflib.get_close_matches(name, choices, n=1)
    if close:
        message += f" (did you mean '{prefix}{close[0]}'?)"
    return ConfigError(f"{message}; expected one of: {', '.join(choices)}")


def _check_names(data) -> None:
    """Raise for anything in a {section: {key: value}} mapping that is not a config field."""
    _check(isinstance(data, dict), "config", f"expected a table of sections, got {data!r}")
    for section, values in data.items():
        if section not in _SECTION_TYPES:
            raise _unknown("section", section, list(_SECTION_TYPES))
        _check(isinstance(values, dict), section, f"expected a table, got {values!r}")
        for key in values:
            if key not in _field_types(section):
                raise _unknown("key", key, list(_field_types(section)), prefix=f"{section}.")


def _build(data: dict) -> Config:
    sections = {}
    for name, cls in _SECTION_TYPES.items():
        values = {**_SECTION_DEFAULTS.get(name, {}), **data.get(name, {})}
        try:
            sections[name] = cls(**values)
        except ConfigError as error:
            raise ConfigError(f"{name}.{error}") from None
    return Config(**sections)


def _apply_override(data: dict, override: str) -> None:
    dotted, is_assignment, text = override.partition("=")
    section, _, key = dotted.strip().partition(".")
    _check(is_assignment == "=" and key != "", "--set", f"expected section.key=value, got {override!r}")
    _check_names({section: {key: None}})
    data.setdefault(section, {})[key] = parse_text(f"{section}.{key}", _field_types(section)[key], text)


def resolve_config_path(name_or_path: str) -> str:
    """A config file path, or a name such as "tiny" looked up in ./configs and the repo's configs/."""
    if os.path.isfile(name_or_path):
        return name_or_path
    file_name = name_or_path if name_or_path.endswith(".toml") else name_or_path + ".toml"
    if os.path.isfile(file_name):
        return file_name
    here = Path(__file__).resolve().parent
    folders = [Path.cwd() / "configs", here.parent / "configs", here / "configs"]
    if Path(file_name).name == file_name:  # a bare name, not a path
        for folder in folders:
            if (folder / file_name).is_file():
                return str(folder / file_name)
    names = sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.toml")})
    raise ConfigError(f"config: no file {name_or_path!r} (known configs: {', '.join(names) or 'none'})")


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the TOML file at `path` (or a config name), then `section.key=value` overrides."""
    data: dict = {}
    if path is not None:
        resolved = resolve_config_path(path)
        try:
            with open(resolved, "rb") as file:
                data = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"config: cannot read {resolved}: {error}") from None
        _check_names(data)
    for override in overrides:
        _apply_override(data, override)
    return _build(data)


def config_to_dict(config: Config) -> dict:
    """Plain {section: {key: value}} dict (tuples as lists), JSON / msgpack friendly."""
    return {name: {key: list(v) if isinstance(v, tuple) else v for key, v in values.items()}
            for name, values in dataclasses.asdict(config).items()}


def config_from_dict(data: dict) -> Config:
    """Inverse of config_to_dict; missing keys take defaults, unknown ones are errors."""
    _check_names(data)
    return _build(data)


def _format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if isinstance(value, dict):  # a TOML inline table; keys quoted unless bare
        return "{" + ", ".join(f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else json.dumps(k)} = {_format_value(v)}"
                               for k, v in value.items()) + "}"
    return repr(value)


SECRET_KEYS = {("server", "api_key")}  # shown as "***" when the config is printed


def format_config(config: Config) -> str:
    """The effective config as TOML text (what start-up prints); secrets are masked."""
    blocks = []
    for section, values in config_to_dict(config).items():
        values = {key: "***" if (section, key) in SECRET_KEYS and value else value for key, value in values.items()}
        lines = [f"[{section}]"] + [f"{key} = {_format_value(value)}" for key, value in values.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def default_run_dir(endpoint: str) -> str:
    """<tmp>/minedraft-<uid>/<safe name>: tcp-127.0.0.1-7475, or ipc-<sha1[:12] of the path>."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "ipc":
        name = "ipc-" + hashlib.sha1(rest.encode()).hexdigest()[:12]
    else:
        name = scheme + "-" + re.sub(r"[^A-Za-z0-9.]+", "-", rest).strip("-")
    return os.path.join(user_run_root(), name)


def user_run_root() -> str:
    """<tmp>/minedraft-<uid>: the parent of default run directories (created 0700 by the CLI)."""
    return os.path.join(tempfile.gettempdir(), f"minedraft-{os.getuid()}")


def resolve_run_dir(config: Config) -> str:
    """The run directory: server.run_dir (user-expanded, absolute) or the endpoint's default."""
    if config.server.run_dir:
        return os.path.abspath(os.path.expanduser(config.server.run_dir))
    return default_run_dir(config.server.endpoint)
