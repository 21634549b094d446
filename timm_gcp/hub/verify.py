"""Verify a published repo (checksums against the push manifest and the Hub's object ids, `hf-hub:` loading) or a
local export folder (files, config, `local-dir:` loading), and, given data, the card's accuracy."""
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import timm
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash
from safetensors.torch import load_file
from timm.data import create_transform, resolve_model_data_config

from ..training.data import create_dataloader, create_eval_dataset
from ..training.evaluate import evaluate
from .export import CARD_NAME, CONFIG_NAME, EXPORT_FILES, WEIGHTS_NAME, check_export_dir
from .manifest import MANIFEST_NAME, file_digest, parse_manifest
from .model_card import card_metrics
from .publishable import check_repo_id

__all__ = ['verify_repo', 'verify_folder', 'VerificationError', 'VerifyReport']

_UNTRACKED = ('.gitattributes', MANIFEST_NAME)


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
    if entry.lfs is not None:
        if entry.lfs.sha256 != sha:
            raise VerificationError(f'{name}: Hub LFS sha256 {entry.lfs.sha256} != downloaded {sha}')
    elif entry.blob_id != git_hash(path.read_bytes()):
        raise VerificationError(f'{name}: Hub git oid {entry.blob_id} does not match the downloaded bytes')


def _check_checksums(local: Path, tree: Dict[str, RepoFile]) -> Dict[str, str]:
    if not (local / MANIFEST_NAME).is_file():
        raise VerificationError(f'no {MANIFEST_NAME} in the repo: it was not published with timm-gcp push')
    _check_object_id(MANIFEST_NAME, local / MANIFEST_NAME, file_digest(local / MANIFEST_NAME)[0], tree[MANIFEST_NAME])
    try:
        manifest = parse_manifest(local / MANIFEST_NAME)
    except ValueError as e:
        raise VerificationError(str(e)) from e
    missing = [name for name in EXPORT_FILES if name not in manifest]
    if missing:
        raise VerificationError(f'manifest does not cover {missing}')
    uncovered = sorted(set(tree) - set(manifest) - set(_UNTRACKED))
    if uncovered:
        raise VerificationError(f'repo holds files the manifest does not cover: {uncovered}')
    for name, expected in manifest.items():
        if name not in tree:
            raise VerificationError(f'{name} is listed in the manifest but absent from the repo')
        sha, size = file_digest(local / name)
        if (sha, size) != (expected['sha256'], expected['size']):
            raise VerificationError(f"{name}: downloaded sha256 {sha} ({size} B) != pushed {expected['sha256']} "
                                    f"({expected['size']} B)")
        _check_object_id(name, local / name, sha, tree[name])
    return {name: entry['sha256'] for name, entry in manifest.items()}


def _check_export(folder: Path) -> None:
    try:
        check_export_dir(folder)
    except ValueError as e:
        raise VerificationError(str(e)) from e


def _check_model(report: VerifyReport, model_name: str, folder: Path, data_dir: Optional[Union[str, Path]],
                 tolerance: float, batch_size: int, hflip_average: bool, **create_kwargs) -> None:
    """Load `model_name` as timm does, compare with `folder`'s weights bit for bit, and with `data_dir` re-evaluate
    and compare with the card's top-1/top-5 (filled into `report`)."""
    try:
        model = timm.create_model(model_name, pretrained=True, **create_kwargs).eval()
    except (RuntimeError, ValueError) as e:  # e.g. weights that do not fit the architecture config.json describes
        raise VerificationError(f'{model_name} does not load with timm: {e}') from e
    expected = load_file(str(folder / WEIGHTS_NAME))
    state = model.state_dict()
    differ = sorted(k for k, v in expected.items() if k not in state or not torch.equal(state[k], v))
    if differ or set(state) - set(expected):
        raise VerificationError(f"{model_name.split(':')[0]}: loading did not reproduce {WEIGHTS_NAME}: differing "
                                f"{differ[:5]}, missing {sorted(set(state) - set(expected))[:5]}")
    report.card = card_metrics(ModelCard.load(folder / CARD_NAME))
    if data_dir is None:
        return
    if not report.card:
        raise VerificationError(f'{CARD_NAME} has no model-index top-1/top-5 to compare with')
    label_names = json.loads((folder / CONFIG_NAME).read_text()).get('label_names')
    dataset = create_eval_dataset(data_dir, label_names)  # train.py's reader: same class order, same unreadable rule
    dataset.transform = create_transform(**resolve_model_data_config(model))
    result = evaluate(model, create_dataloader(dataset, batch_size, False, 0), flip_test=hflip_average)
    report.measured = {'top1': result['top1'], 'top5': result['top5'], 'count': result['val_images']}
    for key, expected_value in report.card.items():
        if abs(report.measured[key] - expected_value) > tolerance:
            raise VerificationError(
                f'{key}: re-evaluated {report.measured[key]:.2f}% on {data_dir} vs card {expected_value:.2f}% '
                f'(tolerance {tolerance} points)')


def verify_folder(
        folder: Union[str, Path],
        *,
        data_dir: Optional[Union[str, Path]] = None,
        tolerance: float = 0.5,
        batch_size: int = 32,
        hflip_average: bool = False,
) -> VerifyReport:
    """Check a local export before publishing it: what push checks (files, config, finite weights and metrics, no
    local paths), `local-dir:` loading bit-identical to its weights and, with `data_dir`, the card's accuracy."""
    folder = Path(folder)
    _check_export(folder)
    report = VerifyReport(str(folder), None, {name: file_digest(folder / name)[0] for name in EXPORT_FILES})
    _check_model(report, f'local-dir:{folder}', folder, data_dir, tolerance, batch_size, hflip_average)
    return report


def verify_repo(
        repo_id: str,
        *,
        revision: Optional[str] = None,
        data_dir: Optional[Union[str, Path]] = None,
        tolerance: float = 0.5,
        batch_size: int = 32,
        hflip_average: bool = False,
        expected_sha256: Optional[Mapping[str, str]] = None,
        token: Optional[str] = None,
) -> VerifyReport:
    """Download `repo_id` into a fresh cache and check it; raises VerificationError on any mismatch.

    `tolerance` is in accuracy points (%) between re-evaluated and card top-1/top-5. `expected_sha256` ({file: sha})
    is a record kept outside the repo (the catalogue, push's output) that the files must match too.
    """
    check_repo_id(repo_id)
    api = HfApi(token=token)
    commit = api.model_info(repo_id, revision=revision or 'main').sha  # pin everything below to one commit
    with tempfile.TemporaryDirectory(prefix='timm_gcp_verify_') as cache:
        local = Path(snapshot_download(repo_id, revision=commit, cache_dir=cache, token=token))
        tree = {f.path: f for f in api.list_repo_tree(repo_id, revision=commit, recursive=True)
                if isinstance(f, RepoFile)}
        sha256 = _check_checksums(local, tree)
        _check_export(local)
        for name, sha in (expected_sha256 or {}).items():
            if sha256.get(name) != sha:
                raise VerificationError(f'{name}: sha256 {sha256.get(name)} differs from the expected {sha}')
        report = VerifyReport(repo_id, commit, sha256)
        _check_model(report, f'hf-hub:{repo_id}@{commit}', local, data_dir, tolerance, batch_size, hflip_average,
                     cache_dir=cache)
    return report
