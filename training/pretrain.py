"""Contrastive pretraining of the project's small CLIP with open_clip's own trainer, and weight export.

    python -m training.pretrain --cache DIR --epochs N [--resume latest] [open_clip_train args ...]
    python -m training.pretrain export --checkpoint CKPT --out PATH.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmserve.fileio import atomic_write, atomic_write_bytes

MODEL_NAME = "mmserve-vit-p12-96"
DEFAULT_RUN = f"pretrain-{MODEL_NAME}"
# augmentation for 96 px drawings: mild crops (objects fill the square), colour jitter and some grey
# pictures so that the mono / line-art styles are not out of distribution
AUG_CFG: tuple[str, ...] = (
    "scale=(0.7,1.0)",
    "color_jitter=(0.3,0.3,0.3,0.05)",
    "color_jitter_prob=0.5",
    "gray_scale_prob=0.2",
)


def default_cache() -> Path:
    """The cache folder: $MMSERVE_CACHE or ~/.cache/mmserve."""
    return Path(os.environ.get("MMSERVE_CACHE", "~/.cache/mmserve")).expanduser()


def model_config_dir() -> Path:
    """Folder of the project's open_clip model configs (mmserve/model_configs)."""
    repo = Path(__file__).resolve().parents[1] / "mmserve" / "model_configs"
    if repo.is_dir():
        return repo
    from importlib.resources import files

    return Path(str(files("mmserve") / "model_configs"))


def register_model_configs() -> None:
    """Make open_clip know the project's model names (e.g. mmserve-vit-p12-96)."""
    import open_clip

    config_dir = model_config_dir()
    if not (config_dir / f"{MODEL_NAME}.json").is_file():
        raise FileNotFoundError(f"{config_dir / (MODEL_NAME + '.json')}: model config not found")
    open_clip.add_model_config(config_dir)


@dataclass
class PretrainConfig:
    """Options this wrapper sets for open_clip_train (anything else is passed through)."""

    cache_dir: Path
    epochs: int = 30
    name: str = DEFAULT_RUN
    model: str = MODEL_NAME
    batch_size: int = 128
    lr: float = 5e-4
    wd: float = 0.1
    warmup: int = 200
    workers: int = 1
    precision: str = "fp32"
    device: str = "cpu"
    resume: str | None = None
    val: bool = True
    log_every: int = 20
    seed: int = 0
    train_csv: Path | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        """Folder holding one sub-folder per run (out.log, checkpoints/)."""
        return self.cache_dir / "pretrain" / "logs"

    @property
    def train_data(self) -> Path:
        """The caption CSV trained on: --train-data, else <cache>/pretrain/train.csv."""
        return self.train_csv or self.cache_dir / "pretrain" / "train.csv"

    def trainer_argv(self) -> list[str]:
        """The argument list handed to open_clip_train.main.main."""
        pre = self.cache_dir / "pretrain"
        argv = [
            "--model", self.model,
            "--dataset-type", "csv",
            "--train-data", str(self.train_data),
            "--csv-separator", "\t",
            "--csv-img-key", "filepath",
            "--csv-caption-key", "title",
            "--logs", str(self.logs),
            "--name", self.name,
            "--epochs", str(self.epochs),
            "--save-frequency", "1",
            "--workers", str(self.workers),
            "--batch-size", str(self.batch_size),
            "--lr", str(self.lr),
            "--wd", str(self.wd),
            "--warmup", str(self.warmup),
            "--precision", self.precision,
            "--device", self.device,
            "--seed", str(self.seed),
            "--log-every-n-steps", str(self.log_every),
            "--report-to", "",
            "--aug-cfg", *AUG_CFG,
        ]
        val_csv = pre / "val.csv"
        if self.val and val_csv.is_file():
            argv += ["--val-data", str(val_csv), "--val-frequency", "1"]
        if self.resume:
            argv += ["--resume", self.resume]
        return argv + list(self.extra)


def check_train_csv(cfg: PretrainConfig) -> Path:
    """The caption CSV to train on, once it is known to exist with the filepath and title columns."""
    train_csv = cfg.train_data
    if not train_csv.is_file():
        if cfg.train_csv is not None:
            raise FileNotFoundError(f"{train_csv}: --train-data file not found")
        raise FileNotFoundError(f"{train_csv}: no pretraining captions; run `python -m training.prepare` first")
    try:
        with train_csv.open(encoding="utf-8") as f:
            header = f.readline().rstrip("\n").split("\t")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{train_csv}: not UTF-8 text ({exc})") from None
    for column in ("filepath", "title"):
        if column not in header:
            raise ValueError(f"{train_csv}: header has no column {column!r} (found {header})")
    return train_csv


def check_inputs(cfg: PretrainConfig) -> None:
    """Fail early, naming the file, when the caption CSV is missing or a fresh run would clash."""
    check_train_csv(cfg)
    run_log = cfg.logs / cfg.name / "out.log"
    if run_log.exists() and cfg.resume is None:
        raise FileExistsError(f"{run_log}: run {cfg.name!r} exists; pass --resume latest to continue it "
                              "or --name NEW for a fresh run")


def run_trainer(cfg: PretrainConfig) -> int:
    """Register the model config and run open_clip_train's main on this configuration."""
    check_inputs(cfg)
    register_model_configs()
    from open_clip_train.main import main as trainer_main

    argv = cfg.trainer_argv()
    print("[pretrain] open_clip_train " + " ".join(repr(a) if (" " in a or "\t" in a or not a) else a
                                                   for a in argv), flush=True)
    result = trainer_main(argv)
    return int(result) if isinstance(result, int) and result < 0 else 0


def write_smoke_csv(cfg: PretrainConfig, steps: int) -> Path:
    """A shuffled slice of the caption CSV (--train-data or train.csv) with `steps` full batches, for timing a
    short run."""
    import random

    src = check_train_csv(cfg)
    try:
        lines = src.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{src}: not UTF-8 text ({exc})") from None
    header, rows = lines[0], lines[1:]
    random.Random(cfg.seed).shuffle(rows)
    out = cfg.cache_dir / "pretrain" / "smoke.csv"
    atomic_write_bytes(out, ("\n".join([header, *rows[: steps * cfg.batch_size]]) + "\n").encode("utf-8"))
    return out


def _safetensors_parts(path: Path) -> tuple[dict, bytes]:
    """The parsed JSON header and the raw tensor bytes of a safetensors file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def same_safetensors(a: Path, b: Path) -> bool:
    """True when two safetensors files hold the same tensors and metadata (the header's key order, which
    safetensors does not keep stable between processes, does not count)."""
    try:
        (head_a, data_a), (head_b, data_b) = _safetensors_parts(a), _safetensors_parts(b)
    except (OSError, ValueError):
        return False
    return head_a == head_b and data_a == data_b


def export_weights(checkpoint: Path, out: Path, model: str = MODEL_NAME, verify: bool = True) -> dict:
    """Save a training checkpoint's model weights only, in fp16 safetensors with open_clip key names."""
    import torch
    from safetensors.torch import save_file

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{checkpoint}: no 'state_dict' field with model weights")
    weights = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{checkpoint}: state_dict entry {key!r} is not a tensor")
        value = value.detach().to("cpu")
        weights[key] = (value.half() if value.is_floating_point() else value).contiguous().clone()
    meta = {"model": model, "epoch": str(ckpt.get("epoch", "")), "source": checkpoint.name, "dtype": "float16"}
    # an unchanged re-export keeps the existing file byte for byte: it must not re-ship 45 MB into git history
    atomic_write(out, lambda tmp: save_file(weights, str(tmp), metadata=meta), same=same_safetensors)
    info = {"out": str(out), "tensors": len(weights), "bytes": out.stat().st_size, **meta}
    if verify:
        register_model_configs()
        import open_clip

        loaded = open_clip.create_model(model, pretrained=str(out))
        ref = loaded.state_dict()
        missing = set(ref) ^ set(weights)
        if missing:
            raise ValueError(f"{out}: keys differ from open_clip's {model}: {sorted(missing)[:5]}")
        for key, value in weights.items():
            if not torch.equal(ref[key].to(value.dtype), value):
                raise ValueError(f"{out}: tensor {key!r} did not load back unchanged")
        info["verified"] = True
    return info


def _parse_train(argv: list[str]) -> PretrainConfig:
    """Parse the training command line; unknown options go through to open_clip_train."""
    p = argparse.ArgumentParser(prog="python -m training.pretrain",
                                description="Pretrain the project's CLIP on <cache>/pretrain/train.csv "
                                            "(or --train-data).",
                                epilog="Other options are passed to open_clip_train (see its --help).")
    p.add_argument("--cache", type=Path, default=default_cache(), help="cache folder (env MMSERVE_CACHE)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--name", default=DEFAULT_RUN, help="run name: <cache>/pretrain/logs/<name>")
    p.add_argument("--resume", default=None, help="'latest' (continue this run) or a checkpoint path")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--train-data", type=Path, default=None, metavar="CSV",
                   help="caption CSV (tab-separated, columns filepath and title); default <cache>/pretrain/train.csv")
    p.add_argument("--no-val", action="store_true", help="skip the per-epoch retrieval check on val.csv")
    p.add_argument("--smoke-steps", type=int, default=0,
                   help="time N steps on a slice of the caption CSV (one epoch, run name smoke-<time>)")
    args, extra = p.parse_known_args(argv)
    cfg = PretrainConfig(cache_dir=args.cache.expanduser(), epochs=args.epochs, name=args.name,
                         resume=args.resume, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                         workers=args.workers, val=not args.no_val, extra=extra,
                         train_csv=args.train_data.expanduser() if args.train_data else None)
    if args.smoke_steps:
        cfg.train_csv = write_smoke_csv(cfg, args.smoke_steps)
        cfg.name, cfg.epochs, cfg.val, cfg.log_every = f"smoke-{time.strftime('%Y%m%d-%H%M%S')}", 1, False, 1
        cfg.warmup = min(cfg.warmup, args.smoke_steps)
    return cfg


def pretrain(argv: list[str] | None = None) -> int:
    """Entry point: `export ...` writes fp16 weights, anything else trains (see module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        p = argparse.ArgumentParser(prog="python -m training.pretrain export",
                                    description="Save a checkpoint's weights as fp16 safetensors.")
        p.add_argument("--checkpoint", type=Path, required=True, help="open_clip_train epoch_N.pt")
        p.add_argument("--out", type=Path, required=True, help="output .safetensors path")
        p.add_argument("--model", default=MODEL_NAME)
        p.add_argument("--no-verify", action="store_true", help="skip reloading with open_clip.create_model")
        args = p.parse_args(argv[1:])
        print(json.dumps(export_weights(args.checkpoint, args.out, args.model, verify=not args.no_verify)))
        return 0
    return run_trainer(_parse_train(argv))


if __name__ == "__main__":
    raise SystemExit(pretrain())
