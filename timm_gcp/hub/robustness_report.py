"""What `timm-gcp robustness` writes: robustness.json, robustness.md, robustness.png (matplotlib, when installed) and,
on request, a section of the exported model card; every file complete or not at all."""
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from .export import _check_no_local_paths, record_manifest
from .robustness import CORRUPTION_FAMILIES

CARD_START, CARD_END = '<!-- timm-gcp robustness -->', '<!-- /timm-gcp robustness -->'


def write_atomic(path: Union[str, os.PathLike], write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path`: a reader sees the old file or the
    complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: Union[str, os.PathLike], text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in rows])


def fmt(value: Optional[float], digits: int = 1) -> str:
    return '—' if value is None else f'{value:.{digits}f}'


def display_name(spec: Optional[str]) -> str:
    """A model as reports name it: a local folder by its name (a run's `RUN/model` as such), else as given."""
    if spec is None:
        return ''
    path = Path(spec[len('local-dir:'):] if spec.startswith('local-dir:') else spec)
    if not path.exists():
        return spec
    path = path.resolve()
    return f'{path.parent.name}/{path.name}' if path.name == 'model' else path.name


def _description(result: Dict[str, Any]) -> str:
    size = ' x '.join(map(str, result['input_size'][1:]))
    subset = ('all 15 ImageNet-C corruptions' if len(result['corruptions']) == 15
              else f'{len(result["corruptions"])} of the 15 ImageNet-C corruptions')
    return (f'{result["images"]} validation images of `{result["dataset"]}` ({result["classes"]} classes), {subset} '
            f'at severities {", ".join(map(str, result["severities"]))} ({result["corruption_library"]}), applied at '
            f'{size} px after the model\'s resize and crop, seed {result["seed"]}. Top-1 errors in %.')


def _summary_rows(result: Dict[str, Any]) -> List[List[str]]:
    roles = list(result['results'])
    entries = [result['results'][role] for role in roles]
    rows = [['clean error'] + [fmt(e['errors']['clean']) for e in entries],
            ['mean corruption error (unnormalised)'] + [fmt(e['unnormalized']['mean_corruption_error'])
                                                        for e in entries],
            ['relative mean corruption error (unnormalised)']
            + [fmt(e['unnormalized']['relative_mean_corruption_error']) for e in entries]]
    if result['baseline'] is not None:
        rows += [['mCE (baseline = 100)'] + [fmt(e['normalized']['mce']) for e in entries],
                 ['relative mCE (baseline = 100)'] + [fmt(e['normalized']['relative_mce']) for e in entries]]
    return rows


def _corruption_rows(result: Dict[str, Any]) -> List[List[str]]:
    model = result['results']['model']
    baseline = result['results'].get('baseline')
    rows = []
    for family, names in CORRUPTION_FAMILIES.items():
        for name in (n for n in names if n in result['corruptions']):
            def cell(entry: Dict[str, Any], severity: Any) -> str:
                return fmt(entry['errors']['corruptions'][name][severity])
            severities = list(model['errors']['corruptions'][name])
            row = [family, name] + [cell(model, s) + (f' / {cell(baseline, s)}' if baseline else '')
                                    for s in severities]
            row.append(fmt(model['unnormalized']['mean_error'][name])
                       + (f' / {fmt(baseline["unnormalized"]["mean_error"][name])}' if baseline else ''))
            if baseline:
                row += [fmt(model['normalized']['ce'][name]), fmt(model['normalized']['relative_ce'][name])]
            rows.append(row)
    return rows


def _corruption_header(result: Dict[str, Any]) -> List[str]:
    header = ['family', 'corruption'] + [f'severity {s}' for s in result['severities']] + ['mean']
    return header + (['CE', 'relative CE'] if result['baseline'] is not None else [])


def robustness_markdown(result: Dict[str, Any]) -> str:
    """The Markdown report: summary, then the error of every corruption and severity (model / baseline)."""
    model, baseline = display_name(result['model']), display_name(result['baseline'])
    norm = (f'CE and mCE are normalised by the baseline `{baseline}` (Hendrycks & Dietterich, ICLR 2019: '
            f'CE_c = sum_s E_s,c / sum_s E^baseline_s,c).' if result['baseline'] is not None else
            'No baseline was given: the corruption errors are unnormalised means (not CE/mCE).')
    header = ['', f'model `{model}`'] + ([f'baseline `{baseline}`'] if result['baseline'] is not None else [])
    return '\n\n'.join([
        f'# Corruption robustness of `{model}` on `{result["dataset"]}`', _description(result) + ' ' + norm,
        markdown_table(header, _summary_rows(result)),
        '## Error per corruption and severity' + (' (model / baseline)' if result['baseline'] is not None else ''),
        markdown_table(_corruption_header(result), _corruption_rows(result)),
        f'{result["images_per_s"]:.1f} images/s (decoded, corrupted and classified, per process).']) + '\n'


def plot_robustness(result: Dict[str, Any], path: Path) -> None:
    """Error against severity (0 = clean) per corruption, one panel per family; model solid, baseline dashed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    families = [(f, [n for n in names if n in result['corruptions']]) for f, names in CORRUPTION_FAMILIES.items()]
    families = [(f, names) for f, names in families if names]
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.8), sharey=True, squeeze=False)
    styles = {'model': '-', 'baseline': '--'}
    for ax, (family, names) in zip(axes[0], families):
        for color, name in zip(plt.rcParams['axes.prop_cycle'].by_key()['color'], names):
            for role, entry in result['results'].items():
                errors = entry['errors']
                severities = list(errors['corruptions'][name])
                ax.plot([0] + [int(s) for s in severities],
                        [errors['clean']] + [errors['corruptions'][name][s] for s in severities],
                        styles[role], color=color, marker='o', ms=3,
                        label=name if role == 'model' else None)
        ax.set_title(family)
        ax.set_xlabel('severity (0 = clean)')
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel('top-1 error (%)')
    baseline = f' (solid) vs {display_name(result["baseline"])} (dashed)' if result['baseline'] else ''
    fig.suptitle(f'{display_name(result["model"])}{baseline} on {result["dataset"]}', fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format='png'))
    plt.close(fig)


def write_robustness_report(result: Dict[str, Any], output_dir: Union[str, os.PathLike]) -> List[Path]:
    """robustness.md, robustness.png (skipped without matplotlib) and, last, robustness.json under `output_dir`;
    returns the files written."""
    output_dir = Path(output_dir)
    written = [output_dir / 'robustness.md']
    write_text_atomic(written[0], robustness_markdown(result))
    try:
        plot_robustness(result, output_dir / 'robustness.png')
        written.append(output_dir / 'robustness.png')
    except ImportError:  # matplotlib is optional (pip install "timm-gcp[bench]")
        pass
    write_text_atomic(output_dir / 'robustness.json', json.dumps(result, indent=1, allow_nan=False))
    return written + [output_dir / 'robustness.json']


def card_section(result: Dict[str, Any]) -> str:
    """The model card's robustness section, between markers so that a later measurement replaces it."""
    baseline = display_name(result['baseline'])
    lines = [CARD_START, '## Corruption robustness', '',
             f'Measured with `timm-gcp robustness` on the validation split of `{result["dataset"]}` (not on '
             f'ImageNet-C): {_description(result)}'
             + (f' CE and mCE are normalised by the baseline `{baseline}`.' if result['baseline'] is not None else
                ' Without a baseline the corruption errors are unnormalised means, not CE/mCE.'), '',
             markdown_table([''] + ['this model'] + ([f'baseline `{baseline}`'] if result['baseline'] else []),
                            _summary_rows(result)), '',
             markdown_table(_corruption_header(result), _corruption_rows(result)), CARD_END]
    return '\n'.join(lines)


def update_card(folder: Union[str, os.PathLike], result: Dict[str, Any]) -> Path:
    """Put `result` into the README.md of an export folder (replacing an earlier robustness section, else before
    'How to use'), atomically, and record the changed card in the folder's manifest; ValueError if the section would
    publish a local path."""
    card = Path(folder) / 'README.md'
    text, section = card.read_text(), card_section(result)
    _check_no_local_paths('the robustness section', section)
    if CARD_START in text and CARD_END in text:
        head, rest = text.split(CARD_START, 1)
        text = head + section + rest.split(CARD_END, 1)[1]
    elif '\n## How to use' in text:
        head, rest = text.split('\n## How to use', 1)
        text = f'{head}\n{section}\n\n## How to use{rest}'
    else:
        text = f'{text.rstrip()}\n\n{section}\n'
    write_text_atomic(card, text)
    record_manifest(folder)  # the export's record of its files, which `timm-gcp verify` checks
    return card
