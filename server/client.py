"""A small Python client over the generated stubs, and the ``lstm-client`` CLI.

``lstm-client generate --target HOST:PORT --prompt TEXT --max-tokens N`` prints only the
continuation, as it arrives. ``step`` prints the next-token distribution's top tokens,
``health`` exits 0 only when the server is SERVING (the container's HEALTHCHECK), ``info``
describes the model. Errors print the status code and message and exit non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

SESSION_HEADER = "lstm-session-id"


TOKEN_ENV = "LSTM_SERVE_TOKEN"


class LstmClient:
    """Blocking client. Every method raises :class:`grpc.RpcError` on a non-OK status."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        token: str | None = None,
    ) -> None:
        """``tls_ca`` (PEM file) turns TLS on; ``tls_cert``/``tls_key`` add a client
        certificate (mutual TLS); ``token`` is sent as ``authorization: Bearer TOKEN``."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if tls_ca or tls_cert:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca),
                private_key=_read(tls_key),
                certificate_chain=_read(tls_cert),
            )
            self.channel = grpc.secure_channel(target, creds)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.LstmServeServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout
        self._auth: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )

    def _md(self, session_id: str = "") -> tuple[tuple[str, str], ...]:
        # Every call that names a session carries its id as metadata too, so an L7 proxy in
        # front of several replicas (nginx: hash $http_lstm_session_id) sends it where the
        # session lives.
        route = ((SESSION_HEADER, session_id),) if session_id else ()
        return self._auth + route

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LstmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_session(self, idle_timeout_s: float = 0.0, session_id: str = "") -> str:
        """A new session; ``session_id`` chooses its id (16-128 of [A-Za-z0-9_-])."""
        req = pb.CreateSessionRequest(idle_timeout_s=idle_timeout_s, session_id=session_id)
        return str(
            self.stub.CreateSession(
                req, timeout=self.timeout, metadata=self._md(session_id)
            ).session_id
        )

    def close_session(self, session_id: str) -> None:
        self.stub.CloseSession(
            pb.CloseSessionRequest(session_id=session_id),
            timeout=self.timeout,
            metadata=self._md(session_id),
        )

    def reset_session(self, session_id: str) -> None:
        self.stub.ResetSession(
            pb.ResetSessionRequest(session_id=session_id),
            timeout=self.timeout,
            metadata=self._md(session_id),
        )

    def get_session(self, session_id: str) -> Any:
        return self.stub.GetSession(
            pb.GetSessionRequest(session_id=session_id),
            timeout=self.timeout,
            metadata=self._md(session_id),
        )

    def export_session(self, session_id: str) -> bytes:
        """The session's record (state, counters, model identity) as bytes."""
        return bytes(
            self.stub.ExportSession(
                pb.ExportSessionRequest(session_id=session_id),
                timeout=self.timeout,
                metadata=self._md(session_id),
            ).record
        )

    def import_session(self, record: bytes, session_id: str = "") -> str:
        """A new session from :meth:`export_session`'s bytes; its id."""
        sid = session_id
        return str(
            self.stub.ImportSession(
                pb.ImportSessionRequest(record=record, session_id=session_id),
                timeout=self.timeout,
                metadata=self._md(sid),
            ).session_id
        )

    def fork_session(self, session_id: str, new_session_id: str = "") -> str:
        """A copy of the session under a new id (the original is unchanged); the copy's id."""
        return str(
            self.stub.ForkSession(
                pb.ForkSessionRequest(session_id=session_id, new_session_id=new_session_id),
                timeout=self.timeout,
                metadata=self._md(session_id),
            ).session_id
        )

    def model_info(self) -> Any:
        return self.stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self._md()
        )

    def step(
        self,
        session_id: str,
        *,
        text: str = "",
        token_ids: Sequence[int] = (),
        output: Any = pb.STEP_OUTPUT_LAST_LOGITS,
        top_k: int = 0,
    ) -> Any:
        req = pb.StepRequest(
            session_id=session_id, text=text, token_ids=token_ids, output=output, top_k=top_k
        )
        return self.stub.Step(req, timeout=self.timeout, metadata=self._md(session_id))

    def generate(
        self,
        prompt: str,
        max_tokens: int,
        *,
        session_id: str = "",
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[Any]:
        """Yield ``GenerateResponse`` messages as they arrive (cancel by closing the iterator)."""
        req = pb.GenerateRequest(
            session_id=session_id,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop=list(stop),
        )
        if seed is not None:
            req.seed = seed
        call = self.stub.Generate(req, timeout=self.timeout, metadata=self._md(session_id))
        try:
            yield from call
        finally:
            call.cancel()

    def generate_text(self, prompt: str, max_tokens: int, **kw: Any) -> str:
        return "".join(r.text for r in self.generate(prompt, max_tokens, **kw))

    def health(self, service: str = "") -> int:
        """The health status enum value (``health_pb2.HealthCheckResponse.SERVING`` = 1)."""
        resp = self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout
        )
        return int(resp.status)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lstm-client", description="Talk to an lstm-serve server.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the server")
        sp.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
        sp.add_argument("--tls-ca", default=None, help="PEM CA bundle: connect with TLS")
        sp.add_argument("--tls-cert", default=None, help="PEM client certificate (mutual TLS)")
        sp.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
        sp.add_argument(
            "--token",
            default=os.environ.get(TOKEN_ENV) or None,
            help=f"bearer token (default: ${TOKEN_ENV})",
        )

    g = sub.add_parser("generate", help="print a generated continuation of a prompt")
    common(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--session", default="", help="continue this session (default: ephemeral)")
    s = sub.add_parser("step", help="feed text to a session and print the top next tokens")
    common(s)
    s.add_argument("--text", required=True)
    s.add_argument("--session", default="", help="session id (default: a new one, printed)")
    s.add_argument("--top-k", type=int, default=5)
    h = sub.add_parser("health", help="exit 0 only when the server is SERVING")
    common(h)
    i = sub.add_parser("info", help="describe the served model")
    common(i)
    c = sub.add_parser("create", help="create a session and print its id")
    common(c)
    c.add_argument("--session-id", default="", help="the id to use (default: the server picks)")
    c.add_argument("--idle-timeout-s", type=float, default=0.0)
    e = sub.add_parser("export", help="write a session's record to a file")
    common(e)
    e.add_argument("--session", required=True)
    e.add_argument("--out", required=True, help="file to write the record to")
    m = sub.add_parser("import", help="create a session from an exported record")
    common(m)
    m.add_argument("--record", required=True, help="file written by export")
    m.add_argument("--session-id", default="", help="the new id (default: the record's)")
    f = sub.add_parser("fork", help="copy a session under a new id")
    common(f)
    f.add_argument("--session", required=True)
    f.add_argument("--new-session-id", default="")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        with LstmClient(
            args.target,
            timeout=args.timeout,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            token=args.token,
        ) as client:
            sys.exit(_run(client, args))
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        name = code.name if code is not None else "UNKNOWN"
        print(f"lstm-client: error: {name}: {details}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def _run(client: LstmClient, args: argparse.Namespace) -> int:
    if args.command == "generate":
        for resp in client.generate(
            args.prompt,
            args.max_tokens,
            session_id=args.session,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
        ):
            sys.stdout.write(resp.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    if args.command == "step":
        sid = args.session or client.create_session()
        resp = client.step(sid, text=args.text, output=pb.STEP_OUTPUT_TOP_K, top_k=args.top_k)
        print(f"session {sid} steps={resp.steps}")
        for t in resp.top:
            print(f"{t.token!r}\t{t.token_id}\t{t.probability:.4f}")
        return 0
    if args.command == "health":
        status = client.health()
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        print(name)
        return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1
    if args.command == "info":
        print(client.model_info())
        return 0
    if args.command == "create":
        print(client.create_session(args.idle_timeout_s, args.session_id))
        return 0
    if args.command == "export":
        record = client.export_session(args.session)
        with open(args.out, "wb") as out:
            out.write(record)
        print(f"wrote {len(record)} bytes to {args.out}")
        return 0
    if args.command == "import":
        with open(args.record, "rb") as src:
            print(client.import_session(src.read(), args.session_id))
        return 0
    if args.command == "fork":
        print(client.fork_session(args.session, args.new_session_id))
        return 0
    return 2


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


if __name__ == "__main__":
    main()
