"""The Hub model card (README.md): YAML metadata with the measured accuracy, recipe, command, usage and citations."""
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..layers import gcp_feature_dim
from .citations import citations_for

__all__ = ['CardInfo', 'build_model_card', 'card_metrics', 'REPO_ID_PLACEHOLDER', 'TOP1_NAME', 'TOP5_NAME']

REPO_ID_PLACEHOLDER = '<repo-id>'  # push_model replaces it with the real repo id in the uploaded card
TOP1_NAME = 'top-1 accuracy'
TOP5_NAME = 'top-5 accuracy'
TAGS = ['image-classification', 'timm', 'timm-gcp']


@dataclass
class CardInfo:
    """What the card says about one exported model."""
    architecture: str
    num_classes: int
    num_params: int
    input_size: Sequence[int]
    model_args: Dict[str, Any] = field(default_factory=dict)
    meta_layer: Optional[str] = None
    license: str = 'apache-2.0'
    dataset: Optional[str] = None
    metrics: Optional[Mapping[str, Any]] = None
    recipe: Optional[Mapping[str, Any]] = None
    command: Optional[str] = None
    base_model: Optional[str] = None  # Hub id of the weights the run started from
    repo_id: str = REPO_ID_PLACEHOLDER


def _card_data(info: CardInfo) -> ModelCardData:
    metrics = info.metrics or {}
    eval_results = [
        EvalResult(
            task_type='image-classification',
            dataset_type=info.dataset or 'unknown',
            dataset_name=info.dataset or 'unknown',
            dataset_split='validation',
            metric_type='accuracy',
            metric_name=name,
            metric_value=float(metrics[key]),
        )
        for key, name in (('top1', TOP1_NAME), ('top5', TOP5_NAME)) if metrics.get(key) is not None
    ]
    return ModelCardData(
        library_name='timm',
        pipeline_tag='image-classification',
        tags=list(TAGS),
        license=info.license,
        base_model=info.base_model,
        datasets=[info.dataset] if info.dataset else None,
        model_name=info.repo_id.split('/')[-1] if eval_results else None,
        eval_results=eval_results or None,
    )


def _architecture_section(info: CardInfo) -> str:
    gcp_dim = info.model_args.get('gcp_dim')
    rows = [
        ('architecture', f'`{info.architecture}`'),
        ('started from', f'[`{info.base_model}`](https://huggingface.co/{info.base_model})' if info.base_model
         else 'no Hub weights (from scratch or a local file)'),
        ('meta-layer', f'`{info.meta_layer}`' if info.meta_layer else 'none (no covariance pooling head)'),
        ('GCP dimension', f'{gcp_dim} ({gcp_feature_dim(gcp_dim):,} features)' if gcp_dim else None),
        ('input size', ' x '.join(str(s) for s in info.input_size)),
        ('classes', str(info.num_classes)),
        ('parameters', f'{info.num_params:,}'),
        ('model_args', f'`{json.dumps(info.model_args, sort_keys=True)}`'),
    ]
    lines = ['| | |', '|---|---|'] + [f'| {k} | {v} |' for k, v in rows if v is not None]
    return '\n'.join(lines)


def _results_section(metrics: Mapping[str, Any], dataset: Optional[str]) -> str:
    lines = [f'Measured on the validation split of `{dataset or "unknown"}` (accuracy in %).', '',
             '| metric | value |', '|---|---|']
    lines += [f'| {k} | {v} |' for k, v in metrics.items()]
    return '\n'.join(lines)


def _usage_section(repo_id: str) -> str:
    return f"""timm has no plugin entry points, so import `timm_gcp` first: it registers the GCP architectures.

```python
import timm
import timm_gcp  # registers the gcp_* / gsop_* architectures with timm

model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config, is_training=False)
# logits = model(transform(image).unsqueeze(0))
```

Fine-tune on another dataset: `timm.create_model('hf-hub:{repo_id}', pretrained=True, num_classes=N)` replaces only
the classifier."""


def build_model_card(info: CardInfo) -> ModelCard:
    """Render the card (ModelCard raises ValueError when its YAML metadata does not parse back)."""
    sections = [f'# {info.architecture}' + (f' on {info.dataset}' if info.dataset else ''), '',
                'Image classification model' + (' with global covariance pooling' if info.meta_layer else '')
                + ', exported with timm-gcp.', '',
                '## Model details', '', _architecture_section(info)]
    if info.metrics:
        sections += ['', '## Results', '', _results_section(info.metrics, info.dataset)]
    if info.recipe or info.command:
        sections += ['', '## Training', '']
        if info.command:
            sections += ['Exact command:', '', '```bash', info.command, '```', '']
        if info.recipe:
            sections += ['Full recipe:', '', '```yaml', yaml.safe_dump(dict(info.recipe), sort_keys=True).rstrip(),
                         '```']
    sections += ['', '## How to use', '', _usage_section(info.repo_id)]
    bibtex = citations_for(info.architecture, info.meta_layer)
    if bibtex:
        sections += ['', '## Citation', '', '```bibtex', '\n\n'.join(bibtex), '```']
    return ModelCard(f'---\n{_card_data(info).to_yaml()}\n---\n\n' + '\n'.join(sections) + '\n')


def card_metrics(card: ModelCard) -> Dict[str, float]:
    """{'top1': .., 'top5': ..} from a card's model-index (what verify compares against)."""
    names = {TOP1_NAME: 'top1', TOP5_NAME: 'top5'}
    results: List[EvalResult] = card.data.eval_results or []
    return {names[r.metric_name]: float(r.metric_value) for r in results if r.metric_name in names}
