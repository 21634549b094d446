"""The sha256 manifest of an export folder: written by export_model beside the files it exports, written again by
push for the files it uploads (the card names the repo there), checked by verify."""
import io
import json
from pathlib import Path
from typing import Dict, Mapping, Tuple, Union

from huggingface_hub.utils.sha import sha_fileobj

MANIFEST_NAME = 'timm_gcp_manifest.json'


def file_digest(source: Union[bytes, Path]) -> Tuple[str, int]:
    """(sha256 hex, size) of in-memory bytes or a file."""
    with (io.BytesIO(source) if isinstance(source, bytes) else open(source, 'rb')) as f:
        return sha_fileobj(f).hex(), f.tell()


def build_manifest(files: Mapping[str, Union[bytes, Path]], **info: str) -> bytes:
    """JSON manifest {format: 1, files: {name: {sha256, size}}, **info} of the files beside it."""
    digests = {name: dict(zip(('sha256', 'size'), file_digest(source))) for name, source in sorted(files.items())}
    return (json.dumps({'format': 1, 'files': digests, **info}, indent=2, sort_keys=True) + '\n').encode()


def read_manifest(path: Path) -> Dict[str, Tuple[str, int]]:
    """{file: (sha256, size)} of a manifest; ValueError if it is not one."""
    try:
        return {name: (v['sha256'], v['size']) for name, v in json.loads(Path(path).read_text())['files'].items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f'{MANIFEST_NAME} is not a timm-gcp manifest: {e!r}') from e
