"""megatron_nbdiff.fileio.atomic_write: the one temporary-file-then-rename writer."""
import os
import stat

import pytest

from megatron_nbdiff.fileio import atomic_write


def test_text_and_bytes_replace_the_file(tmp_path):
    p = tmp_path / "a.json"
    atomic_write(str(p), "é\n")
    assert p.read_bytes() == "é\n".encode("utf-8")
    atomic_write(str(p), b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["a.json"]


def test_permissions_follow_umask_or_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "report.json"), "{}")
        atomic_write(str(tmp_path / "job.sbatch"), "#!/bin/bash\n", mode=0o755)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "report.json").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "job.sbatch").st_mode) == 0o755


def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x").write_text("keep")
    with pytest.raises(OSError):
        atomic_write(str(tmp_path / "dir"), "new")  # the rename onto a non-empty directory fails
    assert (tmp_path / "dir" / "x").read_text() == "keep"
    assert sorted(os.listdir(tmp_path)) == ["dir"]
    with pytest.raises(FileNotFoundError):
        atomic_write(str(tmp_path / "missing" / "a.json"), "x")


def test_save_figure_writes_a_whole_png_and_closes_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_nbdiff.fileio import save_figure

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["p.png"]
    assert not plt.fignum_exists(fig.number)


def test_figure_png_renders_and_closes_the_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_nbdiff.fileio import figure_png

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    data = figure_png(fig)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not plt.fignum_exists(fig.number)
