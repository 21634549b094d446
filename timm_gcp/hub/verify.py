"""Verify a published repo (checksums against the push manifest and the Hub's object ids, `hf-hub:` loading) or a
local export folder (`local-dir:` loading), and, given data, the card's accuracy."""
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import timm
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash
from safetensors.torch import load_file
from timm.data import create_transform, resolve_model_data_config

from .._text import preview
from ..training.data import create_dataloader, create_eval_dataset
from ..training.evaluate import evaluate
from .export import EXPORT_FILES, card_metrics, check_export_dir
from .manifest import MANIFEST_NAME, file_digest, read_manifest
from .push import check_repo_id


class VerificationError(Exception):
    """The repo or folder does not match what was pushed or exported, or its card."""


@dataclass
class VerifyReport:
    source: str  # the repo id, or the local folder
    commit: Optional[str]  # None for a local folder
    sha256: Dict[str, str]
    measured: Dict[str, float] = field(default_factory=dict)
    card: Dict[str, float] = field(default_factory=dict)


def _check_object_id(name: str, path: Path, sha: str, entry: RepoFile) -> None:
    """The downloaded file against the Hub's own id of it: the LFS sha256, or the git blob id of a small file."""
    kind, expected, found = (('LFS sha256', entry.lfs.sha256, sha) if entry.lfs is not None
                             else ('git oid', entry.blob_id, git_hash(path.read_bytes())))
    if expected != found:
        raise VerificationError(f'{name}: Hub {kind} {expected} does not match the downloaded {found}')


def _read_manifest(path: Path) -> Dict[str, Tuple[str, int]]:
    try:
        return read_manifest(path)
    except ValueError as e:
        raise VerificationError(str(e)) from e


def _check_export_manifest(folder: Path) -> None:
    """Every file of a local export against the sha256 and size export_model recorded in its manifest."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise VerificationError(f'{folder} has no {MANIFEST_NAME}: without the sha256 that export_model records for '
                                f'every file it writes, the files cannot be checked; export the model again')
    manifest = _read_manifest(path)
    unlisted = sorted(set(EXPORT_FILES) - set(manifest))
    if unlisted:
        raise VerificationError(f'{path} does not list {unlisted}: not an export manifest')
    for name, (sha, size) in sorted(manifest.items()):
        found = file_digest(folder / name) if (folder / name).is_file() else None
        if found != (sha, size):
            now = f'sha256 {found[0]} ({found[1]} B)' if found else 'missing'
            raise VerificationError(f'{folder / name} differs from the export: {now}, recorded {sha} ({size} B) in '
                                    f'{MANIFEST_NAME}')


def _check_checksums(local: Path, tree: Dict[str, RepoFile]) -> Dict[str, str]:
    """Every downloaded file against the push manifest and the Hub's object ids; returns {file: sha256}."""
    path = local / MANIFEST_NAME
    if not path.is_file():
        raise VerificationError(f'no {MANIFEST_NAME} in the repo: it was not published with timm-gcp push')
    _check_object_id(MANIFEST_NAME, path, file_digest(path)[0], tree[MANIFEST_NAME])
    manifest = _read_manifest(path)
    uncovered = sorted(set(tree) - set(manifest) - {'.gitattributes', MANIFEST_NAME})
    if uncovered:
        raise VerificationError(f'repo holds files the manifest does not cover: {uncovered}')
    for name, (sha, size) in manifest.items():
        if name not in tree:
            raise VerificationError(f'{name} is listed in the manifest but absent from the repo')
        found = file_digest(local / name)
        if found != (sha, size):
            raise VerificationError(f'{name}: downloaded sha256 {found[0]} ({found[1]} B) != pushed {sha} ({size} B)')
        _check_object_id(name, local / name, sha, tree[name])
    return {name: sha for name, (sha, _) in manifest.items()}


def _check_model(model_name: str, folder: Path, data_dir: Optional[Union[str, Path]], tolerance: float,
                 batch_size: int, hflip_average: bool, cache_dir: Optional[str] = None
                 ) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Check the export, load `model_name` as timm does, compare it with `folder`'s weights bit for bit and, with
    `data_dir`, re-evaluate it against the card's top-1/top-5; returns (card metrics, measured)."""
    try:
        config = check_export_dir(folder)
    except ValueError as e:
        raise VerificationError(str(e)) from e
    try:
        model = timm.create_model(model_name, pretrained=True, cache_dir=cache_dir).eval()
    except (RuntimeError, ValueError) as e:  # e.g. weights that do not fit the architecture config.json describes
        raise VerificationError(f'{model_name} does not load with timm: {e}') from e
    expected, state = load_file(str(folder / 'model.safetensors')), model.state_dict()
    differ = sorted(k for k, v in expected.items() if k not in state or not torch.equal(state[k], v))
    missing = sorted(set(state) - set(expected))
    if differ or missing:
        raise VerificationError(f"{model_name.split(':')[0]}: loading did not reproduce model.safetensors: "
                                f"differing: {preview(differ) or 'none'}; missing: {preview(missing) or 'none'}")
    card = card_metrics(ModelCard.load(folder / 'README.md'))
    if data_dir is None:
        return card, {}
    if not card:
        raise VerificationError('README.md has no model-index top-1/top-5 to compare with')
    dataset = create_eval_dataset(data_dir, config.get('label_names'))  # as train.py reads it
    dataset.transform = create_transform(**resolve_model_data_config(model))
    result = evaluate(model, create_dataloader(dataset, batch_size, False, 0), flip_test=hflip_average)
    measured = {'top1': result['top1'], 'top5': result['top5'], 'count': result['val_images']}
    for key, value in card.items():  # the card holds 2 decimals
        if abs(round(measured[key], 2) - value) > tolerance:
            raise VerificationError(f'{key}: re-evaluated {measured[key]:.2f}% on {data_dir} vs card {value:.2f}% '
                                    f'(tolerance {tolerance} points)')
    return card, measured


def verify_folder(folder: Union[str, Path], *, data_dir: Optional[Union[str, Path]] = None, tolerance: float = 0.5,
                  batch_size: int = 32, hflip_average: bool = False) -> VerifyReport:
    """Check a local export before publishing it: every file against the sha256 export_model recorded, push's checks,
    `local-dir:` loading bit-identical to its weights and, with `data_dir`, the card's accuracy."""
    folder = Path(folder)
    _check_export_manifest(folder)
    card, measured = _check_model(f'local-dir:{folder}', folder, data_dir, tolerance, batch_size, hflip_average)
    sha256 = {name: file_digest(folder / name)[0] for name in EXPORT_FILES}
    return VerifyReport(str(folder), None, sha256, measured, card)


def verify_repo(repo_id: str, *, revision: Optional[str] = None, data_dir: Optional[Union[str, Path]] = None,
                tolerance: float = 0.5, batch_size: int = 32, hflip_average: bool = False,
                expected_sha256: Optional[Mapping[str, str]] = None, token: Optional[str] = None) -> VerifyReport:
    """Download `repo_id` at one pinned commit into a fresh cache and check it (VerificationError on a mismatch).

    `tolerance` is in accuracy points between re-evaluated and card top-1/top-5. `expected_sha256` ({file: sha}) is
    a record kept outside the repo (the catalogue, push's output) that the files must match too.
    """
    check_repo_id(repo_id)
    api = HfApi(token=token)
    commit = api.model_info(repo_id, revision=revision or 'main').sha
    with tempfile.TemporaryDirectory(prefix='timm_gcp_verify_') as cache:
        local = Path(snapshot_download(repo_id, revision=commit, cache_dir=cache, token=token))
        tree = {f.path: f for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
                if isinstance(f, RepoFile)}
        sha256 = _check_checksums(local, tree)
        for name, sha in (expected_sha256 or {}).items():
            if sha256.get(name) != sha:
                raise VerificationError(f'{name}: sha256 {sha256.get(name)} differs from the expected {sha}')
        card, measured = _check_model(f'hf-hub:{repo_id}@{commit}', local, data_dir, tolerance, batch_size,
                                      hflip_average, cache_dir=cache)
    return VerifyReport(repo_id, commit, sha256, measured, card)
