"""What the exact rate limit costs Redis: `python -m bench.rate_limit [--calls N]`.

Runs a submit's admission on the machine's Redis (db 14 unless `--redis-url`), from one connection, pipelined
`--depth` deep as the API sends concurrent requests' commands under load, and prints Redis's own CPU per
admission (INFO commandstats) and the client's wall time, beside a floor:

- GCRA: core.quota.ADMIT_LUA, GCRA per key and per tenant and the in-flight slot, one script on Redis's clock;
- counter (the floor): the plain commands of a per-minute counter and a slot (INCR, PEXPIRE, GET of the
  previous minute, INCR), which cannot be exact across a minute boundary nor hold a tenant-wide limit.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import secrets
import time
from collections.abc import Callable

import redis

from core import quota


def redis_usec(client: redis.Redis) -> float:
    """Redis's CPU in the commands the client sent: a script's includes the commands it calls, which
    commandstats also lists on their own."""
    stats = client.info("commandstats")
    if "cmdstat_evalsha" in stats:
        return float(stats["cmdstat_evalsha"]["usec"])
    return float(sum(entry["usec"] for name, entry in stats.items() if not name.startswith("cmdstat_config")))


def run(
    client: redis.Redis, calls: int, depth: int, queue: Callable[[redis.client.Pipeline, int], None]
) -> tuple[float, float]:
    """Redis CPU µs and client wall µs per admission."""
    client.config_resetstat()
    started = time.perf_counter()
    for start in range(0, calls, depth):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(start + depth, calls)):
            queue(pipe, i)
        pipe.execute()
    wall = time.perf_counter() - started
    return redis_usec(client) / calls, wall * 1e6 / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--depth", type=int, default=32, help="admissions per pipelined write")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    namespace = f"bench-rate-{secrets.token_hex(4)}"
    admit = client.register_script(quota.ADMIT_LUA)
    admit(keys=["a", "b", "c", "d"], args=[0, 0, 0, 1000])  # loaded: EVALSHA from here on
    tenants = [f"t{i}" for i in range(50)]

    def counter(pipe: redis.client.Pipeline, i: int) -> None:
        tenant = tenants[i % len(tenants)]
        window = int(time.time() * 1000) // quota.WINDOW_MS
        base = f"{namespace}:{{{tenant}}}:rate:k"
        pipe.incr(f"{base}:{window}")
        pipe.pexpire(f"{base}:{window}", 2 * quota.WINDOW_MS)
        pipe.get(f"{base}:{window - 1}")
        pipe.incr(quota.in_flight_key(namespace, tenant))

    def gcra(pipe: redis.client.Pipeline, i: int) -> None:
        tenant = tenants[i % len(tenants)]
        keys = [*quota.rate_keys(namespace, tenant, "k"), quota.in_flight_key(namespace, tenant)]
        keys.append(quota.admission_key(namespace, tenant, secrets.token_hex(8)))
        admit(keys=keys, args=[10**6, 10**6, 10**9, quota.ADMISSION_TOKEN_TTL_MS], client=pipe)

    print(f"{args.calls} admissions, {len(tenants)} tenants, pipelined {args.depth} deep")
    print(f"{'round':<8}{'GCRA: Redis µs':>18}{'counter: Redis µs':>20}{'GCRA: wall µs':>18}{'counter: wall µs':>20}")
    for round_ in (1, 2):
        floor = run(client, args.calls, args.depth, counter)
        ours = run(client, args.calls, args.depth, gcra)
        print(f"{round_:<8}{ours[0]:>18.1f}{floor[0]:>20.1f}{ours[1]:>18.1f}{floor[1]:>20.1f}")
    for key in client.scan_iter(f"{namespace}:*", count=1000):
        client.delete(key)


if __name__ == "__main__":
    main()
