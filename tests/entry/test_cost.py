"""What an entry's model may cost to run (scoring/entry/cost.py): a small entry whose keyword arguments ask for a
model that would take gigabytes or minutes to evaluate is refused in one line, before anything real is built or any
data is read; the kit's own models at the kit's settings are well inside the limits."""
from __future__ import annotations

import resource
import time

import pytest
from hydra import compose, initialize_config_dir

from models import create_model
from scoring.entry import EntryError, build_model_from_entry, load_entry, save_entry, verify
from scoring.entry.bundle import _skeleton
from scoring.entry.cost import MAX_BYTES_PER_EXAMPLE, MAX_MEMORY_TOKENS, check_cost
from train.config import to_container
from tests.conftest import CONF_DIR

from .conftest import exit_status

#: A Transformer-XL of about 40,000 parameters on the demo corpus (13,329 words): what the probes start from.
SMALL_TXL = dict(d_model=16, n_layer=1, n_head=2, d_head=8, d_inner=32, mem_len=16, cutoffs=None, widths=None)


def kit_config(task: str, model: str, **kwargs) -> dict:
    """The resolved config of a run of ``model`` on ``task`` (the kit's settings), with model keyword arguments."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        config = to_container(compose("config", overrides=[f"task={task}", f"model={model}", "device=cpu"]))
    config["model"]["kwargs"] = {**(config["model"].get("kwargs") or {}), **kwargs}
    return config


@pytest.mark.parametrize("kwargs, refusal", [
    # 13,329 heads of width 1 (each number within the registry's bound, the vocabulary size): 13,329 × 272
    # attention scores of 4 bytes per token and tensor, several alive at once, for a model of 1.3 M parameters.
    (dict(n_head=13_329, d_head=1), rf"activations per token of an evaluation step [\d,]+ bytes, over the limit "
                                    rf"of {MAX_BYTES_PER_EXAMPLE:,} bytes"),
    # A memory of 13,329 tokens: every token of the stream would attend to 13,330 positions.
    (dict(mem_len=13_329), rf"memory \(mem_len\) 13,329 tokens, over the limit of {MAX_MEMORY_TOKENS:,} tokens"),
], ids=["13329-heads", "mem-len-13329"])
def test_a_small_entry_that_asks_for_a_costly_model_is_refused_before_any_data(tmp_path, capsys, kwargs, refusal):
    config = kit_config("wikitext_demo", "txl_micronet", **{**SMALL_TXL, **kwargs})
    entry_dir = save_entry(tmp_path / "entry", create_model("txl_micronet", num_classes=13_329,
                                                            **config["model"]["kwargs"]), config=config)
    assert (entry_dir / "model.safetensors").stat().st_size < 8 << 20  # small on disk
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(EntryError, match=rf"^model txl_micronet with entry\.json's arguments .*: {refusal} for an "
                                         r"entry \(scoring/entry/cost\.py\); re-export a run of a smaller model$"):
        build_model_from_entry(load_entry(entry_dir))
    # The scoring CLI refuses it the same way, before the corpus is read (build_task is never reached).
    assert exit_status(verify.score_main, [str(entry_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: model txl_micronet with entry.json's arguments")
    assert time.perf_counter() - start < 20
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: no gigabytes


@pytest.mark.parametrize("task, model, kwargs", [
    ("wikitext103", "txl_micronet", {}),  # a memory of 96 tokens, fed in windows of 512
    ("cifar100", "wrn28_10", {}),         # 1.05e10 operations per image, the most of the registry's models
    ("imagenet", "mobilenetv2_140", {}),  # 18.7 MB of activations per image, the most
    ("cifar100", "densenet_bc", dict(depth=190, growth_rate=40)),  # 13.9 GB in an evaluation batch of 1,000
])
def test_the_kits_models_at_the_kits_settings_are_within_the_limits(task, model, kwargs):
    config = kit_config(task, model, **kwargs)
    check_cost(_skeleton(model, config["task"]["num_classes"], config["model"]["kwargs"]), config, model)
