"""Checkpoints: DeepSpeed's save_checkpoint (called on every rank) plus, per tag directory,
`rng_rank<r>.json` (python/numpy/torch RNG states of every rank), `meta.json` (step, data position,
config fingerprint, adapter config) and `COMPLETE.json`, the completion marker rank 0 writes last with the
size of every file. A tag without a valid marker (interrupted save, truncated or missing file) is skipped
with a warning and the previous good one is used. Only the last `keep` complete tags are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed as dist

MARKER = "COMPLETE.json"
META = "meta.json"
TAG_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ---- RNG ---------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ---- tags -----------------------------------------------------------------------------------------------
def list_tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = TAG_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _files(tag_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != MARKER and not p.name.startswith(".")}


def verify_tag(tag_dir: Path) -> str | None:
    """None if the tag is complete, else why not."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        return "no completion marker (save interrupted?)"
    try:
        body = json.loads(marker.read_text())
        expected = body["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "unreadable completion marker"
    for name, size in expected.items():
        path = tag_dir / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != size:
            return f"file {name} has {path.stat().st_size} bytes, {size} expected"
    if not (tag_dir / META).is_file():
        return f"missing {META}"
    return None


def find_resumable(ckpt_dir: Path) -> Path | None:
    """The newest complete tag; warns about every newer incomplete one it skips."""
    for step, tag_dir in reversed(list_tags(ckpt_dir)):
        why = verify_tag(tag_dir)
        if why is None:
            return tag_dir
        warnings.warn(f"checkpoint {tag_dir} is incomplete or corrupt ({why}); falling back to the previous one",
                      RuntimeWarning, stacklevel=2)
    return None


def read_meta(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / META).read_text())


def _frozen_names(module: torch.nn.Module) -> set[str]:
    """Every state_dict name of a frozen parameter, tied aliases included."""
    return {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


@contextlib.contextmanager
def _every_frozen_name_excluded(engine):
    """DeepSpeed's exclude_frozen_parameters drops a frozen parameter under its first name only; its tied
    aliases (T5's encoder/decoder embed_tokens and lm_head are all `shared.weight`) would still carry it."""
    frozen = _frozen_names(engine.module)
    module_state_dict = engine.module_state_dict

    def without_frozen(*args, **kwargs):
        state = module_state_dict(*args, **kwargs)
        for name in frozen:
            state.pop(name, None)
        return state

    engine.module_state_dict = without_frozen
    try:
        yield
    finally:
        del engine.module_state_dict


def save(engine, ckpt_dir: Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Collective: every rank must call it. Returns the tag directory."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    rank = dist.rank()
    if rank == 0 and tag_dir.exists():   # an older incomplete attempt at the same step
        shutil.rmtree(tag_dir)
    dist.barrier()
    client_state = {"tpds": meta}
    # Frozen parameters (the backbone of an adapter run) are not saved: they are rebuilt from the model config
    # on resume, so a checkpoint holds the trained tensors and their optimizer state only. FullFT has none.
    with _every_frozen_name_excluded(engine):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=True,
                               exclude_frozen_parameters=True)
    tag_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(tag_dir / f"rng_rank{rank}.json", json.dumps(rng_state()))
    dist.barrier()
    if rank == 0:
        atomic_write_text(tag_dir / META, json.dumps(meta, indent=2, sort_keys=True))
        atomic_write_text(tag_dir / MARKER, json.dumps({"step": step, "files": _files(tag_dir)}, indent=2))
        prune(ckpt_dir, keep)
    dist.barrier()
    return tag_dir


def prune(ckpt_dir: Path, keep: int) -> None:
    tags = list_tags(ckpt_dir)
    complete = [(s, p) for s, p in tags if verify_tag(p) is None]
    if not complete:
        return
    keep_set = {p for _, p in complete[-keep:]}
    newest_good = complete[-1][0]
    for step, path in tags:
        # older complete tags beyond `keep`, and incomplete tags older than the newest good one
        if path not in keep_set and step <= newest_good:
            shutil.rmtree(path, ignore_errors=True)


def load_module_state(state: dict[str, torch.Tensor], module: torch.nn.Module, tag_dir: Path) -> None:
    """Load a checkpoint's module state saved without frozen parameters: strict about everything else (a
    trainable parameter or buffer it lacks, a tensor the model does not have). Frozen Kronecker LayerNorm
    constants that checkpoints written before they stopped being tensors hold are checked and dropped."""
    from tensorpoly_ds.adapters import ExportError
    from tensorpoly_ds.adapters.export import drop_frozen_norm_constants

    adapter_cfg = getattr(module, "tpds_adapter_config", None)
    if adapter_cfg is not None:
        try:
            state = drop_frozen_norm_constants(state, adapter_cfg, str(tag_dir))
        except ExportError as err:
            raise CheckpointError(str(err)) from None
    result = module.load_state_dict(state, strict=False)
    frozen = _frozen_names(module)
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{tag_dir}: the checkpoint's module state does not match the model: missing "
                              f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")


def load(engine, tag_dir: Path, *, load_optimizer: bool = True) -> dict[str, Any]:
    """Collective. Restores model, optimizer, scheduler (DeepSpeed) and this rank's RNG states."""
    path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                          load_optimizer_states=load_optimizer,
                                          load_lr_scheduler_states=load_optimizer,
                                          custom_load_fn=lambda src, dst: load_module_state(src, dst, tag_dir))
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {tag_dir}")
    rng_file = tag_dir / f"rng_rank{dist.rank()}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    else:
        warnings.warn(f"{rng_file} not found (resuming on a larger world size?); RNG states not restored",
                      RuntimeWarning, stacklevel=2)
    return read_meta(tag_dir)
