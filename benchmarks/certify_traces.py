"""Wall time and number of torch.fx traces of one ``certify`` call (9 keep-fraction levels).

Before the pruning package built one ``DependencyGraph`` per architecture, every candidate level
traced the network about six times. This measures one certify call on LeNet-5-Caffe and ResNet-20
(untrained, random gate logits, 64 calibration images, one CPU thread) and writes
``benchmarks/results/certify_traces.json``. Run it on an older checkout to get the "before" row:
``python benchmarks/certify_traces.py --label before`` there (it counts ``torch.fx.symbolic_trace``,
which every trace of both versions reaches).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.fx

sys.path.insert(0, str(Path(__file__).parent))
from results_io import RESULTS_DIR, write_json

import bayesprune as bp

try:
    from bayesprune.models import lenet5_caffe, resnet20
except ImportError:  # an older checkout, from before models moved into the package
    from models import lenet5_caffe, resnet20


def measure() -> dict[str, dict[str, float]]:
    count = [0]
    real = torch.fx.Tracer.trace

    def counting(self, *args, **kwargs):
        count[0] += 1
        return real(self, *args, **kwargs)

    torch.fx.Tracer.trace = counting
    out = {}
    for name, build in (("lenet5_caffe", lenet5_caffe), ("resnet20", resnet20)):
        torch.manual_seed(0)
        bnet = bp.bayesianize(build())
        bnet.num_data = 1000
        with torch.no_grad():
            for layer in bnet.bayesian_layers.values():
                layer.gate_logit.normal_()
        x = torch.randn(64, 1, 28, 28)
        y = bnet.mean_module().eval()(x).argmax(-1)
        cal = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
        count[0] = 0
        t0 = time.perf_counter()
        bp.conformal.certify(
            bnet, cal, by="keep", levels=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
            example_input=x[:1], progress=False, alpha=0.5, seed=0,
        )  # fmt: skip
        out[name] = {"seconds": round(time.perf_counter() - t0, 2), "traces": count[0]}
    torch.fx.Tracer.trace = real
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="after", help="row label (e.g. before / after)")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    path = RESULTS_DIR / "certify_traces.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for r in rows if r["label"] != args.label]
    rows.append({"label": args.label, "torch": torch.__version__, **measure()})
    write_json(path, {"command": "python benchmarks/certify_traces.py --label LABEL", "rows": rows})
    print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
