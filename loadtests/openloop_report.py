"""The open-loop run's goals, table and plots (loadtests.openloop's report.md and PNGs)."""

from __future__ import annotations

from pathlib import Path


def goals(report: dict) -> dict:
    c = report["configs"]
    step, whole, single = c["step-level"], c["whole-request"], c["one-at-a-time"]
    slo = 5 * step["lone"]["end_to_end_s"]  # "equal p99": the best throughput each holds under one bound

    def best_under(cfg: dict) -> float:
        return max((r["throughput_jobs_s"] for r in cfg["open"] if (r["all"]["p99_s"] or 1e9) <= slo), default=0.0)

    at70 = min(step["open"], key=lambda r: abs(r["offered_jobs_s"] / report["saturation_jobs_s"] - 0.7))
    tails = {cls: (v["p99_s"] / v["p50_s"]) if v.get("p50_s") else None for cls, v in at70.items()
             if isinstance(v, dict) and "p99_s" in v and cls != "all"}
    ratio = lambda a, b: round(a / b, 2) if b else None  # noqa: E731
    return {
        "p99_bound_s": round(slo, 3),
        "step_vs_whole_at_equal_p99": {"step": best_under(step), "whole": best_under(whole),
                                       "ratio": ratio(best_under(step), best_under(whole)), "goal": 1.5},
        "step_vs_one_at_a_time_16_clients": {
            "step": step["closed_16"]["throughput_jobs_s"], "one_at_a_time": single["closed_16"]["throughput_jobs_s"],
            "ratio": ratio(step["closed_16"]["throughput_jobs_s"], single["closed_16"]["throughput_jobs_s"]),
            "goal": 4.0},
        "p99_over_p50_per_class_at_70pct": {"offered_jobs_s": at70["offered_jobs_s"],
                                            **{k: (round(v, 2) if v else None) for k, v in tails.items()},
                                            "goal": 2.0},
        "overhead_fraction_lone_request": {"value": step["lone"]["overhead_fraction"], "goal": 0.10},
    }


def markdown(report: dict) -> str:
    device = report.get("device", "cpu")
    where = "" if device == "cpu" else f"Device: {device} (the worker's denoiser, VAE and text encoder). "
    lines = [f"# Open-loop load test, {report['date']}", "",
             f"{where}CPU: {report['cpu']['model']}, {report['cores']} cores (load generator, API, worker and Redis "
             f"share them). Mix: {report['mix']}. Saturation (step-level, 16 closed-loop clients): "
             f"{report['saturation_jobs_s']} jobs/s. {report['duration_s']} s per rate.", "",
             "| server | offered jobs/s | done jobs/s | p50 s | p95 s | p99 s | queue p50 s | queue p99 s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, cfg in report["configs"].items():
        for r in cfg["open"]:
            a = r["all"]
            lines.append(f"| {name} | {r['offered_jobs_s']} | {r['throughput_jobs_s']} | {a['p50_s']} | {a['p95_s']} "
                         f"| {a['p99_s']} | {a['queue_p50_s']} | {a['queue_p99_s']} |")
    lines += ["", "| server | lone e2e s | lone inference s | overhead | 16 clients jobs/s | 16 clients p99 s |",
              "|---|---|---|---|---|---|"]
    for name, cfg in report["configs"].items():
        lo, cl = cfg["lone"], cfg["closed_16"]
        lines.append(f"| {name} | {lo['end_to_end_s']} | {lo['inference_s']} | {lo['overhead_fraction']:.1%} "
                     f"| {cl['throughput_jobs_s']} | {cl['all']['p99_s']} |")
    g = report["goals"]
    lines += ["", "## Goals", "",
              f"- step-level vs whole-request throughput at equal p99 (<= {g['p99_bound_s']} s): "
              f"{g['step_vs_whole_at_equal_p99']['ratio']}x (goal 1.5x)",
              f"- step-level vs one-at-a-time, 16 clients: {g['step_vs_one_at_a_time_16_clients']['ratio']}x (goal 4x"
              + ("; on this CPU the two cores also run the load generator and the API)" if device == "cpu" else ")"),
              f"- p99 / p50 per class at ~70% of saturation: {g['p99_over_p50_per_class_at_70pct']} (goal <= 2)",
              f"- service overhead of a lone request: {g['overhead_fraction_lone_request']['value']:.1%} (goal <= 10%)",
              "", "![p99 latency](latency.png) ![throughput](throughput.png)", ""]
    return "\n".join(lines)


def plots(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for what, key, ylabel in (("latency", lambda r: r["all"]["p99_s"], "p99 latency (s)"),
                              ("throughput", lambda r: r["throughput_jobs_s"], "completed jobs/s")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, cfg in report["configs"].items():
            ax.plot([r["offered_jobs_s"] for r in cfg["open"]], [key(r) for r in cfg["open"]], marker="o", label=name)
        ax.set_xlabel("offered load (jobs/s, Poisson)")
        ax.set_ylabel(ylabel)
        if what == "latency":
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{what}.png", dpi=100)
        plt.close(fig)


if __name__ == "__main__":  # redraw report.md and the plots from a run's report.json
    import json
    import sys

    out = Path(sys.argv[1])
    report = json.loads((out / "report.json").read_text())
    report["goals"] = goals(report)
    (out / "report.md").write_text(markdown(report))
    plots(report, out)
