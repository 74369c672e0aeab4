"""The command lines as a user meets them (dit_jax/cli.py): a run's console lines and summary
off a terminal, "already complete", TensorBoard's images and config, one-line errors, local path
typos, labels by class name, and .safetensors without PyTorch."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags

import sample as sample_script
import train as train_script
from dit_jax import cli
from dit_jax.train.logging import Progress

from test_train import TINY_FLAGS, read_events

ROOT = Path(__file__).resolve().parents[1]


def child_env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def test_progress_writes_plain_lines_off_a_terminal(capsys):
    progress = Progress(total=4, initial=0, interactive=False)
    for step in (1, 2):
        progress.update()
    progress.show({"loss": 0.25, "steps_per_sec": 2.0, "images_per_sec": 32.0, "mfu": None,
                   "grad_norm": 0.5, "lr": 1e-4})
    progress.write("step 2: a message")
    progress.close()
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("step 2/4 (50%) loss 0.2500 steps/s 2.00 img/s 32.0 grad_norm 0.5 "
                               "lr 0.0001 eta "), lines
    assert lines[1] == "step 2: a message"
    assert "\r" not in out.out + out.err  # no bar


def run_command(script, argv, times=1):
    """A command line in-process, `times` times (the flags parsed once: ml_collections defines
    the --config.* overrides at the first parse); its stdout of each run."""
    saved = sys.argv
    sys.argv = argv  # ml_collections reads the --config.* overrides from sys.argv
    outputs = []
    try:
        flags.FLAGS.unparse_flags()
        # Another config file parsed earlier in this process defined its own override flags:
        # they would clash with this one's.
        for name in [name for name in flags.FLAGS if name.startswith("config.")]:
            delattr(flags.FLAGS, name)
        cli.parse_flags(argv)
        for _ in range(times):
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                script.main([])
            outputs.append(buffer.getvalue())
    finally:
        sys.argv = saved
    return outputs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """train.py in-process (stdout is not a terminal under pytest): a tiny 2-step run with a sample
    grid, then the same command again."""
    workdir = tmp_path_factory.mktemp("cli") / "demo"
    argv = ["train.py", "--config=configs/demo.py", f"--workdir={workdir}", *TINY_FLAGS,
            "--config.total_steps=2", "--config.checkpoint_every=2", "--config.sample_every=2",
            "--config.sample.num_images=4", "--config.sample.steps=2"]
    argv = [argv[0], *[a.replace("configs/", f"{ROOT}/configs/") for a in argv[1:]]]
    outputs = run_command(train_script, argv, times=2)
    return workdir, outputs


def test_train_logs_lines_and_a_summary(run):
    workdir, (first, _) = run
    lines = first.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("step ") and "loss" in line] == [
        "1/2", "2/2"]
    assert f"step 2: samples in {workdir}/samples/step_0000002.png" in first
    summary = lines[lines.index(next(l for l in lines if l.startswith("done:"))):]
    assert summary[0].startswith("done: step 2 of 2 (this run: steps 0..2), loss ")
    assert summary[1:4] == [f"  checkpoints  {workdir}/checkpoints/",
                            f"  logs         {workdir}/log.jsonl, {workdir}/tensorboard/ "
                            f"(tensorboard --logdir={workdir}/tensorboard)",
                            f"  samples      {workdir}/samples/"]


def test_rerun_of_a_finished_run_says_already_complete(run):
    workdir, (_, second) = run
    assert second.startswith(f"already complete: {workdir} finished all 2 steps before this run")
    assert "loss" not in second.splitlines()[0]


def test_tensorboard_holds_grid_image_and_config_text_not_unix_time(run):
    events = read_events(run[0] / "tensorboard")
    values = [(e.step, v) for e in events for v in e.summary.value]
    assert [(s, v.tag) for s, v in values if v.HasField("image")] == [(2, "samples/grid")]
    texts = [v for _, v in values if v.tag.startswith("config")]
    assert texts and b'"total_steps": 2' in texts[0].tensor.string_val[0]
    tags = {v.tag for _, v in values}
    assert "train/loss" in tags and "train/time" not in tags


def test_sample_py_reads_the_pixel_workdir_and_labels_by_name(run, tmp_path, caplog):
    workdir = run[0]
    flags.FLAGS.unparse_flags()
    sample_script.parse_flags(["sample.py", f"--ckpt={workdir}", "--labels=circle,Green_Square,3",
                               "--steps=2", f"--out={tmp_path}"])
    try:
        with caplog.at_level("INFO", logger="absl"):
            request = sample_script.request_from_flags()
        # The run's own settings (no --vae none, no --image-size): pixel space, 16 px, clipped x0.
        assert (request.vae, request.image_size, request.clip_denoised) == ("none", 16, True)
        assert request.labels == (0, 1, 3)
        assert "labels from the built-in shapes data" in caplog.text
        assert "circle=0, Green_Square=1, 3=3" in caplog.text
        sample_script.main([])
        with pytest.raises(Exception, match=r"'dog' is not a class name of the built-in shapes "
                                            r"data .*red circle, green square"):
            sample_script.parse_labels(["dog"], str(workdir))
        with pytest.raises(Exception, match=r"'re' is not a class name"):
            sample_script.parse_labels(["re"], str(workdir))
    finally:
        flags.FLAGS.unparse_flags()
    assert np.asarray(__import__("PIL.Image").Image.open(tmp_path / "grid.png")).std() > 0


def one_line_error(command, expected):
    proc = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().count("\n") == 0, proc.stderr[-3000:]
    assert expected in proc.stderr, proc.stderr
    return proc.stderr.strip()


def test_user_errors_are_one_line(tmp_path, run):
    line = one_line_error([sys.executable, "train.py", "--config=configs/demo.py",
                           f"--workdir={tmp_path}", "--config.optim.lrr=1"],
                          "train.py: error: --config.optim.lrr: the config has no key 'lrr'")
    assert "did you mean 'lr'?" in line and "\\n" not in line
    # A typo in a local path (its folder exists) names the path, it does not try the hub.
    typo = run[0].parent / "demoo"
    line = one_line_error([sys.executable, "sample.py", f"--ckpt={typo}"],
                          f"sample.py: error: --ckpt {typo} does not exist (did you mean "
                          f"{run[0]}?)")
    assert "huggingface" not in line.lower()


def test_guard_one_line_and_verbose(capsys):
    def main(argv):
        raise FileNotFoundError("weights.pt does not exist")

    values = flags.FlagValues()
    cli.define_common_flags(values)
    values(["prog"])
    with pytest.raises(SystemExit) as info:
        cli.guard(main, values)([])
    assert info.value.code == 1
    assert capsys.readouterr().err.endswith(
        "error: weights.pt does not exist (--verbose shows the traceback)\n")
    values(["prog", "--verbose"])
    with pytest.raises(FileNotFoundError):
        cli.guard(main, values)([])


def test_help_shows_examples():
    for command in (["train.py"], ["-m", "dit_jax.port"]):
        proc = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, env=child_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        example = "python -m dit_jax.port to-jax" if "-m" in command else f"python {command[0]} --"
        assert example in proc.stdout, proc.stdout[:2000]


def test_safetensors_load_without_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from conftest import random_dit
    from dit_jax.port import save_torch

    model = random_dit(seed=2, depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=8,
                       num_classes=3)
    path = save_torch(model, tmp_path / "w.safetensors")
    torch.save({"x": torch.zeros(1)}, tmp_path / "w.pt")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not safetensors' private 0600
    script = f"""
import sys
sys.modules["torch"] = None  # as if PyTorch were not installed
import numpy as np
from dit_jax.port import load_any
model = load_any({str(path)!r}, num_heads=2)
print("depth", model.config.depth, "sum", float(np.asarray(model.final_layer.linear.kernel).sum()))
try:
    load_any({str(tmp_path / 'w.pt')!r})
except ImportError as e:
    print("pt:", e)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = float(np.asarray(model.final_layer.linear.kernel).sum())
    first, second = proc.stdout.splitlines()
    assert first.startswith("depth 1 sum ")
    assert float(first.split()[-1]) == pytest.approx(expected, rel=1e-6)
    assert second.startswith("pt: ") and 'pip install -e ".[torch]"' in second
