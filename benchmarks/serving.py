"""Serving latency and throughput: a bounded load generator against a real uvicorn process.

    .venv/bin/python benchmarks/serving.py                  # builds its own model, ~2 min
    .venv/bin/python benchmarks/serving.py --tracking-uri sqlite:////abs/ws/mlflow.db

Without ``--tracking-uri`` it trains and registers a ranker sized like the nightly default
(2,000 users, 5,200 items, history N = 20, the default MMoE) in a temporary MLflow store.
It starts ``python -m serving serve`` (the same handler as ``recpipe serve``) on 127.0.0.1
with a free port, sends a fixed, seeded set of requests over loopback only (keep-alive HTTP/1.1,
one connection per client), and stops the server itself. Per scenario (candidates per request
× concurrent clients) it reports p50/p90/p99/max latency measured by the client and
requests/s. It also times the in-process scorer (no HTTP) for the same requests, to show what
the HTTP layer costs. Results go to stdout as a Markdown table and, unless ``--no-readme``,
into the marked serving section of ``benchmarks/README.md`` (nothing else in that file is
touched).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this file is benchmarks/serving.py: never shadow the package

import numpy as np  # noqa: E402

README = ROOT / "benchmarks" / "README.md"
BEGIN, END = "<!-- serving-benchmark:begin -->", "<!-- serving-benchmark:end -->"
TARGET_P99_MS = 20.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", help="serve this store's recpipe-ranker@champion "
                                               "instead of building a benchmark model")
    parser.add_argument("--candidates", default="100,500", help="candidates per request")
    parser.add_argument("--concurrency", default="1,4,16", help="concurrent clients")
    parser.add_argument("--requests", type=int, default=400,
                        help="measured requests per scenario (after a warm-up)")
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured requests first")
    parser.add_argument("--threads", type=int, default=1, help="server torch threads")
    parser.add_argument("--scoring-threads", type=int, default=None,
                        help="server: requests scored at once (default: one per core)")
    parser.add_argument("--seed", type=int, default=0, help="model and request seed")
    parser.add_argument("--no-readme", action="store_true",
                        help="print only; leave benchmarks/README.md alone")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


def build_model(root: Path, seed: int) -> str:
    """Register a nightly-sized ranker (default RankerConfig) in a fresh store."""
    from models.rankers import RankerConfig
    from serving.demo import DemoData, demo_splits, register_demo_ranker, tracking_uri_for

    data = DemoData(n_users=2000, n_items=5200, per_user=30, days=3, history_length=20,
                    seed=seed)
    splits = demo_splits(data)
    ranker = train_ranker(splits, RankerConfig(), seed)
    uri = tracking_uri_for(root)
    register_demo_ranker(uri, root / "mlartifacts", ranker, splits.test)
    return uri


def train_ranker(splits, config, seed: int):
    import torch

    from models.batch import ExampleArrays
    from models.losses import MultiTaskLoss
    from models.rankers import build_ranker, init_output_bias
    from models.registry import LoadedRanker
    from models.training import TrainConfig, fit

    train = ExampleArrays.from_frame(splits.train, splits.schema)
    torch.manual_seed(seed)
    model = build_ranker(splits.schema, config)
    init_output_bias(model, torch.from_numpy(train.labels))
    fit(model, MultiTaskLoss(splits.schema.tasks), train,
        TrainConfig(epochs=1, batch_size=512, seed=seed, progress=False),
        [task.name for task in splits.schema.tasks])
    model.eval()
    return LoadedRanker(model, config, splits.schema, splits.vocab)


def make_bodies(vocab, n: int, candidates: int, history: int, seed: int) -> list[bytes]:
    """Seeded requests: known and (about 5 %) unknown ids, full candidate fields, a history."""
    rng = np.random.default_rng(seed)
    users = np.array(vocab.ids["user_id"])
    items = np.array(vocab.ids["item_id"])
    bodies = []
    behaviors = ["impression", "click", "long_view", "interaction"]
    for r in range(n):
        chosen = rng.choice(items, size=candidates, replace=False)
        unknown = rng.random(candidates) < 0.05
        chosen = np.where(unknown, 10_000_000 + r * candidates + np.arange(candidates), chosen)
        request = {
            "user_id": int(rng.choice(users)),
            "candidates": [
                {"item_id": int(i), "item_type": "live" if i % 10 == 0 else "video",
                 "author_id": int(i // 3), "duration_s": round(float(10 + i % 120), 1)}
                for i in chosen
            ],
            "history": [{"item_id": int(i), "behavior": behaviors[int(b)]}
                        for i, b in zip(rng.choice(items, history),
                                        rng.integers(0, 4, history), strict=True)],
            "context": {"ts": f"2026-01-03T{int(rng.integers(0, 24)):02d}:15:00Z"},
        }
        bodies.append(json.dumps(request).encode())
    return bodies


class Server:
    """``python -m serving serve`` on 127.0.0.1, port chosen by the OS; stopped on exit."""

    def __init__(self, tracking_uri: str, threads: int, scoring_threads: int | None) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        command = [sys.executable, "-m", "serving", "serve", "--tracking-uri", tracking_uri,
                   "--host", "127.0.0.1", "--port", "0", "--threads", str(threads),
                   "--log-level", "warning", "--poll-interval", "60"]
        if scoring_threads:
            command += ["--scoring-threads", str(scoring_threads)]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True)
        line = self.process.stdout.readline()
        match = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        if match is None:
            self.stop()
            self.log.seek(0)
            raise RuntimeError(f"the server did not start: {line}\n"
                               f"{self.log.read().decode()[-3000:]}")
        self.port = int(match.group(1))
        self.banner = line.strip()

    def cpu_seconds(self) -> float:
        """User + system CPU the server process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def connect(port: int) -> http.client.HTTPConnection:
    """A keep-alive connection with Nagle off: http.client sends the headers and the body in
    two writes, and Nagle + delayed ACK would add ~40 ms to every small request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.connect()
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def post(connection: http.client.HTTPConnection, body: bytes) -> float:
    """One POST /rank; returns seconds; raises on a non-200."""
    start = time.perf_counter()
    connection.request("POST", "/rank", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = response.read()
    elapsed = time.perf_counter() - start
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {payload[:300]!r}")
    return elapsed


def run_load(port: int, bodies: list[bytes], clients: int, warmup: int) -> dict:
    """``len(bodies)`` requests split over ``clients`` threads with one keep-alive connection
    each; a client sends its next request when the previous one answered."""
    connections = [connect(port) for _ in range(clients)]
    for i in range(warmup):
        post(connections[i % clients], bodies[i % len(bodies)])
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            for body in bodies[k::clients]:
                latencies[k].append(post(connections[k], body))
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    for connection in connections:
        connection.close()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]}")
    return summarize(np.concatenate([np.array(x) for x in latencies]), wall)


def summarize(seconds: np.ndarray, wall: float) -> dict:
    ms = seconds * 1e3
    return {"requests": int(ms.size), "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()), "rps": float(ms.size / wall)}


def in_process(tracking_uri: str, bodies: list[bytes], threads: int) -> dict:
    """The scorer alone (parse + rank + JSON), one request at a time, no HTTP."""
    import torch

    from serving.app import parse_request, response_body
    from serving.reloader import ModelWatcher
    from serving.schemas import Limits

    torch.set_num_threads(threads)
    watcher = ModelWatcher(tracking_uri, allocator_name=None)
    snapshot = watcher.load()
    limits = Limits()
    for body in bodies[:20]:
        snapshot.scorer.rank(parse_request(body, limits))
    times = []
    start, cpu = time.perf_counter(), time.process_time()
    for body in bodies:
        t = time.perf_counter()
        request = parse_request(body, limits)
        response_body(request, snapshot, snapshot.scorer.rank(request))
        times.append(time.perf_counter() - t)
    cpu_ms = (time.process_time() - cpu) * 1e3 / len(bodies)
    return {**summarize(np.array(times), time.perf_counter() - start), "cpu_ms": cpu_ms}


def machine() -> dict:
    import polars
    import torch

    cpu = "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0].strip() if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "polars": polars.__version__,
            "gpu": torch.cuda.is_available(), "load_avg_start": os.getloadavg()}


def table(results: list[dict]) -> str:
    lines = ["| candidates | clients | path | p50 ms | p90 ms | p99 ms | max ms | req/s "
             "| CPU ms/req |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        cpu = f"{r['server_cpu_ms']:.1f}" if "server_cpu_ms" in r else f"{r['cpu_ms']:.1f}"
        lines.append(f"| {r['candidates']} | {r['clients']} | {r['path']} | {r['p50_ms']:.1f} "
                     f"| {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} "
                     f"| {r['rps']:.0f} | {cpu} |")
    return "\n".join(lines)


def section(results: list[dict], info: dict, verdict: str, command: str) -> str:
    busy = max(info["load_avg_start"][0], info["load_avg_end"][0]) > (info["cores"] or 1)
    note = ("The machine was busy during this run (load average above its core count), so "
            "latencies include waiting for a core; CPU ms/req is the steadier figure. "
            if busy else "")
    text = textwrap.fill(
        f"Command: `{command}`. Machine: {info['cores']} cores ({info['cpu']}), "
        f"{'a GPU (unused)' if info['gpu'] else 'no GPU'}, "
        f"Python {info['python']}, torch {info['torch']}, Polars {info['polars']}; load "
        f"average {info['load_avg_start'][0]:.2f} at the start, "
        f"{info['load_avg_end'][0]:.2f} at the end (other jobs may share this machine). "
        f"Model: {info['model']}. One uvicorn process, torch threads = {info['threads']}; "
        "the load generator runs on the same cores, over loopback, keep-alive, "
        f"{info['requests']} measured requests per row after {info['warmup']} warm-up "
        "requests. `http` = measured by the client; `scorer` = the same requests in process "
        "(validate, encode, forward, JSON), no HTTP. CPU ms/req = CPU time of the server "
        "process (all its threads) per request, which contention on a shared machine does not "
        f"inflate much: {info['cores']} cores can serve at most about "
        f"{(info['cores'] or 1) * 1000} / (CPU ms/req) requests/s. "
        + note, width=95)
    return "\n".join([
        BEGIN,
        "## Serving: `POST /rank` latency and throughput (`benchmarks/serving.py`)",
        "",
        text,
        "",
        table(results),
        "",
        verdict,
        END,
    ])


def update_readme(text: str) -> None:
    """Replace only the marked serving section (append it when absent)."""
    current = README.read_text() if README.exists() else "# Benchmarks\n"
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        updated = head + text + tail
    else:
        updated = current.rstrip("\n") + "\n\n" + text + "\n"
    temp = README.with_name(f".{README.name}.tmp")
    temp.write_text(updated)
    os.replace(temp, README)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    candidate_sizes = [int(x) for x in args.candidates.split(",")]
    client_counts = [int(x) for x in args.concurrency.split(",")]
    info = machine()
    with tempfile.TemporaryDirectory(prefix="recpipe-serving-bench-") as tmp:
        tracking_uri = args.tracking_uri
        if tracking_uri is None:
            print("training and registering the benchmark ranker ...", flush=True)
            tracking_uri = build_model(Path(tmp), args.seed)
            info["model"] = ("MMoE (default RankerConfig: 4 experts 64-32, towers 16, D = 16), "
                             "N = 20, vocabularies 2,000 users / 5,200 items, trained 1 epoch")
        else:
            info["model"] = f"recpipe-ranker@champion of {tracking_uri}"
        import mlflow

        from models.registry import load_ranker

        mlflow.set_tracking_uri(tracking_uri)
        ranker = load_ranker("models:/recpipe-ranker@champion")
        results = []
        with Server(tracking_uri, args.threads, args.scoring_threads) as server:
            print(server.banner, flush=True)
            for size in candidate_sizes:
                bodies = make_bodies(ranker.vocab, args.requests, size,
                                     ranker.schema.history_length, args.seed + size)
                for clients in client_counts:
                    cpu_before = server.cpu_seconds()
                    row = run_load(server.port, bodies, clients, args.warmup)
                    row["server_cpu_ms"] = ((server.cpu_seconds() - cpu_before) * 1e3
                                            / (row["requests"] + args.warmup))
                    results.append({"candidates": size, "clients": clients, "path": "http",
                                    **row})
                    print(table(results[-1:]).splitlines()[-1], flush=True)
        for size in candidate_sizes:
            bodies = make_bodies(ranker.vocab, args.requests, size,
                                 ranker.schema.history_length, args.seed + size)
            row = in_process(tracking_uri, bodies, args.threads)
            results.append({"candidates": size, "clients": 1, "path": "scorer", **row})
            print(table(results[-1:]).splitlines()[-1], flush=True)
    info.update(load_avg_end=os.getloadavg(), threads=args.threads, requests=args.requests,
                warmup=args.warmup)
    target = [r for r in results if r["path"] == "http" and r["clients"] == 1
              and r["candidates"] == 500]
    verdict = ""
    if target:
        p99 = target[0]["p99_ms"]
        verdict = (f"Target p99 ≤ {TARGET_P99_MS:.0f} ms at 500 candidates, one request in "
                   f"flight: **{p99:.1f} ms, {'met' if p99 <= TARGET_P99_MS else 'NOT met'}**.")
    flags = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python benchmarks/serving.py", *flags])
    print()
    print(table(results))
    print(verdict)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))
    if not args.no_readme:
        update_readme(section(results, info, verdict, command))
        print(f"updated the serving section of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
