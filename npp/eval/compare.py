"""`npp compare`: runs side by side by quality against training cost (NPP vs NTP of the same model).

For every training run of an experiment (or the runs named with --runs): each evaluated step's FID and
IS, the cumulative training FLOPs at that step (the trainer's `train_flops` metric) and the hours of
training to that step, summed from the trainer's own step time (`step_s` per log window: a requeued job's
time in the queue is not training). Prints a table, writes it as CSV, and draws FID (log scale) against
training PFLOPs with matplotlib (PNG and PDF): one line with markers per run, labelled by model, schedule
and run, and for each model that has both an NTP run (schedule 1:1) and an NPP run, the equal-FID point
and the cost ratio annotated: the paper's claim in one figure.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from npp.errors import ConfigError
from npp.pipeline.mlflow_utils import tracking_uri

FID_KEY = re.compile(r"^(curve/)?fid(_[a-z]+)?(_cfg[0-9.]+)?$")


def _at_step(history, step: int):
    """The last record at or before `step`."""
    best = None
    for m in history:
        if m.step <= step and (best is None or m.step >= best.step):
            best = m
    return best


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


def collect(experiment: str, runs: list[str] | None = None) -> list[dict]:
    """Rows of every evaluated step of the experiment's training runs (or of the runs named: names or ids)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment {experiment!r} at {mlflow.get_tracking_uri()}: train a run first")
    rows, seen = [], set()
    for run in client.search_runs([exp.experiment_id]):
        if "mlflow.parentRunId" in run.data.tags:
            continue
        name = run.info.run_name
        if runs and name not in runs and run.info.run_id not in runs:
            continue
        seen.update({name, run.info.run_id})
        fid_keys = [k for k in run.data.metrics if FID_KEY.match(k)]
        if not fid_keys:
            continue
        flops = client.get_metric_history(run.info.run_id, "train_flops")
        hours = training_hours(client.get_metric_history(run.info.run_id, "step_s"))
        schedule = run.data.params.get("schedule", "?")
        model = run.data.params.get("train.model", "?")
        for key in fid_keys:
            prefix, base = ("curve/", key[len("curve/"):]) if key.startswith("curve/") else ("", key)
            is_key = prefix + "is" + base[3:]
            is_hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, is_key)}
            latest = {}  # an evaluation repeated at a step: its last value counts
            for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp):
                latest[m.step] = m
            for m in latest.values():
                f = _at_step(flops, m.step)
                logged = [h for s, h in hours.items() if s <= m.step]
                rows.append({
                    "run": name, "model": model, "schedule": schedule, "metric": key, "step": m.step, "fid": m.value,
                    "is": is_hist.get(m.step), "train_pflops": (f.value / 1e15) if f else None,
                    "train_hours": logged[-1] if logged else None,
                })
    missing = [r for r in runs or [] if r not in seen]
    if missing:
        raise ConfigError(f"--runs {','.join(missing)}: no such training run in experiment {experiment!r}")
    return sorted(rows, key=lambda r: (r["metric"], r["model"], r["run"], r["step"]))


def crossing_flops(points: list[tuple[float, float]], target: float) -> float | None:
    """The training FLOPs at which a FID curve first reaches `target` (linear between eval points), or None."""
    points = sorted(points)
    for i, (x, y) in enumerate(points):
        if y <= target:
            if i == 0:
                return x
            xp, yp = points[i - 1]
            return xp + (yp - target) / (yp - y) * (x - xp)
    return None


def is_ntp(schedule: str) -> bool:
    return schedule in ("1:1", "1:1.0")


def cost_at_equal_fid(rows: list[dict], metric: str) -> dict | None:
    """NPP's training FLOPs over NTP's to reach the same FID: the ratio the paper claims (~0.6).

    The FID level compared is the worse of the two runs' final FIDs, the best both
    curves reach: when NPP ends better this is NTP's final FID (the paper's reading:
    what NPP spends to match NTP), when NPP ends worse it is NPP's final FID (what NTP
    spends to match NPP). Linear between eval points. NTP is the run whose schedule is
    "1:1", NPP any other; with several of either the last-named (sorted) of each is
    used. None when either is missing. `rows` are one model's (see `pairs`).
    """
    curves: dict[str, dict] = {}
    for r in rows:
        if r["metric"] == metric and r["train_pflops"] is not None:
            kind = "ntp" if is_ntp(r["schedule"]) else "npp"
            curves.setdefault(kind, {}).setdefault(r["run"], []).append((r["train_pflops"], r["fid"]))
    if "ntp" not in curves or "npp" not in curves:
        return None
    ntp_run, npp_run = sorted(curves["ntp"])[-1], sorted(curves["npp"])[-1]
    ntp, npp = sorted(curves["ntp"][ntp_run]), sorted(curves["npp"][npp_run])
    level = max(ntp[-1][1], npp[-1][1])
    npp_flops, ntp_flops = crossing_flops(npp, level), crossing_flops(ntp, level)
    return {"ntp_run": ntp_run, "npp_run": npp_run, "metric": metric, "fid_level": level,
            "ntp_final_fid": ntp[-1][1], "npp_final_fid": npp[-1][1],
            "level_from": "ntp" if ntp[-1][1] >= npp[-1][1] else "npp",
            "npp_pflops": npp_flops, "ntp_pflops": ntp_flops, "ratio": npp_flops / ntp_flops}


def pairs(rows: list[dict], metric: str) -> dict[str, dict]:
    """The equal-FID cost ratio per model size: NPP against NTP of the same model (models without both: none)."""
    out = {}
    for model in sorted({r["model"] for r in rows}):
        ratio = cost_at_equal_fid([r for r in rows if r["model"] == model], metric)
        if ratio is not None:
            out[model] = {"model": model, **ratio}
    return out


def plot(rows: list[dict], paths: list[Path], metric: str, ratios: dict[str, dict]) -> None:
    """FID (log) against training PFLOPs, one line with markers per run; equal-FID points and cost ratios marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a login node or in CI
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["metric"] == metric and r["train_pflops"] is not None]
    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=150)
    runs = sorted({(p["model"], p["run"]) for p in pts})
    colours = {}
    for model, run in runs:
        line = sorted((p["train_pflops"], p["fid"]) for p in pts if p["run"] == run)
        sched = next(p["schedule"] for p in pts if p["run"] == run)
        kind = "NTP" if is_ntp(sched) else "NPP"
        (handle,) = ax.plot(*zip(*line, strict=True), marker="o" if kind == "NPP" else "s", markersize=4,
                            linestyle="-" if kind == "NPP" else "--", label=f"{model} {kind} [{sched}] ({run})")
        colours[run] = handle.get_color()
    for model, r in ratios.items():
        if r["npp_pflops"] is None or r["ntp_pflops"] is None:
            continue
        ax.axhline(r["fid_level"], color="grey", linewidth=0.6, linestyle=":")
        for flops, run in ((r["npp_pflops"], r["npp_run"]), (r["ntp_pflops"], r["ntp_run"])):
            ax.plot([flops], [r["fid_level"]], marker="*", markersize=11, color=colours.get(run, "black"),
                    markeredgecolor="black", zorder=5)
        ax.annotate(f"{model}: equal FID {r['fid_level']:.3g}\nNPP/NTP cost = {r['ratio']:.2f}",
                    xy=(r["npp_pflops"], r["fid_level"]), xytext=(8, 12), textcoords="offset points", fontsize=8,
                    bbox={"boxstyle": "round", "fc": "white", "ec": "grey"})
    if not pts:
        ax.text(0.5, 0.5, "no evaluated steps with training FLOPs", ha="center", transform=ax.transAxes)
    else:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 10, 20, 40: not 10^1, 2x10^1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    name = metric.upper().replace("CURVE/", "")
    ax.set_xlabel("training compute (PFLOPs)")
    ax.set_ylabel(f"{name} (log scale, lower is better)")
    ax.set_title(f"{name} against training compute: Next Patch Prediction vs next-token training", fontsize=10)
    ax.grid(True, which="both", linewidth=0.4, alpha=0.6)
    if runs:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    for path in paths:
        fig.savefig(path)
    plt.close(fig)


def compare(experiment: str = "npp", out: str = "compare", metric: str | None = None,
            runs: list[str] | None = None) -> list[dict]:
    rows = collect(experiment, runs)
    if not rows:
        print(f"no evaluated runs in experiment {experiment!r}: run `npp eval` on their checkpoints first")
        return rows
    if not metric:  # FID during training (a curve of like points) when there is one, else the plain key
        counts = {m: sum(r["metric"] == m for r in rows) for m in {r["metric"] for r in rows}}
        metric = sorted(counts, key=lambda m: (not m.startswith("curve/"), -counts[m], len(m)))[0]
    print(f"{'run':<24} {'model':<9} {'schedule':<20} {'metric':<16} {'step':>7} {'PFLOPs':>10} {'train h':>8} "
          f"{'FID':>8} {'IS':>8}")
    for r in rows:
        print(f"{r['run'][:24]:<24} {r['model'][:9]:<9} {r['schedule'][:20]:<20} {r['metric']:<16} {r['step']:>7} "
              f"{(r['train_pflops'] or 0):>10.4g} {(r['train_hours'] or 0):>8.3f} {r['fid']:>8.3f} "
              f"{(r['is'] if r['is'] is not None else float('nan')):>8.3f}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "compare.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ratios = pairs(rows, metric)
    figures = [out_dir / "compare.png", out_dir / "compare.pdf"]
    plot(rows, figures, metric, ratios)
    print(f"wrote {out_dir / 'compare.csv'}, {figures[0]} and {figures[1]} ({metric} against training FLOPs)")
    for model, ratio in ratios.items():
        whose = "NTP's final" if ratio["level_from"] == "ntp" else "NPP's final"
        print(f"{model}: equal {metric} {ratio['fid_level']:.3f} ({whose}): NPP ({ratio['npp_run']}) at "
              f"{ratio['npp_pflops']:.4g} PFLOPs, NTP ({ratio['ntp_run']}) at {ratio['ntp_pflops']:.4g} PFLOPs: "
              f"measured cost ratio {ratio['ratio']:.3f} (the paper: about 0.6 on ImageNet)")
    if ratios:
        (out_dir / "cost_ratio.json").write_text(json.dumps(ratios, indent=2))
    return rows
