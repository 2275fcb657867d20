"""For `notebook_tax.py`: what MLflow costs a training run. Run inside a project copy after its `dvc repro`:
`python benchmarks/support/mlflow_probe.py RUNS` fits the default pipeline's model once, then times
`log_training_run` (the train stage's one MLflow call) against the warm SQLite store the repro made, and prints the
figures as one JSON line."""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the copy's own package, not the editable install

import mlflow  # noqa: E402,F401  (the overhead is timed after `import mlflow`: its import is a fixed cost)
import yaml  # noqa: E402

from mlops_notebooks.core.artifacts import flatten, lineage_tags, read_parquet  # noqa: E402
from mlops_notebooks.core.settings import configure_mlflow, load_settings, parse_params  # noqa: E402
from mlops_notebooks.stages.schema import DataParams  # noqa: E402
from mlops_notebooks.stages.train import TrainParams, feature_frame, fit_model, log_training_run  # noqa: E402


def main(runs: int) -> dict:
    project = Path.cwd()
    params = yaml.safe_load((project / "params.yaml").read_text())
    declared = parse_params(DataParams, "data", params["data"])
    train = parse_params(TrainParams, "train", params["train"])
    training = read_parquet(project / "data/processed/train.parquet", made_by="features")
    model = fit_model(training, declared, train)
    inputs = feature_frame(training, declared)
    metrics = {"train_rows": float(len(training)), "fit_seconds": 1.0}
    stage_params = {"data": declared.model_dump(), "train": train.model_dump()}
    tags = lineage_tags(project, inputs=["data/processed/train.parquet"], params=stage_params,
                        reports=["reports/04_train.ipynb"])
    settings = load_settings(project)
    assert settings.tracking_uri.startswith("sqlite:///"), settings.tracking_uri
    configure_mlflow(settings, project)

    def one_run(model_dir: Path | None) -> float:
        started = time.perf_counter()
        log_training_run(model, inputs, metrics, flatten(stage_params), tags, model_dir=model_dir)
        return time.perf_counter() - started

    first = one_run(None)  # also imports mlflow.sklearn and the signature machinery: reported apart
    logged = [one_run(None) for _ in range(runs)]
    with tempfile.TemporaryDirectory(dir=project) as scratch:  # what the stage does: log, and save the DVC output
        saved = [one_run(Path(scratch) / f"model-{index}") for index in range(runs)]
    return {"mlflow_first_run_s": round(first, 3), "mlflow_overhead_per_run_s": round(statistics.median(logged), 3),
            "mlflow_log_and_save_per_run_s": round(statistics.median(saved), 3), "mlflow_runs": runs}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]))))
