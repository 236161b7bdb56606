"""README.md's facts checked against the code, and its usage lines run in order (on fixtures, as smoke runs)."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import models
from compress import TECHNIQUES
from tests.conftest import HANG, REPO, compose_config, run_dir_for
from tests.fixtures import make_cifar100, make_wikitext103
from train import pipeline
from train.checkpoint import load_latest

README = (REPO / "README.md").read_text()
CONF = REPO / "conf"


def _table(header: str) -> list[list[str]]:
    """The rows of the markdown table whose header line starts with ``header``, as lists of cell texts."""
    lines = README[README.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _names(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def test_the_task_table_names_each_tasks_default_model_and_only_registered_models():
    rows = _table("| `task=` |")
    assert sorted(_names(row[0])[0] for row in rows) == sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
    for row in rows:
        task = OmegaConf.load(CONF / "task" / f"{_names(row[0])[0]}.yaml")
        assert _names(row[2]) == [task.default_model], row  # the README said efficientnet_b0 for imagenet
        assert set(_names(row[2]) + _names(row[3])) <= set(models.list_models()), row


def test_the_compress_table_lists_exactly_the_compress_options():
    listed = [name for row in _table("| `compress=` |") for name in _names(row[0])]
    assert sorted(listed) == sorted(p.stem for p in (CONF / "compress").glob("*.yaml"))


def test_every_configuration_key_in_the_table_exists():
    cfg = compose_config()
    for row in _table("| key | meaning |"):
        for key in _names(row[0]):
            assert key.endswith(".*") and key[:-2] in cfg or OmegaConf.select(cfg, key, default="?") != "?", key


def test_documented_exit_statuses_are_the_ones_run_uses():
    assert (pipeline.GATE_FAILED_EXIT, pipeline.PREEMPTED_EXIT, pipeline.INTERRUPTED_EXIT) == (3, 143, 130)
    for status, meaning in (("0", "finished, the entry passes its gate"), ("3", "finished, but the entry fails"),
                            ("2", "a problem you can fix"), ("143", "stopped by SIGTERM / Ctrl-C after saving"),
                            ("130", "stopped by a second Ctrl-C")):
        assert f"**{status}** {meaning}" in " ".join(README.split()), status


def test_how_to_add_a_technique_matches_the_registry():
    assert {name: kind.order for name, kind in TECHNIQUES.items()} == {"prune": 10, "quantize": 20, "distill": 30}
    assert "pruning 10, quantization 20, distillation 30" in README and "@compress.register_technique" in README


def test_the_newcomer_commands_are_unchanged():
    assert "    pip install -e . && python train/run.py\n" in README
    assert '    pip install -e ".[test]" && python -m pytest\n' in README


def test_nothing_refers_to_documents_outside_the_repository():
    """A user's clone has docs/ and nothing of the workspace the project was written in."""
    texts = {path: path.read_text(errors="replace") for pattern in ("*.py", "*.md", "*.yaml", "*.sh", "*.ini", "*.cfg")
             for path in REPO.rglob(pattern) if ".git" not in path.parts and "outputs" not in path.parts
             and path != Path(__file__).resolve()}
    for path, text in texts.items():
        assert "shared/docs" not in text and "micronet-rules.md" not in text, path
        for reference in re.findall(r"\bdocs/[\w.-]+\.md\b", text):
            assert (REPO / reference).is_file(), (path, reference)
    assert "docs/rules.md" in README and "docs/design.md" in README


def _usage_lines() -> list[str]:
    block = README[README.index("## Usage"):].split("\n\n")[1]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip().startswith("python train/run.py")]


@pytest.mark.slow
def test_the_usage_lines_run_in_order_on_fixtures(tmp_path: Path):
    """Every usage line of the README, in order, in one folder, as a newcomer would run them: each one finishes
    (0, or 3 where the entry misses its gate) in a run folder of its own, unless it repeats an earlier command
    (then it reprints that run). On fixtures in the real formats, as smoke runs (smoke=true; the datasets' lines with
    a small batch size); the init= line starts from where the first line actually ran."""
    roots = {"data.root=/data/cifar": make_cifar100(tmp_path / "cifar", train_per_class=1, test_per_class=1).parent,
             "data.root=/data": make_wikitext103(tmp_path / "wt103").parent}
    lines = _usage_lines()
    assert any(line.startswith("python train/run.py init=outputs/digits/digits_cnn/none/seed0 ") for line in lines)
    folders: dict[str, str] = {}  # the folder each line names (where an init= path points) -> where it ran
    commands: dict[tuple[str, ...], str] = {}
    for line in lines:
        args = shlex.split(line)[2:]
        named = run_dir_for(*args)
        fixture = [a for a in args if a in roots]
        args = [f"data.root={roots[a]}" if a in roots else f"init={folders[a[5:]]}" if a.startswith("init=") else a
                for a in args]
        args += [] if "smoke=true" in args else ["smoke=true"]
        if fixture:  # small batches: CIFAR's default model is WRN-28-10 (5 GFLOPs an image); 2 evaluation batches
            # of 4 give the scorer its 8 images; WikiText-103's train text holds each of its 267,734 words once,
            # nearly all in the adaptive softmax's widest cluster (the costliest tokens)
            args += ["train.batch_size=4"] if fixture == ["data.root=/data"] else \
                ["train.batch_size=2", "train.eval_batch_size=4"]
        result = subprocess.run([sys.executable, str(REPO / "train" / "run.py"), *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=HANG)
        assert result.returncode in (0, 3), f"{line}\n{result.stderr[-3000:]}"
        folder = re.search(r"run folder: (\S+)", result.stdout).group(1)
        assert (Path(folder) / "report.json").is_file() and (Path(folder) / "entry" / "entry.json").is_file(), line
        # a smoke run: every stage (the recipe's three included) one epoch of two batches
        states = [load_latest(stage) for stage in (Path(folder) / "checkpoints").iterdir()]
        assert states and all((s["finished"], s["epoch"], s["global_step"]) == (True, 1, 2) for s in states), line
        if tuple(args) in commands:  # the recipe line, given smoke=true twice
            assert folder == commands[tuple(args)] and "run already finished" in result.stdout, line
        else:
            assert folder not in commands.values() and "run already finished" not in result.stdout, line
            assert "smoke run" in result.stdout, line
        commands[tuple(args)] = folders[str(named)] = folder
