"""Command line of ``dtl-train`` (flags and/or ``--config FILE.yaml``; flags win).

Exit status: 0 done; 2 bad options or config file (nothing was started); 1 an error
during the run (data, checkpoint, adapter, disk full, an output folder in use by another
run, another rank's failure…); 3 the run diverged (non-finite losses or gradients, an
epoch without a finite step, exploded weights, non-finite evaluation outputs, also under
``--eval-only``); 130 interrupted (Ctrl-C). Every error is one line on stderr,
``dtl-train: error: …``, without a traceback.
"""

from __future__ import annotations

import sys

from .config import load_config

EXIT_OPTIONS, EXIT_RUN, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 1, 3, 130


def main(argv: list[str] | None = None) -> int:
    from .loop import DivergenceError, run

    try:
        cfg = load_config(argv)
    except SystemExit as exc:  # argparse printed the usage and the error
        return exc.code if isinstance(exc.code, int) else EXIT_OPTIONS
    except (ValueError, OSError) as exc:
        return _error(exc, EXIT_OPTIONS)
    if cfg.estimate_memory:
        try:
            return _estimate(cfg)
        except (ValueError, OSError) as exc:
            return _error(exc, EXIT_OPTIONS)
    from .setup import OptionsError

    try:
        summary = run(cfg)
    except OptionsError as exc:  # found by the checks before any work
        return _error(exc, EXIT_OPTIONS)
    except KeyboardInterrupt:
        print("dtl-train: interrupted (completed epochs are checkpointed: --resume continues)",
              file=sys.stderr, flush=True)  # fmt: skip
        return EXIT_INTERRUPTED
    except DivergenceError as exc:
        return _error(exc, EXIT_DIVERGED)
    except (ValueError, OSError, RuntimeError, ImportError) as exc:
        if not _expected(exc):
            raise
        return _error(exc, EXIT_RUN)
    if summary.get("test_acc") is not None and summary.get("world_size", 1) >= 1:
        _report(summary, cfg.output)
    return 0


def _estimate(cfg) -> int:
    """``--estimate-memory``: the model the options describe, built on the meta device
    (shapes only: a model larger than this machine's memory is fine), one simulated step
    per process on the device training would use (see :func:`dtl_kernels.estimate_memory`).
    No data is read and no weights are loaded (their values do not change the memory), so
    the head gets ``--num-classes`` classes (10 if not given: its bytes hardly matter)."""
    import os

    import torch

    from ..estimate import estimate_memory
    from .setup import backbone_family, build_model, input_size

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = build_model(cfg, cfg.num_classes or 10, False, device="meta")
    family = backbone_family(cfg.model)
    channels_last = cfg.channels_last == "on" or (
        cfg.channels_last == "auto" and family == "convnet"
    )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    micro = max(1, cfg.batch_size // (world * cfg.grad_accum))
    accum = f" × {cfg.grad_accum} micro-batches per step" if cfg.grad_accum > 1 else ""
    print(f"{model.summary()}\non {device}, {micro} images per process{accum}")
    est = estimate_memory(model, micro, input_size(cfg), cfg.precision, channels_last=channels_last,
                          grad_accum=cfg.grad_accum, device=device)  # fmt: skip
    print(est, flush=True)
    return 0


def _expected(exc: BaseException) -> bool:
    """Errors about the user's input or environment (one line); anything else is a bug
    and keeps its traceback."""
    from .checkpoint import CheckpointError
    from .dist import RankFailed

    if isinstance(exc, (ValueError, OSError, CheckpointError, RankFailed, ImportError)):
        return True
    return isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; for an error re-raised from a ``DataLoader``
    worker, the original message (its last line) instead of the worker's traceback."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return " ".join(text.split()) or type(exc).__name__


def _error(exc: BaseException, code: int) -> int:
    print(f"dtl-train: error: {one_line(exc)}", file=sys.stderr, flush=True)
    return code


def _report(s: dict, output: str) -> None:
    """The run's figures, each once (``--eval-only``: the accuracy and its summary)."""
    import os

    from .log import LOGGER

    if int(os.environ.get("RANK", "0")) != 0:
        return
    if s.get("eval_only"):
        LOGGER.info(
            f"{'test' if s.get('evaluated_on', 'test') == 'test' else 'val'} accuracy".ljust(18)
            + f"{100 * s['test_acc']:.2f}%  ({s['adapter']} on {s['dataset']}, "
            f"{s['test_images']} images)\nsummary           {output}/summary.json"
        )
        return
    peak = s.get("peak_memory_bytes")
    lines = [
        f"{'test' if s.get('evaluated_on', 'test') == 'test' else 'val'} accuracy".ljust(18)
        + f"{100 * s['test_acc']:.2f}%  "
        f"({s['method']}, {s['model']}, {s['dataset']})",
        f"trainable params  {s['trainable_params']:,} of {s['total_params']:,}",
    ]
    if peak is not None:
        lines.append(f"peak memory       {peak / 2**20:.1f} MiB  ({s.get('peak_memory_method')})")
    if s.get("images_per_s"):
        lines.append(f"throughput        {s['images_per_s']:.1f} images/s (training)")
    lines.append(f"wall time         {s['wall_time_s']:.0f} s")
    lines.append(
        f"outputs           {output}/ "
        "(summary.json, metrics.csv/jsonl, curves.png, adapter.safetensors)"
    )
    LOGGER.info("\n".join(lines))
