"""`npp compare`: runs side by side by quality against training cost (NPP vs NTP).

For every training run of an experiment: each evaluated step's FID and IS, the
cumulative training FLOPs at that step (the trainer's `train_flops` metric) and
the wall hours from the run's start to that step. Prints a table, writes it as
CSV, and draws FID against training FLOPs, one line per run, as a PNG.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from PIL import Image, ImageDraw

from npp.errors import ConfigError
from npp.pipeline.mlflow_utils import tracking_uri

FID_KEY = re.compile(r"^(curve/)?fid(_[a-z]+)?(_cfg[0-9.]+)?$")
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _at_step(history, step: int):
    """The last record at or before `step`."""
    best = None
    for m in history:
        if m.step <= step and (best is None or m.step >= best.step):
            best = m
    return best


def collect(experiment: str) -> list[dict]:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"no MLflow experiment {experiment!r} at {mlflow.get_tracking_uri()}: train a run first")
    rows = []
    for run in client.search_runs([exp.experiment_id]):
        if "mlflow.parentRunId" in run.data.tags:
            continue
        fid_keys = [k for k in run.data.metrics if FID_KEY.match(k)]
        if not fid_keys:
            continue
        flops = client.get_metric_history(run.info.run_id, "train_flops")
        name = run.info.run_name
        schedule = run.data.params.get("schedule", "?")
        for key in fid_keys:
            prefix, base = ("curve/", key[len("curve/"):]) if key.startswith("curve/") else ("", key)
            is_key = prefix + "is" + base[3:]
            is_hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, is_key)}
            latest = {}  # an evaluation repeated at a step: its last value counts
            for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp):
                latest[m.step] = m
            for m in latest.values():
                f = _at_step(flops, m.step)
                rows.append({
                    "run": name, "schedule": schedule, "metric": key, "step": m.step, "fid": m.value,
                    "is": is_hist.get(m.step), "train_pflops": (f.value / 1e15) if f else None,
                    "wall_hours": ((f.timestamp - run.info.start_time) / 3.6e6) if f else None,
                })
    return sorted(rows, key=lambda r: (r["metric"], r["run"], r["step"]))


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


def cost_at_equal_fid(rows: list[dict], metric: str) -> dict | None:
    """NPP's training FLOPs over NTP's to reach the same FID: the ratio the paper claims (~0.6).

    The FID level compared is the worse of the two runs' final FIDs, the best both
    curves reach: when NPP ends better this is NTP's final FID (the paper's reading:
    what NPP spends to match NTP), when NPP ends worse it is NPP's final FID (what NTP
    spends to match NPP). Linear between eval points. NTP is the run whose schedule is
    "1:1", NPP any other; with several of either the last-named (sorted) of each is
    used. None when either is missing.
    """
    curves: dict[str, dict] = {}
    for r in rows:
        if r["metric"] == metric and r["train_pflops"] is not None:
            kind = "ntp" if r["schedule"] in ("1:1", "1:1.0") else "npp"
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


def plot(rows: list[dict], path: Path, metric: str) -> None:
    """FID against training PFLOPs, one line per run (plain PIL: no plotting dependency)."""
    pts = [r for r in rows if r["metric"] == metric and r["train_pflops"] is not None]
    W, H, L, B, T, R = 720, 460, 70, 50, 30, 190
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    if not pts:
        d.text((L, H // 2), "no evaluated steps with training FLOPs", fill="black")
        img.save(path)
        return
    xs, ys = [p["train_pflops"] for p in pts], [p["fid"] for p in pts]
    x0, x1 = 0.0, max(xs) * 1.05 or 1.0
    y0, y1 = 0.0, max(ys) * 1.1 or 1.0

    def px(x, y):
        return L + (x - x0) / (x1 - x0) * (W - L - R), H - B - (y - y0) / (y1 - y0) * (H - B - T)

    d.line([px(x0, y0), px(x1, y0)], fill="black")
    d.line([px(x0, y0), px(x0, y1)], fill="black")
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        d.text((px(xv, y0)[0] - 10, H - B + 6), f"{xv:.3g}", fill="black")
        d.text((8, px(x0, yv)[1] - 6), f"{yv:.3g}", fill="black")
    d.text((W // 2 - 80, H - 22), "training cost (PFLOPs)", fill="black")
    d.text((8, 8), metric.upper() + " (lower is better)", fill="black")
    runs = sorted({p["run"] for p in pts})
    for i, run in enumerate(runs):
        colour = COLOURS[i % len(COLOURS)]
        line = sorted((p["train_pflops"], p["fid"]) for p in pts if p["run"] == run)
        xy = [px(x, y) for x, y in line]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        for x, y in xy:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        sched = next(p["schedule"] for p in pts if p["run"] == run)
        d.text((W - R + 10, T + 18 * i), f"{run} [{sched}]", fill=colour)
    img.save(path)


def compare(experiment: str = "npp", out: str = "compare", metric: str | None = None) -> list[dict]:
    rows = collect(experiment)
    if not rows:
        print(f"no evaluated runs in experiment {experiment!r}: run `npp eval` on their checkpoints first")
        return rows
    if not metric:  # FID during training (a curve of like points) when there is one, else the plain key
        counts = {m: sum(r["metric"] == m for r in rows) for m in {r["metric"] for r in rows}}
        metric = sorted(counts, key=lambda m: (not m.startswith("curve/"), -counts[m], len(m)))[0]
    header = (
        f"{'run':<28} {'schedule':<22} {'metric':<16} {'step':>7} {'PFLOPs':>10} {'wall h':>8} {'FID':>8} {'IS':>8}"
    )
    print(header)
    for r in rows:
        print(f"{r['run'][:28]:<28} {r['schedule'][:22]:<22} {r['metric']:<16} {r['step']:>7} "
              f"{(r['train_pflops'] or 0):>10.4g} {(r['wall_hours'] or 0):>8.3f} {r['fid']:>8.3f} "
              f"{(r['is'] if r['is'] is not None else float('nan')):>8.3f}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "compare.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, out_dir / "compare.png", metric)
    print(f"wrote {out_dir / 'compare.csv'} and {out_dir / 'compare.png'} ({metric} against training FLOPs)")
    ratio = cost_at_equal_fid(rows, metric)
    if ratio is not None:
        whose = "NTP's final" if ratio["level_from"] == "ntp" else "NPP's final"
        print(f"equal {metric} {ratio['fid_level']:.3f} ({whose}): NPP ({ratio['npp_run']}) at "
              f"{ratio['npp_pflops']:.4g} PFLOPs, NTP ({ratio['ntp_run']}) at {ratio['ntp_pflops']:.4g} PFLOPs: "
              f"measured cost ratio {ratio['ratio']:.3f} (the paper: about 0.6 on ImageNet)")
        import json

        (out_dir / "cost_ratio.json").write_text(json.dumps(ratio, indent=2))
    return rows
