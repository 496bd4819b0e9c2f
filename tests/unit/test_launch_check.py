"""Launch mistakes are one line naming the setting (`emotrain.train.launch_check`), and the launches
of launch/ and the README pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from emotrain.config import ConfigError, load_config
from emotrain.train.launch_check import LaunchError, check_launch

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
PAPER = Path(__file__).resolve().parents[2] / "configs" / "paper.yaml"

TORCHRUN_2 = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
"""What torchrun gives each of 2 processes on one node (with `accelerate launch`'s own variables)."""


def _check(config: Path, environ: dict, *overrides: str, cuda_devices: int = 0, gloo: bool = True) -> None:
    check_launch(load_config(config, list(overrides)), environ, cuda_devices=cuda_devices, gloo=gloo)


@pytest.mark.parametrize("config,environ,cuda_devices", [
    (SMOKE, {}, 0),  # emotrain train, no launcher
    (SMOKE, {**TORCHRUN_2, "ACCELERATE_MIXED_PRECISION": "no"}, 0),  # launch/cpu_ddp.yaml
    (SMOKE, {**TORCHRUN_2, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "no"}, 0),  # cpu_zero2
    (PAPER, {**TORCHRUN_2, "ACCELERATE_MIXED_PRECISION": "no"}, 2),  # launch/ddp.yaml ('no') with bf16 in the config
    (PAPER, {**TORCHRUN_2, "ACCELERATE_MIXED_PRECISION": "bf16"}, 2),  # the same precision on both sides
    (PAPER, {**TORCHRUN_2, "ACCELERATE_USE_DEEPSPEED": "true", "DS_ACCELERATOR": "cuda"}, 2),
    (SMOKE, {**TORCHRUN_2, "ACCELERATE_USE_CPU": "true", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "4"}, 1),  # all on CPU
])
def test_the_launches_of_launch_and_the_readme_pass(config, environ, cuda_devices):
    _check(config, environ, cuda_devices=cuda_devices)


def _refused(config: Path, environ: dict, *overrides: str, **kwargs) -> LaunchError:
    with pytest.raises(LaunchError) as err:
        _check(config, environ, *overrides, **kwargs)
    assert isinstance(err.value, ConfigError) and "\n" not in str(err.value)
    return err.value


def test_deepspeed_with_accelerate_use_cpu_is_refused():
    err = _refused(SMOKE, {**TORCHRUN_2, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_CPU": "True"})
    assert err.key == "ACCELERATE_USE_CPU" and "silently train without DeepSpeed" in str(err) and "Unset it" in str(err)


def test_deepspeed_told_to_use_cuda_without_a_gpu_is_refused():
    err = _refused(SMOKE, {**TORCHRUN_2, "ACCELERATE_USE_DEEPSPEED": "true", "DS_ACCELERATOR": "cuda"})
    assert err.key == "DS_ACCELERATOR" and "no CUDA GPU" in str(err)
    _check(SMOKE, {**TORCHRUN_2, "ACCELERATE_USE_DEEPSPEED": "true", "DS_ACCELERATOR": "cpu"})


@pytest.mark.parametrize("launched,configured", [("bf16", "no"), ("fp16", "bf16"), ("bf16", "fp16")])
def test_a_launcher_precision_unlike_the_config_is_refused(launched, configured):
    err = _refused(SMOKE, {"ACCELERATE_MIXED_PRECISION": launched}, f"train.mixed_precision={configured}")
    assert err.key == "train.mixed_precision"
    assert str(err).startswith(f"train.mixed_precision: is {configured}, but the launcher asks for {launched}")
    assert f"Set train.mixed_precision={launched}, or launch with --mixed_precision no" in str(err)


def test_more_processes_on_a_node_than_gpus_is_refused():
    err = _refused(PAPER, {**TORCHRUN_2, "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, cuda_devices=4)
    assert err.key == "accelerate launch --num_processes"
    assert "starts 8 processes on this node, which has 4 CUDA GPU(s)" in str(err) and "--num_processes 4" in str(err)
    _check(PAPER, {**TORCHRUN_2, "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, cuda_devices=4)  # 2 nodes x 4


def test_several_cpu_processes_without_gloo_are_refused():
    err = _refused(SMOKE, TORCHRUN_2, gloo=False)
    assert err.key == "accelerate launch --num_processes" and "gloo" in str(err)
    _check(SMOKE, {}, gloo=False)  # one process needs no backend


def test_emotrain_train_says_a_launch_mistake_in_one_line_on_rank_0_only(tmp_path, monkeypatch, capsys):
    import emotrain.cli as cli
    import emotrain.train.recipe as recipe
    from tests.toyset import write_toy_prepared

    data = write_toy_prepared(tmp_path / "data", per_session=4, num_shards=1)
    monkeypatch.setattr(recipe, "_build_training", lambda *a: pytest.fail("setup went on past the launch check"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    argv = ["train", str(SMOKE), f"data.path={data}", f"output_dir={tmp_path / 'run'}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("emotrain train: error: train.mixed_precision: is no, but the launcher asks for bf16"), err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("RANK", "1")  # the other ranks fail alike, silently
    assert cli.main(argv) == 2 and capsys.readouterr().err == ""
