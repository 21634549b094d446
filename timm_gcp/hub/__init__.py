"""Hub tooling: export a Hub-ready folder, model cards, push, verify, convert official checkpoints, the catalogue,
and the `timm-gcp` command. Names load on first use, so the command's `--help` imports none of them."""
import importlib
from typing import Any

_EXPORTS = {
    'catalogue': ('CatalogueEntry', 'check_registry', 'load_catalogue', 'render_table'),
    'convert': ('convert_checkpoint',),
    'export': ('CARD_NAME', 'CONFIG_NAME', 'EXPORT_FILES', 'WEIGHTS_NAME', 'check_export_dir', 'export_model',
               'export_model_args'),
    'model_card': ('CardInfo', 'build_model_card', 'card_metrics'),
    'publishable': ('check_finite_metrics', 'check_finite_tensors', 'check_no_local_paths', 'check_repo_id'),
    'push': ('PushResult', 'push_model'),
    'verify': ('VerificationError', 'VerifyReport', 'verify_folder', 'verify_repo'),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(f'.{_MODULE_OF[name]}', __name__), name)
