"""The server's one settings object: defaults, ``LSTM_SERVE_*`` environment variables, flags.

Precedence: command-line flag > environment variable > default. Every field's help text below
is also the flag's ``--help`` and the settings table in ``server/README.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "LSTM_SERVE_"
PROVIDERS = ("auto", "cuda", "cpu")
EVICTION_POLICIES = ("refuse", "lru")
CONTROL_MODES = ("none", "poll", "explicit")
TOPOLOGIES = ("auto", "single", "split")
# At most this many available cores: 'auto' runs the single-process topology.
SINGLE_MAX_CORES = 2


class SettingsError(ValueError):
    """A setting has a bad value; the message names the setting (flag and variable)."""


def _doc(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class Settings:
    """Everything ``lstm-serve`` can be told. Validated by :meth:`validate`."""

    host: str = _doc(
        "Address to listen on (127.0.0.1 = this machine only; 0.0.0.0 in containers).",
        default="127.0.0.1",
    )
    port: int = _doc("gRPC port; 0 picks a free port (tests).", default=50051)
    metrics_port: int = _doc(
        "Prometheus /metrics HTTP port on the same host; 0 picks a free port, -1 disables.",
        default=9090,
    )
    http_port: int = _doc(
        "KServe v2 HTTP/REST port (/v2/health/ready, /v2/models/NAME/infer, ...) on the same "
        "host, with the gRPC port's TLS, authentication and limits; 0 picks a free port, -1 "
        "disables.",
        default=-1,
    )
    model: str = _doc(
        "One model: an .onnx file, a version folder holding model.onnx, or a model folder "
        "NAME/VERSION/model.onnx (highest version wins). Empty = serve --model-repository.",
        default="",
    )
    model_sha256: str = _doc(
        "The SHA-256 (64 hex digits) the --model file must have, or it is refused; for a file "
        "that no repository manifest or export report vouches for. Empty = not pinned.",
        default="",
    )
    model_repository: str = _doc(
        "A model repository REPO/NAME/VERSION/model.onnx: every model in it is served, each "
        "under the version policy in REPO/NAME/config.json (default: the latest version). "
        "Empty = the bundled repository (unless --model is given).",
        default="",
    )
    default_model: str = _doc(
        "The model that requests naming none use. Empty = the repository's only model, or "
        "'timemachine' when there are several.",
        default="",
    )
    model_control_mode: str = _doc(
        "none (load at start), poll (rescan the repository every --repository-poll-s: new "
        "versions load, versions out of the policy retire) or explicit (only LoadModel / "
        "UnloadModel and KServe RepositoryModelLoad / RepositoryModelUnload change anything).",
        default="none",
    )
    repository_poll_s: float = _doc("Seconds between repository scans in poll mode.", default=5.0)
    version_drain_s: float = _doc(
        "A retired version (out of the policy, or unloaded) stays loaded for the sessions pinned "
        "to it until they end or this many seconds pass; then they get FAILED_PRECONDITION.",
        default=600.0,
    )
    admin_principals: str = _doc(
        "Comma-separated principals that may load and unload models when --auth-tokens is set "
        "(without authentication every client may, in explicit mode).",
        default="",
    )
    provider: str = _doc(
        "ONNX Runtime execution provider: auto (CUDA only when it really works), cuda, cpu.",
        default="auto",
    )
    intra_op_threads: int = _doc(
        "ONNX Runtime intra-op threads per model call; 0 = ONNX Runtime's default.", default=1
    )
    max_sessions: int = _doc("Most sessions held at once (ephemeral ones included).", default=10000)
    idle_timeout_s: float = _doc(
        "Seconds a session may stay unused before it is evicted; also the most a client may ask.",
        default=600.0,
    )
    state_store: str = _doc(
        "Where session state lives: memory (this process only), sqlite:///ABS/PATH (one server "
        "that must survive restarts) or redis://HOST:PORT/DB (shared by replicas). With a "
        "durable store every request that changed a session commits it before the response.",
        default="memory",
    )
    eviction: str = _doc(
        "When the session table is full: refuse (RESOURCE_EXHAUSTED) or lru (evict the least "
        "recently used idle session).",
        default="refuse",
    )
    max_batch_size: int = _doc(
        "Most sessions' decode steps in one model call; 1 turns batching off.", default=256
    )
    max_queue_delay_ms: float = _doc(
        "Longest a step waits for others to fill a batch when fewer arrived than in the "
        "previous iteration, in milliseconds; 0 = never wait.",
        default=0.2,
    )
    max_queue_size: int = _doc(
        "Most requests waiting for the model; more get RESOURCE_EXHAUSTED.", default=4096
    )
    prefill_chunk_tokens: int = _doc(
        "Prompt tokens per session fed in one model call, so long prompts do not stall running "
        "generations for long.",
        default=128,
    )
    inline_max_rows: int = _doc(
        "While no generation runs, steps stay on the event loop thread: one-token steps arriving "
        "in the same loop tick run as one batch of up to this many rows, and a step of at most "
        "this many tokens runs at once; 0 = always use the engine thread.",
        default=16,
    )
    stream_chunk_tokens: int = _doc(
        "Generate streams send a message at least every this many tokens (the first token and "
        "the end at once); with many generations running the chunk grows to the number running "
        "(at most 64), about one message per iteration in all; a slow reader gets more.",
        default=16,
    )
    topology: str = _doc(
        "How the server runs: 'single' = the engine and gRPC in one process; 'split' = an "
        "engine process and --frontends gRPC processes; 'auto' = split when --frontends is "
        "given or more than 2 cores are available, else single (on 2 cores single measured "
        "cheaper per step and faster: benchmarks/README.md, section 15).",
        default="auto",
    )
    frontends: int = _doc(
        "With the split topology: gRPC front-end processes sharing the port (SO_REUSEPORT), "
        "each talking to the one engine process; 0 = one per available core minus one for the "
        "engine, at least 1 and at most 8.",
        default=0,
    )
    tls_cert: str = _doc(
        "PEM certificate chain for TLS on the gRPC port (with --tls-key); empty = plaintext.",
        default="",
    )
    tls_key: str = _doc("PEM private key of --tls-cert.", default="")
    tls_client_ca: str = _doc(
        "PEM CA bundle: require client certificates signed by it (mutual TLS); a verified "
        "certificate's subject common name is the principal when the client sends no token.",
        default="",
    )
    auth_tokens: str = _doc(
        "File of 'PRINCIPAL TOKEN' lines ('#' comments), reloaded on SIGHUP; clients send "
        "'authorization: Bearer TOKEN'. Every call but health then needs a valid credential, "
        "and a session belongs to the principal that created it. Empty = no authentication.",
        default="",
    )
    max_sessions_per_principal: int = _doc(
        "Most sessions one principal may hold at once (ephemeral ones included); 0 = no quota.",
        default=0,
    )
    rate_limit_rps: float = _doc(
        "Requests per second one principal may start (a token bucket holding two seconds' "
        "worth); 0 = no limit.",
        default=0.0,
    )
    reflection: bool = _doc(
        "Serve gRPC server reflection (grpc.reflection.v1 and v1alpha: lists the services and "
        "their messages, for grpcurl and the like); off = clients need the .proto.",
        default=False,
    )
    expose_build_info: bool = _doc(
        "GetModelInfo's config_json includes the checkpoint and corpus SHA-256 and the library "
        "versions the exporter recorded; off = they are left out.",
        default=False,
    )
    max_prompt_tokens: int = _doc("Most tokens one Step or Generate prompt may feed.", default=4096)
    max_new_tokens: int = _doc("Most tokens one Generate call may ask for.", default=4096)
    max_record_bytes: int = _doc(
        "Largest session record ImportSession must take, in bytes (a record is about 2*L*H*4 + "
        "V*4 + 1 KiB: 4.3 KiB for the bundled model). The gRPC port accepts request messages "
        "of up to max(32 * max_prompt_tokens, this) + 64 KiB; bigger ones get "
        "RESOURCE_EXHAUSTED.",
        default=256 << 10,
    )
    drain_grace_s: float = _doc(
        "On SIGTERM/SIGINT: seconds in-flight requests get to finish before being cancelled.",
        default=10.0,
    )
    log_level: str = _doc("Python log level: DEBUG, INFO, WARNING, ERROR.", default="INFO")

    def validate(self) -> Settings:
        """Return ``self`` if every value is in range; raise :class:`SettingsError` naming one."""

        def bad(name: str, why: str) -> SettingsError:
            return SettingsError(f"--{name.replace('_', '-')} / {ENV_PREFIX}{name.upper()}: {why}")

        if not 0 <= self.port <= 65535:
            raise bad("port", f"must be in 0..65535, got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            raise bad("metrics_port", f"must be in -1..65535, got {self.metrics_port}")
        if not -1 <= self.http_port <= 65535:
            raise bad("http_port", f"must be in -1..65535, got {self.http_port}")
        if self.provider not in PROVIDERS:
            raise bad("provider", f"must be one of {', '.join(PROVIDERS)}, got {self.provider!r}")
        if not (
            self.state_store == "memory" or self.state_store.startswith(("sqlite:///", "redis://"))
        ):
            raise bad(
                "state_store",
                f"must be memory, sqlite:///PATH or redis://HOST:PORT/DB, got {self.state_store!r}",
            )
        if self.model_control_mode not in CONTROL_MODES:
            raise bad(
                "model_control_mode",
                f"must be one of {', '.join(CONTROL_MODES)}, got {self.model_control_mode!r}",
            )
        if self.model and self.model_repository:
            raise bad(
                "model_repository", "give --model (one model) or --model-repository, not both"
            )
        if self.model and self.model_control_mode != "none":
            raise bad(
                "model_control_mode", "poll and explicit need --model-repository, not --model"
            )
        if self.model_sha256 and not (
            len(self.model_sha256) == 64
            and all(ch in "0123456789abcdefABCDEF" for ch in self.model_sha256)
        ):
            raise bad("model_sha256", f"must be 64 hex digits, got {self.model_sha256[:80]!r}")
        if self.model_sha256 and not self.model:
            raise bad("model_sha256", "pins the --model file; give --model too")
        for name in ("repository_poll_s", "version_drain_s"):
            if not getattr(self, name) > 0:
                raise bad(name, f"must be > 0, got {getattr(self, name)}")
        if self.topology not in TOPOLOGIES:
            raise bad("topology", f"must be one of {', '.join(TOPOLOGIES)}, got {self.topology!r}")
        if self.topology == "single" and self.frontends > 0:
            raise bad("frontends", "front-end processes need --topology split (or auto)")
        if self.eviction not in EVICTION_POLICIES:
            raise bad(
                "eviction", f"must be one of {', '.join(EVICTION_POLICIES)}, got {self.eviction!r}"
            )
        for name in (
            "max_sessions",
            "max_batch_size",
            "max_queue_size",
            "prefill_chunk_tokens",
            "max_prompt_tokens",
            "max_new_tokens",
            "stream_chunk_tokens",
            "max_record_bytes",
        ):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in (
            "intra_op_threads",
            "inline_max_rows",
            "frontends",
            "max_sessions_per_principal",
        ):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("idle_timeout_s",):
            if not getattr(self, name) > 0:
                raise bad(name, f"must be > 0, got {getattr(self, name)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise bad("tls_cert", "--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise bad("tls_client_ca", "mutual TLS needs --tls-cert and --tls-key too")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise bad(name, f"file not found: {path}")
        for name in ("max_queue_delay_ms", "drain_grace_s", "rate_limit_rps"):
            if not getattr(self, name) >= 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        return self

    def admins(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.admin_principals.split(",") if p.strip())

    def max_message_bytes(self) -> int:
        """The largest request message the gRPC port accepts (bigger: RESOURCE_EXHAUSTED).

        Room for the largest valid request: a Step or Generate prompt of ``max_prompt_tokens``
        tokens as text (the data plane takes at most 8 characters per token, up to 4 bytes each
        in UTF-8; as token ids a token is at most 10 bytes), or an ImportSession record of
        ``max_record_bytes``, plus 64 KiB for the other fields (Generate's stop strings are at
        most 8 x 64 characters). 320 KiB by default.
        """
        prompt = self.max_prompt_tokens * 8 * 4
        return max(prompt, self.max_record_bytes) + (64 << 10)

    def resolved_topology(self) -> str:
        """``topology``, with 'auto' resolved by the rule in its help text."""
        if self.topology != "auto":
            return self.topology
        if self.frontends > 0 or len(os.sched_getaffinity(0)) > SINGLE_MAX_CORES:
            return "split"
        return "single"

    def frontend_count(self) -> int:
        """``frontends``, with 0 resolved by the rule in its help text."""
        if self.frontends > 0:
            return self.frontends
        return max(1, min(8, len(os.sched_getaffinity(0)) - 1))

    def to_json(self) -> str:
        """Every field as JSON (how the supervisor hands settings to its processes)."""
        return json.dumps(dataclasses.asdict(self))


def settings_from_json(text: str) -> Settings:
    return Settings(**json.loads(text)).validate()


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _convert(f: dataclasses.Field[Any], raw: str, source: str) -> Any:
    kind: type = type(f.default)
    try:
        if kind is bool:
            word = raw.strip().lower()
            if word not in _TRUE + _FALSE:
                raise ValueError(word)
            return word in _TRUE
        return kind(raw.strip()) if kind is not str else raw
    except ValueError:
        raise SettingsError(f"{source}: expected {kind.__name__}, got {raw!r}") from None


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Defaults overridden by ``LSTM_SERVE_<FIELD>`` variables (upper case field names)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        key = ENV_PREFIX + f.name.upper()
        if key in environ and environ[key] != "":
            values[f.name] = _convert(f, environ[key], key)
    return Settings(**values).validate()


def build_parser(defaults: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstm-serve",
        description="Serve a stateful LSTM ONNX model over gRPC (environment: LSTM_SERVE_<NAME>).",
    )
    for f in dataclasses.fields(Settings):
        # A switch may stand alone (--reflection) or take a value (--reflection false).
        switch: dict[str, Any] = {}
        if isinstance(f.default, bool):
            switch = {"nargs": "?", "const": "true"}
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=str,
            default=None,
            **switch,
            metavar=type(f.default).__name__.upper(),
            help=f"{f.metadata['help']} [env {ENV_PREFIX}{f.name.upper()}; "
            f"now {getattr(defaults, f.name)!r}]",
        )
    return parser


def from_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Flags over environment over defaults. Raises :class:`SettingsError` on a bad value."""
    base = from_env(environ)
    ns = build_parser(base).parse_args(argv)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = getattr(ns, f.name)
        if raw is not None:
            values[f.name] = _convert(f, raw, "--" + f.name.replace("_", "-"))
    return dataclasses.replace(base, **values).validate()


def settings_table() -> str:
    """Markdown table of every setting (kept in ``server/README.md``)."""
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(Settings):
        rows.append(
            f"| `--{f.name.replace('_', '-')}` | `{ENV_PREFIX}{f.name.upper()}` | "
            f"`{f.default!r}` | {f.metadata['help']} |"
        )
    return "\n".join(rows)
