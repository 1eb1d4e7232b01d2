"""Sweeps of the app beyond a one-process grid: the Optuna Pareto search (``hydra/sweeper=pareto``), the
parallel and cluster launchers (``hydra/launcher=parallel``, ``cluster_local``), and what the report makes
of them (Pareto front, reproducing commands, seed repeats as mean ± std).

The sweeps run the app in-process through its real entry point (``main()`` with ``sys.argv`` set), as
tests/test_app.py does; the launchers then start their own worker processes. The plugins are optional
(the ``sweep`` extra): their tests skip without them. The report is also tested on synthetic job
folders, fast.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from helpers import run_app
from prune_callbacks.app import report, train
from prune_callbacks.app.config import ConfigError
from prune_callbacks.app.report import (
    COMMAND,
    PARETO_FILE,
    PLOT_FILE,
    collect,
    group_repeats,
    pareto_front,
    reproduce_command,
    write_report,
)

# The smallest runs that prune: two epochs of two batches, a prune after each (the Pareto search sets
# the number of steps itself), a one-batch validation and a short latency measurement.
SWEEP_TINY = [
    "logger=none",
    "threads=1",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "pruning.start_epoch=0",
    "pruning.verbose=false",
    "latency.batch_sizes=[1]",
    "latency.warmup=0",
    "latency.repeats=2",
    "save_pruned_model=false",
    "model.width=8",
    "data.batch_size=16",
]
GRID_TINY = [*SWEEP_TINY, "pruning.end_epoch=1"]
PNG = b"\x89PNG\r\n\x1a\n"


def readme_has_command(args: list[str]) -> None:
    """README's "Search the trade-off" shows this sweep as written (``python -m prune_callbacks.train``
    and ``args``; lines continued with a backslash are joined, shell quoting undone)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text().replace("\\\n", " ")
    lines = [line.split("  #")[0] for line in readme.splitlines()]
    commands = [shlex.split(line) for line in lines if line.startswith("python -m prune_callbacks.train -m")]
    assert ["python", "-m", "prune_callbacks.train", *args] in commands, f"README lacks: {shlex.join(args)}"



@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test from a temporary directory, so Hydra's outputs/ folders land there."""
    monkeypatch.chdir(tmp_path)




def compose_app(overrides: list[str]) -> object:
    """The app's config with the ``hydra`` node, as a job of that command line would see it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(train.conf_dir()), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def plugin(name: str) -> None:
    pytest.importorskip(f"hydra_plugins.{name}", reason=f"{name} is not installed (the sweep extra)")


# ---------------------------------------------------------------------------------- report, synthetic


def _job(
    sweep: Path,
    index: int,
    overrides: list[str],
    accuracy: float,
    macs: int,
    recorded: list[str] | None = None,
) -> None:
    """A job folder as the app writes it: results.json and Hydra's .hydra/overrides.yaml."""
    job = sweep / str(index)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    results = {
        "model": "DigitsResNet",
        "data": "DigitsDataModule",
        "metric": "val/acc",
        "overrides": overrides if recorded is None else recorded,
        "dense": {"accuracy": 0.98, "macs": 3_300_000, "params": 150_000, "latency_s": {"1": 2e-3}},
        "pruned": {"accuracy": accuracy, "macs": macs, "params": 60_000, "latency_s": {"1": 1e-3}},
        "speedup": {"macs": 3_300_000 / macs, "params": 2.5, "latency": {"1": 2.0}},
    }
    (job / "results.json").write_text(json.dumps(results))


# (target speedup, accuracy, MACs): 2.5x is dominated by 3x (more accurate with fewer MACs).
SEARCH = [(2.0, 0.975, 1_650_000), (2.5, 0.950, 1_320_000), (3.0, 0.960, 1_100_000), (6.0, 0.900, 550_000)]


def test_front_holds_the_non_dominated_settings_with_their_commands(tmp_path: Path) -> None:
    sweep = tmp_path / "search"
    fixed = ["latency.batch_sizes=[1,4]", "trainer.max_epochs=3"]
    for i, (speedup, acc, macs) in enumerate(SEARCH):
        overrides = [f"pruning.target_speedup={speedup}", *fixed]
        _job(sweep, i, overrides, acc, macs, recorded=[*overrides, "stale=1"])
    rows = collect(sweep)
    settings = group_repeats(rows)
    assert len(settings) == 4 and all(len(s.rows) == 1 for s in settings)
    front = pareto_front(settings)
    # Brute force: a point is on the front when no other point is at least as good in both and better in one.
    expected = [
        p
        for p in SEARCH
        if not any(q[1] >= p[1] and q[2] <= p[2] and (q[1] > p[1] or q[2] < p[2]) for q in SEARCH)
    ]
    by_macs = sorted(((p[1], p[2]) for p in expected), key=lambda t: t[1])
    assert [(s.accuracy, s.macs) for s in front] == by_macs
    assert 2.5 not in [p[0] for p in expected]
    # The command is the job's own overrides (.hydra/overrides.yaml, not results.json), shell-quoted.
    command = reproduce_command(front[0])
    assert shlex.split(command) == [*COMMAND.split(), "pruning.target_speedup=6.0", *fixed]
    assert "stale=1" not in command

    md, png = write_report(sweep)
    text = md.read_text()
    section = text[text.index("## Pareto front") :]
    assert f"{len(expected)} of 4 settings are not dominated" in section
    for s in front:
        assert f"`{reproduce_command(s)}`" in section
    assert "pruning.target_speedup=2.5" not in section  # the dominated setting is not listed
    assert (sweep / PARETO_FILE).read_bytes()[:8] == PNG and png == sweep / PLOT_FILE
    # The grid table of every job is still there, as before.
    assert all(f"pruning.target_speedup={p[0]}" in text[: text.index("## Pareto front")] for p in SEARCH)


def test_seed_repeats_are_one_setting_with_mean_and_std(tmp_path: Path) -> None:
    sweep = tmp_path / "seeds"
    accuracies = {0.3: [0.97, 0.98, 0.975], 0.6: [0.90, 0.93, 0.91]}
    macs = {0.3: [1_600_000, 1_610_000, 1_590_000], 0.6: [700_000, 705_000, 700_000]}
    index = 0
    for seed in range(3):
        for ratio in (0.3, 0.6):
            overrides = [f"seed={seed}", "pruning=taylor_ratio", f"pruning.pruning_ratio={ratio}"]
            _job(sweep, index, overrides, accuracies[ratio][seed], macs[ratio][seed])
            index += 1
    settings = group_repeats(collect(sweep))
    assert [s.label for s in settings] == ["pruning.pruning_ratio=0.3", "pruning.pruning_ratio=0.6"]
    for s, ratio in zip(settings, (0.3, 0.6)):
        assert s.seeds == ["0", "1", "2"] and len(s.jobs) == 3
        assert math.isclose(s.accuracy, statistics.mean(accuracies[ratio]), rel_tol=1e-12)
        assert math.isclose(s.accuracy_std, statistics.stdev(accuracies[ratio]), rel_tol=1e-12)
        assert math.isclose(s.macs_std, statistics.stdev(macs[ratio]), rel_tol=1e-12)
        command = shlex.split(reproduce_command(s))
        assert command[:4] == [*COMMAND.split(), "-m"] and command[-1] == "seed=0,1,2"
        assert f"pruning.pruning_ratio={ratio}" in command

    md, _ = write_report(sweep)
    text = md.read_text()
    assert "## Repeats (mean ± standard deviation over seeds)" in text
    mean, std = statistics.mean(accuracies[0.6]), statistics.stdev(accuracies[0.6])
    assert f"{100 * mean:.2f} ± {100 * std:.2f}" in text
    assert (sweep / PLOT_FILE).read_bytes()[:8] == PNG and (sweep / PARETO_FILE).read_bytes()[:8] == PNG


def test_a_grid_without_repeats_has_no_repeats_table(tmp_path: Path) -> None:
    sweep = tmp_path / "grid"
    for i, (speedup, acc, macs) in enumerate(SEARCH[:2]):
        _job(sweep, i, [f"pruning.target_speedup={speedup}"], acc, macs)
    _job(sweep, 2, ["pruning.target_speedup=2.5"], SEARCH[1][1], SEARCH[1][2])  # a search may ask twice
    (sweep / "0" / ".hydra" / "overrides.yaml").unlink()  # an old job: results.json's overrides are used
    rows = collect(sweep)
    assert rows[0]["command_overrides"] == ["pruning.target_speedup=2.0"]
    settings = group_repeats(rows)
    assert [s.jobs for s in settings] == [["0"], ["1", "2"]] and settings[1].repeats == 1
    assert reproduce_command(settings[1]) == f"{COMMAND} pruning.target_speedup=2.5"
    md, _ = write_report(sweep)
    assert "## Repeats" not in md.read_text() and "## Pareto front" in md.read_text()


def test_pareto_plot_fades_dominated_points_and_connects_the_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = tmp_path / "search"
    for i, (speedup, acc, macs) in enumerate(SEARCH):
        _job(sweep, i, [f"pruning.target_speedup={speedup}"], acc, macs)
    saved = []
    figure_cls = report._figure().__class__
    monkeypatch.setattr(figure_cls, "savefig", lambda fig, path, **kw: saved.append(fig))
    report.pareto_plot(collect(sweep), tmp_path / "front.png")
    (ax,) = saved[0].axes
    (line,) = [ln for ln in ax.get_lines() if ln.get_label() == "Pareto front"]
    front = [p for p in SEARCH if p[0] != 2.5]
    assert list(line.get_xdata()) == sorted(p[2] / 1e6 for p in front)
    faded = [c for c in ax.collections if c.get_label() == "dominated"]
    assert len(faded) == 1 and faded[0].get_alpha() < 0.5
    assert faded[0].get_offsets().tolist() == [[pytest.approx(1.32), pytest.approx(95.0)]]


# ---------------------------------------------------------------------------------- objectives, plugins


def _objectives(overrides: list[str]) -> list[str]:
    cfg = compose_app(overrides)
    HydraConfig.instance().set_config(cfg)
    try:
        return train._objectives(cfg)
    finally:
        HydraConfig.instance().cfg = None


def test_grid_sweeps_return_the_metric_and_the_pareto_sweeper_two_values() -> None:
    assert _objectives([]) == ["accuracy"]
    plugin("hydra_optuna_sweeper")
    assert _objectives(["hydra/sweeper=pareto"]) == ["accuracy", "macs"]
    assert _objectives(["hydra/sweeper=pareto", "+objectives=[accuracy,params]"]) == ["accuracy", "params"]
    one = r"^objectives=\[accuracy\]: 1 value\(s\) for a sweeper that optimizes 2"
    with pytest.raises(ConfigError, match=one):
        _objectives(["hydra/sweeper=pareto", "+objectives=[accuracy]"])
    with pytest.raises(ConfigError, match="latency is not an objective; use 2 of: accuracy, macs, params"):
        _objectives(["hydra/sweeper=pareto", "+objectives=[accuracy,latency]"])


def test_sweep_options_compose() -> None:
    plugin("hydra_optuna_sweeper")
    sweeper = compose_app(["hydra/sweeper=pareto"]).hydra.sweeper
    assert sweeper.sampler._target_ == "optuna.samplers.NSGAIISampler"
    assert list(sweeper.direction) == ["maximize", "minimize"]
    assert {"pruning.target_speedup", "pruning.importance", "pruning.iterative_steps"} <= set(sweeper.params)
    plugin("hydra_joblib_launcher")
    assert compose_app(["hydra/launcher=parallel"]).hydra.launcher.n_jobs == 2
    plugin("hydra_submitit_launcher")
    assert compose_app(["hydra/launcher=cluster_local"]).hydra.launcher._target_.endswith("LocalLauncher")
    assert compose_app(["hydra/launcher=slurm"]).hydra.launcher._target_.endswith("SlurmLauncher")


def test_a_missing_plugin_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    train.check_sweep_plugins(["hydra/sweeper=pareto", "seed=0,1"])  # installed (or no such choice): fine
    monkeypatch.setattr(train, "_has_plugin", lambda name: False)
    with pytest.raises(ConfigError) as exc:
        train.check_sweep_plugins(["-m", "hydra/sweeper=pareto"])
    message = str(exc.value)
    assert "\n" not in message and "hydra-optuna-sweeper" in message
    assert message.endswith("pip install prune_callbacks[sweep]")
    with pytest.raises(ConfigError, match="hydra-submitit-launcher"):
        train.check_sweep_plugins(["hydra/launcher=slurm"])


def test_the_app_refuses_a_missing_plugin_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(train, "_has_plugin", lambda name: False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # the bad ratio stops a job at once should the check not run
        run_app(["-m", "hydra/sweeper=pareto", "logger=none", "pruning.pruning_ratio=1.5"])
    err = capsys.readouterr().err.strip()
    wired = "main() must call train.check_sweep_plugins(sys.argv[1:]) before Hydra composes"
    assert err.splitlines()[-1].startswith("error: hydra/sweeper=pareto: needs the Hydra plugin"), wired
    assert exc.value.code == 2 and "Traceback" not in err


# ---------------------------------------------------------------------------------- real sweeps


@pytest.mark.slow
def test_optuna_pareto_search_of_4_trials_and_its_front(tmp_path: Path) -> None:
    """4 NSGA-II trials of the digits network: every job returns (metric, MACs) to Optuna, and the
    report's front is Optuna's own, each with a command that reproduces its job."""
    plugin("hydra_optuna_sweeper")
    sweep = tmp_path / "pareto"
    search = ["hydra/sweeper=pareto", "hydra.sweeper.n_trials=4", "pruning.iterative_steps=choice(1,2)"]
    readme_has_command(["-m", *search, *SWEEP_TINY])
    run_app(["-m", *search, f"hydra.sweep.dir={sweep}", *SWEEP_TINY])
    rows = collect(sweep)
    assert len(rows) == 4
    speedups = {r["pruning"]["target_speedup"] for r in rows}
    assert len(speedups) > 1 and all(1.5 <= s <= 8.0 for s in speedups)  # sampled from the search space
    for r in rows:  # the MACs target is met: a real MACs objective
        assert r["dense"]["macs"] / r["pruned"]["macs"] >= 0.97 * r["pruning"]["target_speedup"]
    optuna_front = OmegaConf.load(sweep / "optimization_results.yaml").solutions
    values = {(r["pruned"]["accuracy"], float(r["pruned"]["macs"])) for r in rows}
    assert {tuple(s["values"]) for s in optuna_front} <= values  # Optuna was told (metric, MACs)

    write_report(sweep)
    front = pareto_front(group_repeats(rows))
    assert {(s.accuracy, s.macs) for s in front} == {tuple(s["values"]) for s in optuna_front}
    assert (sweep / PARETO_FILE).read_bytes()[:8] == PNG
    text = (sweep / "report.md").read_text()
    lines = [line.strip() for line in text.splitlines()]
    commands = [line.strip("`") for line in lines if line.startswith(f"`{COMMAND}")]
    assert len(commands) == len(front)

    # The first command, run as written (in its own folder), rebuilds the same pruned model.
    run_dir = tmp_path / "again"
    run_app([*shlex.split(commands[0])[len(COMMAND.split()) :], f"hydra.run.dir={run_dir}"])
    again = json.loads((run_dir / "results.json").read_text())
    assert again["pruned"]["macs"] == front[0].macs
    assert again["pruned"]["accuracy"] == pytest.approx(front[0].accuracy, abs=1e-6)


@pytest.mark.slow
def test_parallel_launcher_runs_two_seeds_and_the_report_groups_them(tmp_path: Path) -> None:
    plugin("hydra_joblib_launcher")
    sweep = tmp_path / "parallel"
    readme_has_command(["-m", "hydra/launcher=parallel", "seed=0,1", *GRID_TINY])
    run_app(["-m", "hydra/launcher=parallel", "seed=0,1", f"hydra.sweep.dir={sweep}", *GRID_TINY])
    rows = collect(sweep)
    assert [r["job"] for r in rows] == ["0", "1"]
    (setting,) = group_repeats(rows)
    assert setting.seeds == ["0", "1"]
    accuracies = [r["pruned"]["accuracy"] for r in rows]
    assert math.isclose(setting.accuracy, statistics.mean(accuracies))
    assert math.isclose(setting.accuracy_std, statistics.stdev(accuracies))
    md, png = write_report(sweep)
    assert "## Repeats" in md.read_text() and png is not None and png.read_bytes()[:8] == PNG


@pytest.mark.slow
def test_submitit_local_launcher_runs_two_jobs_and_the_report_reads_them(tmp_path: Path) -> None:
    plugin("hydra_submitit_launcher")
    sweep = tmp_path / "cluster"
    targets = "pruning.target_speedup=1.5,2.5"
    readme_has_command(["-m", "hydra/launcher=cluster_local", targets, *GRID_TINY])
    run_app(["-m", "hydra/launcher=cluster_local", targets, f"hydra.sweep.dir={sweep}", *GRID_TINY])
    rows = collect(sweep)
    assert sorted(r["pruning"]["target_speedup"] for r in rows) == [1.5, 2.5]
    assert (sweep / ".submitit").is_dir()  # the jobs went through submitit
    md, _ = write_report(sweep)
    text = md.read_text()
    assert "pruning.target_speedup=1.5" in text and "pruning.target_speedup=2.5" in text
    assert "## Pareto front" in text
