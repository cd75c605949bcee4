"""`npp compare`: NPP against next-token training (NTP) of the same model, like with like, with its noise.

What a run reaches with a budget is its *annealed end* (the learning rate decayed), not a point in
the middle of a longer run at constant rate: an underfit model gains most of its final quality in
the decay. So the NTP side of every comparison is a frontier made of annealed NTP ends only: full
runs and their branches (`npp train --branch-epochs`, `npp train branch`: the shorter runs for a
fifth of their cost), one point per budget. NPP's point is its run's end.

- **Equal FID**: NPP's training FLOPs over the FLOPs at which the NTP frontier reaches NPP's FID,
  interpolated in log-FLOPs between the two annealed NTP points around it; the same for the held-out
  loss (`val/loss_k1`) and for hours of training (from the step times: a requeued job's time in the
  queue is not training; a branch's hours include its parent's up to the branch point). Where no
  annealed NTP point is at or beyond NPP's value, no ratio is printed: the bound it implies is.
- **Equal epochs**: NPP's final FID and held-out loss minus NTP's at the same epochs.
- **Seeds**: runs that differ only in `--seed` form a group; every figure is the group's mean with
  its min–max over seeds, and the ratios and differences are also taken seed by seed (NPP seed s
  against the NTP runs of seed s) and given with their min–max.
- **Protocol**: a FID is compared only with FIDs measured alike (samples per class, guidance,
  temperature, top-k/p, reference and feature network: `npp.protocol.<metric>` tags); others are
  shown apart, with the difference named.

Prints a table, writes `compare.csv` (every evaluated step), `comparison.json` (groups, ratios,
differences) and a figure (`compare.png`, `compare.pdf`): FID and held-out loss against training
PFLOPs, annealed ends as points with their seed range, the NTP frontier as a line with a band,
mid-run curves as thin dashed lines marked "during training".
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

from npp.errors import ConfigError
from npp.pipeline.eval_spec import PROTOCOL_TAG, protocol_differences
from npp.runtime.metric_names import HELDOUT, canonical
from npp.runtime.mlflow_utils import tracking_uri

# in npp's own names (npp.runtime.metric_names.canonical: a run's `Results/fid_toynet_n200` is read as
# `curve/fid_toynet_n200`, so runs logged under either naming compare as one)
FID_KEY = re.compile(r"^(curve/)?fid(_[a-z]+)?(_n[0-9]+)?(_cfg[0-9.]+)?$")  # curve/fid_toynet_n200: eval points
# params that do not make two runs different experiments: what seed and name they have
NOT_GROUPING = ("train.seed", "train.run_name", "train.experiment")
# ...and what separates points of one frontier: the budget and the schedule
NOT_FAMILY = NOT_GROUPING + ("train.epochs", "train.total_steps", "train.schedule", "train.patch_levels",
                             "train.epoch_rate")


def is_ntp(schedule: str) -> bool:
    return schedule in ("1:1", "1:1.0")


def training_hours(step_s_history) -> dict[int, float]:
    """Hours of training at each log step: the sum of step_s x the steps of each log window (a resumed run's
    windows restart the count where the checkpoint was)."""
    hours, total, last = {}, 0.0, 0
    for m in sorted(step_s_history, key=lambda m: (m.step, m.timestamp)):
        if m.step <= last:
            continue
        total += m.value * (m.step - last) / 3600
        hours[m.step], last = total, m.step
    return hours


def _at_step(history, step: int):
    """The last record at or before `step`."""
    best = None
    for m in history:
        if m.step <= step and (best is None or m.step >= best.step):
            best = m
    return best


def _latest_per_step(history) -> dict[int, float]:
    latest = {}  # an evaluation repeated at a step: its last value counts
    for m in sorted(history, key=lambda m: m.timestamp):
        latest[m.step] = m.value
    return latest


def _key(params: dict, drop: tuple) -> tuple:
    """The identity params (the flags, the data, the held-out set) less `drop`."""
    return tuple(sorted((k, v) for k, v in params.items()
                        if (k.startswith(("train.", "heldout.")) or k == "data_digest") and k not in drop))


def collect(experiment: str, runs: list[str] | None = None) -> list[dict]:
    """One record per training run of the experiment (or of the runs named: names or ids): its identity, its
    end (step, PFLOPs, hours, every FID and the held-out loss there), its curves and its protocols."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment {experiment!r} at {mlflow.get_tracking_uri()}: train a run first")
    out, seen = [], set()
    for run in client.search_runs([exp.experiment_id], max_results=5000):
        tags, params = run.data.tags, run.data.params
        if "mlflow.parentRunId" in tags or "train.model" not in params:
            continue  # nested evaluations, comparisons: not training runs
        name, run_id = run.info.run_name, run.info.run_id
        if runs and name not in runs and run_id not in runs:
            continue
        seen.update({name, run_id})
        keys: dict[str, list[str]] = {}  # canonical -> every name it was logged under (a run of either naming)
        for k in run.data.metrics:
            if FID_KEY.match(canonical(k)) or canonical(k) == HELDOUT:
                keys.setdefault(canonical(k), []).append(k)
        flops = client.get_metric_history(run_id, "train_flops")
        hours = training_hours(client.get_metric_history(run_id, "step_s"))
        total = int(params.get("total_steps") or max((m.step for m in flops), default=0))
        schedule = params.get("schedule", params.get("train.schedule", "?"))
        curves = {}
        for key, names in keys.items():
            points = []
            history = [m for name in names for m in client.get_metric_history(run_id, name)]
            for step, value in sorted(_latest_per_step(history).items()):
                f = _at_step(flops, step)
                logged = [h for s, h in hours.items() if s <= step]
                points.append({"step": step, "value": value, "pflops": f.value / 1e15 if f else None,
                               "hours": logged[-1] if logged else None})
            curves[key] = points
        out.append({
            "run": name, "run_id": run_id, "model": params["train.model"], "schedule": schedule,
            "ntp": is_ntp(schedule), "seed": params.get("train.seed", "?"), "epochs": params.get("train.epochs", "?"),
            "total_steps": total, "branch": tags.get("npp.branch_parent") is not None,
            "group": _key(params, NOT_GROUPING), "family": _key(params, NOT_FAMILY), "curves": curves,
            "protocols": {k[len(PROTOCOL_TAG):]: json.loads(v) for k, v in tags.items() if k.startswith(PROTOCOL_TAG)},
        })
    missing = [r for r in runs or [] if r not in seen]
    if missing:
        raise ConfigError(f"--runs {','.join(missing)}: no such training run in experiment {experiment!r}")
    return sorted(out, key=lambda r: (r["model"], not r["ntp"], _epochs(r), r["schedule"], str(r["seed"]), r["run"]))


def _epochs(r: dict) -> float:
    try:
        return float(r["epochs"])
    except ValueError:
        return math.inf


def end_point(run: dict, key: str) -> dict | None:
    """The run's annealed end for `key`: the value measured at its last step (None: not measured there)."""
    return next((p for p in run["curves"].get(key, []) if p["step"] == run["total_steps"]), None)


def rows_of(runs: list[dict]) -> list[dict]:
    """Every evaluated step of every run, for the CSV: the end marked."""
    return [{"run": r["run"], "model": r["model"], "schedule": r["schedule"], "epochs": r["epochs"], "seed": r["seed"],
             "branch": r["branch"], "metric": key, "step": p["step"], "end": p["step"] == r["total_steps"],
             "value": p["value"], "train_pflops": p["pflops"], "train_hours": p["hours"]}
            for r in runs for key, points in sorted(r["curves"].items()) for p in points]


# --- groups of seeds and their spread ------------------------------------------------------------------------
def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"n": 0, "mean": None, "min": None, "max": None}
    return {"n": len(values), "mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def groups_of(runs: list[dict], key: str) -> list[dict]:
    """Runs that differ only in seed, with their ends for `key`: per seed and as mean and min–max."""
    groups: dict[tuple, dict] = {}
    for r in runs:
        end = end_point(r, key)
        if end is None or end["pflops"] is None:
            continue
        g = groups.setdefault(r["group"], {"model": r["model"], "schedule": r["schedule"], "ntp": r["ntp"],
                                           "epochs": r["epochs"], "family": r["family"], "seeds": {}, "runs": [],
                                           "protocols": []})
        seed = str(r["seed"])
        if seed in g["seeds"]:
            twin = g["runs"][list(g["seeds"]).index(seed)]
            raise ConfigError(f"runs {twin!r} and {r['run']!r} are the same run (the same flags and seed {seed}), both "
                              "with an end: pick one with --runs (or move the other to another --experiment)")
        g["seeds"][seed] = end
        g["runs"].append(r["run"])
        g["protocols"].append(r["protocols"].get(key))
    out = []
    for g in groups.values():
        for what in ("value", "pflops", "hours"):
            g[what] = spread([e[what] for e in g["seeds"].values()])
        out.append(g)
    return sorted(out, key=lambda g: (g["model"], not g["ntp"], float(g["pflops"]["mean"]), g["schedule"]))


def group_label(g: dict) -> str:
    return f"{g['model']} {'NTP' if g['ntp'] else 'NPP ' + g['schedule']} {g['epochs']} ep"


# --- the NTP frontier and where it reaches a value ----------------------------------------------------------------
def frontier_cost(points: list[tuple[float, float]], target: float) -> dict:
    """Where a frontier of annealed points (cost, value; lower value is better) first reaches `target`,
    interpolated in log-cost between the two points around it. {"cost": c} when it does; otherwise a bound:
    {"below": c} when its cheapest point is already better (the cost is below c), {"above": c} when even its
    costliest point does not reach it (the cost is above c)."""
    points = sorted(p for p in points if p[0] and p[0] > 0)
    if not points:
        return {}
    if points[0][1] <= target:
        return {"below": points[0][0]} if points[0][1] < target else {"cost": points[0][0]}
    for (c0, v0), (c1, v1) in zip(points, points[1:], strict=False):
        if v1 <= target:
            t = (v0 - target) / (v0 - v1)
            return {"cost": math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0)))}
    return {"above": points[-1][0]}


def ratio_against(npp_value: float, npp_cost: float | None, ntp_points: list[tuple[float, float]]) -> dict:
    """NPP's cost over the NTP frontier's cost at NPP's value, or the bound on it (none without NPP's cost)."""
    if not npp_cost:
        return {"ratio": None}
    at = frontier_cost([p for p in ntp_points if p[0]], npp_value)
    if "cost" in at:
        return {"ratio": npp_cost / at["cost"], "ntp_cost": at["cost"]}
    if "below" in at:  # NTP is better already at its cheapest budget: NPP costs more than npp/that
        return {"ratio": None, "ratio_above": npp_cost / at["below"]}
    if "above" in at:  # NTP never gets there: NPP costs less than npp/that
        return {"ratio": None, "ratio_below": npp_cost / at["above"]}
    return {"ratio": None}


def compare_group(npp: dict, ntp_groups: list[dict], what: str) -> dict:
    """NPP group against the NTP frontier, for the FLOPs and the hours: on the means, and seed by seed."""
    out = {}
    seeds = list(npp["seeds"])
    # the mean frontier over NPP's seeds only: a budget not run for all of them is left out of it (and named)
    full = [g for g in ntp_groups if all(s in g["seeds"] for s in seeds)]
    out["frontier_without"] = [group_label(g) for g in ntp_groups if g not in full]
    for cost in ("pflops", "hours"):
        frontier = [(_mean([g["seeds"][s][cost] for s in seeds]), _mean([g["seeds"][s]["value"] for s in seeds]))
                    for g in full]
        mean = ratio_against(npp["value"]["mean"], npp[cost]["mean"], frontier)
        per_seed = {}
        for seed, end in npp["seeds"].items():
            own = [(g["seeds"][seed][cost], g["seeds"][seed]["value"]) for g in ntp_groups if seed in g["seeds"]]
            per_seed[seed] = ratio_against(end["value"], end[cost], own).get("ratio")
        out[cost] = {**mean, "per_seed": per_seed, "seeds": spread(list(per_seed.values()))}
    return {"what": what, "npp": group_label(npp), **out}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def equal_epochs(npp: dict, ntp_groups: list[dict]) -> dict | None:
    """NPP's end minus NTP's at the same epochs: on the means, and paired seed by seed."""
    same = next((g for g in ntp_groups if g["epochs"] == npp["epochs"]), None)
    if same is None:
        return None
    paired = {s: npp["seeds"][s]["value"] - same["seeds"][s]["value"] for s in npp["seeds"] if s in same["seeds"]}
    return {"npp": group_label(npp), "ntp": group_label(same), "difference": npp["value"]["mean"] -
            same["value"]["mean"], "paired": paired, "paired_spread": spread(list(paired.values()))}


def comparisons(runs: list[dict], key: str) -> dict:
    """Groups, the equal-value cost ratios and the equal-epoch differences for one metric; pairs measured with
    different protocols are listed apart."""
    groups = groups_of(runs, key)
    result = {"metric": key, "groups": groups, "ratios": [], "equal_epochs": [], "not_compared": []}
    for npp in (g for g in groups if not g["ntp"]):
        ntp_groups = [g for g in groups if g["ntp"] and g["family"] == npp["family"]]
        differ = sorted({d for g in ntp_groups for a in npp["protocols"] for b in g["protocols"]
                         for d in protocol_differences(a, b)} |
                        {d for a in npp["protocols"] for b in npp["protocols"] for d in protocol_differences(a, b)})
        if differ and key != HELDOUT:
            result["not_compared"].append({"npp": group_label(npp), "differences": differ})
            continue
        if ntp_groups:
            result["ratios"].append(compare_group(npp, ntp_groups, key))
            eq = equal_epochs(npp, ntp_groups)
            if eq:
                result["equal_epochs"].append(eq)
    return result


# --- the command ----------------------------------------------------------------------------------------------
def default_metric(runs: list[dict]) -> str | None:
    """The FID with the most annealed ends (the final evaluation's over the curve's when as many)."""
    counts: dict[str, int] = {}
    for r in runs:
        for key in r["curves"]:
            if FID_KEY.match(key) and end_point(r, key) is not None:
                counts[key] = counts.get(key, 0) + 1
    return min(counts, key=lambda k: (-counts[k], k.startswith("curve/"), len(k))) if counts else None


def _fmt(s: dict, digits: str = ".4g") -> str:
    if not s.get("n"):
        return "-"
    if s["n"] == 1 or s["min"] == s["max"]:
        return f"{s['mean']:{digits}}"
    return f"{s['mean']:{digits}} ({s['min']:{digits}}–{s['max']:{digits}})"


def describe(result: dict) -> list[str]:
    key = result["metric"]
    lines = [f"\n{key}: annealed ends, mean (min–max over seeds)",
             f"  {'group':<44} {'seeds':>5} {'PFLOPs':>24} {'train hours':>26} {key:>24}"]
    for g in result["groups"]:
        lines.append(f"  {group_label(g):<44} {g['value']['n']:>5} {_fmt(g['pflops']):>24} {_fmt(g['hours']):>26} "
                     f"{_fmt(g['value']):>24}")
    for r in result["ratios"]:
        if r.get("frontier_without"):
            lines.append(f"  {r['npp']}: frontier without {', '.join(r['frontier_without'])} (not run for every "
                         "seed of this NPP group)")
        for cost, unit in (("pflops", "FLOPs"), ("hours", "hours")):
            c = r[cost]
            if c.get("ratio") is not None:
                seeds = c["seeds"]
                per = (f"; seed by seed {_fmt(seeds, '.3f')} (n={seeds['n']})" if seeds["n"] > 1 else "")
                lines.append(f"  {r['npp']}: at its {key}, NPP/NTP {unit} = {c['ratio']:.3f}{per}")
            elif c.get("ratio_above") is not None:
                lines.append(f"  {r['npp']}: no {unit} ratio: NTP's cheapest annealed run is already better than NPP's "
                             f"{key} (NPP/NTP {unit} > {c['ratio_above']:.3f})")
            elif c.get("ratio_below") is not None:
                lines.append(f"  {r['npp']}: no {unit} ratio: no annealed NTP run reaches NPP's {key} (NPP/NTP {unit} "
                             f"< {c['ratio_below']:.3f}); branch or train NTP longer to bracket it")
    for e in result["equal_epochs"]:
        paired = e["paired_spread"]
        lines.append(f"  equal epochs: {e['npp']} minus {e['ntp']}: {key} {e['difference']:+.4g}"
                     + (f" (paired by seed {_fmt(paired, '+.4g')}, n={paired['n']})" if paired["n"] > 1 else ""))
    for n in result["not_compared"]:
        lines.append(f"  not compared: {n['npp']}: measured unlike its NTP runs ({'; '.join(n['differences'])})")
    return lines


def plot(runs: list[dict], results: list[dict], paths: list[Path]) -> None:
    """One panel per metric (FID, held-out loss) against training PFLOPs (log): annealed ends with their seed range,
    the NTP frontier (line through the group means, band over seeds), mid-run curves thin and dashed."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a login node or in CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, len(results), figsize=(7.2 * len(results), 4.8), dpi=150, squeeze=False)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    colours = {}  # one colour per NPP schedule, the same in every panel
    for ax, result in zip(axes[0], results, strict=True):
        key = result["metric"]
        for r in runs:  # during training: thin and dotted, NTP grey, NPP its schedule's colour
            pts = [(p["pflops"], p["value"]) for p in r["curves"].get(key, []) if p["pflops"]]
            if len(pts) > 1:
                colour = "grey" if r["ntp"] else colours.setdefault(r["schedule"], f"C{len(colours)}")
                ax.plot(*zip(*pts, strict=True), linestyle=":", linewidth=0.7, alpha=0.5, color=colour)
        ntp = [g for g in result["groups"] if g["ntp"]]
        if ntp:
            xs = [g["pflops"]["mean"] for g in ntp]
            ax.plot(xs, [g["value"]["mean"] for g in ntp], "s-", color="black", markersize=4,
                    label="NTP annealed ends (frontier)")
            ax.fill_between(xs, [g["value"]["min"] for g in ntp], [g["value"]["max"] for g in ntp], color="grey",
                            alpha=0.25, linewidth=0)
        for g in (g for g in result["groups"] if not g["ntp"]):
            v, c = g["value"], g["pflops"]
            def bar(s):  # a mean of equal values can round below their minimum: never a negative bar
                return [[max(0.0, s["mean"] - s["min"])], [max(0.0, s["max"] - s["mean"])]]

            ax.errorbar([c["mean"]], [v["mean"]], yerr=bar(v), xerr=bar(c), fmt="o", markersize=6, capsize=3,
                        color=colours.setdefault(g["schedule"], f"C{len(colours)}"),
                        label=f"NPP {g['schedule']} {g['epochs']} ep (end)")
        ax.plot([], [], linestyle=":", color="grey", label="during training (constant LR: not a budget's result)")
        ends = [x for g in result["groups"] for x in (g["value"]["min"], g["value"]["max"])]
        costs = [x for g in result["groups"] for x in (g["pflops"]["min"], g["pflops"]["max"]) if x]
        if ends and costs:  # the ends fill the panel; early mid-run points (an untrained model's) run off it
            low, high = min(ends), max(ends)
            ax.set_ylim(low - 0.15 * (high - low), high + 0.6 * (high - low))
            ax.set_xlim(min(costs) / 1.15, max(costs) * 1.15)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        if key != HELDOUT:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("training compute (PFLOPs, log scale)")
        ax.set_ylabel(f"{key.replace('curve/', '')} (lower is better)")
        ax.set_title(f"{key}: NPP vs annealed next-token training; bars/band: min–max over seeds", fontsize=9)
        ax.grid(True, which="both", linewidth=0.4, alpha=0.6)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    for path in paths:
        fig.savefig(path)
    plt.close(fig)


def compare(experiment: str, out: str, metric: str | None = None, runs: list[str] | None = None) -> dict:
    """The comparison (see the module's docstring); returns {"runs", "results"} and writes the files."""
    found = collect(experiment, runs)
    metric = canonical(metric) if metric else default_metric(found)
    if metric is None:
        print(f"no annealed end evaluated in experiment {experiment!r}: run `npp eval` on the runs' final models "
              "(or train with --eval-every) first")
        return {"runs": found, "results": []}
    keys = [metric] + [HELDOUT] * (metric != HELDOUT and any(end_point(r, HELDOUT) for r in found))
    results = [comparisons(found, k) for k in keys]
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = rows_of(found)
    if rows:
        with open(out_dir / "compare.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    (out_dir / "comparison.json").write_text(json.dumps(
        {"experiment": experiment, "results": [{**r, "groups": [{k: v for k, v in g.items() if k != "family"}
                                                                for g in r["groups"]]} for r in results]},
        indent=2, default=str))
    figures = [out_dir / "compare.png", out_dir / "compare.pdf"]
    plot(found, results, figures)
    lines = [line for result in results for line in describe(result)]
    print("\n".join(lines))
    (out_dir / "comparison.txt").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out_dir / 'compare.csv'}, {out_dir / 'comparison.json'}, {figures[0]} and {figures[1]}")
    run_id = log_comparison(experiment, found, results, out_dir)
    print(f"in MLflow: run {run_id} of experiment {experiment!r} (its artifacts: the figure, the table, the ratios)")
    return {"runs": found, "results": results, "mlflow_run_id": run_id}


def log_comparison(experiment: str, runs: list[dict], results: list[dict], out_dir: Path) -> str:
    """The comparison as a run of the experiment, so the MLflow UI shows what the command printed: its artifacts
    (figure, table, CSV, JSON), the NPP/NTP ratios as metrics, tagged with the runs it compares
    (`npp.kind=comparison`, `npp.compares`). A rerun over the same runs updates the same comparison run."""
    import hashlib

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment).experiment_id
    ids = sorted(r["run_id"] for r in runs)
    key = hashlib.sha256(",".join(ids).encode()).hexdigest()[:16]
    found = client.search_runs([exp], filter_string=f"tags.`npp.comparison` = '{key}'", max_results=1)
    run_id = found[0].info.run_id if found else client.create_run(
        exp, run_name=f"comparison of {len(ids)} runs ({results[0]['metric']})",
        tags={"npp.kind": "comparison", "npp.comparison": key, "npp.compares": ",".join(ids)[:5000],
              "mlflow.note.content": "\n".join(describe(results[0]))[:5000]}).info.run_id
    metrics = {}
    for result in results:
        name = result["metric"].replace("/", "_")
        for r in result["ratios"]:
            label = r["npp"].split(" NPP ", 1)[-1].replace(":", "x").replace(",", "_").replace(" ", "_")
            for cost in ("pflops", "hours"):
                if r[cost].get("ratio") is not None:
                    metrics[f"ratio_{cost}_at_{name}/{label}"] = r[cost]["ratio"]
        for e in result["equal_epochs"]:
            label = e["npp"].split(" NPP ", 1)[-1].replace(":", "x").replace(",", "_").replace(" ", "_")
            metrics[f"equal_epochs_{name}_difference/{label}"] = e["difference"]
    for k, v in metrics.items():
        client.log_metric(run_id, k, float(v))
    for path in ("compare.png", "compare.pdf", "compare.csv", "comparison.json", "comparison.txt"):
        if (out_dir / path).exists():
            client.log_artifact(run_id, str(out_dir / path))
    client.set_terminated(run_id)
    return run_id
