"""Checksums of a published folder: sha256 per file, recorded at push time and checked by verify."""
import io
import json
from pathlib import Path
from typing import Dict, Mapping, Tuple, Union

from huggingface_hub.utils.sha import sha_fileobj

__all__ = ['MANIFEST_NAME', 'file_digest', 'build_manifest', 'parse_manifest']

MANIFEST_NAME = 'timm_gcp_manifest.json'
MANIFEST_FORMAT = 1


def file_digest(source: Union[bytes, Path]) -> Tuple[str, int]:
    """(sha256 hex, size) of in-memory bytes or a file."""
    with (io.BytesIO(source) if isinstance(source, bytes) else open(source, 'rb')) as f:
        return sha_fileobj(f).hex(), f.tell()


def build_manifest(files: Mapping[str, Union[bytes, Path]], **info: str) -> bytes:
    """JSON manifest {format, files: {name: {sha256, size}}, **info} of the files uploaded beside it."""
    digests = {name: file_digest(source) for name, source in sorted(files.items())}
    manifest = {
        'format': MANIFEST_FORMAT,
        'files': {name: {'sha256': sha, 'size': size} for name, (sha, size) in digests.items()},
        **info,
    }
    return (json.dumps(manifest, indent=2, sort_keys=True) + '\n').encode()


def parse_manifest(path: Path) -> Dict[str, Dict[str, object]]:
    """{name: {sha256, size}} from a manifest file; ValueError when it is not one."""
    try:
        manifest = json.loads(Path(path).read_text())
        files = manifest['files']
        if manifest.get('format') != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"unsupported manifest format {manifest.get('format')!r}")
        return {name: {'sha256': str(v['sha256']), 'size': int(v['size'])} for name, v in files.items()}
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f'{path} is not a timm-gcp manifest: {e}') from e
