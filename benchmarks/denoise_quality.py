"""Denoising quality on held-out real EM: EMDiffuse-n against tuned classical denoisers.

    python benchmarks/denoise_quality.py ../shared/data/em            # default settings, all data sets
    python benchmarks/denoise_quality.py ../shared/data/em --sweep    # compare sampler settings (chooses defaults)

Data sets (none of it was used for training, see training/train_denoise.py):
- ``real``: bottom half of the real short-dwell/long-dwell SEM pair (768 x 384);
- ``mild`` / ``strong``: central 512 x 512 crops of FIB-SEM 5 nm slices 22-26 with simulated short-dwell SEM noise,
  at about the real pair's level and at a much stronger one.
Brightness: the output's mean and 31-px local-mean offsets against its input (grey levels) and, for the real pair,
the metrics against its long-dwell truth brought linearly to the short-dwell input's brightness (the pair's two
acquisitions differ by 3 grey levels, which the output no longer copies). Baselines (Gaussian, non-local means, BM3D) are tuned per data set on its first image by PSNR against the truth;
their results are cached in ``benchmarks/results/denoise_baselines.json``. Uncertainty is checked as the Spearman
correlation between per-16x16-patch mean std and mean absolute error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).parent))
from _common import BASELINES, metrics, patch_spearman, to_uint8, tune  # noqa: E402

BRIGHTNESS_WINDOW = 31  # pixels: the local means whose offset the brightness figure reports

from napari_emdiffuse.core.models import default_model, load_model  # noqa: E402
from napari_emdiffuse.core.simulate import SEMNoise  # noqa: E402
from napari_emdiffuse.core.tasks import Settings, denoise, drive  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LEVELS = {
    "mild": SEMNoise(electrons=200, read=0.01, correlation_x=0.6, correlation_y=0.6, blur=0.3),
    "strong": SEMNoise(electrons=30, read=0.03, correlation_x=0.8, correlation_y=0.4, blur=0.5),
}


def load_sets(data: Path, names: list[str], limit: int) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    sets = {}
    if "real" in names:
        noisy = tifffile.imread(data / "sem_pair22_noisy.tif")
        clean = tifffile.imread(data / "sem_pair22_clean.tif")
        half = noisy.shape[0] // 2
        sets["real"] = [(noisy[half:], clean[half:])]
    slices = tifffile.imread(data / "fibsem_5nm_slices_27x768x1024.tif")[22:22 + limit]
    for level in ("mild", "strong"):
        if level in names:
            rng = np.random.default_rng(7)
            pairs = []
            for s in slices:
                clean = s[128:640, 256:768]
                noisy = LEVELS[level](clean.astype(np.float32) / 255, rng) * 255
                pairs.append((to_uint8(noisy), clean))
            sets[level] = pairs
    return sets


def baselines(sets) -> dict:
    cache_path = RESULTS / "denoise_baselines.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    for name, pairs in sets.items():
        key = f"{name}:{len(pairs)}"
        if key in cache:
            continue
        entry = {}
        for method, (fn, _) in BASELINES.items():
            param = tune(method, *pairs[0])
            scores = [metrics(fn(noisy, param), clean) for noisy, clean in pairs]
            entry[method] = {"param": param, **{m: float(np.mean([s[m] for s in scores])) for m in scores[0]}}
            print(f"  {name:<7} {method:<9} {entry[method]}", flush=True)
        entry["noisy"] = {m: float(np.mean([metrics(n, c)[m] for n, c in pairs])) for m in ("psnr", "ssim", "fsim")}
        cache[key] = entry
        RESULTS.mkdir(exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=1))
    return {name: cache[f"{name}:{len(pairs)}"] for name, pairs in sets.items()}


def evaluate(sets, settings: Settings, model: str) -> dict:
    out = {}
    for name, pairs in sets.items():
        scores, spearman, kept, seconds = [], [], [], 0.0
        for noisy, clean in pairs:
            t = time.perf_counter()
            result = drive(denoise(noisy, model, settings))
            seconds += time.perf_counter() - t
            scores.append(metrics(result.image, clean))
            kept.append(brightness(result.image, noisy))
            if name == "real":
                kept[-1].update({f"{m}_vs_truth_in_input_brightness": v
                                 for m, v in metrics(result.image, in_input_brightness(clean, noisy)).items()})
            if result.uncertainty is not None:
                err = np.abs(result.image.astype(np.float64) - clean.astype(np.float64)) / 255
                spearman.append(patch_spearman(result.uncertainty, err))
        out[name] = {m: float(np.mean([s[m] for s in scores])) for m in scores[0]}
        out[name]["uncertainty_spearman"] = float(np.mean(spearman)) if spearman else None
        out[name]["seconds_per_image"] = seconds / len(pairs)
        out[name]["brightness"] = {k: float(np.mean([e[k] for e in kept])) for k in kept[0]}
    return out


def local_means(image: np.ndarray) -> np.ndarray:
    from scipy.ndimage import uniform_filter

    return uniform_filter(image.astype(np.float64), BRIGHTNESS_WINDOW)[16:-16, 16:-16]


def brightness(result: np.ndarray, noisy: np.ndarray) -> dict:
    """How the output's brightness departs from its input's, in grey levels: mean offset, mean absolute offset of
    31-px local means, and the straight line through the local means (output = gain * input + offset)."""
    out, inp = local_means(result), local_means(noisy)
    gain, offset = np.polyfit(inp.ravel(), out.ravel(), 1)
    return {"mean_offset": float(result.astype(np.float64).mean() - noisy.astype(np.float64).mean()),
            "local_mean_offset": float(np.abs(out - inp).mean()), "local_gain": float(gain),
            "local_intercept": float(offset)}


def in_input_brightness(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """The long-dwell truth mapped linearly onto the short-dwell input's intensities (least squares): the real pair's
    two acquisitions differ in brightness (the clean one is 3 grey levels darker), which no denoiser can know."""
    gain, offset = np.polyfit(clean.astype(np.float64).ravel(), noisy.astype(np.float64).ravel(), 1)
    return to_uint8(gain * clean.astype(np.float64) + offset)


def report(label: str, ours: dict, base: dict) -> None:
    print(f"\n== {label}")
    print(f"{'set':<7} {'method':<10} {'PSNR':>7} {'SSIM':>7} {'FSIM':>7} {'sharp':>6}  uncertainty rho")
    for name in ours:
        best = {m: max(base[name][b][m] for b in BASELINES) for m in ("psnr", "ssim", "fsim")}
        for method in ("noisy", *BASELINES):
            r = base[name][method]
            print(f"{name:<7} {method:<10} {r['psnr']:7.2f} {r['ssim']:7.4f} {r['fsim']:7.4f} "
                  f"{r.get('sharpness', float('nan')):6.2f}")
        r = ours[name]
        wins = all(r[m] > best[m] for m in best)
        print(f"{name:<7} {'EMDiffuse':<10} {r['psnr']:7.2f} {r['ssim']:7.4f} {r['fsim']:7.4f} {r['sharpness']:6.2f}"
              f"  {r['uncertainty_spearman']:.3f}   beats every baseline on all three: {wins}")
        print(f"{name:<7} brightness against the input: {r['brightness']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, nargs="?", default=Path("../shared/data/em"))
    parser.add_argument("--sets", default="real,mild,strong")
    parser.add_argument("--limit", type=int, default=5, help="FIB-SEM slices per simulated set")
    parser.add_argument("--model", default=None)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--sweep", action="store_true", help="compare sampler settings instead of the defaults")
    args = parser.parse_args()

    sets = load_sets(args.data, args.sets.split(","), args.limit)
    base = baselines(sets)
    model_name = args.model or default_model("denoise")
    model = load_model(model_name)
    print(f"model {model_name}: defaults {model.sampling}")
    if not args.sweep:
        ours = evaluate(sets, Settings(samples=args.samples), model_name)
        report(f"defaults, K = {args.samples}", ours, base)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "denoise_quality.json").write_text(json.dumps({"ours": ours, "baselines": base,
                                                                  "sampling": model.sampling}, indent=1))
        return
    defaults = dict(model.sampling)
    grid = [  # around the defaults: where the last step jumps to the estimate, and how much noise each step adds
        {"steps": 3, "sigma_end": 0.15},
        {"steps": 3, "sigma_end": 0.5},
        {"steps": 3, "sigma_end": 0.8},
        {"steps": 3, "sigma_end": 1.2},
        {"steps": 3, "sigma_end": 1.8},
        {"steps": 4, "sigma_end": 1.2},
        {"steps": 1, "sigma_end": 3.0},
        {"steps": 3, "sigma_end": 1.2, "eta": 0.5},
        {"steps": 3, "sigma_end": 0.8, "sampler": "dpmpp_2m_sde"},
        {"steps": 16, "sigma_end": 0.02, "sampler": "dpmpp_2m_sde"},
    ]
    for option in grid:
        model.sampling.update(defaults)
        model.sampling.update(option)  # the cached model object: denoise() picks these up as its defaults
        report(str(option), evaluate(sets, Settings(samples=args.samples), model_name), base)


if __name__ == "__main__":
    main()
