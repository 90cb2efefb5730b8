import json
import subprocess
import sys

from lora_core.demo import parse_args, run
from lora_core.lorafile.files import load_lora
from lora_core.lorafile.resume import sidecar_path


def test_demo_trains_writes_a_lora_and_a_chart_and_continues(tmp_path, capsys):
    first = run(parse_args(["--steps", "60", "--images", "4", "--out", str(tmp_path)]))
    printed = capsys.readouterr().out
    assert "step    25  loss" in printed and "lr 2.00e-02" in printed
    assert first.last_val_loss < 0.6 * first.first_val_loss
    assert first.chart_path.stat().st_size > 1000 and sidecar_path(first.lora_path).is_file()
    tensors, metadata = load_lora(first.lora_path)
    assert metadata["algorithm"] == "lora" and metadata["steps"] == "60"
    assert json.loads(metadata["training_settings"])["adapter"]["rank"] == 8
    assert all(key.startswith("diffusion_model.") for key in tensors)
    assert any(key.endswith("attn.to_q.lora_up.weight") for key in tensors)

    more = run(parse_args(["--steps", "10", "--images", "4", "--out", str(tmp_path), "--resume", str(first.lora_path)]))
    assert more.total_steps == 70 and more.lora_path.name == "demo_lora_70_steps.safetensors"


def test_demo_runs_as_a_module(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "lora_core.demo", "--steps", "5", "--images", "2", "--batch-size", "2",
         "--algorithm", "loha", "--rank", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "demo_loha_5_steps.safetensors").is_file()
    assert (tmp_path / "demo_loha_loss.png").is_file()


def test_demo_explains_bad_settings(tmp_path, capsys):
    from lora_core.demo import main

    assert main(["--steps", "0", "--out", str(tmp_path)]) == 2
    assert "steps must be a whole number >= 1" in capsys.readouterr().err
