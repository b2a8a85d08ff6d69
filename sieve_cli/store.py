"""The capture store format: per-site statistics in one Zarr v3 folder (`WS/capture/stats.zarr`).

One group per input site (named by `Matrix.site`, e.g. "0.attn_in"): array `gram` float64
(D, D), array `samples` float16 (n, D), attributes `tokens`, `site`, `matrices`. The root
attribute `sieve_capture` holds the writer's state (schema, fingerprint, progress).

Two writers share the format. The in-memory capture rewrites the whole store after each
chunk into a sibling folder and swaps it in by rename (a crash leaves the old or the new
state, never half); the block-wise capture adds one block's sites at a time. Readers never
see which wrote it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .files import remove_path

STORE_SCHEMA = 1
STATE_KEY = "sieve_capture"  # root attribute holding the writer's state


@dataclass(frozen=True)
class SiteStats:
    gram: torch.Tensor  # float64 (D, D): sum of x x^T over non-padding calibration tokens
    samples: torch.Tensor  # float16 (n, D): uniform reservoir sample of input rows
    tokens: int
    matrices: list[str]  # full names of the matrices that read this site


# ---- reading ---------------------------------------------------------------------


def _open_store(path: str | os.PathLike):
    import zarr

    path = Path(path)
    recover_store(path)
    if not path.exists():
        raise InputError(f"no capture store at {path}; run `sieve capture -w WORKSPACE --task TASK.yaml` first")
    return zarr.open_group(str(path), mode="r")


def _site_from_group(group) -> SiteStats:
    attrs = group.attrs
    return SiteStats(
        gram=torch.from_numpy(np.asarray(group["gram"][...], dtype=np.float64)),
        samples=torch.from_numpy(np.asarray(group["samples"][...], dtype=np.float16)),
        tokens=int(attrs["tokens"]),
        matrices=list(attrs["matrices"]),
    )


def read_site(path: str | os.PathLike, site: str) -> SiteStats:
    """The statistics of one input site (e.g. "0.attn_in") from a capture store."""
    root = _open_store(path)
    if site not in root.group_keys():
        raise InputError(f"capture store {path} has no site {site!r}; rerun `sieve capture` for this model")
    return _site_from_group(root[site])


def read_stats(path: str | os.PathLike) -> dict[str, SiteStats]:
    """Every site's statistics, in the model's block order."""
    root = _open_store(path)
    present = set(root.group_keys())
    order = root.attrs.get(STATE_KEY, {}).get("sites") or sorted(present)
    return {site: _site_from_group(root[site]) for site in order if site in present}


def store_state(path: str | os.PathLike) -> dict | None:
    """The writer's state in the store's root attributes (None when there is no store)."""
    path = Path(path)
    recover_store(path)
    if not path.exists():
        return None
    import zarr

    return dict(zarr.open_group(str(path), mode="r").attrs.get(STATE_KEY, {}))


# ---- writing ---------------------------------------------------------------------


def _siblings(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")


def recover_store(path: Path) -> None:
    """Finish or undo a swap interrupted by a crash; drop a half-written new state."""
    tmp, old = _siblings(path)
    if not path.exists() and old.exists():
        os.replace(old, path)  # crashed between the two renames: the previous state is whole
    remove_path(old)
    remove_path(tmp)


def remove_store(path: Path) -> None:
    for p in (path, *_siblings(path)):
        remove_path(p)


def _write_sites(root, sites: dict[str, SiteStats]) -> None:
    for site, st in sites.items():
        group = root.create_group(site, overwrite=True,
                                  attributes={"tokens": st.tokens, "site": site, "matrices": st.matrices})
        dim = st.gram.shape[0]
        # float64 running sums do not compress; skipping the codec keeps each write cheap
        group.create_array("gram", data=st.gram.cpu().numpy(), chunks=(dim, dim), compressors=None)
        rows = st.samples.cpu().numpy()
        group.create_array("samples", data=rows, chunks=(max(rows.shape[0], 1), dim), compressors=None)


def write_store(path: Path, sites: dict[str, SiteStats], state: dict) -> None:
    """Write the whole state beside `path`, then swap it in: a crash leaves old or new, never half."""
    import zarr

    tmp, old = _siblings(path)
    remove_path(tmp)  # a link planted there is unlinked, never written through
    root = zarr.open_group(str(tmp), mode="w")
    _write_sites(root, sites)
    root.attrs[STATE_KEY] = state  # written last: a store without it is never swapped in
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    remove_path(old)


def add_sites(path: Path, sites: dict[str, SiteStats], state: dict) -> None:
    """Add (or replace) some sites in a store, then record `state`.

    The block-wise writer: each block's sites are written once. The state is written after
    the arrays, so a crash mid-block leaves a state that does not count the block, and a
    resumed run writes its sites again.
    """
    import zarr

    recover_store(path)
    root = zarr.open_group(str(path), mode="a")
    _write_sites(root, sites)
    root.attrs[STATE_KEY] = state
