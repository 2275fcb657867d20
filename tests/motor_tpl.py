"""A motor third-party liability portfolio as a user brings it, unlike the project's generator.

One row per policy and calendar year, two years (an integer `CalYear`), most policies renewed into the second year
under the same `PolNum`; exposure in days (`Exppdays`); the cost is the sum of two columns, property damage
(`Indtppd`) and bodily injury (`Indtpbi`), mostly zero; a vehicle sub-group (`SubGroup2`) with hundreds of levels
nested in a coarser group (`Group2`); a few policy-years split over two rows (the property-damage amount in one, the
bodily-injury amount in the other), a few with no exposure. Costs rise from the first year to the second (claims
inflation, `trend`) while the policies stay alike: a real cost trend without feature drift.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

YEARS = (2022, 2023)
PARAMS = {  # one params file (the `data`, `validate` and `features` sections) that runs the pipeline on it
    "data": {
        "source": "data/sources/motor_tpl.csv",
        "id": "policy_year", "target": "claim_cost", "weight": "exposure", "target_per_weight": True,
        "period": "CalYear", "period_unit": "auto",
        "categorical": ["Gender", "Type", "Category", "Occupation", "Group1", "Group2", "SubGroup2"],
        "numeric": ["Age", "Bonus", "Poldur", "Value", "Adind", "Density"],
        "dropped": ["Numtppd", "Numtpbi"],
        "derived": {"claim_cost": {"sum": ["Indtppd", "Indtpbi"]},
                    "exposure": {"from": "Exppdays", "divide_by": 365},
                    "policy_year": {"join": ["PolNum", "CalYear"]}},
        "objective": "poisson",  # cost per policy-year with a log link, balanced by construction (scikit-learn's booster)
    },
    "validate": {"min_rows": 1000, "max_quarantine_share": 0.01, "nullable": [], "duplicate_ids": "sum",
                 "ranges": {"exposure": [None, 1.01], "Age": [18, 100]}, "categories": {}},
    "features": {"split": "time", "test_months": 1, "window_months": 0},
}


def motor_tpl(policies: int = 20_000, trend: float = 1.15, seed: int = 0) -> pd.DataFrame:
    "The portfolio: about 1.8 rows per policy (two years, most renewed), plus a few split and empty rows."
    rng = np.random.default_rng(seed)
    subgroups = np.array([f"{letter}{number}" for letter in "LMNOPQRSTU" for number in range(1, 48)])  # 470 levels
    popularity = 1 / np.arange(1, len(subgroups) + 1) ** 0.9  # a few common vehicle sub-groups, a long tail of rare ones
    subgroup_effect = rng.normal(0, 0.35, len(subgroups))
    first = pd.DataFrame({
        "PolNum": rng.choice(np.arange(100_000, 999_999), policies, replace=False),
        "Gender": rng.choice(["Male", "Female"], policies, p=[0.6, 0.4]),
        "Type": rng.choice(list("ABCDEF"), policies, p=[0.25, 0.2, 0.2, 0.15, 0.12, 0.08]),
        "Category": rng.choice(["Large", "Medium", "Small"], policies, p=[0.2, 0.5, 0.3]),
        "Occupation": rng.choice(["Employed", "Housewife", "Retired", "Self-employed", "Unemployed"], policies,
                                 p=[0.5, 0.1, 0.15, 0.15, 0.1]),
        "Age": np.clip(rng.normal(45, 14, policies), 18, 90).round().astype(int),
        "Group1": rng.integers(1, 21, policies),
        "Bonus": rng.choice(np.arange(-50, 160, 10), policies),
        "Poldur": rng.integers(0, 16, policies),
        "Value": np.exp(rng.normal(9.6, 0.6, policies)).round(-1).astype(int),
        "Adind": rng.integers(0, 2, policies),
        "SubGroup2": rng.choice(len(subgroups), policies, p=popularity / popularity.sum()),
        "Density": np.exp(rng.normal(4.5, 1.2, policies)).round(1),
    })
    first["Group2"] = np.array(list("LMNOPQRSTU"))[first["SubGroup2"] // 47]
    # Renewals keep their policy number and attributes, a year older; lapsed ones are replaced by new business alike.
    renewed = first[rng.random(policies) < 0.8].assign(Age=lambda frame: frame["Age"] + 1,
                                                       Poldur=lambda frame: frame["Poldur"] + 1)
    newcomers = first.sample(policies - len(renewed), random_state=seed + 1).assign(
        PolNum=rng.choice(np.arange(1_000_000, 1_999_999), policies - len(renewed), replace=False))
    book = pd.concat([first.assign(CalYear=YEARS[0]), pd.concat([renewed, newcomers]).assign(CalYear=YEARS[1])],
                     ignore_index=True)
    rows = len(book)
    book["Exppdays"] = np.where(rng.random(rows) < 0.7, 365, rng.integers(1, 365, rows))
    log_frequency = (-2.6 + 0.012 * (book["Bonus"] - 50) + 0.012 * np.abs(book["Age"] - 45) ** 1.2 / 4
                     + book["Type"].map(dict(zip("ABCDEF", [0, 0.1, 0.2, 0.25, 0.35, 0.5]))).to_numpy()
                     + 0.08 * np.log(book["Density"]) + 0.15 * book["Adind"]
                     + subgroup_effect[book["SubGroup2"]])
    years = book["Exppdays"] / 365
    book["Numtppd"] = rng.poisson(np.exp(log_frequency) * years)
    book["Numtpbi"] = rng.poisson(0.12 * np.exp(log_frequency) * years)
    inflation = np.where(book["CalYear"] == YEARS[1], trend, 1.0)
    severity = 1_600 * (book["Value"] / 15_000) ** 0.15 * inflation
    book["Indtppd"] = np.where(book["Numtppd"] > 0, rng.gamma(2.0 * np.maximum(book["Numtppd"], 1), severity / 2.0), 0.0).round(2)
    book["Indtpbi"] = np.where(book["Numtpbi"] > 0,
                               np.exp(rng.normal(np.log(9_000 * inflation), 0.8)) * book["Numtpbi"], 0.0).round(2)
    book["SubGroup2"] = subgroups[book["SubGroup2"]]
    # Data as it comes: a few policy-years split over two rows (one amount in each), a few rows with no exposure.
    split = book[(book["Indtppd"] > 0) & (book["Indtpbi"] > 0)].sample(frac=0.5, random_state=seed + 2)
    book.loc[split.index, "Indtpbi"] = 0.0
    book = pd.concat([book, split.assign(Indtppd=0.0)], ignore_index=True)
    book.loc[book.sample(frac=0.002, random_state=seed + 3).index, "Exppdays"] = 0
    columns = ["PolNum", "CalYear", "Gender", "Type", "Category", "Occupation", "Age", "Group1", "Bonus", "Poldur",
               "Value", "Adind", "SubGroup2", "Group2", "Density", "Exppdays", "Numtppd", "Numtpbi", "Indtppd", "Indtpbi"]
    return book.sample(frac=1.0, random_state=seed + 4)[columns].reset_index(drop=True)
