"""A batch of real products on the job queue: N workers against one, same machine.

    python benchmarks/batch_queue.py                        # 50 products, 1 then 4 workers
    python benchmarks/batch_queue.py --products 20 --workers 1 --workers 2 --resolution 20

The products are the two real L2A products of tests/data (T29UNU, T22HBD), each copied
(hard links; only the product metadata's PRODUCT_URI differs) until there are
``--products`` distinct products, cached under .cache/batch-bench/. For each worker
count a fresh redis-server, `kappamask serve --broker-url` and that many `kappamask
worker` processes share one Triton; one ``kappamask-batch`` job is submitted over HTTP
and timed from submission to its end. Every product is its own child job, so the
workers share the batch. The table gives the throughput against one worker (same
machine, same Triton, the same total CPU: the workers share its cores) and each
worker's peak memory (VmHWM) after the batch and, as a flatness check, its resident memory
between products: the lowest RSS seen in each quarter of the batch (a leak would make it
climb from quarter to quarter).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SOURCES = [
    DATA / "s2" / "S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU_20221005T164454.SAFE",
    DATA / "s2" / "esa_S2B_MSIL2A_20210122T133229_N0214_R081_T22HBD_20210122T155500.SAFE",
]
CACHE = ROOT / ".cache" / "batch-bench"
#: The product discriminator ESA puts last in a product name (its generation time).
_LAST = re.compile(r"_(\d{8}T\d{6})(\.SAFE)?$")

sys.path.insert(0, str(ROOT / "service"))
from kappamask.inference.repository import DEFAULT_REPOSITORY  # noqa: E402
from kappamask.inference.server import LocalTriton, free_port  # noqa: E402


def make_products(count: int) -> list[Path]:
    """``count`` distinct products: hard-linked copies of the real ones, each with its own
    PRODUCT_URI (the generation time counts up)."""
    folder = CACHE / "products"
    folder.mkdir(parents=True, exist_ok=True)
    products = []
    for index in range(count):
        source = SOURCES[index % len(SOURCES)]
        stem = source.name.removeprefix("esa_").removesuffix(".SAFE")
        match = _LAST.search(stem)
        assert match, stem
        name = f"{stem[: match.start(1)]}{20300101 + index // len(SOURCES):08d}T000000"
        target = folder / f"{name}.SAFE"
        if not target.exists():
            staging = folder / f".{name}.SAFE"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source, staging, copy_function=os.link)
            for mtd in staging.glob("MTD_MSIL*.xml"):
                text = mtd.read_text()
                mtd.unlink()  # a hard link: the original stays as it is
                mtd.write_text(
                    re.sub(
                        r"<PRODUCT_URI>[^<]*</PRODUCT_URI>",
                        f"<PRODUCT_URI>{name}.SAFE</PRODUCT_URI>",
                        text,
                    )
                )
            staging.rename(target)
        products.append(target)
    return products


def _kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kappamask.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _wait(check: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.2)


def run(
    workers: int, products: list[Path], triton_url: str, resolution: int, base: Path
) -> dict[str, Any]:
    """One batch of ``products`` with ``workers`` workers; its measures."""
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    redis_port, api_port = free_port(), free_port()
    broker = f"redis://127.0.0.1:{redis_port}/0"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "service"),
        "KAPPAMASK_BROKER_URL": broker,
        "KAPPAMASK_JOB_OUTPUT_DIR": str(base / "jobs"),
        "KAPPAMASK_JOBS_DB": str(base / "jobs.db"),
        "KAPPAMASK_PUBLIC_URL": f"http://127.0.0.1:{api_port}",
    }
    shared = [
        "--triton-url",
        triton_url,
        "--output-dir",
        str(base / "out"),
        "--data-root",
        str(CACHE),
    ]
    procs: list[subprocess.Popen[bytes]] = []
    with ExitStack() as stack:
        redis = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(base),
            ],
            stdout=subprocess.DEVNULL,
        )
        stack.callback(lambda: (redis.terminate(), redis.wait()))

        def stop_all() -> None:
            for proc in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in procs:
                proc.wait(timeout=120)

        stack.callback(stop_all)
        url = f"http://127.0.0.1:{api_port}"
        procs.append(_start(["serve", "--port", str(api_port), *shared], base / "serve.log", env))

        def api_up() -> bool:
            try:
                return requests.get(f"{url}/processes", timeout=2).ok
            except requests.ConnectionError:
                return False

        _wait(api_up, "the API")
        logs = []
        for n in range(workers):
            logs.append(base / f"worker-{n}.log")
            procs.append(_start(["worker", *shared], logs[-1], env))
        _wait(lambda: all("ready." in log.read_text() for log in logs), "the workers")
        body = {
            "inputs": {
                "products": [str(p) for p in products],
                "resolution": resolution,
                "collection_id": "bench",
            }
        }
        started = time.perf_counter()
        response = requests.post(
            f"{url}/processes/kappamask-batch/execution",
            json=body,
            headers={"Prefer": "respond-async"},
            timeout=60,
        )
        response.raise_for_status()
        job_url = response.headers["Location"]
        # lowest resident memory of each worker in each quarter of the batch
        low = [[10**9] * len(logs) for _ in range(4)]
        while True:
            job = requests.get(job_url, params={"f": "json"}, timeout=10).json()
            if job["status"] in ("successful", "failed", "dismissed"):
                break
            q = min(3, int(job.get("progress", 0)) // 25)
            for n, proc in enumerate(procs[1:]):
                low[q][n] = min(low[q][n], _kb(proc.pid, "VmRSS") or 10**9)
            time.sleep(0.25)
        seconds = time.perf_counter() - started
        if job["status"] != "successful":
            raise SystemExit(f"the batch ended {job['status']}: {job.get('message')}")
        result = requests.get(f"{job_url}/results", params={"f": "json"}, timeout=30).json()
        hwm = [_kb(p.pid, "VmHWM") for p in procs[1:]]
        ran = [
            sum(1 for p in result["products"] if p.get("job") and p["job"] in log.read_text())
            for log in logs
        ]
    return {
        "workers": workers,
        "products": len(products),
        "succeeded": result["succeeded"],
        "seconds": round(seconds, 1),
        "per_worker_products": ran,
        "worker_peak_mb": [round(k / 1024) for k in hwm],
        # per quarter: the highest of the workers' lowest RSS
        "rss_low_by_quarter_mb": [
            round(max(k for k in q if k < 10**9) / 1024) if any(k < 10**9 for k in q) else None
            for q in low
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--products", type=int, default=50)
    parser.add_argument(
        "--workers",
        type=int,
        action="append",
        default=None,
        help="worker counts to compare, the first the reference (1 4)",
    )
    parser.add_argument("--resolution", type=int, default=60, choices=(10, 20, 60))
    parser.add_argument("--triton-url", default=None, help="a running Triton (default: local)")
    parser.add_argument("--json", type=Path, default=None, help="write the measures here")
    args = parser.parse_args()
    counts = args.workers or [1, 4]
    products = make_products(args.products)
    rows = []
    with ExitStack() as stack:
        triton_url = args.triton_url
        if triton_url is None:
            triton_url = stack.enter_context(LocalTriton(DEFAULT_REPOSITORY)).http_url
        for workers in counts:
            rows.append(
                run(workers, products, triton_url, args.resolution, CACHE / f"run-{workers}")
            )
            print(f"{workers} worker(s): {rows[-1]['seconds']} s", flush=True)
    reference = rows[0]["seconds"]
    print(
        f"\n{args.products} products at {args.resolution} m, one batch, "
        f"{os.cpu_count()} CPUs shared by Triton and the workers\n"
    )
    print(
        "| workers | seconds | products/min | throughput vs first | products per worker "
        "| worker peak MB | RSS between products by quarter MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['workers']} | {row['seconds']} | "
            f"{60 * row['succeeded'] / row['seconds']:.1f} | "
            f"{reference / row['seconds']:.2f}x | {row['per_worker_products']} | "
            f"{row['worker_peak_mb']} | {row['rss_low_by_quarter_mb']} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"resolution": args.resolution, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
