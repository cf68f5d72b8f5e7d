"""Run-to-run variation of BioImage.io packages' outputs, which sets their test tolerances (core/bioimageio.py).

A package's forward is deterministic for its fixed seed; what varies between machines is the arithmetic: thread
counts (the order of sums), oneDNN versus PyTorch's own convolutions (another CPU, another build), the GPU. Each
bundled model's package forward (TorchScript; isotropic: the state-dict module at z factor 4) runs on its synthetic test image under each of these, and the largest
differences from the reference run are reported, absolute and relative (as numpy.testing.assert_allclose counts
them).

    python benchmarks/bioimageio_reproducibility.py [--json results/bioimageio_reproducibility.json]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager

import numpy as np
import torch

from napari_emdiffuse.core.bioimageio import isotropic_restorer, restorer, synthetic_input, synthetic_sections
from napari_emdiffuse.core.models import list_models, load_model


@contextmanager
def setting(name: str):
    threads = torch.get_num_threads()
    if name == "1 thread":
        torch.set_num_threads(1)
    try:
        if name == "no oneDNN":
            with torch.backends.mkldnn.flags(enabled=False):
                yield "cpu"
        else:
            yield "cuda" if name == "cuda" else "cpu"
    finally:
        torch.set_num_threads(threads)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    settings = ["default (again)", "1 thread", "no oneDNN"] + (["cuda"] if torch.cuda.is_available() else [])
    report = []
    for entry in list_models():
        if not entry.bundled:
            continue
        model = load_model(entry.path)
        scale = 2 if entry.task == "superres" else 1
        if entry.task == "isotropic":  # the state-dict package: the plugin's pipeline at z factor 4
            module = isotropic_restorer({k: v for k, v in model.meta.items() if k != "training"}, 4, 2, 0)
            module.net.load_state_dict(model.net.state_dict())
            raw = torch.from_numpy(synthetic_sections(4))[None, None]
        else:
            module = restorer(model, samples=2, seed=0, scale=scale)
            raw = torch.from_numpy(synthetic_input(scale))[None, None]
        started = time.perf_counter()
        reference = [t.numpy() for t in module(raw)]
        seconds = time.perf_counter() - started
        for name in settings:
            with setting(name) as device:
                outputs = [t.cpu().numpy() for t in module.to(device)(raw.to(device))]
                module.to("cpu")
            for output, ref, tensor in zip(outputs, reference, ("restored", "uncertainty")):
                diff = np.abs(output.astype(np.float64) - ref)
                row = {"model": entry.name, "setting": name, "output": tensor, "max_abs": float(diff.max()),
                       "max_rel": float((diff / (np.abs(ref) + 1e-6)).max()), "max_value": float(np.abs(ref).max()),
                       "seconds_per_run": round(seconds, 2)}
                report.append(row)
                print(json.dumps(row))
    for tensor in ("restored", "uncertainty"):
        rows = [r for r in report if r["output"] == tensor and r["model"] != "isotropic-fibsem"]
        iso = [r for r in report if r["output"] == tensor and r["model"] == "isotropic-fibsem"]
        print(f"isotropic {tensor}: largest absolute difference {max(r['max_abs'] for r in iso):.3g}, "
              f"relative {max(r['max_rel'] for r in iso):.3g}")
        print(f"{tensor}: largest absolute difference {max(r['max_abs'] for r in rows):.3g}, "
              f"relative {max(r['max_rel'] for r in rows):.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
