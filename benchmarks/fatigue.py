"""Model fatigue (issues 6 and 20): detection delay, false alarms on stable months, actual / expected detection
power on months whose costs rose with no change in the claims, the loop against never re-training, and the
monitor's time on one million rows.

- detection delay and months the loop did worse: the lifecycle replay with the `replay` section of params.yaml
  (full size), for several seeds;
- false-alarm rate and A/E detection power, on the generator: for each of 20 seeds, a champion trained on two
  undrifted years (params.yaml `train`) of the default portfolio's monthly volume (`ingest`: n_claims / n_months =
  3,333 claims a month), its last month held out as its evaluation rows; then 3 later undrifted labelled months of
  5,000 claims (`--claims-per-month`), each judged by `monitor_batch` as it is (a false alarm = any verdict but
  `stable`) and with its costs scaled by 1.10, 1.15, 1.20 and 1.30 (detected = any verdict but `stable`):
  `false_alarm_rate`, `ae_detection_rate_110` ... `_130`. The same on months of the default portfolio's 3,333 claims
  is recorded beside them (`..._default_months`): the spread of a month's A/E shrinks with its size only as one over
  the square root, and heavy-tailed costs make it wide;
- the same on freMTPL2's claim frequency (the real policies in ../shared, the frequency example's params): a
  champion trained on a random half of the policies (the split's hash, seed 0), 20 "months" of one twelfth of the
  policies drawn from the other half (a seeded sample each), judged as they are and with their claim counts scaled:
  `fremtpl2_false_alarm_rate`, `fremtpl2_ae_detection_rate_110` ...;
- monitor on 1M rows: `monitor_batch` on a generated batch of 1,000,000 labelled claims against the training
  reference (sampled to `monitor.reference_rows`), the champion's predictions on the batch given as the prediction
  log holds them (the reference and the evaluation split are scored inside; decay check, A/E overall and by segment
  on): `monitor_1m_rows_s`. Beside it: the feature tests alone, the whole monitor scoring the batch itself, and
  scoring 1M rows alone.

Run from the repository root: `python benchmarks/fatigue.py` (add `--quick` for a smoke run;
`--monitor-speed-only` measures the 1M-row monitor again into the recorded results, for a quieter machine).
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
    from mlops_notebooks.stages.schema import DataParams
    from mlops_notebooks.stages.train import TrainParams
    from mlops_notebooks.tools.replay import ReplayParams, replay_rule
    replay = ReplayParams(**params["replay"])
    return (DataParams(**params["data"]), TrainParams(**params["train"]), replay_rule(params["register"], replay),
            MonitorParams(**params["monitor"]), replay)


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


SCALES = (1.10, 1.15, 1.20, 1.30)


def judged(verdicts: list[str], scale: float | None) -> dict:
    "Share of alarms among verdicts: the false-alarm rate (unscaled) or the detection rate at a scale."
    rate = round(sum(verdict != "stable" for verdict in verdicts) / len(verdicts), 4)
    return {"false_alarm_rate" if scale is None else f"ae_detection_rate_{round(scale * 100)}": rate}


def summarise_months(verdicts: dict, suffix: str = "", prefix: str = "") -> dict:
    "The rates of every scale, named with a prefix/suffix, and the verdict counts."
    import pandas as pd
    figures = {}
    for scale, found in verdicts.items():
        for name, rate in judged(found, scale).items():
            figures[f"{prefix}{name}{suffix}"] = rate
    figures[f"{prefix}months_tested{suffix}"] = len(verdicts[None])
    figures[f"{prefix}verdicts{suffix}"] = {str(scale or 1.0): {key: int(value) for key, value in pd.Series(found).value_counts().items()}
                                            for scale, found in verdicts.items()}
    return figures


def synthetic_months(seeds: int, months_per_seed: int, history_per_month: int, sizes: list[int]) -> dict:
    "Verdicts on undrifted labelled months of each size, as they are (key None) and with costs scaled (key: the scale)."
    import pandas as pd

    from mlops_notebooks.stages.features import select_features, split_by_month
    from mlops_notebooks.stages.generator import generate_claims
    from mlops_notebooks.stages.monitor import monitor_batch
    from mlops_notebooks.stages.train import fit_model
    data, train, _, monitor, _ = sections()
    history = 24
    verdicts = {size: {None: [], **{scale: [] for scale in SCALES}} for size in sizes}
    for seed in range(seeds):
        claims = select_features(generate_claims(history_per_month * history, "2022-01", history, seed=10_000 + seed), data)
        reference, evaluation = split_by_month(claims, 1)
        model = fit_model(reference, data, train)
        first = pd.Period("2022-01", freq="M") + history
        for size in sizes:
            for offset in range(months_per_seed):
                batch = generate_claims(size, str(first + offset), 1, seed=20_000 + 100 * seed + offset,
                                        first_claim_id=10**8)
                for scale, found in verdicts[size].items():
                    scaled = batch if scale is None else batch.assign(**{data.target: batch[data.target] * scale})
                    found.append(monitor_batch(reference, scaled, data, monitor, model, evaluation)["verdict"])
            print(f"seed {seed}, months of {size} claims: " + ", ".join(
                f"{scale or 1.0}: {found[-months_per_seed:]}" for scale, found in verdicts[size].items()), flush=True)
    return verdicts


def fremtpl2_months(folder: Path, seeds: int) -> dict:
    "Verdicts on freMTPL2 'months' (a twelfth of the policies, not trained on), as they are and with counts scaled."
    import pandas as pd

    from mlops_notebooks.core.settings import parse_params
    from mlops_notebooks.stages.features import row_uniform, select_features
    from mlops_notebooks.stages.monitor import MonitorParams, monitor_batch
    from mlops_notebooks.stages.schema import DataParams
    from mlops_notebooks.stages.train import TrainParams, fit_model
    example = yaml.safe_load((REPO / "examples/fremtpl2/frequency.yaml").read_text())
    data = parse_params(DataParams, "data", example["data"])
    train = parse_params(TrainParams, "train", example["train"])
    monitor = parse_params(MonitorParams, "monitor", example["monitor"])
    policies = pd.read_csv(folder / "freMTPL2freq.csv")
    policies = policies[(policies["ClaimNb"] <= 4) & (policies["Exposure"] <= 1)].reset_index(drop=True)  # as validated
    side = row_uniform(policies[data.id], 0)
    trained, evaluation_rows, later = policies[side < 0.5], policies[(side >= 0.5) & (side < 0.6)], policies[side >= 0.6]
    reference, evaluation = select_features(trained, data), select_features(evaluation_rows, data)
    model = fit_model(reference, data, train)
    month = len(policies) // 12
    verdicts = {None: [], **{scale: [] for scale in SCALES}}
    for seed in range(seeds):
        batch = later.sample(month, random_state=seed)
        for scale in verdicts:
            scaled = batch if scale is None else batch.assign(**{data.target: batch[data.target] * scale})
            verdicts[scale].append(monitor_batch(reference, scaled, data, monitor, model, evaluation)["verdict"])
        print(f"freMTPL2 month of {month} policies, seed {seed}: " +
              ", ".join(f"{scale or 1.0}: {found[-1]}" for scale, found in verdicts.items()), flush=True)
    return verdicts


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


def remeasure_monitor_speed(repeats: int):
    "The monitor's 1M-row figures measured again and written into the recorded results, with this run's command."
    path = REPO / "benchmarks/results/fatigue.json"
    record = json.loads(path.read_text())
    load_at_start = round(os.getloadavg()[0], 2)
    figures = monitor_speed(1_000_000, repeats)
    record["figures"].update(figures)
    record["monitor_speed"] = {"date": date.today().isoformat(), "command": "python " + " ".join(["benchmarks/fatigue.py", *sys.argv[1:]]),
                               "load_average_1m_at_start": load_at_start,
                               "load_average_1m_at_end": round(os.getloadavg()[0], 2)}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(json.dumps(figures, indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="seeds of undrifted months (false alarms, A/E power)")
    parser.add_argument("--months-per-seed", type=int, default=3)
    parser.add_argument("--claims-per-month", type=int, default=5000, help="claims in a month judged for A/E power")
    parser.add_argument("--fremtpl2", type=Path, default=REPO.parent / "shared/data/freMTPL2", help="the freMTPL2 folder")
    parser.add_argument("--replay-seeds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run (results not written)")
    parser.add_argument("--monitor-speed-only", action="store_true",
                        help="measure only the monitor on 1M rows again, into the recorded results (e.g. on a quieter "
                             "machine); the record keeps the command and load of each part")
    arguments = parser.parse_args()
    if arguments.monitor_speed_only:
        return remeasure_monitor_speed(arguments.repeats)
    if arguments.quick:
        arguments.seeds, arguments.months_per_seed, arguments.replay_seeds, arguments.repeats = 2, 1, 1, 1
    load_at_start = round(os.getloadavg()[0], 2)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    default_month = params["ingest"]["n_claims"] // params["ingest"]["n_months"]
    figures = {}
    figures.update(monitor_speed(100_000 if arguments.quick else 1_000_000, arguments.repeats))
    print(json.dumps(figures), flush=True)
    months = synthetic_months(arguments.seeds, arguments.months_per_seed, default_month,
                              [arguments.claims_per_month, default_month])
    figures["claims_per_month"] = arguments.claims_per_month
    figures.update(summarise_months(months[arguments.claims_per_month]))
    figures["false_alarm_seeds"] = arguments.seeds
    figures["default_claims_per_month"] = default_month
    figures.update(summarise_months(months[default_month], suffix="_default_months"))
    figures.update(summarise_months(fremtpl2_months(arguments.fremtpl2, arguments.seeds), prefix="fremtpl2_"))
    print(json.dumps(figures), flush=True)
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
                  "monitor_1m_rows_s": {"max": 5.0},
                  "ae_detection_rate_115": {"min": 0.9}, "ae_detection_rate_120": {"min": 0.9},
                  "ae_detection_rate_130": {"min": 0.9},
                  "fremtpl2_false_alarm_rate": {"max": 0.05}, "fremtpl2_ae_detection_rate_115": {"min": 0.9},
                  "fremtpl2_ae_detection_rate_120": {"min": 0.9}, "fremtpl2_ae_detection_rate_130": {"min": 0.9}},
    }
    print(json.dumps(record, indent=2, default=str))
    if not arguments.quick:
        (REPO / "benchmarks/results/fatigue.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
