"""scripts/gpu_check.sh --dry-run: every step of the prepared GPU check, at tiny sizes on CPU."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    out = subprocess.run(['bash', str(ROOT / 'scripts' / 'gpu_check.sh'), str(tmp_path / 'res'), '--dry-run'],
                         capture_output=True, text=True, timeout=900, env=dict(__import__('os').environ,
                                                                                PYTHON=sys.executable))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    data = json.loads((tmp_path / 'res' / 'gpu_check.json').read_text())
    names = [s['name'] for s in data['steps']]
    assert len(names) == 10 and names[0].startswith('cuda tests') and all(s['returncode'] == 0 for s in data['steps'])
    assert '7 passed' in data['steps'][0]['output_tail']  # the cuda subset really ran (on CPU)
    speed = data['steps'][1]['results']['rows']
    assert speed['capaboost-lora r8 d2']['stored_params'] == speed['lora r8 (ours)']['stored_params']
    several = data['steps'][3]['results']['rows']['2']['time_s']  # 2 adapters on one backbone, one mixed batch
    assert names[3] == 'several adapters on one backbone' and several['ours: one backbone, mixed batch'] > 0
    assert data['steps'][4]['results']['cached_images_per_s'] > 0
    assert data['steps'][5]['results']['epochs'] == 2 and data['versions']['torch']
    assert (tmp_path / 'res' / 'gpu_check.md').read_text().startswith('# GPU check (dry run')
    # the offline study: lr search and finals on two generated tasks, then report --compare
    assert names[6:8] == ['offline study: lr search + finals', 'offline study: report --compare']
    compare = data['steps'][7]['results']['compare']
    assert '| capaboost_lora - lora |' in compare and '2 (2)' in compare and 'Learning-rate sensitivity' in compare
    # the size sweep: two rows named by size, then report's curve and its equal-params pairing
    assert names[8:] == ['accuracy per stored parameter: size sweep (224 px)', 'accuracy per stored parameter: report']
    curve = data['steps'][9]['results']['report']
    assert '## Accuracy per stored parameter (test)' in curve and '| lora_r4 |' in curve and 'capaboost_lora_r4' in curve
    assert (tmp_path / 'res' / 'curve_curve.png').is_file() and (tmp_path / 'res' / 'curve_compare.md').is_file()


def test_bench_speed_measures_cpu_peak_memory_in_a_fresh_process(monkeypatch):
    """What the dry run above leaves out (--no-cpu-memory: a GPU reads CUDA's counters): one row's CPU peak."""
    import bench_speed
    monkeypatch.setattr(sys, 'argv', ['bench_speed.py', '--model', 'vit_tiny', '--img-size', '32', '--batch-size', '4'])
    args = bench_speed.parse_args()
    assert bench_speed.cpu_peak_memory('capaboost-lora r8 d2', args) > 0
