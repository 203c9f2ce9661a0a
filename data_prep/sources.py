"""Where P3-format records come from: the Hub, a local folder, or the embedded generator.

Every source answers three questions about a (config, split):
- `resolve` -> SplitFiles | None: which files hold it (cheap, no data read);
- `open(SplitFiles)` -> a reader yielding bounded chunks (runs in the worker processes);
- `fingerprints(SplitFiles, previous)` -> what identifies its content (for caches and reruns).

`--source local:PATH` accepts, per config, whichever of these it finds (in this order):
  1. a snapshot of bigscience/P3 with its README: the Parquet files the card's `configs` declare;
  2. the original TFRecord layout: PATH/data/<config>/<split>.tfrecord-* + info.<split>.json;
  3. one folder per config: PATH/<config>/<split>.<ext> or shards PATH/<config>/<split>-*.<ext>
     (sorted), <ext> in parquet, jsonl (also .json), arrow; one format per split.
`--source hub` resolves the same two repository layouts against bigscience/P3 on the Hub, pinned
to the commit it finds at the start: Parquet configs are loaded with `datasets.load_dataset("parquet",
data_files=<the card's files for that config and split>)`, TFRecord ones downloaded file by file
and read by our own reader (datasets >= 4 refuses the repository-level loading script P3.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import embedded, latent_skills
from .errors import ConfigError
from .fingerprint import file_fingerprint
from .readers import DATA_KINDS_BY_EXT, ArrowFormat, RowsReader, SplitFiles, SplitReader, open_files
from .records import Chunk
from .repository import README, Repository

HUB_DATASET = "bigscience/P3"
SOURCE_KINDS = ("hub", "embedded", "local:PATH")
_BUILDERS = {"parquet": "parquet", "jsonl": "json", "arrow": "arrow"}


# ---------------------------------------------------------------------------------------------
# Repository access: a local folder or the Hub
# ---------------------------------------------------------------------------------------------


@dataclass
class LocalAccess:
    """A folder laid out like the repository (a `huggingface-cli download` snapshot)."""

    root: Path
    _files: list[str] | None = field(default=None, repr=False)

    def describe(self) -> str:
        return str(self.root)

    def files(self) -> list[str]:
        if self._files is None:
            out = []
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # .cache/huggingface etc.
                rel = Path(dirpath).relative_to(self.root)
                out += [(rel / f).as_posix() for f in filenames if not f.startswith(".")]
            self._files = sorted(out)
        return self._files

    def read_text(self, rel: str) -> str | None:
        p = self.root / rel
        return p.read_text("utf-8") if p.is_file() else None

    def path(self, rel: str) -> Path:
        return self.root / rel

    def data_ref(self, rel: str) -> str:
        return str(self.root / rel)

    def fingerprint(self, rel: str, previous: dict[str, dict]) -> dict:
        return file_fingerprint(self.root / rel, previous.get(str(self.root / rel)))


@dataclass
class HubAccess:
    """bigscience/P3 on the Hub, pinned to one commit for the whole run."""

    repo_id: str = HUB_DATASET
    revision: str | None = None
    _files: list[str] | None = field(default=None, repr=False)

    def _api(self):
        from huggingface_hub import HfApi

        return HfApi()

    def sha(self) -> str:
        if self.revision is None or len(self.revision) != 40:
            try:
                self.revision = self._api().dataset_info(self.repo_id, revision=self.revision).sha
            except Exception as e:  # noqa: BLE001 - offline, auth, not found: all end the same way
                raise ConfigError(
                    f"cannot reach {self.repo_id} on the Hub ({type(e).__name__}: {e}); "
                    "download a snapshot and pass --source local:PATH"
                ) from None
        return self.revision

    def describe(self) -> str:
        return f"{self.repo_id}@{self.sha()}"

    def files(self) -> list[str]:
        if self._files is None:
            self._files = sorted(self._api().list_repo_files(self.repo_id, repo_type="dataset", revision=self.sha()))
        return self._files

    def read_text(self, rel: str) -> str | None:
        if rel not in self.files():
            return None
        return self.path(rel).read_text("utf-8")

    def path(self, rel: str) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.repo_id, rel, repo_type="dataset", revision=self.sha()))

    def data_ref(self, rel: str) -> str:
        return f"hf://datasets/{self.repo_id}@{self.sha()}/{rel}"

    def fingerprint(self, rel: str, previous: dict[str, dict]) -> dict:
        # Content-addressed: the commit fixes every file's bytes.
        return {"file": f"hub:{self.repo_id}@{self.sha()}/{rel}"}


def hub_access() -> HubAccess:
    """The Hub side of `--source hub`; tests replace it with a LocalAccess on a replica folder."""
    return HubAccess()


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


class _RepositorySource:
    access: object
    _repo: Repository | None = None

    def repo(self) -> Repository:
        if self._repo is None:
            self._repo = Repository(self.access.files(), self.access.read_text(README))
        return self._repo

    def __getstate__(self):  # workers re-list lazily if they need to; the listing can be large
        return {k: v for k, v in self.__dict__.items() if k != "_repo"}


class HubSource(_RepositorySource):
    kind = "hub"

    def __init__(self, access=None):
        self.access = access if access is not None else hub_access()
        self._repo = None

    def describe(self) -> str:
        return f"hub:{self.access.describe()}"

    def resolve(self, config: str, split: str) -> SplitFiles | None:
        return self.repo().resolve(config, split)

    def missing_message(self, missing: list[tuple[str, str]]) -> str:
        lines = [f"{c}/{s}: {self.repo().describe_config(c)}" for c, s in missing[:20]]
        more = f"\n  ... ({len(missing)} missing in total)" if len(missing) > 20 else ""
        return f"{self.describe()} has neither the Parquet nor the TFRecord layout for:\n  " + "\n  ".join(lines) + more

    def open(self, sf: SplitFiles):
        origin = f"hub:{HUB_DATASET}/{sf.config}/{sf.split}"
        if sf.kind == "tfrecord":
            files = [self.access.path(f) for f in sf.files]
            info = self.access.path(sf.info)
            return open_files(SplitFiles(sf.config, sf.split, "tfrecord", tuple(map(str, files)), str(info)), files)
        import datasets

        ds = datasets.load_dataset(
            _BUILDERS[sf.kind], data_files=[self.access.data_ref(f) for f in sf.files], split="train"
        )
        return DatasetReader(sf.config, origin, ds)

    def fingerprints(self, sf: SplitFiles, previous: list[dict] | None) -> list[dict]:
        prev = {p["file"]: p for p in previous or []}
        return [self.access.fingerprint(rel, prev) for rel in list(sf.files) + ([sf.info] if sf.info else [])]


class DatasetReader:
    """A split loaded by `datasets.load_dataset`: read back from its Arrow cache files without
    memory-mapping them, so resident memory stays at one chunk however large the split is."""

    def __init__(self, config: str, origin: str, ds):
        self.config, self.origin, self.ds = config, origin, ds

    def file_rows(self) -> list[int]:
        return [len(self.ds)]

    def num_rows(self) -> int:
        return len(self.ds)

    def chunks(self, rows: range):
        files = [Path(c["filename"]) for c in self.ds.cache_files]
        if files:
            chunks = SplitReader(self.config, ArrowFormat(), files).chunks(rows)
        else:
            chunks = RowsReader(self.config, self.origin, self.ds.select(rows).to_list()).chunks(range(len(rows)))
            chunks = (
                Chunk(c.origin, c.columns, c.n_rows, first=c.first + rows.start, offset=c.offset + rows.start)
                for c in chunks
            )
        for c in chunks:
            yield Chunk(self.origin, c.columns, c.n_rows, first=c.offset, offset=c.offset)


class LocalSource(_RepositorySource):
    kind = "local"

    def __init__(self, root: Path):
        self.root = Path(root)
        self.access = LocalAccess(self.root)
        self._repo = None

    def describe(self) -> str:
        return f"local:{self.root}"

    def check_root(self) -> None:
        if not self.root.is_dir():
            raise ConfigError(f"local source {self.root} is not a directory")

    def resolve(self, config: str, split: str) -> SplitFiles | None:
        self.check_root()
        sf = self.repo().resolve(config, split)
        if sf is not None:
            return SplitFiles(
                config,
                split,
                sf.kind,
                tuple(str(self.root / f) for f in sf.files),
                str(self.root / sf.info) if sf.info else None,
            )
        return self._folder_per_config(config, split)

    def _folder_per_config(self, config: str, split: str) -> SplitFiles | None:
        folder = self.root / config
        if not folder.is_dir():
            return None
        files = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and p.suffix in DATA_KINDS_BY_EXT and (p.stem == split or p.stem.startswith(split + "-"))
        )
        kinds = {DATA_KINDS_BY_EXT[p.suffix] for p in files}
        if len(kinds) > 1:
            raise ConfigError(f"{folder}: split {split!r} is stored in several formats: {[p.name for p in files]}")
        if not files:
            return None
        return SplitFiles(config, split, kinds.pop(), tuple(str(p) for p in files))

    def missing_message(self, missing: list[tuple[str, str]]) -> str:
        def why(c: str, s: str) -> str:
            if (self.root / c).is_dir():
                present = sorted(p.name for p in (self.root / c).iterdir())[:8]
                return f"{c}/{s}: no {s}.parquet|jsonl|arrow or {s}-*.ext in {self.root / c} (found {present})"
            return f"{c}/{s}: {self.repo().describe_config(c)}, and no folder {self.root / c}"

        shown = "\n  ".join(why(c, s) for c, s in missing[:20])
        more = f"\n  ... ({len(missing)} missing in total)" if len(missing) > 20 else ""
        return f"local source {self.root} lacks data for:\n  {shown}{more}"

    def open(self, sf: SplitFiles):
        return open_files(sf, [Path(f) for f in sf.files])

    def fingerprints(self, sf: SplitFiles, previous: list[dict] | None) -> list[dict]:
        prev = {p["file"]: p for p in previous or []}
        paths = list(sf.files) + ([sf.info] if sf.info else [])
        return [file_fingerprint(p, prev.get(str(p))) for p in paths]


class EmbeddedSource:
    kind = "embedded"

    def describe(self) -> str:
        return "embedded"

    @staticmethod
    def _generator(config: str):
        """The module generating `config`: the embedded mixture's or the latent-skill mixtures'."""
        for module in (embedded, latent_skills):
            if config in set(module.config_names()):
                return module
        return None

    def resolve(self, config: str, split: str) -> SplitFiles | None:
        if self._generator(config) is None:
            return None
        return SplitFiles(config, split, "embedded", (f"embedded:{config}/{split}",))

    def missing_message(self, missing: list[tuple[str, str]]) -> str:
        valid = sorted(embedded.config_names()) + sorted(latent_skills.config_names())
        return (
            f"the embedded source only provides the embedded mixture and the latent-skill mixtures; it has no "
            f"configs {sorted({c for c, _ in missing})[:10]}; valid configs: {valid}"
        )

    def open(self, sf: SplitFiles):
        return RowsReader(sf.config, sf.files[0], self._generator(sf.config).records(sf.config, sf.split))

    def fingerprints(self, sf: SplitFiles, previous: list[dict] | None) -> list[dict]:
        # Generated data: its identity is its content (cheap to regenerate at this size).
        body = json.dumps(self._generator(sf.config).records(sf.config, sf.split), sort_keys=True).encode("utf-8")
        return [{"file": sf.files[0], "sha256": hashlib.sha256(body).hexdigest(), "hashed": "generated"}]


def parse_source(text: str):
    if text == "hub":
        return HubSource()
    if text == "embedded":
        return EmbeddedSource()
    if text.startswith("local:") and len(text) > len("local:"):
        return LocalSource(Path(text[len("local:") :]).expanduser().resolve())
    raise ConfigError(f"unknown source {text!r}; valid sources: {', '.join(SOURCE_KINDS)}")
