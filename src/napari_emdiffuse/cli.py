"""``emdiffuse``: the same jobs as the napari widgets, for scripts and batch processing.

    emdiffuse denoise noisy.tif -o denoised.tif --uncertainty unc.tif --json
    emdiffuse denoise tiles/*.tif -o restored/ --uncertainty restored/
    emdiffuse isotropic sections.tif -o isotropic.tif --factor 5
    emdiffuse isotropic sstem.tif -o isotropic.tif --bad-sections 12,40-41
    emdiffuse models
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __version__
from .core.tasks import PRECISIONS


class CLIError(Exception):
    """Ends the command with one line on stderr and a non-zero exit code."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option ends with one line on stderr (exit 2), like every other refusal."""

    def error(self, message: str):
        self.exit(2, f"emdiffuse: error: {message} (see {self.prog} --help)\n")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, nargs="+",
                        help="input TIFF (2D image or 3D stack), or Zarr/OME-Zarr volume; several TIFFs: a batch")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="output TIFF (input's dtype and shape), or .zarr: OME-Zarr, processed chunk by chunk "
                             "(with the uncertainty inside it), resumed if it is an unfinished run; a folder for "
                             "a batch (or any existing folder): INPUT_<task>.tif files there")
    parser.add_argument("--uncertainty", type=Path, help="also write the per-pixel std map (float32, [0, 1] units); "
                                                         "a folder for a batch")
    parser.add_argument("--difficulty", type=Path, help="also write the difficulty map phi (float32); a folder for a "
                                                        "batch")
    parser.add_argument("--samples", type=int, default=2, help="samples K; their mean is the output (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--sampler", choices=["euler_ancestral", "dpmpp_2m_sde", "authors"], default=None,
                        help="authors: the EMDiffuse authors' own 1000-step schedule (their models only; slow)")
    parser.add_argument("--eta", type=float, default=None, help="sampler stochasticity: 1 ancestral, 0 DDIM")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model name (see `emdiffuse models`), .npz file, or an EMDiffuse authors' .pth checkpoint")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="of the network's evaluations; auto: bfloat16 on CPUs that compute it natively (1.45x "
                             "as fast), float32 elsewhere")
    parser.add_argument("--tile", type=int, default=256, help="tile size in pixels (smaller uses less memory)")
    parser.add_argument("--threshold", type=float, default=0.12, help="uncertainty score above which to warn")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--json", action="store_true", help="print one JSON line with the result summary")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    chunked = parser.add_argument_group("Zarr input or output (chunk by chunk, with Dask)")
    chunked.add_argument("--scheduler", default="threads",
                         help="threads (this process), local (a cluster of --workers processes) or the address of "
                              "a running dask scheduler, e.g. tcp://host:8786 (default threads)")
    chunked.add_argument("--workers", type=int, default=None, help="worker processes of the local cluster (default 2)")
    chunked.add_argument("--chunk", type=_chunk, default=None, metavar="Z,Y,X",
                         help="chunk size in input pixels (default 1 plane of 2048 output pixels across)")
    chunked.add_argument("--halo", type=int, default=None, help="margin read around each chunk (default one tile)")
    chunked.add_argument("--dashboard", action="store_true",
                         help="serve the local cluster's Dask dashboard (on 127.0.0.1 only); off by default")


def _chunk(text: str) -> tuple[int, int, int]:
    """Z,Y,X (or one size N for 1,N,N); their ranges are checked with every other number (core/limits.py)."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes = [1, sizes[0], sizes[0]]
    if len(sizes) != 3:
        raise argparse.ArgumentTypeError("give Z,Y,X (or one size for 1,N,N)")
    return tuple(sizes)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="emdiffuse", description="EM image restoration with diffusion models.")
    parser.add_argument("--version", action="version", version=f"napari-emdiffuse {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("denoise", help="denoise a short-dwell (noisy) acquisition"))
    superres = sub.add_parser("superres", help="joint denoising and x2/x4 super-resolution")
    _common(superres)
    superres.add_argument("--scale", type=int, default=2, choices=[2, 4], help="upsampling factor in y and x")
    iso = sub.add_parser("isotropic", help="reconstruct the slices between serial sections (vEMDiffuse-i/-a)")
    _common(iso)
    spacing = iso.add_mutually_exclusive_group()
    spacing.add_argument("--factor", type=float, default=None,
                         help="R: the sections' spacing over the output's z spacing, whole or not (e.g. 12.5); "
                              "default: the input's z spacing over its pixel size (an isotropic output)")
    spacing.add_argument("--output-spacing", type=float, default=None, metavar="NM",
                         help="the output's z spacing in nm instead of --factor (the input must give its voxel size)")
    iso.add_argument("--bad-sections", default=None, metavar="LIST",
                     help="sections to regenerate from their good neighbours (lost, folded, cracked), counted "
                          "from 0 as napari's slider counts them, e.g. 12,40-41; with --factor 1 only they are "
                          "made")
    iso.add_argument("--align", nargs="?", const="rigid", choices=["rigid", "elastic"], default=None,
                     help="align each section to its neighbours first (shift and rotation; elastic: then a smooth "
                          "correction); without it a stack that looks misaligned gets a note")
    iso.add_argument("--self-supervised", action="store_true",
                     help="no isotropic model: learn from the input volume itself first (vEMDiffuse-a)")
    iso.add_argument("--train-minutes", type=float, default=10.0, help="training budget with --self-supervised")
    iso.add_argument("--save-model", metavar="NAME", default=None,
                     help="with --self-supervised: keep the learnt model in your models under NAME, e.g. to learn "
                          "on a TIFF crop and then process a whole Zarr volume with --model NAME")
    models = sub.add_parser("models", help="list, remove, export or import models")
    models.add_argument("--json", action="store_true")
    action = models.add_mutually_exclusive_group()
    action.add_argument("--remove", metavar="NAME", help="delete one of your own models")
    action.add_argument("--export", nargs=2, metavar=("NAME", "FILE"), help="copy a model to a file")
    action.add_argument("--import", dest="import_file", metavar="FILE",
                        help="add a model file (.npz), a BioImage.io package of ours (.zip) or an EMDiffuse "
                             "authors' checkpoint (.pth, with --task) to your models")
    models.add_argument("--format", choices=["npz", "bioimageio"], default=None,
                        help="of --export: our .npz, or a BioImage.io model package (.zip; the default for FILE.zip)")
    models.add_argument("--factor", type=float, default=None,
                        help="with --export of an isotropic model to a BioImage.io package: the whole z factor it "
                             "reconstructs (default 4)")
    models.add_argument("--task", choices=["denoise", "superres", "isotropic"], default=None,
                        help="with --import: the task of an authors' .pth checkpoint (the file does not say it)")
    models.add_argument("--name", default=None, help="with --import: the name to give it (default: the file's)")
    finetune = sub.add_parser("finetune", help="fine-tune a model on one image pair (or, for isotropic "
                                               "reconstruction, one isotropic volume) of your tissue")
    finetune.add_argument("--task", choices=["denoise", "superres", "isotropic"], required=True)
    finetune.add_argument("--input", type=Path, required=True,
                          help="fast/noisy (or low-resolution) image; for isotropic: an isotropic volume")
    finetune.add_argument("--target", type=Path, default=None,
                          help="slow/clean (or high-resolution) image (not for isotropic)")
    finetune.add_argument("-o", "--output", type=Path, required=True, help="model file to write (.npz)")
    finetune.add_argument("--base", default=None, help="model to start from (default: the bundled one)")
    budget = finetune.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, help="time budget (default 10)")
    budget.add_argument("--iterations", type=int, default=None)
    finetune.add_argument("--scale", type=int, default=2, choices=[2, 4])
    finetune.add_argument("--factor", type=int, default=4, help="isotropic: R, the z factor to generate slices for")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--target-brightness", action="store_true",
                          help="the tuned model gives the target acquisition's brightness and contrast (by default "
                               "results keep their input's)")
    finetune.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    finetune.add_argument("--precision", default="auto", choices=PRECISIONS)
    finetune.add_argument("--overwrite", action="store_true")
    finetune.add_argument("--json", action="store_true")
    return parser


def _progress_bar(quiet: bool):
    from .core.tasks import TimeLeft, time_left_text

    start, time_left = time.perf_counter(), TimeLeft()
    narrowest = 28
    width = narrowest  # of the message: the phase's longest so far, so a shorter one overwrites all of it

    def show(p) -> None:
        nonlocal width
        if quiet or not p.total:
            return
        frac = p.done / p.total
        bar = "#" * int(30 * frac)
        left = time_left_text(time_left(p.done, p.total)) if p.done < p.total else ""
        width = max(width, len(p.message))
        sys.stderr.write(f"\r{p.message:<{width}} [{bar:<30}] {100 * frac:5.1f}% {time.perf_counter() - start:6.1f}s "
                         f"{left:<22}")
        if p.done >= p.total:  # a phase ends (e.g. learning, before reconstructing): the next has its own line
            sys.stderr.write("\n")
            width = narrowest
        sys.stderr.flush()

    return show


def _settings(args):
    from .core.tasks import Settings

    overlap = min(Settings.overlap, max(args.tile, 0) // 4)  # what tiling uses of it: a quarter of the tile at most
    return Settings(samples=args.samples, steps=args.steps, seed=args.seed, tile=args.tile, overlap=overlap,
                    device=args.device, precision=args.precision, threshold=args.threshold, sampler=args.sampler,
                    eta=args.eta, difficulty=args.difficulty is not None)


def _z_grid(args, image) -> None:
    """``args.factor`` (R: from ``--factor``, ``--output-spacing`` or the voxel size) and ``args.gap`` (the
    sections' spacing in lateral pixels, what the model is told: from the voxel size when the file gives it, else
    R) for the volume ``image``; ``args.bad`` the sections to regenerate."""
    from .core.isotropic import check_factor, check_voxel_factor, factor_from_voxel
    from .core.sections import parse_sections

    if image.data.ndim != 3:
        raise CLIError(f"Isotropic reconstruction needs a volume (z, y, x); {args.input.name} is not one.")
    ratio = factor_from_voxel(image.scale) if image.unit == "nm" else None
    size = " x ".join(f"{v:g}" for v in image.scale)
    if args.output_spacing is not None:
        if image.unit != "nm":
            raise CLIError(f"{args.input.name} does not give its voxel size, so --output-spacing cannot be turned "
                           "into a factor; give the z factor with --factor R.")
        args.factor = check_factor(round(image.scale[-3] / args.output_spacing, 4))
    elif args.factor is None:
        if image.unit != "nm":
            raise CLIError(f"{args.input.name} does not give its voxel size; give the z factor with --factor R.")
        if ratio is None:
            raise CLIError(f"{args.input.name}: the voxel size {size} nm does not give a z spacing larger than the "
                           "pixel size; give the z factor with --factor R.")
        args.factor = check_voxel_factor(image.scale)
    args.gap = ratio if ratio is not None else args.factor
    args.bad = parse_sections(args.bad_sections or "", image.data.shape[0])
    if not (args.quiet or args.json):
        unit = "nm" if image.unit == "nm" else "(the input's z spacing)"
        print(f"emdiffuse: z factor R = {args.factor:g}: output z spacing {image.scale[-3] / args.factor:.4g} {unit}"
              + (f", sections {args.gap:g} pixels apart (voxel size {size} nm)" if ratio is not None else ""),
              file=sys.stderr)


def _restore(args, job_factory) -> dict:
    """Restore one input with ``job_factory(image, args)``; ``args.scale`` / ``args.factor`` enlarge the output."""
    from .core.io import read_tiff, write_tiff
    from .core.tasks import drive
    from .core.zarr_io import is_zarr, open_volume

    image = None
    if args.command == "isotropic":
        image = open_volume(args.input) if is_zarr(args.input) else read_tiff(args.input)
        _z_grid(args, image)
    lateral_factor, axial_factor = getattr(args, "scale", 1), getattr(args, "factor", 1)
    if is_zarr(args.input) or is_zarr(args.output):
        return _restore_chunked(args, max(lateral_factor, axial_factor))
    if image is None:
        image = read_tiff(args.input)
    pixel = list(image.scale)
    pixel[-2:] = [s / lateral_factor for s in pixel[-2:]]
    if args.command == "isotropic":
        pixel[-3] /= axial_factor
    result = drive(job_factory(image.data, args), _progress_bar(args.quiet or args.json))
    if args.command == "isotropic":
        result.info["output_z_spacing"] = round(pixel[-3], 6)
    if args.uncertainty is not None and result.uncertainty is None and result.info["samples"]:
        raise CLIError("This model gives no uncertainty from one sample; use --samples 2 or more.")
    written = []
    summary = {**result.info, "source": args.input.name}  # recorded in each file: how it was made
    try:  # all outputs or none
        for path, data, made in ((args.output, result.image, summary),
                                 (args.uncertainty, result.uncertainty, {**summary, "map": "uncertainty"}),
                                 (args.difficulty, result.difficulty, {**summary, "map": "difficulty"})):
            if path is not None and data is not None:
                written.append(write_tiff(path, data, tuple(pixel), image.unit, overwrite=args.overwrite,
                                          summary=made))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return result.info


def _restore_chunked(args, factor: int) -> dict:
    """A Zarr input or output: restore chunk by chunk into an OME-Zarr store (see core/chunked.py)."""
    from .core.chunked import ChunkedTask, check_chunkable, restore_volume
    from .core.normalize import InputError
    from .core.tasks import drive
    from .core.zarr_io import is_zarr

    if not is_zarr(args.output):
        raise CLIError("A Zarr input is processed chunk by chunk and needs a Zarr output (-o result.zarr).")
    if args.uncertainty is not None or args.difficulty is not None:
        raise CLIError("With a Zarr output the uncertainty is stored inside it (uncertainty/0); leave out "
                       "--uncertainty and --difficulty.")
    if getattr(args, "self_supervised", False):
        raise CLIError("Self-supervised training needs the volume in memory: learn on a TIFF crop of it with "
                       "--self-supervised --save-model NAME, then process the Zarr volume with --model NAME.")
    try:
        check_chunkable(getattr(args, "bad", None), getattr(args, "align", None))
    except InputError as err:
        raise CLIError(f"{err} Give a TIFF (of the part concerned), or leave out --bad-sections and --align.") from err
    task = ChunkedTask(args.command, factor, getattr(args, "gap", None))
    job = restore_volume(args.input, args.output, task, args.model, _settings(args),
                         chunk=args.chunk, halo=args.halo, scheduler=args.scheduler, workers=args.workers,
                         overwrite=args.overwrite, dashboard=args.dashboard)
    try:
        info = drive(job, _progress_bar(args.quiet or args.json))
        if task.axial > 1:
            from .core.zarr_io import open_volume

            info["output_z_spacing"] = round(open_volume(args.output).scale[-3], 6)
    except KeyboardInterrupt:
        print(f"emdiffuse: interrupted; finished chunks are kept in {args.output}: run the same command to resume.",
              file=sys.stderr)
        raise SystemExit(130) from None
    if not (args.quiet or args.json):
        print(f"emdiffuse: to look at it: napari {args.output} --plugin napari-emdiffuse", file=sys.stderr)
    return info


def _summary(info: dict, as_json: bool) -> None:
    from .core.tasks import verdict

    for note in info.get("notes", []):
        print(f"emdiffuse: note: {note}", file=sys.stderr)
    if as_json:
        keys = ("input", "output", "uncertainty_score", "threshold", "reliable", "seconds", "model", "samples",
                "steps", "seed", "flagged_fraction", "device", "precision") + tuple(
                    k for k in ("factor", "output_z_spacing", "section_gap", "regenerated") if k in info)
        print(json.dumps({k: info.get(k) for k in keys}))
    elif info.get("reliable") is not None:
        print(f"{verdict(info['uncertainty_score'], info['threshold'])} ({info['seconds']:.1f} s)")
    else:
        print(f"done in {info['seconds']:.1f} s ({'one sample' if info['samples'] else info['model']}: no uncertainty)")


def _models(args) -> None:
    from .core.models import export_model, import_model, list_models, remove_model

    if (args.task or args.name) and not args.import_file:
        raise CLIError("--task and --name go with --import.")
    if args.remove:
        print(f"removed {remove_model(args.remove)}")
        return
    if args.export:
        name, file = args.export
        suffix = {"bioimageio": ".zip", "npz": ".npz"}.get(args.format)
        if suffix and Path(file).suffix != suffix:  # a file is written exactly where asked
            raise CLIError(f"--format {args.format} writes a {suffix} file; name it so ({Path(file).stem}{suffix}).")
        options = {}
        if args.factor is not None:
            from .core.models import read_metadata, resolve

            if Path(file).suffix != ".zip" or read_metadata(resolve(name))["task"] != "isotropic":
                raise CLIError("--factor goes with --export of an isotropic model to a BioImage.io package (.zip).")
            options["factor"] = args.factor
        print(f"exported to {export_model(name, file, **options)}")
        return
    if args.import_file:
        print(f"imported as {import_model(args.import_file, args.name, args.task).stem}")
        return
    entries = list_models()
    if args.json:
        print(json.dumps([{"name": e.name, "task": e.task or None, "bundled": e.bundled, "path": str(e.path),
                           **({"unreadable": e.error} if e.error else {})} for e in entries]))
        return
    for e in entries:
        print(f"{e.name:<28} {e.task or 'unreadable':<10} {'bundled' if e.bundled else 'user':<8} {e.path}"
              + (f"\n{'':<28} {e.error} (emdiffuse models --remove {e.name})" if e.error else ""))


PRINT_SECONDS = 5.0


def _finetune(args) -> None:
    from .core.finetune import finetune
    from .core.io import read_tiff
    from .core.isotropic import check_factor, check_isotropic
    from .core.limits import check_budget
    from .core.safety import check_outputs
    from .core.tasks import Throttle, drive
    from .core.train import TrainProgress

    check_budget(args.minutes, args.iterations)
    if args.task == "isotropic":
        check_factor(args.factor)
    if args.output.suffix != ".npz":  # written exactly there, or refused
        raise CLIError(f"Model files end in .npz; give -o {args.output.with_suffix('.npz')}, not {args.output}.")
    inputs = [p for p in (args.input, args.target) if p is not None]
    for path in inputs:
        if not path.exists():
            raise CLIError(f"Input not found: {path}")
    check_outputs([args.output], inputs, args.overwrite)  # before the training, not after it
    if (args.target is None) != (args.task == "isotropic"):
        raise CLIError("--task isotropic learns from --input alone (an isotropic volume)" if args.target else
                       f"--task {args.task} needs --target (the slow acquisition)")
    source = read_tiff(args.input)
    if args.task == "isotropic" and source.unit == "nm" and len(source.scale) == 3:
        check_isotropic(source.scale)
    image, target = source.data, None if args.target is None else read_tiff(args.target).data

    due, last_step = Throttle(PRINT_SECONDS), None

    def show(p) -> None:
        """A line every few seconds (a 10-minute run reports thousands of steps) and the last training step."""
        nonlocal last_step
        training = isinstance(p, TrainProgress)
        if args.json or (training and p.step == last_step) or not due(last=training and p.fraction >= 1):
            return
        last_step = p.step if training else last_step
        print(f"step {p.step:6d}  loss {p.loss:8.4f}  {p.seconds:7.1f} s  {100 * p.fraction:5.1f}%" if training else
              p.message, file=sys.stderr, flush=True)

    result = drive(finetune(args.task, image, target, base=args.base, scale=args.scale, factor=args.factor,
                            minutes=args.minutes, iterations=args.iterations, seed=args.seed, output=args.output,
                            target_brightness=args.target_brightness,
                            device=args.device, precision=args.precision), show)
    if args.json:
        print(json.dumps({"improved": result.improved, "model": result.model_name,
                          "path": str(result.path) if result.path else None,
                          "val_psnr_before": result.val_psnr_before, "val_psnr_after": result.val_psnr_after,
                          "val_psnr_spread": result.val_psnr_spread, "steps": result.steps,
                          **({} if result.registration is None else result.registration.summary())}))
    else:
        print(result.message)


SUFFIXES = {"denoise": "denoised", "superres": "superres", "isotropic": "isotropic"}


def _batch(args) -> list[argparse.Namespace]:
    """One set of arguments per input. Several inputs (or ``-o`` an existing folder) write into the folder ``-o``
    (made if needed) as ``INPUT_<task>.tif``, their maps likewise into the folders given."""
    from .core.zarr_io import is_zarr

    inputs = args.input
    if len(inputs) == 1 and not (args.output.is_dir() and not is_zarr(args.output)):  # a Zarr store is a folder
        return [argparse.Namespace(**{**vars(args), "input": inputs[0]})]
    if any(is_zarr(path) for path in inputs) or is_zarr(args.output):
        raise CLIError("A batch takes TIFF inputs and writes TIFFs into a folder; process Zarr volumes one by one.")
    if getattr(args, "save_model", None):
        raise CLIError("--save-model names one learnt model; give one input with it.")
    if len({path.stem for path in inputs}) < len(inputs):
        raise CLIError("Two inputs have the same name; their outputs would overwrite each other.")
    folders = {"output": args.output, "uncertainty": args.uncertainty, "difficulty": args.difficulty}
    for folder in folders.values():
        if folder is not None and folder.exists() and not folder.is_dir():
            raise CLIError(f"With several inputs, {folder} must be a folder.")
    names = {"output": SUFFIXES[args.command], "uncertainty": "uncertainty", "difficulty": "difficulty"}
    return [argparse.Namespace(**{**vars(args), "input": path,
                                  **{key: folder / f"{path.stem}_{names[key]}.tif" if folder else None
                                     for key, folder in folders.items()}})
            for path in inputs]


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that end a command (or one input of a batch) with a sentence, not a traceback."""
    from .core.models import ModelFileError
    from .core.normalize import InputError

    return CLIError, InputError, ModelFileError, MemoryError, OSError


def _sentence(err: BaseException) -> str:
    """One sentence for the user; an OSError (a full disk, an unwritable folder) says what and where."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}{f': {err.filename}' if err.filename else ''}; nothing was written."
    return str(err)


def _check_before_work(args, batch: list[argparse.Namespace]) -> None:
    """Every number and every output location, before any work: all outputs of the whole batch against all its
    inputs (a batch never replaces one input with another's result), none named twice, each free or replaceable
    (core/safety.py) and writable."""
    from .core.isotropic import check_factor
    from .core.limits import check_number, check_optional, check_scheduler
    from .core.safety import check_outputs
    from .core.zarr_io import is_zarr

    _settings(args)  # samples, steps, eta, threshold, tile, seed, sampler
    check_scheduler(args.scheduler)
    check_optional("workers", args.workers)
    check_optional("halo", args.halo)
    for size in args.chunk or ():
        check_number("chunk", size)
    if getattr(args, "factor", None) is not None:
        check_factor(args.factor)
    check_optional("output_spacing", getattr(args, "output_spacing", None))
    if getattr(args, "self_supervised", False):
        check_number("minutes", args.train_minutes, "The training time (--train-minutes)")
    if getattr(args, "save_model", None):
        from .core.models import free_name

        free_name(args.save_model)  # a name, not a path, and not taken
    inputs = [one.input for one in batch]
    for path in inputs:
        if not path.exists():
            raise CLIError(f"Input not found: {path}")
    outputs = [path for one in batch for path in (one.output, one.uncertainty, one.difficulty)]
    check_outputs(outputs, inputs, args.overwrite, stores=[one.output for one in batch if is_zarr(one.output)])


def _restore_each(args, job_factory) -> int:
    """Restore every input; in a batch an input that fails is reported and the others go on (exit code 2)."""
    batch = _batch(args)
    _check_before_work(args, batch)
    folders = (args.output, args.uncertainty, args.difficulty) if batch[0].output != args.output else ()
    made = [folder for folder in folders if folder is not None and not folder.exists()]
    for folder in made:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        return _restore_all(args, batch, job_factory)
    finally:
        for folder in made:  # folders made for this run and left empty (every input failed) are removed
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _restore_all(args, batch: list[argparse.Namespace], job_factory) -> int:
    failed = 0
    for one in batch:
        if len(batch) > 1 and not (args.quiet or args.json):
            print(f"{one.input} -> {one.output}", file=sys.stderr)
        try:
            info = _restore(one, job_factory)
        except _user_errors() as err:
            if len(batch) == 1 or args.debug:
                raise
            print(f"emdiffuse: error: {one.input}: {_sentence(err)}", file=sys.stderr)
            failed += 1
            continue
        _summary({**info, "input": str(one.input), "output": str(one.output)}, args.json)
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a bad option (one line already on stderr)
        return done.code if isinstance(done.code, int) else 2
    try:
        if args.command == "models":
            _models(args)
        elif args.command == "denoise":
            from .core.tasks import denoise

            return _restore_each(args, lambda image, a: denoise(image, a.model, _settings(a)))
        elif args.command == "finetune":
            _finetune(args)
        elif args.command == "isotropic":
            from .core.isotropic import check_budget, isotropic, isotropic_self_supervised

            if args.self_supervised and args.model:
                raise CLIError("--self-supervised trains its own model; leave out --model.")
            if args.save_model and not args.self_supervised:
                raise CLIError("--save-model keeps a model learnt with --self-supervised; add that option.")
            if args.self_supervised:
                check_budget(args.train_minutes)  # before reading the volume

            def job(image, a):
                if a.self_supervised:
                    return isotropic_self_supervised(image, a.factor, a.train_minutes, _settings(a),
                                                     save_as=a.save_model, gap=a.gap, bad=a.bad, align=a.align)
                return isotropic(image, a.model, _settings(a), factor=a.factor, gap=a.gap, bad=a.bad, align=a.align)

            return _restore_each(args, job)
        elif args.command == "superres":
            from .core.tasks import superres

            return _restore_each(args, lambda image, a: superres(image, a.model, _settings(a), scale=a.scale))
        return 0
    except _user_errors() as err:
        if args.debug:
            raise
        print(f"emdiffuse: error: {_sentence(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emdiffuse: interrupted; no output was written.", file=sys.stderr)
        return 130
    except Exception as err:  # unexpected: still one line unless --debug
        if args.debug:
            raise
        print(f"emdiffuse: error: {type(err).__name__}: {err} (run with --debug for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
