"""The API phase of `make bench`: `POST /v1/settlements/check` under an open-loop load.

Requests go out on a fixed schedule (`rate` a second) whatever the answers do, and each one's
latency counts from when it was due, not from when the client got round to it: a server that
stalls is charged for the requests queued behind the stall (no coordinated omission). The bodies
are settlements of 4 codes built from the bench stream's own products and codes, per
institution, so they meet real state - most codes were sold already, and the answer carries the
evidence of where and when, the most expensive path of the check.
"""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import orjson

from harness.services import free_port, stop_process, wait_for_http

CODES_PER_CHECK = 4


def check_bodies(
    events: Iterable[dict[str, Any]], count: int, seed: int = 5
) -> list[tuple[str, bytes]]:
    """`count` settlements of `CODES_PER_CHECK` codes each, as (institution, JSON body): each
    from one institution's codes seen in `events` (received or dispensed there), one line per
    product with a pack per code, dated at the stream's last event."""
    pool: dict[str, dict[str, str]] = defaultdict(dict)  # institution -> code -> product
    last = ""
    for event in events:
        last = max(last, str(event.get("occurred_at") or ""))
        inst = event.get("institution")
        if event.get("type") not in ("receipt", "settlement") or not isinstance(inst, str):
            continue
        for line in event.get("lines") or ():
            product = line.get("product")
            for code in line.get("codes") or ():
                if isinstance(product, str) and isinstance(code, str):
                    pool[inst].setdefault(code, product)
    rich = sorted(inst for inst, codes in pool.items() if len(codes) >= CODES_PER_CHECK)
    choices = {inst: sorted(pool[inst].items()) for inst in rich}
    if not rich:
        raise ValueError("no institution in the stream has enough codes to build a check")
    rng = random.Random(seed)
    bodies = []
    for n in range(count):
        inst = rich[n % len(rich)]
        by_product: dict[str, list[str]] = defaultdict(list)
        for code, product in rng.sample(choices[inst], CODES_PER_CHECK):
            by_product[product].append(code)
        lines = [
            {"line_no": i, "product": p, "quantity": len(c), "unit": "pack", "codes": c}
            for i, (p, c) in enumerate(sorted(by_product.items()), 1)
        ]
        body = {
            "event_id": f"CHK{n:08d}",
            "type": "settlement",
            "institution": inst,
            "occurred_at": last,
            "settlement_id": f"CHKSID{n:08d}",
            "patient": f"chk{n % 997:04d}",
            "lines": lines,
        }
        bodies.append((inst, orjson.dumps(body)))
    return bodies


def make_tokens(redis_url: str, prefix: str, institutions: Iterable[str]) -> dict[str, str]:
    """An API token per institution, made as `tracewatch tokens add` makes them."""
    from api.auth import INSTITUTION, TokenStore
    from streams.redis_state import connect

    async def add_all() -> dict[str, str]:
        client = connect(redis_url)
        try:
            store = TokenStore(client, prefix)
            made = {}
            for inst in sorted(set(institutions)):
                made[inst] = (await store.add(INSTITUTION, f"bench {inst}", institution=inst))[0]
            return made
        finally:
            await client.aclose()

    return asyncio.run(add_all())


def fire(
    urls: list[str], requests: list[tuple[str, bytes]], rate: float, connections: int = 48
) -> dict[str, Any]:
    """Send `requests` (token, body) at `rate` a second over `connections` keep-alive
    connections spread over `urls` (a balancer in front of several API processes: the next
    request goes to the first idle connection, so a slower process gets fewer); latencies in
    ms from when each was due, and the answers by status.

    A bare HTTP/1.1 client on uvloop, requests encoded before the clock starts: the load
    generator shares the machine's two cores with what it measures, and aiohttp's client cost
    ~390 us of CPU a request here against ~40 for this one."""
    import uvloop

    hosts = [tuple(url.removeprefix("http://").split(":")) for url in urls]
    host = hosts[0][0]
    encoded = [
        b"POST /v1/settlements/check HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (host.encode(), token.encode(), len(body), body)
        for token, body in requests
    ]

    async def go() -> dict[str, Any]:
        latencies: list[float] = []
        statuses: dict[int, int] = defaultdict(int)
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def connection(host: str, port: str) -> None:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                while (item := await queue.get()) is not None:
                    due, request = item
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head[9:12])
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line[:15].lower() == b"content-length:":
                            length = int(line[15:])
                    await reader.readexactly(length)
                    statuses[status] += 1
                    latencies.append((time.perf_counter() - due) * 1000)
            finally:
                writer.close()

        workers = [
            asyncio.create_task(connection(*hosts[n % len(hosts)])) for n in range(connections)
        ]
        start = time.perf_counter()
        for i, request in enumerate(encoded):
            due = start + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            queue.put_nowait((due, request))
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
        elapsed = time.perf_counter() - start
        return {"latencies": latencies, "statuses": dict(statuses), "elapsed": elapsed}

    # The bench's process holds the whole stream: a full collection walking it stalled the
    # client ~100 ms at a time (p99.9 = max = 130 ms). Frozen, collections skip it.
    gc.collect()
    gc.freeze()
    try:
        return uvloop.run(go())
    finally:
        gc.unfreeze()


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def run(
    env: dict[str, str],
    redis_url: str,
    prefix: str,
    events: list[dict[str, Any]],
    rate: float = 1000,
    seconds: float = 20,
    warmup_seconds: float = 3,
    processes: int = 2,
) -> dict[str, Any]:
    """Start `processes` API processes on the pipeline of `env` (its state at rest in Redis),
    warm them up, then measure `seconds` of checks at `rate`; figures for RESULTS.md. Two
    processes: one check costs ~1.2 ms of CPU, so one process saturates near 800 checks/s on
    this machine (measured), and the API is built to run several behind a balancer. Separate
    processes on their own ports rather than `TRACEWATCH_API_WORKERS`: uvicorn's workers
    share one accept queue, which handed most of a client's connections to one of them."""
    from loadtest.bench import cpu_seconds, log, redis_counters
    from loadtest.run import ROOT

    count = int(rate * seconds)
    warm = int(rate * warmup_seconds)
    bodies = check_bodies(events, count + warm)
    tokens = make_tokens(redis_url, prefix, (inst for inst, _ in bodies))
    requests = [(tokens[inst], body) for inst, body in bodies]
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    for _ in range(processes):
        port = free_port()
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "cli", "api"],
                env={
                    **env,
                    "TRACEWATCH_API_PORT": str(port),
                    # one client stands for every POS: no token's own limit is under test
                    "TRACEWATCH_API_RATE": str(rate * 10),
                    "TRACEWATCH_API_BURST": str(rate * 10),
                },
                cwd=ROOT,
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url, proc in zip(urls, procs, strict=True):
            wait_for_http(f"{url}/readyz", proc, "API")
        log(f"api: warming up ({warmup_seconds:.0f}s at {rate:,.0f} checks/s)")
        fire(urls, requests[:warm], rate)
        log(f"api: {seconds:.0f}s at {rate:,.0f} checks/s, {CODES_PER_CHECK} codes each")
        redis_pid = int(redis_counters(redis_url)["pid"])
        before = sum(cpu_seconds(p.pid) for p in procs), cpu_seconds(redis_pid)
        result: dict[str, Any] = {}
        # the client in a thread of its own loop: the bench's own process does nothing else now
        thread = threading.Thread(
            target=lambda: result.update(fire(urls, requests[warm:], rate)), daemon=True
        )
        thread.start()
        thread.join()
        after = sum(cpu_seconds(p.pid) for p in procs), cpu_seconds(redis_pid)
    finally:
        for proc in procs:
            stop_process(proc)
    ordered = sorted(result["latencies"])
    ok = result["statuses"].get(200, 0)
    figures = {
        "rate": rate,
        "processes": processes,
        "achieved": len(ordered) / result["elapsed"],
        "n": len(ordered),
        "ok": ok,
        "failed": len(ordered) - ok,
        "p50": statistics.median(ordered),
        "p99": _percentile(ordered, 0.99),
        "p999": _percentile(ordered, 0.999),
        "max": ordered[-1],
        "cpu_us_api": (after[0] - before[0]) / len(ordered) * 1e6,
        "cpu_us_redis": (after[1] - before[1]) / len(ordered) * 1e6,
    }
    log(
        f"api: p50 {figures['p50']:.1f} ms, p99 {figures['p99']:.1f} ms, "
        f"{figures['failed']} not 200, {figures['cpu_us_api']:.0f} us CPU/check in the API"
    )
    return figures
