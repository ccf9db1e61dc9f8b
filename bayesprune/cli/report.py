"""``bayesprune report``: what fit, prune and certify recorded in a run directory, as one Markdown
page with the plots; records of another fit are refused."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..files import write_text
from ._common import PREPROCESS_WORDS, CLIError, say
from .rundir import out_dir, read_run

__all__ = ["report_command"]


def _prior_size(spec: dict) -> str:
    """The prior's size setting, as the run recorded it (`` (prior inclusion 0.1)``)."""
    price = ""
    if spec.get("price_per_example") is not None:
        price = f", at least {spec['price_per_example']:g} x N nats per parameter"
    if spec.get("prior_log_odds") is not None:
        per = " per parameter" if spec.get("per_parameter") else " per node"
        return f" (prior log-odds {spec['prior_log_odds']:g}{per}{price})"
    if spec.get("prior_inclusion") is not None:
        return f" (prior inclusion {spec['prior_inclusion']:g}{price})"
    if spec.get("type") == "GroupHorseshoe":
        return f" (global scale {spec['global_scale']:g})"
    return ""


def report_command(args: argparse.Namespace) -> None:
    run_dir = args.run
    cfg = read_run(run_dir)
    out = out_dir(args)

    run_id = cfg.get("run_id")
    command = {"fit.json": "fit --out", "compression.json": "prune --run",
               "certificate.json": "certify --run", "conformal.json": "certify --run"}  # fmt: skip

    def load(name: str) -> dict[str, Any] | None:
        p = run_dir / name
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text())
        except ValueError as exc:
            raise CLIError(f"{p} is not valid JSON ({exc}); run `bayesprune "
                           f"{command[name]} {run_dir}` again") from exc  # fmt: skip
        if rec.get("run_id") != run_id:
            raise CLIError(
                f"{p} comes from another fit (run id {rec.get('run_id')}, this run is {run_id}); "
                f"run `bayesprune {command[name]} {run_dir}` again, or delete it"
            )
        return rec

    fit, comp, cert, conf = (
        load(n) for n in ("fit.json", "compression.json", "certificate.json", "conformal.json")
    )
    lines = [f"# bayesprune report: {cfg['model']} on {cfg['data']}", ""]
    pre = cfg.get("preprocess", "standardize")
    lines += [
        f"- model: `{cfg['model']}`" + (f" with weights `{cfg['weights']}`" if cfg.get("weights") else ""),
        f"- data: {cfg['data']}" + (f" (subset {cfg['subset']})" if cfg.get("subset") else "")
        + f"; inputs: {PREPROCESS_WORDS[pre]} (`--preprocess {pre}`)",
        f"- prior: {cfg['prior']}{_prior_size(cfg.get('prior_spec') or {})}, seed {cfg['seed']}"
        + (f", run id `{run_id}`" if run_id else ""),
        "",
    ]  # fmt: skip
    if fit:
        lines += ["## Posterior (SVI)", ""]
        beta = fit.get("kl_weight", 1.0)
        objective = "-ELBO" if beta == 1 else f"tempered -ELBO, KL weight {beta:g}"
        final = (fit.get("epoch_loss") or fit["loss"])[-1]  # the last epoch's mean, when recorded
        lines += [f"Loss ({objective} per step, mean of the last epoch) {final:.4g} after "
                  f"{fit['epochs']} epoch(s); "
                  f"validation accuracy: dense {fit['dense_val_accuracy']:.4f}, posterior "
                  f"predictive {fit.get('bayes_val_accuracy', float('nan')):.4f}.", ""]  # fmt: skip
        whole = fit.get("kept_whole", {})
        lines += ["| layer | nodes | PIP >= 0.5 | note |", "|---|---:|---:|---|"]
        lines += [
            f"| `{k}` | {fit['nodes'][k]} | {fit['nodes_pip_ge_0.5'][k]} | "
            f"{'kept whole: ' + whole[k] if k in whole else ''} |"
            for k in fit["nodes"]
        ]
        if fit.get("warnings"):  # bp.fit's checks of the PIPs (bayesprune.diagnostics)
            lines += ["", "The fit warned:", ""] + [f"- {w}" for w in fit["warnings"]]
        lines += [
            "",
            _img(out, run_dir, "elbo.png", "ELBO"),
            _img(out, run_dir, "pips.png", "PIPs"),
            "",
        ]
    if comp:
        r = comp["report"]
        level = (
            f"the nodes with PIP >= {comp['threshold']} kept"
            if "threshold" in comp
            else f"the {100 * comp['keep']:.0f}% of the nodes with the highest PIPs kept"
        )
        lines += ["## Pruning", "",
                  f"Pruned with {level}: architecture `{r['architecture_before']}` -> "
                  f"`{r['architecture_after']}`.", "",
                  "| | dense | pruned |", "|---|---:|---:|",
                  f"| parameters | {r['params_before']:,} | {r['params_after']:,} ({100 * r['params_kept']:.1f}%) |",
                  f"| FLOPs (MACs) | {r['flops_before']:,} | {r['flops_after']:,} ({r['flop_reduction']:.2f}x fewer) |",
                  f"| test accuracy | {comp['dense_test_accuracy']:.4f} | {comp['pruned_test_accuracy']:.4f} |"]  # fmt: skip
        for bs, lat in r.get("latency_s", {}).items():
            lines.append(f"| latency, batch {bs} ({r['device']}) | {1e3 * lat['dense']:.3f} ms | "
                         f"{1e3 * lat['pruned']:.3f} ms |")  # fmt: skip
            lo_hi = r.get("speedup_range", {}).get(bs)
            if lo_hi:
                lines.append(f"| speed-up, batch {bs} (median; single rounds) | | "
                             f"{r['speedup'][bs]:.2f}x ({lo_hi[0]:.2f}-{lo_hi[1]:.2f}x) |")  # fmt: skip
        lines += ["", _img(out, run_dir, "pruning_curve.png", "accuracy and size"), ""]
    if cert:
        lines += ["## Certificate (Learn then Test)", ""]
        passed = cert.get("index") is not None
        ref_words = (
            "the run's dense network (dense.safetensors)"
            if cert.get("reference_file")
            else cert.get("reference", "the reference model")
        )
        risk_words = {
            "accuracy_drop": f"accuracy drop relative to {ref_words} (the rate of points the "
            "certified network gets wrong while the dense one gets them right)",
            "disagreement": f"disagreement with {ref_words}",
        }.get(cert["risk"], f"{cert['risk']} (no reference)")
        lines += [
            f"Risk: {risk_words}; alpha = {cert['alpha']}, delta = {cert['delta']}, "
            f"n = {cert['n']} calibration examples.",
            "",
            (f"**Certified level: {cert.get('level_name', 'level')} {_num(cert['level'])}**, "
             f"{_pct(cert.get('params_kept'))} of the parameters kept "
             f"(empirical risk {cert['risk_hat']:.4f}, p-value {cert['p_value']:.3g})."
             if passed else f"**No level could be certified**: {ref_words} is kept."),
            "",
        ]  # fmt: skip
        if "test_accuracy" in cert:
            lines += ["| | reference (dense) | certified |", "|---|---:|---:|",
                      f"| test accuracy | {cert['reference_test_accuracy']:.4f} | "
                      f"{cert['test_accuracy']:.4f} |", ""]  # fmt: skip
        lines += [
            f"Read it as: with probability at least {1 - cert['delta']:g} over the draw of the "
            f"calibration set, the certified network's {risk_words} on new data from the same "
            f"distribution is at most {cert['alpha']}. It says nothing about data from another "
            "distribution.",
            "", _img(out, run_dir, "risk_curve.png", "risk curve"), "",
        ]  # fmt: skip
    if conf:
        lines += ["## Conformal prediction sets", "",
                  f"alpha = {conf['alpha']} (target coverage {1 - conf['alpha']:g}); test coverage "
                  f"{conf['test_coverage']:.3f}, mean set size {conf['mean_set_size']:.2f} "
                  f"({conf['calibration_examples']} calibration examples).", "",
                  _img(out, run_dir, "set_sizes.png", "set sizes"), ""]  # fmt: skip
    missing = [f"`bayesprune {c} --run {run_dir}`" for c, rec in (("prune", comp), ("certify", cert))
               if rec is None]  # fmt: skip
    if missing:
        lines += [f"Not in {run_dir} yet (run {' and '.join(missing)}; results written elsewhere "
                  "with --out are not read):", ""]  # fmt: skip
    write_text(out / "report.md", "\n".join(lines))
    say(f"wrote {out / 'report.md'}")


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _pct(v: float | None) -> str:
    return "?" if v is None else f"{100 * v:.1f}%"


def _img(out: Path, run_dir: Path, name: str, alt: str) -> str:
    src = run_dir / name
    if not src.is_file():
        return ""
    rel = Path(os.path.relpath(src.resolve(), out.resolve())).as_posix()
    return f"![{alt}]({rel})"
