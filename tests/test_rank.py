import torch

from capaboost_vision import CapaBoostConfig, apply_capaboost
from capaboost_vision.vtab import cli
from capaboost_vision.rank import effective_rank, rank_table
from conftest import tiny_vit


def test_effective_rank_of_known_spectra():
    assert effective_rank(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)) == {'entropy': 2.0, 'threshold': 2}
    r = effective_rank(torch.tensor([1.0, 1e-4, 1e-9], dtype=torch.float64), threshold=1e-3)
    assert r['threshold'] == 1 and 1.0 < r['entropy'] < 1.01


def test_rank_table_sees_d_times_r():
    model = apply_capaboost(tiny_vit(), CapaBoostConfig(rank=3, num_masks=2))
    for m in model.modules():
        if hasattr(m, 'lora_B'):
            torch.nn.init.normal_(m.lora_B)
    rows = rank_table(model)
    assert len(rows) == 2 and all(r['max_rank'] == 6 and r['threshold'] == 6 for r in rows)


def test_rank_cli_on_a_run_folder(tmp_path, capsys):
    from test_vtab import TINY, make_task
    make_task(tmp_path / 'data')
    assert cli.main(['train', '--task', 'toy', '--method', 'capaboost_lora', '--data-path', str(tmp_path / 'data'),
                     '--output', str(tmp_path / 'runs'), '--epochs', '1', '--lr', '1e-2', *TINY]) == 0
    run = tmp_path / 'runs' / 'vit_tiny' / 'toy' / 'final' / 'capaboost_lora' / 'seed0'
    capsys.readouterr()
    assert cli.main(['rank', str(run), '--plot', str(tmp_path / 'sv.png')]) == 0
    out = capsys.readouterr().out
    assert '| blocks.11.attn.qkv | 16 |' in out and 'mean effective rank' in out
    assert (tmp_path / 'sv.png').read_bytes()[:4] == b'\x89PNG'
    assert cli.main(['rank', str(tmp_path)]) == 2  # not a run folder: one-line error
