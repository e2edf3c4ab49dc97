"""The scaler's dashboard on a Swarm manager's loopback (`make swarm-dashboard`, swarm.sh).

Run by compose/scripts/swarm.sh as ``python -c`` in a container of the app image, started with
plain ``docker run -p 127.0.0.1:PORT:9100`` on the stack's attachable ``ops`` network (a Swarm
service cannot publish on loopback). Every 2 s it asks each scaler task (``tasks.<SCALERS>``, the
scaler service's name in SCALERS) for ``/status`` and forwards every connection to the one whose
role is ``leader`` (or ``single``), else to any scaler that resolves; bytes both ways, as they
are. Standard library only.
"""

import asyncio
import os
import re
import socket
import urllib.request

SCALERS = os.environ["SCALERS"]
SCALER_PORT = 9808
LISTEN_PORT = 9100
EVERY_S = 2.0
LEADS = re.compile(rb'"role"\s*:\s*"(leader|single)"')
current: list[str] = []


def find_leader() -> str | None:
    """The address of the scaler that leads, else of any scaler task; None when none resolves."""
    try:
        infos = socket.getaddrinfo(f"tasks.{SCALERS}", SCALER_PORT, type=socket.SOCK_STREAM)
    except OSError:
        return None
    addresses = sorted({str(info[4][0]) for info in infos})
    for address in addresses:
        try:
            with urllib.request.urlopen(f"http://{address}:{SCALER_PORT}/status", timeout=2) as r:
                if LEADS.search(r.read()):
                    return address
        except (OSError, ValueError):
            continue
    return addresses[0] if addresses else None


async def follow() -> None:
    while True:
        found = await asyncio.to_thread(find_leader)
        current[:] = [found] if found else []
        await asyncio.sleep(EVERY_S)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    address = current[0] if current else await asyncio.to_thread(find_leader)
    try:
        if address is None:
            raise OSError("no scaler resolves")
        upstream = await asyncio.wait_for(asyncio.open_connection(address, SCALER_PORT), 5)
    except OSError:  # a timeout too (TimeoutError is an OSError)
        writer.close()
        return
    await asyncio.gather(pipe(reader, upstream[1]), pipe(upstream[0], writer))


async def main() -> None:
    server = await asyncio.start_server(forward, "0.0.0.0", LISTEN_PORT)
    async with server:
        await asyncio.gather(server.serve_forever(), follow())


asyncio.run(main())
