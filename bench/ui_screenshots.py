"""Screenshots of the MLflow UI as a person sees npp's runs: the runs table, the chart view, a training run's
page and its model metrics, and the comparison run's page, for a person to look at (README's screenshot
comes from here).

It serves the UI for a tracking store (`mlflow server` on a free local port, as `make ui` does), finds the
experiment's training runs and comparison run through the REST API, and has headless Chromium render each
page (the UI is a JavaScript application: Chromium's virtual-time budget lets it fetch and draw before the
shot). Chromium comes from the system (`apt-get install chromium`); nothing else is installed.

    .venv/bin/python bench/ui_screenshots.py --store sqlite:///demo_out/mlflow.db --out docs/img
    make ui-screenshots STORE=sqlite:///demo_out/mlflow.db
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from npp.runtime.mlflow_utils import MODEL_TRAINING_VIEW, experiment_urls, start_server, stop_server
from npp.runtime.ranks import free_port

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def api(base: str, path: str, payload: dict | None = None, **params) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if data else "GET")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def shoot(browser: str, url: str, out: Path, size: str, budget_ms: int) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={budget_ms}",
                        f"--screenshot={out}", url], check=True, capture_output=True, timeout=180)
    print(f"  {out}  <- {url}", flush=True)


def pages(base: str, experiment: str) -> dict[str, str]:
    """name -> URL: the runs table, the chart view, the first training run's page and model metrics, the
    comparison run's page (when `npp compare` logged one)."""
    exp = api(base, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    urls = experiment_urls(base, exp["experiment_id"])
    runs = api(base, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 200})["runs"]
    tags = [(r, {t["key"]: t["value"] for t in r["data"].get("tags", [])}) for r in runs]
    training = [r for r, t in tags if "mlflow.parentRunId" not in t and t.get("npp.kind") != "comparison"
                and any(p["key"] == "model" for p in r["data"].get("params", []))]
    comparison = [r for r, t in tags if t.get("npp.kind") == "comparison"]
    shown = {"runs": urls["runs"], "charts": urls["charts"]}
    view = f"?{MODEL_TRAINING_VIEW}"
    if training:
        run = urls["run"] + sorted(training, key=lambda r: r["info"]["start_time"])[0]["info"]["run_id"]
        shown.update(run=run + view, model_metrics=run + "/model-metrics" + view)
    if comparison:
        shown["comparison"] = urls["run"] + comparison[0]["info"]["run_id"] + "/artifacts/compare.png" + view
    return shown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    ap.add_argument("--experiment", default="npp")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--size", default="1600,1000", help="window width,height in pixels")
    ap.add_argument("--budget-ms", type=int, default=60000, help="virtual time each page gets to load and draw")
    args = ap.parse_args()
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        raise SystemExit("no headless browser found (chromium, google-chrome): `apt-get install chromium`")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "mlflow-server.log", "wb") as log:
        try:
            server = start_server(args.store, port, output=log)
        except RuntimeError as e:
            raise SystemExit(f"{e}; its log: {log.name}") from None
        try:
            base = f"http://127.0.0.1:{port}"
            shown = pages(base, args.experiment)
            print(f"MLflow UI of {args.store}, experiment {args.experiment!r}: {len(shown)} pages", flush=True)
            for name, url in shown.items():
                shoot(browser, url, out / f"mlflow_{name}.png", args.size, args.budget_ms)
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
