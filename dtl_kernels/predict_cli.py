"""``dtl-predict``: class predictions for images or folders from an adapter file alone.

    dtl-predict --adapter runs/elpv/adapter.safetensors images/ more.png --top-k 2 \
                --output predictions.csv

Writes one CSV row per image: ``path,class_1,prob_1,…,class_K,prob_K`` (most probable
first), in UTF-8 (a file name's undecodable bytes kept as they are), to ``--output`` or the
standard output. Every image's header is read before the model is built, so an unreadable
file costs nothing; an existing ``--output`` is replaced only with ``--overwrite``, and
never when it is the adapter, the backbone weights or one of the images. Exit status: 0
done; 2 bad options; 1 an error (adapter, weights, an unreadable image, an output that
cannot be written…), as one ``dtl-predict: error:`` line.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path

EXIT_OPTIONS, EXIT_RUN = 2, 1


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    p = argparse.ArgumentParser(
        prog="dtl-predict",
        description="Predict the classes of images with a trained DTL adapter: the model, its "
        "backbone weights, the preprocessing and the class names come from the adapter.",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files, and folders searched recursively for images")  # fmt: skip
    p.add_argument("--adapter", required=True, help="the adapter file (adapter.safetensors)")
    p.add_argument("--pretrained", default=None,
                   help="backbone weights: PATH, 'hub' or an offline weights' name (default: "
                   "those the adapter records)")  # fmt: skip
    p.add_argument("--top-k", type=int, default=1, help="classes per image (default: 1)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes that decode images while the model runs (default: 0, "
                   "decoded between batches)")  # fmt: skip
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32 (default) | bf16: autocast, faster where the hardware has "
                   "bf16 matrix units (1.4-2.2x on a CPU with AMX), probabilities off by up "
                   "to ~0.07 | fp16: autocast, CUDA only")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model first (seconds to a minute; on a GPU under "
                   "CUDA graphs): worth it for many images")  # fmt: skip
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available) | cpu | cuda | cuda:N (default: auto)",
    )
    p.add_argument("--output", default="-",
                   help="CSV file to write (default: -, the standard output)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output file (never the adapter, the weights or "
                   "an image)")  # fmt: skip
    p.add_argument("--allow-backbone-mismatch", action="store_true",
                   help="load an adapter trained on other backbone weights (a warning instead "
                   "of an error)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    p.add_argument(
        "--version", action="version", version=f"dtl-predict (dtl_kernels) {__version__}"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage and the error
        return exc.code if isinstance(exc.code, int) else EXIT_OPTIONS
    if args.top_k < 1 or args.batch_size < 1:
        return _error("--top-k and --batch-size must be ≥ 1", EXIT_OPTIONS)
    if args.workers < 0:
        return _error("--workers must be ≥ 0", EXIT_OPTIONS)
    from .train.log import configure

    log = configure(quiet=args.quiet or args.output == "-")
    try:
        rows = _predict(args)
        # on a terminal, a control character in a file name would act as an escape
        escape = args.output == "-" and sys.stdout.isatty()
        data = _csv(rows, args.top_k, escape).encode("utf-8", "surrogateescape")
        if args.output == "-":
            _write_stdout(data)
        else:
            from ._io import atomic_write

            atomic_write(args.output, lambda tmp: Path(tmp).write_bytes(data))
            log.info(f"wrote {len(rows)} predictions to {args.output}")
    except (ValueError, OSError, RuntimeError, ImportError) as exc:
        return _error(str(exc), EXIT_RUN)
    return 0


def _write_stdout(data: bytes) -> None:
    """The CSV's bytes to the standard output (a text stream without a byte buffer, e.g.
    a caller's ``io.StringIO``, gets them decoded, undecodable bytes replaced)."""
    sys.stdout.flush()
    raw = getattr(sys.stdout, "buffer", None)
    if raw is None:
        sys.stdout.write(data.decode("utf-8", "replace"))
    else:
        raw.write(data)
        raw.flush()


def _check_output(args, files: list[Path], weights: str | None = None) -> None:
    """Refuse, before anything runs, an ``--output`` that would replace the adapter, the
    weights (``--pretrained``, or ``weights``: those the adapter records) or an image, that
    is a folder, or that exists without ``--overwrite``."""
    if args.output == "-":
        return
    out = Path(args.output)
    if out.is_dir():
        raise ValueError(f"--output {out} is a folder: name the CSV file to write")
    from ._io import write_target

    out = write_target(out)  # a FIFO or a device refused now, not after predicting
    if not out.exists():  # where it will be made: a folder this process may write into
        base = out.absolute().parent
        while not base.exists():
            base = base.parent
        if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
            raise ValueError(f"--output {out} cannot be written: {base} is not a folder "
                             "this process may write into")  # fmt: skip
        return
    protected = [Path(args.adapter), *files]
    protected += [Path(w) for w in (args.pretrained, weights) if isinstance(w, str)]
    if any(out.samefile(p) for p in protected if p.exists()):
        raise ValueError(f"--output {out} is the adapter, the backbone weights or an image: "
                         "name another file")  # fmt: skip
    if not args.overwrite:
        raise ValueError(f"--output {out} exists: pass --overwrite to replace it")


def _predict(args) -> list[tuple[str, list[tuple[str, float]]]]:
    from .models.adapters import read_adapter_info
    from .predict import Predictor, image_files
    from .train.data import DataError, check_aspect_of_size, check_image_header
    from .train.transforms import resize_keeps_aspect

    adapter = Path(args.adapter)
    if adapter.is_dir() and (adapter / "adapter.safetensors").is_file():
        args.adapter = str(adapter / "adapter.safetensors")  # a dtl-train run folder
    device = _device(args.device)
    files = image_files(args.inputs)  # before the model: a wrong path costs nothing
    _check_output(args, files)
    # the recorded crop decides whether a long strip is refused (its metadata only)
    recorded = read_adapter_info(args.adapter)["preprocessing"]
    keeps_aspect = recorded is not None and resize_keeps_aspect(recorded.get("crop_mode"))
    # every header first: a bad image found after an hour of work is no use
    sizes = [check_image_header(f, keeps_aspect) for f in files]
    mismatch = "warn" if args.allow_backbone_mismatch else "error"
    progress = False if args.quiet else None  # None: a bar on a terminal
    predictor = Predictor.from_adapter(args.adapter, args.pretrained, device, args.batch_size,
                                       mismatch, workers=args.workers, compile=args.compile,
                                       progress=progress, precision=args.precision)  # fmt: skip
    if predictor.keeps_aspect and not keeps_aspect:  # none recorded: timm's default crop
        for f, size in zip(files, sizes, strict=True):  # the sizes read: no file opened again
            try:
                check_aspect_of_size(size, True)
            except ValueError as exc:  # worded as opened_image words a refused image
                raise DataError(f"cannot read image {f}: ValueError: {exc}") from None
    origin = getattr(predictor.model, "origin", None) or {}
    _check_output(args, files, origin.get("pretrained"))  # the weights the adapter records
    tops = predictor.predict(files, args.top_k)
    return [(str(f), top) for f, top in zip(files, tops, strict=True)]


def _device(name: str):
    """``--device`` as a torch device, checked before anything is read: ``auto`` (CUDA when
    available), ``cpu``, ``cuda`` or ``cuda:N`` of a GPU that is there."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"--device {name!r}: {exc}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(f"--device {name}: no such CUDA device ({count} visible)")
    return device


def _csv(rows, top_k: int, escape: bool = False) -> str:
    """The CSV text; ``escape``: control characters in paths written as escape sequences."""
    if escape:
        from ._untrusted import escape_controls

        rows = [(escape_controls(path), top) for path, top in rows]
    k = min(top_k, max((len(top) for _, top in rows), default=top_k))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["path"] + [f"{what}_{i}" for i in range(1, k + 1) for what in ("class", "prob")]
    )
    for path, top in rows:
        writer.writerow([path] + [v for name, p in top for v in (name, f"{p:.6f}")])
    return out.getvalue()


def _error(message: str, code: int) -> int:
    text = " ".join(str(message).split())
    print(f"dtl-predict: error: {text}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
