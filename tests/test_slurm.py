"""The Slurm launcher (megatron_nbdiff.slurm, tools/launch_slurm.py) and the packaged batch-script
template (no Slurm needed), and the end-to-end test on a real private Slurm cluster
(tests/slurm/run_slurm_test.sh): run when NBDIFF_SLURM_TEST=1 or when slurmctld is installed,
skipped otherwise."""
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import types

import pytest
import yaml

from megatron_nbdiff.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "tools", "launch_slurm.py")
CONFIGS = os.path.join(ROOT, "examples", "slurm", "configs")
SLURM_TEST = os.path.join(ROOT, "tests", "slurm", "run_slurm_test.sh")
WORDS = "the cat dog sat ran on mat park and watched a blue red big small tree house".split()


@pytest.fixture(scope="module")
def launcher():
    """The launcher's modules under one name (main, render, parse_time_limit, LaunchError)."""
    from megatron_nbdiff import slurm
    from megatron_nbdiff.slurm import launch

    return types.SimpleNamespace(main=launch.main, render=slurm.render, parse_time_limit=slurm.parse_time_limit,
                                 LaunchError=slurm.LaunchError)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny tokenizer and indexed dataset, made once: the launcher validates them as the trainer
    would (tokenizer loads, dataset headers and token ids fit the model)."""
    import random

    from megatron_nbdiff.data.make_tokenizer import train_bpe_tokenizer
    from megatron_nbdiff.data.preprocess import preprocess

    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) for _ in range(60)]
    train_bpe_tokenizer(docs, 300, str(d / "tok"))
    with open(d / "c.jsonl", "w") as f:
        f.writelines(json.dumps({"text": doc}) + "\n" for doc in docs)
    preprocess(str(d / "c.jsonl"), str(d / "tok"), str(d / "corpus"), quiet=True)
    return d


@pytest.fixture
def inputs(tmp_path, corpus):
    """A dataset prefix, a tokenizer and a run config (quickstart_tiny with relative paths) in a
    fresh submit directory."""
    (tmp_path / "data").mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(corpus / f"corpus{suffix}", tmp_path / "data" / f"corpus{suffix}")
    shutil.copytree(corpus / "tok", tmp_path / "tok")
    with open(os.path.join(CONFIGS, "quickstart_tiny.yaml")) as f:
        data = yaml.safe_load(f)
    data["data"]["train"] = ["data/corpus"]  # relative: resolved against the submit directory
    data["data"]["tokenizer"] = "tok"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(data))
    return tmp_path


def launch(launcher, monkeypatch, capsys, cwd, *argv):
    """The launcher's main() in this process under the command-line wrapper: (exit code, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    code = run_main(launcher.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_writes_a_complete_gpu_script(launcher, inputs, monkeypatch, capsys):
    code, out, err = launch(
        launcher, monkeypatch, capsys, inputs, "--config", "run.yaml", "--nodes", 2,
        "--gpus-per-node", 4, "--partition", "gpu", "--account", "proj", "--time", "1-00:00:00",
        "--job-name", "nb", "--output-dir", "out", "--sbatch-option=--qos=high", "--dry-run",
        "train.global_batch_size=32",
    )
    assert code == 0, err
    run = inputs / "out"
    script = (run / "slurm" / "job.sbatch").read_text()
    assert out == script
    assert not re.search(r"@[A-Z][A-Z0-9_]*@", script), "unfilled placeholder"
    assert os.stat(run / "slurm" / "job.sbatch").st_mode & stat.S_IXUSR
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --exclusive", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --time=1-00:00:00", "#SBATCH --qos=high", "#SBATCH --job-name=nb",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={run}/slurm/logs/%x-%j.out", f"#SBATCH --chdir={inputs}",
                 "PROCS_PER_NODE=4", "GPUS_PER_NODE=4", "MASTER_PORT_FIXED=",
                 f"CONFIG={run}/slurm/config.yaml", 'scontrol requeue "$SLURM_JOB_ID"'):
        assert line in script.splitlines() or line in script, line
    # every #SBATCH line comes before the first command (sbatch stops reading them there)
    lines = script.splitlines()
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert subprocess.run(["bash", "-n", str(run / "slurm" / "job.sbatch")]).returncode == 0
    # the config the job reads: validated, save_dir = the run folder, paths absolute
    from megatron_nbdiff.config import RunConfig

    cfg = RunConfig.load(str(run / "slurm" / "config.yaml"))
    assert cfg.checkpoint.save_dir == str(run)
    assert cfg.data.train == [str(inputs / "data" / "corpus")]
    assert cfg.data.tokenizer == str(inputs / "tok")
    assert cfg.train.global_batch_size == 32
    assert not [n for n in os.listdir(run / "slurm") if ".tmp" in n]


def test_dry_run_cpu_script(launcher, inputs, monkeypatch, capsys):
    code, out, err = launch(launcher, monkeypatch, capsys, inputs, "--config", "run.yaml",
                            "--nodes", 1, "--gpus-per-node", 0, "--procs-per-node", 2,
                            "--master-port", 29555, "--dry-run")
    assert code == 0, err
    assert "#SBATCH --cpus-per-task=2" in out and "--gpus-per-node=" not in out.split("set -u")[0]
    assert "#SBATCH --exclusive" not in out and "#SBATCH --partition" not in out
    assert "PROCS_PER_NODE=2" in out and "GPUS_PER_NODE=0" in out and "MASTER_PORT_FIXED=29555" in out
    # the default run folder is checkpoint.save_dir, relative to the submit directory
    assert (inputs / "runs" / "quickstart-slurm" / "slurm" / "job.sbatch").is_file()


def test_blend_paths_are_resolved_and_checked(launcher, inputs, monkeypatch, capsys):
    blend = "data.train=[0.3, data/corpus, 0.7, data/other]"
    code, out, err = launch(launcher, monkeypatch, capsys, inputs, "--config", "run.yaml",
                            "--nodes", 1, "--gpus-per-node", 0, "--output-dir", "o", "--dry-run", blend)
    assert code == 2 and "missing " + str(inputs / "data" / "other") + ".bin" in err  # a dry run checks too
    assert not (inputs / "o").exists()
    for suffix in (".bin", ".idx"):
        shutil.copy(inputs / "data" / f"corpus{suffix}", inputs / "data" / f"other{suffix}")
    code, out, err = launch(launcher, monkeypatch, capsys, inputs, "--config", "run.yaml",
                            "--nodes", 1, "--gpus-per-node", 0, "--output-dir", "o", "--dry-run", blend)
    assert code == 0, err
    from megatron_nbdiff.config import RunConfig

    cfg = RunConfig.load(str(inputs / "o" / "slurm" / "config.yaml"))
    assert cfg.data.train == ["0.3", str(inputs / "data" / "corpus"), "0.7", str(inputs / "data" / "other")]


@pytest.mark.parametrize("argv,message", [
    (["--config", "nope.yaml", "--nodes", 1, "--gpus-per-node", 0], "config file not found: nope.yaml"),
    (["--nodes", 0, "--gpus-per-node", 8], "--nodes must be >= 1"),
    (["--nodes", 1, "--gpus-per-node", -1], "--gpus-per-node must be >= 0"),
    (["--nodes", 1, "--gpus-per-node", 8, "--procs-per-node", 2], "GPU jobs run one process per GPU"),
    (["--nodes", 1, "--gpus-per-node", 2, "train.tp=4"],
     "train.tp x train.pp x train.cp = 4 x 1 x 1 = 4 does not divide the 2 processes of 1 node(s) x 2 per node"),
    (["--nodes", 3, "--gpus-per-node", 1, "train.pp=2"], "= 2 does not divide the 3 processes"),
    (["--nodes", 1, "--gpus-per-node", 4, "train.global_batch_size=6"],
     "train.global_batch_size 6 is not divisible by micro_batch_size 4 x data-parallel size 4"),
    (["--nodes", 1, "--gpus-per-node", 3, "train.tp=3", "train.global_batch_size=4"],
     "tensor parallel size 3 does not divide num_attention_heads=4"),
    (["--nodes", 1, "--gpus-per-node", 3, "train.pp=3", "train.global_batch_size=4"],
     "pipeline parallel size 3 does not divide num_layers=4"),
    (["--nodes", 1, "--gpus-per-node", 0, "model.attention_backend=flex"], "cannot train on CPU"),
    (["--nodes", 1, "--gpus-per-node", 0, "train.stepz=3"], "unknown key(s) in 'train': stepz"),
    (["--nodes", 1, "--gpus-per-node", 0, "--time", "forever"], "is not a Slurm time limit"),
    (["--nodes", 1, "--gpus-per-node", 0, "--time", "4"], "leaves no training time before the save signal"),
    (["--nodes", 1, "--gpus-per-node", 0, "--job-name", "a b\n#SBATCH --x"], "contains characters Slurm"),
    (["--nodes", 1, "--gpus-per-node", 0, "--partition", "p;rm"], "contains characters Slurm"),
    (["--nodes", 1, "--gpus-per-node", 0, "--sbatch-option", "qos=high"], "must be one sbatch option"),
    (["--nodes", 1, "--gpus-per-node", 0, "--output-dir", "with space"], "without spaces"),
    (["--nodes", 1, "--gpus-per-node", 0, "--signal-seconds", 0], "--signal-seconds must be in 1..65535"),
    (["--nodes", 1, "--gpus-per-node", 0, "--python", "/nonexistent/python"], "is not an executable file"),
    (["--nodes", 1, "--gpus-per-node", 0, "data.train=[data/missing]"], "missing "),
    (["--nodes", 1, "--gpus-per-node", 0, "data.tokenizer=/nonexistent/tok"], "does not exist"),
    # a dry run validates exactly as a submission
    (["--nodes", 1, "--gpus-per-node", 0, "--dry-run", "data.train=[data/missing]"], "missing "),
    (["--nodes", 1, "--gpus-per-node", 0, "--dry-run", "data.tokenizer=/nonexistent/tok"],
     "data.tokenizer '/nonexistent/tok' does not exist"),
    (["--nodes", 1, "--gpus-per-node", 0, "--dry-run", "checkpoint.init_from=/nonexistent/ckpt"],
     "checkpoint.init_from '/nonexistent/ckpt' is not a directory"),
    (["--nodes", 1, "--gpus-per-node", 0, "--dry-run", "train.seq_len=60"],
     "train.seq_len 60 is not divisible by block size"),
    # values of the wrong type are refused with the key named
    (["--nodes", 1, "--gpus-per-node", 0, "--dry-run", "train.steps=abc"], "train.steps"),
])
def test_bad_input_is_one_error_line(launcher, inputs, monkeypatch, capsys, argv, message):
    if "--config" not in argv:
        argv = ["--config", "run.yaml"] + argv
    code, out, err = launch(launcher, monkeypatch, capsys, inputs, *argv)
    assert code == 2, (out, err)
    assert message in err, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not (inputs / "runs").exists() and not (inputs / "with space").exists()  # nothing written


def test_override_values_are_type_checked(launcher, inputs, monkeypatch, capsys):
    """`train.lr=3e-4` (a string to YAML) reaches the job config as the float 3e-4;
    `train.steps=abc` is refused with the key named, and nothing is written."""
    code, out, err = launch(launcher, monkeypatch, capsys, inputs, "--config", "run.yaml", "--nodes", 1,
                            "--gpus-per-node", 0, "--output-dir", "o", "--dry-run", "train.lr=3e-4")
    assert code == 0, err
    job = yaml.safe_load((inputs / "o" / "slurm" / "config.yaml").read_text())
    assert isinstance(job["train"]["lr"], float) and job["train"]["lr"] == 3e-4
    code, out, err = launch(launcher, monkeypatch, capsys, inputs, "--config", "run.yaml", "--nodes", 1,
                            "--gpus-per-node", 0, "--output-dir", "bad", "--dry-run", "train.steps=abc")
    assert code == 2 and out == ""
    errors = err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and "train.steps" in errors[0] and "abc" in errors[0]
    assert not (inputs / "bad").exists()


def test_bad_inputs_on_the_command_line(inputs):
    """tools/launch_slurm.py as a user runs it: exit 2, exactly one error line naming the problem,
    no traceback, nothing written."""
    base = ["--config", "run.yaml", "--nodes", "1", "--gpus-per-node", "0", "--output-dir", "o"]
    for args, message in [
        (base + ["--nodes", "0"], "--nodes must be >= 1, found 0"),
        (["--config", "run.yaml", "--gpus-per-node", "0"], "the following arguments are required: --nodes"),
        (base + ["--time", "forever"], "--time 'forever' is not a Slurm time limit"),
        (base + ["--dry-run", "data.train=[data/missing]"], f"missing {inputs}/data/missing.bin"),
        (base + ["--dry-run", "train.steps=abc"], "train.steps"),
    ]:
        r = subprocess.run([sys.executable, LAUNCH, *args], cwd=inputs, capture_output=True, text=True)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2, (args, r.stderr)
        assert len(errors) == 1 and message in errors[0], (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stdout == ""
        assert not (inputs / "o").exists()


def test_model_section_must_match_init_checkpoint(launcher, inputs, monkeypatch, capsys):
    from megatron_nbdiff.checkpoint import metadata as md
    from megatron_nbdiff.checkpoint.families import FAMILIES
    from megatron_nbdiff.config import RunConfig

    model = RunConfig.load(str(inputs / "run.yaml")).model.to_dict()
    ckpt = inputs / "ckpt"
    ckpt.mkdir()
    md.write_metadata(str(ckpt), md.CheckpointMetadata(
        kind="megatron", family="llama", hf_architecture=FAMILIES["llama"].architecture,
        model_config=dict(model, hidden_size=256),
        vocab=dict(real=model["vocab_size"], padded=model["vocab_size"], stored=model["vocab_size"],
                   hf=model["vocab_size"], tokenizer=None),
        mask_token=None, dtype="fp32", weights=dict(format="torch_dist", path="model", key_prefix=""),
        parallel=dict(target_tp=1, target_pp=1, written_tp=1, written_pp=1),
        tokenizer=dict(files=[], note="test"),
    ))
    code, out, err = launch(launcher, monkeypatch, capsys, inputs, "--config", "run.yaml", "--nodes", 1,
                            "--gpus-per-node", 0, f"checkpoint.init_from={ckpt}", "--dry-run")
    assert code == 2 and "hidden_size: 128 here, 256 in the checkpoint" in err, err
    # without the model section the architecture comes from nbdiff.json and is checked too
    data = yaml.safe_load((inputs / "run.yaml").read_text())
    del data["model"]
    (inputs / "nomodel.yaml").write_text(yaml.safe_dump(data))
    code, out, err = launch(launcher, monkeypatch, capsys, inputs, "--config", "nomodel.yaml", "--nodes", 1,
                            "--gpus-per-node", 3, f"checkpoint.init_from={ckpt}",
                            "train.tp=3", "train.global_batch_size=4", "--dry-run")
    assert code == 2 and "tensor parallel size 3 does not divide num_attention_heads=4" in err, err


def _fake_sbatch(bin_dir, exit_code=0):
    """An sbatch on PATH that records its arguments and answers like `sbatch --parsable`."""
    bin_dir.mkdir(exist_ok=True)
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > "{bin_dir}/args"\n'
        'echo "4242;cluster"\n'
        f"exit {exit_code}\n"
    )
    sbatch.chmod(0o755)
    return bin_dir


def test_submit_prints_the_job_id(launcher, inputs, monkeypatch, capsys):
    bin_dir = _fake_sbatch(inputs / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, out, err = launch(launcher, monkeypatch, capsys, inputs, "--config", "run.yaml",
                            "--nodes", 1, "--gpus-per-node", 0, "--output-dir", "sub")
    assert code == 0, err
    assert out == "4242\n"
    args = (bin_dir / "args").read_text().split()
    assert args == ["--parsable", str(inputs / "sub" / "slurm" / "job.sbatch")]


def test_submit_wait_returns_the_job_status(launcher, inputs, monkeypatch, capsys):
    bin_dir = _fake_sbatch(inputs / "bin", exit_code=75)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, out, err = launch(launcher, monkeypatch, capsys, inputs, "--config", "run.yaml",
                            "--nodes", 1, "--gpus-per-node", 0, "--output-dir", "sub", "--wait")
    assert code == 75 and out == "4242\n"
    assert (bin_dir / "args").read_text().split()[:2] == ["--parsable", "--wait"]


def test_sbatch_missing_or_failing(launcher, inputs, monkeypatch, capsys):
    empty = inputs / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    code, out, err = launch(launcher, monkeypatch, capsys, inputs, "--config", "run.yaml",
                            "--nodes", 1, "--gpus-per-node", 0, "--output-dir", "sub")
    assert code == 1 and "sbatch not found on PATH" in err and "Traceback" not in err
    refusing = inputs / "refusing"
    refusing.mkdir()
    (refusing / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition' >&2\nexit 1\n")
    (refusing / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{refusing}{os.pathsep}/usr/bin{os.pathsep}/bin")
    code, out, err = launch(launcher, monkeypatch, capsys, inputs, "--config", "run.yaml",
                            "--nodes", 1, "--gpus-per-node", 0, "--output-dir", "sub")
    assert code == 1 and "invalid partition" in err and out == ""


def test_cli_errors_without_traceback(inputs):
    """The command line end to end: a missing config is one error line and status 2."""
    r = subprocess.run([sys.executable, LAUNCH, "--config", "missing.yaml", "--nodes", "1",
                        "--gpus-per-node", "0"], cwd=inputs, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "error: config file not found: missing.yaml"


def test_render_and_time_parsing(launcher):
    text = "a=@A@\n@BLOCK@\nb=@B@\n"
    assert launcher.render(text, dict(A=1, BLOCK="", B="x")) == "a=1\nb=x\n"
    assert launcher.render(text, dict(A=1, BLOCK="#1\n#2", B="x")) == "a=1\n#1\n#2\nb=x\n"
    with pytest.raises(launcher.LaunchError, match="does not fill: B"):
        launcher.render(text, dict(A=1, BLOCK=""))
    with pytest.raises(launcher.LaunchError, match="lacks the placeholders: C"):
        launcher.render(text, dict(A=1, BLOCK="", B=2, C=3))
    assert launcher.parse_time_limit("30") == 1800
    assert launcher.parse_time_limit("10:30") == 630
    assert launcher.parse_time_limit("2:00:00") == 7200
    assert launcher.parse_time_limit("1-2") == 93600
    assert launcher.parse_time_limit("1-00:30") == 86400 + 1800
    assert launcher.parse_time_limit("2-01:00:05") == 2 * 86400 + 3605
    for bad in ("", "1h", "1:2:3:4", "0", "-5"):
        with pytest.raises(launcher.LaunchError):
            launcher.parse_time_limit(bad)


def test_script_outside_slurm_refuses(launcher, inputs, monkeypatch, capsys):
    code, out, err = launch(launcher, monkeypatch, capsys, inputs, "--config", "run.yaml",
                            "--nodes", 1, "--gpus-per-node", 0, "--output-dir", "o", "--dry-run")
    assert code == 0
    script = str(inputs / "o" / "slurm" / "job.sbatch")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "submit it with sbatch" in r.stderr
    r = subprocess.run(["bash", script, "bogus"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "unknown role 'bogus'" in r.stderr


def test_rank_role_records_the_exit_status(launcher, inputs, monkeypatch, capsys, tmp_path):
    """The per-process wrapper runs the trainer with SIGTERM/SIGUSR1 ignored until the trainer
    installs its handlers, and records its exit status under slurm/exit/<job>.<restart>/."""
    code, out, err = launch(launcher, monkeypatch, capsys, inputs, "--config", "run.yaml",
                            "--nodes", 1, "--gpus-per-node", 0, "--output-dir", "o", "--dry-run")
    assert code == 0
    script = (inputs / "o" / "slurm" / "job.sbatch").read_text()
    assert re.search(r"^TRAIN_MODULE=megatron_nbdiff\.training\.cli$", script, flags=re.M)
    fake = tmp_path / "fake"
    fake.mkdir()
    # a stand-in trainer module: reports whether the signals arrive ignored and its arguments,
    # then exits like a saved run (through run_main, as the real one)
    (fake / "fake_trainer.py").write_text(
        "import signal\n"
        "def main(argv):\n"
        "    ign = [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGUSR1)]\n"
        "    print('ignored', ign, argv)\n"
        "    return 75\n"
    )
    script = re.sub(r"^TRAIN_MODULE=.*$", "TRAIN_MODULE=fake_trainer", script, flags=re.M)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = dict(os.environ, SLURM_JOB_ID="77", SLURM_RESTART_COUNT="2", RANK="3", PYTHONPATH=str(fake))
    r = subprocess.run(["bash", str(path), "rank"], capture_output=True, text=True, env=env)
    assert r.returncode == 75, r.stderr
    assert "ignored [True, True]" in r.stdout and str(inputs / "o" / "slurm" / "config.yaml") in r.stdout
    assert (inputs / "o" / "slurm" / "exit" / "77.2" / "rank-3").read_text() == "75\n"


# ------------------------------------------------------------------------- real Slurm --


def _slurm_test_reason():
    flag = os.environ.get("NBDIFF_SLURM_TEST", "")
    if flag == "0":
        return "NBDIFF_SLURM_TEST=0"
    if flag == "1":
        return None
    found = shutil.which("slurmctld") or os.path.exists("/usr/sbin/slurmctld")
    if not found:
        return ("no Slurm here: set NBDIFF_SLURM_TEST=1 to install slurm-wlm and munge (root, "
                "apt-get) and run a private one-node cluster")
    if os.geteuid() != 0:
        return "the private Slurm cluster runs its daemons as root"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_slurm_test_reason() is not None, reason=str(_slurm_test_reason()))
def test_real_slurm_cluster():
    """Quickstart job to completion with sbatch --wait; a second job preempted by SIGUSR1 (requeues
    itself, resumes) and by scontrol requeue (SIGTERM, requeued by Slurm, resumes); see the script."""
    env = dict(os.environ, NBDIFF_SLURM_PYTHON=sys.executable)
    # errors="replace": the failure report tails job logs, which can cut a progress bar mid-character
    r = subprocess.run(["bash", SLURM_TEST], capture_output=True, text=True, errors="replace", env=env,
                       timeout=1200)
    output = (r.stdout + r.stderr).replace("\r", "\n")
    assert r.returncode == 0, output[-8000:]
    assert "PASS: slurm test" in r.stdout, output[-8000:]
