"""Model fatigue (issue 6): detection delay, false alarms on stable months, the loop against never re-training,
and the monitor's time on one million rows.

- detection delay and months the loop did worse: the lifecycle replay with the `replay` section of params.yaml
  (full size), for several seeds;
- false-alarm rate: stable (undrifted) labelled months of the same size as the replay's, each against its own
  seed's reference and a champion trained on it, with the decay check on: one alarm = any verdict but `stable`;
- monitor on 1M rows: `monitor_batch` on a generated batch of 1,000,000 labelled claims against the training
  reference (sampled to `monitor.reference_rows`), the champion's predictions on the batch given as the prediction
  log holds them (the reference and the evaluation split are scored inside; decay check on): `monitor_1m_rows_s`.
  Beside it: the feature tests alone, the whole monitor scoring the batch itself, and scoring 1M rows alone.

Run from the repository root: `python benchmarks/fatigue.py` (add `--quick` for a smoke run).
Everything runs in memory; it writes `benchmarks/results/fatigue.json` and the first seed's replay record (the same
files as `make replay`: timeline.png, timeline.csv, decisions/) to `docs/fatigue/`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def sections():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    from mlops_notebooks.stages.monitor import MonitorParams
    from mlops_notebooks.stages.register import RegisterParams
    from mlops_notebooks.stages.schema import DataParams
    from mlops_notebooks.stages.train import TrainParams
    from mlops_notebooks.tools.replay import ReplayParams
    return (DataParams(**params["data"]), TrainParams(**params["train"]), RegisterParams(**params["register"]),
            MonitorParams(**params["monitor"]), ReplayParams(**params["replay"]))


def replays(seeds: list[int]) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    from mlops_notebooks.tools.replay import replay_months, summarise, write_replay
    data, train, rule, monitor, replay = sections()
    runs = []
    for seed in seeds:
        started = time.perf_counter()
        timeline, decisions = replay_months(replay.model_copy(update={"seed": seed}), data, train, rule, monitor)
        figures = summarise(timeline)
        figures["wall_s"] = round(time.perf_counter() - started, 1)
        figures["seed"] = seed
        drifted = timeline[timeline["drift_on"]]
        figures["loop_worse_months"] = drifted.loc[drifted["error_loop"] > drifted["error_never"], "month"].tolist()
        if seed == seeds[0]:  # the record the docs show: `make replay` at full size
            write_replay(timeline, decisions, REPO / "docs/fatigue", replay.drift.start_month)
        runs.append(figures)
        print(json.dumps(figures), flush=True)
    delays = [run["detection_delay_months"] for run in runs]
    return {"detection_delay_months": max(delay if delay is not None else replay.n_months for delay in delays),
            "detection_delay_months_per_seed": delays,
            "months_loop_worse_than_never": sum(run["months_loop_worse_than_never"] for run in runs),
            "loop_worse_months_per_seed": [run["loop_worse_months"] for run in runs],
            "months_loop_better_than_never": sum(run["months_loop_better_than_never"] for run in runs),
            "months_first_champion_serving": sum(run["months_first_champion_serving"] for run in runs),
            "drifted_months_replayed": sum(run["drifted_months"] for run in runs),
            "replay_false_alarms": sum(run["false_alarms"] for run in runs),
            "replay_stable_months": sum(run["stable_months"] for run in runs),
            "promotions_per_replay": [run["promotions"] for run in runs],
            "replay_wall_s": statistics.median(run["wall_s"] for run in runs),
            "replay_seeds": len(runs)}


def false_alarms(seeds: int, months_per_seed: int) -> dict:
    import pandas as pd

    from mlops_notebooks.stages.features import select_features, split_by_month
    from mlops_notebooks.stages.generator import generate_claims
    from mlops_notebooks.stages.monitor import monitor_batch
    from mlops_notebooks.stages.train import fit_model
    data, train, _, monitor, replay = sections()
    per_month, history = replay.claims_per_month, replay.history_months
    verdicts = []
    for seed in range(seeds):
        claims = select_features(generate_claims(per_month * history, "2022-01", history, seed=10_000 + seed), data)
        reference, evaluation = split_by_month(claims, replay.test_months)
        model = fit_model(reference, data, train)
        first = pd.Period("2022-01", freq="M") + history
        for offset in range(months_per_seed):
            month = str(first + offset)
            batch = generate_claims(per_month, month, 1, seed=20_000 + 100 * seed + offset, first_claim_id=10**8)
            verdicts.append(monitor_batch(reference, batch, data, monitor, model, evaluation)["verdict"])
        print(f"seed {seed}: {verdicts[-months_per_seed:]}", flush=True)
    alarms = sum(verdict != "stable" for verdict in verdicts)
    return {"false_alarm_rate": round(alarms / len(verdicts), 4), "false_alarm_seeds": seeds,
            "stable_months_tested": len(verdicts), "false_alarms": alarms,
            "false_alarm_verdicts": {key: int(value) for key, value in pd.Series(verdicts).value_counts().items()}}


def monitor_speed(rows: int, repeats: int) -> dict:
    import numpy as np

    from mlops_notebooks.stages.features import select_features
    from mlops_notebooks.stages.generator import generate_claims
    from mlops_notebooks.stages.monitor import monitor_batch
    from mlops_notebooks.stages.train import fit_model
    data, train, _, monitor, _ = sections()
    claims = select_features(generate_claims(240_000, "2022-01", 24, seed=1), data)
    reference, evaluation = claims.iloc[:200_000], claims.iloc[200_000:]
    model = fit_model(reference, data, train)
    batch = generate_claims(rows, "2024-01", 1, seed=2, first_claim_id=10**8)
    started = time.perf_counter()
    logged = np.asarray(model.predict(select_features(batch, data)[data.features]), dtype=float)  # what the service logs
    scoring_s = time.perf_counter() - started
    timings = {"prediction_log": [], "scoring_too": [], "features_only": []}
    for _ in range(repeats):
        started = time.perf_counter()
        verdict = monitor_batch(reference, batch, data, monitor, model, evaluation, batch_predictions=logged)
        timings["prediction_log"].append(time.perf_counter() - started)
        started = time.perf_counter()
        monitor_batch(reference, batch, data, monitor)
        timings["features_only"].append(time.perf_counter() - started)
    started = time.perf_counter()
    monitor_batch(reference, batch, data, monitor, model, evaluation)
    timings["scoring_too"].append(time.perf_counter() - started)
    return {"monitor_1m_rows_s": round(statistics.median(timings["prediction_log"]), 3),
            "monitor_1m_rows_features_only_s": round(statistics.median(timings["features_only"]), 3),
            "monitor_1m_rows_scoring_too_s": round(timings["scoring_too"][0], 3),
            "score_1m_rows_s": round(scoring_s, 3),
            "monitor_rows": rows, "monitor_reference_rows": min(len(reference), monitor.reference_rows),
            "monitor_1m_rows_verdict": verdict["verdict"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="seeds of stable months for the false-alarm rate")
    parser.add_argument("--months-per-seed", type=int, default=3)
    parser.add_argument("--replay-seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run (results not written)")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.seeds, arguments.months_per_seed, arguments.replay_seeds, arguments.repeats = 2, 1, 1, 1
    load_at_start = round(os.getloadavg()[0], 2)
    figures = {}
    figures.update(monitor_speed(100_000 if arguments.quick else 1_000_000, arguments.repeats))
    print(json.dumps(figures), flush=True)
    figures.update(false_alarms(arguments.seeds, arguments.months_per_seed))
    figures.update(replays(list(range(arguments.replay_seeds))))
    record = {
        "benchmark": "fatigue",
        "date": date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_1m_at_start": load_at_start, "load_average_1m_at_end": round(os.getloadavg()[0], 2)},
        "command": "python " + " ".join(["benchmarks/fatigue.py", *sys.argv[1:]]),
        "figures": figures,
        "goals": {"detection_delay_months": {"max": 1}, "false_alarm_rate": {"max": 0.05},
                  "false_alarm_seeds": {"min": 20}, "months_loop_worse_than_never": {"max": 0},
                  "monitor_1m_rows_s": {"max": 5.0}},
    }
    print(json.dumps(record, indent=2, default=str))
    if not arguments.quick:
        (REPO / "benchmarks/results/fatigue.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
