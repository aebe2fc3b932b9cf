"""``zo-replay BASE LOG OUT``: rebuild fine-tuned weights from base weights and a trajectory log.

BASE is a Hugging Face model directory (``save_pretrained``), or a PEFT adapter directory
saved before training (its ``adapter_config.json`` names the base model).  OUT receives the
replayed model (or adapter) through ``save_pretrained``.  Nothing is fetched from the
network unless BASE names a hub model and the Hub is reachable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.replay import replay
from ..core.trajectory import TrajectoryError
from . import INSTALL_REPLAY


def load_base(base: str):
    """Load BASE as it was when training started."""
    try:
        import transformers
    except ImportError as e:
        raise SystemExit(f"zo-replay needs transformers: {INSTALL_REPLAY}.") from e

    path = Path(base)
    if (path / "adapter_config.json").is_file():
        try:
            from peft import PeftConfig, PeftModel
        except ImportError as e:
            raise SystemExit(
                f"zo-replay: {base} is a PEFT adapter, which needs peft: pip install 'zo-plugins[peft]'."
            ) from e
        cfg = PeftConfig.from_pretrained(base)
        model = load_base(cfg.base_model_name_or_path)
        return PeftModel.from_pretrained(model, base, is_trainable=True)
    if not (path / "config.json").is_file():
        raise SystemExit(
            f"zo-replay: {base} is not a model directory (no config.json or adapter_config.json)."
        )
    config = transformers.AutoConfig.from_pretrained(base)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise SystemExit(f"zo-replay: cannot tell which model class {base} holds (architectures={arch!r}).")
    return cls.from_pretrained(base, dtype=getattr(config, "dtype", None) or "auto")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="zo-replay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("base", help="model (or PEFT adapter) directory holding the starting weights")
    ap.add_argument("log", help="trajectory log written with ZOConfig(trajectory_path=...)")
    ap.add_argument("out", help="directory to save the replayed model to")
    ap.add_argument(
        "--allow-version-mismatch",
        action="store_true",
        help="replay a log whose direction streams (stream_version) differ from this library's (the result will differ)",
    )
    ap.add_argument("--steps", type=int, default=None, help="replay only the first N steps")
    args = ap.parse_args(argv)
    model = load_base(args.base)
    try:
        replay(model, args.log, allow_version_mismatch=args.allow_version_mismatch, steps=args.steps)
    except TrajectoryError as e:
        print(f"zo-replay: {e}", file=sys.stderr)
        return 2
    model.save_pretrained(args.out)
    print(f"zo-replay: wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
