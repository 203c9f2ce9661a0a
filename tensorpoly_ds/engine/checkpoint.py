"""Checkpoints: DeepSpeed's save_checkpoint (called on every rank) plus, per tag directory,
`rng_rank<r>.json` (python/numpy/torch RNG states of every rank), `meta.json` (step, data position,
config fingerprint, adapter config) and `COMPLETE.json`, the completion marker rank 0 writes last with the
size and the SHA-256 of every file (each rank hashes a share of the files). Only the last `keep` complete
tags are kept.

Resume policy (`resume(...)`, `precheck(...)`):
- `auto`: the newest tag whose files match their sizes and checksums and that DeepSpeed can load; every
  newer tag that fails is skipped with a warning naming the file and why. Tags without a marker are saves
  that never finished (killed mid-save): skipped. If tags with markers exist and none is usable, resuming
  stops with a CheckpointError listing every tag and why: starting over is the explicit `none`.
  No checkpoints at all: a fresh start.
- a tag directory: that tag, verified the same way, or a CheckpointError (no fallback).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpds_common.errors import CheckpointError  # noqa: F401 - re-exported: engine.checkpoint.CheckpointError
from tpds_common.files import atomic_write_text
from tpds_common.log import get_logger

from . import distributed as dist

log = get_logger("tensorpoly-ds")

MARKER = "COMPLETE.json"
META = "meta.json"
TAG_RE = re.compile(r"^step_(\d+)$")
UNIVERSAL_SUFFIX = "_universal"  # a tag's universal-checkpoint sibling (elastic.py)


HASH = "sha256"
BLOCK = 1 << 20  # hashing streams 1 MiB blocks: constant memory whatever the file size


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# ---- RNG ---------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
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
    return {
        str(p.relative_to(tag_dir)): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != MARKER and not p.name.startswith(".")
    }


def file_digest(path: Path) -> str:
    h = hashlib.new(HASH)
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _digests(tag_dir: Path, sizes: dict[str, int]) -> dict[str, str]:
    """Collective: the files {name: size} are shared out over the ranks by size (largest first, each to
    the least loaded rank), every rank hashes its share, all ranks get every checksum."""
    rank, world = dist.rank(), dist.world_size()
    load, mine = [0] * world, []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = load.index(min(load))
        load[r] += sizes[name] + 1
        if r == rank:
            mine.append(name)
    digests = {n: file_digest(tag_dir / n) for n in mine}
    out: dict[str, str] = {}
    for part in dist.all_gather_object(digests):
        out.update(part)
    return out


def read_marker(tag_dir: Path) -> dict | None:
    try:
        body = json.loads((tag_dir / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return body if isinstance(body, dict) and isinstance(body.get("files"), dict) else None


def check_structure(tag_dir: Path) -> str | None:
    """Cheap, local: None if the marker is readable and every listed file exists with its size."""
    if not (tag_dir / MARKER).is_file():
        return "no completion marker (save interrupted?)"
    marker = read_marker(tag_dir)
    if marker is None:
        return "unreadable completion marker"
    for name, size in marker["files"].items():
        path = tag_dir / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != size:
            return f"file {name} has {path.stat().st_size} bytes, {size} expected (truncated?)"
    if not (tag_dir / META).is_file():
        return f"missing {META}"
    return None


def verify_tag(tag_dir: Path, content: bool = True) -> str | None:
    """None if the tag is complete and intact, else why not. With `content`, every file's checksum is
    compared with the marker's (collective under a process group: call it on every rank; rank 0's view of
    the structure decides, so that every rank takes the same branch)."""
    if not content:
        return check_structure(tag_dir)
    why = dist.broadcast_object(check_structure(tag_dir) if dist.rank() == 0 else None)
    if why is not None:
        return why
    marker = read_marker(tag_dir)
    expected = marker.get(HASH)
    if expected is None:  # written before checksums existed: sizes are all there is to check
        _warn(f"checkpoint {tag_dir} has no content checksums (older format): only sizes verified")
        return None
    sizes = {n: marker["files"].get(n, 0) for n in expected}
    if dist.rank() == 0 and sum(sizes.values()) > 1 << 30:  # seconds to minutes: say what is happening
        log.info(
            f"verifying the checksums of {tag_dir.name} ({sum(sizes.values()) / 1e9:.1f} GB, "
            f"{dist.world_size()} rank(s) sharing the work)"
        )
    actual = _digests(tag_dir, sizes)
    for name in sorted(expected):
        if actual.get(name) != expected[name]:
            return (
                f"file {name}: content differs from the checksum in {MARKER} "
                f"({HASH} {actual.get(name, '?')[:12]}..., {expected[name][:12]}... expected; corrupted on disk?)"
            )
    return None


def unreadable_file(tag_dir: Path) -> str | None:
    """The first torch zip archive in the tag that fails its CRC check (which file a failed load tripped
    on: DeepSpeed's error does not say), else None."""
    for path in sorted(tag_dir.rglob("*.pt")):
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
            if bad is not None:
                return f"{path.name} (member {bad})"
        except (OSError, zipfile.BadZipFile, RuntimeError) as err:
            return f"{path.name} ({err})"
    return None


def _warn(message: str) -> None:
    if dist.rank() == 0:  # the same verdict on every rank: say it once
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _explain_unusable(ckpt_dir: Path, problems: list[tuple[Path, str]]) -> CheckpointError:
    lines = "\n".join(f"  {tag.name}: {why}" for tag, why in problems)
    return CheckpointError(
        f"{ckpt_dir}: no usable checkpoint (resume auto):\n{lines}\n"
        "Refusing to start over silently: fix or remove them, resume from an explicit tag, "
        "or start afresh with --resume none."
    )


def precheck(ckpt_dir: Path, resume: str) -> None:
    """Before any process group or model: refuse a `resume` that cannot work, from what is cheap to see
    (markers and file sizes; checksums are verified collectively at load time)."""
    if resume in ("none", "", None):
        return
    if resume != "auto":
        tag = Path(resume)
        if not tag.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
        why = check_structure(tag)
        if why is not None:
            raise CheckpointError(f"--resume {resume}: not a usable checkpoint: {why}")
        return
    tags = list_tags(ckpt_dir)
    problems = [(p, check_structure(p)) for _, p in tags]
    marked = [(p, why) for p, why in problems if (p / MARKER).is_file()]
    if marked and all(why is not None for _, why in marked):
        raise _explain_unusable(ckpt_dir, problems)


def find_resumable(ckpt_dir: Path, skip: set[Path] = frozenset(), problems: list | None = None) -> Path | None:
    """The newest intact tag not in `skip` (collective: checksums are shared out over the ranks); warns
    about every newer one it skips. None if there are no finished checkpoints at all; CheckpointError if
    there are, but none is usable."""
    problems = [] if problems is None else problems
    for step, tag_dir in reversed(list_tags(ckpt_dir)):
        if tag_dir in skip:
            continue
        why = verify_tag(tag_dir)
        if why is None:
            return tag_dir
        problems.append((tag_dir, why))
        _warn(f"checkpoint {tag_dir} is incomplete or corrupt ({why}); falling back to the previous one")
    if any((p / MARKER).is_file() for p, _ in problems):
        raise _explain_unusable(ckpt_dir, problems)
    return None


def resume(
    engine, ckpt_dir: Path, resume_from: str, check: Callable[[dict, Path], None] | None = None, **load_kwargs
) -> dict[str, Any] | None:
    """Collective. Restore from `resume_from` ("auto" or a tag directory); returns the tag's meta (with
    "tag") or None for a fresh start. `check(meta, tag_dir)` may refuse a tag (CheckpointError, not a
    fallback: an incompatible run is a configuration error). A tag DeepSpeed fails to read is a named
    fallback to the previous one (auto) or an error (explicit tag)."""
    if resume_from in ("none", "", None):
        return None
    explicit = resume_from != "auto"
    failed: set[Path] = set()
    problems: list[tuple[Path, str]] = []
    while True:
        if explicit:
            tag_dir = Path(resume_from)
            why = verify_tag(tag_dir)
            if why is not None:
                raise CheckpointError(f"--resume {tag_dir}: {why}")
        else:
            tag_dir = find_resumable(ckpt_dir, skip=failed, problems=problems)
            if tag_dir is None:
                return None
        meta = read_meta(tag_dir)
        if check is not None:
            check(meta, tag_dir)
        error = None
        try:
            meta = load(engine, tag_dir, **load_kwargs)
        except Exception as err:  # noqa: BLE001 - any unreadable file becomes a named fallback
            culprit = unreadable_file(tag_dir)
            error = f"{culprit or 'a file'} could not be loaded ({type(err).__name__}: {str(err)[:300]})"
        errors = [e for e in dist.all_gather_object(error) if e]
        if not errors:
            return {**meta, "tag": str(tag_dir)}
        why = errors[0]
        if explicit:
            raise CheckpointError(f"--resume {tag_dir}: {why}")
        failed.add(tag_dir)
        problems.append((tag_dir, why))
        _warn(f"checkpoint {tag_dir} is unreadable ({why}); falling back to the previous one")


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
    if rank == 0 and tag_dir.exists():  # an older incomplete attempt at the same step
        shutil.rmtree(tag_dir)
    dist.barrier()
    client_state = {"tpds": meta}
    # Frozen parameters (the backbone of an adapter run) are not saved: they are rebuilt from the model config
    # on resume, so a checkpoint holds the trained tensors and their optimizer state only. FullFT has none.
    with _every_frozen_name_excluded(engine):
        engine.save_checkpoint(
            str(ckpt_dir), tag=tag, client_state=client_state, save_latest=True, exclude_frozen_parameters=True
        )
    tag_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(tag_dir / f"rng_rank{rank}.json", json.dumps(rng_state()))
    if rank == 0:
        atomic_write_text(tag_dir / META, json.dumps(meta, indent=2, sort_keys=True))
    dist.barrier()
    write_marker(tag_dir, step)
    if rank == 0:
        prune(ckpt_dir, keep)
    dist.barrier()
    return tag_dir


def write_marker(tag_dir: Path, step: int) -> None:
    """Collective, once every rank's files are written (on a file system all ranks share): rank 0 writes
    COMPLETE.json with every file's size and checksum (hashed by all ranks, a share each)."""
    files = dist.broadcast_object(_files(tag_dir) if dist.rank() == 0 else None)
    digests = _digests(tag_dir, files)
    if dist.rank() == 0:
        atomic_write_text(tag_dir / MARKER, json.dumps({"step": step, "files": files, HASH: digests}, indent=2))


def prune(ckpt_dir: Path, keep: int) -> None:
    tags = list_tags(ckpt_dir)
    complete = [(s, p) for s, p in tags if check_structure(p) is None]
    if not complete:
        return
    keep_set = {p for _, p in complete[-keep:]}
    newest_good = complete[-1][0]
    for step, path in tags:
        # older complete tags beyond `keep`, and incomplete tags older than the newest good one
        if path not in keep_set and step <= newest_good:
            shutil.rmtree(path, ignore_errors=True)
    # universal conversions (elastic.py) of pruned tags, and conversions a crash left unfinished
    for path in [*ckpt_dir.glob(f"step_*{UNIVERSAL_SUFFIX}"), *ckpt_dir.glob(f".step_*{UNIVERSAL_SUFFIX}.tmp")]:
        tag = path.name.lstrip(".").removesuffix(".tmp").removesuffix(UNIVERSAL_SUFFIX)
        if not (ckpt_dir / tag).is_dir():
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
        raise CheckpointError(
            f"{tag_dir}: the checkpoint's module state does not match the model: missing "
            f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def load(engine, tag_dir: Path, *, load_optimizer: bool = True, rng_seed: int = 0) -> dict[str, Any]:
    """Collective. Restores model, optimizer, scheduler (DeepSpeed) and this rank's RNG states. A ZeRO
    checkpoint written on another world size is converted to a universal checkpoint first (elastic.py); the
    returned meta then names it under "universal". A rank the checkpoint has no RNG state for (it was
    written on fewer ranks) is seeded from (rng_seed, rank, step)."""
    from . import elastic

    meta = read_meta(tag_dir)
    universal = None
    if load_optimizer and elastic.needs_conversion(meta, tag_dir, dist.world_size()):
        universal = elastic.ensure_universal(tag_dir, int(meta["step"]))
    source = universal or tag_dir
    with elastic.universal_loading(engine) if universal else contextlib.nullcontext():
        path, client = engine.load_checkpoint(
            str(source.parent),
            tag=source.name,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_optimizer,
            custom_load_fn=lambda src, dst: load_module_state(src, dst, tag_dir),
        )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {source}")
    if universal:
        elastic.repair_after_universal_load(engine)
    rng_file = tag_dir / f"rng_rank{dist.rank()}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    else:
        seed_all(elastic.new_rank_seed(rng_seed, dist.rank(), int(meta["step"])))
    return {**meta, "universal": str(universal) if universal else None}


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
