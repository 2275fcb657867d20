"""Fuzzing the way in: hypothesis damages a declared claims CSV in many ways, and the ingest and validate stages
(the same functions their notebooks run) must end each one as accepted data or one clear error naming what is
wrong, never an unexplained crash, and never with part of their outputs written."""
import string
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from mlops_notebooks.core.artifacts import read_parquet, write_json, write_parquet
from mlops_notebooks.core.settings import UserError
from mlops_notebooks.stages.ingest import IngestParams, ingest_claims, write_claims
from mlops_notebooks.stages.schema import DataParams
from mlops_notebooks.stages.validate import ValidateParams, check_claims, storable, validation_summary

# A small policy table with every role: id, period, a category, a number, exposure as weight, and a count target.
DECLARED = DataParams(source="data/sources/policies.csv", id="policy_id", target="claims", weight="exposure",
                      target_per_weight=True, period="month", categorical=["region"], numeric=["driver_age"],
                      objective="poisson")
CHECKS = ValidateParams(min_rows=20, max_quarantine_share=0.2, ranges={"driver_age": (18, 99), "exposure": (None, 1.0)},
                        categories={"region": ["north", "south", "east"]})
GENERATOR = IngestParams(n_claims=10, start_month="2023-01", n_months=2)
OUTPUTS = ["data/raw/claims.parquet", "data/interim/claims.parquet", "data/quarantine/claims.parquet",
           "reports/validation.json"]
COLUMNS = ["policy_id", "month", "region", "driver_age", "exposure", "claims"]


def policies(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "policy_id": np.arange(1, rows + 1),
        "month": rng.choice(["2023-01", "2023-02", "2023-03"], rows),
        "region": rng.choice(["north", "south", "east"], rows),
        "driver_age": rng.integers(18, 90, rows),
        "exposure": rng.uniform(0.1, 1.0, rows).round(3),
        "claims": rng.poisson(0.2, rows),
    })


BAD_VALUES = st.sampled_from(["", "NaN", "nan", "inf", "-inf", "-1", "0", "1e400", "abc", "  ", "None", "null",
                              "2023-13", "1,5", "true", "9999999999999999999999", "é", "\u200b", "'", '"'])


@st.composite
def damaged_csv(draw) -> bytes:
    "Bytes of a policies CSV with one or more kinds of damage, or none."
    frame = policies(draw(st.integers(20, 80)), draw(st.integers(0, 10_000))).astype(object)
    damages = draw(st.lists(st.sampled_from([
        "none", "drop_column", "extra_column", "rename_column", "bad_values", "empty_column", "negative_target",
        "nan_target", "inf_exposure", "zero_exposure", "duplicate_ids", "unknown_category", "bad_month",
        "shuffle_columns"]), min_size=1, max_size=3))
    for damage in damages:
        column = draw(st.sampled_from(list(frame.columns)))
        rows = draw(st.lists(st.integers(0, len(frame) - 1), min_size=1, max_size=len(frame)))
        if damage == "drop_column" and frame.shape[1] > 1:
            frame = frame.drop(columns=[column])
        elif damage == "extra_column":
            frame[draw(st.text(string.ascii_lowercase, min_size=1, max_size=8)) + "_x"] = 1
        elif damage == "rename_column":
            frame = frame.rename(columns={column: column.upper()})
        elif damage == "bad_values":
            frame.loc[rows, column] = draw(BAD_VALUES)
        elif damage == "empty_column":
            frame[column] = None
        elif damage == "negative_target" and "claims" in frame:
            frame.loc[rows, "claims"] = -1
        elif damage == "nan_target" and "claims" in frame:
            frame.loc[rows, "claims"] = np.nan
        elif damage == "inf_exposure" and "exposure" in frame:
            frame.loc[rows, "exposure"] = np.inf
        elif damage == "zero_exposure" and "exposure" in frame:
            frame.loc[rows, "exposure"] = 0
        elif damage == "duplicate_ids" and "policy_id" in frame:
            frame.loc[rows, "policy_id"] = 1
        elif damage == "unknown_category" and "region" in frame:
            frame.loc[rows, "region"] = "atlantis"
        elif damage == "bad_month" and "month" in frame:
            frame.loc[rows, "month"] = "not a month"
        elif damage == "shuffle_columns":
            frame = frame[list(reversed(frame.columns))]
    text = frame.to_csv(index=False)
    encoding = draw(st.sampled_from(["plain", "plain", "plain", "semicolon", "latin1", "truncated", "header_only",
                                     "empty", "ragged", "binary", "duplicate_header"]))
    if encoding == "semicolon":
        return text.replace(",", ";").encode()
    if encoding == "latin1":
        return text.replace("north", "nörth").encode("latin-1")
    if encoding == "truncated":
        return text.encode()[: draw(st.integers(0, len(text)))]
    if encoding == "header_only":
        return text.splitlines()[0].encode() + b"\n"
    if encoding == "empty":
        return b""
    if encoding == "ragged":
        return (text + "1,2,3,4,5,6,7,8,9\n").encode()
    if encoding == "binary":
        return draw(st.binary(min_size=1, max_size=200))
    if encoding == "duplicate_header":
        header, _, body = text.partition("\n")
        first = header.split(",")[0]
        return (header + "," + first + "\n" + "\n".join(line + ",0" for line in body.splitlines())).encode()
    return text.encode()


def run_stages(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    "What the ingest and validate stages' pipeline cells do, with the outputs in the same places."
    write_claims(ingest_claims(DECLARED, GENERATOR, root), root / OUTPUTS[0], DECLARED.source)
    raw = read_parquet(root / OUTPUTS[0], made_by="ingest")
    clean, quarantine = check_claims(raw, DECLARED, CHECKS, source=DECLARED.source)
    write_parquet(storable(quarantine), root / OUTPUTS[2])
    write_parquet(clean, root / OUTPUTS[1])
    write_json(validation_summary(raw, clean, quarantine, DECLARED), root / OUTPUTS[3])
    return clean, quarantine


@pytest.fixture
def project(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(content=damaged_csv())
@example(content=policies(30, 0).astype(object).assign(policy_id=["9999999999999999999999", *range(2, 31)])
         .to_csv(index=False).encode())  # an id larger than int64: found on a fresh clone (#25)
def test_each_damaged_csv_is_accepted_or_refused_with_one_clear_message(project, content):
    root = Path(tempfile.mkdtemp(dir=project))  # hypothesis may replay the same content
    (root / "data/sources").mkdir(parents=True)
    (root / "data/sources/policies.csv").write_bytes(content)
    try:
        clean, quarantine = run_stages(root)
    except UserError as error:
        message = str(error)
        event(f"refused: {type(error).__name__}")
        assert message.strip(), "an error must say something"
        assert "policies.csv" in message or "data/raw/claims.parquet" in message, message
        assert "Traceback" not in message
        # Nothing of validate's outputs is written when it refuses; ingest's output exists only if ingest passed.
        for output in OUTPUTS[1:]:
            assert not (root / output).exists(), f"{output} written by a failed run: {message}"
        leftovers = [path.name for path in root.rglob(".*") if path.is_file()]
        assert leftovers == [], f"temporary files left behind: {leftovers}"
        return
    event("accepted, some rows quarantined" if len(quarantine) else "accepted, clean")
    # Accepted: every output is written, the clean rows hold the declared types and fit the checks.
    for output in OUTPUTS:
        assert (root / output).exists(), output
    assert len(clean) >= CHECKS.min_rows
    assert clean["policy_id"].is_unique
    assert (clean["exposure"] > 0).all() and (clean["exposure"] <= 1).all()
    assert (clean["claims"] >= 0).all() and np.isfinite(clean["claims"]).all()
    assert clean["region"].isin(["north", "south", "east"]).all()
    assert str(clean["month"].dtype) == "period[M]", "months read as monthly periods"
    assert len(quarantine) <= CHECKS.max_quarantine_share * (len(clean) + len(quarantine))
    assert quarantine["reason"].str.len().gt(0).all()


def test_the_fuzzer_produces_both_outcomes(tmp_path):
    "The property above is only meaningful if both accepted and refused cases occur: check one of each."
    good = tmp_path / "good"
    (good / "data/sources").mkdir(parents=True)
    policies(50, 0).to_csv(good / "data/sources/policies.csv", index=False)
    clean, quarantine = run_stages(good)
    assert len(clean) == 50 and len(quarantine) == 0
    bad = tmp_path / "bad"
    (bad / "data/sources").mkdir(parents=True)
    policies(50, 0).drop(columns=["exposure"]).to_csv(bad / "data/sources/policies.csv", index=False)
    with pytest.raises(UserError, match="declared column\\(s\\) missing: 'exposure' \\(data.weight\\)"):
        run_stages(bad)


def test_an_id_larger_than_int64_is_kept_as_text(tmp_path):
    "Ids are identifiers: a column of whole numbers too large for 64 bits is read as text, stored and validated."
    (tmp_path / "data/sources").mkdir(parents=True)
    frame = policies(30, 0).astype(object)
    frame.loc[3, "policy_id"] = "9999999999999999999999"
    frame.to_csv(tmp_path / "data/sources/policies.csv", index=False)
    clean, quarantine = run_stages(tmp_path)
    assert len(clean) == 30 and len(quarantine) == 0
    assert clean["policy_id"].tolist()[2:5] == ["3", "9999999999999999999999", "5"]
    assert read_parquet(tmp_path / OUTPUTS[0], made_by="ingest")["policy_id"].iloc[3] == "9999999999999999999999"
