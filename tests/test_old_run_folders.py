"""Run folders written before the package was reorganised (``fixtures/runs_before``, made at a7fc02a with
`train --model vit_tiny --no-pretrained --img-size 32 --batch-size 100 --workers 0 --warmup-epochs 0 --epochs 1` on
``test_vtab.make_task``'s task: capaboost_lora --rank 1 and peft_lora --peft-args r=1) still load, are reused as
finished, resume from their checkpoint and work with `rank`."""
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import capaboost_vision as cv
from capaboost_vision.vtab import cli
from test_vtab import make_task

BEFORE = Path(__file__).parent / 'fixtures' / 'runs_before'
FLAGS = ['--model', 'vit_tiny', '--no-pretrained', '--img-size', '32', '--batch-size', '100', '--workers', '0',
         '--warmup-epochs', '0', '--epochs', '1']
RUNS = {'capaboost_lora': ['--rank', '1'], 'peft_lora': ['--peft-args', 'r=1']}


def _copy(tmp_path):
    runs = tmp_path / 'runs'
    shutil.copytree(BEFORE, runs)
    make_task(tmp_path / 'data', counts=(800, 200))  # the task those runs were trained on
    return runs


def _train(runs, tmp_path, method, *extra):
    return cli.main(['train', '--task', 'toy', '--method', method, '--data-path', str(tmp_path / 'data'),
                     '--output', str(runs), *FLAGS, *RUNS[method], *extra])


def test_old_finished_runs_are_reused_and_their_adapters_load(tmp_path, capsys):
    runs = _copy(tmp_path)
    for method in RUNS:
        assert _train(runs, tmp_path, method) == 0
        assert 'skip:' in capsys.readouterr().out  # the old recorded settings are this request's
    run_dir = runs / 'vit_tiny/toy/final/capaboost_lora/seed0'
    model = timm.create_model('vit_tiny_capaboost_lora', rank=1, num_classes=3, img_size=32)
    cv.load_adapter(model, run_dir, check_base=False)
    saved = load_file(str(run_dir / 'adapter.safetensors'))
    state = model.state_dict()
    floats = {k: v for k, v in saved.items() if v.dtype.is_floating_point}  # masks are stored bit-packed
    assert len(floats) == 12 * 2 + 2 and all(torch.equal(state[k], v) for k, v in floats.items())
    assert cli.main(['rank', str(run_dir)]) == 0 and 'mean effective rank' in capsys.readouterr().out
    # its config.json records every form's settings, as files did before the per-form sections; one where another
    # form's setting was given a value of its own (a LoRA model built with prompt_rank=3 then) still builds
    meta = json.loads((run_dir / 'config.json').read_text())
    meta['model_args']['prompt_rank'] = meta['capaboost']['config']['prompt_rank'] = 3
    (run_dir / 'config.json').write_text(json.dumps(meta))
    rebuilt = timm.create_model(f'local-dir:{run_dir}', pretrained=False)
    assert rebuilt.capaboost_config.rank == 1 and 'prompt_rank' not in rebuilt.capaboost_config.to_dict()
    base = tmp_path / 'other_base.safetensors'  # load_classifier builds the model from those model_args too; on
    save_file(timm.create_model('vit_tiny_patch16_224', num_classes=0).state_dict(), str(base))  # other weights
    with pytest.raises(cv.hub.AdapterError, match='fingerprint'):  # it gets as far as comparing the base weights
        cv.load_classifier(run_dir, weights=base)
    from peft import PeftModel
    plain = timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32)
    peft_dir = runs / 'vit_tiny/toy/final/peft_lora/seed0'
    peft_model = PeftModel.from_pretrained(plain, str(peft_dir))
    peft_saved = load_file(str(peft_dir / 'adapter_model.safetensors'))
    assert any('lora_A' in k for k in peft_saved) and peft_model is not None


def test_old_checkpoints_resume(tmp_path, capsys):
    runs = _copy(tmp_path)
    for method in RUNS:
        results_file = runs / f'vit_tiny/toy/final/{method}/seed0/results.json'
        before = json.loads(results_file.read_text())
        results_file.unlink()  # as if stopped after its last epoch: the old checkpoint is all there is
        assert _train(runs, tmp_path, method, '--resume') == 0
        assert 'resumed' in capsys.readouterr().out
        after = json.loads(results_file.read_text())
        # top-1 was recorded on another CPU (an AMD EPYC): its kernels round the logits differently in the last bits,
        # which can flip a near-tied image, so one of the 60 test images may differ; a real change moves many
        assert abs(after['top1'] - before['top1']) <= 100 / 60 + 1e-9
        assert after['trainable_params_excl_head'] == before['trainable_params_excl_head']
