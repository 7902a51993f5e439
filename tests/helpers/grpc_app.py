"""A real gRPC server and client (grpcio, generic handlers on raw bytes, no generated code),
run as their own processes so that grpcio's threads and descriptors stay out of the test
process.

    python -m tests.helpers.grpc_app server HOST PORT NAME
    python -m tests.helpers.grpc_app client TARGET        # prints one JSON object

Service ``echo.Echo``: ``Say`` (unary, sends initial metadata x-served-by and trailer
x-trailer), ``Fail`` (aborts NOT_FOUND), ``Slow`` (5 s), ``Count`` (server streaming).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator

import grpc


def handlers(name: str) -> grpc.GenericRpcHandler:
    async def say(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.send_initial_metadata((("x-served-by", name),))
        context.set_trailing_metadata((("x-trailer", f"from-{name}"),))
        return b"hello " + request

    async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"no {request.decode()} here")
        raise AssertionError("abort never returns")

    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(5)
        return request

    async def count(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(int(request.decode())):
            yield f"{name}-{i}".encode()

    return grpc.method_handlers_generic_handler("echo.Echo", {
        "Say": grpc.unary_unary_rpc_method_handler(say),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    })


async def serve(host: str, port: int, name: str) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handlers(name),))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def client(target: str) -> dict[str, object]:
    out: dict[str, object] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary("/echo.Echo/Say")(b"mesh", timeout=10)
        out["say"] = (await call).decode()
        out["served_by"] = dict(await call.initial_metadata()).get("x-served-by")
        out["trailer"] = dict(await call.trailing_metadata()).get("x-trailer")
        try:
            await channel.unary_unary("/echo.Echo/Fail")(b"cake", timeout=10)
        except grpc.aio.AioRpcError as exc:
            out["fail"] = [exc.code().name, exc.details()]
        out["count"] = [m.decode() async for m in
                        channel.unary_stream("/echo.Echo/Count")(b"3", timeout=10)]
        try:
            await channel.unary_unary("/echo.Echo/Slow")(b"x", timeout=0.5)
        except grpc.aio.AioRpcError as exc:
            out["slow"] = exc.code().name
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["server"]:
        asyncio.run(serve(argv[1], int(argv[2]), argv[3]))
        return 0
    if argv[:1] == ["client"]:
        print(json.dumps(asyncio.run(client(argv[1]))))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
