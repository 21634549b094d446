"""export_model and the model card: files, config, atomic replacement, YAML metadata, citations."""
import getpass
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml
from huggingface_hub import ModelCard

import timm_gcp  # noqa: F401  registers the GCP models
from timm_gcp.hub import export as export_module
from timm_gcp.hub.export import card_metrics, citations, export_model, remove_staging
from timm_gcp.meta_layers import MetaLayer, register_meta_layer

METRICS = {'top1': 81.25, 'top5': 97.5, 'best_top1': 82.5, 'best_top5': 98.0, 'best_epoch': 7, 'epochs': 10}
RECIPE = {'lr': 0.0012, 'epochs': 10, 'img_size': 448, 'classifier_lr_mult': 5}
COMMAND = 'accelerate launch train.py -c recipes/finegrained_448.yaml --model gcp_resnet18 --data-dir data/pets'


@pytest.fixture(scope='module')
def gcp_model():
    return timm.create_model('gcp_resnet18', num_classes=3, gcp_dim=16, meta_layer='svd_pade').eval()


def _front_matter(readme: str) -> dict:
    assert readme.startswith('---\n')
    return yaml.safe_load(readme.split('---\n')[1])


def test_export_writes_loadable_folder(gcp_model, tmp_path):
    out = export_model(gcp_model, tmp_path / 'run' / 'model', label_names=['cat', 'dog', 'owl'], metrics=METRICS,
                       recipe=RECIPE, command=COMMAND, dataset='pets')
    assert out == tmp_path / 'run' / 'model'
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.safetensors',
                                                     'timm_gcp_manifest.json']
    manifest = json.loads((out / 'timm_gcp_manifest.json').read_text())
    assert manifest['files'] == {name: {'sha256': hashlib.sha256((out / name).read_bytes()).hexdigest(),
                                        'size': (out / name).stat().st_size}
                                 for name in ('README.md', 'config.json', 'model.safetensors')}
    assert manifest['architecture'] == 'gcp_resnet18'
    assert [p.name for p in (tmp_path / 'run').iterdir()] == ['model']  # no temp dirs left behind
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'gcp_resnet18' and config['label_names'] == ['cat', 'dog', 'owl']
    args = config['model_args']
    assert (args['gcp_dim'], args['meta_layer'], args['layer4_stride'], args['num_classes']) == (16, 'svd_pade', 1, 3)

    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert loaded.meta_layer_name == 'svd_pade'
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), gcp_model(x))


def test_export_plain_timm_model(tmp_path):
    model = timm.create_model('resnet18', num_classes=2).eval()
    out = export_model(model, tmp_path / 'model', label_names=['a', 'b'])
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'resnet18' and config['model_args']['num_classes'] == 2
    readme = (out / 'README.md').read_text()
    assert _front_matter(readme)['library_name'] == 'timm'
    assert '```bibtex' not in readme and 'none (no covariance pooling head)' in readme  # no GCP paper applies
    assert torch.equal(timm.create_model(f'local-dir:{out}', pretrained=True).fc.weight, model.fc.weight)


def test_export_channels_last_model(tmp_path):
    model = timm.create_model('gcp_resnet18', num_classes=2, gcp_dim=8).eval().to(memory_format=torch.channels_last)
    out = export_model(model, tmp_path / 'model', label_names=['a', 'b'])
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # the caller's model is untouched
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert torch.equal(loaded.conv1.weight, model.conv1.weight)


def test_export_replaces_atomically(gcp_model, tmp_path, monkeypatch):
    out = export_model(gcp_model, tmp_path / 'model', label_names=['a', 'b', 'c'], metrics={'top1': 1.0})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_card(*args):
        raise RuntimeError('disk full while writing the card')

    monkeypatch.setattr(export_module, '_model_card', broken_card)
    with pytest.raises(RuntimeError, match='disk full'):
        export_model(gcp_model, out, label_names=['a', 'b', 'c'], metrics={'top1': 2.0})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export is intact
    assert [p.name for p in tmp_path.iterdir()] == ['model']


def test_export_keeps_the_old_export_when_the_final_rename_fails(gcp_model, tmp_path, monkeypatch):
    out = export_model(gcp_model, tmp_path / 'model', label_names=['a', 'b', 'c'], metrics={'top1': 1.0})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rename = os.replace

    def failing_rename(src, dst):
        if Path(src).name.startswith('.model.tmp-'):
            raise OSError('rename failed')
        rename(src, dst)

    monkeypatch.setattr(export_module.os, 'replace', failing_rename)
    with pytest.raises(OSError, match='rename failed'):
        export_model(gcp_model, out, label_names=['a', 'b', 'c'], metrics={'top1': 2.0})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ['model']


def test_export_bad_input(gcp_model, tmp_path):
    with pytest.raises(ValueError, match='label_names has 2 entries but the model has 3 classes'):
        export_model(gcp_model, tmp_path / 'model', label_names=['a', 'b'])
    with pytest.raises(TypeError, match='sequence of str'):
        export_model(gcp_model, tmp_path / 'model', label_names='abc')
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'notes.txt').write_text('keep me')
    with pytest.raises(ValueError, match=r"would lose: \['notes.txt'\]"):
        export_model(gcp_model, tmp_path / 'busy', label_names=['a', 'b', 'c'])
    assert (tmp_path / 'busy' / 'notes.txt').read_text() == 'keep me'
    assert not (tmp_path / 'model').exists()


def test_model_card_content(gcp_model, tmp_path):
    out = export_model(gcp_model, tmp_path / 'model', label_names=['a', 'b', 'c'], metrics=METRICS, recipe=RECIPE,
                       command=COMMAND, dataset='pets', repo_id='timm-gcp/gcp_resnet18.pets')
    readme = (out / 'README.md').read_text()
    meta = _front_matter(readme)
    assert meta['library_name'] == 'timm' and meta['license'] == 'apache-2.0' and meta['datasets'] == ['pets']
    assert meta['tags'] == ['image-classification', 'timm', 'timm-gcp']
    results = meta['model-index'][0]['results'][0]
    assert results['dataset']['name'] == 'pets'
    assert [(m['name'], m['value']) for m in results['metrics']] == [('top-1 accuracy', 81.25),
                                                                     ('top-5 accuracy', 97.5)]
    assert card_metrics(ModelCard.load(out / 'README.md')) == {'top1': 81.25, 'top5': 97.5}
    assert COMMAND in readme and 'classifier_lr_mult: 5' in readme and '| best_top1 | 82.50 |' in readme
    assert '`svd_pade`' in readme and '16 (136 features)' in readme
    assert "import timm_gcp" in readme and "hf-hub:timm-gcp/gcp_resnet18.pets" in readme
    for title in ('Why Approximate Matrix Square Root Outperforms Accurate SVD',
                  'Is Second-order Information Helpful for Large-scale Visual Recognition?'):
        assert title in readme
    assert 'Iterative Matrix Square Root Normalization' not in readme  # iSQRT-COV is not this model's meta-layer


G2DENET, MPN_COV_TPAMI, IDCCP = 'G2DeNet', 'Deep CNNs Meet Global Covariance Pooling', 'Invariant Deep Compressible'


@pytest.mark.parametrize('arch, meta_layer, options, papers', [
    ('gcp_resnet18', 'isqrt', {}, ['Iterative Matrix Square Root', 'Is Second-order', 'An Optimization Perspective']),
    ('gcp_resnet18', 'mpa_lya', {}, ['Fast Differentiable Matrix Square Root', 'Is Second-order']),
    ('gcp_resnet18', 'cov', {}, ['DropCov']),
    ('gsop_resnet50', 'isqrt', {}, ['Global Second-order Pooling Convolutional Networks', 'Iterative Matrix']),
    ('gcp_resnet18', 'eig', dict(gaussian=True), [G2DENET, MPN_COV_TPAMI, 'Is Second-order']),
    ('gcp_resnet18', 'eig', dict(group_conv=2), [MPN_COV_TPAMI]),
    ('gcp_resnet18', 'eig', dict(progressive_widths=[64]), [MPN_COV_TPAMI]),
    ('gcp_resnet18', 'eig', dict(compress_dim=4), [IDCCP]),
    ('idccp_resnet18', 'isqrt', dict(compress_dim=4), [IDCCP, 'Iterative Matrix']),
])
def test_citations_follow_the_model(arch, meta_layer, options, papers):
    model = timm.create_model(arch, meta_layer=meta_layer, gcp_dim=8, num_classes=3, **options)
    cited = '\n'.join(citations(model))
    assert all(p in cited for p in papers)
    assert ('Global Second-order Pooling' in cited) == arch.startswith('gsop_')
    assert ('Iterative Matrix' in cited) == (meta_layer == 'isqrt')
    assert (G2DENET in cited) == bool(options.get('gaussian'))
    assert (IDCCP in cited) == ('compress_dim' in options or arch.startswith('idccp'))
    model.reset_classifier(3, 'avg')                                      # no covariance pooling left
    cited = '\n'.join(citations(model))
    assert 'Is Second-order' not in cited and ('Global Second-order' in cited) == arch.startswith('gsop_')
    assert MPN_COV_TPAMI not in cited and (IDCCP in cited) == arch.startswith('idccp')  # its invariance stays


@pytest.mark.parametrize('name, options, features, papers', [
    ('gcp_resnet18', dict(gaussian=True, group_conv=2, progressive_widths=[32]), '16 (34 features)',
     [G2DENET, MPN_COV_TPAMI]),
    ('idccp_resnet18', dict(compress_dim=4, gaussian=True), '16 (10 features)', [IDCCP, G2DENET]),
    ('gcp_resnet18', dict(invariance='c4', invariance_mode='test'), '16 (136 features)', [IDCCP]),
])
def test_export_with_head_options_reloads_and_cites(name, options, features, papers, tmp_path):
    model = timm.create_model(name, num_classes=3, gcp_dim=16, **options).eval()
    out = export_model(model, tmp_path / 'model', label_names=['a', 'b', 'c'], dataset='aerial')
    args = json.loads((out / 'config.json').read_text())['model_args']
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert loaded.gcp_model_args() == args == json.loads(json.dumps(model.gcp_model_args()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    readme = (out / 'README.md').read_text()
    assert features in readme and all(p in readme for p in papers)


@pytest.mark.parametrize('head, cited, not_cited', [
    ({'meta_layer': 'isice'}, ['Learning Partial Correlation', 'Is Second-order'],
     ['Understanding Matrix Function Normalizations', 'Iterative Matrix']),
    ({'riemannian': 'chol_tmlr'}, ['Understanding Matrix Function Normalizations', 'Iterative Matrix'],
     ['Learning Partial Correlation']),
    ({'riemannian': 'pow_emlr'}, ['Iterative Matrix'], ['Understanding Matrix Function Normalizations']),
])
def test_isice_and_riemgcp_are_cited_when_used(head, cited, not_cited):
    card = '\n'.join(citations(timm.create_model('gcp_resnet18', gcp_dim=8, num_classes=3, **head)))
    assert all(title in card for title in cited) and not any(title in card for title in not_cited)


def test_a_registered_meta_layer_brings_its_papers_to_the_card():
    @register_meta_layer('cited_identity')
    class CitedIdentity(MetaLayer):
        papers = ('@misc{mine2026, title={My Normalisation}}',)

        def normalize(self, cov):
            return cov

    model = timm.create_model('gcp_resnet18', meta_layer='cited_identity', gcp_dim=8, num_classes=3)
    assert citations(model)[-1] == CitedIdentity.papers[0] and 'Is Second-order' in citations(model)[0]


@pytest.mark.parametrize('native', [True, False], ids=['timm-1.0.31', 'timm-1.0.29-save_for_hf'])
def test_export_records_data_config(gcp_model, tmp_path, monkeypatch, native):
    if not native:  # timm <= 1.0.29: save_for_hf has no data_config parameter
        def old_save_for_hf(model, save_directory, model_config=None, model_args=None, safe_serialization=False):
            timm.models.save_for_hf(model, save_directory, model_config=model_config, model_args=model_args,
                                    safe_serialization=safe_serialization)
        monkeypatch.setattr(export_module, 'save_for_hf', old_save_for_hf)
    out = export_model(gcp_model, tmp_path / 'model', label_names=['a', 'b', 'c'],
                       data_config={'input_size': (3, 96, 96), 'crop_pct': 1.0})
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    data = timm.data.resolve_model_data_config(loaded)
    assert data['input_size'] == (3, 96, 96) and data['crop_pct'] == 1.0
    assert '3 x 96 x 96' in (out / 'README.md').read_text()


def test_export_config_describes_the_run_not_the_backbone(tmp_path):
    """A model built from a timm tag (ImageNet, notes, paper) exported after a 64 px run on a 2-class pet set."""
    model = timm.create_model('resnet18.a1_in1k', num_classes=2).eval()
    assert model.pretrained_cfg['tag'] == 'a1_in1k' and model.pretrained_cfg['paper_ids']
    out = export_model(model, tmp_path / 'model', label_names=['cat', 'dog'], dataset='Oxford-IIIT Pet',
                       data_config={'input_size': (3, 64, 64)}, base_model='timm/resnet18.a1_in1k')
    cfg = json.loads((out / 'config.json').read_text())['pretrained_cfg']
    assert cfg['tag'] == 'oxford_iiit_pet'
    assert cfg['description'] == 'fine-tuned from timm/resnet18.a1_in1k on Oxford-IIIT Pet (2 classes) at 64 px'
    assert not {'notes', 'origin_url', 'paper_ids', 'paper_name'} & set(cfg)
    others = json.dumps({k: v for k, v in cfg.items() if k != 'description'}).lower()
    assert 'imagenet' not in others and 'in1k' not in others
    meta = _front_matter((out / 'README.md').read_text())
    assert meta['base_model'] == 'timm/resnet18.a1_in1k'
    assert '[`timm/resnet18.a1_in1k`](https://huggingface.co/timm/resnet18.a1_in1k)' in (out / 'README.md').read_text()
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert loaded.pretrained_cfg['tag'] == 'oxford_iiit_pet'

    scratch = export_model(model, tmp_path / 'scratch', label_names=['cat', 'dog'], dataset='org/my-data')
    cfg = json.loads((scratch / 'config.json').read_text())['pretrained_cfg']
    assert cfg['tag'] == 'my_data' and cfg['description'] == 'trained on org/my-data (2 classes) at 224 px'
    assert 'base_model' not in _front_matter((scratch / 'README.md').read_text())
    unnamed = json.loads((export_model(model, tmp_path / 'unnamed', label_names=['a', 'b']) / 'config.json')
                         .read_text())['pretrained_cfg']
    assert 'tag' not in unnamed and unnamed['description'] == 'trained on an unnamed data set (2 classes) at 224 px'


@pytest.mark.parametrize('umask', [0o022, 0o027])
def test_export_has_the_users_normal_permissions(gcp_model, tmp_path, umask):
    previous = os.umask(umask)
    try:
        out = export_model(gcp_model, tmp_path / 'model', label_names=['a', 'b', 'c'])
        export_model(gcp_model, out, label_names=['a', 'b', 'c'])  # replacing an export keeps them too
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {
        name: 0o666 & ~umask for name in ('README.md', 'config.json', 'model.safetensors', 'timm_gcp_manifest.json')}


def test_export_refuses_non_finite_weights_and_leaves_the_old_export(tmp_path):
    model = timm.create_model('gcp_resnet18', num_classes=3, gcp_dim=8).eval()
    out = export_model(model, tmp_path / 'model', label_names=['a', 'b', 'c'], metrics={'top1': 1.0})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with torch.no_grad():
        model.fc.weight[0, 0] = float('nan')
        model.conv1.weight[0, 0, 0, 0] = float('inf')
    with pytest.raises(ValueError, match=r"has 2 non-finite tensors \(NaN/Inf\): conv1.weight, fc.weight; the run"):
        export_model(model, out, label_names=['a', 'b', 'c'])
    with pytest.raises(ValueError, match='has 2 non-finite tensors'):
        export_model(model, tmp_path / 'fresh', label_names=['a', 'b', 'c'])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model']


@pytest.mark.parametrize('metrics', [{'top1': float('nan')}, {'top1': 50.0, 'top5': float('inf')},
                                     {'top1': None}, {'top1': '50'}])
def test_export_refuses_non_finite_metrics(gcp_model, tmp_path, metrics):
    with pytest.raises(ValueError, match='metrics must be finite numbers'):
        export_model(gcp_model, tmp_path / 'model', label_names=['a', 'b', 'c'], metrics=metrics)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_local_paths_and_the_user_name(gcp_model, tmp_path, monkeypatch):
    """A run under a distinctive temp path whose command and recipe carry it: nothing is written, and the message
    names the file and the text; file names and Hub ids alone pass."""
    run = tmp_path / 'runs-of-zq7' / 'pets'
    out = export_model(gcp_model, run / 'model', label_names=['a', 'b', 'c'], command='python train.py --data-dir pets',
                       recipe={'data_dir': 'pets', 'initial_checkpoint': 'last.safetensors'})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match=rf"README.md would publish '{re.escape(str(run))}/data'"):
        export_model(gcp_model, out, label_names=['a', 'b', 'c'], command=f'python train.py --data-dir {run}/data')
    with pytest.raises(ValueError, match=rf"README.md would publish '{re.escape(str(Path.home()))}/imgs'"):
        export_model(gcp_model, out, label_names=['a', 'b', 'c'], recipe={'data_dir': f'{Path.home()}/imgs'})
    with pytest.raises(ValueError, match=r"README.md would publish 'C:\\\\Users"):
        export_model(gcp_model, out, label_names=['a', 'b', 'c'], command=r'train.py --data-dir C:\Users\me\pets')
    monkeypatch.setattr(getpass, 'getuser', lambda: 'jdoe-zq7')
    with pytest.raises(ValueError, match=r"config.json would publish 'jdoe-zq7'"):
        export_model(gcp_model, out, label_names=['a', 'jdoe-zq7', 'c'])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in run.iterdir()) == ['model']


def test_export_with_a_root_login_keeps_the_word_root(gcp_model, tmp_path, monkeypatch):
    """CI and containers run as root: 'root' names no person and is a word a card may hold ('square root')."""
    monkeypatch.setattr(getpass, 'getuser', lambda: 'root')
    out = export_model(gcp_model, tmp_path / 'model', label_names=['root', 'stem', 'leaf'],
                       command='python train.py --data-dir plant-parts')
    assert 'root' in (out / 'config.json').read_text()


def test_what_an_interrupted_export_left_is_removed_by_the_next(gcp_model, tmp_path):
    """Issue 21, fault 6: a SIGKILL during an export left `.model.tmp-*` (the new export, written part-way) and
    `.model.old-*/export` (the earlier export, moved aside) beside the folder, and a later export kept them."""
    out = export_model(gcp_model, tmp_path / 'model', label_names=['a', 'b', 'c'], metrics={'top1': 1.0})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / '.model.tmp-k1ll3d').mkdir()
    (tmp_path / '.model.tmp-k1ll3d' / 'model.safetensors').write_bytes(bytes(1000))
    (tmp_path / '.model.old-k1ll3d').mkdir()
    os.replace(out, tmp_path / '.model.old-k1ll3d' / 'export')  # killed between the two renames: no model/ now
    (tmp_path / '.other.tmp-keep').mkdir()                       # another folder's staging is not ours to remove
    remove_staging(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export is back in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.other.tmp-keep', 'model']
    (tmp_path / '.model.tmp-again').mkdir()
    (tmp_path / '.model.old-again').mkdir()
    export_model(gcp_model, out, label_names=['a', 'b', 'c'], metrics={'top1': 2.0})  # an export cleans up first
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.other.tmp-keep', 'model']


def test_export_refuses_label_names_that_are_not_utf8(gcp_model, tmp_path):
    """Issue 21, fault 10: a class folder named in another encoding reaches Python as a lone surrogate."""
    with pytest.raises(ValueError, match=r"label_names holds 'dais\\udcff', which is not valid UTF-8 text"):
        export_model(gcp_model, tmp_path / 'model', label_names=['a', 'b', 'dais\udcff'])
    assert not (tmp_path / 'model').exists()
