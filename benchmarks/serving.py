"""Serving: the project's service (`mlops-notebooks serve`) side by side with `mlflow models serve --env-manager local`
on the same registered champion, on loopback, in bounded request loops.

1. start-to-ready: from starting the process to the first 200 from its health endpoint, and the CPU seconds its
   processes used until then. The project's first start in a run is cold (its `.serving/` folder removed: the
   champion comes from the registry through MLflow's client, and its trees are compiled in the background after
   ready; the wait for the compiled trees is recorded); later starts are restarts from the champion snapshot. After
   the rounds, `--cold-starts` more first starts are timed, each beside a start of `mlflow models serve` (the two
   take turns going first): `ready_cold_over_mlflow_serve` is the median of those pairs' ratios, and
   `ready_cold_s` the median of every first start.
   Latency is measured in the steady state: once the final predictor serves and the registry has
   been asked where the alias points (both recorded, in seconds after ready);
2. single-row latency over one keep-alive connection (p50, p99 of `--single-requests` requests, after a warm-up);
3. batch throughput: rows/s over `--batch-requests` requests of 1,000 rows each, one keep-alive connection;
4. for the project's service only, in the first round: twice a load of `--load-requests` single-row requests from
   8 keep-alive connections, counting 5xx answers and connection errors, with the service's RSS before and after
   each (growth = RSS after the second load minus RSS after the first).

Both servers run one after the other in each of `--repeats` rounds, so a busy machine slows both alike; figures are
medians over rounds. The model comes from a throw-away copy of the project on which `dvc repro` has run with the
repo's params.yaml (or from `--project`, an existing project with a champion). The load average is recorded
beside the figures: the machine is shared.
Usage: python benchmarks/serving.py --repeats 3
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULT = REPO / "benchmarks" / "results" / "serving.json"
MODEL = "claims-cost"
GOALS = {
    "single_row_p50_ms": {"max": 4.0},
    "batch_rows_per_s": {"min": 60000},
    "ready_s": {"max": 3.0},
    # a first start (no snapshot: the champion from the registry) within half of `mlflow models serve`'s start
    "ready_cold_over_mlflow_serve": {"max": 0.5},
    "load_5xx": {"max": 0},
    "load_rss_growth_mb": {"max": 20},
}


def project_env() -> dict:
    "Each project's own settings.ini applies: no MLOPS_/MLFLOW_ overrides from the caller."
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLOPS_", "MLFLOW_"))}
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
                "MLFLOW_DISABLE_TELEMETRY": "true", "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
                "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"})
    return env


def make_project(destination: Path) -> Path:
    "A copy of the repo's source files as a fresh git repo, with the full pipeline run (the real model)."
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for relative in filter(None, listed):
        if (REPO / relative).is_file():
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / relative, destination / relative)
    (destination / "dvc.lock").unlink(missing_ok=True)
    (destination / ".venv").symlink_to(REPO / ".venv", target_is_directory=True)  # the stage commands' interpreter
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench copy"],
                    [str(BIN / "dvc"), "repro"]):
        subprocess.run(command, cwd=destination, env=project_env(), check=True, capture_output=True)
    return destination


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    "A server process in its own process group (mlflow's server forks workers), stopped by that group id."
    def __init__(self, kind: str, project: Path):
        self.kind, self.port = kind, free_port()
        env = project_env()
        if kind == "project":
            command = [str(BIN / "mlops-notebooks"), "serve", "--port", str(self.port)]
            self.health, self.path = "/health", "/predict"
        else:
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project}/mlflow.db"
            command = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager",
                       "local", "-h", "127.0.0.1", "-p", str(self.port)]
            self.health, self.path = "/ping", "/invocations"
        self.log = tempfile.TemporaryFile()
        started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=project, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.ready_s = self._wait_ready(started)
        self.ready_cpu_s = self.cpu_s()

    def _wait_ready(self, started: float, timeout: float = 180.0) -> float:
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{self.kind} server exited: {self.log.read().decode()[-2000:]}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", self.health)
                if connection.getresponse().status == 200:
                    return time.perf_counter() - started
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{self.kind} server not ready after {timeout} s")

    def cpu_s(self) -> float:
        "User + system CPU seconds of every process in the server's group so far (mlflow's server forks workers)."
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # a process that ended meanwhile
                continue
            if int(fields[2]) == self.process.pid:  # its process group
                total += sum(int(value) for value in fields[11:15])  # its and its ended children's user, system ticks
        return total / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        "Resident memory of the server process (and its children, for mlflow's workers)."
        pids = [self.process.pid]
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        if children.exists():
            pids += [int(pid) for pid in children.read_text().split()]
        total = 0
        for pid in pids:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total / 1024

    def stop(self):
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def request_body(kind: str, records: list[dict]) -> bytes:
    "The same records in each server's format: a JSON array for ours, `dataframe_records` for MLflow's."
    return json.dumps(records if kind == "project" else {"dataframe_records": records}).encode()


def timed_requests(server: Server, body: bytes, count: int, warmup: int = 0) -> list[float]:
    "Seconds per request over one keep-alive connection; every answer must be 200."
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    times = []
    for number in range(warmup + count):
        started = time.perf_counter()
        connection.request("POST", server.path, body=body, headers=headers)
        answer = connection.getresponse()
        payload = answer.read()
        elapsed = time.perf_counter() - started
        if answer.status != 200:
            raise RuntimeError(f"{server.kind}: {answer.status} {payload[:300]!r}")
        if number >= warmup:
            times.append(elapsed)
    connection.close()
    return times


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def load_test(server: Server, body: bytes, requests_total: int, connections: int = 8) -> dict:
    "`requests_total` single-row requests over `connections` keep-alive connections: status counts and errors."
    counts, errors, lock = {}, [], threading.Lock()
    per_connection = [requests_total // connections + (1 if i < requests_total % connections else 0)
                      for i in range(connections)]

    def worker(count: int):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for _ in range(count):
            try:
                connection.request("POST", server.path, body=body, headers={"Content-Type": "application/json"})
                answer = connection.getresponse()
                answer.read()
                with lock:
                    counts[answer.status] = counts.get(answer.status, 0) + 1
            except OSError as error:
                with lock:
                    errors.append(repr(error))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.close()

    rss_before = server.rss_mb()
    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(count,)) for count in per_connection]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    rss_after = server.rss_mb()
    return {"requests": requests_total, "connections": connections, "wall_s": round(wall, 3),
            "requests_per_s": round(requests_total / wall, 1), "status_counts": {str(k): v for k, v in sorted(counts.items())},
            "errors": len(errors), "fivexx": sum(v for k, v in counts.items() if k >= 500),
            "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_after, 1)}


def wait_until_settled(server: Server, timeout: float = 180.0) -> dict:
    """Wait until the project's service is in its steady state: the final predictor (the compiled trees, built in the
    background after a first start) and the registry asked where the alias points (in the background after a
    restart from the snapshot). Returns the predictor and the seconds after ready each took."""
    started = time.perf_counter()
    settled = {}
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        connection.request("GET", "/model")
        model = json.loads(connection.getresponse().read())
        waited = time.perf_counter() - started
        if model["predictor"] != "treelite" and "predictor_final_after_s" not in settled:
            settled.update(predictor=model["predictor"], predictor_final_after_s=waited)
        if model["registry_confirmed"] and "registry_confirmed_after_s" not in settled:
            settled["registry_confirmed_after_s"] = waited
        if len(settled) == 3:
            return settled
        if waited > timeout:
            return {"predictor": model["predictor"], "predictor_final_after_s": waited,
                    "registry_confirmed_after_s": waited, **settled}
        time.sleep(0.05)


def measure(kind: str, project: Path, single: bytes, batch: bytes, args, first: bool) -> dict:
    if kind == "project" and first:
        shutil.rmtree(project / ".serving", ignore_errors=True)  # a first start: no champion snapshot, nothing compiled
    server = Server(kind, project)
    try:
        result = {"ready_s": server.ready_s, "ready_cpu_s": server.ready_cpu_s}
        if kind == "project":
            result["start"] = "cold" if first else "warm"
            result.update(wait_until_settled(server))
        one = timed_requests(server, single, args.single_requests, warmup=200)
        many = timed_requests(server, batch, args.batch_requests, warmup=5)
        result.update({"single_row_p50_ms": 1000 * percentile(one, 0.5),
                       "single_row_p99_ms": 1000 * percentile(one, 0.99),
                       "batch_rows_per_s": 1000 * len(many) / sum(many), "rss_mb": server.rss_mb()})
        if kind == "project" and first and args.load_requests:
            # the load first, then the same memory reading again after a second load: growth, not warm-up
            first_load = load_test(server, single, args.load_requests)
            second_load = load_test(server, single, args.load_requests)
            result["load"] = [first_load, second_load]
        return result
    finally:
        server.stop()


def cold_starts(project: Path, count: int) -> list[dict]:
    """`count` more first starts of the project's service (no snapshot), each beside a start of `mlflow models serve`
    (who goes first alternates): seconds and CPU seconds to ready of both; each server is stopped before the next."""
    pairs = []
    for index in range(count):
        pair = {}
        for kind in ("project", "mlflow") if index % 2 == 0 else ("mlflow", "project"):
            if kind == "project":
                shutil.rmtree(project / ".serving", ignore_errors=True)
            server = Server(kind, project)
            pair[kind] = {"ready_s": server.ready_s, "ready_cpu_s": server.ready_cpu_s}
            server.stop()  # its process group; TL2cgen's compiler runs in a group of its own and may finish its
            # current file (~1-2 s) while the next start begins
        pair["load_1m"] = round(os.getloadavg()[0], 2)
        pairs.append(pair)
        print("first starts", {kind: round(pair[kind]["ready_s"], 3) for kind in ("project", "mlflow")}, flush=True)
    return pairs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single-requests", type=int, default=2000)
    parser.add_argument("--batch-requests", type=int, default=40)
    parser.add_argument("--load-requests", type=int, default=10_000)
    parser.add_argument("--project", type=Path, help="an existing project with a champion (default: a fresh copy)")
    parser.add_argument("--cold-starts", type=int, default=8,
                        help="first starts timed after the rounds, each beside a start of mlflow's server")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serving-bench-") as scratch:
        project = args.project or make_project(Path(scratch))
        claims = pd.read_parquet(project / "data/processed/test.parquet")
        names = json.loads(subprocess.run([str(BIN / "mlops-notebooks"), "audit", f"models:/{MODEL}@champion", "--json"],
                                          cwd=project, env=project_env(), capture_output=True, text=True,
                                          check=True).stdout)
        features = ["line_of_business", "claim_type", "region", "policyholder_age", "claimant_age", "vehicle_age",
                    "sum_insured", "policy_tenure_years", "report_delay_days", "initial_reserve", "injury", "litigation"]
        records = json.loads(claims[features].head(1000).to_json(orient="records"))
        rounds = {"project": [], "mlflow": []}
        loads = [os.getloadavg()[0]]
        for repeat in range(args.repeats):
            for kind in ("project", "mlflow"):
                rounds[kind].append(measure(kind, project, request_body(kind, records[:1]),
                                            request_body(kind, records), args, first=repeat == 0))
                loads.append(os.getloadavg()[0])
                print(kind, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in rounds[kind][-1].items()
                             if k != "load"}, flush=True)
        pairs = cold_starts(project, args.cold_starts)
        loads.append(os.getloadavg()[0])

    def median(kind: str, key: str) -> float:
        return round(statistics.median(run[key] for run in rounds[kind]), 3)

    figures = {}
    for key in ("single_row_p50_ms", "single_row_p99_ms", "batch_rows_per_s", "ready_s"):
        figures[key] = median("project", key)
        figures[f"mlflow_serve_{key}"] = median("mlflow", key)
    # mlflow's server starts the same way in the rounds and beside the first starts: all of them
    figures["mlflow_serve_ready_s"] = round(statistics.median(
        [run["ready_s"] for run in rounds["mlflow"]] + [pair["mlflow"]["ready_s"] for pair in pairs]), 3)
    # The first start of each run is cold (no snapshot: the champion comes from the registry, the trees are compiled
    # after ready); the later ones restart from the snapshot and the compiled library.
    warm = [run for run in rounds["project"] if run["start"] == "warm"]
    if warm:
        figures["ready_s"] = round(statistics.median(run["ready_s"] for run in warm), 3)
    # every first start: the first round's and the extra ones; and each extra one beside a start of mlflow's server
    cold = [rounds["project"][0]["ready_s"], *(pair["project"]["ready_s"] for pair in pairs)]
    figures["ready_cold_s"] = round(statistics.median(cold), 3)
    figures["ready_cold_samples_s"] = [round(value, 3) for value in cold]
    figures["ready_cold_over_mlflow_serve"] = round(
        statistics.median(pair["project"]["ready_s"] / pair["mlflow"]["ready_s"] for pair in pairs), 3)
    figures["ready_cold_over_mlflow_serve_of_medians"] = round(figures["ready_cold_s"] / figures["mlflow_serve_ready_s"], 3)
    figures["ready_cold_cpu_s"] = round(statistics.median(pair["project"]["ready_cpu_s"] for pair in pairs), 2)
    figures["mlflow_serve_ready_cpu_s"] = round(statistics.median(pair["mlflow"]["ready_cpu_s"] for pair in pairs), 2)
    figures["first_start_pairs"] = [{kind: {key: round(value, 3) for key, value in pair[kind].items()}
                                     for kind in ("project", "mlflow")} | {"load_1m": pair["load_1m"]}
                                    for pair in pairs]
    figures["compiled_after_cold_start_s"] = round(rounds["project"][0]["predictor_final_after_s"], 1)
    if warm:
        figures["registry_confirmed_after_restart_s"] = round(
            statistics.median(run["registry_confirmed_after_s"] for run in warm), 2)
    figures["predictor"] = rounds["project"][-1]["predictor"]
    figures["single_row_p50_ratio"] = round(figures["mlflow_serve_single_row_p50_ms"] / figures["single_row_p50_ms"], 2)
    figures["batch_throughput_ratio"] = round(figures["batch_rows_per_s"] / figures["mlflow_serve_batch_rows_per_s"], 2)
    figures["ready_ratio"] = round(figures["mlflow_serve_ready_s"] / figures["ready_s"], 2)
    loads_run = [run["load"] for run in rounds["project"] if "load" in run]
    if loads_run:
        figures["load_requests"] = args.load_requests
        figures["load_5xx"] = sum(part["fivexx"] for run in loads_run for part in run)
        figures["load_errors"] = sum(part["errors"] for run in loads_run for part in run)
        growth = [run[1]["rss_after_mb"] - run[0]["rss_after_mb"] for run in loads_run]
        figures["load_rss_growth_mb"] = round(statistics.median(growth), 1)
        figures["load_runs"] = loads_run
    figures["rss_mb"] = median("project", "rss_mb")
    figures["mlflow_serve_rss_mb"] = median("mlflow", "rss_mb")
    figures["rounds"] = rounds
    figures["model"] = {"version": names["version"], "max_iter": names["params"].get("train.max_iter"),
                        "train_rows": names["lineage"].get("train_rows")}
    result = {
        "benchmark": "serving",
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m": [round(load, 2) for load in loads]},
        "command": "python benchmarks/serving.py " + " ".join(sys.argv[1:]),
        "figures": figures,
        "goals": GOALS,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in figures.items() if not isinstance(value, (list, dict))}, indent=2))


if __name__ == "__main__":
    main()
