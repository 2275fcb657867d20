"""The pipeline's stages as plain Python scripts, for `notebook_tax.py`'s comparison: `python
benchmarks/support/script_stages.py <stage>` does what the stage notebook's `#| pipeline` cells do, with the same
`start_stage` and the same exported `mlops_notebooks.stages.*` functions, and writes the same outputs; it leaves
out what only the executed report shows (tables and figures that are not declared outputs) and the Dask branches
(the benchmark runs the embedded default). `notebook_tax.py` checks that both forms write the same data."""
from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import time

import yaml

sys.path.insert(0, os.getcwd())  # the project copy's own package, as papermill's stage engine sees it
# As the stage engine does at exit: no final garbage collections over every object the stage made (1-2 s in the
# larger stages). Both forms then differ only in what the notebook adds: papermill, IPython, the executed report.
atexit.register(gc.freeze)


def ingest(data, ingest):
    from mlops_notebooks.core.artifacts import file_md5, write_json
    from mlops_notebooks.core.stage import start_stage
    from mlops_notebooks.stages.ingest import ingest_claims, write_claims
    stage = start_stage("ingest", data=data, ingest=ingest)
    declared, params = stage.params.data, stage.params.ingest
    source = declared.source or "the generator"
    set_aside = []  # the incoming files that cannot be read
    claims = ingest_claims(declared, params, stage.root, incoming=stage.inputs.incoming, set_aside=set_aside)
    write_claims(claims, stage.outputs.claims, source)
    print(f"{len(claims):,} rows, {claims.shape[1]} columns from {source} -> {stage.relative(stage.outputs.claims)}")
    for entry in set_aside:
        print(f"warning: {stage.relative(entry['file'])}: set aside, not read: {entry['reason']}", file=sys.stderr)
    write_json({"set_aside": [{"file": stage.relative(entry["file"]), "md5": file_md5(entry["file"]),
                               "reason": entry["reason"]} for entry in set_aside]}, stage.outputs.set_aside)


def validate(data, validate):
    from mlops_notebooks.core.artifacts import read_parquet, write_json, write_parquet
    from mlops_notebooks.core.stage import start_stage
    from mlops_notebooks.stages.validate import check_claims, storable, validation_summary
    stage = start_stage("validate", data=data, validate=validate)
    declared, params = stage.params.data, stage.params.validate
    source = declared.source or stage.relative(stage.inputs.raw)
    raw = read_parquet(stage.inputs.raw, made_by="ingest")
    claims, quarantine = check_claims(raw, declared, params, source=source)
    summary = validation_summary(raw, claims, quarantine, declared)
    write_parquet(storable(quarantine), stage.outputs.quarantine)
    write_parquet(claims, stage.outputs.claims)
    write_json(summary, stage.outputs.summary)


def features(data, features):
    from mlops_notebooks.core.artifacts import read_parquet, write_parquet
    from mlops_notebooks.core.stage import start_stage
    from mlops_notebooks.stages.features import select_features, split_claims
    stage = start_stage("features", data=data, features=features)
    declared, params = stage.params.data, stage.params.features
    claims = read_parquet(stage.inputs.claims, made_by="validate")
    train, test = split_claims(select_features(claims, declared), declared, params)
    write_parquet(train, stage.outputs.train)
    write_parquet(test, stage.outputs.test)
    print(f"train: {len(train):,} rows; test: {len(test):,} rows ({params.split} split)")


def train(data, features, train):
    from mlops_notebooks.core.artifacts import atomic_directory, flatten, lineage_tags, read_parquet, write_json
    from mlops_notebooks.core.settings import configure_mlflow
    from mlops_notebooks.core.stage import start_stage
    from mlops_notebooks.stages.features import training_record
    from mlops_notebooks.stages.train import fit_model, log_training_run, summarize_training
    stage = start_stage("train", data=data, features=features, train=train)
    declared, params = stage.params.data, stage.params.train
    started = time.perf_counter()
    rows = read_parquet(stage.inputs.train, made_by="features")
    model = fit_model(rows, declared, params)
    fit_seconds = time.perf_counter() - started
    training = summarize_training(rows, declared)
    metrics = {"train_rows": float(training.rows), "fit_seconds": fit_seconds, "train_mean_target": training.mean_target,
               "balance_factor": float(getattr(model[-1], "balance_factor_", 1.0))}
    stage_params = {"data": declared.model_dump(), "features": stage.params.features.model_dump(),
                    "train": params.model_dump()}
    tags = lineage_tags(stage.root, inputs=[stage.relative(stage.inputs.train)], params=stage_params,
                        reports=[stage.contract.report])
    tags["training_window"] = (f"{training.first_period}..{training.last_period}" if declared.period
                               else f"{training.rows} rows, random split (no period)")
    tags.update({f"lineage.derived.{column}": how.describe() for column, how in declared.derived.items()})
    training_rows = training_record(training, declared, stage.params.features)
    tags["lineage.training_rows"] = json.dumps(training_rows)
    configure_mlflow(stage.settings, stage.root)
    with atomic_directory(stage.outputs.model) as model_dir:
        run = log_training_run(model, training.inputs, metrics, flatten(stage_params), tags, model_dir=model_dir)
    write_json({**run, "training_window": tags["training_window"], "train_rows": training.rows,
                "report": stage.contract.report, "train_mean_target": metrics["train_mean_target"],
                "balance_factor": metrics["balance_factor"], "training_rows": training_rows}, stage.outputs.run)
    print(f"fitted in {fit_seconds:.1f}s on {training.rows:,} rows; MLflow run {run['run_id']}")


def evaluate(data, evaluate):
    import matplotlib
    matplotlib.use("Agg")  # a script has no inline backend: figures are drawn only to be saved
    import matplotlib.pyplot as plt
    import mlflow
    import numpy as np

    from mlops_notebooks.core.artifacts import atomic_path, file_md5, read_parquet, write_json
    from mlops_notebooks.core.registry import read_train_run
    from mlops_notebooks.core.settings import configure_mlflow
    from mlops_notebooks.core.stage import start_stage
    from mlops_notebooks.core.tracking import track_stage
    from mlops_notebooks.stages.evaluate import cost_metrics, error_by_group, feature_importance, lorenz_curve
    from mlops_notebooks.stages.train import feature_frame, sample_weight
    stage = start_stage("evaluate", data=data, evaluate=evaluate)
    declared, params = stage.params.data, stage.params.evaluate
    test = read_parquet(stage.inputs.test, made_by="features")
    run = read_train_run(stage.inputs.run, stage.settings)
    model = mlflow.sklearn.load_model(str(stage.inputs.model))
    inputs = feature_frame(test, declared)
    predicted = model.predict(inputs)
    actual = test[declared.model_target].to_numpy(dtype=float)
    weight = sample_weight(test, declared)
    every_metric = cost_metrics(actual, predicted, declared.deviance_power, weight)
    metrics = {**{name: every_metric[name] for name in params.metrics}, "mean_actual": every_metric["mean_actual"],
               "mean_predicted": every_metric["mean_predicted"], "ae": every_metric["ae"], "rows": len(test)}
    by_group = error_by_group(test, declared, predicted)
    importance = feature_importance(model, inputs, test[declared.model_target], declared.deviance_power, params, weight)

    def save_figure(figure, target):
        with atomic_path(target) as temporary:
            figure.savefig(temporary, format="png", dpi=100, bbox_inches="tight")

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    x, y = lorenz_curve(actual, predicted, weight)
    left.plot(x, y, label=f"model (Gini {every_metric['gini']:.3f})")
    left.plot(*lorenz_curve(actual, actual, weight), linestyle="--", label="perfect ranking")
    left.plot([0, 1], [0, 1], color="black", linewidth=1, label="random")
    left.set(xlabel="share of exposure, lowest predicted first" if weight is not None
             else "share of rows, lowest predicted first",
             ylabel=f"share of {declared.target}", title="Ordered Lorenz curve (test)")
    left.legend()
    sample = np.random.default_rng(params.seed).choice(len(test), size=min(len(test), 3000), replace=False)
    positive = actual[sample] > 0
    right.scatter(actual[sample][positive], predicted[sample][positive], s=4, alpha=0.3)
    limits = [max(1e-3, actual[actual > 0].min()), actual.max()]
    right.plot(limits, limits, color="black", linewidth=1)
    right.set(xscale="log", yscale="log", xlabel=f"actual {declared.model_target} (positive rows)",
              ylabel="predicted", title=f"Predicted vs actual (test, D²={every_metric['d2']:.3f})")
    save_figure(figure, stage.outputs.predicted_vs_actual)
    figure, axis = plt.subplots(figsize=(7, 3.5))
    by_group.plot(x="group", y=["mean_actual", "mean_predicted", "mae"], marker="o", ax=axis,
                  title=f"Error by {declared.period or 'decile of prediction'} (test)")
    save_figure(figure, stage.outputs.error_by_group)
    figure, axis = plt.subplots(figsize=(6, 4))
    importance.iloc[::-1].plot(x="feature", y="importance", xerr="std", kind="barh", ax=axis, legend=False,
                               title="Permutation importance (increase in mean deviance)")
    save_figure(figure, stage.outputs.feature_importance)
    for target, table in [(stage.outputs.error_by_group_table, by_group),
                          (stage.outputs.feature_importance_table, importance)]:
        with atomic_path(target) as temporary:
            table.to_csv(temporary, index=False)
    write_json(metrics, stage.outputs.metrics)

    configure_mlflow(stage.settings, stage.root)
    with mlflow.start_run(run_id=run["run_id"]):
        mlflow.log_metrics({f"test_{name}": value for name, value in {**every_metric, "rows": len(test)}.items()})
        mlflow.set_tags({f"lineage.data.{stage.relative(stage.inputs.test)}": file_md5(stage.inputs.test),
                         "lineage.reports": f"{run['report']},{stage.contract.report}",
                         "lineage.params.evaluate": json.dumps(params.model_dump())})
        for entry in stage.contract.plots:
            mlflow.log_artifact(str(stage.root / entry.path), artifact_path="plots")
    track_stage(mlflow.MlflowClient(), run["run_id"], test, stage.relative(stage.inputs.test),
                file_md5(stage.inputs.test), "evaluation")
    print(f"test metrics added to MLflow run {run['run_id']}")


def register(data, register):
    import mlflow
    from mlflow import MlflowClient

    from mlops_notebooks.core.artifacts import DVC_EXPERIMENT, file_md5, git_state, read_parquet, write_json
    from mlops_notebooks.core.contracts import find_contract
    from mlops_notebooks.core.registry import (
        CHALLENGER,
        CHAMPION,
        gate_lock,
        load_version_model,
        read_train_run,
        register_version,
        version_by_alias,
    )
    from mlops_notebooks.core.settings import DataError, configure_mlflow
    from mlops_notebooks.core.stage import start_stage
    from mlops_notebooks.core.tracking import publish_decision
    from mlops_notebooks.stages.evaluate import cost_metrics, deviance_power
    from mlops_notebooks.stages.features import trained_rows
    from mlops_notebooks.stages.register import (
        apply_provenance,
        comparison_summary,
        decide,
        provenance,
        recorded_training_rows,
        sanity_checks,
    )
    from mlops_notebooks.stages.schema import period_span
    from mlops_notebooks.stages.train import feature_frame, sample_weight
    stage = start_stage("register", data=data, register=register)
    declared, rule = stage.params.data, stage.params.register
    deviance = declared.deviance_power if rule.deviance == "objective" else rule.deviance
    evaluation = read_parquet(stage.inputs.test, made_by="features")
    trained = read_train_run(stage.inputs.run, stage.settings)
    evaluated = json.loads(stage.inputs.metrics.read_text())
    inputs, actual = feature_frame(evaluation, declared), evaluation[declared.model_target].to_numpy(dtype=float)
    weight = sample_weight(evaluation, declared)
    challenger_predictions = mlflow.sklearn.load_model(str(stage.inputs.model)).predict(inputs)
    challenger_sanity = sanity_checks(actual, challenger_predictions, rule, deviance, trained["train_mean_target"],
                                      weight)
    usable = all(check["passed"] for check in challenger_sanity[:2])
    challenger_metrics = cost_metrics(actual, challenger_predictions, deviance, weight) if usable else {}

    configure_mlflow(stage.settings, stage.root)
    client, name = MlflowClient(), stage.settings.registered_model_name
    lineage = {key: value for key, value in client.get_run(trained["run_id"]).data.tags.items()
               if key.startswith("lineage.")}
    lineage.update({
        "lineage.run_id": trained["run_id"], "lineage.training_window": trained["training_window"],
        "lineage.train_rows": str(trained["train_rows"]), "lineage.evaluation_rows": str(len(evaluation)),
        "lineage.evaluation_window": (period_span(evaluation[declared.period]) if declared.period
                                      else "random split (no period)"),
        f"lineage.data.{stage.relative(stage.inputs.test)}": file_md5(stage.inputs.test),
        "lineage.reports": ",".join([trained["report"], find_contract(stage.root, "evaluate").report,
                                     stage.contract.report]),
    })
    with gate_lock(stage.settings, stage.root):
        champion_version = version_by_alias(client, name, CHAMPION)
        champion = None
        if champion_version is not None and champion_version.run_id != trained["run_id"]:
            champion_model = load_version_model(name, champion_version)
            expected = list(getattr(champion_model, "feature_names_in_", inputs.columns))
            if expected != list(inputs.columns):
                raise DataError(f"champion {name} version {champion_version.version} takes other inputs")
            learned = trained_rows(evaluation, declared, recorded_training_rows(champion_version.tags))
            comparison = comparison_summary(learned)
            champion = {"version": int(champion_version.version), "run_id": champion_version.run_id, "metrics": {},
                        "comparison": comparison}
            if comparison["rows"]:
                keep = ~learned
                kept_weight = None if weight is None else weight[keep]
                champion["metrics"] = cost_metrics(actual[keep], champion_model.predict(inputs[keep]), deviance,
                                                   kept_weight)
                if usable:
                    challenger_metrics = cost_metrics(actual[keep], challenger_predictions[keep], deviance,
                                                      kept_weight)
        version, created = register_version(client, name, trained["model_uri"], trained["run_id"], lineage)
        challenger = {"version": int(version.version), "run_id": trained["run_id"], "metrics": challenger_metrics,
                      "sanity": challenger_sanity}
        if champion_version is not None and champion_version.version == version.version:
            decision = decide(challenger, None, rule)
            decision["outcome"] = "already_champion"
        else:
            decision = decide(challenger, champion, rule)
        decision["rule"]["deviance_power"] = deviance_power(deviance)
        decision.update({"model_name": name, "created_version": created, "evaluate_stage": {"metrics": evaluated}})
        kind = provenance([lineage.get("lineage.git_dirty", "unknown"), git_state(stage.root)["git_dirty"]],
                          lineage.get("lineage.dvc_experiment") or os.environ.get(DVC_EXPERIMENT, ""))
        decision = apply_provenance(decision, kind, rule, scratch=stage.interactive)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        publish_decision(client, name, version, decision)
        if decision["outcome"] == "promoted":
            client.set_registered_model_alias(name, CHAMPION, version.version)
    write_json(decision, stage.outputs.decision)
    print(f"{name} version {version.version} ({'new' if created else 'already registered'}): {decision['outcome']}")


def monitor(data, features, monitor):
    from mlflow import MlflowClient

    from mlops_notebooks.core.artifacts import read_parquet, write_json
    from mlops_notebooks.core.registry import CHAMPION, load_version_model, version_by_alias
    from mlops_notebooks.core.settings import UserError, open_existing_store
    from mlops_notebooks.core.stage import start_stage
    from mlops_notebooks.stages.features import FeaturesParams  # noqa: F401  (parses the features section)
    from mlops_notebooks.stages.monitor import (
        batch_months,
        learnable,
        monitor_batch,
        prepare_batch,
        read_incoming,
        should_retrain,
    )
    from mlops_notebooks.stages.schema import period_unit_of
    stage = start_stage("monitor", data=data, features=features, monitor=monitor)
    declared, params, split = stage.params.data, stage.params.monitor, stage.params.features
    assert params.source == "incoming", "the benchmark runs the default monitor source"
    reference = read_parquet(stage.inputs.train, made_by="features")
    evaluation = read_parquet(stage.inputs.test, made_by="features")
    batch, sources, read_problems = read_incoming(stage.inputs.incoming)
    batch, derive_problems = prepare_batch(batch, declared, ", ".join(sources) or "the batch")
    read_problems += derive_problems
    open_existing_store(stage.settings)
    version = version_by_alias(MlflowClient(), stage.settings.registered_model_name, CHAMPION)
    champion_model = load_version_model(stage.settings.registered_model_name, version) if version else None
    if not sources and not read_problems:
        verdict = {"verdict": "no_data", "rows": 0, "drifted_features": [], "evidence": {}, "decay": None,
                   "problems": [f"no batch files (.csv, .parquet) in {stage.relative(stage.inputs.incoming)}"]}
    else:
        try:
            verdict = monitor_batch(reference, batch, declared, params, champion_model, evaluation, None) \
                if len(batch) else {"verdict": "invalid", "problems": [], "rows": 0, "drifted_features": [],
                                    "evidence": {}, "decay": None}
        except (UserError, ValueError) as error:
            verdict = {"verdict": "invalid", "problems": [f"the batch cannot be judged: {type(error).__name__}: "
                                                          f"{str(error).splitlines()[0]}"],
                       "rows": len(batch), "drifted_features": [], "evidence": {}, "decay": None}
        verdict["problems"] = read_problems + verdict["problems"]
        if read_problems:
            verdict["verdict"] = "invalid"
    retrain = should_retrain(verdict["verdict"], params.retrain)
    unit = period_unit_of(reference[declared.period]) if declared.period else "auto"
    flagged = batch_months(batch, declared.period, unit) if len(batch) else []
    if split.split == "time" and flagged and verdict.get("labelled") and retrain and params.retrain == "on_drift":
        pool_months = (batch_months(reference, declared.period, unit) + batch_months(evaluation, declared.period, unit)
                       + flagged)
        verdict["learnable_months"] = learnable(flagged, pool_months, split.test_months)
        if not verdict["learnable_months"]:
            retrain = False
            verdict["retrain_deferred"] = (
                f"the flagged period(s) {', '.join(flagged)} would be the gate's test periods (features.test_months="
                f"{split.test_months}), not training data: re-train once a newer period has arrived")
    verdict.update({"sources": sources, "champion_version": int(version.version) if version else None,
                    "retrain_policy": params.retrain, "retrain": retrain})
    write_json(verdict, stage.outputs.verdict)
    print(f"verdict: {verdict['verdict']} on {verdict['rows']:,} rows from {', '.join(sources) or 'nothing'}")


STAGES = {function.__name__: function for function in (ingest, validate, features, train, evaluate, register, monitor)}

if __name__ == "__main__":
    name = sys.argv[1]
    from mlops_notebooks.core.stage import PIPELINE_RUN
    os.environ[PIPELINE_RUN] = f"benchmarks/support/script_stages.py {name}"  # as the stage engine marks a pipeline run
    params = yaml.safe_load(open("params.yaml"))
    function = STAGES[name]
    # What `papermill -f params.yaml` injects into the notebook: the sections its parameters cell names.
    function(**{section: params[section] for section in function.__code__.co_varnames[:function.__code__.co_argcount]})
