"""A null ``LstmServe`` server: ``StepStream`` answers at once, with no model and no state.

``python -m benchmarks.null_server`` listens on 127.0.0.1 (port 0 by default) and prints the same
"gRPC listening on HOST:PORT" line as ``lstm-serve``, with the standard health service. Driven by
the same load generator as the real server, it measures the floor that gRPC Python (grpc.aio on
both ends, loopback, this machine's cores) puts under client-driven steps: what the real server
would reach if the model, the scheduler and the session bookkeeping cost nothing. Each answer is
shaped like a real one (a last-logits response for the model's vocabulary size), so the bytes on
the wire match.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos.lstmserve.v1 import lstm_serve_pb2 as pb
from protos.lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc


class NullServicer(pb_grpc.LstmServeServiceServicer):
    def __init__(self, vocab: int) -> None:
        self.logits = [0.25] * vocab

    async def StepStream(self, request_iterator: Any, context: Any) -> None:
        steps = 0
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:
                return
            steps += len(req.token_ids)
            await context.write(
                pb.StepStreamResponse(
                    session_id="null",
                    logits=self.logits,
                    positions=1,
                    tokens_consumed=len(req.token_ids),
                    steps=steps,
                )
            )


async def serve(port: int, vocab: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_LstmServeServiceServicer_to_server(NullServicer(vocab), server)
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"null-server: gRPC listening on 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.null_server")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--vocab", type=int, default=28)
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.vocab))


if __name__ == "__main__":
    main()
