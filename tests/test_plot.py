"""Training curves: reading metrics.jsonl, the Figure 6 style, the CLI and its errors."""

import json
import subprocess
import sys

import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from resnet_jax.plot import MetricsError, draw_runs, main, plot_curves, read_metrics, run_labels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, records, model_name=None):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    if model_name is not None:
        config = {"model": {"name": model_name, "shortcut": ""}, "seed": 0}
        (run_dir / "config.json").write_text(json.dumps({"fingerprint": "0123abcd", "config": config}))
    return run_dir


def train_line(step, error):
    return {"step": step, "train_loss": 1.0, "train_error": error, "learning_rate": 0.1,
            "images_per_sec": 5000.0}


def eval_line(step, error):
    return {"step": step, "eval_loss": 1.2, "eval_error": error, "eval_top5_error": error / 4}


def small_run(run_dir, model_name=None, offset=0.0):
    records = [train_line(step, 0.9 - step / 1000 + offset) for step in range(0, 600, 100)]
    records += [eval_line(step, 0.95 - step / 1000 + offset) for step in (200, 400)]
    return write_run(run_dir, records, model_name)


def drawn_axes(run_dirs, labels=None):
    ax = Figure().add_subplot()
    draw_runs(ax, run_dirs, labels)
    return ax


def test_read_metrics_sorts_by_step_and_reads_both_kinds(tmp_path):
    run = write_run(tmp_path / "run", [
        train_line(200, 0.5), eval_line(200, 0.6), train_line(100, 0.7),
        {**train_line(300, 0.4), **eval_line(300, 0.45)},
    ])
    metrics = read_metrics(run)
    assert metrics["train_error"] == [(100, 0.7), (200, 0.5), (300, 0.4)]
    assert metrics["eval_error"] == [(200, 0.6), (300, 0.45)]
    assert metrics["eval_top5_error"] == [(200, 0.15), (300, 0.1125)]
    assert [step for step, _ in metrics["learning_rate"]] == [100, 200, 300]


def test_read_metrics_keeps_the_last_value_of_a_repeated_step(tmp_path):
    # A run resumed from the step-100 checkpoint logs steps 200 and 300 again.
    run = write_run(tmp_path / "run", [
        train_line(100, 0.8), train_line(200, 0.7), eval_line(200, 0.75), train_line(300, 0.6),
        train_line(200, 0.65), eval_line(200, 0.72), train_line(300, 0.55),
    ])
    metrics = read_metrics(run)
    assert metrics["train_error"] == [(100, 0.8), (200, 0.65), (300, 0.55)]
    assert metrics["eval_error"] == [(200, 0.72)]


def test_labels_are_model_names_unless_missing_or_shared(tmp_path):
    runs = [small_run(tmp_path / "a", "resnet20"), small_run(tmp_path / "b", "plain20"),
            small_run(tmp_path / "seed0", "resnet56"), small_run(tmp_path / "seed1", "resnet56"),
            small_run(tmp_path / "noconfig"), small_run(tmp_path / "flat")]
    # A config written as the bare config object, without train.py's fingerprint record.
    (tmp_path / "flat" / "config.json").write_text(json.dumps({"model": {"name": "resnet110"}}))
    assert run_labels(runs) == ["resnet20", "plain20", "seed0", "seed1", "noconfig", "resnet110"]


def test_each_run_is_a_thin_train_and_a_bold_eval_line_of_one_colour(tmp_path):
    runs = [small_run(tmp_path / name, name, offset) for name, offset in [("plain20", 0.05), ("resnet20", 0)]]
    ax = drawn_axes(runs)
    assert len(ax.lines) == 4
    colors = []
    for train, evaluation in zip(ax.lines[0::2], ax.lines[1::2], strict=True):
        assert train.get_linewidth() < evaluation.get_linewidth()
        assert to_rgba(train.get_color()) == to_rgba(evaluation.get_color())
        colors.append(to_rgba(train.get_color()))
    assert colors[0] != colors[1]
    # Errors are drawn in percent against steps: plain20's eval error is 0.8 at step 200.
    assert list(ax.lines[1].get_xdata()) == [200, 400]
    assert list(ax.lines[1].get_ydata()) == pytest.approx([80.0, 60.0])
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["plain20", "resnet20", "train", "eval"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("iterations", "error (%)")


def test_a_single_point_is_drawn_as_a_marker(tmp_path):
    run = write_run(tmp_path / "short", [train_line(100, 0.8), eval_line(100, 0.85)])
    ax = drawn_axes([run])
    train, evaluation = ax.lines
    for line, error in ((train, 80.0), (evaluation, 85.0)):
        assert list(line.get_xdata()) == [100] and list(line.get_ydata()) == pytest.approx([error])
        assert line.get_marker() not in (None, "None", "", " ") and line.get_markersize() > 0


def test_cli_writes_a_png(tmp_path):
    runs = [small_run(tmp_path / "a", "plain20"), small_run(tmp_path / "b", "resnet20")]
    out = tmp_path / "figs" / "curves.png"
    main([str(runs[0]), str(runs[1]), "--out", str(out), "--title", "CIFAR-10",
          "--labels", "plain-20,ResNet-20", "--ylim", "0,60"])
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000


def test_plot_curves_applies_title_and_ylim_from_0_by_default(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: drawn.append(figure))
    plot_curves([small_run(tmp_path / "a")], tmp_path / "c.png", title="T", ylim=(5.0, 60.0))
    (ax,) = drawn[0].axes
    assert ax.get_ylim() == (5.0, 60.0)
    assert ax.get_title() == "T"
    # Without ylim, the axis starts at 0 and fits the highest error (the train error at step 0, 90%).
    plot_curves([tmp_path / "a"], tmp_path / "c.png")
    bottom, top = drawn[1].axes[0].get_ylim()
    assert bottom == 0 and top >= 90


def test_missing_run_directory_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"nowhere: no such run directory"):
        main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.png")])
    (tmp_path / "run").mkdir()
    with pytest.raises(MetricsError, match=r"run/metrics\.jsonl: not found"):
        read_metrics(tmp_path / "run")


def test_empty_metrics_file_is_a_clear_error(tmp_path):
    run = write_run(tmp_path / "run", [])
    with pytest.raises(SystemExit, match=r"metrics\.jsonl: empty"):
        main([str(run), "--out", str(tmp_path / "c.png")])


@pytest.mark.parametrize("bad_line, reason", [
    ('{"step": 300, "train_error": 0.5', "not valid JSON"),
    ('{"train_error": 0.5}', "integer 'step'"),
    ('{"step": "300", "train_error": 0.5}', "integer 'step'"),
    ('{"step": true, "train_error": 0.5}', "integer 'step'"),
    ("[300, 0.5]", "integer 'step'"),
])
def test_malformed_line_is_named_by_file_and_number(tmp_path, bad_line, reason):
    run = write_run(tmp_path / "run", [train_line(100, 0.8), eval_line(100, 0.9)])
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write(bad_line + "\n")
    with pytest.raises(SystemExit, match=rf"run/metrics\.jsonl:3: .*{reason}"):
        main([str(run), "--out", str(tmp_path / "c.png")])


def test_labels_must_match_the_runs(tmp_path, capsys):
    run = small_run(tmp_path / "a")
    with pytest.raises(SystemExit):
        main([str(run), "--out", str(tmp_path / "c.png"), "--labels", "x,y"])
    assert "2 labels for 1 run" in capsys.readouterr().err


def test_missing_matplotlib_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(SystemExit, match=r"pip install matplotlib"):
        main([str(small_run(tmp_path / "a")), "--out", str(tmp_path / "c.png")])


def test_import_does_not_load_matplotlib():
    code = "import sys, resnet_jax.plot; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
